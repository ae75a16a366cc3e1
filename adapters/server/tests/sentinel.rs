//! Nodes finding Redis through Sentinel (`--redis-sentinel`): a master, a
//! replica of it and one Sentinel (quorum 1) are real `redis-server`
//! processes; two nodes connect through the Sentinel and share a room. The
//! master is killed (SIGKILL); once the Sentinel has promoted the replica,
//! the nodes reconnect to it, tell their members `recovered: false` once
//! (a new master starts a new epoch) and publish and deliver again. A
//! planned failover (`SENTINEL FAILOVER`, the old master left running as a
//! replica) is followed the same way.
//!
//! Processes are owned by guards that kill them on drop; every wait is
//! bounded by [`WAIT`]; nothing asserts on timing. Logs:
//! `$CARGO_TARGET_TMPDIR/cluster/<test>-<name>.log`.

mod support;

use std::time::Duration;

use serde_json::{json, Value};

use support::*;

/// The master the Sentinel on `port` names for `m`: its port.
async fn master_port(port: u16) -> Option<u16> {
    match redis_command(port, &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", "m"]).await {
        Resp::Array(Some(items)) => match items.get(1) {
            Some(Resp::Bulk(Some(p))) => String::from_utf8_lossy(p).parse().ok(),
            _ => None,
        },
        _ => None,
    }
}

/// How many replicas of `m` the Sentinel on `port` knows.
async fn known_replicas(port: u16) -> usize {
    match redis_command(port, &["SENTINEL", "REPLICAS", "m"]).await {
        Resp::Array(Some(items)) => items.len(),
        _ => 0,
    }
}

async fn info(port: u16, section: &str) -> String {
    match redis_command(port, &["INFO", section]).await {
        Resp::Bulk(Some(text)) => String::from_utf8_lossy(&text).into_owned(),
        other => panic!("INFO {section}: {other:?}"),
    }
}

