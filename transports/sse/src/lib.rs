//! Switchboard over Server-Sent Events, written against the `http` crate's
//! types so any hyper-based framework mounts it in a few lines.
//!
//! `GET …/sse?rooms=a,b` answers `text/event-stream`: `welcome` first, then
//! each server frame as one event whose `event:` is the frame's type. Every
//! `message` and `joined` event carries an `id:` [`Cursor`], a compact record
//! of the stream's position in every room of its query, so the browser's own
//! EventSource reconnect (which sends `Last-Event-ID`) rejoins each room with
//! `since` and resumes with no loss and no duplicate. `since=<cursor>` in the query does
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

/// A stream's position in each room of its `rooms=` query, written as the
/// SSE event id.
///
/// Compact, because every `message` event carries it: a 64-bit digest of the
/// rooms' `(room, epoch)` pairs, then each room's seq, all base36 and joined
/// by `.`, in query order (`<digest>.<seq>.<seq>…`; an empty seq is a room
/// with no position yet). Epochs are not written: on resume the server looks
/// up each room's current epoch and checks the digest; a mismatch means some
/// room's history was replaced, and every room answers `recovered: false`.
/// 100 rooms at seq 1,000 make an id of 313 bytes instead of ~2,500 with
/// epochs spelled out. [`Resume`] also reads the older `room~epoch~seq` form,
/// which `switchboard.js` sends as `since=`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cursor {
    rooms: Vec<(String, Option<(String, u64)>)>,
}

impl Cursor {
    /// A cursor over `rooms`, in this order, with no positions yet.
    #[must_use]
    pub fn new<'a>(rooms: impl IntoIterator<Item = &'a str>) -> Self {
        Self {
            rooms: rooms.into_iter().map(|r| (r.to_owned(), None)).collect(),
        }
    }

    /// Records the position in `room`; false (and nothing changes) when the
    /// room is not one of the cursor's.
    pub fn set(&mut self, room: &str, epoch: &str, seq: u64) -> bool {
        let Some((_, position)) = self.rooms.iter_mut().find(|(name, _)| name == room) else {
            return false;
        };
        match position {
            Some((known, known_seq)) => {
                if known != epoch {
                    epoch.clone_into(known);
                }
                *known_seq = seq;
            }
            None => *position = Some((epoch.to_owned(), seq)),
        }
        true
    }

    /// The cursor as text (what the `id:` line carries).
    #[must_use]
    pub fn encode(&self) -> String {
        let mut out = BytesMut::new();
        self.write(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    fn write(&self, out: &mut BytesMut) {
        let positions = self
            .rooms
            .iter()
            .filter_map(|(room, position)| Some((room.as_str(), position.as_ref()?.0.as_str())));
        put_base36(out, digest(positions));
        for (_, position) in &self.rooms {
            out.put_u8(b'.');
            if let Some((_, seq)) = position {
                put_base36(out, *seq);
            }
        }
    }
}

/// A cursor sent back by a reconnecting client (`Last-Event-ID` or `since=`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// `room~epoch~seq` items joined by `,` (`~` and `,` never occur in room
    /// names or epochs); malformed items are skipped, so those rooms are
    /// joined without `since`.
    Positions(BTreeMap<String, (String, u64)>),
    /// A [`Cursor`]: the digest and each query room's seq, in query order.
    Compact {
        /// The digest of the `(room, epoch)` pairs of the rooms with a seq.
        digest: u64,
        /// Each room's seq, `None` for a room with no position.
        seqs: Vec<Option<u64>>,
    },
}

