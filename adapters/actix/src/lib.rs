//! Mounts Switchboard in an actix-web app: every transport (`/ws`, `/sse`,
//! `/sse/send`, `/poll/open`, `/poll`, `/poll/send`), the browser client
//! (`/switchboard.js`), `/metrics` and the HTTP publish API, under the
//! options' base path, plus an extractor for the user the Switchboard's
//! `Authenticator` sees ([`Authenticated`]).
//!
//! ```no_run
//! use actix_web::{web, App, HttpServer};
//! use switchboard_actix::{Authenticated, Options};
//! use switchboard_runtime::Switchboard;
//!
//! async fn me(Authenticated(who): Authenticated) -> String {
//!     format!("hello {}", who.user.as_str())
//! }
//!
//! # async fn demo() -> std::io::Result<()> {
//! let switchboard = Switchboard::builder().build().expect("a switchboard");
//! HttpServer::new(move || {
//!     App::new()
//!         .app_data(switchboard.clone())
//!         .configure(switchboard_actix::configure(&switchboard, Options::default()))
//!         .route("/me", web::get().to(me))
//! })
//! .bind(("127.0.0.1", 8080))?
//! .run()
//! .await
//! # }
//! ```
//!
//! All the logic lives in [`switchboard_service`]; this crate only converts
//! between actix-web's types (which use `http` 0.2) and the `http` 1 types
//! the service speaks. Two things actix-web does differently need glue:
//! request bodies are read here (capped just past the largest body any route
//! accepts, so the route itself still answers 413), and a WebSocket is run
//! over the request's payload and a streamed `101` response, the way
//! actix-web hands over upgraded connections.

use actix_web::dev::Payload;
use actix_web::error::PayloadError;
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{web, FromRequest, HttpRequest, HttpResponse, HttpResponseBuilder, ResponseError};
use bytes::{Bytes, BytesMut};
use futures_util::{StreamExt, TryStreamExt};
use http_body_util::{BodyDataStream, BodyExt, Full};
use std::future::Future;
use std::pin::Pin;
use switchboard_core::Identity;
use switchboard_runtime::{http_api, Refusal, Switchboard};
use switchboard_service::{ResponseBody, Route, SwitchboardService};
use tokio::io::{AsyncWriteExt, DuplexStream};

pub use switchboard_service::{Options, SWITCHBOARD_JS};

/// Bytes buffered between the actix connection and a WebSocket session in
/// each direction; a peer that stops reading stalls the session's writes
/// here as it would on a socket.
const WEBSOCKET_BUFFER: usize = 64 * 1024;

/// Registers every Switchboard route `options` turns on, for
/// `App::configure` (call it in the app factory, once per worker).
pub fn configure(
    switchboard: &Switchboard,
    options: Options,
) -> impl FnOnce(&mut web::ServiceConfig) + Clone {
    service(SwitchboardService::new(switchboard, options))
}

/// The routes of an existing [`SwitchboardService`], for `App::configure`.
pub fn service(service: SwitchboardService) -> impl FnOnce(&mut web::ServiceConfig) + Clone {
    move |config| {
        for route in Route::ALL {
            let path = service.path_of(route);
            if service.route(&path).is_none() {
                continue;
            }
            let service = service.clone();
            // Any method: the service answers 405 with `Allow` itself.
            config.route(
                &path,
                web::route().to(move |request: HttpRequest, payload: web::Payload| {
                    let service = service.clone();
                    async move { answer(&service, route, request, payload.into_inner()).await }
                }),
            );
        }
    }
}

