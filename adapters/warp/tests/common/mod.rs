//! Shared pieces of the end-to-end tests: a warp server on 127.0.0.1:0 that a
//! guard stops, a WebSocket client that reads protocol frames with a bound on
//! every wait, and a minimal HTTP/1.1 client for the publish API and metrics.

// `dead_code`: each test binary that includes this module uses a different
// subset of it. `unreachable_pub`: `pub` here means "for the test files", the
// only users a test helper module can have.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use switchboard_runtime::Switchboard;
use switchboard_warp::Options;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The longest any single wait of a test may take (real time). Generous: the
/// machine is shared; a healthy run takes milliseconds per wait.
pub const WAIT: Duration = Duration::from_secs(10);

/// A Switchboard mounted with `switchboard_warp::routes`, served by warp on
/// 127.0.0.1:0 until [`TestServer::stop`] or drop.
pub struct TestServer {
    pub addr: SocketAddr,
    pub switchboard: Switchboard,
    server: Option<JoinHandle<()>>,
}

impl TestServer {
    /// Serves `switchboard` with default options (publish API off).
    pub async fn start(switchboard: Switchboard) -> Self {
        Self::start_with(switchboard, Options::default()).await
    }

    /// Serves `switchboard` with `options`. The warp server stops accepting
    /// when the Switchboard shuts down, as an application would wire it.
    pub async fn start_with(switchboard: Switchboard, options: Options) -> Self {
        let listener = switchboard_websocket::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .expect("bind 127.0.0.1:0");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let routes = switchboard_warp::routes(&switchboard, options);
        let token = switchboard.shutdown_token();
        let server = tokio::spawn(
            warp::serve(routes)
                .incoming(listener)
                .graceful(async move { token.cancelled_owned().await })
                .run(),
        );
        Self {
            addr,
            switchboard,
            server: Some(server),
        }
    }

    /// `ws://…/ws`, as `user` (the default `TrustClientName` authenticator
    /// takes the `token` query parameter as the user name).
    pub fn ws_url(&self, user: &str) -> String {
        format!("ws://{}/ws?token={user}", self.addr)
    }

    /// Connects as `user` and reads the `welcome`.
    pub async fn connect(&self, user: &str) -> Client {
        let mut client = Client::open(&self.ws_url(user)).await;
        client.welcome().await;
        client
    }

    /// Shuts the Switchboard down and waits for the warp server to stop.
    pub async fn stop(mut self) {
        within(WAIT, self.switchboard.shutdown()).await;
        if let Some(server) = self.server.take() {
            within(WAIT, server)
                .await
                .expect("the warp server task ended");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        // A test that failed half-way still frees its port.
        if let Some(server) = self.server.take() {
            server.abort();
        }
        self.switchboard.shutdown_token().cancel();
    }
}

/// Awaits `future`, failing the test if it takes longer than `limit`.
pub async fn within<F: std::future::Future>(limit: Duration, future: F) -> F::Output {
    match tokio::time::timeout(limit, future).await {
        Ok(output) => output,
        Err(_) => panic!("timed out after {limit:?}"),
    }
}

/// What a client read next.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A text message, parsed as JSON.
    Frame(Value),
    /// The WebSocket closed: the close code (`None` when the connection ended
    /// without a close frame) and reason.
    Closed(Option<(u16, String)>),
}

