//! The application's rules: who may join and publish where, and what a room keeps.

use std::sync::Arc;
use std::time::Duration;

use crate::codec::Target;
use crate::ids::{RoomName, UserId};
use crate::time::Timestamp;

/// Who a session is, as decided by the caller's authentication.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    /// The user; all of a user's sessions (tabs) share it.
    pub user: UserId,
    /// Whatever else authentication learned (JWT claims, roles), for the
    /// policy to read. `Null` when there is nothing.
    pub claims: serde_json::Value,
    /// When the credential that proved this identity stops being valid (a
    /// JWT's `exp`), on the caller's clock. The hub closes the session then
    /// with `token_expired`, unless a `refresh` brought a later one. `None`:
    /// the session never expires.
    pub expires_at: Option<Timestamp>,
}

impl Identity {
    /// An identity with no claims.
    #[must_use]
    pub fn new(user: impl Into<UserId>) -> Self {
        Self {
            user: user.into(),
            claims: serde_json::Value::Null,
            expires_at: None,
        }
    }

    /// The same identity with `claims`.
    #[must_use]
    pub fn with_claims(mut self, claims: serde_json::Value) -> Self {
        self.claims = claims;
        self
    }

    /// The same identity, valid until `at`.
    #[must_use]
    pub fn with_expiry(mut self, at: Timestamp) -> Self {
        self.expires_at = Some(at);
        self
    }
}

/// Who may publish to a room from a client session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PublishRule {
    /// Members of the room only; others get `not_joined`. The default.
    Members,
    /// Any session, member or not.
    Anyone,
    /// No client; only the application publishes (server-side publish). Clients get `forbidden`.
    ServerOnly,
}

/// What a room keeps and announces, decided by the policy when the room is created.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RoomOptions {
    /// Messages kept for recovery through `since`. Default 100; 0 keeps none.
    pub history: usize,
    /// How long a room with history but no members keeps it before the room is
    /// freed. Default 5 minutes. Bounds memory for rooms nobody comes back to.
    pub history_ttl: Duration,
    /// Whether join/leave `presence` events are sent and `presence` requests
    /// answered (and `joined` carries `members`). Default true.
    pub presence: bool,
    /// `Some` makes a latest-value room, for state such as progress: it keeps
    /// only the newest message of each `event`, a late joiner gets those at
    /// once, and a subscriber too slow to read everything is sent the newest
    /// of each event instead of being closed. Default `None`: every message
    /// counts. Applies with [`Sequencing::Local`](crate::Sequencing::Local).
    pub latest: Option<LatestValue>,
}

impl Default for RoomOptions {
    fn default() -> Self {
        Self {
            history: 100,
            history_ttl: Duration::from_secs(300),
            presence: true,
            latest: None,
        }
    }
}

impl RoomOptions {
    /// Keeps `n` messages.
    #[must_use]
    pub fn history(mut self, n: usize) -> Self {
        self.history = n;
        self
    }

    /// Keeps an empty room's history for `ttl`.
    #[must_use]
    pub fn history_ttl(mut self, ttl: Duration) -> Self {
        self.history_ttl = ttl;
        self
    }

    /// Announces presence or not.
    #[must_use]
    pub fn presence(mut self, on: bool) -> Self {
        self.presence = on;
        self
    }

    /// Makes a latest-value room (see [`RoomOptions::latest`]).
    #[must_use]
    pub fn latest_value(mut self, latest: LatestValue) -> Self {
        self.latest = Some(latest);
        self
    }
}

/// How a latest-value room coalesces: every `event` but the listed ones keeps
/// only its newest message (in history and in a slow subscriber's queue);
/// messages without an `event` count as one more event. Messages of the
/// listed events (outcomes, by default `job_completed` and `job_error`) are
/// all kept and delivered, and never replace or get replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatestValue {
    never_coalesced: Arc<[Box<str>]>,
}

/// The events a [`LatestValue`] room never coalesces unless told otherwise.
pub const DEFAULT_NEVER_COALESCED: [&str; 2] = ["job_completed", "job_error"];

impl Default for LatestValue {
    fn default() -> Self {
        Self::never_coalescing(DEFAULT_NEVER_COALESCED)
    }
}

impl LatestValue {
    /// Coalesces every event but `events` (which replace the defaults).
    #[must_use]
    pub fn never_coalescing<S: Into<Box<str>>>(events: impl IntoIterator<Item = S>) -> Self {
        Self {
            never_coalesced: events.into_iter().map(Into::into).collect(),
        }
    }

    /// The events whose every message is kept and delivered.
    #[must_use]
    pub fn never_coalesced(&self) -> &[Box<str>] {
        &self.never_coalesced
    }

    /// Whether a message with this `event` keeps only its newest copy.
    #[must_use]
    pub fn coalesces(&self, event: Option<&str>) -> bool {
        event.is_none_or(|e| !self.never_coalesced.iter().any(|n| &**n == e))
    }
}

/// The application's authorization and room rules: a plain trait object, no
/// async, called inside the core on every join, publish and direct. Keep it
/// fast and pure; decide from the identity (and its claims) and the room name.
///
/// Every method has a permissive default, so a policy overrides only what it
/// restricts.
///
/// # Example: job rooms only their owner may join, where only the server publishes
///
/// ```
/// use switchboard_core::{Identity, Policy, PublishRule, RoomName, RoomOptions};
///
/// struct Jobs;
///
/// impl Policy for Jobs {
///     fn may_join(&self, who: &Identity, room: &RoomName) -> bool {
///         match room.as_str().strip_prefix("job_") {
///             // The application names job rooms `job_{owner}_{n}`.
///             Some(rest) => rest.split('_').next() == Some(who.user.as_str()),
///             None => true,
///         }
///     }
///     fn publish_rule(&self, _who: &Identity, room: &RoomName) -> PublishRule {
///         if room.as_str().starts_with("job_") {
///             PublishRule::ServerOnly
///         } else {
///             PublishRule::Members
///         }
///     }
///     fn room_options(&self, room: &RoomName) -> RoomOptions {
///         if room.as_str().starts_with("job_") {
///             // Keep the last events so a late page still sees the outcome.
///             RoomOptions::default().history(16).presence(false)
///         } else {
///             RoomOptions::default()
///         }
///     }
/// }
///
/// let alice = Identity::new("alice");
/// let room = RoomName::new("job_alice_7").unwrap();
/// assert!(Jobs.may_join(&alice, &room));
/// assert!(!Jobs.may_join(&Identity::new("bob"), &room));
/// assert_eq!(Jobs.publish_rule(&alice, &room), PublishRule::ServerOnly);
/// ```
pub trait Policy: Send + Sync + 'static {
    /// May this identity join this room? Refused joins get `forbidden`.
    fn may_join(&self, _who: &Identity, _room: &RoomName) -> bool {
        true
    }

    /// Who may publish to this room from this identity's sessions.
    fn publish_rule(&self, _who: &Identity, _room: &RoomName) -> PublishRule {
        PublishRule::Members
    }

    /// May this identity send a direct message to this target? Refused: `forbidden`.
    fn may_direct(&self, _who: &Identity, _to: &Target<'_>) -> bool {
        true
    }

    /// The options of a room, asked once when the room is created.
    fn room_options(&self, _room: &RoomName) -> RoomOptions {
        RoomOptions::default()
    }
}

/// Anyone may join any room and direct anyone; members publish; every room
/// keeps 100 messages and announces presence.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenPolicy;

impl Policy for OpenPolicy {}
