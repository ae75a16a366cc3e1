//! Redis as Switchboard's cluster broker: run several nodes behind a load
//! balancer, with no change to clients.
//!
//! - **One sequence per room.** A publish on any node runs one Lua script
//!   that increments the room's `seq`, appends the finished `message` frame
//!   to the room's capped stream (its history) and publishes it on the
//!   room's channel, atomically, so every node hears every room's messages in
//!   `seq` order. The room's `epoch` lives beside its `seq`; when Redis loses
//!   them (a restart without persistence, or the history TTL, which runs only
//!   once no node has a user in the room) the next use starts a new epoch,
//!   and clients that ask to resume see `recovered: false`.
//! - **Subscriptions follow membership.** A node subscribes to a room's
//!   channel while it has members there, to a user's channel while it holds
//!   one of the user's sessions, and to a session's channel while it is open.
//! - **Presence spans nodes.** Each node records its users per room both in
//!   the room's cluster-wide hash and in a hash of its own in the room's
//!   slot (`sb:{room}:node:<id>`), which makes every change idempotent per
//!   node (safe to retry, to undo when it never landed, to record again); a
//!   set per node (`sb:node:<id>:rooms`) indexes the rooms it has presence
//!   in. A node refreshes an "alive" key every few seconds, and any node that
//!   sees another's key expire removes that node's users room by room and
//!   announces their leaves. A node that finds its own key had expired takes
//!   a new id (an *incarnation*) and records its presence again under it;
//!   the old id is reaped like any dead node's.
//! - **Redis going away** fails publishes with an error at once (nothing is
//!   queued), leaves local sessions connected, and reconnects with backoff;
//!   after a reconnect the runtime records its presence again and brings its
//!   rooms up to date; a node whose missed messages are no longer kept
//!   tells its own members (`recovered: false`), and the room keeps its
//!   epoch and history for everyone else.
//! - **Redis Cluster** ([`RedisBroker::cluster`]): every script touches the
//!   keys of one room, all in the room's hash slot (`sb:{room}:…`); room
//!   messages go out with sharded pub/sub (`SPUBLISH` to `sb:{room}:ch`,
//!   `SSUBSCRIBE`) when the servers have it (Redis 7), classic pub/sub
//!   otherwise; and scripts read the run id of the master they run on.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use redis::aio::{ConnectionLike, MultiplexedConnection, PubSubSink};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo, Slot};
use redis::io::tcp::{socket2::TcpKeepalive, TcpSettings};
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{
    AsyncConnectionConfig, Client, ConnectionInfo, FromRedisValue, IntoConnectionInfo,
    ProtocolVersion, PushInfo, PushKind, RedisError, RedisFuture, Script,
};
use switchboard_core::{Epoch, RoomName, Sid, UserId};
use switchboard_runtime::async_trait;
use switchboard_runtime::broker::{
    Broker, BrokerError, BrokerEvent, Channel, DirectTo, PresenceUpdate, PublishRequest, RoomState,
};
use tokio::sync::{mpsc, OnceCell};

mod sharded;
pub use sharded::{score, shard_id, ShardedBroker};

/// A node whose "alive" key is this old is dead; its presence is removed.
/// It refreshes the key (and looks for dead nodes) three times per TTL.
const DEFAULT_NODE_TTL: Duration = Duration::from_secs(10);
/// A reaped room's history TTL when its own is shorter or not recorded (the
/// policy default): the reaped node may be alive and come back.
const DEFAULT_HISTORY_TTL: Duration = Duration::from_secs(300);
/// How long one Redis command (or connection attempt) may take before it
/// fails; a connection whose command timed out is dropped and made again.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the pub/sub connection is sent `PING`: a connection that does
/// not answer within [`RESPONSE_TIMEOUT`] is taken for dead (a blackholed
/// connection, which TCP alone notices late or never), dropped and made
/// again, and the node catches up.
const PUBSUB_PING: Duration = Duration::from_secs(1);
/// How long Redis remembers a publish's key (and its seq and epoch), so that
/// a retry of it is not published twice.
const PUBLISH_KEY_TTL: Duration = Duration::from_secs(60);
/// Channels per `SUBSCRIBE` (or `UNSUBSCRIBE`): when subscribing again
/// after a reconnect, and for the runtime's batches.
const SUBSCRIBE_BATCH: usize = 256;
/// Rooms per pipeline when the runtime checks room positions.
const POSITIONS_BATCH: usize = 256;

/// How long a reaped node's mark stays in a room: a presence write of that
/// node id still on its way when it was reaped is refused meanwhile (the
/// node then takes a new id). Later ones land, and are reaped again.
const REAPED_MARK_TTL: Duration = Duration::from_secs(3600);
/// Presence writes of one node are serialized per room through one of this
/// many locks, so that the node's room index never misses a room it has
/// presence in.
const PRESENCE_LOCKS: usize = 64;

/// Keys of one room, in one hash slot (`{room}`).
fn room_key(room: &str, what: &str) -> String {
    format!("sb:{{{room}}}:{what}")
}

/// The keys of a room's state, in the order the PUBLISH and ROOM_STATE
/// scripts name them first (`KEYS[1..5]`): seq, epoch, log, users, run.
fn state_keys(room: &str) -> [String; 5] {
    ["seq", "epoch", "log", "users", "run"].map(|what| room_key(room, what))
}

// Room keys, all in the room's hash slot: `seq`, `epoch`, `log` (the capped
// stream of its history), `users` (user → how many nodes have them there),
// `node:<id>` (user → 1, the users node `<id>` has there), `reaped:<id>`
// (node `<id>` was reaped here), `announce` (set while the room announces
// presence), `ttl` (its `history_ttl` in ms, while it has users, for the
// reaper), `run` (the run id of the Redis that started or last checked the
// epoch). A room's `seq`, `epoch`, `log` and `run` never expire while
// `users` exists; they expire `ttl` after the last user left (or after the
// last message, if later). Node keys: `sb:nodes` (the set of node ids),
// `sb:node:<id>:alive`, `sb:node:<id>:rooms` (the rooms where the node may
// have presence).

/// Prepended to every script that sets or reads a room's epoch or changes
/// its TTL. `run` follows `epoch`'s TTL. `check_run` moves a room to a new
/// epoch when its state was not written by this Redis run: a Redis that
/// restarted from a snapshot (or a replica that took over) may have lost
/// the latest messages, so the `seq` it goes on from could be handed out
/// again in the same epoch; a new epoch makes that impossible (`seq` goes
/// on counting, the kept history, of the old epoch, is dropped).
/// `this_run` is the run id the node passed, or (in a Redis Cluster, where
/// the node cannot know which master a script runs on) the run id of the
/// server running the script.
const RUN_HELPERS: &str = r#"
local function this_run(given)
  if given ~= '' then return given end
  return string.match(redis.call('INFO', 'server'), 'run_id:(%w+)')
end
local function keep_run(epoch_key, run_key)
  local ttl = redis.call('PTTL', epoch_key)
  if ttl > 0 then
    redis.call('PEXPIRE', run_key, ttl)
  elseif ttl == -1 then
    redis.call('PERSIST', run_key)
  else
    redis.call('DEL', run_key)
  end
end
local function check_run(epoch_key, log_key, run_key, run, new_epoch)
  local epoch = redis.call('GET', epoch_key)
  if epoch and redis.call('GET', run_key) ~= run then
    epoch = new_epoch
    redis.call('SET', epoch_key, epoch, 'KEEPTTL')
    redis.call('DEL', log_key)
  end
  if epoch then redis.call('SET', run_key, run) end
  return epoch
end
"#;

const PUBLISH: &str = r#"
-- KEYS: seq, epoch, log, users, run, this publish's key.
-- ARGV: room, body, exclude, history, ttl_ms, new_epoch, run id, key ttl_ms,
--       publish command, room channel
local done = redis.call('GET', KEYS[6])
if done then
  -- Published already (a retry whose first try landed): its seq and epoch.
  local sep = string.find(done, '|', 1, true)
  return {tonumber(string.sub(done, 1, sep - 1)), string.sub(done, sep + 1)}
end
local run = this_run(ARGV[7])
local epoch = check_run(KEYS[2], KEYS[3], KEYS[5], run, ARGV[6])
if not epoch then
  epoch = ARGV[6]
  redis.call('SET', KEYS[2], epoch)
  redis.call('SET', KEYS[1], 0)
  redis.call('DEL', KEYS[3])
  redis.call('SET', KEYS[5], run)
end
local seq = redis.call('INCR', KEYS[1])
local frame = '{"type":"message","room":"' .. ARGV[1] .. '","seq":' .. seq .. ',"epoch":"' .. epoch .. '",' .. ARGV[2] .. '}'
local history = tonumber(ARGV[4])
if history > 0 then
  redis.call('XADD', KEYS[3], 'MAXLEN', history, seq .. '-0', 'f', frame)
end
if redis.call('EXISTS', KEYS[4]) == 1 then
  redis.call('PERSIST', KEYS[1])
  redis.call('PERSIST', KEYS[2])
  redis.call('PERSIST', KEYS[3])
else
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
  redis.call('PEXPIRE', KEYS[3], ARGV[5])
end
keep_run(KEYS[2], KEYS[5])
redis.call('SET', KEYS[6], seq .. '|' .. epoch, 'PX', ARGV[8])
redis.call(ARGV[9], ARGV[10], 'm|' .. seq .. '|' .. epoch .. '|' .. ARGV[3] .. '|' .. frame)
return {seq, epoch}
"#;

