//! Driving the core's broker requests (broker mode): the I/O half of
//! `switchboard_core`'s cluster support.
//!
//! Membership (room, user and session subscriptions, presence) goes to the
//! broker as state, not as a list of operations: the core's decisions, fed
//! under the core's lock in the order it made them, say what each key (a
//! channel, or a user in a room) should be, and one task brings the broker
//! to that, in the order the keys changed (in batches: below). A key changes
//! only to the opposite of what the broker was last told for it, so a key
//! that changes back before the broker heard of it is dropped (a session
//! that opened and closed while Redis was slow costs nothing), and at most
//! one change per key waits. What waits is therefore bounded by the node's
//! live state (its sessions, their users and their rooms, each within the
//! core's limits) plus the removals of what the broker still holds for it,
//! never by how often clients come and go: nothing queues without bound,
//! and nothing a client asked for is refused for lack of room.
//!
//! Presence changes the broker did not take (Redis away) are retried with
//! backoff until they land or are superseded, so a leave during an outage
//! leaves no ghost; after a reconnect every room records its presence again,
//! since a Redis that restarted empty forgot it. Both are safe because the
//! broker's presence records are idempotent per node. Channels need neither:
//! the broker keeps every channel it was asked for and subscribes them again
//! when it reconnects.
//!
//! The changes are sent in batches: the task takes what waits, up to
//! [`MEMBERSHIP_BATCH`] keys (distinct, since at most one change per key
//! waits), and performs runs of the same kind together, in order: one
//! `SUBSCRIBE` (or `UNSUBSCRIBE`) for a run of channels, one pipeline for a
//! run of presence changes. A key is in at most one batch at a time, so its
//! changes still reach the broker one after the other, in order.
//!
//! Publishes go through one task too ([`run_publishes`]), in the order they
//! were handed to it: it sends what waits as one batch (one pipeline, one
//! round trip), one batch at a time, so a room's messages from one session
//! are sequenced in the order the session sent them. A session does not
//! wait for its publish to come back before its next frame is read: its
//! publishes are pipelined (up to [`SESSION_PUBLISHES`] at the broker), and
//! only a frame other than a publish waits for them, so that it is answered
//! after them; acks come back in order.
//!
//! The rest (join lookups, directs, presence lists, catching up after a
//! reconnect) run in the task that caused them: a session's frames are
//! answered in order.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use base64::Engine as _;
use switchboard_core::{
    BrokerRequest, Channel, ErrorCode, PresenceNote, Reply, RoomName, Sid, UserId,
};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::broker::{Broker, BrokerError, BrokerEvent, PresenceUpdate, PublishRequest};
use crate::switchboard::Shared;

/// The first wait before presence changes that failed are tried again; it
/// doubles up to [`RETRY_MAX`] while they keep failing.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// Tries of a room's catch-up after a reconnect, with these pauses between:
/// the command connection may come back a while after the subscription one
/// (its reconnect backs off up to 2 s), and a catch-up that gives up tells
/// members `recovered: false` where a later try would have replayed.
const RESYNC_PAUSES: [Duration; 5] = [
    Duration::from_millis(100),
    Duration::from_millis(200),
    Duration::from_millis(400),
    Duration::from_millis(800),
    Duration::from_millis(1600),
];

/// Rooms that catch up at once, at most (see [`execute`]).
const RESYNC_CONCURRENCY: usize = 32;

/// How often a node compares its rooms' positions with the broker's.
const POSITION_CHECK: Duration = Duration::from_secs(5);

/// Most publishes sent to the broker in one batch.
const PUBLISH_BATCH: usize = 256;
/// Most publishes one session may have at the broker; its next publish
/// waits for the oldest to come back.
pub(crate) const SESSION_PUBLISHES: usize = 64;
/// Most membership keys changed in one batch.
const MEMBERSHIP_BATCH: usize = 256;
/// Most broker events fed to the core under one lock.
const EVENTS_BATCH: usize = 64;

type Waiter = oneshot::Sender<Result<(), BrokerError>>;

/// What membership is made of, as the broker knows it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    /// Subscribed or not.
    Channel(Channel),
    /// The user present in the room on this node, or not.
    Presence(RoomName, UserId),
}

/// A change the broker has not been told yet.
struct Entry {
    /// Tells this entry's slot in [`State::order`] from stale ones.
    generation: u64,
    /// Subscribed / present.
    on: bool,
    /// What the broker was told last for the key before this change, when
    /// that is known: a change back to it cancels this one. `None` after a
    /// failure, and for presence recorded again (the broker may have lost
    /// what it was told).
    base: Option<bool>,
    /// Presence keys: who, for the broker.
    note: Option<PresenceNote>,
    /// Presence keys: record without announcing.
    quiet: bool,
    /// It failed before and is tried again.
    retried: bool,
    /// Joins waiting for this change.
    waiters: Vec<Waiter>,
}

enum Slot {
    Key(Key, u64),
    /// Resolved when everything queued before it was performed.
    Barrier(Waiter),
}

/// A change being performed.
struct InFlight {
    on: bool,
    waiters: Vec<Waiter>,
}

/// A change for the broker, taken off the queue.
struct Apply {
    key: Key,
    on: bool,
    note: Option<PresenceNote>,
    quiet: bool,
    retried: bool,
}

enum Job {
    Apply(Apply),
    Barrier(Waiter),
}

/// What a core decision asks of membership.
struct Change {
    key: Key,
    on: bool,
    note: Option<PresenceNote>,
    quiet: bool,
    /// Perform it even if the broker should already be there.
    force: bool,
}

impl Change {
    fn channel(channel: Channel, on: bool) -> Self {
        Self {
            key: Key::Channel(channel),
            on,
            note: None,
            quiet: false,
            force: false,
        }
    }

