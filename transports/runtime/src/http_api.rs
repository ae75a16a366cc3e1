//! The HTTP publish API of PROTOCOL.md, written against `http` types so every
//! adapter mounts the same handler: `POST …/api/publish` and `POST …/api/direct`
//! for backends in any language, and `GET …/metrics`; plus the pieces the SSE
//! and long-poll transports share ([`apply_frames`], [`error`]).

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Limited};
use serde::Deserialize;
use serde_json::value::RawValue;
use switchboard_core::{is_valid_idempotency_key, ErrorCode};

use crate::{Session, Switchboard};

/// Which HTTP publish API call a request is, by its path's last segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ApiCall {
    /// `POST …/api/publish`.
    Publish,
    /// `POST …/api/direct`.
    Direct,
}

/// Answers one HTTP publish API request.
///
/// `api_key` is the bearer key backends must present; `None` turns the API
/// off (every call answers 401). Bodies are read through
/// `http_body_util::Limited` and refused with 413 past `max_frame_bytes`.
pub async fn handle<B>(
    switchboard: &Switchboard,
    api_key: Option<&str>,
    call: ApiCall,
    request: Request<B>,
) -> Response<Bytes>
where
    B: Body,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    if request.method() != Method::POST {
        let mut response = error(
            StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::InvalidFrame,
            "use POST",
        );
        response
            .headers_mut()
            .insert(header::ALLOW, http::HeaderValue::from_static("POST"));
        return response;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match (api_key, presented) {
        (Some(key), Some(given)) if constant_time_eq(key.as_bytes(), given.as_bytes()) => {}
        (None, _) => {
            return error(
                StatusCode::UNAUTHORIZED,
                ErrorCode::Forbidden,
                "the publish API has no key configured",
            )
        }
        _ => {
            return error(
                StatusCode::UNAUTHORIZED,
                ErrorCode::Forbidden,
                "missing or wrong API key",
            )
        }
    }
    let limit = switchboard.config().max_frame_bytes;
    let body = match read_body(request.into_body(), limit).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    match call {
        ApiCall::Publish => publish(switchboard, &body).await,
        ApiCall::Direct => direct(switchboard, &body).await,
    }
}

#[derive(Deserialize)]
struct PublishBody<'a> {
    #[serde(borrow)]
    room: &'a str,
    #[serde(borrow)]
    data: &'a RawValue,
    #[serde(default, borrow)]
    event: Option<std::borrow::Cow<'a, str>>,
    /// Publish at most once per key (a retry after a timeout or a 503).
    #[serde(default, borrow)]
    idempotency_key: Option<std::borrow::Cow<'a, str>>,
}

#[derive(Deserialize)]
struct DirectBody<'a> {
    #[serde(default, borrow)]
    user: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    sid: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    data: &'a RawValue,
    #[serde(default, borrow)]
    event: Option<std::borrow::Cow<'a, str>>,
}

async fn publish(switchboard: &Switchboard, body: &[u8]) -> Response<Bytes> {
    let parsed: PublishBody<'_> = match parse(body) {
        Ok(parsed) => parsed,
        Err(response) => return response,
    };
    if parsed
        .idempotency_key
        .as_ref()
        .is_some_and(|k| !is_valid_idempotency_key(k))
    {
        return error(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidFrame,
            "`idempotency_key` must be 1 to 64 bytes",
        );
    }
    match switchboard
        .publish_raw_once(
            parsed.room,
            parsed.event.as_deref(),
            parsed.data,
            parsed.idempotency_key.as_deref(),
        )
        .await
    {
        Ok(published) => json(
            StatusCode::OK,
            &serde_json::json!({"seq": published.seq, "epoch": published.epoch.as_str()}),
        ),
        Err(e) => failure(&e),
    }
}

async fn direct(switchboard: &Switchboard, body: &[u8]) -> Response<Bytes> {
    let parsed: DirectBody<'_> = match parse(body) {
        Ok(parsed) => parsed,
        Err(response) => return response,
    };
    let sent = match (parsed.user.as_deref(), parsed.sid.as_deref()) {
        (Some(user), None) => {
            switchboard
                .send_to_user(user, parsed.event.as_deref(), parsed.data)
                .await
        }
        (None, Some(sid)) => {
            switchboard
                .send_to_session(sid, parsed.event.as_deref(), parsed.data)
                .await
        }
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                ErrorCode::InvalidFrame,
                "give exactly one of `user` or `sid`",
            )
        }
    };
    match sent {
        Ok(delivered) => json(StatusCode::OK, &serde_json::json!({"delivered": delivered})),
        // Nobody online is an answer, not a failure: a backend notifying an
        // offline user learns it from `delivered: 0`.
        Err(e) if e.is_unknown_target() => {
            json(StatusCode::OK, &serde_json::json!({"delivered": 0}))
        }
        Err(e) => failure(&e),
    }
}

// The error is the finished answer, built once per refused request and
// returned straight away: boxing it would only add an allocation.
#[allow(clippy::result_large_err)]
fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, Response<Bytes>> {
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(error(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidJson,
            "the body must be a JSON object",
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        if e.is_data() {
            error(
                StatusCode::BAD_REQUEST,
                ErrorCode::InvalidFrame,
                &format!("bad body: {e}"),
            )
        } else {
            error(
                StatusCode::BAD_REQUEST,
                ErrorCode::InvalidJson,
                "the body is not valid JSON",
            )
        }
    })
}

