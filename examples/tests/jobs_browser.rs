//! The jobs example, and the browser client itself, in a real browser.
//!
//! `jobs_page_in_a_real_browser` starts, in this process on free ports:
//! - the jobs app with every transport, behind a TCP proxy the test can cut
//!   and restore, with its jobs kept in a state file so it can be restarted
//!   (a new Switchboard: room history lost, new epochs) on the same port;
//! - the jobs app with WebSocket refused (`sse,longpoll`), and one with only
//!   long-poll;
//! - a control endpoint (`POST /cut`, `/restore`, `/restart`) for the
//!   browser test,
//!
//! then runs `node --test examples/browser-tests/jobs.test.mjs` (headless
//! Chromium through playwright-core): jobs to 100% over WebSocket, over SSE
//! and over long-poll, a connection cut mid-job, a server restart, and another
//! user refused. Screenshots land in `target/tmp/jobs-browser/`.
//!
//! `switchboard_js_in_a_real_browser` runs `client.test.mjs` against a plain
//! server with `switchboard_warp::routes` (directly, and through a proxy that
//! buffers SSE), and a server-push-only one (no client frames over SSE):
//! fallback order, going back up, dedupe by seq, gaps and epoch changes,
//! backoff, recovery with `since`, `onReset`, heartbeat silence, failing
//! sends and request timeouts.
//!
//! `expiring_tokens_are_refreshed_by_switchboard_js_in_a_real_browser` runs
//! `token.test.mjs` against a server taking JWTs: a session closed
//! `token_expired` at `exp` without `getToken`, kept open past it with one
//! (refreshed in band, no reconnect) over each transport, and a refresh
//! naming another user refused.
//!
//! Needs Chromium (`apt-get install -y chromium`, or `CHROMIUM_PATH`) and
//! Node 20+ with npm; fails, saying what to install, when they are missing.

mod browser;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use switchboard_core::Config;
use switchboard_examples::jobs;
use switchboard_runtime::{JwtAuthenticator, RuntimeConfig, Switchboard, TrustClientName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Mutex};
use tokio::task::JoinHandle;
use warp::Filter;

/// The whole jobs run (about a minute here).
const JOBS_TEST_TIMEOUT: Duration = Duration::from_secs(300);
/// The whole client run.
const CLIENT_TEST_TIMEOUT: Duration = Duration::from_secs(300);
/// The pause between job steps on the server the page reaches through the
/// proxy: long enough to cut the connection, or restart the server, between
/// two steps.
const MAIN_STEP: Duration = Duration::from_millis(1000);
/// On the fallback servers: jobs just have to finish.
const FALLBACK_STEP: Duration = Duration::from_millis(300);
/// The HTTP publish API key of the client test's server.
const CLIENT_API_KEY: &str = "client-test-key";

/// The two tests run one at a time: each drives a Chromium, and the machine
/// is small.
static ONE_BROWSER: Mutex<()> = Mutex::const_new(());

fn screenshots(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(name)
}

// ---- a TCP proxy the test can cut ------------------------------------------------

