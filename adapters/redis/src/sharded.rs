//! Rooms sharded across several independent Redis instances.
//!
//! [`ShardedBroker`] wraps one [`RedisBroker`] per Redis and sends each
//! call to one of them: a room's publishes, state, history and presence go
//! to the room's shard, a user's channel and direct messages to the user's,
//! a session's to the session's. Each shard keeps its rooms' `seq`, epoch,
//! history and presence exactly as a lone Redis does, so a room's guarantees
//! are those of one Redis; a shard that is down fails only its own rooms,
//! and when it is back only its rooms catch up
//! ([`BrokerEvent::ReconnectedRooms`]).
//!
//! **Choosing the shard.** Rendezvous (highest random weight) hashing: a key
//! goes to the shard whose score for it is highest, the score being
//! [`score`] (64-bit FNV-1a over the shard's identity, a `0xff` separator
//! and the key, then the SplitMix64 finalizer). The function is fixed, so
//! every node, whatever its build or platform, picks the same shard; a
//! shard's identity is its address and database (`host:port/db`, see
//! [`shard_id`]), not its place on the command line, so the order of the
//! URLs does not matter. Adding a shard moves only the keys it now wins
//! (about 1/N of them), removing one moves only its own keys.

use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;
use redis::IntoConnectionInfo;
use switchboard_core::{Epoch, RoomName};
use switchboard_runtime::async_trait;
use switchboard_runtime::broker::{
    Broker, BrokerError, BrokerEvent, Channel, DirectTo, PresenceUpdate, PublishRequest,
    RoomSelector, RoomState,
};
use tokio::sync::mpsc;

use crate::RedisBroker;

/// FNV-1a 64-bit offset basis.
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
/// FNV-1a 64-bit prime.
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv1a(mut state: u64, bytes: &[u8]) -> u64 {
    for byte in bytes {
        state ^= u64::from(*byte);
        state = state.wrapping_mul(FNV_PRIME);
    }
    state
}

/// SplitMix64's finalizer: FNV-1a's high bits mix poorly on short keys.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// FNV-1a state after a shard's identity and the separator.
fn seed(shard: &str) -> u64 {
    fnv1a(fnv1a(FNV_OFFSET, shard.as_bytes()), &[0xff])
}

/// The rendezvous score of `key` on the shard identified by `shard`:
/// `mix(fnv1a64(shard ‖ 0xff ‖ key))`. Part of the cluster's contract:
/// every node must compute the same.
#[must_use]
pub fn score(shard: &str, key: &str) -> u64 {
    mix(fnv1a(seed(shard), key.as_bytes()))
}

/// A shard's identity for hashing: the Redis address and database of `url`
/// (`127.0.0.1:6379/0`), without scheme or credentials, so that `redis://`
/// and `rediss://` URLs of one Redis, or URLs given in another order, agree.
///
/// # Errors
/// When `url` is not a Redis URL.
pub fn shard_id(url: &str) -> Result<String, BrokerError> {
    let info = url
        .into_connection_info()
        .map_err(|e| BrokerError(e.to_string()))?;
    Ok(format!("{}/{}", info.addr(), info.redis_settings().db()))
}

/// Which of `seeds` (from [`seed`]) wins `key`; ties go to the lower seed.
fn pick(seeds: &[u64], key: &str) -> usize {
    let mut best = (0, 0, 0);
    for (index, seed) in seeds.iter().enumerate() {
        let candidate = (mix(fnv1a(*seed, key.as_bytes())), u64::MAX - seed, index);
        if index == 0 || (candidate.0, candidate.1) > (best.0, best.1) {
            best = candidate;
        }
    }
    best.2
}

/// Several Redis instances as one broker, each room (and each user's and
/// session's channel) on one of them by consistent hashing (see the module
/// docs). Give it to `Switchboard::builder().broker(...)`; give every node
/// the same set of Redis URLs, in any order.
#[derive(Debug, Clone)]
pub struct ShardedBroker {
    ids: Vec<String>,
    seeds: Vec<u64>,
    shards: Vec<RedisBroker>,
}

