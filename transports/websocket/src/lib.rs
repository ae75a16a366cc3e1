//! Switchboard over raw WebSocket, on tokio-tungstenite.
//!
//! One upgrade path serves every framework: [`upgrade`] takes any
//! `http::Request` that a hyper-based server produced (warp, axum, salvo,
//! plain hyper), checks the handshake headers, admits the client (origin,
//! authentication), answers `101 Switching Protocols` and runs the session on
//! the upgraded connection in a task. [`serve`] does the same on a plain TCP
//! listener with no framework at all.
//!
//! Limits follow PROTOCOL.md: a client frame over `max_frame_bytes` is refused
//! by tungstenite's own limits before it is buffered and the connection closes
//! with 1009; a full server closes with 1013; a refused origin or credential
//! with 1008 after an `error` frame saying why. tungstenite's default buffers
//! (128 KiB each way) would cost a quarter of a megabyte per idle connection;
//! [`websocket_config`] sizes them for many idle connections.
//!
//! A client that breaks the framing of RFC 6455 is closed with a close frame,
//! never a bare TCP drop: 1007 for a text message (or close reason) that is
//! not UTF-8, 1002 for any other violation (unmasked frame, reserved bits,
//! unknown opcode, bad continuation, fragmented or oversize control frame,
//! malformed close frame). The Autobahn|Testsuite cases check this framing
//! (`tests/autobahn.rs`, through the test-only `echo` feature).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::FusedStream;
use futures_util::{SinkExt, StreamExt};
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use switchboard_core::codec::encode_refusal;
use switchboard_core::{CloseReason, Identity, Liveness};
use switchboard_runtime::{Drained, OutFrame, Refusal, Session, Switchboard};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

/// Bytes tungstenite reads at once. Client frames are small; larger ones grow
/// the buffer on demand up to `max_frame_bytes`. 128 KiB (the default) per
/// idle connection is what this avoids.
pub const READ_BUFFER_BYTES: usize = 512;

/// The accept backlog of [`bind`]: the default 128 overflows when hundreds of
/// clients reconnect at once after a restart.
pub const LISTEN_BACKLOG: u32 = 4096;

/// tungstenite's limits for a Switchboard: messages and frames capped at
/// `max_frame_bytes`, small read buffer, and a write buffer that lets a whole
/// batch of queued frames go out in one write.
#[must_use]
pub fn websocket_config(switchboard: &Switchboard) -> WebSocketConfig {
    framing_config(
        switchboard.config().max_frame_bytes,
        switchboard.runtime_config().max_outbound_bytes,
    )
}

fn framing_config(max_frame: usize, max_outbound: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        // Frames are fed in a batch and flushed once: nothing is written
        // before the flush unless a batch passes this size.
        .write_buffer_size(64 * 1024)
        .max_write_buffer_size(max_outbound.max(64 * 1024) * 2)
        .max_message_size(Some(max_frame))
        .max_frame_size(Some(max_frame))
}

/// Whether a request asks for a WebSocket upgrade.
#[must_use]
pub fn is_upgrade_request<B>(request: &Request<B>) -> bool {
    asks_for_upgrade(request.method(), request.headers())
}

fn asks_for_upgrade(method: &http::Method, headers: &http::HeaderMap) -> bool {
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    method == http::Method::GET
        && has_token(header::CONNECTION, "upgrade")
        && has_token(header::UPGRADE, "websocket")
}

/// Completes a WebSocket handshake on any hyper-served request and runs the
/// session on the upgraded connection.
///
/// The request must come from a hyper server with upgrades enabled (warp,
/// axum and `hyper::server::conn::http1` with `.with_upgrades()` all qualify):
/// without hyper's upgrade handle in its extensions it answers 500. A refused
/// client still gets the upgrade, then an `error` frame and a close with 1008
/// (or 1013 when full), which a browser can read; an HTTP status it could not.
pub async fn upgrade<B>(
    switchboard: &Switchboard,
    mut request: Request<B>,
) -> Response<Empty<Bytes>> {
    let on_upgrade = request.extensions_mut().remove::<OnUpgrade>();
    let (parts, _body) = request.into_parts();
    let accepted = match handshake(switchboard, &parts).await {
        Ok(accepted) => accepted,
        Err(response) => return response,
    };
    let Some(on_upgrade) = on_upgrade else {
        tracing::warn!(
            "a WebSocket request without hyper's upgrade handle: serve with upgrades on"
        );
        return status(StatusCode::INTERNAL_SERVER_ERROR);
    };
    let response = accepted.response();
    switchboard.tasks().spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => accepted.run(TokioIo::new(upgraded)).await,
            Err(e) => tracing::debug!(error = %e, "websocket upgrade failed"),
        }
    });
    response
}

