//! The seam to a cluster broker (Redis): what a node asks of it, and what it
//! hears from it.
//!
//! With a broker, room messages are sequenced once for the whole cluster:
//! the broker assigns `seq` and `epoch`, keeps the history, and fans every
//! message out to each node that has members in the room, in one order. Each
//! node delivers what it hears to its local members. Without one (the
//! default) everything stays in process.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use switchboard_core::{Epoch, RoomName, Sid, UserId};

use tokio::sync::mpsc;

/// What a node hears from the cluster, in the order the broker sent it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum BrokerEvent {
    /// A room message, sequenced by the broker.
    Message {
        /// The room.
        room: RoomName,
        /// Its `seq`.
        seq: u64,
        /// The room's `epoch`.
        epoch: Epoch,
        /// The complete `message` frame.
        frame: Bytes,
        /// The publishing session (`echo: false`), which must not receive it.
        exclude: Option<Sid>,
    },
    /// A presence announcement for a room.
    Presence {
        /// The room.
        room: RoomName,
        /// The complete `presence` frame.
        frame: Bytes,
        /// The session whose join or leave it announces.
        exclude: Option<Sid>,
    },
    /// A direct message for a user's or a session's sessions on this node.
    Direct {
        /// Who receives it.
        to: DirectTo,
        /// The complete `direct` frame.
        frame: Bytes,
    },
    /// The connection to the broker came back after a loss: messages may
    /// have been missed meanwhile, so rooms must be brought up to date.
    Reconnected,
    /// The cluster took this node for dead while it was alive (paused or
    /// cut off longer than its TTL) and removed its presence, announcing
    /// its users' leaves: presence must be recorded again, announced, and
    /// rooms brought up to date.
    Reaped,
    /// As [`BrokerEvent::Reconnected`], for only the rooms it selects: a
    /// broker that spreads rooms over several backends (Redis shards) lost
    /// and found one of them, and the others' rooms missed nothing.
    ReconnectedRooms(RoomSelector),
    /// As [`BrokerEvent::Reaped`], for only the rooms it selects (those of
    /// the one backend that took this node for dead).
    ReapedRooms(RoomSelector),
}

/// Which rooms a [`BrokerEvent::ReconnectedRooms`] or
/// [`BrokerEvent::ReapedRooms`] is about.
#[derive(Clone)]
pub struct RoomSelector(Arc<dyn Fn(&RoomName) -> bool + Send + Sync>);

impl RoomSelector {
    /// The rooms for which `which` is true.
    pub fn new(which: impl Fn(&RoomName) -> bool + Send + Sync + 'static) -> Self {
        Self(Arc::new(which))
    }

    /// Whether `room` is selected.
    #[must_use]
    pub fn matches(&self, room: &RoomName) -> bool {
        (self.0)(room)
    }
}

impl std::fmt::Debug for RoomSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RoomSelector(..)")
    }
}

pub use switchboard_core::{Channel, Recipient as DirectTo, RoomSync as RoomState};

/// A publish for the broker to sequence and fan out.
#[derive(Debug, Clone, Copy)]
pub struct PublishRequest<'a> {
    /// The room.
    pub room: &'a RoomName,
    /// The message's fields after `epoch`, as a JSON fragment (`"event":…,
    /// "from":…,"data":…,"ts":…`), encoded once by the core.
    pub body: &'a str,
    /// The publishing session when it asked for `echo: false`.
    pub exclude: Option<&'a Sid>,
    /// Messages of history the room keeps (its policy).
    pub history: usize,
    /// How long the room's state outlives its last message.
    pub history_ttl: Duration,
    /// An epoch for the room if its history starts now (drawn by the runtime).
    pub new_epoch: &'a str,
    /// This publish's idempotency key: the publisher's own
    /// (`idempotency_key`, scoped to it by the core), else one the runtime
    /// draws (64 random bits and the publish's place in its batch). The
    /// broker publishes at most once per key (a retry of the node's, or of
    /// the client's through any node) and answers a repeat with the first
    /// one's `seq` and `epoch`.
    pub key: &'a str,
}

/// A presence change for the broker to record ([`Broker::presence`]).
#[derive(Debug, Clone, Copy)]
pub struct PresenceUpdate<'a> {
    /// The room.
    pub room: &'a RoomName,
    /// The user.
    pub user: &'a UserId,
    /// Whether the user is now present here (else: no longer).
    pub present: bool,
    /// The session whose join or leave it is (not told of its own change).
    pub subject: &'a Sid,
    /// Whether the room announces presence changes (its policy).
    pub announce: bool,
    /// Record without announcing: presence recorded again after a
    /// reconnect, which the room's members already know of.
    pub quiet: bool,
    /// How long the room's history outlives its last user (its policy).
    pub history_ttl: Duration,
}

/// The broker could not do what was asked; nothing was half done.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("broker unavailable: {0}")]
pub struct BrokerError(pub String);

