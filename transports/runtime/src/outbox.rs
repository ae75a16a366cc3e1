//! Each session's bounded outbound queue.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

use bytes::Bytes;
use switchboard_core::{CloseReason, FrameKind, LatestKey};
use tokio::sync::Notify;

/// One encoded server frame, shared by all its recipients: queueing it for a
/// member costs one reference count.
#[derive(Debug)]
pub struct OutFrame {
    /// The frame's JSON.
    pub bytes: Bytes,
    /// Its type (and, for a `message`, its room, seq and epoch).
    pub kind: FrameKind,
    /// A latest-value message's key: it supersedes a queued, unsent frame
    /// with the same key (see `switchboard_core::Delivery::latest`).
    latest: Option<LatestKey>,
    /// A transport's own encoding of the frame (a WebSocket text frame),
    /// made by the first connection that writes it and shared by the rest.
    wire: OnceLock<Bytes>,
}

impl OutFrame {
    /// A frame as the core encoded it.
    #[must_use]
    pub fn new(bytes: Bytes, kind: FrameKind) -> Self {
        Self {
            bytes,
            kind,
            latest: None,
            wire: OnceLock::new(),
        }
    }

    /// The same frame as the newest value of `latest`: queueing it drops a
    /// queued, unsent frame with the same key.
    #[must_use]
    pub fn superseding(mut self, latest: Option<LatestKey>) -> Self {
        self.latest = latest;
        self
    }

    /// The frame as the transport puts it on the wire, encoded once for all
    /// recipients by `encode`. A runtime serves one wire format per frame,
    /// so every caller passes the same `encode`.
    pub fn wire(&self, encode: impl FnOnce(&[u8]) -> Bytes) -> &Bytes {
        self.wire.get_or_init(|| encode(&self.bytes))
    }
}

/// A session's outbound queue, bounded in bytes.
///
/// The task that runs the core pushes into it and never waits; the
/// connection's writer drains it whole, so frames queued while a write was in
/// progress go out together in the next write. When a push would pass the
/// bound the session is closed as `slow_consumer`: what is queued is dropped
/// (the client recovers through `since`) and only the `close` frame remains.
///
/// A latest-value message ([`OutFrame::superseding`]) first drops the queued,
/// unsent frame with its key, if there is one: a subscriber of a latest-value
/// room that cannot keep up gets the newest value of each event instead of
/// every one, and its queue holds at most one frame per room and event, so
/// such traffic alone never overflows it. Frames without a key (messages of
/// other rooms, never-coalesced events, everything else) are never dropped
/// but by an overflow.
///
/// A transport that keeps frames after taking them, until the client
/// acknowledges them (long-poll's resend buffer), takes them with
/// [`Outbox::recv_held`] or [`Outbox::try_recv_held`]: their bytes keep
/// counting against the bound until [`Outbox::release`], so what the client
/// has not acknowledged plus what is queued never passes it.
#[derive(Debug)]
pub struct Outbox {
    state: Mutex<State>,
    ready: Notify,
    /// Woken when the session ends (inline: no allocation per session).
    ended: Notify,
    max_bytes: usize,
}

#[derive(Debug, Default)]
struct State {
    /// Queued frames, oldest first; `None` where a superseded frame was
    /// dropped (removing it would shift the positions in `latest`).
    frames: VecDeque<Option<Arc<OutFrame>>>,
    /// Position of `frames[0]` counted from the first frame ever queued.
    front: u64,
    /// The position of each queued latest-value frame, by key.
    latest: HashMap<LatestKey, u64>,
    /// The `None`s in `frames`.
    dropped: usize,
    /// Bytes of `frames`.
    bytes: usize,
    /// Bytes of frames taken with `*_held` and not yet released.
    held: usize,
    overflowed: bool,
    closed: Option<CloseReason>,
}

impl State {
    /// Forgets every queued frame.
    fn clear(&mut self) {
        self.front += self.frames.len() as u64;
        self.frames.clear();
        self.latest.clear();
        self.dropped = 0;
        self.bytes = 0;
    }

    /// Removes the gaps once they outnumber the frames, so a queue that keeps
    /// superseding stays as long as what it holds (amortized O(1) a push).
    fn compact(&mut self) {
        if self.dropped < 32 || self.dropped * 2 < self.frames.len() {
            return;
        }
        self.front += self.frames.len() as u64;
        self.frames.retain(Option::is_some);
        self.front -= self.frames.len() as u64;
        self.dropped = 0;
        let front = self.front;
        for (at, frame) in self.frames.iter().enumerate() {
            if let Some(key) = frame.as_ref().and_then(|f| f.latest.as_ref()) {
                self.latest.insert(key.clone(), front + at as u64);
            }
        }
    }
}

