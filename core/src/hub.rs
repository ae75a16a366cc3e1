//! The state machine.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use serde_json::value::RawValue;
use slotmap::SlotMap;

use crate::codec::{
    decode_client, ClientFrame, From, HeartbeatInfo, LimitsInfo, PresenceAction, ServerFrame,
    Since, Target, MAX_EVENT_BYTES,
};
use crate::config::Config;
use crate::error::{
    ConfigError, ConnectError, DirectError, ErrorCode, FrameError, HandleError, PublishError,
};
use crate::idempotency::{scoped_key, Publisher};
use crate::ids::{Epoch, RoomId, RoomName, SessionKey, Sid, UserId};
use crate::output::{CloseReason, Delivery, FrameKind, LatestKey, Output, Recipients};
use crate::policy::{Identity, Policy, PublishRule};
use crate::room::Room;
use crate::session::{Liveness, Session};
use crate::time::Timestamp;
use crate::timer::{TimerQueue, TimerTarget};
use crate::HashState;

/// A client's `publish`, as decoded (its key scoped to the publisher once
/// it reaches the broker path).
pub(crate) struct ClientPublish<'a> {
    pub(crate) room: RoomName,
    pub(crate) data: &'a RawValue,
    pub(crate) event: Option<&'a str>,
    pub(crate) echo: bool,
    pub(crate) idempotency_key: Option<&'a str>,
}

/// What a successful publish produced: the message's place in its room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The message's `seq`.
    pub seq: u64,
    /// The room's `epoch`.
    pub epoch: Epoch,
    /// How many sessions it was delivered to.
    pub delivered: usize,
}

/// A room as seen from outside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomInfo {
    /// The latest `seq`.
    pub seq: u64,
    /// The history epoch.
    pub epoch: Epoch,
    /// Member sessions.
    pub sessions: usize,
    /// Distinct member users, sorted.
    pub users: Vec<UserId>,
}

/// Counters since the hub started, for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Sessions opened.
    pub sessions_opened: u64,
    /// Client frames received (accepted or refused).
    pub frames_in: u64,
    /// Frames queued for delivery, counted per recipient.
    pub frames_out: u64,
    /// Room messages published (each counted once).
    pub messages: u64,
    /// Refused frames by [`ErrorCode::index`].
    pub errors: [u64; ErrorCode::ALL.len()],
    /// Closed sessions by [`CloseReason::index`].
    pub closes: [u64; CloseReason::ALL.len()],
}

/// The sans-IO Switchboard: sessions, rooms, presence, history, heartbeat and
/// validation, driven entirely by the caller.
///
/// Method kinds, after quinn-proto: getters take `&self`; `handle_*` feed it
/// what happened (a frame, a timeout, a transport that went away); commands
/// (`connect`, `publish`, `send_direct`, `close`, ...) are what the
/// application wants; `poll_*` say what the caller must now do.
///
/// **Contract:** after every call that takes `&mut self`, drain
/// [`poll_output`](Self::poll_output) until it returns `None`, then ask
/// [`poll_timeout`](Self::poll_timeout) for the next deadline and call
/// [`handle_timeout`](Self::handle_timeout) when it comes.
pub struct Hub {
    pub(crate) config: Config,
    pub(crate) policy: Arc<dyn Policy>,
    pub(crate) hash: HashState,
    pub(crate) sessions: SlotMap<SessionKey, Session>,
    pub(crate) by_sid: HashMap<Sid, SessionKey, HashState>,
    pub(crate) by_user: HashMap<UserId, Vec<SessionKey>, HashState>,
    pub(crate) rooms: SlotMap<RoomId, Room>,
    pub(crate) room_index: HashMap<RoomName, RoomId, HashState>,
    pub(crate) timers: TimerQueue,
    pub(crate) outputs: VecDeque<Output>,
    pub(crate) epoch_seed: u64,
    pub(crate) epochs_drawn: u64,
    pub(crate) ping_frame: Bytes,
    pub(crate) pong_frame: Bytes,
    pub(crate) stats: Stats,
    /// Set by a handler whose answer waits for the caller (the broker, or
    /// the authenticator for a `refresh`): no `ack` yet.
    pub(crate) deferred: bool,
    /// Set while [`Hub::close_all`] runs: no presence leaves are announced.
    closing_all: bool,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("sessions", &self.sessions.len())
            .field("rooms", &self.rooms.len())
            .field("pending_outputs", &self.outputs.len())
            .finish_non_exhaustive()
    }
}

impl Hub {
    /// A hub with `config` and the application's `policy`.
    ///
    /// `seed` is the caller's randomness: it keys the hash maps that hold
    /// client-chosen strings (so clients cannot force collisions) and seeds
    /// room epochs (so a restarted server never reuses one). Draw it from the
    /// OS; a fixed seed makes a run reproducible, which is what tests want.
    ///
    /// # Errors
    /// [`ConfigError`] when `config` cannot work.
    pub fn new(config: Config, policy: Arc<dyn Policy>, seed: u64) -> Result<Self, ConfigError> {
        config.validate()?;
        let mut state = seed;
        let mut next = || splitmix64(&mut state);
        let hash = HashState::with_seeds(next(), next(), next(), next());
        let epoch_seed = next();
        Ok(Self {
            config,
            policy,
            by_sid: HashMap::with_hasher(hash.clone()),
            by_user: HashMap::with_hasher(hash.clone()),
            room_index: HashMap::with_hasher(hash.clone()),
            hash,
            sessions: SlotMap::with_key(),
            rooms: SlotMap::with_key(),
            timers: TimerQueue::default(),
            outputs: VecDeque::new(),
            epoch_seed,
            epochs_drawn: 0,
            ping_frame: ServerFrame::Ping.encode(),
            pong_frame: ServerFrame::Pong.encode(),
            stats: Stats::default(),
            deferred: false,
            closing_all: false,
        })
    }

