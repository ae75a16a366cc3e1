//! Rooms sharded across two independent real Redis instances (`--redis`
//! given twice): every node picks the same Redis for a room whatever the
//! order of its flags, members get every message once and in order, clients
//! recover through any node, and a Redis that dies fails only its own rooms.
//!
//! Processes (two `redis-server`s, `switchboard` nodes) are owned by guards
//! that kill them on drop; every wait is bounded by [`WAIT`]; nothing asserts
//! on timing. Logs: `$CARGO_TARGET_TMPDIR/cluster/<test>-<name>.log`.

mod support;

use std::collections::BTreeMap;

use serde_json::{json, Value};
use switchboard_redis::{score, shard_id};

use support::*;

/// Which of `redis` holds `key`, as the nodes must compute it.
fn expected_shard(redis: &[&Redis], key: &str) -> usize {
    let urls: Vec<String> = redis.iter().map(|r| r.url()).collect();
    shard_of(&urls, key)
}

/// Which of the Redis at `urls` holds `key`.
fn shard_of(urls: &[String], key: &str) -> usize {
    let scores: Vec<u64> = urls
        .iter()
        .map(|url| score(&shard_id(url).expect("a Redis URL"), key))
        .collect();
    let best = scores.iter().max().expect("a shard");
    scores.iter().position(|s| s == best).expect("the best")
}

/// Starts a node given `urls` as `--redis`, in that order.
async fn node(test: &str, name: &str, urls: &[String]) -> Node {
    let mut extra: Vec<&str> = Vec::new();
    for url in &urls[1..] {
        extra.extend(["--redis", url.as_str()]);
    }
    Node::start_with(test, name, &urls[0], &extra).await
}