const ROOM_STATE: &str = r#"
-- KEYS: seq, epoch, log, users, run.
-- ARGV: since_seq (-1: none), since_epoch, new_epoch, ttl_ms, resync (1/0), run id
local present = redis.call('EXISTS', KEYS[4]) == 1
local run = this_run(ARGV[6])
local epoch = check_run(KEYS[2], KEYS[3], KEYS[5], run, ARGV[3])
if not epoch then
  epoch = ARGV[3]
  redis.call('SET', KEYS[2], epoch)
  redis.call('SET', KEYS[1], 0)
  redis.call('DEL', KEYS[3])
  redis.call('SET', KEYS[5], run)
  if not present then
    redis.call('PEXPIRE', KEYS[1], ARGV[4])
    redis.call('PEXPIRE', KEYS[2], ARGV[4])
  end
elseif present then
  redis.call('PERSIST', KEYS[1])
  redis.call('PERSIST', KEYS[2])
  redis.call('PERSIST', KEYS[3])
end
keep_run(KEYS[2], KEYS[5])
local seq = tonumber(redis.call('GET', KEYS[1]) or '0')
local users = redis.call('HLEN', KEYS[4])
local since = tonumber(ARGV[1])
if since < 0 or ARGV[2] ~= epoch then return {seq, epoch, users, 0} end
if since == seq then return {seq, epoch, users, 1} end
if since < seq then
  local entries = redis.call('XRANGE', KEYS[3], (since + 1) .. '-0', '+')
  if #entries == seq - since then
    local out = {seq, epoch, users, 1}
    for i = 1, #entries do
      out[#out + 1] = entries[i][2][2]
    end
    return out
  end
end
-- A node that missed what is no longer kept tells its own members
-- (recovered:false at this position); the room, its other nodes' members
-- and the history away clients may still recover are left alone.
if ARGV[5] == '1' and since > seq then
  -- The node delivered messages this Redis no longer has: their seqs could
  -- be handed out again, so a new epoch for the whole room. The kept
  -- history is the old epoch's.
  epoch = ARGV[3]
  redis.call('SET', KEYS[2], epoch, 'KEEPTTL')
  redis.call('DEL', KEYS[3])
end
return {seq, epoch, users, 0}
"#;

const PRESENCE: &str = r#"
-- KEYS: room users, this node's users in the room, room announce, room ttl,
--       room seq, room epoch, room log, room run, this node's reaped mark.
-- ARGV: present (1/0), user, room, subject sid, announce (1/0), quiet (1/0),
--       ttl_ms, publish command, room channel
-- Returns {count, node}: node is 1 when this node's hash in the room was
-- just made, 2 when it is empty; {-1, 0} when this node id was reaped here.
-- Idempotent per node: the node's own hash says whether this node counts
-- the user in the room, so repeating a change, or undoing one that never
-- landed, changes nothing.
if redis.call('EXISTS', KEYS[9]) == 1 then return {-1, 0} end
local join = ARGV[1] == '1'
local had = redis.call('EXISTS', KEYS[2]) == 1
local changed
if join then
  changed = redis.call('HSETNX', KEYS[2], ARGV[2], 1) == 1
else
  changed = redis.call('HDEL', KEYS[2], ARGV[2]) == 1
end
local nodes = 0
if changed then
  if join then
    nodes = redis.call('HINCRBY', KEYS[1], ARGV[2], 1)
  else
    nodes = redis.call('HINCRBY', KEYS[1], ARGV[2], -1)
    if nodes <= 0 then redis.call('HDEL', KEYS[1], ARGV[2]) end
  end
end
local count = redis.call('HLEN', KEYS[1])
if count > 0 then
  if ARGV[5] == '1' then redis.call('SET', KEYS[3], 1) end
  redis.call('SET', KEYS[4], ARGV[7])
  redis.call('PERSIST', KEYS[5])
  redis.call('PERSIST', KEYS[6])
  redis.call('PERSIST', KEYS[7])
else
  redis.call('DEL', KEYS[3], KEYS[4])
  redis.call('PEXPIRE', KEYS[5], ARGV[7])
  redis.call('PEXPIRE', KEYS[6], ARGV[7])
  redis.call('PEXPIRE', KEYS[7], ARGV[7])
end
keep_run(KEYS[6], KEYS[8])
if changed and ARGV[5] == '1' and ARGV[6] ~= '1' and ((join and nodes == 1) or (not join and nodes <= 0)) then
  local action = 'join'
  if not join then action = 'leave' end
  local frame = '{"type":"presence","room":"' .. ARGV[3] .. '","action":"' .. action .. '","user":' .. cjson.encode(ARGV[2]) .. ',"count":' .. count .. '}'
  redis.call(ARGV[8], ARGV[9], 'p|' .. ARGV[4] .. '|' .. frame)
end
local node = 0
local has = redis.call('EXISTS', KEYS[2]) == 1
if has and not had then node = 1 elseif not has then node = 2 end
return {count, node}
"#;

const REAP_ROOM: &str = r#"
-- KEYS: the dead node's users in the room, room users, announce, ttl, seq,
--       epoch, log, run, the dead node's reaped mark.
-- ARGV: room, default ttl_ms, mark ttl_ms, publish command, room channel
-- Idempotent: a room reaped already has nothing left of the node.
redis.call('SET', KEYS[9], 1, 'PX', ARGV[3])
local gone = redis.call('HKEYS', KEYS[1])
redis.call('DEL', KEYS[1])
local left = false
for _, user in ipairs(gone) do
  local nodes = redis.call('HINCRBY', KEYS[2], user, -1)
  if nodes <= 0 then
    left = true
    redis.call('HDEL', KEYS[2], user)
    if redis.call('EXISTS', KEYS[3]) == 1 then
      local count = redis.call('HLEN', KEYS[2])
      local frame = '{"type":"presence","room":"' .. ARGV[1] .. '","action":"leave","user":' .. cjson.encode(user) .. ',"count":' .. count .. '}'
      redis.call(ARGV[4], ARGV[5], 'p||' .. frame)
    end
  end
end
if left and redis.call('HLEN', KEYS[2]) == 0 then
  -- At least ARGV[2]: the node may be alive (paused, cut off) with
  -- members still connected, and will record them again when it is
  -- back; the room's history must outlive that.
  local ttl = math.max(tonumber(redis.call('GET', KEYS[4]) or ARGV[2]), tonumber(ARGV[2]))
  redis.call('DEL', KEYS[3], KEYS[4])
  redis.call('PEXPIRE', KEYS[5], ttl)
  redis.call('PEXPIRE', KEYS[6], ttl)
  redis.call('PEXPIRE', KEYS[7], ttl)
  keep_run(KEYS[6], KEYS[8])
end
return #gone
"#;

const HEARTBEAT: &str = r#"
-- KEYS: this node's alive key. ARGV: ttl_ms, run id.
-- Returns {1 if the key was still there, else 0; the Redis run id}.
-- (EXISTS then SET rather than SET … GET, which needs Redis 6.2.)
local alive = redis.call('EXISTS', KEYS[1])
redis.call('SET', KEYS[1], 1, 'PX', ARGV[1])
return {alive, this_run(ARGV[2])}
"#;

/// The Redis broker. Cheap to clone; give it to `Switchboard::builder().broker(...)`.
#[derive(Clone)]
pub struct RedisBroker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBroker")
            .field("node", &self.node())
            .field("cluster", &self.is_cluster())
            .finish_non_exhaustive()
    }
}

/// How the broker reaches Redis. The rest of the broker only sees [`Con`]
/// and [`Sink`]/[`Heard`]. Every (re)connect of the command and the pub/sub
/// connection goes through it, so a broker that follows a Sentinel reaches
/// the current master after a failover.
enum Connector {
    /// One Redis server.
    Standalone(Client),
    /// The master Sentinel names, asked anew at each connect.
    Sentinel(tokio::sync::Mutex<SentinelClient>),
    /// A Redis Cluster: a client for commands, and its seed nodes, from
    /// which each pub/sub connection gets a client of its own (its push
    /// channel is fixed when the client is built).
    Cluster {
        commands: Box<ClusterClient>,
        seeds: Vec<ConnectionInfo>,
    },
}

