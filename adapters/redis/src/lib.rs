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
//!   the room's cluster-wide hash and in a hash of its own, which makes every
//!   change idempotent per node (safe to retry, to undo when it never
//!   landed, to record again); a node refreshes an "alive" key every few
//!   seconds, and any node that sees another's key expire removes that
//!   node's users and announces their leaves.
//! - **Redis going away** fails publishes with an error at once (nothing is
//!   queued), leaves local sessions connected, and reconnects with backoff;
//!   after a reconnect the runtime records its presence again and brings its
//!   rooms up to date; a node whose missed messages are no longer kept
//!   tells its own members (`recovered: false`), and the room keeps its
//!   epoch and history for everyone else.

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use redis::aio::{MultiplexedConnection, PubSubSink};
use redis::io::tcp::{socket2::TcpKeepalive, TcpSettings};
use redis::{AsyncConnectionConfig, Client, IntoConnectionInfo, RedisError, Script};
use switchboard_core::{Epoch, RoomName, Sid, UserId};
use switchboard_runtime::async_trait;
use switchboard_runtime::broker::{
    Broker, BrokerError, BrokerEvent, Channel, DirectTo, PresenceUpdate, PublishRequest, RoomState,
};
use tokio::sync::{mpsc, OnceCell};

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

/// Keys of one room, in one hash slot (`{room}`).
fn room_key(room: &str, what: &str) -> String {
    format!("sb:{{{room}}}:{what}")
}

fn channel_name(channel: &Channel) -> String {
    match channel {
        Channel::Room(room) => format!("sb:r:{room}"),
        Channel::User(user) => format!("sb:u:{user}"),
        Channel::Sid(sid) => format!("sb:s:{sid}"),
    }
}

// Room keys, all in the room's hash slot: `seq`, `epoch`, `log` (the capped
// stream of its history), `users` (user → how many nodes have them there),
// `announce` (set while the room announces presence), `ttl` (its
// `history_ttl` in ms, while it has users, for the reaper), `run` (the run
// id of the Redis that started or last checked the epoch). A room's `seq`,
// `epoch`, `log` and `run` never expire while `users` exists; they expire
// `ttl` after the last user left (or after the last message, if later).

/// Prepended to every script that sets or reads a room's epoch or changes
/// its TTL. `run` follows `epoch`'s TTL. `check_run` moves a room to a new
/// epoch when its state was not written by this Redis run: a Redis that
/// restarted from a snapshot (or a replica that took over) may have lost
/// the latest messages, so the `seq` it goes on from could be handed out
/// again in the same epoch; a new epoch makes that impossible (`seq` goes
/// on counting, the kept history, of the old epoch, is dropped).
const RUN_HELPERS: &str = r#"
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
-- ARGV: room, body, exclude, history, ttl_ms, new_epoch, run id, key ttl_ms
local done = redis.call('GET', KEYS[6])
if done then
  -- Published already (a retry whose first try landed): its seq and epoch.
  local sep = string.find(done, '|', 1, true)
  return {tonumber(string.sub(done, 1, sep - 1)), string.sub(done, sep + 1)}
end
local epoch = check_run(KEYS[2], KEYS[3], KEYS[5], ARGV[7], ARGV[6])
if not epoch then
  epoch = ARGV[6]
  redis.call('SET', KEYS[2], epoch)
  redis.call('SET', KEYS[1], 0)
  redis.call('DEL', KEYS[3])
  redis.call('SET', KEYS[5], ARGV[7])
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
redis.call('PUBLISH', 'sb:r:' .. ARGV[1], 'm|' .. seq .. '|' .. epoch .. '|' .. ARGV[3] .. '|' .. frame)
return {seq, epoch}
"#;