async fn answer(
    service: &SwitchboardService,
    route: Route,
    request: HttpRequest,
    payload: Payload,
) -> HttpResponse {
    let parts = match request_parts(&request) {
        Ok(parts) => parts,
        Err(e) => return plain(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    if route == Route::WebSocket && parts.method == http::Method::GET {
        return websocket(service.switchboard(), &parts, payload).await;
    }
    let body = match read_capped(payload, body_cap(service.switchboard())).await {
        Ok(body) => body,
        Err(e) => return plain(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let request = http::Request::from_parts(parts, Full::new(body));
    respond(service.serve_route(route, request).await).await
}

/// The WebSocket handshake, then the session on a duplex pipe whose one end
/// is fed from the request's payload and drained into the `101` response's
/// body.
async fn websocket(
    switchboard: &Switchboard,
    parts: &http::request::Parts,
    payload: Payload,
) -> HttpResponse {
    let accepted = match switchboard_websocket::handshake(switchboard, parts).await {
        Ok(accepted) => accepted,
        Err(refused) => return head(refused.status(), refused.headers()).finish(),
    };
    let switch = accepted.response();
    let mut switching = head(switch.status(), switch.headers());
    switching.upgrade("websocket");
    let (connection_side, session_side) = tokio::io::duplex(WEBSOCKET_BUFFER);
    let (from_session, to_session) = tokio::io::split(connection_side);
    // actix-web's payload is bound to its worker thread: pump it there.
    actix_web::rt::spawn(pump(payload, to_session));
    actix_web::rt::spawn(accepted.run(session_side));
    switching.streaming(tokio_util::io::ReaderStream::new(from_session))
}

/// Copies the client's bytes into the session's end of the pipe until
/// either ends; closing the write half tells the session the peer is gone.
async fn pump(mut payload: Payload, mut to_session: tokio::io::WriteHalf<DuplexStream>) {
    while let Some(Ok(chunk)) = payload.next().await {
        if to_session.write_all(&chunk).await.is_err() {
            break;
        }
    }
    let _ = to_session.shutdown().await;
}

/// Past this many bytes no route accepts a body (the SSE and long-poll
/// `send` take up to 4 × `max_frame_bytes`); one byte more is read so the
/// route answers 413 itself.
fn body_cap(switchboard: &Switchboard) -> usize {
    switchboard
        .config()
        .max_frame_bytes
        .saturating_mul(4)
        .saturating_add(1)
}

async fn read_capped(mut payload: Payload, cap: usize) -> Result<Bytes, PayloadError> {
    let mut body = BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk?;
        let room = cap - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() == cap {
            break;
        }
    }
    Ok(body.freeze())
}

/// actix-web's request head as an `http` 1 request head.
fn request_parts(request: &HttpRequest) -> Result<http::request::Parts, http::Error> {
    let version = match request.version() {
        actix_web::http::Version::HTTP_09 => http::Version::HTTP_09,
        actix_web::http::Version::HTTP_10 => http::Version::HTTP_10,
        actix_web::http::Version::HTTP_2 => http::Version::HTTP_2,
        actix_web::http::Version::HTTP_3 => http::Version::HTTP_3,
        _ => http::Version::HTTP_11,
    };
    let mut builder = http::Request::builder()
        .method(request.method().as_str())
        .uri(request.uri().to_string())
        .version(version);
    for (name, value) in request.headers() {
        builder = builder.header(name.as_str(), value.as_bytes());
    }
    builder.body(()).map(|request| request.into_parts().0)
}

/// An `http` 1 response as actix-web's: whole bodies with their length,
/// SSE streams streamed as they come.
async fn respond(response: http::Response<ResponseBody>) -> HttpResponse {
    let (parts, body) = response.into_parts();
    let mut builder = head(parts.status, &parts.headers);
    if body.is_stream() {
        builder.streaming(
            BodyDataStream::new(body)
                .map_err(|never| -> std::convert::Infallible { match never {} }),
        )
    } else {
        match body.collect().await {
            Ok(collected) => builder.body(collected.to_bytes()),
            Err(never) => match never {},
        }
    }
}

/// A response builder with an `http` 1 status and headers.
fn head(status: http::StatusCode, headers: &http::HeaderMap) -> HttpResponseBuilder {
    let status = StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut builder = HttpResponse::build(status);
    for (name, value) in headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_str().as_bytes()),
            HeaderValue::from_bytes(value.as_bytes()),
        ) {
            builder.append_header((name, value));
        }
    }
    builder
}

fn plain(status: StatusCode, message: &str) -> HttpResponse {
    HttpResponse::build(status)
        .content_type("text/plain; charset=utf-8")
        .body(message.to_owned())
}

/// The caller of one of the app's own routes, as the Switchboard's
/// `Authenticator` (and origin check) identifies it: the same user id its
/// sessions get. Refused requests answer 403 (`forbidden`) with the
/// protocol's JSON error; use `Option<Authenticated>` where signing in is
/// optional.
///
/// Needs the `Switchboard` as app data (`App::app_data(switchboard)` or
/// `web::Data<Switchboard>`).
#[derive(Debug, Clone)]
pub struct Authenticated(pub Identity);

/// Why [`Authenticated`] refused a request: answers with the refusal's
/// status and `{"error": {"code", "message"}}`.
#[derive(Debug, Clone)]
pub struct Refused(pub Refusal);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.message)
    }
}

impl ResponseError for Refused {
    fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.0.http_status().as_u16()).unwrap_or(StatusCode::FORBIDDEN)
    }

    fn error_response(&self) -> HttpResponse {
        let refusal = &self.0;
        let response = http_api::error(refusal.http_status(), refusal.code, &refusal.message);
        head(response.status(), response.headers()).body(response.body().clone())
    }
}

impl FromRequest for Authenticated {
    type Error = actix_web::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self, Self::Error>>>>;

    fn from_request(request: &HttpRequest, _: &mut Payload) -> Self::Future {
        let switchboard = request.app_data::<Switchboard>().cloned().or_else(|| {
            request
                .app_data::<web::Data<Switchboard>>()
                .map(|data| data.get_ref().clone())
        });
        let parts = request_parts(request);
        Box::pin(async move {
            let Some(switchboard) = switchboard else {
                return Err(actix_web::error::ErrorInternalServerError(
                    "Authenticated needs the Switchboard as app data",
                ));
            };
            let parts = parts.map_err(|_| {
                actix_web::error::ErrorBadRequest("the request head is not valid HTTP")
            })?;
            switchboard
                .identify(&parts)
                .await
                .map(Self)
                .map_err(|refusal| Refused(refusal).into())
        })
    }
}
