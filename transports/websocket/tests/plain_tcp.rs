//! `switchboard_websocket::serve` on a plain TCP listener, no framework, with
//! real WebSocket clients (tokio-tungstenite) over 127.0.0.1.
//!
//! Every test binds 127.0.0.1:0 with `switchboard_websocket::bind`, bounds
//! each of its waits, and shuts its Switchboard down (which ends `serve`).

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use switchboard_core::Config;
use switchboard_runtime::Switchboard;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The longest any single wait may take (real time); a healthy run takes
/// milliseconds.
const WAIT: Duration = Duration::from_secs(10);

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

async fn within<F: std::future::Future>(future: F) -> F::Output {
    match tokio::time::timeout(WAIT, future).await {
        Ok(output) => output,
        Err(_) => panic!("timed out after {WAIT:?}"),
    }
}

/// `serve` running on 127.0.0.1:0; aborted on drop if a test fails early.
struct Server {
    addr: SocketAddr,
    switchboard: Switchboard,
    serve: Option<JoinHandle<()>>,
}

impl Server {
    async fn start(config: Config) -> Self {
        let switchboard = Switchboard::builder()
            .config(config)
            .build()
            .expect("a valid config");
        let listener = switchboard_websocket::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .expect("bind 127.0.0.1:0");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let serve = tokio::spawn(switchboard_websocket::serve(listener, switchboard.clone()));
        Self {
            addr,
            switchboard,
            serve: Some(serve),
        }
    }

    /// Shuts down and checks that `serve` returned.
    async fn stop(mut self) {
        within(self.switchboard.shutdown()).await;
        if let Some(serve) = self.serve.take() {
            within(serve).await.expect("serve ended");
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(serve) = self.serve.take() {
            serve.abort();
        }
    }
}

async fn connect(addr: SocketAddr, path: &str) -> Ws {
    let (ws, response) = within(tokio_tungstenite::connect_async(format!(
        "ws://{addr}{path}"
    )))
    .await
    .expect("websocket handshake");
    assert_eq!(response.status(), 101);
    ws
}

async fn send(ws: &mut Ws, frame: Value) {
    within(ws.send(Message::text(frame.to_string())))
        .await
        .expect("send");
}

/// The next text frame as JSON; fails if the connection closes instead.
async fn recv(ws: &mut Ws) -> Value {
    loop {
        match within(ws.next()).await {
            Some(Ok(Message::Text(text))) => {
                return serde_json::from_str(text.as_str()).expect("JSON frames")
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("a frame was due, got {other:?}"),
        }
    }
}

/// The `close` frame, then the WebSocket close with the same code; then reads
/// on, which sends the close reply, until the server ends the connection.
async fn expect_close(ws: &mut Ws, code: u16, reason: &str) {
    assert_eq!(
        recv(ws).await,
        json!({"type": "close", "code": code, "reason": reason})
    );
    match within(ws.next()).await {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), code),
        other => panic!("expected a close with {code}, got {other:?}"),
    }
    within(async { while ws.next().await.is_some() {} }).await;
}

/// Closes from the client side and reads until the server ends the connection.
async fn close(ws: &mut Ws) {
    within(ws.close(None)).await.expect("send close");
    within(async { while ws.next().await.is_some() {} }).await;
}

/// One raw HTTP/1.1 request; the status code and the head of the answer.
async fn raw_http(addr: SocketAddr, request: &str) -> (u16, String) {
    within(async {
        let mut stream = TcpStream::connect(addr).await.expect("tcp connect");
        stream
            .write_all(request.as_bytes())
            .await
            .expect("write request");
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.expect("read response");
        let text = String::from_utf8_lossy(&raw).into_owned();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status in {text:?}"));
        (status, text.to_ascii_lowercase())
    })
    .await
}

#[tokio::test]
async fn serve_speaks_the_protocol_on_any_path() {
    let server = Server::start(Config::default()).await;
    let mut alice = connect(server.addr, "/?token=alice").await;
    let welcome = recv(&mut alice).await;
    assert_eq!(welcome["type"], "welcome");
    assert_eq!(welcome["user"], "alice");
    let mut bob = connect(server.addr, "/some/other/path?token=bob").await;
    assert_eq!(recv(&mut bob).await["type"], "welcome");

    for ws in [&mut alice, &mut bob] {
        send(
            ws,
            json!({"type": "join", "room": "lobby", "presence": false}),
        )
        .await;
        assert_eq!(recv(ws).await["type"], "joined");
    }
    send(
        &mut alice,
        json!({"type": "publish", "room": "lobby", "data": {"hello": "tcp"}, "id": 1}),
    )
    .await;
    let echo = recv(&mut alice).await;
    assert_eq!(echo["type"], "message");
    assert_eq!(echo["data"], json!({"hello": "tcp"}));
    assert_eq!(recv(&mut alice).await, json!({"type": "ack", "id": 1}));
    assert_eq!(recv(&mut bob).await, echo);

    close(&mut alice).await;
    close(&mut bob).await;
    server.stop().await;
}

