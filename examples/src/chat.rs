//! The chat example: several rooms, presence, private messages, on axum
//! (`switchboard_axum`).
//!
//! The page (`examples/chat/`: `index.html`, `chat.js`, `chat.css`) is plain
//! HTML, CSS and an ES module with no build step, embedded in the binary with
//! `include_str!`. It talks to Switchboard through the project's browser
//! client (`/switchboard.js`, mounted by `switchboard_axum::router`), which
//! speaks the wire protocol: it answers `ping` with `pong`, reconnects with
//! backoff and rejoins every room with `since` so nothing is lost.
//!
//! Routes: `/` (the page), `/chat.js`, `/chat.css`, `GET /history?room=R`
//! (the room's retained messages, for a page that just joined or whose
//! recovery failed, as PROTOCOL.md's Recovery suggests), and every
//! Switchboard route (`/ws`, `/sse`, `/poll`, `/switchboard.js`, `/metrics`).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let switchboard = switchboard_examples::chat::switchboard()?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! let sb = switchboard.clone();
//! tokio::spawn(async move {
//!     tokio::signal::ctrl_c().await.ok();
//!     sb.shutdown().await; // ends `serve`
//! });
//! switchboard_examples::chat::serve(listener, switchboard).await;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use http::StatusCode;
use switchboard_core::{Config, RoomName};
use switchboard_runtime::{AllowOrigins, BuildError, Switchboard, TrustClientName};

/// The page.
pub const INDEX_HTML: &str = include_str!("../chat/index.html");
/// The page's script (an ES module that imports `/switchboard.js`).
pub const CHAT_JS: &str = include_str!("../chat/chat.js");
/// The page's style sheet.
pub const CHAT_CSS: &str = include_str!("../chat/chat.css");

/// How often an idle session is pinged. Short, so that a tab that vanished
/// without closing its socket (a laptop lid, a dropped network) leaves its
/// rooms, and the others see it go, within `HEARTBEAT_INTERVAL +
/// HEARTBEAT_TIMEOUT` (20 s) rather than the protocol's default 45 s.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);
/// How long after a ping a silent session is closed (`heartbeat_timeout`).
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(10);

/// The most messages `GET /history` returns (rooms keep 100 by default).
pub const HISTORY_LIMIT: usize = 50;

/// A Switchboard configured for the chat: a short heartbeat, the protocol's
/// other defaults, same-origin pages only.
///
/// Authentication: `TrustClientName` takes the user id from the `token` query
/// parameter, which the page sets to the name the person typed. Anybody can
/// therefore be anybody: that is fine for a demo and nothing else. A real app
/// uses a real authenticator (`JwtAuthenticator`, or its own
/// `Authenticator` that checks a session cookie) so that the user id comes
/// from a credential the server can verify.
///
/// # Errors
/// When the OS has no randomness for session ids (see [`BuildError`]).
///
/// # Panics
/// Outside a tokio runtime.
pub fn switchboard() -> Result<Switchboard, BuildError> {
    let mut config = Config::default();
    config.heartbeat_interval = HEARTBEAT_INTERVAL;
    config.heartbeat_timeout = HEARTBEAT_TIMEOUT;
    Switchboard::builder()
        .config(config)
        .authenticator(TrustClientName) // demo only: see above
        .origins(AllowOrigins::same_origin())
        .build()
}

/// Every route of the chat: the page, its history endpoint and Switchboard's
/// own routes (`switchboard_axum::router`).
pub fn router(switchboard: &Switchboard) -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { asset(INDEX_HTML, "text/html; charset=utf-8") }),
        )
        .route(
            "/chat.js",
            get(|| async { asset(CHAT_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/chat.css",
            get(|| async { asset(CHAT_CSS, "text/css; charset=utf-8") }),
        )
        .route("/history", get(history))
        .merge(switchboard_axum::router(
            switchboard,
            switchboard_axum::Options::default(),
        ))
        .with_state(switchboard.clone())
}

/// `GET /history?room=R`: `{"room": R, "messages": [message frames]}`, oldest
/// first. Every chat room is public in this demo; an app with private rooms
/// checks here that the caller may read the room, as its policy does for
/// `join`.
async fn history(
    State(switchboard): State<Switchboard>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let room = query.get("room").map(String::as_str).unwrap_or_default();
    if let Err(e) = RoomName::new(room) {
        let body = serde_json::json!({
            "error": {"code": "invalid_room", "message": e.to_string()}
        });
        return json(StatusCode::BAD_REQUEST, &body);
    }
    match switchboard.latest(room, HISTORY_LIMIT).await {
        Ok(messages) => json(
            StatusCode::OK,
            &serde_json::json!({ "room": room, "messages": messages }),
        ),
        // The cluster broker is unreachable: the page shows what arrives
        // live and tries again on its next (re)join.
        Err(e) => json(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({
                "error": {"code": "unavailable", "message": e.to_string()}
            }),
        ),
    }
}

/// Serves the chat on `listener` until `switchboard.shutdown()` starts.
pub async fn serve(listener: tokio::net::TcpListener, switchboard: Switchboard) {
    let stop = switchboard.shutdown_token();
    let served = axum::serve(listener, router(&switchboard))
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await;
    if let Err(e) = served {
        tracing::error!("the chat server stopped: {e}");
    }
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut response = Response::new(Body::from(body));
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    headers.insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-cache"),
    );
    // Defence in depth: the page builds every node with textContent, and on
    // top of that no inline script or foreign origin may run or be reached.
    headers.insert(
        http::header::CONTENT_SECURITY_POLICY,
        http::HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
        ),
    );
    headers.insert(
        http::header::X_CONTENT_TYPE_OPTIONS,
        http::HeaderValue::from_static("nosniff"),
    );
    response
}

fn json(status: StatusCode, body: &serde_json::Value) -> Response {
    let mut response = Response::new(Body::from(body.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response.headers_mut().insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    response
}
