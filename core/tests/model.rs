//! Model-based property tests of the hub (`proptest-state-machine`).
//!
//! A small reference model (which sessions are open and whose they are, the
//! members of every room, each room's `seq`, history length and idle time,
//! each session's heartbeat and error budget, the clock) generates the next
//! [`Op`] from its state, predicts what the hub must do, and after every step
//! the real [`Hub`](switchboard_core::Hub), driven through
//! [`Sim`], is checked against it:
//!
//! - membership: a session is in a room exactly when the model says so
//!   (`is_member`, `session_rooms`, `members`, `room`), and a closed session
//!   is in none;
//! - delivery: every frame every session received in the step is exactly the
//!   one predicted, per session and per room in order, at the predicted time:
//!   each member gets each message of its rooms once, in `seq` order, nobody
//!   else gets it, `echo: false` leaves the sender out; presence, acks,
//!   errors, pings and closes likewise;
//! - sequence: `seq` grows by exactly one per publish, the history keeps the
//!   last messages with consecutive seqs, and a room's epoch stays fixed while
//!   it lives and is never reused by a later incarnation of the room;
//! - bad frames: refused with the predicted code, nothing changes (membership,
//!   seqs, liveness) and no other session receives anything;
//! - heartbeats: a silent session is pinged at `interval` and closed with
//!   `heartbeat_timeout` at exactly `interval + timeout`, never earlier, and
//!   `poll_timeout` is never later than the model's next deadline;
//! - memory: `session_count` and `room_count` equal the model's,
//!   `timer_count` stays between the open sessions and what may still be
//!   pending, and once everyone is gone and the history TTL passed, nothing
//!   is left (checked at the end of every case).
//!
//! The model does not model rate limits (made unreachable by the config here;
//! `tests/protocol.rs` covers them) nor recovery through `since`.
//!
//! Every step first advances the clock by 1 ms, so no two inputs share an
//! instant and no two sessions time out at the same one. Frames are compared
//! per session and per room, in order (the protocol orders nothing across
//! rooms), so a session's own ping and another's timeout that fall on the same
//! millisecond may reach it in either order.
//!
//! Cases: 128 by default (a couple of seconds); `PROPTEST_CASES=5000 cargo
//! test --test model` runs more.
// The purity rules of core/clippy.toml are for the core, not its tests: the
// reference model may hash with std's random seed.
#![allow(clippy::disallowed_methods)]

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use proptest::sample::select;
use proptest::strategy::Union;
use proptest::test_runner::Config as ProptestConfig;
use proptest_state_machine::{prop_state_machine, ReferenceStateMachine, StateMachineTest};
use serde_json::Value;
use switchboard_core::sim::{Received, Sim, SIM_EPOCH};
use switchboard_core::testing::{self, Action, Applied, Op};
use switchboard_core::{
    CloseReason, Config, ErrorCode, FrameKind, Policy, RoomName, RoomOptions, SessionKey,
};

// ---- the world ---------------------------------------------------------------

const INTERVAL: u64 = 1_000;
const TIMEOUT: u64 = 500;
const TTL: u64 = 1_500;
const HISTORY: usize = 3;
const MAX_ROOMS: usize = 2;
const MAX_SESSIONS: usize = 5;
const MAX_ERRORS: usize = 3;
const ERROR_WINDOW: u64 = 100;
const USERS: usize = 3;
/// `lobby`: presence, history. `quiet`: no presence, history. `eph`:
/// presence, no history (freed as soon as it is empty).
const ROOMS: [&str; 3] = ["lobby", "quiet", "eph"];

fn ms(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

/// A short heartbeat, a small history, few rooms per session, few sessions
/// and a small error budget, so that every limit is met within a few steps.
fn config() -> Config {
    let mut config = Config::default();
    config.heartbeat_interval = ms(INTERVAL);
    config.heartbeat_timeout = ms(TIMEOUT);
    config.max_rooms_per_session = MAX_ROOMS;
    config.max_sessions = MAX_SESSIONS;
    config.max_errors = MAX_ERRORS as u32;
    config.error_window = ms(ERROR_WINDOW);
    // Not modelled: out of reach.
    config.rate_burst = 1_000_000;
    config
}

/// History length and whether presence is announced, per room.
fn room_options(room: &str) -> (usize, bool) {
    match room {
        "quiet" => (HISTORY, false),
        "eph" => (0, true),
        _ => (HISTORY, true),
    }
}

struct ModelPolicy;

impl Policy for ModelPolicy {
    fn room_options(&self, room: &RoomName) -> RoomOptions {
        let (history, presence) = room_options(room.as_str());
        RoomOptions::default()
            .history(history)
            .presence(presence)
            .history_ttl(ms(TTL))
    }
}

fn room_names() -> Vec<RoomName> {
    ROOMS.iter().map(|r| RoomName::new(r).unwrap()).collect()
}

// ---- frames, as the model predicts them and the sessions receive them --------

#[derive(Debug, Clone, PartialEq)]
enum Sender {
    Session(usize, String),
    Server,
}

/// A server frame with sids replaced by session ordinals and epochs by the
/// model's room generation.
#[derive(Debug, Clone, PartialEq)]
enum Frame {
    Welcome {
        session: usize,
        user: String,
    },
    Joined {
        room: String,
        seq: u64,
        epoch: u64,
        members: Option<u64>,
    },
    Message {
        room: String,
        seq: u64,
        epoch: u64,
        from: Sender,
        event: Option<String>,
        data: Value,
        ts: u64,
    },
    Direct {
        from: Sender,
        data: Value,
    },
    Presence {
        room: String,
        action: String,
        user: Option<String>,
        members: Option<Vec<String>>,
        count: u64,
    },
    Ack {
        id: u64,
    },
    Error {
        code: String,
        id: Option<Value>,
        room: Option<String>,
    },
    Ping,
    Pong,
    Close {
        code: u64,
        reason: String,
    },
}

impl Frame {
    /// Frames of one room are ordered; across rooms (and between a room and
    /// the session's own frames) the protocol promises no order.
    fn stream(&self) -> Option<&str> {
        match self {
            Self::Joined { room, .. }
            | Self::Message { room, .. }
            | Self::Presence { room, .. } => Some(room),
            _ => None,
        }
    }
}

/// A frame delivered to session `session` at `at` (ms after [`SIM_EPOCH`]).
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    session: usize,
    at: u64,
    frame: Frame,
}