impl ShardedBroker {
    /// A broker over the Redis at each of `urls`, each shard made by
    /// `open(url)` (`RedisBroker::new`, with its options).
    ///
    /// # Errors
    /// When no URL is given, one is not a Redis URL, two name the same
    /// Redis, or `open` fails.
    pub fn new<S: AsRef<str>>(
        urls: &[S],
        open: impl Fn(&str) -> Result<RedisBroker, BrokerError>,
    ) -> Result<Self, BrokerError> {
        if urls.is_empty() {
            return Err(BrokerError("no Redis URL to shard over".into()));
        }
        let mut ids = Vec::with_capacity(urls.len());
        let mut shards = Vec::with_capacity(urls.len());
        for url in urls {
            let id = shard_id(url.as_ref())?;
            if ids.contains(&id) {
                return Err(BrokerError(format!("Redis {id} is given twice")));
            }
            ids.push(id);
            shards.push(open(url.as_ref())?);
        }
        let seeds = ids.iter().map(|id| seed(id)).collect();
        Ok(Self { ids, seeds, shards })
    }

    /// The shards' identities ([`shard_id`]), in the order given.
    #[must_use]
    pub fn shard_ids(&self) -> &[String] {
        &self.ids
    }

    /// The shards, in the order given.
    #[must_use]
    pub fn shards(&self) -> &[RedisBroker] {
        &self.shards
    }

    /// The index (in the order given) of the shard holding `room`.
    #[must_use]
    pub fn shard_of_room(&self, room: &str) -> usize {
        pick(&self.seeds, room)
    }

    /// The rooms of shard `index`.
    fn selector(&self, index: usize) -> RoomSelector {
        let seeds = self.seeds.clone();
        RoomSelector::new(move |room| pick(&seeds, room.as_str()) == index)
    }

    fn room(&self, room: &RoomName) -> &RedisBroker {
        &self.shards[pick(&self.seeds, room.as_str())]
    }

    /// Users and sessions hash as rooms do, by their name.
    fn channel(&self, channel: &Channel) -> &RedisBroker {
        &self.shards[self.shard_of_channel(channel)]
    }

    fn shard_of_channel(&self, channel: &Channel) -> usize {
        let key = match channel {
            Channel::Room(room) => room.as_str(),
            Channel::User(user) => user.as_str(),
            Channel::Sid(sid) => sid.as_str(),
        };
        pick(&self.seeds, key)
    }

    /// `items` split by shard: each shard's part in the order given, with
    /// where each item stood.
    fn split<T: Clone>(
        &self,
        items: &[T],
        shard_of: impl Fn(&T) -> usize,
    ) -> Vec<(Vec<usize>, Vec<T>)> {
        let mut parts: Vec<(Vec<usize>, Vec<T>)> = (0..self.shards.len())
            .map(|_| (Vec::new(), Vec::new()))
            .collect();
        for (at, item) in items.iter().enumerate() {
            let part = &mut parts[shard_of(item)];
            part.0.push(at);
            part.1.push(item.clone());
        }
        parts
    }

    /// Runs `each` on every shard's part of `items` ([`Self::split`]), all
    /// at once, and puts the answers (one per item) back in the order of
    /// `items`.
    async fn per_shard<'a, T, R, F, Fut>(
        &'a self,
        items: &[T],
        shard_of: impl Fn(&T) -> usize,
        each: F,
    ) -> Vec<Result<R, BrokerError>>
    where
        T: Clone,
        F: Fn(&'a RedisBroker, Vec<T>) -> Fut,
        Fut: std::future::Future<Output = Vec<Result<R, BrokerError>>>,
    {
        let parts = self.split(items, shard_of);
        let answers = join_all(
            self.shards
                .iter()
                .zip(parts)
                .filter(|(_, (at, _))| !at.is_empty())
                .map(|(shard, (at, part))| {
                    let answer = each(shard, part);
                    async move { (at, answer.await) }
                }),
        )
        .await;
        let mut out: Vec<Option<Result<R, BrokerError>>> = (0..items.len()).map(|_| None).collect();
        for (at, answers) in answers {
            for (at, answer) in at.into_iter().zip(answers) {
                out[at] = Some(answer);
            }
        }
        // A shard that answered for fewer items than it was given: the
        // rest failed (never someone else's answer in their place).
        out.into_iter()
            .map(|answer| {
                answer.unwrap_or_else(|| Err(BrokerError("a shard gave no answer".into())))
            })
            .collect()
    }
}

