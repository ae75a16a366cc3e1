//! The runtime's public error.

use std::fmt;

use switchboard_core::{DirectError, ErrorCode, PublishError, RoomNameError};

/// Why a server-side call (publish, direct) failed. Opaque so internals can
/// change; ask with the `is_*` predicates or [`Error::code`].
#[derive(Debug)]
pub struct Error {
    kind: Kind,
}

#[derive(Debug)]
pub(crate) enum Kind {
    InvalidRoom(RoomNameError),
    Publish(PublishError),
    Direct(DirectError),
    Data(serde_json::Error),
    ShuttingDown,
    Unavailable(String),
}

impl Error {
    pub(crate) fn new(kind: Kind) -> Self {
        Self { kind }
    }

    /// The room name breaks the protocol's rules.
    #[must_use]
    pub fn is_invalid_room(&self) -> bool {
        matches!(self.kind, Kind::InvalidRoom(_))
    }

    /// The message would be over `max_frame_bytes`, or its event name too long.
    #[must_use]
    pub fn is_invalid_message(&self) -> bool {
        matches!(
            self.kind,
            Kind::Publish(_)
                | Kind::Direct(DirectError::TooLarge | DirectError::InvalidEvent)
                | Kind::Data(_)
        )
    }

    /// A direct message found no session.
    #[must_use]
    pub fn is_unknown_target(&self) -> bool {
        matches!(self.kind, Kind::Direct(DirectError::UnknownTarget))
    }

    /// The cluster broker is unreachable; nothing was sent.
    #[must_use]
    pub fn is_unavailable(&self) -> bool {
        matches!(self.kind, Kind::Unavailable(_))
    }

    /// The Switchboard is shutting down.
    #[must_use]
    pub fn is_shutting_down(&self) -> bool {
        matches!(self.kind, Kind::ShuttingDown)
    }

    /// The protocol error code that describes the failure.
    #[must_use]
    pub fn code(&self) -> ErrorCode {
        match &self.kind {
            Kind::InvalidRoom(_) => ErrorCode::InvalidRoom,
            Kind::Publish(e) => e.code(),
            Kind::Direct(e) => e.code(),
            Kind::Data(_) => ErrorCode::InvalidFrame,
            Kind::ShuttingDown => ErrorCode::ServerFull,
            Kind::Unavailable(_) => ErrorCode::Unavailable,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::InvalidRoom(e) => write!(f, "invalid room: {e}"),
            Kind::Publish(e) => write!(f, "publish failed: {e}"),
            Kind::Direct(e) => write!(f, "direct message failed: {e}"),
            Kind::Data(e) => write!(f, "data does not serialize to JSON: {e}"),
            Kind::ShuttingDown => f.write_str("shutting down"),
            Kind::Unavailable(e) => write!(f, "cluster broker unavailable: {e}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            Kind::InvalidRoom(e) => Some(e),
            Kind::Publish(e) => Some(e),
            Kind::Direct(e) => Some(e),
            Kind::Data(e) => Some(e),
            Kind::ShuttingDown | Kind::Unavailable(_) => None,
        }
    }
}