type Streams = BTreeMap<(usize, Option<String>), Vec<(u64, Frame)>>;

fn streams(seen: impl IntoIterator<Item = Seen>) -> Streams {
    let mut out = Streams::new();
    for s in seen {
        let key = (s.session, s.frame.stream().map(str::to_owned));
        out.entry(key).or_default().push((s.at, s.frame));
    }
    out
}

// ---- the reference model -----------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// The transport went away (`handle_close`): no `close` frame.
    Disconnect,
    Heartbeat,
    TooManyErrors,
}

#[derive(Debug, Clone)]
struct Session {
    user: String,
    /// When and why it ended; `None` while open.
    ended: Option<(u64, Ended)>,
    last_rx: u64,
    pinged: bool,
    errors: VecDeque<u64>,
    rooms: BTreeSet<String>,
}

impl Session {
    fn open(&self) -> bool {
        self.ended.is_none()
    }

    /// The next heartbeat event: a ping, or the timeout after one.
    fn deadline(&self) -> u64 {
        if self.pinged {
            self.last_rx + INTERVAL + TIMEOUT
        } else {
            self.last_rx + INTERVAL
        }
    }
}

#[derive(Debug, Clone)]
struct Room {
    /// Which incarnation of the name this is (rooms are freed and recreated).
    generation: u64,
    seq: u64,
    history: usize,
    last_activity: u64,
    /// Member ordinals and whether each wants presence events.
    members: BTreeMap<usize, bool>,
}

impl Room {
    fn expiry(&self) -> Option<u64> {
        (self.members.is_empty() && self.history > 0).then_some(self.last_activity + TTL)
    }
}

/// What [`apply_op`](testing::apply_op) must return.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    Connected,
    Done,
    Published {
        seq: u64,
        delivered: usize,
        generation: u64,
    },
    Refused(ErrorCode),
    Gone,
}

#[derive(Debug, Clone)]
struct Model {
    now: u64,
    sessions: Vec<Session>,
    rooms: BTreeMap<String, Room>,
    generations: u64,
    messages: u64,
    /// What the last step must have delivered.
    expect: Vec<Seen>,
    outcome: Outcome,
}

impl Model {
    fn new() -> Self {
        Self {
            now: 0,
            sessions: Vec::new(),
            rooms: BTreeMap::new(),
            generations: 0,
            messages: 0,
            expect: Vec::new(),
            outcome: Outcome::Done,
        }
    }

    fn open_count(&self) -> usize {
        self.sessions.iter().filter(|s| s.open()).count()
    }

    fn users_in(&self, room: &Room) -> Vec<String> {
        let users: BTreeSet<&str> = room
            .members
            .keys()
            .map(|m| self.sessions[*m].user.as_str())
            .collect();
        users.into_iter().map(str::to_owned).collect()
    }

    fn deliver(&mut self, session: usize, frame: Frame) {
        self.expect.push(Seen {
            session,
            at: self.now,
            frame,
        });
    }

    /// The earliest pending deadline: a heartbeat or a history expiry.
    fn next_event(&self) -> Option<u64> {
        let sessions = self
            .sessions
            .iter()
            .filter(|s| s.open())
            .map(Session::deadline);
        let rooms = self.rooms.values().filter_map(Room::expiry);
        sessions.chain(rooms).min()
    }

    /// Every deadline the current state foresees, to aim clock advances at.
    fn upcoming(&self) -> Vec<u64> {
        let mut at: Vec<u64> = self
            .sessions
            .iter()
            .filter(|s| s.open())
            .flat_map(|s| [s.deadline(), s.last_rx + INTERVAL + TIMEOUT])
            .chain(self.rooms.values().filter_map(Room::expiry))
            .collect();
        at.sort_unstable();
        at.dedup();
        at
    }

    fn advance_to(&mut self, end: u64) {
        while let Some(at) = self.next_event().filter(|at| *at <= end) {
            self.now = at;
            for s in 0..self.sessions.len() {
                let session = &mut self.sessions[s];
                if !session.open() || session.deadline() != at {
                    continue;
                }
                if session.pinged {
                    self.end(s, Ended::Heartbeat);
                } else {
                    session.pinged = true;
                    self.deliver(s, Frame::Ping);
                }
            }
            self.rooms.retain(|_, r| r.expiry() != Some(at));
        }
        self.now = end;
    }

    fn end(&mut self, s: usize, why: Ended) {
        let session = &mut self.sessions[s];
        session.ended = Some((self.now, why));
        let rooms = std::mem::take(&mut session.rooms);
        let close = match why {
            Ended::Disconnect => None,
            Ended::Heartbeat => Some((1001, "heartbeat_timeout")),
            Ended::TooManyErrors => Some((1008, "too_many_errors")),
        };
        if let Some((code, reason)) = close {
            self.deliver(
                s,
                Frame::Close {
                    code,
                    reason: reason.to_owned(),
                },
            );
        }
        for room in rooms {
            self.remove_member(s, &room);
        }
    }