impl Resume {
    /// Reads either form; `None` when it is neither.
    #[must_use]
    pub fn parse(text: &str) -> Option<Self> {
        if text.contains('~') {
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
            return Some(Self::Positions(rooms));
        }
        let mut parts = text.split('.');
        let digest = parse_base36(parts.next()?)?;
        let seqs = parts
            .map(|seq| match seq {
                "" => Some(None),
                seq => parse_base36(seq).map(Some),
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Self::Compact { digest, seqs })
    }

    /// The `since` to join each of `rooms` (the stream's query rooms, in
    /// order) with. A compact cursor is checked against the rooms' current
    /// epochs (`epoch_of`); when they are not the ones it was written in,
    /// every room gets an epoch no room has, so each answers `recovered:
    /// false` rather than replaying from a seq of another history.
    pub async fn positions<F, Fut>(
        &self,
        rooms: &[&str],
        epoch_of: F,
    ) -> HashMap<String, (String, u64)>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = Option<String>>,
    {
        let seqs = match self {
            Self::Positions(positions) => return positions.clone().into_iter().collect(),
            Self::Compact { seqs, .. } if seqs.len() != rooms.len() => return HashMap::new(),
            Self::Compact { seqs, .. } => seqs,
        };
        let mut epochs = Vec::new();
        for (room, seq) in rooms.iter().zip(seqs) {
            if let Some(seq) = seq {
                epochs.push((*room, *seq, epoch_of((*room).to_owned()).await));
            }
        }
        let current = digest(
            epochs
                .iter()
                .map(|(room, _, epoch)| (*room, epoch.as_deref().unwrap_or(""))),
        );
        let matches = matches!(self, Self::Compact { digest, .. } if *digest == current)
            && epochs.iter().all(|(_, _, epoch)| epoch.is_some());
        epochs
            .into_iter()
            .map(|(room, seq, epoch)| {
                let epoch = match epoch {
                    Some(epoch) if matches => epoch,
                    // Real epochs are never empty-looking like this.
                    _ => STALE_EPOCH.to_owned(),
                };
                (room.to_owned(), (epoch, seq))
            })
            .collect()
    }
}

/// The epoch a `since` gets when the cursor's epochs are not the rooms'.
const STALE_EPOCH: &str = "-";

/// FNV-1a (64-bit) over each `room`, NUL, `epoch`, NUL: stable across builds
/// and nodes, unlike `std`'s hasher.
fn digest<'a>(positions: impl Iterator<Item = (&'a str, &'a str)>) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for (room, epoch) in positions {
        for byte in room.bytes().chain([0]).chain(epoch.bytes()).chain([0]) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

fn put_base36(out: &mut BytesMut, mut n: u64) {
    let mut digits = [0u8; 13]; // u64::MAX has 13 base36 digits
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdefghijklmnopqrstuvwxyz"[(n % 36) as usize];
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.put_slice(&digits[i..]);
}

fn parse_base36(text: &str) -> Option<u64> {
    // from_str_radix takes a sign; a cursor never has one.
    if text.is_empty() || text.starts_with(['+', '-']) {
        return None;
    }
    u64::from_str_radix(text, 36).ok()
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
        let resume = parts
            .headers
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .or_else(|| query_param(query, "since"))
            .and_then(|text| Resume::parse(&text));
        let requested = query_param(query, "rooms").unwrap_or_default();
        let mut rooms: Vec<&str> = Vec::new();
        for room in requested.split(',').filter(|r| !r.is_empty()) {
            if !rooms.contains(&room) {
                rooms.push(room);
            }
        }
        let positions = match &resume {
            Some(resume) => {
                resume
                    .positions(&rooms, |room| current_epoch(switchboard, room))
                    .await
            }
            None => HashMap::new(),
        };
        for room in &rooms {
            // Joined as if the client had sent it: same validation, policy and limits.
            let join = match positions.get(*room) {
                Some((epoch, seq)) => {
                    serde_json::json!({"type": "join", "room": room, "since": {"seq": seq, "epoch": epoch}})
                }
                None => serde_json::json!({"type": "join", "room": room}),
            };
            session.handle_frame(join.to_string().as_bytes()).await;
        }
        let cursor = Cursor::new(rooms.iter().copied());

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
    // Rooms joined later over `/sse/send` are not in the cursor (a
    // reconnect rejoins the query's rooms only): their events carry no id.
    let in_cursor =
        position.is_some_and(|(room, seq, epoch)| cursor.set(room.as_str(), epoch.as_str(), *seq));
    if in_cursor {
        out.put_slice(b"id: ");
        cursor.write(out);
        out.put_u8(b'\n');
    }
    // The core's JSON is compact: one line, newlines inside strings escaped.
    out.put_slice(b"data: ");
    out.put_slice(&frame.bytes);
    out.put_slice(b"\n\n");
}

/// A room's epoch now: this node's, else the broker's last message's; `None`
/// for a room with no history anywhere.
async fn current_epoch(switchboard: &Switchboard, room: String) -> Option<String> {
    if let Some(info) = switchboard.room(&room) {
        return Some(info.epoch.as_str().to_owned());
    }
    let last = switchboard.latest(&room, 1).await.ok()?;
    Some(last.first()?.get("epoch")?.as_str()?.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn epochs<'a>(
        known: &'a [(&'a str, &'a str)],
    ) -> impl Fn(String) -> std::future::Ready<Option<String>> + 'a {
        move |room| {
            std::future::ready(
                known
                    .iter()
                    .find(|(name, _)| *name == room)
                    .map(|(_, epoch)| (*epoch).to_owned()),
            )
        }
    }

