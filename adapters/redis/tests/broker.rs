//! The Redis broker against a real `redis-server` (started here, on a free
//! 127.0.0.1 port; CI installs it): presence is idempotent per node, a
//! room's history does not expire while it has users, and a resync that
//! cannot replay moves the room to one new epoch for every node.
//!
//! Two `RedisBroker`s stand for two nodes; a `ShardedBroker` over two
//! Redis routes rooms and reassembles `positions`. Every wait is bounded; nothing
//! asserts on timing.

use std::future::Future;
use std::net::{Ipv4Addr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use switchboard_core::{Epoch, RoomName, Sid, UserId};
use switchboard_redis::{RedisBroker, ShardedBroker};
use switchboard_runtime::broker::{
    Broker, BrokerEvent, Channel, PresenceUpdate, PublishRequest, RoomState,
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

/// A `redis-server` child with no persistence; killed on drop.
struct Redis {
    port: u16,
    child: Child,
}

impl Redis {
    async fn start() -> Self {
        for _ in 0..5 {
            let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                .and_then(|l| l.local_addr())
                .expect("bind 127.0.0.1:0")
                .port();
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn();
            let child = match child {
                Ok(child) => child,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                    "redis-server is not installed, and these tests need a real Redis: \
                     install it with `apt-get install -y redis-server`"
                ),
                Err(e) => panic!("cannot start redis-server: {e}"),
            };
            let mut redis = Self { port, child };
            let ready = within("redis-server to answer", async {
                loop {
                    if let Ok(Some(_)) = redis.child.try_wait() {
                        return false; // the port was taken
                    }
                    if redis.connection().await.is_some() {
                        return true;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
            .await;
            if ready {
                return redis;
            }
        }
        panic!("redis-server would not start on a free port");
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn connection(&self) -> Option<redis::aio::MultiplexedConnection> {
        let client = redis::Client::open(self.url()).ok()?;
        let mut con = client.get_multiplexed_async_connection().await.ok()?;
        let pong: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut con).await;
        pong.ok().map(|_| con)
    }

    async fn query<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        let mut con = self.connection().await.expect("a Redis connection");
        let mut cmd = redis::cmd(args[0]);
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        cmd.query_async(&mut con)
            .await
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A node: a started broker and what it hears.
struct Node {
    broker: RedisBroker,
    events: mpsc::Receiver<BrokerEvent>,
}

impl Node {
    async fn start(redis: &Redis) -> Self {
        Self::start_with(redis, Duration::from_secs(10), 1024).await
    }

    async fn start_with_ttl(redis: &Redis, node_ttl: Duration) -> Self {
        Self::start_with(redis, node_ttl, 1024).await
    }

    /// A node whose runtime takes at most `intake` events before it reads.
    async fn start_with_intake(redis: &Redis, intake: usize) -> Self {
        Self::start_with(redis, Duration::from_secs(10), intake).await
    }

    async fn start_with(redis: &Redis, node_ttl: Duration, intake: usize) -> Self {
        let broker = RedisBroker::new(&redis.url())
            .expect("a Redis URL")
            .node_ttl(node_ttl);
        let (tx, events) = mpsc::channel(intake);
        within("the broker to start", broker.start(tx))
            .await
            .expect("the broker starts");
        Self { broker, events }
    }

    async fn presence(&self, room: &RoomName, user: &str, present: bool) -> usize {
        let user = UserId::from(user);
        let subject = Sid::from("s");
        let update = PresenceUpdate {
            room,
            user: &user,
            present,
            subject: &subject,
            announce: true,
            quiet: false,
            history_ttl: TTL,
        };
        within("a presence update", self.broker.presence(update))
            .await
            .expect("presence recorded")
    }

    async fn publish(&self, room: &RoomName, history: usize, ttl: Duration) -> (u64, String) {
        static KEYS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let key = KEYS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.publish_keyed(room, history, ttl, &key.to_string())
            .await
    }

    async fn publish_keyed(
        &self,
        room: &RoomName,
        history: usize,
        ttl: Duration,
        key: &str,
    ) -> (u64, String) {
        let request = PublishRequest {
            room,
            body: r#""data":null"#,
            exclude: None,
            history,
            history_ttl: ttl,
            new_epoch: "fresh",
            key,
        };
        let (seq, epoch) = within("a publish", self.broker.publish(request))
            .await
            .expect("published");
        (seq, epoch.as_str().to_owned())
    }

    async fn resync(&self, room: &RoomName, since: (u64, &str), new_epoch: &str) -> RoomState {
        let fetch = self.broker.resync_state(room, Some(since), new_epoch, TTL);
        within("a resync", fetch).await.expect("the room's state")
    }

    /// The presence events heard on `room` until the message published
    /// after them arrives.
    async fn presence_events_until_fence(&mut self, room: &RoomName) -> Vec<String> {
        self.publish(room, 10, TTL).await;
        let mut events = Vec::new();
        within("the fence message", async {
            loop {
                match self.events.recv().await.expect("the broker runs") {
                    BrokerEvent::Presence { frame, .. } => {
                        events.push(String::from_utf8_lossy(&frame).into_owned());
                    }
                    BrokerEvent::Message { .. } => return,
                    _ => {}
                }
            }
        })
        .await;
        events
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

fn room(name: &str) -> RoomName {
    RoomName::new(name).expect("a room name")
}

/// A leave from a node that never recorded the user (a refused join whose
/// record never landed) changes nothing: the other node's record stays and
/// no leave is announced. Repeats change nothing either; the last node's
/// leave is the one announced.
#[test]
fn presence_is_idempotent_per_node() {
    run(async {
        let redis = Redis::start().await;
        let mut a = Node::start(&redis).await;
        let b = Node::start(&redis).await;
        let hall = room("hall");
        // The pub/sub connection comes up a moment after `start`.
        within("subscribing", async {
            while a
                .broker
                .subscribe(&Channel::Room(hall.clone()))
                .await
                .is_err()
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;

        assert_eq!(b.presence(&hall, "ann", true).await, 1);
        let joins = a.presence_events_until_fence(&hall).await;
        assert_eq!(joins.len(), 1, "{joins:?}");
        assert!(joins[0].contains(r#""action":"join""#), "{joins:?}");

        // A's undo of a join it never recorded.
        assert_eq!(a.presence(&hall, "ann", false).await, 1);
        assert_eq!(
            redis
                .query::<Option<i64>>(&["HGET", "sb:{hall}:users", "ann"])
                .await,
            Some(1)
        );
        assert!(a.presence_events_until_fence(&hall).await.is_empty());

        // Recorded on A too, twice: one more node, no announcement.
        assert_eq!(a.presence(&hall, "ann", true).await, 1);
        assert_eq!(a.presence(&hall, "ann", true).await, 1);
        assert_eq!(
            redis
                .query::<Option<i64>>(&["HGET", "sb:{hall}:users", "ann"])
                .await,
            Some(2)
        );
        // Removed from B twice: A still has ann.
        assert_eq!(b.presence(&hall, "ann", false).await, 1);
        assert_eq!(b.presence(&hall, "ann", false).await, 1);
        assert!(a.presence_events_until_fence(&hall).await.is_empty());
        // A's leave is the last: announced once.
        assert_eq!(a.presence(&hall, "ann", false).await, 0);
        assert_eq!(a.presence(&hall, "ann", false).await, 0);
        let leaves = a.presence_events_until_fence(&hall).await;
        assert_eq!(leaves.len(), 1, "{leaves:?}");
        assert!(leaves[0].contains(r#""action":"leave""#), "{leaves:?}");
    });
}

/// A room's seq, epoch and history do not expire while a node has a user
/// in it, however long since its last message; once its last user leaves
/// (on any node), they expire after its `history_ttl`.
#[test]
fn room_state_expires_only_once_the_room_has_no_user() {
    run(async {
        let redis = Redis::start().await;
        let a = Node::start(&redis).await;
        let b = Node::start(&redis).await;
        let quiet = room("quiet");
        let keys = ["sb:{quiet}:seq", "sb:{quiet}:epoch", "sb:{quiet}:log"];
        let short = Duration::from_secs(60);

        // No user: the history TTL runs from the last message.
        a.publish(&quiet, 10, short).await;
        for key in keys {
            let ttl: i64 = redis.query(&["PTTL", key]).await;
            assert!(ttl > 0, "{key}: {ttl}");
        }
        // Users on two nodes: no expiry, also across publishes.
        a.presence(&quiet, "ann", true).await;
        b.presence(&quiet, "bob", true).await;
        a.publish(&quiet, 10, short).await;
        for key in keys {
            let ttl: i64 = redis.query(&["PTTL", key]).await;
            assert_eq!(ttl, -1, "{key}");
        }
        // One node's user leaves: still no expiry.
        a.presence(&quiet, "ann", false).await;
        for key in keys {
            let ttl: i64 = redis.query(&["PTTL", key]).await;
            assert_eq!(ttl, -1, "{key}");
        }
        // The last user leaves: the room's history_ttl starts.
        b.presence(&quiet, "bob", false).await;
        for key in keys {
            let ttl: i64 = redis.query(&["PTTL", key]).await;
            assert!(ttl > 0 && ttl <= 300_000, "{key}: {ttl}");
        }
    });
}

/// A node's resync from a position whose following messages are no longer
/// kept answers `replay: None` at the room's position, and changes nothing
/// in Redis: the room keeps its epoch and its history (the loss is that
/// node's, which tells its own members). Only a node ahead of the room
/// (Redis lost messages it had delivered) moves it to a new epoch, one for
/// every node.
#[test]
fn a_resync_that_cannot_replay_leaves_the_room_alone() {
    run(async {
        let redis = Redis::start().await;
        let a = Node::start(&redis).await;
        let b = Node::start(&redis).await;
        let lobby = room("lobby");
        let mut first = String::new();
        for _ in 0..6 {
            first = a.publish(&lobby, 2, TTL).await.1;
        }

        // What a node missed is still kept: replayed, same epoch.
        let state = a.resync(&lobby, (4, &first), "new-a").await;
        assert_eq!(state.epoch.as_str(), first);
        assert_eq!(state.replay.as_ref().map(Vec::len), Some(2));

        // From a trimmed position: not replayed, nothing changes in Redis.
        let state = a.resync(&lobby, (1, &first), "second").await;
        assert!(state.replay.is_none());
        assert_eq!((state.seq, state.epoch.as_str()), (6, first.as_str()));
        let stored: String = redis.query(&["GET", "sb:{lobby}:epoch"]).await;
        assert_eq!(stored, first);
        let kept: i64 = redis.query(&["XLEN", "sb:{lobby}:log"]).await;
        assert_eq!(kept, 2, "the history away clients may still recover");
        assert_eq!(a.publish(&lobby, 2, TTL).await, (7, first.clone()));
        // A node that is ahead of the room moves it on, once for every node.
        let state = b.resync(&lobby, (9, &first), "fourth").await;
        assert_eq!(state.epoch.as_str(), "fourth");
        let state = a.resync(&lobby, (9, &first), "fifth").await;
        assert_eq!(state.epoch.as_str(), "fourth");
        // Up to date: nothing changes.
        let state = b.resync(&lobby, (7, "fourth"), "sixth").await;
        assert_eq!(state.epoch.as_str(), "fourth");
        assert_eq!(state.replay.map(|r| r.len()), Some(0));
    });
}

/// With history 0 nothing can be replayed: a node that missed any message
/// gets `replay: None`; the room keeps its epoch either way.
#[test]
fn a_resync_without_history_replays_only_an_empty_gap() {
    run(async {
        let redis = Redis::start().await;
        let a = Node::start(&redis).await;
        let bare = room("bare");
        let (_, epoch) = a.publish(&bare, 0, TTL).await;
        let state = a.resync(&bare, (1, &epoch), "unused").await;
        assert_eq!(state.epoch.as_str(), epoch);
        assert!(state.replay.is_some());
        a.publish(&bare, 0, TTL).await;
        let state = a.resync(&bare, (1, &epoch), "unused-too").await;
        assert_eq!(state.epoch.as_str(), epoch);
        assert!(state.replay.is_none());
    });
}

/// A runtime that falls behind (its events queue full) does not make the
/// broker buffer without bound: what does not fit is dropped, and the
/// runtime is told to catch up (`Reconnected`) before the next message it
/// gets, so the drop is never silent.
#[test]
fn a_full_intake_drops_and_asks_for_a_catch_up() {
    run(async {
        let redis = Redis::start().await;
        let mut a = Node::start_with_intake(&redis, 8).await;
        let lobby = room("lobby");
        subscribe(&a, &lobby).await;
        for _ in 0..50 {
            a.publish(&lobby, 100, TTL).await;
        }
        let mut heard = Vec::new();
        within("a catch-up request", async {
            loop {
                match a.events.recv().await.expect("the broker runs") {
                    BrokerEvent::Message { seq, .. } => heard.push(seq),
                    BrokerEvent::Reconnected => return,
                    _ => {}
                }
            }
        })
        .await;
        assert!(heard.len() <= 8, "held no more than the intake: {heard:?}");
        assert_eq!(heard, (1..=heard.len() as u64).collect::<Vec<_>>());
        let kept: i64 = redis.query(&["XLEN", "sb:{lobby}:log"]).await;
        assert_eq!(kept, 50, "what was dropped is in history, to catch up from");
    });
}

/// Subscribes `node` to `room`'s channel (its pub/sub connection comes up a
/// moment after start).
async fn subscribe(node: &Node, room: &RoomName) {
    within("a subscription", async {
        while node
            .broker
            .subscribe(&Channel::Room(room.clone()))
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// A publish sent again with the same key (a retry whose first try
/// landed) is not published again: the same seq and epoch, one message in
/// history, one fan-out; another key is a new message.
#[test]
fn a_publish_with_a_key_already_used_is_not_published_again() {
    run(async {
        let redis = Redis::start().await;
        let mut a = Node::start(&redis).await;
        let lobby = room("lobby");
        subscribe(&a, &lobby).await;
        let first = a.publish_keyed(&lobby, 10, TTL, "k1").await;
        assert_eq!(a.publish_keyed(&lobby, 10, TTL, "k1").await, first);
        assert_eq!(first.0, 1);
        assert_eq!(a.publish_keyed(&lobby, 10, TTL, "k2").await.0, 2);
        let kept: i64 = redis.query(&["XLEN", "sb:{lobby}:log"]).await;
        assert_eq!(kept, 2);
        let mut seqs = Vec::new();
        while seqs.len() < 2 {
            match within("a fan-out", a.events.recv()).await {
                Some(BrokerEvent::Message { seq, .. }) => seqs.push(seq),
                Some(_) => {}
                None => panic!("the broker stopped"),
            }
        }
        assert_eq!(seqs, [1, 2]);
        assert!(a.events.try_recv().is_err(), "one fan-out per message");
    });
}

/// Node a's id is reaped by node b (its alive key gone, as after a pause)
/// before a's own heartbeat (every 20 s) notices. a's next presence write,
/// under the reaped id, is refused by the room's reaped mark: a takes a new
/// id, tells its runtime (`Reaped`, to record its presence again) and
/// writes under the new id. The old id is gone from the node set and from
/// the room.
#[test]
fn a_presence_write_under_a_reaped_id_goes_on_under_a_new_id() {
    run(async {
        let redis = Redis::start().await;
        let mut a = Node::start_with_ttl(&redis, Duration::from_secs(60)).await;
        let _b = Node::start_with_ttl(&redis, Duration::from_millis(300)).await;
        let hall = room("hall");
        assert_eq!(a.presence(&hall, "ann", true).await, 1);
        let old = a.broker.node_id();
        let index: Vec<String> = redis
            .query(&["SMEMBERS", &format!("sb:node:{old}:rooms")])
            .await;
        assert_eq!(index, ["hall"]);

        redis
            .query::<i64>(&["DEL", &format!("sb:node:{old}:alive")])
            .await;
        within("node b to reap node a", async {
            loop {
                let nodes: Vec<String> = redis.query(&["SMEMBERS", "sb:nodes"]).await;
                let ann: Option<i64> = redis.query(&["HGET", "sb:{hall}:users", "ann"]).await;
                if !nodes.contains(&old) && ann.is_none() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert_eq!(a.broker.node_id(), old, "a noticed by itself");

        // Under the reaped id, refused; under the new one, recorded.
        assert_eq!(a.presence(&hall, "cid", true).await, 1);
        let new = a.broker.node_id();
        assert_ne!(new, old);
        let mine: Vec<String> = redis
            .query(&["HKEYS", &format!("sb:{{hall}}:node:{new}")])
            .await;
        assert_eq!(mine, ["cid"]);
        let gone: i64 = redis
            .query(&["EXISTS", &format!("sb:{{hall}}:node:{old}")])
            .await;
        assert_eq!(gone, 0);
        let nodes: Vec<String> = redis.query(&["SMEMBERS", "sb:nodes"]).await;
        assert!(nodes.contains(&new) && !nodes.contains(&old), "{nodes:?}");
        within("the Reaped event", async {
            loop {
                if let BrokerEvent::Reaped = a.events.recv().await.expect("the broker runs") {
                    return;
                }
            }
        })
        .await;
        // The runtime records ann again: under the new id, counted once.
        assert_eq!(a.presence(&hall, "ann", true).await, 2);
        let ann: Option<i64> = redis.query(&["HGET", "sb:{hall}:users", "ann"]).await;
        assert_eq!(ann, Some(1));
    });
}

/// A `ShardedBroker` over two Redis puts each room's state on the shard it
/// names, answers `positions` for rooms of both shards in the order asked
/// (`None` for a room no shard has), and with one shard gone fails only
/// that shard's rooms (and `positions` as a whole).
#[test]
fn a_sharded_broker_routes_rooms_and_reassembles_positions() {
    run(async {
        let redis = [Redis::start().await, Redis::start().await];
        let mut redis = redis.into_iter();
        let (a, mut b) = (redis.next().expect("a"), redis.next().expect("b"));
        let sharded = ShardedBroker::new(&[a.url(), b.url()], RedisBroker::new).expect("URLs");
        let (tx, _events) = mpsc::channel(1024);
        within("the shards to start", sharded.start(tx))
            .await
            .expect("started");
        let rooms: Vec<RoomName> = (0..20).map(|i| room(&format!("r{i}"))).collect();
        for (i, name) in rooms.iter().enumerate() {
            for n in 0..=i {
                let key = format!("{name}-{n}");
                let request = PublishRequest {
                    room: name,
                    body: r#""data":null"#,
                    exclude: None,
                    history: 10,
                    history_ttl: TTL,
                    new_epoch: "e",
                    key: &key,
                };
                within("a publish", sharded.publish(request))
                    .await
                    .expect("published");
            }
        }
        let mut on = [0, 0];
        for (i, name) in rooms.iter().enumerate() {
            let shard = sharded.shard_of_room(name.as_str());
            on[shard] += 1;
            let key = format!("sb:{{{name}}}:seq");
            let seqs: [Option<String>; 2] =
                [a.query(&["GET", &key]).await, b.query(&["GET", &key]).await];
            let mut expected = [None, None];
            expected[shard] = Some((i + 1).to_string());
            assert_eq!(seqs, expected, "{name}");
        }
        assert!(on[0] > 0 && on[1] > 0, "{on:?}");

        let mut asked: Vec<RoomName> = rooms.iter().rev().cloned().collect();
        asked.insert(7, room("nobody"));
        let positions = within("positions", sharded.positions(&asked))
            .await
            .expect("positions");
        assert_eq!(positions.len(), asked.len());
        for (name, position) in asked.iter().zip(&positions) {
            let expected = name.as_str()[1..]
                .parse::<u64>()
                .ok()
                .map(|i| (i + 1, Epoch::from("e")));
            assert_eq!(position, &expected, "{name}");
        }

        // Shard b gone: its rooms fail, a's go on; positions fail as a whole.
        let _ = b.child.kill();
        let _ = b.child.wait();
        let (live, dead): (Vec<&RoomName>, Vec<&RoomName>) = rooms
            .iter()
            .partition(|r| sharded.shard_of_room(r.as_str()) == 0);
        for (name, works) in [(live[0], true), (dead[0], false)] {
            let request = PublishRequest {
                room: name,
                body: r#""data":null"#,
                exclude: None,
                history: 10,
                history_ttl: TTL,
                new_epoch: "e",
                key: "after",
            };
            let result = within("a publish", sharded.publish(request)).await;
            assert_eq!(result.is_ok(), works, "{name}: {result:?}");
        }
        // In one batch too: each shard's part is answered on its own.
        let keys = ["batch-live", "batch-dead"];
        let batch: Vec<PublishRequest<'_>> = [live[0], dead[0]]
            .iter()
            .zip(keys)
            .map(|(name, key)| PublishRequest {
                room: name,
                body: r#""data":null"#,
                exclude: None,
                history: 10,
                history_ttl: TTL,
                new_epoch: "e",
                key,
            })
            .collect();
        let results = within("a batch", sharded.publish_batch(&batch)).await;
        assert!(results[0].is_ok() && results[1].is_err(), "{results:?}");
        // And subscriptions: a dead shard fails only its own channels.
        let channels = [
            Channel::Room(live[0].clone()),
            Channel::Room(dead[0].clone()),
        ];
        within("the dead shard's subscription to fail", async {
            loop {
                let results = sharded.subscribe_many(&channels).await;
                assert!(results[0].is_ok(), "{results:?}");
                if results[1].is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(within("positions", sharded.positions(&asked))
            .await
            .is_err());
    });
}

/// A batch of publishes is sequenced in its order, over two rooms, and
/// every message reaches a node subscribed with `subscribe_many` in that
/// order; a batch that repeats a key already published answers it with its
/// first seq and publishes nothing for it; after `SCRIPT FLUSH` a batch
/// still publishes (the script is loaded again), in order.
#[test]
fn a_batch_of_publishes_is_sequenced_in_its_order() {
    run(async {
        let redis = Redis::start().await;
        let mut a = Node::start(&redis).await;
        let (hall, yard) = (room("hall"), room("yard"));
        let channels = [Channel::Room(hall.clone()), Channel::Room(yard.clone())];
        within("subscribing", async {
            while a
                .broker
                .subscribe_many(&channels)
                .await
                .iter()
                .any(Result::is_err)
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        let keys: Vec<String> = (0..6).map(|i| format!("batch{i}")).collect();
        let request = |i: usize| PublishRequest {
            room: if i % 2 == 0 { &hall } else { &yard },
            body: r#""data":null"#,
            exclude: None,
            history: 10,
            history_ttl: TTL,
            new_epoch: "fresh",
            key: &keys[i],
        };
        let first: Vec<PublishRequest<'_>> = (0..4).map(request).collect();
        let seqs: Vec<u64> = within("a batch", a.broker.publish_batch(&first))
            .await
            .into_iter()
            .map(|r| r.expect("published").0)
            .collect();
        assert_eq!(seqs, [1, 1, 2, 2]);

        // Keys 2 and 3 again, with two new ones, after the scripts were flushed.
        let _: String = redis.query(&["SCRIPT", "FLUSH"]).await;
        let second: Vec<PublishRequest<'_>> = (2..6).map(request).collect();
        let seqs: Vec<u64> = within(
            "a batch after SCRIPT FLUSH",
            a.broker.publish_batch(&second),
        )
        .await
        .into_iter()
        .map(|r| r.expect("published").0)
        .collect();
        assert_eq!(seqs, [2, 2, 3, 3], "the repeated keys keep their seq");

        let mut heard = Vec::new();
        within("every message", async {
            while heard.len() < 6 {
                if let BrokerEvent::Message { room, seq, .. } =
                    a.events.recv().await.expect("the broker runs")
                {
                    heard.push((room.as_str().to_owned(), seq));
                }
            }
        })
        .await;
        let of = |name: &str| -> Vec<u64> {
            heard
                .iter()
                .filter(|(r, _)| r == name)
                .map(|(_, s)| *s)
                .collect()
        };
        assert_eq!(of("hall"), [1, 2, 3]);
        assert_eq!(of("yard"), [1, 2, 3]);

        a.broker.unsubscribe_many(&channels).await;
    });
}