    fn remove_member(&mut self, s: usize, name: &str) {
        let user = self.sessions[s].user.clone();
        let room = self.rooms.get_mut(name).expect("members' rooms exist");
        room.members.remove(&s);
        let room = &self.rooms[name];
        let last_tab = room.members.keys().all(|m| self.sessions[*m].user != user);
        if last_tab && room_options(name).1 {
            let count = self.users_in(room).len() as u64;
            let listeners: Vec<usize> = room
                .members
                .iter()
                .filter(|(_, p)| **p)
                .map(|(m, _)| *m)
                .collect();
            for m in listeners {
                self.deliver(
                    m,
                    Frame::Presence {
                        room: name.to_owned(),
                        action: "leave".to_owned(),
                        user: Some(user.clone()),
                        members: None,
                        count,
                    },
                );
            }
        }
        let now = self.now;
        let room = self.rooms.get_mut(name).expect("checked above");
        if room.members.is_empty() {
            room.last_activity = now;
            if room.history == 0 {
                self.rooms.remove(name);
            }
        }
    }

    fn room_or_create(&mut self, name: &str) -> &mut Room {
        if !self.rooms.contains_key(name) {
            self.generations += 1;
            let room = Room {
                generation: self.generations,
                seq: 0,
                history: 0,
                last_activity: self.now,
                members: BTreeMap::new(),
            };
            self.rooms.insert(name.to_owned(), room);
        }
        self.rooms.get_mut(name).expect("inserted above")
    }

    /// Appends a message and delivers it to the members (but `except`).
    fn publish(
        &mut self,
        name: &str,
        from: Sender,
        event: Option<&String>,
        data: &Value,
        except: Option<usize>,
    ) -> (u64, usize, u64) {
        let now = self.now;
        let room = self.room_or_create(name);
        room.seq += 1;
        room.history = (room.history + 1).min(room_options(name).0);
        room.last_activity = now;
        let (seq, generation) = (room.seq, room.generation);
        let to: Vec<usize> = room
            .members
            .keys()
            .copied()
            .filter(|m| Some(*m) != except)
            .collect();
        for m in &to {
            self.deliver(
                *m,
                Frame::Message {
                    room: name.to_owned(),
                    seq,
                    epoch: generation,
                    from: from.clone(),
                    event: event.cloned(),
                    data: data.clone(),
                    ts: now,
                },
            );
        }
        self.messages += 1;
        (seq, to.len(), generation)
    }

    /// A frame was accepted: liveness refreshed, `ack` if it had an `id`.
    fn accept(&mut self, s: usize, id: Option<u32>) -> Outcome {
        let session = &mut self.sessions[s];
        session.last_rx = self.now;
        session.pinged = false;
        if let Some(id) = id {
            self.deliver(s, Frame::Ack { id: id.into() });
        }
        Outcome::Done
    }

    /// A frame was refused: `error`, and the session closes when its error
    /// budget is spent. Nothing else changes.
    fn refuse(
        &mut self,
        s: usize,
        code: ErrorCode,
        id: Option<u32>,
        room: Option<&RoomName>,
    ) -> Outcome {
        self.deliver(
            s,
            Frame::Error {
                code: code.as_str().to_owned(),
                id: id.map(Value::from),
                room: room.map(|r| r.as_str().to_owned()),
            },
        );
        let now = self.now;
        let errors = &mut self.sessions[s].errors;
        while errors.front().is_some_and(|t| *t + ERROR_WINDOW <= now) {
            errors.pop_front();
        }
        errors.push_back(now);
        if errors.len() >= MAX_ERRORS {
            self.end(s, Ended::TooManyErrors);
        }
        Outcome::Refused(code)
    }

    fn step(&mut self, op: &Op) {
        self.expect.clear();
        self.advance_to(self.now + 1);
        self.outcome = match op {
            Op::Connect { user } => {
                if self.open_count() >= MAX_SESSIONS {
                    Outcome::Refused(ErrorCode::ServerFull)
                } else {
                    self.sessions.push(Session {
                        user: user.as_str().to_owned(),
                        ended: None,
                        last_rx: self.now,
                        pinged: false,
                        errors: VecDeque::new(),
                        rooms: BTreeSet::new(),
                    });
                    let session = self.sessions.len() - 1;
                    let user = user.as_str().to_owned();
                    self.deliver(session, Frame::Welcome { session, user });
                    Outcome::Connected
                }
            }
            Op::Send {
                session,
                action,
                id,
            } if self.sessions[*session].open() => self.send(*session, action, *id),
            Op::BadFrame { session, frame } if self.sessions[*session].open() => {
                // The error's `id` and `room` are not predicted (see `Sut::collect`).
                self.refuse(*session, frame.code, None, None)
            }
            Op::Disconnect { session } if self.sessions[*session].open() => {
                self.end(*session, Ended::Disconnect);
                Outcome::Done
            }
            Op::Send { .. } | Op::BadFrame { .. } | Op::Disconnect { .. } => Outcome::Gone,
            Op::ServerPublish { room, event, data } => {
                let (seq, delivered, generation) =
                    self.publish(room.as_str(), Sender::Server, event.as_ref(), data, None);
                if self.rooms[room.as_str()].expiry().is_none()
                    && self.rooms[room.as_str()].members.is_empty()
                {
                    // No members and no history: nothing to keep.
                    self.rooms.remove(room.as_str());
                }
                Outcome::Published {
                    seq,
                    delivered,
                    generation,
                }
            }
            Op::Advance { millis } => {
                self.advance_to(self.now + millis);
                Outcome::Done
            }
        };
    }

