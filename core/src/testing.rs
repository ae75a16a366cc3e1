//! Proptest strategies for property-testing policies against the real core
//! (feature `proptest`).
//!
//! Three layers, from small to large:
//!
//! - **values**: [`room_name`], [`user_id`], [`event_name`], [`json_data`],
//!   [`frame_id`];
//! - **client frames** as JSON text: valid ones ([`join_frame`],
//!   [`publish_frame`], [`client_frame`], ...; each decodes, though the hub may
//!   still refuse it for the session's state, e.g. `not_joined`) and
//!   malformed ones ([`malformed_frame`], or [`bad_frame`] with the error code
//!   the hub must answer);
//! - **operations** on a whole hub: [`Op`] and [`op`] generate random
//!   sequences of connects, client frames, bad frames, disconnects, server
//!   publishes and clock advances, and [`apply_op`] applies one to a
//!   [`Sim`].
//!
//! Sessions are named by ordinal: the `n`-th session opened by an
//! [`Op::Connect`] in the run is session `n`. An ordinal wraps around the
//! sessions opened so far, so any `usize` names some session once one exists.
//!
//! # Example: a policy keeps its promise under random traffic
//!
//! ```
//! use std::sync::Arc;
//! use proptest::{collection::vec, test_runner::{Config, TestRunner}};
//! use switchboard_core::testing::{apply_op, op};
//! use switchboard_core::{sim::Sim, Identity, Policy, RoomName};
//!
//! /// Nobody but `admin` may join `ops`.
//! struct Mine;
//! impl Policy for Mine {
//!     fn may_join(&self, who: &Identity, room: &RoomName) -> bool {
//!         room.as_str() != "ops" || who.user.as_str() == "admin"
//!     }
//! }
//!
//! let rooms = ["lobby", "ops"].map(|r| RoomName::new(r).unwrap());
//! let mut runner = TestRunner::new(Config::with_cases(16));
//! runner
//!     .run(&vec(op(3, &rooms), 1..40), |ops| {
//!         let mut sim = Sim::new(switchboard_core::Config::default(), Arc::new(Mine));
//!         let mut sessions = Vec::new();
//!         for op in &ops {
//!             apply_op(&mut sim, &mut sessions, op);
//!             // op(3, ..) opens sessions for user0..user2, never `admin`.
//!             assert_eq!(sim.hub().members("ops").count(), 0);
//!         }
//!         Ok(())
//!     })
//!     .unwrap();
//! ```

use std::fmt;
use std::time::Duration;

use proptest::prelude::*;
use proptest::sample::{select, Index};
use serde_json::{json, Map, Value};

use crate::sim::Sim;
use crate::{ErrorCode, Identity, Liveness, Published, RoomName, SessionKey, UserId};

/// The bytes allowed in a room name (PROTOCOL.md, Rooms).
const ROOM_BYTES: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-.:/";

/// Every field a client frame may have; unknown fields are drawn elsewhere.
const KNOWN_FIELDS: &[&str] = &[
    "type", "id", "room", "since", "presence", "data", "event", "echo", "to", "token",
];

/// Every client frame type of PROTOCOL.md.
const CLIENT_TYPES: &[&str] = &[
    "join", "leave", "publish", "direct", "ping", "pong", "presence", "refresh",
];

/// The types whose frames carry a `room`.
const ROOM_TYPES: &[&str] = &["join", "leave", "publish", "presence"];

// ---- values ----------------------------------------------------------------

/// A valid room name: mostly short lowercase names (so that random frames
/// meet in the same rooms), sometimes anything the protocol allows, up to 128
/// bytes of `A-Z a-z 0-9 _ - . : /`.
pub fn room_name() -> impl Strategy<Value = RoomName> + Clone {
    prop_oneof![
        3 => prop::collection::vec(select(&ROOM_BYTES[26..52]), 1..=8),
        1 => prop::collection::vec(select(ROOM_BYTES), 1..=crate::MAX_ROOM_NAME_BYTES),
    ]
    .prop_map(|bytes| {
        // Every byte is drawn from ROOM_BYTES: ASCII and allowed in a room name.
        let name = String::from_utf8(bytes).expect("room bytes are ASCII");
        RoomName::new(&name).expect("room bytes are valid in a room name")
    })
}