const ROOM_STATE: &str = r#"
-- KEYS: seq, epoch, log, users, run.
-- ARGV: since_seq (-1: none), since_epoch, new_epoch, ttl_ms, resync (1/0), run id
local present = redis.call('EXISTS', KEYS[4]) == 1
local epoch = check_run(KEYS[2], KEYS[3], KEYS[5], ARGV[6], ARGV[3])
if not epoch then
  epoch = ARGV[3]
  redis.call('SET', KEYS[2], epoch)
  redis.call('SET', KEYS[1], 0)
  redis.call('DEL', KEYS[3])
  redis.call('SET', KEYS[5], ARGV[6])
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
-- KEYS: room users, node presence, room announce, room ttl, room seq, room epoch, room log,
--       room run.
-- ARGV: present (1/0), user, room, node field, subject sid, announce (1/0),
--       quiet (1/0), ttl_ms
-- Idempotent per node: the node's own hash says whether this node counts
-- the user in the room, so repeating a change, or undoing one that never
-- landed, changes nothing.
local join = ARGV[1] == '1'
local changed
if join then
  changed = redis.call('HSETNX', KEYS[2], ARGV[4], 1) == 1
else
  changed = redis.call('HDEL', KEYS[2], ARGV[4]) == 1
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
  if ARGV[6] == '1' then redis.call('SET', KEYS[3], 1) end
  redis.call('SET', KEYS[4], ARGV[8])
  redis.call('PERSIST', KEYS[5])
  redis.call('PERSIST', KEYS[6])
  redis.call('PERSIST', KEYS[7])
else
  redis.call('DEL', KEYS[3], KEYS[4])
  redis.call('PEXPIRE', KEYS[5], ARGV[8])
  redis.call('PEXPIRE', KEYS[6], ARGV[8])
  redis.call('PEXPIRE', KEYS[7], ARGV[8])
end
keep_run(KEYS[6], KEYS[8])
if changed and ARGV[6] == '1' and ARGV[7] ~= '1' and ((join and nodes == 1) or (not join and nodes <= 0)) then
  local action = 'join'
  if not join then action = 'leave' end
  local frame = '{"type":"presence","room":"' .. ARGV[3] .. '","action":"' .. action .. '","user":' .. cjson.encode(ARGV[2]) .. ',"count":' .. count .. '}'
  redis.call('PUBLISH', 'sb:r:' .. ARGV[3], 'p|' .. ARGV[5] .. '|' .. frame)
end
return count
"#;

const REAP: &str = r#"
-- KEYS: dead node's presence, its alive key, the node set.
-- ARGV: dead node id, default ttl_ms
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local entries = redis.call('HGETALL', KEYS[1])
for i = 1, #entries, 2 do
  local field = entries[i]
  local n = tonumber(entries[i + 1])
  local sep = string.find(field, '\n', 1, true)
  local room = string.sub(field, 1, sep - 1)
  local user = string.sub(field, sep + 1)
  local prefix = 'sb:{' .. room .. '}:'
  local users = prefix .. 'users'
  local tabs = redis.call('HINCRBY', users, user, -n)
  if tabs <= 0 then
    redis.call('HDEL', users, user)
    local count = redis.call('HLEN', users)
    if redis.call('EXISTS', prefix .. 'announce') == 1 then
      local frame = '{"type":"presence","room":"' .. room .. '","action":"leave","user":' .. cjson.encode(user) .. ',"count":' .. count .. '}'
      redis.call('PUBLISH', 'sb:r:' .. room, 'p||' .. frame)
    end
    if count == 0 then
      -- At least ARGV[2]: the node may be alive (paused, cut off) with
      -- members still connected, and will record them again when it is
      -- back; the room's history must outlive that.
      local ttl = math.max(tonumber(redis.call('GET', prefix .. 'ttl') or ARGV[2]), tonumber(ARGV[2]))
      redis.call('DEL', prefix .. 'announce', prefix .. 'ttl')
      redis.call('PEXPIRE', prefix .. 'seq', ttl)
      redis.call('PEXPIRE', prefix .. 'epoch', ttl)
      redis.call('PEXPIRE', prefix .. 'log', ttl)
      keep_run(prefix .. 'epoch', prefix .. 'run')
    end
  end
end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[3], ARGV[1])
return 1
"#;

/// The Redis broker. Cheap to clone; give it to `Switchboard::builder().broker(...)`.
#[derive(Clone)]
pub struct RedisBroker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBroker")
            .field("node", &self.inner.node)
            .finish_non_exhaustive()
    }
}