/// Waits before a shard that could not start is tried again.
const START_RETRY_MAX: Duration = Duration::from_secs(2);
/// Events one shard may have waiting for the runtime's queue; beyond it
/// the shard drops them and then catches its rooms up (as `RedisBroker`
/// does when the runtime's queue itself is full).
const SHARD_EVENTS: usize = 1024;

/// Passes one shard's events on to the runtime, in order, its reconnects
/// and reaps narrowed to its rooms; ends when the runtime is gone.
async fn forward(
    mut from: mpsc::Receiver<BrokerEvent>,
    to: mpsc::Sender<BrokerEvent>,
    rooms: RoomSelector,
) {
    loop {
        let event = tokio::select! {
            event = from.recv() => event,
            () = to.closed() => None,
        };
        let Some(event) = event else { return };
        let event = match event {
            BrokerEvent::Reconnected => BrokerEvent::ReconnectedRooms(rooms.clone()),
            BrokerEvent::Reaped => BrokerEvent::ReapedRooms(rooms.clone()),
            event => event,
        };
        if to.send(event).await.is_err() {
            return;
        }
    }
}

#[async_trait]
impl Broker for ShardedBroker {
    /// Starts every shard. Events from all shards go to `events`, each
    /// shard's in its order; a shard's reconnect (or reap) is passed on as
    /// [`BrokerEvent::ReconnectedRooms`] (or [`BrokerEvent::ReapedRooms`])
    /// for its rooms only, so the other shards' rooms are left alone. A
    /// shard unreachable at start does not stop the node (at least one must
    /// answer): its rooms answer `unavailable`, and it is tried again in the
    /// background; once it is up, its rooms catch up as after a reconnect.
    async fn start(&self, events: mpsc::Sender<BrokerEvent>) -> Result<(), BrokerError> {
        let mut inputs = Vec::with_capacity(self.shards.len());
        for index in 0..self.shards.len() {
            let (tx, rx) = mpsc::channel(SHARD_EVENTS);
            tokio::spawn(forward(rx, events.clone(), self.selector(index)));
            inputs.push(tx);
        }
        let results = join_all(
            self.shards
                .iter()
                .zip(&inputs)
                .map(|(s, tx)| s.start(tx.clone())),
        )
        .await;
        if let Some(Err(e)) = results.iter().find(|r| r.is_err()) {
            if results.iter().all(Result::is_err) {
                return Err(e.clone());
            }
        }
        for (index, result) in results.into_iter().enumerate() {
            let Err(e) = result else { continue };
            let id = self.ids[index].clone();
            tracing::warn!(shard = %id, error = %e, "Redis shard unreachable at start; trying again");
            let (shard, input) = (self.shards[index].clone(), inputs[index].clone());
            tokio::spawn(async move {
                let mut backoff = Duration::from_millis(100);
                loop {
                    tokio::time::sleep(backoff).await;
                    if input.is_closed() {
                        return;
                    }
                    match shard.start(input.clone()).await {
                        Ok(()) => break,
                        Err(e) => {
                            tracing::debug!(shard = %id, error = %e, "Redis shard still unreachable")
                        }
                    }
                    backoff = (backoff * 2).min(START_RETRY_MAX);
                }
                tracing::info!(shard = %id, "Redis shard up");
                // Joins and presence changes of its rooms failed meanwhile.
                let _ = input.send(BrokerEvent::Reconnected).await;
            });
        }
        Ok(())
    }

    async fn publish(&self, request: PublishRequest<'_>) -> Result<(u64, Epoch), BrokerError> {
        self.room(request.room).publish(request).await
    }

    /// One per Redis: a slow one holds up only its own rooms' publishes.
    fn publish_lanes(&self) -> usize {
        self.shards.len()
    }

    fn publish_lane(&self, room: &RoomName) -> usize {
        self.shard_of_room(room.as_str())
    }

