//! What the hub asks the caller to do.

use std::sync::Arc;

use bytes::Bytes;

use crate::ids::{Epoch, RoomName, SessionKey};

/// One thing the caller must do, drained with [`Hub::poll_output`](crate::Hub::poll_output).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Output {
    /// Queue `frame` for every session in `to`.
    Deliver(Delivery),
    /// The hub has ended this session (its `close` frame was the last
    /// [`Output::Deliver`] to it): flush what is queued for it, then close the
    /// transport with [`CloseReason::code`]. The key is already invalid.
    Close {
        /// The session.
        session: SessionKey,
        /// Why; gives the close code.
        reason: CloseReason,
    },
    /// Broker mode only: something the cluster broker must do.
    Broker(crate::cluster::BrokerRequest),
    /// A client sent a fresh credential (`refresh`): check it with the
    /// authenticator that admitted the session, then report with
    /// [`Hub::complete_refresh`](crate::Hub::complete_refresh). The client
    /// waits for the answer; never drop one without reporting.
    Refresh(crate::credentials::Refresh),
}

/// A frame and who receives it. The frame is encoded once; every recipient
/// gets a clone of the same [`Bytes`].
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Who receives it.
    pub to: Recipients,
    /// One encoded server frame (a JSON object).
    pub frame: Bytes,
    /// What the frame is, for transports that frame by type (SSE's `event:`
    /// line and cursor) without parsing it.
    pub kind: FrameKind,
    /// `Some` for a message of a latest-value room whose event coalesces:
    /// once this frame is queued for a session, a frame with the same key
    /// still queued there and not yet sent is obsolete, and the queue may
    /// drop it (this frame comes later, with a higher `seq`). `None` for
    /// every other frame, which must be delivered.
    pub latest: Option<LatestKey>,
}

/// The room and `event` a latest-value message is the newest value of (see
/// [`Delivery::latest`]). Cloning is an atomic increment; equal keys mean the
/// same room and event.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct LatestKey(Arc<(RoomName, Option<Box<str>>)>);

impl LatestKey {
    /// The key of `room`'s messages with `event` (the hub makes them; queues
    /// and their tests compare them).
    #[must_use]
    pub fn new(room: RoomName, event: Option<&str>) -> Self {
        Self(Arc::new((room, event.map(Box::from))))
    }

    /// The room.
    #[must_use]
    pub fn room(&self) -> &RoomName {
        &self.0 .0
    }

    /// The message's `event`, `None` for messages without one.
    #[must_use]
    pub fn event(&self) -> Option<&str> {
        self.0 .1.as_deref()
    }
}

impl std::fmt::Debug for LatestKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LatestKey({}, {:?})", self.room().as_str(), self.event())
    }
}

/// The type of an encoded server frame, with what SSE needs of a `message`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
#[allow(missing_docs)] // One variant per server frame type of PROTOCOL.md.
pub enum FrameKind {
    Welcome,
    /// A successful join, with the room's position at that moment (SSE
    /// starts a room's cursor here).
    Joined {
        room: RoomName,
        seq: u64,
        epoch: Epoch,
    },
    /// A room message, with its place in the room's sequence.
    Message {
        room: RoomName,
        seq: u64,
        epoch: Epoch,
    },
    Direct,
    Presence,
    Ack,
    Error,
    Ping,
    Pong,
    Close,
}

impl FrameKind {
    /// The frame's `type` as written on the wire.
    #[must_use]
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::Welcome => "welcome",
            Self::Joined { .. } => "joined",
            Self::Message { .. } => "message",
            Self::Direct => "direct",
            Self::Presence => "presence",
            Self::Ack => "ack",
            Self::Error => "error",
            Self::Ping => "ping",
            Self::Pong => "pong",
            Self::Close => "close",
        }
    }
}

/// The sessions a [`Delivery`] goes to.
///
/// A room broadcast shares the room's member list (one `Arc` per room, rebuilt
/// only after membership changes), so a publish to 10,000 members allocates
/// nothing per member.
#[derive(Debug, Clone)]
pub struct Recipients(Repr);

#[derive(Debug, Clone)]
enum Repr {
    One(SessionKey),
    List(Vec<SessionKey>),
    Shared {
        members: Arc<[SessionKey]>,
        except: Option<SessionKey>,
    },
}

impl Recipients {
    pub(crate) fn one(key: SessionKey) -> Self {
        Self(Repr::One(key))
    }

    pub(crate) fn list(keys: Vec<SessionKey>) -> Self {
        Self(Repr::List(keys))
    }

