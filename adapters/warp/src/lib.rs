//! Mounts Switchboard in a warp app: the three transports (`/ws`, `/sse`,
//! `/sse/send`, `/poll/open`, `/poll`, `/poll/send`), the browser client
//! (`/switchboard.js`), `/metrics` and the HTTP publish API (`POST
//! /api/publish`, `POST /api/direct`).
//!
//! Thin glue: each route turns warp's view of the request back into an
//! `http::Request` and hands it to the transport or the runtime, which own
//! all the logic.
//!
//! ```no_run
//! use warp::Filter;
//! use switchboard_runtime::Switchboard;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let switchboard = Switchboard::builder().build()?;
//! let app = switchboard_warp::routes(&switchboard, switchboard_warp::Options::default())
//!     .or(warp::path::end().map(|| "my app"));
//! warp::serve(app).run(([127, 0, 0, 1], 8080)).await;
//! # Ok(()) }
//! ```

use bytes::{Buf, Bytes};
use futures_util::TryStreamExt;
use http::Request;
use http_body_util::StreamBody;
use hyper::body::Frame;
use hyper::upgrade::OnUpgrade;
use switchboard_longpoll::LongPoll;
use switchboard_runtime::http_api::{self, ApiCall};
use switchboard_runtime::Switchboard;
use switchboard_sse::Sse;
use warp::filters::BoxedFilter;
use warp::{Filter, Reply};

/// What the adapter mounts besides the WebSocket endpoint.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Options {
    /// The bearer key of the HTTP publish API; `None` turns the API off.
    pub api_key: Option<String>,
}

impl Options {
    /// Enables the HTTP publish API with this bearer key.
    #[must_use]
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(key.into());
        self
    }
}

/// Every Switchboard route, to combine with the app's own (`.or(...)`).
#[must_use]
pub fn routes(
    switchboard: &Switchboard,
    options: Options,
) -> BoxedFilter<(warp::reply::Response,)> {
    websocket(switchboard)
        .or(sse(switchboard))
        .unify()
        .or(longpoll(switchboard))
        .unify()
        .or(metrics(switchboard))
        .unify()
        .or(client_script())
        .unify()
        .or(api(switchboard, &options))
        .unify()
        .boxed()
}

/// `GET /ws`: the WebSocket transport.
#[must_use]
pub fn websocket(switchboard: &Switchboard) -> BoxedFilter<(warp::reply::Response,)> {
    let sb = switchboard.clone();
    warp::path("ws")
        .and(warp::path::end())
        .and(warp::get())
        .and(request_head())
        .and(warp::ext::optional::<OnUpgrade>())
        .then(
            move |mut request: Request<()>, on_upgrade: Option<OnUpgrade>| {
                let sb = sb.clone();
                async move {
                    if let Some(on_upgrade) = on_upgrade {
                        request.extensions_mut().insert(on_upgrade);
                    }
                    let response = switchboard_websocket::upgrade(&sb, request).await;
                    response.map(|_| Bytes::new().into())
                }
            },
        )
        .boxed()
}

/// `GET /sse` and `POST /sse/send`: the Server-Sent Events transport.
#[must_use]
pub fn sse(switchboard: &Switchboard) -> BoxedFilter<(warp::reply::Response,)> {
    let transport = Sse::new(switchboard.clone());
    let sse = transport.clone();
    let stream = warp::path("sse")
        .and(warp::path::end())
        .and(warp::get())
        .and(request_head())
        .then(move |request: Request<()>| {
            let sse = sse.clone();
            async move {
                let (parts, body) = sse.handle(request).await.into_parts();
                let mut response = warp::reply::stream(body).into_response();
                *response.status_mut() = parts.status;
                *response.headers_mut() = parts.headers;
                response
            }
        });
    let send = warp::path!("sse" / "send")
        .and(request_with_body())
        .then(move |request| {
            let sse = transport.clone();
            async move { to_warp(sse.send(request).await) }
        });
    stream.or(send).unify().boxed()
}