struct Inner {
    client: Client,
    node: String,
    node_ttl: Duration,
    /// The command connection, while up.
    link: Mutex<Option<Link>>,
    /// A task is making the command connection again.
    reconnecting: AtomicBool,
    /// Tells links apart, so that a failure drops only the link it happened on.
    links: AtomicU64,
    started: OnceCell<()>,
    /// The subscription half of the pub/sub connection, while connected.
    sink: tokio::sync::Mutex<Option<PubSubSink>>,
    /// Channels this node wants, re-subscribed after a reconnect.
    // A std Mutex: only set operations happen under it.
    wanted: Mutex<HashSet<String>>,
    publish: Script,
    room_state: Script,
    presence: Script,
    reap: Script,
}

impl RedisBroker {
    /// A broker for the Redis at `url` (`redis://127.0.0.1:6379`). Connects
    /// when the Switchboard starts it.
    ///
    /// # Errors
    /// When the URL is not a Redis URL.
    pub fn new(url: &str) -> Result<Self, BrokerError> {
        // TCP_NODELAY: a publish is one small write that must not wait for
        // an ACK. Keepalive and TCP_USER_TIMEOUT make the kernel give up on
        // a peer that stopped answering (dead host, NAT timeout) within
        // seconds; the pub/sub PING and the command timeouts notice even
        // what they cannot (a middlebox that keeps the socket open).
        let keepalive = TcpKeepalive::new()
            .with_time(Duration::from_secs(5))
            .with_interval(Duration::from_secs(1))
            .with_retries(3);
        let tcp = TcpSettings::default()
            .set_nodelay(true)
            .set_keepalive(keepalive)
            .set_user_timeout(Duration::from_secs(8));
        let info = url
            .into_connection_info()
            .map_err(err)?
            .set_tcp_settings(tcp);
        let client = Client::open(info).map_err(err)?;
        let mut id = [0u8; 8];
        getrandom::fill(&mut id).map_err(|e| BrokerError(format!("no randomness: {e}")))?;
        let node = id.iter().map(|b| format!("{b:02x}")).collect();
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                node,
                node_ttl: DEFAULT_NODE_TTL,
                link: Mutex::new(None),
                reconnecting: AtomicBool::new(false),
                links: AtomicU64::new(0),
                started: OnceCell::new(),
                sink: tokio::sync::Mutex::new(None),
                wanted: Mutex::new(HashSet::new()),
                publish: Script::new(&format!("{RUN_HELPERS}{PUBLISH}")),
                room_state: Script::new(&format!("{RUN_HELPERS}{ROOM_STATE}")),
                presence: Script::new(&format!("{RUN_HELPERS}{PRESENCE}")),
                reap: Script::new(&format!("{RUN_HELPERS}{REAP}")),
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

    /// This node's id in the cluster.
    #[must_use]
    pub fn node_id(&self) -> &str {
        &self.inner.node
    }

    /// Runs `f` on the command connection. Fails at once while the
    /// connection is down (and starts making it again); a failure that may
    /// have left the connection unusable (an I/O error, a timeout: a
    /// blackholed connection) drops it, so the next call gets a new one.
    async fn call<T, F, Fut>(&self, f: F) -> Result<T, BrokerError>
    where
        F: FnOnce(MultiplexedConnection, Arc<str>) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        self.call_checked(f).await.map_err(|(e, _)| e)
    }

    /// As [`RedisBroker::call`]; the error also says whether the command
    /// was sent and its answer lost (it may have taken effect).
    async fn call_checked<T, F, Fut>(&self, f: F) -> Result<T, (BrokerError, bool)>
    where
        F: FnOnce(MultiplexedConnection, Arc<str>) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let link = self.link().map_err(|e| (e, false))?;
        let result = f(link.con.clone(), Arc::clone(&link.run_id)).await;
        result.map_err(|e| {
            let lost = e.is_timeout() || e.is_io_error() || e.is_unrecoverable_error();
            if lost {
                self.drop_link(link.id, &e);
            }
            (err(e), lost)
        })
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
                    pipe.add_command(publish_command(script.get_hash(), request, &run_id));
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

