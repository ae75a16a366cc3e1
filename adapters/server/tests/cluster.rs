//! Several `switchboard` nodes sharing rooms through one real Redis (issue #7).
//!
//! Every test starts its own `redis-server` (the Debian package; CI installs
//! it) on a free 127.0.0.1 port, then two or three `switchboard` processes
//! (this crate's binary) pointed at it, and drives them with real WebSocket
//! clients and a plain HTTP/1.1 client. Processes are owned by guards that
//! kill them on drop, so a failing test leaves nothing running. Every wait is
//! bounded by [`WAIT`]; nothing asserts on timing. The tests run one at a
//! time (they start processes, and the machine may have two cores).
//!
//! Each process writes its log to `$CARGO_TARGET_TMPDIR/cluster/<test>-<name>.log`.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};

use support::*;

// ---- tests ----------------------------------------------------------------

/// Publishes from clients on three nodes and from the HTTP API of each node,
/// all at once: every member on every node gets every message once, in
/// `seq` order, and all members see the same order.
#[test]
fn every_member_on_every_node_gets_every_message_once_in_order() {
    run(async {
        let test = "fanout";
        let redis = Redis::start(test).await;
        let mut nodes = Vec::new();
        for name in ["a", "b", "c"] {
            nodes.push(Node::start(test, name, &redis, &[]).await);
        }
        let mut clients = Vec::new();
        for node in &nodes {
            for tab in 0..2 {
                let mut client = Client::connect(node, &format!("{}{tab}", node.name)).await;
                client.join("lobby").await;
                clients.push(client);
            }
        }

        const FROM_CLIENT: u64 = 25;
        const FROM_API: u64 = 10;
        // The HTTP publishers run while the clients publish.
        let api: Vec<_> = nodes
            .iter()
            .map(|node| {
                let (port, name) = (node.port, format!("api-{}", node.name));
                tokio::spawn(async move {
                    let mut seqs = Vec::new();
                    for i in 0..FROM_API {
                        let body = json!({"room": "lobby", "data": {"by": name, "i": i}});
                        let (status, answer) = http_post(port, "/api/publish", &body).await;
                        assert_eq!(status, 200, "{answer}");
                        seqs.push(answer["seq"].as_u64().expect("seq"));
                    }
                    seqs
                })
            })
            .collect();
        let publishers = [0, 2, 4]; // one client on each node
        for i in 0..FROM_CLIENT {
            for &p in &publishers {
                let data = json!({"by": clients[p].user, "i": i});
                clients[p].publish("lobby", &format!("p{i}"), data).await;
            }
        }
        for &p in &publishers {
            for i in 0..FROM_CLIENT {
                let answer = clients[p].answer(&format!("p{i}")).await;
                assert_eq!(answer["type"], "ack", "{answer}");
            }
        }
        let mut api_seqs = BTreeSet::new();
        for task in api {
            for seq in within("the API publishers", task)
                .await
                .expect("API publisher")
            {
                assert!(api_seqs.insert(seq), "seq {seq} answered twice");
            }
        }
        // Published after all the others: everything before it was sequenced.
        api_publish(&nodes[2], "lobby", json!({"fence": true})).await;

        let total = 3 * FROM_CLIENT + 3 * FROM_API + 1;
        let mut expected: BTreeSet<(String, u64)> = BTreeSet::new();
        for &p in &publishers {
            for i in 0..FROM_CLIENT {
                expected.insert((clients[p].user.clone(), i));
            }
        }
        for node in &nodes {
            for i in 0..FROM_API {
                expected.insert((format!("api-{}", node.name), i));
            }
        }
        let mut reference: Option<Vec<Value>> = None;
        for client in &mut clients {
            let messages = client.messages_until_fence("lobby").await;
            assert_eq!(messages.len() as u64, total, "{}", client.user);
            assert_consecutive(&client.user, &messages, 1);
            let got: BTreeSet<(String, u64)> = messages[..messages.len() - 1]
                .iter()
                .map(|m| {
                    let by = m["data"]["by"].as_str().expect("data.by").to_owned();
                    (by, m["data"]["i"].as_u64().expect("data.i"))
                })
                .collect();
            assert_eq!(got, expected, "{}: not every message once", client.user);
            // Each publisher's messages in its own order.
            for &p in &publishers {
                let mine: Vec<u64> = messages
                    .iter()
                    .filter(|m| m["data"]["by"] == clients_user(p))
                    .map(|m| m["data"]["i"].as_u64().expect("i"))
                    .collect();
                assert_eq!(
                    mine,
                    (0..FROM_CLIENT).collect::<Vec<_>>(),
                    "{}",
                    client.user
                );
            }
            client.assert_no_more_messages().await;
            match &reference {
                None => reference = Some(messages),
                Some(first) => assert_eq!(
                    first, &messages,
                    "{}: not the same frames as the first member",
                    client.user
                ),
            }
        }
        let from_api: BTreeSet<u64> = reference
            .expect("members")
            .iter()
            .filter(|m| {
                m["data"]["by"]
                    .as_str()
                    .is_some_and(|b| b.starts_with("api-"))
            })
            .map(seq)
            .collect();
        assert_eq!(from_api, api_seqs, "the API answered other seqs");
        for node in &mut nodes {
            node.assert_running();
        }
    });
}

/// The user name of publisher client `index` in the fan-out test.
fn clients_user(index: usize) -> String {
    let node = ["a", "b", "c"][index / 2];
    format!("{node}{}", index % 2)
}

/// A client that saw seq N on node A reconnects to node B with `since`: it
/// gets N+1.. replayed, then `joined` with `recovered: true`.
#[test]
fn recovery_through_another_node() {
    run(async {
        let test = "recovery";
        let redis = Redis::start(test).await;
        let a = Node::start(test, "a", &redis, &[]).await;
        let b = Node::start(test, "b", &redis, &[]).await;

        let mut first = Client::connect(&a, "reader").await;
        first.join("news").await;
        for i in 1..=5 {
            api_publish(&a, "news", json!({"i": i})).await;
        }
        let mut last = Value::Null;
        for i in 1..=5u64 {
            last = first.next_message().await;
            assert_eq!(seq(&last), i);
        }
        let epoch = last["epoch"].as_str().expect("epoch").to_owned();
        first.close().await;
        for i in 6..=8 {
            api_publish(&b, "news", json!({"i": i})).await;
        }

        // Node B has no member in the room: its join starts from the broker.
        let mut again = Client::connect(&b, "reader").await;
        let (replay, joined) = again.join_since("news", Some((5, &epoch))).await;
        assert_consecutive("reader on b", &replay, 6);
        assert_eq!(replay.len(), 3, "{replay:?}");
        let data: Vec<u64> = replay
            .iter()
            .map(|m| m["data"]["i"].as_u64().expect("i"))
            .collect();
        assert_eq!(data, [6, 7, 8]);
        assert!(replay.iter().all(|m| m["epoch"] == epoch.as_str()));
        assert_eq!(joined["recovered"], true, "{joined}");
        assert_eq!(joined["seq"], 8, "{joined}");
        assert_eq!(joined["epoch"], epoch.as_str(), "{joined}");
        // Live delivery continues after the replay.
        api_publish(&a, "news", json!({"i": 9})).await;
        let live = again.next_message().await;
        assert_eq!(seq(&live), 9, "{live}");

        // `since` = the latest seq: recovered, nothing replayed (node A again,
        // which has no member either now).
        let mut up_to_date = Client::connect(&a, "other").await;
        let (replay, joined) = up_to_date.join_since("news", Some((9, &epoch))).await;
        assert!(replay.is_empty(), "{replay:?}");
        assert_eq!(joined["recovered"], true, "{joined}");
        assert_eq!(joined["seq"], 9);

        // A foreign epoch cannot be resumed, on either node.
        let mut stranger = Client::connect(&b, "stranger").await;
        let (replay, joined) = stranger.join_since("news", Some((3, "not-it"))).await;
        assert!(replay.is_empty(), "{replay:?}");
        assert_eq!(joined["recovered"], false, "{joined}");
        assert_eq!(joined["seq"], 9);
        assert_eq!(joined["epoch"], epoch.as_str());

        // Everyone still in the room gets the next one once.
        api_publish(&b, "news", json!({"fence": true})).await;
        for client in [&mut again, &mut up_to_date, &mut stranger] {
            let messages = client.messages_until_fence("news").await;
            assert_eq!(messages.len(), 1, "{}: {messages:?}", client.user);
            assert_eq!(seq(&messages[0]), 10);
            client.assert_no_more_messages().await;
        }
    });
}

