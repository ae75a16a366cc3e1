//! Broker mode ([`Sequencing::Broker`](crate::Sequencing::Broker)): several
//! hubs, one per node, share rooms through a cluster broker.
//!
//! The hub still validates every frame and applies the policy, but whatever
//! must be one for the whole cluster is asked of the broker through
//! [`Output::Broker`]: room messages are numbered and stored by the broker
//! ([`BrokerRequest::Publish`]), a join learns the room's position and what
//! the client missed from it ([`BrokerRequest::Join`]), presence and direct
//! messages span nodes. The caller performs each request (it may do I/O) and
//! reports back with the matching `complete_*` method or [`Hub::reply`];
//! what the broker fans out comes back in through `handle_broker_*`.
//!
//! Ordering: a session's live messages in a room start only after its join
//! completes, with what it missed replayed first, then `joined`, then what
//! arrived while the broker answered (held in the room's recent messages).
//!
//! After the broker connection comes back ([`Hub::begin_resync`]), each room
//! with members here records their presence again and catches up with what
//! it missed; when that cannot be replayed, the room's members here are
//! told with an unasked `joined` carrying `recovered: false` at the room's
//! position, never left with a silent hole (members on other nodes, which
//! missed nothing, are not).

use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use serde_json::value::RawValue;

use crate::codec::{From, ServerFrame, Since, Target, MAX_EVENT_BYTES};
use crate::error::{DirectError, ErrorCode, FrameError, PublishError};
use crate::hub::{ClientPublish, Hub};
use crate::idempotency::{scoped_key, Publisher};
use crate::ids::{Epoch, RoomId, RoomName, SessionKey, Sid, UserId};
use crate::output::{FrameKind, Output, Recipients};
use crate::time::Timestamp;

/// Recent messages a node keeps per room in broker mode at least, so a join
/// can bridge the time the broker took to answer.
const MIN_RECENT: usize = 64;
/// Live messages a room holds at most while it catches up. Past it they are
/// dropped, and the room catches up again from what it delivered once this
/// catch-up ends (the broker's history has them): a slow broker costs
/// another round trip, never memory without bound.
pub(crate) const HOLD_LIMIT: usize = 1024;

/// Something only the cluster broker can do. Perform it, then report back
/// as each variant says. Requests that carry a [`Reply`] have an answer owed
/// to a client; never drop them without reporting.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum BrokerRequest {
    /// Number, store and fan out a room message; then [`Hub::reply`] with
    /// `Ok` or `Err(ErrorCode::Unavailable)`.
    Publish {
        /// The room.
        room: RoomName,
        /// The message's fields after `epoch` as a JSON fragment; the broker
        /// writes `{"type":"message","room":…,"seq":…,"epoch":…,` before it
        /// and `}` after.
        body: String,
        /// The publisher, when it asked for `echo: false`.
        exclude: Option<Sid>,
        /// Messages of history the room keeps.
        history: usize,
        /// How long the room's history outlives its last message.
        history_ttl: Duration,
        /// The publisher's `idempotency_key`, scoped to it
        /// ([`scoped_key`](crate::scoped_key)): the broker publishes at most
        /// once per key within [`IDEMPOTENCY_WINDOW`](crate::IDEMPOTENCY_WINDOW).
        /// `None`: the caller draws a key of its own for its retries.
        idempotency_key: Option<String>,
        /// The client waiting for the answer.
        reply: Reply,
    },
    /// A session joins a room: subscribe to the room's channel if
    /// `subscribe`, record `presence` if given, fetch the room's state (with
    /// what was missed since `since`), then [`Hub::complete_join`].
    Join {
        /// The room.
        room: RoomName,
        /// The client's last seen position.
        since: Option<(u64, Epoch)>,
        /// This node had no member in the room before.
        subscribe: bool,
        /// The user's first session in the room on this node.
        presence: Option<PresenceNote>,
        /// How long the room's history outlives its last message.
        history_ttl: Duration,
        /// The client waiting for the answer.
        reply: Reply,
    },
    /// A session left a room (or closed, or its join was refused): record
    /// `presence` if given, and unsubscribe from the room's channel if
    /// `unsubscribe`. Nothing to report.
    ///
    /// A refused join undoes its presence here whether or not the broker
    /// recorded it: the broker's presence must be idempotent per node (a
    /// leave this node never joined changes nothing).
    Left {
        /// The room.
        room: RoomName,
        /// The node has no member in the room any more.
        unsubscribe: bool,
        /// The user's last session in the room on this node.
        presence: Option<PresenceNote>,
    },
    /// Send a `direct` frame to the target's node(s); then
    /// [`Hub::complete_direct`] with how many nodes had a recipient.
    Direct {
        /// Who receives it.
        to: Recipient,
        /// The encoded `direct` frame.
        frame: Bytes,
        /// The client waiting for the answer.
        reply: Reply,
    },
    /// Fetch the room's users across the cluster; then
    /// [`Hub::complete_presence_list`].
    PresenceList {
        /// The room.
        room: RoomName,
        /// The client waiting for the answer.
        reply: Reply,
    },
    /// After a broker reconnect, for one room with members here: record
    /// `present` again (the broker may have lost it: idempotent, and
    /// announcing nothing), then fetch the room's state since
    /// [`Resync::since`], letting the broker start a new epoch when that
    /// cannot be replayed, and call [`Hub::complete_resync`].
    Resync(Resync),
    /// Start receiving a channel (a session opened, or a user's first session).
    Subscribe(Channel),
    /// Stop receiving a channel.
    Unsubscribe(Channel),
}

/// A broker channel a node listens on while it has local interest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Channel {
    /// A room's messages and presence.
    Room(RoomName),
    /// Direct messages to a user.
    User(UserId),
    /// Direct messages to one session.
    Sid(Sid),
}

/// The recipient of a direct message across the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Recipient {
    /// Every session of a user.
    User(UserId),
    /// One session.
    Sid(Sid),
}

/// A presence change to record in the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceNote {
    /// The user.
    pub user: UserId,
    /// The session that joined or left (not told of its own change).
    pub subject: Sid,
    /// Whether the room announces presence changes.
    pub announce: bool,
    /// How long the room's history outlives its last member across the
    /// cluster (its policy's `history_ttl`).
    pub history_ttl: Duration,
}

/// A client frame waiting for the broker: who to answer, and how.
#[derive(Debug, Clone)]
pub struct Reply {
    pub(crate) session: Option<SessionKey>,
    pub(crate) id: Option<Box<RawValue>>,
    pub(crate) room: Option<RoomName>,
}

impl Reply {
    fn new(session: SessionKey, id: Option<&RawValue>, room: Option<&RoomName>) -> Self {
        Self {
            session: Some(session),
            id: id.map(ToOwned::to_owned),
            room: room.cloned(),
        }
    }

    /// The session waiting, if any.
    #[must_use]
    pub fn session(&self) -> Option<SessionKey> {
        self.session
    }
}