/// `POST /poll/open`, `GET /poll`, `POST /poll/send`: the long-poll transport.
#[must_use]
pub fn longpoll(switchboard: &Switchboard) -> BoxedFilter<(warp::reply::Response,)> {
    let transport = LongPoll::new(switchboard.clone());
    let lp = transport.clone();
    let open = warp::path!("poll" / "open")
        .and(request_head())
        .then(move |request| {
            let lp = lp.clone();
            async move { to_warp(lp.open(request).await) }
        });
    let lp = transport.clone();
    let send = warp::path!("poll" / "send")
        .and(request_with_body())
        .then(move |request| {
            let lp = lp.clone();
            async move { to_warp(lp.send(request).await) }
        });
    let poll = warp::path("poll")
        .and(warp::path::end())
        .and(warp::get())
        .and(request_head())
        .then(move |request| {
            let lp = transport.clone();
            async move { to_warp(lp.poll(request).await) }
        });
    open.or(send).unify().or(poll).unify().boxed()
}

/// The browser client (`transports/browser/switchboard.js`), one ES module.
pub const SWITCHBOARD_JS: &str = include_str!("../../../transports/browser/switchboard.js");

/// `GET /switchboard.js`: the browser client.
#[must_use]
pub fn client_script() -> BoxedFilter<(warp::reply::Response,)> {
    warp::path("switchboard.js")
        .and(warp::path::end())
        .and(warp::get())
        .map(|| {
            let mut response = http::Response::new(Bytes::from_static(SWITCHBOARD_JS.as_bytes()));
            let headers = response.headers_mut();
            headers.insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/javascript; charset=utf-8"),
            );
            headers.insert(
                http::header::CACHE_CONTROL,
                http::HeaderValue::from_static("no-cache"),
            );
            to_warp(response)
        })
        .boxed()
}

/// `GET /metrics`: Prometheus text.
#[must_use]
pub fn metrics(switchboard: &Switchboard) -> BoxedFilter<(warp::reply::Response,)> {
    let sb = switchboard.clone();
    warp::path("metrics")
        .and(warp::path::end())
        .and(warp::get())
        .map(move || to_warp(http_api::metrics(&sb)))
        .boxed()
}

/// `POST /api/publish` and `POST /api/direct`.
#[must_use]
pub fn api(switchboard: &Switchboard, options: &Options) -> BoxedFilter<(warp::reply::Response,)> {
    let sb = switchboard.clone();
    let key = options.api_key.clone();
    let call = warp::path("publish")
        .map(|| ApiCall::Publish)
        .or(warp::path("direct").map(|| ApiCall::Direct))
        .unify();
    warp::path("api")
        .and(call)
        .and(warp::path::end())
        .and(request_with_body())
        .then(move |call, request| {
            let sb = sb.clone();
            let key = key.clone();
            async move { to_warp(http_api::handle(&sb, key.as_deref(), call, request).await) }
        })
        .boxed()
}

/// The request with its body as an `http_body::Body` (read, bounded, by the
/// handler).
fn request_with_body() -> impl Filter<
    Extract = (Request<impl http_body::Body<Data = Bytes, Error = warp::Error> + Send>,),
    Error = warp::Rejection,
> + Clone {
    request_head()
        .and(warp::body::stream())
        .map(|head: Request<()>, body| {
            head.map(|()| StreamBody::new(TryStreamExt::map_ok(body, chunk_frame)))
        })
}

/// The request line and headers as an `http::Request` (warp takes the body
/// and the extensions apart; routes add back what they need).
fn request_head() -> impl Filter<Extract = (Request<()>,), Error = std::convert::Infallible> + Clone
{
    warp::method()
        .and(warp::path::full())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::header::headers_cloned())
        .map(
            |method, path: warp::path::FullPath, query: String, headers| {
                let uri = if query.is_empty() {
                    path.as_str().to_owned()
                } else {
                    format!("{}?{query}", path.as_str())
                };
                let mut request = Request::new(());
                *request.method_mut() = method;
                *request.uri_mut() = uri.parse().unwrap_or_default();
                *request.headers_mut() = headers;
                request
            },
        )
}

fn to_warp(response: http::Response<Bytes>) -> warp::reply::Response {
    response.map(Into::into)
}

fn chunk_frame<B: Buf>(mut chunk: B) -> Frame<Bytes> {
    Frame::data(chunk.copy_to_bytes(chunk.remaining()))
}
