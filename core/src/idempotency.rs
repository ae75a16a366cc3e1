//! Publishing at most once: the keys of a room's recent publishes.
//!
//! A client (or the application) that did not hear whether a publish took
//! effect (the connection dropped, the node died, the answer timed out) may
//! send it again with the same `idempotency_key`; a publish whose key is
//! remembered is answered as published and not published again. Keys are
//! scoped to their publisher, so one user cannot suppress another's
//! messages by reusing a key. With a broker the broker remembers them,
//! cluster-wide; without one, each room remembers its own here.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use crate::ids::UserId;
use crate::time::Timestamp;
use crate::HashState;

/// Maximum length in bytes of an `idempotency_key`.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 64;

/// Whether `key` may be an `idempotency_key`: 1 to
/// [`MAX_IDEMPOTENCY_KEY_BYTES`] bytes (the frame's and the HTTP API's rule).
#[must_use]
pub fn is_valid_idempotency_key(key: &str) -> bool {
    !key.is_empty() && key.len() <= MAX_IDEMPOTENCY_KEY_BYTES
}

/// How long a publish's key is remembered.
pub const IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(60);

/// Keys a room remembers at most (without a broker): past it, the oldest is
/// forgotten early, so a flood of keyed publishes costs bounded memory.
pub(crate) const MAX_RECENT_KEYS: usize = 1024;

/// Who published, for scoping a key.
#[derive(Debug, Clone, Copy)]
pub enum Publisher<'a> {
    /// A client session's user.
    User(&'a UserId),
    /// The application (`from: {"server": true}`).
    Server,
}

/// The key as remembered: the publisher's scope, then the client's key. The
/// user's length goes first, so that no user and key pair can spell
/// another's.
#[must_use]
pub fn scoped_key(publisher: Publisher<'_>, key: &str) -> String {
    match publisher {
        Publisher::User(user) => format!("u{}:{user}:{key}", user.as_str().len()),
        Publisher::Server => format!("s:{key}"),
    }
}

/// The keys of a room's recent publishes and the `seq` each got, for
/// [`IDEMPOTENCY_WINDOW`] and at most [`MAX_RECENT_KEYS`] of them.
#[derive(Debug)]
pub(crate) struct RecentKeys {
    seqs: HashMap<Box<str>, u64, HashState>,
    /// Oldest first, to forget them in order.
    order: VecDeque<(Timestamp, Box<str>)>,
}

impl RecentKeys {
    /// None yet; `hash` is the hub's seeded hasher (keys come from clients).
    pub(crate) fn new(hash: HashState) -> Self {
        Self {
            seqs: HashMap::with_hasher(hash),
            order: VecDeque::new(),
        }
    }

    /// The seq the publish with this (scoped) key got, if remembered.
    pub(crate) fn get(&mut self, now: Timestamp, key: &str) -> Option<u64> {
        self.forget_expired(now);
        self.seqs.get(key).copied()
    }

    /// Remembers a publish's (scoped) key.
    pub(crate) fn insert(&mut self, now: Timestamp, key: &str, seq: u64) {
        self.forget_expired(now);
        if self.order.len() >= MAX_RECENT_KEYS {
            if let Some((_, oldest)) = self.order.pop_front() {
                self.seqs.remove(&oldest);
            }
        }
        let key: Box<str> = key.into();
        self.seqs.insert(key.clone(), seq);
        self.order.push_back((now, key));
    }

    /// How many keys are remembered.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.seqs.len()
    }

    fn forget_expired(&mut self, now: Timestamp) {
        while let Some((at, _)) = self.order.front() {
            if now.saturating_since(*at) < IDEMPOTENCY_WINDOW {
                break;
            }
            if let Some((_, key)) = self.order.pop_front() {
                self.seqs.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Timestamp = Timestamp::from_millis(1_000_000);

    #[test]
    fn a_key_is_remembered_for_the_window_then_forgotten() {
        let mut keys = RecentKeys::new(HashState::with_seeds(1, 2, 3, 4));
        keys.insert(T0, "k", 7);
        assert_eq!(keys.get(T0 + IDEMPOTENCY_WINDOW / 2, "k"), Some(7));
        assert_eq!(keys.get(T0 + IDEMPOTENCY_WINDOW, "k"), None);
        assert_eq!(keys.len(), 0);
    }

    #[test]
    fn past_the_bound_the_oldest_key_is_forgotten_first() {
        let mut keys = RecentKeys::new(HashState::with_seeds(1, 2, 3, 4));
        for i in 0..MAX_RECENT_KEYS as u64 + 10 {
            keys.insert(T0, &i.to_string(), i);
        }
        assert_eq!(keys.len(), MAX_RECENT_KEYS);
        assert_eq!(keys.get(T0, "9"), None);
        assert_eq!(keys.get(T0, "10"), Some(10));
    }

    #[test]
    fn scopes_do_not_collide() {
        let a = UserId::from("a:b");
        let ab = UserId::from("a");
        assert_ne!(
            scoped_key(Publisher::User(&a), "c"),
            scoped_key(Publisher::User(&ab), "b:c")
        );
        assert_ne!(
            scoped_key(Publisher::Server, "k"),
            scoped_key(Publisher::User(&UserId::from("s")), "k")
        );
    }
}
