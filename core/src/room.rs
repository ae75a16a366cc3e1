//! Per-room state: members, presence, sequence and history.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use indexmap::IndexMap;

use crate::ids::{Epoch, RoomName, SessionKey, UserId};
use crate::output::{LatestKey, Recipients};
use crate::policy::RoomOptions;
use crate::time::Timestamp;
use crate::HashState;

/// A message a join replays: its seq, frame and the key it supersedes
/// queued ones with.
pub(crate) type Replayed = (u64, Bytes, Option<LatestKey>);

pub(crate) struct Room {
    pub(crate) name: RoomName,
    pub(crate) epoch: Epoch,
    /// The latest `seq` published; 0 before the first message.
    pub(crate) seq: u64,
    /// Broker mode: a position in `epoch` the node's live stream is known
    /// to cover from (a join's, when the room started here): messages after
    /// `seq.max(covered)` must come in order, one by one, or some were lost.
    pub(crate) covered: u64,
    /// Broker mode: where the broker was when the last position check found
    /// the room behind it ([`crate::Hub::check_positions`]).
    pub(crate) suspect: Option<(u64, Epoch)>,
    pub(crate) options: RoomOptions,
    /// Members and whether each wants presence events.
    pub(crate) members: IndexMap<SessionKey, bool, HashState>,
    /// Sessions per user, so a user's tabs count once.
    pub(crate) users: HashMap<UserId, u32, HashState>,
    /// Members that asked for no presence events.
    pub(crate) quiet_members: usize,
    /// The last `options.history` messages, oldest first. In a latest-value
    /// room, at most one per coalescing event (so seqs have gaps).
    pub(crate) history: VecDeque<(u64, Bytes)>,
    /// Latest-value room: the seq of each coalescing event's message in
    /// `history`.
    latest_index: HashMap<LatestKey, u64, HashState>,
    /// Latest-value room: the highest seq the `history` bound dropped (not a
    /// message replaced by a newer one of its event). A `since` below it
    /// cannot be recovered.
    evicted_through: u64,
    /// The member list shared by broadcasts; `None` after membership changed.
    snapshot: Option<Arc<[SessionKey]>>,
    /// Last publish, or when the last member left: starts the history TTL.
    pub(crate) last_activity: Timestamp,
    /// Deadline of this room's live entry in the timer queue.
    pub(crate) timer_at: Option<Timestamp>,
    /// Broker mode: members whose join waits for the broker, with their
    /// `since` seq; they get no live messages until it completes.
    pub(crate) syncing: HashMap<SessionKey, Option<u64>, HashState>,
    /// Broker mode: members whose `joined` carried a seq this node has not
    /// heard yet (the broker answered the join before its fan-out of the
    /// messages up to that seq arrived here). Live messages up to that seq
    /// are not theirs; the room's other members still get them.
    pub(crate) live_after: HashMap<SessionKey, u64, HashState>,
    /// Broker mode: live messages held while the room catches up after a
    /// broker reconnect or a hole (`Some` while it does), bounded.
    pub(crate) resync_buffer: Option<crate::cluster::Holding>,
    /// Without a broker: the keys of recent keyed publishes.
    pub(crate) recent_keys: crate::idempotency::RecentKeys,
}

impl Room {
    pub(crate) fn new(
        name: RoomName,
        epoch: Epoch,
        options: RoomOptions,
        now: Timestamp,
        hash: &HashState,
    ) -> Self {
        Self {
            name,
            epoch,
            seq: 0,
            covered: 0,
            suspect: None,
            options,
            members: IndexMap::with_hasher(hash.clone()),
            users: HashMap::with_hasher(hash.clone()),
            quiet_members: 0,
            history: VecDeque::new(),
            latest_index: HashMap::with_hasher(hash.clone()),
            evicted_through: 0,
            snapshot: None,
            last_activity: now,
            timer_at: None,
            syncing: HashMap::with_hasher(hash.clone()),
            live_after: HashMap::with_hasher(hash.clone()),
            resync_buffer: None,
            recent_keys: crate::idempotency::RecentKeys::new(hash.clone()),
        }
    }

    /// Broker mode: the position in `epoch` up to which the room's members
    /// have what they are owed (what a catch-up starts after).
    pub(crate) fn position(&self) -> u64 {
        self.seq.max(self.covered)
    }

    /// Broker mode: whether the broker at `(seq, epoch)` has messages (or
    /// an epoch) this room's members were not given.
    pub(crate) fn behind(&self, (seq, epoch): &(u64, Epoch)) -> bool {
        self.epoch != *epoch || self.position() < *seq
    }

    /// Adds a member; returns true when it is the user's first session here.
    pub(crate) fn add_member(&mut self, key: SessionKey, user: &UserId, presence: bool) -> bool {
        self.members.insert(key, presence);
        self.quiet_members += usize::from(!presence);
        self.snapshot = None;
        let tabs = self.users.entry(user.clone()).or_insert(0);
        *tabs += 1;
        *tabs == 1
    }

    /// Removes a member; returns true when it was the user's last session here.
    pub(crate) fn remove_member(&mut self, key: SessionKey, user: &UserId) -> bool {
        let Some(presence) = self.members.swap_remove(&key) else {
            return false;
        };
        self.quiet_members -= usize::from(!presence);
        self.snapshot = None;
        match self.users.get_mut(user) {
            Some(tabs) if *tabs > 1 => {
                *tabs -= 1;
                false
            }
            Some(_) => {
                self.users.remove(user);
                true
            }
            // Invariant: every member's user is counted in `users`.
            None => false,
        }
    }

