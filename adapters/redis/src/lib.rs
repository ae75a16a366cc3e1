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
//!   rooms up to date, and a room whose missed messages are no longer kept
//!   moves to a new epoch, drawn once in Redis for every node.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, PubSubSink};
use redis::{Client, Script};
use switchboard_core::{Epoch, RoomName, Sid, UserId};
use switchboard_runtime::async_trait;
use switchboard_runtime::broker::{
    Broker, BrokerError, BrokerEvent, Channel, DirectTo, PresenceUpdate, PublishRequest, RoomState,
};
use tokio::sync::{mpsc, OnceCell};

/// A node whose "alive" key is this old is dead; its presence is removed.
/// It refreshes the key (and looks for dead nodes) three times per TTL.
const DEFAULT_NODE_TTL: Duration = Duration::from_secs(10);
/// A reaped room's history TTL when its own is not recorded (the policy default).
const DEFAULT_HISTORY_TTL: Duration = Duration::from_secs(300);
/// How long one Redis command may take before it fails.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

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
// `history_ttl` in ms, while it has users, for the reaper). A room's `seq`,
// `epoch` and `log` never expire while `users` exists; they expire `ttl`
// after the last user left (or after the last message, if later).

const PUBLISH: &str = r#"
-- KEYS: seq, epoch, log, users. ARGV: room, body, exclude, history, ttl_ms, new_epoch
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  epoch = ARGV[6]
  redis.call('SET', KEYS[2], epoch)
  redis.call('SET', KEYS[1], 0)
  redis.call('DEL', KEYS[3])
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
redis.call('PUBLISH', 'sb:r:' .. ARGV[1], 'm|' .. seq .. '|' .. epoch .. '|' .. ARGV[3] .. '|' .. frame)
return {seq, epoch}
"#;

const ROOM_STATE: &str = r#"
-- KEYS: seq, epoch, log, users.
-- ARGV: since_seq (-1: none), since_epoch, new_epoch, ttl_ms, resync (1/0)
local present = redis.call('EXISTS', KEYS[4]) == 1
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  epoch = ARGV[3]
  redis.call('SET', KEYS[2], epoch)
  redis.call('SET', KEYS[1], 0)
  redis.call('DEL', KEYS[3])
  if not present then
    redis.call('PEXPIRE', KEYS[1], ARGV[4])
    redis.call('PEXPIRE', KEYS[2], ARGV[4])
  end
elseif present then
  redis.call('PERSIST', KEYS[1])
  redis.call('PERSIST', KEYS[2])
  redis.call('PERSIST', KEYS[3])
end
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
if ARGV[5] == '1' then
  -- A node that delivered up to `since` in this epoch missed what it can no
  -- longer replay: a new epoch for the whole room, so that every client sees
  -- recovered:false instead of a hole. The kept history is the old epoch's.
  epoch = ARGV[3]
  redis.call('SET', KEYS[2], epoch, 'KEEPTTL')
  redis.call('DEL', KEYS[3])
end
return {seq, epoch, users, 0}
"#;

