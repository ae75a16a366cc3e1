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

use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use serde_json::value::RawValue;

use crate::codec::{From, ServerFrame, Since, Target, MAX_EVENT_BYTES};
use crate::error::{DirectError, ErrorCode, FrameError, PublishError};
use crate::hub::Hub;
use crate::ids::{Epoch, RoomId, RoomName, SessionKey, Sid, UserId};
use crate::output::{FrameKind, Output, Recipients};
use crate::time::Timestamp;

/// Recent messages a node keeps per room in broker mode at least, so a join
/// can bridge the time the broker took to answer.
const MIN_RECENT: usize = 64;

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
    /// A session left a room (or closed): record `presence` if given, and
    /// unsubscribe from the room's channel if `unsubscribe`. Nothing to report.
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
        let note = first_tab.then_some(PresenceNote {
            user,
            subject: sid,
            announce: r.options.presence,
        });
        let history_ttl = r.options.history_ttl;
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

    /// Broker-mode `publish`; the checks are done.
    #[allow(clippy::too_many_arguments)] // the fields of the client's `publish`, plus who and when
    pub(crate) fn cluster_publish(
        &mut self,
        now: Timestamp,
        key: SessionKey,
        room: RoomName,
        data: &RawValue,
        event: Option<&str>,
        echo: bool,
        id: Option<&RawValue>,
    ) -> Result<(), FrameError> {
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
            .map_or_else(|| self.policy.room_options(room), |r| r.options)
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
                    let ack = ServerFrame::Ack { id }.encode();
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
        let r = &mut self.rooms[rid];
        if let Some(held) = r.resync_buffer.as_mut() {
            held.push(Held {
                seq,
                epoch: epoch.clone(),
                frame,
                exclude: exclude.cloned(),
            });
            return;
        }
        self.deliver_live(rid, seq, epoch, frame, exclude);
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

    /// After a broker reconnect: every room with local members holds its
    /// live messages and must catch up from `since`. Perform a
    /// [`BrokerRequest::Join`]-like fetch for each and call
    /// [`Hub::complete_resync`].
    pub fn begin_resync(&mut self) -> Vec<Resync> {
        self.rooms
            .values_mut()
            .filter(|r| !r.members.is_empty())
            .map(|r| {
                r.resync_buffer.get_or_insert_with(Vec::new);
                Resync {
                    room: r.name.clone(),
                    since: (!r.epoch.as_str().is_empty()).then(|| (r.seq, r.epoch.clone())),
                    history_ttl: r.options.history_ttl,
                }
            })
            .collect()
    }

    /// Finishes a [`Resync`]: delivers what the room's members missed (or,
    /// when the broker cannot replay it, moves the room to the broker's epoch
    /// so clients see the epoch change instead of a silent hole), then the
    /// messages held meanwhile.
    pub fn complete_resync(
        &mut self,
        now: Timestamp,
        room: &RoomName,
        state: Result<RoomSync, ()>,
    ) {
        let Some(rid) = self.room_index.get(room.as_str()).copied() else {
            return;
        };
        if let Ok(sync) = state {
            match sync.replay {
                Some(frames) => {
                    for (seq, frame) in frames {
                        self.deliver_live(rid, seq, &sync.epoch, frame, None);
                    }
                }
                None => {
                    let r = &mut self.rooms[rid];
                    r.history.clear();
                    if r.epoch == sync.epoch {
                        r.live_after.retain(|_, after| *after > sync.seq);
                    } else {
                        r.live_after.clear();
                    }
                    r.epoch = sync.epoch.clone();
                    r.seq = sync.seq;
                }
            }
        }
        let held = self.rooms[rid].resync_buffer.take().unwrap_or_default();
        for h in held {
            self.deliver_live(rid, h.seq, &h.epoch, h.frame, h.exclude.as_ref());
        }
        let _ = now;
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
        return Recipients::shared(r.members_shared(), except);
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
}
