//! Every Switchboard route as one tower [`Service`](tower_service::Service) over `http` types, so one
//! line mounts Switchboard in any framework built on tower or hyper: axum
//! (`Router::nest_service`, or [`SwitchboardLayer`] as a `.layer`), hyper,
//! salvo, poem, and warp (whose adapter wraps this same code).
//!
//! Under a configurable base path it serves:
//!
//! | route | method | what |
//! |---|---|---|
//! | `/ws` | GET (upgrade) | the WebSocket transport |
//! | `/sse` | GET | a Server-Sent Events stream |
//! | `/sse/send` | POST | client frames of an SSE session |
//! | `/poll/open`, `/poll`, `/poll/send` | POST, GET, POST | the long-poll transport |
//! | `/switchboard.js` | GET | the browser client |
//! | `/metrics` | GET | Prometheus text |
//! | `/api/publish`, `/api/direct` | POST | the HTTP publish API (with an API key) |
//!
//! The service holds no logic of its own: it picks the [`Route`] and hands
//! the request to the transport or runtime function that owns it. A known
//! path with the wrong method answers 405 with `Allow`; any other path 404
//! (or, through [`SwitchboardLayer`], goes on to the application).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use switchboard_service::{Options, SwitchboardService};
//!
//! let switchboard = switchboard_runtime::Switchboard::builder().build()?;
//! let service = SwitchboardService::new(&switchboard, Options::default().base_path("/rt"));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! switchboard_service::Server::default()
//!     .serve(listener, service, switchboard.shutdown_token().cancelled_owned())
//!     .await;
//! # Ok(()) }
//! ```
//!
//! [`Server`] is a hardened HTTP/1 server loop for the standalone server and
//! plain hyper users: request headers must arrive within a timeout, and
//! connections that have not sent their first request are bounded.

mod body;
mod layer;
mod server;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body;
use switchboard_core::ErrorCode;
use switchboard_longpoll::LongPoll;
use switchboard_runtime::http_api::{self, ApiCall};
use switchboard_runtime::Switchboard;
use switchboard_sse::Sse;

pub use body::ResponseBody;
pub use layer::{LayeredFuture, SwitchboardLayer, WithSwitchboard};
pub use server::Server;

/// The browser client (`transports/browser/switchboard.js`), one ES module
/// with no dependencies, served at `…/switchboard.js`.
pub const SWITCHBOARD_JS: &str = include_str!("../../browser/switchboard.js");

/// What the service mounts, and where.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Options {
    /// The path every route is under: `""` (the default) for `/ws`, `/sse`…,
    /// or for example `"/rt"` for `/rt/ws`. Leave it empty when the framework
    /// strips the prefix itself (axum's `nest_service`).
    pub base_path: String,
    /// The bearer key of the HTTP publish API; `None` (the default) answers
    /// every API call 401.
    pub api_key: Option<String>,
    /// Serve `…/ws` (default true).
    pub websocket: bool,
    /// Serve `…/sse` and `…/sse/send` (default true).
    pub sse: bool,
    /// Serve `…/poll/open`, `…/poll` and `…/poll/send` (default true).
    pub longpoll: bool,
    /// Serve `…/switchboard.js` (default true).
    pub client_script: bool,
    /// Serve `…/metrics` (default true). Turn it off, or put it behind the
    /// application's own access control, where counters are not public.
    pub metrics: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            base_path: String::new(),
            api_key: None,
            websocket: true,
            sse: true,
            longpoll: true,
            client_script: true,
            metrics: true,
        }
    }
}

impl Options {
    /// Mounts every route under `path` (a leading `/` is added and a trailing
    /// one dropped: `"rt/"` is `/rt`).
    #[must_use]
    pub fn base_path(mut self, path: &str) -> Self {
        let trimmed = path.trim_matches('/');
        self.base_path = if trimmed.is_empty() {
            String::new()
        } else {
            format!("/{trimmed}")
        };
        self
    }