    fn send(&mut self, s: usize, action: &Action, id: Option<u32>) -> Outcome {
        let user = self.sessions[s].user.clone();
        match action {
            Action::Join { room, presence } => {
                let name = room.as_str();
                let member = self.sessions[s].rooms.contains(name);
                if !member && self.sessions[s].rooms.len() >= MAX_ROOMS {
                    return self.refuse(s, ErrorCode::TooManyRooms, id, Some(room));
                }
                self.room_or_create(name);
                let first_tab = self.rooms[name]
                    .members
                    .keys()
                    .all(|m| self.sessions[*m].user != user);
                let r = self.rooms.get_mut(name).expect("created above");
                r.members.insert(s, *presence);
                let announce = room_options(name).1;
                if !member {
                    self.sessions[s].rooms.insert(name.to_owned());
                    if first_tab && announce {
                        let r = &self.rooms[name];
                        let count = self.users_in(r).len() as u64;
                        let listeners: Vec<usize> = r
                            .members
                            .iter()
                            .filter(|(m, p)| **p && **m != s)
                            .map(|(m, _)| *m)
                            .collect();
                        for m in listeners {
                            self.deliver(
                                m,
                                Frame::Presence {
                                    room: name.to_owned(),
                                    action: "join".to_owned(),
                                    user: Some(user.clone()),
                                    members: None,
                                    count,
                                },
                            );
                        }
                    }
                }
                let r = &self.rooms[name];
                let joined = Frame::Joined {
                    room: name.to_owned(),
                    seq: r.seq,
                    epoch: r.generation,
                    members: announce.then(|| self.users_in(r).len() as u64),
                };
                self.deliver(s, joined);
                self.accept(s, id)
            }
            Action::Leave { room } => {
                if !self.sessions[s].rooms.remove(room.as_str()) {
                    return self.refuse(s, ErrorCode::NotJoined, id, Some(room));
                }
                self.remove_member(s, room.as_str());
                self.accept(s, id)
            }
            Action::Publish {
                room,
                data,
                event,
                echo,
            } => {
                if !self.sessions[s].rooms.contains(room.as_str()) {
                    return self.refuse(s, ErrorCode::NotJoined, id, Some(room));
                }
                let except = (!echo).then_some(s);
                self.publish(
                    room.as_str(),
                    Sender::Session(s, user),
                    event.as_ref(),
                    data,
                    except,
                );
                self.accept(s, id)
            }
            Action::DirectToUser { user: to, data } => {
                let targets: Vec<usize> = (0..self.sessions.len())
                    .filter(|t| self.sessions[*t].open() && self.sessions[*t].user == to.as_str())
                    .collect();
                self.direct(s, &targets, data, id)
            }
            Action::DirectToSession { session: t, data } => {
                let targets: Vec<usize> = Some(*t)
                    .filter(|t| self.sessions[*t].open())
                    .into_iter()
                    .collect();
                self.direct(s, &targets, data, id)
            }
            Action::Presence { room } => {
                let name = room.as_str();
                if !self.sessions[s].rooms.contains(name) {
                    return self.refuse(s, ErrorCode::NotJoined, id, Some(room));
                }
                if !room_options(name).1 {
                    return self.refuse(s, ErrorCode::Forbidden, id, Some(room));
                }
                let members = self.users_in(&self.rooms[name]);
                let count = members.len() as u64;
                self.deliver(
                    s,
                    Frame::Presence {
                        room: name.to_owned(),
                        action: "list".to_owned(),
                        user: None,
                        members: Some(members),
                        count,
                    },
                );
                self.accept(s, id)
            }
            Action::Ping => {
                self.deliver(s, Frame::Pong);
                self.accept(s, id)
            }
            Action::Pong => self.accept(s, id),
        }
    }

    fn direct(&mut self, s: usize, targets: &[usize], data: &Value, id: Option<u32>) -> Outcome {
        if targets.is_empty() {
            return self.refuse(s, ErrorCode::UnknownTarget, id, None);
        }
        let from = Sender::Session(s, self.sessions[s].user.clone());
        for t in targets {
            self.deliver(
                *t,
                Frame::Direct {
                    from: from.clone(),
                    data: data.clone(),
                },
            );
        }
        self.accept(s, id)
    }
}

/// A client frame from a session in `joined`, with `n` sessions opened so far:
/// like [`testing::action`], but mostly publishing to, leaving and asking
/// presence of its own rooms, and joining others, so that messages flow.
fn action(joined: &[RoomName], n: usize) -> BoxedStrategy<Action> {
    let all = room_names();
    let others: Vec<RoomName> = all
        .iter()
        .filter(|r| !joined.contains(r))
        .cloned()
        .collect();
    let mine = if joined.is_empty() {
        all.clone()
    } else {
        joined.to_vec()
    };
    let mine = prop_oneof![5 => select(mine), 1 => select(all.clone())];
    let other = if others.is_empty() {
        select(all)
    } else {
        select(others)
    };
    // A session in no room mostly joins one.
    let (join, rest) = if joined.is_empty() { (24, 1) } else { (4, 2) };
    prop_oneof![
        join => (other, prop::bool::weighted(0.8))
            .prop_map(|(room, presence)| Action::Join { room, presence }),
        rest => mine.clone().prop_map(|room| Action::Leave { room }),
        4 * rest => (
            mine.clone(),
            testing::json_data(),
            prop::option::weighted(0.3, testing::event_name()),
            prop::bool::weighted(0.75),
        )
            .prop_map(|(room, data, event, echo)| Action::Publish {
                room,
                data,
                event,
                echo,
            }),
        1 => (0..USERS, testing::json_data()).prop_map(|(u, data)| Action::DirectToUser {
            user: testing::user_name(u),
            data,
        }),
        1 => (0..n, testing::json_data())
            .prop_map(|(session, data)| Action::DirectToSession { session, data }),
        1 => mine.prop_map(|room| Action::Presence { room }),
        2 => Just(Action::Ping),
        2 => Just(Action::Pong),
    ]
    .boxed()
}