/// Checks a WebSocket handshake request (RFC 6455 §4.2.1) and admits the
/// client (origin, credentials), for servers that hand over the upgraded
/// connection themselves rather than through hyper's upgrade handle (the
/// actix-web adapter). Answer with [`Accepted::response`], then run the
/// session on the raw connection with [`Accepted::run`].
///
/// # Errors
/// The response for a request that is no valid handshake: 400, or 426 with
/// `Sec-WebSocket-Version: 13` for another protocol version.
#[allow(clippy::result_large_err)] // the error is the finished answer
pub async fn handshake(
    switchboard: &Switchboard,
    parts: &http::request::Parts,
) -> Result<Accepted, Response<Empty<Bytes>>> {
    Ok(Accepted {
        accept: accept_key(parts)?,
        admitted: switchboard.admit(parts).await,
        switchboard: switchboard.clone(),
    })
}

/// The `Sec-WebSocket-Accept` answering a valid handshake request, or the
/// error response to a request that is none.
#[allow(clippy::result_large_err)] // the error is the finished answer
fn accept_key(parts: &http::request::Parts) -> Result<HeaderValue, Response<Empty<Bytes>>> {
    if !asks_for_upgrade(&parts.method, &parts.headers) {
        return Err(status(StatusCode::BAD_REQUEST));
    }
    if parts
        .headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(HeaderValue::as_bytes)
        != Some(b"13")
    {
        let mut response = status(StatusCode::UPGRADE_REQUIRED);
        response.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return Err(response);
    }
    let Some(key) = parts.headers.get(header::SEC_WEBSOCKET_KEY) else {
        return Err(status(StatusCode::BAD_REQUEST));
    };
    HeaderValue::from_str(&derive_accept_key(key.as_bytes()))
        .map_err(|_| status(StatusCode::BAD_REQUEST))
}

/// `101 Switching Protocols` with `accept` as `Sec-WebSocket-Accept`.
fn switching_protocols(accept: HeaderValue) -> Response<Empty<Bytes>> {
    let mut response = status(StatusCode::SWITCHING_PROTOCOLS);
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    response
}

/// A checked WebSocket handshake (see [`handshake`]): the client is admitted
/// or will be told why not over the WebSocket itself.
pub struct Accepted {
    accept: HeaderValue,
    admitted: Result<Identity, Refusal>,
    switchboard: Switchboard,
}

impl std::fmt::Debug for Accepted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accepted")
            .field("admitted", &self.admitted.is_ok())
            .finish_non_exhaustive()
    }
}

impl Accepted {
    /// The `101 Switching Protocols` answer to send.
    #[must_use]
    pub fn response(&self) -> Response<Empty<Bytes>> {
        switching_protocols(self.accept.clone())
    }

    /// Runs the session on the connection once the 101 has been sent, until
    /// either side ends it.
    pub async fn run<S>(self, io: S)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let config = websocket_config(&self.switchboard);
        let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
        run_connection(&self.switchboard, ws, self.admitted).await;
    }
}

fn status(code: StatusCode) -> Response<Empty<Bytes>> {
    let mut response = Response::new(Empty::new());
    *response.status_mut() = code;
    response
}

/// Runs one admitted (or refused) client over an established WebSocket until
/// either side ends it. Frameworks that hand over a ready `WebSocketStream`
/// can call this directly.
pub async fn run_connection<S>(
    switchboard: &Switchboard,
    mut ws: WebSocketStream<S>,
    admitted: Result<Identity, Refusal>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let session = admitted.and_then(|identity| switchboard.open(identity, Liveness::Client));
    match session {
        Ok(session) => run_session(&session, &mut ws).await,
        Err(refusal) => {
            let [error, close] =
                encode_refusal(refusal.code, &refusal.message, refusal.close_code());
            let timeout = switchboard.runtime_config().write_timeout;
            let queued = tokio::time::timeout(timeout, async {
                ws.feed(text(error)).await?;
                ws.feed(text(close)).await
            })
            .await;
            if matches!(queued, Ok(Ok(()))) {
                let frame = close_frame(refusal.close_code(), refusal.code.as_str());
                close_and_linger(&mut ws, frame, timeout).await;
            }
        }
    }
}

