//! Subscribers over each transport, for the load generator: one room, every
//! server frame handed out as JSON text, whichever transport carries it.

use std::net::{IpAddr, SocketAddr};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{client_async_with_config, MaybeTlsStream, WebSocketStream};

/// Errors of the load generator's clients.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Which transport a subscriber uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// `GET /ws`, upgraded.
    WebSocket,
    /// `GET /sse?rooms=…`.
    Sse,
    /// `POST /poll/open`, then `GET /poll` in a loop.
    LongPoll,
}

impl std::str::FromStr for Transport {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ws" | "websocket" => Ok(Self::WebSocket),
            "sse" => Ok(Self::Sse),
            "longpoll" | "poll" => Ok(Self::LongPoll),
            other => Err(format!("unknown transport `{other}` (ws, sse, longpoll)")),
        }
    }
}

/// A subscriber joined to one room.
pub enum Subscriber {
    /// Over WebSocket.
    WebSocket(WebSocketStream<MaybeTlsStream<TcpStream>>),
    /// Over SSE: the event stream and what is buffered of it.
    Sse {
        /// The response body.
        body: Incoming,
        /// Bytes received but not yet split into events.
        buffer: BytesMut,
        /// Keeps the HTTP connection task's handle alive.
        _sender: SendRequest<Empty<Bytes>>,
    },
    /// Over long-poll: the connection, the sid, and frames of the last answer.
    LongPoll {
        /// Requests on one kept-alive connection.
        sender: SendRequest<Full<Bytes>>,
        /// Host header value.
        host: String,
        /// The session.
        sid: String,
        /// The user (token).
        user: String,
        /// Frames of the last answer not handed out yet.
        pending: std::collections::VecDeque<String>,
        /// Frames in the last answer, acknowledged with the next poll.
        ack: usize,
    },
}

async fn tcp(target: SocketAddr, source: IpAddr) -> Result<TcpStream, BoxError> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    let stream = socket.connect(target).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

impl Subscriber {
    /// Connects to `target` (the server's address) from `source` as `user`
    /// and joins `room`; returns once the join is confirmed.
    ///
    /// # Errors
    /// When the server cannot be reached or refuses.
    pub async fn connect(
        transport: Transport,
        target: SocketAddr,
        source: IpAddr,
        user: &str,
        room: &str,
    ) -> Result<Self, BoxError> {
        let host = target.to_string();
        let stream = tcp(target, source).await?;
        let mut subscriber = match transport {
            Transport::WebSocket => {
                let url = format!("ws://{host}/ws?token={user}");
                let config = WebSocketConfig::default()
                    .read_buffer_size(4096)
                    .write_buffer_size(0);
                let (mut ws, _) =
                    client_async_with_config(url, MaybeTlsStream::Plain(stream), Some(config))
                        .await?;
                ws.send(Message::text(format!(
                    r#"{{"type":"join","room":"{room}"}}"#
                )))
                .await?;
                Self::WebSocket(ws)
            }
            Transport::Sse => {
                let (mut sender, connection) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
                tokio::spawn(connection);
                let request = http::Request::get(format!("/sse?rooms={room}&token={user}"))
                    .header("host", &host)
                    .body(Empty::new())?;
                let response = sender.send_request(request).await?;
                if !response.status().is_success() {
                    return Err(format!("sse answered {}", response.status()).into());
                }
                Self::Sse {
                    body: response.into_body(),
                    buffer: BytesMut::new(),
                    _sender: sender,
                }
            }
            Transport::LongPoll => {
                let (mut sender, connection) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
                tokio::spawn(connection);
                let open = post(
                    &mut sender,
                    &host,
                    &format!("/poll/open?token={user}"),
                    Bytes::new(),
                )
                .await?;
                let frames: Vec<serde_json::Value> = serde_json::from_slice(&open)?;
                let sid = frames
                    .first()
                    .and_then(|w| w["sid"].as_str())
                    .ok_or("no welcome")?
                    .to_owned();
                let join = format!(r#"{{"type":"join","room":"{room}"}}"#);
                post(
                    &mut sender,
                    &host,
                    &format!("/poll/send?sid={sid}&token={user}"),
                    Bytes::from(join),
                )
                .await?;
                Self::LongPoll {
                    sender,
                    host,
                    sid,
                    user: user.to_owned(),
                    pending: frames.iter().map(ToString::to_string).collect(),
                    ack: frames.len(),
                }
            }
        };
        while let Some(frame) = subscriber.next_frame().await {
            if frame.contains(r#""type":"joined""#) {
                return Ok(subscriber);
            }
            if frame.contains(r#""type":"error""#) || frame.contains(r#""type":"close""#) {
                return Err(format!("server said {frame}").into());
            }
        }
        Err("connection closed before joined".into())
    }

    /// The next server frame, as JSON text; `None` when the connection ended.
    pub async fn next_frame(&mut self) -> Option<String> {
        match self {
            Self::WebSocket(ws) => loop {
                match ws.next().await? {
                    Ok(Message::Text(text)) => {
                        if text.as_str().contains(r#""type":"ping""#) {
                            let _ = ws.send(Message::text(r#"{"type":"pong"}"#)).await;
                        }
                        return Some(text.as_str().to_owned());
                    }
                    Ok(_) => {}
                    Err(_) => return None,
                }
            },
            Self::Sse { body, buffer, .. } => loop {
                if let Some(at) = find(buffer, b"\n\n") {
                    let event = buffer.split_to(at + 2);
                    let text = std::str::from_utf8(&event).ok()?;
                    if let Some(data) = text.lines().find_map(|l| l.strip_prefix("data: ")) {
                        return Some(data.to_owned());
                    }
                    continue; // a comment (keepalive) or retry line
                }
                let frame = body.frame().await?.ok()?;
                if let Ok(mut data) = frame.into_data() {
                    buffer.extend_from_slice(&data.copy_to_bytes(data.remaining()));
                }
            },
            Self::LongPoll {
                sender,
                host,
                sid,
                user,
                pending,
                ack,
            } => loop {
                if let Some(frame) = pending.pop_front() {
                    return Some(frame);
                }
                let request = http::Request::get(format!("/poll?sid={sid}&ack={ack}&token={user}"))
                    .header("host", host.as_str())
                    .body(Full::new(Bytes::new()))
                    .ok()?;
                *ack = 0;
                let response = sender.send_request(request).await.ok()?;
                if !response.status().is_success() {
                    return None;
                }
                let body = response.into_body().collect().await.ok()?.to_bytes();
                let frames: Vec<&serde_json::value::RawValue> =
                    serde_json::from_slice(&body).ok()?;
                *ack = frames.len();
                pending.extend(frames.iter().map(|f| f.get().to_owned()));
            },
        }
    }
}

async fn post(
    sender: &mut SendRequest<Full<Bytes>>,
    host: &str,
    path: &str,
    body: Bytes,
) -> Result<Bytes, BoxError> {
    let request = http::Request::post(path)
        .header("host", host)
        .header("content-type", "application/json")
        .body(Full::new(body))?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        return Err(format!(
            "{path} answered {status}: {}",
            String::from_utf8_lossy(&body)
        )
        .into());
    }
    Ok(body)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