/// Joins `room`, asking again while the node answers `unavailable`.
async fn join_when_available(client: &mut Client, room: &str) {
    let what = format!("{} to join {room}", client.user);
    within(&what, async {
        for attempt in 0.. {
            let id = format!("join-{room}-{attempt}");
            client
                .send(json!({"type": "join", "room": room, "id": id}))
                .await;
            let answer = client
                .wait_for("joined or an error", |f| {
                    (f["type"] == "joined" && f["room"] == room)
                        || (f["type"] == "error" && f["id"] == id.as_str())
                })
                .await;
            if answer["type"] == "joined" {
                assert_eq!(client.answer(&id).await["type"], "ack");
                return;
            }
            assert_eq!(answer["code"], "unavailable", "{what}: {answer}");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await;
}

/// Reads `message` frames until `count` of them arrived, grouped by room.
async fn messages_by_room(client: &mut Client, count: usize) -> BTreeMap<String, Vec<Value>> {
    let mut rooms: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for _ in 0..count {
        let message = client.next_message().await;
        let room = message["room"].as_str().expect("a room").to_owned();
        rooms.entry(room).or_default().push(message);
    }
    rooms
}

/// Three nodes, two of them given the Redis URLs in one order and the third
/// in the other, share 16 rooms: each room's keys are on exactly the Redis
/// the hash names (so all nodes agree), both Redis hold rooms, every member
/// gets every message once in order whichever node published it, a client
/// recovers through another node, and direct messages reach users whose
/// channels are on either Redis.
#[test]
fn rooms_spread_over_two_redis_and_every_node_agrees() {
    run(async {
        let test = "sharding";
        let a = Redis::start("sharding-a").await;
        let b = Redis::start("sharding-b").await;
        let urls = [a.url(), b.url()];
        let reversed = [b.url(), a.url()];
        let nodes = [
            node(test, "n1", &urls).await,
            node(test, "n2", &urls).await,
            node(test, "n3", &reversed).await,
        ];
        let rooms: Vec<String> = (0..16).map(|i| format!("room-{i}")).collect();
        let redis = [&a, &b];
        let mut clients = Vec::new();
        for (i, node) in nodes.iter().enumerate() {
            // Users whose channels are on each Redis in turn.
            let user = (0..)
                .map(|k| format!("user{i}-{k}"))
                .find(|u| expected_shard(&redis, u) == i % 2)
                .expect("a user name");
            let mut client = Client::connect(node, &user).await;
            for room in &rooms {
                client.join(room).await;
            }
            clients.push(client);
        }
        let per_room = 5u64;
        for i in 1..=per_room {
            for (r, room) in rooms.iter().enumerate() {
                // Every node publishes to every room.
                let node = &nodes[(r + i as usize) % nodes.len()];
                api_publish(node, room, json!({"i": i})).await;
            }
        }
        let mut epochs = BTreeMap::new();
        for client in &mut clients {
            let got = messages_by_room(client, rooms.len() * per_room as usize).await;
            assert_eq!(
                got.len(),
                rooms.len(),
                "{}: rooms {:?}",
                client.user,
                got.keys()
            );
            for (room, messages) in &got {
                assert_consecutive(&format!("{} in {room}", client.user), messages, 1);
                assert_eq!(messages.len() as u64, per_room, "{}: {room}", client.user);
                let epoch = messages[0]["epoch"].as_str().expect("epoch").to_owned();
                let first = epochs.entry(room.clone()).or_insert_with(|| epoch.clone());
                assert_eq!(*first, epoch, "{}: {room}: another epoch", client.user);
            }
            client.assert_no_more_messages().await;
        }

        // Each room lives on exactly the Redis the hash names.
        let mut held = [0, 0];
        for room in &rooms {
            let key = format!("sb:{{{room}}}:seq");
            let on: Vec<i64> = [
                a.int(&["EXISTS", &key]).await,
                b.int(&["EXISTS", &key]).await,
            ]
            .into();
            let shard = expected_shard(&redis, room);
            let mut expected = vec![0, 0];
            expected[shard] = 1;
            assert_eq!(on, expected, "{room}: keys on the wrong Redis");
            assert_eq!(
                redis[shard].string(&["GET", &key]).await.as_deref(),
                Some(per_room.to_string().as_str()),
                "{room}"
            );
            held[shard] += 1;
        }
        assert!(
            held[0] > 0 && held[1] > 0,
            "one Redis holds every room: {held:?}"
        );

        // Recovery through another node: a client of node 3 that last saw
        // seq 2 of a room on either Redis gets 3..=5 replayed.
        for shard in 0..2 {
            let room = rooms
                .iter()
                .find(|r| expected_shard(&redis, r) == shard)
                .expect("a room on each Redis");
            let epoch = &epochs[room];
            let mut late = Client::connect(&nodes[2], &format!("late{shard}")).await;
            let (replay, joined) = late.join_since(room, Some((2, epoch))).await;
            assert_eq!(joined["recovered"], true, "{room}: {joined}");
            assert_eq!(joined["epoch"], epoch.as_str(), "{room}: {joined}");
            assert_consecutive(room, &replay, 3);
            assert_eq!(replay.len(), 3, "{room}: {replay:?}");
        }

        // Direct messages to users whose channels are on each Redis, sent
        // through a node other than theirs.
        for (i, client) in clients.iter_mut().enumerate() {
            let through = &nodes[(i + 1) % nodes.len()];
            let (status, answer) = http_post(
                through.port,
                "/api/direct",
                &json!({"user": client.user, "data": {"to": client.user}}),
            )
            .await;
            assert_eq!((status, &answer["delivered"]), (200, &json!(1)), "{answer}");
            let direct = client
                .wait_for("a direct message", |f| f["type"] == "direct")
                .await;
            assert_eq!(direct["data"]["to"], client.user.as_str(), "{direct}");
        }
    });
}

/// Two nodes, two Redis. One Redis is killed (SIGKILL): rooms on the other
/// keep publishing and delivering, untouched (no `joined` reset), while
/// rooms on the dead one answer `unavailable`. Once it is back (empty: its
/// data is lost), its rooms publish again and their members are told
/// `recovered: false` once, in a new epoch.
#[test]
fn a_dead_redis_fails_only_its_rooms() {
    run(async {
        let test = "shard-down";
        let a = Redis::start("shard-down-a").await;
        let mut b = Redis::start("shard-down-b").await;
        let n1 = node(test, "n1", &[a.url(), b.url()]).await;
        let n2 = node(test, "n2", &[b.url(), a.url()]).await;
        let (live, dead) = {
            let redis = [&a, &b];
            let pick = |shard: usize| {
                (0..)
                    .map(|i| format!("r{i}"))
                    .find(|r| expected_shard(&redis, r) == shard)
                    .expect("a room")
            };
            (pick(0), pick(1))
        };
        let mut c1 = Client::connect(&n1, "ann").await;
        let mut c2 = Client::connect(&n2, "bob").await;
        for client in [&mut c1, &mut c2] {
            client.join(&live).await;
            client.join(&dead).await;
        }
        publish_first(&n1, &live, 2, &mut [&mut c1, &mut c2]).await;
        let old_epoch = publish_first(&n2, &dead, 2, &mut [&mut c1, &mut c2]).await;

        b.stop();

        // The live room goes on, through either node.
        for (i, node) in [&n1, &n2].into_iter().enumerate() {
            let answer = api_publish(node, &live, json!({"after": i})).await;
            assert_eq!(answer["seq"], 3 + i, "{answer}");
        }
        for client in [&mut c1, &mut c2] {
            let messages = client.messages_through(4).await;
            assert_consecutive(&client.user, &messages, 3);
        }
        // The dead room: `unavailable`, over HTTP and from a client.
        let (status, answer) = http_post(
            n1.port,
            "/api/publish",
            &json!({"room": dead, "data": {"lost": true}}),
        )
        .await;
        assert_eq!(status, 503, "{answer}");
        assert_eq!(answer["error"]["code"], "unavailable", "{answer}");
        c2.publish(&dead, "p-dead", json!({"lost": true})).await;
        let refused = c2.answer("p-dead").await;
        assert_eq!(
            (&refused["type"], &refused["code"]),
            (&json!("error"), &json!("unavailable")),
            "{refused}"
        );
        // A room on the live Redis can still be joined meanwhile.
        let mut c3 = Client::connect(&n2, "cid").await;
        let (_, joined) = c3.join_since(&live, None).await;
        assert_eq!(joined["seq"], 4, "{joined}");

        b.restart().await;

        // Both nodes reconnect; the dead room's members are told they
        // cannot recover (Redis lost it), and it publishes again.
        for client in [&mut c1, &mut c2] {
            let reset = client
                .wait_for("a reset of the dead room", |f| {
                    f["type"] == "joined" && f["room"] == dead.as_str()
                })
                .await;
            assert_eq!(reset["recovered"], false, "{}: {reset}", client.user);
            assert_ne!(
                reset["epoch"],
                old_epoch.as_str(),
                "{}: {reset}",
                client.user
            );
        }
        let answer = within("the dead room to publish again", async {
            loop {
                let (status, answer) = http_post(
                    n2.port,
                    "/api/publish",
                    &json!({"room": dead, "data": {"back": true}}),
                )
                .await;
                if status == 200 {
                    return answer;
                }
                assert_eq!(answer["error"]["code"], "unavailable", "{answer}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        })
        .await;
        for client in [&mut c1, &mut c2] {
            let message = client
                .wait_for("the dead room's new message", |f| {
                    f["type"] == "message" && f["room"] == dead.as_str()
                })
                .await;
            assert_eq!(message["data"]["back"], true, "{}: {message}", client.user);
            assert_eq!(
                message["epoch"], answer["epoch"],
                "{}: {message}",
                client.user
            );
        }
        // The live room was never reset, and keeps its epoch and seq.
        let answer = api_publish(&n2, &live, json!({"fence": true})).await;
        assert_eq!(answer["seq"], 5, "{answer}");
        for client in [&mut c1, &mut c2] {
            let message = client
                .wait_for("the live room's fence", |f| {
                    f["type"] == "message" && f["room"] == live.as_str()
                })
                .await;
            assert_eq!(message["seq"], 5, "{}: {message}", client.user);
            let resets: Vec<&Value> = client
                .pending
                .iter()
                .filter(|f| f["type"] == "joined" && f["room"] == live.as_str())
                .collect();
            assert!(
                resets.is_empty(),
                "{}: live room reset: {resets:?}",
                client.user
            );
        }
        // Only the dead room was caught up on each node: the reconnect
        // was narrowed to the rooms of the Redis that came back.
        for node in [&n1, &n2] {
            let log = strip_ansi(&read_log(&node.log));
            let catch_ups: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("catching up after a broker"))
                .collect();
            assert!(
                !catch_ups.is_empty(),
                "node {}: no catch-up:\n{log}",
                node.name
            );
            for line in catch_ups {
                assert!(
                    line.contains("shard reconnect") && line.ends_with("rooms=1"),
                    "node {}: {line}",
                    node.name
                );
            }
        }
    });
}

/// The log without its colours.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A node whose second Redis is down when it starts still starts: rooms on
/// the first work at once, rooms on the second answer `unavailable` until
/// it comes up, then work too (the node keeps trying it).
#[test]
fn a_node_starts_while_one_redis_is_down() {
    run(async {
        let test = "shard-late";
        let a = Redis::start("shard-late-a").await;
        let mut b = Redis::start("shard-late-b").await;
        let (up, late) = {
            let redis = [&a, &b];
            let pick = |shard: usize| {
                (0..)
                    .map(|i| format!("r{i}"))
                    .find(|r| expected_shard(&redis, r) == shard)
                    .expect("a room")
            };
            (pick(0), pick(1))
        };
        b.stop();
        let n1 = node(test, "n1", &[a.url(), b.url()]).await;
        let mut ann = Client::connect(&n1, "ann").await;
        ann.join(&up).await;
        let answer = api_publish(&n1, &up, json!({"i": 1})).await;
        assert_eq!(answer["seq"], 1, "{answer}");
        let (status, answer) =
            http_post(n1.port, "/api/publish", &json!({"room": late, "data": {}})).await;
        assert_eq!(status, 503, "{answer}");

        b.restart().await;
        let answer = within("the late Redis's room to publish", async {
            loop {
                let (status, answer) =
                    http_post(n1.port, "/api/publish", &json!({"room": late, "data": {}})).await;
                if status == 200 {
                    return answer;
                }
                assert_eq!(answer["error"]["code"], "unavailable", "{answer}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        })
        .await;
        assert_eq!(answer["seq"], 1, "{answer}");
        // Joins and delivery on it work now (once the node's subscriber
        // connection to it is up too), and the first room went on.
        join_when_available(&mut ann, &late).await;
        api_publish(&n1, &late, json!({"i": 2})).await;
        let message = ann
            .wait_for("the late room's message", |f| {
                f["type"] == "message" && f["room"] == late.as_str()
            })
            .await;
        assert_eq!(message["seq"], 2, "{message}");
        let first = ann.next_message().await;
        assert_eq!((&first["room"], seq(&first)), (&json!(up), 1), "{first}");
        assert_eq!(
            b.string(&["GET", &format!("sb:{{{late}}}:seq")])
                .await
                .as_deref(),
            Some("2")
        );
    });
}

/// Presence spans nodes per Redis: a user's join shows in rooms on both
/// Redis, and when that user's node is killed (SIGKILL), each Redis's
/// heartbeat takes it for dead on its own and its user's leave is announced
/// in the rooms of both.
#[test]
fn a_killed_node_leaves_presence_on_every_redis() {
    run(async {
        let test = "shard-killed";
        let a = Redis::start("shard-killed-a").await;
        let b = Redis::start("shard-killed-b").await;
        let ttl = ["--redis", &b.url(), "--redis-node-ttl-ms", "1500"];
        let n1 = Node::start_with(test, "n1", &a.url(), &ttl).await;
        let mut n2 = Node::start_with(test, "n2", &a.url(), &ttl).await;
        let rooms: Vec<String> = {
            let redis = [&a, &b];
            (0..2)
                .map(|shard| {
                    (0..)
                        .map(|i| format!("r{i}"))
                        .find(|r| expected_shard(&redis, r) == shard)
                        .expect("a room")
                })
                .collect()
        };
        let mut ann = Client::connect(&n1, "ann").await;
        let mut bob = Client::connect(&n2, "bob").await;
        for room in &rooms {
            ann.join(room).await;
            bob.join(room).await;
            let event = ann.next_presence(room).await;
            assert_presence(&event, "join", "bob", 2, "ann");
            assert_eq!(ann.presence_list(room).await, users(&["ann", "bob"]));
        }

        n2.kill();
        for room in &rooms {
            let event = ann.next_presence(room).await;
            assert_presence(&event, "leave", "bob", 1, "ann");
            assert_eq!(ann.presence_list(room).await, users(&["ann"]));
        }
    });
}

/// One of the two Redis goes silent (its proxy blackholes every open
/// connection; nothing is closed). A session publishes to a room on it,
/// then to a room on the other: the second is acked first, since each
/// Redis has a publish pipeline of its own, so a silent Redis holds up
/// only its own rooms. (With one pipeline for both, the second waited for
/// the first's timeout.) The first is answered too, once the node noticed
/// and sent it again on a new connection.
#[test]
fn a_silent_redis_holds_up_only_its_own_rooms_publishes() {
    run(async {
        let test = "shard-silent";
        let quick = Redis::start(test).await;
        let silent = Redis::start(test).await;
        let proxy = Proxy::start(silent.port).await;
        let urls = [quick.url(), proxy.url()];
        let on = |shard: usize| {
            (0..)
                .map(|i| format!("room{i}"))
                .find(|room| shard_of(&urls, room) == shard)
                .expect("a room")
        };
        let (fast_room, slow_room) = (on(0), on(1));
        let a = node(test, "a", &urls).await;
        let mut ann = Client::connect(&a, "ann").await;
        join_when_available(&mut ann, &fast_room).await;
        join_when_available(&mut ann, &slow_room).await;

        proxy.blackhole(false);
        ann.send(json!({"type": "publish", "room": slow_room, "id": "slow", "data": 1}))
            .await;
        ann.send(json!({"type": "publish", "room": fast_room, "id": "fast", "data": 2}))
            .await;
        let first = ann
            .wait_for("an answer", |f| f["id"] == "slow" || f["id"] == "fast")
            .await;
        assert_eq!(first["id"], "fast", "{first}");
        assert_eq!(first["type"], "ack", "{first}");
        let slow = ann.answer("slow").await;
        assert!(
            slow["type"] == "ack" || slow["code"] == "unavailable",
            "{slow}"
        );
    });
}