async fn run_session<S>(session: &Session, ws: &mut WebSocketStream<S>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut batch: Vec<Arc<OutFrame>> = Vec::new();
    let write_timeout = session.write_timeout();
    loop {
        let drained = tokio::select! {
            drained = session.outbox().recv(&mut batch) => drained,
            incoming = ws.next() => match Received::from(incoming) {
                // Binary messages are read as text frames (PROTOCOL.md).
                Received::Text(frame) | Received::Binary(frame) => {
                    session.handle_frame(&frame).await;
                    continue;
                }
                Received::Control => continue,
                Received::Closed => {
                    // Send tungstenite's queued close reply, then let the session go.
                    let _ = tokio::time::timeout(write_timeout, ws.flush()).await;
                    return;
                }
                Received::Failed(reason) => {
                    // The core queues `close` with the reason's code. Write
                    // it now rather than on the next turn of the loop:
                    // tokio-tungstenite ends its stream after any error, so
                    // there `ws.next()` is ready at once with `None`, and
                    // whenever select! polled that branch first the
                    // connection was dropped without the close frame.
                    tracing::debug!(sid = %session.sid(), reason = reason.as_str(), "websocket client failed");
                    session.close(reason);
                    session.outbox().recv(&mut batch).await
                }
            },
        };
        let drained = session.outbox().coalesce(&mut batch, drained).await;
        let written =
            tokio::time::timeout(write_timeout, write_batch(session, ws, &mut batch)).await;
        if !matches!(written, Ok(Ok(()))) {
            return; // dead or stalled socket: dropping the session frees it
        }
        if let Drained::Closed(reason) = drained {
            let frame = close_frame(reason.code(), reason.as_str());
            Box::pin(close_and_linger(ws, frame, write_timeout)).await;
            return;
        }
    }
}

/// A client's next WebSocket read, as the session and the echo server both
/// see it.
enum Received {
    /// A whole text message, checked UTF-8.
    Text(Bytes),
    /// A whole binary message.
    Binary(Bytes),
    /// A ping (tungstenite queued its pong) or a pong: nothing to do.
    Control,
    /// The client closed (tungstenite queued the close reply) or the
    /// connection ended; nothing more can be read.
    Closed,
    /// The client broke the framing or a limit: the connection must be closed
    /// with this reason's code, after a close frame.
    Failed(CloseReason),
}

impl From<Option<Result<Message, tungstenite::Error>>> for Received {
    fn from(read: Option<Result<Message, tungstenite::Error>>) -> Self {
        use tungstenite::error::ProtocolError;
        match read {
            Some(Ok(Message::Text(text))) => Self::Text(text.into()),
            Some(Ok(Message::Binary(data))) => Self::Binary(data),
            // Raw frames are only produced when writing, never read.
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => Self::Control,
            // A close with a code no endpoint may send (RFC 6455 §7.4) is
            // answered by tungstenite itself with 1002.
            Some(Ok(Message::Close(_))) | None => Self::Closed,
            // Over max_frame_bytes (a frame, or a message's fragments).
            Some(Err(tungstenite::Error::Capacity(_))) => Self::Failed(CloseReason::FrameTooLarge),
            // A text message, checked fragment by fragment, or a close
            // reason that is not UTF-8 (RFC 6455 §8.1).
            Some(Err(tungstenite::Error::Utf8(_))) => Self::Failed(CloseReason::InvalidUtf8),
            // The peer is gone without a close: nobody would read one.
            Some(Err(tungstenite::Error::Protocol(
                ProtocolError::ResetWithoutClosingHandshake,
            ))) => Self::Closed,
            // Every other violation of the framing (RFC 6455 §5, §7.1.7).
            Some(Err(tungstenite::Error::Protocol(e))) => {
                tracing::debug!(error = %e, "websocket protocol violation");
                Self::Failed(CloseReason::ProtocolError)
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "websocket read failed");
                Self::Closed
            }
        }
    }
}

/// How long a connection that the server closes waits for the client's part
/// of the closing handshake before it is dropped anyway.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// Sends the close frame, then reads (and discards) what the client still
/// sends until its close reply, for at most [`CLOSE_LINGER`]; the caller then
/// drops the connection.
///
/// Dropping a socket while bytes from the client are unread makes the kernel
/// answer with RST instead of FIN, and a client that gets RST throws away what
/// it had not read yet: the `close` frame and the close code that say why.
/// When the server closes, unread bytes are common: the rest of an oversize
/// frame (1009, always), frames pipelined past the error budget (1008), a
/// browser's first `join` racing a refusal, anything sent during shutdown.
async fn close_and_linger<S>(
    ws: &mut WebSocketStream<S>,
    frame: CloseFrame,
    write_timeout: Duration,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if tokio::time::timeout(write_timeout, ws.close(Some(frame)))
        .await
        .is_err()
    {
        return; // stalled: nothing more will reach this client
    }
    let _ = tokio::time::timeout(CLOSE_LINGER, async {
        // The stream ends cleanly at the client's close reply. It ends early
        // on an error, and it already has after an oversize frame: then the
        // rest of a frame is in the way, so half-close and discard bytes
        // until the client closes its side.
        let mut broken = ws.is_terminated();
        while !broken {
            match ws.next().await {
                Some(Ok(_)) => {}
                Some(Err(_)) => broken = true,
                None => return Ok(0),
            }
        }
        let stream = ws.get_mut();
        stream.shutdown().await?;
        tokio::io::copy(stream, &mut tokio::io::sink()).await
    })
    .await;
}