/// Any user id the caller's authentication might produce: mostly lowercase
/// names, sometimes with quotes, backslashes, control characters or non-ASCII
/// text, which every frame that carries a user must escape.
pub fn user_id() -> impl Strategy<Value = UserId> + Clone {
    prop::collection::vec(text_char(), 1..12).prop_map(|c| UserId::from(String::from_iter(c)))
}

/// The user ids [`op`] connects: `user0`, `user1`, ...
#[must_use]
pub fn user_name(index: usize) -> UserId {
    UserId::from(format!("user{index}"))
}

/// An application `event` name: up to 128 bytes, mostly short.
pub fn event_name() -> impl Strategy<Value = String> + Clone {
    prop_oneof![
        8 => prop::collection::vec(text_char(), 1..24).prop_map(String::from_iter),
        1 => Just("e".repeat(crate::codec::MAX_EVENT_BYTES)),
    ]
}

/// Any JSON a client may publish as `data`: nested arrays and objects of
/// null, booleans, integers and strings with characters JSON must escape.
///
/// Floating-point numbers are left out so that parsing a delivered frame gives
/// back exactly the value that was sent.
pub fn json_data() -> impl Strategy<Value = Value> + Clone {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        json_text().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(json_text(), inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
    .boxed()
}

/// A valid frame `id`: a number, or a string of at most 64 bytes.
pub fn frame_id() -> impl Strategy<Value = Value> + Clone {
    prop_oneof![
        any::<u32>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        json_text().prop_map(Value::String),
        Just(Value::String("i".repeat(crate::codec::MAX_ID_BYTES))),
    ]
}

fn text_char() -> impl Strategy<Value = char> + Clone {
    prop_oneof![
        12 => prop::char::range('a', 'z'),
        1 => select(vec!['"', '\\', '/', '\n', '\u{0}', '\u{1f}', '\u{7f}', 'é', '漢', '🙂', '\u{2028}']),
    ]
}

fn json_text() -> impl Strategy<Value = String> + Clone {
    prop::collection::vec(text_char(), 0..12).prop_map(String::from_iter)
}

// ---- valid client frames -----------------------------------------------------

/// What every client frame may carry besides its own fields: an `id`, an
/// unknown field (to be ignored), and its layout.
#[derive(Debug, Clone)]
struct Envelope {
    id: Option<Value>,
    unknown: Option<(&'static str, Value)>,
    pretty: bool,
}

fn envelope() -> impl Strategy<Value = Envelope> + Clone {
    let unknown = (
        select(vec!["x", "meta", "v2", "trace_id", "_", "Type", "ROOM"]),
        json_data(),
    );
    (
        prop::option::weighted(0.3, frame_id()),
        prop::option::weighted(0.2, unknown),
        prop::bool::weighted(0.1),
    )
        .prop_map(|(id, unknown, pretty)| Envelope {
            id,
            unknown,
            pretty,
        })
        .boxed()
}

impl Envelope {
    fn render(self, ty: &str, fields: Vec<(&'static str, Value)>) -> String {
        let mut map = Map::new();
        if let Some((name, value)) = self.unknown {
            debug_assert!(!KNOWN_FIELDS.contains(&name));
            map.insert(name.to_owned(), value);
        }
        map.insert("type".to_owned(), Value::from(ty));
        for (name, value) in fields {
            map.insert(name.to_owned(), value);
        }
        if let Some(id) = self.id {
            map.insert("id".to_owned(), id);
        }
        let value = Value::Object(map);
        if self.pretty {
            // Leading whitespace and newlines are still one JSON object.
            format!("\n  {value:#}")
        } else {
            value.to_string()
        }
    }
}

/// A valid `join` frame for a room drawn from `room`, sometimes with
/// `presence`, a `since` (any seq, any epoch), an `id` and an unknown field.
pub fn join_frame(
    room: impl Strategy<Value = RoomName> + Clone + 'static,
) -> impl Strategy<Value = String> + Clone {
    let since = (
        0..50u64,
        prop_oneof![json_text(), Just("AAAAAAAA".to_owned())],
    )
        .prop_map(|(seq, epoch)| json!({ "seq": seq, "epoch": epoch }));
    (
        room,
        prop::option::weighted(0.3, any::<bool>()),
        prop::option::weighted(0.3, since),
        envelope(),
    )
        .prop_map(|(room, presence, since, env)| {
            let mut fields = vec![("room", Value::from(room.as_str()))];
            fields.extend(presence.map(|p| ("presence", Value::Bool(p))));
            fields.extend(since.map(|s| ("since", s)));
            env.render("join", fields)
        })
        .boxed()
}

/// A valid `leave` frame for a room drawn from `room`.
pub fn leave_frame(
    room: impl Strategy<Value = RoomName> + Clone + 'static,
) -> impl Strategy<Value = String> + Clone {
    (room, envelope())
        .prop_map(|(room, env)| env.render("leave", vec![("room", Value::from(room.as_str()))]))
        .boxed()
}

/// A valid `presence` request for a room drawn from `room`.
pub fn presence_frame(
    room: impl Strategy<Value = RoomName> + Clone + 'static,
) -> impl Strategy<Value = String> + Clone {
    (room, envelope())
        .prop_map(|(room, env)| env.render("presence", vec![("room", Value::from(room.as_str()))]))
        .boxed()
}

/// A valid `publish` frame for a room drawn from `room`: any [`json_data`],
/// sometimes an `event` and an explicit `echo`.
pub fn publish_frame(
    room: impl Strategy<Value = RoomName> + Clone + 'static,
) -> impl Strategy<Value = String> + Clone {
    (
        room,
        json_data(),
        prop::option::weighted(0.3, event_name()),
        prop::option::weighted(0.3, any::<bool>()),
        envelope(),
    )
        .prop_map(|(room, data, event, echo, env)| {
            let mut fields = vec![("room", Value::from(room.as_str())), ("data", data)];
            fields.extend(event.map(|e| ("event", Value::from(e))));
            fields.extend(echo.map(|e| ("echo", Value::Bool(e))));
            env.render("publish", fields)
        })
        .boxed()
}

/// A valid `direct` frame to a user drawn from `user` or to a session whose
/// sid is drawn from `sid` (any string: the hub answers `unknown_target` when
/// no session has it).
pub fn direct_frame(
    user: impl Strategy<Value = UserId> + Clone + 'static,
    sid: impl Strategy<Value = String> + Clone + 'static,
) -> impl Strategy<Value = String> + Clone {
    let to = prop_oneof![
        user.prop_map(|u| json!({ "user": u.as_str() })),
        sid.prop_map(|s| json!({ "sid": s })),
    ];
    (
        to,
        json_data(),
        prop::option::weighted(0.3, event_name()),
        envelope(),
    )
        .prop_map(|(to, data, event, env)| {
            let mut fields = vec![("to", to), ("data", data)];
            fields.extend(event.map(|e| ("event", Value::from(e))));
            env.render("direct", fields)
        })
        .boxed()
}

/// A valid `ping` frame.
pub fn ping_frame() -> impl Strategy<Value = String> + Clone {
    envelope().prop_map(|env| env.render("ping", Vec::new()))
}

/// A valid `pong` frame.
pub fn pong_frame() -> impl Strategy<Value = String> + Clone {
    envelope().prop_map(|env| env.render("pong", Vec::new()))
}

/// Any valid client frame, with rooms from `room`, direct targets from `user`
/// and `sid`.
pub fn client_frame<R, U, S>(room: R, user: U, sid: S) -> impl Strategy<Value = String> + Clone
where
    R: Strategy<Value = RoomName> + Clone + 'static,
    U: Strategy<Value = UserId> + Clone + 'static,
    S: Strategy<Value = String> + Clone + 'static,
{
    prop_oneof![
        3 => join_frame(room.clone()),
        1 => leave_frame(room.clone()),
        3 => publish_frame(room.clone()),
        1 => presence_frame(room),
        1 => direct_frame(user, sid),
        1 => ping_frame(),
        1 => pong_frame(),
    ]
    .boxed()
}

// ---- malformed client frames ------------------------------------------------

/// A client frame the hub must refuse whatever the session's state, and the
/// code of the `error` it must answer with.
#[derive(Clone, PartialEq, Eq)]
pub struct BadFrame {
    /// The frame as sent (not necessarily UTF-8, nor JSON).
    pub bytes: Vec<u8>,
    /// The error code the hub must answer with.
    pub code: ErrorCode,
}

impl fmt::Debug for BadFrame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BadFrame")
            .field("code", &self.code)
            .field("bytes", &String::from_utf8_lossy(&self.bytes))
            .finish()
    }
}

/// Bytes the hub must refuse as a client frame: not JSON, not an object, cut
/// short, a field missing or of the wrong kind, an unknown `type`, a bad room
/// name, a bad `id`. Each has exactly one defect, so the expected error code is
/// known (see [`bad_frame`]).
///
/// Oversize frames (`frame_too_large`) are not drawn: the limit is the hub's
/// [`Config`](crate::Config), and such frames are slow to generate.
pub fn malformed_frame() -> impl Strategy<Value = Vec<u8>> + Clone {
    bad_frame().prop_map(|b| b.bytes)
}

/// A [`malformed_frame`] with the error code the hub must answer it with.
pub fn bad_frame() -> impl Strategy<Value = BadFrame> + Clone {
    prop_oneof![
        3 => invalid_json(),
        4 => invalid_frame().prop_map(|t| BadFrame { bytes: t.into_bytes(), code: ErrorCode::InvalidFrame }),
        1 => unknown_type().prop_map(|t| BadFrame { bytes: t.into_bytes(), code: ErrorCode::UnknownType }),
        2 => invalid_room().prop_map(|t| BadFrame { bytes: t.into_bytes(), code: ErrorCode::InvalidRoom }),
    ]
    .boxed()
}

fn any_valid_frame() -> impl Strategy<Value = String> + Clone {
    client_frame(room_name(), user_id(), json_text())
}

/// Objects that are not JSON: syntax errors, bad escapes, invalid UTF-8.
const BROKEN_JSON: &[&[u8]] = &[
    br#"{"type":"ping",}"#,
    br#"{'type':'ping'}"#,
    br#"{"type":"ping" "id":1}"#,
    br#"{"type" "ping"}"#,
    br#"{type:"ping"}"#,
    br#"{"type":"ping""#,
    br#"{"type":"publish","room":"a","data":NaN}"#,
    br#"{"type":"publish","room":"a","data":01}"#,
    br#"{"type":"publish","room":"a","data":"\x"}"#,
    br#"{"type":"publish","room":"a","data":"\ud800"}"#,
    b"{\"type\":\"publish\",\"room\":\"a\",\"data\":\"\xff\"}",
    b"{\"type\":\"join\",\"room\":\"a\xc3\"}",
    b"{\"type\":\"ping\",\"id\":\"\x00\"}",
    b"{\"type\":\"ping\",\"x\":\"\xff\"}",
    // JSON that only a lenient parser reads: refused, since `data` is relayed.
    br#"{"type":"publish","room":"a","data":"\ud83d"}"#,
    br#"{"type":"publish","room":"a","data":{"\udc00":1}}"#,
    br#"{"type":"publish","room":"a","data":[1e400]}"#,
    br#"{"type":"direct","to":{"user":"u"},"data":"x\udfff"}"#,
];

fn invalid_json() -> impl Strategy<Value = BadFrame> + Clone {
    let not_an_object = (
        select(vec![
            "", " ", "\n\t", "[", "\"", "1", "-", "x", "null", "true", "]", "}",
        ]),
        prop::collection::vec(any::<u8>(), 0..24),
    )
        .prop_map(|(start, rest)| [start.as_bytes(), &rest].concat());
    // Any strict prefix of a JSON object lacks its closing brace.
    let cut_short = (any_valid_frame(), any::<Index>()).prop_map(|(frame, at)| {
        let cut = 1 + at.index(frame.len() - 1);
        frame.as_bytes()[..cut].to_vec()
    });
    let trailing = (
        any_valid_frame(),
        select(vec![" x", "}", "{}", ",", "]", "\u{0}"]),
    )
        .prop_map(|(frame, tail)| format!("{frame}{tail}").into_bytes());
    let broken = select(BROKEN_JSON).prop_map(<[u8]>::to_vec);
    // Deeper than the 100 levels of `data` the hub relays (PROTOCOL.md).
    let deep = (101..300usize).prop_map(|depth| {
        format!(
            r#"{{"type":"publish","room":"a","data":{}0{}}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        )
        .into_bytes()
    });
    prop_oneof![not_an_object, cut_short, trailing, broken, deep]
        .prop_map(|bytes| BadFrame {
            bytes,
            code: ErrorCode::InvalidJson,
        })
        .boxed()
}

/// A valid room-bearing frame's fields other than `room` (so that only the
/// room is wrong).
fn room_frame_fields(ty: &str) -> Vec<(&'static str, Value)> {
    if ty == "publish" {
        vec![("data", json!({ "n": 1 }))]
    } else {
        Vec::new()
    }
}

fn render_plain(ty: Value, fields: Vec<(&'static str, Value)>) -> String {
    let mut map = Map::new();
    map.insert("type".to_owned(), ty);
    for (name, value) in fields {
        map.insert(name.to_owned(), value);
    }
    Value::Object(map).to_string()
}

fn wrong_kind() -> impl Strategy<Value = Value> + Clone {
    select(vec![
        Value::Null,
        json!(1),
        json!(true),
        json!([]),
        json!({}),
        json!(["a"]),
    ])
}

fn invalid_frame() -> impl Strategy<Value = String> + Clone {
    let no_type = prop_oneof![
        Just("{}".to_owned()),
        Just(r#"{"room":"a"}"#.to_owned()),
        Just(r#"{"data":1,"id":3}"#.to_owned()),
    ];
    let type_kind = wrong_kind().prop_map(|ty| render_plain(ty, Vec::new()));
    let no_room = select(ROOM_TYPES).prop_map(|ty| {
        let fields = room_frame_fields(ty);
        render_plain(Value::from(ty), fields)
    });
    let room_kind = (select(ROOM_TYPES), wrong_kind()).prop_map(|(ty, room)| {
        let mut fields = room_frame_fields(ty);
        fields.push(("room", room));
        render_plain(Value::from(ty), fields)
    });
    let publish = prop_oneof![
        Just(vec![("room", json!("a"))]),
        wrong_kind()
            .prop_filter("echo must not be a boolean", |v| !v.is_boolean())
            .prop_map(|echo| vec![("room", json!("a")), ("data", json!(1)), ("echo", echo)]),
        prop_oneof![
            wrong_kind(),
            Just(json!("e".repeat(crate::codec::MAX_EVENT_BYTES + 1)))
        ]
        .prop_map(|event| vec![("room", json!("a")), ("data", json!(1)), ("event", event)]),
    ]
    .prop_map(|fields| render_plain(json!("publish"), fields));
    let join = prop_oneof![
        wrong_kind()
            .prop_filter("presence must not be a boolean", |v| !v.is_boolean())
            .prop_map(|p| ("presence", p)),
        select(vec![
            json!(null),
            json!(5),
            json!({ "seq": -1, "epoch": "e" }),
            json!({ "seq": 1 }),
            json!({ "epoch": "e" }),
            json!({ "seq": "1", "epoch": "e" }),
            json!({ "seq": 1, "epoch": 2 }),
        ])
        .prop_map(|s| ("since", s)),
    ]
    .prop_map(|field| render_plain(json!("join"), vec![("room", json!("a")), field]));
    let direct = select(vec![
        vec![("data", json!(1))],
        vec![("to", json!({ "user": "bob" }))],
        vec![("to", json!("bob")), ("data", json!(1))],
        vec![("to", json!(null)), ("data", json!(1))],
        vec![("to", json!({})), ("data", json!(1))],
        vec![("to", json!({ "user": null })), ("data", json!(1))],
        vec![("to", json!({ "user": 1 })), ("data", json!(1))],
        vec![
            ("to", json!({ "user": "a", "sid": "b" })),
            ("data", json!(1)),
        ],
    ])
    .prop_map(|fields| render_plain(json!("direct"), fields));
    let bad_id = (
        select(CLIENT_TYPES),
        prop_oneof![
            wrong_kind().prop_filter("ids may be numbers", |v| !v.is_number()),
            Just(json!("i".repeat(crate::codec::MAX_ID_BYTES + 1))),
            Just(json!(format!(
                "{}é",
                "i".repeat(crate::codec::MAX_ID_BYTES - 1)
            ))),
        ],
    )
        .prop_map(|(ty, id)| {
            let mut fields = vec![("id", id)];
            match ty {
                "direct" => {
                    fields.extend([("to", json!({ "user": "bob" })), ("data", json!(1))]);
                }
                "ping" | "pong" => {}
                "refresh" => fields.push(("token", json!("t"))),
                _ => {
                    fields.extend(room_frame_fields(ty));
                    fields.push(("room", json!("a")));
                }
            }
            render_plain(Value::from(ty), fields)
        });
    let refresh = select(vec![
        vec![],
        vec![("token", json!(""))],
        vec![("token", json!(null))],
        vec![("token", json!(1))],
        vec![("token", json!(["a.b.c"]))],
    ])
    .prop_map(|fields| render_plain(json!("refresh"), fields));
    let duplicate = select(vec![
        r#"{"type":"ping","type":"ping"}"#,
        r#"{"type":"join","room":"a","room":"b"}"#,
        r#"{"type":"publish","room":"a","data":1,"data":2}"#,
        r#"{"type":"ping","id":1,"id":1}"#,
    ])
    .prop_map(str::to_owned);
    prop_oneof![
        no_type, type_kind, no_room, room_kind, publish, join, direct, refresh, bad_id, duplicate
    ]
    .boxed()
}

fn unknown_type() -> impl Strategy<Value = String> + Clone {
    let ty = prop_oneof![
        "[a-zA-Z_]{0,12}",
        select(vec![
            "Join",
            "PING",
            "join ",
            " publish",
            "subscribe",
            "message",
            "ack"
        ])
        .prop_map(str::to_owned),
    ]
    .prop_filter("a known type", |t| !CLIENT_TYPES.contains(&t.as_str()));
    (ty, prop::option::of(frame_id()))
        .prop_map(|(ty, id)| {
            let fields = id.map(|id| ("id", id)).into_iter().collect();
            render_plain(Value::from(ty), fields)
        })
        .boxed()
}

fn invalid_room() -> impl Strategy<Value = String> + Clone {
    let name = prop_oneof![
        Just(String::new()),
        Just("r".repeat(crate::MAX_ROOM_NAME_BYTES + 1)),
        (
            room_name(),
            select(vec![' ', '#', 'é', '\u{0}', '"', '\\', '*', '+']),
            any::<Index>()
        )
            .prop_map(|(room, bad, at)| {
                let mut name = room.as_str().to_owned();
                name.insert(at.index(name.len() + 1), bad);
                name
            }),
    ];
    (select(ROOM_TYPES), name)
        .prop_map(|(ty, room)| {
            let mut fields = room_frame_fields(ty);
            fields.push(("room", Value::from(room)));
            render_plain(Value::from(ty), fields)
        })
        .boxed()
}

// ---- operations ------------------------------------------------------------

/// One thing that happens to a hub: the unit of [`op`] sequences, applied with
/// [`apply_op`].
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// A client connects as `user` ([`Liveness::Client`]); it becomes the next
    /// session ordinal.
    Connect {
        /// Who authenticated.
        user: UserId,
    },
    /// Session `session` sends a valid client frame.
    Send {
        /// The sender's ordinal.
        session: usize,
        /// What it sends.
        action: Action,
        /// The frame's `id`, answered by `ack` or `error`.
        id: Option<u32>,
    },
    /// Session `session` sends a frame that must be refused.
    BadFrame {
        /// The sender's ordinal.
        session: usize,
        /// The frame and the code it must be refused with.
        frame: BadFrame,
    },
    /// The transport of session `session` ends ([`Hub::handle_close`](crate::Hub::handle_close)).
    Disconnect {
        /// The session's ordinal.
        session: usize,
    },
    /// The application publishes to `room` ([`Hub::publish`](crate::Hub::publish)).
    ServerPublish {
        /// The room.
        room: RoomName,
        /// The event name.
        event: Option<String>,
        /// The payload.
        data: Value,
    },
    /// Time passes; every deadline on the way fires at its own time.
    Advance {
        /// How long, in milliseconds.
        millis: u64,
    },
}

/// A valid client frame, as [`Op::Send`] sends it.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// `join`; `presence: false` is sent explicitly, `true` by omission.
    Join {
        /// The room.
        room: RoomName,
        /// Whether the session wants presence events.
        presence: bool,
    },
    /// `leave`.
    Leave {
        /// The room.
        room: RoomName,
    },
    /// `publish`; `echo: true` is sent by omission.
    Publish {
        /// The room.
        room: RoomName,
        /// The payload.
        data: Value,
        /// The event name.
        event: Option<String>,
        /// Whether the sender receives its own message.
        echo: bool,
    },
    /// `direct` to every session of `user`.
    DirectToUser {
        /// The recipient user.
        user: UserId,
        /// The payload.
        data: Value,
    },
    /// `direct` to the sid of session ordinal `session` (a closed session's
    /// sid is unknown to the hub, so the frame gets `unknown_target`).
    DirectToSession {
        /// The recipient's ordinal.
        session: usize,
        /// The payload.
        data: Value,
    },
    /// `presence`: asks for the member list.
    Presence {
        /// The room.
        room: RoomName,
    },
    /// `ping`.
    Ping,
    /// `pong`.
    Pong,
}

impl Action {
    /// The frame as JSON text; `target_sid` is the sid of
    /// [`Action::DirectToSession`]'s recipient.
    #[must_use]
    pub fn to_json(&self, id: Option<u32>, target_sid: &str) -> String {
        let mut frame = match self {
            Self::Join { room, presence } => {
                let mut f = json!({ "type": "join", "room": room.as_str() });
                if !presence {
                    f["presence"] = Value::Bool(false);
                }
                f
            }
            Self::Leave { room } => json!({ "type": "leave", "room": room.as_str() }),
            Self::Publish {
                room,
                data,
                event,
                echo,
            } => {
                let mut f = json!({ "type": "publish", "room": room.as_str(), "data": data });
                if let Some(event) = event {
                    f["event"] = Value::from(event.as_str());
                }
                if !echo {
                    f["echo"] = Value::Bool(false);
                }
                f
            }
            Self::DirectToUser { user, data } => {
                json!({ "type": "direct", "to": { "user": user.as_str() }, "data": data })
            }
            Self::DirectToSession { data, .. } => {
                json!({ "type": "direct", "to": { "sid": target_sid }, "data": data })
            }
            Self::Presence { room } => json!({ "type": "presence", "room": room.as_str() }),
            Self::Ping => json!({ "type": "ping" }),
            Self::Pong => json!({ "type": "pong" }),
        };
        if let Some(id) = id {
            frame["id"] = Value::from(id);
        }
        frame.to_string()
    }
}

/// Ordinals drawn by [`op`]; they wrap around the sessions opened so far.
const ORDINALS: std::ops::Range<usize> = 0..16;

/// A client frame for [`Op::Send`]: direct targets are the users `user0` to
/// `user{n_users - 1}` (see [`user_name`]) and any session ordinal, rooms are
/// drawn from `rooms`.
///
/// # Panics
/// When `n_users` is 0 or `rooms` is empty.
pub fn action(n_users: usize, rooms: &[RoomName]) -> impl Strategy<Value = Action> + Clone {
    assert!(n_users > 0 && !rooms.is_empty(), "need users and rooms");
    let room = select(rooms.to_vec());
    let user = (0..n_users).prop_map(user_name);
    prop_oneof![
        4 => (room.clone(), prop::bool::weighted(0.85))
            .prop_map(|(room, presence)| Action::Join { room, presence }),
        2 => room.clone().prop_map(|room| Action::Leave { room }),
        5 => (room.clone(), json_data(), prop::option::weighted(0.3, event_name()), prop::bool::weighted(0.75))
            .prop_map(|(room, data, event, echo)| Action::Publish { room, data, event, echo }),
        1 => (user, json_data()).prop_map(|(user, data)| Action::DirectToUser { user, data }),
        1 => (ORDINALS, json_data()).prop_map(|(session, data)| Action::DirectToSession { session, data }),
        1 => room.prop_map(|room| Action::Presence { room }),
        1 => Just(Action::Ping),
        1 => Just(Action::Pong),
    ]
    .boxed()
}

/// One random [`Op`]: connects of `user0` to `user{n_users - 1}`, client frames
/// (join, leave, publish with and without echo, direct to a user or a
/// session, presence, ping, pong) to rooms drawn from `rooms`, malformed
/// frames, disconnects, server publishes and clock advances of up to a
/// minute (so heartbeats and history expiry happen under the default
/// [`Config`](crate::Config)).
///
/// # Panics
/// When `n_users` is 0 or `rooms` is empty.
pub fn op(n_users: usize, rooms: &[RoomName]) -> impl Strategy<Value = Op> + Clone {
    let room = select(rooms.to_vec());
    prop_oneof![
        3 => (0..n_users.max(1)).prop_map(|u| Op::Connect { user: user_name(u) }),
        12 => (ORDINALS, action(n_users, rooms), prop::option::weighted(0.2, 0..1000u32))
            .prop_map(|(session, action, id)| Op::Send { session, action, id }),
        1 => (ORDINALS, bad_frame()).prop_map(|(session, frame)| Op::BadFrame { session, frame }),
        1 => ORDINALS.prop_map(|session| Op::Disconnect { session }),
        2 => (room, prop::option::weighted(0.3, event_name()), json_data())
            .prop_map(|(room, event, data)| Op::ServerPublish { room, event, data }),
        2 => prop_oneof![0..2_000u64, 0..60_000u64].prop_map(|millis| Op::Advance { millis }),
    ]
    .boxed()
}

/// What [`apply_op`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Applied {
    /// [`Op::Connect`] opened this session (appended to the ordinals).
    Connected(SessionKey),
    /// The op took effect: an accepted frame, a disconnect, an advance.
    Done,
    /// [`Op::ServerPublish`] took effect.
    Published(Published),
    /// The hub refused it with this code: a client frame answered with
    /// `error`, a refused connect, a failed server publish.
    Refused(ErrorCode),
    /// The op named a session that has closed; the hub ignored it.
    Gone,
    /// The op named a session, but none was opened yet; nothing was done.
    NoSession,
}

/// Applies `op` to `sim` and delivers the results into its inboxes.
///
/// `sessions` holds the sessions opened by [`Op::Connect`], in order (start
/// with an empty `Vec` and pass the same one to every call): an op names a
/// session by its index there, wrapping around.
pub fn apply_op(sim: &mut Sim, sessions: &mut Vec<SessionKey>, op: &Op) -> Applied {
    let pick = |ordinal: usize| (!sessions.is_empty()).then(|| sessions[ordinal % sessions.len()]);
    match op {
        Op::Connect { user } => {
            match sim.try_connect(Identity::new(user.clone()), Liveness::Client) {
                Ok(key) => {
                    sessions.push(key);
                    Applied::Connected(key)
                }
                Err(e) => Applied::Refused(e.code()),
            }
        }
        Op::Send {
            session,
            action,
            id,
        } => {
            let Some(key) = pick(*session) else {
                return Applied::NoSession;
            };
            let target_sid = match action {
                Action::DirectToSession { session, .. } => pick(*session)
                    .and_then(|k| sim.hub().sid(k))
                    .map_or_else(|| GONE_SID.to_owned(), |sid| sid.as_str().to_owned()),
                _ => String::new(),
            };
            handled(sim.send(key, &action.to_json(*id, &target_sid)))
        }
        Op::BadFrame { session, frame } => {
            let Some(key) = pick(*session) else {
                return Applied::NoSession;
            };
            handled(sim.send_bytes(key, &frame.bytes))
        }
        Op::Disconnect { session } => {
            let Some(key) = pick(*session) else {
                return Applied::NoSession;
            };
            let open = sim.hub().contains(key);
            sim.disconnect(key);
            if open {
                Applied::Done
            } else {
                Applied::Gone
            }
        }
        Op::ServerPublish { room, event, data } => {
            // A Value always serializes.
            let raw = serde_json::value::to_raw_value(data).expect("JSON values serialize");
            let now = sim.now();
            let result = sim.hub_mut().publish(now, room, event.as_deref(), &raw);
            sim.pump();
            match result {
                Ok(published) => Applied::Published(published),
                Err(e) => Applied::Refused(e.code()),
            }
        }
        Op::Advance { millis } => {
            sim.advance(Duration::from_millis(*millis));
            Applied::Done
        }
    }
}

/// The sid a direct to a closed session is sent to: no [`Sim`] session has it.
const GONE_SID: &str = "closed-session";

fn handled(result: Result<(), crate::HandleError>) -> Applied {
    match result {
        Ok(()) => Applied::Done,
        Err(e) => e.code().map_or(Applied::Gone, Applied::Refused),
    }
}

#[cfg(test)]
mod tests {
    use proptest::test_runner::{Config, TestRunner};

    use super::*;
    use crate::codec::decode_client;

    fn runner() -> TestRunner {
        TestRunner::new(Config {
            cases: 256,
            failure_persistence: None,
            ..Config::default()
        })
    }

    #[test]
    fn valid_frames_decode() {
        let frames = client_frame(room_name(), user_id(), json_text());
        runner()
            .run(&frames, |frame| {
                let decoded = decode_client(frame.as_bytes());
                prop_assert!(decoded.is_ok(), "{frame}: {:?}", decoded.err());
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn bad_frames_are_refused_with_their_code() {
        runner()
            .run(&bad_frame(), |bad| {
                let code = decode_client(&bad.bytes).err().map(|e| e.code);
                prop_assert_eq!(code, Some(bad.code), "{:?}", bad);
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn actions_decode() {
        let rooms = [RoomName::new("a").unwrap()];
        runner()
            .run(
                &(action(2, &rooms), prop::option::of(any::<u32>())),
                |(a, id)| {
                    let frame = a.to_json(id, "s1");
                    prop_assert!(decode_client(frame.as_bytes()).is_ok(), "{}", frame);
                    Ok(())
                },
            )
            .unwrap();
    }
}