    /// A new command connection, and the run id of the Redis it reached.
    async fn connect_link(&self) -> redis::RedisResult<Link> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(RESPONSE_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT));
        let mut con = self
            .inner
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut con)
            .await?;
        let run_id = info
            .lines()
            .find_map(|line| line.strip_prefix("run_id:"))
            .map(str::trim)
            .unwrap_or_default();
        Ok(Link {
            con,
            run_id: Arc::from(run_id),
            id: self.inner.links.fetch_add(1, Ordering::Relaxed),
        })
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
                    .key(room_key(name, "seq"))
                    .key(room_key(name, "epoch"))
                    .key(room_key(name, "log"))
                    .key(room_key(name, "users"))
                    .key(room_key(name, "run"))
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

    fn node_presence_key(&self) -> String {
        format!("sb:node:{}:presence", self.inner.node)
    }

    fn node_alive_key(node: &str) -> String {
        format!("sb:node:{node}:alive")
    }
}

/// The command connection, and the run id of the Redis instance it reached:
/// a TCP connection reaches one instance for its whole life, so the run id
/// is exact for every script sent on it.
#[derive(Clone)]
struct Link {
    con: MultiplexedConnection,
    run_id: Arc<str>,
    id: u64,
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

#[async_trait]
impl Broker for RedisBroker {
    async fn start(&self, events: mpsc::Sender<BrokerEvent>) -> Result<(), BrokerError> {
        // The first connection is made here, so that a node that cannot
        // reach Redis at start says so; after that, a command fails at once
        // while the connection is down (a session's next frames, a `ping`
        // included, wait for its answer) and a task makes it again.
        let link = self.connect_link().await.map_err(err)?;
        *self
            .inner
            .link
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(link);
        let _ = self.inner.started.set(());
        tokio::spawn(run_node_heartbeat(self.clone(), events.clone()));
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
    async fn publish_batch(
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
        let name = channel_name(channel);
        self.inner
            .wanted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.clone());
        let mut sink = self.inner.sink.lock().await;
        // On failure the channel stays wanted, so the pub/sub loop subscribes
        // it when it reconnects: a session opened while Redis was away must
        // become reachable (`direct`) once it is back, and a room another
        // member joined meanwhile must be heard. (It was forgotten, and such
        // a session stayed `unknown_target` for good.) Whoever no longer
        // needs it unsubscribes: a refused join undoes itself with
        // `Left { unsubscribe }`, a closed session unsubscribes its channels.
        match sink.as_mut() {
            Some(sink) => tokio::time::timeout(RESPONSE_TIMEOUT, sink.subscribe(&name))
                .await
                .map_err(|_| BrokerError("subscribe timed out".into()))
                .and_then(|r| r.map_err(err)),
            None => Err(BrokerError("not connected to Redis".into())),
        }
    }

    async fn unsubscribe(&self, channel: &Channel) {
        let name = channel_name(channel);
        self.inner
            .wanted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&name);
        if let Some(sink) = self.inner.sink.lock().await.as_mut() {
            let _ = tokio::time::timeout(RESPONSE_TIMEOUT, sink.unsubscribe(&name)).await;
        }
    }

    /// One `SUBSCRIBE` per [`SUBSCRIBE_BATCH`] channels.
    async fn subscribe_many(&self, channels: &[Channel]) -> Result<(), BrokerError> {
        let names: Vec<String> = channels.iter().map(channel_name).collect();
        self.inner
            .wanted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(names.iter().cloned());
        let mut sink = self.inner.sink.lock().await;
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

    /// One `UNSUBSCRIBE` per [`SUBSCRIBE_BATCH`] channels.
    async fn unsubscribe_many(&self, channels: &[Channel]) {
        let names: Vec<String> = channels.iter().map(channel_name).collect();
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
            for batch in names.chunks(SUBSCRIBE_BATCH) {
                let _ = tokio::time::timeout(RESPONSE_TIMEOUT, sink.unsubscribe(batch)).await;
            }
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
            DirectTo::User(user) => channel_name(&Channel::User(user.clone())),
            DirectTo::Sid(sid) => channel_name(&Channel::Sid(sid.clone())),
        };
        let mut payload = Vec::with_capacity(frame.len() + 2);
        payload.extend_from_slice(b"d|");
        payload.extend_from_slice(frame);
        let command = redis::cmd("PUBLISH").arg(channel).arg(payload).clone();
        self.call(|mut con, _| async move { command.query_async(&mut con).await })
            .await
    }