    // ---- getters -------------------------------------------------------

    /// The configuration.
    #[must_use]
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Counters since start.
    #[must_use]
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Open sessions.
    #[must_use]
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Rooms held (with members or history).
    #[must_use]
    pub fn room_count(&self) -> usize {
        self.rooms.len()
    }

    /// Entries in the timer queue (for leak checks: about one per session and
    /// per empty room with history).
    #[must_use]
    pub fn timer_count(&self) -> usize {
        self.timers.len()
    }

    /// Whether `session` is open.
    #[must_use]
    pub fn contains(&self, session: SessionKey) -> bool {
        self.sessions.contains_key(session)
    }

    /// The session with this sid.
    #[must_use]
    pub fn session_by_sid(&self, sid: &str) -> Option<SessionKey> {
        self.by_sid.get(sid).copied()
    }

    /// A session's sid.
    #[must_use]
    pub fn sid(&self, session: SessionKey) -> Option<&Sid> {
        self.sessions.get(session).map(|s| &s.sid)
    }

    /// A session's identity.
    #[must_use]
    pub fn identity(&self, session: SessionKey) -> Option<&Identity> {
        self.sessions.get(session).map(|s| &s.identity)
    }

    /// The sessions of a user.
    #[must_use]
    pub fn user_sessions(&self, user: &str) -> &[SessionKey] {
        self.by_user.get(user).map_or(&[], Vec::as_slice)
    }