/// Waits until `probe` holds, polling.
async fn until<F: std::future::Future<Output = bool>>(what: &str, probe: impl Fn() -> F) {
    within(what, async {
        while !probe().await {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
}

/// A master, its replica (in sync) and one Sentinel watching them as `m`
/// (quorum 1, down after 1 s).
struct Deployment {
    master: Redis,
    replica: RedisProcess,
    sentinel: RedisProcess,
}

async fn deploy(test: &str) -> Deployment {
    {
        let master = Redis::start(&format!("{test}-master")).await;
        let master_at = master.port;
        let dir = log_path(test, "data");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the data directory");
        let replica = RedisProcess::start(test, "replica", |port| {
            let port = port.to_string();
            let master = master_at.to_string();
            let mut args: Vec<String> = ["--port", &port, "--bind", "127.0.0.1"]
                .iter()
                .map(|s| (*s).to_owned())
                .collect();
            args.extend(
                [
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--replicaof",
                    "127.0.0.1",
                    &master,
                ]
                .iter()
                .map(|s| (*s).to_owned()),
            );
            args.extend(["--dir".to_owned(), dir.display().to_string()]);
            args
        })
        .await;
        until("the replica to sync with the master", || async {
            info(replica.port, "replication")
                .await
                .contains("master_link_status:up")
        })
        .await;
        let sentinel = RedisProcess::start(test, "sentinel", |port| {
            // Sentinel rewrites its configuration file: one per port.
            let conf = dir.join(format!("sentinel-{port}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {}\n\
                     sentinel monitor m 127.0.0.1 {master_at} 1\n\
                     sentinel down-after-milliseconds m 1000\n\
                     sentinel failover-timeout m 5000\n",
                    dir.display()
                ),
            )
            .expect("write the Sentinel configuration");
            vec![conf.display().to_string(), "--sentinel".to_owned()]
        })
        .await;
        until(
            "the Sentinel to know the master and the replica",
            || async {
                master_port(sentinel.port).await == Some(master_at)
                    && known_replicas(sentinel.port).await == 1
            },
        )
        .await;
        Deployment {
            master,
            replica,
            sentinel,
        }
    }
}

/// Two nodes through the Sentinel, a member on each in room `hall`, and
/// two messages published; returns them and the room's epoch.
async fn nodes_and_members(
    test: &str,
    sentinel: &RedisProcess,
) -> ([Node; 2], [Client; 2], String) {
    let sentinel_url = format!("redis://127.0.0.1:{}", sentinel.port);
    let flags = [
        "--redis-sentinel",
        &sentinel_url,
        "--redis-sentinel-master",
        "m",
    ];
    let n1 = Node::start_args(test, "n1", &flags, &[]).await;
    let n2 = Node::start_args(test, "n2", &flags, &[]).await;
    let mut ann = Client::connect(&n1, "ann").await;
    let mut bob = Client::connect(&n2, "bob").await;
    ann.join("hall").await;
    bob.join("hall").await;
    let epoch = publish_first(&n1, "hall", 2, &mut [&mut ann, &mut bob]).await;
    ([n1, n2], [ann, bob], epoch)
}

/// Publishes through `node` until it succeeds (the node is finding the
/// new master meanwhile: `unavailable`); the answer.
async fn publish_when_available(node: &Node, data: Value) -> Value {
    within("a publish through the new master", async {
        loop {
            let (status, answer) = http_post(
                node.port,
                "/api/publish",
                &json!({"room": "hall", "data": data}),
            )
            .await;
            if status == 200 {
                return answer;
            }
            assert_eq!(answer["error"]["code"], "unavailable", "{answer}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
}

/// The master is killed (SIGKILL): once the Sentinel promoted the replica,
/// both nodes reconnect to it, their members are told `recovered: false`
/// once (a new epoch), and publishes through either node reach both.
#[test]
fn nodes_follow_a_sentinel_failover() {
    run(async {
        let test = "sentinel";
        let Deployment {
            mut master,
            replica,
            sentinel,
        } = deploy(test).await;
        let ([_n1, n2], [mut ann, mut bob], old_epoch) = nodes_and_members(test, &sentinel).await;
        // The room is on the master the Sentinel named.
        assert_eq!(
            master.string(&["GET", "sb:{hall}:seq"]).await.as_deref(),
            Some("2")
        );

        master.stop();
        until("the Sentinel to promote the replica", || async {
            master_port(sentinel.port).await == Some(replica.port)
        })
        .await;

        // Both nodes reconnect to the new master and catch up: it is
        // another Redis run, so a new epoch, told once.
        for client in [&mut ann, &mut bob] {
            let reset = client
                .wait_for("the reset after the failover", |f| {
                    f["type"] == "joined" && f["room"] == "hall"
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
        let answer = publish_when_available(&n2, json!({"after": "failover"})).await;
        assert_ne!(answer["epoch"], old_epoch.as_str(), "{answer}");
        for client in [&mut ann, &mut bob] {
            let message = client.next_message().await;
            assert_eq!(
                message["data"]["after"], "failover",
                "{}: {message}",
                client.user
            );
            assert_eq!(
                message["epoch"], answer["epoch"],
                "{}: {message}",
                client.user
            );
            assert_eq!(message["seq"], answer["seq"], "{}: {message}", client.user);
        }
        // The promoted replica holds the room now.
        let seq = redis_command(replica.port, &["GET", "sb:{hall}:seq"]).await;
        assert_eq!(
            seq,
            Resp::Bulk(Some(answer["seq"].to_string().into_bytes())),
            "{answer}"
        );
        // A client publishes through the new master too.
        ann.publish("hall", "p-after", json!({"from": "ann"})).await;
        assert_eq!(ann.answer("p-after").await["type"], "ack");
        let message = bob.next_message().await;
        assert_eq!(message["data"]["from"], "ann", "{message}");
    });
}

/// A planned failover (`SENTINEL FAILOVER`): the old master stays up and
/// becomes a replica (the Sentinel closes its clients' connections; one
/// that stayed would have its writes refused `READONLY`, which drops it
/// too). Nodes find the new master, and every member gets
/// what is published there: the message itself, or `joined` with
/// `recovered: false` at or past it (the new master is a new epoch), and
/// what follows it in order.
#[test]
fn nodes_follow_a_planned_sentinel_failover() {
    run(async {
        let test = "sentinel-planned";
        let Deployment {
            master,
            replica,
            sentinel,
        } = deploy(test).await;
        let ([n1, n2], mut clients, old_epoch) = nodes_and_members(test, &sentinel).await;

        let answer = redis_command(sentinel.port, &["SENTINEL", "FAILOVER", "m"]).await;
        assert_eq!(answer, Resp::Simple("OK".into()), "{answer:?}");
        until("the Sentinel to promote the replica", || async {
            master_port(sentinel.port).await == Some(replica.port)
        })
        .await;
        until("the old master to be a replica", || async {
            info(master.port, "replication")
                .await
                .contains("role:slave")
        })
        .await;

        let answer = publish_when_available(&n1, json!({"after": "failover"})).await;
        let epoch = answer["epoch"].as_str().expect("epoch").to_owned();
        let at = answer["seq"].as_u64().expect("seq");
        assert_ne!(epoch, old_epoch, "{answer}");
        for client in &mut clients {
            let got = client
                .wait_for("the message or a reset past it", |f| {
                    f["room"] == "hall"
                        && f["epoch"] == epoch.as_str()
                        && (f["type"] == "message"
                            || (f["type"] == "joined" && f["seq"].as_u64() >= Some(at)))
                })
                .await;
            if got["type"] == "joined" {
                assert_eq!(got["recovered"], false, "{}: {got}", client.user);
            } else {
                assert_eq!(got["seq"], at, "{}: {got}", client.user);
            }
        }
        let next = publish_when_available(&n2, json!({"fence": true})).await;
        assert_eq!(next["epoch"], epoch.as_str(), "{next}");
        for client in &mut clients {
            let message = client
                .wait_for("the next message", |f| {
                    f["type"] == "message" && f["data"]["fence"] == true
                })
                .await;
            assert_eq!(
                (&message["seq"], &message["epoch"]),
                (&next["seq"], &next["epoch"]),
                "{}: {message}",
                client.user
            );
        }
        // The new master holds the room.
        assert_eq!(
            redis_command(replica.port, &["GET", "sb:{hall}:seq"]).await,
            Resp::Bulk(Some(next["seq"].to_string().into_bytes()))
        );
    });
}
