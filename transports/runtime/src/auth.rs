//! Admission hooks: who is connecting, and from which origin.

use async_trait::async_trait;
use http::request::Parts;
use switchboard_core::{ErrorCode, Identity};

/// Why a connection was refused before it got a session. Transports answer
/// with an `error` frame carrying [`Refusal::code`] and close with
/// [`Refusal::close_code`] (WebSocket), or with an HTTP status (SSE, long-poll).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The protocol error code (`forbidden`, `server_full`).
    pub code: ErrorCode,
    /// For humans.
    pub message: String,
}

impl Refusal {
    /// Refused by authentication or the origin check.
    #[must_use]
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self {
            code: ErrorCode::Forbidden,
            message: message.into(),
        }
    }

    /// The WebSocket close code: 1013 when the server is full or shutting
    /// down (try again later), 1008 otherwise (policy).
    #[must_use]
    pub fn close_code(&self) -> u16 {
        match self.code {
            ErrorCode::ServerFull => 1013,
            _ => 1008,
        }
    }

    /// The HTTP status for transports that answer with one.
    #[must_use]
    pub fn http_status(&self) -> http::StatusCode {
        match self.code {
            ErrorCode::ServerFull => http::StatusCode::SERVICE_UNAVAILABLE,
            _ => http::StatusCode::FORBIDDEN,
        }
    }
}

/// Decides who a connecting client is, from its request (headers, cookies,
/// query). May do I/O (look a token up), hence async.
///
/// Browsers cannot set headers on WebSocket and EventSource requests, so
/// [`token`] finds a credential in the `Authorization: Bearer` header, a
/// `token` query parameter or a cookie.
#[async_trait]
pub trait Authenticator: Send + Sync + 'static {
    /// The identity of the client, or why it may not connect.
    async fn authenticate(&self, request: &Parts) -> Result<Identity, Refusal>;

    /// Checks a credential a session sent in band (a `refresh` frame), so
    /// that it may outlive the token it connected with. The default asks
    /// [`Authenticator::authenticate`] about a request carrying only
    /// `Authorization: Bearer <token>`, so one authenticator judges both;
    /// override it when tokens are checked without a request.
    async fn authenticate_token(&self, token: &str) -> Result<Identity, Refusal> {
        let request = http::Request::builder()
            .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
            .body(())
            .map_err(|_| Refusal::forbidden("the token is not a valid header value"))?;
        self.authenticate(&request.into_parts().0).await
    }
}

/// Lets everybody in; the user id is the `token` credential when one is given
/// (a name picked on a demo page), else `anonymous`. For demos and trusted
/// networks only.
#[derive(Debug, Clone, Copy, Default)]
pub struct TrustClientName;

#[async_trait]
impl Authenticator for TrustClientName {
    async fn authenticate(&self, request: &Parts) -> Result<Identity, Refusal> {
        match token(request, DEFAULT_COOKIE) {
            Some(name) if !name.is_empty() && name.len() <= 64 => Ok(Identity::new(name)),
            Some(_) => Err(Refusal::forbidden("user names are 1 to 64 bytes")),
            None => Ok(Identity::new("anonymous")),
        }
    }
}

/// The cookie [`token`] looks in by default.
pub const DEFAULT_COOKIE: &str = "switchboard_token";

/// The request's credential: the `Authorization: Bearer` header, else the
/// `token` query parameter, else the cookie named `cookie`.
#[must_use]
pub fn token(request: &Parts, cookie: &str) -> Option<String> {
    if let Some(value) = request.headers.get(http::header::AUTHORIZATION) {
        if let Some(bearer) = value.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")) {
            return Some(bearer.trim().to_owned());
        }
    }
    if let Some(value) = query_param(request.uri.query().unwrap_or(""), "token") {
        return Some(value);
    }
    request
        .headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == cookie)
        .map(|(_, value)| value.to_owned())
}

/// A query parameter, percent-decoded (`+` as space).
#[must_use]
pub fn query_param(query: &str, name: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| percent_decode(value))
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Decides whether a browser page from `origin` may connect. May do I/O,
/// hence async. Requests without an `Origin` header come from non-browser
/// clients, which cross-site attacks cannot forge, and are let through.
#[async_trait]
pub trait OriginCheck: Send + Sync + 'static {
    /// True to let the request in; refused ones get `forbidden` and close 1008.
    async fn allows(&self, request: &Parts) -> bool;
}

/// An allow-list of origins (`https://app.example.com`), plus the server's own
/// origin (an `Origin` whose host is the request's `Host`). `*` in the list
/// allows every origin.
#[derive(Debug, Clone, Default)]
pub struct AllowOrigins {
    allowed: Vec<String>,
}

impl AllowOrigins {
    /// Same-origin pages plus these origins.
    #[must_use]
    pub fn new<I, S>(origins: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            allowed: origins
                .into_iter()
                .map(|o| o.into().trim_end_matches('/').to_owned())
                .collect(),
        }
    }

    /// Same-origin pages only.
    #[must_use]
    pub fn same_origin() -> Self {
        Self::default()
    }

    /// Decides synchronously (the trait's async method calls this).
    #[must_use]
    pub fn check(&self, request: &Parts) -> bool {
        let Some(origin) = request
            .headers
            .get(http::header::ORIGIN)
            .and_then(|o| o.to_str().ok())
        else {
            return true;
        };
        if self.allowed.iter().any(|a| a == "*" || a == origin) {
            return true;
        }
        let host = request
            .headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok());
        let origin_host = origin.split_once("://").map(|(_, rest)| rest);
        matches!((host, origin_host), (Some(h), Some(o)) if h.eq_ignore_ascii_case(o))
    }
}

#[async_trait]
impl OriginCheck for AllowOrigins {
    async fn allows(&self, request: &Parts) -> bool {
        self.check(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut builder = http::Request::builder().uri(uri);
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        builder.body(()).unwrap().into_parts().0
    }

    #[test]
    fn finds_tokens_in_header_query_and_cookie() {
        assert_eq!(
            token(&parts("/ws", &[("authorization", "Bearer abc")]), "c").as_deref(),
            Some("abc")
        );
        assert_eq!(
            token(&parts("/ws?x=1&token=a%20b", &[]), "c").as_deref(),
            Some("a b")
        );
        assert_eq!(
            token(&parts("/ws", &[("cookie", "a=1; c=tok")]), "c").as_deref(),
            Some("tok")
        );
        assert_eq!(token(&parts("/ws", &[("cookie", "a=1")]), "c"), None);
    }

    #[test]
    fn origin_allow_list() {
        let check = AllowOrigins::new(["https://app.example"]);
        assert!(check.check(&parts("/ws", &[])));
        assert!(check.check(&parts("/ws", &[("origin", "https://app.example")])));
        assert!(check.check(&parts("/ws", &[("origin", "http://h:1"), ("host", "h:1")])));
        assert!(!check.check(&parts(
            "/ws",
            &[("origin", "https://evil.example"), ("host", "h:1")]
        )));
        assert!(AllowOrigins::new(["*"]).check(&parts("/ws", &[("origin", "https://x")])));
    }

    #[test]
    fn percent_decoding_is_total() {
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(percent_decode("%41%42"), "AB");
        assert_eq!(percent_decode("%"), "%");
    }
}
