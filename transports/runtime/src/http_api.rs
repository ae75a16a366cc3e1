//! The HTTP publish API of PROTOCOL.md, written against `http` types so every
//! adapter mounts the same handler: `POST …/api/publish` and `POST …/api/direct`
//! for backends in any language, and `GET …/metrics`.

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Limited};
use serde::Deserialize;
use serde_json::value::RawValue;
use switchboard_core::ErrorCode;

use crate::Switchboard;

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
    let body = match Limited::new(request.into_body(), limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::FrameTooLarge,
                &format!("body larger than {limit} bytes"),
            )
        }
        Err(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                ErrorCode::InvalidJson,
                "could not read the body",
            )
        }
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
    match switchboard
        .publish_raw(parsed.room, parsed.event.as_deref(), parsed.data)
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
        ErrorCode::ServerFull => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::BAD_REQUEST,
    };
    error(status, e.code(), &e.to_string())
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
