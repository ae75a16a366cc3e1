//! The wire codec: client frames in, server frames out (PROTOCOL.md, Frames).
//!
//! Decoding is "parse, don't validate": a [`Request`] that comes out of
//! [`decode_client`] holds a valid room name, a valid `id` and well-formed
//! fields, or decoding failed with the protocol's error code. `data` is kept as
//! the client's raw JSON text and copied verbatim into the outgoing `message`,
//! so the server never re-serializes a payload.
//!
//! Encoding writes each server frame once into a [`Bytes`]; the same buffer is
//! then handed to every recipient.

use std::borrow::Cow;

use bytes::Bytes;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;

use crate::error::ErrorCode;
use crate::idempotency::is_valid_idempotency_key;
use crate::ids::{RoomName, RoomNameError};

/// Maximum length in bytes of a frame `id` string.
pub const MAX_ID_BYTES: usize = 64;
/// Maximum length in bytes of an `event` name.
pub const MAX_EVENT_BYTES: usize = 128;

/// A decoded client frame with its optional `id`.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// The client's `id` (a number or a string of at most 64 bytes) as raw
    /// JSON, echoed verbatim in the `ack` or `error` that answers the frame.
    pub id: Option<&'a RawValue>,
    /// What the client asked for.
    pub frame: ClientFrame<'a>,
}

/// The client frame types of PROTOCOL.md, validated.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ClientFrame<'a> {
    /// Subscribe to `room`, optionally replaying what was missed since `since`.
    Join {
        /// The room.
        room: RoomName,
        /// The last `seq` and `epoch` the client saw.
        since: Option<Since<'a>>,
        /// Whether this session wants the room's `presence` join/leave events
        /// (default true; only rooms whose policy announces presence send them).
        presence: bool,
    },
    /// Unsubscribe from `room`.
    Leave {
        /// The room.
        room: RoomName,
    },
    /// Publish `data` to every member of `room`.
    Publish {
        /// The room.
        room: RoomName,
        /// Any JSON, raw.
        data: &'a RawValue,
        /// An application event name.
        event: Option<Cow<'a, str>>,
        /// Whether the sender receives its own message (default true).
        echo: bool,
        /// Makes a retry of this publish a no-op: a publish by the same user
        /// to the same room with the same key within a minute is answered
        /// as published, and not published again (PROTOCOL.md, "Publishing
        /// at most once").
        idempotency_key: Option<Cow<'a, str>>,
    },
    /// Send `data` to every session of a user, or to one session.
    Direct {
        /// The recipient.
        to: Target<'a>,
        /// Any JSON, raw.
        data: &'a RawValue,
        /// An application event name.
        event: Option<Cow<'a, str>>,
    },
    /// Asks for a `pong`.
    Ping,
    /// Answers a server `ping`.
    Pong,
    /// Asks for the member list of `room`.
    Presence {
        /// The room.
        room: RoomName,
    },
    /// Replaces the session's credential with a fresh one before the old one
    /// expires; the caller's authenticator checks it ([`Output::Refresh`](crate::Output::Refresh)).
    Refresh {
        /// The new credential, as the client sent it (not empty).
        token: Cow<'a, str>,
    },
}

impl ClientFrame<'_> {
    /// The frame's `type` as written on the wire.
    #[must_use]
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::Join { .. } => "join",
            Self::Leave { .. } => "leave",
            Self::Publish { .. } => "publish",
            Self::Direct { .. } => "direct",
            Self::Ping => "ping",
            Self::Pong => "pong",
            Self::Presence { .. } => "presence",
            Self::Refresh { .. } => "refresh",
        }
    }
}

/// The `since` of a `join`: the last message the client saw.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Since<'a> {
    /// The last `seq` seen.
    pub seq: u64,
    /// The `epoch` it was seen in.
    #[serde(borrow)]
    pub epoch: Cow<'a, str>,
}

