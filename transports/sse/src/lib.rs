//! Switchboard over Server-Sent Events, written against the `http` crate's
//! types so any hyper-based framework mounts it in a few lines.
//!
//! `GET …/sse?rooms=a,b` answers `text/event-stream`: `welcome` first, then
//! each server frame as one event whose `event:` is the frame's type. Every
//! `message` and `joined` event carries an `id:` cursor holding the epoch and
//! seq of every room of the stream, so the browser's own EventSource
//! reconnect (which sends `Last-Event-ID`) rejoins each room with `since` and
//! resumes with no loss and no duplicate. `since=<cursor>` in the query does
//! the same for clients that track it by hand.
//!
//! Client frames go to `POST …/sse/send?sid=…` ([`Sse::send`]), which a
//! deployment can turn off for server-push-only use
//! (`RuntimeConfig::sse_client_frames`). Only the sid of a stream this
//! transport serves is accepted there (not a long-poll or WebSocket
//! session's), for the identity that opened it. SSE sessions cannot answer
//! pings, so the core sends keepalives instead, written as `: ping` comment
//! lines, and a dead connection is noticed when a write fails.
//!
//! ```no_run
//! # async fn demo(request: http::Request<()>) -> Result<(), Box<dyn std::error::Error>> {
//! let switchboard = switchboard_runtime::Switchboard::builder().build()?;
//! let sse = switchboard_sse::Sse::new(switchboard);
//! let response = sse.handle(request).await; // GET …/sse
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::stream::{self, Stream, StreamExt};
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame};
use switchboard_core::{ErrorCode, FrameKind, Liveness};
use switchboard_runtime::http_api;
use switchboard_runtime::{query_param, Drained, OutFrame, Session, Switchboard};

/// The response body of an SSE stream: an `http_body::Body` for hyper-based
/// servers and a `Stream` for frameworks that take one (warp's
/// `reply::stream`).
pub struct SseBody {
    chunks: Pin<Box<dyn Stream<Item = Bytes> + Send + Sync>>,
}

impl std::fmt::Debug for SseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SseBody").finish_non_exhaustive()
    }
}

impl SseBody {
    fn once(bytes: Bytes) -> Self {
        Self {
            chunks: Box::pin(stream::once(async move { bytes })),
        }
    }
}

impl Stream for SseBody {
    type Item = Result<Bytes, Infallible>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.chunks
            .as_mut()
            .poll_next(cx)
            .map(|chunk| chunk.map(Ok))
    }
}

impl Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.chunks
            .as_mut()
            .poll_next(cx)
            .map(|chunk| chunk.map(|bytes| Ok(Frame::data(bytes))))
    }
}

/// A stream's position in each of its rooms: `room~epoch~seq` items joined by
/// commas (`~` and `,` never occur in room names or epochs), used as the SSE
/// event id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cursor {
    rooms: BTreeMap<String, (String, u64)>,
}

impl Cursor {
    /// Parses a cursor; malformed items are skipped, so those rooms are
    /// joined without `since`.
    #[must_use]
    pub fn parse(text: &str) -> Self {
        let rooms = text
            .split(',')
            .filter_map(|item| {
                let mut parts = item.splitn(3, '~');
                let room = parts.next()?;
                let epoch = parts.next()?;
                let seq = parts.next()?.parse().ok()?;
                (!room.is_empty() && !epoch.is_empty())
                    .then(|| (room.to_owned(), (epoch.to_owned(), seq)))
            })
            .collect();
        Self { rooms }
    }

    /// The position in `room`, if known.
    #[must_use]
    pub fn get(&self, room: &str) -> Option<(&str, u64)> {
        self.rooms
            .get(room)
            .map(|(epoch, seq)| (epoch.as_str(), *seq))
    }

    fn set(&mut self, room: &str, epoch: &str, seq: u64) {
        match self.rooms.get_mut(room) {
            Some(entry) => {
                if entry.0 != epoch {
                    epoch.clone_into(&mut entry.0);
                }
                entry.1 = seq;
            }
            None => {
                self.rooms.insert(room.to_owned(), (epoch.to_owned(), seq));
            }
        }
    }

