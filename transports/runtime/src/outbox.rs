//! Each session's bounded outbound queue.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

use bytes::Bytes;
use switchboard_core::{CloseReason, FrameKind};
use tokio::sync::Notify;

/// One encoded server frame, shared by all its recipients: queueing it for a
/// member costs one reference count.
#[derive(Debug)]
pub struct OutFrame {
    /// The frame's JSON.
    pub bytes: Bytes,
    /// Its type (and, for a `message`, its room, seq and epoch).
    pub kind: FrameKind,
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
            wire: OnceLock::new(),
        }
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
    frames: VecDeque<Arc<OutFrame>>,
    /// Bytes of `frames`.
    bytes: usize,
    /// Bytes of frames taken with `*_held` and not yet released.
    held: usize,
    overflowed: bool,
    closed: Option<CloseReason>,
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

    /// Queues a frame; false when the queue overflowed (the caller closes the
    /// session as a slow consumer). `close` frames are always accepted.
    pub(crate) fn push(&self, frame: &Arc<OutFrame>) -> bool {
        let mut state = self.lock();
        if state.closed.is_some() {
            return true;
        }
        let is_close = frame.kind == FrameKind::Close;
        if state.overflowed && !is_close {
            return false;
        }
        let len = frame.bytes.len();
        if !is_close && state.bytes + state.held + len > self.max_bytes {
            state.overflowed = true;
            state.frames.clear();
            state.bytes = 0;
            // The transport drops its held frames when it sees `overflowed`.
            state.held = 0;
            return false;
        }
        let was_empty = state.frames.is_empty();
        state.bytes += len;
        state.frames.push_back(Arc::clone(frame));
        drop(state);
        if was_empty {
            self.ready.notify_one();
        }
        true
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
        let had = !state.frames.is_empty();
        batch.extend(state.frames.drain(..));
        if hold {
            state.held += state.bytes;
        }
        state.bytes = 0;
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

    #[test]
    fn drained_frames_leave_the_bound() {
        let outbox = Outbox::new(100);
        let mut batch = Vec::new();
        for _ in 0..10 {
            assert!(outbox.push(&frame(60, FrameKind::Direct)));
            assert_eq!(outbox.try_recv(&mut batch), Some(Drained::Frames));
        }
        assert_eq!(outbox.queued_bytes(), 0);
        assert!(!outbox.overflowed());
    }

    #[test]
    fn held_frames_count_against_the_bound_until_released() {
        let outbox = Outbox::new(100);
        let mut held = Vec::new();
        assert!(outbox.push(&frame(60, FrameKind::Direct)));
        assert_eq!(outbox.try_recv_held(&mut held), Some(Drained::Frames));
        assert_eq!((outbox.queued_bytes(), outbox.held_bytes()), (0, 60));
        // 60 held + 30 queued fits; 10 more would not.
        assert!(outbox.push(&frame(30, FrameKind::Direct)));
        outbox.release(60);
        assert_eq!(outbox.held_bytes(), 0);
        assert!(
            outbox.push(&frame(60, FrameKind::Direct)),
            "released bytes are free"
        );
        assert!(!outbox.overflowed());
    }

    #[test]
    fn never_releasing_overflows_and_drops_everything_but_close() {
        let outbox = Outbox::new(100);
        let mut held = Vec::new();
        assert!(outbox.push(&frame(60, FrameKind::Direct)));
        outbox.try_recv_held(&mut held);
        assert!(!outbox.push(&frame(60, FrameKind::Direct)));
        assert!(outbox.overflowed());
        assert_eq!((outbox.queued_bytes(), outbox.held_bytes()), (0, 0));
        assert!(
            !outbox.push(&frame(1, FrameKind::Direct)),
            "closed to all but close"
        );
        assert!(outbox.push(&frame(40, FrameKind::Close)));
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