/// The recipient of a `direct` frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target<'a> {
    /// Every session of this user.
    User(Cow<'a, str>),
    /// The one session with this sid.
    Sid(Cow<'a, str>),
}

/// A client frame that could not be decoded.
#[derive(Debug, Clone)]
pub struct DecodeError<'a> {
    /// The protocol error code.
    pub code: ErrorCode,
    /// What is wrong, for humans.
    pub message: Cow<'static, str>,
    /// The frame's `id`, when one could be read, so the `error` can carry it.
    pub id: Option<&'a RawValue>,
    /// The frame's room, when one could be read.
    pub room: Option<RoomName>,
}

impl<'a> DecodeError<'a> {
    fn new(code: ErrorCode, message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            code,
            message: message.into(),
            id: None,
            room: None,
        }
    }
}

/// Every field any client frame may have, each kept raw so that a field of the
/// wrong kind is reported as `invalid_frame` naming the field, not as a parse
/// failure of the whole frame. Unknown fields are ignored.
#[derive(Deserialize)]
struct RawFrame<'a> {
    #[serde(rename = "type", default, borrow, deserialize_with = "present")]
    ty: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    id: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    room: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    since: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    presence: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    data: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    event: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    echo: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    to: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    token: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    idempotency_key: Option<&'a RawValue>,
}

/// `Option<&RawValue>` would read `null` as absent; `data: null` is present.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

#[derive(Deserialize)]
struct RawTarget<'a> {
    #[serde(default, borrow)]
    user: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    sid: Option<Cow<'a, str>>,
}

/// Decodes and validates one client frame.
///
/// The caller checks `max_frame_bytes` first (the [`Hub`](crate::Hub) does).
///
/// # Errors
/// A [`DecodeError`] with `invalid_json`, `invalid_frame`, `unknown_type` or
/// `invalid_room`, carrying the frame's `id` when it could be read.
pub fn decode_client(bytes: &[u8]) -> Result<Request<'_>, DecodeError<'_>> {
    // serde would accept a JSON array as a struct written positionally.
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Err(DecodeError::new(
            ErrorCode::InvalidJson,
            "a frame must be a JSON object",
        ));
    }
    // serde_json checks the UTF-8 of the strings it keeps, not of those it
    // skips (unknown fields), so without this a frame that is not UTF-8, hence
    // not JSON (PROTOCOL.md, Frames), could be accepted.
    if std::str::from_utf8(bytes).is_err() {
        return Err(DecodeError::new(
            ErrorCode::InvalidJson,
            "the frame is not valid UTF-8",
        ));
    }
    let raw: RawFrame<'_> = serde_json::from_slice(bytes).map_err(|e| {
        if e.is_data() {
            // Only a duplicated field can fail here: every field is raw.
            DecodeError::new(ErrorCode::InvalidFrame, format!("malformed frame: {e}"))
        } else {
            DecodeError::new(ErrorCode::InvalidJson, "the frame is not valid JSON")
        }
    })?;

    let id = match raw.id {
        None => None,
        Some(id) => Some(validate_id(id)?),
    };
    let with_id = |e: DecodeError<'static>| DecodeError {
        code: e.code,
        message: e.message,
        id,
        room: e.room,
    };
    let Str(ty) = match raw.ty {
        None => return Err(with_id(missing("type"))),
        Some(v) => field(v, "type", "a string").map_err(with_id)?,
    };

    let frame = match &*ty {
        "join" => {
            let room = room_field(raw.room).map_err(with_id)?;
            let since = match raw.since {
                None => None,
                Some(v) => Some(
                    object_field::<Since<'_>>(
                        v,
                        "since",
                        "an object {\"seq\": u64, \"epoch\": string}",
                    )
                    .map_err(|e| with_room(with_id(e), &room))?,
                ),
            };
            let presence = opt_field(raw.presence, "presence", "a boolean")
                .map_err(|e| with_room(with_id(e), &room))?
                .unwrap_or(true);
            ClientFrame::Join {
                room,
                since,
                presence,
            }
        }
        "leave" => ClientFrame::Leave {
            room: room_field(raw.room).map_err(with_id)?,
        },
        "presence" => ClientFrame::Presence {
            room: room_field(raw.room).map_err(with_id)?,
        },
        "publish" => {
            let room = room_field(raw.room).map_err(with_id)?;
            let data = raw
                .data
                .ok_or_else(|| with_room(with_id(missing("data")), &room))?;
            let event = event_field(raw.event).map_err(|e| with_room(with_id(e), &room))?;
            let echo = opt_field(raw.echo, "echo", "a boolean")
                .map_err(|e| with_room(with_id(e), &room))?
                .unwrap_or(true);
            let idempotency_key = idempotency_key_field(raw.idempotency_key)
                .map_err(|e| with_room(with_id(e), &room))?;
            let data = relayable(data).map_err(|e| with_room(with_id(e), &room))?;
            ClientFrame::Publish {
                room,
                data,
                event,
                echo,
                idempotency_key,
            }
        }
        "direct" => {
            let to = raw.to.ok_or_else(|| with_id(missing("to")))?;
            let target: RawTarget<'_> =
                object_field(to, "to", "an object {\"user\"} or {\"sid\"}").map_err(with_id)?;
            let to = match (target.user, target.sid) {
                (Some(user), None) => Target::User(user),
                (None, Some(sid)) => Target::Sid(sid),
                _ => {
                    return Err(with_id(DecodeError::new(
                        ErrorCode::InvalidFrame,
                        "`to` must have exactly one of `user` or `sid`, a string",
                    )))
                }
            };
            let data = raw.data.ok_or_else(|| with_id(missing("data")))?;
            let event = event_field(raw.event).map_err(with_id)?;
            let data = relayable(data).map_err(with_id)?;
            ClientFrame::Direct { to, data, event }
        }
        "ping" => ClientFrame::Ping,
        "pong" => ClientFrame::Pong,
        "refresh" => {
            let raw_token = raw.token.ok_or_else(|| with_id(missing("token")))?;
            let Str(token) = field(raw_token, "token", "a string").map_err(with_id)?;
            if token.is_empty() {
                return Err(with_id(DecodeError::new(
                    ErrorCode::InvalidFrame,
                    "field `token` is empty",
                )));
            }
            ClientFrame::Refresh { token }
        }
        _ => {
            return Err(with_id(DecodeError::new(
                ErrorCode::UnknownType,
                "unknown frame type",
            )))
        }
    };
    Ok(Request { id, frame })
}