const PRESENCE: &str = r#"
-- KEYS: room users, node presence, room announce, room ttl, room seq, room epoch, room log.
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
      local ttl = redis.call('GET', prefix .. 'ttl') or ARGV[2]
      redis.call('DEL', prefix .. 'announce', prefix .. 'ttl')
      redis.call('PEXPIRE', prefix .. 'seq', ttl)
      redis.call('PEXPIRE', prefix .. 'epoch', ttl)
      redis.call('PEXPIRE', prefix .. 'log', ttl)
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
    commands: OnceCell<ConnectionManager>,
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
        let client = Client::open(url).map_err(err)?;
        let mut id = [0u8; 8];
        getrandom::fill(&mut id).map_err(|e| BrokerError(format!("no randomness: {e}")))?;
        let node = id.iter().map(|b| format!("{b:02x}")).collect();
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                node,
                node_ttl: DEFAULT_NODE_TTL,
                commands: OnceCell::new(),
                sink: tokio::sync::Mutex::new(None),
                wanted: Mutex::new(HashSet::new()),
                publish: Script::new(PUBLISH),
                room_state: Script::new(ROOM_STATE),
                presence: Script::new(PRESENCE),
                reap: Script::new(REAP),
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

    fn commands(&self) -> Result<ConnectionManager, BrokerError> {
        self.inner
            .commands
            .get()
            .cloned()
            .ok_or_else(|| BrokerError("broker not started".into()))
    }

    async fn room_state_script(
        &self,
        room: &RoomName,
        since: Option<(u64, &str)>,
        new_epoch: &str,
        history_ttl: Duration,
        resync: bool,
    ) -> Result<RoomState, BrokerError> {
        let mut con = self.commands()?;
        let name = room.as_str();
        let since_seq = since.map_or(-1, |(seq, _)| i64::try_from(seq).unwrap_or(i64::MAX));
        let reply: Vec<redis::Value> = self
            .inner
            .room_state
            .key(room_key(name, "seq"))
            .key(room_key(name, "epoch"))
            .key(room_key(name, "log"))
            .key(room_key(name, "users"))
            .arg(since_seq)
            .arg(since.map_or("", |(_, epoch)| epoch))
            .arg(new_epoch)
            .arg(millis(history_ttl))
            .arg(if resync { "1" } else { "0" })
            .invoke_async(&mut con)
            .await
            .map_err(err)?;
        parse_room_state(&reply, since)
    }

    fn node_presence_key(&self) -> String {
        format!("sb:node:{}:presence", self.inner.node)
    }

    fn node_alive_key(node: &str) -> String {
        format!("sb:node:{node}:alive")
    }
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
        // No retries inside a command: with the default (6, backing off to
        // `max_delay`) every command issued while Redis is away waited
        // several seconds for the manager's reconnect attempts before it
        // failed, and so did the session that sent it (its next frames, a
        // `ping` included, wait for it). Now a command fails at once and
        // starts one reconnect attempt; the node heartbeat's commands keep
        // trying every `node_ttl / 3`, and the pub/sub loop has its own
        // backoff.
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_connection_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(0)
            .set_max_delay(Duration::from_secs(2));
        let manager = ConnectionManager::new_with_config(self.inner.client.clone(), config)
            .await
            .map_err(err)?;
        let _ = self.inner.commands.set(manager);
        tokio::spawn(run_pubsub(self.clone(), events));
        tokio::spawn(run_node_heartbeat(self.clone()));
        Ok(())
    }

    async fn publish(&self, request: PublishRequest<'_>) -> Result<(u64, Epoch), BrokerError> {
        let mut con = self.commands()?;
        let room = request.room.as_str();
        let (seq, epoch): (u64, String) = self
            .inner
            .publish
            .key(room_key(room, "seq"))
            .key(room_key(room, "epoch"))
            .key(room_key(room, "log"))
            .key(room_key(room, "users"))
            .arg(room)
            .arg(request.body)
            .arg(request.exclude.map_or("", Sid::as_str))
            .arg(request.history)
            .arg(millis(request.history_ttl))
            .arg(request.new_epoch)
            .invoke_async(&mut con)
            .await
            .map_err(err)?;
        Ok((seq, Epoch::from(epoch)))
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

    async fn direct(&self, to: &DirectTo, frame: &Bytes) -> Result<usize, BrokerError> {
        let mut con = self.commands()?;
        let channel = match to {
            DirectTo::User(user) => channel_name(&Channel::User(user.clone())),
            DirectTo::Sid(sid) => channel_name(&Channel::Sid(sid.clone())),
        };
        let mut payload = Vec::with_capacity(frame.len() + 2);
        payload.extend_from_slice(b"d|");
        payload.extend_from_slice(frame);
        redis::cmd("PUBLISH")
            .arg(channel)
            .arg(payload)
            .query_async(&mut con)
            .await
            .map_err(err)
    }

    async fn presence(&self, update: PresenceUpdate<'_>) -> Result<usize, BrokerError> {
        let mut con = self.commands()?;
        let name = update.room.as_str();
        self.inner
            .presence
            .key(room_key(name, "users"))
            .key(self.node_presence_key())
            .key(room_key(name, "announce"))
            .key(room_key(name, "ttl"))
            .key(room_key(name, "seq"))
            .key(room_key(name, "epoch"))
            .key(room_key(name, "log"))
            .arg(if update.present { "1" } else { "0" })
            .arg(update.user.as_str())
            .arg(name)
            .arg(format!("{name}\n{}", update.user))
            .arg(update.subject.as_str())
            .arg(if update.announce { "1" } else { "0" })
            .arg(if update.quiet { "1" } else { "0" })
            .arg(millis(update.history_ttl))
            .invoke_async(&mut con)
            .await
            .map_err(err)
    }

    async fn history(&self, room: &RoomName, limit: usize) -> Result<Vec<Bytes>, BrokerError> {
        let mut con = self.commands()?;
        let entries: Vec<(String, Vec<(String, Vec<u8>)>)> = redis::cmd("XREVRANGE")
            .arg(room_key(room.as_str(), "log"))
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(limit)
            .query_async(&mut con)
            .await
            .map_err(err)?;
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

    async fn presence_list(&self, room: &RoomName) -> Result<Vec<String>, BrokerError> {
        let mut con = self.commands()?;
        let mut users: Vec<String> = redis::cmd("HKEYS")
            .arg(room_key(room.as_str(), "users"))
            .query_async(&mut con)
            .await
            .map_err(err)?;
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
/// each (re)connect, forwards messages in order, and backs off (with jitter)
/// while Redis is away.
async fn run_pubsub(broker: RedisBroker, events: mpsc::Sender<BrokerEvent>) {
    let mut backoff = Duration::from_millis(100);
    let mut connected_before = false;
    loop {
        if events.is_closed() {
            return;
        }
        match broker.inner.client.get_async_pubsub().await {
            Ok(pubsub) => {
                let (mut sink, mut stream) = pubsub.split();
                // Held from the snapshot of `wanted` until the sink is in
                // place: a concurrent `subscribe` either is in the snapshot
                // or runs on the new sink after this, never in between.
                let mut current = broker.inner.sink.lock().await;
                let wanted: Vec<String> = broker
                    .inner
                    .wanted
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .iter()
                    .cloned()
                    .collect();
                let mut ok = true;
                for channel in &wanted {
                    if sink.subscribe(channel).await.is_err() {
                        ok = false;
                        break;
                    }
                }
                if ok {
                    *current = Some(sink);
                    drop(current);
                    backoff = Duration::from_millis(100);
                    if connected_before {
                        tracing::info!("reconnected to Redis");
                        if events.send(BrokerEvent::Reconnected).await.is_err() {
                            return;
                        }
                    }
                    connected_before = true;
                    while let Some(message) = stream.next().await {
                        if let Some(event) =
                            parse_event(message.get_channel_name(), message.get_payload_bytes())
                        {
                            if events.send(event).await.is_err() {
                                return;
                            }
                        }
                    }
                    *broker.inner.sink.lock().await = None;
                    tracing::warn!("lost the Redis pub/sub connection");
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot reach Redis"),
        }
        let jitter = Duration::from_millis(u64::from(rand_u8()) % 100);
        tokio::time::sleep(backoff + jitter).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

fn rand_u8() -> u8 {
    let mut byte = [0u8; 1];
    let _ = getrandom::fill(&mut byte);
    byte[0]
}

/// Refreshes this node's "alive" key and removes the presence of nodes whose
/// key expired.
async fn run_node_heartbeat(broker: RedisBroker) {
    let mut tick = tokio::time::interval(broker.inner.node_ttl / 3);
    loop {
        tick.tick().await;
        let Ok(mut con) = broker.commands() else {
            return;
        };
        let node = broker.inner.node.clone();
        let alive: redis::RedisResult<()> = redis::pipe()
            .cmd("SET")
            .arg(RedisBroker::node_alive_key(&node))
            .arg(1)
            .arg("PX")
            .arg(millis(broker.inner.node_ttl))
            .ignore()
            .cmd("SADD")
            .arg("sb:nodes")
            .arg(&node)
            .ignore()
            .query_async(&mut con)
            .await;
        if alive.is_err() {
            continue;
        }
        let nodes: Vec<String> = match redis::cmd("SMEMBERS")
            .arg("sb:nodes")
            .query_async(&mut con)
            .await
        {
            Ok(nodes) => nodes,
            Err(_) => continue,
        };
        for other in nodes.iter().filter(|n| **n != node) {
            let reaped: redis::RedisResult<i64> = broker
                .inner
                .reap
                .key(format!("sb:node:{other}:presence"))
                .key(RedisBroker::node_alive_key(other))
                .key("sb:nodes")
                .arg(other)
                .arg(millis(DEFAULT_HISTORY_TTL))
                .invoke_async(&mut con)
                .await;
            if reaped == Ok(1) {
                tracing::info!(node = %other, "removed the presence of a dead node");
            }
        }
    }
}
