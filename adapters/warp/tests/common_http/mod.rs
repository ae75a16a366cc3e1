//! Shared helpers of the HTTP transports' end-to-end tests (SSE, long-poll,
//! nginx): a warp server with every Switchboard route on 127.0.0.1, a bare
//! HTTP/1.1 client on hyper's client connection, an SSE event reader, a
//! long-poll client, and the error cases both transports must answer alike.
//!
//! Every wait is bounded by [`WAIT`]: a hung server fails the test instead of
//! hanging CI. Nothing asserts how long anything took.

// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use switchboard_core::{Config, Identity, Policy, PublishRule, RoomName};
use switchboard_runtime::{
    async_trait, token, Authenticator, Builder, Refusal, RuntimeConfig, Switchboard, DEFAULT_COOKIE,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// The bound on every single wait of these tests.
pub(crate) const WAIT: Duration = Duration::from_secs(10);

/// Awaits `future`, failing the test with `what` if it takes longer than [`WAIT`].
pub(crate) async fn within<F: Future>(what: &str, future: F) -> F::Output {
    match tokio::time::timeout(WAIT, future).await {
        Ok(output) => output,
        Err(_) => panic!("timed out after {WAIT:?} waiting for {what}"),
    }
}

/// Polls `condition` until it holds, failing the test after [`WAIT`].
pub(crate) async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    within(what, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

// ---- configuration ------------------------------------------------------

/// The core config of these tests: protocol defaults, except a long
/// heartbeat (no pings unless a test wants them), a rate and error budget
/// that only the tests about them reach, and 2 rooms per session.
pub(crate) fn config() -> Config {
    let mut config = Config::default();
    config.max_frame_bytes = 1024;
    config.max_rooms_per_session = 2;
    config.rate_per_sec = 1;
    config.rate_burst = 30;
    config.max_errors = 1000;
    config.heartbeat_interval = Duration::from_secs(30);
    config.heartbeat_timeout = Duration::from_secs(30);
    config
}

/// The runtime config of these tests: half-second polls.
pub(crate) fn runtime_config() -> RuntimeConfig {
    let mut runtime = RuntimeConfig::default();
    runtime.poll_timeout = Duration::from_millis(500);
    runtime
}

/// Members publish; nobody may join `private*` rooms; only the server
/// publishes to `news*` rooms.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TestPolicy;

impl Policy for TestPolicy {
    fn may_join(&self, _who: &Identity, room: &RoomName) -> bool {
        !room.as_str().starts_with("private")
    }

    fn publish_rule(&self, _who: &Identity, room: &RoomName) -> PublishRule {
        if room.as_str().starts_with("news") {
            PublishRule::ServerOnly
        } else {
            PublishRule::Members
        }
    }
}

/// Lets in `alice` and `bob` only (by their `token`), refuses everybody else.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KnownUsers;

#[async_trait]
impl Authenticator for KnownUsers {
    async fn authenticate(&self, request: &http::request::Parts) -> Result<Identity, Refusal> {
        match token(request, DEFAULT_COOKIE).as_deref() {
            Some(user @ ("alice" | "bob")) => Ok(Identity::new(user)),
            _ => Err(Refusal::forbidden("unknown user")),
        }
    }
}

/// A builder with [`config`], [`runtime_config`] and [`TestPolicy`].
pub(crate) fn builder() -> Builder {
    Switchboard::builder()
        .config(config())
        .runtime_config(runtime_config())
        .policy(TestPolicy)
}

// ---- the server ---------------------------------------------------------

/// A warp server with `switchboard_warp::routes`, on a free 127.0.0.1 port.
pub(crate) struct Server {
    pub(crate) addr: SocketAddr,
    pub(crate) switchboard: Switchboard,
    task: JoinHandle<()>,
}

impl Server {
    /// Starts a server with the default test settings.
    pub(crate) async fn start() -> Self {
        Self::with(builder()).await
    }

    /// Starts a server for a Switchboard built by `builder`.
    pub(crate) async fn with(builder: Builder) -> Self {
        let switchboard = builder.build().expect("the test config is valid");
        let listener = switchboard_websocket::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .expect("bind 127.0.0.1:0");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let routes = switchboard_warp::routes(
            &switchboard,
            switchboard_warp::Options::default().api_key("test-key"),
        );
        let task = tokio::spawn(warp::serve(routes).incoming(listener).run());
        Self {
            addr,
            switchboard,
            task,
        }
    }

    /// `GET path` (path and query).
    pub(crate) async fn get(&self, path: &str) -> Reply {
        self.fetch(get(&self.addr.to_string(), path)).await
    }

    /// `POST path` with `body`.
    pub(crate) async fn post(&self, path: &str, body: impl Into<Bytes>) -> Reply {
        self.fetch(post(&self.addr.to_string(), path, body)).await
    }

    /// Sends `request` and reads the whole answer.
    pub(crate) async fn fetch(&self, request: Request<Full<Bytes>>) -> Reply {
        let response = self.send(request).await;
        Reply::read(response).await
    }

    /// Sends `request` on a new connection; the body is left to the caller.
    pub(crate) async fn send(&self, request: Request<Full<Bytes>>) -> Response<Incoming> {
        let tcp = within("connect", TcpStream::connect(self.addr))
            .await
            .expect("connect to the test server");
        send_on(tcp, request).await
    }

    /// Opens an SSE stream (`GET path`), expecting 200 `text/event-stream`.
    pub(crate) async fn sse(&self, path: &str) -> SseReader {
        self.sse_with(get(&self.addr.to_string(), path)).await
    }

    /// Opens an SSE stream with a request of the caller's making.
    pub(crate) async fn sse_with(&self, request: Request<Full<Bytes>>) -> SseReader {
        SseReader::open(self.send(request).await)
    }

    /// Opens a WebSocket session as `token`; returns it with its sid.
    pub(crate) async fn websocket(
        &self,
        token: &str,
    ) -> (
        tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>,
        String,
    ) {
        use futures_util::StreamExt;
        let (mut ws, _) = within(
            "the WebSocket handshake",
            tokio_tungstenite::connect_async(format!("ws://{}/ws?token={token}", self.addr)),
        )
        .await
        .expect("WebSocket connect");
        let welcome = within("the WebSocket welcome", ws.next())
            .await
            .expect("a welcome")
            .expect("a message");
        let welcome: Value = serde_json::from_str(welcome.to_text().expect("text")).expect("JSON");
        let sid = welcome["sid"].as_str().expect("a sid").to_owned();
        (ws, sid)
    }

    /// Publishes from the server side, as the application does.
    pub(crate) async fn publish(&self, room: &str, data: Value) -> u64 {
        self.switchboard
            .publish(room, None, &data)
            .await
            .expect("server publish")
            .seq
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---- the HTTP client ----------------------------------------------------

/// A request with a `Host` header (nginx refuses HTTP/1.1 without one).
pub(crate) fn request(
    method: Method,
    authority: &str,
    path: &str,
    body: impl Into<Bytes>,
) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, authority)
        .body(Full::new(body.into()))
        .expect("a valid test request")
}

/// `GET path` for `authority`.
pub(crate) fn get(authority: &str, path: &str) -> Request<Full<Bytes>> {
    request(Method::GET, authority, path, Bytes::new())
}

/// `POST path` for `authority`, with a JSON body.
pub(crate) fn post(authority: &str, path: &str, body: impl Into<Bytes>) -> Request<Full<Bytes>> {
    let mut request = request(Method::POST, authority, path, body);
    request.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    request
}

/// Sends one request over `io` (plain TCP or TLS) as HTTP/1.1 and returns the
/// response head; the connection lives as long as the body is read.
pub(crate) async fn send_on<S>(io: S, request: Request<Full<Bytes>>) -> Response<Incoming>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut sender, connection) = within(
        "the HTTP handshake",
        hyper::client::conn::http1::handshake(TokioIo::new(io)),
    )
    .await
    .expect("HTTP/1.1 client handshake");
    tokio::spawn(connection);
    within("the response head", sender.send_request(request))
        .await
        .expect("the server answers")
}