    /// `except`, when given, must be one of `members` (see
    /// `Room::members_except`), so that [`Recipients::len`] is O(1).
    pub(crate) fn shared(members: Arc<[SessionKey]>, except: Option<SessionKey>) -> Self {
        debug_assert!(except.is_none_or(|e| members.contains(&e)));
        Self(Repr::Shared { members, except })
    }

    /// Every recipient, each once.
    pub fn iter(&self) -> impl Iterator<Item = SessionKey> + '_ {
        let (slice, except): (&[SessionKey], Option<SessionKey>) = match &self.0 {
            Repr::One(key) => (std::slice::from_ref(key), None),
            Repr::List(keys) => (keys, None),
            Repr::Shared { members, except } => (members, *except),
        };
        slice.iter().copied().filter(move |k| Some(*k) != except)
    }

    /// How many sessions receive the frame.
    #[must_use]
    pub fn len(&self) -> usize {
        match &self.0 {
            Repr::One(_) => 1,
            Repr::List(keys) => keys.len(),
            Repr::Shared { members, except } => members.len() - usize::from(except.is_some()),
        }
    }

    /// True when nobody receives the frame.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why a session ended; maps to a WebSocket close code and the `close` frame's
/// `reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CloseReason {
    /// The client or transport ended the session normally (1000, `normal`).
    Normal,
    /// The server is shutting down (1001, `going_away`).
    GoingAway,
    /// The application disconnected the session or its user (1008, `disconnected`).
    Disconnected,
    /// Too many refused frames within the error window (1008, `too_many_errors`).
    TooManyErrors,
    /// Nothing arrived within the heartbeat window (1001, `heartbeat_timeout`).
    HeartbeatTimeout,
    /// The outbound queue overflowed (1013, `slow_consumer`); the client may
    /// reconnect and recover through `since`.
    SlowConsumer,
    /// Detached longer than the session idle time (1001, `idle`).
    Idle,
    /// A frame over `max_frame_bytes` where the transport must close (1009,
    /// `frame_too_large`).
    FrameTooLarge,
    /// An internal error (1011, `internal_error`).
    Internal,
    /// The client broke the WebSocket framing (RFC 6455): an unmasked frame,
    /// reserved bits, an unknown opcode, a bad continuation, a fragmented or
    /// oversize control frame, a malformed close frame (1002,
    /// `protocol_error`).
    ProtocolError,
    /// A WebSocket text message, or a close frame's reason, that is not
    /// UTF-8 (1007, `invalid_utf8`).
    InvalidUtf8,
    /// The session's credential expired ([`Identity::expires_at`](crate::Identity::expires_at))
    /// and no `refresh` replaced it in time (1008, `token_expired`).
    TokenExpired,
}

impl CloseReason {
    /// Every reason (handy for metrics).
    pub const ALL: [Self; 12] = [
        Self::Normal,
        Self::GoingAway,
        Self::Disconnected,
        Self::TooManyErrors,
        Self::HeartbeatTimeout,
        Self::SlowConsumer,
        Self::Idle,
        Self::FrameTooLarge,
        Self::Internal,
        Self::ProtocolError,
        Self::InvalidUtf8,
        Self::TokenExpired,
    ];

    /// The WebSocket close code (PROTOCOL.md, Transports).
    #[must_use]
    pub const fn code(self) -> u16 {
        match self {
            Self::Normal => 1000,
            Self::GoingAway | Self::HeartbeatTimeout | Self::Idle => 1001,
            Self::Disconnected | Self::TooManyErrors | Self::TokenExpired => 1008,
            Self::ProtocolError => 1002,
            Self::InvalidUtf8 => 1007,
            Self::FrameTooLarge => 1009,
            Self::Internal => 1011,
            Self::SlowConsumer => 1013,
        }
    }

    /// The `close` frame's `reason`: machine-readable, an error code where the
    /// protocol has one.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::GoingAway => "going_away",
            Self::Disconnected => "disconnected",
            Self::TooManyErrors => "too_many_errors",
            Self::HeartbeatTimeout => "heartbeat_timeout",
            Self::SlowConsumer => "slow_consumer",
            Self::Idle => "idle",
            Self::FrameTooLarge => "frame_too_large",
            Self::Internal => "internal_error",
            Self::ProtocolError => "protocol_error",
            Self::InvalidUtf8 => "invalid_utf8",
            Self::TokenExpired => "token_expired",
        }
    }

    /// Position in [`CloseReason::ALL`].
    #[must_use]
    pub const fn index(self) -> usize {
        self as usize
    }
}