    /// The rooms a session is in.
    pub fn session_rooms(&self, session: SessionKey) -> impl Iterator<Item = &RoomName> + '_ {
        self.sessions
            .get(session)
            .into_iter()
            .flat_map(|s| s.rooms.iter())
            .filter_map(|id| self.rooms.get(*id).map(|r| &r.name))
    }

    /// Whether `session` is a member of `room`. O(1).
    #[must_use]
    pub fn is_member(&self, session: SessionKey, room: &str) -> bool {
        self.room_index
            .get(room)
            .and_then(|id| self.rooms.get(*id))
            .is_some_and(|r| r.members.contains_key(&session))
    }

    /// The members (sessions) of a room.
    pub fn members(&self, room: &str) -> impl Iterator<Item = SessionKey> + '_ {
        self.room_index
            .get(room)
            .and_then(|id| self.rooms.get(*id))
            .into_iter()
            .flat_map(|r| r.members.keys().copied())
    }

    /// A room's sequence, epoch and presence.
    #[must_use]
    pub fn room(&self, room: &str) -> Option<RoomInfo> {
        let r = self.rooms.get(*self.room_index.get(room)?)?;
        let mut users: Vec<UserId> = r.users.keys().cloned().collect();
        users.sort();
        Some(RoomInfo {
            seq: r.seq,
            epoch: r.epoch.clone(),
            sessions: r.members.len(),
            users,
        })
    }

    /// The room's retained messages (encoded `message` frames), oldest first,
    /// at most the last `limit`.
    pub fn history(&self, room: &str, limit: usize) -> impl Iterator<Item = &Bytes> + '_ {
        let history = self
            .room_index
            .get(room)
            .and_then(|id| self.rooms.get(*id))
            .map(|r| &r.history);
        let skip = history.map_or(0, |h| h.len().saturating_sub(limit));
        history
            .into_iter()
            .flat_map(|h| h.iter())
            .skip(skip)
            .map(|(_, frame)| frame)
    }

    // ---- poll ----------------------------------------------------------

    /// The next thing the caller must do, in order. Drain it after every call
    /// that changes the hub.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must next be called.
    ///
    /// The value may change after any call that takes `&mut self`; ask again
    /// after draining outputs. It may be earlier than needed (then the call
    /// does nothing), never later.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        self.timers.next()
    }

    // ---- transport events ----------------------------------------------

    /// Opens a session for an authenticated `identity`, with the caller's
    /// unguessable `sid`. Queues its `welcome`.
    ///
    /// # Errors
    /// [`ConnectError::ServerFull`] at `max_sessions`;
    /// [`ConnectError::DuplicateSid`] when the sid is taken.
    pub fn connect(
        &mut self,
        now: Timestamp,
        sid: Sid,
        identity: Identity,
        liveness: Liveness,
    ) -> Result<SessionKey, ConnectError> {
        if self.sessions.len() >= self.config.max_sessions {
            self.stats.errors[ErrorCode::ServerFull.index()] += 1;
            return Err(ConnectError::ServerFull);
        }
        if self.by_sid.contains_key(sid.as_str()) {
            return Err(ConnectError::DuplicateSid);
        }
        let welcome = ServerFrame::Welcome {
            sid: sid.as_str(),
            heartbeat: HeartbeatInfo {
                interval_ms: millis(self.config.heartbeat_interval),
                timeout_ms: millis(self.config.heartbeat_timeout),
            },
            limits: LimitsInfo {
                max_frame_bytes: self.config.max_frame_bytes,
                max_rooms: self.config.max_rooms_per_session,
                rate_per_sec: self.config.rate_per_sec,
            },
            user: Some(identity.user.as_str()),
            expires_in_ms: identity
                .expires_at
                .map(|at| crate::credentials::millis_until(now, at)),
        }
        .encode();
        let session = Session::new(
            now,
            sid.clone(),
            identity,
            liveness,
            &self.config,
            self.hash.clone(),
        );
        let user = session.identity.user.clone();
        let key = self.sessions.insert(session);
        self.by_sid.insert(sid, key);
        let tabs = self.by_user.entry(user.clone()).or_default();
        tabs.push(key);
        let first_of_user = tabs.len() == 1;
        if self.clustered() {
            self.cluster_connected(&sid_of(&self.sessions[key]), &user, first_of_user);
        }
        self.reschedule_session(key);
        self.stats.sessions_opened += 1;
        self.deliver(Recipients::one(key), welcome, FrameKind::Welcome);
        Ok(key)
    }

    /// Applies one client frame (the bytes of one WebSocket text message, or
    /// one element of a long-poll/SSE POST).
    ///
    /// A refused frame is answered with an `error` frame and changes nothing
    /// but the session's rate-limit tokens and error budget; the session is
    /// closed (1008, `too_many_errors`) when the budget runs out.
    ///
    /// # Errors
    /// [`HandleError::UnknownSession`] when the session is gone (nothing was
    /// done); [`HandleError::Refused`] when the frame was refused (already
    /// answered to the client; for the caller's logs and metrics).
    pub fn handle_frame(
        &mut self,
        now: Timestamp,
        session: SessionKey,
        frame: &[u8],
    ) -> Result<(), HandleError> {
        let Some(state) = self.sessions.get_mut(session) else {
            return Err(HandleError::UnknownSession);
        };
        self.stats.frames_in += 1;
        // Every frame takes a token, refused ones included, so a flood of
        // oversize or malformed frames is rate limited like any other.
        let within_rate = state.bucket.take(now, &self.config);
        if frame.len() > self.config.max_frame_bytes {
            // Not parsed: scanning an oversize frame for its `id` is the work the limit avoids.
            let error = FrameError::new(
                ErrorCode::FrameTooLarge,
                format!("frame larger than {} bytes", self.config.max_frame_bytes),
            );
            return Err(self.refuse(now, session, error, None, None).into());
        }
        let request = decode_client(frame);
        if !within_rate {
            let id = request.as_ref().map_or_else(|e| e.id, |r| r.id);
            let error = FrameError::new(
                ErrorCode::RateLimited,
                format!("more than {} frames per second", self.config.rate_per_sec),
            );
            return Err(self.refuse(now, session, error, id, None).into());
        }
        let request = match request {
            Ok(request) => request,
            Err(e) => {
                let error = FrameError::new(e.code, e.message);
                return Err(self
                    .refuse(now, session, error, e.id, e.room.as_ref())
                    .into());
            }
        };
        let room = match &request.frame {
            ClientFrame::Join { room, .. }
            | ClientFrame::Leave { room }
            | ClientFrame::Publish { room, .. }
            | ClientFrame::Presence { room } => Some(room.clone()),
            _ => None,
        };
        let applied = match request.frame {
            ClientFrame::Join {
                room,
                since,
                presence,
            } => self.join(now, session, room, since, presence, request.id),
            ClientFrame::Leave { room } => self.leave(now, session, &room),
            ClientFrame::Publish {
                room,
                data,
                event,
                echo,
                idempotency_key,
            } => {
                let publish = ClientPublish {
                    room,
                    data,
                    event: event.as_deref(),
                    echo,
                    idempotency_key: idempotency_key.as_deref(),
                };
                self.client_publish(now, session, publish, request.id)
            }
            ClientFrame::Direct { to, data, event } => {
                self.client_direct(session, &to, data, event.as_deref(), request.id)
            }
            ClientFrame::Ping => {
                self.deliver(
                    Recipients::one(session),
                    self.pong_frame.clone(),
                    FrameKind::Pong,
                );
                Ok(())
            }
            ClientFrame::Pong => Ok(()),
            ClientFrame::Presence { room } => self.presence_list(session, &room, request.id),
            ClientFrame::Refresh { token } => self.request_refresh(session, &token, request.id),
        };
        match applied {
            Ok(()) => {
                if let Some(state) = self.sessions.get_mut(session) {
                    // `max`: a caller's clock that steps back never moves liveness back.
                    state.last_rx = state.last_rx.max(now);
                    state.pinged = false;
                }
                // A broker-mode answer comes with `reply`/`complete_*`.
                let deferred = std::mem::take(&mut self.deferred);
                if let Some(id) = request.id.filter(|_| !deferred) {
                    let ack = ServerFrame::Ack {
                        id,
                        expires_in_ms: None,
                    }
                    .encode();
                    self.deliver(Recipients::one(session), ack, FrameKind::Ack);
                }
                Ok(())
            }
            Err(error) => Err(self
                .refuse(now, session, error, request.id, room.as_ref())
                .into()),
        }
    }

    /// A transport attached to the session (a long-poll request arrived):
    /// it is no longer detached, and the client is evidently alive.
    pub fn attach(&mut self, now: Timestamp, session: SessionKey) {
        if let Some(state) = self.sessions.get_mut(session) {
            state.detached_since = None;
            state.last_rx = state.last_rx.max(now);
            state.pinged = false;
            // The heartbeat resumes, possibly before the idle deadline.
            self.reschedule_session(session);
        }
    }

    /// The session's transport went away but the session lives on (between
    /// two long-polls). It is closed with `idle` if nothing attaches within
    /// `session_idle`; while detached it is neither pinged nor closed for
    /// `heartbeat_timeout`.
    pub fn detach(&mut self, now: Timestamp, session: SessionKey) {
        if let Some(state) = self.sessions.get_mut(session) {
            if state.detached_since.is_none() {
                state.detached_since = Some(now);
                self.reschedule_session(session);
            }
        }
    }

    /// The transport ended for good (socket closed, stream dropped): frees
    /// the session without any output to it. Its rooms hear a presence leave.
    /// Returns false when it was already gone.
    pub fn handle_close(&mut self, now: Timestamp, session: SessionKey) -> bool {
        self.end_session(now, session, CloseReason::Normal, false)
    }

    /// Advances timers to `now`: heartbeat pings and timeouts, idle detached
    /// sessions, expired credentials, expired room history.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        while let Some((deadline, target)) = self.timers.pop_due(now) {
            match target {
                TimerTarget::Session(key) => self.session_timer(now, deadline, key),
                TimerTarget::Room(id) => self.room_timer(now, deadline, id),
            }
        }
    }

    // ---- application commands ----------------------------------------

    /// Publishes `data` to `room` as the application (`from: {"server": true}`),
    /// creating the room if needed. No policy applies: the application is
    /// trusted.
    ///
    /// # Errors
    /// [`PublishError`] when the message could not be delivered as it is.
    pub fn publish(
        &mut self,
        now: Timestamp,
        room: &RoomName,
        event: Option<&str>,
        data: &RawValue,
    ) -> Result<Published, PublishError> {
        self.publish_keyed(now, room, event, data, None)
    }

    /// [`Hub::publish`], at most once per `idempotency_key` within
    /// [`IDEMPOTENCY_WINDOW`](crate::IDEMPOTENCY_WINDOW): a publish whose
    /// key the room remembers returns the first one's `seq` (with
    /// `delivered: 0`) and publishes nothing.
    ///
    /// # Errors
    /// As [`Hub::publish`].
    pub fn publish_keyed(
        &mut self,
        now: Timestamp,
        room: &RoomName,
        event: Option<&str>,
        data: &RawValue,
        idempotency_key: Option<&str>,
    ) -> Result<Published, PublishError> {
        if event.is_some_and(|e| e.len() > MAX_EVENT_BYTES) {
            return Err(PublishError::InvalidEvent);
        }
        if self.clustered() {
            return Err(PublishError::Sequenced);
        }
        let key = idempotency_key.map(|k| scoped_key(Publisher::Server, k));
        let id = self.room_id_or_create(now, room.clone());
        if let Some(k) = &key {
            let r = &mut self.rooms[id];
            if let Some(seq) = r.recent_keys.get(now, k) {
                return Ok(Published {
                    seq,
                    epoch: r.epoch.clone(),
                    delivered: 0,
                });
            }
        }
        let published = self.broadcast(now, id, From::SERVER, event, data, None);
        match published {
            Some(p) => {
                self.remember_key(now, id, key.as_deref(), p.seq);
                Ok(p)
            }
            None => {
                self.dispose_room_if_unused(now, id);
                Err(PublishError::TooLarge)
            }
        }
    }

    /// Sends a `direct` frame from the application (`from: {"server": true}`)
    /// to every session of a user or to one session; returns how many
    /// sessions it reached.
    ///
    /// # Errors
    /// [`DirectError::UnknownTarget`] when nobody matches.
    pub fn send_direct(
        &mut self,
        to: &Target<'_>,
        event: Option<&str>,
        data: &RawValue,
    ) -> Result<usize, DirectError> {
        if event.is_some_and(|e| e.len() > MAX_EVENT_BYTES) {
            return Err(DirectError::InvalidEvent);
        }
        let recipients = self.resolve(to).ok_or(DirectError::UnknownTarget)?;
        let frame = ServerFrame::Direct {
            from: From::SERVER,
            data,
            event,
        }
        .encode();
        if frame.len() > self.config.max_frame_bytes {
            return Err(DirectError::TooLarge);
        }
        let count = recipients.len();
        self.deliver(recipients, frame, FrameKind::Direct);
        Ok(count)
    }

    /// Ends a session from the server side: its `close` frame is queued and
    /// [`Output::Close`] follows. Returns false when it was already gone.
    pub fn close(&mut self, now: Timestamp, session: SessionKey, reason: CloseReason) -> bool {
        self.end_session(now, session, reason, true)
    }

    /// Closes every session of `user` (1008, `disconnected`); returns how many.
    pub fn disconnect_user(&mut self, now: Timestamp, user: &str) -> usize {
        let sessions = self.user_sessions(user).to_vec();
        for key in &sessions {
            self.close(now, *key, CloseReason::Disconnected);
        }
        sessions.len()
    }

    /// Closes every session with `reason` (1001 `going_away` at shutdown).
    pub fn close_all(&mut self, now: Timestamp, reason: CloseReason) -> usize {
        let keys: Vec<SessionKey> = self.sessions.keys().collect();
        // Everyone is leaving: announcing each leave to those still there
        // would cost O(members²) frames and tell nobody anything useful.
        self.closing_all = true;
        for key in &keys {
            self.close(now, *key, reason);
        }
        self.closing_all = false;
        keys.len()
    }

    // ---- frame handlers ------------------------------------------------

    fn join(
        &mut self,
        now: Timestamp,
        key: SessionKey,
        room: RoomName,
        since: Option<Since<'_>>,
        presence: bool,
        id: Option<&RawValue>,
    ) -> Result<(), FrameError> {
        let session = &self.sessions[key];
        if !self.policy.may_join(&session.identity, &room) {
            return Err(FrameError::new(
                ErrorCode::Forbidden,
                "not allowed to join this room",
            ));
        }
        let existing = self.room_index.get(room.as_str()).copied();
        let already = existing.is_some_and(|id| session.rooms.contains(&id));
        if !already && session.rooms.len() >= self.config.max_rooms_per_session {
            return Err(FrameError::new(
                ErrorCode::TooManyRooms,
                format!(
                    "at most {} rooms per session",
                    self.config.max_rooms_per_session
                ),
            ));
        }
        if !already && self.clustered() {
            self.cluster_join(now, key, room, since, presence, id);
            self.deferred = true;
            return Ok(());
        }
        let user = session.identity.user.clone();
        let id = match existing {
            Some(id) => id,
            None => self.create_room(now, room),
        };
        let r = &mut self.rooms[id];
        if already {
            r.set_presence(key, presence);
        } else {
            let first_tab = r.add_member(key, &user, presence);
            self.sessions[key].rooms.insert(id);
            if first_tab && r.options.presence && !self.clustered() {
                self.announce(id, key, PresenceAction::Join, &user);
            }
        }
        let r = &self.rooms[id];
        let mut recovered = None;
        if r.options.latest.is_some() {
            // A latest-value room replays its state even without `since`.
            let (replay, answer) = r.latest_replay(since.as_ref().map(|s| (s.seq, &*s.epoch)));
            recovered = answer;
            let (name, epoch) = (r.name.clone(), r.epoch.clone());
            for (seq, frame, latest) in replay {
                let kind = FrameKind::Message {
                    room: name.clone(),
                    seq,
                    epoch: epoch.clone(),
                };
                self.deliver_latest(Recipients::one(key), frame, kind, latest);
            }
        } else if let Some(since) = since {
            let replay: Option<Vec<Bytes>> = r
                .recover(since.seq, &since.epoch)
                .map(|m| m.cloned().collect());
            let (name, epoch) = (r.name.clone(), r.epoch.clone());
            recovered = Some(replay.is_some());
            // Not `(since.seq + 1..).zip(..)`: `since.seq` is the client's and
            // may be u64::MAX, and both the `+ 1` and the range's first step
            // overflow (a panic in debug builds) even when nothing is replayed.
            // A frame is replayed only when `since.seq` < the room's seq, so
            // the addition below cannot overflow.
            for (frame, offset) in replay.into_iter().flatten().zip(1u64..) {
                let seq = since.seq + offset;
                let kind = FrameKind::Message {
                    room: name.clone(),
                    seq,
                    epoch: epoch.clone(),
                };
                self.deliver(Recipients::one(key), frame, kind);
            }
        }
        let r = &self.rooms[id];
        let joined = ServerFrame::Joined {
            room: r.name.as_str(),
            seq: r.seq,
            epoch: r.epoch.as_str(),
            recovered,
            members: r.options.presence.then_some(r.users.len()),
            latest: r.options.latest.is_some(),
        }
        .encode();
        let kind = FrameKind::Joined {
            room: r.name.clone(),
            seq: r.seq,
            epoch: r.epoch.clone(),
        };
        self.deliver(Recipients::one(key), joined, kind);
        Ok(())
    }

    fn leave(
        &mut self,
        now: Timestamp,
        key: SessionKey,
        room: &RoomName,
    ) -> Result<(), FrameError> {
        let id = self
            .room_index
            .get(room.as_str())
            .copied()
            .filter(|id| self.sessions[key].rooms.contains(id))
            .ok_or_else(not_joined)?;
        self.remove_membership(now, key, id);
        Ok(())
    }

    fn client_publish(
        &mut self,
        now: Timestamp,
        key: SessionKey,
        publish: ClientPublish<'_>,
        request_id: Option<&RawValue>,
    ) -> Result<(), FrameError> {
        let ClientPublish {
            room,
            data,
            event,
            echo,
            idempotency_key,
        } = publish;
        let session = &self.sessions[key];
        let existing = self.room_index.get(room.as_str()).copied();
        let member = existing.is_some_and(|id| session.rooms.contains(&id));
        match self.policy.publish_rule(&session.identity, &room) {
            PublishRule::ServerOnly => {
                return Err(FrameError::new(
                    ErrorCode::Forbidden,
                    "only the server publishes to this room",
                ))
            }
            PublishRule::Members if !member => return Err(not_joined()),
            _ => {}
        }
        let idempotency_key =
            idempotency_key.map(|k| scoped_key(Publisher::User(&session.identity.user), k));
        if self.clustered() {
            let publish = ClientPublish {
                room,
                data,
                event,
                echo,
                idempotency_key: idempotency_key.as_deref(),
            };
            self.cluster_publish(now, key, publish, request_id)?;
            self.deferred = true;
            return Ok(());
        }
        if let (Some(id), Some(k)) = (existing, &idempotency_key) {
            if self.rooms[id].recent_keys.get(now, k).is_some() {
                return Ok(()); // a retry of a publish that took effect
            }
        }
        let id = match existing {
            Some(id) => id,
            None => self.create_room(now, room),
        };
        let session = &self.sessions[key];
        let sid = session.sid.clone();
        let user = session.identity.user.clone();
        let from = From::Session {
            sid: sid.as_str(),
            user: user.as_str(),
        };
        let except = (!echo).then_some(key);
        let Some(published) = self.broadcast(now, id, from, event, data, except) else {
            self.dispose_room_if_unused(now, id);
            return Err(FrameError::new(
                ErrorCode::FrameTooLarge,
                "the resulting message is larger than max_frame_bytes",
            ));
        };
        self.remember_key(now, id, idempotency_key.as_deref(), published.seq);
        Ok(())
    }

    /// Remembers a keyed publish's key in its room (if the room is still
    /// there: one with no members and no history is gone at once).
    fn remember_key(&mut self, now: Timestamp, id: RoomId, key: Option<&str>, seq: u64) {
        if let (Some(key), Some(r)) = (key, self.rooms.get_mut(id)) {
            r.recent_keys.insert(now, key, seq);
        }
    }

    fn client_direct(
        &mut self,
        key: SessionKey,
        to: &Target<'_>,
        data: &RawValue,
        event: Option<&str>,
        request_id: Option<&RawValue>,
    ) -> Result<(), FrameError> {
        let session = &self.sessions[key];
        if !self.policy.may_direct(&session.identity, to) {
            return Err(FrameError::new(
                ErrorCode::Forbidden,
                "not allowed to send to this target",
            ));
        }
        if self.clustered() {
            self.cluster_direct(key, to, data, event, request_id)?;
            self.deferred = true;
            return Ok(());
        }
        let recipients = self.resolve(to).ok_or_else(|| {
            FrameError::new(ErrorCode::UnknownTarget, "no session for that target")
        })?;
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
        self.deliver(recipients, frame, FrameKind::Direct);
        Ok(())
    }

    fn presence_list(
        &mut self,
        key: SessionKey,
        room: &RoomName,
        request_id: Option<&RawValue>,
    ) -> Result<(), FrameError> {
        let id = self
            .room_index
            .get(room.as_str())
            .copied()
            .filter(|id| self.sessions[key].rooms.contains(id))
            .ok_or_else(not_joined)?;
        let r = &self.rooms[id];
        if !r.options.presence {
            return Err(FrameError::new(
                ErrorCode::Forbidden,
                "this room does not share presence",
            ));
        }
        if self.clustered() {
            self.cluster_presence_list(key, room, request_id);
            self.deferred = true;
            return Ok(());
        }
        let mut members: Vec<&str> = r.users.keys().map(UserId::as_str).collect();
        members.sort_unstable();
        let frame = ServerFrame::Presence {
            room: r.name.as_str(),
            action: PresenceAction::List,
            user: None,
            count: members.len(),
            members: Some(members),
        }
        .encode();
        self.deliver(Recipients::one(key), frame, FrameKind::Presence);
        Ok(())
    }

    // ---- shared mechanics ----------------------------------------------

    /// Answers a refused frame, charges the error budget, and closes the
    /// session when the budget is spent.
    pub(crate) fn refuse(
        &mut self,
        now: Timestamp,
        key: SessionKey,
        error: FrameError,
        id: Option<&RawValue>,
        room: Option<&RoomName>,
    ) -> FrameError {
        self.stats.errors[error.code.index()] += 1;
        let frame = ServerFrame::Error {
            code: error.code,
            message: &error.message,
            id,
            room: room.map(RoomName::as_str),
        }
        .encode();
        self.deliver(Recipients::one(key), frame, FrameKind::Error);
        let spent = self
            .sessions
            .get_mut(key)
            .is_some_and(|s| s.errors.record(now, &self.config));
        if spent {
            self.close(now, key, CloseReason::TooManyErrors);
        }
        error
    }

    /// Encodes a message once, appends it to history and queues it for the
    /// members. `None` (and nothing changed) when it exceeds `max_frame_bytes`.
    fn broadcast(
        &mut self,
        now: Timestamp,
        id: RoomId,
        from: From<'_>,
        event: Option<&str>,
        data: &RawValue,
        except: Option<SessionKey>,
    ) -> Option<Published> {
        let r = &mut self.rooms[id];
        let seq = r.seq + 1;
        let frame = ServerFrame::Message {
            room: r.name.as_str(),
            seq,
            epoch: r.epoch.as_str(),
            event,
            from,
            data,
            ts: now.as_millis(),
        }
        .encode();
        if frame.len() > self.config.max_frame_bytes {
            return None;
        }
        r.seq = seq;
        r.last_activity = now;
        let latest = r.remember_message(seq, frame.clone(), event);
        let recipients = r.members_except(except);
        let kind = FrameKind::Message {
            room: r.name.clone(),
            seq,
            epoch: r.epoch.clone(),
        };
        let published = Published {
            seq,
            epoch: r.epoch.clone(),
            delivered: recipients.len(),
        };
        self.stats.messages += 1;
        self.deliver_latest(recipients, frame, kind, latest);
        self.dispose_room_if_unused(now, id);
        Some(published)
    }

    pub(crate) fn deliver(&mut self, to: Recipients, frame: Bytes, kind: FrameKind) {
        self.deliver_latest(to, frame, kind, None);
    }

    /// [`Hub::deliver`] for a latest-value message that supersedes queued
    /// ones with the same key.
    fn deliver_latest(
        &mut self,
        to: Recipients,
        frame: Bytes,
        kind: FrameKind,
        latest: Option<LatestKey>,
    ) {
        let count = to.len();
        if count == 0 {
            return;
        }
        self.stats.frames_out += count as u64;
        self.outputs.push_back(Output::Deliver(Delivery {
            to,
            frame,
            kind,
            latest,
        }));
    }

    /// Tells a room's presence subscribers (but `subject`) that a user came or went.
    fn announce(&mut self, id: RoomId, subject: SessionKey, action: PresenceAction, user: &UserId) {
        let r = &mut self.rooms[id];
        let frame = ServerFrame::Presence {
            room: r.name.as_str(),
            action,
            user: Some(user.as_str()),
            members: None,
            count: r.users.len(),
        }
        .encode();
        let recipients = if r.quiet_members == 0 {
            r.members_except(Some(subject))
        } else {
            Recipients::list(
                r.members
                    .iter()
                    .filter(|(k, wants)| **wants && **k != subject)
                    .map(|(k, _)| *k)
                    .collect(),
            )
        };
        self.deliver(recipients, frame, FrameKind::Presence);
    }

    fn resolve(&self, to: &Target<'_>) -> Option<Recipients> {
        match to {
            Target::User(user) => {
                let sessions = self.by_user.get(&**user)?;
                Some(Recipients::list(sessions.clone()))
            }
            Target::Sid(sid) => self.by_sid.get(&**sid).map(|k| Recipients::one(*k)),
        }
    }

    fn room_id_or_create(&mut self, now: Timestamp, room: RoomName) -> RoomId {
        match self.room_index.get(room.as_str()) {
            Some(id) => *id,
            None => self.create_room(now, room),
        }
    }

    pub(crate) fn create_room(&mut self, now: Timestamp, name: RoomName) -> RoomId {
        let mut options = self.policy.room_options(&name);
        if self.clustered() {
            // The broker numbers and keeps the messages; it does not coalesce.
            options.latest = None;
        }
        let epoch = self.draw_epoch();
        let id = self
            .rooms
            .insert(Room::new(name.clone(), epoch, options, now, &self.hash));
        self.room_index.insert(name, id);
        id
    }

    /// A fresh epoch: 48 bits from the caller's seed and a counter, so epochs
    /// are unique within a run and differ between runs with different seeds.
    fn draw_epoch(&mut self) -> Epoch {
        self.epochs_drawn += 1;
        let mut state = self.epoch_seed ^ self.epochs_drawn.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let bits = splitmix64(&mut state);
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let text: String = (0..8)
            .map(|i| ALPHABET[((bits >> (i * 6)) & 63) as usize] as char)
            .collect();
        Epoch::from(text)
    }

    pub(crate) fn remove_membership(&mut self, now: Timestamp, key: SessionKey, id: RoomId) {
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        session.rooms.swap_remove(&id);
        let user = session.identity.user.clone();
        let sid = session.sid.clone();
        let Some(r) = self.rooms.get_mut(id) else {
            return;
        };
        let last_tab = r.remove_member(key, &user);
        if self.config.sequencing == crate::Sequencing::Broker {
            self.cluster_left(id, key, &sid, &user, last_tab);
            return;
        }
        if last_tab && r.options.presence && !self.closing_all {
            self.announce(id, key, PresenceAction::Leave, &user);
        }
        let r = &mut self.rooms[id];
        if r.members.is_empty() {
            r.last_activity = now;
        }
        self.dispose_room_if_unused(now, id);
    }

    /// Frees a room with neither members nor history; schedules the history
    /// TTL of an empty room that keeps some.
    fn dispose_room_if_unused(&mut self, _now: Timestamp, id: RoomId) {
        let Some(r) = self.rooms.get_mut(id) else {
            return;
        };
        if r.is_disposable() {
            let name = r.name.clone();
            self.rooms.remove(id);
            self.room_index.remove(name.as_str());
        } else if r.members.is_empty() {
            // From the last activity, not from `now`: when an early entry pops
            // (a server publish moved `last_activity` later), re-arm for the
            // rest of the TTL, not a whole new one (which kept an idle room's
            // history up to twice its `history_ttl`).
            let deadline = r.last_activity + r.options.history_ttl;
            self.timers
                .schedule(&mut r.timer_at, deadline, TimerTarget::Room(id));
        }
    }

    fn end_session(
        &mut self,
        now: Timestamp,
        key: SessionKey,
        reason: CloseReason,
        notify: bool,
    ) -> bool {
        let Some(session) = self.sessions.remove(key) else {
            return false;
        };
        self.by_sid.remove(session.sid.as_str());
        let mut last_of_user = false;
        if let Some(tabs) = self.by_user.get_mut(session.identity.user.as_str()) {
            tabs.retain(|k| *k != key);
            if tabs.is_empty() {
                self.by_user.remove(session.identity.user.as_str());
                last_of_user = true;
            }
        }
        if self.clustered() {
            self.cluster_disconnected(&session.sid, &session.identity.user, last_of_user);
        }
        if notify {
            let frame = ServerFrame::Close {
                code: reason.code(),
                reason: reason.as_str(),
            }
            .encode();
            self.deliver(Recipients::one(key), frame, FrameKind::Close);
            self.outputs.push_back(Output::Close {
                session: key,
                reason,
            });
        }
        self.stats.closes[reason.index()] += 1;
        // Closes that the protocol also names as error codes count as errors.
        let code = match reason {
            CloseReason::HeartbeatTimeout => Some(ErrorCode::HeartbeatTimeout),
            CloseReason::SlowConsumer => Some(ErrorCode::SlowConsumer),
            CloseReason::FrameTooLarge => Some(ErrorCode::FrameTooLarge),
            _ => None,
        };
        if let Some(code) = code {
            self.stats.errors[code.index()] += 1;
        }
        for id in session.rooms {
            let Some(r) = self.rooms.get_mut(id) else {
                continue;
            };
            let last_tab = r.remove_member(key, &session.identity.user);
            if self.config.sequencing == crate::Sequencing::Broker {
                self.cluster_left(id, key, &session.sid, &session.identity.user, last_tab);
                continue;
            }
            if last_tab && r.options.presence && !self.closing_all {
                self.announce(id, key, PresenceAction::Leave, &session.identity.user);
            }
            let r = &mut self.rooms[id];
            if r.members.is_empty() {
                r.last_activity = now;
            }
            self.dispose_room_if_unused(now, id);
        }
        true
    }

    pub(crate) fn reschedule_session(&mut self, key: SessionKey) {
        if let Some(s) = self.sessions.get_mut(key) {
            let deadline = s.deadline(&self.config);
            self.timers
                .schedule(&mut s.timer_at, deadline, TimerTarget::Session(key));
        }
    }

    fn session_timer(&mut self, now: Timestamp, deadline: Timestamp, key: SessionKey) {
        let config = &self.config;
        let Some(s) = self.sessions.get_mut(key) else {
            return;
        };
        if s.timer_at != Some(deadline) {
            return; // superseded by an earlier entry
        }
        s.timer_at = None;
        if s.identity.expires_at.is_some_and(|at| now >= at) {
            self.close(now, key, CloseReason::TokenExpired);
            return;
        }
        if let Some(since) = s.detached_since {
            if now >= since + config.session_idle {
                self.close(now, key, CloseReason::Idle);
            } else {
                self.reschedule_session(key);
            }
            return;
        }
        match s.liveness {
            Liveness::Client => {
                if s.pinged
                    && now >= s.last_rx + config.heartbeat_interval + config.heartbeat_timeout
                {
                    self.close(now, key, CloseReason::HeartbeatTimeout);
                    return;
                }
                if !s.pinged && now >= s.last_rx + config.heartbeat_interval {
                    s.pinged = true;
                    self.deliver(
                        Recipients::one(key),
                        self.ping_frame.clone(),
                        FrameKind::Ping,
                    );
                }
            }
            Liveness::Transport => {
                if now >= s.last_ping + config.heartbeat_interval {
                    s.last_ping = now;
                    self.deliver(
                        Recipients::one(key),
                        self.ping_frame.clone(),
                        FrameKind::Ping,
                    );
                }
            }
        }
        self.reschedule_session(key);
    }

    fn room_timer(&mut self, now: Timestamp, deadline: Timestamp, id: RoomId) {
        let Some(r) = self.rooms.get_mut(id) else {
            return;
        };
        if r.timer_at != Some(deadline) {
            return;
        }
        r.timer_at = None;
        if !r.members.is_empty() {
            return; // rescheduled when the last member leaves
        }
        if now >= r.last_activity + r.options.history_ttl {
            r.forget_history();
        }
        self.dispose_room_if_unused(now, id);
    }
}

fn sid_of(session: &Session) -> Sid {
    session.sid.clone()
}

fn not_joined() -> FrameError {
    FrameError::new(ErrorCode::NotJoined, "this session is not in that room")
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// SplitMix64: spreads one seed into independent-looking words.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