/// Forwards every connection to `upstream` until cut: then every open
/// connection is dropped at once and new ones are closed on arrival, until
/// restored. The page sees the network go away and come back.
struct Proxy {
    upstream: SocketAddr,
    up: AtomicBool,
    cuts: watch::Sender<u64>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> (Arc<Self>, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let proxy = Arc::new(Self {
            upstream,
            up: AtomicBool::new(true),
            cuts: watch::channel(0).0,
        });
        let p = Arc::clone(&proxy);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if !p.up.load(Ordering::SeqCst) {
                    drop(client); // the network is down
                    continue;
                }
                let mut cut = p.cuts.subscribe();
                let upstream = p.upstream;
                tokio::spawn(async move {
                    let mut client = client;
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        return; // the server is down (restarting): so is this connection
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        (proxy, addr)
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.cuts.send_modify(|n| *n += 1);
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

// ---- a proxy that buffers SSE -----------------------------------------------------

/// What the buffering proxy holds back of an SSE response before it lets any
/// of it through: far more than the stream's keepalives add up to in a test.
const SSE_BUFFER: usize = 64 * 1024;

/// Forwards every connection to `upstream`, like a reverse proxy with
/// response buffering on: once a connection carries a `GET /sse` request,
/// the answer's status line and headers go through, and its body is held
/// until `SSE_BUFFER` bytes have gathered (never, for an event stream). The
/// page's EventSource opens and then hears nothing. Everything else passes
/// as it comes.
async fn start_sse_buffering_proxy(upstream: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind buffering proxy");
    let addr = listener.local_addr().expect("buffering proxy addr");
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (mut client_rx, mut client_tx) = client.into_split();
                let (mut server_rx, mut server_tx) = server.into_split();
                let sse = Arc::new(AtomicBool::new(false));
                let seen = Arc::clone(&sse);
                let requests = async move {
                    let mut buf = vec![0; 16 * 1024];
                    loop {
                        let n = match client_rx.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        let chunk = &buf[..n];
                        if chunk.starts_with(b"GET /sse?") || chunk.starts_with(b"GET /sse ") {
                            // Set before the request leaves: its answer comes after.
                            seen.store(true, Ordering::SeqCst);
                        }
                        if server_tx.write_all(chunk).await.is_err() {
                            return;
                        }
                    }
                };
                let answers = async move {
                    let mut buf = vec![0; 16 * 1024];
                    // Of an SSE answer: its head as read so far (passed on as
                    // it comes), whether the head is complete, the held body.
                    let mut head = Vec::new();
                    let mut head_done = false;
                    let mut held = Vec::new();
                    loop {
                        let n = match server_rx.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        let chunk = &buf[..n];
                        let mut pass = Vec::new();
                        if !sse.load(Ordering::SeqCst) {
                            pass.extend_from_slice(chunk);
                        } else if head_done {
                            held.extend_from_slice(chunk);
                        } else {
                            let before = head.len();
                            head.extend_from_slice(chunk);
                            if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                                head_done = true;
                                pass.extend_from_slice(&head[before..end + 4]);
                                held.extend_from_slice(&head[end + 4..]);
                            } else {
                                pass.extend_from_slice(chunk);
                            }
                        }
                        if held.len() >= SSE_BUFFER {
                            pass.append(&mut held);
                        }
                        if !pass.is_empty() && client_tx.write_all(&pass).await.is_err() {
                            return;
                        }
                    }
                };
                tokio::select! {
                    () = requests => {}
                    () = answers => {}
                }
            });
        }
    });
    addr
}

// ---- the jobs app, restartable on its port ----------------------------------------------

struct Running {
    app: jobs::App,
    server: JoinHandle<()>,
}

/// The main jobs server: restarting it shuts its Switchboard down (every
/// session gets `close` 1001, room history is gone) and starts a new app on
/// the same port from the same state file and signing secret, as a process
/// restart would.
struct Restartable {
    addr: SocketAddr,
    options: jobs::Options,
    running: Mutex<Option<Running>>,
}

impl Restartable {
    async fn start(options: jobs::Options) -> Arc<Self> {
        let listener = switchboard_websocket::bind("127.0.0.1:0".parse().unwrap()).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = jobs::App::new(options.clone()).expect("jobs app");
        let server = tokio::spawn(jobs::serve(listener, app.clone()));
        Arc::new(Self {
            addr,
            options,
            running: Mutex::new(Some(Running { app, server })),
        })
    }

    async fn stop(&self) {
        let Some(Running { app, mut server }) = self.running.lock().await.take() else {
            return;
        };
        app.switchboard().shutdown().await;
        // Ends once open connections are done; a straggler must not hold the port.
        if tokio::time::timeout(Duration::from_secs(10), &mut server)
            .await
            .is_err()
        {
            server.abort();
        }
    }

    async fn restart(&self) {
        self.stop().await;
        // `bind` sets SO_REUSEADDR: the port is free again at once.
        let listener = switchboard_websocket::bind(self.addr).expect("bind the same port again");
        let app = jobs::App::new(self.options.clone()).expect("jobs app, restarted");
        let server = tokio::spawn(jobs::serve(listener, app.clone()));
        *self.running.lock().await = Some(Running { app, server });
    }
}