/// `direct` to a user reaches their tabs on both nodes; to a sid, that one
/// tab; to a user nowhere, `unknown_target`. The HTTP API counts nodes.
#[test]
fn direct_to_a_user_with_tabs_on_two_nodes() {
    run(async {
        let test = "direct";
        let redis = Redis::start(test).await;
        let a = Node::start(test, "a", &redis, &[]).await;
        let b = Node::start(test, "b", &redis, &[]).await;

        let mut tab_a = Client::connect(&a, "dora").await;
        let mut tab_b = Client::connect(&b, "dora").await;
        let mut sender = Client::connect(&b, "sam").await;

        let answer = sender
            .request(json!({"type": "direct", "id": "d1", "to": {"user": "dora"},
                            "event": "note", "data": {"text": "hi"}}))
            .await;
        assert_eq!(answer["type"], "ack", "{answer}");
        for tab in [&mut tab_a, &mut tab_b] {
            let direct = tab.wait_for("a direct", |f| f["type"] == "direct").await;
            assert_eq!(direct["data"], json!({"text": "hi"}), "{direct}");
            assert_eq!(direct["event"], "note");
            assert_eq!(direct["from"]["user"], "sam");
            assert_eq!(direct["from"]["sid"], sender.sid.as_str());
        }

        let answer = sender
            .request(json!({"type": "direct", "id": "d2", "to": {"user": "nobody"}, "data": 1}))
            .await;
        assert_eq!(answer["type"], "error", "{answer}");
        assert_eq!(answer["code"], "unknown_target", "{answer}");

        // To one session: only that tab (the other's next direct is the next one).
        let to_sid =
            json!({"type": "direct", "id": "d3", "to": {"sid": tab_a.sid}, "data": "only a"});
        let answer = sender.request(to_sid).await;
        assert_eq!(answer["type"], "ack", "{answer}");
        let direct = tab_a.wait_for("a direct", |f| f["type"] == "direct").await;
        assert_eq!(direct["data"], "only a");

        // From the server, through node A's API: both nodes had a recipient.
        let (status, answer) = http_post(
            a.port,
            "/api/direct",
            &json!({"user": "dora", "data": "from the server"}),
        )
        .await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["delivered"], 2, "{answer}");
        for tab in [&mut tab_a, &mut tab_b] {
            let direct = tab.wait_for("a direct", |f| f["type"] == "direct").await;
            assert_eq!(direct["data"], "from the server", "{}: {direct}", tab.user);
            assert_eq!(direct["from"], json!({"server": true}));
        }
        let (status, answer) =
            http_post(b.port, "/api/direct", &json!({"user": "nobody", "data": 0})).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["delivered"], 0, "{answer}");

        // A closed tab no longer counts: one node left with a recipient.
        tab_b.close().await;
        let delivered = within("dora's tab on b to be gone", async {
            loop {
                let (_, answer) =
                    http_post(a.port, "/api/direct", &json!({"user": "dora", "data": "x"})).await;
                if answer["delivered"] == 1 {
                    return answer;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert_eq!(delivered["delivered"], 1);
    });
}

/// Presence spans nodes: join and leave events carry cluster-wide counts, a
/// second tab of a present user changes nothing, and `presence` lists the
/// users of every node.
#[test]
fn presence_across_nodes() {
    run(async {
        let test = "presence";
        let redis = Redis::start(test).await;
        let a = Node::start(test, "a", &redis, &[]).await;
        let b = Node::start(test, "b", &redis, &[]).await;

        let mut ann = Client::connect(&a, "ann").await;
        let joined = ann.join("hall").await;
        assert_eq!(joined["members"], 1, "{joined}");

        let mut bob = Client::connect(&b, "bob").await;
        let joined = bob.join("hall").await;
        assert_eq!(joined["members"], 2, "{joined}");
        let event = ann.next_presence("hall").await;
        assert_presence(&event, "join", "bob", 2, "");

        let mut cid = Client::connect(&a, "cid").await;
        let joined = cid.join("hall").await;
        assert_eq!(joined["members"], 3, "{joined}");
        for client in [&mut ann, &mut bob] {
            let event = client.next_presence("hall").await;
            assert_presence(&event, "join", "cid", 3, &client.user);
        }

        // Bob's second tab, on the other node: he is present already.
        let mut bob_on_a = Client::connect(&a, "bob").await;
        let joined = bob_on_a.join("hall").await;
        assert_eq!(joined["members"], 3, "{joined}");

        for client in [&mut ann, &mut bob, &mut cid, &mut bob_on_a] {
            let members = client.presence_list("hall").await;
            assert_eq!(members, users(&["ann", "bob", "cid"]), "{}", client.user);
        }

        // Cid leaves: everyone else, on both nodes, hears it.
        let answer = cid
            .request(json!({"type": "leave", "room": "hall", "id": "bye"}))
            .await;
        assert_eq!(answer["type"], "ack", "{answer}");
        for client in [&mut ann, &mut bob, &mut bob_on_a] {
            let event = client.next_presence("hall").await;
            assert_presence(&event, "leave", "cid", 2, &client.user);
        }

        // Bob closes his tab on b, then the one on a: one leave, after the last.
        bob.close().await;
        bob_on_a.close().await;
        let event = ann.next_presence("hall").await;
        assert_presence(&event, "leave", "bob", 1, "");
        // The next event is the next join: no second leave for bob.
        let mut dee = Client::connect(&b, "dee").await;
        dee.join("hall").await;
        let event = ann.next_presence("hall").await;
        assert_presence(&event, "join", "dee", 2, "");
        assert_eq!(ann.presence_list("hall").await, users(&["ann", "dee"]));
    });
}

/// A node killed with SIGKILL says nothing; once its heartbeat key expires
/// (`--redis-node-ttl-ms`), a surviving node removes its users from presence
/// and announces their leaves.
#[test]
fn presence_after_a_node_is_killed() {
    run(async {
        let test = "killed";
        let redis = Redis::start(test).await;
        let ttl = ["--redis-node-ttl-ms", "1500"];
        let mut a = Node::start(test, "a", &redis, &ttl).await;
        let mut b = Node::start(test, "b", &redis, &ttl).await;

        let mut ann = Client::connect(&a, "ann").await;
        ann.join("hall").await;
        let mut bob = Client::connect(&b, "bob").await;
        bob.join("hall").await;
        let mut bea = Client::connect(&b, "bea").await;
        bea.join("hall").await;
        let mut ada = Client::connect(&a, "ada").await;
        ada.join("hall").await;
        for _ in 0..3 {
            ann.next_presence("hall").await; // bob, bea, ada
        }
        assert_eq!(
            ann.presence_list("hall").await,
            users(&["ada", "ann", "bea", "bob"])
        );

        b.kill();
        let mut left = BTreeSet::new();
        let mut count = None;
        while left.len() < 2 {
            let event = ann.next_presence("hall").await;
            assert_eq!(event["action"], "leave", "{event}");
            left.insert(event["user"].as_str().expect("user").to_owned());
            count = event["count"].as_u64();
        }
        assert_eq!(left, users(&["bea", "bob"]).into_iter().collect());
        assert_eq!(count, Some(2), "the count after both leaves");
        let event = ada.next_presence("hall").await;
        assert_eq!(event["action"], "leave", "{event}");
        assert_eq!(ann.presence_list("hall").await, users(&["ada", "ann"]));

        // The survivor works on: messages, and a direct to the dead node's
        // user finds nobody.
        api_publish(&a, "hall", json!({"after": "kill"})).await;
        for client in [&mut ann, &mut ada] {
            let message = client.next_message().await;
            assert_eq!(message["data"]["after"], "kill");
        }
        let answer = ann
            .request(json!({"type": "direct", "id": "d", "to": {"user": "bob"}, "data": 1}))
            .await;
        assert_eq!(answer["code"], "unknown_target", "{answer}");
        a.assert_running();
    });
}

/// Redis is killed mid-run, then restarted empty on the same port: while it
/// is away publishes fail with `unavailable` (WebSocket and HTTP 503),
/// sessions stay connected and answer pings, nodes keep running; once it is
/// back publishes work again, and the lost history shows as a new epoch.
#[test]
fn redis_outage_and_restart() {
    run(async {
        let test = "outage";
        let mut redis = Redis::start(test).await;
        let mut a = Node::start(test, "a", &redis, &[]).await;
        let mut b = Node::start(test, "b", &redis, &[]).await;

        let mut ann = Client::connect(&a, "ann").await;
        ann.join("room").await;
        let mut bob = Client::connect(&b, "bob").await;
        bob.join("room").await;
        let epoch = publish_first(&a, "room", 3, &mut [&mut ann, &mut bob]).await;

        redis.stop();

        for (n, client) in [&mut ann, &mut bob].into_iter().enumerate() {
            let id = format!("down{n}");
            let answer = client
                .request(json!({"type": "publish", "room": "room", "id": id, "data": "lost"}))
                .await;
            assert_eq!(answer["type"], "error", "{}: {answer}", client.user);
            assert_eq!(answer["code"], "unavailable", "{}: {answer}", client.user);
            assert_eq!(answer["room"], "room", "{answer}");
            client.assert_answers_ping(&format!("alive{n}")).await;
        }
        for node in [&a, &b] {
            let (status, answer) = http_post(
                node.port,
                "/api/publish",
                &json!({"room": "room", "data": "lost"}),
            )
            .await;
            assert_eq!(status, 503, "node {}: {answer}", node.name);
            assert_eq!(answer["error"]["code"], "unavailable", "{answer}");
        }
        // A new session is still welcome; its join cannot be served.
        let mut late = Client::connect(&b, "late").await;
        let answer = late
            .request(json!({"type": "join", "room": "room", "id": "j"}))
            .await;
        assert_eq!(answer["code"], "unavailable", "{answer}");
        late.assert_answers_ping("late-alive").await;
        a.assert_running();
        b.assert_running();

        redis.restart().await;

        // Publishes work again once the nodes reconnect: retry until one is
        // accepted, then until both members hear one.
        within("a publish to be accepted again", async {
            loop {
                let (status, _) = http_post(
                    a.port,
                    "/api/publish",
                    &json!({"room": "room", "data": {"probe": true}}),
                )
                .await;
                if status == 200 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        for client in [&mut ann, &mut bob] {
            let what = format!("{} to hear from the new Redis", client.user);
            within(&what, async {
                loop {
                    api_publish(&a, "room", json!({"probe": true})).await;
                    // A probe published before this member's node subscribed
                    // again is not heard: publish another one.
                    let heard =
                        tokio::time::timeout(Duration::from_millis(300), client.next_message())
                            .await;
                    if let Ok(message) = heard {
                        assert_ne!(
                            message["epoch"],
                            epoch.as_str(),
                            "{}: the old epoch after the restart: {message}",
                            client.user
                        );
                        return;
                    }
                }
            })
            .await;
        }
        // Each member was told that the room's history was lost.
        for client in [&mut ann, &mut bob] {
            let reset = client
                .wait_for("joined again", |f| {
                    f["type"] == "joined" && f["room"] == "room"
                })
                .await;
            assert_eq!(reset["recovered"], false, "{}: {reset}", client.user);
        }
        // From here on, every message reaches both, once, in order.
        let answer = ann
            .request(json!({"type": "publish", "room": "room", "id": "up", "data": {"by": "ann"}}))
            .await;
        assert_eq!(answer["type"], "ack", "{answer}");
        api_publish(&b, "room", json!({"fence": true})).await;
        let mut tails = Vec::new();
        for client in [&mut ann, &mut bob] {
            let messages = client.messages_until_fence("room").await;
            let tail: Vec<Value> = messages
                .iter()
                .skip_while(|m| m["data"]["by"] != "ann")
                .cloned()
                .collect();
            assert_eq!(tail.len(), 2, "{}: {messages:?}", client.user);
            assert_consecutive(&client.user, &tail, seq(&tail[0]));
            assert_ne!(tail[0]["epoch"], epoch.as_str());
            client.assert_no_more_messages().await;
            tails.push(tail);
        }
        assert_eq!(tails[0], tails[1], "both members saw the same messages");

        // The session opened while Redis was away is reachable again.
        let answer = ann
            .request(
                json!({"type": "direct", "id": "to-late", "to": {"user": "late"}, "data": "hi"}),
            )
            .await;
        assert_eq!(answer["type"], "ack", "{answer}");
        let direct = late.wait_for("a direct", |f| f["type"] == "direct").await;
        assert_eq!(direct["data"], "hi");

        // The restarted Redis lost the room's history: the old position
        // cannot be resumed.
        let mut back = Client::connect(&b, "back").await;
        let (replay, joined) = back.join_since("room", Some((3, &epoch))).await;
        assert!(replay.is_empty(), "{replay:?}");
        assert_eq!(joined["recovered"], false, "{joined}");
        assert_ne!(joined["epoch"], epoch.as_str(), "{joined}");
        assert_eq!(joined["epoch"], tails[0][0]["epoch"], "{joined}");
        a.assert_running();
        b.assert_running();
    });
}

/// Fifty rooms at once, three members each spread over three nodes: each
/// member gets its own room's messages, all of them, in order, and nothing
/// else.
#[test]
fn many_rooms_at_once() {
    run(async {
        let test = "rooms";
        let redis = Redis::start(test).await;
        let mut nodes = Vec::new();
        for name in ["a", "b", "c"] {
            nodes.push(Node::start(test, name, &redis, &[]).await);
        }
        const ROOMS: usize = 50;
        const MEMBERS: usize = 3;
        const FROM_CLIENT: u64 = 3;
        const FROM_API: u64 = 2;
        let mut members: Vec<(usize, Client)> = Vec::new();
        for room in 0..ROOMS {
            for m in 0..MEMBERS {
                let node = &nodes[(room + m) % nodes.len()];
                let mut client = Client::connect(node, &format!("r{room}m{m}")).await;
                client.join(&format!("room{room}")).await;
                members.push((room, client));
            }
        }
        // The first member of each room publishes, and each room gets API
        // publishes through a node that may have none of its members.
        for (room, client) in members.iter_mut().step_by(MEMBERS) {
            for i in 0..FROM_CLIENT {
                let data = json!({"room": *room, "i": i});
                client
                    .publish(&format!("room{room}"), &format!("p{i}"), data)
                    .await;
            }
        }
        for room in 0..ROOMS {
            for i in FROM_CLIENT..FROM_CLIENT + FROM_API {
                let node = &nodes[(room + i as usize) % nodes.len()];
                api_publish(node, &format!("room{room}"), json!({"room": room, "i": i})).await;
            }
        }
        for (_, client) in members.iter_mut().step_by(MEMBERS) {
            for i in 0..FROM_CLIENT {
                let answer = client.answer(&format!("p{i}")).await;
                assert_eq!(answer["type"], "ack", "{answer}");
            }
        }
        for room in 0..ROOMS {
            api_publish(
                &nodes[room % 3],
                &format!("room{room}"),
                json!({"fence": true}),
            )
            .await;
        }
        // What the first member of each room saw: the others must see the same.
        let mut seen: Vec<Option<Vec<Value>>> = vec![None; ROOMS];
        for (room, client) in &mut members {
            let messages = client.messages_until_fence(&format!("room{room}")).await;
            assert_eq!(
                messages.len() as u64,
                FROM_CLIENT + FROM_API + 1,
                "{}: {messages:?}",
                client.user
            );
            assert_consecutive(&client.user, &messages, 1);
            let data: Vec<(u64, u64)> = messages[..messages.len() - 1]
                .iter()
                .map(|m| {
                    (
                        m["data"]["room"].as_u64().expect("room"),
                        m["data"]["i"].as_u64().expect("i"),
                    )
                })
                .collect();
            let mine = *room as u64;
            // The client's and the API's publishes interleave as they may,
            // but all arrive, each source's in its own order.
            let mut sorted = data.clone();
            sorted.sort_unstable();
            let expected: Vec<(u64, u64)> =
                (0..FROM_CLIENT + FROM_API).map(|i| (mine, i)).collect();
            assert_eq!(sorted, expected, "{}: {data:?}", client.user);
            let from_client: Vec<u64> = data
                .iter()
                .map(|d| d.1)
                .filter(|i| *i < FROM_CLIENT)
                .collect();
            let from_api: Vec<u64> = data
                .iter()
                .map(|d| d.1)
                .filter(|i| *i >= FROM_CLIENT)
                .collect();
            assert!(
                from_client.is_sorted() && from_api.is_sorted(),
                "{}: {data:?}",
                client.user
            );
            client.assert_no_more_messages().await;
            match &seen[*room] {
                None => seen[*room] = Some(messages),
                Some(first) => assert_eq!(
                    first, &messages,
                    "{}: not what its room's first member saw",
                    client.user
                ),
            }
        }
        for node in &mut nodes {
            node.assert_running();
        }
    });
}

/// Members keep getting every message, once and in order, while others join
/// the room on every node (with and without `since`) as messages flow; each
/// joiner gets, after its replay and `joined`, exactly the messages after
/// `joined.seq`.
#[test]
fn joins_while_messages_flow() {
    run(async {
        let test = "flow";
        let redis = Redis::start(test).await;
        // History for the whole stream: a slow machine may let the publisher
        // run far ahead between two joins, and `since` must still resume.
        let history = ["--history", "1000"];
        let mut nodes = Vec::new();
        for name in ["a", "b", "c"] {
            nodes.push(Node::start(test, name, &redis, &history).await);
        }
        let mut steady = Vec::new();
        for node in &nodes[..2] {
            let mut client = Client::connect(node, &format!("steady-{}", node.name)).await;
            client.join("stream").await;
            steady.push(client);
        }
        let mut publisher = Client::connect(&nodes[0], "publisher").await;
        publisher.join("stream").await;

        const MESSAGES: u64 = 400;
        let stream = tokio::spawn(async move {
            for i in 0..MESSAGES {
                let frame = json!({"type": "publish", "room": "stream", "echo": false,
                                   "id": format!("p{i}"), "data": {"i": i}});
                publisher.send(frame).await;
                if i % 8 == 7 {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            // A session's frames are applied in order: the last ack means
            // every publish was sequenced.
            let last = publisher.answer(&format!("p{}", MESSAGES - 1)).await;
            assert_eq!(last["type"], "ack", "{last}");
            publisher
        });

        // Joiners arrive while the stream runs, on every node in turn (node
        // c has no member at first: its first join subscribes the room).
        let mut joiners: Vec<(Client, Vec<Value>, Value, Option<u64>)> = Vec::new();
        let mut epoch: Option<String> = None;
        let mut previous_seq = 0;
        for k in 0..24usize {
            let node = &nodes[[2, 1, 0][k % 3]];
            let mut client = Client::connect(node, &format!("joiner{k}")).await;
            // Every other joiner resumes from where the previous one joined.
            let since = match (&epoch, k % 2) {
                (Some(epoch), 1) => Some((previous_seq, epoch.clone())),
                _ => None,
            };
            let (replay, joined) = client
                .join_since("stream", since.as_ref().map(|(s, e)| (*s, e.as_str())))
                .await;
            epoch.get_or_insert_with(|| joined["epoch"].as_str().expect("epoch").to_owned());
            previous_seq = joined["seq"].as_u64().expect("joined.seq");
            joiners.push((client, replay, joined, since.map(|(s, _)| s)));
        }
        let publisher = within("the publisher", stream)
            .await
            .expect("publisher task");
        drop(publisher);
        api_publish(&nodes[1], "stream", json!({"fence": true})).await;
        let total = MESSAGES + 1;

        for client in &mut steady {
            let messages = client.messages_until_fence("stream").await;
            assert_consecutive(&client.user, &messages, 1);
            assert_eq!(messages.len() as u64, total, "{}", client.user);
            client.assert_no_more_messages().await;
        }
        for (client, replay, joined, since) in &mut joiners {
            let at = joined["seq"].as_u64().expect("joined.seq");
            if let Some(since) = *since {
                assert_eq!(joined["recovered"], true, "{}: {joined}", client.user);
                assert_consecutive(&client.user, replay, since + 1);
                assert_eq!(
                    since + replay.len() as u64,
                    at,
                    "{}: replay up to joined.seq",
                    client.user
                );
            } else {
                assert!(replay.is_empty());
            }
            let messages = client.messages_until_fence("stream").await;
            assert_consecutive(&client.user, &messages, at + 1);
            assert_eq!(at + messages.len() as u64, total, "{}", client.user);
            client.assert_no_more_messages().await;
        }
        for node in &mut nodes {
            node.assert_running();
        }
    });
}

/// Subscriptions follow membership: a node subscribes to a room's channel
/// only while it has members there (one subscription however many), not to
/// rooms it only publishes to, and unsubscribes when its last member leaves;
/// user channels follow sessions the same way.
#[test]
fn subscriptions_follow_membership() {
    run(async {
        let test = "subscriptions";
        let redis = Redis::start(test).await;
        let a = Node::start(test, "a", &redis, &[]).await;
        let b = Node::start(test, "b", &redis, &[]).await;
        assert!(redis.room_channels().await.is_empty());

        // A join is answered once its node subscribed to the room.
        let mut ann = Client::connect(&a, "ann").await;
        ann.join("hall").await;
        assert_eq!(redis.subscribers("sb:r:hall").await, 1);
        let mut bob = Client::connect(&b, "bob").await;
        bob.join("den").await;
        assert_eq!(redis.subscribers("sb:r:den").await, 1);
        assert_eq!(redis.room_channels().await, ["sb:r:den", "sb:r:hall"]);
        // Publishing to a room with no member anywhere subscribes no node.
        api_publish(&a, "empty", json!(1)).await;
        api_publish(&b, "empty", json!(2)).await;
        assert_eq!(redis.room_channels().await, ["sb:r:den", "sb:r:hall"]);

        // Bob joins hall: node b subscribes too; ann's second tab adds nothing.
        bob.join("hall").await;
        let mut ann2 = Client::connect(&a, "ann").await;
        ann2.join("hall").await;
        assert_eq!(redis.subscribers("sb:r:hall").await, 2);

        // Ann's first tab leaves: node a has a member still, and hears hall.
        ann.leave("hall").await;
        api_publish(&b, "hall", json!({"fence": true})).await;
        assert_eq!(ann2.messages_until_fence("hall").await.len(), 1);
        assert_eq!(redis.subscribers("sb:r:hall").await, 2);
        // Its last member there leaves: node a unsubscribes.
        ann2.leave("hall").await;
        redis
            .wait_until(
                "node a to unsubscribe from hall",
                || redis.subscribers("sb:r:hall"),
                |n| *n == 1,
            )
            .await;
        bob.leave("den").await;
        redis
            .wait_until(
                "node b to unsubscribe from den",
                || redis.room_channels(),
                |channels| channels == &["sb:r:hall"],
            )
            .await;
        bob.close().await;
        redis
            .wait_until(
                "no room channel subscribed",
                || redis.room_channels(),
                Vec::is_empty,
            )
            .await;

        // Ann has two sessions on node a: one subscription to her channel,
        // until both are gone.
        assert_eq!(redis.subscribers("sb:u:ann").await, 1);
        ann.close().await;
        ann2.close().await;
        redis
            .wait_until(
                "node a to unsubscribe from ann's channel",
                || redis.subscribers("sb:u:ann"),
                |n| *n == 0,
            )
            .await;
    });
}

/// A quiet room keeps its seq, epoch and history while it has members on
/// any node, however long since its last message (here longer than its
/// 1-second history TTL): no spurious new epoch. The TTL starts once its
/// last member in the cluster left.
#[test]
fn history_lives_while_the_room_has_members() {
    run(async {
        let test = "quiet";
        let redis = Redis::start(test).await;
        let ttl = ["--history-ttl-secs", "1"];
        let a = Node::start(test, "a", &redis, &ttl).await;
        let b = Node::start(test, "b", &redis, &ttl).await;
        let keys = ["sb:{quiet}:seq", "sb:{quiet}:epoch", "sb:{quiet}:log"];

        let mut ann = Client::connect(&a, "ann").await;
        ann.join("quiet").await;
        let epoch = publish_first(&a, "quiet", 2, &mut [&mut ann]).await;
        for key in keys {
            assert_eq!(redis.int(&["PTTL", key]).await, -1, "{key} expires");
        }
        // Longer than the history TTL without a message: not a reason to
        // forget the room (not an assertion on time: waiting longer changes
        // nothing).
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let answer = api_publish(&b, "quiet", json!({"i": 3})).await;
        assert_eq!(
            (&answer["seq"], &answer["epoch"]),
            (&json!(3), &json!(epoch))
        );
        assert_eq!(seq(&ann.next_message().await), 3);
        let mut bob = Client::connect(&b, "bob").await;
        let (replay, joined) = bob.join_since("quiet", Some((2, &epoch))).await;
        assert_eq!(joined["recovered"], true, "{joined}");
        assert_eq!(replay.len(), 1, "{replay:?}");

        // Ann leaves; bob, on the other node, is still in: still no expiry.
        ann.leave("quiet").await;
        bob.wait_for_members("quiet", &["bob"]).await;
        for key in keys {
            assert_eq!(redis.int(&["PTTL", key]).await, -1, "{key} expires");
        }
        // Bob leaves: the TTL starts, the history goes, and the room's next
        // use starts a new epoch.
        bob.leave("quiet").await;
        redis
            .wait_until(
                "the room's history to expire",
                || redis.int(&["EXISTS", "sb:{quiet}:epoch"]),
                |n| *n == 0,
            )
            .await;
        let (replay, joined) = bob.join_since("quiet", Some((3, &epoch))).await;
        assert!(replay.is_empty(), "{replay:?}");
        assert_eq!(joined["recovered"], false, "{joined}");
        assert_ne!(joined["epoch"], epoch.as_str(), "{joined}");
    });
}

/// Redis restarts empty while members stay connected: each node records
/// their presence again (quietly: no join events for users who never
/// left), so lists and counts span the nodes as before.
#[test]
fn presence_is_recorded_again_after_redis_restarts_empty() {
    run(async {
        let test = "represence";
        let mut redis = Redis::start(test).await;
        let a = Node::start(test, "a", &redis, &[]).await;
        let b = Node::start(test, "b", &redis, &[]).await;
        let mut ann = Client::connect(&a, "ann").await;
        ann.join("hall").await;
        let mut bob = Client::connect(&b, "bob").await;
        bob.join("hall").await;
        let mut bea = Client::connect(&b, "bea").await;
        bea.join("hall").await;
        for user in ["bob", "bea"] {
            assert_eq!(ann.next_presence("hall").await["user"], user);
        }
        assert_eq!(bob.next_presence("hall").await["user"], "bea");

        redis.restart().await;

        for client in [&mut ann, &mut bob, &mut bea] {
            client
                .wait_for_members("hall", &["ann", "bea", "bob"])
                .await;
        }
        // The room's state does not expire while they are in it.
        redis
            .wait_until(
                "the room's epoch to be back",
                || redis.int(&["EXISTS", "sb:{hall}:epoch"]),
                |n| *n == 1,
            )
            .await;
        assert_eq!(redis.int(&["PTTL", "sb:{hall}:epoch"]).await, -1);
        // A newcomer counts everyone; the first presence event the others
        // see after the restart is its join.
        let mut cid = Client::connect(&a, "cid").await;
        assert_eq!(cid.join("hall").await["members"], 4);
        for client in [&mut ann, &mut bob, &mut bea] {
            let event = client.next_presence("hall").await;
            assert_presence(&event, "join", "cid", 4, &client.user);
        }
        bea.close().await;
        let event = cid.next_presence("hall").await;
        assert_presence(&event, "leave", "bea", 3, "");
    });
}

/// Redis goes away with its data saved, and comes back with it: leaves
/// that happened meanwhile (a `leave`, a closed session) could not be
/// recorded then, and are once it is back, so no ghost stays in presence.
#[test]
fn leaves_during_an_outage_reach_redis_once_it_is_back() {
    run(async {
        let test = "ghost";
        let mut redis = Redis::start(test).await;
        // No node is reaped during the test: only the retried leaves can
        // remove ann and cid.
        let ttl = ["--redis-node-ttl-ms", "120000"];
        let mut a = Node::start(test, "a", &redis, &ttl).await;
        let mut b = Node::start(test, "b", &redis, &ttl).await;
        let mut ann = Client::connect(&a, "ann").await;
        ann.join("hall").await;
        let mut cid = Client::connect(&a, "cid").await;
        cid.join("hall").await;
        let mut bob = Client::connect(&b, "bob").await;
        bob.join("hall").await;
        assert_eq!(
            bob.presence_list("hall").await,
            users(&["ann", "bob", "cid"])
        );

        redis.shutdown_save().await;
        ann.leave("hall").await;
        cid.close().await;
        ann.assert_answers_ping("alive").await;
        redis.restart().await;

        bob.wait_for_members("hall", &["bob"]).await;
        ann.join("hall").await;
        bob.wait_for_members("hall", &["ann", "bob"]).await;
        a.assert_running();
        b.assert_running();
    });
}

/// A join refused during an outage undoes its presence; once Redis is back
/// (with its data) the undo reaches it, and must change nothing: the user's
/// record from another node stays, and no leave is announced.
#[test]
fn a_refused_join_does_not_remove_presence_another_node_recorded() {
    run(async {
        let test = "undo";
        let mut redis = Redis::start(test).await;
        let ttl = ["--redis-node-ttl-ms", "120000"];
        let a = Node::start(test, "a", &redis, &ttl).await;
        let b = Node::start(test, "b", &redis, &ttl).await;
        let mut ann_on_b = Client::connect(&b, "ann").await;
        ann_on_b.join("hall").await;
        let mut bob = Client::connect(&b, "bob").await;
        bob.join("hall").await;
        let mut ann_on_a = Client::connect(&a, "ann").await;

        redis.shutdown_save().await;
        let answer = ann_on_a
            .request(json!({"type": "join", "room": "hall", "id": "j"}))
            .await;
        assert_eq!(answer["code"], "unavailable", "{answer}");
        redis.restart().await;

        // Node a tells Redis of the undo once it is back.
        within("node a's undo to reach Redis", async {
            loop {
                let log = read_log(&a.log);
                if log
                    .lines()
                    .any(|l| l.contains("presence recorded after a retry") && l.contains("ann"))
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        // Node b may still be reconnecting: wait for it to hear the room
        // again (presence events are not replayed to a node that missed them).
        redis
            .wait_until(
                "node b to subscribe to hall again",
                || async { redis.subscribers("sb:r:hall").await },
                |n| *n >= 1,
            )
            .await;
        bob.wait_for_members("hall", &["ann", "bob"]).await;
        // The next presence event bob sees is dee's join: no leave of ann.
        let mut dee = Client::connect(&a, "dee").await;
        assert_eq!(dee.join("hall").await["members"], 3);
        let event = bob.next_presence("hall").await;
        assert_presence(&event, "join", "dee", 3, "");
        // Ann's tab on a joins now; her tab on b leaving announces nothing.
        ann_on_a.join("hall").await;
        ann_on_b.leave("hall").await;
        ann_on_b.assert_answers_ping("after-leave").await;
        assert_eq!(
            dee.presence_list("hall").await,
            users(&["ann", "bob", "dee"])
        );
    });
}

/// Nodes lose their Redis subscription while messages are published that
/// they cannot replay afterwards (history 2, then history 0): each tells
/// its own members `joined` with `recovered: false` at the room's position,
/// never a silent hole. The loss stays local: the room keeps its epoch, a
/// member on the healthy node b is not reset (it got every message), and
/// the history Redis still keeps stays recoverable for away clients.
#[test]
fn missed_messages_that_cannot_be_replayed_reset_only_that_nodes_members() {
    for history in ["2", "0"] {
        run(missed_messages(history));
    }
}

async fn missed_messages(history: &str) {
    let test = format!("hole-{history}");
    let redis = Redis::start(&test).await;
    let args = ["--history", history];
    let mut a = Node::start(&test, "a", &redis, &args).await;
    let mut b = Node::start(&test, "b", &redis, &args).await;
    let mut c = Node::start(&test, "c", &redis, &args).await;
    let mut ann = Client::connect(&a, "ann").await;
    ann.join("room").await;
    let mut cat = Client::connect(&c, "cat").await;
    cat.join("room").await;
    let epoch = publish_first(&b, "room", 3, &mut [&mut ann, &mut cat]).await;

    // Nodes a and c stop; Redis drops their subscriptions (node b has
    // none yet); bea joins through node b, which publishes on; a and c go on.
    a.signal("STOP");
    c.signal("STOP");
    let dropped = redis.int(&["CLIENT", "KILL", "TYPE", "pubsub"]).await;
    let mut bea = Client::connect(&b, "bea").await;
    assert_eq!(bea.join("room").await["seq"], 3);
    for i in 4..=8 {
        api_publish(&b, "room", json!({"i": i})).await;
    }
    a.signal("CONT");
    c.signal("CONT");
    assert_eq!(dropped, 2, "the subscriptions of nodes a and c");

    for client in [&mut ann, &mut cat] {
        let reset = client
            .wait_for("joined again", |f| {
                f["type"] == "joined" && f["room"] == "room"
            })
            .await;
        assert_eq!(reset["recovered"], false, "{}: {reset}", client.user);
        assert_eq!(reset["seq"], 8, "{}: {reset}", client.user);
        assert_eq!(reset["epoch"], epoch.as_str(), "{}: {reset}", client.user);
        let silent: Vec<&Value> = client
            .pending
            .iter()
            .filter(|f| f["type"] == "message")
            .collect();
        assert!(silent.is_empty(), "{}: {silent:?}", client.user);
    }
    assert_eq!(
        redis.string(&["GET", "sb:{room}:epoch"]).await.as_deref(),
        Some(epoch.as_str()),
        "the room keeps its epoch"
    );

    // Live delivery goes on in it on every node.
    api_publish(&b, "room", json!({"fence": true})).await;
    for client in [&mut ann, &mut cat] {
        let messages = client.messages_until_fence("room").await;
        assert_eq!(messages.len(), 1, "{}: {messages:?}", client.user);
        assert_eq!(seq(&messages[0]), 9);
        assert_eq!(messages[0]["epoch"], epoch.as_str());
        client.assert_no_more_messages().await;
    }
    let messages = bea.messages_until_fence("room").await;
    let resets: Vec<&Value> = bea
        .pending
        .iter()
        .filter(|f| f["type"] == "joined")
        .collect();
    // Bea, on the healthy node, got everything in the one epoch, and is
    // not reset.
    assert!(resets.is_empty(), "bea: {resets:?}");
    assert_consecutive("bea", &messages, 4);
    bea.assert_no_more_messages().await;
    // From before the kept history: not recoverable, on any node.
    let mut late = Client::connect(&b, "late").await;
    let (replay, joined) = late.join_since("room", Some((3, &epoch))).await;
    assert!(replay.is_empty(), "{replay:?}");
    assert_eq!(joined["recovered"], false, "{joined}");
    assert_eq!(joined["epoch"], epoch.as_str(), "{joined}");
    if history != "0" {
        // What Redis kept is still recoverable, from any node.
        let mut again = Client::connect(&a, "again").await;
        let (replay, joined) = again.join_since("room", Some((7, &epoch))).await;
        assert_eq!(joined["recovered"], true, "{joined}");
        assert_consecutive("again", &replay, 8);
        assert_eq!(replay.len(), 2, "{replay:?}");
    }
    for node in [&mut a, &mut b, &mut c] {
        node.assert_running();
    }
}

/// Node a's connections to Redis (pub/sub and commands) are blackholed
/// mid-stream while node b publishes on: node a notices within a bounded
/// time (PING on its subscriber connection, command timeouts), connects
/// again and catches up, so its member gets every message published
/// meanwhile, once, in order; publishes through node a work again.
#[test]
fn a_blackholed_redis_connection_is_noticed_and_caught_up() {
    run(blackholed("blackhole", false));
}

/// As above with only node a's pub/sub connection blackholed: its commands
/// still work, so only the PING on the subscriber connection can tell that
/// node a went deaf.
#[test]
fn a_blackholed_pubsub_connection_is_noticed_and_caught_up() {
    run(blackholed("blackhole-pubsub", true));
}

async fn blackholed(test: &str, pubsub_only: bool) {
    let (pair, proxy) = Pair::start_proxied(test, &[], 3).await;
    let Pair {
        mut a,
        mut b,
        mut ann,
        mut bob,
        ..
    } = pair;

    proxy.blackhole(pubsub_only);
    for i in 4..=8 {
        api_publish(&b, "room", json!({"i": i})).await;
    }
    let heard = bob.messages_through(8).await;
    assert_consecutive("bob", &heard, 4);

    // Node a publishes again once it has a live command connection.
    within("a publish through node a to be accepted", async {
        loop {
            let (status, _) = http_post(
                a.port,
                "/api/publish",
                &json!({"room": "room", "data": {"from_a": true}}),
            )
            .await;
            if status == 200 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    api_publish(&b, "room", json!({"fence": true})).await;
    let messages = ann.messages_until_fence("room").await;
    assert_consecutive("ann", &messages, 4);
    assert!(
        messages.iter().any(|m| m["data"]["from_a"] == true),
        "ann: {messages:?}"
    );
    let resets: Vec<&Value> = ann
        .pending
        .iter()
        .filter(|f| f["type"] == "joined")
        .collect();
    assert!(
        resets.is_empty(),
        "ann was caught up, not reset: {resets:?}"
    );
    ann.assert_no_more_messages().await;
    a.assert_running();
    b.assert_running();
}

/// Does in Redis what a publish to `room` does, but for its fan-out: the
/// next `seq`, and (with `kept`) the message in the room's history, as when
/// the message was lost on its way to the nodes. Returns its seq.
async fn lose_a_message(redis: &Redis, room: &str, kept: bool) -> u64 {
    let command = lost_message_command(room, kept);
    let args: Vec<&str> = command.iter().map(String::as_str).collect();
    u64::try_from(redis.int(&args).await).expect("a seq")
}

/// A message that never reached the nodes (in history, not fanned out) is
/// followed by one that does: members on both nodes, seeing the seq jump,
/// get the lost one first (their nodes catch the room up), not a silent
/// hole; when the lost one is no longer kept, they get `joined` with
/// `recovered: false` instead.
#[test]
fn a_seq_jump_on_the_live_stream_is_caught_up() {
    run(async {
        let test = "seq-jump";
        let Pair {
            redis,
            mut a,
            mut b,
            mut ann,
            mut bob,
            epoch,
        } = Pair::start(test, 3).await;

        assert_eq!(lose_a_message(&redis, "room", true).await, 4);
        api_publish(&a, "room", json!({"fence": true})).await;
        for client in [&mut ann, &mut bob] {
            let messages = client.messages_until_fence("room").await;
            assert_consecutive(&client.user, &messages, 4);
            assert_eq!(messages[0]["data"]["lost"], true, "{}", client.user);
            assert_eq!(messages.len(), 2, "{}: {messages:?}", client.user);
            assert_eq!(messages[0]["epoch"], epoch.as_str());
            client.assert_no_more_messages().await;
        }

        // Lost for good (not in history): told, not papered over.
        assert_eq!(lose_a_message(&redis, "room", false).await, 6);
        api_publish(&b, "room", json!({"after": true})).await;
        for client in [&mut ann, &mut bob] {
            let reset = client
                .wait_for("joined again", |f| {
                    f["type"] == "joined" && f["room"] == "room"
                })
                .await;
            assert_eq!(reset["recovered"], false, "{}: {reset}", client.user);
            let silent: Vec<&Value> = client
                .pending
                .iter()
                .filter(|f| f["type"] == "message" && seq(f) > 6)
                .collect();
            assert!(silent.is_empty(), "{}: {silent:?}", client.user);
        }
        a.assert_running();
        b.assert_running();
    });
}

/// The last message of a room is lost on its way to the nodes, and nothing
/// follows it: the periodic position check finds the room behind Redis and
/// catches it up, so the member gets it.
#[test]
fn a_room_that_went_quiet_after_a_loss_is_caught_up() {
    run(async {
        let test = "quiet-loss";
        let redis = Redis::start(test).await;
        let mut a = Node::start(test, "a", &redis, &[]).await;
        let mut ann = Client::connect(&a, "ann").await;
        ann.join("room").await;
        publish_first(&a, "room", 2, &mut [&mut ann]).await;

        assert_eq!(lose_a_message(&redis, "room", true).await, 3);
        let message = ann.next_message().await;
        assert_eq!(seq(&message), 3, "{message}");
        assert_eq!(message["data"]["lost"], true, "{message}");
        ann.assert_no_more_messages().await;
        a.assert_running();
    });
}

/// Redis comes back from a snapshot older than the room's latest messages
/// (`SAVE` at seq 3, seq 4 to 6 published after it, then SIGKILL and a
/// restart that loads the snapshot): no later publish may get a seq of 4 to
/// 6 again in the room's epoch, or a client that had them would take new
/// messages for ones it has; the room moves to a new epoch (seq goes on from
/// the snapshot's), and clients resuming from before or after the snapshot
/// are told `recovered: false`.
#[test]
fn redis_restarted_with_older_data_never_reuses_a_seq_in_an_epoch() {
    run(async {
        let test = "older-data";
        let mut redis = Redis::start(test).await;
        let mut a = Node::start(test, "a", &redis, &[]).await;
        let mut ann = Client::connect(&a, "ann").await;
        ann.join("room").await;
        let epoch = publish_first(&a, "room", 3, &mut [&mut ann]).await;
        assert!(matches!(redis.command(&["SAVE"]).await, Resp::Simple(_)));
        for i in 4..=6 {
            api_publish(&a, "room", json!({"i": i})).await;
        }
        assert_consecutive("ann", &ann.messages_through(6).await, 4);
        // Ann goes away having had seq 6 of `epoch`.
        ann.close().await;

        redis.restart().await;
        assert_eq!(
            redis.string(&["GET", "sb:{room}:seq"]).await.as_deref(),
            Some("3"),
            "the snapshot's state"
        );
        let answer = within("a publish once node a is back on Redis", async {
            loop {
                let (status, answer) =
                    http_post(a.port, "/api/publish", &json!({"room": "room", "data": {}})).await;
                if status == 200 {
                    return answer;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        assert_ne!(
            answer["epoch"],
            epoch.as_str(),
            "seq {} again: {answer}",
            answer["seq"]
        );
        let new_epoch = answer["epoch"].as_str().expect("epoch").to_owned();

        for since in [6, 3] {
            let mut back = Client::connect(&a, "ann").await;
            let (replay, joined) = back.join_since("room", Some((since, &epoch))).await;
            assert!(replay.is_empty(), "since {since}: {replay:?}");
            assert_eq!(joined["recovered"], false, "since {since}: {joined}");
            assert_eq!(
                joined["epoch"],
                new_epoch.as_str(),
                "since {since}: {joined}"
            );
            back.close().await;
        }
        a.assert_running();
    });
}

/// Redis runs a publish from node a but its answer never comes back (the
/// command connection goes silent after the request went through). Node a
/// tries it again on a new connection with the publish's key, which Redis
/// remembers, so the message is published once and the publisher gets its
/// `ack`; a client that retried whatever `unavailable` it got would have
/// published it twice before.
#[test]
fn a_publish_whose_answer_was_lost_is_not_duplicated() {
    run(async {
        let test = "lost-answer";
        let (pair, proxy) = Pair::start_proxied(test, &[], 3).await;
        let Pair {
            mut a,
            mut b,
            mut ann,
            mut bob,
            ..
        } = pair;

        proxy.mute_commands();
        // A client that tries again after `unavailable`, as switchboard.js
        // and the jobs example do.
        let mut refused = Vec::new();
        for attempt in 0.. {
            let id = format!("once-{attempt}");
            ann.publish("room", &id, json!({"once": true})).await;
            let answer = ann.answer(&id).await;
            if answer["type"] == "ack" {
                break;
            }
            assert_eq!(answer["code"], "unavailable", "{answer}");
            refused.push(answer);
            assert!(refused.len() < 20, "never accepted: {refused:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        api_publish(&b, "room", json!({"fence": true})).await;
        for client in [&mut ann, &mut bob] {
            let messages = client.messages_until_fence("room").await;
            assert_consecutive(&client.user, &messages, 4);
            let once = messages
                .iter()
                .filter(|m| m["data"]["once"] == true)
                .count();
            assert_eq!(once, 1, "{}: {messages:?}", client.user);
        }
        assert!(refused.is_empty(), "told unavailable: {refused:?}");
        a.assert_running();
        b.assert_running();
    });
}

/// Node a is paused (SIGSTOP) past its TTL and past the rooms' history TTL,
/// so node b takes it for dead: ann's leave is announced and her rooms are
/// left to expire. When node a resumes it notices it was reaped and records
/// its presence again with join announcements, so bob sees ann join and the
/// member list heals; "solo", whose only member (ann) sat on node a all
/// along, kept its history: it goes on in its epoch, and a client resuming
/// it recovers.
#[test]
fn a_node_taken_for_dead_while_alive_records_its_presence_again() {
    run(async {
        let test = "reaped-alive";
        let redis = Redis::start(test).await;
        let args = ["--redis-node-ttl-ms", "1000", "--history-ttl-secs", "1"];
        let mut a = Node::start(test, "a", &redis, &args).await;
        let mut b = Node::start(test, "b", &redis, &args).await;
        let mut ann = Client::connect(&a, "ann").await;
        ann.join("hall").await;
        ann.join("solo").await;
        let epoch = publish_first(&a, "solo", 3, &mut [&mut ann]).await;
        let mut bob = Client::connect(&b, "bob").await;
        bob.join("hall").await;
        assert_presence(&ann.next_presence("hall").await, "join", "bob", 2, "ann");

        a.signal("STOP");
        let left = bob.next_presence("hall").await;
        assert_presence(&left, "leave", "ann", 1, "bob");
        // Past the history TTL of the rooms node b emptied.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        a.signal("CONT");

        let back = bob.next_presence("hall").await;
        assert_presence(&back, "join", "ann", 2, "bob");
        bob.wait_for_members("hall", &["ann", "bob"]).await;

        api_publish(&b, "solo", json!({"after": "pause"})).await;
        let message = ann
            .wait_for("the message after the pause", |f| {
                f["type"] == "message" && f["data"]["after"] == "pause"
            })
            .await;
        assert_eq!(message["epoch"], epoch.as_str(), "{message}");
        assert_eq!(seq(&message), 4, "{message}");
        let mut late = Client::connect(&b, "late").await;
        let (replay, joined) = late.join_since("solo", Some((3, &epoch))).await;
        assert_eq!(joined["recovered"], true, "{joined}");
        assert_consecutive("late", &replay, 4);
        a.assert_running();
        b.assert_running();
    });
}

/// Ann's first tab joins a room new to node a, whose subscribe is slow (the
/// proxy holds it); her second tab joins meanwhile, and node b publishes
/// three messages before the subscribe lands. The second join must wait for
/// the subscription too: had it read the room's position before (seq 2),
/// the three messages, which node a never hears, would be missing from
/// what it delivers after `joined`. Both tabs get `joined` at seq 5, then
/// the next message.
#[test]
fn a_second_tab_joining_during_the_first_tabs_subscribe_waits_for_it() {
    run(async {
        let test = "second-tab";
        let redis = Redis::start(test).await;
        let proxy = Proxy::start(redis.port).await;
        let mut a = Node::start_with(test, "a", &proxy.url(), &[]).await;
        let mut b = Node::start(test, "b", &redis, &[]).await;
        let mut tab1 = Client::connect(&a, "ann").await;
        let mut tab2 = Client::connect(&a, "ann").await;
        // Once this join is answered, node a's pub/sub connection has sent
        // its SUBSCRIBEs (the tabs' own channels, this room).
        tab1.join("warmup").await;
        api_publish(&b, "room", json!({"i": 1})).await;
        api_publish(&b, "room", json!({"i": 2})).await;

        proxy.stall_pubsub(true);
        tab1.send(json!({"type": "join", "room": "room", "id": "j1"}))
            .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        tab2.send(json!({"type": "join", "room": "room", "id": "j2"}))
            .await;
        // Time for a join that does not wait to read the position (seq 2).
        tokio::time::sleep(Duration::from_millis(300)).await;
        for i in 3..=5 {
            api_publish(&b, "room", json!({"i": i})).await;
        }
        proxy.stall_pubsub(false);

        for (tab, id) in [(&mut tab1, "j1"), (&mut tab2, "j2")] {
            let answer = tab.answer(id).await;
            assert_eq!(answer["type"], "ack", "{id}: {answer}");
            let joined = tab
                .wait_for("joined", |f| f["type"] == "joined" && f["room"] == "room")
                .await;
            assert_eq!(joined["seq"], 5, "{id}: {joined}");
        }
        api_publish(&b, "room", json!({"fence": true})).await;
        for tab in [&mut tab1, &mut tab2] {
            let messages = tab.messages_until_fence("room").await;
            assert_consecutive("ann", &messages, 6);
            assert_eq!(messages.len(), 1, "{messages:?}");
            tab.assert_no_more_messages().await;
        }
        a.assert_running();
        b.assert_running();
    });
}

/// Redis stops answering for longer than the command timeout without
/// closing anything (`DEBUG SLEEP`: a busy Redis, as during a long script
/// or a fork stall). Nothing on a node waits on it past its timeouts: a
/// publish during the stall is answered `unavailable` while Redis still
/// sleeps, and a session with nothing to ask of Redis is answered at once.
/// Once Redis answers again, both nodes catch up: every member gets every
/// message once, in order, and publishing works again. (The stalled
/// publish reached Redis before the stall and may run after it: the one
/// case where `unavailable` may have published, as documented.)
#[test]
fn a_stalled_redis_stalls_no_session_and_is_caught_up() {
    run(async {
        let test = "redis-stalled";
        // Longer than the stall, so that neither node reaps the other.
        let ttl = ["--redis-node-ttl-ms", "60000"];
        let Pair {
            redis,
            a,
            b,
            mut ann,
            mut bob,
            ..
        } = Pair::start_with(test, &ttl, 3).await;
        let mut cal = Client::connect(&a, "cal").await;

        let port = redis.port;
        let asleep =
            tokio::spawn(async move { redis_command(port, &["DEBUG", "SLEEP", "10"]).await });
        // Pacing only: the command reaches Redis in microseconds.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!asleep.is_finished(), "Redis is asleep");

        cal.assert_answers_ping("while-redis-sleeps").await;
        ann.publish("room", "stalled", json!({"stalled": true}))
            .await;
        let answer = ann.answer("stalled").await;
        assert!(
            !asleep.is_finished(),
            "the publish was answered only once Redis woke up: {answer}"
        );
        assert_eq!(answer["type"], "error", "{answer}");
        assert_eq!(answer["code"], "unavailable", "{answer}");

        within("Redis to wake up", asleep)
            .await
            .expect("the DEBUG SLEEP task");
        // A client publishes again after `unavailable` until it is taken.
        within("a publish to be taken again", async {
            for attempt in 0.. {
                let id = format!("after-{attempt}");
                let answer = ann
                    .request(json!({"type": "publish", "room": "room", "id": id,
                        "data": {"after": attempt}}))
                    .await;
                if answer["type"] == "ack" {
                    return;
                }
                assert_eq!(answer["code"], "unavailable", "{answer}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
        .await;
        api_publish(&b, "room", json!({"fence": true})).await;
        let mut seen = Vec::new();
        for client in [&mut ann, &mut bob] {
            let messages = client.messages_until_fence("room").await;
            assert_consecutive(&client.user, &messages, 4);
            let stalled = messages.iter().filter(|m| m["data"]["stalled"] == true);
            assert!(stalled.count() <= 1, "{}: {messages:?}", client.user);
            let data: Vec<Value> = messages.iter().map(|m| m["data"].clone()).collect();
            seen.push(data);
            client.assert_no_more_messages().await;
        }
        assert_eq!(seen[0], seen[1], "both members got the same messages");
    });
}

/// A node dies after Redis ran a client's publish but before the client
/// heard back (the proxy swallows Redis's answers to node a, which is then
/// killed). The client reconnects through node b and sends the publish
/// again with the same `idempotency_key`: it is acked and not published
/// twice, and its `since` replay shows it took effect. The HTTP API's key
/// does the same for a backend that retries a publish.
#[test]
fn a_publish_retried_through_another_node_after_a_node_died_is_not_duplicated() {
    run(async {
        let test = "retry-after-node-death";
        let (pair, proxy) = Pair::start_proxied(test, &[], 1).await;
        let Pair {
            mut a,
            b,
            mut ann,
            mut bob,
            epoch,
            ..
        } = pair;

        proxy.mute_commands();
        let publish = |id: &str| {
            json!({"type": "publish", "room": "room", "id": id, "data": {"once": true},
                "idempotency_key": "ann-msg-1"})
        };
        ann.send(publish("first-try")).await;
        let landed = bob.next_message().await;
        assert_eq!((seq(&landed), &landed["data"]), (2, &json!({"once": true})));
        a.kill(); // before its command timeout: ann never hears back
        within("ann's connection to close", async {
            while let Some(Ok(_)) = ann.ws.next().await {}
        })
        .await;

        let mut ann = Client::connect(&b, "ann").await;
        let (replay, joined) = ann.join_since("room", Some((1, &epoch))).await;
        assert_eq!(joined["recovered"], true, "{joined}");
        assert_eq!(replay.len(), 1, "{replay:?}");
        let answer = ann.request(publish("retry")).await;
        assert_eq!(answer["type"], "ack", "{answer}");

        // A key that is not a 1-64 byte string is refused, and nothing is
        // published (the fence below comes right after the one API message).
        for bad in [json!(""), json!("k".repeat(65)), json!(9)] {
            let body = json!({"room": "room", "data": {"bad": true}, "idempotency_key": bad});
            let (status, answer) = http_post(b.port, "/api/publish", &body).await;
            assert_eq!(status, 400, "{answer}");
            assert_eq!(answer["error"]["code"], "invalid_frame", "{answer}");
        }
        let api_once = json!({"room": "room", "data": {"api": true}, "idempotency_key": "job-9"});
        let (status, first) = http_post(b.port, "/api/publish", &api_once).await;
        assert_eq!(status, 200, "{first}");
        let (status, again) = http_post(b.port, "/api/publish", &api_once).await;
        assert_eq!(status, 200, "{again}");
        assert_eq!(first, again, "the retry answers with the first one's place");

        api_publish(&b, "room", json!({"fence": true})).await;
        for client in [&mut ann, &mut bob] {
            let messages = client.messages_until_fence("room").await;
            assert_consecutive(&client.user, &messages, 3);
            assert_eq!(messages.len(), 2, "{}: {messages:?}", client.user);
            assert_eq!(messages[0]["data"]["api"], true, "{}", client.user);
        }
    });
}

/// Node a is cut off from Redis (a partition: its connections, open and
/// new, go silent, nothing is closed or refused) for longer than
/// `--redis-node-ttl-ms`. Node b takes it for dead and announces ann's
/// leave; once the partition heals, node a notices it was reaped, records
/// ann again with a join announcement (counts heal on node b), and ann gets
/// what was published meanwhile, once and in order.
#[test]
fn a_node_cut_off_past_its_ttl_records_its_presence_again() {
    run(async {
        let test = "cut-off";
        let args = ["--redis-node-ttl-ms", "1000"];
        let (pair, proxy) = Pair::start_proxied(test, &args, 2).await;
        let Pair {
            mut a,
            mut b,
            mut ann,
            mut bob,
            epoch,
            ..
        } = pair;

        proxy.partition(true);
        let left = bob.next_presence("room").await;
        assert_presence(&left, "leave", "ann", 1, "bob");
        for i in 3..=4 {
            api_publish(&b, "room", json!({"during": i})).await;
        }
        // Past the node TTL again: the partition outlasts the reap.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        proxy.partition(false);

        let back = bob.next_presence("room").await;
        assert_presence(&back, "join", "ann", 2, "bob");
        bob.wait_for_members("room", &["ann", "bob"]).await;
        api_publish(&b, "room", json!({"fence": true})).await;
        let messages = ann.messages_until_fence("room").await;
        assert_consecutive("ann", &messages, 3);
        assert_eq!(messages.len(), 3, "{messages:?}");
        assert_eq!(messages[0]["epoch"], epoch.as_str());
        ann.assert_no_more_messages().await;
        a.assert_running();
        b.assert_running();
    });
}

/// A session's publishes are pipelined (sent without waiting for their
/// answers) yet sequenced in the order it sent them, their acks come in
/// that order, and a frame that is not a publish, sent right after them, is
/// answered after them all.
#[test]
fn pipelined_publishes_are_answered_in_order_before_the_next_frame() {
    run(async {
        let test = "pipelined";
        let redis = Redis::start(test).await;
        let mut a = Node::start(test, "a", &redis, &[]).await;
        let mut b = Node::start(test, "b", &redis, &[]).await;
        let mut publisher = Client::connect(&a, "pub").await;
        let mut member = Client::connect(&b, "member").await;
        publisher.join("room").await;
        member.join("room").await;

        const COUNT: u64 = 100;
        for i in 0..COUNT {
            let frame = json!({"type": "publish", "room": "room", "id": format!("p{i}"),
                "data": {"i": i}});
            publisher.send(frame).await;
        }
        publisher.send(json!({"type": "ping", "id": "after"})).await;
        let mut answers = Vec::new();
        within("every answer", async {
            while answers.last() != Some(&"after".to_owned()) {
                let frame = publisher.read().await;
                if frame["type"] == "ack" || frame["type"] == "error" {
                    assert_eq!(frame["type"], "ack", "{frame}");
                    answers.push(frame["id"].as_str().expect("an id").to_owned());
                }
            }
        })
        .await;
        let mut expected: Vec<String> = (0..COUNT).map(|i| format!("p{i}")).collect();
        expected.push("after".into());
        assert_eq!(answers, expected);

        let messages = member.messages_through(COUNT).await;
        assert_consecutive("member", &messages, 1);
        let order: Vec<u64> = messages
            .iter()
            .map(|m| m["data"]["i"].as_u64().expect("data.i"))
            .collect();
        assert_eq!(order, (0..COUNT).collect::<Vec<_>>());
        member.assert_no_more_messages().await;
        a.assert_running();
        b.assert_running();
    });
}