    /// Each shard's publishes as one pipeline of its own, the shards at
    /// once; each room's publishes keep their order (a room is on one shard).
    async fn publish_batch(
        &self,
        requests: &[PublishRequest<'_>],
    ) -> Vec<Result<(u64, Epoch), BrokerError>> {
        self.per_shard(
            requests,
            |r| self.shard_of_room(r.room.as_str()),
            |shard, part| async move { shard.publish_batch(&part).await },
        )
        .await
    }

    /// Each shard's channels at once; a shard that fails fails only its
    /// channels.
    async fn subscribe_many(&self, channels: &[Channel]) -> Vec<Result<(), BrokerError>> {
        self.per_shard(
            channels,
            |c| self.shard_of_channel(c),
            |shard, part| async move { shard.subscribe_many(&part).await },
        )
        .await
    }

    async fn unsubscribe_many(&self, channels: &[Channel]) {
        let parts = self.split(channels, |c| self.shard_of_channel(c));
        join_all(
            self.shards
                .iter()
                .zip(&parts)
                .filter(|(_, (at, _))| !at.is_empty())
                .map(|(shard, (_, part))| shard.unsubscribe_many(part)),
        )
        .await;
    }

    async fn presence_batch(
        &self,
        updates: &[PresenceUpdate<'_>],
    ) -> Vec<Result<usize, BrokerError>> {
        self.per_shard(
            updates,
            |u| self.shard_of_room(u.room.as_str()),
            |shard, part| async move { shard.presence_batch(&part).await },
        )
        .await
    }

    async fn room_state(
        &self,
        room: &RoomName,
        since: Option<(u64, &str)>,
        new_epoch: &str,
        history_ttl: Duration,
    ) -> Result<RoomState, BrokerError> {
        self.room(room)
            .room_state(room, since, new_epoch, history_ttl)
            .await
    }

    async fn resync_state(
        &self,
        room: &RoomName,
        since: Option<(u64, &str)>,
        new_epoch: &str,
        history_ttl: Duration,
    ) -> Result<RoomState, BrokerError> {
        self.room(room)
            .resync_state(room, since, new_epoch, history_ttl)
            .await
    }

    async fn subscribe(&self, channel: &Channel) -> Result<(), BrokerError> {
        self.channel(channel).subscribe(channel).await
    }

    async fn unsubscribe(&self, channel: &Channel) {
        self.channel(channel).unsubscribe(channel).await;
    }

    async fn direct(&self, to: &DirectTo, frame: &Bytes) -> Result<usize, BrokerError> {
        let key = match to {
            DirectTo::User(user) => user.as_str(),
            DirectTo::Sid(sid) => sid.as_str(),
        };
        self.shards[pick(&self.seeds, key)].direct(to, frame).await
    }

    async fn presence(&self, update: PresenceUpdate<'_>) -> Result<usize, BrokerError> {
        self.room(update.room).presence(update).await
    }

    /// Each shard is asked for its rooms (at once); the answers are put
    /// back in the order of `rooms`. Fails when any shard fails: the check
    /// is skipped that round (a shard back from an outage makes its rooms
    /// catch up anyway).
    async fn positions(
        &self,
        rooms: &[RoomName],
    ) -> Result<Vec<Option<(u64, Epoch)>>, BrokerError> {
        let parts = self.split(rooms, |room| self.shard_of_room(room.as_str()));
        let answers = join_all(
            self.shards
                .iter()
                .zip(&parts)
                .filter(|(_, (at, _))| !at.is_empty())
                .map(|(shard, (at, names))| async move { (at, shard.positions(names).await) }),
        )
        .await;
        let mut out = vec![None; rooms.len()];
        for (at, answer) in answers {
            let positions = answer?;
            if positions.len() != at.len() {
                return Err(BrokerError("a shard answered for other rooms".into()));
            }
            for (at, position) in at.iter().zip(positions) {
                out[*at] = position;
            }
        }
        Ok(out)
    }

    async fn history(&self, room: &RoomName, limit: usize) -> Result<Vec<Bytes>, BrokerError> {
        self.room(room).history(room, limit).await
    }

    async fn presence_list(&self, room: &RoomName) -> Result<Vec<String>, BrokerError> {
        self.room(room).presence_list(room).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeds(ids: &[&str]) -> Vec<u64> {
        ids.iter().map(|id| seed(id)).collect()
    }

    fn keys(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("room-{i}")).collect()
    }

    /// The function is fixed: these values are part of the cluster's
    /// contract, and a change to them would split a running cluster.
    #[test]
    fn the_hash_is_stable() {
        assert_eq!(fnv1a(FNV_OFFSET, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(FNV_OFFSET, b"foobar"), 0x8594_4171_f739_67e8);
        let a = "127.0.0.1:6379/0";
        let b = "127.0.0.1:6380/0";
        let picks: Vec<usize> = ["lobby", "job_42", "alice", "x"]
            .iter()
            .map(|k| pick(&seeds(&[a, b]), k))
            .collect();
        assert_eq!(
            picks,
            pick_reference(&[a, b], &["lobby", "job_42", "alice", "x"])
        );
        assert_eq!(score(a, "lobby"), mix(fnv1a(seed(a), b"lobby")));
    }

    /// The same choice, written out from the definition.
    fn pick_reference(ids: &[&str], keys: &[&str]) -> Vec<usize> {
        keys.iter()
            .map(|key| {
                let scores: Vec<u64> = ids.iter().map(|id| score(id, key)).collect();
                let best = *scores.iter().max().expect("a shard");
                scores.iter().position(|s| *s == best).expect("the best")
            })
            .collect()
    }

    #[test]
    fn the_order_of_the_shards_does_not_matter() {
        let ids = ["10.0.0.1:6379/0", "10.0.0.2:6379/0", "10.0.0.3:6379/0"];
        let reversed = [ids[2], ids[1], ids[0]];
        for key in keys(2_000) {
            let one = ids[pick(&seeds(&ids), &key)];
            let other = reversed[pick(&seeds(&reversed), &key)];
            assert_eq!(one, other, "{key}");
        }
    }

    #[test]
    fn keys_spread_evenly() {
        let ids = [
            "10.0.0.1:6379/0",
            "10.0.0.2:6379/0",
            "10.0.0.3:6379/0",
            "10.0.0.4:6379/0",
        ];
        let seeds = seeds(&ids);
        let mut counts = [0usize; 4];
        let n = 40_000;
        for key in keys(n) {
            counts[pick(&seeds, &key)] += 1;
        }
        for count in counts {
            // 10,000 expected each; 5 % off at most.
            assert!((9_500..=10_500).contains(&count), "{counts:?}");
        }
    }

    #[test]
    fn adding_a_shard_moves_only_its_share() {
        let three = ["10.0.0.1:6379/0", "10.0.0.2:6379/0", "10.0.0.3:6379/0"];
        let four = [three[0], three[1], three[2], "10.0.0.4:6379/0"];
        let (before, after) = (seeds(&three), seeds(&four));
        let n = 40_000;
        let mut moved = 0;
        for key in keys(n) {
            let (old, new) = (pick(&before, &key), pick(&after, &key));
            if old != new {
                assert_eq!(new, 3, "{key} moved between old shards");
                moved += 1;
            }
        }
        // A quarter (10,000) expected.
        assert!((9_000..=11_000).contains(&moved), "{moved} moved");
    }

    #[test]
    fn shard_ids_ignore_scheme_credentials_and_order() {
        assert_eq!(
            shard_id("redis://:secret@127.0.0.1:6379").ok(),
            Some("127.0.0.1:6379/0".to_owned())
        );
        assert_eq!(
            shard_id("redis://127.0.0.1:6380/2").ok(),
            Some("127.0.0.1:6380/2".to_owned())
        );
        assert!(shard_id("http://nope").is_err());
        let twice =
            ShardedBroker::new(&["redis://127.0.0.1:1", "redis://:pw@127.0.0.1:1/0"], |u| {
                RedisBroker::new(u)
            });
        assert!(twice.is_err());
        let none: [&str; 0] = [];
        assert!(ShardedBroker::new(&none, RedisBroker::new).is_err());
    }
}