/// A room's state as the broker knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomSync {
    /// The latest `seq`.
    pub seq: u64,
    /// The history epoch.
    pub epoch: Epoch,
    /// Users present across the cluster.
    pub users: usize,
    /// With `since`: every message after it, in order, when all are still
    /// kept in this epoch; `None` when they cannot be replayed.
    pub replay: Option<Vec<(u64, Bytes)>>,
}

/// A server-side publish prepared for the broker ([`Hub::prepare_publish`]).
#[derive(Debug, Clone)]
pub struct PreparedPublish {
    /// The room.
    pub room: RoomName,
    /// As [`BrokerRequest::Publish::body`].
    pub body: String,
    /// Messages of history the room keeps.
    pub history: usize,
    /// How long the room's history outlives its last message.
    pub history_ttl: Duration,
    /// As [`BrokerRequest::Publish::idempotency_key`].
    pub idempotency_key: Option<String>,
}

/// A room that must catch up after a broker reconnect ([`Hub::begin_resync`]).
#[derive(Debug, Clone)]
pub struct Resync {
    /// The room.
    pub room: RoomName,
    /// The last message this node delivered, to fetch what came after.
    pub since: Option<(u64, Epoch)>,
    /// How long the room's history outlives its last message.
    pub history_ttl: Duration,
    /// One note per user with a session in the room on this node, to record
    /// again.
    pub present: Vec<PresenceNote>,
    /// Record `present` with join announcements (the broker took this node
    /// for dead and announced its users' leaves), not quietly.
    pub announce: bool,
}

/// The live messages a room holds while it catches up, at most
/// [`HOLD_LIMIT`] of them.
#[derive(Debug, Clone, Default)]
pub(crate) struct Holding {
    held: Vec<Held>,
    /// Some were dropped (the limit was reached): catch up again.
    overflowed: bool,
}

impl Holding {
    fn hold(&mut self, held: Held) {
        if self.held.len() < HOLD_LIMIT {
            self.held.push(held);
        } else {
            self.overflowed = true;
        }
    }
}

/// A live message held while its room catches up.
#[derive(Debug, Clone)]
pub(crate) struct Held {
    seq: u64,
    epoch: Epoch,
    frame: Bytes,
    exclude: Option<Sid>,
}

/// The part of a `message` after `epoch`.
#[derive(Serialize)]
struct Body<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<&'a str>,
    from: From<'a>,
    data: &'a RawValue,
    ts: u64,
}

/// What a `message` frame adds around the body: type, room, seq and epoch.
const MESSAGE_OVERHEAD: usize = 96;

fn encode_body(event: Option<&str>, from: From<'_>, data: &RawValue, ts: u64) -> String {
    let object = serde_json::to_string(&Body {
        event,
        from,
        data,
        ts,
    })
    // Strings, numbers and valid raw JSON always serialize.
    .unwrap_or_else(|_| String::from("{}"));
    // `{…}` → `…`: the broker writes the braces around its own fields.
    object[1..object.len() - 1].to_owned()
}

fn unavailable() -> FrameError {
    FrameError::new(
        ErrorCode::Unavailable,
        "the cluster broker is unreachable; try again",
    )
}

impl Hub {
    pub(crate) fn clustered(&self) -> bool {
        self.config.sequencing == crate::Sequencing::Broker
    }

    fn request(&mut self, request: BrokerRequest) {
        self.outputs.push_back(Output::Broker(request));
    }

    // ---- client frames in broker mode ------------------------------------

    /// Broker-mode `join` of a room the session is not yet in; the checks are done.
    pub(crate) fn cluster_join(
        &mut self,
        now: Timestamp,
        key: SessionKey,
        room: RoomName,
        since: Option<Since<'_>>,
        presence: bool,
        id: Option<&RawValue>,
    ) {
        let existing = self.room_index.get(room.as_str()).copied();
        let rid = match existing {
            Some(rid) => rid,
            None => self.create_room(now, room.clone()),
        };
        let session = &self.sessions[key];
        let (user, sid) = (session.identity.user.clone(), session.sid.clone());
        let r = &mut self.rooms[rid];
        let first_tab = r.add_member(key, &user, presence);
        r.syncing.insert(key, since.as_ref().map(|s| s.seq));
        let history_ttl = r.options.history_ttl;
        let note = first_tab.then_some(PresenceNote {
            user,
            subject: sid,
            announce: r.options.presence,
            history_ttl,
        });
        self.sessions[key].rooms.insert(rid);
        self.request(BrokerRequest::Join {
            reply: Reply::new(key, id, Some(&room)),
            since: since.map(|s| (s.seq, Epoch::from(&*s.epoch))),
            subscribe: existing.is_none(),
            presence: note,
            history_ttl,
            room,
        });
    }

    /// Broker-mode `publish`; the checks are done, and its key is scoped.
    pub(crate) fn cluster_publish(
        &mut self,
        now: Timestamp,
        key: SessionKey,
        publish: ClientPublish<'_>,
        id: Option<&RawValue>,
    ) -> Result<(), FrameError> {
        let ClientPublish {
            room,
            data,
            event,
            echo,
            idempotency_key,
        } = publish;
        let session = &self.sessions[key];
        let from = From::Session {
            sid: session.sid.as_str(),
            user: session.identity.user.as_str(),
        };
        let body = encode_body(event, from, data, now.as_millis());
        if body.len() + room.as_str().len() + MESSAGE_OVERHEAD > self.config.max_frame_bytes {
            return Err(FrameError::new(
                ErrorCode::FrameTooLarge,
                "the resulting message is larger than max_frame_bytes",
            ));
        }
        let exclude = (!echo).then(|| session.sid.clone());
        let options = self.room_options(&room);
        self.request(BrokerRequest::Publish {
            reply: Reply::new(key, id, Some(&room)),
            room,
            body,
            exclude,
            history: options.history,
            history_ttl: options.history_ttl,
            idempotency_key: idempotency_key.map(str::to_owned),
        });
        Ok(())
    }

    /// Broker-mode `direct`; the policy check is done.
    pub(crate) fn cluster_direct(
        &mut self,
        key: SessionKey,
        to: &Target<'_>,
        data: &RawValue,
        event: Option<&str>,
        id: Option<&RawValue>,
    ) -> Result<(), FrameError> {
        let session = &self.sessions[key];
        let from = From::Session {
            sid: session.sid.as_str(),
            user: session.identity.user.as_str(),
        };
        let frame = ServerFrame::Direct { from, data, event }.encode();
        if frame.len() > self.config.max_frame_bytes {
            return Err(FrameError::new(
                ErrorCode::FrameTooLarge,
                "the resulting message is larger than max_frame_bytes",
            ));
        }
        self.request(BrokerRequest::Direct {
            to: recipient(to),
            frame,
            reply: Reply::new(key, id, None),
        });
        Ok(())
    }

