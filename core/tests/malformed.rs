//! Malformed-input regression file (after str0m's
//! `malformed-packet-injection.rs`): a table of nasty byte strings, each fed
//! to a session of a populated hub, asserting that nothing panics, that the
//! session gets exactly one `error` with the right code (and the frame's `id`
//! when one could be read), that nothing else changed (rooms, seqs, history,
//! memberships, other sessions' inboxes), and that the session stays open
//! until its error budget runs out.
//!
//! When a new input breaks the hub, add it to [`cases`].

use std::sync::Arc;

use bytes::Bytes;
use serde_json::{json, Value};
use switchboard_core::sim::Sim;
use switchboard_core::{
    CloseReason, Config, ErrorCode, Identity, Policy, PublishRule, RawValue, RoomInfo, RoomName,
    SessionKey, Target,
};

// ---- the hub under attack ----------------------------------------------------

/// `secret*` rooms refuse joins, `news*` rooms are server-only, and direct
/// messages to user `boss` are refused; everything else is open.
struct Rules;

impl Policy for Rules {
    fn may_join(&self, _who: &Identity, room: &RoomName) -> bool {
        !room.as_str().starts_with("secret")
    }

    fn publish_rule(&self, _who: &Identity, room: &RoomName) -> PublishRule {
        if room.as_str().starts_with("news") {
            PublishRule::ServerOnly
        } else {
            PublishRule::Members
        }
    }

    fn may_direct(&self, _who: &Identity, to: &Target<'_>) -> bool {
        !matches!(to, Target::User(u) if u == "boss")
    }
}

/// Rooms the fixture creates, whose state must not move.
const ROOMS: [&str; 5] = ["lobby", "mall", "side", "archive", "news"];

struct Fixture {
    sim: Sim,
    mallory: SessionKey,
    /// Everyone but mallory.
    others: Vec<SessionKey>,
}

