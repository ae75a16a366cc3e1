//! Nodes finding Redis through Sentinel (`--redis-sentinel`): a master, a
//! replica of it and one Sentinel (quorum 1) are real `redis-server`
//! processes; two nodes connect through the Sentinel and share a room. The
//! master is killed (SIGKILL); once the Sentinel has promoted the replica,
//! the nodes reconnect to it, tell their members `recovered: false` once
//! (a new master starts a new epoch) and publish and deliver again.
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
    match command_on(port, &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", "m"]).await {
        Resp::Array(Some(items)) => match items.get(1) {
            Some(Resp::Bulk(Some(p))) => String::from_utf8_lossy(p).parse().ok(),
            _ => None,
        },
        _ => None,
    }
}

/// How many replicas of `m` the Sentinel on `port` knows.
async fn known_replicas(port: u16) -> usize {
    match command_on(port, &["SENTINEL", "REPLICAS", "m"]).await {
        Resp::Array(Some(items)) => items.len(),
        _ => 0,
    }
}

async fn info(port: u16, section: &str) -> String {
    match command_on(port, &["INFO", section]).await {
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

#[test]
fn nodes_follow_a_sentinel_failover() {
    run(async {
        let test = "sentinel";
        let mut master = Redis::start("sentinel-master").await;
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

        let sentinel_url = format!("redis://127.0.0.1:{}", sentinel.port);
        let flags = [
            "--redis-sentinel",
            &sentinel_url,
            "--redis-sentinel-master",
            "m",
        ];
        let n1 = Node::start_args(test, "n1", &flags).await;
        let n2 = Node::start_args(test, "n2", &flags).await;
        let mut ann = Client::connect(&n1, "ann").await;
        let mut bob = Client::connect(&n2, "bob").await;
        ann.join("hall").await;
        bob.join("hall").await;
        let old_epoch = publish_first(&n1, "hall", 2, &mut [&mut ann, &mut bob]).await;
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
        let answer: Value = within("a publish through the new master", async {
            loop {
                let (status, answer) = http_post(
                    n2.port,
                    "/api/publish",
                    &json!({"room": "hall", "data": {"after": "failover"}}),
                )
                .await;
                if status == 200 {
                    return answer;
                }
                assert_eq!(answer["error"]["code"], "unavailable", "{answer}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
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
        let seq = command_on(replica.port, &["GET", "sb:{hall}:seq"]).await;
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