    /// Broker-mode `presence` request; membership is checked.
    pub(crate) fn cluster_presence_list(
        &mut self,
        key: SessionKey,
        room: &RoomName,
        id: Option<&RawValue>,
    ) {
        self.request(BrokerRequest::PresenceList {
            room: room.clone(),
            reply: Reply::new(key, id, Some(room)),
        });
    }

    /// Broker-mode bookkeeping after a member left room `rid` (already removed).
    pub(crate) fn cluster_left(
        &mut self,
        rid: RoomId,
        key: SessionKey,
        sid: &Sid,
        user: &UserId,
        last_tab: bool,
    ) {
        let Some(r) = self.rooms.get_mut(rid) else {
            return;
        };
        r.syncing.remove(&key);
        r.live_after.remove(&key);
        let note = last_tab.then(|| PresenceNote {
            user: user.clone(),
            subject: sid.clone(),
            announce: r.options.presence,
            history_ttl: r.options.history_ttl,
        });
        let unsubscribe = r.members.is_empty();
        let room = r.name.clone();
        if unsubscribe {
            // History lives in the broker: a node keeps no room without members.
            r.history.clear();
            self.rooms.remove(rid);
            self.room_index.remove(room.as_str());
        }
        self.request(BrokerRequest::Left {
            room,
            unsubscribe,
            presence: note,
        });
    }

    /// Broker-mode subscriptions of a new session.
    pub(crate) fn cluster_connected(&mut self, sid: &Sid, user: &UserId, first_of_user: bool) {
        self.request(BrokerRequest::Subscribe(Channel::Sid(sid.clone())));
        if first_of_user {
            self.request(BrokerRequest::Subscribe(Channel::User(user.clone())));
        }
    }

    /// Broker-mode subscriptions of a session that ended.
    pub(crate) fn cluster_disconnected(&mut self, sid: &Sid, user: &UserId, last_of_user: bool) {
        self.request(BrokerRequest::Unsubscribe(Channel::Sid(sid.clone())));
        if last_of_user {
            self.request(BrokerRequest::Unsubscribe(Channel::User(user.clone())));
        }
    }

    fn room_options(&self, room: &RoomName) -> crate::RoomOptions {
        self.room_index
            .get(room.as_str())
            .and_then(|rid| self.rooms.get(*rid))
            .map_or_else(|| self.policy.room_options(room), |r| r.options.clone())
    }

    // ---- completions ----------------------------------------------------

    /// Answers a client frame the broker has acted on: `ack` (if it had an
    /// `id`) on success, else an `error` with `code`.
    pub fn reply(&mut self, now: Timestamp, reply: Reply, result: Result<(), ErrorCode>) {
        let Some(key) = reply.session.filter(|k| self.sessions.contains_key(*k)) else {
            return;
        };
        match result {
            Ok(()) => {
                if let Some(id) = &reply.id {
                    let ack = ServerFrame::Ack {
                        id,
                        expires_in_ms: None,
                    }
                    .encode();
                    self.deliver(Recipients::one(key), ack, FrameKind::Ack);
                }
            }
            Err(code) => {
                let error = match code {
                    ErrorCode::Unavailable => unavailable(),
                    ErrorCode::UnknownTarget => FrameError::new(code, "no session for that target"),
                    other => FrameError::new(other, other.as_str()),
                };
                self.refuse(now, key, error, reply.id.as_deref(), reply.room.as_ref());
            }
        }
    }

