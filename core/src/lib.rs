//! The sans-IO heart of Switchboard.
//!
//! This crate contains no networking code, no tasks and no clock: it never
//! reads the time, never draws a random number and never touches a socket.
//! It is a state machine that models sessions, rooms, presence, per-room
//! history, heartbeats, limits and validation of every client frame, exactly
//! as `docs/PROTOCOL.md` describes them. A runtime (`switchboard-runtime`)
//! drives it on tokio; tests drive it with the [`sim`] harness and simulated
//! time.
//!
//! ```text
//!            connect / handle_frame / attach / detach / handle_close
//!   caller ───────────── publish / send_direct / close ─────────────▶ ┌─────┐
//!   (owns IO,           handle_timeout(now)  ─────────────────────────▶ │ Hub │
//!    clock and  ◀──── poll_output(): Deliver{to, frame: Bytes} | Close ─ └─────┘
//!    randomness) ◀─── poll_timeout(): the next deadline
//! ```
//!
//! Everything from the world comes in as an argument: time as a
//! [`Timestamp`] on every call, session ids ([`Sid`]) from the caller, and one
//! random `seed` at construction (hash keys and room epochs). What the world
//! must do comes out of [`Hub::poll_output`]; when to call back comes out of
//! [`Hub::poll_timeout`].
//!
//! # A run loop
//!
//! ```
//! use std::sync::Arc;
//! use switchboard_core::{Config, Hub, Identity, Liveness, OpenPolicy, Output, Sid, Timestamp};
//!
//! let mut hub = Hub::new(Config::default(), Arc::new(OpenPolicy), 42).unwrap();
//! let mut now = Timestamp::from_millis(1_700_000_000_000);
//! let alice = hub.connect(now, Sid::new("s-alice"), Identity::new("alice"), Liveness::Client).unwrap();
//! hub.handle_frame(now, alice, br#"{"type":"join","room":"lobby"}"#).unwrap();
//! hub.handle_frame(now, alice, br#"{"type":"publish","room":"lobby","data":"hi"}"#).unwrap();
//!
//! // After every change: drain outputs, then ask for the next deadline.
//! let mut frames = Vec::new();
//! while let Some(output) = hub.poll_output() {
//!     match output {
//!         Output::Deliver(d) => frames.extend(d.to.iter().map(|to| (to, d.frame.clone()))),
//!         Output::Close { .. } => { /* flush and close that transport */ }
//!         _ => {}
//!     }
//! }
//! assert_eq!(frames.len(), 3); // welcome, joined, message (echoed)
//! if let Some(deadline) = hub.poll_timeout() {
//!     now = deadline;
//!     hub.handle_timeout(now); // the heartbeat ping is due
//! }
//! ```
//!
//! # Guarantees
//!
//! - No input panics. A refused client frame is answered with `error` and
//!   changes nothing but the sender's rate-limit tokens and error budget.
//! - A room message is encoded once; every member gets the same [`bytes::Bytes`],
//!   and a broadcast allocates nothing per member.
//! - Membership lookups are O(1); timers cost O(expired · log n) per call.

mod cluster;
pub mod codec;
mod config;
mod credentials;
mod error;
mod hub;
mod idempotency;
mod ids;
mod output;
mod policy;
mod room;
mod session;
pub mod sim;
#[cfg(feature = "proptest")]
pub mod testing;
mod time;
mod timer;

pub use cluster::{
    BrokerRequest, Channel, PreparedPublish, PresenceNote, Recipient, Reply, Resync, RoomSync,
};
pub use codec::{ClientFrame, Request, ServerFrame, Since, Target};
pub use config::{Config, Sequencing};
pub use credentials::Refresh;
pub use error::{
    ConfigError, ConnectError, DirectError, ErrorCode, FrameError, HandleError, PublishError,
};
pub use hub::{Hub, Published, RoomInfo, Stats};
pub use idempotency::{
    is_valid_idempotency_key, scoped_key, Publisher, IDEMPOTENCY_WINDOW, MAX_IDEMPOTENCY_KEY_BYTES,
};
pub use ids::{
    Epoch, RoomId, RoomName, RoomNameError, SessionKey, Sid, UserId, MAX_ROOM_NAME_BYTES,
};
pub use output::{CloseReason, Delivery, FrameKind, LatestKey, Output, Recipients};
pub use policy::{
    Identity, LatestValue, OpenPolicy, Policy, PublishRule, RoomOptions, DEFAULT_NEVER_COALESCED,
};
pub use session::Liveness;
pub use time::Timestamp;

/// Re-exported so callers can build `data` without naming serde_json's feature.
pub use serde_json::value::RawValue;

/// Hash state keyed by the caller's seed: client-chosen strings (room names,
/// user ids, sids) cannot be made to collide.
pub(crate) type HashState = ahash::RandomState;
