//! The axum adapter end to end: real axum servers on 127.0.0.1, real
//! clients of every transport (`switchboard_testkit::conformance`), through
//! each way of mounting it, and the `Authenticated` extractor.

use std::net::SocketAddr;

use axum::routing::get;
use axum::Router;
use switchboard_axum::{Authenticated, Options};
use switchboard_runtime::{AllowOrigins, Switchboard};
use switchboard_service::SwitchboardService;
use switchboard_testkit::{conformance, http, API_KEY};

/// Serves `app` on 127.0.0.1:0 until the test ends (the task is aborted
/// when the runtime of the test shuts down).
async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("an address");
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

fn options() -> Options {
    Options::default().api_key(API_KEY)
}

async fn hello() -> &'static str {
    "the app's own route"
}

#[tokio::test]
async fn every_route_works_merged_into_an_app() {
    let switchboard = Switchboard::builder().build().expect("a switchboard");
    let app = Router::new()
        .route("/", get(hello))
        .merge(switchboard_axum::router(&switchboard, options()));
    let addr = serve(app).await;
    conformance(addr, "").await;
    assert_eq!(
        http(addr, "GET", "/", &[], b"").await.body,
        b"the app's own route"
    );
}

#[tokio::test]
async fn every_route_works_under_a_base_path_merged() {
    let switchboard = Switchboard::builder().build().expect("a switchboard");
    let app = Router::new().merge(switchboard_axum::router(
        &switchboard,
        options().base_path("/realtime"),
    ));
    let addr = serve(app).await;
    conformance(addr, "/realtime").await;
    assert_eq!(http(addr, "GET", "/ws", &[], b"").await.status, 404);
}

#[tokio::test]
async fn every_route_works_nested_as_a_service() {
    let switchboard = Switchboard::builder().build().expect("a switchboard");
    let app = Router::new()
        .route("/", get(hello))
        .nest_service("/rt", SwitchboardService::new(&switchboard, options()));
    let addr = serve(app).await;
    conformance(addr, "/rt").await;
}

#[tokio::test]
async fn every_route_works_as_a_layer_in_front_of_the_app() {
    let switchboard = Switchboard::builder().build().expect("a switchboard");
    let app = Router::new()
        .route("/", get(hello))
        .layer(switchboard_axum::layer(
            &switchboard,
            options().base_path("/live"),
        ));
    let addr = serve(app).await;
    conformance(addr, "/live").await;
    assert_eq!(
        http(addr, "GET", "/", &[], b"").await.body,
        b"the app's own route"
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
    // Sessions from another origin are refused; so are the app's requests.
    let switchboard = Switchboard::builder()
        .origins(AllowOrigins::same_origin())
        .build()
        .expect("a switchboard");
    let app = Router::new()
        .route("/me", get(me))
        .route("/maybe", get(maybe))
        .merge(switchboard_axum::router(&switchboard, options()))
        .with_state(switchboard.clone());
    let addr = serve(app).await;

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