/// A whole HTTP answer.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: StatusCode,
    pub(crate) headers: http::HeaderMap,
    pub(crate) body: Bytes,
}

impl Reply {
    /// Reads the body of `response` to its end.
    pub(crate) async fn read(response: Response<Incoming>) -> Self {
        let (parts, body) = response.into_parts();
        let body = within("the response body", body.collect())
            .await
            .expect("read the response body")
            .to_bytes();
        Self {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    /// The body as JSON.
    pub(crate) fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The body as a JSON array of frames.
    pub(crate) fn frames(&self) -> Vec<Value> {
        assert_eq!(self.status, StatusCode::OK, "body: {:?}", self.body);
        match self.json() {
            Value::Array(frames) => frames,
            other => panic!("expected a JSON array, got {other}"),
        }
    }

    /// Asserts `status` and `{"error": {"code": code}}`.
    pub(crate) fn assert_error(&self, status: StatusCode, code: &str) {
        assert_eq!(
            self.status,
            status,
            "body: {}",
            String::from_utf8_lossy(&self.body)
        );
        assert_eq!(self.json()["error"]["code"], code, "body: {}", self.json());
    }
}

// ---- SSE ----------------------------------------------------------------

/// One SSE event as written on the wire.
#[derive(Debug, Clone)]
pub(crate) struct SseEvent {
    /// The `event:` line (the frame's type).
    pub(crate) event: Option<String>,
    /// The `id:` line (the stream's cursor), if any.
    pub(crate) id: Option<String>,
    /// The `data:` lines, parsed.
    pub(crate) data: Value,
}

impl SseEvent {
    /// The frame's `type` (which must match the `event:` line).
    pub(crate) fn kind(&self) -> &str {
        self.data["type"].as_str().unwrap_or_default()
    }
}

/// Reads events from an SSE response, ignoring comments (`: ping`) and
/// `retry:` lines.
pub(crate) struct SseReader {
    pub(crate) status: StatusCode,
    pub(crate) headers: http::HeaderMap,
    body: Incoming,
    buffer: Vec<u8>,
    ended: bool,
    /// Comment lines seen (keepalives).
    pub(crate) comments: usize,
}

impl SseReader {
    /// Wraps a response, checking it is an event stream.
    pub(crate) fn open(response: Response<Incoming>) -> Self {
        let (parts, body) = response.into_parts();
        assert_eq!(parts.status, StatusCode::OK, "SSE refused");
        assert_eq!(
            parts
                .headers
                .get(header::CONTENT_TYPE)
                .map(|v| v.as_bytes()),
            Some(&b"text/event-stream"[..])
        );
        Self {
            status: parts.status,
            headers: parts.headers,
            body,
            buffer: Vec::new(),
            ended: false,
            comments: 0,
        }
    }

    /// The next event, or `None` once the server ended the stream.
    pub(crate) async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buffer.drain(..end + 2).collect();
                if let Some(event) = self.parse(&block[..end]) {
                    return Some(event);
                }
                continue;
            }
            if self.ended {
                assert!(
                    self.buffer.iter().all(u8::is_ascii_whitespace),
                    "the stream ended inside an event: {:?}",
                    String::from_utf8_lossy(&self.buffer)
                );
                return None;
            }
            match within("an SSE event", self.body.frame()).await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buffer.extend_from_slice(&data);
                    }
                }
                Some(Err(_)) | None => self.ended = true,
            }
        }
    }

    fn parse(&mut self, block: &[u8]) -> Option<SseEvent> {
        let text = std::str::from_utf8(block).expect("SSE is UTF-8");
        let (mut event, mut id, mut data) = (None, None, Vec::new());
        for line in text.split('\n') {
            if line.starts_with(':') {
                self.comments += 1;
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => event = Some(value.to_owned()),
                "id" => id = Some(value.to_owned()),
                "data" => data.push(value),
                "retry" => {}
                other => panic!("unexpected SSE field {other:?} in {text:?}"),
            }
        }
        if data.is_empty() {
            return None;
        }
        let data: Value = serde_json::from_str(&data.join("\n")).expect("SSE data is JSON");
        let event = SseEvent { event, id, data };
        assert_eq!(
            event.event.as_deref(),
            Some(event.kind()),
            "the `event:` line names the frame's type"
        );
        Some(event)
    }

    /// The next event, which must exist.
    pub(crate) async fn expect(&mut self) -> SseEvent {
        self.next().await.expect("the SSE stream ended early")
    }

    /// Events up to and including the first of type `kind`, which is returned
    /// last; the ones before it are returned too.
    pub(crate) async fn until(&mut self, kind: &str) -> (SseEvent, Vec<SseEvent>) {
        let mut before = Vec::new();
        loop {
            let event = self.expect().await;
            if event.kind() == kind {
                return (event, before);
            }
            before.push(event);
        }
    }

    /// Reads `welcome`, which must be the first event, and returns its sid.
    pub(crate) async fn welcome(&mut self) -> String {
        let welcome = self.expect().await;
        assert_eq!(welcome.kind(), "welcome", "first event: {:?}", welcome.data);
        welcome.data["sid"]
            .as_str()
            .expect("welcome carries the sid")
            .to_owned()
    }
}

