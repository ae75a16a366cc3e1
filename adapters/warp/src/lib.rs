//! Mounts Switchboard in a warp app: the three transports (`/ws`, `/sse`,
//! `/sse/send`, `/poll/open`, `/poll`, `/poll/send`), the browser client
//! (`/switchboard.js`), `/metrics` and the HTTP publish API (`POST
//! /api/publish`, `POST /api/direct`).
//!
//! Thin glue over [`switchboard_service`], the tower service every adapter
//! shares: a filter turns warp's view of the request back into an
//! `http::Request` and hands it to the service, which owns all the logic.
//! Paths the service does not serve are rejected, so `.or(...)` reaches the
//! application's own routes.
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
use http_body_util::{BodyDataStream, StreamBody};
use hyper::body::Frame;
use hyper::upgrade::OnUpgrade;
use switchboard_runtime::Switchboard;
use switchboard_service::SwitchboardService;
use warp::filters::BoxedFilter;
use warp::{Filter, Reply};

pub use switchboard_service::{Options, SWITCHBOARD_JS};

/// Every Switchboard route `options` turns on, to combine with the app's
/// own (`.or(...)`).
#[must_use]
pub fn routes(
    switchboard: &Switchboard,
    options: Options,
) -> BoxedFilter<(warp::reply::Response,)> {
    service(SwitchboardService::new(switchboard, options))
}

/// The routes of an existing [`SwitchboardService`] (share one between
/// warp and another server, or build it with custom [`Options`]).
#[must_use]
pub fn service(service: SwitchboardService) -> BoxedFilter<(warp::reply::Response,)> {
    let routed = service.clone();
    warp::path::full()
        .and_then(move |path: warp::path::FullPath| {
            let route = routed.route(path.as_str());
            async move { route.ok_or_else(warp::reject::not_found) }
        })
        .and(request())
        .then(move |route, request| {
            let service = service.clone();
            async move {
                let (parts, body) = service.serve_route(route, request).await.into_parts();
                let mut response = warp::reply::stream(BodyDataStream::new(body)).into_response();
                *response.status_mut() = parts.status;
                *response.headers_mut() = parts.headers;
                response
            }
        })
        .boxed()
}

/// `GET /ws`: the WebSocket transport alone.
#[must_use]
pub fn websocket(switchboard: &Switchboard) -> BoxedFilter<(warp::reply::Response,)> {
    only(
        switchboard,
        Options::default().transports(true, false, false),
    )
}

/// `GET /sse` and `POST /sse/send`: the Server-Sent Events transport alone.
#[must_use]
pub fn sse(switchboard: &Switchboard) -> BoxedFilter<(warp::reply::Response,)> {
    only(
        switchboard,
        Options::default().transports(false, true, false),
    )
}

/// `POST /poll/open`, `GET /poll`, `POST /poll/send`: the long-poll
/// transport alone.
#[must_use]
pub fn longpoll(switchboard: &Switchboard) -> BoxedFilter<(warp::reply::Response,)> {
    only(
        switchboard,
        Options::default().transports(false, false, true),
    )
}

/// `GET /switchboard.js`: the browser client alone.
#[must_use]
pub fn client_script() -> BoxedFilter<(warp::reply::Response,)> {
    warp::path("switchboard.js")
        .and(warp::path::end())
        .and(warp::get())
        .map(|| switchboard_service::client_script().map(Into::into))
        .boxed()
}

/// `GET /metrics` alone: Prometheus text.
#[must_use]
pub fn metrics(switchboard: &Switchboard) -> BoxedFilter<(warp::reply::Response,)> {
    let sb = switchboard.clone();
    warp::path("metrics")
        .and(warp::path::end())
        .and(warp::get())
        .map(move || switchboard_runtime::http_api::metrics(&sb).map(Into::into))
        .boxed()
}

/// `POST /api/publish` and `POST /api/direct` alone.
#[must_use]
pub fn api(switchboard: &Switchboard, options: &Options) -> BoxedFilter<(warp::reply::Response,)> {
    only(
        switchboard,
        options
            .clone()
            .transports(false, false, false)
            .metrics(false)
            .client_script(false),
    )
}

fn only(switchboard: &Switchboard, options: Options) -> BoxedFilter<(warp::reply::Response,)> {
    service(SwitchboardService::new(switchboard, options))
}

/// The whole request as an `http::Request`: warp takes the method, path,
/// query, headers, body and hyper's upgrade handle apart; this puts them
/// back together.
fn request() -> impl Filter<
    Extract = (Request<impl http_body::Body<Data = Bytes, Error = warp::Error> + Send + 'static>,),
    Error = warp::Rejection,
> + Clone {
    warp::method()
        .and(warp::path::full())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::header::headers_cloned())
        .and(warp::ext::optional::<OnUpgrade>())
        .and(warp::body::stream())
        .map(
            |method,
             path: warp::path::FullPath,
             query: String,
             headers,
             on_upgrade: Option<OnUpgrade>,
             body| {
                let uri = if query.is_empty() {
                    path.as_str().to_owned()
                } else {
                    format!("{}?{query}", path.as_str())
                };
                let body = StreamBody::new(TryStreamExt::map_ok(body, chunk_frame));
                let mut request = Request::new(body);
                *request.method_mut() = method;
                *request.uri_mut() = uri.parse().unwrap_or_default();
                *request.headers_mut() = headers;
                if let Some(on_upgrade) = on_upgrade {
                    request.extensions_mut().insert(on_upgrade);
                }
                request
            },
        )
}

fn chunk_frame<B: Buf>(mut chunk: B) -> Frame<Bytes> {
    Frame::data(chunk.copy_to_bytes(chunk.remaining()))
}