    /// Changes whether a member wants presence events.
    pub(crate) fn set_presence(&mut self, key: SessionKey, presence: bool) {
        if let Some(flag) = self.members.get_mut(&key) {
            if *flag != presence {
                *flag = presence;
                if presence {
                    self.quiet_members -= 1;
                } else {
                    self.quiet_members += 1;
                }
            }
        }
    }

    /// All members, shared; rebuilt only after membership changed.
    /// Every member but `except`, sharing the room's member list.
    pub(crate) fn members_except(&mut self, except: Option<SessionKey>) -> Recipients {
        // O(1) here keeps `Recipients::len` from scanning the list for it.
        let except = except.filter(|k| self.members.contains_key(k));
        Recipients::shared(self.members_shared(), except)
    }

    pub(crate) fn members_shared(&mut self) -> Arc<[SessionKey]> {
        self.snapshot
            .get_or_insert_with(|| self.members.keys().copied().collect())
            .clone()
    }

    /// Appends a message to the bounded history.
    pub(crate) fn remember(&mut self, seq: u64, frame: Bytes) {
        self.remember_up_to(seq, frame, self.options.history);
    }

    /// Appends a published message to history: in a latest-value room it
    /// replaces the retained message of its event, if it coalesces. Returns
    /// the key the message supersedes queued ones with, if any.
    pub(crate) fn remember_message(
        &mut self,
        seq: u64,
        frame: Bytes,
        event: Option<&str>,
    ) -> Option<LatestKey> {
        let Some(latest) = &self.options.latest else {
            self.remember(seq, frame);
            return None;
        };
        let key = latest
            .coalesces(event)
            .then(|| LatestKey::new(self.name.clone(), event));
        if let Some(key) = &key {
            if let Some(old) = self.latest_index.insert(key.clone(), seq) {
                // Seqs in history ascend.
                if let Ok(i) = self.history.binary_search_by_key(&old, |(s, _)| *s) {
                    self.history.remove(i);
                }
            }
        }
        let cap = self.options.history;
        while !self.history.is_empty() && self.history.len() >= cap {
            if let Some((dropped, _)) = self.history.pop_front() {
                self.evicted_through = dropped;
                self.latest_index.retain(|_, s| *s != dropped);
            }
        }
        if cap == 0 {
            self.latest_index.clear();
            self.evicted_through = seq;
        } else {
            self.history.push_back((seq, frame));
        }
        key
    }

    /// Latest-value room: what a join replays, each message with the key it
    /// supersedes queued ones with, and the join's `recovered`. With a
    /// `since` this room can answer (its epoch, not ahead, nothing it needs
    /// dropped by the bound), the retained messages after it and `true`;
    /// otherwise all of them (the room's current state), and `false` when a
    /// `since` was sent.
    pub(crate) fn latest_replay(
        &self,
        since: Option<(u64, &str)>,
    ) -> (Vec<Replayed>, Option<bool>) {
        let recovered = since.map(|(seq, epoch)| {
            epoch == self.epoch.as_str() && seq <= self.seq && seq >= self.evicted_through
        });
        let after = match (since, recovered) {
            (Some((seq, _)), Some(true)) => seq,
            _ => 0,
        };
        let keys: HashMap<u64, &LatestKey> =
            self.latest_index.iter().map(|(k, s)| (*s, k)).collect();
        let replay = self
            .history
            .iter()
            .filter(|(seq, _)| *seq > after)
            .map(|(seq, frame)| (*seq, frame.clone(), keys.get(seq).map(|k| (*k).clone())))
            .collect();
        (replay, recovered)
    }

    /// Appends a message, keeping at most `cap`.
    pub(crate) fn remember_up_to(&mut self, seq: u64, frame: Bytes, cap: usize) {
        if cap == 0 {
            return;
        }
        while self.history.len() >= cap {
            self.history.pop_front();
        }
        self.history.push_back((seq, frame));
    }

    /// The retained messages after `since`, when they are everything published
    /// after it in this epoch; `None` when the client must reload instead.
    pub(crate) fn recover(
        &self,
        since_seq: u64,
        since_epoch: &str,
    ) -> Option<impl Iterator<Item = &Bytes>> {
        if since_epoch != self.epoch.as_str() || since_seq > self.seq {
            return None;
        }
        if since_seq < self.seq {
            let oldest = self.history.front()?.0;
            if oldest > since_seq + 1 {
                return None;
            }
        }
        // Seqs in history are consecutive, so the first wanted one is at a known offset.
        let skip = self
            .history
            .front()
            .map_or(0, |(oldest, _)| (since_seq + 1).saturating_sub(*oldest));
        let skip = usize::try_from(skip).unwrap_or(usize::MAX);
        Some(self.history.iter().skip(skip).map(|(_, frame)| frame))
    }

    /// Drops the history (its TTL ran out).
    pub(crate) fn forget_history(&mut self) {
        self.history.clear();
        self.latest_index.clear();
        self.evicted_through = self.seq;
    }

    /// A room with no members and no history costs memory for nothing.
    pub(crate) fn is_disposable(&self) -> bool {
        self.members.is_empty() && self.history.is_empty()
    }
}
