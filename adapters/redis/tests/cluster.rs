//! The Redis broker on a real Redis Cluster of three masters (started here
//! with `redis-server --cluster-enabled yes` on free 127.0.0.1 ports and
//! `redis-cli --cluster create`; killed on drop): room messages, presence
//! events and direct messages reach another node for rooms on every
//! master, over sharded pub/sub (the default on Redis 7) and over classic
//! pub/sub.
//!
//! Two `RedisBroker`s stand for two nodes. Every wait is bounded; nothing
//! asserts on timing.

use std::future::Future;
use std::net::{Ipv4Addr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use switchboard_core::{RoomName, Sid, UserId};
use switchboard_redis::RedisBroker;
use switchboard_runtime::broker::{
    Broker, BrokerEvent, Channel, DirectTo, PresenceUpdate, PublishRequest,
};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(300);

async fn within<F: Future>(what: &str, future: F) -> F::Output {
    match tokio::time::timeout(WAIT, future).await {
        Ok(output) => output,
        Err(_) => panic!("timed out after {WAIT:?}: {what}"),
    }
}

fn run(test: impl Future<Output = ()>) {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(test);
}

/// Three cluster masters, no replicas, no persistence; killed on drop.
struct Cluster {
    ports: Vec<u16>,
    children: Vec<Child>,
    dir: PathBuf,
}

impl Cluster {
    async fn start(name: &str) -> Self {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("redis-cluster-{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the cluster directory");
        let mut cluster = Self {
            ports: Vec::new(),
            children: Vec::new(),
            dir,
        };
        let mut tries = 0;
        while cluster.ports.len() < 3 {
            tries += 1;
            assert!(tries < 20, "redis-server would not start on free ports");
            let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                .and_then(|l| l.local_addr())
                .expect("bind 127.0.0.1:0")
                .port();
            // The cluster bus listens on port + 10000.
            if port >= 55_000 || TcpListener::bind((Ipv4Addr::LOCALHOST, port + 10_000)).is_err() {
                continue;
            }
            let mut child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes", "--cluster-config-file"])
                .arg(cluster.dir.join(format!("nodes-{port}.conf")))
                .args(["--save", "", "--appendonly", "no", "--dir"])
                .arg(&cluster.dir)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server is installed (apt-get install -y redis-server)");
            let up = within("a cluster redis-server to answer", async {
                loop {
                    if let Ok(Some(_)) = child.try_wait() {
                        return false; // a port was taken meanwhile
                    }
                    if connection(port).await.is_some() {
                        return true;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
            .await;
            if up {
                cluster.ports.push(port);
                cluster.children.push(child);
            } else {
                let _ = child.wait();
            }
        }
        let mut create = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(cluster.ports.iter().map(|p| format!("127.0.0.1:{p}")))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run redis-cli --cluster create");
        let status = within("redis-cli --cluster create", async {
            loop {
                if let Ok(Some(status)) = create.try_wait() {
                    return status;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(status.success(), "redis-cli --cluster create failed");
        for &port in &cluster.ports {
            within("the cluster state to be ok", async {
                loop {
                    let info: String = query(port, &["CLUSTER", "INFO"]).await;
                    if info.contains("cluster_state:ok") {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
            .await;
        }
        cluster
    }

    fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// The index of the master serving `key` (the others answer `MOVED`).
    async fn owner(&self, key: &str) -> usize {
        let mut owners = Vec::new();
        for (index, &port) in self.ports.iter().enumerate() {
            let mut con = connection(port).await.expect("a connection");
            let exists: redis::RedisResult<i64> =
                redis::cmd("EXISTS").arg(key).query_async(&mut con).await;
            if exists.is_ok() {
                owners.push(index);
            }
        }
        assert_eq!(owners.len(), 1, "{key}: served by {owners:?}");
        owners[0]
    }

    /// One room name served by each master, in master order.
    async fn room_per_master(&self, prefix: &str) -> Vec<RoomName> {
        let mut rooms: Vec<Option<RoomName>> = vec![None; self.ports.len()];
        for i in 0..1000 {
            if rooms.iter().all(Option::is_some) {
                break;
            }
            let name = format!("{prefix}{i}");
            let owner = self.owner(&format!("sb:{{{name}}}:seq")).await;
            rooms[owner].get_or_insert_with(|| RoomName::new(name.as_str()).expect("a room name"));
        }
        rooms
            .into_iter()
            .map(|r| r.expect("a room for every master"))
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn connection(port: u16) -> Option<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
    let mut con = client.get_multiplexed_async_connection().await.ok()?;
    let pong: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut con).await;
    pong.ok().map(|_| con)
}

async fn query<T: redis::FromRedisValue>(port: u16, args: &[&str]) -> T {
    let mut con = connection(port).await.expect("a Redis connection");
    let mut cmd = redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    cmd.query_async(&mut con)
        .await
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

/// A started broker on the cluster, and what it hears.
struct Node {
    broker: RedisBroker,
    events: mpsc::Receiver<BrokerEvent>,
}

impl Node {
    async fn start(cluster: &Cluster, sharded: bool) -> Self {
        let broker = RedisBroker::cluster(&cluster.urls())
            .expect("Redis URLs")
            .sharded_pubsub(sharded);
        assert!(broker.is_cluster());
        let (tx, events) = mpsc::channel(1024);
        within("the broker to start", broker.start(tx))
            .await
            .expect("the broker starts");
        Self { broker, events }
    }

    /// Subscribes, once the pub/sub connection is up.
    async fn subscribe(&self, channel: Channel) {
        within("subscribing", async {
            while self.broker.subscribe(&channel).await.is_err() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    }

    async fn next_event(&mut self) -> BrokerEvent {
        within("a broker event", self.events.recv())
            .await
            .expect("the broker runs")
    }
}

/// Node b publishes to a room on every master, records a user's presence
/// there and sends a direct message; node a, subscribed, hears all of it,
/// each room's messages in seq order. `sharded`: over sharded pub/sub.
async fn every_kind_of_event_crosses_nodes(sharded: bool) {
    let cluster = Cluster::start(if sharded { "sharded" } else { "classic" }).await;
    let rooms = cluster.room_per_master("room").await;
    let mut a = Node::start(&cluster, sharded).await;
    let b = Node::start(&cluster, sharded).await;
    for room in &rooms {
        a.subscribe(Channel::Room(room.clone())).await;
    }
    a.subscribe(Channel::User(UserId::from("ann"))).await;

    for room in &rooms {
        for i in 1..=3u64 {
            let key = format!("{room}-{i}");
            let request = PublishRequest {
                room,
                body: r#""data":null"#,
                exclude: None,
                history: 10,
                history_ttl: TTL,
                new_epoch: "fresh",
                key: &key,
            };
            let (seq, _) = within("a publish", b.broker.publish(request))
                .await
                .expect("published");
            assert_eq!(seq, i, "{room}");
        }
        let user = UserId::from("bob");
        let subject = Sid::from("s");
        let update = PresenceUpdate {
            room,
            user: &user,
            present: true,
            subject: &subject,
            announce: true,
            quiet: false,
            history_ttl: TTL,
        };
        let count = within("a presence update", b.broker.presence(update))
            .await
            .expect("presence recorded");
        assert_eq!(count, 1, "{room}");
    }
    let delivered = within(
        "a direct",
        b.broker.direct(
            &DirectTo::User(UserId::from("ann")),
            &bytes::Bytes::from_static(b"{}"),
        ),
    )
    .await
    .expect("sent");
    assert_eq!(delivered, 1);

    let mut seqs: Vec<Vec<u64>> = vec![Vec::new(); rooms.len()];
    let mut joins = vec![0; rooms.len()];
    let mut directs = 0;
    while seqs.iter().any(|s| s.len() < 3) || joins.iter().any(|j| *j < 1) || directs < 1 {
        match a.next_event().await {
            BrokerEvent::Message { room, seq, .. } => {
                let at = rooms.iter().position(|r| *r == room).expect("a known room");
                seqs[at].push(seq);
            }
            BrokerEvent::Presence { room, frame, .. } => {
                let at = rooms.iter().position(|r| *r == room).expect("a known room");
                let frame = String::from_utf8_lossy(&frame).into_owned();
                assert!(frame.contains(r#""action":"join""#), "{frame}");
                joins[at] += 1;
            }
            BrokerEvent::Direct { to, .. } => {
                assert_eq!(to, DirectTo::User(UserId::from("ann")));
                directs += 1;
            }
            _ => {}
        }
    }
    for (room, seqs) in rooms.iter().zip(&seqs) {
        assert_eq!(seqs, &[1, 2, 3], "{room}");
    }
    assert_eq!(joins, vec![1; rooms.len()]);

    // The channels are where the mode says: sharded on each room's master,
    // or classic.
    for (master, room) in rooms.iter().enumerate() {
        let port = cluster.ports[master];
        if sharded {
            let channel = format!("sb:{{{room}}}:ch");
            let (_, n): (String, i64) = query(port, &["PUBSUB", "SHARDNUMSUB", &channel]).await;
            assert_eq!(n, 1, "{channel} on master {master}");
        } else {
            let channels: Vec<String> = query(port, &["PUBSUB", "SHARDCHANNELS"]).await;
            assert!(channels.is_empty(), "{channels:?}");
        }
    }
    if !sharded {
        let mut subscribed = Vec::new();
        for &port in &cluster.ports {
            subscribed.extend(query::<Vec<String>>(port, &["PUBSUB", "CHANNELS", "sb:r:*"]).await);
        }
        subscribed.sort();
        let mut expected: Vec<String> = rooms.iter().map(|r| format!("sb:r:{r}")).collect();
        expected.sort();
        assert_eq!(subscribed, expected);
    }
}

#[test]
fn sharded_pubsub_carries_messages_presence_and_directs() {
    run(every_kind_of_event_crosses_nodes(true));
}

#[test]
fn classic_pubsub_in_a_cluster_carries_messages_presence_and_directs() {
    run(every_kind_of_event_crosses_nodes(false));
}
