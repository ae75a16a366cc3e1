//! Error codes of the protocol and the errors of each core operation.

use std::fmt;

use serde::Serialize;

/// The protocol's error codes (PROTOCOL.md, Limits and errors), as sent in
/// `error.code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The frame is not a JSON object.
    InvalidJson,
    /// A field is missing or of the wrong kind.
    InvalidFrame,
    /// `type` is not a client frame type.
    UnknownType,
    /// Over `max_frame_bytes`.
    FrameTooLarge,
    /// The room name breaks the rules.
    InvalidRoom,
    /// Publish (or presence) to a room the session is not in.
    NotJoined,
    /// The policy refused it.
    Forbidden,
    /// Over `max_rooms`.
    TooManyRooms,
    /// Over `rate_per_sec`.
    RateLimited,
    /// A `direct` to a user or sid with no session.
    UnknownTarget,
    /// Too many sessions.
    ServerFull,
    /// The session's outbound queue overflowed.
    SlowConsumer,
    /// No frame within the heartbeat window.
    HeartbeatTimeout,
    /// The cluster broker is unreachable: the frame took no effect; retry later.
    Unavailable,
}

impl ErrorCode {
    /// Every code, in table order (handy for metrics).
    pub const ALL: [Self; 14] = [
        Self::InvalidJson,
        Self::InvalidFrame,
        Self::UnknownType,
        Self::FrameTooLarge,
        Self::InvalidRoom,
        Self::NotJoined,
        Self::Forbidden,
        Self::TooManyRooms,
        Self::RateLimited,
        Self::UnknownTarget,
        Self::ServerFull,
        Self::SlowConsumer,
        Self::HeartbeatTimeout,
        Self::Unavailable,
    ];

    /// The code as written on the wire.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::InvalidJson => "invalid_json",
            Self::InvalidFrame => "invalid_frame",
            Self::UnknownType => "unknown_type",
            Self::FrameTooLarge => "frame_too_large",
            Self::InvalidRoom => "invalid_room",
            Self::NotJoined => "not_joined",
            Self::Forbidden => "forbidden",
            Self::TooManyRooms => "too_many_rooms",
            Self::RateLimited => "rate_limited",
            Self::UnknownTarget => "unknown_target",
            Self::ServerFull => "server_full",
            Self::SlowConsumer => "slow_consumer",
            Self::HeartbeatTimeout => "heartbeat_timeout",
            Self::Unavailable => "unavailable",
        }
    }

    /// Position in [`ErrorCode::ALL`], for counters indexed by code.
    #[must_use]
    pub const fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A client frame was refused. The session was sent an `error` frame with
/// [`FrameError::code`] (and closed if its error budget ran out); nothing else
/// changed. The caller need not act; it may log or count.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct FrameError {
    pub(crate) code: ErrorCode,
    pub(crate) message: String,
}

impl FrameError {
    /// A refusal with the protocol's `code` and a message for humans: what a
    /// caller reports when it completes a frame the hub handed out (a
    /// `refresh` whose token its authenticator refused).
    #[must_use]
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// The protocol error code sent to the client.
    #[must_use]
    pub fn code(&self) -> ErrorCode {
        self.code
    }

    /// The human-readable message sent to the client.
    #[must_use]
    pub fn message(&self) -> &str {
        &self.message
    }
}

/// Why [`Hub::handle_frame`](crate::Hub::handle_frame) did nothing at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandleError {
    /// The session key is not (or no longer) a session of this hub: it closed
    /// earlier. Drop the frame; the transport should already be closing.
    #[error("no such session")]
    UnknownSession,
    /// The frame was refused and answered with an `error` frame.
    #[error(transparent)]
    Refused(#[from] FrameError),
}

impl HandleError {
    /// The protocol error code, when the frame reached a live session.
    #[must_use]
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::UnknownSession => None,
            Self::Refused(e) => Some(e.code),
        }
    }
}

/// Why [`Hub::connect`](crate::Hub::connect) refused a session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// `max_sessions` are open. Send `error` `server_full` (see
    /// [`encode_refusal`](crate::codec::encode_refusal)) and close with 1013.
    #[error("server full")]
    ServerFull,
    /// A session with this sid exists. The caller's sid source is broken or
    /// reused a sid; draw a new one.
    #[error("duplicate session id")]
    DuplicateSid,
}

impl ConnectError {
    /// The protocol error code to send to the refused client.
    #[must_use]
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::ServerFull => ErrorCode::ServerFull,
            // Not the client's fault; ask it to retry later, like a full server.
            Self::DuplicateSid => ErrorCode::ServerFull,
        }
    }
}

/// Why a server-side publish ([`Hub::publish`](crate::Hub::publish)) failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The frame would be over `max_frame_bytes`; members could not receive it.
    /// Send less data.
    #[error("message larger than max_frame_bytes")]
    TooLarge,
    /// The event name is longer than 128 bytes.
    #[error("event name longer than 128 bytes")]
    InvalidEvent,
    /// The hub's messages are sequenced by a broker: publish with
    /// [`Hub::prepare_publish`](crate::Hub::prepare_publish) and the broker.
    #[error("messages are sequenced by the broker")]
    Sequenced,
}

impl PublishError {
    /// The protocol error code that describes the failure.
    #[must_use]
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::TooLarge => ErrorCode::FrameTooLarge,
            Self::InvalidEvent => ErrorCode::InvalidFrame,
            Self::Sequenced => ErrorCode::Unavailable,
        }
    }
}

/// Why a server-side direct message ([`Hub::send_direct`](crate::Hub::send_direct))
/// failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DirectError {
    /// No session of that user, or no session with that sid.
    #[error("no session for that target")]
    UnknownTarget,
    /// The frame would be over `max_frame_bytes`.
    #[error("message larger than max_frame_bytes")]
    TooLarge,
    /// The event name is longer than 128 bytes.
    #[error("event name longer than 128 bytes")]
    InvalidEvent,
}

impl DirectError {
    /// The protocol error code that describes the failure.
    #[must_use]
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::UnknownTarget => ErrorCode::UnknownTarget,
            Self::TooLarge => ErrorCode::FrameTooLarge,
            Self::InvalidEvent => ErrorCode::InvalidFrame,
        }
    }
}

/// A [`Config`](crate::Config) that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid config: {0}")]
pub struct ConfigError(pub(crate) &'static str);