    /// Enables the HTTP publish API with this bearer key.
    #[must_use]
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(key.into());
        self
    }

    /// Which transports to serve (WebSocket, SSE, long-poll): a deployment
    /// that must not offer one turns it off, and clients fall back.
    #[must_use]
    pub fn transports(mut self, websocket: bool, sse: bool, longpoll: bool) -> Self {
        self.websocket = websocket;
        self.sse = sse;
        self.longpoll = longpoll;
        self
    }

    /// Serve `…/metrics` or not.
    #[must_use]
    pub fn metrics(mut self, on: bool) -> Self {
        self.metrics = on;
        self
    }

    /// Serve `…/switchboard.js` or not.
    #[must_use]
    pub fn client_script(mut self, on: bool) -> Self {
        self.client_script = on;
        self
    }

    fn serves(&self, route: Route) -> bool {
        match route {
            Route::WebSocket => self.websocket,
            Route::SseStream | Route::SseSend => self.sse,
            Route::PollOpen | Route::Poll | Route::PollSend => self.longpoll,
            Route::ClientScript => self.client_script,
            Route::Metrics => self.metrics,
            Route::Api(_) => true,
        }
    }
}

/// One of Switchboard's routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Route {
    /// `GET …/ws`.
    WebSocket,
    /// `GET …/sse`.
    SseStream,
    /// `POST …/sse/send`.
    SseSend,
    /// `POST …/poll/open`.
    PollOpen,
    /// `GET …/poll`.
    Poll,
    /// `POST …/poll/send`.
    PollSend,
    /// `GET …/switchboard.js`.
    ClientScript,
    /// `GET …/metrics`.
    Metrics,
    /// `POST …/api/publish` or `POST …/api/direct`.
    Api(ApiCall),
}

impl Route {
    /// Every route, for adapters that register paths one by one.
    pub const ALL: [Self; 10] = [
        Self::WebSocket,
        Self::SseStream,
        Self::SseSend,
        Self::PollOpen,
        Self::Poll,
        Self::PollSend,
        Self::ClientScript,
        Self::Metrics,
        Self::Api(ApiCall::Publish),
        Self::Api(ApiCall::Direct),
    ];

    /// The route's path below the base path, e.g. `/poll/send`.
    #[must_use]
    pub fn path(self) -> &'static str {
        match self {
            Self::WebSocket => "/ws",
            Self::SseStream => "/sse",
            Self::SseSend => "/sse/send",
            Self::PollOpen => "/poll/open",
            Self::Poll => "/poll",
            Self::PollSend => "/poll/send",
            Self::ClientScript => "/switchboard.js",
            Self::Metrics => "/metrics",
            Self::Api(ApiCall::Publish) => "/api/publish",
            // `ApiCall` is non-exhaustive; `Direct` is its only other call.
            Self::Api(_) => "/api/direct",
        }
    }

    /// The one method the route answers.
    #[must_use]
    pub fn method(self) -> Method {
        match self {
            Self::WebSocket | Self::SseStream | Self::Poll | Self::ClientScript | Self::Metrics => {
                Method::GET
            }
            Self::SseSend | Self::PollOpen | Self::PollSend | Self::Api(_) => Method::POST,
        }
    }

    fn from_path(path: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|route| route.path() == path)
    }
}

/// Every Switchboard route as one tower `Service` (see the crate docs).
/// Cheap to clone: clones share the transports' session tables.
#[derive(Clone)]
pub struct SwitchboardService {
    inner: Arc<Inner>,
}

struct Inner {
    switchboard: Switchboard,
    sse: Sse,
    longpoll: LongPoll,
    options: Options,
}

impl std::fmt::Debug for SwitchboardService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SwitchboardService")
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

/// The future returned when [`SwitchboardService`] is called as a tower `Service`.
pub type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, Infallible>> + Send>>;

impl SwitchboardService {
    /// The routes of `switchboard`, as `options` says.
    #[must_use]
    pub fn new(switchboard: &Switchboard, options: Options) -> Self {
        Self {
            inner: Arc::new(Inner {
                switchboard: switchboard.clone(),
                sse: Sse::new(switchboard.clone()),
                longpoll: LongPoll::new(switchboard.clone()),
                options,
            }),
        }
    }

    /// The Switchboard it serves.
    #[must_use]
    pub fn switchboard(&self) -> &Switchboard {
        &self.inner.switchboard
    }

    /// Its options.
    #[must_use]
    pub fn options(&self) -> &Options {
        &self.inner.options
    }

    /// A layer that serves these routes in front of an application's own
    /// service (see [`SwitchboardLayer`]).
    #[must_use]
    pub fn layer(&self) -> SwitchboardLayer {
        SwitchboardLayer::new(self.clone())
    }

    /// The full path of `route` under the base path, e.g. `/rt/poll/send`.
    #[must_use]
    pub fn path_of(&self, route: Route) -> String {
        format!("{}{}", self.inner.options.base_path, route.path())
    }