/// A cluster broker. Every call may fail while the broker is unreachable;
/// the runtime then refuses the operation with a clear error (nothing is
/// queued without bound) and keeps local sessions connected.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Starts listening; events go to `events` in the broker's order.
    /// Implementations reconnect by themselves (with backoff) and send
    /// [`BrokerEvent::Reconnected`] after a loss.
    async fn start(&self, events: mpsc::Sender<BrokerEvent>) -> Result<(), BrokerError>;

    /// Sequences a room message and fans it out to every subscribed node
    /// (this one included). Returns its `seq` and `epoch`. An error means
    /// it was not published, or, when the broker stopped answering
    /// mid-publish and a retry with [`PublishRequest::key`] failed too,
    /// that it may have been (members then get it as usual).
    async fn publish(&self, request: PublishRequest<'_>) -> Result<(u64, Epoch), BrokerError>;

    /// Several publishes, sequenced in the order given (a room's messages
    /// from one batch get rising `seq`s in that order), one result each, in
    /// order. A broker that can pipeline them (one round trip) should; the
    /// default performs them one after the other with [`Broker::publish`].
    /// The runtime sends at most one batch at a time, so batches, too, are
    /// sequenced in the order they were sent.
    async fn publish_batch(
        &self,
        requests: &[PublishRequest<'_>],
    ) -> Vec<Result<(u64, Epoch), BrokerError>> {
        let mut results = Vec::with_capacity(requests.len());
        for request in requests {
            results.push(self.publish(*request).await);
        }
        results
    }

    /// The room's latest seq and epoch (starting its history with `new_epoch`
    /// if it has none), and with `since` the messages after it.
    async fn room_state(
        &self,
        room: &RoomName,
        since: Option<(u64, &str)>,
        new_epoch: &str,
        history_ttl: Duration,
    ) -> Result<RoomState, BrokerError>;

    /// As [`Broker::room_state`], for a node catching up (after a
    /// reconnect, or a hole in its live stream) with `since` = the last
    /// message it delivered. When what followed `since` is no longer kept,
    /// the answer has `replay: None` and the room's position, and nothing
    /// changes in the broker: the loss is this node's, whose members are
    /// told; other nodes' members and the history away clients may still
    /// recover are left alone. Only when `since` is ahead of the room in its
    /// epoch (the broker lost messages this node delivered, whose seqs it
    /// could hand out again) does the room move to `new_epoch`, atomically
    /// and for every node (`seq` goes on counting, the old epoch's history
    /// is dropped); nodes that come later find that epoch rather than
    /// drawing their own.
    async fn resync_state(
        &self,
        room: &RoomName,
        since: Option<(u64, &str)>,
        new_epoch: &str,
        history_ttl: Duration,
    ) -> Result<RoomState, BrokerError>;

    /// How many publish pipelines the node runs for this broker: publishes
    /// of different lanes do not wait for one another. A broker over
    /// several independent servers gives one lane per server, so a slow
    /// one holds up only its own rooms. Default 1.
    fn publish_lanes(&self) -> usize {
        1
    }

    /// The lane (below [`Broker::publish_lanes`]) of `room`'s publishes:
    /// always the same for a room, whose publishes stay in order.
    fn publish_lane(&self, room: &RoomName) -> usize {
        let _ = room;
        0
    }

    /// Starts receiving a channel's events (returns once subscribed).
    async fn subscribe(&self, channel: &Channel) -> Result<(), BrokerError>;

    /// Stops receiving a channel's events.
    async fn unsubscribe(&self, channel: &Channel);

    /// Starts receiving several channels' events (returns once subscribed),
    /// with one result per channel, in order: a broker over several Redis
    /// may subscribe some and not others. A broker that can subscribe them
    /// in one round trip should; the default subscribes them one by one.
    async fn subscribe_many(&self, channels: &[Channel]) -> Vec<Result<(), BrokerError>> {
        let mut results = Vec::with_capacity(channels.len());
        for channel in channels {
            results.push(self.subscribe(channel).await);
        }
        results
    }

    /// Stops receiving several channels' events; the default unsubscribes
    /// them one by one.
    async fn unsubscribe_many(&self, channels: &[Channel]) {
        for channel in channels {
            self.unsubscribe(channel).await;
        }
    }

    /// Sends a direct frame to a user's or a session's node(s); returns how
    /// many nodes had a recipient (0: nobody anywhere).
    async fn direct(&self, to: &DirectTo, frame: &Bytes) -> Result<usize, BrokerError>;

    /// Records that `update.user` is (or is no longer) in `update.room` on
    /// this node; when the room announces presence and the update is not
    /// quiet, tells the room's members (but `subject`) if that made it the
    /// user's first (or last) node in the whole cluster. Returns the room's
    /// user count.
    ///
    /// Idempotent per node: recording a presence this node already has, or
    /// removing one it does not have, changes nothing (so a change can be
    /// retried after a failure, a refused join can undo a record that never
    /// landed, and presence can be recorded again after a reconnect).
    ///
    /// A room's seq, epoch and history do not expire while any node has a
    /// user in it; they expire `history_ttl` after its last user left the
    /// cluster (or after its last message, if later).
    async fn presence(&self, update: PresenceUpdate<'_>) -> Result<usize, BrokerError>;

    /// Several presence changes, of different users or rooms, performed in
    /// the order given, one result each, in order (each as
    /// [`Broker::presence`], idempotent per node). A broker that can
    /// pipeline them should; the default performs them one after the other.
    async fn presence_batch(
        &self,
        updates: &[PresenceUpdate<'_>],
    ) -> Vec<Result<usize, BrokerError>> {
        let mut results = Vec::with_capacity(updates.len());
        for update in updates {
            results.push(self.presence(*update).await);
        }
        results
    }

    /// The latest `seq` and epoch of each room (`None`: the broker has no
    /// state for it), in order, for the periodic check that catches a room
    /// whose last messages never reached this node.
    async fn positions(&self, rooms: &[RoomName])
        -> Result<Vec<Option<(u64, Epoch)>>, BrokerError>;

    /// The room's last `limit` messages (encoded frames), oldest first.
    async fn history(&self, room: &RoomName, limit: usize) -> Result<Vec<Bytes>, BrokerError>;

    /// The users present in a room across the cluster.
    async fn presence_list(&self, room: &RoomName) -> Result<Vec<String>, BrokerError>;
}
