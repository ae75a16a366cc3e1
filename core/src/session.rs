//! Per-session state: identity, rooms, rate limit, error budget, liveness.

use std::collections::VecDeque;

use indexmap::IndexSet;

use crate::config::Config;
use crate::ids::{RoomId, Sid};
use crate::policy::Identity;
use crate::time::Timestamp;
use crate::HashState;

/// How the hub learns that a session's client is still there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Liveness {
    /// The client answers `ping` with frames (WebSocket, long-poll): silence
    /// for `interval + timeout` closes it with `heartbeat_timeout`. While the
    /// session is detached (between two long-polls) there is nothing to carry
    /// a ping: only the idle clock runs, and a transport attaching (a poll
    /// arriving) is proof of life.
    Client,
    /// The client cannot send (server-push-only SSE): the hub asks for a
    /// keepalive `ping` every interval (SSE writes it as `: ping`) and the
    /// transport notices a dead connection when a write fails.
    Transport,
}

pub(crate) struct Session {
    pub(crate) sid: Sid,
    pub(crate) identity: Identity,
    pub(crate) rooms: IndexSet<RoomId, HashState>,
    pub(crate) bucket: TokenBucket,
    pub(crate) errors: ErrorWindow,
    pub(crate) liveness: Liveness,
    /// When the last accepted frame (or attach) arrived.
    pub(crate) last_rx: Timestamp,
    /// Whether a `ping` went out since `last_rx`.
    pub(crate) pinged: bool,
    /// When the last keepalive went out (Transport liveness).
    pub(crate) last_ping: Timestamp,
    pub(crate) detached_since: Option<Timestamp>,
    /// Deadline of this session's live entry in the timer queue.
    pub(crate) timer_at: Option<Timestamp>,
}

impl Session {
    pub(crate) fn new(
        now: Timestamp,
        sid: Sid,
        identity: Identity,
        liveness: Liveness,
        config: &Config,
        hash: HashState,
    ) -> Self {
        Self {
            sid,
            identity,
            rooms: IndexSet::with_hasher(hash),
            bucket: TokenBucket::full(now, config),
            errors: ErrorWindow::default(),
            liveness,
            last_rx: now,
            pinged: false,
            last_ping: now,
            detached_since: None,
            timer_at: None,
        }
    }

    /// The next moment this session's timers need attention: its heartbeat
    /// or idle deadline, or its credential's expiry if that comes first.
    pub(crate) fn deadline(&self, config: &Config) -> Timestamp {
        let liveness = self.liveness_deadline(config);
        self.identity
            .expires_at
            .map_or(liveness, |at| at.min(liveness))
    }

    fn liveness_deadline(&self, config: &Config) -> Timestamp {
        if let Some(since) = self.detached_since {
            // Detached: no heartbeat, only `idle` (see `Liveness`).
            return since + config.session_idle;
        }
        match self.liveness {
            Liveness::Client if self.pinged => {
                self.last_rx + config.heartbeat_interval + config.heartbeat_timeout
            }
            Liveness::Client => self.last_rx + config.heartbeat_interval,
            Liveness::Transport => self.last_ping + config.heartbeat_interval,
        }
    }
}

/// Token bucket in thousandths of a token, refilled from elapsed milliseconds:
/// `rate_per_sec` thousandths per millisecond is exactly `rate_per_sec` tokens a second.
pub(crate) struct TokenBucket {
    milli_tokens: u64,
    refilled_at: Timestamp,
}

impl TokenBucket {
    fn full(now: Timestamp, config: &Config) -> Self {
        Self {
            milli_tokens: u64::from(config.rate_burst) * 1000,
            refilled_at: now,
        }
    }

    /// Takes one token if there is one.
    pub(crate) fn take(&mut self, now: Timestamp, config: &Config) -> bool {
        let elapsed = now.as_millis().saturating_sub(self.refilled_at.as_millis());
        let cap = u64::from(config.rate_burst) * 1000;
        self.milli_tokens = self
            .milli_tokens
            .saturating_add(elapsed.saturating_mul(u64::from(config.rate_per_sec)))
            .min(cap);
        self.refilled_at = self.refilled_at.max(now);
        if self.milli_tokens >= 1000 {
            self.milli_tokens -= 1000;
            true
        } else {
            false
        }
    }
}

/// The times of the recent errors, at most `max_errors` of them.
#[derive(Default)]
pub(crate) struct ErrorWindow {
    recent: VecDeque<Timestamp>,
}

impl ErrorWindow {
    /// Records an error; true when the budget is now spent.
    pub(crate) fn record(&mut self, now: Timestamp, config: &Config) -> bool {
        let window_start = now - config.error_window;
        while self.recent.front().is_some_and(|t| *t <= window_start) {
            self.recent.pop_front();
        }
        self.recent.push_back(now);
        // Bounded: the session closes when the count reaches max_errors.
        self.recent.len() >= config.max_errors as usize
    }
}