    fn write(&self, out: &mut BytesMut) {
        for (i, (room, (epoch, seq))) in self.rooms.iter().enumerate() {
            if i > 0 {
                out.put_u8(b',');
            }
            out.put_slice(room.as_bytes());
            out.put_u8(b'~');
            out.put_slice(epoch.as_bytes());
            out.put_u8(b'~');
            out.put_slice(seq.to_string().as_bytes());
        }
    }
}

/// The SSE transport: serves streams, and takes client frames for the
/// sessions of its own streams. Cheap to clone; mount one for both routes.
#[derive(Clone)]
pub struct Sse {
    switchboard: Switchboard,
    /// The sessions of the open streams, by sid. Weak: the stream owns its
    /// session, and dropping the stream ends it.
    sessions: Arc<Mutex<HashMap<String, Weak<Session>>>>,
}

impl std::fmt::Debug for Sse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sse").finish_non_exhaustive()
    }
}

impl Sse {
    /// An SSE transport for `switchboard`.
    #[must_use]
    pub fn new(switchboard: Switchboard) -> Self {
        Self {
            switchboard,
            sessions: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Streams open now (for tests and metrics).
    #[must_use]
    pub fn session_count(&self) -> usize {
        self.lock().len()
    }

    // A std Mutex: only map lookups happen under it, nothing awaits.
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Weak<Session>>> {
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Answers `GET …/sse?rooms=a,b[&since=cursor]`: admits the client, opens
    /// a session, joins the rooms (with `since` from `Last-Event-ID` or the
    /// query) and streams its frames until either side ends it.
    pub async fn handle<B>(&self, request: Request<B>) -> Response<SseBody> {
        let switchboard = &self.switchboard;
        let (parts, _body) = request.into_parts();
        let identity = match switchboard.admit(&parts).await {
            Ok(identity) => identity,
            Err(refusal) => return refuse(refusal.http_status(), refusal.code, &refusal.message),
        };
        let session = match switchboard.open(identity, Liveness::Transport) {
            Ok(session) => Arc::new(session),
            Err(refusal) => return refuse(refusal.http_status(), refusal.code, &refusal.message),
        };
        let registration = Registration::new(&self.sessions, &session);
        let query = parts.uri.query().unwrap_or("");
        let cursor = parts
            .headers
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .or_else(|| query_param(query, "since"))
            .map(|text| Cursor::parse(&text))
            .unwrap_or_default();
        let rooms = query_param(query, "rooms").unwrap_or_default();
        let mut seen = std::collections::HashSet::new();
        for room in rooms.split(',').filter(|r| !r.is_empty()) {
            if !seen.insert(room) {
                continue;
            }
            // Joined as if the client had sent it: same validation, policy and limits.
            let join = match cursor.get(room) {
                Some((epoch, seq)) => {
                    serde_json::json!({"type": "join", "room": room, "since": {"seq": seq, "epoch": epoch}})
                }
                None => serde_json::json!({"type": "join", "room": room}),
            };
            session.handle_frame(join.to_string().as_bytes()).await;
        }

        let mut response = Response::new(stream_session(session, registration, cursor));
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        // nginx buffers proxied responses unless told not to.
        headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
        response
    }

    /// Answers `POST …/sse/send?sid=…` (see
    /// [`http_api::apply_frames`]), unless client frames are turned off
    /// (403 `forbidden`). `sid` must be one of this transport's streams,
    /// opened by the requester: any other sid (unknown, closed, another
    /// identity's, a long-poll or WebSocket session's) answers 403
    /// `forbidden` alike.
    pub async fn send<B>(&self, request: Request<B>) -> Response<Bytes>
    where
        B: Body,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        if !self.switchboard.runtime_config().sse_client_frames {
            return http_api::error(
                StatusCode::FORBIDDEN,
                ErrorCode::Forbidden,
                "this server takes no client frames over SSE (server push only)",
            );
        }
        let http_api::ClientPost {
            identity,
            sid,
            body,
            ..
        } = match http_api::client_post(&self.switchboard, request).await {
            Ok(post) => post,
            Err(response) => return response,
        };
        let session = self.lock().get(&sid).and_then(Weak::upgrade).filter(|s| {
            s.identity().user.as_str() == identity.user.as_str() && !s.outbox().is_ended()
        });
        match session {
            Some(session) => http_api::apply_frames(&session, body).await,
            None => http_api::no_such_session(),
        }
    }
}

/// A stream's entry in [`Sse`]'s map, removed when the stream ends.
struct Registration {
    sid: String,
    sessions: Weak<Mutex<HashMap<String, Weak<Session>>>>,
}

impl Registration {
    fn new(sessions: &Arc<Mutex<HashMap<String, Weak<Session>>>>, session: &Arc<Session>) -> Self {
        let sid = session.sid().as_str().to_owned();
        sessions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(sid.clone(), Arc::downgrade(session));
        Self {
            sid,
            sessions: Arc::downgrade(sessions),
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(sessions) = self.sessions.upgrade() {
            sessions
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&self.sid);
        }
    }
}

fn refuse(status: StatusCode, code: ErrorCode, message: &str) -> Response<SseBody> {
    let body = http_api::error(status, code, message).into_body();
    let mut response = Response::new(SseBody::once(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

struct StreamState {
    session: Arc<Session>,
    _registration: Registration,
    batch: Vec<Arc<OutFrame>>,
    cursor: Cursor,
    first: bool,
    done: bool,
}

fn stream_session(session: Arc<Session>, registration: Registration, cursor: Cursor) -> SseBody {
    let state = StreamState {
        session,
        _registration: registration,
        batch: Vec::new(),
        cursor,
        first: true,
        done: false,
    };
    let chunks = stream::unfold(state, |mut state| async move {
        if state.done {
            return None; // dropping the state drops the session
        }
        let outbox = state.session.outbox();
        let drained = outbox.recv(&mut state.batch).await;
        let drained = outbox.coalesce(&mut state.batch, drained).await;
        let mut out = BytesMut::with_capacity(state.batch.iter().map(|f| f.bytes.len() + 64).sum());
        if state.first {
            // Reconnect quickly after a drop; the cursor makes it lossless.
            out.put_slice(b"retry: 1000\n\n");
            state.first = false;
        }
        for frame in state.batch.drain(..) {
            write_event(&mut out, &frame, &mut state.cursor);
        }
        if let Drained::Closed(_) = drained {
            state.done = true;
        }
        state.session.count_written(out.len());
        Some((out.freeze(), state))
    });
    SseBody {
        chunks: Box::pin(chunks.fuse()),
    }
}

fn write_event(out: &mut BytesMut, frame: &OutFrame, cursor: &mut Cursor) {
    let position = match &frame.kind {
        FrameKind::Ping => {
            out.put_slice(b": ping\n\n");
            return;
        }
        FrameKind::Message { room, seq, epoch } | FrameKind::Joined { room, seq, epoch } => {
            Some((room, seq, epoch))
        }
        _ => None,
    };
    out.put_slice(b"event: ");
    out.put_slice(frame.kind.type_name().as_bytes());
    out.put_u8(b'\n');
    if let Some((room, seq, epoch)) = position {
        cursor.set(room.as_str(), epoch.as_str(), *seq);
        out.put_slice(b"id: ");
        cursor.write(out);
        out.put_u8(b'\n');
    }
    // The core's JSON is compact: one line, newlines inside strings escaped.
    out.put_slice(b"data: ");
    out.put_slice(&frame.bytes);
    out.put_slice(b"\n\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trip() {
        let mut cursor = Cursor::default();
        cursor.set("a/b:c", "EPOCH-_1", 17);
        cursor.set("z", "e2", 0);
        let mut out = BytesMut::new();
        cursor.write(&mut out);
        let text = std::str::from_utf8(&out).unwrap();
        assert_eq!(text, "a/b:c~EPOCH-_1~17,z~e2~0");
        assert_eq!(Cursor::parse(text), cursor);
    }

    #[test]
    fn malformed_cursor_items_are_skipped() {
        let cursor = Cursor::parse("a~e~1,broken,b~~2,c~e~x,~e~3,d~e~4~5");
        assert_eq!(cursor.get("a"), Some(("e", 1)));
        assert_eq!(cursor.get("b"), None);
        assert_eq!(cursor.get("c"), None);
        assert_eq!(cursor.rooms.len(), 1);
    }
}