/// What [`Outbox::push`] did with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pushed {
    /// Queued.
    Queued,
    /// Queued, and a queued frame it supersedes was dropped.
    Superseded,
    /// The queue overflowed: the caller closes the session as a slow consumer.
    Overflowed,
}

/// What [`Outbox::recv`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Frames were moved into the batch; the session goes on.
    Frames,
    /// The session is over: write the batch (it ends with the `close` frame, if
    /// any), then close the transport with this reason's code.
    Closed(CloseReason),
}

impl Outbox {
    pub(crate) fn new(max_bytes: usize) -> Self {
        Self {
            state: Mutex::new(State::default()),
            ready: Notify::new(),
            ended: Notify::new(),
            max_bytes,
        }
    }

    // A std Mutex: it is held only for a few pointer moves and never across an await.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a frame, first dropping the queued frame it supersedes. `close`
    /// frames are always accepted.
    pub(crate) fn push(&self, frame: &Arc<OutFrame>) -> Pushed {
        let mut state = self.lock();
        if state.closed.is_some() {
            return Pushed::Queued;
        }
        let is_close = frame.kind == FrameKind::Close;
        if state.overflowed && !is_close {
            return Pushed::Overflowed;
        }
        let mut pushed = Pushed::Queued;
        if let Some(key) = &frame.latest {
            if let Some(old) = state.latest.remove(key) {
                let at = old
                    .checked_sub(state.front)
                    .and_then(|at| usize::try_from(at).ok())
                    .unwrap_or(usize::MAX);
                if let Some(gone) = state.frames.get_mut(at).and_then(Option::take) {
                    state.bytes -= gone.bytes.len();
                    state.dropped += 1;
                    pushed = Pushed::Superseded;
                }
            }
        }
        let len = frame.bytes.len();
        if !is_close && state.bytes + state.held + len > self.max_bytes {
            state.overflowed = true;
            state.clear();
            // The transport drops its held frames when it sees `overflowed`.
            state.held = 0;
            return Pushed::Overflowed;
        }
        let was_empty = state.frames.len() == state.dropped;
        state.bytes += len;
        if let Some(key) = &frame.latest {
            let at = state.front + state.frames.len() as u64;
            state.latest.insert(key.clone(), at);
        }
        state.frames.push_back(Some(Arc::clone(frame)));
        state.compact();
        drop(state);
        if was_empty {
            self.ready.notify_one();
        }
        pushed
    }

    /// Marks the session over; the writer drains what is queued, then closes.
    pub(crate) fn close(&self, reason: CloseReason) {
        let mut state = self.lock();
        if state.closed.is_none() {
            state.closed = Some(reason);
        }
        drop(state);
        self.ready.notify_one();
        self.ended.notify_waiters();
    }

    /// Completes once the session is over (closed by the core). Transports
    /// that hold sessions between requests (long-poll) free them on it.
    pub async fn ended(&self) {
        loop {
            let notified = self.ended.notified();
            if self.is_ended() {
                return;
            }
            notified.await;
        }
    }

    /// Whether the session is over.
    #[must_use]
    pub fn is_ended(&self) -> bool {
        self.lock().closed.is_some()
    }

    /// Bytes queued now (not counting held frames).
    #[must_use]
    pub fn queued_bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Bytes of frames taken with [`Outbox::recv_held`] or
    /// [`Outbox::try_recv_held`] and not yet released.
    #[must_use]
    pub fn held_bytes(&self) -> usize {
        self.lock().held
    }

    /// Whether the queue overflowed: the session is being closed as
    /// `slow_consumer`, and a transport that holds frames drops them all but
    /// the `close` frame (the client recovers through `since`).
    #[must_use]
    pub fn overflowed(&self) -> bool {
        self.lock().overflowed
    }

    /// The client acknowledged `bytes` of held frames: they stop counting
    /// against the bound.
    pub fn release(&self, bytes: usize) {
        let mut state = self.lock();
        state.held = state.held.saturating_sub(bytes);
    }

    /// Moves everything queued into `batch` without waiting; `None` when there
    /// was nothing and the session goes on.
    pub fn try_recv(&self, batch: &mut Vec<Arc<OutFrame>>) -> Option<Drained> {
        self.take(batch, false)
    }

    /// [`Outbox::try_recv`] for a transport that holds the frames until the
    /// client acknowledges them: their bytes count against the bound until
    /// [`Outbox::release`].
    pub fn try_recv_held(&self, batch: &mut Vec<Arc<OutFrame>>) -> Option<Drained> {
        self.take(batch, true)
    }