#[tokio::test]
async fn serve_answers_requests_that_are_not_websocket_upgrades() {
    let server = Server::start(Config::default()).await;
    let addr = server.addr;

    let (status, _) = raw_http(
        addr,
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 400);

    let (status, head) = raw_http(
        addr,
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, close\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await;
    assert_eq!(status, 426);
    assert!(head.contains("sec-websocket-version: 13"), "{head}");

    let (status, _) = raw_http(
        addr,
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, close\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n",
    )
    .await;
    assert_eq!(status, 400, "no Sec-WebSocket-Key");
    assert_eq!(server.switchboard.metrics().sessions_opened, 0);

    server.stop().await;
}

#[tokio::test]
async fn serve_closes_an_oversize_frame_with_1009() {
    let mut config = Config::default();
    config.max_frame_bytes = 256;
    let server = Server::start(config).await;
    // Several connections: the close must not depend on task scheduling.
    for _ in 0..8 {
        let mut ws = connect(server.addr, "/").await;
        assert_eq!(recv(&mut ws).await["type"], "welcome");
        let data = "d".repeat(300);
        send(
            &mut ws,
            json!({"type": "publish", "room": "a", "data": data}),
        )
        .await;
        expect_close(&mut ws, 1009, "frame_too_large").await;
    }
    server.stop().await;
}

#[tokio::test]
async fn serve_refuses_past_max_sessions_with_1013() {
    let mut config = Config::default();
    config.max_sessions = 1;
    let server = Server::start(config).await;
    let mut alice = connect(server.addr, "/").await;
    assert_eq!(recv(&mut alice).await["type"], "welcome");

    let mut bob = connect(server.addr, "/").await;
    let refusal = recv(&mut bob).await;
    assert_eq!(refusal["type"], "error");
    assert_eq!(refusal["code"], "server_full");
    expect_close(&mut bob, 1013, "server_full").await;

    close(&mut alice).await;
    server.stop().await;
}

#[tokio::test]
async fn shutdown_closes_sessions_with_1001_and_ends_serve() {
    let server = Server::start(Config::default()).await;
    let addr = server.addr;
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut ws = connect(addr, "/").await;
        assert_eq!(recv(&mut ws).await["type"], "welcome");
        clients.push(ws);
    }
    // Shutdown waits for connections to finish their closing handshake,
    // which the clients complete while it runs.
    let sb = server.switchboard.clone();
    let shutdown = tokio::spawn(async move { sb.shutdown().await });
    for ws in &mut clients {
        expect_close(ws, 1001, "going_away").await;
    }
    within(shutdown).await.expect("shutdown ran");
    assert_eq!(server.switchboard.metrics().sessions, 0);
    server.stop().await;
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "serve returned and dropped the listener"
    );
}

#[tokio::test]
async fn bind_gives_accepted_sockets_nodelay() {
    // Frames are written as they are queued; with Nagle's algorithm a small
    // frame that follows another waits for the client's (delayed) ACK.
    // Listeners that frameworks accept from (warp's `incoming`) pass the
    // option on to every connection.
    let listener = switchboard_websocket::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("an address");
    let (accepted, _client) = within(async {
        tokio::join!(
            async { listener.accept().await.expect("accept").0 },
            async { TcpStream::connect(addr).await.expect("connect") },
        )
    })
    .await;
    assert!(accepted.nodelay().expect("read TCP_NODELAY"));
}

/// One client frame as raw bytes: `head` is the first byte (FIN, RSV, opcode);
/// masked with a fixed key unless `masked` is false.
fn raw_frame(head: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
    let mut frame = vec![head];
    let mask_bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        len @ 0..=125 => frame.push(mask_bit | len as u8),
        len => {
            frame.push(mask_bit | 126);
            frame.extend_from_slice(&u16::try_from(len).expect("short test frames").to_be_bytes());
        }
    }
    if masked {
        frame.extend_from_slice(&KEY);
        frame.extend(payload.iter().zip(KEY.iter().cycle()).map(|(b, k)| b ^ k));
    } else {
        frame.extend_from_slice(payload);
    }
    frame
}