fn with_room<'a>(mut e: DecodeError<'a>, room: &RoomName) -> DecodeError<'a> {
    e.room = Some(room.clone());
    e
}

fn missing(name: &'static str) -> DecodeError<'static> {
    DecodeError::new(ErrorCode::InvalidFrame, format!("missing field `{name}`"))
}

/// A JSON string, borrowed from the frame unless it holds escapes.
///
/// serde's `Deserialize for Cow<str>` always builds a `String`; only a field
/// marked `#[serde(borrow)]` borrows, hence this newtype. Without it, `type`,
/// `room`, `event` and string `id`s each cost an allocation per frame (3 of
/// the 4 allocations of decoding a typical `publish`; the 4th is the room's
/// `Arc<str>`).
#[derive(Deserialize)]
struct Str<'a>(#[serde(borrow)] Cow<'a, str>);

fn field<'a, T: Deserialize<'a>>(
    raw: &'a RawValue,
    name: &'static str,
    kind: &'static str,
) -> Result<T, DecodeError<'static>> {
    serde_json::from_str(raw.get()).map_err(|_| {
        DecodeError::new(
            ErrorCode::InvalidFrame,
            format!("field `{name}` must be {kind}"),
        )
    })
}

/// [`field`] for the protocol's objects (`since`, `to`): serde also reads a
/// struct from an array of its fields in order, so without this check
/// `"since":[3,"e"]` or `"to":["bob"]`, fields of the wrong kind, were accepted.
fn object_field<'a, T: Deserialize<'a>>(
    raw: &'a RawValue,
    name: &'static str,
    kind: &'static str,
) -> Result<T, DecodeError<'static>> {
    // A RawValue's text starts at the value itself, never with whitespace.
    if !raw.get().starts_with('{') {
        return Err(DecodeError::new(
            ErrorCode::InvalidFrame,
            format!("field `{name}` must be {kind}"),
        ));
    }
    field(raw, name, kind)
}