impl ReferenceStateMachine for Model {
    type State = Self;
    type Transition = Op;

    fn init_state() -> BoxedStrategy<Self> {
        Just(Self::new()).boxed()
    }

    fn transitions(state: &Self) -> BoxedStrategy<Op> {
        let rooms = room_names();
        let n = state.sessions.len();
        let open: Vec<usize> = (0..n).filter(|s| state.sessions[*s].open()).collect();
        let connect = (0..USERS).prop_map(|u| Op::Connect {
            user: testing::user_name(u),
        });
        let server_publish = (
            select(rooms),
            prop::option::weighted(0.3, testing::event_name()),
            testing::json_data(),
        )
            .prop_map(|(room, event, data)| Op::ServerPublish { room, event, data });
        // Mostly short: sessions that stay silent longer than a heartbeat die.
        let advance =
            prop_oneof![4 => 0..200u64, 1 => 0..2_500u64].prop_map(|millis| Op::Advance { millis });
        let mut options: Vec<(u32, BoxedStrategy<Op>)> = vec![
            (if open.len() < 2 { 8 } else { 2 }, connect.boxed()),
            (2, server_publish.boxed()),
            (2, advance.boxed()),
        ];
        // Aim at a deadline: 1 ms before it, at it, 1 ms after it (after the
        // step's own 1 ms tick).
        let upcoming: Vec<u64> = state
            .upcoming()
            .into_iter()
            .filter(|at| *at > state.now + 1)
            .collect();
        if !upcoming.is_empty() {
            let now = state.now;
            let aimed = (select(upcoming), 0..3u64).prop_map(move |(at, k)| Op::Advance {
                millis: at - now - 2 + k,
            });
            options.push((2, aimed.boxed()));
        }
        if n > 0 {
            let session = if open.is_empty() {
                (0..n).boxed()
            } else {
                prop_oneof![8 => select(open), 1 => 0..n].boxed()
            };
            let joined: Vec<Vec<RoomName>> = state
                .sessions
                .iter()
                .map(|s| s.rooms.iter().map(|r| RoomName::new(r).unwrap()).collect())
                .collect();
            let send = session
                .clone()
                .prop_flat_map(move |s| {
                    (
                        Just(s),
                        action(&joined[s], n),
                        prop::option::weighted(0.3, 0..100u32),
                    )
                })
                .prop_map(|(session, action, id)| Op::Send {
                    session,
                    action,
                    id,
                });
            let bad = (session.clone(), testing::bad_frame())
                .prop_map(|(session, frame)| Op::BadFrame { session, frame });
            let disconnect = session.prop_map(|session| Op::Disconnect { session });
            options.push((16, send.boxed()));
            options.push((1, bad.boxed()));
            options.push((1, disconnect.boxed()));
        }
        Union::new_weighted(options).boxed()
    }

    /// Shrinking may drop the `Connect` that opened a session an op names.
    fn preconditions(state: &Self, op: &Op) -> bool {
        let n = state.sessions.len();
        match op {
            Op::Send {
                session,
                action: Action::DirectToSession { session: to, .. },
                ..
            } => *session < n && *to < n,
            Op::Send { session, .. }
            | Op::BadFrame { session, .. }
            | Op::Disconnect { session } => *session < n,
            Op::Connect { .. } | Op::ServerPublish { .. } | Op::Advance { .. } => true,
        }
    }

    fn apply(mut state: Self, op: &Op) -> Self {
        state.step(op);
        state
    }
}

// ---- the system under test ---------------------------------------------------

/// What one step did to the real hub.
struct Step {
    op: Op,
    applied: Applied,
    /// (ordinal, ms after SIM_EPOCH, received by the op itself rather than
    /// a timer, the frame).
    received: Vec<(usize, u64, bool, Received)>,
}

struct Sut {
    sim: Sim,
    keys: Vec<SessionKey>,
    ordinal_of_sid: HashMap<String, usize>,
    epoch_of: HashMap<u64, String>,
    generation_of: HashMap<String, u64>,
}

fn rel(t: switchboard_core::Timestamp) -> u64 {
    t.as_millis() - SIM_EPOCH.as_millis()
}

impl Sut {
    fn collect(&mut self, by_op: bool, into: &mut Vec<(usize, u64, bool, Received)>) {
        let at = rel(self.sim.now());
        for (ordinal, key) in self.keys.iter().enumerate() {
            for frame in self.sim.take_raw(*key) {
                into.push((ordinal, at, by_op, frame));
            }
        }
    }

    /// Advances to `end` deadline by deadline, so that every frame is seen
    /// with the time it was sent at.
    fn advance_to(
        &mut self,
        end: switchboard_core::Timestamp,
        into: &mut Vec<(usize, u64, bool, Received)>,
    ) {
        while let Some(next) = self.sim.hub().poll_timeout().filter(|t| *t <= end) {
            let by = next.saturating_since(self.sim.now());
            self.sim.advance(by);
            self.collect(false, into);
        }
        let by = end.saturating_since(self.sim.now());
        self.sim.advance(by);
        self.collect(false, into);
    }

