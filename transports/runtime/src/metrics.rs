//! Counters for dashboards: a snapshot struct and Prometheus text.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use switchboard_core::{CloseReason, ErrorCode, Stats};

/// Counters only the runtime sees (bytes on the wire).
#[derive(Debug, Default)]
pub(crate) struct WireCounters {
    pub(crate) bytes_in: AtomicU64,
    pub(crate) bytes_out: AtomicU64,
}

impl WireCounters {
    pub(crate) fn add_in(&self, n: usize) {
        self.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn add_out(&self, n: usize) {
        self.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// A snapshot of a Switchboard's counters.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Metrics {
    /// Sessions open now.
    pub sessions: usize,
    /// Rooms held now.
    pub rooms: usize,
    /// Sessions opened since start.
    pub sessions_opened: u64,
    /// Client frames received.
    pub frames_in: u64,
    /// Frames queued to sessions (per recipient).
    pub frames_out: u64,
    /// Client frame bytes received.
    pub bytes_in: u64,
    /// Bytes written to transports.
    pub bytes_out: u64,
    /// Room messages published.
    pub messages: u64,
    /// Refused frames and connections by error code.
    pub errors: Vec<(ErrorCode, u64)>,
    /// Sessions closed because their outbound queue overflowed.
    pub slow_consumer_closes: u64,
    /// Sessions closed by the heartbeat.
    pub heartbeat_timeouts: u64,
    /// Queued latest-value messages dropped, unsent, for a newer value of
    /// their room and event (a slow subscriber of a latest-value room).
    pub superseded: u64,
    /// Closed sessions by reason.
    pub closes: Vec<(CloseReason, u64)>,
}

impl Metrics {
    pub(crate) fn new(sessions: usize, rooms: usize, stats: &Stats, wire: &WireCounters) -> Self {
        Self {
            sessions,
            rooms,
            sessions_opened: stats.sessions_opened,
            frames_in: stats.frames_in,
            frames_out: stats.frames_out,
            bytes_in: wire.bytes_in.load(Ordering::Relaxed),
            bytes_out: wire.bytes_out.load(Ordering::Relaxed),
            messages: stats.messages,
            errors: ErrorCode::ALL
                .iter()
                .map(|c| (*c, stats.errors[c.index()]))
                .collect(),
            slow_consumer_closes: stats.closes[CloseReason::SlowConsumer.index()],
            heartbeat_timeouts: stats.closes[CloseReason::HeartbeatTimeout.index()],
            superseded: 0,
            closes: CloseReason::ALL
                .iter()
                .map(|r| (*r, stats.closes[r.index()]))
                .collect(),
        }
    }

    pub(crate) fn with_superseded(mut self, superseded: u64) -> Self {
        self.superseded = superseded;
        self
    }

    /// The counters in Prometheus text exposition format.
    #[must_use]
    pub fn to_prometheus(&self) -> String {
        let mut out = String::with_capacity(2048);
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            // Writing to a String cannot fail.
            let _ = writeln!(out, "# HELP switchboard_{name} {help}\n# TYPE switchboard_{name} {kind}\nswitchboard_{name} {value}");
        };
        metric("sessions", "gauge", "Sessions open.", self.sessions as u64);
        metric("rooms", "gauge", "Rooms held.", self.rooms as u64);
        metric(
            "sessions_opened_total",
            "counter",
            "Sessions opened.",
            self.sessions_opened,
        );
        metric(
            "frames_in_total",
            "counter",
            "Client frames received.",
            self.frames_in,
        );
        metric(
            "frames_out_total",
            "counter",
            "Frames queued to sessions.",
            self.frames_out,
        );
        metric(
            "bytes_in_total",
            "counter",
            "Client frame bytes received.",
            self.bytes_in,
        );
        metric(
            "bytes_out_total",
            "counter",
            "Bytes written to transports.",
            self.bytes_out,
        );
        metric(
            "messages_total",
            "counter",
            "Room messages published.",
            self.messages,
        );
        metric(
            "slow_consumer_closes_total",
            "counter",
            "Sessions closed as slow consumers.",
            self.slow_consumer_closes,
        );
        metric(
            "heartbeat_timeouts_total",
            "counter",
            "Sessions closed by the heartbeat.",
            self.heartbeat_timeouts,
        );
        metric(
            "superseded_total",
            "counter",
            "Queued latest-value messages replaced, unsent, by a newer value.",
            self.superseded,
        );
        let _ = writeln!(out, "# HELP switchboard_errors_total Refused frames and connections by error code.\n# TYPE switchboard_errors_total counter");
        for (code, n) in &self.errors {
            let _ = writeln!(out, "switchboard_errors_total{{code=\"{code}\"}} {n}");
        }
        let _ = writeln!(out, "# HELP switchboard_closes_total Closed sessions by reason.\n# TYPE switchboard_closes_total counter");
        for (reason, n) in &self.closes {
            let _ = writeln!(
                out,
                "switchboard_closes_total{{reason=\"{}\"}} {n}",
                reason.as_str()
            );
        }
        out
    }
}