// ---- long-poll ----------------------------------------------------------

/// A long-poll client: keeps its sid and what to acknowledge.
pub(crate) struct Poller<'a> {
    pub(crate) server: &'a Server,
    pub(crate) sid: String,
    /// `&token=…`, or empty.
    pub(crate) auth: String,
    /// Frames of the last answer, acknowledged by the next poll.
    pub(crate) ack: usize,
}

impl<'a> Poller<'a> {
    /// `POST /poll/open` as `user` (or anonymous); its answer is `[welcome]`.
    pub(crate) async fn open(server: &'a Server, user: Option<&str>) -> Self {
        let auth = user.map(|u| format!("&token={u}")).unwrap_or_default();
        let opened = server
            .post(&format!("/poll/open?{}", auth.trim_start_matches('&')), "")
            .await;
        let frames = opened.frames();
        assert_eq!(frames.len(), 1, "open answers [welcome]: {frames:?}");
        assert_eq!(frames[0]["type"], "welcome");
        Self {
            server,
            sid: frames[0]["sid"]
                .as_str()
                .expect("welcome has a sid")
                .to_owned(),
            auth,
            ack: 1,
        }
    }

    /// `GET /poll?sid=…&ack=n`, acknowledging the last answer.
    pub(crate) async fn poll(&mut self) -> Vec<Value> {
        let reply = self.poll_raw(self.ack).await;
        let frames = reply.frames();
        self.ack = frames.len();
        frames
    }