    /// Which route a request path is, if it is one this service serves.
    #[must_use]
    pub fn route(&self, path: &str) -> Option<Route> {
        let options = &self.inner.options;
        let rest = path.strip_prefix(options.base_path.as_str())?;
        Route::from_path(rest).filter(|route| options.serves(*route))
    }

    /// Answers one request: the route's handler, 405 for a known path with
    /// the wrong method, 404 for any other path.
    pub async fn handle<B>(&self, request: Request<B>) -> Response<ResponseBody>
    where
        B: Body + Send + 'static,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        match self.route(request.uri().path()) {
            Some(route) => self.serve_route(route, request).await,
            None => plain(
                StatusCode::NOT_FOUND,
                ErrorCode::InvalidFrame,
                "no such route",
            ),
        }
    }

    /// Answers a request already known to be for `route` (adapters that
    /// route by themselves call this).
    pub async fn serve_route<B>(&self, route: Route, request: Request<B>) -> Response<ResponseBody>
    where
        B: Body + Send + 'static,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        if request.method() != route.method() {
            let mut response = plain(
                StatusCode::METHOD_NOT_ALLOWED,
                ErrorCode::InvalidFrame,
                &format!("use {}", route.method()),
            );
            if let Ok(allow) = HeaderValue::from_str(route.method().as_str()) {
                response.headers_mut().insert(header::ALLOW, allow);
            }
            return response;
        }
        let inner = &self.inner;
        match route {
            Route::WebSocket => switchboard_websocket::upgrade(&inner.switchboard, request)
                .await
                .map(|_| ResponseBody::empty()),
            Route::SseStream => inner.sse.handle(request).await.map(ResponseBody::sse),
            Route::SseSend => full(inner.sse.send(request).await),
            Route::PollOpen => full(inner.longpoll.open(request).await),
            Route::Poll => full(inner.longpoll.poll(request).await),
            Route::PollSend => full(inner.longpoll.send(request).await),
            Route::ClientScript => full(client_script()),
            Route::Metrics => full(http_api::metrics(&inner.switchboard)),
            Route::Api(call) => full(
                http_api::handle(
                    &inner.switchboard,
                    inner.options.api_key.as_deref(),
                    call,
                    request,
                )
                .await,
            ),
        }
    }
}

impl<B> tower_service::Service<Request<B>> for SwitchboardService
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(())) // no backpressure here: limits are per session
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let service = self.clone();
        Box::pin(async move { Ok(service.handle(request).await) })
    }
}

/// `GET …/switchboard.js`: the browser client, revalidated on every load so
/// a deploy is picked up at once.
#[must_use]
pub fn client_script() -> Response<Bytes> {
    let mut response = Response::new(Bytes::from_static(SWITCHBOARD_JS.as_bytes()));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/javascript; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

fn full(response: Response<Bytes>) -> Response<ResponseBody> {
    response.map(ResponseBody::full)
}

fn plain(status: StatusCode, code: ErrorCode, message: &str) -> Response<ResponseBody> {
    full(http_api::error(status, code, message))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(options: Options) -> SwitchboardService {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let _guard = runtime.enter();
        let switchboard = Switchboard::builder().build().expect("a switchboard");
        SwitchboardService::new(&switchboard, options)
    }

    #[test]
    fn routes_are_found_under_the_base_path_only() {
        let svc = service(Options::default().base_path("rt/"));
        assert_eq!(svc.route("/rt/ws"), Some(Route::WebSocket));
        assert_eq!(svc.route("/rt/poll/send"), Some(Route::PollSend));
        assert_eq!(
            svc.route("/rt/api/direct"),
            Some(Route::Api(ApiCall::Direct))
        );
        assert_eq!(svc.route("/ws"), None);
        assert_eq!(svc.route("/rt/ws/"), None);
        assert_eq!(svc.route("/rtx/ws"), None);
        assert_eq!(svc.path_of(Route::SseSend), "/rt/sse/send");
    }

    #[test]
    fn turned_off_routes_are_not_served() {
        let svc = service(
            Options::default()
                .transports(false, true, false)
                .metrics(false),
        );
        assert_eq!(svc.route("/ws"), None);
        assert_eq!(svc.route("/poll/open"), None);
        assert_eq!(svc.route("/metrics"), None);
        assert_eq!(svc.route("/sse"), Some(Route::SseStream));
    }
}
