//! Latest-value rooms (`RoomOptions::latest`), driven through the simulated
//! clock: history keeps the newest message per event, a late joiner gets the
//! room's state at once, `since` recovery replays what changed, a slow
//! subscriber's unread values are replaced by newer ones, and the
//! never-coalesced events (`job_completed`, `job_error`) all arrive.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use serde_json::{json, Value};
use switchboard_core::sim::Sim;
use switchboard_core::{
    Config, LatestValue, Policy, RawValue, RoomName, RoomOptions, SessionKey,
    DEFAULT_NEVER_COALESCED,
};

/// `progress*` rooms are latest-value rooms; `progress3*` keep at most 3
/// messages; `stock*` never coalesce `trade` instead of the defaults.
struct LatestPolicy;

impl Policy for LatestPolicy {
    fn room_options(&self, room: &RoomName) -> RoomOptions {
        let room = room.as_str();
        let mut options = RoomOptions::default();
        if room.starts_with("progress") {
            options = options.latest_value(LatestValue::default());
        }
        if room.starts_with("progress3") {
            options = options.history(3);
        }
        if room.starts_with("stock") {
            options = options.latest_value(LatestValue::never_coalescing(["trade"]));
        }
        options
    }
}

const ROOM: &str = "progress_job_1";

fn sim() -> Sim {
    Sim::new(Config::default(), Arc::new(LatestPolicy))
}

fn connect(sim: &mut Sim, user: &str) -> SessionKey {
    let key = sim.connect(user);
    assert_eq!(sim.take(key)[0]["type"], "welcome");
    key
}

fn send(sim: &mut Sim, key: SessionKey, frame: &Value) {
    let text = frame.to_string();
    if let Err(e) = sim.send(key, &text) {
        panic!("{text} was refused: {e}");
    }
}

/// A server publish of `data` with `event`; returns its seq.
fn publish(sim: &mut Sim, room: &str, event: Option<&str>, data: &Value) -> u64 {
    let name = RoomName::new(room).expect("a valid room");
    let raw = RawValue::from_string(data.to_string()).expect("JSON");
    let now = sim.now();
    let published = sim
        .hub_mut()
        .publish(now, &name, event, &raw)
        .expect("published");
    sim.pump();
    published.seq
}

/// Joins (with `since` if given); returns the frames up to and including `joined`.
fn join(sim: &mut Sim, key: SessionKey, room: &str, since: Option<(u64, &str)>) -> Vec<Value> {
    let mut frame = json!({"type": "join", "room": room, "presence": false});
    if let Some((seq, epoch)) = since {
        frame["since"] = json!({"seq": seq, "epoch": epoch});
    }
    send(sim, key, &frame);
    let got = sim.take(key);
    assert_eq!(got.last().expect("joined")["type"], "joined", "{got:?}");
    got
}

fn epoch(sim: &Sim, room: &str) -> String {
    sim.hub().room(room).expect("the room").epoch.to_string()
}

/// `(event, data)` of message frames.
fn values(frames: &[Value]) -> Vec<(Value, Value)> {
    frames
        .iter()
        .filter(|f| f["type"] == "message")
        .map(|f| (f["event"].clone(), f["data"].clone()))
        .collect()
}

fn seqs(frames: &[Value]) -> Vec<u64> {
    frames
        .iter()
        .filter(|f| f["type"] == "message")
        .map(|f| f["seq"].as_u64().expect("seq"))
        .collect()
}

/// The room's retained messages as `(seq, event, data)`.
fn history(sim: &Sim, room: &str) -> Vec<(u64, Value, Value)> {
    sim.hub()
        .history(room, usize::MAX)
        .map(|frame| {
            let f: Value = serde_json::from_slice(frame).expect("JSON");
            (
                f["seq"].as_u64().expect("seq"),
                f["event"].clone(),
                f["data"].clone(),
            )
        })
        .collect()
}