/// A WebSocket client as the server sees it, on 127.0.0.1.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A WebSocket client speaking the protocol's JSON frames. Like a browser, it
/// reads all the time (a task moves what arrives into a queue the test reads
/// with a bound), so it answers the server's close at once; dropping it drops
/// the connection.
pub struct Client {
    sink: SplitSink<Ws, Message>,
    events: mpsc::UnboundedReceiver<Event>,
    reader: JoinHandle<()>,
    /// The `sid` of this session's `welcome`, once read.
    pub sid: String,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Completes the WebSocket handshake of `request`.
pub async fn handshake(request: Request) -> Ws {
    let (ws, response) = within(WAIT, tokio_tungstenite::connect_async(request))
        .await
        .expect("websocket handshake");
    assert_eq!(response.status(), 101);
    ws
}

/// Completes a handshake on a socket with a receive buffer of `recv_buffer`
/// bytes, so the kernel holds little for a client that stops reading.
pub async fn handshake_small_buffer(addr: SocketAddr, url: &str, recv_buffer: u32) -> Ws {
    let socket = TcpSocket::new_v4().expect("a socket");
    socket.set_recv_buffer_size(recv_buffer).expect("SO_RCVBUF");
    let stream = within(WAIT, socket.connect(addr))
        .await
        .expect("tcp connect");
    let request = url.into_client_request().expect("a valid ws url");
    let (ws, response) = within(
        WAIT,
        tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(stream)),
    )
    .await
    .expect("websocket handshake");
    assert_eq!(response.status(), 101);
    ws
}

/// The next text frame or the close of `ws`, however long it takes.
pub async fn read_event(ws: &mut (impl futures_util::Stream<Item = WsResult> + Unpin)) -> Event {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => {
                let value = serde_json::from_str(text.as_str())
                    .unwrap_or_else(|e| panic!("server sent non-JSON {text:?}: {e}"));
                return Event::Frame(value);
            }
            Some(Ok(Message::Binary(bytes))) => {
                panic!("the server sends text frames only, got binary {bytes:?}")
            }
            Some(Ok(Message::Close(frame))) => {
                return Event::Closed(
                    frame.map(|f| (u16::from(f.code), f.reason.as_str().to_owned())),
                )
            }
            Some(Ok(_)) => {} // protocol pings and pongs
            Some(Err(_)) | None => return Event::Closed(None),
        }
    }
}

type WsResult = Result<Message, tokio_tungstenite::tungstenite::Error>;

impl Client {
    /// Completes the WebSocket handshake (nothing read yet).
    pub async fn open(url: &str) -> Self {
        let request = url.into_client_request().expect("a valid ws url");
        Self::open_request(request).await
    }

    /// Completes the handshake of a hand-made request (extra headers).
    pub async fn open_request(request: Request) -> Self {
        Self::from_ws(handshake(request).await)
    }