fn opt_field<'a, T: Deserialize<'a>>(
    raw: Option<&'a RawValue>,
    name: &'static str,
    kind: &'static str,
) -> Result<Option<T>, DecodeError<'static>> {
    raw.map(|v| field(v, name, kind)).transpose()
}

fn room_field(raw: Option<&RawValue>) -> Result<RoomName, DecodeError<'static>> {
    let raw = raw.ok_or_else(|| missing("room"))?;
    let Str(name) = field(raw, "room", "a string")?;
    RoomName::new(&name).map_err(|e| {
        DecodeError::new(
            ErrorCode::InvalidRoom,
            match e {
                RoomNameError::Empty => "room name is empty",
                RoomNameError::TooLong => "room name is longer than 128 bytes",
                _ => "room name may only hold A-Z a-z 0-9 _ - . : /",
            },
        )
    })
}

fn event_field(raw: Option<&RawValue>) -> Result<Option<Cow<'_, str>>, DecodeError<'static>> {
    let event = opt_field(raw, "event", "a string")?.map(|Str(e)| e);
    if event.as_ref().is_some_and(|e| e.len() > MAX_EVENT_BYTES) {
        return Err(DecodeError::new(
            ErrorCode::InvalidFrame,
            "field `event` is longer than 128 bytes",
        ));
    }
    Ok(event)
}

/// A publish's `idempotency_key` ([`is_valid_idempotency_key`]).
fn idempotency_key_field(
    raw: Option<&RawValue>,
) -> Result<Option<Cow<'_, str>>, DecodeError<'static>> {
    let key = opt_field(raw, "idempotency_key", "a string")?.map(|Str(k)| k);
    if key.as_ref().is_some_and(|k| !is_valid_idempotency_key(k)) {
        return Err(DecodeError::new(
            ErrorCode::InvalidFrame,
            "field `idempotency_key` must be 1 to 64 bytes",
        ));
    }
    Ok(key)
}

/// Checks that `data`, relayed verbatim to other sessions, is JSON they can
/// parse.
///
/// Reading a field as `&RawValue` only skims it: an escaped unpaired surrogate
/// (`"\ud800"`, which a browser's `JSON.stringify` emits for a string cut
/// in the middle of an emoji), a number beyond `f64` (`1e400`) or nesting
/// deeper than 128 levels all pass, and every serde_json-based recipient (the
/// Rust client, [`Received::json`](crate::sim::Received::json)) would then fail
/// to parse the `message` or `direct` frame: one client's bad frame would
/// break others. This pass decodes every string and number and keeps nothing
/// (no allocation but serde_json's scratch buffer for escapes).
fn relayable(data: &RawValue) -> Result<&RawValue, DecodeError<'static>> {
    if !may_not_relay(data.get().as_bytes()) {
        return Ok(data);
    }
    let mut de = serde_json::Deserializer::from_str(data.get());
    serde::de::DeserializeSeed::deserialize(Walk(MAX_DATA_DEPTH), &mut de)
        .map(|()| data)
        .map_err(|e| {
            DecodeError::new(
                ErrorCode::InvalidJson,
                format!("field `data` is not valid JSON: {e}"),
            )
        })
}