async fn start_plain(options: jobs::Options) -> (jobs::App, JoinHandle<()>, String) {
    let listener = switchboard_websocket::bind("127.0.0.1:0".parse().unwrap()).expect("bind");
    let url = format!("http://{}/", listener.local_addr().expect("addr"));
    let app = jobs::App::new(options).expect("jobs app");
    let server = tokio::spawn(jobs::serve(listener, app.clone()));
    (app, server, url)
}

/// `POST /cut`, `/restore`, `/restart` for the browser test.
async fn control(
    proxy: Arc<Proxy>,
    main: Arc<Restartable>,
) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let p = Arc::clone(&proxy);
    let cut = warp::path!("cut").and(warp::post()).map(move || {
        p.cut();
        "cut"
    });
    let restore = warp::path!("restore").and(warp::post()).map(move || {
        proxy.restore();
        "restored"
    });
    let restart = warp::path!("restart").and(warp::post()).then(move || {
        let main = Arc::clone(&main);
        async move {
            main.restart().await;
            "restarted"
        }
    });
    let routes = cut.or(restore).or(restart);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind control");
    let addr = listener.local_addr().expect("control addr");
    tokio::spawn(
        warp::serve(routes)
            .incoming(listener)
            .graceful(async move {
                let _ = stopped.await;
            })
            .run(),
    );
    (addr, stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_page_in_a_real_browser() {
    let _one = ONE_BROWSER.lock().await;
    browser::prepare().await;

    let dir = screenshots("jobs-browser");
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    let state = dir.join("jobs-state.json");
    let _ = std::fs::remove_file(&state);

    // One secret for the restarts, so the page's sign-in survives them.
    let main = Restartable::start(
        jobs::Options::default()
            .step(MAIN_STEP)
            .secret(b"jobs-browser-test-secret-0123456789".to_vec())
            .state_file(&state),
    )
    .await;
    let (proxy, proxy_addr) = Proxy::start(main.addr).await;
    let (sse_app, sse_server, sse_url) = start_plain(
        jobs::Options::default()
            .step(FALLBACK_STEP)
            .transports("sse,longpoll".parse().unwrap()),
    )
    .await;
    let (poll_app, poll_server, poll_url) = start_plain(
        jobs::Options::default()
            .step(FALLBACK_STEP)
            .transports("longpoll".parse().unwrap()),
    )
    .await;
    let (control_addr, stop_control) = control(proxy, Arc::clone(&main)).await;

    browser::node_test(
        "jobs.test.mjs",
        &[
            ("JOBS_URL", format!("http://{proxy_addr}/")),
            ("JOBS_DIRECT_URL", format!("http://{}/", main.addr)),
            ("JOBS_SSE_URL", sse_url),
            ("JOBS_POLL_URL", poll_url),
            ("JOBS_CONTROL_URL", format!("http://{control_addr}/")),
        ],
        &dir,
        JOBS_TEST_TIMEOUT,
    )
    .await;

    let _ = stop_control.send(());
    main.stop().await;
    for (app, server) in [(sse_app, sse_server), (poll_app, poll_server)] {
        app.switchboard().shutdown().await;
        server.await.expect("jobs server task");
    }
}

/// A plain server for the client test on a free port: a blank page at `/` to
/// load the client into (same origin as the server), and every Switchboard
/// route. A short heartbeat (1.5 s + 1.5 s), so silence is noticed within
/// seconds.
fn client_server(runtime: RuntimeConfig) -> (Switchboard, JoinHandle<()>, SocketAddr) {
    let mut config = Config::default();
    config.heartbeat_interval = Duration::from_millis(1500);
    config.heartbeat_timeout = Duration::from_millis(1500);
    let switchboard = Switchboard::builder()
        .config(config)
        .runtime_config(runtime)
        .authenticator(TrustClientName)
        .build()
        .expect("switchboard");
    let (server, addr) = serve_with_blank_page(&switchboard, warp::any().and_then(not_found));
    (switchboard, server, addr)
}

async fn not_found() -> Result<String, warp::Rejection> {
    Err(warp::reject::not_found())
}

/// Serves `extra` routes, a blank page at `/` and every Switchboard route on
/// a free port, until `switchboard` shuts down.
fn serve_with_blank_page<F>(switchboard: &Switchboard, extra: F) -> (JoinHandle<()>, SocketAddr)
where
    F: Filter<Error = warp::Rejection> + Clone + Send + Sync + 'static,
    F::Extract: warp::Reply,
{
    let page = warp::path::end()
        .and(warp::get())
        .map(|| warp::reply::html("<!doctype html><title>switchboard.js test</title>"));
    let routes = page.or(extra).or(switchboard_warp::routes(
        switchboard,
        switchboard_warp::Options::default().api_key(CLIENT_API_KEY),
    ));
    let listener = switchboard_websocket::bind("127.0.0.1:0".parse().unwrap()).expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = switchboard.shutdown_token();
    let server = tokio::spawn(
        warp::serve(routes)
            .incoming(listener)
            .graceful(async move { stop.cancelled().await })
            .run(),
    );
    (server, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchboard_js_in_a_real_browser() {
    let _one = ONE_BROWSER.lock().await;
    browser::prepare().await;

    let (switchboard, server, addr) = client_server(RuntimeConfig::default());
    let buffering = start_sse_buffering_proxy(addr).await;
    let mut push_only_config = RuntimeConfig::default();
    push_only_config.sse_client_frames = false;
    let (push_only, push_only_server, push_only_addr) = client_server(push_only_config);

    browser::node_test(
        "client.test.mjs",
        &[
            ("CLIENT_URL", format!("http://{addr}/")),
            ("CLIENT_BUFFERING_URL", format!("http://{buffering}/")),
            ("CLIENT_PUSH_ONLY_URL", format!("http://{push_only_addr}/")),
            ("CLIENT_API_KEY", CLIENT_API_KEY.to_owned()),
        ],
        &screenshots("client-browser"),
        CLIENT_TEST_TIMEOUT,
    )
    .await;

    for (switchboard, server) in [(switchboard, server), (push_only, push_only_server)] {
        switchboard.shutdown().await;
        server.await.expect("server task");
    }
}

/// A server taking HS256 JWTs, with `GET /token?user=…&ttl=…` signing one
/// for the page (valid `ttl` seconds), for `token.test.mjs`.
fn token_server() -> (Switchboard, JoinHandle<()>, SocketAddr) {
    const SECRET: &[u8] = b"token-browser-test";
    let switchboard = Switchboard::builder()
        .authenticator(JwtAuthenticator::hs256(SECRET))
        .build()
        .expect("switchboard");
    let issuer = JwtAuthenticator::hs256(SECRET);
    let tokens = warp::path("token")
        .and(warp::get())
        .and(warp::query::<std::collections::HashMap<String, String>>())
        .map(move |query: std::collections::HashMap<String, String>| {
            let user = query.get("user").map_or("alice", String::as_str);
            let ttl = query.get("ttl").and_then(|t| t.parse().ok()).unwrap_or(60);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("the clock is past 1970")
                .as_secs();
            issuer
                .issue(user, now, ttl, serde_json::Value::Null)
                .expect("sign a token")
        });
    let (server, addr) = serve_with_blank_page(&switchboard, tokens);
    (switchboard, server, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiring_tokens_are_refreshed_by_switchboard_js_in_a_real_browser() {
    let _one = ONE_BROWSER.lock().await;
    browser::prepare().await;
    let (switchboard, server, addr) = token_server();
    browser::node_test(
        "token.test.mjs",
        &[("TOKEN_URL", format!("http://{addr}/"))],
        &screenshots("token-browser"),
        CLIENT_TEST_TIMEOUT,
    )
    .await;
    switchboard.shutdown().await;
    server.await.expect("server task");
}