    fn presence(room: &RoomName, note: PresenceNote, on: bool) -> Self {
        Self {
            key: Key::Presence(room.clone(), note.user.clone()),
            on,
            note: Some(note),
            quiet: false,
            force: false,
        }
    }

    /// Presence recorded again, announced, after the cluster took this
    /// node for dead and announced its users' leaves.
    fn announced(room: &RoomName, note: PresenceNote) -> Self {
        Self {
            force: true,
            ..Self::presence(room, note, true)
        }
    }

    /// Presence recorded again after a reconnect.
    fn again(room: &RoomName, note: PresenceNote) -> Self {
        Self {
            quiet: true,
            force: true,
            ..Self::presence(room, note, true)
        }
    }
}

#[derive(Default)]
struct State {
    /// Keys in the order they changed (stale slots are skipped), and barriers.
    order: VecDeque<Slot>,
    barriers: usize,
    /// At most one change per key.
    pending: HashMap<Key, Entry>,
    /// Presence changes that failed, waiting for their next try.
    retry: HashMap<Key, Entry>,
    /// The changes being performed (one batch), by key.
    in_flight: HashMap<Key, InFlight>,
    generations: u64,
    /// The Switchboard is gone: finish what is queued, then stop.
    closed: bool,
}

fn superseded(waiters: Vec<Waiter>) {
    for waiter in waiters {
        let _ = waiter.send(Err(BrokerError(
            "the membership changed again meanwhile".into(),
        )));
    }
}

impl State {
    /// Records a core decision; true when the task has something new to do.
    fn set(&mut self, change: Change, waiter: Option<Waiter>) -> bool {
        let Change {
            key,
            on,
            note,
            quiet,
            force,
        } = change;
        if let Some(entry) = self.pending.get_mut(&key) {
            if entry.on == on {
                entry.quiet &= quiet;
            } else {
                if entry.base == Some(on) && !force {
                    // Changed back before the broker heard of it.
                    if let Some(entry) = self.pending.remove(&key) {
                        superseded(entry.waiters);
                    }
                    self.settled(&key, on, waiter);
                    return false;
                }
                superseded(std::mem::take(&mut entry.waiters));
                entry.on = on;
                entry.quiet = quiet;
            }
            if note.is_some() {
                entry.note = note;
            }
            if force {
                entry.base = None;
            }
            entry.waiters.extend(waiter);
            return false;
        }
        let retried = self.retry.remove(&key).is_some();
        let base = if retried || force {
            None
        } else {
            match self.in_flight.get(&key) {
                Some(f) => Some(f.on),
                // Changes alternate: the one before this (the opposite) was
                // performed.
                None => Some(!on),
            }
        };
        if base == Some(on) {
            self.settled(&key, on, waiter);
            return false;
        }
        self.push(
            key,
            Entry {
                generation: 0,
                on,
                base,
                note,
                quiet,
                retried: false,
                waiters: waiter.into_iter().collect(),
            },
        );
        true
    }

    fn push(&mut self, key: Key, mut entry: Entry) {
        self.generations += 1;
        entry.generation = self.generations;
        self.order
            .push_back(Slot::Key(key.clone(), entry.generation));
        self.pending.insert(key, entry);
        // Drop stale slots once they are half of the queue: amortized O(1)
        // per change, and the queue stays within twice what is pending.
        if self.order.len() >= 64 && self.order.len() > 2 * (self.pending.len() + self.barriers) {
            let pending = &self.pending;
            self.order.retain(|slot| match slot {
                Slot::Barrier(_) => true,
                Slot::Key(key, generation) => pending
                    .get(key)
                    .is_some_and(|e| e.generation == *generation),
            });
        }
    }

    /// A waiter for a key the broker already is (or is being brought) at `on`.
    fn settled(&mut self, key: &Key, on: bool, waiter: Option<Waiter>) {
        let Some(waiter) = waiter else {
            return;
        };
        match self.in_flight.get_mut(key) {
            Some(f) if f.on == on => f.waiters.push(waiter),
            _ => {
                let _ = waiter.send(Ok(()));
            }
        }
    }

    /// A waiter told once the broker is at `on` for `key`: now if nothing
    /// for it is pending or under way, else when that lands.
    fn wait_settled(&mut self, key: &Key, on: bool, waiter: Waiter) {
        match self.pending.get_mut(key) {
            Some(entry) if entry.on == on => entry.waiters.push(waiter),
            _ => self.settled(key, on, Some(waiter)),
        }
    }

    fn barrier(&mut self) -> oneshot::Receiver<Result<(), BrokerError>> {
        let (tx, rx) = oneshot::channel();
        self.order.push_back(Slot::Barrier(tx));
        self.barriers += 1;
        rx
    }

    /// Queues the failed presence changes again; true if there were any.
    fn requeue_retries(&mut self) -> bool {
        if self.retry.is_empty() {
            return false;
        }
        for (key, mut entry) in std::mem::take(&mut self.retry) {
            entry.retried = true;
            self.push(key, entry);
        }
        true
    }

    fn take(&mut self) -> Option<Job> {
        while let Some(slot) = self.order.pop_front() {
            match slot {
                Slot::Barrier(tx) => {
                    self.barriers -= 1;
                    return Some(Job::Barrier(tx));
                }
                Slot::Key(key, generation) => {
                    if self
                        .pending
                        .get(&key)
                        .is_none_or(|e| e.generation != generation)
                    {
                        continue; // stale
                    }
                    let Some(entry) = self.pending.remove(&key) else {
                        continue;
                    };
                    self.in_flight.insert(
                        key.clone(),
                        InFlight {
                            on: entry.on,
                            waiters: entry.waiters,
                        },
                    );
                    return Some(Job::Apply(Apply {
                        key,
                        on: entry.on,
                        note: entry.note,
                        quiet: entry.quiet,
                        retried: entry.retried,
                    }));
                }
            }
        }
        None
    }

