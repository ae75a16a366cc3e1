//! One test per rule of `docs/PROTOCOL.md` and per error code the core
//! handles, driven through the deterministic [`Sim`] harness: simulated time,
//! no sleeping, every frame each session received read back and checked.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use switchboard_core::sim::{Sim, SIM_EPOCH};
use switchboard_core::{
    CloseReason, Config, ConnectError, DirectError, ErrorCode, Hub, Identity, Liveness, Output,
    Policy, PublishError, PublishRule, RawValue, RoomName, RoomOptions, SessionKey, Sid, Target,
    Timestamp, IDEMPOTENCY_WINDOW, MAX_IDEMPOTENCY_KEY_BYTES,
};

// ---- fixtures -------------------------------------------------------------

/// A policy with one rule per room-name prefix, so every test can reach every
/// branch of the policy hooks:
///
/// - `secret*`: nobody may join; `private_{user}`: only that user may join;
/// - `news*`: only the server publishes; `open*`: anyone publishes;
///   everything else: members publish;
/// - a direct message to user `boss` is refused unless sent by `admin`;
/// - `quiet*` announces no presence, `nohist*` keeps no history, `short*`
///   keeps 3 messages, `ttl*` keeps history for 10 s once empty.
struct TestPolicy;

impl Policy for TestPolicy {
    fn may_join(&self, who: &Identity, room: &RoomName) -> bool {
        let room = room.as_str();
        if room.starts_with("secret") {
            return false;
        }
        match room.strip_prefix("private_") {
            Some(owner) => owner == who.user.as_str(),
            None => true,
        }
    }

    fn publish_rule(&self, _who: &Identity, room: &RoomName) -> PublishRule {
        let room = room.as_str();
        if room.starts_with("news") {
            PublishRule::ServerOnly
        } else if room.starts_with("open") {
            PublishRule::Anyone
        } else {
            PublishRule::Members
        }
    }

    fn may_direct(&self, who: &Identity, to: &Target<'_>) -> bool {
        !matches!(to, Target::User(u) if u == "boss") || who.user.as_str() == "admin"
    }

    fn room_options(&self, room: &RoomName) -> RoomOptions {
        let room = room.as_str();
        let mut options = RoomOptions::default();
        if room.starts_with("quiet") {
            options = options.presence(false);
        }
        if room.starts_with("nohist") {
            options = options.history(0);
        }
        if room.starts_with("short") {
            options = options.history(3);
        }
        if room.starts_with("ttl") {
            options = options.history_ttl(TTL);
        }
        options
    }
}

const TTL: Duration = Duration::from_secs(10);
const DEFAULT_TTL: Duration = Duration::from_secs(300);
const INTERVAL: Duration = Duration::from_secs(25);
const TIMEOUT: Duration = Duration::from_secs(20);
const MS: Duration = Duration::from_millis(1);

fn sim() -> Sim {
    Sim::new(Config::default(), Arc::new(TestPolicy))
}

fn sim_with(config: Config) -> Sim {
    Sim::new(config, Arc::new(TestPolicy))
}

/// Connects a session for `user` and consumes its `welcome`.
fn connect(sim: &mut Sim, user: &str) -> SessionKey {
    let key = sim.connect(user);
    let got = sim.take(key);
    assert_eq!(got.len(), 1, "exactly one frame on connect: {got:?}");
    assert_eq!(got[0]["type"], "welcome");
    key
}

/// Sends a frame that must be accepted.
fn ok(sim: &mut Sim, key: SessionKey, frame: Value) {
    let text = frame.to_string();
    if let Err(e) = sim.send(key, &text) {
        panic!("{text} was refused: {e}");
    }
}

/// Sends a frame that must be refused with `code`; returns the one `error`
/// frame the session received.
fn refused(sim: &mut Sim, key: SessionKey, frame: &str, code: &str) -> Value {
    let result = sim.send(key, frame);
    let got_code = result.as_ref().err().and_then(|e| e.code());
    assert_eq!(
        got_code.map(ErrorCode::as_str),
        Some(code),
        "{frame}: {result:?}"
    );
    let got = sim.take(key);
    assert_eq!(got.len(), 1, "{frame}: exactly one error frame: {got:?}");
    assert_eq!(got[0]["type"], "error", "{frame}");
    assert_eq!(got[0]["code"], code, "{frame}");
    assert!(got[0]["message"].as_str().is_some_and(|m| !m.is_empty()));
    got[0].clone()
}

/// Joins `room` and returns the `joined` frame (the last one received).
fn join(sim: &mut Sim, key: SessionKey, room: &str) -> Value {
    ok(sim, key, json!({"type": "join", "room": room}));
    let got = sim.take(key);
    let joined = got.last().expect("a joined frame").clone();
    assert_eq!(joined["type"], "joined", "{got:?}");
    assert_eq!(joined["room"], room);
    joined
}

fn publish(sim: &mut Sim, key: SessionKey, room: &str, data: Value) {
    ok(
        sim,
        key,
        json!({"type": "publish", "room": room, "data": data}),
    );
}

fn raw(text: &str) -> Box<RawValue> {
    RawValue::from_string(text.to_owned()).expect("valid JSON")
}

fn room(name: &str) -> RoomName {
    RoomName::new(name).expect("valid room name")
}

fn types(frames: &[Value]) -> Vec<&str> {
    frames
        .iter()
        .map(|f| f["type"].as_str().unwrap_or("?"))
        .collect()
}

fn sid(sim: &Sim, key: SessionKey) -> String {
    sim.hub().sid(key).expect("open session").to_string()
}

fn epoch(sim: &Sim, name: &str) -> String {
    sim.hub().room(name).expect("room exists").epoch.to_string()
}

fn seq(sim: &Sim, name: &str) -> u64 {
    sim.hub().room(name).expect("room exists").seq
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

// ---- welcome --------------------------------------------------------------

#[test]
fn welcome_is_the_first_frame_with_sid_heartbeat_limits_and_user() {
    let mut config = Config::default();
    config.heartbeat_interval = secs(30);
    config.heartbeat_timeout = secs(7);
    config.max_frame_bytes = 4096;
    config.max_rooms_per_session = 9;
    config.rate_per_sec = 11;
    let mut sim = sim_with(config);
    let alice = sim.connect("alice");
    let got = sim.take(alice);
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0],
        json!({
            "type": "welcome",
            "sid": sid(&sim, alice),
            "heartbeat": {"interval_ms": 30_000, "timeout_ms": 7_000},
            "limits": {"max_frame_bytes": 4096, "max_rooms": 9, "rate_per_sec": 11},
            "user": "alice",
        })
    );
    // Sids are the caller's and distinct per session.
    let bob = sim.connect("bob");
    let welcome = &sim.take(bob)[0];
    assert_eq!(welcome["sid"], sid(&sim, bob));
    assert_ne!(welcome["sid"], got[0]["sid"]);
    assert_eq!(welcome["user"], "bob");
    assert_eq!(sim.hub().session_by_sid(&sid(&sim, bob)), Some(bob));
}

#[test]
fn welcome_carries_the_protocol_defaults() {
    let mut sim = sim();
    let alice = sim.connect("alice");
    let welcome = &sim.take(alice)[0];
    assert_eq!(
        welcome["heartbeat"],
        json!({"interval_ms": 25_000, "timeout_ms": 20_000})
    );
    assert_eq!(
        welcome["limits"],
        json!({"max_frame_bytes": 65_536, "max_rooms": 100, "rate_per_sec": 50})
    );
}

// ---- join / leave ---------------------------------------------------------

#[test]
fn join_replies_joined_with_seq_epoch_and_members_but_no_recovered() {
    let mut sim = sim();
    let alice = connect(&mut sim, "alice");
    ok(&mut sim, alice, json!({"type": "join", "room": "lobby"}));
    let got = sim.take(alice);
    assert_eq!(
        got,
        vec![json!({
            "type": "joined",
            "room": "lobby",
            "seq": 0,
            "epoch": epoch(&sim, "lobby"),
            "members": 1,
        })]
    );
    assert!(got[0].get("recovered").is_none());
    assert!(!got[0]["epoch"].as_str().unwrap().is_empty());
    assert!(sim.hub().is_member(alice, "lobby"));

    publish(&mut sim, alice, "lobby", json!(1));
    publish(&mut sim, alice, "lobby", json!(2));
    let bob = connect(&mut sim, "bob");
    let joined = join(&mut sim, bob, "lobby");
    assert_eq!(joined["seq"], 2);
    assert_eq!(joined["members"], 2);
    assert_eq!(joined["epoch"], epoch(&sim, "lobby"));
    assert!(joined.get("recovered").is_none());
}

#[test]
fn joining_twice_keeps_one_membership() {
    let mut sim = sim();
    let alice = connect(&mut sim, "alice");
    let bob = connect(&mut sim, "bob");
    join(&mut sim, alice, "lobby");
    join(&mut sim, bob, "lobby");
    sim.take(alice);
    let again = join(&mut sim, bob, "lobby");
    assert_eq!(again["members"], 2);
    assert!(sim.take(alice).is_empty(), "no second presence join");
    let info = sim.hub().room("lobby").unwrap();
    assert_eq!(info.sessions, 2);
    assert_eq!(sim.hub().session_rooms(bob).count(), 1);
    publish(&mut sim, alice, "lobby", json!("x"));
    assert_eq!(sim.take(bob).len(), 1, "one message, not two");
}

#[test]
fn leave_unsubscribes_and_acks_only_with_an_id() {
    let mut sim = sim();
    let alice = connect(&mut sim, "alice");
    let bob = connect(&mut sim, "bob");
    join(&mut sim, alice, "lobby");
    join(&mut sim, bob, "lobby");
    join(&mut sim, bob, "hall");
    sim.take(alice);

    ok(
        &mut sim,
        bob,
        json!({"type": "leave", "room": "lobby", "id": 4}),
    );
    assert_eq!(sim.take(bob), vec![json!({"type": "ack", "id": 4})]);
    assert!(!sim.hub().is_member(bob, "lobby"));
    ok(&mut sim, bob, json!({"type": "leave", "room": "hall"}));
    assert!(sim.take(bob).is_empty(), "no id: no answer");
    assert!(!sim.hub().is_member(bob, "hall"));

    publish(&mut sim, alice, "lobby", json!("after"));
    assert!(sim.take(bob).is_empty());
    assert_eq!(sim.take(alice).last().unwrap()["data"], "after");
}

#[test]
fn leave_of_a_room_not_joined_is_not_joined() {
    let mut sim = sim();
    let alice = connect(&mut sim, "alice");
    let bob = connect(&mut sim, "bob");
    join(&mut sim, bob, "lobby");
    let e = refused(
        &mut sim,
        alice,
        r#"{"type":"leave","room":"lobby","id":"l1"}"#,
        "not_joined",
    );
    assert_eq!(e["id"], "l1");
    assert_eq!(e["room"], "lobby");
    refused(
        &mut sim,
        alice,
        r#"{"type":"leave","room":"nowhere"}"#,
        "not_joined",
    );
    assert_eq!(sim.hub().room("lobby").unwrap().sessions, 1);
    assert!(
        sim.hub().room("nowhere").is_none(),
        "a refusal creates no room"
    );
}

// ---- publish --------------------------------------------------------------

#[test]
fn publish_delivers_one_message_to_every_member_including_the_sender() {
    let mut sim = sim();
    let alice = connect(&mut sim, "alice");
    let bob = connect(&mut sim, "bob");
    let carol = connect(&mut sim, "carol");
    join(&mut sim, alice, "lobby");
    join(&mut sim, bob, "lobby");
    join(&mut sim, carol, "elsewhere");
    sim.take(alice);
    sim.advance(secs(3));

    publish(&mut sim, bob, "lobby", json!({"text": "hi", "n": [1, 2]}));
    let expected = json!({
        "type": "message",
        "room": "lobby",
        "seq": 1,
        "epoch": epoch(&sim, "lobby"),
        "from": {"sid": sid(&sim, bob), "user": "bob"},
        "data": {"text": "hi", "n": [1, 2]},
        "ts": SIM_EPOCH.as_millis() + 3_000,
    });
    assert_eq!(sim.take(alice), vec![expected.clone()]);
    assert_eq!(sim.take(bob), vec![expected], "echo is the default");
    assert!(sim.take(carol).is_empty(), "no frame outside the room");
}

#[test]
fn a_message_is_encoded_once_and_shared_by_every_member() {
    let mut sim = sim();
    let keys: Vec<SessionKey> = (0..4)
        .map(|i| connect(&mut sim, &format!("u{i}")))
        .collect();
    for key in &keys {
        join(&mut sim, *key, "lobby");
    }
    for key in &keys {
        sim.take(*key);
    }
    publish(&mut sim, keys[0], "lobby", json!("shared"));
    let frames: Vec<_> = keys.iter().map(|k| sim.take_raw(*k)).collect();
    let first = &frames[0][0].frame;
    for got in &frames {
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].frame.as_ptr(), first.as_ptr(), "same buffer");
        assert_eq!(got[0].kind.type_name(), "message");
    }
}