/// Writes a batch of queued frames in one write.
///
/// Server-to-client WebSocket frames are unmasked, so a frame's bytes on the
/// wire are the same for every recipient: each is encoded once
/// ([`OutFrame::wire`]) and the batch is copied into one buffer and written to
/// the socket directly. tungstenite's own buffer is flushed first, so a pong
/// it queued goes out before, never inside, our frames; frames are always
/// whole, so its protocol state is untouched. The buffer lives only as long
/// as the write: an idle connection holds no write memory.
async fn write_batch<S>(
    session: &Session,
    ws: &mut WebSocketStream<S>,
    batch: &mut Vec<Arc<OutFrame>>,
) -> Result<(), tungstenite::Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let wire: Vec<&Bytes> = batch
        .iter()
        .map(|frame| frame.wire(encode_text_frame))
        .collect();
    let mut buffer = Vec::with_capacity(wire.iter().map(|w| w.len()).sum());
    for frame in wire {
        buffer.extend_from_slice(frame);
    }
    batch.clear();
    write_raw(ws, &buffer).await?;
    session.count_written(buffer.len());
    Ok(())
}

/// Writes whole encoded frames straight to the socket, after what tungstenite
/// had queued (a pong, a close reply).
async fn write_raw<S>(ws: &mut WebSocketStream<S>, frames: &[u8]) -> Result<(), tungstenite::Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    ws.flush().await?;
    ws.get_mut().write_all(frames).await?;
    ws.get_mut().flush().await?;
    Ok(())
}

/// The opcode of a text frame (RFC 6455 §5.2).
const OPCODE_TEXT: u8 = 0x1;

/// One unfragmented, unmasked text frame (RFC 6455 §5.2) carrying `payload`.
fn encode_text_frame(payload: &[u8]) -> Bytes {
    encode_frame(OPCODE_TEXT, payload)
}

/// One unfragmented, unmasked data frame of `opcode` carrying `payload`.
fn encode_frame(opcode: u8, payload: &[u8]) -> Bytes {
    let len = payload.len();
    let mut frame = Vec::with_capacity(len + 10);
    frame.push(0x80 | opcode); // FIN
    match len {
        0..=125 => frame.push(len as u8),
        126..=0xFFFF => {
            frame.push(126);
            frame.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            frame.push(127);
            frame.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(payload);
    Bytes::from(frame)
}

fn text(frame: Bytes) -> Message {
    // The core encodes frames with serde_json, which writes UTF-8 only.
    match Utf8Bytes::try_from(frame) {
        Ok(text) => Message::Text(text),
        Err(_) => Message::Binary(Bytes::from_static(b"{}")),
    }
}

fn close_frame(code: u16, reason: &str) -> CloseFrame {
    CloseFrame {
        code: CloseCode::from(code),
        reason: reason.to_owned().into(),
    }
}

#[cfg(feature = "echo")]
pub mod echo;

/// Binds a TCP listener with a large accept backlog ([`LISTEN_BACKLOG`]),
/// whose connections have `TCP_NODELAY` set.
///
/// # Errors
/// When the address cannot be bound.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    // Accepted sockets inherit it. [`serve`] sets it on each connection, but
    // frameworks that accept from this listener (warp's `incoming`) do not,
    // and with Nagle's algorithm a frame written while an earlier one is
    // unacknowledged waits for the client's delayed ACK (40 ms on Linux).
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Serves Switchboard's WebSocket endpoint (any path) on a plain TCP listener,
/// with no framework, until shutdown starts.
pub async fn serve(listener: TcpListener, switchboard: Switchboard) {
    let cancel = switchboard.shutdown_token();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = cancel.cancelled() => return,
        };
        let (stream, _peer) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                // Out of file descriptors and the like: back off briefly rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let sb = switchboard.clone();
        let stop = cancel.clone();
        switchboard.tasks().spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let sb = sb.clone();
                async move { Ok::<_, Infallible>(upgrade(&sb, request).await) }
            });
            // A client must send its handshake within 10 s (slowloris);
            // `switchboard_service::Server` also bounds pending connections.
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(connection);
            // A kept-alive connection that never upgrades would otherwise
            // hold shutdown for its whole timeout.
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "http connection failed");
            }
        });
    }
}