/// A fast scan of already well-formed JSON for what [`relayable`] must look
/// at closely: `\u` escapes (possibly unpaired surrogates), numbers with an
/// exponent or over 300 characters (possibly beyond `f64`), nesting deeper
/// than [`MAX_DATA_DEPTH`]. False means none of them occur, so the full walk
/// (about three times the cost of this scan for typical payloads) is skipped.
fn may_not_relay(json: &[u8]) -> bool {
    let mut depth = 0u32;
    let mut i = 0;
    while i < json.len() {
        match json[i] {
            b'"' => {
                i += 1;
                while i < json.len() {
                    match json[i] {
                        b'\\' if json.get(i + 1) == Some(&b'u') => return true,
                        b'\\' => i += 2,
                        b'"' => break,
                        _ => i += 1,
                    }
                }
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DATA_DEPTH {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i + 1 < json.len()
                    && matches!(json[i + 1], b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-')
                {
                    i += 1;
                }
                let number = &json[start..=i];
                if number.len() > 300 || number.iter().any(|b| matches!(b, b'e' | b'E')) {
                    return true;
                }
            }
            _ => {}
        }
        i += 1;
    }
    false
}

/// The deepest nesting of `data` accepted.
///
/// serde_json's own limit (127 levels) is not enough here: the `message` or
/// `direct` frame that carries `data` adds a level, and a long-poll batch
/// (a JSON array of frames) another, so `data` 126 or 127 levels deep passed
/// the walk yet no serde_json-based recipient could parse what it received.
const MAX_DATA_DEPTH: u32 = 100;

/// Any JSON value, walked in full (strings and numbers decoded) and dropped;
/// holds how many more levels of arrays and objects may open.
#[derive(Clone, Copy)]
struct Walk(u32);

impl Walk {
    /// The walk one level down, or an error past [`MAX_DATA_DEPTH`].
    fn open<E: serde::de::Error>(self) -> Result<Self, E> {
        self.0
            .checked_sub(1)
            .map(Walk)
            .ok_or_else(|| E::custom(format!("nested deeper than {MAX_DATA_DEPTH} levels")))
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for Walk {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Walk {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let inner = self.open()?;
        while seq.next_element_seed(inner)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let inner = self.open()?;
        while map.next_key_seed(inner)?.is_some() {
            map.next_value_seed(inner)?;
        }
        Ok(())
    }
}

fn validate_id(id: &RawValue) -> Result<&RawValue, DecodeError<'static>> {
    let text = id.get();
    let ok = match text.as_bytes().first() {
        Some(b'"') => serde_json::from_str::<Str<'_>>(text)
            .map(|Str(s)| s.len() <= MAX_ID_BYTES)
            .unwrap_or(false),
        // A number serde_json can read (`1e999` is JSON's grammar but no f64):
        // the id is echoed in the ack, which the client must be able to parse.
        Some(b'-' | b'0'..=b'9') => serde_json::from_str::<f64>(text).is_ok(),
        _ => false,
    };
    if ok {
        Ok(id)
    } else {
        Err(DecodeError::new(
            ErrorCode::InvalidFrame,
            "field `id` must be a number or a string of at most 64 bytes",
        ))
    }
}

/// Who sent a `message` or `direct` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum From<'a> {
    /// A client session.
    Session {
        /// The sender's sid.
        sid: &'a str,
        /// The sender's user id.
        user: &'a str,
    },
    /// The application itself.
    Server {
        /// Always `true`.
        server: bool,
    },
}

impl From<'_> {
    /// The application as sender: `{"server": true}`.
    pub const SERVER: Self = Self::Server { server: true };
}

/// `welcome.heartbeat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct HeartbeatInfo {
    /// Silence after which the server pings.
    pub interval_ms: u64,
    /// Further silence after which the server closes.
    pub timeout_ms: u64,
}

/// `welcome.limits`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LimitsInfo {
    /// Largest client frame accepted.
    pub max_frame_bytes: usize,
    /// Most rooms one session may be in.
    pub max_rooms: usize,
    /// Client frames per second allowed on average.
    pub rate_per_sec: u32,
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_false(b: &bool) -> bool {
    !*b
}

/// `presence.action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PresenceAction {
    /// A user's first session joined.
    Join,
    /// A user's last session left.
    Leave,
    /// Answer to a `presence` request.
    List,
}