#[test]
fn publish_with_event_carries_it() {
    let mut sim = sim();
    let alice = connect(&mut sim, "alice");
    join(&mut sim, alice, "lobby");
    ok(
        &mut sim,
        alice,
        json!({"type": "publish", "room": "lobby", "event": "typing", "data": null}),
    );
    let got = sim.take(alice);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["event"], "typing");
    assert_eq!(got[0]["data"], Value::Null);
    assert!(
        got[0].as_object().unwrap().contains_key("data"),
        "data: null is kept"
    );
    // No event: no `event` field at all.
    publish(&mut sim, alice, "lobby", json!(1));
    assert!(sim.take(alice)[0].get("event").is_none());
}

#[test]
fn publish_echo_false_skips_only_the_sender() {
    let mut sim = sim();
    let alice = connect(&mut sim, "alice");
    let bob = connect(&mut sim, "bob");
    join(&mut sim, alice, "lobby");
    join(&mut sim, bob, "lobby");
    sim.take(alice);
    ok(
        &mut sim,
        alice,
        json!({"type": "publish", "room": "lobby", "data": "quiet", "echo": false, "id": 1}),
    );
    assert_eq!(sim.take(alice), vec![json!({"type": "ack", "id": 1})]);
    let got = sim.take(bob);
    assert_eq!(types(&got), ["message"]);
    assert_eq!(got[0]["data"], "quiet");
    assert_eq!(seq(&sim, "lobby"), 1, "the message still counts");
    // echo: true explicitly.
    ok(
        &mut sim,
        alice,
        json!({"type": "publish", "room": "lobby", "data": "loud", "echo": true}),
    );
    assert_eq!(sim.take(alice)[0]["seq"], 2);
}