    fn block_on<F: std::future::Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime")
            .block_on(future)
    }

    #[test]
    fn a_compact_cursor_resumes_when_the_epochs_are_the_rooms() {
        let mut cursor = Cursor::new(["a/b:c", "z", "quiet"]);
        assert!(cursor.set("a/b:c", "EPOCH-_1", 17));
        assert!(cursor.set("z", "e2", 0));
        assert!(!cursor.set("elsewhere", "e3", 5), "not a query room");
        let text = cursor.encode();
        assert!(text.ends_with(".h.0."), "{text}");
        let resume = Resume::parse(&text).expect("a compact cursor");
        let known = [("a/b:c", "EPOCH-_1"), ("z", "e2")];
        let positions = block_on(resume.positions(&["a/b:c", "z", "quiet"], epochs(&known)));
        assert_eq!(positions.len(), 2);
        assert_eq!(positions["a/b:c"], ("EPOCH-_1".to_owned(), 17));
        assert_eq!(positions["z"], ("e2".to_owned(), 0));
    }

    #[test]
    fn a_compact_cursor_from_another_history_recovers_nothing() {
        let mut cursor = Cursor::new(["a", "b"]);
        cursor.set("a", "old", 4);
        cursor.set("b", "kept", 9);
        let resume = Resume::parse(&cursor.encode()).unwrap();
        for known in [&[("a", "new"), ("b", "kept")][..], &[("b", "kept")][..]] {
            let positions = block_on(resume.positions(&["a", "b"], epochs(known)));
            assert_eq!(positions["a"], (STALE_EPOCH.to_owned(), 4));
            assert_eq!(positions["b"], (STALE_EPOCH.to_owned(), 9));
        }
        // Other rooms than the cursor was written for: no `since` at all.
        let positions = block_on(resume.positions(&["a"], epochs(&[("a", "old")])));
        assert!(positions.is_empty());
    }

    #[test]
    fn malformed_cursors_are_refused_and_old_items_skipped() {
        for text in ["", "zz.1.-2", "1.+2", "x!.1", "1.1.1.%"] {
            assert_eq!(Resume::parse(text), None, "{text}");
        }
        let Some(Resume::Positions(rooms)) = Resume::parse("a~e~1,broken,b~~2,c~e~x,~e~3,d~e~4~5")
        else {
            panic!("the room~epoch~seq form");
        };
        assert_eq!(rooms.len(), 1);
        assert_eq!(rooms["a"], ("e".to_owned(), 1));
    }

    #[test]
    fn base36_round_trips_every_width() {
        for n in [0, 1, 35, 36, 1_000, u64::from(u32::MAX), u64::MAX] {
            let mut out = BytesMut::new();
            put_base36(&mut out, n);
            assert_eq!(parse_base36(std::str::from_utf8(&out).unwrap()), Some(n));
        }
    }

    #[test]
    fn a_hundred_rooms_make_a_short_id() {
        let rooms: Vec<String> = (0..100).map(|i| format!("room-{i}")).collect();
        let mut cursor = Cursor::new(rooms.iter().map(String::as_str));
        let mut spelled_out = 0;
        for room in &rooms {
            cursor.set(room, "k3Jx9aQ2bZw", 1_000);
            spelled_out += format!("{room}~k3Jx9aQ2bZw~1000,").len();
        }
        let id = cursor.encode();
        // 13 digest digits at most, then ".rs" (1,000 in base36) per room.
        assert!(id.len() <= 13 + 100 * 3, "{} bytes", id.len());
        assert!(spelled_out > 2_000);
    }
}