/// A command connection of either kind; scripts and pipelines run on it
/// unchanged (a cluster connection routes each command to its slot's
/// master).
#[derive(Clone)]
enum Con {
    Standalone(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Con {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, redis::Value> {
        match self {
            Self::Standalone(con) => con.req_packed_command(cmd),
            Self::Cluster(con) => con.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Self::Standalone(con) => con.req_packed_commands(pipeline, offset, count),
            Self::Cluster(con) => con.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Standalone(con) => con.get_db(),
            Self::Cluster(con) => con.get_db(),
        }
    }
}

impl Connector {
    /// A client for the one Redis to connect to now (not for a cluster);
    /// bounded by [`RESPONSE_TIMEOUT`], Sentinel lookups included.
    async fn client(&self) -> redis::RedisResult<Client> {
        match self {
            Self::Standalone(client) => Ok(client.clone()),
            Self::Sentinel(sentinel) => {
                let lookup = async { sentinel.lock().await.async_get_client().await };
                tokio::time::timeout(RESPONSE_TIMEOUT, lookup)
                    .await
                    .unwrap_or_else(|_| Err(timed_out("asking the Sentinels for the master")))
            }
            Self::Cluster { .. } => Err(RedisError::from((
                redis::ErrorKind::Client,
                "a Redis Cluster has no one client",
            ))),
        }
    }
}

/// This node's id, and the rooms its id's index (`sb:node:<id>:rooms`) is
/// known to hold.
struct Incarnation {
    id: Arc<str>,
    indexed: HashSet<String>,
}

struct Inner {
    connector: Connector,
    node_ttl: Duration,
    /// The current incarnation; replaced when the node finds it was taken
    /// for dead.
    incarnation: Mutex<Incarnation>,
    /// Held while the node takes a new id.
    reincarnating: tokio::sync::Mutex<()>,
    /// Serialize this node's presence writes per room (striped).
    presence_locks: Vec<tokio::sync::Mutex<()>>,
    /// Where [`BrokerEvent::Reaped`] goes; set at start.
    events: OnceLock<mpsc::Sender<BrokerEvent>>,
    /// Sharded pub/sub (a Redis Cluster of Redis 7 or later); set at start,
    /// before any channel is named.
    sharded: AtomicBool,
    /// Whether sharded pub/sub may be used (see [`RedisBroker::sharded_pubsub`]).
    sharded_allowed: bool,
    /// The command connection, while up.
    link: Mutex<Option<Link>>,
    /// A task is making the command connection again.
    reconnecting: AtomicBool,
    /// Tells links apart, so that a failure drops only the link it happened on.
    links: AtomicU64,
    started: OnceCell<()>,
    /// The subscription half of the pub/sub connection, while connected.
    sink: tokio::sync::Mutex<Option<Sink>>,
    /// Channels this node wants, re-subscribed after a reconnect.
    // A std Mutex: only set operations happen under it.
    wanted: Mutex<HashSet<String>>,
    publish: Script,
    room_state: Script,
    presence: Script,
    reap_room: Script,
    heartbeat: Script,
}

/// TCP settings of every connection. TCP_NODELAY: a publish is one small
/// write that must not wait for an ACK. Keepalive and TCP_USER_TIMEOUT make
/// the kernel give up on a peer that stopped answering (dead host, NAT
/// timeout) within seconds; the pub/sub PING and the command timeouts notice
/// even what they cannot (a middlebox that keeps the socket open).
fn tcp_settings() -> TcpSettings {
    let keepalive = TcpKeepalive::new()
        .with_time(Duration::from_secs(5))
        .with_interval(Duration::from_secs(1))
        .with_retries(3);
    TcpSettings::default()
        .set_nodelay(true)
        .set_keepalive(keepalive)
        .set_user_timeout(Duration::from_secs(8))
}

/// A Redis Cluster client on `seeds`, with the broker's timeouts (each
/// command, retries included, within [`RESPONSE_TIMEOUT`]).
fn cluster_builder(seeds: &[ConnectionInfo]) -> ClusterClientBuilder {
    ClusterClientBuilder::new(seeds.to_vec())
        .connection_timeout(RESPONSE_TIMEOUT)
        .response_timeout(RESPONSE_TIMEOUT)
        .tcp_settings(tcp_settings())
}

fn new_node_id() -> Result<String, BrokerError> {
    let mut id = [0u8; 8];
    getrandom::fill(&mut id).map_err(|e| BrokerError(format!("no randomness: {e}")))?;
    Ok(id.iter().map(|b| format!("{b:02x}")).collect())
}

impl RedisBroker {
    /// A broker for the Redis at `url` (`redis://127.0.0.1:6379`). Connects
    /// when the Switchboard starts it.
    ///
    /// # Errors
    /// When the URL is not a Redis URL.
    pub fn new(url: &str) -> Result<Self, BrokerError> {
        #[cfg(feature = "tls")]
        tls_provider();
        let info = url
            .into_connection_info()
            .map_err(err)?
            .set_tcp_settings(tcp_settings());
        let client = Client::open(info).map_err(err)?;
        Self::with_connector(Connector::Standalone(client))
    }

    /// A broker for the Redis Cluster reached through `urls`, its seed nodes
    /// (`redis://10.0.0.1:6379`; one reachable seed is enough, the others
    /// are found from it). Connects when the Switchboard starts it.
    ///
    /// Every script touches the keys of one room only (one hash slot);
    /// room, user and session channels are sharded (`SSUBSCRIBE`) when the
    /// cluster runs Redis 7 or later.
    ///
    /// # Errors
    /// When `urls` is empty or one of them is not a Redis URL.
    pub fn cluster<S: AsRef<str>>(urls: &[S]) -> Result<Self, BrokerError> {
        if urls.is_empty() {
            return Err(BrokerError("a Redis Cluster needs a seed node URL".into()));
        }
        let seeds = urls
            .iter()
            .map(|url| url.as_ref().into_connection_info().map_err(err))
            .collect::<Result<Vec<_>, _>>()?;
        let commands = cluster_builder(&seeds).build().map_err(err)?;
        Self::with_connector(Connector::Cluster {
            commands: Box::new(commands),
            seeds,
        })
    }

    /// A broker for the Redis at a `rediss://` URL whose certificate is
    /// signed by the CA in `ca_pem` (PEM), instead of one the system trusts
    /// (which [`RedisBroker::new`] uses for `rediss://`).
    ///
    /// # Errors
    /// When the URL is not a `rediss://` URL, or the CA cannot be read.
    #[cfg(feature = "tls")]
    pub fn with_ca(url: &str, ca_pem: &[u8]) -> Result<Self, BrokerError> {
        tls_provider();
        let info = url
            .into_connection_info()
            .map_err(err)?
            .set_tcp_settings(tcp_settings());
        let certificates = redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(ca_pem.to_vec()),
        };
        let client = Client::build_with_tls(info, certificates).map_err(err)?;
        Self::with_connector(Connector::Standalone(client))
    }

    /// A broker for the master the Sentinels at `sentinels`
    /// (`redis://127.0.0.1:26379`) name `master`. Every (re)connect asks
    /// them again, so after a failover the node follows the new master
    /// (whose rooms start a new epoch: it may lack the latest messages).
    /// The master is reached without credentials, on database 0.
    ///
    /// # Errors
    /// When no Sentinel is given or one is not a Redis URL.
    pub fn sentinel<S: AsRef<str>>(sentinels: &[S], master: &str) -> Result<Self, BrokerError> {
        let urls: Vec<&str> = sentinels.iter().map(AsRef::as_ref).collect();
        if urls.is_empty() {
            return Err(BrokerError("no Sentinel given".into()));
        }
        let node = SentinelNodeConnectionInfo::default().set_tcp_settings(tcp_settings());
        // A `String`: redis takes one without its TLS feature.
        #[allow(clippy::unnecessary_to_owned)]
        let client = SentinelClient::build(
            urls,
            master.to_owned(),
            Some(node),
            SentinelServerType::Master,
        )
        .map_err(err)?;
        Self::with_connector(Connector::Sentinel(tokio::sync::Mutex::new(client)))
    }

    fn with_connector(connector: Connector) -> Result<Self, BrokerError> {
        Ok(Self {
            inner: Arc::new(Inner {
                connector,
                node_ttl: DEFAULT_NODE_TTL,
                incarnation: Mutex::new(Incarnation {
                    id: Arc::from(new_node_id()?),
                    indexed: HashSet::new(),
                }),
                reincarnating: tokio::sync::Mutex::new(()),
                presence_locks: (0..PRESENCE_LOCKS)
                    .map(|_| tokio::sync::Mutex::new(()))
                    .collect(),
                events: OnceLock::new(),
                sharded: AtomicBool::new(false),
                sharded_allowed: true,
                link: Mutex::new(None),
                reconnecting: AtomicBool::new(false),
                links: AtomicU64::new(0),
                started: OnceCell::new(),
                sink: tokio::sync::Mutex::new(None),
                wanted: Mutex::new(HashSet::new()),
                publish: Script::new(&format!("{RUN_HELPERS}{PUBLISH}")),
                room_state: Script::new(&format!("{RUN_HELPERS}{ROOM_STATE}")),
                presence: Script::new(&format!("{RUN_HELPERS}{PRESENCE}")),
                reap_room: Script::new(&format!("{RUN_HELPERS}{REAP_ROOM}")),
                heartbeat: Script::new(&format!("{RUN_HELPERS}{HEARTBEAT}")),
            }),
        })
    }

    /// How long a silent node counts as alive (default 10 s): after that,
    /// other nodes remove its users from presence and announce their leaves.
    ///
    /// # Panics
    /// When called after the broker was cloned or started.
    #[must_use]
    pub fn node_ttl(mut self, ttl: Duration) -> Self {
        Arc::get_mut(&mut self.inner)
            .expect("node_ttl is set before the broker is shared")
            .node_ttl = ttl.max(Duration::from_millis(300));
        self
    }

    /// Whether to use sharded pub/sub on a Redis Cluster that has it (Redis
    /// 7 or later; the default). `false` keeps classic `PUBLISH`/`SUBSCRIBE`,
    /// which every master relays to the whole cluster, for proxies or
    /// services that lack `SSUBSCRIBE`. Every node of a deployment must make
    /// the same choice. No effect on a standalone Redis.
    ///
    /// # Panics
    /// When called after the broker was cloned or started.
    #[must_use]
    pub fn sharded_pubsub(mut self, allowed: bool) -> Self {
        Arc::get_mut(&mut self.inner)
            .expect("sharded_pubsub is set before the broker is shared")
            .sharded_allowed = allowed;
        self
    }

    /// This node's id in the cluster. It changes when the node finds it
    /// was taken for dead (it then goes on under a new id).
    #[must_use]
    pub fn node_id(&self) -> String {
        self.node().to_string()
    }

    /// Whether this broker speaks to a Redis Cluster.
    #[must_use]
    pub fn is_cluster(&self) -> bool {
        matches!(self.inner.connector, Connector::Cluster { .. })
    }

    fn node(&self) -> Arc<str> {
        Arc::clone(&self.incarnation().id)
    }

    fn incarnation(&self) -> std::sync::MutexGuard<'_, Incarnation> {
        self.inner
            .incarnation
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn sharded(&self) -> bool {
        self.inner.sharded.load(Ordering::Acquire)
    }

    /// The command that publishes on a channel: `SPUBLISH` when sharded.
    fn publish_command(&self) -> &'static str {
        if self.sharded() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        }
    }

    /// A channel's name. Sharded channels carry a hash tag: a room's
    /// channel is in the room's slot, so that its scripts may publish on it.
    fn channel_name(&self, channel: &Channel) -> String {
        match (channel, self.sharded()) {
            (Channel::Room(room), false) => format!("sb:r:{room}"),
            (Channel::Room(room), true) => room_key(room.as_str(), "ch"),
            (Channel::User(user), false) => format!("sb:u:{user}"),
            (Channel::User(user), true) => format!("sb:u:{{{user}}}"),
            (Channel::Sid(sid), false) => format!("sb:s:{sid}"),
            (Channel::Sid(sid), true) => format!("sb:s:{{{sid}}}"),
        }
    }

    fn room_channel(&self, room: &RoomName) -> String {
        self.channel_name(&Channel::Room(room.clone()))
    }

    /// Runs `f` on the command connection. Fails at once while the
    /// connection is down (and starts making it again); a failure that may
    /// have left the connection unusable (an I/O error, a timeout: a
    /// blackholed connection) drops it, so the next call gets a new one.
    async fn call<T, F, Fut>(&self, f: F) -> Result<T, BrokerError>
    where
        F: FnOnce(Con, Arc<str>) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        self.call_checked(f).await.map_err(|(e, _)| e)
    }

    /// As [`RedisBroker::call`]; the error also says whether the command
    /// was sent and its answer lost (it may have taken effect).
    async fn call_checked<T, F, Fut>(&self, f: F) -> Result<T, (BrokerError, bool)>
    where
        F: FnOnce(Con, Arc<str>) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let link = self.link().map_err(|e| (e, false))?;
        let result = f(link.con.clone(), Arc::clone(&link.run_id)).await;
        result.map_err(|e| {
            // READONLY: the Redis was demoted to a replica (a failover);
            // a new connection finds the master.
            let lost = e.is_timeout()
                || e.is_io_error()
                || e.is_unrecoverable_error()
                || e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly);
            if lost {
                self.drop_link(link.id, &e);
            }
            (err(e), lost)
        })
    }

    /// One command on the command connection.
    async fn command<T: redis::FromRedisValue>(
        &self,
        command: redis::Cmd,
    ) -> Result<T, BrokerError> {
        self.call(|mut con, _| async move { command.query_async(&mut con).await })
            .await
    }

    /// Waits up to `limit` for a command connection; false if none came.
    async fn wait_link(&self, limit: Duration) -> bool {
        let until = tokio::time::Instant::now() + limit;
        loop {
            if self.link().is_ok() {
                return true;
            }
            if tokio::time::Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The `EVALSHA` of the publish script (`hash`) for one publish.
    fn publish_evalsha(
        &self,
        hash: &str,
        request: &PublishRequest<'_>,
        run_id: &str,
    ) -> redis::Cmd {
        let room = request.room.as_str();
        let mut command = redis::cmd("EVALSHA");
        command
            .arg(hash)
            .arg(6)
            .arg(&state_keys(room)[..])
            .arg(room_key(room, &format!("pub:{}", request.key)))
            .arg(room)
            .arg(request.body)
            .arg(request.exclude.map_or("", Sid::as_str))
            .arg(request.history)
            .arg(millis(request.history_ttl))
            .arg(request.new_epoch)
            .arg(run_id)
            .arg(millis(PUBLISH_KEY_TTL))
            .arg(self.publish_command())
            .arg(self.room_channel(request.room));
        command
    }

    /// A batch of publishes as one pipeline (see [`Broker::publish_batch`]),
    /// tried once more with their keys when its answer was lost.
    async fn publish_pipeline(
        &self,
        requests: &[PublishRequest<'_>],
    ) -> Vec<Result<(u64, Epoch), BrokerError>> {
        if requests.is_empty() {
            return Vec::new();
        }
        let failed = |e: &BrokerError| requests.iter().map(|_| Err(e.clone())).collect();
        let results = match self.publish_batch_once(requests).await {
            Ok(results) => results,
            Err((e, false)) => return failed(&e),
            // Sent, but its answer was lost (a timeout: a blackholed or
            // dead connection): some may have been published. The batch is
            // tried once more, in order, on a new connection; their keys
            // make that a no-op for those that landed, which then answer
            // with their first try's seq.
            Err((e, true)) => {
                tracing::warn!(publishes = requests.len(), error = %e,
                    "publishes' answer was lost; trying again with their keys");
                if !self.wait_link(RESPONSE_TIMEOUT).await {
                    return failed(&e);
                }
                match self.publish_batch_once(requests).await {
                    Ok(results) => results,
                    Err((e, _)) => return failed(&e),
                }
            }
        };
        let mut results: Vec<Result<(u64, Epoch), BrokerError>> = results
            .into_iter()
            .map(|r| r.map(|(seq, epoch)| (seq, Epoch::from(epoch))).map_err(err))
            .collect();
        results.resize_with(requests.len(), || {
            Err(BrokerError("no answer for the publish".into()))
        });
        results
    }

    /// Indices of `items` in groups that can each go as one pipeline: all
    /// of them on one Redis; on a cluster, one group per hash slot of
    /// `key(item)` (a cluster pipeline must stay in one slot). Each group
    /// keeps the order given.
    fn pipeline_groups<T>(&self, items: &[T], key: impl Fn(&T) -> String) -> Vec<Vec<usize>> {
        if !self.is_cluster() {
            return vec![(0..items.len()).collect()];
        }
        let mut groups: Vec<Vec<usize>> = Vec::new();
        let mut by_slot: HashMap<Slot, usize> = HashMap::new();
        for (i, item) in items.iter().enumerate() {
            let group = *by_slot.entry(Slot::for_key(key(item))).or_insert_with(|| {
                groups.push(Vec::new());
                groups.len() - 1
            });
            groups[group].push(i);
        }
        groups
    }

    /// The subscription connection's sink, locked once it is there: the
    /// pub/sub loop may be making it again (Redis just came back, the
    /// command connection first). Waits up to [`RESPONSE_TIMEOUT`] for it,
    /// so a join in that moment waits instead of failing `unavailable`.
    async fn ready_sink(&self) -> Result<tokio::sync::MutexGuard<'_, Option<Sink>>, BrokerError> {
        let until = tokio::time::Instant::now() + RESPONSE_TIMEOUT;
        loop {
            let sink = self.inner.sink.lock().await;
            if sink.is_some() {
                return Ok(sink);
            }
            drop(sink);
            if tokio::time::Instant::now() >= until {
                return Err(BrokerError("not connected to Redis".into()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Subscribes `channels` (one `SUBSCRIBE` per 256), keeping them wanted
    /// whatever happens (see `subscribe`).
    async fn subscribe_all(&self, channels: &[Channel]) -> Result<(), BrokerError> {
        let names: Vec<String> = channels.iter().map(|c| self.channel_name(c)).collect();
        self.inner
            .wanted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(names.iter().cloned());
        let mut sink = self.ready_sink().await?;
        // On failure the channels stay wanted (see `subscribe`).
        let Some(sink) = sink.as_mut() else {
            return Err(BrokerError("not connected to Redis".into()));
        };
        for batch in names.chunks(SUBSCRIBE_BATCH) {
            tokio::time::timeout(RESPONSE_TIMEOUT, sink.subscribe(batch))
                .await
                .map_err(|_| BrokerError("subscribe timed out".into()))?
                .map_err(err)?;
        }
        Ok(())
    }

    /// One try of a batch of publishes, as one pipeline (one round trip;
    /// Redis runs them in order): one result per publish. `Err` when the
    /// pipeline failed as a whole, with whether it was sent and its answer
    /// lost (some may have been published).
    async fn publish_batch_once(
        &self,
        requests: &[PublishRequest<'_>],
    ) -> Result<Vec<redis::RedisResult<(u64, String)>>, (BrokerError, bool)> {
        let script = &self.inner.publish;
        self.call_checked(|mut con, run_id| async move {
            let pipeline = |requests: &[PublishRequest<'_>]| {
                let mut pipe = redis::pipe();
                pipe.ignore_errors();
                for request in requests {
                    pipe.add_command(self.publish_evalsha(script.get_hash(), request, &run_id));
                }
                pipe
            };
            let mut results: Vec<redis::RedisResult<(u64, String)>> =
                pipeline(requests).query_async(&mut con).await?;
            // A Redis that lost its scripts (`SCRIPT FLUSH`) refuses them
            // all with NOSCRIPT, publishing nothing: load the script and
            // send them again. Only a refused tail is sent again, so that
            // no publish overtakes one that landed after it was refused.
            let refused = |r: &redis::RedisResult<(u64, String)>| {
                r.as_ref().is_err_and(|e| {
                    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
                })
            };
            if let Some(first) = results.iter().position(refused) {
                if results[first..].iter().all(refused) {
                    script.prepare_invoke().load_async(&mut con).await?;
                    let again: Vec<redis::RedisResult<(u64, String)>> =
                        pipeline(&requests[first..]).query_async(&mut con).await?;
                    results.truncate(first);
                    results.extend(again);
                }
            }
            // READONLY: the Redis was demoted (a failover) and ran none of
            // them. As an error of the whole batch, it drops the connection
            // (the next one finds the new master) and the batch is sent
            // again, with its keys.
            let readonly = results.iter().position(|r| {
                r.as_ref().is_err_and(|e| {
                    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
                })
            });
            if let Some(at) = readonly {
                results.swap_remove(at)?;
            }
            Ok(results)
        })
        .await
    }

    fn link(&self) -> Result<Link, BrokerError> {
        if self.inner.started.get().is_none() {
            return Err(BrokerError("broker not started".into()));
        }
        let link = self
            .inner
            .link
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        link.ok_or_else(|| {
            self.reconnect();
            BrokerError("not connected to Redis".into())
        })
    }

    fn drop_link(&self, id: u64, e: &RedisError) {
        let mut link = self
            .inner
            .link
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if link.as_ref().is_some_and(|l| l.id == id) {
            tracing::warn!(error = %e, "dropping the Redis command connection");
            *link = None;
        }
        drop(link);
        self.reconnect();
    }

    /// Makes the command connection again in the background (one task at a
    /// time), with backoff while Redis is away.
    fn reconnect(&self) {
        if self.inner.reconnecting.swap(true, Ordering::AcqRel) {
            return;
        }
        let broker = self.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                match broker.connect_link().await {
                    Ok(link) => {
                        tracing::info!(run_id = %link.run_id, "Redis command connection up");
                        *broker
                            .inner
                            .link
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner) = Some(link);
                        break;
                    }
                    Err(e) => tracing::debug!(error = %e, "cannot reach Redis"),
                }
                tokio::time::sleep(backoff + jitter()).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            broker.inner.reconnecting.store(false, Ordering::Release);
        });
    }

    /// A new command connection, and the run id of the Redis it reached
    /// (empty for a cluster: its scripts read the run id of their master).
    async fn connect_link(&self) -> redis::RedisResult<Link> {
        let (con, run_id) = match &self.inner.connector {
            Connector::Standalone(_) | Connector::Sentinel(_) => {
                let client = self.inner.connector.client().await?;
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(RESPONSE_TIMEOUT))
                    .set_response_timeout(Some(RESPONSE_TIMEOUT));
                let mut con = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?;
                let info: String = redis::cmd("INFO")
                    .arg("server")
                    .query_async(&mut con)
                    .await?;
                let run_id = info_field(&info, "run_id").unwrap_or_default().to_owned();
                (Con::Standalone(con), run_id)
            }
            Connector::Cluster { commands, .. } => {
                let con = tokio::time::timeout(RESPONSE_TIMEOUT, commands.get_async_connection())
                    .await
                    .map_err(|_| timed_out("connecting to the Redis Cluster"))??;
                (Con::Cluster(con), String::new())
            }
        };
        Ok(Link {
            con,
            run_id: Arc::from(run_id),
            id: self.inner.links.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// Whether the cluster has sharded pub/sub (Redis 7 or later), asked of
    /// one of its nodes; never for a standalone Redis, whose channels stay
    /// as they were.
    async fn detect_sharded(&self, link: &Link) -> redis::RedisResult<bool> {
        let Con::Cluster(con) = &link.con else {
            return Ok(false);
        };
        if !self.inner.sharded_allowed {
            return Ok(false);
        }
        let mut con = con.clone();
        let mut info = redis::cmd("INFO");
        info.arg("server");
        let value = con
            .route_command(info, RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random))
            .await?;
        let info = String::from_redis_value(value)?;
        let major = info_field(&info, "redis_version")
            .and_then(|v| v.split('.').next())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0);
        Ok(major >= 7)
    }

    async fn room_state_script(
        &self,
        room: &RoomName,
        since: Option<(u64, &str)>,
        new_epoch: &str,
        history_ttl: Duration,
        resync: bool,
    ) -> Result<RoomState, BrokerError> {
        let name = room.as_str();
        let since_seq = since.map_or(-1, |(seq, _)| i64::try_from(seq).unwrap_or(i64::MAX));
        let reply: Vec<redis::Value> = self
            .call(|mut con, run_id| async move {
                self.inner
                    .room_state
                    .key(&state_keys(name)[..])
                    .arg(since_seq)
                    .arg(since.map_or("", |(_, epoch)| epoch))
                    .arg(new_epoch)
                    .arg(millis(history_ttl))
                    .arg(if resync { "1" } else { "0" })
                    .arg(&*run_id)
                    .invoke_async(&mut con)
                    .await
            })
            .await?;
        parse_room_state(&reply, since)
    }

    /// One presence write under node id `node`: `{count, node state}` as
    /// the PRESENCE script answers.
    async fn presence_script(
        &self,
        update: &PresenceUpdate<'_>,
        node: &str,
    ) -> Result<(i64, i64), BrokerError> {
        let name = update.room.as_str();
        let channel = self.room_channel(update.room);
        self.call(|mut con, _| async move {
            self.inner
                .presence
                .key(room_key(name, "users"))
                .key(room_key(name, &format!("node:{node}")))
                .key(room_key(name, "announce"))
                .key(room_key(name, "ttl"))
                .key(room_key(name, "seq"))
                .key(room_key(name, "epoch"))
                .key(room_key(name, "log"))
                .key(room_key(name, "run"))
                .key(room_key(name, &format!("reaped:{node}")))
                .arg(if update.present { "1" } else { "0" })
                .arg(update.user.as_str())
                .arg(name)
                .arg(update.subject.as_str())
                .arg(if update.announce { "1" } else { "0" })
                .arg(if update.quiet { "1" } else { "0" })
                .arg(millis(update.history_ttl))
                .arg(self.publish_command())
                .arg(channel)
                .invoke_async(&mut con)
                .await
        })
        .await
    }

    /// Refreshes `node`'s alive key and puts it in the node set: whether
    /// the key was still there (not expired), and the run id of the Redis
    /// holding it.
    async fn beat(&self, node: &str) -> Result<(bool, Arc<str>), BrokerError> {
        let key = node_alive_key(node);
        let ttl = millis(self.inner.node_ttl);
        let (alive, run): (i64, String) = self
            .call(|mut con, run_id| async move {
                self.inner
                    .heartbeat
                    .key(key)
                    .arg(ttl)
                    .arg(&*run_id)
                    .invoke_async(&mut con)
                    .await
            })
            .await?;
        self.command::<i64>(redis::cmd("SADD").arg("sb:nodes").arg(node).clone())
            .await?;
        Ok((alive == 1, Arc::from(run)))
    }

    /// Goes on under a new node id, once `old` was found taken for dead:
    /// the new id's alive key first (no node may take it for dead), then
    /// the runtime is told to record its presence again (under the new id,
    /// with announcements). `old` is left to the reapers. False when it
    /// could not (Redis away): to be tried again.
    async fn reincarnate(&self, old: &str) -> bool {
        let _one = self.inner.reincarnating.lock().await;
        if *self.node() != *old {
            return true; // done meanwhile
        }
        let Ok(new) = new_node_id() else {
            return false;
        };
        if let Err(e) = self.beat(&new).await {
            tracing::debug!(error = %e, "cannot take a new node id yet");
            return false;
        }
        *self.incarnation() = Incarnation {
            id: Arc::from(new.as_str()),
            indexed: HashSet::new(),
        };
        tracing::warn!(old, new = %new,
            "this node was taken for dead (paused or cut off past its TTL); it goes on under a new id");
        if let Some(events) = self.inner.events.get() {
            let events = events.clone();
            // Not awaited here: a caller may hold a presence lock the
            // runtime's handling of the event needs.
            tokio::spawn(async move { events.send(BrokerEvent::Reaped).await });
        }
        true
    }

    /// Removes the presence of node `other` if its alive key expired: room
    /// by room (each room's script in its own slot, idempotent), then its
    /// index, then, once the index is empty, its place in the node set.
    async fn reap(&self, other: &str) -> Result<(), BrokerError> {
        let alive: i64 = self
            .command(redis::cmd("EXISTS").arg(node_alive_key(other)).clone())
            .await?;
        if alive == 1 {
            return Ok(());
        }
        let index = node_rooms_key(other);
        let rooms: Vec<String> = self
            .command(redis::cmd("SMEMBERS").arg(&index).clone())
            .await?;
        let mut reaped = Vec::with_capacity(rooms.len());
        let mut users = 0;
        for room in rooms {
            let Ok(name) = RoomName::new(room.as_str()) else {
                reaped.push(room);
                continue;
            };
            let channel = self.room_channel(&name);
            let room_name = room.as_str();
            let gone: i64 = self
                .call(|mut con, _| async move {
                    self.inner
                        .reap_room
                        .key(room_key(room_name, &format!("node:{other}")))
                        .key(room_key(room_name, "users"))
                        .key(room_key(room_name, "announce"))
                        .key(room_key(room_name, "ttl"))
                        .key(room_key(room_name, "seq"))
                        .key(room_key(room_name, "epoch"))
                        .key(room_key(room_name, "log"))
                        .key(room_key(room_name, "run"))
                        .key(room_key(room_name, &format!("reaped:{other}")))
                        .arg(room_name)
                        .arg(millis(DEFAULT_HISTORY_TTL))
                        .arg(millis(REAPED_MARK_TTL))
                        .arg(self.publish_command())
                        .arg(channel)
                        .invoke_async(&mut con)
                        .await
                })
                .await?;
            users += gone;
            reaped.push(room);
        }
        if !reaped.is_empty() {
            self.command::<i64>(redis::cmd("SREM").arg(&index).arg(&reaped).clone())
                .await?;
        }
        // Rooms indexed meanwhile (a write of the dead id still on its way)
        // keep it in the node set, for the next reap.
        let left: i64 = self
            .command(redis::cmd("SCARD").arg(&index).clone())
            .await?;
        if left == 0 {
            let removed: i64 = self
                .command(redis::cmd("SREM").arg("sb:nodes").arg(other).clone())
                .await?;
            if removed == 1 {
                tracing::info!(node = %other, rooms = reaped.len(), users,
                    "removed the presence of a dead node");
            }
        }
        Ok(())
    }
}

fn node_alive_key(node: &str) -> String {
    format!("sb:node:{node}:alive")
}

fn node_rooms_key(node: &str) -> String {
    format!("sb:node:{node}:rooms")
}

/// A field of an `INFO` answer.
fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

fn timed_out(what: &str) -> RedisError {
    RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("{what} timed out"),
    ))
}

/// The command connection, and the run id of the Redis instance it reached:
/// a TCP connection reaches one instance for its whole life, so the run id
/// is exact for every script sent on it. (Empty for a cluster connection,
/// which reaches several.)
#[derive(Clone)]
struct Link {
    con: Con,
    run_id: Arc<str>,
    id: u64,
}

/// Makes ring rustls's process-wide crypto provider unless one was chosen:
/// rustls cannot pick one itself when an application also builds it with
/// aws-lc-rs.
#[cfg(feature = "tls")]
fn tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn jitter() -> Duration {
    Duration::from_millis(u64::from(rand_u8()) % 100)
}

fn err(e: redis::RedisError) -> BrokerError {
    BrokerError(e.to_string())
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn lock_index(room: &str) -> usize {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    room.hash(&mut hasher);
    usize::try_from(hasher.finish() % PRESENCE_LOCKS as u64).unwrap_or(0)
}

#[async_trait]
impl Broker for RedisBroker {
    async fn start(&self, events: mpsc::Sender<BrokerEvent>) -> Result<(), BrokerError> {
        // The first connection is made here, so that a node that cannot
        // reach Redis at start says so; after that, a command fails at once
        // while the connection is down (a session's next frames, a `ping`
        // included, wait for its answer) and a task makes it again.
        let link = self.connect_link().await.map_err(err)?;
        let sharded = tokio::time::timeout(RESPONSE_TIMEOUT, self.detect_sharded(&link))
            .await
            .map_err(|_| BrokerError("asking Redis its version timed out".into()))?
            .map_err(err)?;
        self.inner.sharded.store(sharded, Ordering::Release);
        if self.is_cluster() {
            tracing::info!(sharded, "speaking to a Redis Cluster");
        }
        *self
            .inner
            .link
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(link);
        let _ = self.inner.started.set(());
        let _ = self.inner.events.set(events.clone());
        // The alive key is there before any presence of this node is.
        let (_, run) = self.beat(&self.node()).await?;
        tokio::spawn(run_node_heartbeat(self.clone(), events.clone(), run));
        tokio::spawn(run_pubsub(self.clone(), events));
        Ok(())
    }

    async fn publish(&self, request: PublishRequest<'_>) -> Result<(u64, Epoch), BrokerError> {
        self.publish_batch(&[request])
            .await
            .pop()
            .unwrap_or_else(|| Err(BrokerError("no answer for the publish".into())))
    }

    /// One pipeline per batch (one round trip), in order.
    /// One pipeline on one Redis; on a cluster, one per hash slot (a
    /// cluster pipeline must stay in one slot), all at once. Each room's
    /// publishes keep their order: a room is in one slot.
    async fn publish_batch(
        &self,
        requests: &[PublishRequest<'_>],
    ) -> Vec<Result<(u64, Epoch), BrokerError>> {
        let groups = self.pipeline_groups(requests, |r| room_key(r.room.as_str(), "seq"));
        if groups.len() <= 1 {
            return self.publish_pipeline(requests).await;
        }
        let answers = futures_util::future::join_all(groups.iter().map(|group| async move {
            let part: Vec<PublishRequest<'_>> = group.iter().map(|&i| requests[i]).collect();
            self.publish_pipeline(&part).await
        }))
        .await;
        let mut out: Vec<Option<Result<(u64, Epoch), BrokerError>>> =
            requests.iter().map(|_| None).collect();
        for (group, answers) in groups.iter().zip(answers) {
            for (&i, answer) in group.iter().zip(answers) {
                out[i] = Some(answer);
            }
        }
        out.into_iter()
            .map(|answer| {
                answer.unwrap_or_else(|| Err(BrokerError("no answer for the publish".into())))
            })
            .collect()
    }

    async fn room_state(
        &self,
        room: &RoomName,
        since: Option<(u64, &str)>,
        new_epoch: &str,
        history_ttl: Duration,
    ) -> Result<RoomState, BrokerError> {
        self.room_state_script(room, since, new_epoch, history_ttl, false)
            .await
    }

    async fn resync_state(
        &self,
        room: &RoomName,
        since: Option<(u64, &str)>,
        new_epoch: &str,
        history_ttl: Duration,
    ) -> Result<RoomState, BrokerError> {
        self.room_state_script(room, since, new_epoch, history_ttl, true)
            .await
    }

    async fn subscribe(&self, channel: &Channel) -> Result<(), BrokerError> {
        let name = self.channel_name(channel);
        self.inner
            .wanted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.clone());
        let mut sink = self.ready_sink().await?;
        // On failure the channel stays wanted, so the pub/sub loop subscribes
        // it when it reconnects: a session opened while Redis was away must
        // become reachable (`direct`) once it is back, and a room another
        // member joined meanwhile must be heard. (It was forgotten, and such
        // a session stayed `unknown_target` for good.) Whoever no longer
        // needs it unsubscribes: a refused join undoes itself with
        // `Left { unsubscribe }`, a closed session unsubscribes its channels.
        match sink.as_mut() {
            Some(sink) => tokio::time::timeout(RESPONSE_TIMEOUT, sink.subscribe(&[name]))
                .await
                .map_err(|_| BrokerError("subscribe timed out".into()))
                .and_then(|r| r.map_err(err)),
            None => Err(BrokerError("not connected to Redis".into())),
        }
    }

    async fn unsubscribe(&self, channel: &Channel) {
        let name = self.channel_name(channel);
        self.inner
            .wanted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&name);
        if let Some(sink) = self.inner.sink.lock().await.as_mut() {
            let _ = tokio::time::timeout(RESPONSE_TIMEOUT, sink.unsubscribe(&name)).await;
        }
    }

    /// One `SUBSCRIBE` per 256 channels; one result, for all of them.
    async fn subscribe_many(&self, channels: &[Channel]) -> Vec<Result<(), BrokerError>> {
        let result = self.subscribe_all(channels).await;
        channels.iter().map(|_| result.clone()).collect()
    }

    /// The channels one after the other, within one timeout.
    async fn unsubscribe_many(&self, channels: &[Channel]) {
        let names: Vec<String> = channels.iter().map(|c| self.channel_name(c)).collect();
        {
            let mut wanted = self
                .inner
                .wanted
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for name in &names {
                wanted.remove(name);
            }
        }
        if let Some(sink) = self.inner.sink.lock().await.as_mut() {
            let unsubscribe = async {
                for name in &names {
                    sink.unsubscribe(name).await?;
                }
                redis::RedisResult::Ok(())
            };
            let _ = tokio::time::timeout(RESPONSE_TIMEOUT, unsubscribe).await;
        }
    }

    /// Sent together on the multiplexed connection (pipelined on the wire,
    /// in order), answered together.
    async fn presence_batch(
        &self,
        updates: &[PresenceUpdate<'_>],
    ) -> Vec<Result<usize, BrokerError>> {
        futures_util::future::join_all(updates.iter().map(|update| self.presence(*update))).await
    }

    async fn direct(&self, to: &DirectTo, frame: &Bytes) -> Result<usize, BrokerError> {
        let channel = match to {
            DirectTo::User(user) => self.channel_name(&Channel::User(user.clone())),
            DirectTo::Sid(sid) => self.channel_name(&Channel::Sid(sid.clone())),
        };
        let mut payload = Vec::with_capacity(frame.len() + 2);
        payload.extend_from_slice(b"d|");
        payload.extend_from_slice(frame);
        self.command(
            redis::cmd(self.publish_command())
                .arg(channel)
                .arg(payload)
                .clone(),
        )
        .await
    }

    async fn presence(&self, update: PresenceUpdate<'_>) -> Result<usize, BrokerError> {
        let name = update.room.as_str();
        // One write at a time per room on this node: the room index below
        // then never drops a room the node has presence in.
        let _serial = self.inner.presence_locks[lock_index(name)].lock().await;
        let mut update = update;
        let mut reincarnated = false;
        loop {
            let node = self.node();
            let indexed = self.incarnation().indexed.contains(name);
            if !indexed && update.present {
                // Indexed before the presence lands: a node that dies
                // right after still has it reaped.
                self.command::<i64>(
                    redis::cmd("SADD")
                        .arg(node_rooms_key(&node))
                        .arg(name)
                        .clone(),
                )
                .await?;
                let mut incarnation = self.incarnation();
                if incarnation.id == node {
                    incarnation.indexed.insert(name.to_owned());
                }
            }
            let (count, state) = self.presence_script(&update, &node).await?;
            if count < 0 {
                // This id was reaped in this room: the node was taken for
                // dead. It goes on under a new id, and writes again.
                if reincarnated || !self.reincarnate(&node).await {
                    return Err(BrokerError("this node was taken for dead".into()));
                }
                reincarnated = true;
                // Its users' leaves were announced: a write meant to be
                // quiet (recorded again after a reconnect) announces the
                // join, or counts heal with nobody told.
                update.quiet = false;
                continue;
            }
            match state {
                // New presence of this id here: in the node set again, in
                // case a reaper removed the id meanwhile.
                1 => {
                    self.command::<i64>(redis::cmd("SADD").arg("sb:nodes").arg(&*node).clone())
                        .await?;
                }
                // Nothing left of this node here: out of the index (a
                // failure only leaves a room with nothing to reap).
                2 if indexed => {
                    let removed = self
                        .command::<i64>(
                            redis::cmd("SREM")
                                .arg(node_rooms_key(&node))
                                .arg(name)
                                .clone(),
                        )
                        .await;
                    if removed.is_ok() {
                        self.incarnation().indexed.remove(name);
                    }
                }
                _ => {}
            }
            return Ok(usize::try_from(count).unwrap_or(0));
        }
    }

    async fn history(&self, room: &RoomName, limit: usize) -> Result<Vec<Bytes>, BrokerError> {
        let entries: Vec<(String, Vec<(String, Vec<u8>)>)> = self
            .command(
                redis::cmd("XREVRANGE")
                    .arg(room_key(room.as_str(), "log"))
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(limit)
                    .clone(),
            )
            .await?;
        let mut frames: Vec<Bytes> = entries
            .into_iter()
            .filter_map(|(_, fields)| {
                fields
                    .into_iter()
                    .next()
                    .map(|(_, frame)| Bytes::from(frame))
            })
            .collect();
        frames.reverse();
        Ok(frames)
    }

    async fn positions(
        &self,
        rooms: &[RoomName],
    ) -> Result<Vec<Option<(u64, Epoch)>>, BrokerError> {
        let mut out = vec![None; rooms.len()];
        // Two GETs per room, in its slot: one round trip per batch of rooms
        // on one Redis; on a cluster, one pipeline per slot (a handful of
        // rooms each), a batch of them at once.
        let groups = self.pipeline_groups(rooms, |room| room_key(room.as_str(), "seq"));
        let pipelines: Vec<Vec<usize>> = groups
            .into_iter()
            .flat_map(|group| {
                group
                    .chunks(POSITIONS_BATCH)
                    .map(<[usize]>::to_vec)
                    .collect::<Vec<_>>()
            })
            .collect();
        for batch in pipelines.chunks(POSITIONS_BATCH) {
            let answers = futures_util::future::join_all(batch.iter().map(|group| async move {
                let mut pipe = redis::pipe();
                for &i in group {
                    pipe.cmd("GET").arg(room_key(rooms[i].as_str(), "seq"));
                    pipe.cmd("GET").arg(room_key(rooms[i].as_str(), "epoch"));
                }
                let values: Result<Vec<Option<String>>, BrokerError> = self
                    .call(|mut con, _| async move { pipe.query_async(&mut con).await })
                    .await;
                (group, values)
            }))
            .await;
            for (group, values) in answers {
                for (&i, pair) in group.iter().zip(values?.chunks(2)) {
                    out[i] = match pair {
                        [seq, Some(epoch)] => Some((
                            seq.as_deref().and_then(|s| s.parse().ok()).unwrap_or(0),
                            Epoch::from(epoch.as_str()),
                        )),
                        _ => None,
                    };
                }
            }
        }
        Ok(out)
    }

    async fn presence_list(&self, room: &RoomName) -> Result<Vec<String>, BrokerError> {
        let mut users: Vec<String> = self
            .command(
                redis::cmd("HKEYS")
                    .arg(room_key(room.as_str(), "users"))
                    .clone(),
            )
            .await?;
        users.sort();
        Ok(users)
    }
}

fn parse_room_state(
    reply: &[redis::Value],
    since: Option<(u64, &str)>,
) -> Result<RoomState, BrokerError> {
    let bad = || BrokerError("unexpected reply from the room state script".into());
    let seq = u64::from_redis_value(reply.first().ok_or_else(bad)?.clone()).map_err(|_| bad())?;
    let epoch =
        String::from_redis_value(reply.get(1).ok_or_else(bad)?.clone()).map_err(|_| bad())?;
    let users =
        usize::from_redis_value(reply.get(2).ok_or_else(bad)?.clone()).map_err(|_| bad())?;
    let recovered =
        u8::from_redis_value(reply.get(3).ok_or_else(bad)?.clone()).map_err(|_| bad())? == 1;
    let replay = match since {
        Some((since_seq, _)) if recovered => {
            let mut frames = Vec::with_capacity(reply.len().saturating_sub(4));
            for (offset, value) in reply.iter().skip(4).enumerate() {
                let frame = Vec::<u8>::from_redis_value(value.clone()).map_err(|_| bad())?;
                frames.push((since_seq + 1 + offset as u64, Bytes::from(frame)));
            }
            Some(frames)
        }
        _ => None,
    };
    Ok(RoomState {
        seq,
        epoch: Epoch::from(epoch),
        users,
        replay,
    })
}

/// The room a room channel is of.
fn channel_room(channel: &str, sharded: bool) -> Option<&str> {
    if sharded {
        channel.strip_prefix("sb:{")?.strip_suffix("}:ch")
    } else {
        channel.strip_prefix("sb:r:")
    }
}

/// The user or sid a direct channel (`prefix` `sb:u:`, `sb:s:`) is of.
fn channel_target<'a>(channel: &'a str, prefix: &str, sharded: bool) -> Option<&'a str> {
    let rest = channel.strip_prefix(prefix)?;
    if sharded {
        rest.strip_prefix('{')?.strip_suffix('}')
    } else {
        Some(rest)
    }
}

/// Parses one pub/sub message into what the node must do.
fn parse_event(channel: &str, payload: &[u8], sharded: bool) -> Option<BrokerEvent> {
    if let Some(room) = channel_room(channel, sharded) {
        let room = RoomName::new(room).ok()?;
        let (kind, rest) = split_once(payload, b'|')?;
        match kind {
            b"m" => {
                let (seq, rest) = split_once(rest, b'|')?;
                let (epoch, rest) = split_once(rest, b'|')?;
                let (exclude, frame) = split_once(rest, b'|')?;
                Some(BrokerEvent::Message {
                    room,
                    seq: std::str::from_utf8(seq).ok()?.parse().ok()?,
                    epoch: Epoch::from(std::str::from_utf8(epoch).ok()?),
                    frame: Bytes::copy_from_slice(frame),
                    exclude: sid(exclude),
                })
            }
            b"p" => {
                let (exclude, frame) = split_once(rest, b'|')?;
                Some(BrokerEvent::Presence {
                    room,
                    frame: Bytes::copy_from_slice(frame),
                    exclude: sid(exclude),
                })
            }
            _ => None,
        }
    } else {
        let frame = Bytes::copy_from_slice(payload.strip_prefix(b"d|")?);
        if let Some(user) = channel_target(channel, "sb:u:", sharded) {
            Some(BrokerEvent::Direct {
                to: DirectTo::User(UserId::from(user)),
                frame,
            })
        } else {
            let sid = channel_target(channel, "sb:s:", sharded)?;
            Some(BrokerEvent::Direct {
                to: DirectTo::Sid(Sid::from(sid)),
                frame,
            })
        }
    }
}

fn sid(bytes: &[u8]) -> Option<Sid> {
    (!bytes.is_empty())
        .then(|| std::str::from_utf8(bytes).ok().map(Sid::from))
        .flatten()
}

fn split_once(bytes: &[u8], separator: u8) -> Option<(&[u8], &[u8])> {
    let at = bytes.iter().position(|b| *b == separator)?;
    Some((&bytes[..at], &bytes[at + 1..]))
}

/// The subscribing half of a pub/sub connection of either kind.
enum Sink {
    Standalone(PubSubSink),
    /// A RESP3 cluster connection whose pushes go to a [`Heard::Cluster`]
    /// stream; with sharded channels, each subscription goes to the master
    /// of its channel's slot.
    Cluster {
        con: ClusterConnection,
        sharded: bool,
    },
}

impl Sink {
    async fn subscribe(&mut self, names: &[String]) -> redis::RedisResult<()> {
        match self {
            Self::Standalone(sink) => sink.subscribe(names).await,
            Self::Cluster { con, sharded } => {
                // One command per slot, all sent at once: a server refuses
                // sharded channels of several slots in one, and a classic
                // subscription must sit on its channel's master, where a
                // `PUBLISH` to it is routed and counts its receivers (a
                // cluster node counts only its own).
                let mut slots: HashMap<Slot, Vec<&String>> = HashMap::new();
                for name in names {
                    slots.entry(Slot::for_key(name)).or_default().push(name);
                }
                let sharded = *sharded;
                let sent = slots.into_values().map(|names| {
                    let mut con = con.clone();
                    async move {
                        if sharded {
                            con.ssubscribe(names).await
                        } else {
                            con.subscribe(names).await
                        }
                    }
                });
                futures_util::future::try_join_all(sent).await.map(drop)
            }
        }
    }

    async fn unsubscribe(&mut self, name: &str) -> redis::RedisResult<()> {
        match self {
            Self::Standalone(sink) => sink.unsubscribe(name).await,
            Self::Cluster {
                con,
                sharded: false,
            } => con.unsubscribe(name).await,
            Self::Cluster { con, sharded: true } => con.sunsubscribe(name).await,
        }
    }

    /// `PING`; on a cluster, every master (each may hold subscriptions).
    async fn ping(&mut self) -> redis::RedisResult<()> {
        match self {
            Self::Standalone(sink) => sink.ping::<redis::Value>().await.map(drop),
            Self::Cluster { con, .. } => redis::cmd("PING")
                .query_async::<redis::Value>(con)
                .await
                .map(drop),
        }
    }
}

/// The receiving half of a pub/sub connection of either kind.
enum Heard {
    Standalone(redis::aio::PubSubStream),
    Cluster(mpsc::UnboundedReceiver<PushInfo>),
}

impl Heard {
    /// The next message (channel, payload), `Ok(None)` for anything else
    /// heard, `Err(())` once the connection is lost: closed, or (cluster) one
    /// of its nodes' connections closed, or a server dropped a wanted
    /// subscription (its slot moved to another master).
    async fn next(&mut self, broker: &RedisBroker) -> Result<Option<(String, Vec<u8>)>, ()> {
        match self {
            Self::Standalone(stream) => {
                let message = stream.next().await.ok_or(())?;
                Ok(Some((
                    message.get_channel_name().to_owned(),
                    message.get_payload_bytes().to_vec(),
                )))
            }
            Self::Cluster(pushes) => {
                let push = pushes.recv().await.ok_or(())?;
                let mut data = push.data.into_iter();
                match push.kind {
                    PushKind::Message | PushKind::SMessage => {
                        let (Some(channel), Some(payload)) = (data.next(), data.next()) else {
                            return Ok(None);
                        };
                        Ok(String::from_redis_value(channel)
                            .ok()
                            .zip(Vec::<u8>::from_redis_value(payload).ok()))
                    }
                    PushKind::Disconnection => Err(()),
                    PushKind::Unsubscribe | PushKind::SUnsubscribe => {
                        let channel = data
                            .next()
                            .and_then(|c| String::from_redis_value(c).ok())
                            .unwrap_or_default();
                        let wanted = broker
                            .inner
                            .wanted
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .contains(&channel);
                        if wanted {
                            Err(())
                        } else {
                            Ok(None)
                        }
                    }
                    _ => Ok(None),
                }
            }
        }
    }
}

/// A new pub/sub connection.
async fn connect_pubsub(broker: &RedisBroker) -> redis::RedisResult<(Sink, Heard)> {
    match &broker.inner.connector {
        Connector::Standalone(_) | Connector::Sentinel(_) => {
            let client = broker.inner.connector.client().await?;
            let pubsub = tokio::time::timeout(RESPONSE_TIMEOUT, client.get_async_pubsub())
                .await
                .map_err(|_| timed_out("connecting to Redis"))??;
            let (sink, stream) = pubsub.split();
            Ok((Sink::Standalone(sink), Heard::Standalone(stream)))
        }
        Connector::Cluster { seeds, .. } => {
            // Unbounded: the library pushes without waiting. `forward`
            // drains it at once into the bounded events queue.
            let (pushes, heard) = mpsc::unbounded_channel();
            let client = cluster_builder(seeds)
                .use_protocol(ProtocolVersion::RESP3)
                .push_sender(pushes)
                .build()?;
            let con = tokio::time::timeout(RESPONSE_TIMEOUT, client.get_async_connection())
                .await
                .map_err(|_| timed_out("connecting to the Redis Cluster"))??;
            let sharded = broker.sharded();
            Ok((Sink::Cluster { con, sharded }, Heard::Cluster(heard)))
        }
    }
}

/// Keeps a pub/sub connection up: subscribes to every wanted channel after
/// each (re)connect (in batches), forwards messages in order, pings the
/// connection to notice when it goes dead, and backs off (with jitter) while
/// Redis is away.
async fn run_pubsub(broker: RedisBroker, events: mpsc::Sender<BrokerEvent>) {
    let mut backoff = Duration::from_millis(100);
    let mut connected_before = false;
    loop {
        if events.is_closed() {
            return;
        }
        match connect_pubsub(&broker).await {
            Ok((sink, mut heard)) => {
                if !subscribe_wanted(&broker, sink).await {
                    tracing::warn!("could not subscribe again on a new Redis pub/sub connection");
                } else {
                    backoff = Duration::from_millis(100);
                    if connected_before {
                        tracing::info!("reconnected to Redis");
                        if events.send(BrokerEvent::Reconnected).await.is_err() {
                            return;
                        }
                    }
                    connected_before = true;
                    if !forward(&broker, &mut heard, &events).await {
                        return;
                    }
                    *broker.inner.sink.lock().await = None;
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot reach Redis"),
        }
        tokio::time::sleep(backoff + jitter()).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Subscribes a new pub/sub connection to every wanted channel, then puts
/// its sink in place; false when a `SUBSCRIBE` failed or timed out.
async fn subscribe_wanted(broker: &RedisBroker, mut sink: Sink) -> bool {
    // Held from the snapshot of `wanted` until the sink is in place: a
    // concurrent `subscribe` either is in the snapshot or runs on the new
    // sink after this, never in between.
    let mut current = broker.inner.sink.lock().await;
    let wanted: Vec<String> = broker
        .inner
        .wanted
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .cloned()
        .collect();
    // Batches: one round trip per few hundred channels, not per channel,
    // so a node with many rooms is heard again quickly after a reconnect.
    for batch in wanted.chunks(SUBSCRIBE_BATCH) {
        match tokio::time::timeout(RESPONSE_TIMEOUT, sink.subscribe(batch)).await {
            Ok(Ok(())) => {}
            _ => return false,
        }
    }
    *current = Some(sink);
    true
}

/// Forwards what the pub/sub connection hears until it is lost or stops
/// answering `PING`; false when the runtime is gone.
async fn forward(
    broker: &RedisBroker,
    heard: &mut Heard,
    events: &mpsc::Sender<BrokerEvent>,
) -> bool {
    let mut ping = tokio::time::interval(PUBSUB_PING);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let sharded = broker.sharded();
    // The intake is bounded: when the runtime falls behind and the events
    // queue is full, messages are dropped (not buffered without bound) and
    // the node catches up from Redis once there is room again.
    let mut overflowed = false;
    loop {
        tokio::select! {
            message = heard.next(broker) => {
                let Ok(message) = message else {
                    tracing::warn!("lost the Redis pub/sub connection");
                    return true;
                };
                let Some(event) = message
                    .and_then(|(channel, payload)| parse_event(&channel, &payload, sharded))
                else {
                    continue;
                };
                if overflowed {
                    match events.try_reserve() {
                        Ok(permit) => {
                            permit.send(BrokerEvent::Reconnected);
                            overflowed = false;
                        }
                        Err(mpsc::error::TrySendError::Closed(())) => return false,
                        Err(mpsc::error::TrySendError::Full(())) => continue,
                    }
                }
                match events.try_send(event) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Closed(_)) => return false,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        tracing::warn!("broker events queue full: dropping, then catching up");
                        overflowed = true;
                    }
                }
            }
            _ = ping.tick() => {
                if overflowed && events.send(BrokerEvent::Reconnected).await.is_err() {
                    return false;
                }
                overflowed = false;
                let mut sink = broker.inner.sink.lock().await;
                let answered = match sink.as_mut() {
                    Some(sink) => matches!(
                        tokio::time::timeout(RESPONSE_TIMEOUT, sink.ping()).await,
                        Ok(Ok(()))
                    ),
                    None => false,
                };
                if !answered {
                    tracing::warn!("the Redis pub/sub connection stopped answering PING; reconnecting");
                    *sink = None;
                    return true;
                }
            }
        }
    }
}

fn rand_u8() -> u8 {
    let mut byte = [0u8; 1];
    let _ = getrandom::fill(&mut byte);
    byte[0]
}

/// Refreshes this node's "alive" key, takes a new id when it finds the key
/// had expired, and removes the presence of nodes whose key expired.
/// `last_run`: the Redis run of the beat made at start.
async fn run_node_heartbeat(
    broker: RedisBroker,
    events: mpsc::Sender<BrokerEvent>,
    mut last_run: Arc<str>,
) {
    let mut tick = tokio::time::interval(broker.inner.node_ttl / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the start beat was this one
                       // The current id expired and a new one is still to be taken.
    let mut lapsed = false;
    loop {
        tick.tick().await;
        if events.is_closed() {
            return;
        }
        let node = broker.node();
        let Ok((alive, run)) = broker.beat(&node).await else {
            continue;
        };
        // Its alive key expired in the same Redis it was in (a Redis that
        // restarted empty lost it too, but that is a reconnect, which records
        // presence again; in a cluster the key's master may have failed over,
        // which cannot be told apart, so any loss counts): other nodes may
        // have reaped it, announcing its users' leaves while they are still
        // here.
        if !alive && (broker.is_cluster() || run == last_run) {
            lapsed = true;
        }
        last_run = run;
        if lapsed && broker.reincarnate(&node).await {
            lapsed = false;
        }
        let Ok(nodes) = broker
            .command::<Vec<String>>(redis::cmd("SMEMBERS").arg("sb:nodes").clone())
            .await
        else {
            continue;
        };
        let current = broker.node();
        for other in nodes.iter().filter(|n| ***n != *current) {
            if let Err(e) = broker.reap(other).await {
                tracing::debug!(node = %other, error = %e, "cannot reap a node yet");
            }
        }
    }
}