    /// `GET /poll` with an explicit `ack` (not remembered).
    pub(crate) async fn poll_raw(&self, ack: usize) -> Reply {
        self.server
            .get(&format!("/poll?sid={}&ack={ack}{}", self.sid, self.auth))
            .await
    }

    /// `POST /poll/send` with `body` (one frame or an array); expects 202.
    pub(crate) async fn send(&self, body: impl Into<Bytes>) {
        let reply = self.send_raw(body).await;
        assert_eq!(
            reply.status,
            StatusCode::ACCEPTED,
            "body: {}",
            String::from_utf8_lossy(&reply.body)
        );
    }

    /// `POST /poll/send`, whatever it answers.
    pub(crate) async fn send_raw(&self, body: impl Into<Bytes>) -> Reply {
        self.server
            .post(&format!("/poll/send?sid={}{}", self.sid, self.auth), body)
            .await
    }

    /// Polls until a frame of type `kind` arrives; returns it and every frame
    /// before it (frames after it in the same answer are dropped).
    pub(crate) async fn until(&mut self, kind: &str) -> (Value, Vec<Value>) {
        let mut before = Vec::new();
        within(&format!("a `{kind}` frame"), async {
            loop {
                for frame in self.poll().await {
                    if frame["type"] == kind {
                        return (frame, before);
                    }
                    before.push(frame);
                }
            }
        })
        .await
    }
}