#[test]
fn history_keeps_the_newest_message_of_each_event_and_every_outcome() {
    let mut sim = sim();
    publish(&mut sim, ROOM, Some("progress"), &json!(10));
    publish(&mut sim, ROOM, Some("stage"), &json!("download"));
    publish(&mut sim, ROOM, Some("progress"), &json!(20));
    publish(&mut sim, ROOM, Some("job_error"), &json!("retrying"));
    publish(&mut sim, ROOM, None, &json!("no event"));
    publish(&mut sim, ROOM, Some("progress"), &json!(30));
    publish(&mut sim, ROOM, Some("job_completed"), &json!("ok"));
    publish(&mut sim, ROOM, Some("job_error"), &json!("again"));
    publish(&mut sim, ROOM, None, &json!("no event, newer"));
    assert_eq!(
        history(&sim, ROOM),
        vec![
            (2, json!("stage"), json!("download")),
            (4, json!("job_error"), json!("retrying")),
            (6, json!("progress"), json!(30)),
            (7, json!("job_completed"), json!("ok")),
            (8, json!("job_error"), json!("again")),
            (9, Value::Null, json!("no event, newer")),
        ]
    );
    assert_eq!(
        sim.hub().room(ROOM).expect("room").seq,
        9,
        "seq counts every message"
    );
}

#[test]
fn an_ordinary_room_keeps_every_message() {
    let mut sim = sim();
    for n in 0..3 {
        publish(&mut sim, "lobby", Some("progress"), &json!(n));
    }
    assert_eq!(history(&sim, "lobby").len(), 3);
}

#[test]
fn a_late_joiner_gets_the_latest_value_of_each_event_before_joined() {
    let mut sim = sim();
    publish(&mut sim, ROOM, Some("progress"), &json!(10));
    publish(&mut sim, ROOM, Some("stage"), &json!("upload"));
    publish(&mut sim, ROOM, Some("progress"), &json!(99));
    publish(
        &mut sim,
        ROOM,
        Some("job_completed"),
        &json!({"url": "/out"}),
    );
    let late = connect(&mut sim, "late");
    let got = join(&mut sim, late, ROOM, None);
    assert_eq!(
        values(&got),
        vec![
            (json!("stage"), json!("upload")),
            (json!("progress"), json!(99)),
            (json!("job_completed"), json!({"url": "/out"})),
        ]
    );
    assert_eq!(seqs(&got), vec![2, 3, 4]);
    let joined = got.last().expect("joined");
    assert_eq!(joined["seq"], 4);
    assert_eq!(joined["latest"], true, "{joined}");
    assert!(joined.get("recovered").is_none(), "no since, no recovered");

    let plain = connect(&mut sim, "plain");
    let got = join(&mut sim, plain, "lobby", None);
    assert!(
        got[0].get("latest").is_none(),
        "only latest-value rooms say so"
    );
}

#[test]
fn since_replays_what_changed_after_it_and_recovers() {
    let mut sim = sim();
    publish(&mut sim, ROOM, Some("progress"), &json!(10));
    publish(&mut sim, ROOM, Some("stage"), &json!("a"));
    let epoch = epoch(&sim, ROOM);
    // A client that saw up to seq 2, then missed 3..=6.
    publish(&mut sim, ROOM, Some("progress"), &json!(20));
    publish(&mut sim, ROOM, Some("job_error"), &json!("transient"));
    publish(&mut sim, ROOM, Some("progress"), &json!(30));
    publish(&mut sim, ROOM, Some("progress"), &json!(40));
    let back = connect(&mut sim, "back");
    let got = join(&mut sim, back, ROOM, Some((2, &epoch)));
    assert_eq!(
        values(&got),
        vec![
            (json!("job_error"), json!("transient")),
            (json!("progress"), json!(40)),
        ],
        "stage is unchanged since seq 2, so not replayed"
    );
    assert_eq!(seqs(&got), vec![4, 6], "gaps in seq are expected");
    assert_eq!(got.last().expect("joined")["recovered"], true);

    // Up to date: nothing to replay.
    let current = connect(&mut sim, "current");
    let got = join(&mut sim, current, ROOM, Some((6, &epoch)));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["recovered"], true);
}

#[test]
fn a_since_the_room_cannot_answer_gets_the_whole_state_and_recovered_false() {
    let mut sim = sim();
    publish(&mut sim, ROOM, Some("progress"), &json!(1));
    publish(&mut sim, ROOM, Some("stage"), &json!("x"));
    let epoch = epoch(&sim, ROOM);
    for since in [(1, "otherEp"), (9, epoch.as_str())] {
        let key = connect(&mut sim, "c");
        let got = join(&mut sim, key, ROOM, Some(since));
        assert_eq!(seqs(&got), vec![1, 2], "{since:?}");
        assert_eq!(got.last().expect("joined")["recovered"], false, "{since:?}");
    }
}