    fn bind_epoch(&mut self, generation: u64, epoch: &str) {
        match self.epoch_of.get(&generation) {
            Some(known) => assert_eq!(
                known, epoch,
                "room generation {generation} changed its epoch"
            ),
            None => {
                assert!(
                    !self.generation_of.contains_key(epoch),
                    "epoch {epoch} reused by a new incarnation of a room"
                );
                self.epoch_of.insert(generation, epoch.to_owned());
                self.generation_of.insert(epoch.to_owned(), generation);
            }
        }
    }

    fn sender(&self, from: &Value) -> Sender {
        if from == &serde_json::json!({ "server": true }) {
            return Sender::Server;
        }
        assert_eq!(object_keys(from), keys(&["sid", "user"]), "from: {from}");
        let sid = from["sid"].as_str().expect("from.sid is a string");
        let ordinal = *self
            .ordinal_of_sid
            .get(sid)
            .unwrap_or_else(|| panic!("unknown sid {sid}"));
        Sender::Session(
            ordinal,
            from["user"].as_str().expect("from.user").to_owned(),
        )
    }

    fn generation(&self, epoch: &Value) -> u64 {
        let epoch = epoch.as_str().expect("epoch is a string");
        self.generation_of.get(epoch).copied().unwrap_or(u64::MAX)
    }

    /// The frame as the model describes it, after checking its shape.
    fn normalize(&self, received: &Received) -> Frame {
        let v = received.json();
        let ty = v["type"].as_str().expect("type is a string");
        assert_eq!(received.kind.type_name(), ty, "FrameKind of {v}");
        let k = object_keys(&v);
        let allowed = |expected: &[&str], optional: &[&str]| {
            let need = keys(expected);
            let may = keys(optional);
            assert!(need.is_subset(&k), "{ty} lacks fields: {v}");
            assert!(
                k.iter().all(|f| need.contains(f) || may.contains(f)),
                "{ty} has extra fields: {v}"
            );
        };
        let s = |f: &str| {
            v[f].as_str()
                .unwrap_or_else(|| panic!("{f} of {v}"))
                .to_owned()
        };
        let n = |f: &str| v[f].as_u64().unwrap_or_else(|| panic!("{f} of {v}"));
        match ty {
            "welcome" => {
                allowed(&["type", "sid", "heartbeat", "limits", "user"], &[]);
                assert_eq!(
                    v["heartbeat"],
                    serde_json::json!({ "interval_ms": INTERVAL, "timeout_ms": TIMEOUT })
                );
                assert_eq!(v["limits"]["max_rooms"], MAX_ROOMS);
                let sid = s("sid");
                Frame::Welcome {
                    session: *self
                        .ordinal_of_sid
                        .get(&sid)
                        .unwrap_or_else(|| panic!("unknown sid {sid}")),
                    user: s("user"),
                }
            }
            "joined" => {
                allowed(&["type", "room", "seq", "epoch"], &["members"]);
                Frame::Joined {
                    room: s("room"),
                    seq: n("seq"),
                    epoch: self.generation(&v["epoch"]),
                    members: v.get("members").map(|_| n("members")),
                }
            }
            "message" => {
                allowed(
                    &["type", "room", "seq", "epoch", "from", "data", "ts"],
                    &["event"],
                );
                match &received.kind {
                    FrameKind::Message { room, seq, epoch } => {
                        assert_eq!(
                            (room.as_str(), *seq, epoch.as_str()),
                            (s("room").as_str(), n("seq"), s("epoch").as_str())
                        );
                    }
                    other => panic!("a message frame of kind {other:?}"),
                }
                Frame::Message {
                    room: s("room"),
                    seq: n("seq"),
                    epoch: self.generation(&v["epoch"]),
                    from: self.sender(&v["from"]),
                    event: v.get("event").map(|_| s("event")),
                    data: v["data"].clone(),
                    ts: n("ts") - SIM_EPOCH.as_millis(),
                }
            }
            "direct" => {
                allowed(&["type", "from", "data"], &[]);
                Frame::Direct {
                    from: self.sender(&v["from"]),
                    data: v["data"].clone(),
                }
            }
            "presence" => {
                allowed(&["type", "room", "action", "count"], &["user", "members"]);
                Frame::Presence {
                    room: s("room"),
                    action: s("action"),
                    user: v.get("user").map(|_| s("user")),
                    members: v.get("members").map(|m| {
                        m.as_array()
                            .expect("members is an array")
                            .iter()
                            .map(|u| u.as_str().expect("member").to_owned())
                            .collect()
                    }),
                    count: n("count"),
                }
            }
            "ack" => {
                allowed(&["type", "id"], &[]);
                Frame::Ack { id: n("id") }
            }
            "error" => {
                allowed(&["type", "code", "message"], &["id", "room"]);
                assert!(!s("message").is_empty());
                Frame::Error {
                    code: s("code"),
                    id: v.get("id").cloned(),
                    room: v.get("room").map(|_| s("room")),
                }
            }
            "ping" => {
                allowed(&["type"], &[]);
                Frame::Ping
            }
            "pong" => {
                allowed(&["type"], &[]);
                Frame::Pong
            }
            "close" => {
                allowed(&["type", "code", "reason"], &[]);
                Frame::Close {
                    code: n("code"),
                    reason: s("reason"),
                }
            }
            other => panic!("unknown server frame type {other}"),
        }
    }

    fn check_outcome(&mut self, model: &Model, applied: &Applied) {
        match (&model.outcome, applied) {
            (Outcome::Connected, Applied::Connected(_))
            | (Outcome::Done, Applied::Done)
            | (Outcome::Gone, Applied::Gone) => {}
            (Outcome::Refused(want), Applied::Refused(got)) if want == got => {}
            (
                Outcome::Published {
                    seq,
                    delivered,
                    generation,
                },
                Applied::Published(p),
            ) if p.seq == *seq && p.delivered == *delivered => {
                self.bind_epoch(*generation, p.epoch.as_str());
            }
            (want, got) => panic!("the model expects {want:?}, the hub did {got:?}"),
        }
    }