    async fn presence(&self, update: PresenceUpdate<'_>) -> Result<usize, BrokerError> {
        let name = update.room.as_str();
        let node_presence = self.node_presence_key();
        let field = format!("{name}\n{}", update.user);
        self.call(|mut con, _| async move {
            self.inner
                .presence
                .key(room_key(name, "users"))
                .key(node_presence)
                .key(room_key(name, "announce"))
                .key(room_key(name, "ttl"))
                .key(room_key(name, "seq"))
                .key(room_key(name, "epoch"))
                .key(room_key(name, "log"))
                .key(room_key(name, "run"))
                .arg(if update.present { "1" } else { "0" })
                .arg(update.user.as_str())
                .arg(name)
                .arg(field)
                .arg(update.subject.as_str())
                .arg(if update.announce { "1" } else { "0" })
                .arg(if update.quiet { "1" } else { "0" })
                .arg(millis(update.history_ttl))
                .invoke_async(&mut con)
                .await
        })
        .await
    }

    async fn history(&self, room: &RoomName, limit: usize) -> Result<Vec<Bytes>, BrokerError> {
        let command = redis::cmd("XREVRANGE")
            .arg(room_key(room.as_str(), "log"))
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(limit)
            .clone();
        let entries: Vec<(String, Vec<(String, Vec<u8>)>)> = self
            .call(|mut con, _| async move { command.query_async(&mut con).await })
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
        let mut out = Vec::with_capacity(rooms.len());
        // One round trip per batch; two GETs per room, each in its room's slot.
        for batch in rooms.chunks(POSITIONS_BATCH) {
            let mut pipe = redis::pipe();
            for room in batch {
                pipe.cmd("GET").arg(room_key(room.as_str(), "seq"));
                pipe.cmd("GET").arg(room_key(room.as_str(), "epoch"));
            }
            let values: Vec<Option<String>> = self
                .call(|mut con, _| async move { pipe.query_async(&mut con).await })
                .await?;
            for pair in values.chunks(2) {
                out.push(match pair {
                    [seq, Some(epoch)] => Some((
                        seq.as_deref().and_then(|s| s.parse().ok()).unwrap_or(0),
                        Epoch::from(epoch.as_str()),
                    )),
                    _ => None,
                });
            }
        }
        Ok(out)
    }

    async fn presence_list(&self, room: &RoomName) -> Result<Vec<String>, BrokerError> {
        let command = redis::cmd("HKEYS")
            .arg(room_key(room.as_str(), "users"))
            .clone();
        let mut users: Vec<String> = self
            .call(|mut con, _| async move { command.query_async(&mut con).await })
            .await?;
        users.sort();
        Ok(users)
    }
}