    /// Finishes a [`BrokerRequest::Join`]: replays what the client missed,
    /// sends `joined`, then what arrived meanwhile, and starts live delivery.
    /// With `Err` the join is undone and refused with `unavailable`.
    pub fn complete_join(&mut self, now: Timestamp, reply: Reply, state: Result<RoomSync, ()>) {
        let (Some(key), Some(room)) = (reply.session, reply.room.clone()) else {
            return;
        };
        let Some(rid) = self.room_index.get(room.as_str()).copied() else {
            return;
        };
        let Some(since) = self.rooms[rid].syncing.get(&key).copied() else {
            return; // the session left or closed meanwhile
        };
        let Ok(sync) = state else {
            self.rooms[rid].syncing.remove(&key);
            self.remove_membership(now, key, rid);
            self.reply(now, reply, Err(ErrorCode::Unavailable));
            return;
        };
        let r = &mut self.rooms[rid];
        r.syncing.remove(&key);
        // `r.seq` is the last message this node heard from the broker's
        // fan-out, and so delivered to the room's other members. The broker
        // may answer the join before its fan-out of messages up to
        // `sync.seq` reaches this node (two connections, two tasks); those
        // are still owed to the other members, so `r.seq` must not jump to
        // `sync.seq` (it did, and the in-flight messages were then dropped
        // as duplicates for everyone), and the joiner, whose `joined`
        // covers them, is held back from them instead (`live_after`).
        if r.epoch != sync.epoch && (r.seq == 0 || r.history.is_empty() || sync.seq >= r.seq) {
            // The broker's word on the room wins over what this node had
            // seen (a room new here, or a new epoch): its live stream
            // restarts in the broker's epoch, from before any message.
            r.history.clear();
            r.live_after.clear();
            r.epoch = sync.epoch.clone();
            r.seq = 0;
            // Subscribed before the broker was asked: everything after
            // `sync.seq` comes live.
            r.covered = sync.seq;
        }
        if r.epoch == sync.epoch && sync.seq > r.seq {
            r.live_after.insert(key, sync.seq);
        }
        let mut recovered = None;
        if let Some(since) = since {
            recovered = Some(sync.replay.is_some());
            for (seq, frame) in sync.replay.iter().flatten().filter(|(seq, _)| *seq > since) {
                let kind = FrameKind::Message {
                    room: room.clone(),
                    seq: *seq,
                    epoch: sync.epoch.clone(),
                };
                self.deliver(Recipients::one(key), frame.clone(), kind);
            }
        }
        let r = &self.rooms[rid];
        let joined = ServerFrame::Joined {
            room: room.as_str(),
            seq: sync.seq,
            epoch: sync.epoch.as_str(),
            recovered,
            members: r.options.presence.then_some(sync.users),
            latest: false,
        }
        .encode();
        let kind = FrameKind::Joined {
            room: room.clone(),
            seq: sync.seq,
            epoch: sync.epoch.clone(),
        };
        let later: Vec<(u64, Bytes)> = if r.epoch == sync.epoch {
            r.history
                .iter()
                .filter(|(seq, _)| *seq > sync.seq)
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        self.deliver(Recipients::one(key), joined, kind);
        for (seq, frame) in later {
            let kind = FrameKind::Message {
                room: room.clone(),
                seq,
                epoch: sync.epoch.clone(),
            };
            self.deliver(Recipients::one(key), frame, kind);
        }
        self.reply(now, reply, Ok(()));
    }

    /// Finishes a [`BrokerRequest::Direct`]: `Ok(nodes)` with 0 nodes is
    /// `unknown_target`.
    pub fn complete_direct(&mut self, now: Timestamp, reply: Reply, nodes: Result<usize, ()>) {
        let result = match nodes {
            Ok(0) => Err(ErrorCode::UnknownTarget),
            Ok(_) => Ok(()),
            Err(()) => Err(ErrorCode::Unavailable),
        };
        self.reply(now, reply, result);
    }

    /// Finishes a [`BrokerRequest::PresenceList`] with the cluster's users.
    pub fn complete_presence_list(
        &mut self,
        now: Timestamp,
        reply: Reply,
        users: Result<Vec<String>, ()>,
    ) {
        let (Some(key), Some(room)) = (reply.session, reply.room.clone()) else {
            return;
        };
        if !self.sessions.contains_key(key) {
            return;
        }
        match users {
            Ok(mut users) => {
                users.sort_unstable();
                let members: Vec<&str> = users.iter().map(String::as_str).collect();
                let frame = ServerFrame::Presence {
                    room: room.as_str(),
                    action: crate::codec::PresenceAction::List,
                    user: None,
                    count: members.len(),
                    members: Some(members),
                }
                .encode();
                self.deliver(Recipients::one(key), frame, FrameKind::Presence);
                self.reply(now, reply, Ok(()));
            }
            Err(()) => self.reply(now, reply, Err(ErrorCode::Unavailable)),
        }
    }

    // ---- what the broker fans out -----------------------------------------

    /// A room message from the broker: delivered, in the broker's order, to
    /// this node's live members of the room (but the `exclude`d publisher).
    /// Duplicates (a `seq` already delivered in this epoch) are dropped.
    pub fn handle_broker_message(
        &mut self,
        now: Timestamp,
        room: &str,
        seq: u64,
        epoch: &Epoch,
        frame: Bytes,
        exclude: Option<&Sid>,
    ) {
        let _ = now;
        let Some(rid) = self.room_index.get(room).copied() else {
            return;
        };
        self.accept_live(rid, seq, epoch, frame, exclude);
    }

    /// A live message for room `rid`: held while the room catches up;
    /// a `seq` that skips some in the room's epoch (messages lost on the
    /// way) starts a catch-up for the room instead of being delivered over
    /// a hole; else delivered.
    fn accept_live(
        &mut self,
        rid: RoomId,
        seq: u64,
        epoch: &Epoch,
        frame: Bytes,
        exclude: Option<&Sid>,
    ) {
        let r = &mut self.rooms[rid];
        let held = Held {
            seq,
            epoch: epoch.clone(),
            frame,
            exclude: exclude.cloned(),
        };
        if let Some(holding) = r.resync_buffer.as_mut() {
            holding.hold(held);
            return;
        }
        if r.epoch == *epoch && !epoch.as_str().is_empty() && seq > r.position() + 1 {
            r.resync_buffer = Some(Holding {
                held: vec![held],
                overflowed: false,
            });
            self.catch_up(rid);
            return;
        }
        let Held {
            seq,
            epoch,
            frame,
            exclude,
        } = held;
        self.deliver_live(rid, seq, &epoch, frame, exclude.as_ref());
    }

    fn deliver_live(
        &mut self,
        rid: RoomId,
        seq: u64,
        epoch: &Epoch,
        frame: Bytes,
        exclude: Option<&Sid>,
    ) {
        let except = exclude.and_then(|sid| self.by_sid.get(sid.as_str()).copied());
        let r = &mut self.rooms[rid];
        // `r.seq` only ever moves to a message delivered here (or, after a
        // resync that could not replay, to the broker's position), so at or
        // below it in the same epoch is a duplicate.
        if r.epoch == *epoch && seq <= r.seq {
            return; // already delivered
        }
        if r.epoch != *epoch {
            r.history.clear();
            r.live_after.clear(); // a new epoch is news to every member
            r.epoch = epoch.clone();
            r.covered = 0;
        }
        r.seq = seq;
        let cap = r.options.history.max(MIN_RECENT);
        r.remember_up_to(seq, frame.clone(), cap);
        let recipients = live_members(r, except, false, Some(seq));
        r.live_after.retain(|_, after| *after > seq);
        let kind = FrameKind::Message {
            room: r.name.clone(),
            seq,
            epoch: epoch.clone(),
        };
        self.stats.messages += 1;
        self.deliver(recipients, frame, kind);
    }

    /// A presence announcement from the broker, for the room's live members
    /// that want presence events (but the session it is about).
    pub fn handle_broker_presence(&mut self, room: &str, frame: Bytes, subject: Option<&Sid>) {
        let Some(rid) = self.room_index.get(room).copied() else {
            return;
        };
        let except = subject.and_then(|sid| self.by_sid.get(sid.as_str()).copied());
        let recipients = live_members(&mut self.rooms[rid], except, true, None);
        self.deliver(recipients, frame, FrameKind::Presence);
    }

    /// A direct frame from the broker for this node's sessions of a user, or
    /// for one of its sessions.
    pub fn handle_broker_direct(&mut self, to: &Recipient, frame: Bytes) {
        let recipients = match to {
            Recipient::User(user) => match self.by_user.get(user.as_str()) {
                Some(keys) => Recipients::list(keys.clone()),
                None => return,
            },
            Recipient::Sid(sid) => match self.by_sid.get(sid.as_str()) {
                Some(key) => Recipients::one(*key),
                None => return,
            },
        };
        self.deliver(recipients, frame, FrameKind::Direct);
    }

    /// Room `rid` (already holding its live messages) asks the broker for
    /// what came after its position, as after a reconnect but without
    /// recording presence again.
    fn catch_up(&mut self, rid: RoomId) {
        let r = &mut self.rooms[rid];
        r.suspect = None;
        let resync = Resync {
            room: r.name.clone(),
            since: Some((r.position(), r.epoch.clone())),
            history_ttl: r.options.history_ttl,
            present: Vec::new(),
            announce: false,
        };
        self.request(BrokerRequest::Resync(resync));
    }

    /// The rooms whose position the broker should be asked for
    /// ([`Hub::check_positions`]): those with members here, a known epoch,
    /// and no catch-up under way.
    #[must_use]
    pub fn broker_positions(&self) -> Vec<RoomName> {
        self.rooms
            .values()
            .filter(|r| {
                !r.members.is_empty() && r.resync_buffer.is_none() && !r.epoch.as_str().is_empty()
            })
            .map(|r| r.name.clone())
            .collect()
    }

    /// The broker's positions (latest `seq` and epoch, `None` when it has no
    /// state for the room) of rooms from [`Hub::broker_positions`]. A room
    /// that went quiet after its last messages were lost on the way is
    /// behind the broker for good: a room found behind twice in a row, the
    /// second time still short of where the broker was the first time (so
    /// not merely a message still on its way), catches up as if it had seen
    /// a hole.
    pub fn check_positions(&mut self, positions: Vec<(RoomName, Option<(u64, Epoch)>)>) {
        for (room, broker) in positions {
            let Some(rid) = self.room_index.get(room.as_str()).copied() else {
                continue;
            };
            let r = &mut self.rooms[rid];
            if r.resync_buffer.is_some() || r.members.is_empty() {
                continue;
            }
            let broker = broker.unwrap_or_else(|| (0, Epoch::from("")));
            if !r.behind(&broker) {
                r.suspect = None;
                continue;
            }
            match r.suspect.take() {
                Some(before) if r.behind(&before) => {
                    r.resync_buffer = Some(Holding::default());
                    self.catch_up(rid);
                }
                _ => r.suspect = Some(broker),
            }
        }
    }

    /// After a broker reconnect: every room with members here holds its live
    /// messages and must catch up. Queues one [`BrokerRequest::Resync`] per
    /// such room (in [`Hub::poll_output`]); returns how many.
    pub fn begin_resync(&mut self) -> usize {
        self.resync_rooms(false, &|_| true)
    }

    /// As [`Hub::begin_resync`], for only the rooms `which` selects: a
    /// broker that spreads rooms over several backends lost one of them.
    pub fn begin_resync_of(&mut self, which: &dyn Fn(&RoomName) -> bool) -> usize {
        self.resync_rooms(false, which)
    }

    /// After the broker took this node for dead while it was alive (paused,
    /// or cut off longer than its TTL), removed its presence and announced
    /// its users' leaves: as [`Hub::begin_resync`], and presence is recorded
    /// again *with* join announcements, so counts and member lists heal on
    /// every node.
    pub fn begin_rejoin(&mut self) -> usize {
        self.resync_rooms(true, &|_| true)
    }

    /// As [`Hub::begin_rejoin`], for only the rooms `which` selects (the
    /// rooms of the one backend that took this node for dead).
    pub fn begin_rejoin_of(&mut self, which: &dyn Fn(&RoomName) -> bool) -> usize {
        self.resync_rooms(true, which)
    }

    fn resync_rooms(&mut self, announce: bool, which: &dyn Fn(&RoomName) -> bool) -> usize {
        let mut requests = Vec::new();
        for r in self
            .rooms
            .values_mut()
            .filter(|r| !r.members.is_empty() && which(&r.name))
        {
            r.resync_buffer.get_or_insert_with(Holding::default);
            let mut present: Vec<PresenceNote> = Vec::with_capacity(r.users.len());
            let mut seen = std::collections::BTreeSet::new();
            for key in r.members.keys() {
                let Some(session) = self.sessions.get(*key) else {
                    continue;
                };
                if seen.insert(&session.identity.user) {
                    present.push(PresenceNote {
                        user: session.identity.user.clone(),
                        subject: session.sid.clone(),
                        announce: r.options.presence,
                        history_ttl: r.options.history_ttl,
                    });
                }
            }
            requests.push(Resync {
                room: r.name.clone(),
                since: (!r.epoch.as_str().is_empty()).then(|| (r.position(), r.epoch.clone())),
                history_ttl: r.options.history_ttl,
                present,
                announce,
            });
        }
        let count = requests.len();
        for resync in requests {
            self.request(BrokerRequest::Resync(resync));
        }
        count
    }

    /// Finishes a [`BrokerRequest::Resync`]: delivers what the room's members
    /// missed, then the messages held meanwhile.
    ///
    /// When the broker could not replay it (`replay: None`: the history was
    /// trimmed, or lost and the broker started a new epoch) or could not be
    /// asked (`Err`), the room's live members are sent `joined` again with
    /// `recovered: false` (and the broker's position, when known), exactly
    /// what a client that reconnects with a stale `since` gets, instead of a
    /// silent hole.
    pub fn complete_resync(
        &mut self,
        now: Timestamp,
        room: &RoomName,
        state: Result<RoomSync, ()>,
    ) {
        let _ = now;
        let Some(rid) = self.room_index.get(room.as_str()).copied() else {
            return;
        };
        let mut position = None;
        match state {
            Ok(RoomSync {
                replay: Some(frames),
                epoch,
                seq,
                ..
            }) => {
                for (seq, frame) in frames {
                    self.deliver_live(rid, seq, &epoch, frame, None);
                }
                position = Some((seq, epoch));
            }
            Ok(sync) => {
                let r = &mut self.rooms[rid];
                r.history.clear();
                if r.epoch == sync.epoch {
                    r.live_after.retain(|_, after| *after > sync.seq);
                } else {
                    r.live_after.clear();
                }
                r.epoch = sync.epoch.clone();
                r.seq = sync.seq;
                r.covered = 0;
                let members = r.options.presence.then_some(sync.users);
                self.tell_reset(rid, members);
                position = Some((sync.seq, sync.epoch));
            }
            Err(()) => self.tell_reset(rid, None),
        }
        let holding = self.rooms[rid].resync_buffer.take().unwrap_or_default();
        for h in holding.held {
            // Published before the broker's answer, in an epoch it has since
            // left (the messages of a history it just ended): not news.
            let stale = position
                .as_ref()
                .is_some_and(|(seq, epoch)| h.epoch != *epoch && h.seq <= *seq);
            if !stale {
                // A hole among them starts another catch-up, which holds
                // the rest.
                self.accept_live(rid, h.seq, &h.epoch, h.frame, h.exclude.as_ref());
            }
        }
        // Messages were dropped while holding: fetch them (unless a hole
        // among the held ones already started a catch-up).
        let r = &mut self.rooms[rid];
        if holding.overflowed && r.resync_buffer.is_none() && !r.members.is_empty() {
            r.resync_buffer = Some(Holding::default());
            self.catch_up(rid);
        }
    }

    /// Sends the live members of room `rid` an unasked `joined` with
    /// `recovered: false` at the room's current position: what they had
    /// may have a hole, and they must reload the room's state.
    fn tell_reset(&mut self, rid: RoomId, members: Option<usize>) {
        let r = &mut self.rooms[rid];
        let frame = ServerFrame::Joined {
            room: r.name.as_str(),
            seq: r.seq,
            epoch: r.epoch.as_str(),
            recovered: Some(false),
            members,
            latest: false,
        }
        .encode();
        let kind = FrameKind::Joined {
            room: r.name.clone(),
            seq: r.seq,
            epoch: r.epoch.clone(),
        };
        let recipients = live_members(r, None, false, None);
        self.deliver(recipients, frame, kind);
    }

    // ---- server-side sends in broker mode ----------------------------------

    /// Validates and encodes a server-side publish for the broker
    /// (`from: {"server": true}`).
    ///
    /// # Errors
    /// [`PublishError`] when the message could not be delivered as it is.
    pub fn prepare_publish(
        &self,
        now: Timestamp,
        room: &RoomName,
        event: Option<&str>,
        data: &RawValue,
        idempotency_key: Option<&str>,
    ) -> Result<PreparedPublish, PublishError> {
        if event.is_some_and(|e| e.len() > MAX_EVENT_BYTES) {
            return Err(PublishError::InvalidEvent);
        }
        let body = encode_body(event, From::SERVER, data, now.as_millis());
        if body.len() + room.as_str().len() + MESSAGE_OVERHEAD > self.config.max_frame_bytes {
            return Err(PublishError::TooLarge);
        }
        let options = self.room_options(room);
        Ok(PreparedPublish {
            room: room.clone(),
            body,
            history: options.history,
            history_ttl: options.history_ttl,
            idempotency_key: idempotency_key.map(|k| scoped_key(Publisher::Server, k)),
        })
    }

    /// Encodes a server-side `direct` frame for the broker.
    ///
    /// # Errors
    /// [`DirectError`] when the frame could not be delivered as it is.
    pub fn prepare_direct(
        &self,
        event: Option<&str>,
        data: &RawValue,
    ) -> Result<Bytes, DirectError> {
        if event.is_some_and(|e| e.len() > MAX_EVENT_BYTES) {
            return Err(DirectError::InvalidEvent);
        }
        let frame = ServerFrame::Direct {
            from: From::SERVER,
            data,
            event,
        }
        .encode();
        if frame.len() > self.config.max_frame_bytes {
            return Err(DirectError::TooLarge);
        }
        Ok(frame)
    }
}

/// Members that receive live messages (not those still joining, nor, for
/// the message `seq`, those whose `joined` already covered it), optionally
/// only those that want presence events.
fn live_members(
    r: &mut crate::room::Room,
    except: Option<SessionKey>,
    presence_only: bool,
    seq: Option<u64>,
) -> Recipients {
    let held_back = seq.is_some() && !r.live_after.is_empty();
    if r.syncing.is_empty() && !held_back && (!presence_only || r.quiet_members == 0) {
        return r.members_except(except);
    }
    let covered = |k: &SessionKey| {
        seq.is_some_and(|seq| r.live_after.get(k).is_some_and(|after| seq <= *after))
    };
    Recipients::list(
        r.members
            .iter()
            .filter(|(k, wants)| {
                !r.syncing.contains_key(*k)
                    && Some(**k) != except
                    && (!presence_only || **wants)
                    && !covered(k)
            })
            .map(|(k, _)| *k)
            .collect(),
    )
}

fn recipient(to: &Target<'_>) -> Recipient {
    match to {
        Target::User(user) => Recipient::User(UserId::from(&**user)),
        Target::Sid(sid) => Recipient::Sid(Sid::from(&**sid)),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{Config, Identity, Liveness, OpenPolicy, Sequencing};

    const NOW: Timestamp = Timestamp::from_millis(1_000);

    fn hub() -> Hub {
        let config = Config {
            sequencing: Sequencing::Broker,
            ..Config::default()
        };
        Hub::new(config, Arc::new(OpenPolicy), 1).expect("a valid config")
    }

    fn connect(hub: &mut Hub, user: &str) -> SessionKey {
        let key = hub
            .connect(NOW, Sid::from(user), Identity::new(user), Liveness::Client)
            .expect("connect");
        while hub.poll_output().is_some() {}
        key
    }

    /// Sends `join` of room `r`; returns the broker request's reply.
    fn join(hub: &mut Hub, key: SessionKey) -> Reply {
        hub.handle_frame(NOW, key, br#"{"type":"join","room":"r"}"#)
            .expect("join");
        let mut reply = None;
        while let Some(output) = hub.poll_output() {
            if let Output::Broker(BrokerRequest::Join { reply: r, .. }) = output {
                reply = Some(r);
            }
        }
        reply.expect("a join request")
    }

    fn answer(seq: u64) -> Result<RoomSync, ()> {
        Ok(RoomSync {
            seq,
            epoch: Epoch::from("E"),
            users: 1,
            replay: None,
        })
    }

    /// The broker's fan-out of message `seq` of room `r`.
    fn fan_out(hub: &mut Hub, seq: u64) {
        let frame = Bytes::from(format!(r#"{{"type":"message","seq":{seq}}}"#));
        hub.handle_broker_message(NOW, "r", seq, &Epoch::from("E"), frame, None);
    }

    /// The seqs of the `message` frames `key` got since the last call.
    fn seqs(hub: &mut Hub, keys: &[SessionKey]) -> Vec<Vec<u64>> {
        let mut got = vec![Vec::new(); keys.len()];
        while let Some(output) = hub.poll_output() {
            if let Output::Deliver(delivery) = output {
                if let FrameKind::Message { seq, .. } = delivery.kind {
                    for to in delivery.to.iter() {
                        if let Some(i) = keys.iter().position(|k| *k == to) {
                            got[i].push(seq);
                        }
                    }
                }
            }
        }
        got
    }

    /// The broker answers a join at seq 3 before its fan-out of 2 and 3
    /// reaches the node: the member already there still gets them, the
    /// joiner (whose `joined` says 3) does not.
    #[test]
    fn a_join_answered_ahead_of_the_fan_out_costs_the_others_nothing() {
        let mut hub = hub();
        let old = connect(&mut hub, "old");
        let reply = join(&mut hub, old);
        hub.complete_join(NOW, reply, answer(0));
        fan_out(&mut hub, 1);
        assert_eq!(seqs(&mut hub, &[old]), [vec![1]]);
        let new = connect(&mut hub, "new");
        let reply = join(&mut hub, new);
        hub.complete_join(NOW, reply, answer(3));
        for seq in 2..=4 {
            fan_out(&mut hub, seq);
        }
        assert_eq!(seqs(&mut hub, &[old, new]), [vec![2, 3, 4], vec![4]]);
    }

    /// A `seq` that skips one on the live stream is not delivered over the
    /// hole: the room catches up from the last one delivered, and the
    /// member gets the missing message, then the held one.
    #[test]
    fn a_seq_jump_catches_the_room_up() {
        let mut hub = hub();
        let old = connect(&mut hub, "old");
        let reply = join(&mut hub, old);
        hub.complete_join(NOW, reply, answer(0));
        fan_out(&mut hub, 1);
        assert_eq!(seqs(&mut hub, &[old]), [vec![1]]);
        fan_out(&mut hub, 3);
        let asked = resyncs(&mut hub);
        assert_eq!(asked.len(), 1);
        assert_eq!(asked[0].since, Some((1, Epoch::from("E"))));
        assert!(
            asked[0].present.is_empty(),
            "presence is not recorded again"
        );
        fan_out(&mut hub, 4); // held meanwhile
        let missing = Bytes::from_static(br#"{"type":"message","seq":2}"#);
        let sync = RoomSync {
            replay: Some(vec![(2, missing)]),
            ..answer(2).expect("an answer")
        };
        hub.complete_resync(NOW, &RoomName::new("r").expect("a room"), Ok(sync));
        assert_eq!(seqs(&mut hub, &[old]), [vec![2, 3, 4]]);
    }

    /// Live messages past [`HOLD_LIMIT`] while a room catches up are not
    /// held: the room holds no more than the limit, and once the catch-up
    /// ends it delivers what it held and catches up again for the rest.
    #[test]
    fn a_catch_up_holds_a_bounded_number_of_messages_then_catches_up_again() {
        let mut hub = hub();
        let old = connect(&mut hub, "old");
        let reply = join(&mut hub, old);
        hub.complete_join(NOW, reply, answer(0));
        fan_out(&mut hub, 1);
        fan_out(&mut hub, 3); // a hole: catching up from 1
        assert_eq!(resyncs(&mut hub).len(), 1);
        let last = 3 + HOLD_LIMIT as u64 + 100;
        for seq in 4..=last {
            fan_out(&mut hub, seq);
        }
        let r = RoomName::new("r").expect("a room");
        let rid = hub.room_index[r.as_str()];
        let holding = hub.rooms[rid].resync_buffer.as_ref().expect("holding");
        assert_eq!(holding.held.len(), HOLD_LIMIT);
        assert!(holding.overflowed);
        let missing = Bytes::from_static(br#"{"type":"message","seq":2}"#);
        let sync = RoomSync {
            replay: Some(vec![(2, missing)]),
            ..answer(2).expect("an answer")
        };
        hub.complete_resync(NOW, &r, Ok(sync));
        let delivered_up_to = 2 + HOLD_LIMIT as u64;
        let mut got = Vec::new();
        let mut again = Vec::new();
        while let Some(output) = hub.poll_output() {
            match output {
                Output::Deliver(d) => {
                    if let FrameKind::Message { seq, .. } = d.kind {
                        got.push(seq);
                    }
                }
                Output::Broker(BrokerRequest::Resync(resync)) => again.push(resync),
                _ => {}
            }
        }
        assert_eq!(got, (2..=delivered_up_to).collect::<Vec<_>>());
        assert_eq!(again.len(), 1, "catches up again for what it dropped");
        assert_eq!(again[0].since, Some((delivered_up_to, Epoch::from("E"))));
        let rest: Vec<(u64, Bytes)> = (delivered_up_to + 1..=last)
            .map(|seq| {
                (
                    seq,
                    Bytes::from(format!(r#"{{"type":"message","seq":{seq}}}"#)),
                )
            })
            .collect();
        let sync = RoomSync {
            replay: Some(rest),
            ..answer(last).expect("an answer")
        };
        hub.complete_resync(NOW, &r, Ok(sync));
        assert_eq!(
            seqs(&mut hub, &[old]),
            [(delivered_up_to + 1..=last).collect::<Vec<_>>()]
        );
        assert!(hub.rooms[rid].resync_buffer.is_none());
    }

    /// A room behind the broker at two position checks in a row, still
    /// short of where the broker was at the first, catches up; one whose
    /// message was merely on its way when the first check ran does not.
    #[test]
    fn a_room_behind_at_two_position_checks_catches_up() {
        let mut hub = hub();
        let old = connect(&mut hub, "old");
        let reply = join(&mut hub, old);
        hub.complete_join(NOW, reply, answer(0));
        fan_out(&mut hub, 1);
        let r = || RoomName::new("r").expect("a room");
        assert_eq!(hub.broker_positions(), [r()]);
        let at = |seq| vec![(r(), Some((seq, Epoch::from("E"))))];
        hub.check_positions(at(2));
        fan_out(&mut hub, 2); // it was on its way
        hub.check_positions(at(2));
        assert!(resyncs(&mut hub).is_empty());
        hub.check_positions(at(3));
        assert!(resyncs(&mut hub).is_empty(), "one look is not enough");
        hub.check_positions(at(3));
        let asked = resyncs(&mut hub);
        assert_eq!(asked.len(), 1);
        assert_eq!(asked[0].since, Some((2, Epoch::from("E"))));
        assert!(hub.broker_positions().is_empty(), "catching up");
    }

    /// Two joins of a room new to the node, answered out of order: each
    /// joiner gets exactly what follows its own `joined`, once.
    #[test]
    fn joins_answered_out_of_order_each_get_what_follows_their_joined() {
        let mut hub = hub();
        let first = connect(&mut hub, "first");
        let second = connect(&mut hub, "second");
        let first_reply = join(&mut hub, first);
        let second_reply = join(&mut hub, second);
        hub.complete_join(NOW, second_reply, answer(3));
        fan_out(&mut hub, 2);
        fan_out(&mut hub, 3);
        hub.complete_join(NOW, first_reply, answer(1));
        fan_out(&mut hub, 4);
        assert_eq!(seqs(&mut hub, &[first, second]), [vec![2, 3, 4], vec![4]]);
    }

    /// A room message `seq` of epoch `epoch` from the broker's fan-out.
    fn fan_out_in(hub: &mut Hub, seq: u64, epoch: &str) {
        let frame = Bytes::from(format!(
            r#"{{"type":"message","seq":{seq},"epoch":"{epoch}"}}"#
        ));
        hub.handle_broker_message(NOW, "r", seq, &Epoch::from(epoch), frame, None);
    }

    /// What `key` got since the last call: `("message", seq, epoch)` and
    /// `("joined", seq, epoch)` with the frame's text.
    fn received(hub: &mut Hub, key: SessionKey) -> Vec<(&'static str, u64, String, String)> {
        let mut got = Vec::new();
        while let Some(output) = hub.poll_output() {
            if let Output::Deliver(delivery) = output {
                if !delivery.to.iter().any(|to| to == key) {
                    continue;
                }
                let text = String::from_utf8_lossy(&delivery.frame).into_owned();
                match delivery.kind {
                    FrameKind::Message { seq, epoch, .. } => {
                        got.push(("message", seq, epoch.as_str().to_owned(), text));
                    }
                    FrameKind::Joined { seq, epoch, .. } => {
                        got.push(("joined", seq, epoch.as_str().to_owned(), text));
                    }
                    _ => {}
                }
            }
        }
        got
    }

    /// The resync requests queued by [`Hub::begin_resync`].
    fn resyncs(hub: &mut Hub) -> Vec<Resync> {
        let mut out = Vec::new();
        while let Some(output) = hub.poll_output() {
            if let Output::Broker(BrokerRequest::Resync(resync)) = output {
                out.push(resync);
            }
        }
        out
    }

    /// After a reconnect the broker cannot replay what the node missed (its
    /// history was trimmed) and answers with a new epoch: the member is told
    /// `recovered: false` at the broker's position, then gets what follows;
    /// a message of the old epoch held meanwhile is not delivered after it.
    #[test]
    fn a_resync_that_cannot_replay_tells_members_recovered_false() {
        let mut hub = hub();
        let member = connect(&mut hub, "member");
        let reply = join(&mut hub, member);
        hub.complete_join(NOW, reply, answer(0));
        fan_out(&mut hub, 1);
        fan_out(&mut hub, 2);
        assert_eq!(seqs(&mut hub, &[member]), [vec![1, 2]]);

        assert_eq!(hub.begin_resync(), 1);
        let resync = resyncs(&mut hub).pop().expect("a resync request");
        assert_eq!(resync.since, Some((2, Epoch::from("E"))));
        // Held while the broker answers: one published before its answer,
        // in the epoch it ends, one after, in the new one.
        fan_out_in(&mut hub, 3, "E");
        fan_out_in(&mut hub, 10, "F");
        let sync = RoomSync {
            seq: 9,
            epoch: Epoch::from("F"),
            users: 1,
            replay: None,
        };
        hub.complete_resync(NOW, &resync.room, Ok(sync));
        let got = received(&mut hub, member);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!((got[0].0, got[0].1, got[0].2.as_str()), ("joined", 9, "F"));
        assert!(got[0].3.contains(r#""recovered":false"#), "{}", got[0].3);
        assert_eq!(
            (got[1].0, got[1].1, got[1].2.as_str()),
            ("message", 10, "F")
        );
        // Live delivery goes on in the new epoch, duplicates dropped.
        fan_out_in(&mut hub, 10, "F");
        fan_out_in(&mut hub, 11, "F");
        assert_eq!(seqs(&mut hub, &[member]), [vec![11]]);
    }

    /// When the broker cannot be asked at all, members are still told.
    #[test]
    fn a_resync_that_fails_tells_members_recovered_false() {
        let mut hub = hub();
        let member = connect(&mut hub, "member");
        let reply = join(&mut hub, member);
        hub.complete_join(NOW, reply, answer(0));
        for seq in 1..=4 {
            fan_out(&mut hub, seq);
        }
        assert_eq!(seqs(&mut hub, &[member]), [vec![1, 2, 3, 4]]);
        hub.begin_resync();
        let resync = resyncs(&mut hub).pop().expect("a resync request");
        hub.complete_resync(NOW, &resync.room, Err(()));
        let got = received(&mut hub, member);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!((got[0].0, got[0].1), ("joined", 4));
        assert!(got[0].3.contains(r#""recovered":false"#), "{}", got[0].3);
    }

    /// A resync that replays: the missed messages, then the held ones, each
    /// once, in order, and no `joined`.
    #[test]
    fn a_resync_that_replays_delivers_what_was_missed_once() {
        let mut hub = hub();
        let member = connect(&mut hub, "member");
        let reply = join(&mut hub, member);
        hub.complete_join(NOW, reply, answer(2));
        hub.begin_resync();
        let resync = resyncs(&mut hub).pop().expect("a resync request");
        fan_out(&mut hub, 4);
        fan_out(&mut hub, 5);
        let frame = |seq: u64| Bytes::from(format!(r#"{{"seq":{seq}}}"#));
        let sync = RoomSync {
            seq: 4,
            epoch: Epoch::from("E"),
            users: 1,
            replay: Some(vec![(3, frame(3)), (4, frame(4))]),
        };
        hub.complete_resync(NOW, &resync.room, Ok(sync));
        let got = received(&mut hub, member);
        let kinds: Vec<(&str, u64)> = got.iter().map(|g| (g.0, g.1)).collect();
        assert_eq!(kinds, [("message", 3), ("message", 4), ("message", 5)]);
    }

    /// Each user with a session in the room is recorded again once, with
    /// the room's options; a member still joining is not told of a reset.
    #[test]
    fn begin_resync_records_each_present_user_once() {
        let mut hub = hub();
        let tab1 = hub
            .connect(NOW, Sid::from("t1"), Identity::new("ann"), Liveness::Client)
            .expect("connect");
        let tab2 = hub
            .connect(NOW, Sid::from("t2"), Identity::new("ann"), Liveness::Client)
            .expect("connect");
        let bob = connect(&mut hub, "bob");
        while hub.poll_output().is_some() {}
        for key in [tab1, tab2] {
            let reply = join(&mut hub, key);
            hub.complete_join(NOW, reply, answer(0));
        }
        let _still_joining = join(&mut hub, bob);
        // Taken for dead: the same, announced.
        hub.begin_rejoin();
        let rejoin = resyncs(&mut hub).pop().expect("a resync request");
        assert!(rejoin.announce);
        assert_eq!(rejoin.present.len(), 2);
        hub.complete_resync(NOW, &rejoin.room, Err(()));
        hub.begin_resync();
        let resync = resyncs(&mut hub).pop().expect("a resync request");
        assert!(!resync.announce);
        let mut users: Vec<&str> = resync.present.iter().map(|n| n.user.as_str()).collect();
        users.sort_unstable();
        assert_eq!(users, ["ann", "bob"]);
        let options = crate::RoomOptions::default();
        assert!(resync
            .present
            .iter()
            .all(|n| n.history_ttl == options.history_ttl && n.announce == options.presence));
        hub.complete_resync(NOW, &resync.room, Err(()));
        assert!(received(&mut hub, bob).is_empty());
    }

    /// A resync or rejoin for some rooms (one broker shard's) leaves the
    /// others alone.
    #[test]
    fn a_resync_of_some_rooms_leaves_the_others_alone() {
        let mut hub = hub();
        let member = connect(&mut hub, "member");
        let reply = join(&mut hub, member);
        hub.complete_join(NOW, reply, answer(0));
        fan_out(&mut hub, 1);
        assert_eq!(seqs(&mut hub, &[member]), [vec![1]]);
        assert_eq!(hub.begin_resync_of(&|room| room.as_str() == "other"), 0);
        assert_eq!(hub.begin_rejoin_of(&|room| room.as_str() == "other"), 0);
        assert!(resyncs(&mut hub).is_empty());
        fan_out(&mut hub, 2);
        assert_eq!(seqs(&mut hub, &[member]), [vec![2]], "not held");
        assert_eq!(hub.begin_rejoin_of(&|room| room.as_str() == "r"), 1);
        let rejoin = resyncs(&mut hub).pop().expect("a resync request");
        assert!(rejoin.announce);
        assert_eq!(rejoin.since, Some((2, Epoch::from("E"))));
    }

    /// A refused join undoes its presence with the same note it joined with
    /// (the broker ignores it if the join's record never landed).
    #[test]
    fn a_refused_join_leaves_with_the_note_it_joined_with() {
        let mut hub = hub();
        let key = connect(&mut hub, "ann");
        hub.handle_frame(NOW, key, br#"{"type":"join","room":"r"}"#)
            .expect("join");
        let mut joined_note = None;
        let mut reply = None;
        while let Some(output) = hub.poll_output() {
            if let Output::Broker(BrokerRequest::Join {
                presence, reply: r, ..
            }) = output
            {
                joined_note = presence;
                reply = Some(r);
            }
        }
        hub.complete_join(NOW, reply.expect("a join request"), Err(()));
        let mut left_note = None;
        while let Some(output) = hub.poll_output() {
            if let Output::Broker(BrokerRequest::Left {
                presence,
                unsubscribe,
                ..
            }) = output
            {
                assert!(unsubscribe);
                left_note = presence;
            }
        }
        assert_eq!(left_note, joined_note);
        assert!(left_note.is_some());
    }
}
