//! An echo server over the transport's own WebSocket framing, built only for
//! the Autobahn|Testsuite run (`tests/autobahn.rs`, feature `echo`): the
//! suite's fuzzing client sends frames and expects every text or binary
//! message back unchanged.
//!
//! It reads and writes exactly as a session does: the same tungstenite
//! configuration, the same mapping of read errors to close codes
//! (`Received`), the same frame encoder and raw writes, and the same close
//! and linger. Only what happens to a message differs: it is echoed instead of
//! handled as a Switchboard frame, so no `close` frame of the protocol
//! precedes the WebSocket close.

use std::convert::Infallible;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};

use http::{HeaderValue, Request};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

use super::{
    accept_key, close_and_linger, close_frame, encode_frame, framing_config, status,
    switching_protocols, write_raw, Received, OPCODE_TEXT,
};

/// The opcode of a binary frame (RFC 6455 §5.2).
const OPCODE_BINARY: u8 = 0x2;

/// How long one write, or the close, may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// The `Server` header, which the fuzzing client reports as the agent.
pub const AGENT: &str = "switchboard-echo";

/// Accepts WebSocket connections on any path of `listener`, forever, and
/// echoes each text or binary message of up to `max_message_bytes` (larger
/// ones close with 1009, as a session's over `max_frame_bytes` do).
pub async fn serve(listener: TcpListener, max_message_bytes: usize) {
    loop {
        let Ok((stream, _peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
                let on_upgrade = request.extensions_mut().remove::<OnUpgrade>();
                let (parts, _body) = request.into_parts();
                let response = match (accept_key(&parts), on_upgrade) {
                    (Ok(accept), Some(on_upgrade)) => {
                        tokio::spawn(async move {
                            if let Ok(upgraded) = on_upgrade.await {
                                echo(TokioIo::new(upgraded), max_message_bytes).await;
                            }
                        });
                        let mut response = switching_protocols(accept);
                        response
                            .headers_mut()
                            .insert(http::header::SERVER, HeaderValue::from_static(AGENT));
                        response
                    }
                    (Ok(_), None) => status(http::StatusCode::INTERNAL_SERVER_ERROR),
                    (Err(response), _) => response,
                };
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}

/// Echoes messages on one upgraded connection until either side ends it.
async fn echo<S>(io: S, max_message_bytes: usize)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let config = framing_config(max_message_bytes, max_message_bytes);
    let mut ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
    loop {
        let (opcode, payload) = match Received::from(ws.next().await) {
            Received::Text(payload) => (OPCODE_TEXT, payload),
            Received::Binary(payload) => (OPCODE_BINARY, payload),
            Received::Control => continue,
            Received::Closed => {
                let _ = tokio::time::timeout(WRITE_TIMEOUT, ws.flush()).await;
                return;
            }
            Received::Failed(reason) => {
                let frame = close_frame(reason.code(), reason.as_str());
                close_and_linger(&mut ws, frame, WRITE_TIMEOUT).await;
                return;
            }
        };
        let frame = encode_frame(opcode, &payload);
        let written = tokio::time::timeout(WRITE_TIMEOUT, write_raw(&mut ws, &frame)).await;
        if !matches!(written, Ok(Ok(()))) {
            return;
        }
    }
}