    fn check_state(&mut self, model: &Model) {
        let hub = self.sim.hub();
        assert_eq!(rel(self.sim.now()), model.now, "clock");
        assert_eq!(self.keys.len(), model.sessions.len(), "sessions opened");
        assert_eq!(hub.session_count(), model.open_count(), "session_count");
        assert_eq!(hub.stats().sessions_opened, model.sessions.len() as u64);
        assert_eq!(hub.stats().messages, model.messages, "messages published");
        for (ordinal, (key, session)) in self.keys.iter().zip(&model.sessions).enumerate() {
            let key = *key;
            assert_eq!(hub.contains(key), session.open(), "session {ordinal} open");
            let rooms: BTreeSet<String> = hub
                .session_rooms(key)
                .map(|r| r.as_str().to_owned())
                .collect();
            assert_eq!(rooms, session.rooms, "rooms of session {ordinal}");
            for room in ROOMS {
                assert_eq!(
                    hub.is_member(key, room),
                    session.rooms.contains(room),
                    "session {ordinal} in {room}"
                );
            }
            let reason = match session.ended {
                Some((_, Ended::Heartbeat)) => Some(CloseReason::HeartbeatTimeout),
                Some((_, Ended::TooManyErrors)) => Some(CloseReason::TooManyErrors),
                Some((_, Ended::Disconnect)) | None => None,
            };
            assert_eq!(
                self.sim.close_reason(key),
                reason,
                "close reason of session {ordinal}"
            );
        }
        for user in (0..USERS).map(testing::user_name) {
            let got: BTreeSet<SessionKey> =
                hub.user_sessions(user.as_str()).iter().copied().collect();
            let want: BTreeSet<SessionKey> = (0..model.sessions.len())
                .filter(|s| model.sessions[*s].open() && model.sessions[*s].user == user.as_str())
                .map(|s| self.keys[s])
                .collect();
            assert_eq!(got, want, "sessions of {user}");
        }
        assert_eq!(hub.room_count(), model.rooms.len(), "room_count");
        let mut epochs = Vec::new();
        for name in ROOMS {
            match (hub.room(name), model.rooms.get(name)) {
                (None, None) => {}
                (Some(info), Some(room)) => {
                    assert_eq!(info.seq, room.seq, "seq of {name}");
                    assert_eq!(info.sessions, room.members.len(), "sessions in {name}");
                    let users: Vec<String> =
                        info.users.iter().map(|u| u.as_str().to_owned()).collect();
                    assert_eq!(users, model.users_in(room), "users in {name}");
                    let members: BTreeSet<SessionKey> = hub.members(name).collect();
                    let want: BTreeSet<SessionKey> =
                        room.members.keys().map(|m| self.keys[*m]).collect();
                    assert_eq!(members, want, "members of {name}");
                    let history: Vec<u64> = hub
                        .history(name, usize::MAX)
                        .map(|f| {
                            serde_json::from_slice::<Value>(f).unwrap()["seq"]
                                .as_u64()
                                .unwrap()
                        })
                        .collect();
                    let first = room.seq + 1 - room.history as u64;
                    assert_eq!(
                        history,
                        (first..=room.seq).collect::<Vec<_>>(),
                        "history of {name}"
                    );
                    epochs.push((room.generation, info.epoch.as_str().to_owned()));
                }
                (hub_room, model_room) => {
                    panic!("room {name}: the hub has {hub_room:?}, the model {model_room:?}")
                }
            }
        }
        for (generation, epoch) in epochs {
            self.bind_epoch(generation, &epoch);
        }

        // Timers: one live entry per open session, plus at most one per room
        // and the stale entry of a session closed less than a heartbeat ago.
        let hub = self.sim.hub();
        let open = model.open_count();
        let recently_closed = model
            .sessions
            .iter()
            .filter(|s| {
                s.ended
                    .is_some_and(|(at, _)| at + INTERVAL + TIMEOUT > model.now)
            })
            .count();
        let timers = hub.timer_count();
        assert!(
            open <= timers && timers <= open + model.rooms.len() + recently_closed,
            "timer_count {timers} with {open} open sessions, {} rooms, {recently_closed} recently closed",
            model.rooms.len()
        );
        if let Some(next) = model.next_event() {
            let poll = hub.poll_timeout().map(rel);
            assert!(
                poll.is_some_and(|p| p <= next),
                "poll_timeout {poll:?} is later than the next deadline {next}"
            );
        }
    }

    fn check_frames(&self, model: &Model, step: &Step) {
        let actor = match &step.op {
            Op::Send { session, .. } | Op::BadFrame { session, .. } => Some(*session),
            _ => None,
        };
        let mut seen = Vec::new();
        let mut replies = Vec::new();
        for (session, at, by_op, received) in &step.received {
            let mut frame = self.normalize(received);
            if let (Op::BadFrame { .. }, Some(a), Frame::Error { id, room, .. }) =
                (&step.op, actor, &mut frame)
            {
                if a == *session && *by_op {
                    // What of a malformed frame could be read is not modelled.
                    *id = None;
                    *room = None;
                }
            }
            if *by_op && Some(*session) == actor {
                replies.push(frame.clone());
            }
            seen.push(Seen {
                session: *session,
                at: *at,
                frame,
            });
        }
        assert_eq!(
            streams(seen),
            streams(model.expect.iter().cloned()),
            "frames delivered by {:?} (left: hub, right: model)",
            step.op
        );
        // An `ack` or `error` comes after everything the frame caused: only
        // the `close` of a spent error budget may follow it.
        if let Some(at) = replies
            .iter()
            .position(|f| matches!(f, Frame::Ack { .. } | Frame::Error { .. }))
        {
            assert!(
                replies[at + 1..]
                    .iter()
                    .all(|f| matches!(f, Frame::Close { .. })),
                "the answer to {:?} is not last: {replies:?}",
                step.op
            );
        }
    }
}