#[test]
fn publish_keeps_data_verbatim() {
    let mut sim = sim();
    let alice = connect(&mut sim, "alice");
    join(&mut sim, alice, "lobby");
    for data in [
        "null",
        "true",
        "0",
        "-12.5e3",
        r#""text with \"quotes\" and \u00e9 and \u0000""#,
        "[1,[2,[3,{}]]]",
        r#"{"a":{"b":[null,false,"c"]},"n":12345678901234567890}"#,
        r#"{ "spaced" : [ 1 , 2 ] }"#,
    ] {
        let frame = format!(r#"{{"type":"publish","room":"lobby","data":{data}}}"#);
        sim.send(alice, &frame).unwrap();
        let got = sim.take_raw(alice);
        assert_eq!(got.len(), 1);
        let text = std::str::from_utf8(&got[0].frame).unwrap();
        assert!(
            text.contains(&format!(r#""data":{data},"#)),
            "{data} copied as sent: {text}"
        );
        let parsed: Value = serde_json::from_str(data).unwrap();
        assert_eq!(got[0].json()["data"], parsed);
    }
}

#[test]
fn seq_grows_by_exactly_one_per_message_from_clients_and_server() {
    let mut sim = sim();
    let alice = connect(&mut sim, "alice");
    let bob = connect(&mut sim, "bob");
    join(&mut sim, alice, "lobby");
    join(&mut sim, bob, "lobby");
    sim.take(alice);
    let lobby = room("lobby");
    for i in 0..30u64 {
        match i % 3 {
            0 => publish(&mut sim, alice, "lobby", json!(i)),
            1 => ok(
                &mut sim,
                bob,
                json!({"type": "publish", "room": "lobby", "data": i, "echo": false}),
            ),
            _ => {
                let now = sim.now();
                let p = sim
                    .hub_mut()
                    .publish(now, &lobby, None, &raw(&i.to_string()))
                    .unwrap();
                assert_eq!(p.seq, i + 1);
                sim.pump();
            }
        }
    }
    let got = sim.take(alice);
    let seqs: Vec<u64> = got.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=30).collect::<Vec<_>>());
    let data: Vec<u64> = got.iter().map(|m| m["data"].as_u64().unwrap()).collect();
    assert_eq!(data, (0..30).collect::<Vec<_>>(), "publish order kept");
    assert!(got.iter().all(|m| m["epoch"] == got[0]["epoch"]));
    assert_eq!(seq(&sim, "lobby"), 30);
    // Rooms count separately.
    join(&mut sim, alice, "hall");
    publish(&mut sim, alice, "hall", json!(0));
    assert_eq!(sim.take(alice)[0]["seq"], 1);
}

#[test]
fn server_publish_is_from_server_with_ts_and_reports_its_place() {
    let mut sim = sim();
    let alice = connect(&mut sim, "alice");
    let bob = connect(&mut sim, "bob");
    join(&mut sim, alice, "news_today");
    join(&mut sim, bob, "news_today");
    sim.take(alice);
    sim.advance(Duration::from_millis(1234));
    let now = sim.now();
    let published = sim
        .hub_mut()
        .publish(
            now,
            &room("news_today"),
            Some("headline"),
            &raw(r#"{"title":"x"}"#),
        )
        .unwrap();
    sim.pump();
    assert_eq!(published.seq, 1);
    assert_eq!(published.delivered, 2);
    assert_eq!(published.epoch.as_str(), epoch(&sim, "news_today"));
    let expected = json!({
        "type": "message",
        "room": "news_today",
        "seq": 1,
        "epoch": published.epoch.as_str(),
        "event": "headline",
        "from": {"server": true},
        "data": {"title": "x"},
        "ts": SIM_EPOCH.as_millis() + 1234,
    });
    assert_eq!(sim.take(alice), vec![expected.clone()]);
    assert_eq!(sim.take(bob), vec![expected]);
}

/// A publish sent again with its `idempotency_key` (a retry: the client
/// did not hear whether the first took effect) is answered `ack` and not
/// published again; the key is the publisher's, so another user's publish
/// with the same key is a message of its own; after the window the key is
/// forgotten.
#[test]
fn a_publish_sent_again_with_its_idempotency_key_is_acked_not_published_again() {
    let mut sim = sim();
    let alice = connect(&mut sim, "alice");
    let bob = connect(&mut sim, "bob");
    join(&mut sim, alice, "lobby");
    join(&mut sim, bob, "lobby");
    sim.take(alice); // bob's arrival
    let keyed = |id: u32, data: &str, key: &str| {
        json!({"type": "publish", "room": "lobby", "id": id, "data": data,
            "idempotency_key": key})
    };
    ok(&mut sim, alice, keyed(1, "once", "k1"));
    assert_eq!(types(&sim.take(alice)), ["message", "ack"]);
    assert_eq!(types(&sim.take(bob)), ["message"]);

    ok(&mut sim, alice, keyed(2, "once again", "k1"));
    assert_eq!(sim.take(alice), vec![json!({"type": "ack", "id": 2})]);
    assert!(sim.take(bob).is_empty(), "not published again");
    assert_eq!(seq(&sim, "lobby"), 1);

    ok(&mut sim, bob, keyed(3, "bob's", "k1"));
    assert_eq!(types(&sim.take(alice)), ["message"], "another user's key");
    ok(&mut sim, alice, keyed(4, "another", "k2"));
    assert_eq!(types(&sim.take(bob)), ["message", "ack", "message"]);
    assert_eq!(seq(&sim, "lobby"), 3);

    // Past the window, both sessions kept alive meanwhile.
    for _ in 0..=IDEMPOTENCY_WINDOW.as_secs() / 10 {
        sim.advance(secs(10));
        ok(&mut sim, alice, json!({"type": "ping"}));
        ok(&mut sim, bob, json!({"type": "ping"}));
    }
    sim.take(alice);
    sim.take(bob);
    ok(&mut sim, alice, keyed(5, "later", "k1"));
    assert_eq!(
        types(&sim.take(bob)),
        ["message"],
        "forgotten after the window"
    );
    assert_eq!(seq(&sim, "lobby"), 4);
}

#[test]
fn an_idempotency_key_that_is_not_a_short_string_is_refused() {
    let mut sim = sim();
    let alice = connect(&mut sim, "alice");
    join(&mut sim, alice, "lobby");
    let long = "k".repeat(MAX_IDEMPOTENCY_KEY_BYTES + 1);
    for key in [json!(""), json!(long), json!(7), json!(null)] {
        let frame = json!({"type": "publish", "room": "lobby", "data": 1, "idempotency_key": key});
        let error = refused(&mut sim, alice, &frame.to_string(), "invalid_frame");
        assert_eq!(error["room"], "lobby");
    }
    assert_eq!(seq(&sim, "lobby"), 0, "nothing published");
}

/// The application's publish with a key it already used returns the first
/// one's place and publishes nothing.
#[test]
fn a_server_publish_with_a_key_already_used_returns_the_first_ones_place() {
    let mut sim = sim();
    let alice = connect(&mut sim, "alice");
    join(&mut sim, alice, "news");
    let now = sim.now();
    let data = raw("1");
    let first = sim
        .hub_mut()
        .publish_keyed(now, &room("news"), None, &data, Some("job-7-done"))
        .unwrap();
    let again = sim
        .hub_mut()
        .publish_keyed(now, &room("news"), None, &data, Some("job-7-done"))
        .unwrap();
    sim.pump();
    assert_eq!((again.seq, &again.epoch), (first.seq, &first.epoch));
    assert_eq!(again.delivered, 0);
    assert_eq!(types(&sim.take(alice)), ["message"]);
}

#[test]
fn server_publish_creates_the_room_and_refuses_what_cannot_be_delivered() {
    let mut sim = sim();
    let now = sim.now();
    let p = sim
        .hub_mut()
        .publish(now, &room("jobs"), None, &raw("1"))
        .unwrap();
    assert_eq!((p.seq, p.delivered), (1, 0));
    assert_eq!(sim.hub().room_count(), 1, "kept for its history");
    assert_eq!(sim.hub().history("jobs", 10).count(), 1);

    let long_event = "e".repeat(129);
    let err = sim
        .hub_mut()
        .publish(now, &room("jobs"), Some(&long_event), &raw("1"))
        .unwrap_err();
    assert_eq!(err, PublishError::InvalidEvent);
    assert_eq!(err.code(), ErrorCode::InvalidFrame);
    let huge = format!("\"{}\"", "x".repeat(70_000));
    let err = sim
        .hub_mut()
        .publish(now, &room("jobs"), None, &raw(&huge))
        .unwrap_err();
    assert_eq!(err, PublishError::TooLarge);
    assert_eq!(err.code(), ErrorCode::FrameTooLarge);
    let err = sim
        .hub_mut()
        .publish(now, &room("fresh"), None, &raw(&huge))
        .unwrap_err();
    assert_eq!(err, PublishError::TooLarge);
    assert_eq!(seq(&sim, "jobs"), 1, "refused publishes take no seq");
    assert!(sim.hub().room("fresh").is_none(), "nor leave a room behind");
    assert_eq!(sim.hub().room_count(), 1);
}

// ---- id, ack and error ----------------------------------------------------

#[test]
fn every_frame_type_with_an_id_gets_exactly_one_ack_after_its_effect() {
    let mut sim = sim();
    let alice = connect(&mut sim, "alice");
    let bob = connect(&mut sim, "bob");
    join(&mut sim, bob, "lobby");
    let bob_sid = sid(&sim, bob);
    let cases: Vec<(Value, Vec<&str>)> = vec![
        (
            json!({"type": "join", "room": "lobby", "id": 1}),
            vec!["joined", "ack"],
        ),
        (
            json!({"type": "publish", "room": "lobby", "data": 1, "id": 2}),
            vec!["message", "ack"],
        ),
        (
            json!({"type": "direct", "to": {"user": "bob"}, "data": 1, "id": 3}),
            vec!["ack"],
        ),
        (
            json!({"type": "direct", "to": {"sid": bob_sid}, "data": 1, "id": 4}),
            vec!["ack"],
        ),
        (json!({"type": "ping", "id": 5}), vec!["pong", "ack"]),
        (json!({"type": "pong", "id": 6}), vec!["ack"]),
        (
            json!({"type": "presence", "room": "lobby", "id": 7}),
            vec!["presence", "ack"],
        ),
        (
            json!({"type": "leave", "room": "lobby", "id": 8}),
            vec!["ack"],
        ),
    ];
    for (frame, expected) in cases {
        ok(&mut sim, alice, frame.clone());
        let got = sim.take(alice);
        assert_eq!(types(&got), expected, "{frame}");
        assert_eq!(
            got.last().unwrap(),
            &json!({"type": "ack", "id": frame["id"]})
        );
    }
}

#[test]
fn ids_are_echoed_verbatim_as_numbers_and_strings() {
    let mut sim = sim();
    let alice = connect(&mut sim, "alice");
    let max_id = format!("\"{}\"", "i".repeat(64));
    for id in [
        "0",
        "-7",
        "1.5",
        "1e3",
        "18446744073709551616",
        r#""abc""#,
        r#""""#,
        r#""with \"escapes\" \u00e9""#,
        max_id.as_str(),
    ] {
        let frame = format!(r#"{{"type":"pong","id":{id}}}"#);
        sim.send(alice, &frame).unwrap();
        let got = sim.take_raw(alice);
        assert_eq!(got.len(), 1, "{frame}");
        assert_eq!(
            std::str::from_utf8(&got[0].frame).unwrap(),
            format!(r#"{{"type":"ack","id":{id}}}"#)
        );
    }
    // A string id over 64 bytes is refused, and the error cannot carry it.
    let long = format!(r#"{{"type":"pong","id":"{}"}}"#, "i".repeat(65));
    let e = refused(&mut sim, alice, &long, "invalid_frame");
    assert!(e.get("id").is_none());
}

#[test]
fn a_refused_frame_with_an_id_gets_one_error_with_that_id_and_no_ack() {
    let mut sim = sim();
    let alice = connect(&mut sim, "alice");
    for (frame, code, id) in [
        (
            r#"{"type":"publish","room":"lobby","data":1,"id":"p1"}"#,
            "not_joined",
            json!("p1"),
        ),
        (
            r#"{"type":"join","room":"secret","id":9}"#,
            "forbidden",
            json!(9),
        ),
        (r#"{"type":"nope","id":10}"#, "unknown_type", json!(10)),
        (
            r#"{"type":"join","room":"a b","id":11}"#,
            "invalid_room",
            json!(11),
        ),
        (r#"{"type":"join","id":12}"#, "invalid_frame", json!(12)),
        (
            r#"{"type":"direct","to":{"user":"ghost"},"data":1,"id":13}"#,
            "unknown_target",
            json!(13),
        ),
    ] {
        let e = refused(&mut sim, alice, frame, code);
        assert_eq!(e["id"], id, "{frame}");
    }
}

#[test]
fn frames_without_an_id_are_answered_only_when_they_fail() {
    let mut sim = sim();
    let alice = connect(&mut sim, "alice");
    let bob = connect(&mut sim, "bob");
    join(&mut sim, bob, "lobby");
    ok(&mut sim, alice, json!({"type": "join", "room": "lobby"}));
    assert_eq!(types(&sim.take(alice)), ["joined"]);
    ok(
        &mut sim,
        alice,
        json!({"type": "publish", "room": "lobby", "data": 1, "echo": false}),
    );
    ok(&mut sim, alice, json!({"type": "pong"}));
    ok(
        &mut sim,
        alice,
        json!({"type": "direct", "to": {"user": "bob"}, "data": 1}),
    );
    ok(&mut sim, alice, json!({"type": "leave", "room": "lobby"}));
    assert!(sim.take(alice).is_empty());
    let e = refused(
        &mut sim,
        alice,
        r#"{"type":"leave","room":"lobby"}"#,
        "not_joined",
    );
    assert!(e.get("id").is_none());
}

#[test]
fn errors_name_the_room_when_one_was_read() {
    let mut sim = sim();
    let alice = connect(&mut sim, "alice");
    let e = refused(
        &mut sim,
        alice,
        r#"{"type":"publish","room":"lobby"}"#,
        "invalid_frame",
    );
    assert_eq!(e["room"], "lobby");
    let e = refused(
        &mut sim,
        alice,
        r#"{"type":"join","room":"lobby","presence":"yes"}"#,
        "invalid_frame",
    );
    assert_eq!(e["room"], "lobby");
    let e = refused(
        &mut sim,
        alice,
        r#"{"type":"join","room":"secret"}"#,
        "forbidden",
    );
    assert_eq!(e["room"], "secret");
    let e = refused(
        &mut sim,
        alice,
        r#"{"type":"join","room":"a b"}"#,
        "invalid_room",
    );
    assert!(e.get("room").is_none(), "an invalid name is never echoed");
}

// ---- direct ---------------------------------------------------------------

#[test]
fn direct_to_a_user_reaches_all_of_their_tabs() {
    let mut sim = sim();
    let alice = connect(&mut sim, "alice");
    let bob1 = connect(&mut sim, "bob");
    let bob2 = connect(&mut sim, "bob");
    let carol = connect(&mut sim, "carol");
    ok(
        &mut sim,
        alice,
        json!({"type": "direct", "to": {"user": "bob"}, "event": "dm", "data": {"t": "hey"}}),
    );
    let expected = json!({
        "type": "direct",
        "from": {"sid": sid(&sim, alice), "user": "alice"},
        "data": {"t": "hey"},
        "event": "dm",
    });
    assert_eq!(sim.take(bob1), vec![expected.clone()]);
    assert_eq!(sim.take(bob2), vec![expected]);
    assert!(sim.take(alice).is_empty());
    assert!(sim.take(carol).is_empty());
    // To one's own user: every own tab, the sender's included.
    let alice2 = connect(&mut sim, "alice");
    ok(
        &mut sim,
        alice,
        json!({"type": "direct", "to": {"user": "alice"}, "data": 0}),
    );
    assert_eq!(types(&sim.take(alice)), ["direct"]);
    assert_eq!(types(&sim.take(alice2)), ["direct"]);
}

#[test]
fn direct_to_a_sid_reaches_only_that_session() {
    let mut sim = sim();
    let alice = connect(&mut sim, "alice");
    let bob1 = connect(&mut sim, "bob");
    let bob2 = connect(&mut sim, "bob");
    let target = sid(&sim, bob2);
    ok(
        &mut sim,
        alice,
        json!({"type": "direct", "to": {"sid": target}, "data": [1]}),
    );
    assert!(sim.take(bob1).is_empty());
    let got = sim.take(bob2);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["data"], json!([1]));
    assert!(got[0].get("event").is_none());
    assert_eq!(got[0]["from"]["user"], "alice");
}

#[test]
fn direct_to_nobody_is_unknown_target() {
    let mut sim = sim();
    let alice = connect(&mut sim, "alice");
    let bob = connect(&mut sim, "bob");
    let bob_sid = sid(&sim, bob);
    refused(
        &mut sim,
        alice,
        r#"{"type":"direct","to":{"user":"ghost"},"data":1}"#,
        "unknown_target",
    );
    refused(
        &mut sim,
        alice,
        r#"{"type":"direct","to":{"sid":"no-such-sid"},"data":1}"#,
        "unknown_target",
    );
    sim.disconnect(bob);
    let frame = json!({"type": "direct", "to": {"sid": bob_sid}, "data": 1}).to_string();
    refused(&mut sim, alice, &frame, "unknown_target");
    let frame = json!({"type": "direct", "to": {"user": "bob"}, "data": 1}).to_string();
    refused(&mut sim, alice, &frame, "unknown_target");
}

#[test]
fn direct_refused_by_policy_is_forbidden() {
    let mut sim = sim();
    let alice = connect(&mut sim, "alice");
    let admin = connect(&mut sim, "admin");
    let boss = connect(&mut sim, "boss");
    let e = refused(
        &mut sim,
        alice,
        r#"{"type":"direct","to":{"user":"boss"},"data":1,"id":"d"}"#,
        "forbidden",
    );
    assert_eq!(e["id"], "d");
    assert!(sim.take(boss).is_empty());
    // Checked before the target is looked up: no probing for who is online.
    sim.disconnect(boss);
    refused(
        &mut sim,
        alice,
        r#"{"type":"direct","to":{"user":"boss"},"data":1}"#,
        "forbidden",
    );
    let boss = connect(&mut sim, "boss");
    ok(
        &mut sim,
        admin,
        json!({"type": "direct", "to": {"user": "boss"}, "data": 1}),
    );
    assert_eq!(types(&sim.take(boss)), ["direct"]);
}

#[test]
fn server_direct_is_from_server_and_counts_sessions() {
    let mut sim = sim();
    let bob1 = connect(&mut sim, "bob");
    let bob2 = connect(&mut sim, "bob");
    let reached = sim
        .hub_mut()
        .send_direct(
            &Target::User("bob".into()),
            Some("notice"),
            &raw(r#"{"n":1}"#),
        )
        .unwrap();
    sim.pump();
    assert_eq!(reached, 2);
    let expected = json!({
        "type": "direct", "from": {"server": true}, "data": {"n": 1}, "event": "notice",
    });
    assert_eq!(sim.take(bob1), vec![expected.clone()]);
    assert_eq!(sim.take(bob2), vec![expected]);

    let sid1 = sid(&sim, bob1);
    let reached = sim
        .hub_mut()
        .send_direct(&Target::Sid(sid1.as_str().into()), None, &raw("2"))
        .unwrap();
    sim.pump();
    assert_eq!(reached, 1);
    assert_eq!(sim.take(bob1).len(), 1);
    assert!(sim.take(bob2).is_empty());

    let err = sim
        .hub_mut()
        .send_direct(&Target::User("ghost".into()), None, &raw("1"))
        .unwrap_err();
    assert_eq!(err, DirectError::UnknownTarget);
    assert_eq!(err.code(), ErrorCode::UnknownTarget);
    let err = sim
        .hub_mut()
        .send_direct(
            &Target::User("bob".into()),
            Some(&"e".repeat(129)),
            &raw("1"),
        )
        .unwrap_err();
    assert_eq!(err, DirectError::InvalidEvent);
    let huge = format!("\"{}\"", "x".repeat(70_000));
    let err = sim
        .hub_mut()
        .send_direct(&Target::User("bob".into()), None, &raw(&huge))
        .unwrap_err();
    assert_eq!(err, DirectError::TooLarge);
    sim.pump();
    assert!(sim.take(bob1).is_empty());
}

// ---- presence -------------------------------------------------------------

#[test]
fn presence_announces_joins_and_leaves_with_counts() {
    let mut sim = sim();
    let alice = connect(&mut sim, "alice");
    let bob = connect(&mut sim, "bob");
    let carol = connect(&mut sim, "carol");
    join(&mut sim, alice, "lobby");
    let joined = join(&mut sim, bob, "lobby");
    assert_eq!(joined["members"], 2);
    let join_event = json!({
        "type": "presence", "room": "lobby", "action": "join", "user": "bob", "count": 2,
    });
    assert_eq!(sim.take(alice), vec![join_event]);

    join(&mut sim, carol, "lobby");
    let carol_join = json!({
        "type": "presence", "room": "lobby", "action": "join", "user": "carol", "count": 3,
    });
    assert_eq!(sim.take(alice), vec![carol_join.clone()]);
    assert_eq!(sim.take(bob), vec![carol_join]);

    ok(&mut sim, bob, json!({"type": "leave", "room": "lobby"}));
    let leave = json!({
        "type": "presence", "room": "lobby", "action": "leave", "user": "bob", "count": 2,
    });
    assert_eq!(sim.take(alice), vec![leave.clone()]);
    assert_eq!(sim.take(carol), vec![leave]);
    assert!(sim.take(bob).is_empty(), "the leaver hears nothing");

    // A transport that goes away is a leave too.
    sim.disconnect(carol);
    assert_eq!(
        sim.take(alice),
        vec![json!({
            "type": "presence", "room": "lobby", "action": "leave", "user": "carol", "count": 1,
        })]
    );
}

#[test]
fn a_users_tabs_count_once() {
    let mut sim = sim();
    let bob = connect(&mut sim, "bob");
    let tab1 = connect(&mut sim, "alice");
    let tab2 = connect(&mut sim, "alice");
    join(&mut sim, bob, "lobby");
    join(&mut sim, tab1, "lobby");
    assert_eq!(sim.take(bob).len(), 1, "alice arrived");
    let joined = join(&mut sim, tab2, "lobby");
    assert_eq!(joined["members"], 2, "users, not sessions");
    assert!(sim.take(bob).is_empty(), "alice's second tab is not news");
    assert!(sim.take(tab1).is_empty());
    let info = sim.hub().room("lobby").unwrap();
    assert_eq!(info.sessions, 3);
    assert_eq!(
        info.users.iter().map(|u| u.as_str()).collect::<Vec<_>>(),
        ["alice", "bob"]
    );

    ok(&mut sim, tab1, json!({"type": "leave", "room": "lobby"}));
    assert!(sim.take(bob).is_empty(), "alice is still here in tab 2");
    sim.disconnect(tab2);
    assert_eq!(
        sim.take(bob),
        vec![json!({
            "type": "presence", "room": "lobby", "action": "leave", "user": "alice", "count": 1,
        })]
    );
}

#[test]
fn a_join_with_presence_false_hears_no_presence_events_but_is_announced() {
    let mut sim = sim();
    let alice = connect(&mut sim, "alice");
    let bob = connect(&mut sim, "bob");
    let carol = connect(&mut sim, "carol");
    ok(
        &mut sim,
        alice,
        json!({"type": "join", "room": "lobby", "presence": false}),
    );
    let joined = sim.take(alice);
    assert_eq!(joined[0]["members"], 1);
    join(&mut sim, bob, "lobby");
    assert!(sim.take(alice).is_empty(), "alice asked for no presence");
    join(&mut sim, carol, "lobby");
    assert!(sim.take(alice).is_empty());
    assert_eq!(sim.take(bob)[0]["user"], "carol");
    ok(&mut sim, carol, json!({"type": "leave", "room": "lobby"}));
    assert!(sim.take(alice).is_empty());
    assert_eq!(sim.take(bob)[0]["action"], "leave");
    // Alice is still a member: counted, messages arrive, others hear her go.
    publish(&mut sim, bob, "lobby", json!("msg"));
    assert_eq!(types(&sim.take(alice)), ["message"]);
    sim.take(bob);
    // Joining again with presence on (the default) turns the events back on.
    join(&mut sim, alice, "lobby");
    join(&mut sim, carol, "lobby");
    assert_eq!(types(&sim.take(alice)), ["presence"]);
    sim.take(bob);
    sim.disconnect(alice);
    assert_eq!(sim.take(bob)[0]["user"], "alice");
}

#[test]
fn presence_request_lists_the_members() {
    let mut sim = sim();
    let alice = connect(&mut sim, "alice");
    let bob = connect(&mut sim, "bob");
    let bob2 = connect(&mut sim, "bob");
    let carol = connect(&mut sim, "carol");
    join(&mut sim, carol, "lobby");
    join(&mut sim, alice, "lobby");
    join(&mut sim, bob, "lobby");
    join(&mut sim, bob2, "lobby");
    sim.take(alice);
    sim.take(carol);
    ok(
        &mut sim,
        alice,
        json!({"type": "presence", "room": "lobby", "id": "p"}),
    );
    assert_eq!(
        sim.take(alice),
        vec![
            json!({
                "type": "presence", "room": "lobby", "action": "list",
                "members": ["alice", "bob", "carol"], "count": 3,
            }),
            json!({"type": "ack", "id": "p"}),
        ]
    );
    assert!(sim.take(carol).is_empty(), "only the asker hears the list");
    let outsider = connect(&mut sim, "dave");
    let e = refused(
        &mut sim,
        outsider,
        r#"{"type":"presence","room":"lobby"}"#,
        "not_joined",
    );
    assert_eq!(e["room"], "lobby");
}

#[test]
fn rooms_whose_policy_hides_presence_send_none() {
    let mut sim = sim();
    let alice = connect(&mut sim, "alice");
    let bob = connect(&mut sim, "bob");
    let joined = join(&mut sim, alice, "quiet_room");
    assert!(joined.get("members").is_none(), "no member count either");
    join(&mut sim, bob, "quiet_room");
    ok(
        &mut sim,
        bob,
        json!({"type": "leave", "room": "quiet_room"}),
    );
    join(&mut sim, bob, "quiet_room");
    sim.disconnect(bob);
    assert!(sim.take(alice).is_empty());
    refused(
        &mut sim,
        alice,
        r#"{"type":"presence","room":"quiet_room"}"#,
        "forbidden",
    );
}

// ---- recovery -------------------------------------------------------------

/// A room with `n` messages and a member, for recovery tests.
fn room_with_messages(sim: &mut Sim, name: &str, n: u64) -> (SessionKey, Vec<Value>) {
    let alice = connect(sim, "alice");
    join(sim, alice, name);
    for i in 1..=n {
        publish(sim, alice, name, json!({"i": i}));
    }
    let got = sim.take(alice);
    assert_eq!(got.len() as u64, n);
    (alice, got)
}

#[test]
fn since_with_the_right_epoch_replays_in_order_then_joined_recovered() {
    let mut sim = sim();
    let (_alice, published) = room_with_messages(&mut sim, "lobby", 5);
    let ep = epoch(&sim, "lobby");
    let bob = connect(&mut sim, "bob");
    ok(
        &mut sim,
        bob,
        json!({"type": "join", "room": "lobby", "since": {"seq": 2, "epoch": ep}, "id": "r"}),
    );
    let got = sim.take(bob);
    assert_eq!(
        types(&got),
        ["message", "message", "message", "joined", "ack"]
    );
    assert_eq!(&got[..3], &published[2..], "the very messages, in order");
    assert_eq!(
        got[3],
        json!({
            "type": "joined", "room": "lobby", "seq": 5, "epoch": ep,
            "recovered": true, "members": 2,
        })
    );
    // Replayed frames keep their kind, so SSE can build its cursor.
    let ep = epoch(&sim, "lobby");
    let carol = connect(&mut sim, "carol");
    let frame = json!({"type": "join", "room": "lobby", "since": {"seq": 0, "epoch": ep}});
    sim.send(carol, &frame.to_string()).unwrap();
    let got = sim.take_raw(carol);
    assert_eq!(got.len(), 6);
    for (i, r) in got[..5].iter().enumerate() {
        assert_eq!(r.json()["seq"], i as u64 + 1);
        match &r.kind {
            switchboard_core::FrameKind::Message { room, seq, epoch } => {
                assert_eq!(room.as_str(), "lobby");
                assert_eq!(*seq, i as u64 + 1);
                assert_eq!(epoch.as_str(), ep);
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn since_with_another_epoch_is_not_recovered() {
    let mut sim = sim();
    room_with_messages(&mut sim, "lobby", 3);
    let bob = connect(&mut sim, "bob");
    ok(
        &mut sim,
        bob,
        json!({"type": "join", "room": "lobby", "since": {"seq": 1, "epoch": "stale"}}),
    );
    assert_eq!(
        sim.take(bob),
        vec![json!({
            "type": "joined", "room": "lobby", "seq": 3, "epoch": epoch(&sim, "lobby"),
            "recovered": false, "members": 2,
        })]
    );
    assert!(sim.hub().is_member(bob, "lobby"), "joined all the same");
}

#[test]
fn since_older_than_the_history_is_not_recovered() {
    let mut sim = sim();
    room_with_messages(&mut sim, "short_room", 6); // keeps the last 3: seq 4..=6
    let ep = epoch(&sim, "short_room");
    assert_eq!(sim.hub().history("short_room", 100).count(), 3);
    let bob = connect(&mut sim, "bob");
    for since in [0, 1, 2] {
        let frame =
            json!({"type": "join", "room": "short_room", "since": {"seq": since, "epoch": ep}});
        ok(&mut sim, bob, frame);
        let got = sim.take(bob);
        assert_eq!(types(&got), ["joined"], "since {since}");
        assert_eq!(got[0]["recovered"], false);
        assert_eq!(got[0]["seq"], 6);
    }
    // seq 3 was the last one seen: 4, 5, 6 are all still there.
    ok(
        &mut sim,
        bob,
        json!({"type": "join", "room": "short_room", "since": {"seq": 3, "epoch": ep}}),
    );
    let got = sim.take(bob);
    assert_eq!(types(&got), ["message", "message", "message", "joined"]);
    assert_eq!(got[0]["seq"], 4);
    assert_eq!(got[3]["recovered"], true);
}

#[test]
fn since_in_a_room_without_history_is_not_recovered() {
    let mut sim = sim();
    room_with_messages(&mut sim, "nohist_room", 2);
    let ep = epoch(&sim, "nohist_room");
    assert_eq!(sim.hub().history("nohist_room", 100).count(), 0);
    let bob = connect(&mut sim, "bob");
    ok(
        &mut sim,
        bob,
        json!({"type": "join", "room": "nohist_room", "since": {"seq": 1, "epoch": ep}}),
    );
    let got = sim.take(bob);
    assert_eq!(types(&got), ["joined"]);
    assert_eq!(got[0]["recovered"], false);
}

#[test]
fn since_the_latest_seq_is_recovered_with_nothing_to_replay() {
    let mut sim = sim();
    room_with_messages(&mut sim, "lobby", 4);
    room_with_messages(&mut sim, "nohist_room", 4);
    let bob = connect(&mut sim, "bob");
    for name in ["lobby", "nohist_room"] {
        let ep = epoch(&sim, name);
        ok(
            &mut sim,
            bob,
            json!({"type": "join", "room": name, "since": {"seq": 4, "epoch": ep}}),
        );
        let got = sim.take(bob);
        assert_eq!(types(&got), ["joined"], "{name}");
        assert_eq!(got[0]["recovered"], true, "{name}: nothing was missed");
        assert_eq!(got[0]["seq"], 4);
    }
    // A fresh room: since 0 in its epoch is everything.
    let ep = {
        join(&mut sim, bob, "fresh");
        epoch(&sim, "fresh")
    };
    let carol = connect(&mut sim, "carol");
    ok(
        &mut sim,
        carol,
        json!({"type": "join", "room": "fresh", "since": {"seq": 0, "epoch": ep}}),
    );
    assert_eq!(sim.take(carol)[0]["recovered"], true);
}

#[test]
fn since_from_the_future_is_not_recovered() {
    let mut sim = sim();
    room_with_messages(&mut sim, "lobby", 2);
    let ep = epoch(&sim, "lobby");
    let bob = connect(&mut sim, "bob");
    for since in [3, 1000, u64::MAX - 1, u64::MAX] {
        ok(
            &mut sim,
            bob,
            json!({"type": "join", "room": "lobby", "since": {"seq": since, "epoch": ep}}),
        );
        let got = sim.take(bob);
        assert_eq!(types(&got), ["joined"], "since {since}");
        assert_eq!(got[0]["recovered"], false, "since {since}");
    }
    // Also with an epoch that does not match, in a room that does not exist yet.
    ok(
        &mut sim,
        bob,
        json!({"type": "join", "room": "brand_new", "since": {"seq": u64::MAX, "epoch": "x"}}),
    );
    assert_eq!(sim.take(bob)[0]["recovered"], false);
}

#[test]
fn a_room_that_lost_its_history_gets_a_new_epoch() {
    let mut sim = sim();
    let (alice, _) = room_with_messages(&mut sim, "ttl_room", 2);
    let old = epoch(&sim, "ttl_room");
    sim.disconnect(alice);
    sim.advance(TTL + MS);
    assert!(sim.hub().room("ttl_room").is_none());
    let bob = connect(&mut sim, "bob");
    ok(
        &mut sim,
        bob,
        json!({"type": "join", "room": "ttl_room", "since": {"seq": 2, "epoch": old}}),
    );
    let got = sim.take(bob);
    assert_eq!(got[0]["recovered"], false);
    assert_eq!(got[0]["seq"], 0);
    assert_ne!(got[0]["epoch"], old.as_str());
}

// ---- heartbeat ------------------------------------------------------------

#[test]
fn ping_after_an_interval_of_silence() {
    let mut sim = sim();
    let alice = connect(&mut sim, "alice");
    sim.advance(INTERVAL - MS);
    assert!(sim.take(alice).is_empty());
    sim.advance(MS);
    let got = sim.take_raw(alice);
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0].frame[..], br#"{"type":"ping"}"#);
    // One ping per silence, not one per tick.
    sim.advance(TIMEOUT - MS);
    assert!(sim.take(alice).is_empty());
    assert!(sim.hub().contains(alice));
}

#[test]
fn silence_for_interval_plus_timeout_closes_with_heartbeat_timeout() {
    let mut sim = sim();
    let alice = connect(&mut sim, "alice");
    let bob = connect(&mut sim, "bob");
    join(&mut sim, alice, "lobby");
    join(&mut sim, bob, "lobby");
    sim.take(alice);
    sim.advance(INTERVAL + TIMEOUT - MS);
    assert!(sim.hub().contains(alice));
    assert_eq!(types(&sim.take(alice)), ["ping"]);
    assert_eq!(sim.close_reason(alice), None);
    sim.advance(MS);
    assert_eq!(
        sim.take(alice),
        vec![json!({"type": "close", "code": 1001, "reason": "heartbeat_timeout"})]
    );
    assert_eq!(sim.close_reason(alice), Some(CloseReason::HeartbeatTimeout));
    assert!(!sim.hub().contains(alice));
    assert!(!sim.hub().contains(bob), "bob was silent just as long");
    assert_eq!(sim.hub().session_count(), 0);
    assert_eq!(sim.hub().room_count(), 0, "resources freed");
    let errors = sim.hub().stats().errors[ErrorCode::HeartbeatTimeout.index()];
    assert_eq!(errors, 2);
}

#[test]
fn the_close_frame_comes_before_output_close() {
    let mut hub = Hub::new(Config::default(), Arc::new(TestPolicy), 7).unwrap();
    let t0 = Timestamp::from_millis(1_000_000);
    let key = hub
        .connect(t0, Sid::new("a"), Identity::new("alice"), Liveness::Client)
        .unwrap();
    while hub.poll_output().is_some() {}
    assert_eq!(hub.poll_timeout(), Some(t0 + INTERVAL));
    hub.handle_timeout(t0 + INTERVAL);
    let Some(Output::Deliver(ping)) = hub.poll_output() else {
        panic!("a ping");
    };
    assert_eq!(&ping.frame[..], br#"{"type":"ping"}"#);
    assert!(hub.poll_output().is_none());
    assert_eq!(hub.poll_timeout(), Some(t0 + INTERVAL + TIMEOUT));
    hub.handle_timeout(t0 + INTERVAL + TIMEOUT);
    let Some(Output::Deliver(close)) = hub.poll_output() else {
        panic!("the close frame first");
    };
    assert_eq!(close.to.iter().collect::<Vec<_>>(), [key]);
    assert_eq!(
        &close.frame[..],
        br#"{"type":"close","code":1001,"reason":"heartbeat_timeout"}"#
    );
    let Some(Output::Close { session, reason }) = hub.poll_output() else {
        panic!("then Output::Close");
    };
    assert_eq!((session, reason), (key, CloseReason::HeartbeatTimeout));
    assert_eq!(reason.code(), 1001);
    assert!(hub.poll_output().is_none());
    assert!(!hub.contains(key));
}

#[test]
fn any_valid_frame_refreshes_liveness() {
    for frame in [
        json!({"type": "ping"}),
        json!({"type": "pong"}),
        json!({"type": "join", "room": "lobby"}),
        json!({"type": "presence", "room": "home"}),
        json!({"type": "publish", "room": "home", "data": 1}),
        json!({"type": "direct", "to": {"user": "alice"}, "data": 1}),
    ] {
        let mut sim = sim();
        let alice = connect(&mut sim, "alice");
        join(&mut sim, alice, "home");
        sim.advance(secs(20));
        ok(&mut sim, alice, frame.clone());
        sim.take(alice);
        // The ping comes an interval after the frame, not after connect.
        sim.advance(INTERVAL - MS);
        assert!(sim.take(alice).is_empty(), "{frame}");
        sim.advance(MS);
        assert_eq!(types(&sim.take(alice)), ["ping"], "{frame}");
    }
}

#[test]
fn a_pong_after_the_ping_keeps_the_session() {
    let mut sim = sim();
    let alice = connect(&mut sim, "alice");
    for round in 0..5 {
        sim.advance(INTERVAL);
        assert_eq!(types(&sim.take(alice)), ["ping"], "round {round}");
        sim.advance(secs(15));
        ok(&mut sim, alice, json!({"type": "pong"}));
    }
    sim.advance(INTERVAL + TIMEOUT - MS);
    assert!(sim.hub().contains(alice));
    sim.advance(MS);
    assert!(!sim.hub().contains(alice));
}

#[test]
fn refused_frames_do_not_keep_a_session_alive() {
    let mut sim = sim();
    let alice = connect(&mut sim, "alice");
    for _ in 0..5 {
        sim.advance(secs(8));
        sim.take(alice); // the ping at 25 s
        refused(&mut sim, alice, "garbage", "invalid_json");
    }
    sim.advance(INTERVAL + TIMEOUT - secs(40));
    assert_eq!(sim.close_reason(alice), Some(CloseReason::HeartbeatTimeout));
}

#[test]
fn transport_liveness_gets_keepalive_pings_but_never_times_out() {
    let mut sim = sim();
    let sse = sim
        .try_connect(Identity::new("alice"), Liveness::Transport)
        .unwrap();
    assert_eq!(types(&sim.take(sse)), ["welcome"]);
    sim.advance(INTERVAL - MS);
    assert!(sim.take(sse).is_empty());
    sim.advance(MS);
    assert_eq!(types(&sim.take(sse)), ["ping"]);
    sim.advance(INTERVAL * 40);
    let got = sim.take(sse);
    assert_eq!(got.len(), 40, "one keepalive per interval");
    assert!(got.iter().all(|f| f["type"] == "ping"));
    assert!(sim.hub().contains(sse));
    assert_eq!(sim.close_reason(sse), None);
}

#[test]
fn a_detached_session_is_closed_idle_after_session_idle() {
    let mut config = Config::default();
    config.session_idle = secs(10);
    let mut sim = sim_with(config);
    let poll = connect(&mut sim, "alice");
    let now = sim.now();
    sim.hub_mut().detach(now, poll);
    sim.pump();
    sim.advance(secs(10) - MS);
    assert!(sim.hub().contains(poll));
    sim.advance(MS);
    assert_eq!(
        sim.take(poll),
        vec![json!({"type": "close", "code": 1001, "reason": "idle"})]
    );
    assert_eq!(sim.close_reason(poll), Some(CloseReason::Idle));
    assert!(!sim.hub().contains(poll));
}

#[test]
fn a_detached_keepalive_session_is_closed_idle_with_default_timings() {
    let mut sim = sim();
    let sse = sim
        .try_connect(Identity::new("alice"), Liveness::Transport)
        .unwrap();
    let now = sim.now();
    sim.hub_mut().detach(now, sse);
    sim.advance(secs(60) - MS);
    assert!(sim.hub().contains(sse));
    sim.advance(MS);
    assert_eq!(sim.close_reason(sse), Some(CloseReason::Idle));
}

#[test]
fn attach_ends_the_idle_clock() {
    let mut config = Config::default();
    config.session_idle = secs(10);
    let mut sim = sim_with(config);
    let poll = connect(&mut sim, "alice");
    let t0 = sim.now();
    sim.hub_mut().detach(t0, poll);
    sim.advance(secs(8));
    let now = sim.now();
    sim.hub_mut().attach(now, poll);
    sim.advance(secs(5)); // past detach + idle: attached, so nothing happens
    assert!(sim.hub().contains(poll));
    let now = sim.now(); // t0 + 13 s
    sim.hub_mut().detach(now, poll);
    // Detaching again while detached does not restart the clock.
    sim.advance(secs(4));
    let later = sim.now();
    sim.hub_mut().detach(later, poll);
    sim.advance(secs(6) - MS);
    assert!(
        sim.hub().contains(poll),
        "idle counts from the first detach"
    );
    sim.advance(MS);
    assert_eq!(sim.close_reason(poll), Some(CloseReason::Idle));
}

#[test]
fn attach_refreshes_heartbeat_liveness() {
    let mut sim = sim();
    let poll = connect(&mut sim, "alice");
    sim.advance(INTERVAL);
    assert_eq!(types(&sim.take(poll)), ["ping"]);
    sim.advance(secs(10));
    let now = sim.now();
    sim.hub_mut().attach(now, poll); // a long-poll request is proof of life
    sim.advance(INTERVAL - MS);
    assert!(sim.hub().contains(poll));
    assert!(sim.take(poll).is_empty());
    sim.advance(MS);
    assert_eq!(types(&sim.take(poll)), ["ping"]);
}

#[test]
fn a_detached_client_session_is_closed_idle_not_heartbeat_timeout() {
    // Default timings: interval + timeout (45 s) is shorter than session_idle
    // (60 s). A detached long-poll session has no transport to carry a ping;
    // only the idle clock runs.
    let mut sim = sim();
    let poll = connect(&mut sim, "alice");
    let now = sim.now();
    sim.hub_mut().detach(now, poll);
    sim.advance(INTERVAL + TIMEOUT + secs(1));
    assert!(
        sim.hub().contains(poll),
        "no heartbeat_timeout while detached"
    );
    assert!(sim.take(poll).is_empty(), "no ping while detached");
    sim.advance(secs(60) - (INTERVAL + TIMEOUT + secs(1)) - MS);
    assert!(sim.hub().contains(poll));
    sim.advance(MS);
    assert_eq!(
        sim.take(poll),
        vec![json!({"type": "close", "code": 1001, "reason": "idle"})]
    );
    assert_eq!(sim.close_reason(poll), Some(CloseReason::Idle));
}

#[test]
fn the_heartbeat_resumes_when_a_detached_session_attaches() {
    let mut sim = sim();
    let poll = connect(&mut sim, "alice");
    let now = sim.now();
    sim.hub_mut().detach(now, poll);
    sim.advance(secs(1));
    let now = sim.now();
    sim.hub_mut().attach(now, poll);
    // Attached (a poll waits): pinged after the interval, even though the
    // idle deadline of the detach was later.
    sim.advance(INTERVAL - MS);
    assert!(sim.take(poll).is_empty());
    sim.advance(MS);
    assert_eq!(types(&sim.take(poll)), ["ping"]);
    sim.advance(TIMEOUT);
    assert_eq!(
        sim.close_reason(poll),
        Some(CloseReason::HeartbeatTimeout),
        "an attached transport that stays silent times out as before"
    );
}

// ---- credentials: expiry and refresh --------------------------------------

/// Connects `user` with a credential valid for `valid`; returns the session
/// and its `welcome`.
fn connect_expiring(sim: &mut Sim, user: &str, valid: Duration) -> (SessionKey, Value) {
    let identity = Identity::new(user).with_expiry(sim.now() + valid);
    let key = sim.try_connect(identity, Liveness::Client).unwrap();
    let got = sim.take(key);
    assert_eq!(types(&got), ["welcome"]);
    (key, got[0].clone())
}

/// Sends a `refresh` with `token` and id 9; returns what the hub handed out.
fn send_refresh(sim: &mut Sim, key: SessionKey, token: &str) -> switchboard_core::Refresh {
    ok(
        sim,
        key,
        json!({"type": "refresh", "token": token, "id": 9}),
    );
    assert!(
        sim.take(key).is_empty(),
        "no answer before the authenticator's"
    );
    let mut handed = sim.take_refreshes();
    assert_eq!(handed.len(), 1);
    let refresh = handed.remove(0);
    assert_eq!((refresh.session(), refresh.token()), (key, token));
    refresh
}

/// Asserts that `key` received one `error`: the `refresh` (id 9) was `forbidden`.
fn assert_refused_forbidden(sim: &mut Sim, key: SessionKey) {
    let got = sim.take(key);
    assert_eq!(types(&got), ["error"]);
    assert_eq!(
        (&got[0]["code"], &got[0]["id"]),
        (&json!("forbidden"), &json!(9))
    );
}

const TOKEN_EXPIRED: &str = r#"{"type":"close","code":1008,"reason":"token_expired"}"#;

#[test]
fn a_session_is_closed_token_expired_when_its_credential_expires() {
    let mut sim = sim();
    let bob = connect(&mut sim, "bob");
    let (alice, welcome) = connect_expiring(&mut sim, "alice", secs(3));
    // (A session without expiry has none: the welcome tests compare whole frames.)
    assert_eq!(welcome["expires_in_ms"], 3000);
    join(&mut sim, bob, "lobby");
    join(&mut sim, alice, "lobby");
    sim.take(bob);
    // An active client is closed all the same: liveness is not a credential.
    sim.advance(secs(2));
    ok(&mut sim, alice, json!({"type": "ping"}));
    sim.take(alice);
    sim.advance(secs(1) - MS);
    assert!(sim.hub().contains(alice));
    sim.advance(MS);
    let got = sim.take_raw(alice);
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0].frame[..], TOKEN_EXPIRED.as_bytes());
    assert_eq!(sim.close_reason(alice), Some(CloseReason::TokenExpired));
    assert!(!sim.hub().contains(alice));
    let left = sim.take(bob);
    assert_eq!(
        left[0]["action"], "leave",
        "its rooms hear it leave: {left:?}"
    );
    assert!(sim.hub().contains(bob), "sessions without expiry stay");
    let closes = sim.hub().stats().closes[CloseReason::TokenExpired.index()];
    assert_eq!(closes, 1);
}

#[test]
fn a_detached_session_expires_too() {
    let mut sim = sim();
    let (poll, _) = connect_expiring(&mut sim, "alice", secs(5));
    let now = sim.now();
    sim.hub_mut().detach(now, poll); // idle only after 60 s
    sim.advance(secs(5) - MS);
    assert!(sim.hub().contains(poll));
    sim.advance(MS);
    assert_eq!(sim.close_reason(poll), Some(CloseReason::TokenExpired));
    // The long-poll fetches it with its next poll.
    assert_eq!(sim.take(poll)[0]["reason"], "token_expired");
}

#[test]
fn a_refresh_of_the_same_user_moves_the_deadline_and_is_acked_with_the_time_left() {
    let mut sim = sim();
    let (alice, _) = connect_expiring(&mut sim, "alice", secs(3));
    let t0 = sim.now();
    sim.advance(secs(2));
    let refresh = send_refresh(&mut sim, alice, "fresh");
    let renewed = Identity::new("alice")
        .with_claims(json!({"role": "editor"}))
        .with_expiry(t0 + secs(10));
    sim.complete_refresh(refresh, Ok(renewed.clone()));
    assert_eq!(
        sim.take(alice),
        vec![json!({"type": "ack", "id": 9, "expires_in_ms": 8000})]
    );
    assert_eq!(sim.hub().identity(alice), Some(&renewed), "claims replaced");
    sim.advance(secs(8) - MS);
    assert!(sim.hub().contains(alice), "kept past the first token's exp");
    assert_eq!(sim.close_reason(alice), None);
    sim.advance(MS);
    assert_eq!(sim.close_reason(alice), Some(CloseReason::TokenExpired));
}

#[test]
fn a_refresh_may_bring_the_deadline_earlier_or_remove_it() {
    let mut sim = sim();
    let (alice, _) = connect_expiring(&mut sim, "alice", secs(60));
    let t0 = sim.now();
    let refresh = send_refresh(&mut sim, alice, "shorter");
    sim.complete_refresh(
        refresh,
        Ok(Identity::new("alice").with_expiry(t0 + secs(5))),
    );
    sim.take(alice);
    sim.advance(secs(5));
    assert_eq!(sim.close_reason(alice), Some(CloseReason::TokenExpired));

    let (bob, _) = connect_expiring(&mut sim, "bob", secs(3));
    let refresh = send_refresh(&mut sim, bob, "forever");
    sim.complete_refresh(refresh, Ok(Identity::new("bob")));
    assert_eq!(sim.take(bob), vec![json!({"type": "ack", "id": 9})]);
    for _ in 0..4 {
        sim.advance(secs(20));
        ok(&mut sim, bob, json!({"type": "pong"}));
    }
    assert!(
        sim.hub().contains(bob),
        "a credential without expiry never expires"
    );
}

#[test]
fn a_refresh_naming_another_user_is_forbidden_and_changes_nothing() {
    let mut sim = sim();
    let (alice, _) = connect_expiring(&mut sim, "alice", secs(3));
    let before = sim.hub().identity(alice).cloned();
    let refresh = send_refresh(&mut sim, alice, "mallory's");
    sim.complete_refresh(
        refresh,
        Ok(Identity::new("mallory").with_expiry(sim.now() + secs(60))),
    );
    assert_refused_forbidden(&mut sim, alice);
    assert_eq!(sim.hub().identity(alice).cloned(), before);
    assert_eq!(sim.hub().user_sessions("mallory"), &[] as &[SessionKey]);
    sim.advance(secs(3));
    assert_eq!(sim.close_reason(alice), Some(CloseReason::TokenExpired));
}

#[test]
fn a_refresh_with_an_already_expired_credential_is_forbidden_and_changes_nothing() {
    let mut sim = sim();
    let (alice, _) = connect_expiring(&mut sim, "alice", secs(3));
    let before = sim.hub().identity(alice).cloned();
    sim.advance(secs(1));
    // An authenticator with leeway may accept a token past its `exp`.
    let refresh = send_refresh(&mut sim, alice, "stale");
    let stale = Identity::new("alice").with_expiry(sim.now());
    sim.complete_refresh(refresh, Ok(stale));
    assert_refused_forbidden(&mut sim, alice);
    assert_eq!(sim.hub().identity(alice).cloned(), before);
    sim.advance(secs(2) - MS);
    assert!(sim.hub().contains(alice), "the old deadline holds");
    sim.advance(MS);
    assert_eq!(sim.close_reason(alice), Some(CloseReason::TokenExpired));
}

#[test]
fn a_refresh_the_authenticator_refuses_gets_its_error_and_counts_as_one() {
    let mut sim = sim();
    let (alice, _) = connect_expiring(&mut sim, "alice", secs(3));
    let refresh = send_refresh(&mut sim, alice, "forged");
    let error =
        switchboard_core::FrameError::new(ErrorCode::Forbidden, "invalid token: InvalidSignature");
    sim.complete_refresh(refresh, Err(error));
    let got = sim.take(alice);
    assert_eq!(
        got,
        vec![
            json!({"type": "error", "code": "forbidden", "message": "invalid token: InvalidSignature", "id": 9})
        ]
    );
    assert_eq!(sim.hub().stats().errors[ErrorCode::Forbidden.index()], 1);
    sim.advance(secs(3));
    assert_eq!(sim.close_reason(alice), Some(CloseReason::TokenExpired));
}

#[test]
fn a_refresh_completed_after_its_session_closed_is_ignored() {
    let mut sim = sim();
    let (alice, _) = connect_expiring(&mut sim, "alice", secs(3));
    let refresh = send_refresh(&mut sim, alice, "late");
    sim.advance(secs(3));
    assert_eq!(sim.close_reason(alice), Some(CloseReason::TokenExpired));
    sim.take(alice);
    let count = sim.hub().session_count();
    sim.complete_refresh(
        refresh,
        Ok(Identity::new("alice").with_expiry(sim.now() + secs(60))),
    );
    assert!(sim.take(alice).is_empty());
    assert_eq!(sim.hub().session_count(), count);
}

#[test]
fn a_malformed_refresh_is_invalid_frame_and_asks_nothing() {
    let mut sim = sim();
    let (alice, _) = connect_expiring(&mut sim, "alice", secs(3));
    refused(&mut sim, alice, r#"{"type":"refresh"}"#, "invalid_frame");
    refused(
        &mut sim,
        alice,
        r#"{"type":"refresh","token":1}"#,
        "invalid_frame",
    );
    refused(
        &mut sim,
        alice,
        r#"{"type":"refresh","token":""}"#,
        "invalid_frame",
    );
    assert!(sim.take_refreshes().is_empty());
}

#[test]
fn a_refresh_without_an_id_is_answered_only_when_refused() {
    let mut sim = sim();
    let (alice, _) = connect_expiring(&mut sim, "alice", secs(3));
    ok(&mut sim, alice, json!({"type": "refresh", "token": "t"}));
    let refresh = sim.take_refreshes().remove(0);
    sim.complete_refresh(
        refresh,
        Ok(Identity::new("alice").with_expiry(sim.now() + secs(9))),
    );
    assert!(sim.take(alice).is_empty());
    ok(&mut sim, alice, json!({"type": "refresh", "token": "t"}));
    let refresh = sim.take_refreshes().remove(0);
    sim.complete_refresh(refresh, Ok(Identity::new("eve")));
    assert_eq!(types(&sim.take(alice)), ["error"]);
    sim.advance(secs(9));
    assert_eq!(sim.close_reason(alice), Some(CloseReason::TokenExpired));
}

// ---- limits ---------------------------------------------------------------

/// A `pong` frame padded with spaces to exactly `len` bytes.
fn padded_frame(len: usize) -> String {
    let base = r#"{"type":"pong","id":1}"#;
    let mut frame = String::from(&base[..base.len() - 1]);
    frame.push_str(&" ".repeat(len - base.len()));
    frame.push('}');
    assert_eq!(frame.len(), len);
    frame
}

#[test]
fn frames_over_max_frame_bytes_are_frame_too_large() {
    let mut sim = sim();
    let alice = connect(&mut sim, "alice");
    sim.send(alice, &padded_frame(65_536)).unwrap();
    assert_eq!(sim.take(alice), vec![json!({"type": "ack", "id": 1})]);
    let e = refused(&mut sim, alice, &padded_frame(65_537), "frame_too_large");
    assert!(e.get("id").is_none(), "an oversize frame is not parsed");
    assert!(
        sim.hub().contains(alice),
        "over WebSocket the transport closes"
    );
    let e = refused(&mut sim, alice, &" ".repeat(1 << 20), "frame_too_large");
    assert!(e.get("id").is_none());
}

#[test]
fn a_publish_whose_message_would_be_too_large_changes_nothing() {
    let mut config = Config::default();
    config.max_frame_bytes = 1000;
    let mut sim = sim_with(config);
    let alice = connect(&mut sim, "alice");
    let bob = connect(&mut sim, "bob");
    join(&mut sim, alice, "lobby");
    join(&mut sim, bob, "lobby");
    join(&mut sim, alice, "open_board");
    sim.take(bob);
    let data = "x".repeat(900); // fits the client frame, not the message
    let frame = format!(r#"{{"type":"publish","room":"lobby","data":"{data}","id":1}}"#);
    assert!(frame.len() <= 1000);
    let e = refused(&mut sim, alice, &frame, "frame_too_large");
    assert_eq!(e["id"], 1);
    assert_eq!(seq(&sim, "lobby"), 0);
    assert_eq!(sim.hub().history("lobby", 10).count(), 0);
    assert!(sim.take(bob).is_empty());
    // A non-member's publish to a new room must not leave the room behind.
    let frame = format!(r#"{{"type":"publish","room":"open_new","data":"{data}"}}"#);
    refused(&mut sim, bob, &frame, "frame_too_large");
    assert!(sim.hub().room("open_new").is_none());
    // Same for a direct, whose `from` names a long user id.
    let long = connect(&mut sim, &"l".repeat(100));
    let frame = format!(r#"{{"type":"direct","to":{{"user":"bob"}},"data":"{data}"}}"#);
    assert!(frame.len() <= 1000);
    refused(&mut sim, long, &frame, "frame_too_large");
    assert!(sim.take(bob).is_empty());
}

#[test]
fn joining_more_than_max_rooms_is_too_many_rooms() {
    let mut config = Config::default();
    config.max_rooms_per_session = 3;
    let mut sim = sim_with(config);
    let alice = connect(&mut sim, "alice");
    for name in ["a", "b", "c"] {
        join(&mut sim, alice, name);
    }
    let e = refused(
        &mut sim,
        alice,
        r#"{"type":"join","room":"d","id":"j"}"#,
        "too_many_rooms",
    );
    assert_eq!(e["room"], "d");
    assert_eq!(e["id"], "j");
    assert!(sim.hub().room("d").is_none());
    assert_eq!(sim.hub().session_rooms(alice).count(), 3);
    // Joining a room one is already in is not one more room.
    join(&mut sim, alice, "b");
    ok(&mut sim, alice, json!({"type": "leave", "room": "a"}));
    join(&mut sim, alice, "d");
    // The limit is per session: another tab of the same user has its own.
    let tab2 = connect(&mut sim, "alice");
    for name in ["x", "y", "z"] {
        join(&mut sim, tab2, name);
    }
}

#[test]
fn over_the_rate_a_session_is_rate_limited_after_its_burst() {
    let mut sim = sim();
    let alice = connect(&mut sim, "alice");
    let bob = connect(&mut sim, "bob");
    for i in 0..100 {
        ok(&mut sim, alice, json!({"type": "ping", "id": i}));
    }
    assert_eq!(sim.take(alice).len(), 200, "the burst of 100 is served");
    let e = refused(
        &mut sim,
        alice,
        r#"{"type":"ping","id":"r"}"#,
        "rate_limited",
    );
    assert_eq!(e["id"], "r");
    // Bob's bucket is his own.
    ok(&mut sim, bob, json!({"type": "ping"}));
    // 50 per second: one token every 20 ms.
    sim.advance(Duration::from_millis(19));
    refused(&mut sim, alice, r#"{"type":"ping"}"#, "rate_limited");
    sim.advance(MS);
    ok(&mut sim, alice, json!({"type": "ping"}));
    sim.take(alice);
    refused(&mut sim, alice, r#"{"type":"ping"}"#, "rate_limited");
    // A second refills 50 tokens, and never more than the burst.
    sim.advance(secs(1));
    for _ in 0..50 {
        ok(&mut sim, alice, json!({"type": "ping"}));
    }
    sim.take(alice);
    refused(&mut sim, alice, r#"{"type":"ping"}"#, "rate_limited");
    // A full bucket again, and a fresh error window so the budget does not end the test.
    sim.advance(secs(11));
    let mut served = 0;
    while sim.send(alice, r#"{"type":"ping"}"#).is_ok() {
        served += 1;
    }
    assert_eq!(served, 100);
}

#[test]
fn rate_limited_frames_change_nothing() {
    let mut config = Config::default();
    config.rate_burst = 2;
    config.rate_per_sec = 1;
    let mut sim = sim_with(config);
    let alice = connect(&mut sim, "alice");
    ok(&mut sim, alice, json!({"type": "ping"}));
    ok(&mut sim, alice, json!({"type": "ping"}));
    sim.take(alice);
    refused(
        &mut sim,
        alice,
        r#"{"type":"join","room":"lobby"}"#,
        "rate_limited",
    );
    assert!(sim.hub().room("lobby").is_none());
    assert_eq!(sim.hub().session_rooms(alice).count(), 0);
}

#[test]
fn oversize_frames_take_rate_tokens_too() {
    let mut config = Config::default();
    config.rate_burst = 2;
    config.rate_per_sec = 1;
    config.max_frame_bytes = 64;
    let mut sim = sim_with(config);
    let alice = connect(&mut sim, "alice");
    let oversize = format!(r#"{{"type":"ping","pad":"{}"}}"#, "x".repeat(64));
    refused(&mut sim, alice, &oversize, "frame_too_large");
    refused(&mut sim, alice, &oversize, "frame_too_large");
    // The burst went on the oversize frames: a valid one is now over the rate.
    refused(&mut sim, alice, r#"{"type":"ping"}"#, "rate_limited");
}

#[test]
fn connect_at_max_sessions_is_server_full() {
    let mut config = Config::default();
    config.max_sessions = 2;
    let mut sim = sim_with(config);
    let alice = connect(&mut sim, "alice");
    let _bob = connect(&mut sim, "bob");
    let err = sim
        .try_connect(Identity::new("carol"), Liveness::Client)
        .unwrap_err();
    assert_eq!(err, ConnectError::ServerFull);
    assert_eq!(err.code(), ErrorCode::ServerFull);
    assert_eq!(err.code().as_str(), "server_full");
    assert_eq!(sim.hub().session_count(), 2);
    assert!(sim.hub().user_sessions("carol").is_empty());
    let [error, close] = switchboard_core::codec::encode_refusal(err.code(), "server full", 1013);
    let error: Value = serde_json::from_slice(&error).unwrap();
    let close: Value = serde_json::from_slice(&close).unwrap();
    assert_eq!(error["code"], "server_full");
    assert_eq!(
        close,
        json!({"type": "close", "code": 1013, "reason": "server_full"})
    );
    sim.disconnect(alice);
    connect(&mut sim, "carol");
}

#[test]
fn a_duplicate_sid_is_refused() {
    let mut hub = Hub::new(Config::default(), Arc::new(TestPolicy), 1).unwrap();
    let now = Timestamp::from_millis(0);
    hub.connect(now, Sid::new("same"), Identity::new("a"), Liveness::Client)
        .unwrap();
    let err = hub
        .connect(now, Sid::new("same"), Identity::new("b"), Liveness::Client)
        .unwrap_err();
    assert_eq!(err, ConnectError::DuplicateSid);
    assert_eq!(hub.session_count(), 1);
    assert!(hub.user_sessions("b").is_empty());
}

#[test]
fn ten_errors_within_ten_seconds_close_with_1008() {
    let mut sim = sim();
    let alice = connect(&mut sim, "alice");
    let bob = connect(&mut sim, "bob");
    join(&mut sim, alice, "lobby");
    join(&mut sim, bob, "lobby");
    sim.take(alice);
    for i in 0..9 {
        sim.advance(secs(1));
        refused(&mut sim, alice, "{", "invalid_json");
        assert!(sim.hub().contains(alice), "error {i}");
    }
    // Valid frames in between do not reset the budget.
    ok(&mut sim, alice, json!({"type": "ping"}));
    sim.take(alice);
    let err = sim.send(alice, "{").unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidJson));
    let got = sim.take(alice);
    assert_eq!(types(&got), ["error", "close"]);
    assert_eq!(got[0]["code"], "invalid_json");
    assert_eq!(
        got[1],
        json!({"type": "close", "code": 1008, "reason": "too_many_errors"})
    );
    assert_eq!(sim.close_reason(alice), Some(CloseReason::TooManyErrors));
    assert!(!sim.hub().contains(alice));
    assert!(!sim.hub().is_member(alice, "lobby"));
    assert_eq!(sim.take(bob)[0]["action"], "leave");
    // The key is dead now.
    let err = sim.send(alice, r#"{"type":"ping"}"#).unwrap_err();
    assert_eq!(err.code(), None);
    assert!(sim.take(alice).is_empty());
}

#[test]
fn errors_spread_over_more_than_the_window_do_not_close() {
    let mut sim = sim();
    let alice = connect(&mut sim, "alice");
    // Nine errors fit in any 10 s window here: one every 1.2 s.
    for _ in 0..60 {
        sim.advance(Duration::from_millis(1200));
        refused(&mut sim, alice, "{", "invalid_json");
        ok(&mut sim, alice, json!({"type": "pong"}));
    }
    assert!(sim.hub().contains(alice));
}

#[test]
fn the_error_window_is_ten_seconds_exactly() {
    for (last_after, closed) in [(secs(5), false), (secs(5) - MS, true)] {
        let mut sim = sim();
        let alice = connect(&mut sim, "alice");
        refused(&mut sim, alice, "{", "invalid_json");
        sim.advance(secs(5));
        for _ in 0..8 {
            refused(&mut sim, alice, "{", "invalid_json");
        }
        sim.advance(last_after);
        sim.send(alice, "{").unwrap_err();
        assert_eq!(
            sim.close_reason(alice).is_some(),
            closed,
            "10th error {last_after:?} after the 9th"
        );
    }
}

#[test]
fn a_smaller_error_budget_is_honoured() {
    let mut config = Config::default();
    config.max_errors = 3;
    config.error_window = secs(1);
    let mut sim = sim_with(config);
    let alice = connect(&mut sim, "alice");
    refused(&mut sim, alice, "x", "invalid_json");
    refused(&mut sim, alice, "x", "invalid_json");
    sim.advance(secs(1)); // both leave the window
    refused(&mut sim, alice, "x", "invalid_json");
    refused(&mut sim, alice, "x", "invalid_json");
    assert!(sim.hub().contains(alice));
    sim.send(alice, "x").unwrap_err();
    assert_eq!(sim.close_reason(alice), Some(CloseReason::TooManyErrors));
}

// ---- policy ---------------------------------------------------------------

#[test]
fn a_join_the_policy_refuses_is_forbidden_and_changes_nothing() {
    let mut sim = sim();
    let alice = connect(&mut sim, "alice");
    let bob = connect(&mut sim, "bob");
    let e = refused(
        &mut sim,
        alice,
        r#"{"type":"join","room":"secret_plans","id":1}"#,
        "forbidden",
    );
    assert_eq!(
        (e["room"].clone(), e["id"].clone()),
        (json!("secret_plans"), json!(1))
    );
    assert_eq!(sim.hub().room_count(), 0);
    join(&mut sim, alice, "private_alice");
    sim.take(alice);
    refused(
        &mut sim,
        bob,
        r#"{"type":"join","room":"private_alice"}"#,
        "forbidden",
    );
    assert!(!sim.hub().is_member(bob, "private_alice"));
    assert!(sim.take(alice).is_empty(), "no presence for a refused join");
    // Recovery does not bypass the policy.
    let ep = epoch(&sim, "private_alice");
    let frame = json!({"type": "join", "room": "private_alice", "since": {"seq": 0, "epoch": ep}});
    refused(&mut sim, bob, &frame.to_string(), "forbidden");
}

#[test]
fn a_client_publish_to_a_server_only_room_is_forbidden() {
    let mut sim = sim();
    let alice = connect(&mut sim, "alice");
    let bob = connect(&mut sim, "bob");
    join(&mut sim, alice, "news_feed");
    join(&mut sim, bob, "news_feed");
    sim.take(alice);
    let e = refused(
        &mut sim,
        alice,
        r#"{"type":"publish","room":"news_feed","data":1,"id":1}"#,
        "forbidden",
    );
    assert_eq!(e["room"], "news_feed");
    assert_eq!(seq(&sim, "news_feed"), 0);
    assert!(sim.take(bob).is_empty());
    // A non-member hears forbidden too (not not_joined), and no room appears.
    let carol = connect(&mut sim, "carol");
    refused(
        &mut sim,
        carol,
        r#"{"type":"publish","room":"news_other","data":1}"#,
        "forbidden",
    );
    assert!(sim.hub().room("news_other").is_none());
}

#[test]
fn a_non_member_publish_to_a_members_room_is_not_joined() {
    let mut sim = sim();
    let alice = connect(&mut sim, "alice");
    let bob = connect(&mut sim, "bob");
    join(&mut sim, bob, "lobby");
    let e = refused(
        &mut sim,
        alice,
        r#"{"type":"publish","room":"lobby","data":1,"id":"x"}"#,
        "not_joined",
    );
    assert_eq!(e["room"], "lobby");
    assert_eq!(e["id"], "x");
    assert_eq!(seq(&sim, "lobby"), 0);
    assert!(sim.take(bob).is_empty());
    refused(
        &mut sim,
        alice,
        r#"{"type":"publish","room":"empty","data":1}"#,
        "not_joined",
    );
    assert!(sim.hub().room("empty").is_none());
}

#[test]
fn anyone_may_publish_where_the_policy_says_so() {
    let mut sim = sim();
    let alice = connect(&mut sim, "alice");
    let bob = connect(&mut sim, "bob");
    join(&mut sim, bob, "open_board");
    ok(
        &mut sim,
        alice,
        json!({"type": "publish", "room": "open_board", "data": "from outside", "id": 1}),
    );
    assert_eq!(
        sim.take(alice),
        vec![json!({"type": "ack", "id": 1})],
        "not a member: no echo"
    );
    let got = sim.take(bob);
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0]["from"],
        json!({"sid": sid(&sim, alice), "user": "alice"})
    );
    assert_eq!(got[0]["seq"], 1);
    assert!(!sim.hub().is_member(alice, "open_board"));
    // To a room nobody is in: created, kept for its history.
    ok(
        &mut sim,
        alice,
        json!({"type": "publish", "room": "open_empty", "data": 1}),
    );
    assert_eq!(seq(&sim, "open_empty"), 1);
    assert_eq!(sim.hub().room("open_empty").unwrap().sessions, 0);
}

// ---- codes from decoding ---------------------------------------------------

#[test]
fn invalid_room_names_are_refused_in_every_frame_type() {
    let mut config = Config::default();
    config.max_errors = 1000;
    let mut sim = sim_with(config);
    let alice = connect(&mut sim, "alice");
    let too_long = "r".repeat(129);
    for name in [
        "",
        "a b",
        "é",
        "a\u{0}b",
        "a,b",
        "#x",
        "*",
        too_long.as_str(),
    ] {
        for frame in [
            json!({"type": "join", "room": name}),
            json!({"type": "leave", "room": name}),
            json!({"type": "publish", "room": name, "data": 1}),
            json!({"type": "presence", "room": name}),
        ] {
            refused(&mut sim, alice, &frame.to_string(), "invalid_room");
        }
    }
    assert_eq!(sim.hub().room_count(), 0);
    // The edges of the rules are accepted.
    let longest = "r".repeat(128);
    for name in ["A-z_0.9:x/y", "a", longest.as_str(), "../.."] {
        join(&mut sim, alice, name);
    }
}

#[test]
fn unknown_types_are_unknown_type() {
    let mut sim = sim();
    let alice = connect(&mut sim, "alice");
    for ty in ["subscribe", "JOIN", "", "welcome", "message", "ack"] {
        let frame = json!({"type": ty, "room": "lobby", "id": ty});
        let e = refused(&mut sim, alice, &frame.to_string(), "unknown_type");
        assert_eq!(e["id"], ty);
    }
    assert_eq!(sim.hub().room_count(), 0);
}

#[test]
fn text_that_is_not_a_json_object_is_invalid_json() {
    let mut sim = sim();
    let alice = connect(&mut sim, "alice");
    for frame in [
        "",
        "hello",
        "[]",
        "null",
        "42",
        r#""ping""#,
        r#"{"type":"ping""#,
    ] {
        refused(&mut sim, alice, frame, "invalid_json");
    }
    let err = sim.send_bytes(alice, b"\xff\xfe").unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidJson));
}

#[test]
fn missing_or_mistyped_fields_are_invalid_frame() {
    let mut sim = sim();
    let alice = connect(&mut sim, "alice");
    for frame in [
        r#"{}"#,
        r#"{"type":7}"#,
        r#"{"type":"join"}"#,
        r#"{"type":"publish","room":"lobby"}"#,
        r#"{"type":"direct","data":1}"#,
        r#"{"type":"direct","to":{"user":"bob"}}"#,
        r#"{"type":"leave"}"#,
        r#"{"type":"presence"}"#,
    ] {
        refused(&mut sim, alice, frame, "invalid_frame");
    }
}

#[test]
fn unknown_fields_are_ignored() {
    let mut sim = sim();
    let alice = connect(&mut sim, "alice");
    ok(
        &mut sim,
        alice,
        json!({"type": "join", "room": "lobby", "v2": {"x": [1]}, "id": 1}),
    );
    assert_eq!(types(&sim.take(alice)), ["joined", "ack"]);
    ok(
        &mut sim,
        alice,
        json!({"type": "direct", "to": {"user": "alice", "node": 3}, "data": 1}),
    );
    assert_eq!(types(&sim.take(alice)), ["direct"]);
}

#[test]
fn every_error_code_and_close_reason_has_its_wire_name() {
    let codes: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
    assert_eq!(
        codes,
        [
            "invalid_json",
            "invalid_frame",
            "unknown_type",
            "frame_too_large",
            "invalid_room",
            "not_joined",
            "forbidden",
            "too_many_rooms",
            "rate_limited",
            "unknown_target",
            "server_full",
            "slow_consumer",
            "heartbeat_timeout",
            "unavailable",
        ]
    );
    for (i, code) in ErrorCode::ALL.iter().enumerate() {
        assert_eq!(code.index(), i);
        assert_eq!(serde_json::to_value(code).unwrap(), code.as_str());
    }
    let closes: Vec<(&str, u16)> = CloseReason::ALL
        .iter()
        .map(|r| (r.as_str(), r.code()))
        .collect();
    assert_eq!(
        closes,
        [
            ("normal", 1000),
            ("going_away", 1001),
            ("disconnected", 1008),
            ("too_many_errors", 1008),
            ("heartbeat_timeout", 1001),
            ("slow_consumer", 1013),
            ("idle", 1001),
            ("frame_too_large", 1009),
            ("internal_error", 1011),
            ("protocol_error", 1002),
            ("invalid_utf8", 1007),
            ("token_expired", 1008),
        ]
    );
}

#[test]
fn a_slow_consumer_closed_by_the_runtime_gets_close_1013_and_can_recover() {
    let mut sim = sim();
    let (alice, _) = room_with_messages(&mut sim, "lobby", 2);
    let slow = connect(&mut sim, "bob");
    join(&mut sim, slow, "lobby");
    let now = sim.now();
    assert!(sim.hub_mut().close(now, slow, CloseReason::SlowConsumer));
    sim.pump();
    assert_eq!(
        sim.take(slow),
        vec![json!({"type": "close", "code": 1013, "reason": "slow_consumer"})]
    );
    assert_eq!(sim.close_reason(slow), Some(CloseReason::SlowConsumer));
    let now = sim.now();
    assert!(!sim.hub_mut().close(now, slow, CloseReason::SlowConsumer));
    publish(&mut sim, alice, "lobby", json!(3));
    let ep = epoch(&sim, "lobby");
    let back = connect(&mut sim, "bob");
    ok(
        &mut sim,
        back,
        json!({"type": "join", "room": "lobby", "since": {"seq": 2, "epoch": ep}}),
    );
    let got = sim.take(back);
    assert_eq!(types(&got), ["message", "joined"]);
    assert_eq!(got[1]["recovered"], true);
}

// ---- memory ---------------------------------------------------------------

#[test]
fn a_room_with_no_members_and_no_history_is_freed() {
    let mut sim = sim();
    let alice = connect(&mut sim, "alice");
    let bob = connect(&mut sim, "bob");
    join(&mut sim, alice, "lobby"); // never published to: no history
    join(&mut sim, bob, "lobby");
    assert_eq!(sim.hub().room_count(), 1);
    ok(&mut sim, alice, json!({"type": "leave", "room": "lobby"}));
    assert_eq!(sim.hub().room_count(), 1, "bob is still there");
    sim.disconnect(bob);
    assert_eq!(sim.hub().room_count(), 0);
    assert!(sim.hub().room("lobby").is_none());

    join(&mut sim, alice, "nohist_room");
    publish(&mut sim, alice, "nohist_room", json!(1));
    ok(
        &mut sim,
        alice,
        json!({"type": "leave", "room": "nohist_room"}),
    );
    assert_eq!(sim.hub().room_count(), 0, "history 0: nothing to keep");
    let now = sim.now();
    sim.hub_mut()
        .publish(now, &room("nohist_other"), None, &raw("1"))
        .unwrap();
    assert_eq!(sim.hub().room_count(), 0);
}

#[test]
fn a_room_with_history_is_kept_until_its_ttl_then_freed() {
    let mut sim = sim();
    let (alice, _) = room_with_messages(&mut sim, "lobby", 3);
    sim.advance(secs(7));
    ok(&mut sim, alice, json!({"type": "leave", "room": "lobby"}));
    let left = sim.now();
    assert_eq!(sim.hub().room_count(), 1);
    assert_eq!(sim.hub().timer_count(), 2, "alice's timer and the room's");
    // Keep alice alive meanwhile so only the room's timer matters.
    while sim.now() + INTERVAL < left + DEFAULT_TTL {
        sim.advance(INTERVAL - secs(1));
        ok(&mut sim, alice, json!({"type": "pong"}));
    }
    sim.advance((left + DEFAULT_TTL).saturating_since(sim.now()) - MS);
    assert_eq!(sim.hub().room("lobby").unwrap().seq, 3);
    sim.advance(MS);
    assert!(sim.hub().room("lobby").is_none());
    assert_eq!(sim.hub().room_count(), 0);
}

#[test]
fn a_member_coming_back_keeps_the_room_past_its_ttl() {
    let mut sim = sim();
    let (alice, _) = room_with_messages(&mut sim, "ttl_room", 2);
    ok(
        &mut sim,
        alice,
        json!({"type": "leave", "room": "ttl_room"}),
    );
    sim.advance(secs(5));
    join(&mut sim, alice, "ttl_room");
    sim.advance(secs(20));
    assert_eq!(seq(&sim, "ttl_room"), 2, "a room with members is kept");
    ok(
        &mut sim,
        alice,
        json!({"type": "leave", "room": "ttl_room"}),
    );
    sim.advance(TTL - MS);
    assert!(sim.hub().room("ttl_room").is_some(), "the ttl restarts");
    sim.advance(MS);
    assert!(sim.hub().room("ttl_room").is_none());
}

#[test]
fn a_server_publish_to_an_empty_room_restarts_its_ttl() {
    let mut sim = sim();
    let (alice, _) = room_with_messages(&mut sim, "ttl_room", 1);
    ok(
        &mut sim,
        alice,
        json!({"type": "leave", "room": "ttl_room"}),
    );
    sim.advance(secs(4));
    let now = sim.now();
    sim.hub_mut()
        .publish(now, &room("ttl_room"), None, &raw("2"))
        .unwrap();
    // Kept for a full ttl after the last publish, and not longer.
    sim.advance(TTL - MS);
    assert_eq!(seq(&sim, "ttl_room"), 2);
    sim.advance(MS);
    assert!(
        sim.hub().room("ttl_room").is_none(),
        "freed a ttl after the last publish"
    );
}

#[test]
fn memory_is_released_when_sessions_go() {
    let mut sim = sim();
    let mut keys = Vec::new();
    for i in 0..40 {
        let key = connect(&mut sim, &format!("user{}", i % 10));
        for r in 0..3 {
            join(&mut sim, key, &format!("nohist_{}", (i + r) % 7));
            join(&mut sim, key, &format!("quiet_{}", (i + r) % 5));
        }
        publish(&mut sim, key, &format!("nohist_{}", i % 7), json!(i));
        keys.push(key);
    }
    assert_eq!(sim.hub().session_count(), 40);
    assert_eq!(sim.hub().room_count(), 12);
    assert!(sim.hub().timer_count() <= 40);
    for (i, key) in keys.iter().enumerate() {
        match i % 3 {
            0 => sim.disconnect(*key),
            1 => {
                let now = sim.now();
                sim.hub_mut().close(now, *key, CloseReason::Normal);
                sim.pump();
            }
            _ => {} // left to the heartbeat
        }
    }
    let now = sim.now();
    let gone = sim.hub_mut().close_all(now, CloseReason::GoingAway);
    sim.pump();
    assert_eq!(gone, 13);
    assert_eq!(sim.hub().session_count(), 0);
    assert!(sim.hub().user_sessions("user1").is_empty());
    assert_eq!(sim.hub().session_by_sid(&sid_of(1)), None);
    assert_eq!(sim.hub().room_count(), 0, "no history kept: nothing left");
    // Timers of closed sessions are dropped when they come due.
    sim.advance(INTERVAL + TIMEOUT);
    assert_eq!(sim.hub().timer_count(), 0);
    assert_eq!(sim.hub().poll_timeout(), None);
}

fn sid_of(n: u64) -> String {
    format!("s{n}")
}

#[test]
fn rooms_with_history_are_released_after_their_ttl_when_everyone_left() {
    let mut sim = sim();
    for i in 0..20 {
        let key = connect(&mut sim, &format!("u{i}"));
        join(&mut sim, key, &format!("room{}", i % 4));
        publish(&mut sim, key, &format!("room{}", i % 4), json!(i));
    }
    assert_eq!(sim.hub().room_count(), 4);
    sim.advance(INTERVAL + TIMEOUT); // every session times out
    assert_eq!(sim.hub().session_count(), 0);
    assert_eq!(sim.hub().room_count(), 4, "history outlives the members");
    sim.advance(DEFAULT_TTL);
    assert_eq!(sim.hub().room_count(), 0);
    assert_eq!(sim.hub().timer_count(), 0);
}

#[test]
fn the_timer_queue_stays_bounded_under_activity() {
    let mut sim = sim();
    let keys: Vec<SessionKey> = (0..20)
        .map(|i| connect(&mut sim, &format!("u{i}")))
        .collect();
    for key in &keys {
        join(&mut sim, *key, "lobby");
    }
    for step in 0..500u64 {
        sim.advance(Duration::from_millis(700));
        let key = keys[(step % 20) as usize];
        ok(&mut sim, key, json!({"type": "pong"}));
        if step % 7 == 0 {
            let now = sim.now();
            sim.hub_mut().detach(now, key);
            sim.hub_mut().attach(now, key);
        }
        assert!(
            sim.hub().timer_count() <= 2 * sim.hub().session_count() + sim.hub().room_count(),
            "step {step}: {} timers",
            sim.hub().timer_count()
        );
    }
    assert_eq!(sim.hub().session_count(), 20, "every session kept alive");
}

#[test]
fn disconnect_user_closes_every_tab() {
    let mut sim = sim();
    let tab1 = connect(&mut sim, "alice");
    let tab2 = connect(&mut sim, "alice");
    let bob = connect(&mut sim, "bob");
    join(&mut sim, tab1, "lobby");
    join(&mut sim, tab2, "lobby");
    join(&mut sim, bob, "lobby");
    sim.take(tab1);
    sim.take(tab2);
    let now = sim.now();
    assert_eq!(sim.hub_mut().disconnect_user(now, "alice"), 2);
    sim.pump();
    for tab in [tab1, tab2] {
        assert_eq!(
            sim.take(tab),
            vec![json!({"type": "close", "code": 1008, "reason": "disconnected"})]
        );
        assert_eq!(sim.close_reason(tab), Some(CloseReason::Disconnected));
        assert!(!sim.hub().contains(tab));
    }
    assert!(sim.hub().user_sessions("alice").is_empty());
    assert_eq!(
        sim.take(bob),
        vec![json!({
            "type": "presence", "room": "lobby", "action": "leave", "user": "alice", "count": 1,
        })],
        "one leave for the user, not one per tab"
    );
    assert!(sim.hub().contains(bob));
    assert_eq!(sim.hub().room("lobby").unwrap().sessions, 1);
    let now = sim.now();
    assert_eq!(sim.hub_mut().disconnect_user(now, "alice"), 0);
    assert_eq!(sim.hub_mut().disconnect_user(now, "nobody"), 0);
}

#[test]
fn a_transport_close_frees_the_session_without_output_to_it() {
    let mut sim = sim();
    let alice = connect(&mut sim, "alice");
    join(&mut sim, alice, "lobby");
    sim.disconnect(alice);
    assert!(sim.take(alice).is_empty());
    assert_eq!(sim.close_reason(alice), None, "no Output::Close either");
    assert!(!sim.hub().contains(alice));
    assert_eq!(sim.hub().room_count(), 0);
    let now = sim.now();
    assert!(!sim.hub_mut().handle_close(now, alice), "already gone");
}

#[test]
fn a_bad_frame_from_one_session_never_affects_another() {
    let mut sim = sim();
    let alice = connect(&mut sim, "alice");
    let bob = connect(&mut sim, "bob");
    let mallory = connect(&mut sim, "mallory");
    for key in [alice, bob, mallory] {
        join(&mut sim, key, "lobby");
    }
    publish(&mut sim, alice, "lobby", json!("before"));
    for key in [alice, bob, mallory] {
        sim.take(key);
    }
    let before = sim.hub().room("lobby").unwrap();
    let bad = [
        "{",
        r#"{"type":"leave","room":"lobby","room":"lobby"}"#,
        r#"{"type":"publish","room":"lobby","data":1,"echo":"no"}"#,
        r#"{"type":"publish","room":"news","data":1}"#,
        r#"{"type":"direct","to":{"user":"bob","sid":"s2"},"data":1}"#,
        r#"{"type":"join","room":"secret"}"#,
        r#"{"type":"leave","room":"elsewhere"}"#,
        r#"{"type":"explode"}"#,
    ];
    for frame in bad {
        sim.send(mallory, frame).unwrap_err();
        assert_eq!(types(&sim.take(mallory)), ["error"], "{frame}");
        assert!(sim.take(alice).is_empty(), "{frame}");
        assert!(sim.take(bob).is_empty(), "{frame}");
        assert_eq!(sim.hub().room("lobby").unwrap(), before, "{frame}");
    }
    // Mallory spends its budget and is closed; the others carry on.
    sim.send(mallory, "{").unwrap_err();
    sim.send(mallory, "{").unwrap_err();
    assert_eq!(sim.close_reason(mallory), Some(CloseReason::TooManyErrors));
    assert_eq!(sim.take(alice)[0]["action"], "leave");
    sim.take(bob);
    publish(&mut sim, alice, "lobby", json!("after"));
    assert_eq!(sim.take(bob)[0]["seq"], 2);
    assert!(sim.hub().contains(alice) && sim.hub().contains(bob));
}

#[test]
fn stale_session_keys_are_harmless() {
    let mut sim = sim();
    let alice = connect(&mut sim, "alice");
    sim.disconnect(alice);
    let err = sim.send(alice, r#"{"type":"ping"}"#).unwrap_err();
    assert_eq!(err.code(), None);
    let now = sim.now();
    sim.hub_mut().attach(now, alice);
    sim.hub_mut().detach(now, alice);
    assert!(!sim.hub_mut().close(now, alice, CloseReason::Normal));
    sim.pump();
    assert_eq!(sim.hub().session_count(), 0);
    assert_eq!(sim.hub().session_rooms(alice).count(), 0);
    // A new session never reuses the old key.
    let bob = connect(&mut sim, "bob");
    assert_ne!(alice, bob);
}
