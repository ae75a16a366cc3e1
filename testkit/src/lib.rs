//! Test support for Switchboard's adapters: minimal real clients over
//! 127.0.0.1 (HTTP/1.1, SSE, WebSocket) and [`conformance`], the run every
//! framework adapter (warp, axum, actix-web, plain hyper) must pass, so a
//! feature that works in one adapter only shows up as a failing test.
//!
//! Every wait is bounded by [`WAIT`]; nothing asserts on timing.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The longest any single wait may take (real time).
pub const WAIT: Duration = Duration::from_secs(10);

/// The API key [`conformance`] presents to the publish API: mount the
/// adapter under test with it.
pub const API_KEY: &str = "conformance-key";

/// Awaits `future`, failing the test with `what` if it takes over [`WAIT`].
///
/// # Panics
/// On timeout.
pub async fn within<F: std::future::Future>(what: &str, future: F) -> F::Output {
    match tokio::time::timeout(WAIT, future).await {
        Ok(output) => output,
        Err(_) => panic!("timed out after {WAIT:?}: {what}"),
    }
}

/// An HTTP answer, read whole.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The status code.
    pub status: u16,
    /// Header names (lower case) and values.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

impl Reply {
    /// The body as JSON.
    ///
    /// # Panics
    /// When it is not JSON.
    #[must_use]
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// The value of header `name`, if present.
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`).
///
/// # Panics
/// When the server cannot be reached or answers garbage.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    within(&format!("{method} {path}"), async {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        tcp.write_all(head.as_bytes()).await.expect("send head");
        tcp.write_all(body).await.expect("send body");
        let mut raw = Vec::new();
        tcp.read_to_end(&mut raw).await.expect("read the answer");
        parse_reply(&raw)
    })
    .await
}

fn parse_reply(raw: &[u8]) -> Reply {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .expect("a status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"))
    {
        body = dechunk(&body);
    }
    Reply {
        status,
        headers,
        body,
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(end) = data.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&data[..end])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next().unwrap_or("").trim(), 16).ok())
            .unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = end + 2;
        out.extend_from_slice(&data[start..(start + size).min(data.len())]);
        data = &data[(start + size + 2).min(data.len())..];
    }
    out
}

/// A WebSocket client.
pub struct WsClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// Its session id, from `welcome`.
    pub sid: String,
}

impl WsClient {
    /// Connects to `url` and reads the `welcome`.
    ///
    /// # Panics
    /// When the handshake fails or the first frame is not `welcome`.
    pub async fn connect(url: &str) -> Self {
        let (ws, _) = within(
            "the WebSocket handshake",
            tokio_tungstenite::connect_async(url),
        )
        .await
        .unwrap_or_else(|e| panic!("WebSocket handshake with {url}: {e}"));
        let mut client = Self {
            ws,
            sid: String::new(),
        };
        let welcome = client.next_of("welcome").await;
        client.sid = welcome["sid"]
            .as_str()
            .expect("welcome has a sid")
            .to_owned();
        client
    }

    /// Sends one frame.
    ///
    /// # Panics
    /// When the connection is gone.
    pub async fn send(&mut self, frame: &Value) {
        within(
            "a WebSocket send",
            self.ws.send(Message::text(frame.to_string())),
        )
        .await
        .expect("send a frame");
    }

    /// The next frame of type `kind`, skipping others (pings are answered).
    ///
    /// # Panics
    /// When the session ends first or nothing comes within [`WAIT`].
    pub async fn next_of(&mut self, kind: &str) -> Value {
        loop {
            match within(&format!("a `{kind}` frame"), self.ws.next()).await {
                Some(Ok(Message::Text(text))) => {
                    let frame: Value = serde_json::from_str(&text).expect("frames are JSON");
                    if frame["type"] == "ping" {
                        self.send(&json!({"type": "pong"})).await;
                    }
                    if frame["type"] == kind {
                        return frame;
                    }
                }
                Some(Ok(_)) => {}
                other => panic!("the session ended while waiting for `{kind}`: {other:?}"),
            }
        }
    }
}

/// An SSE stream, read event by event.
pub struct SseClient {
    tcp: TcpStream,
    buffer: Vec<u8>,
    /// The status of the stream's response.
    pub status: u16,
}

/// One SSE event.
#[derive(Debug, Clone)]
pub struct SseEvent {
    /// `event:`.
    pub event: String,
    /// `id:`, if any.
    pub id: Option<String>,
    /// `data:`, as JSON.
    pub data: Value,
}

impl SseClient {
    /// `GET path` on `addr`, reading the response head.
    ///
    /// # Panics
    /// When the server cannot be reached.
    pub async fn open(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Self {
        let mut tcp = within("SSE connect", TcpStream::connect(addr))
            .await
            .expect("connect");
        let mut head =
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n");
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        tcp.write_all(head.as_bytes())
            .await
            .expect("send the SSE request");
        let mut client = Self {
            tcp,
            buffer: Vec::new(),
            status: 0,
        };
        let end = client.fill_until(b"\r\n\r\n").await;
        let head = String::from_utf8_lossy(&client.buffer[..end]).into_owned();
        client.status = head
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .expect("a status line");
        let chunked = head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked");
        client.buffer.drain(..end + 4);
        assert!(
            chunked || client.status != 200,
            "SSE streams are chunked over HTTP/1.1"
        );
        client
    }

    async fn fill_until(&mut self, needle: &[u8]) -> usize {
        loop {
            if let Some(at) = self.buffer.windows(needle.len()).position(|w| w == needle) {
                return at;
            }
            let mut chunk = [0u8; 4096];
            let n = within("SSE bytes", self.tcp.read(&mut chunk))
                .await
                .expect("read the stream");
            assert!(n > 0, "the SSE stream ended");
            self.buffer.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next event of type `kind`, skipping others and comments.
    ///
    /// # Panics
    /// When the stream ends first or nothing comes within [`WAIT`].
    pub async fn next_of(&mut self, kind: &str) -> SseEvent {
        loop {
            let event = self.next().await;
            if event.event == kind {
                return event;
            }
        }
    }

    async fn next(&mut self) -> SseEvent {
        loop {
            // Chunk framing lines ("1a\r\n") are not `field: value` lines and
            // are skipped; events end with a blank line.
            let end = self.fill_until(b"\n\n").await;
            let block = String::from_utf8_lossy(&self.buffer[..end]).into_owned();
            self.buffer.drain(..end + 2);
            let mut event = None;
            let mut id = None;
            let mut data = None;
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event: ") {
                    event = Some(v.to_owned());
                } else if let Some(v) = line.strip_prefix("id: ") {
                    id = Some(v.to_owned());
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data = Some(serde_json::from_str(v).expect("SSE data is JSON"));
                }
            }
            if let (Some(event), Some(data)) = (event, data) {
                return SseEvent { event, id, data };
            }
        }
    }
}

/// Runs every Switchboard route of a server at `addr`, mounted under
/// `base` (`""` or `"/rt"`) with the publish API key [`API_KEY`] and the
/// runtime's default authenticator (the `token` query parameter is the
/// user): the browser client and metrics are served; a WebSocket, an SSE
/// and a long-poll session join one room; a publish from each of them and
/// from the HTTP API reaches all three; a wrong method answers 405 and an
/// unknown path under `base` 404.
///
/// # Panics
/// At the first route that does not behave.
pub async fn conformance(addr: SocketAddr, base: &str) {
    let room = "conformance";

    let script = http(addr, "GET", &format!("{base}/switchboard.js"), &[], b"").await;
    assert_eq!(script.status, 200, "GET {base}/switchboard.js");
    assert!(script
        .header("content-type")
        .is_some_and(|v| v.contains("javascript")));
    assert!(String::from_utf8_lossy(&script.body).contains("export class Switchboard"));

    let metrics = http(addr, "GET", &format!("{base}/metrics"), &[], b"").await;
    assert_eq!(metrics.status, 200, "GET {base}/metrics");
    assert!(String::from_utf8_lossy(&metrics.body).contains("switchboard_"));

    // WebSocket.
    let mut ws = WsClient::connect(&format!("ws://{addr}{base}/ws?token=alice")).await;
    ws.send(&json!({"type": "join", "room": room, "id": 1}))
        .await;
    ws.next_of("joined").await;

    // SSE, joined through the URL.
    let mut sse = SseClient::open(addr, &format!("{base}/sse?rooms={room}&token=bob"), &[]).await;
    assert_eq!(sse.status, 200, "GET {base}/sse");
    let sse_sid = sse.next_of("welcome").await.data["sid"]
        .as_str()
        .expect("welcome has a sid")
        .to_owned();
    sse.next_of("joined").await;

    // Long-poll.
    let open = http(
        addr,
        "POST",
        &format!("{base}/poll/open?token=carol"),
        &[],
        b"",
    )
    .await;
    assert_eq!(open.status, 200, "POST {base}/poll/open");
    let poll_sid = open.json()[0]["sid"]
        .as_str()
        .expect("welcome has a sid")
        .to_owned();
    let mut poller = Poller::new(addr, format!("{base}/poll?sid={poll_sid}&token=carol"));
    let join = json!({"type": "join", "room": room}).to_string();
    let sent = http(
        addr,
        "POST",
        &format!("{base}/poll/send?sid={poll_sid}&token=carol"),
        &[],
        join.as_bytes(),
    )
    .await;
    assert_eq!(sent.status, 202, "POST {base}/poll/send");
    poller.next_of("joined").await;

    // A publish from each transport and from the API reaches every member.
    ws.send(&json!({"type": "publish", "room": room, "data": {"from": "ws"}}))
        .await;
    let over_sse = json!({"type": "publish", "room": room, "data": {"from": "sse"}}).to_string();
    let sent = http(
        addr,
        "POST",
        &format!("{base}/sse/send?sid={sse_sid}&token=bob"),
        &[],
        over_sse.as_bytes(),
    )
    .await;
    assert_eq!(sent.status, 202, "POST {base}/sse/send");
    let over_poll = json!({"type": "publish", "room": room, "data": {"from": "poll"}}).to_string();
    http(
        addr,
        "POST",
        &format!("{base}/poll/send?sid={poll_sid}&token=carol"),
        &[],
        over_poll.as_bytes(),
    )
    .await;
    let api = http(
        addr,
        "POST",
        &format!("{base}/api/publish"),
        &[("Authorization", &format!("Bearer {API_KEY}"))],
        json!({"room": room, "data": {"from": "api"}})
            .to_string()
            .as_bytes(),
    )
    .await;
    assert_eq!(api.status, 200, "POST {base}/api/publish: {:?}", api.json());
    assert_eq!(api.json()["seq"], 4);
    for seq in 1..=4u64 {
        let frame = ws.next_of("message").await;
        assert_eq!(frame["seq"], seq, "WebSocket: {frame}");
        let event = sse.next_of("message").await;
        assert_eq!(event.data["seq"], seq, "SSE: {:?}", event.data);
        assert!(event.id.is_some(), "SSE messages carry a cursor");
        let frame = poller.next_of("message").await;
        assert_eq!(frame["seq"], seq, "long-poll: {frame}");
    }

    let direct = http(
        addr,
        "POST",
        &format!("{base}/api/direct"),
        &[("Authorization", &format!("Bearer {API_KEY}"))],
        json!({"user": "alice", "data": {"psst": true}})
            .to_string()
            .as_bytes(),
    )
    .await;
    assert_eq!(direct.json()["delivered"], 1, "POST {base}/api/direct");
    assert_eq!(ws.next_of("direct").await["data"]["psst"], true);

    let wrong = http(addr, "GET", &format!("{base}/poll/send"), &[], b"").await;
    assert_eq!(wrong.status, 405, "GET {base}/poll/send");
    let unknown = http(addr, "GET", &format!("{base}/nothing-here"), &[], b"").await;
    assert_eq!(unknown.status, 404, "GET {base}/nothing-here");
}

/// A long-poll client that acknowledges every answer it read.
pub struct Poller {
    addr: SocketAddr,
    /// `…/poll?sid=…&token=…`, without `ack`; change it to poll with
    /// another credential.
    pub path: String,
    ack: usize,
}

impl Poller {
    /// Polls `path` (`…/poll?sid=…`, without `ack`) on `addr` for a session
    /// whose `POST …/poll/open` answer (`[welcome]`) was read: the first poll
    /// acknowledges it.
    #[must_use]
    pub fn new(addr: SocketAddr, path: String) -> Self {
        Self { addr, path, ack: 1 }
    }

    /// The next frame of type `kind`, skipping others.
    ///
    /// # Panics
    /// When a poll is refused or nothing comes within [`WAIT`] per poll.
    pub async fn next_of(&mut self, kind: &str) -> Value {
        loop {
            let reply = http(
                self.addr,
                "GET",
                &format!("{}&ack={}", self.path, self.ack),
                &[],
                b"",
            )
            .await;
            assert_eq!(reply.status, 200, "GET poll");
            let frames = reply.json();
            let frames = frames.as_array().expect("polls answer arrays").clone();
            self.ack = frames.len();
            // Frames after the wanted one are acknowledged as read, so keep
            // them for the next call.
            if let Some(at) = frames.iter().position(|f| f["type"] == kind) {
                self.ack = at + 1;
                return frames[at].clone();
            }
        }
    }
}