/// Every server frame type of PROTOCOL.md, borrowing its parts.
///
/// Encode with [`ServerFrame::encode`]; the result is shared by every recipient.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
#[allow(missing_docs)] // The fields are the protocol's, documented in PROTOCOL.md.
pub enum ServerFrame<'a> {
    Welcome {
        sid: &'a str,
        heartbeat: HeartbeatInfo,
        limits: LimitsInfo,
        #[serde(skip_serializing_if = "Option::is_none")]
        user: Option<&'a str>,
        /// Milliseconds until the session's credential expires and the
        /// session is closed `token_expired`, unless a `refresh` comes first.
        #[serde(skip_serializing_if = "Option::is_none")]
        expires_in_ms: Option<u64>,
    },
    Joined {
        room: &'a str,
        seq: u64,
        epoch: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        recovered: Option<bool>,
        #[serde(skip_serializing_if = "Option::is_none")]
        members: Option<usize>,
        /// A latest-value room: gaps in `seq` are expected (sent only when true).
        #[serde(skip_serializing_if = "is_false")]
        latest: bool,
    },
    Message {
        room: &'a str,
        seq: u64,
        epoch: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        event: Option<&'a str>,
        from: From<'a>,
        data: &'a RawValue,
        ts: u64,
    },
    Direct {
        from: From<'a>,
        data: &'a RawValue,
        #[serde(skip_serializing_if = "Option::is_none")]
        event: Option<&'a str>,
    },
    Presence {
        room: &'a str,
        action: PresenceAction,
        #[serde(skip_serializing_if = "Option::is_none")]
        user: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        members: Option<Vec<&'a str>>,
        count: usize,
    },
    Ack {
        id: &'a RawValue,
        /// On the `ack` of a `refresh`: the new credential's time left, as in `welcome`.
        #[serde(skip_serializing_if = "Option::is_none")]
        expires_in_ms: Option<u64>,
    },
    Error {
        code: ErrorCode,
        message: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RawValue>,
        #[serde(skip_serializing_if = "Option::is_none")]
        room: Option<&'a str>,
    },
    Ping,
    Pong,
    Close {
        code: u16,
        reason: &'a str,
    },
}

impl ServerFrame<'_> {
    /// Encodes the frame as one JSON object.
    #[must_use]
    pub fn encode(&self) -> Bytes {
        let mut out = Vec::with_capacity(self.size_hint());
        // Writing into a Vec cannot fail, and every field serializes: strings,
        // numbers and already-valid raw JSON.
        serde_json::to_writer(&mut out, self).expect("server frames always serialize");
        Bytes::from(out)
    }

    fn size_hint(&self) -> usize {
        match self {
            Self::Message { data, .. } | Self::Direct { data, .. } => 160 + data.get().len(),
            _ => 96,
        }
    }

    /// The frame's `type` as written on the wire.
    #[must_use]
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::Welcome { .. } => "welcome",
            Self::Joined { .. } => "joined",
            Self::Message { .. } => "message",
            Self::Direct { .. } => "direct",
            Self::Presence { .. } => "presence",
            Self::Ack { .. } => "ack",
            Self::Error { .. } => "error",
            Self::Ping => "ping",
            Self::Pong => "pong",
            Self::Close { .. } => "close",
        }
    }
}