fn object_keys(v: &Value) -> BTreeSet<String> {
    v.as_object().expect("an object").keys().cloned().collect()
}

fn keys(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| (*s).to_owned()).collect()
}

impl StateMachineTest for Sut {
    type SystemUnderTest = Self;
    type Reference = Model;

    fn init_test(_: &Model) -> Self {
        Self {
            sim: Sim::new(config(), Arc::new(ModelPolicy)),
            keys: Vec::new(),
            ordinal_of_sid: HashMap::new(),
            epoch_of: HashMap::new(),
            generation_of: HashMap::new(),
        }
    }

    fn apply(mut sut: Self, model: &Model, op: Op) -> Self {
        let mut received = Vec::new();
        let tick = sut.sim.now() + ms(1);
        sut.advance_to(tick, &mut received);
        let applied = match &op {
            // Deadline by deadline, to see when each frame was sent.
            Op::Advance { millis } => {
                let end = sut.sim.now() + ms(*millis);
                sut.advance_to(end, &mut received);
                Applied::Done
            }
            _ => testing::apply_op(&mut sut.sim, &mut sut.keys, &op),
        };
        if let Applied::Connected(key) = applied {
            let sid = sut.sim.hub().sid(key).expect("a new session has a sid");
            sut.ordinal_of_sid
                .insert(sid.as_str().to_owned(), sut.keys.len() - 1);
        }
        sut.collect(true, &mut received);
        let step = Step {
            op,
            applied,
            received,
        };
        // Checked here rather than in `check_invariants`, which gets `&Self`:
        // epochs are learned as rooms appear. `model` is the state after `op`.
        sut.check_outcome(model, &step.applied);
        sut.check_state(model);
        sut.check_frames(model, &step);
        sut
    }

    /// Everyone leaves; once the history TTL has passed, nothing is left.
    fn teardown(mut sut: Self) {
        for key in sut.keys.clone() {
            sut.sim.disconnect(key);
        }
        sut.sim.advance(ms(INTERVAL + TIMEOUT + TTL + 1));
        let hub = sut.sim.hub();
        assert_eq!(hub.session_count(), 0, "sessions left");
        assert_eq!(hub.room_count(), 0, "rooms left");
        assert_eq!(hub.timer_count(), 0, "timers left");
        assert_eq!(hub.poll_timeout(), None);
    }
}

fn proptest_config() -> ProptestConfig {
    let mut config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = 128;
    }
    config
}

prop_state_machine! {
    #![proptest_config(proptest_config())]

    #[test]
    fn the_hub_follows_the_model(sequential 1..60 => Sut);
}

// ---- random traffic through the public strategies -------------------------------

/// The hub's own views agree with each other: sessions, their rooms, the
/// rooms' members.
fn check_consistent(sim: &Sim, sessions: &[SessionKey]) {
    let hub = sim.hub();
    let open: Vec<SessionKey> = sessions
        .iter()
        .copied()
        .filter(|k| hub.contains(*k))
        .collect();
    assert_eq!(hub.session_count(), open.len(), "session_count");
    assert!(
        hub.timer_count() >= open.len(),
        "an open session without a deadline"
    );
    let mut rooms = BTreeSet::new();
    for key in &open {
        for room in hub.session_rooms(*key) {
            assert!(hub.is_member(*key, room.as_str()));
            assert!(hub.members(room.as_str()).any(|m| m == *key));
            rooms.insert(room.as_str().to_owned());
        }
    }
    for room in &rooms {
        let info = hub.room(room).expect("a room with members exists");
        assert_eq!(info.sessions, hub.members(room).count());
        for member in hub.members(room) {
            assert!(hub.contains(member), "a closed session is still in {room}");
        }
    }
}

// [`testing::op`] sequences under the default config and `OpenPolicy` (history
// kept 5 minutes, heartbeat 25 s + 20 s): no model, but after every op the
// hub must be consistent and every frame anyone received must parse; at the
// end everything is freed.
proptest! {
    #![proptest_config(ProptestConfig {
        cases: if std::env::var_os("PROPTEST_CASES").is_some() { ProptestConfig::default().cases } else { 64 },
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_ops_keep_the_hub_consistent(
        ops in prop::collection::vec(testing::op(4, &room_names()), 1..80)
    ) {
        let mut sim = Sim::new(Config::default(), Arc::new(switchboard_core::OpenPolicy));
        let mut sessions = Vec::new();
        for op in &ops {
            let applied = testing::apply_op(&mut sim, &mut sessions, op);
            prop_assert!(applied != Applied::NoSession || sessions.is_empty());
            if let (Op::BadFrame { frame, .. }, Applied::Refused(code)) = (op, &applied) {
                prop_assert_eq!(*code, frame.code);
            }
            check_consistent(&sim, &sessions);
            for key in &sessions {
                // Panics if the hub relayed something a strict parser refuses.
                let _ = sim.take(*key);
            }
        }
        for key in sessions.clone() {
            sim.disconnect(key);
        }
        sim.advance(Duration::from_secs(3600));
        prop_assert_eq!(sim.hub().session_count(), 0);
        prop_assert_eq!(sim.hub().room_count(), 0);
        prop_assert_eq!(sim.hub().timer_count(), 0);
    }
}