fn parse_room_state(
    reply: &[redis::Value],
    since: Option<(u64, &str)>,
) -> Result<RoomState, BrokerError> {
    use redis::FromRedisValue;
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

/// The `EVALSHA` of the publish script (`hash`) for one publish.
fn publish_command(hash: &str, request: &PublishRequest<'_>, run_id: &str) -> redis::Cmd {
    let room = request.room.as_str();
    let mut command = redis::cmd("EVALSHA");
    command
        .arg(hash)
        .arg(6)
        .arg(room_key(room, "seq"))
        .arg(room_key(room, "epoch"))
        .arg(room_key(room, "log"))
        .arg(room_key(room, "users"))
        .arg(room_key(room, "run"))
        .arg(room_key(room, &format!("pub:{}", request.key)))
        .arg(room)
        .arg(request.body)
        .arg(request.exclude.map_or("", Sid::as_str))
        .arg(request.history)
        .arg(millis(request.history_ttl))
        .arg(request.new_epoch)
        .arg(run_id)
        .arg(millis(PUBLISH_KEY_TTL));
    command
}

/// Parses one pub/sub message into what the node must do.
fn parse_event(channel: &str, payload: &[u8]) -> Option<BrokerEvent> {
    if let Some(room) = channel.strip_prefix("sb:r:") {
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
        if let Some(user) = channel.strip_prefix("sb:u:") {
            Some(BrokerEvent::Direct {
                to: DirectTo::User(UserId::from(user)),
                frame,
            })
        } else {
            let sid = channel.strip_prefix("sb:s:")?;
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
        match tokio::time::timeout(RESPONSE_TIMEOUT, broker.inner.client.get_async_pubsub()).await {
            Ok(Ok(pubsub)) => {
                let (sink, mut stream) = pubsub.split();
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
                    if !forward(&broker, &mut stream, &events).await {
                        return;
                    }
                    *broker.inner.sink.lock().await = None;
                }
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "cannot reach Redis"),
            Err(_) => tracing::debug!("connecting to Redis timed out"),
        }
        tokio::time::sleep(backoff + jitter()).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Subscribes a new pub/sub connection to every wanted channel, then puts
/// its sink in place; false when a `SUBSCRIBE` failed or timed out.
async fn subscribe_wanted(broker: &RedisBroker, mut sink: PubSubSink) -> bool {
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
    stream: &mut redis::aio::PubSubStream,
    events: &mpsc::Sender<BrokerEvent>,
) -> bool {
    let mut ping = tokio::time::interval(PUBSUB_PING);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The intake is bounded: when the runtime falls behind and the events
    // queue is full, messages are dropped (not buffered without bound) and
    // the node catches up from Redis once there is room again.
    let mut overflowed = false;
    loop {
        tokio::select! {
            message = stream.next() => {
                let Some(message) = message else {
                    tracing::warn!("lost the Redis pub/sub connection");
                    return true;
                };
                let Some(event) = parse_event(message.get_channel_name(), message.get_payload_bytes())
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
                        tokio::time::timeout(RESPONSE_TIMEOUT, sink.ping::<redis::Value>()).await,
                        Ok(Ok(_))
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

/// Refreshes this node's "alive" key and removes the presence of nodes whose
/// key expired.
async fn run_node_heartbeat(broker: RedisBroker, events: mpsc::Sender<BrokerEvent>) {
    let mut tick = tokio::time::interval(broker.inner.node_ttl / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The Redis run of the last heartbeat that landed.
    let mut last_run: Option<Arc<str>> = None;
    loop {
        tick.tick().await;
        if events.is_closed() {
            return;
        }
        let node = broker.inner.node.clone();
        let ttl = millis(broker.inner.node_ttl);
        let alive = broker
            .call(|mut con, run_id| {
                let node = node.clone();
                async move {
                    let (added,): (i64,) = redis::pipe()
                        .cmd("SET")
                        .arg(RedisBroker::node_alive_key(&node))
                        .arg(1)
                        .arg("PX")
                        .arg(ttl)
                        .ignore()
                        .cmd("SADD")
                        .arg("sb:nodes")
                        .arg(&node)
                        .query_async(&mut con)
                        .await?;
                    Ok((added, run_id))
                }
            })
            .await;
        let Ok((added, run)) = alive else {
            continue;
        };
        // Back in the node set of the same Redis it was in: another node
        // reaped this one (the reap takes it out atomically with its
        // presence, and only once its alive key expired), so its users'
        // leaves were announced while they are still here. (A Redis that
        // restarted empty is a reconnect, which records presence again.)
        if added == 1 && last_run.as_deref() == Some(&*run) {
            tracing::warn!("this node was taken for dead (paused or cut off past its TTL)");
            if events.send(BrokerEvent::Reaped).await.is_err() {
                return;
            }
        }
        last_run = Some(run);
        let Ok(nodes) = broker
            .call(|mut con, _| async move {
                redis::cmd("SMEMBERS")
                    .arg("sb:nodes")
                    .query_async::<Vec<String>>(&mut con)
                    .await
            })
            .await
        else {
            continue;
        };
        let reap = &broker.inner.reap;
        for other in nodes.iter().filter(|n| **n != node) {
            let reaped = broker
                .call(|mut con, _| async move {
                    reap.key(format!("sb:node:{other}:presence"))
                        .key(RedisBroker::node_alive_key(other))
                        .key("sb:nodes")
                        .arg(other)
                        .arg(millis(DEFAULT_HISTORY_TTL))
                        .invoke_async::<i64>(&mut con)
                        .await
                })
                .await;
            if reaped == Ok(1) {
                tracing::info!(node = %other, "removed the presence of a dead node");
            }
        }
    }
}