    /// Up to `max` changes to perform together (of distinct keys, since at
    /// most one change per key waits), in the order the keys changed; a
    /// barrier ends a batch, after what came before it.
    fn take_batch(&mut self, max: usize) -> Vec<Job> {
        let mut jobs = Vec::new();
        while jobs.len() < max {
            match self.take() {
                Some(Job::Barrier(tx)) => {
                    jobs.push(Job::Barrier(tx));
                    break;
                }
                Some(job) => jobs.push(job),
                None => break,
            }
        }
        jobs
    }

    fn finish(&mut self, done: Apply, result: Result<(), BrokerError>) {
        if let Some(f) = self.in_flight.remove(&done.key) {
            for waiter in f.waiters {
                let _ = waiter.send(result.clone());
            }
        }
        // A failed subscription stays wanted by the broker, which subscribes
        // it when it reconnects; a failed presence change is tried again.
        if result.is_ok() || !matches!(done.key, Key::Presence(..)) {
            return;
        }
        match self.pending.get_mut(&done.key) {
            // A newer change follows; the broker's state is unknown now.
            Some(next) => next.base = None,
            None => {
                let retry = Entry {
                    generation: 0,
                    on: done.on,
                    base: None,
                    note: done.note,
                    quiet: done.quiet,
                    retried: true,
                    waiters: Vec::new(),
                };
                self.retry.insert(done.key, retry);
            }
        }
    }
}

struct Queue {
    // A std Mutex: held for map operations only, never across an await.
    state: Mutex<State>,
    wake: Notify,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The core's side of membership: fed under the core's lock, in its order.
/// Dropping it (the Switchboard is gone) lets the task finish and stop.
pub(crate) struct MembershipQueue(Arc<Queue>);

/// The task's side of membership ([`run_membership`]).
pub(crate) struct MembershipTask(Arc<Queue>);

/// A membership queue and the handle its task runs on.
pub(crate) fn membership_queue() -> (MembershipQueue, MembershipTask) {
    let queue = Arc::new(Queue {
        state: Mutex::new(State::default()),
        wake: Notify::new(),
    });
    (MembershipQueue(Arc::clone(&queue)), MembershipTask(queue))
}

impl MembershipQueue {
    fn set(&self, change: Change) {
        if self.0.lock().set(change, None) {
            self.0.wake.notify_one();
        }
    }

    /// As `set`, with a receiver told once the broker is there.
    fn wait(&self, change: Change) -> oneshot::Receiver<Result<(), BrokerError>> {
        let (tx, rx) = oneshot::channel();
        if self.0.lock().set(change, Some(tx)) {
            self.0.wake.notify_one();
        }
        rx
    }

    /// Resolved once the broker is at `on` for `key` (at once if nothing
    /// for it waits), without asking for a change.
    fn settled(&self, key: Key, on: bool) -> oneshot::Receiver<Result<(), BrokerError>> {
        let (tx, rx) = oneshot::channel();
        self.0.lock().wait_settled(&key, on, tx);
        rx
    }

    /// Resolved once everything queued so far was performed (or failed).
    fn barrier(&self) -> oneshot::Receiver<Result<(), BrokerError>> {
        let rx = self.0.lock().barrier();
        self.0.wake.notify_one();
        rx
    }

    /// Tries the failed presence changes again now (the broker is back).
    fn retry_now(&self) {
        if self.0.lock().requeue_retries() {
            self.0.wake.notify_one();
        }
    }
}

impl Drop for MembershipQueue {
    fn drop(&mut self) {
        self.0.lock().closed = true;
        self.0.wake.notify_one();
    }
}

/// A broker request still to perform, after the membership changes it waits for.
pub(crate) struct Work {
    request: BrokerRequest,
    waits: Vec<oneshot::Receiver<Result<(), BrokerError>>>,
}

impl Work {
    /// A publish (which waits for nothing): for the publish pipeline.
    pub(crate) fn is_publish(&self) -> bool {
        self.waits.is_empty() && matches!(self.request, BrokerRequest::Publish { .. })
    }

    /// A room's catch-up, which may run beside other rooms' ones.
    fn is_resync(&self) -> bool {
        matches!(self.request, BrokerRequest::Resync(_))
    }

