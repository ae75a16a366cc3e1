//! Limits and timings of a [`Hub`](crate::Hub).

use std::time::Duration;

use crate::error::ConfigError;

/// Limits and timings of a hub. Every default is PROTOCOL.md's where it names
/// one. Build with `Config::default()` and change fields; [`Hub::new`](crate::Hub::new)
/// calls [`Config::validate`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Config {
    /// Most sessions open at once; one more is refused with `server_full`.
    /// Default 100,000 (a session costs a few hundred bytes in the core).
    pub max_sessions: usize,
    /// Largest client frame in bytes; larger ones get `frame_too_large`.
    /// Default 65,536. Also the largest server `message` a publish may produce.
    pub max_frame_bytes: usize,
    /// Most rooms one session may be in; one more gets `too_many_rooms`. Default 100.
    pub max_rooms_per_session: usize,
    /// Client frames per second per session, on average (token bucket refill).
    /// Over it: `rate_limited`. Default 50.
    pub rate_per_sec: u32,
    /// Frames a session may send at once before the rate applies (bucket size). Default 100.
    pub rate_burst: u32,
    /// Errors within [`Config::error_window`] that close a session with 1008. Default 10.
    pub max_errors: u32,
    /// The window of [`Config::max_errors`]. Default 10 s.
    pub error_window: Duration,
    /// Silence from a client after which the server sends `ping`. Default 25 s.
    pub heartbeat_interval: Duration,
    /// Further silence after the ping before `heartbeat_timeout`. Default 20 s.
    pub heartbeat_timeout: Duration,
    /// How long a session may stay detached (no transport attached, such as
    /// between two long-polls) before it is closed and freed. Default 60 s:
    /// comfortably longer than a 25 s poll plus a reconnect.
    pub session_idle: Duration,
    /// Who numbers room messages. [`Sequencing::Local`] (the default) keeps
    /// everything in this hub; [`Sequencing::Broker`] hands publishes, joins,
    /// presence and directs to a cluster broker through
    /// [`Output::Broker`](crate::Output::Broker) so that several nodes share
    /// rooms.
    pub sequencing: Sequencing,
}

/// Who numbers room messages and keeps their history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Sequencing {
    /// This hub: one node, everything in process.
    #[default]
    Local,
    /// A cluster broker shared by several nodes (see [`BrokerRequest`](crate::BrokerRequest)).
    Broker,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_sessions: 100_000,
            max_frame_bytes: 65_536,
            max_rooms_per_session: 100,
            rate_per_sec: 50,
            rate_burst: 100,
            max_errors: 10,
            error_window: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(25),
            heartbeat_timeout: Duration::from_secs(20),
            session_idle: Duration::from_secs(60),
            sequencing: Sequencing::Local,
        }
    }
}

impl Config {
    /// Checks that the values can work together.
    ///
    /// # Errors
    /// [`ConfigError`] names the first field that cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_frame_bytes < 64 {
            return Err(ConfigError("max_frame_bytes must be at least 64"));
        }
        if self.rate_per_sec == 0 || self.rate_burst == 0 {
            return Err(ConfigError("rate_per_sec and rate_burst must be positive"));
        }
        if self.max_errors == 0 {
            return Err(ConfigError("max_errors must be positive"));
        }
        if self.heartbeat_interval.is_zero() || self.heartbeat_timeout.is_zero() {
            return Err(ConfigError("heartbeat times must be positive"));
        }
        if self.session_idle.is_zero() {
            return Err(ConfigError("session_idle must be positive"));
        }
        Ok(())
    }
}