#[test]
fn the_history_bound_drops_the_oldest_and_then_since_below_it_is_not_recovered() {
    let room = "progress3_job";
    let mut sim = sim();
    for (n, event) in ["a", "b", "c", "d", "e"].into_iter().enumerate() {
        publish(&mut sim, room, Some(event), &json!(n));
    }
    // Bound 3: a (1) and b (2) were dropped although nothing replaced them.
    assert_eq!(
        history(&sim, room)
            .iter()
            .map(|(s, ..)| *s)
            .collect::<Vec<_>>(),
        vec![3, 4, 5]
    );
    let epoch = epoch(&sim, room);
    let key = connect(&mut sim, "c");
    let got = join(&mut sim, key, room, Some((1, &epoch)));
    assert_eq!(got.last().expect("joined")["recovered"], false, "b is lost");
    assert_eq!(seqs(&got), vec![3, 4, 5]);
    let got = join(&mut sim, key, room, Some((2, &epoch)));
    assert_eq!(got.last().expect("joined")["recovered"], true);
    assert_eq!(seqs(&got), vec![3, 4, 5]);
    // A coalesced entry is not a loss: replacing c's value keeps since 2 recoverable.
    publish(&mut sim, room, Some("c"), &json!("c2"));
    let got = join(&mut sim, key, room, Some((2, &epoch)));
    assert_eq!(got.last().expect("joined")["recovered"], true);
    assert_eq!(
        seqs(&got),
        vec![4, 5, 6],
        "the unread live c2 was replaced by its replay: each value once"
    );
}

#[test]
fn a_slow_subscribers_unread_values_are_replaced_by_the_newest_and_outcomes_all_stay() {
    let mut sim = sim();
    let slow = connect(&mut sim, "slow");
    join(&mut sim, slow, ROOM, None);
    // `slow` reads nothing while the job runs.
    for pct in 1..=100 {
        publish(&mut sim, ROOM, Some("progress"), &json!(pct));
        if pct == 50 {
            publish(&mut sim, ROOM, Some("job_error"), &json!("retry"));
        }
    }
    publish(&mut sim, ROOM, Some("job_completed"), &json!("done"));
    let got = sim.take(slow);
    assert_eq!(
        values(&got),
        vec![
            (json!("job_error"), json!("retry")),
            (json!("progress"), json!(100)),
            (json!("job_completed"), json!("done")),
        ]
    );
    assert_eq!(seqs(&got), vec![51, 101, 102], "in seq order");
    assert_eq!(sim.close_reason(slow), None);

    // A reader that keeps up gets every value.
    let fast = connect(&mut sim, "fast");
    join(&mut sim, fast, ROOM, None);
    for pct in 0..3 {
        publish(&mut sim, ROOM, Some("progress"), &json!(pct));
        assert_eq!(
            values(&sim.take(fast)),
            vec![(json!("progress"), json!(pct))]
        );
    }
}

#[test]
fn the_never_coalesced_events_are_part_of_the_option() {
    assert_eq!(DEFAULT_NEVER_COALESCED, ["job_completed", "job_error"]);
    let defaults = LatestValue::default();
    assert!(!defaults.coalesces(Some("job_completed")));
    assert!(!defaults.coalesces(Some("job_error")));
    assert!(defaults.coalesces(Some("progress")));
    assert!(defaults.coalesces(None));

    let mut sim = sim();
    for (event, data) in [("trade", 1), ("quote", 1), ("trade", 2), ("quote", 2)] {
        publish(&mut sim, "stock_acme", Some(event), &json!(data));
    }
    publish(&mut sim, "stock_acme", Some("job_completed"), &json!(1));
    publish(&mut sim, "stock_acme", Some("job_completed"), &json!(2));
    let kept: Vec<(Value, Value)> = history(&sim, "stock_acme")
        .into_iter()
        .map(|(_, e, d)| (e, d))
        .collect();
    assert_eq!(
        kept,
        vec![
            (json!("trade"), json!(1)),
            (json!("trade"), json!(2)),
            (json!("quote"), json!(2)),
            (json!("job_completed"), json!(2)),
        ]
    );
}

#[test]
fn an_empty_latest_value_room_forgets_its_state_at_the_history_ttl() {
    let mut sim = sim();
    publish(&mut sim, ROOM, Some("progress"), &json!(1));
    sim.advance(Duration::from_secs(301));
    assert_eq!(sim.hub().room_count(), 0);
    let key = connect(&mut sim, "c");
    let got = join(&mut sim, key, ROOM, None);
    assert_eq!(got.len(), 1, "a new room: nothing to replay");
}