    /// The request (once its waits are over, or it has none).
    pub(crate) fn into_request(self) -> BrokerRequest {
        self.request
    }
}

/// Turns a core request into work, handing its membership part to the
/// membership queue now (the caller holds the core's lock).
pub(crate) fn prepare(queue: &MembershipQueue, request: BrokerRequest) -> Option<Work> {
    match request {
        BrokerRequest::Join {
            ref room,
            subscribe,
            ref presence,
            ..
        } => {
            // Every join waits for the room's subscription, not only the
            // one that asked for it: a second member (another tab of the
            // same user, say) joining while the first one's subscribe is
            // under way must not read a room position the subscription
            // does not cover yet, or what is published in between never
            // reaches it.
            let channel = Channel::Room(room.clone());
            let mut waits = vec![if subscribe {
                queue.wait(Change::channel(channel, true))
            } else {
                queue.settled(Key::Channel(channel), true)
            }];
            if let Some(note) = presence {
                waits.push(queue.wait(Change::presence(room, note.clone(), true)));
            }
            Some(Work { request, waits })
        }
        BrokerRequest::Left {
            room,
            unsubscribe,
            presence,
        } => {
            if let Some(note) = presence {
                queue.set(Change::presence(&room, note, false));
            }
            if unsubscribe {
                queue.set(Change::channel(Channel::Room(room), false));
            }
            None
        }
        BrokerRequest::Subscribe(channel) => {
            queue.set(Change::channel(channel, true));
            None
        }
        BrokerRequest::Unsubscribe(channel) => {
            queue.set(Change::channel(channel, false));
            None
        }
        BrokerRequest::Resync(ref resync) => {
            for note in &resync.present {
                if resync.announce {
                    queue.set(Change::announced(&resync.room, note.clone()));
                } else {
                    queue.set(Change::again(&resync.room, note.clone()));
                }
            }
            queue.retry_now();
            // Catch up once the presence is recorded again (joined.members).
            let waits = vec![queue.barrier()];
            Some(Work { request, waits })
        }
        request => Some(Work {
            request,
            waits: Vec::new(),
        }),
    }
}

/// Brings the broker to the membership the core decided, in batches (see
/// the module notes), in the order the keys changed; tries failed presence
/// changes again with backoff.
pub(crate) async fn run_membership(broker: Arc<dyn Broker>, task: MembershipTask) {
    let queue = task.0;
    let mut backoff = RETRY_MIN;
    // When the failed presence changes are due again: a deadline, not a
    // pause, so that a steady trickle of other changes cannot put it off.
    let mut retry_at: Option<tokio::time::Instant> = None;
    loop {
        let jobs = {
            let mut state = queue.lock();
            if state.retry.is_empty() {
                retry_at = None;
            } else {
                let now = tokio::time::Instant::now();
                let at = *retry_at.get_or_insert(now + backoff);
                if now >= at {
                    state.requeue_retries();
                    retry_at = None;
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
            }
            state.take_batch(MEMBERSHIP_BATCH)
        };
        if jobs.is_empty() {
            if queue.lock().closed {
                return;
            }
            let retry = async {
                match retry_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = queue.wake.notified() => {}
                () = retry => {}
            }
            continue;
        }
        let mut changes = Vec::with_capacity(jobs.len());
        let mut barrier = None;
        for job in jobs {
            match job {
                Job::Apply(change) => changes.push(change),
                Job::Barrier(done) => barrier = Some(done),
            }
        }
        let results = perform_changes(broker.as_ref(), &changes).await;
        let mut state = queue.lock();
        for (change, result) in changes.into_iter().zip(results) {
            match (&result, &change.key) {
                (Err(e), _) => {
                    tracing::debug!(key = ?change.key, error = %e, "membership change failed");
                }
                (Ok(()), Key::Presence(room, user)) => {
                    backoff = RETRY_MIN;
                    if change.retried {
                        tracing::info!(room = %room, user = %user, present = change.on,
                            "presence recorded after a retry");
                    }
                }
                (Ok(()), Key::Channel(_)) => {}
            }
            state.finish(change, result);
        }
        drop(state);
        if let Some(done) = barrier {
            let _ = done.send(Ok(()));
        }
    }
}

/// What kind of broker call a change is, for grouping a batch's changes.
#[derive(PartialEq, Eq, Clone, Copy)]
enum Call {
    Subscribe,
    Unsubscribe,
    Presence,
}

impl Call {
    fn of(change: &Apply) -> Self {
        match change.key {
            Key::Channel(_) if change.on => Self::Subscribe,
            Key::Channel(_) => Self::Unsubscribe,
            Key::Presence(..) => Self::Presence,
        }
    }
}

/// Performs a batch of changes (of distinct keys), in order: each run of
/// changes of one kind in one call (one `SUBSCRIBE` for a run of channels,
/// one pipeline for a run of presence changes). One result per change.
async fn perform_changes(broker: &dyn Broker, changes: &[Apply]) -> Vec<Result<(), BrokerError>> {
    let mut results = Vec::with_capacity(changes.len());
    let mut rest = changes;
    while let Some(first) = rest.first() {
        let call = Call::of(first);
        let len = rest.iter().take_while(|c| Call::of(c) == call).count();
        let (run, after) = rest.split_at(len);
        rest = after;
        match call {
            Call::Subscribe | Call::Unsubscribe => {
                let channels: Vec<Channel> = run
                    .iter()
                    .filter_map(|c| match &c.key {
                        Key::Channel(channel) => Some(channel.clone()),
                        Key::Presence(..) => None,
                    })
                    .collect();
                if call == Call::Subscribe {
                    let mut answers = broker.subscribe_many(&channels).await.into_iter();
                    results.extend(run.iter().map(|_| {
                        answers.next().unwrap_or_else(|| {
                            Err(BrokerError("no answer for the subscription".into()))
                        })
                    }));
                } else {
                    broker.unsubscribe_many(&channels).await;
                    results.extend(run.iter().map(|_| Ok(())));
                }
            }
            Call::Presence => {
                let updates: Vec<PresenceUpdate<'_>> = run
                    .iter()
                    .filter_map(|change| {
                        let (Key::Presence(room, user), Some(note)) = (&change.key, &change.note)
                        else {
                            return None;
                        };
                        Some(PresenceUpdate {
                            room,
                            user,
                            present: change.on,
                            subject: &note.subject,
                            announce: note.announce,
                            quiet: change.quiet,
                            history_ttl: note.history_ttl,
                        })
                    })
                    .collect();
                let mut answers = broker.presence_batch(&updates).await.into_iter();
                for change in run {
                    results.push(if change.note.is_some() {
                        answers
                            .next()
                            .unwrap_or_else(|| {
                                Err(BrokerError("no answer for the presence change".into()))
                            })
                            .map(|_| ())
                    } else {
                        Ok(()) // presence changes always carry their note
                    });
                }
            }
        }
    }
    results
}

/// Performs work in order, feeding each result back to the core (which may
/// produce more work, done in turn).
pub(crate) async fn execute(shared: &Arc<Shared>, broker: &Arc<dyn Broker>, work: Vec<Work>) {
    let mut queue: VecDeque<Work> = work.into();
    while let Some(work) = queue.pop_front() {
        if work.is_resync() {
            // The catch-ups of a run (every room after a reconnect) go at
            // once: each may wait seconds for the broker (RESYNC_PAUSES),
            // and one room's must not hold up the others'.
            let mut run = vec![work];
            while queue.front().is_some_and(Work::is_resync) {
                run.extend(queue.pop_front());
            }
            let mut tasks = tokio::task::JoinSet::new();
            for work in run {
                while tasks.len() >= RESYNC_CONCURRENCY {
                    if let Some(Ok(more)) = tasks.join_next().await {
                        queue.extend(more);
                    }
                }
                let (shared, broker) = (Arc::clone(shared), Arc::clone(broker));
                tasks.spawn(async move { perform_work(&shared, broker.as_ref(), work).await });
            }
            while let Some(done) = tasks.join_next().await {
                if let Ok(more) = done {
                    queue.extend(more);
                }
            }
            continue;
        }
        queue.extend(perform_work(shared, broker.as_ref(), work).await);
    }
}

/// Waits for what `work` waits on, then performs it; returns the work it
/// led to.
async fn perform_work(shared: &Arc<Shared>, broker: &dyn Broker, work: Work) -> Vec<Work> {
    let Work { request, waits } = work;
    let mut ready = Ok(());
    for wait in waits {
        let outcome = wait
            .await
            .unwrap_or_else(|_| Err(BrokerError("broker stopped".into())));
        if ready.is_ok() {
            ready = outcome;
        }
    }
    perform(shared, broker, request, ready).await
}

async fn perform(
    shared: &Arc<Shared>,
    broker: &dyn Broker,
    request: BrokerRequest,
    ready: Result<(), BrokerError>,
) -> Vec<Work> {
    match request {
        request @ BrokerRequest::Publish { .. } => {
            // Through the node's publish pipeline, which answers it; this
            // waits for that, so what follows is answered after it.
            match shared.publishes() {
                Some(publishes) => {
                    let _ = publishes.submit(request).await;
                }
                None => {
                    // No pipeline: not in broker mode, so nothing to publish to.
                    if let BrokerRequest::Publish { reply, .. } = request {
                        shared.run(|inner, now| {
                            inner.hub.reply(now, reply, Err(ErrorCode::Unavailable));
                        });
                    }
                }
            }
            Vec::new()
        }
        BrokerRequest::Join {
            room,
            since,
            history_ttl,
            reply,
            ..
        } => {
            let state = match ready {
                Ok(()) => {
                    let since = since.as_ref().map(|(seq, epoch)| (*seq, epoch.as_str()));
                    broker
                        .room_state(&room, since, &new_epoch(), history_ttl)
                        .await
                }
                Err(e) => Err(e),
            };
            if let Err(e) = &state {
                tracing::warn!(room = %room, error = %e, "join failed");
            }
            let state = state.map_err(|_| ());
            shared
                .run_collect(|inner, now| inner.hub.complete_join(now, reply, state))
                .1
        }
        BrokerRequest::Resync(resync) => {
            // Presence that could not be recorded again is retried by the
            // membership task; catching up does not wait for it.
            let _ = ready;
            let since = resync
                .since
                .as_ref()
                .map(|(seq, epoch)| (*seq, epoch.as_str()));
            let mut pauses = RESYNC_PAUSES.iter();
            let state = loop {
                match broker
                    .resync_state(&resync.room, since, &new_epoch(), resync.history_ttl)
                    .await
                {
                    Ok(state) => break Ok(state),
                    Err(e) => match pauses.next() {
                        Some(pause) => tokio::time::sleep(*pause).await,
                        None => {
                            tracing::warn!(room = %resync.room, error = %e,
                                "cannot catch up after a reconnect; members are told recovered: false");
                            break Err(());
                        }
                    },
                }
            };
            let room = resync.room;
            shared
                .run_collect(|inner, now| inner.hub.complete_resync(now, &room, state))
                .1
        }
        BrokerRequest::Direct { to, frame, reply } => {
            let nodes = broker.direct(&to, &frame).await.map_err(|_| ());
            shared
                .run_collect(|inner, now| inner.hub.complete_direct(now, reply, nodes))
                .1
        }
        BrokerRequest::PresenceList { room, reply } => {
            let users = broker.presence_list(&room).await.map_err(|_| ());
            shared
                .run_collect(|inner, now| inner.hub.complete_presence_list(now, reply, users))
                .1
        }
        // Membership requests went to the membership queue in `prepare`.
        _ => Vec::new(),
    }
}

/// A publish handed to [`run_publishes`].
pub(crate) struct PublishJob {
    room: RoomName,
    body: String,
    exclude: Option<Sid>,
    history: usize,
    history_ttl: Duration,
    /// The publisher's scoped key, else one the batch draws.
    idempotency_key: Option<String>,
    reply: Reply,
    /// Told once the publish's answer was given to the core.
    done: oneshot::Sender<()>,
}

/// The node's publish pipeline, as its users see it: publishes handed to it
/// reach the broker in the order they were handed over.
///
/// Not bounded by itself: every publish in it has a session (or a caller)
/// waiting for it, and a session has at most [`SESSION_PUBLISHES`] in it.
///
/// One pipeline per lane of the broker ([`Broker::publish_lanes`]: one per
/// Redis when rooms are sharded over several), so a Redis that is slow to
/// answer holds up only its own rooms' publishes.
pub(crate) struct Publishes {
    lanes: Vec<mpsc::UnboundedSender<PublishJob>>,
    broker: Arc<dyn Broker>,
}

/// The publish pipelines of `broker`'s lanes, and the receiver each task
/// ([`run_publishes`]) reads.
pub(crate) fn publish_pipeline(
    broker: &Arc<dyn Broker>,
) -> (Publishes, Vec<mpsc::UnboundedReceiver<PublishJob>>) {
    let (lanes, receivers) = (0..broker.publish_lanes().max(1))
        .map(|_| mpsc::unbounded_channel())
        .unzip();
    let publishes = Publishes {
        lanes,
        broker: Arc::clone(broker),
    };
    (publishes, receivers)
}

impl Publishes {
    /// Hands a publish over; the receiver resolves once its answer (ack or
    /// error) was given to the core. Only for a publish
    /// ([`Work::is_publish`]): another request is refused `unavailable`.
    pub(crate) fn submit(&self, request: BrokerRequest) -> oneshot::Receiver<()> {
        let (done, rx) = oneshot::channel();
        let BrokerRequest::Publish {
            room,
            body,
            exclude,
            history,
            history_ttl,
            idempotency_key,
            reply,
        } = request
        else {
            debug_assert!(false, "only publishes go to the publish pipeline");
            tracing::error!("a request that is not a publish went to the publish pipeline");
            return rx;
        };
        // A send fails only when the task is gone (the Switchboard is): the
        // receiver then resolves at once.
        let lane = self.broker.publish_lane(&room) % self.lanes.len();
        let _ = self.lanes[lane].send(PublishJob {
            room,
            body,
            exclude,
            history,
            history_ttl,
            idempotency_key,
            reply,
            done,
        });
        rx
    }
}

/// A session's publishes still at the broker, oldest first (see the module
/// notes): its next frame that is not a publish waits for them all, and its
/// next publish for the oldest when it has [`SESSION_PUBLISHES`].
#[derive(Default)]
pub(crate) struct SessionPublishes(Mutex<VecDeque<oneshot::Receiver<()>>>);

impl SessionPublishes {
    fn lock(&self) -> MutexGuard<'_, VecDeque<oneshot::Receiver<()>>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether some are still at the broker (those answered are forgotten).
    pub(crate) fn pending(&self) -> bool {
        let mut queue = self.lock();
        while let Some(front) = queue.front_mut() {
            match front.try_recv() {
                Err(oneshot::error::TryRecvError::Empty) => return true,
                _ => {
                    queue.pop_front();
                }
            }
        }
        false
    }

    /// Adds one just handed to the pipeline.
    pub(crate) fn push(&self, done: oneshot::Receiver<()>) {
        self.lock().push_back(done);
    }

    /// Waits until at most `limit` are at the broker.
    pub(crate) async fn wait_below(&self, limit: usize) {
        loop {
            let oldest = {
                let mut queue = self.lock();
                if queue.len() <= limit {
                    return;
                }
                queue.pop_front()
            };
            if let Some(oldest) = oldest {
                let _ = oldest.await;
            }
        }
    }

    /// Waits until every one was answered.
    pub(crate) async fn settle(&self) {
        self.wait_below(0).await;
    }
}

/// Whether a client frame is a `publish` (its `type`), read without the
/// core: a frame that is not is answered only after the session's
/// publishes still at the broker. A frame this cannot read counts as not
/// a publish (it waits).
pub(crate) fn is_publish(frame: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Kind<'a> {
        #[serde(rename = "type", borrow)]
        kind: Option<std::borrow::Cow<'a, str>>,
    }
    serde_json::from_slice::<Kind<'_>>(frame).is_ok_and(|k| k.kind.as_deref() == Some("publish"))
}

/// Sends the publishes handed to the pipeline to the broker, in order: what
/// waits goes as one batch (up to [`PUBLISH_BATCH`]), one batch at a time,
/// and their answers go to the core in order, under one lock.
pub(crate) async fn run_publishes(
    shared: std::sync::Weak<Shared>,
    broker: Arc<dyn Broker>,
    mut jobs: mpsc::UnboundedReceiver<PublishJob>,
) {
    let mut batch = Vec::with_capacity(PUBLISH_BATCH);
    while jobs.recv_many(&mut batch, PUBLISH_BATCH).await > 0 {
        // Two draws of randomness per batch, not per publish: one epoch for
        // any room of the batch whose history starts now (its first publish
        // starts it; the others find it), and 64 random bits that, with the
        // publish's place in the batch, make the key of each publish that
        // has none of its publisher's.
        let epoch = new_epoch();
        let base = new_epoch();
        let keys: Vec<String> = batch
            .iter()
            .enumerate()
            .map(|(i, job)| {
                job.idempotency_key
                    .clone()
                    .unwrap_or_else(|| format!("{base}.{i}"))
            })
            .collect();
        let requests: Vec<PublishRequest<'_>> = batch
            .iter()
            .zip(&keys)
            .map(|(job, key)| PublishRequest {
                room: &job.room,
                body: &job.body,
                exclude: job.exclude.as_ref(),
                history: job.history,
                history_ttl: job.history_ttl,
                new_epoch: &epoch,
                key,
            })
            .collect();
        let mut results = broker.publish_batch(&requests).await.into_iter();
        drop(requests);
        let mut answers = Vec::with_capacity(batch.len());
        let mut dones = Vec::with_capacity(batch.len());
        for job in batch.drain(..) {
            let result = results
                .next()
                .unwrap_or_else(|| Err(BrokerError("no answer for this publish".into())));
            if let Err(e) = &result {
                tracing::warn!(room = %job.room, error = %e, "publish failed");
            }
            answers.push((
                job.reply,
                result.map(|_| ()).map_err(|_| ErrorCode::Unavailable),
            ));
            dones.push(job.done);
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        // `run` performs what the answers produce (nothing, for an ack) in
        // a task of its own.
        shared.run(|inner, now| {
            for (reply, result) in answers {
                inner.hub.reply(now, reply, result);
            }
        });
        drop(shared);
        for done in dones {
            let _ = done.send(());
        }
    }
}

/// Why rooms catch up, for the log.
enum CatchUp {
    Reconnect,
    ShardReconnect,
    Reaped,
    ShardReaped,
}

/// Feeds what the broker fans out into the core, in the broker's order:
/// what waits (up to [`EVENTS_BATCH`] events) under one lock, so that a
/// burst of messages reaches the sessions' queues together and each
/// session's writer sends them in one write.
pub(crate) async fn run_events(
    shared: std::sync::Weak<Shared>,
    mut events: mpsc::Receiver<BrokerEvent>,
) {
    let mut batch = Vec::with_capacity(EVENTS_BATCH);
    while events.recv_many(&mut batch, EVENTS_BATCH).await > 0 {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let notes = shared.run(|inner, now| {
            let mut notes = Vec::new();
            for event in batch.drain(..) {
                match event {
                    BrokerEvent::Message {
                        room,
                        seq,
                        epoch,
                        frame,
                        exclude,
                    } => inner.hub.handle_broker_message(
                        now,
                        room.as_str(),
                        seq,
                        &epoch,
                        frame,
                        exclude.as_ref(),
                    ),
                    BrokerEvent::Presence {
                        room,
                        frame,
                        exclude,
                    } => {
                        inner
                            .hub
                            .handle_broker_presence(room.as_str(), frame, exclude.as_ref());
                    }
                    BrokerEvent::Direct { to, frame } => {
                        inner.hub.handle_broker_direct(&to, frame);
                    }
                    BrokerEvent::Reconnected => {
                        // Every room with members here records its presence
                        // again and catches up (replaying what it missed,
                        // or moving to a new epoch); the work runs in a
                        // task of its own.
                        notes.push((CatchUp::Reconnect, inner.hub.begin_resync()));
                    }
                    BrokerEvent::Reaped => notes.push((CatchUp::Reaped, inner.hub.begin_rejoin())),
                    // One shard of several: only its rooms.
                    BrokerEvent::ReconnectedRooms(which) => {
                        let rooms = inner.hub.begin_resync_of(&|r| which.matches(r));
                        notes.push((CatchUp::ShardReconnect, rooms));
                    }
                    BrokerEvent::ReapedRooms(which) => {
                        let rooms = inner.hub.begin_rejoin_of(&|r| which.matches(r));
                        notes.push((CatchUp::ShardReaped, rooms));
                    }
                }
            }
            notes
        });
        for (why, rooms) in notes {
            match why {
                CatchUp::Reconnect => {
                    tracing::info!(rooms, "catching up after a broker reconnect");
                }
                CatchUp::ShardReconnect => {
                    tracing::info!(rooms, "catching up after a broker shard reconnect");
                }
                CatchUp::Reaped => tracing::warn!(
                    rooms,
                    "the cluster took this node for dead; recording its presence again"
                ),
                CatchUp::ShardReaped => tracing::warn!(
                    rooms,
                    "a broker shard took this node for dead; recording its presence again"
                ),
            }
        }
    }
}

/// Every [`POSITION_CHECK`], asks the broker where this node's rooms are
/// and lets the core catch up those that fell behind for good (their last
/// messages lost on the way, with nothing after them to show the hole).
pub(crate) async fn run_positions(shared: std::sync::Weak<Shared>, broker: Arc<dyn Broker>) {
    let mut tick = tokio::time::interval(POSITION_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(rooms) = shared
            .upgrade()
            .map(|shared| shared.run(|inner, _| inner.hub.broker_positions()))
        else {
            return;
        };
        if rooms.is_empty() {
            continue;
        }
        let positions = match broker.positions(&rooms).await {
            Ok(positions) if positions.len() == rooms.len() => positions,
            Ok(_) => continue,
            Err(e) => {
                tracing::debug!(error = %e, "cannot check room positions");
                continue;
            }
        };
        let Some(shared) = shared.upgrade() else {
            return;
        };
        shared.run(|inner, _| {
            inner
                .hub
                .check_positions(rooms.into_iter().zip(positions).collect());
        });
    }
}

/// A fresh room epoch: 64 random bits, URL-safe (11 characters).
pub(crate) fn new_epoch() -> String {
    let mut bytes = [0u8; 8];
    // Without OS randomness, a time-derived epoch is still unique enough to
    // tell histories apart.
    if getrandom::fill(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        bytes = (nanos as u64).to_le_bytes();
    }
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_core::Sid;

    fn note(user: &str) -> PresenceNote {
        PresenceNote {
            user: UserId::from(user),
            subject: Sid::from(user),
            announce: true,
            history_ttl: Duration::from_secs(300),
        }
    }

    fn room(name: &str) -> RoomName {
        RoomName::new(name).expect("a room name")
    }

    fn sid_channel(i: usize) -> Channel {
        Channel::Sid(Sid::from(format!("s{i}").as_str()))
    }

    /// Takes and finishes every queued change with `result`; returns them as
    /// (key, on).
    fn drain(state: &mut State, result: &Result<(), BrokerError>) -> Vec<(Key, bool)> {
        let mut done = Vec::new();
        while let Some(job) = state.take() {
            match job {
                Job::Apply(change) => {
                    done.push((change.key.clone(), change.on));
                    state.finish(change, result.clone());
                }
                Job::Barrier(tx) => {
                    let _ = tx.send(Ok(()));
                }
            }
        }
        done
    }

    /// Sessions that open and close while the broker is stuck leave nothing
    /// queued: what waits never outgrows the node's live state.
    #[test]
    fn changes_undone_before_the_broker_heard_of_them_cost_nothing() {
        let mut state = State::default();
        for i in 0..100_000 {
            state.set(Change::channel(sid_channel(i), true), None);
            state.set(Change::channel(sid_channel(i), false), None);
        }
        assert!(state.pending.is_empty());
        assert!(state.order.len() < 64, "{} slots", state.order.len());
        // A session that stays: one change.
        state.set(Change::channel(sid_channel(0), true), None);
        assert_eq!(state.pending.len(), 1);
        assert_eq!(
            drain(&mut state, &Ok(())),
            [(Key::Channel(sid_channel(0)), true)]
        );
    }

    /// A change back while the first is being performed is queued, and one
    /// back again cancels it; a join waiting on that key is told when the
    /// change under way lands.
    #[test]
    fn a_change_back_during_one_under_way_waits_for_it() {
        let mut state = State::default();
        let channel = || Change::channel(Channel::Room(room("r")), true);
        state.set(channel(), None);
        let Some(Job::Apply(first)) = state.take() else {
            panic!("a change to perform");
        };
        state.set(Change::channel(Channel::Room(room("r")), false), None);
        assert_eq!(state.pending.len(), 1);
        let (tx, mut rx) = oneshot::channel();
        state.set(channel(), Some(tx));
        assert!(state.pending.is_empty(), "changed back: nothing more to do");
        assert!(rx.try_recv().is_err(), "told only once the change lands");
        state.finish(first, Ok(()));
        assert_eq!(rx.try_recv().ok(), Some(Ok(())));
    }

    /// A join that did not ask for the room's subscription still waits for
    /// one under way (queued or being performed); with none, it goes on.
    #[test]
    fn a_join_waits_for_a_subscription_under_way() {
        let mut state = State::default();
        let key = Key::Channel(Channel::Room(room("r")));
        state.set(Change::channel(Channel::Room(room("r")), true), None);
        let (tx, mut queued) = oneshot::channel();
        state.wait_settled(&key, true, tx);
        let Some(Job::Apply(change)) = state.take() else {
            panic!("the subscribe");
        };
        let (tx, mut in_flight) = oneshot::channel();
        state.wait_settled(&key, true, tx);
        assert!(queued.try_recv().is_err() && in_flight.try_recv().is_err());
        state.finish(change, Ok(()));
        assert_eq!(queued.try_recv().ok(), Some(Ok(())));
        assert_eq!(in_flight.try_recv().ok(), Some(Ok(())));
        let (tx, mut settled) = oneshot::channel();
        state.wait_settled(&key, true, tx);
        assert_eq!(settled.try_recv().ok(), Some(Ok(())));
    }

    /// A presence change that failed is tried again (a leave during an
    /// outage must reach the broker), unless a newer change supersedes it.
    #[test]
    fn failed_presence_changes_are_retried_until_superseded() {
        let mut state = State::default();
        let down = Err(BrokerError("down".into()));
        state.set(Change::presence(&room("r"), note("ann"), false), None);
        state.set(Change::presence(&room("r"), note("bob"), true), None);
        assert_eq!(drain(&mut state, &down).len(), 2);
        assert_eq!(state.retry.len(), 2);
        // Bob's join is undone meanwhile: the undo replaces the retry, and is
        // performed even though the broker may never have recorded the join.
        state.set(Change::presence(&room("r"), note("bob"), false), None);
        assert!(state.requeue_retries());
        let mut done = drain(&mut state, &Ok(()));
        done.sort_by_key(|(key, _)| format!("{key:?}"));
        assert_eq!(
            done,
            [
                (Key::Presence(room("r"), UserId::from("ann")), false),
                (Key::Presence(room("r"), UserId::from("bob")), false),
            ]
        );
        assert!(state.retry.is_empty());
    }

    /// Presence recorded again is performed even when nothing changed
    /// locally, quietly, and a join queued for the same key keeps its
    /// announcement.
    #[test]
    fn presence_recorded_again_is_performed_quietly() {
        let mut state = State::default();
        state.set(Change::again(&room("r"), note("ann")), None);
        state.set(Change::presence(&room("r"), note("bob"), true), None);
        state.set(Change::again(&room("r"), note("bob")), None);
        let mut quiet = HashMap::new();
        while let Some(Job::Apply(change)) = state.take() {
            quiet.insert(change.key.clone(), change.quiet);
            state.finish(change, Ok(()));
        }
        assert_eq!(
            quiet.get(&Key::Presence(room("r"), UserId::from("ann"))),
            Some(&true)
        );
        assert_eq!(
            quiet.get(&Key::Presence(room("r"), UserId::from("bob"))),
            Some(&false)
        );
    }

    /// A batch takes distinct keys in the order they changed and ends at
    /// a barrier; a key changed again while its batch is performed waits
    /// for the next batch.
    #[test]
    fn a_batch_takes_keys_in_order_up_to_a_barrier() {
        let mut state = State::default();
        for i in 0..3 {
            state.set(Change::channel(sid_channel(i), true), None);
        }
        let mut barrier = state.barrier();
        state.set(Change::presence(&room("r"), note("ann"), true), None);
        let jobs = state.take_batch(MEMBERSHIP_BATCH);
        assert_eq!(jobs.len(), 4, "three changes, then the barrier");
        let mut changes = Vec::new();
        for job in jobs {
            match job {
                Job::Apply(change) => changes.push(change),
                Job::Barrier(tx) => {
                    let _ = tx.send(Ok(()));
                }
            }
        }
        assert_eq!(
            changes.iter().map(|c| c.key.clone()).collect::<Vec<_>>(),
            (0..3)
                .map(|i| Key::Channel(sid_channel(i)))
                .collect::<Vec<_>>()
        );
        assert_eq!(barrier.try_recv().ok(), Some(Ok(())));
        // Changed back while under way: queued for the next batch.
        state.set(Change::channel(sid_channel(0), false), None);
        for change in changes {
            state.finish(change, Ok(()));
        }
        let next = drain(&mut state, &Ok(()));
        assert_eq!(
            next,
            [
                (Key::Presence(room("r"), UserId::from("ann")), true),
                (Key::Channel(sid_channel(0)), false),
            ]
        );
    }

    /// A barrier resolves after what was queued before it.
    #[test]
    fn a_barrier_comes_after_what_was_queued_before_it() {
        let mut state = State::default();
        state.set(Change::again(&room("r"), note("ann")), None);
        let mut barrier = state.barrier();
        let Some(Job::Apply(change)) = state.take() else {
            panic!("the presence change first");
        };
        assert!(barrier.try_recv().is_err());
        state.finish(change, Ok(()));
        let Some(Job::Barrier(tx)) = state.take() else {
            panic!("then the barrier");
        };
        let _ = tx.send(Ok(()));
        assert_eq!(barrier.try_recv().ok(), Some(Ok(())));
    }
}
