//! The actix-web adapter end to end: real actix-web servers on 127.0.0.1,
//! real clients of every transport (`switchboard_testkit::conformance`),
//! the body cap, and the `Authenticated` extractor.

use std::net::SocketAddr;

use actix_web::dev::ServerHandle;
use actix_web::{web, App, HttpServer};
use switchboard_actix::{Authenticated, Options};
use switchboard_runtime::{AllowOrigins, Switchboard};
use switchboard_testkit::{conformance, http, API_KEY};

/// An actix-web server on its own thread and actix system; stopped when
/// dropped.
struct Served {
    addr: SocketAddr,
    handle: ServerHandle,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Served {
    fn drop(&mut self) {
        // Not graceful: open SSE streams would hold a graceful stop.
        drop(self.handle.stop(false));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Serves the app `configure` builds (in each worker) on 127.0.0.1:0.
fn serve<F>(switchboard: &Switchboard, configure: F) -> Served
where
    F: Fn(&mut web::ServiceConfig) + Clone + Send + 'static,
{
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("an address");
    let switchboard = switchboard.clone();
    let (handle_tx, handle_rx) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            let server = HttpServer::new(move || {
                App::new()
                    .app_data(switchboard.clone())
                    .configure(configure.clone())
            })
            .workers(1)
            .disable_signals()
            .listen(listener)
            .expect("listen")
            .run();
            handle_tx.send(server.handle()).expect("the test waits");
            let _ = server.await;
        });
    });
    let handle = handle_rx.recv().expect("the server starts");
    Served {
        addr,
        handle,
        thread: Some(thread),
    }
}

fn options() -> Options {
    Options::default().api_key(API_KEY)
}

async fn hello() -> &'static str {
    "the app's own route"
}

#[tokio::test]
async fn every_route_works_configured_into_an_app() {
    let switchboard = Switchboard::builder().build().expect("a switchboard");
    let sb = switchboard.clone();
    let served = serve(&switchboard, move |config| {
        switchboard_actix::configure(&sb, options())(config);
        config.route("/", web::get().to(hello));
    });
    conformance(served.addr, "").await;
    assert_eq!(
        http(served.addr, "GET", "/", &[], b"").await.body,
        b"the app's own route"
    );
}

#[tokio::test]
async fn every_route_works_under_a_base_path() {
    let switchboard = Switchboard::builder().build().expect("a switchboard");
    let sb = switchboard.clone();
    let served = serve(&switchboard, move |config| {
        switchboard_actix::configure(&sb, options().base_path("/realtime"))(config);
    });
    conformance(served.addr, "/realtime").await;
    assert_eq!(http(served.addr, "GET", "/ws", &[], b"").await.status, 404);
}

#[tokio::test]
async fn an_oversize_body_is_refused_by_the_route_with_413() {
    let switchboard = Switchboard::builder().build().expect("a switchboard");
    let max = switchboard.config().max_frame_bytes;
    let sb = switchboard.clone();
    let served = serve(&switchboard, move |config| {
        switchboard_actix::configure(&sb, options())(config);
    });
    let open = http(served.addr, "POST", "/poll/open?token=olga", &[], b"").await;
    let sid = open.json()[0]["sid"].as_str().expect("a sid").to_owned();
    let send = format!("/poll/send?sid={sid}&token=olga");

    let oversize = vec![b' '; 4 * max + 1];
    let refused = http(served.addr, "POST", &send, &[], &oversize).await;
    assert_eq!(refused.status, 413);
    assert_eq!(refused.json()["error"]["code"], "frame_too_large");

    // The session is untouched: a frame that fits is still taken.
    let join = br#"{"type":"join","room":"after"}"#;
    assert_eq!(
        http(served.addr, "POST", &send, &[], join).await.status,
        202
    );
}

async fn me(Authenticated(who): Authenticated) -> String {
    format!("you are {}", who.user.as_str())
}

async fn maybe(who: Option<Authenticated>) -> String {
    who.map_or_else(
        || "nobody".to_owned(),
        |Authenticated(who)| who.user.as_str().to_owned(),
    )
}

#[tokio::test]
async fn authenticated_names_the_user_sessions_get_and_refuses_as_they_are_refused() {
    let switchboard = Switchboard::builder()
        .origins(AllowOrigins::same_origin())
        .build()
        .expect("a switchboard");
    let served = serve(&switchboard, |config| {
        config
            .route("/me", web::get().to(me))
            .route("/maybe", web::get().to(maybe));
    });
    let addr = served.addr;

    let reply = http(addr, "GET", "/me?token=dave", &[], b"").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, b"you are dave");

    let foreign = [("Origin", "http://evil.example")];
    let refused = http(addr, "GET", "/me?token=dave", &foreign, b"").await;
    assert_eq!(refused.status, 403);
    assert_eq!(refused.json()["error"]["code"], "forbidden");
    let optional = http(addr, "GET", "/maybe?token=dave", &foreign, b"").await;
    assert_eq!(optional.body, b"nobody");
    assert_eq!(
        http(addr, "GET", "/maybe?token=erin", &[], b"").await.body,
        b"erin"
    );
}