fn failure(e: &crate::Error) -> Response<Bytes> {
    let status = match e.code() {
        ErrorCode::FrameTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        // A broker outage is the server's trouble, not a bad request:
        // PROTOCOL.md promises 503 `unavailable` (it answered 400).
        ErrorCode::ServerFull | ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::BAD_REQUEST,
    };
    error(status, e.code(), &e.to_string())
}

/// Applies a `send` body to `session`, for the SSE and long-poll transports
/// (`POST …/sse/send`, `POST …/poll/send`), once the transport has found the
/// session among its own (a sid only takes client frames through the
/// transport that opened it, for the identity that opened it).
///
/// The body is one client frame or a JSON array of frames, applied in
/// order; it may hold up to 4 × `max_frame_bytes` (413 `frame_too_large`
/// beyond), and each frame is still held to `max_frame_bytes` and the rate
/// limit by the core. Replies (acks, errors) travel on the session's stream
/// or poll, like over WebSocket; this answers `202 {"accepted": n}` once
/// they are applied.
pub async fn apply_frames<B>(session: &Session, body: B) -> Response<Bytes>
where
    B: Body,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let limit = session.max_frame_bytes().saturating_mul(4);
    let body = match read_body(body, limit).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    let frames = split_frames(&body);
    for frame in &frames {
        session.handle_frame(frame).await;
    }
    // Publishes are answered after `handle_frame` returns; this answers
    // once they all were.
    session.settle().await;
    json(
        StatusCode::ACCEPTED,
        &serde_json::json!({"accepted": frames.len()}),
    )
}

/// Reads a request body of at most `limit` bytes.
///
/// # Errors
/// The response to send instead: 413 `frame_too_large` past `limit`, 400
/// `invalid_json` when the body could not be read.
// The error is the finished answer, returned straight away (see `parse`).
#[allow(clippy::result_large_err)]
pub async fn read_body<B>(body: B, limit: usize) -> Result<Bytes, Response<Bytes>>
where
    B: Body,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::FrameTooLarge,
            &format!("body larger than {limit} bytes"),
        )),
        Err(_) => Err(error(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidJson,
            "could not read the body",
        )),
    }
}

/// The answer to a request naming a sid that is unknown, closed, of
/// another transport or of another identity: 403 `forbidden` alike, so a
/// request cannot probe which sids exist.
#[must_use]
pub fn no_such_session() -> Response<Bytes> {
    error(
        StatusCode::FORBIDDEN,
        ErrorCode::Forbidden,
        "no session of yours with that sid",
    )
}

/// A client's `POST …/send?sid=…` that passed the checks every transport
/// makes first (see [`client_post`]).
#[derive(Debug)]
#[non_exhaustive]
pub struct ClientPost<B> {
    /// Who sent it: the transport checks the session is theirs.
    pub identity: switchboard_core::Identity,
    /// The session it names.
    pub sid: String,
    /// The frames, still unread (see [`apply_frames`]).
    pub body: B,
}

/// The checks of a client's `POST …/send?sid=…` shared by SSE and long-poll:
/// the method, origin and credentials (through [`Switchboard::identify`], so
/// sessions still send during the shutdown grace period), and a `sid`.
///
/// # Errors
/// The answer to give: 405, the refusal's status (403), or 400 without `sid`.
#[allow(clippy::result_large_err)]
pub async fn client_post<B>(
    switchboard: &Switchboard,
    request: Request<B>,
) -> Result<ClientPost<B>, Response<Bytes>> {
    if request.method() != Method::POST {
        return Err(error(
            StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::InvalidFrame,
            "use POST",
        ));
    }
    let (parts, body) = request.into_parts();
    let identity = switchboard
        .identify(&parts)
        .await
        .map_err(|refusal| error(refusal.http_status(), refusal.code, &refusal.message))?;
    let sid = sid_param(&parts)?;
    Ok(ClientPost {
        identity,
        sid,
        body,
    })
}

/// The `sid` query parameter of a request on an existing session.
///
/// # Errors
/// 400 `invalid_frame` when it is missing.
#[allow(clippy::result_large_err)]
pub fn sid_param(parts: &http::request::Parts) -> Result<String, Response<Bytes>> {
    crate::query_param(parts.uri.query().unwrap_or(""), "sid").ok_or_else(|| {
        error(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidFrame,
            "missing `sid`",
        )
    })
}

/// One frame, or each element of a JSON array of frames, as raw bytes.
/// Anything else is passed on whole, for the core to refuse with its code.
#[must_use]
pub fn split_frames(body: &[u8]) -> Vec<&[u8]> {
    let first = body.iter().position(|b| !b.is_ascii_whitespace());
    if first.map(|i| body[i]) == Some(b'[') {
        if let Ok(items) = serde_json::from_slice::<Vec<&RawValue>>(body) {
            return items.into_iter().map(|raw| raw.get().as_bytes()).collect();
        }
    }
    vec![body]
}

/// `{"error": {"code", "message"}}` with `status`.
#[must_use]
pub fn error(status: StatusCode, code: ErrorCode, message: &str) -> Response<Bytes> {
    json(
        status,
        &serde_json::json!({"error": {"code": code.as_str(), "message": message}}),
    )
}

/// A JSON response.
#[must_use]
pub fn json(status: StatusCode, value: &serde_json::Value) -> Response<Bytes> {
    let mut response = Response::new(Bytes::from(value.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

/// `GET …/metrics`: the counters in Prometheus text format.
#[must_use]
pub fn metrics(switchboard: &Switchboard) -> Response<Bytes> {
    let mut response = Response::new(Bytes::from(switchboard.metrics().to_prometheus()));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