/// A hub with some life in it: three sessions in `lobby` with history,
/// mallory alone in `mall`, carol in `side`, a memberless `archive` that keeps
/// history, a `news` room, and a second tab of alice.
fn fixture(config: Config) -> Fixture {
    let mut sim = Sim::new(config, Arc::new(Rules));
    let alice = sim.connect("alice");
    let bob = sim.connect("bob");
    let carol = sim.connect("carol");
    let mallory = sim.connect("mallory");
    let alice2 = sim.connect("alice");
    let boss = sim.connect("boss");
    for key in [alice, bob, mallory] {
        send_ok(&mut sim, key, r#"{"type":"join","room":"lobby"}"#);
    }
    send_ok(&mut sim, mallory, r#"{"type":"join","room":"mall"}"#);
    send_ok(&mut sim, mallory, r#"{"type":"join","room":"news"}"#);
    send_ok(
        &mut sim,
        carol,
        r#"{"type":"join","room":"side","presence":false}"#,
    );
    send_ok(&mut sim, alice2, r#"{"type":"join","room":"side"}"#);
    send_ok(
        &mut sim,
        alice,
        r#"{"type":"publish","room":"lobby","data":{"n":1}}"#,
    );
    send_ok(
        &mut sim,
        bob,
        r#"{"type":"publish","room":"lobby","data":"two","event":"e"}"#,
    );
    send_ok(
        &mut sim,
        mallory,
        r#"{"type":"publish","room":"mall","data":0}"#,
    );
    let now = sim.now();
    for name in ["lobby", "archive", "news"] {
        let room = RoomName::new(name).unwrap();
        let data = RawValue::from_string("[3]".to_owned()).unwrap();
        sim.hub_mut().publish(now, &room, None, &data).unwrap();
    }
    sim.pump();
    let others = vec![alice, bob, carol, alice2, boss];
    for key in others.iter().chain([&mallory]) {
        sim.take(*key);
    }
    let fixture = Fixture {
        sim,
        mallory,
        others,
    };
    assert_eq!(fixture.sim.hub().room("lobby").unwrap().seq, 3);
    assert_eq!(fixture.sim.hub().room_count(), ROOMS.len());
    fixture
}

fn send_ok(sim: &mut Sim, key: SessionKey, frame: &str) {
    if let Err(e) = sim.send(key, frame) {
        panic!("{frame}: {e}");
    }
}

/// Everything a refused frame must leave alone.
#[derive(Debug, PartialEq)]
struct Snapshot {
    sessions: usize,
    rooms: usize,
    timers: usize,
    room_state: Vec<(&'static str, Option<RoomInfo>, Vec<Bytes>)>,
    memberships: Vec<Vec<String>>,
    sids: Vec<Option<String>>,
    tabs: Vec<usize>,
}

fn snapshot(f: &Fixture) -> Snapshot {
    let hub = f.sim.hub();
    let keys: Vec<SessionKey> = f.others.iter().copied().chain([f.mallory]).collect();
    Snapshot {
        sessions: hub.session_count(),
        rooms: hub.room_count(),
        timers: hub.timer_count(),
        room_state: ROOMS
            .iter()
            .map(|name| {
                let history = hub.history(name, usize::MAX).cloned().collect();
                (*name, hub.room(name), history)
            })
            .collect(),
        memberships: keys
            .iter()
            .map(|k| {
                let mut rooms: Vec<String> = hub.session_rooms(*k).map(|r| r.to_string()).collect();
                rooms.sort();
                rooms
            })
            .collect(),
        sids: keys
            .iter()
            .map(|k| hub.sid(*k).map(|s| s.to_string()))
            .collect(),
        tabs: ["alice", "bob", "carol", "mallory", "boss"]
            .iter()
            .map(|u| hub.user_sessions(u).len())
            .collect(),
    }
}

// ---- the table -----------------------------------------------------------------

/// One nasty input and what the hub must answer.
struct Case {
    name: String,
    bytes: Vec<u8>,
    code: &'static str,
    /// The `id` the `error` frame must carry; `None`: no `id` field at all.
    id: Option<Value>,
}

fn case(name: impl Into<String>, bytes: impl Into<Vec<u8>>, code: &'static str) -> Case {
    Case {
        name: name.into(),
        bytes: bytes.into(),
        code,
        id: None,
    }
}

fn case_with_id(
    name: impl Into<String>,
    bytes: impl Into<Vec<u8>>,
    code: &'static str,
    id: Value,
) -> Case {
    Case {
        id: Some(id),
        ..case(name, bytes, code)
    }
}

/// The start of a JSON text, to name a case.
fn short(text: &str) -> String {
    if text.chars().count() <= 24 {
        return text.to_owned();
    }
    let start: String = text.chars().take(24).collect();
    format!("{start}… ({} bytes)", text.len())
}

/// `depth` nested arrays around `1`.
fn nested_arrays(depth: usize) -> String {
    format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
}

/// `depth` nested objects `{"a":…}` around `1`.
fn nested_objects(depth: usize) -> String {
    format!("{}1{}", r#"{"a":"#.repeat(depth), "}".repeat(depth))
}

/// Builds a frame object from raw JSON field texts, in order.
fn frame(fields: &[(&str, &str)]) -> String {
    let body: Vec<String> = fields.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
    format!("{{{}}}", body.join(","))
}

/// Values of every JSON kind that are not strings.
fn non_strings() -> Vec<String> {
    let mut v: Vec<String> = [
        "null",
        "true",
        "false",
        "0",
        "-1",
        "1.5",
        "1e999",
        "[]",
        "{}",
        r#"["x"]"#,
        r#"{"x":"y"}"#,
    ]
    .map(String::from)
    .to_vec();
    v.push(nested_arrays(500));
    v.push(nested_objects(500));
    v
}

/// Values of every JSON kind that are not booleans.
fn non_booleans() -> Vec<String> {
    [
        "null",
        "0",
        "1",
        r#""true""#,
        r#""false""#,
        r#""yes""#,
        "[]",
        "{}",
        "[true]",
    ]
    .map(String::from)
    .to_vec()
}

/// Room names that break the rules (as JSON string texts).
fn bad_room_names() -> Vec<String> {
    let mut v: Vec<String> = [
        r#""""#,
        r#"" ""#,
        r#""a b""#,
        r#""lobby ""#,
        r#"" lobby""#,
        r#""a\tb""#,
        r#""a\nb""#,
        r#""a\u0000b""#,
        r#""lobby\u0000""#,
        r#""é""#,
        r#""lobb\u00e9""#,
        r#""\ud83d\ude00""#,
        r#""room!""#,
        r#""a,b""#,
        r##""#x""##,
        r#""*""#,
        r#""a?b""#,
        r#""%2e%2e""#,
        r#""a\\b""#,
        r#""<script>""#,
        r#""lob\"by""#,
    ]
    .map(String::from)
    .to_vec();
    v.push(format!("\"{}\"", "r".repeat(129)));
    v.push(format!("\"{}\"", "r".repeat(60_000)));
    v.push(format!("\"é{}\"", "r".repeat(127)));
    v
}

/// Every malformed input, with the answer it must get.
fn cases() -> Vec<Case> {
    let mut cases = Vec::new();

    // -- not a JSON object, or not JSON at all: invalid_json, no id --
    let not_json: &[(&str, &[u8])] = &[
        ("empty", b""),
        ("space", b" "),
        ("whitespace", b"\n\t\r  \n"),
        ("nul byte", b"\0"),
        ("nul then frame", b"\0{\"type\":\"ping\"}"),
        ("frame then nul", b"{\"type\":\"ping\"}\0"),
        ("null", b"null"),
        ("true", b"true"),
        ("number", b"42"),
        ("huge number", b"1e999"),
        ("string", b"\"ping\""),
        ("empty array", b"[]"),
        ("array of frames", b"[{\"type\":\"ping\"}]"),
        ("array with spaces", b"  [ {\"type\":\"ping\"} ]"),
        ("open brace", b"{"),
        ("close brace", b"}"),
        ("double brace", b"{{}}"),
        ("key without value", b"{\"type\"}"),
        ("colon without value", b"{\"type\":}"),
        ("truncated", b"{\"type\":\"ping\""),
        ("truncated string", b"{\"type\":\"pi"),
        ("trailing comma", b"{\"type\":\"ping\",}"),
        ("extra brace", b"{\"type\":\"ping\"}}"),
        ("two frames", b"{\"type\":\"ping\"} {\"type\":\"ping\"}"),
        (
            "two frames, no space",
            b"{\"type\":\"ping\"}{\"type\":\"ping\"}",
        ),
        ("trailing garbage", b"{\"type\":\"ping\"}x"),
        ("single quotes", b"{'type':'ping'}"),
        ("bare key", b"{type:\"ping\"}"),
        ("comment", b"{\"type\":\"ping\"/* hi */}"),
        ("line comment", b"{\"type\":\"ping\"} // hi"),
        ("raw nul in string", b"{\"type\":\"ping\",\"x\":\"a\0b\"}"),
        (
            "raw newline in string",
            b"{\"type\":\"ping\",\"x\":\"a\nb\"}",
        ),
        ("raw tab in type", b"{\"type\":\"pi\tng\"}"),
        ("bad escape", b"{\"type\":\"ping\",\"x\":\"\\q\"}"),
        (
            "short unicode escape",
            b"{\"type\":\"ping\",\"x\":\"\\u12\"}",
        ),
        (
            "NaN data",
            b"{\"type\":\"publish\",\"room\":\"lobby\",\"data\":NaN}",
        ),
        (
            "Infinity data",
            b"{\"type\":\"publish\",\"room\":\"lobby\",\"data\":Infinity}",
        ),
        (
            "-Infinity data",
            b"{\"type\":\"publish\",\"room\":\"lobby\",\"data\":-Infinity}",
        ),
        (
            "nan data",
            b"{\"type\":\"publish\",\"room\":\"lobby\",\"data\":nan}",
        ),
        (
            "plus number",
            b"{\"type\":\"publish\",\"room\":\"lobby\",\"data\":+1}",
        ),
        (
            "leading zero",
            b"{\"type\":\"publish\",\"room\":\"lobby\",\"data\":01}",
        ),
        (
            "trailing dot",
            b"{\"type\":\"publish\",\"room\":\"lobby\",\"data\":1.}",
        ),
        (
            "leading dot",
            b"{\"type\":\"publish\",\"room\":\"lobby\",\"data\":.5}",
        ),
        (
            "hex number",
            b"{\"type\":\"publish\",\"room\":\"lobby\",\"data\":0x10}",
        ),
        (
            "bare exponent",
            b"{\"type\":\"publish\",\"room\":\"lobby\",\"data\":1e}",
        ),
        (
            "undefined",
            b"{\"type\":\"publish\",\"room\":\"lobby\",\"data\":undefined}",
        ),
        ("NaN id", b"{\"type\":\"ping\",\"id\":NaN}"),
        (
            "True capitalised",
            b"{\"type\":\"join\",\"room\":\"x\",\"presence\":True}",
        ),
        // Not UTF-8.
        ("lone 0xff", b"\xff"),
        ("invalid utf-8 pair", b"\xc3\x28"),
        (
            "utf-16le bom and text",
            b"\xff\xfe{\0\"\0t\0y\0p\0e\0\"\0:\0\"\0p\0i\0n\0g\0\"\0}\0",
        ),
        ("utf-8 bom", b"\xef\xbb\xbf{\"type\":\"ping\"}"),
        ("invalid utf-8 in type", b"{\"type\":\"pi\xffng\"}"),
        (
            "invalid utf-8 in room",
            b"{\"type\":\"join\",\"room\":\"lo\xc0\xafby\"}",
        ),
        ("invalid utf-8 key", b"{\"type\":\"ping\",\"\xfe\":1}"),
        (
            "invalid utf-8 in ignored field",
            b"{\"type\":\"ping\",\"x\":\"\xff\"}",
        ),
        (
            "invalid utf-8 in data",
            b"{\"type\":\"publish\",\"room\":\"lobby\",\"data\":\"\xed\xa0\x80\"}",
        ),
        (
            "overlong encoding",
            b"{\"type\":\"ping\",\"x\":\"\xc0\x80\"}",
        ),
        (
            "cut multi-byte char",
            b"{\"type\":\"ping\",\"x\":\"\xe2\x82\"}",
        ),
        ("cut at the end", b"{\"type\":\"ping\"}\xe2\x82"),
    ];
    for (name, bytes) in not_json {
        cases.push(case(*name, *bytes, "invalid_json"));
    }
    cases.push(case(
        "unclosed deep arrays",
        format!(r#"{{"type":"ping","x":{}"#, "[".repeat(30_000)),
        "invalid_json",
    ));
    cases.push(case(
        "unclosed deep objects",
        r#"{"a":"#.repeat(10_000),
        "invalid_json",
    ));
    cases.push(case(
        "deep arrays, no object",
        nested_arrays(20_000),
        "invalid_json",
    ));

    // -- `data` that serde_json-based recipients could not parse: refused,
    //    since it would be relayed verbatim to other sessions --
    let unrelayable = [
        "1e999".to_owned(),
        "-1e999".to_owned(),
        "1e400".to_owned(),
        r#"[1, 2e308]"#.to_owned(),
        r#""\ud800""#.to_owned(),
        r#""\udc00""#.to_owned(),
        r#""\ud800\u0041""#.to_owned(),
        r#"{"k":"x\udfff"}"#.to_owned(),
        r#"{"\ud800":1}"#.to_owned(),
        nested_arrays(200),
        nested_objects(200),
        nested_arrays(30_000),
    ];
    for data in &unrelayable {
        let short = short(data);
        cases.push(case_with_id(
            format!("publish data {short}"),
            frame(&[
                ("type", r#""publish""#),
                ("room", r#""lobby""#),
                ("data", data),
                ("id", "7"),
            ]),
            "invalid_json",
            json!(7),
        ));
        cases.push(case_with_id(
            format!("direct data {short}"),
            frame(&[
                ("type", r#""direct""#),
                ("to", r#"{"user":"alice"}"#),
                ("data", data),
                ("id", "8"),
            ]),
            "invalid_json",
            json!(8),
        ));
    }

    // -- missing or mistyped `type` --
    cases.push(case("empty object", "{}", "invalid_frame"));
    cases.push(case("spaced empty object", " { } ", "invalid_frame"));
    cases.push(case_with_id(
        "only an id",
        r#"{"id":"m1"}"#,
        "invalid_frame",
        json!("m1"),
    ));
    cases.push(case_with_id(
        "type in other case",
        r#"{"Type":"ping","id":"m1"}"#,
        "invalid_frame",
        json!("m1"),
    ));
    for v in non_strings() {
        cases.push(case_with_id(
            format!("type {}", short(&v)),
            frame(&[("type", &v), ("id", r#""m1""#)]),
            "invalid_frame",
            json!("m1"),
        ));
    }

    // -- unknown types --
    let long_type = format!("\"{}\"", "t".repeat(10_000));
    for ty in [
        r#""""#,
        r#"" ""#,
        r#""JOIN""#,
        r#""Join""#,
        r#"" join""#,
        r#""join ""#,
        r#""join\u0000""#,
        r#""jöin""#,
        r#""\ud83d\ude00""#,
        r#""subscribe""#,
        r#""welcome""#,
        r#""joined""#,
        r#""message""#,
        r#""error""#,
        r#""ack""#,
        r#""close""#,
        long_type.as_str(),
    ] {
        cases.push(case_with_id(
            format!("type {}", short(ty)),
            frame(&[("type", ty), ("room", r#""lobby""#), ("id", r#""m1""#)]),
            "unknown_type",
            json!("m1"),
        ));
    }

    // -- duplicate keys: refused before anything is read, so no id --
    for (name, text) in [
        ("duplicate type", r#"{"type":"ping","type":"ping"}"#),
        (
            "duplicate type, differing",
            r#"{"type":"ping","type":"join","room":"x"}"#,
        ),
        (
            "duplicate room",
            r#"{"type":"leave","room":"lobby","room":"mall"}"#,
        ),
        ("duplicate id", r#"{"type":"ping","id":1,"id":2}"#),
        (
            "duplicate data",
            r#"{"type":"publish","room":"lobby","data":1,"data":2}"#,
        ),
        (
            "duplicate echo",
            r#"{"type":"publish","room":"lobby","data":1,"echo":true,"echo":false}"#,
        ),
        (
            "duplicate to",
            r#"{"type":"direct","to":{"user":"bob"},"to":{"user":"carol"},"data":1}"#,
        ),
    ] {
        cases.push(case(name, text, "invalid_frame"));
    }
    cases.push(case_with_id(
        "duplicate key inside to",
        r#"{"type":"direct","to":{"user":"bob","user":"carol"},"data":1,"id":"m1"}"#,
        "invalid_frame",
        json!("m1"),
    ));
    cases.push(case_with_id(
        "duplicate key inside since",
        r#"{"type":"join","room":"z","since":{"seq":1,"seq":2,"epoch":"e"},"id":"m1"}"#,
        "invalid_frame",
        json!("m1"),
    ));

    // -- bad ids: the error cannot carry them --
    let long_id = format!("\"{}\"", "i".repeat(65));
    let huge_id = format!("\"{}\"", "i".repeat(30_000));
    let multibyte_id = format!("\"{}\"", "é".repeat(33)); // 66 bytes
    for id in [
        "null",
        "true",
        "false",
        "[]",
        "{}",
        "[1]",
        r#"{"a":1}"#,
        r#""\ud800""#,
        "1e999",
        "-1e400",
        long_id.as_str(),
        huge_id.as_str(),
        multibyte_id.as_str(),
        &nested_arrays(300),
    ] {
        cases.push(case(
            format!("id {}", short(id)),
            frame(&[("type", r#""ping""#), ("id", id)]),
            "invalid_frame",
        ));
    }

    // -- every field of every frame type, missing or of the wrong kind --
    let frames: Vec<(&str, Vec<(&str, String)>)> = vec![
        (
            "join",
            vec![
                ("room", r#""zone""#.into()),
                ("since", r#"{"seq":0,"epoch":"e"}"#.into()),
                ("presence", "true".into()),
            ],
        ),
        ("leave", vec![("room", r#""lobby""#.into())]),
        (
            "publish",
            vec![
                ("room", r#""lobby""#.into()),
                ("data", "1".into()),
                ("event", r#""e""#.into()),
                ("echo", "true".into()),
            ],
        ),
        (
            "direct",
            vec![
                ("to", r#"{"user":"alice"}"#.into()),
                ("data", "1".into()),
                ("event", r#""e""#.into()),
            ],
        ),
        ("presence", vec![("room", r#""lobby""#.into())]),
    ];
    let required = ["room", "data", "to"];
    for (ty, fields) in &frames {
        let build = |replace: &str, value: Option<&str>| {
            let mut parts: Vec<(&str, &str)> = vec![("type", ""), ("id", r#""m1""#)];
            parts[0].1 = match *ty {
                "join" => r#""join""#,
                "leave" => r#""leave""#,
                "publish" => r#""publish""#,
                "direct" => r#""direct""#,
                _ => r#""presence""#,
            };
            for (name, valid) in fields {
                if *name == replace {
                    if let Some(v) = value {
                        parts.push((name, v));
                    }
                } else {
                    parts.push((name, valid));
                }
            }
            frame(&parts)
        };
        for (field, _) in fields {
            if required.contains(field) {
                cases.push(case_with_id(
                    format!("{ty} without {field}"),
                    build(field, None),
                    "invalid_frame",
                    json!("m1"),
                ));
            }
            let wrong: Vec<String> = match *field {
                "room" | "event" => non_strings(),
                "presence" | "echo" => non_booleans(),
                "since" => {
                    let mut v: Vec<String> = [
                        "null",
                        "true",
                        "0",
                        r#""0""#,
                        r#""e""#,
                        "[]",
                        "{}",
                        r#"{"seq":1}"#,
                        r#"{"epoch":"e"}"#,
                        r#"{"seq":"1","epoch":"e"}"#,
                        r#"{"seq":-1,"epoch":"e"}"#,
                        r#"{"seq":1.5,"epoch":"e"}"#,
                        r#"{"seq":1e3,"epoch":"e"}"#,
                        r#"{"seq":18446744073709551616,"epoch":"e"}"#,
                        r#"{"seq":1e999,"epoch":"e"}"#,
                        r#"{"seq":null,"epoch":"e"}"#,
                        r#"{"seq":1,"epoch":5}"#,
                        r#"{"seq":1,"epoch":null}"#,
                        r#"{"seq":1,"epoch":["e"]}"#,
                        r#"{"seq":1,"epoch":"\ud800"}"#,
                        r#"[0,"e"]"#,
                    ]
                    .map(String::from)
                    .to_vec();
                    v.push(nested_arrays(500));
                    v.push(format!(r#"{{"seq":{},"epoch":"e"}}"#, nested_arrays(500)));
                    v
                }
                "to" => {
                    let mut v: Vec<String> = [
                        "null",
                        "true",
                        "0",
                        r#""alice""#,
                        "[]",
                        "{}",
                        r#"["alice"]"#,
                        r#"[null,"s1"]"#,
                        r#"{"user":null}"#,
                        r#"{"user":1}"#,
                        r#"{"user":true}"#,
                        r#"{"user":["alice"]}"#,
                        r#"{"user":{"name":"alice"}}"#,
                        r#"{"sid":null}"#,
                        r#"{"sid":7}"#,
                        r#"{"sid":{}}"#,
                        r#"{"user":"alice","sid":"s1"}"#,
                        r#"{"name":"alice"}"#,
                        r#"{"User":"alice"}"#,
                        r#"{"user":"\ud800"}"#,
                    ]
                    .map(String::from)
                    .to_vec();
                    v.push(nested_arrays(500));
                    v.push(format!(r#"{{"user":{}}}"#, nested_objects(500)));
                    v
                }
                // Any JSON is valid `data`; see the unrelayable cases above.
                _ => Vec::new(),
            };
            for value in &wrong {
                cases.push(case_with_id(
                    format!("{ty} {field} {}", short(value)),
                    build(field, Some(value)),
                    "invalid_frame",
                    json!("m1"),
                ));
            }
        }
        if fields.iter().any(|(f, _)| *f == "room") {
            for name in bad_room_names() {
                cases.push(case_with_id(
                    format!("{ty} room {}", short(&name)),
                    build("room", Some(&name)),
                    "invalid_room",
                    json!("m1"),
                ));
            }
        }
        if fields.iter().any(|(f, _)| *f == "event") {
            let long_event = format!("\"{}\"", "e".repeat(129));
            cases.push(case_with_id(
                format!("{ty} event too long"),
                build("event", Some(&long_event)),
                "invalid_frame",
                json!("m1"),
            ));
            cases.push(case_with_id(
                format!("{ty} event with a lone surrogate"),
                build("event", Some(r#""\udc00""#)),
                "invalid_frame",
                json!("m1"),
            ));
        }
    }

    // -- too large: refused unread, so no id --
    let mut padded = br#"{"type":"ping","id":1"#.to_vec();
    padded.resize(65_536, b' ');
    padded.push(b'}');
    cases.push(case(
        "one byte over max_frame_bytes",
        padded,
        "frame_too_large",
    ));
    cases.push(case(
        "a megabyte of spaces",
        vec![b' '; 1 << 20],
        "frame_too_large",
    ));
    cases.push(case(
        "a megabyte room name",
        format!(r#"{{"type":"join","room":"{}"}}"#, "r".repeat(1 << 20)),
        "frame_too_large",
    ));
    cases.push(case(
        "a huge publish",
        format!(
            r#"{{"type":"publish","room":"lobby","data":"{}"}}"#,
            "x".repeat(100_000)
        ),
        "frame_too_large",
    ));
    cases.push(case(
        "a huge garbage frame",
        vec![0xff; 70_000],
        "frame_too_large",
    ));

    // -- well-formed, but refused for mallory's state or the policy --
    for (name, text, code) in [
        (
            "publish to a room not joined",
            r#"{"type":"publish","room":"side","data":1,"id":"m1"}"#,
            "not_joined",
        ),
        (
            "publish to an unknown room",
            r#"{"type":"publish","room":"ghost_town","data":1,"id":"m1"}"#,
            "not_joined",
        ),
        (
            "leave a room not joined",
            r#"{"type":"leave","room":"side","id":"m1"}"#,
            "not_joined",
        ),
        (
            "leave an unknown room",
            r#"{"type":"leave","room":"ghost_town","id":"m1"}"#,
            "not_joined",
        ),
        (
            "presence of a room not joined",
            r#"{"type":"presence","room":"side","id":"m1"}"#,
            "not_joined",
        ),
        (
            "join a forbidden room",
            r#"{"type":"join","room":"secret_base","id":"m1"}"#,
            "forbidden",
        ),
        (
            "publish to a server-only room",
            r#"{"type":"publish","room":"news","data":1,"id":"m1"}"#,
            "forbidden",
        ),
        (
            "direct to a refused user",
            r#"{"type":"direct","to":{"user":"boss"},"data":1,"id":"m1"}"#,
            "forbidden",
        ),
        (
            "direct to nobody",
            r#"{"type":"direct","to":{"user":"ghost"},"data":1,"id":"m1"}"#,
            "unknown_target",
        ),
        (
            "direct to an empty user",
            r#"{"type":"direct","to":{"user":""},"data":1,"id":"m1"}"#,
            "unknown_target",
        ),
        (
            "direct to an unknown sid",
            r#"{"type":"direct","to":{"sid":"s999"},"data":1,"id":"m1"}"#,
            "unknown_target",
        ),
    ] {
        cases.push(case_with_id(name, text, code, json!("m1")));
    }

    cases
}

// ---- the checks -----------------------------------------------------------------

/// Feeds `case` to mallory until the error budget is spent, checking every
/// step.
fn check(case: &Case) {
    let mut f = fixture(Config::default());
    let max_errors = f.sim.hub().config().max_errors;
    let before = snapshot(&f);
    let name = &case.name;
    for attempt in 1..=max_errors {
        let result = f.sim.send_bytes(f.mallory, &case.bytes);
        let code = result.as_ref().err().and_then(|e| e.code());
        assert_eq!(
            code.map(ErrorCode::as_str),
            Some(case.code),
            "{name}: attempt {attempt}: {result:?}"
        );
        let got = f.sim.take(f.mallory);
        let error = got
            .first()
            .unwrap_or_else(|| panic!("{name}: no error frame"));
        assert_eq!(error["type"], "error", "{name}: {got:?}");
        assert_eq!(error["code"], case.code, "{name}");
        assert_eq!(error.get("id"), case.id.as_ref(), "{name}: the error's id");
        if let Some(room) = error.get("room") {
            assert!(
                RoomName::new(room.as_str().unwrap_or("")).is_ok(),
                "{name}: only valid room names are echoed"
            );
        }
        if attempt < max_errors {
            assert_eq!(got.len(), 1, "{name}: one error, nothing else: {got:?}");
            assert!(f.sim.hub().contains(f.mallory), "{name}: still open");
            assert_eq!(
                snapshot(&f),
                before,
                "{name}: attempt {attempt} changed state"
            );
            for key in &f.others {
                assert!(
                    f.sim.take(*key).is_empty(),
                    "{name}: another session heard of it"
                );
            }
        } else {
            assert_eq!(
                got.get(1),
                Some(&json!({"type": "close", "code": 1008, "reason": "too_many_errors"})),
                "{name}: closed when the budget is spent"
            );
            assert_eq!(got.len(), 2, "{name}: {got:?}");
            assert!(!f.sim.hub().contains(f.mallory));
            assert_eq!(
                f.sim.close_reason(f.mallory),
                Some(CloseReason::TooManyErrors)
            );
        }
    }
    // Only mallory's own departure is visible to the others.
    let after = f.sim.hub().room("lobby").unwrap();
    assert_eq!(after.seq, 3, "{name}");
    assert_eq!(after.sessions, 2, "{name}");
    assert_eq!(f.sim.hub().room("mall").unwrap().sessions, 0, "{name}");
    let err = f.sim.send_bytes(f.mallory, &case.bytes).unwrap_err();
    assert_eq!(err.code(), None, "{name}: the session is gone");
}

#[test]
fn every_malformed_input_is_refused_without_effect_until_the_budget_runs_out() {
    let cases = cases();
    assert!(cases.len() > 400, "{} cases", cases.len());
    let mut names = std::collections::BTreeSet::new();
    for case in &cases {
        assert!(
            names.insert(case.name.clone()),
            "duplicate case {}",
            case.name
        );
    }
    for case in &cases {
        check(case);
    }
}

/// A config under which no amount of refused frames closes a session and no
/// rate applies, for sweeps of many inputs through one session.
fn lenient() -> Config {
    let mut config = Config::default();
    config.max_errors = u32::MAX;
    config.rate_burst = u32::MAX;
    config.rate_per_sec = u32::MAX;
    config
}

/// Sends `bytes` from mallory; when refused, checks that nothing but the one
/// error frame happened. Either way every frame anyone received must parse.
fn send_and_check(f: &mut Fixture, bytes: &[u8], what: &str) -> Option<ErrorCode> {
    let before = snapshot(f);
    let result = f.sim.send_bytes(f.mallory, bytes);
    // `take` parses every frame as JSON: a frame the hub cannot encode panics here.
    let mine = f.sim.take(f.mallory);
    let theirs: Vec<Vec<Value>> = f.others.iter().map(|k| f.sim.take(*k)).collect();
    match result {
        Ok(()) => None,
        Err(e) => {
            let code = e.code().unwrap_or_else(|| panic!("{what}: session gone"));
            assert_eq!(mine.len(), 1, "{what}: {mine:?}");
            assert_eq!(mine[0]["code"], code.as_str(), "{what}");
            assert!(theirs.iter().all(Vec::is_empty), "{what}: {theirs:?}");
            assert_eq!(snapshot(f), before, "{what}");
            Some(code)
        }
    }
}

const VALID_FRAMES: [&str; 8] = [
    r#"{"type":"join","room":"lobby","since":{"seq":1,"epoch":"ep"},"presence":true,"id":1}"#,
    r#"{"type":"leave","room":"mall","id":"l"}"#,
    r#"{"type":"publish","room":"lobby","data":{"t":"é😀","n":[1,-2.5e3,null]},"event":"ev","echo":false,"id":2}"#,
    r#"{"type":"direct","to":{"user":"alice"},"data":"héllo","event":"dm"}"#,
    r#"{"type":"direct","to":{"sid":"s1"},"data":[true]}"#,
    r#"{"type":"presence","room":"lobby","id":"p"}"#,
    r#"{"type":"ping","id":-1}"#,
    r#"  {"type":"pong"}  "#,
];

#[test]
fn every_truncation_of_a_valid_frame_is_invalid_json() {
    for text in VALID_FRAMES {
        let mut f = fixture(lenient());
        let bytes = text.as_bytes();
        let end = text.trim_end().len();
        for cut in 0..end {
            let what = format!("{text} cut at {cut}");
            let code = send_and_check(&mut f, &bytes[..cut], &what);
            assert_eq!(code, Some(ErrorCode::InvalidJson), "{what}");
        }
        assert!(f.sim.hub().contains(f.mallory));
    }
}

#[test]
fn single_byte_corruptions_never_panic_and_change_nothing_when_refused() {
    const NASTY: [u8; 16] = [
        0x00, 0x7f, 0x80, 0xff, b'"', b'\\', b'{', b'}', b'[', b']', b',', b':', b' ', b'0', b'-',
        b'e',
    ];
    let mut refused = 0;
    for text in VALID_FRAMES {
        let mut f = fixture(lenient());
        for at in 0..text.len() {
            for byte in NASTY {
                let mut bytes = text.as_bytes().to_vec();
                bytes[at] = byte;
                let what = format!("{text} with byte {at} = {byte:#04x}");
                if send_and_check(&mut f, &bytes, &what).is_some() {
                    refused += 1;
                }
                assert!(f.sim.hub().contains(f.mallory), "{what}");
            }
        }
    }
    assert!(refused > 1000, "{refused}");
}

#[test]
fn deep_nesting_in_data_is_either_refused_or_parseable_by_every_recipient() {
    // Find where the hub starts refusing nested `data`, and check that
    // everything below that depth reaches other members as parseable JSON
    // (`take` panics otherwise), inside a long-poll array too.
    let mut f = fixture(lenient());
    let bob = f.others[1];
    let mut deepest_accepted = 0;
    for depth in 1..=200 {
        for data in [nested_arrays(depth), nested_objects(depth)] {
            let text = format!(r#"{{"type":"publish","room":"lobby","data":{data}}}"#);
            let what = format!("depth {depth}");
            if send_and_check(&mut f, text.as_bytes(), &what).is_none() {
                deepest_accepted = deepest_accepted.max(depth);
            }
        }
        let text = format!(
            r#"{{"type":"publish","room":"lobby","data":{}}}"#,
            nested_arrays(depth)
        );
        if f.sim.send(f.mallory, &text).is_ok() {
            let frames = f.sim.take_raw(bob);
            let message = frames.last().expect("bob is in the lobby");
            let batch = format!("[{}]", std::str::from_utf8(&message.frame).unwrap());
            assert!(
                serde_json::from_str::<Value>(&batch).is_ok(),
                "depth {depth}: a long-poll batch holding the message does not parse"
            );
        }
        for key in f.others.iter().chain([&f.mallory]) {
            f.sim.take(*key);
        }
    }
    assert!(
        (64..200).contains(&deepest_accepted),
        "deepest data accepted: {deepest_accepted}"
    );
}

#[test]
fn weird_but_valid_frames_are_accepted_and_answered_normally() {
    let deep_unknown = format!(r#"{{"type":"ping","id":1,"x":{}}}"#, nested_arrays(30_000));
    let deep_unknown_in_since = format!(
        r#"{{"type":"join","room":"mall","since":{{"seq":0,"epoch":"e","x":{}}},"id":1}}"#,
        nested_objects(10_000)
    );
    let deep_unknown_in_to = format!(
        r#"{{"type":"direct","to":{{"user":"alice","x":{}}},"data":1,"id":1}}"#,
        nested_arrays(10_000)
    );
    let longest_room = format!(r#"{{"type":"join","room":"{}","id":1}}"#, "r".repeat(128));
    let max_id = format!(r#"{{"type":"ping","id":"{}"}}"#, "é".repeat(32));
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        ("escaped type", r#"{"type":"pi\u006eg","id":1}"#.into(), vec!["pong", "ack"]),
        ("escaped room", r#"{"type":"presence","room":"lo\u0062by","id":1}"#.into(), vec!["presence", "ack"]),
        ("escaped slash in room", r#"{"type":"join","room":"a\/b","id":1}"#.into(), vec!["joined", "ack"]),
        ("surrounding whitespace", " \r\n\t{\"type\":\"ping\",\"id\":1} \n".into(), vec!["pong", "ack"]),
        ("whitespace everywhere", "{ \"type\" : \"ping\" , \"id\" : 1 }".into(), vec!["pong", "ack"]),
        ("deep unknown field", deep_unknown, vec!["pong", "ack"]),
        ("deep unknown field in since", deep_unknown_in_since, vec!["joined", "ack"]),
        ("deep unknown field in to", deep_unknown_in_to, vec!["ack"]),
        ("huge number in an unknown field", r#"{"type":"ping","id":1,"x":1e999}"#.into(), vec!["pong", "ack"]),
        ("lone surrogate in an unknown field", r#"{"type":"ping","id":1,"x":"\ud800"}"#.into(), vec!["pong", "ack"]),
        ("duplicate unknown keys", r#"{"type":"ping","id":1,"x":1,"x":2}"#.into(), vec!["pong", "ack"]),
        ("unknown key that looks like a field", r#"{"type":"ping","id":1,"Room":7}"#.into(), vec!["pong", "ack"]),
        ("null where a field is not read", r#"{"type":"ping","id":1,"room":null,"data":null}"#.into(), vec!["pong", "ack"]),
        ("nul escaped in data", r#"{"type":"publish","room":"lobby","data":"a\u0000b","id":1}"#.into(), vec!["message", "ack"]),
        ("surrogate pair in data", r#"{"type":"publish","room":"lobby","data":"\ud83d\ude00","id":1}"#.into(), vec!["message", "ack"]),
        ("big integer data", r#"{"type":"publish","room":"lobby","data":123456789012345678901234567890,"id":1}"#.into(), vec!["message", "ack"]),
        ("tiny float data", r#"{"type":"publish","room":"lobby","data":1e-400,"id":1}"#.into(), vec!["message", "ack"]),
        ("negative zero data", r#"{"type":"publish","room":"lobby","data":-0,"id":1}"#.into(), vec!["message", "ack"]),
        ("empty event", r#"{"type":"publish","room":"lobby","data":1,"event":"","id":1}"#.into(), vec!["message", "ack"]),
        ("longest room name", longest_room, vec!["joined", "ack"]),
        ("64-byte multibyte id", max_id, vec!["pong", "ack"]),
        ("big integer id", r#"{"type":"ping","id":123456789012345678901234567890}"#.into(), vec!["pong", "ack"]),
        ("negative float id", r#"{"type":"ping","id":-0.5e-3}"#.into(), vec!["pong", "ack"]),
        ("id of escapes", r#"{"type":"ping","id":"\u0000\n\""}"#.into(), vec!["pong", "ack"]),
        ("since far in the future", r#"{"type":"join","room":"lobby","since":{"seq":18446744073709551615,"epoch":"x"},"id":1}"#.into(), vec!["joined", "ack"]),
        ("since with an empty epoch", r#"{"type":"join","room":"lobby","since":{"seq":0,"epoch":""},"id":1}"#.into(), vec!["joined", "ack"]),
        ("direct to oneself by sid", r#"{"type":"direct","to":{"sid":"s4"},"data":1,"id":1}"#.into(), vec!["direct", "ack"]),
    ];
    for (name, text, expected) in cases {
        let mut f = fixture(Config::default());
        let result = f.sim.send(f.mallory, &text);
        assert!(result.is_ok(), "{name}: {result:?}");
        let got = f.sim.take(f.mallory);
        let types: Vec<&str> = got.iter().map(|v| v["type"].as_str().unwrap()).collect();
        assert_eq!(types, expected, "{name}: {got:?}");
        for key in &f.others {
            f.sim.take(*key); // parses: a frame no one can read would panic here
        }
        if expected.contains(&"joined") && text.contains("since") {
            assert_eq!(got[0]["recovered"], false, "{name}");
        }
    }
}

#[test]
fn a_flood_of_every_case_from_many_sessions_leaves_the_others_untouched() {
    // All sessions but the victims misbehave at once, interleaved; the
    // victims' state and inboxes must not move.
    let cases = cases();
    let mut f = fixture(Config::default());
    let victims = f.others.clone();
    let before: Vec<Option<RoomInfo>> = ROOMS.iter().map(|r| f.sim.hub().room(r)).collect();
    let attackers: Vec<SessionKey> = (0..cases.len().div_ceil(5))
        .map(|i| f.sim.connect(&format!("attacker{}", i % 7)))
        .collect();
    for (i, case) in cases.iter().enumerate() {
        let attacker = attackers[i / 5];
        let err = f.sim.send_bytes(attacker, &case.bytes).unwrap_err();
        assert_eq!(
            err.code().map(ErrorCode::as_str),
            Some(case.code),
            "{}",
            case.name
        );
    }
    for key in &victims {
        assert!(f.sim.take(*key).is_empty());
        assert!(f.sim.hub().contains(*key));
    }
    let after: Vec<Option<RoomInfo>> = ROOMS.iter().map(|r| f.sim.hub().room(r)).collect();
    assert_eq!(before, after);
    assert!(attackers.iter().all(|k| f.sim.hub().contains(*k)));
}