/// Writes bytes on the client's socket as they are, past tungstenite's checks.
async fn send_raw(ws: &mut Ws, bytes: &[u8]) {
    let MaybeTlsStream::Plain(stream) = ws.get_mut() else {
        panic!("a plain TCP connection");
    };
    within(stream.write_all(bytes)).await.expect("raw write");
}

#[tokio::test]
async fn serve_closes_framing_violations_with_1002_and_invalid_utf8_with_1007() {
    let ping = br#"{"type":"ping"}"#;
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "unmasked frame",
            raw_frame(0x81, ping, false),
            1002,
            "protocol_error",
        ),
        (
            "reserved bit",
            raw_frame(0xC1, ping, true),
            1002,
            "protocol_error",
        ),
        (
            "unknown data opcode",
            raw_frame(0x83, ping, true),
            1002,
            "protocol_error",
        ),
        (
            "unknown control opcode",
            raw_frame(0x8B, b"", true),
            1002,
            "protocol_error",
        ),
        (
            "continuation with nothing to continue",
            raw_frame(0x80, ping, true),
            1002,
            "protocol_error",
        ),
        (
            "new message inside a fragmented one",
            [raw_frame(0x01, b"{", true), raw_frame(0x81, ping, true)].concat(),
            1002,
            "protocol_error",
        ),
        (
            "fragmented ping",
            raw_frame(0x09, b"x", true),
            1002,
            "protocol_error",
        ),
        (
            "ping over 125 bytes",
            raw_frame(0x89, &[b'p'; 126], true),
            1002,
            "protocol_error",
        ),
        (
            "close with a 1-byte payload",
            raw_frame(0x88, &[3], true),
            1002,
            "protocol_error",
        ),
        (
            "invalid UTF-8 text",
            raw_frame(0x81, b"{\"a\":\"\xff\"}", true),
            1007,
            "invalid_utf8",
        ),
        (
            "invalid UTF-8 across fragments",
            // The first fragment ends inside a valid 2-byte sequence; the
            // second does not complete it.
            [
                raw_frame(0x01, b"{\"a\":\"\xce", true),
                raw_frame(0x80, b"\xff\"}", true),
            ]
            .concat(),
            1007,
            "invalid_utf8",
        ),
        (
            // Failed at the first fragment, while the message is unfinished.
            "invalid UTF-8 in a first fragment",
            raw_frame(0x01, b"{\"a\":\"\xff", true),
            1007,
            "invalid_utf8",
        ),
        (
            "close reason not UTF-8",
            raw_frame(0x88, b"\x03\xe8\xff", true),
            1007,
            "invalid_utf8",
        ),
    ];
    let server = Server::start(Config::default()).await;
    for (what, bytes, code, reason) in &cases {
        let mut ws = connect(server.addr, "/").await;
        assert_eq!(recv(&mut ws).await["type"], "welcome", "{what}");
        send_raw(&mut ws, bytes).await;
        expect_close(&mut ws, *code, reason).await;
    }
    let closes = server.switchboard.metrics().closes;
    let count = |reason: &str| {
        closes
            .iter()
            .find(|(r, _)| r.as_str() == reason)
            .map_or(0, |(_, n)| *n)
    };
    assert_eq!(count("protocol_error"), 9);
    assert_eq!(count("invalid_utf8"), 4);
    server.stop().await;
}

#[tokio::test]
async fn serve_answers_a_close_code_no_endpoint_may_send_with_1002() {
    let server = Server::start(Config::default()).await;
    for code in [0u16, 999, 1004, 1005, 1006, 1014, 1015, 1016, 2999, 5000] {
        let mut ws = connect(server.addr, "/").await;
        assert_eq!(recv(&mut ws).await["type"], "welcome");
        send_raw(&mut ws, &raw_frame(0x88, &code.to_be_bytes(), true)).await;
        // The client closed first: the reply is the close, no `close` frame.
        match within(ws.next()).await {
            Some(Ok(Message::Close(Some(frame)))) => {
                assert_eq!(u16::from(frame.code), 1002, "after close code {code}");
            }
            other => panic!("expected a close with 1002 after code {code}, got {other:?}"),
        }
        within(async { while ws.next().await.is_some() {} }).await;
    }
    server.stop().await;
}