/// One step of the property: a publish, the subscriber reading what is
/// queued, or the subscriber reconnecting with `since`.
#[derive(Debug, Clone)]
enum Step {
    Publish { event: usize, value: u32 },
    Read,
    Reconnect,
}

const EVENTS: [&str; 5] = ["progress", "stage", "eta", "job_completed", "job_error"];

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0..EVENTS.len(), any::<u32>()).prop_map(|(event, value)| Step::Publish { event, value }),
        2 => Just(Step::Read),
        1 => Just(Step::Reconnect),
    ]
}

proptest! {
    /// However publishes, reads and reconnects (with `since`) interleave, the
    /// subscriber sees seqs only ascending, converges on the room's newest
    /// value of each event, and sees every outcome exactly once.
    #[test]
    fn a_subscriber_converges_on_the_latest_value_of_each_event(
        steps in proptest::collection::vec(step(), 1..80),
    ) {
        let mut sim = sim();
        let mut sub = connect(&mut sim, "sub");
        join(&mut sim, sub, ROOM, None);
        let mut last_seen: BTreeMap<String, (u64, u32)> = BTreeMap::new();
        let mut outcomes_seen = Vec::new();
        let mut outcomes_published = Vec::new();
        let mut latest: BTreeMap<String, u32> = BTreeMap::new();
        let mut seen_seq = 0u64;
        let mut epoch_seen = String::new();
        let read = |frames: Vec<Value>,
                        last_seen: &mut BTreeMap<String, (u64, u32)>,
                        outcomes_seen: &mut Vec<u64>,
                        seen_seq: &mut u64,
                        epoch_seen: &mut String| {
            for f in frames {
                match f["type"].as_str() {
                    Some("message") => {
                        let seq = f["seq"].as_u64().expect("seq");
                        // Ascending, and a reconnect replays only what is newer.
                        assert!(seq > *seen_seq, "seq {seq} after {seen_seq}");
                        *seen_seq = seq;
                        let event = f["event"].as_str().expect("event").to_string();
                        if event.starts_with("job_") {
                            outcomes_seen.push(seq);
                        }
                        let value = u32::try_from(f["data"].as_u64().expect("data")).expect("u32");
                        last_seen.insert(event, (seq, value));
                    }
                    Some("joined") => {
                        *epoch_seen = f["epoch"].as_str().expect("epoch").to_string();
                    }
                    _ => {}
                }
            }
        };
        let first = sim.take(sub);
        read(first, &mut last_seen, &mut outcomes_seen, &mut seen_seq, &mut epoch_seen);
        epoch_seen = epoch(&sim, ROOM);
        for step in steps {
            match step {
                Step::Publish { event, value } => {
                    let name = EVENTS[event];
                    let seq = publish(&mut sim, ROOM, Some(name), &json!(value));
                    latest.insert(name.to_string(), value);
                    if name.starts_with("job_") {
                        outcomes_published.push(seq);
                    }
                }
                Step::Read => {
                    let frames = sim.take(sub);
                    read(frames, &mut last_seen, &mut outcomes_seen, &mut seen_seq, &mut epoch_seen);
                }
                Step::Reconnect => {
                    // Unread frames die with the connection.
                    sim.disconnect(sub);
                    sub = connect(&mut sim, "sub");
                    let since = (seen_seq, epoch_seen.as_str());
                    let got = join(&mut sim, sub, ROOM, Some(since));
                    if got.last().expect("joined")["recovered"] != json!(true) {
                        // Only a room that had nothing to keep was freed (a
                        // new epoch); otherwise the state is recovered.
                        prop_assert!(latest.is_empty(), "{:?}", got);
                        seen_seq = 0;
                    }
                    read(got, &mut last_seen, &mut outcomes_seen, &mut seen_seq, &mut epoch_seen);
                }
            }
        }
        let rest = sim.take(sub);
        let before = seen_seq;
        read(rest, &mut last_seen, &mut outcomes_seen, &mut seen_seq, &mut epoch_seen);
        prop_assert!(seen_seq >= before);
        let converged: BTreeMap<String, u32> =
            last_seen.into_iter().map(|(e, (_, v))| (e, v)).collect();
        prop_assert_eq!(converged, latest);
        prop_assert_eq!(outcomes_seen, outcomes_published);
    }
}
