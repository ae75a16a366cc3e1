//! The runtime's one clock.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use switchboard_core::Timestamp;
use tokio::time::Instant;

/// Maps tokio's monotonic clock to the core's [`Timestamp`] (milliseconds since
/// the Unix epoch): the wall clock is read once, at start, and time then moves
/// with tokio's clock, so it never jumps backwards and `tokio::time::pause()`
/// drives heartbeats in tests without sleeping.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    start: Instant,
    start_unix_ms: u64,
}

impl Clock {
    pub(crate) fn new() -> Self {
        let start_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Self {
            start: Instant::now(),
            start_unix_ms,
        }
    }

    pub(crate) fn now(&self) -> Timestamp {
        self.to_timestamp(Instant::now())
    }

    pub(crate) fn to_timestamp(self, instant: Instant) -> Timestamp {
        let elapsed = instant.saturating_duration_since(self.start);
        Timestamp::from_millis(self.start_unix_ms) + elapsed
    }

    pub(crate) fn to_instant(self, at: Timestamp) -> Instant {
        let offset = at.as_millis().saturating_sub(self.start_unix_ms);
        self.start + Duration::from_millis(offset)
    }
}