/// The `error` and `close` frames for a client refused before it had a session
/// (`server_full` with 1013, or a refusal from authentication or origin checks
/// with 1008), for transports to send before closing.
#[must_use]
pub fn encode_refusal(code: ErrorCode, message: &str, close_code: u16) -> [Bytes; 2] {
    [
        ServerFrame::Error {
            code,
            message,
            id: None,
            room: None,
        }
        .encode(),
        ServerFrame::Close {
            code: close_code,
            reason: code.as_str(),
        }
        .encode(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(input: &str) -> ErrorCode {
        decode_client(input.as_bytes()).unwrap_err().code
    }

    #[test]
    fn decodes_every_client_frame_type() {
        let r = decode_client(
            br#"{"type":"join","room":"a","since":{"seq":3,"epoch":"e"},"presence":false,"id":7}"#,
        )
        .unwrap();
        assert_eq!(r.id.unwrap().get(), "7");
        assert!(
            matches!(r.frame, ClientFrame::Join { ref room, since: Some(ref s), presence: false } if room.as_str()=="a" && s.seq==3 && s.epoch=="e")
        );
        let r = decode_client(br#"{"type":"leave","room":"a"}"#).unwrap();
        assert!(matches!(r.frame, ClientFrame::Leave { .. }));
        let r =
            decode_client(br#"{"type":"publish","room":"a","data":null,"event":"x","echo":false}"#)
                .unwrap();
        assert!(
            matches!(r.frame, ClientFrame::Publish { data, echo: false, event: Some(ref e), .. } if data.get()=="null" && e=="x")
        );
        let r = decode_client(br#"{"type":"direct","to":{"user":"bob"},"data":[1]}"#).unwrap();
        assert!(matches!(r.frame, ClientFrame::Direct { to: Target::User(ref u), .. } if u=="bob"));
        let r = decode_client(br#"{"type":"direct","to":{"sid":"s1"},"data":{}}"#).unwrap();
        assert!(matches!(r.frame, ClientFrame::Direct { to: Target::Sid(ref u), .. } if u=="s1"));
        assert!(matches!(
            decode_client(br#"{"type":"ping"}"#).unwrap().frame,
            ClientFrame::Ping
        ));
        assert!(matches!(
            decode_client(br#"{"type":"pong"}"#).unwrap().frame,
            ClientFrame::Pong
        ));
        let r = decode_client(br#"{"type":"presence","room":"a","id":"q"}"#).unwrap();
        assert!(matches!(r.frame, ClientFrame::Presence { .. }));
        let r = decode_client(br#"{"type":"refresh","token":"a.b\/c","id":2}"#).unwrap();
        assert!(matches!(r.frame, ClientFrame::Refresh { ref token } if token == "a.b/c"));
    }

    #[test]
    fn the_fast_scan_flags_everything_the_walk_must_check() {
        for risky in [
            r#""\ud800""#,
            r#"{"a":[1e400]}"#,
            r#"-2E-3"#,
            &format!("[{}]", "9".repeat(301)),
            &"[".repeat(101),
        ] {
            assert!(may_not_relay(risky.as_bytes()), "{risky}");
        }
        for plain in [
            r#"{"text":"h\"i\\","n":-12.5,"ok":true,"e":"1e400","u":"\\u"}"#,
            "null",
            r#"[[[]]]"#,
        ] {
            assert!(!may_not_relay(plain.as_bytes()), "{plain}");
        }
    }

    #[test]
    fn ignores_unknown_fields() {
        let r = decode_client(br#"{"type":"ping","future":{"a":[1,2]},"x":1}"#).unwrap();
        assert!(matches!(r.frame, ClientFrame::Ping));
    }

    #[test]
    fn invalid_json() {
        assert_eq!(code("nope"), ErrorCode::InvalidJson);
        assert_eq!(code("[1,2]"), ErrorCode::InvalidJson);
        assert_eq!(code("\"s\""), ErrorCode::InvalidJson);
        assert_eq!(code("{\"type\":"), ErrorCode::InvalidJson);
        assert_eq!(code("{} {}"), ErrorCode::InvalidJson);
        assert_eq!(code(""), ErrorCode::InvalidJson);
    }

    #[test]
    fn invalid_frame() {
        assert_eq!(code("{}"), ErrorCode::InvalidFrame);
        assert_eq!(code(r#"{"type":1}"#), ErrorCode::InvalidFrame);
        assert_eq!(code(r#"{"type":"join"}"#), ErrorCode::InvalidFrame);
        assert_eq!(code(r#"{"type":"join","room":5}"#), ErrorCode::InvalidFrame);
        assert_eq!(
            code(r#"{"type":"join","room":"a","since":5}"#),
            ErrorCode::InvalidFrame
        );
        assert_eq!(
            code(r#"{"type":"join","room":"a","since":{"seq":-1,"epoch":"e"}}"#),
            ErrorCode::InvalidFrame
        );
        assert_eq!(
            code(r#"{"type":"join","room":"a","presence":"yes"}"#),
            ErrorCode::InvalidFrame
        );
        assert_eq!(
            code(r#"{"type":"publish","room":"a"}"#),
            ErrorCode::InvalidFrame
        );
        assert_eq!(
            code(r#"{"type":"publish","room":"a","data":1,"echo":1}"#),
            ErrorCode::InvalidFrame
        );
        assert_eq!(
            code(r#"{"type":"publish","room":"a","data":1,"event":1}"#),
            ErrorCode::InvalidFrame
        );
        let long_event = format!(
            r#"{{"type":"publish","room":"a","data":1,"event":"{}"}}"#,
            "e".repeat(129)
        );
        assert_eq!(code(&long_event), ErrorCode::InvalidFrame);
        assert_eq!(
            code(r#"{"type":"direct","data":1}"#),
            ErrorCode::InvalidFrame
        );
        assert_eq!(
            code(r#"{"type":"direct","to":{},"data":1}"#),
            ErrorCode::InvalidFrame
        );
        assert_eq!(
            code(r#"{"type":"direct","to":{"user":"a","sid":"b"},"data":1}"#),
            ErrorCode::InvalidFrame
        );
        assert_eq!(
            code(r#"{"type":"direct","to":{"user":"a"}}"#),
            ErrorCode::InvalidFrame
        );
        assert_eq!(
            code(r#"{"type":"ping","id":true}"#),
            ErrorCode::InvalidFrame
        );
        assert_eq!(
            code(r#"{"type":"ping","id":{"a":1}}"#),
            ErrorCode::InvalidFrame
        );
        let long_id = format!(r#"{{"type":"ping","id":"{}"}}"#, "i".repeat(65));
        assert_eq!(code(&long_id), ErrorCode::InvalidFrame);
        assert_eq!(
            code(r#"{"type":"ping","type":"pong"}"#),
            ErrorCode::InvalidFrame
        );
        assert_eq!(code(r#"{"type":"refresh"}"#), ErrorCode::InvalidFrame);
        assert_eq!(
            code(r#"{"type":"refresh","token":7}"#),
            ErrorCode::InvalidFrame
        );
        assert_eq!(
            code(r#"{"type":"refresh","token":""}"#),
            ErrorCode::InvalidFrame
        );
    }

    #[test]
    fn unknown_type_keeps_the_id() {
        let e = decode_client(br#"{"type":"subscribe","id":"x1"}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::UnknownType);
        assert_eq!(e.id.unwrap().get(), "\"x1\"");
    }

    #[test]
    fn invalid_room() {
        assert_eq!(code(r#"{"type":"join","room":""}"#), ErrorCode::InvalidRoom);
        assert_eq!(
            code(r#"{"type":"join","room":"a b"}"#),
            ErrorCode::InvalidRoom
        );
        assert_eq!(
            code(r#"{"type":"leave","room":"é"}"#),
            ErrorCode::InvalidRoom
        );
        let long = format!(
            r#"{{"type":"publish","room":"{}","data":1}}"#,
            "r".repeat(129)
        );
        assert_eq!(code(&long), ErrorCode::InvalidRoom);
        let ok = format!(
            r#"{{"type":"publish","room":"{}","data":1}}"#,
            "r".repeat(128)
        );
        assert!(decode_client(ok.as_bytes()).is_ok());
        assert!(decode_client(br#"{"type":"join","room":"A-z_0.9:x/y"}"#).is_ok());
        // Escapes are decoded before the rules apply.
        assert!(decode_client(br#"{"type":"join","room":"a\/b"}"#).is_ok());
        assert_eq!(
            code(r#"{"type":"join","room":"a\u0000"}"#),
            ErrorCode::InvalidRoom
        );
    }

    #[test]
    fn encodes_messages_with_raw_data() {
        let data = RawValue::from_string(r#"{"progress":30}"#.to_owned()).unwrap();
        let frame = ServerFrame::Message {
            room: "job_42",
            seq: 17,
            epoch: "k3Jx9a",
            event: Some("job_progress"),
            from: From::SERVER,
            data: &data,
            ts: 1,
        }
        .encode();
        assert_eq!(
            &frame[..],
            br#"{"type":"message","room":"job_42","seq":17,"epoch":"k3Jx9a","event":"job_progress","from":{"server":true},"data":{"progress":30},"ts":1}"#
        );
        let ping = ServerFrame::Ping.encode();
        assert_eq!(&ping[..], br#"{"type":"ping"}"#);
        let dm = ServerFrame::Direct {
            from: From::Session {
                sid: "s\"1",
                user: "<a>",
            },
            data: &data,
            event: None,
        }
        .encode();
        let v: serde_json::Value = serde_json::from_slice(&dm).unwrap();
        assert_eq!(v["from"]["sid"], "s\"1");
    }
}