// ---- the error cases ----------------------------------------------------

/// Frames a session sends, of which the last is refused with `code`.
#[derive(Debug)]
pub(crate) struct ErrorCase {
    pub(crate) code: &'static str,
    pub(crate) frames: Vec<String>,
    /// The `id` the last frame carries, echoed in its `error`.
    pub(crate) id: Option<&'static str>,
}

/// One refused frame for every error code a client frame can earn (except
/// `rate_limited`, which needs a burst), for a session in no room yet, under
/// [`config`] and [`TestPolicy`].
pub(crate) fn error_cases() -> Vec<ErrorCase> {
    let case = |code, frames: &[Value], id| ErrorCase {
        code,
        frames: frames.iter().map(Value::to_string).collect(),
        id,
    };
    let oversize = "x".repeat(config().max_frame_bytes);
    vec![
        ErrorCase {
            code: "invalid_json",
            frames: vec!["this is not JSON".to_owned()],
            id: None,
        },
        // JSON, but not an object (an array body would be a batch of frames).
        case("invalid_json", &[json!("a string")], None),
        case(
            "invalid_frame",
            &[json!({"type": "join", "id": "j"})],
            Some("j"),
        ),
        case(
            "invalid_frame",
            &[json!({"type": "publish", "room": 7, "data": 1, "id": "p"})],
            Some("p"),
        ),
        case(
            "unknown_type",
            &[json!({"type": "teleport", "id": "t"})],
            Some("t"),
        ),
        case(
            "frame_too_large",
            &[json!({"type": "publish", "room": "big", "data": oversize})],
            None,
        ),
        case(
            "invalid_room",
            &[json!({"type": "join", "room": "no spaces", "id": "r"})],
            Some("r"),
        ),
        case(
            "not_joined",
            &[json!({"type": "publish", "room": "elsewhere", "data": 1, "id": "n"})],
            Some("n"),
        ),
        case(
            "forbidden",
            &[json!({"type": "join", "room": "private_1", "id": "f"})],
            Some("f"),
        ),
        case(
            "unknown_target",
            &[json!({"type": "direct", "to": {"user": "nobody"}, "data": 1, "id": "u"})],
            Some("u"),
        ),
        case(
            "too_many_rooms",
            &[
                json!({"type": "join", "room": "one"}),
                json!({"type": "join", "room": "two"}),
                json!({"type": "join", "room": "three", "id": "m"}),
            ],
            Some("m"),
        ),
        // After the joins: members may publish, but `news*` is the server's.
        case(
            "forbidden",
            &[
                json!({"type": "leave", "room": "two"}),
                json!({"type": "join", "room": "news"}),
                json!({"type": "publish", "room": "news", "data": 1, "id": "s"}),
            ],
            Some("s"),
        ),
    ]
}

/// Checks one refused frame's `error` against its case.
pub(crate) fn check_error(case: &ErrorCase, error: &Value) {
    assert_eq!(error["type"], "error");
    assert_eq!(error["code"], case.code, "case {case:?}: {error}");
    assert!(error["message"].is_string(), "errors explain: {error}");
    match case.id {
        Some(id) => assert_eq!(error["id"], id, "case {case:?}: {error}"),
        None => assert!(error.get("id").is_none(), "case {case:?}: {error}"),
    }
}

/// A burst of `n` pings with ids `0..n` in one body.
pub(crate) fn ping_burst(n: usize) -> String {
    let pings: Vec<Value> = (0..n).map(|i| json!({"type": "ping", "id": i})).collect();
    Value::Array(pings).to_string()
}
