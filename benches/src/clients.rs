//! Subscribers over each transport, for the load generator: one room, every
//! server frame handed out as JSON text, whichever transport carries it.

use std::net::{IpAddr, SocketAddr};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
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
    /// Over SSE, read straight from the socket (see [`SseReader`]).
    Sse(SseReader),
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
            Transport::Sse => Self::Sse(
                SseReader::open(stream, &host, &format!("/sse?rooms={room}&token={user}")).await?,
            ),
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
            Self::Sse(reader) => reader.next_data().await,
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

/// An SSE stream read from the socket with no HTTP client between: the
/// response head, then the chunked body decoded in place. A hyper client
/// hands every chunk to the body through a channel and another task, which
/// at 1,000 streams costs the load generator (on the server's cores) about
/// three times the CPU of a WebSocket subscriber, and so skews what is
/// measured of the server.
pub struct SseReader {
    stream: TcpStream,
    /// Bytes read but not yet decoded from the chunked encoding.
    raw: BytesMut,
    /// Decoded body not yet split into events.
    body: BytesMut,
    /// How far `body` was searched for the end of an event.
    searched: usize,
    /// Bytes of the current chunk (its data and closing CRLF) still to come.
    chunk_left: usize,
}

impl SseReader {
    async fn open(mut stream: TcpStream, host: &str, path: &str) -> Result<Self, BoxError> {
        use tokio::io::AsyncWriteExt;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut reader = Self {
            stream,
            raw: BytesMut::with_capacity(4096),
            body: BytesMut::with_capacity(4096),
            searched: 0,
            chunk_left: 0,
        };
        let head_end = loop {
            if let Some(at) = find(&reader.raw, b"\r\n\r\n") {
                break at + 4;
            }
            if !reader.read_more().await? {
                return Err("sse: connection closed in the response head".into());
            }
        };
        let head = reader.raw.split_to(head_end);
        let head = std::str::from_utf8(&head)?.to_ascii_lowercase();
        if !head.starts_with("http/1.1 200") {
            return Err(format!("sse answered {}", head.lines().next().unwrap_or("")).into());
        }
        if !head.contains("transfer-encoding: chunked") {
            return Err("sse: expected a chunked body".into());
        }
        Ok(reader)
    }

    async fn read_more(&mut self) -> Result<bool, BoxError> {
        use tokio::io::AsyncReadExt;
        Ok(self.stream.read_buf(&mut self.raw).await? > 0)
    }

    /// Moves what `raw` holds of the chunked body into `body`; false at the
    /// body's end or on a malformed chunk.
    fn decode(&mut self) -> bool {
        loop {
            if self.chunk_left == 0 {
                let Some(line_end) = find(&self.raw, b"\r\n") else {
                    return true;
                };
                let size = std::str::from_utf8(&self.raw[..line_end])
                    .ok()
                    .and_then(|l| usize::from_str_radix(l.split(';').next()?.trim(), 16).ok());
                self.raw.advance(line_end + 2);
                match size {
                    Some(0) | None => return false,
                    Some(size) => self.chunk_left = size + 2,
                }
            }
            if self.raw.is_empty() {
                return true;
            }
            let take = self.chunk_left.min(self.raw.len());
            // The last 2 bytes of a chunk are its CRLF, not data.
            let data = take.min(self.chunk_left.saturating_sub(2));
            self.body.extend_from_slice(&self.raw[..data]);
            self.raw.advance(take);
            self.chunk_left -= take;
        }
    }

    /// The `data:` of the next event that has one.
    async fn next_data(&mut self) -> Option<String> {
        loop {
            while let Some(at) = find(&self.body[self.searched..], b"\n\n") {
                let event = self.body.split_to(self.searched + at + 2);
                self.searched = 0;
                let text = std::str::from_utf8(&event).ok()?;
                if let Some(data) = text.lines().find_map(|l| l.strip_prefix("data: ")) {
                    return Some(data.to_owned());
                }
                // a comment (keepalive) or retry line
            }
            // Keep one byte: a "\n\n" may straddle two reads.
            self.searched = self.body.len().saturating_sub(1);
            let before = self.body.len();
            if !self.decode() {
                return None;
            }
            // Read only when what was already read holds no more body.
            if self.body.len() == before && !self.read_more().await.ok()? {
                return None;
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(haystack, needle)
}