    fn take(&self, batch: &mut Vec<Arc<OutFrame>>, hold: bool) -> Option<Drained> {
        let mut state = self.lock();
        let had = state.frames.len() > state.dropped;
        batch.extend(state.frames.iter_mut().filter_map(Option::take));
        if hold {
            state.held += state.bytes;
        }
        state.clear();
        match state.closed {
            Some(reason) => Some(Drained::Closed(reason)),
            None if had => Some(Drained::Frames),
            None => None,
        }
    }

    /// Waits until frames are queued or the session is over, then moves
    /// everything queued into `batch`.
    pub async fn recv(&self, batch: &mut Vec<Arc<OutFrame>>) -> Drained {
        self.wait_take(batch, false).await
    }

    /// After a [`Drained::Frames`] from [`Outbox::recv`]: lets the tasks that
    /// are ready run first (under load, the publishers whose messages woke
    /// this writer), then moves what they queued meanwhile into `batch` too,
    /// so it leaves in the same write. Fewer, larger writes are most of the
    /// cost of a busy fan-out; when idle this costs one trip through the
    /// scheduler. Returns what the session's state then is.
    pub async fn coalesce(&self, batch: &mut Vec<Arc<OutFrame>>, drained: Drained) -> Drained {
        match drained {
            Drained::Frames => {
                tokio::task::yield_now().await;
                self.try_recv(batch).unwrap_or(Drained::Frames)
            }
            closed => closed,
        }
    }

    /// [`Outbox::recv`] for a transport that holds the frames until the
    /// client acknowledges them (see [`Outbox::try_recv_held`]).
    pub async fn recv_held(&self, batch: &mut Vec<Arc<OutFrame>>) -> Drained {
        self.wait_take(batch, true).await
    }