    /// Starts reading `ws` all the time.
    pub fn from_ws(ws: Ws) -> Self {
        let (sink, mut stream) = ws.split();
        let (tx, events) = mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            loop {
                let event = read_event(&mut stream).await;
                let closed = matches!(event, Event::Closed(_));
                if tx.send(event).is_err() {
                    return;
                }
                if closed {
                    // Reading on sends tungstenite's close reply and sees
                    // the server end the connection.
                    while stream.next().await.is_some() {}
                    return;
                }
            }
        });
        Self {
            sink,
            events,
            reader,
            sid: String::new(),
        }
    }

    /// Reads the `welcome` and remembers the sid.
    pub async fn welcome(&mut self) -> Value {
        let welcome = self.recv().await;
        assert_eq!(welcome["type"], "welcome", "first frame: {welcome}");
        self.sid = welcome["sid"]
            .as_str()
            .expect("welcome.sid is a string")
            .to_owned();
        welcome
    }

    /// Sends one frame.
    pub async fn send(&mut self, frame: Value) {
        self.send_text(&frame.to_string()).await;
    }

    /// Sends one text message as is.
    pub async fn send_text(&mut self, text: &str) {
        within(WAIT, self.sink.send(Message::text(text)))
            .await
            .expect("send");
    }

    /// Queues one frame without flushing (see [`Client::flush`]): frames
    /// fed together reach the server in one write.
    pub async fn feed(&mut self, frame: Value) {
        within(WAIT, self.sink.feed(Message::text(frame.to_string())))
            .await
            .expect("feed");
    }

    /// Writes what [`Client::feed`] queued.
    pub async fn flush(&mut self) {
        within(WAIT, self.sink.flush()).await.expect("flush");
    }

    /// The next text frame or the close, within `limit`.
    pub async fn next_event_within(&mut self, limit: Duration) -> Event {
        within(limit, self.events.recv())
            .await
            .unwrap_or_else(|| panic!("read past the end of the connection"))
    }

    /// The next text frame or the close.
    pub async fn next_event(&mut self) -> Event {
        self.next_event_within(WAIT).await
    }

    /// The next frame; fails the test if the connection closed instead.
    pub async fn recv(&mut self) -> Value {
        match self.next_event().await {
            Event::Frame(value) => value,
            Event::Closed(close) => panic!("connection closed ({close:?}) while a frame was due"),
        }
    }

    /// The next frame, which must be of type `ty`.
    pub async fn recv_type(&mut self, ty: &str) -> Value {
        let frame = self.recv().await;
        assert_eq!(frame["type"], ty, "expected a `{ty}` frame, got {frame}");
        frame
    }

    /// Joins `room` (asking for presence events or not) and returns the `joined`.
    pub async fn join(&mut self, room: &str, presence: bool) -> Value {
        self.send(serde_json::json!({"type": "join", "room": room, "presence": presence}))
            .await;
        let joined = self.recv_type("joined").await;
        assert_eq!(joined["room"], room);
        joined
    }

    /// Sends `frame` with `id` and returns every frame up to and including
    /// the `ack` or `error` that carries that id.
    pub async fn request(&mut self, mut frame: Value, id: Value) -> Vec<Value> {
        frame["id"] = id.clone();
        self.send(frame).await;
        let mut frames = Vec::new();
        loop {
            let next = self.recv().await;
            let done = (next["type"] == "ack" || next["type"] == "error") && next["id"] == id;
            frames.push(next);
            if done {
                return frames;
            }
        }
    }

    /// Proves nothing is queued for this session: a `ping` with an id must be
    /// answered by `pong` and `ack` with nothing before them. Everything
    /// another session caused before this call was already queued here
    /// (the runtime queues a frame's effects before its ack).
    pub async fn expect_nothing_queued(&mut self) {
        let frames = self
            .request(serde_json::json!({"type": "ping"}), Value::from("sync"))
            .await;
        assert_eq!(
            frames,
            vec![
                serde_json::json!({"type": "pong"}),
                serde_json::json!({"type": "ack", "id": "sync"}),
            ],
            "something was queued for this session"
        );
    }

    /// The server's `close` frame with `code` and `reason`, then the
    /// WebSocket close with the same code.
    pub async fn expect_close(&mut self, code: u16, reason: &str) {
        let frame = self.recv().await;
        assert_eq!(
            frame,
            serde_json::json!({"type": "close", "code": code, "reason": reason}),
        );
        self.expect_ws_close(code).await;
    }

    /// The WebSocket close frame, with `code`.
    pub async fn expect_ws_close(&mut self, code: u16) {
        match self.next_event().await {
            Event::Closed(Some((got, _))) => assert_eq!(got, code, "close code"),
            other => panic!("expected a close with {code}, got {other:?}"),
        }
    }

    /// Closes from the client side (1000) and reads until the server's
    /// close reply.
    pub async fn close(&mut self) {
        within(WAIT, self.sink.close()).await.expect("send close");
        while !matches!(self.next_event().await, Event::Closed(_)) {}
    }
}

/// An HTTP response: status, lowercase header lines, body.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8(self.body.clone()).expect("a UTF-8 body")
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`): small
/// enough to read in full, and no client library to trust.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    within(WAIT, async {
        let mut stream = TcpStream::connect(addr).await.expect("tcp connect");
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        let mut request = head.into_bytes();
        request.extend_from_slice(body);
        stream.write_all(&request).await.expect("write request");
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.expect("read response");
        parse_response(&raw)
    })
    .await
}

fn parse_response(raw: &[u8]) -> HttpResponse {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(raw)));
    let head = std::str::from_utf8(&raw[..split]).expect("ASCII headers");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("a status line");
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    if chunked {
        body = dechunk(&body);
    }
    HttpResponse {
        status,
        headers,
        body,
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("a chunk size line");
        let size_text = std::str::from_utf8(&data[..line_end]).expect("ASCII chunk size");
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .expect("a hex chunk size");
        data = &data[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}