    async fn wait_take(&self, batch: &mut Vec<Arc<OutFrame>>, hold: bool) -> Drained {
        loop {
            let notified = self.ready.notified();
            if let Some(drained) = self.take(batch, hold) {
                return drained;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(len: usize, kind: FrameKind) -> Arc<OutFrame> {
        Arc::new(OutFrame::new(Bytes::from(vec![b' '; len]), kind))
    }

    fn key(event: &str) -> LatestKey {
        let room = switchboard_core::RoomName::new("progress").expect("a room name");
        LatestKey::new(room, Some(event))
    }

    /// A 60-byte frame saying `text`, superseding others of `event` if given.
    fn value(text: &str, event: Option<&str>) -> Arc<OutFrame> {
        let bytes = Bytes::from(format!("{text:<60}"));
        Arc::new(OutFrame::new(bytes, FrameKind::Direct).superseding(event.map(key)))
    }

    fn texts(batch: &[Arc<OutFrame>]) -> Vec<String> {
        batch
            .iter()
            .map(|f| String::from_utf8_lossy(&f.bytes).trim_end().to_string())
            .collect()
    }

    #[test]
    fn a_newer_value_drops_the_queued_one_of_its_key_and_goes_last() {
        let outbox = Outbox::new(1000);
        assert_eq!(outbox.push(&value("p1", Some("progress"))), Pushed::Queued);
        assert_eq!(outbox.push(&value("stage1", Some("stage"))), Pushed::Queued);
        assert_eq!(outbox.push(&value("done", None)), Pushed::Queued);
        assert_eq!(
            outbox.push(&value("p2", Some("progress"))),
            Pushed::Superseded
        );
        assert_eq!(
            outbox.queued_bytes(),
            180,
            "the dropped frame left the bound"
        );
        let mut batch = Vec::new();
        assert_eq!(outbox.try_recv(&mut batch), Some(Drained::Frames));
        assert_eq!(texts(&batch), ["stage1", "done", "p2"]);
        // A taken frame is on its way: the next value does not replace it.
        assert_eq!(outbox.push(&value("p3", Some("progress"))), Pushed::Queued);
    }

    #[test]
    fn a_reader_that_never_reads_a_latest_value_stream_is_never_overflowed() {
        let outbox = Outbox::new(1000);
        let events = ["progress", "stage", "eta"];
        for n in 0..10_000 {
            let event = events[n % 3];
            let pushed = outbox.push(&value(&format!("{event}{n}"), Some(event)));
            assert_ne!(pushed, Pushed::Overflowed, "push {n}");
        }
        assert_eq!(outbox.queued_bytes(), 180);
        let mut batch = Vec::new();
        outbox.try_recv(&mut batch);
        assert_eq!(texts(&batch), ["stage9997", "eta9998", "progress9999"]);
        assert!(!outbox.overflowed());
    }

    #[test]
    fn frames_without_a_key_still_overflow() {
        let outbox = Outbox::new(100);
        assert_eq!(outbox.push(&value("p", Some("progress"))), Pushed::Queued);
        assert_eq!(outbox.push(&value("done", None)), Pushed::Overflowed);
        assert!(outbox.overflowed());
    }

    proptest::proptest! {
        /// Pushes (of a few keys, or of frames without one) and reads in any
        /// order: what the reader gets is in push order, holds every frame
        /// without a key, and ends with the last value pushed of every key.
        #[test]
        fn a_reader_converges_on_the_last_value_of_every_key(
            ops in proptest::collection::vec(proptest::option::of(0usize..4), 1..300),
        ) {
            let outbox = Outbox::new(1 << 20);
            let events = ["a", "b", "c"];
            let mut got = Vec::new();
            let mut last: HashMap<&str, usize> = HashMap::new();
            let mut keyless = Vec::new();
            for (n, op) in ops.into_iter().enumerate() {
                match op {
                    None => {
                        outbox.try_recv(&mut got);
                    }
                    Some(3) => {
                        keyless.push(n);
                        outbox.push(&value(&format!("{n}"), None));
                    }
                    Some(e) => {
                        last.insert(events[e], n);
                        outbox.push(&value(&format!("{n}"), Some(events[e])));
                    }
                }
            }
            outbox.try_recv(&mut got);
            let order: Vec<usize> = texts(&got).iter().map(|t| t.parse().expect("n")).collect();
            proptest::prop_assert!(order.windows(2).all(|w| w[0] < w[1]), "{:?}", order);
            let got_keyless: Vec<usize> = got
                .iter()
                .zip(&order)
                .filter(|(f, _)| f.latest.is_none())
                .map(|(_, n)| *n)
                .collect();
            proptest::prop_assert_eq!(got_keyless, keyless);
            let mut got_last: HashMap<&str, usize> = HashMap::new();
            for (f, n) in got.iter().zip(&order) {
                if let Some(key) = &f.latest {
                    let event = events.iter().find(|e| Some(**e) == key.event()).expect("event");
                    got_last.insert(event, *n);
                }
            }
            proptest::prop_assert_eq!(got_last, last);
            proptest::prop_assert_eq!(outbox.queued_bytes(), 0);
        }
    }

    #[test]
    fn drained_frames_leave_the_bound() {
        let outbox = Outbox::new(100);
        let mut batch = Vec::new();
        for _ in 0..10 {
            assert_eq!(outbox.push(&frame(60, FrameKind::Direct)), Pushed::Queued);
            assert_eq!(outbox.try_recv(&mut batch), Some(Drained::Frames));
        }
        assert_eq!(outbox.queued_bytes(), 0);
        assert!(!outbox.overflowed());
    }

    #[test]
    fn held_frames_count_against_the_bound_until_released() {
        let outbox = Outbox::new(100);
        let mut held = Vec::new();
        assert_eq!(outbox.push(&frame(60, FrameKind::Direct)), Pushed::Queued);
        assert_eq!(outbox.try_recv_held(&mut held), Some(Drained::Frames));
        assert_eq!((outbox.queued_bytes(), outbox.held_bytes()), (0, 60));
        // 60 held + 30 queued fits; 10 more would not.
        assert_eq!(outbox.push(&frame(30, FrameKind::Direct)), Pushed::Queued);
        outbox.release(60);
        assert_eq!(outbox.held_bytes(), 0);
        assert_eq!(
            outbox.push(&frame(60, FrameKind::Direct)),
            Pushed::Queued,
            "released bytes are free"
        );
        assert!(!outbox.overflowed());
    }

    #[test]
    fn never_releasing_overflows_and_drops_everything_but_close() {
        let outbox = Outbox::new(100);
        let mut held = Vec::new();
        assert_eq!(outbox.push(&frame(60, FrameKind::Direct)), Pushed::Queued);
        outbox.try_recv_held(&mut held);
        assert_eq!(
            outbox.push(&frame(60, FrameKind::Direct)),
            Pushed::Overflowed
        );
        assert!(outbox.overflowed());
        assert_eq!((outbox.queued_bytes(), outbox.held_bytes()), (0, 0));
        assert_eq!(
            outbox.push(&frame(1, FrameKind::Direct)),
            Pushed::Overflowed,
            "closed to all but close"
        );
        assert_eq!(outbox.push(&frame(40, FrameKind::Close)), Pushed::Queued);
        outbox.close(CloseReason::SlowConsumer);
        let mut rest = Vec::new();
        assert_eq!(
            outbox.try_recv_held(&mut rest),
            Some(Drained::Closed(CloseReason::SlowConsumer))
        );
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].kind, FrameKind::Close);
    }
}
