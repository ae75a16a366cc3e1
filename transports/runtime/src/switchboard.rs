//! The `Switchboard` handle and the session seam transports plug into.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use base64::Engine as _;
use serde::Serialize;
use slotmap::SecondaryMap;
use switchboard_core::{
    CloseReason, Config, ErrorCode, FrameError, Hub, Identity, Liveness, OpenPolicy, Output,
    Policy, Published, RawValue, Recipient, Refresh, RoomInfo, RoomName, Sequencing, SessionKey,
    Sid, Target, Timestamp, UserId,
};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{AllowOrigins, Authenticator, OriginCheck, Refusal, TrustClientName};
use crate::broker::{Broker, PublishRequest};
use crate::clock::Clock;
use crate::cluster::{self, MembershipQueue, Publishes, SessionPublishes, Work};
use crate::error::{Error, Kind};
use crate::metrics::{Metrics, WireCounters};
use crate::outbox::{OutFrame, Outbox, Pushed};

/// Settings of the runtime itself (the core's limits are in [`Config`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RuntimeConfig {
    /// Bytes a session's outbound queue may hold before the session is closed
    /// as `slow_consumer`. Default 1 MiB: thousands of typical messages, so
    /// only a reader that has really stalled is cut off.
    pub max_outbound_bytes: usize,
    /// How long one write to a client may take before the connection is
    /// dropped. Default 10 s.
    pub write_timeout: Duration,
    /// How long [`Switchboard::shutdown`] waits for sessions to flush (for
    /// writers to write their `close`, for long-poll clients to fetch theirs).
    /// Default 5 s.
    pub shutdown_timeout: Duration,
    /// How long a long-poll waits for frames before answering `[]`. Default 25 s.
    pub poll_timeout: Duration,
    /// Whether SSE clients may send frames (`POST …/sse/send`). Off makes SSE
    /// server-push only. Default on.
    pub sse_client_frames: bool,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            max_outbound_bytes: 1 << 20,
            write_timeout: Duration::from_secs(10),
            shutdown_timeout: Duration::from_secs(5),
            poll_timeout: Duration::from_secs(25),
            sse_client_frames: true,
        }
    }
}

/// Builds a [`Switchboard`].
pub struct Builder {
    core: Config,
    runtime: RuntimeConfig,
    policy: Arc<dyn Policy>,
    authenticator: Arc<dyn Authenticator>,
    origins: Arc<dyn OriginCheck>,
    broker: Option<Arc<dyn Broker>>,
}

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field("core", &self.core)
            .field("runtime", &self.runtime)
            .finish_non_exhaustive()
    }
}

impl Builder {
    /// The core's limits and heartbeat.
    #[must_use]
    pub fn config(mut self, config: Config) -> Self {
        self.core = config;
        self
    }

    /// The runtime's queue bound and timeouts.
    #[must_use]
    pub fn runtime_config(mut self, runtime: RuntimeConfig) -> Self {
        self.runtime = runtime;
        self
    }

    /// The application's rules (default: [`OpenPolicy`]).
    #[must_use]
    pub fn policy(mut self, policy: impl Policy) -> Self {
        self.policy = Arc::new(policy);
        self
    }

    /// Who may connect (default: [`TrustClientName`], for demos).
    #[must_use]
    pub fn authenticator(mut self, authenticator: impl Authenticator) -> Self {
        self.authenticator = Arc::new(authenticator);
        self
    }

    /// Which browser origins may connect (default: same origin only).
    #[must_use]
    pub fn origins(mut self, origins: impl OriginCheck) -> Self {
        self.origins = Arc::new(origins);
        self
    }

    /// Shares rooms with other nodes through a cluster broker (Redis):
    /// room messages are numbered and kept by the broker, and presence and
    /// direct messages span nodes. Start with [`Builder::start`].
    #[must_use]
    pub fn broker(mut self, broker: impl Broker) -> Self {
        self.broker = Some(Arc::new(broker));
        self
    }

    /// Starts the Switchboard, connecting its broker first if it has one.
    ///
    /// # Errors
    /// As [`Builder::build`], or when the broker cannot be reached.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub async fn start(mut self) -> Result<Switchboard, BuildError> {
        let Some(broker) = self.broker.take() else {
            return self.build();
        };
        self.core.sequencing = Sequencing::Broker;
        let (events_tx, events_rx) = mpsc::channel(4096);
        broker
            .start(events_tx)
            .await
            .map_err(|e| BuildError::Broker(e.0))?;
        // Not a channel: at most one change per key waits, so it is bounded
        // by the node's live state, not by client churn (see `cluster`).
        let (membership_tx, membership_rx) = cluster::membership_queue();
        let (publishes_tx, publishes_rxs) = cluster::publish_pipeline(&broker);
        let switchboard = self.assemble(
            Some(Arc::clone(&broker)),
            Some(membership_tx),
            Some(publishes_tx),
        )?;
        tokio::spawn(cluster::run_membership(Arc::clone(&broker), membership_rx));
        for publishes_rx in publishes_rxs {
            tokio::spawn(cluster::run_publishes(
                Arc::downgrade(&switchboard.shared),
                Arc::clone(&broker),
                publishes_rx,
            ));
        }
        tokio::spawn(cluster::run_events(
            Arc::downgrade(&switchboard.shared),
            events_rx,
        ));
        tokio::spawn(cluster::run_positions(
            Arc::downgrade(&switchboard.shared),
            Arc::clone(&broker),
        ));
        Ok(switchboard)
    }

    /// Starts a single-node Switchboard: its timer task runs on the current
    /// tokio runtime.
    ///
    /// # Errors
    /// When the core config is invalid, the OS has no randomness, or a broker
    /// was set (start those with [`Builder::start`]).
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn build(self) -> Result<Switchboard, BuildError> {
        if self.broker.is_some() {
            return Err(BuildError::Broker(
                "a Switchboard with a broker starts with `start().await`".into(),
            ));
        }
        self.assemble(None, None, None)
    }

    fn assemble(
        self,
        broker: Option<Arc<dyn Broker>>,
        membership: Option<MembershipQueue>,
        publishes: Option<Publishes>,
    ) -> Result<Switchboard, BuildError> {
        let seed = u64::from_le_bytes(random_bytes::<8>().map_err(|_| BuildError::NoRandomness)?);
        let hub = Hub::new(self.core, self.policy, seed).map_err(BuildError::Config)?;
        let clock = Clock::new();
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                hub,
                outboxes: SecondaryMap::new(),
                overflowed: Vec::new(),
                superseded: 0,
                timer_armed: None,
                work: Vec::new(),
                refreshes: Vec::new(),
                membership,
            }),
            broker,
            publishes,
            clock,
            timer_wake: Arc::new(Notify::new()),
            accepting: AtomicBool::new(true),
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
            wire: WireCounters::default(),
            runtime: self.runtime,
            authenticator: self.authenticator,
            origins: self.origins,
        });
        tokio::spawn(run_timers(
            Arc::downgrade(&shared),
            Arc::clone(&shared.timer_wake),
            shared.cancel.clone(),
        ));
        Ok(Switchboard { shared })
    }
}

/// Why [`Builder::build`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// The core config cannot work.
    #[error(transparent)]
    Config(switchboard_core::ConfigError),
    /// The OS could not supply random bytes for ids and epochs.
    #[error("the OS has no randomness to give")]
    NoRandomness,
    /// The broker could not be started.
    #[error("broker: {0}")]
    Broker(String),
}

/// The application's handle on Switchboard: cheap to clone, shared by every
/// transport. Publish to rooms, message users, read presence and metrics, and
/// shut down; transports use [`Switchboard::admit`] and [`Switchboard::open`].
///
/// Everything runs in this process; nothing to install.
#[derive(Clone)]
pub struct Switchboard {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Switchboard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Switchboard").finish_non_exhaustive()
    }
}

pub(crate) struct Shared {
    // A std Mutex: held only while the core handles one input and its outputs
    // are pushed into queues; nothing awaits while holding it.
    inner: Mutex<Inner>,
    broker: Option<Arc<dyn Broker>>,
    /// The node's publish pipeline (broker mode).
    publishes: Option<Publishes>,
    clock: Clock,
    timer_wake: Arc<Notify>,
    accepting: AtomicBool,
    cancel: CancellationToken,
    tasks: TaskTracker,
    wire: WireCounters,
    runtime: RuntimeConfig,
    authenticator: Arc<dyn Authenticator>,
    origins: Arc<dyn OriginCheck>,
}

pub(crate) struct Inner {
    pub(crate) hub: Hub,
    outboxes: SecondaryMap<SessionKey, Arc<Outbox>>,
    overflowed: Vec<SessionKey>,
    /// Queued latest-value frames dropped for a newer one of their room and
    /// event, since start.
    superseded: u64,
    /// The deadline the timer task sleeps towards.
    timer_armed: Option<Timestamp>,
    /// Broker work the last input produced, for its caller to perform.
    work: Vec<Work>,
    /// `refresh` frames waiting for the authenticator: only client frames
    /// produce them, and [`Shared::handle_frame`] completes them.
    refreshes: Vec<Refresh>,
    /// The membership changes for the broker (broker mode).
    membership: Option<MembershipQueue>,
}

impl Inner {
    /// Hands every output of the core to the sessions' queues; closes the
    /// sessions whose queue overflowed (which produces more outputs).
    fn dispatch(&mut self, now: Timestamp) {
        loop {
            while let Some(output) = self.hub.poll_output() {
                match output {
                    Output::Deliver(delivery) => {
                        let frame = Arc::new(
                            OutFrame::new(delivery.frame, delivery.kind)
                                .superseding(delivery.latest),
                        );
                        for key in delivery.to.iter() {
                            if let Some(outbox) = self.outboxes.get(key) {
                                match outbox.push(&frame) {
                                    Pushed::Queued => {}
                                    Pushed::Superseded => self.superseded += 1,
                                    Pushed::Overflowed => self.overflowed.push(key),
                                }
                            }
                        }
                    }
                    Output::Close { session, reason } => {
                        if let Some(outbox) = self.outboxes.remove(session) {
                            outbox.close(reason);
                        }
                    }
                    Output::Broker(request) => {
                        if let Some(queue) = &self.membership {
                            self.work.extend(cluster::prepare(queue, request));
                        }
                    }
                    Output::Refresh(refresh) => self.refreshes.push(refresh),
                    _ => {}
                }
            }
            if self.overflowed.is_empty() {
                return;
            }
            for key in std::mem::take(&mut self.overflowed) {
                self.hub.close(now, key, CloseReason::SlowConsumer);
            }
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs one input through the core and dispatches its outputs; broker
    /// work it produced runs in a task of its own.
    pub(crate) fn run<R>(self: &Arc<Self>, input: impl FnOnce(&mut Inner, Timestamp) -> R) -> R {
        let (result, work) = self.run_collect(input);
        if !work.is_empty() {
            if let Some(broker) = self.broker.clone() {
                let shared = Arc::clone(self);
                tokio::spawn(async move { cluster::execute(&shared, &broker, work).await });
            }
        }
        result
    }

    /// Runs one input through the core, dispatches its outputs, wakes the
    /// timer task if the next deadline moved earlier, and returns the broker
    /// work produced, for the caller to perform in order.
    pub(crate) fn run_collect<R>(
        &self,
        input: impl FnOnce(&mut Inner, Timestamp) -> R,
    ) -> (R, Vec<Work>) {
        let mut inner = self.lock();
        let now = self.clock.now();
        let result = input(&mut inner, now);
        inner.dispatch(now);
        let next = inner.hub.poll_timeout();
        let wake = match (next, inner.timer_armed) {
            (Some(next), Some(armed)) => next < armed,
            (Some(_), None) => true,
            (None, _) => false,
        };
        let work = std::mem::take(&mut inner.work);
        drop(inner);
        if wake {
            self.timer_wake.notify_one();
        }
        (result, work)
    }

    /// Applies a client frame and performs the broker work it produced
    /// before returning, so the session's next frame comes after it. A
    /// publish is the exception: it is handed to the publish pipeline, and
    /// the next frame is read while it is at the broker (see `cluster`);
    /// a frame other than a publish waits for the session's publishes first.
    async fn handle_frame(
        self: &Arc<Self>,
        key: SessionKey,
        sid: &Sid,
        frame: &[u8],
        publishes: &SessionPublishes,
    ) {
        self.wire.add_in(frame.len());
        if self.broker.is_some() && publishes.pending() {
            if cluster::is_publish(frame) {
                publishes.wait_below(cluster::SESSION_PUBLISHES - 1).await;
            } else {
                publishes.settle().await;
            }
        }
        let (result, work) = self.run_collect(|inner, now| inner.hub.handle_frame(now, key, frame));
        if let Err(e) = result {
            tracing::debug!(?sid, error = %e, "client frame refused");
        }
        if let (false, Some(broker)) = (work.is_empty(), &self.broker) {
            let mut rest = Vec::new();
            for work in work {
                match &self.publishes {
                    Some(pipeline) if rest.is_empty() && work.is_publish() => {
                        publishes.push(pipeline.submit(work.into_request()));
                    }
                    _ => rest.push(work),
                }
            }
            if !rest.is_empty() {
                publishes.settle().await;
                // Boxed: the broker's futures are large, and every connection
                // task would otherwise carry their space even in one-node mode.
                Box::pin(cluster::execute(self, broker, rest)).await;
            }
        }
        self.complete_refreshes().await;
    }

    /// The node's publish pipeline (broker mode).
    pub(crate) fn publishes(&self) -> Option<&Publishes> {
        self.publishes.as_ref()
    }

    /// Checks the tokens of pending `refresh` frames with the authenticator
    /// that admitted the sessions and reports the outcome to the core (which
    /// keeps the session's user and answers `ack` or `forbidden`). Awaited by
    /// the frame's session, so its next frame sees the new identity.
    async fn complete_refreshes(self: &Arc<Self>) {
        let pending = std::mem::take(&mut self.lock().refreshes);
        for refresh in pending {
            let result = self
                .authenticator
                .authenticate_token(refresh.token())
                .await
                .map_err(|refusal| FrameError::new(refusal.code, refusal.message));
            self.run(|inner, now| inner.hub.complete_refresh(now, refresh, result));
        }
    }
}

/// Sleeps until the core's next deadline; holds the Switchboard weakly so
/// dropping every handle ends it.
async fn run_timers(shared: Weak<Shared>, timer_wake: Arc<Notify>, cancel: CancellationToken) {
    loop {
        let Some(strong) = shared.upgrade() else {
            return;
        };
        let deadline = {
            let mut inner = strong.lock();
            inner.timer_armed = inner.hub.poll_timeout();
            inner.timer_armed
        };
        let at = deadline.map(|d| strong.clock.to_instant(d));
        drop(strong);
        let wake = timer_wake.notified();
        let sleep = async {
            match at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = sleep => {
                let Some(strong) = shared.upgrade() else { return };
                strong.run(|inner, now| inner.hub.handle_timeout(now));
            }
            () = wake => {}
            () = cancel.cancelled() => return,
        }
    }
}

impl Switchboard {
    /// A builder with the protocol's defaults.
    #[must_use]
    pub fn builder() -> Builder {
        Builder {
            core: Config::default(),
            runtime: RuntimeConfig::default(),
            policy: Arc::new(OpenPolicy),
            authenticator: Arc::new(TrustClientName),
            origins: Arc::new(AllowOrigins::same_origin()),
            broker: None,
        }
    }

    /// The runtime settings (transports read their timeouts here).
    #[must_use]
    pub fn runtime_config(&self) -> &RuntimeConfig {
        &self.shared.runtime
    }

    /// The core's limits.
    #[must_use]
    pub fn config(&self) -> Config {
        self.shared.lock().hub.config().clone()
    }

    /// Publishes `data` (anything that serializes to JSON) to `room` as the
    /// server: members receive a `message` with `from: {"server": true}`.
    ///
    /// # Errors
    /// An invalid room name, data over `max_frame_bytes`, or shutdown.
    pub async fn publish<T: Serialize + ?Sized>(
        &self,
        room: &str,
        event: Option<&str>,
        data: &T,
    ) -> Result<Published, Error> {
        let data = serde_json::value::to_raw_value(data).map_err(|e| Error::new(Kind::Data(e)))?;
        self.publish_raw(room, event, &data).await
    }

    /// [`Switchboard::publish`] with data that is already JSON text.
    ///
    /// # Errors
    /// As [`Switchboard::publish`].
    pub async fn publish_raw(
        &self,
        room: &str,
        event: Option<&str>,
        data: &RawValue,
    ) -> Result<Published, Error> {
        self.publish_raw_once(room, event, data, None).await
    }

    /// [`Switchboard::publish_raw`], at most once per `idempotency_key`
    /// within a minute, on every node: a publish sent again with the key of
    /// one that took effect (a retry after a timeout or an `unavailable`)
    /// returns that one's `seq` and `epoch`, and publishes nothing. With
    /// `None`, as [`Switchboard::publish_raw`].
    ///
    /// # Errors
    /// As [`Switchboard::publish`].
    pub async fn publish_raw_once(
        &self,
        room: &str,
        event: Option<&str>,
        data: &RawValue,
        idempotency_key: Option<&str>,
    ) -> Result<Published, Error> {
        let room = RoomName::new(room).map_err(|e| Error::new(Kind::InvalidRoom(e)))?;
        if !self.shared.accepting.load(Ordering::Acquire) {
            return Err(Error::new(Kind::ShuttingDown));
        }
        let Some(broker) = &self.shared.broker else {
            return self
                .shared
                .run(|inner, now| {
                    inner
                        .hub
                        .publish_keyed(now, &room, event, data, idempotency_key)
                })
                .map_err(|e| Error::new(Kind::Publish(e)));
        };
        let now = self.shared.clock.now();
        let prepared = self
            .shared
            .lock()
            .hub
            .prepare_publish(now, &room, event, data, idempotency_key)
            .map_err(|e| Error::new(Kind::Publish(e)))?;
        let epoch = cluster::new_epoch();
        let key = prepared
            .idempotency_key
            .clone()
            .unwrap_or_else(cluster::new_epoch);
        let (seq, epoch) = broker
            .publish(PublishRequest {
                room: &prepared.room,
                body: &prepared.body,
                exclude: None,
                history: prepared.history,
                history_ttl: prepared.history_ttl,
                new_epoch: &epoch,
                key: &key,
            })
            .await
            .map_err(|e| Error::new(Kind::Unavailable(e.0)))?;
        // Every node delivers it when the broker fans it out; how many
        // sessions that reaches is not known here.
        Ok(Published {
            seq,
            epoch,
            delivered: 0,
        })
    }

    /// Sends a `direct` frame from the server to every session (tab) of `user`;
    /// returns how many sessions it reached.
    ///
    /// # Errors
    /// No session of that user, data too large, or shutdown.
    pub async fn send_to_user<T: Serialize + ?Sized>(
        &self,
        user: &str,
        event: Option<&str>,
        data: &T,
    ) -> Result<usize, Error> {
        self.direct(&Target::User(user.into()), event, data).await
    }

    /// Sends a `direct` frame from the server to the session `sid`.
    ///
    /// # Errors
    /// No such session, data too large, or shutdown.
    pub async fn send_to_session<T: Serialize + ?Sized>(
        &self,
        sid: &str,
        event: Option<&str>,
        data: &T,
    ) -> Result<usize, Error> {
        self.direct(&Target::Sid(sid.into()), event, data).await
    }

    /// With a broker the count is of nodes that had a recipient, not of sessions.
    async fn direct<T: Serialize + ?Sized>(
        &self,
        to: &Target<'_>,
        event: Option<&str>,
        data: &T,
    ) -> Result<usize, Error> {
        let data = serde_json::value::to_raw_value(data).map_err(|e| Error::new(Kind::Data(e)))?;
        if !self.shared.accepting.load(Ordering::Acquire) {
            return Err(Error::new(Kind::ShuttingDown));
        }
        let Some(broker) = &self.shared.broker else {
            return self
                .shared
                .run(|inner, _| inner.hub.send_direct(to, event, &data))
                .map_err(|e| Error::new(Kind::Direct(e)));
        };
        let frame = self
            .shared
            .lock()
            .hub
            .prepare_direct(event, &data)
            .map_err(|e| Error::new(Kind::Direct(e)))?;
        let recipient = match to {
            Target::User(user) => Recipient::User(UserId::from(&**user)),
            Target::Sid(sid) => Recipient::Sid(Sid::from(&**sid)),
        };
        match broker.direct(&recipient, &frame).await {
            Ok(0) => Err(Error::new(Kind::Direct(
                switchboard_core::DirectError::UnknownTarget,
            ))),
            Ok(nodes) => Ok(nodes),
            Err(e) => Err(Error::new(Kind::Unavailable(e.0))),
        }
    }

    /// Closes every session of `user` (1008, `disconnected`); returns how many.
    pub fn disconnect_user(&self, user: &str) -> usize {
        self.shared
            .run(|inner, now| inner.hub.disconnect_user(now, user))
    }

    /// A room's latest seq, epoch and present users as this node sees them,
    /// if the room exists here (with a broker: if this node has members in it).
    #[must_use]
    pub fn room(&self, room: &str) -> Option<RoomInfo> {
        self.shared.lock().hub.room(room)
    }

    /// The users present in a room (across the cluster, with a broker).
    ///
    /// # Errors
    /// An invalid room name, or the broker is unreachable.
    pub async fn presence(&self, room: &str) -> Result<Vec<String>, Error> {
        let room = RoomName::new(room).map_err(|e| Error::new(Kind::InvalidRoom(e)))?;
        match &self.shared.broker {
            Some(broker) => broker
                .presence_list(&room)
                .await
                .map_err(|e| Error::new(Kind::Unavailable(e.0))),
            None => Ok(self
                .room(room.as_str())
                .map(|info| info.users.iter().map(|u| u.as_str().to_owned()).collect())
                .unwrap_or_default()),
        }
    }

    /// The room's retained `message` frames, oldest first, at most `limit`
    /// (from the broker's history, with a broker).
    ///
    /// # Errors
    /// An invalid room name, or the broker is unreachable.
    pub async fn latest(&self, room: &str, limit: usize) -> Result<Vec<serde_json::Value>, Error> {
        let room = RoomName::new(room).map_err(|e| Error::new(Kind::InvalidRoom(e)))?;
        let frames: Vec<bytes::Bytes> = match &self.shared.broker {
            Some(broker) => broker
                .history(&room, limit)
                .await
                .map_err(|e| Error::new(Kind::Unavailable(e.0)))?,
            None => self
                .shared
                .lock()
                .hub
                .history(room.as_str(), limit)
                .cloned()
                .collect(),
        };
        Ok(frames
            .iter()
            .filter_map(|frame| serde_json::from_slice(frame).ok())
            .collect())
    }

    /// A snapshot of the counters.
    #[must_use]
    pub fn metrics(&self) -> Metrics {
        let inner = self.shared.lock();
        Metrics::new(
            inner.hub.session_count(),
            inner.hub.room_count(),
            inner.hub.stats(),
            &self.shared.wire,
        )
        .with_superseded(inner.superseded)
    }

    /// Stops accepting sessions, sends `close` 1001 to every session, lets
    /// the writers flush, and returns when they are done or
    /// `shutdown_timeout` passed.
    pub async fn shutdown(&self) {
        self.shared.accepting.store(false, Ordering::Release);
        self.shared.cancel.cancel();
        self.shared
            .run(|inner, now| inner.hub.close_all(now, CloseReason::GoingAway));
        self.shared.tasks.close();
        let _ = tokio::time::timeout(
            self.shared.runtime.shutdown_timeout,
            self.shared.tasks.wait(),
        )
        .await;
    }

    /// Cancelled when shutdown starts: accept loops stop on it.
    #[must_use]
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shared.cancel.clone()
    }

    /// The tracker transports spawn connection tasks on, so shutdown can wait
    /// for them to flush.
    #[must_use]
    pub fn tasks(&self) -> &TaskTracker {
        &self.shared.tasks
    }

    // ---- the transport seam --------------------------------------------

    /// Checks a connecting request: its origin, then its credentials.
    ///
    /// # Errors
    /// The [`Refusal`] to send (1008 `forbidden`), or `server_full` (1013)
    /// while shutting down.
    pub async fn admit(&self, request: &http::request::Parts) -> Result<Identity, Refusal> {
        if !self.shared.accepting.load(Ordering::Acquire) {
            return Err(shutting_down());
        }
        self.identify(request).await
    }

    /// Checks a request that continues a session the transport already
    /// holds (a long-poll, a `send`): its origin, then its credentials, as
    /// [`Switchboard::admit`] does, but also while shutting down, so that a
    /// session can still fetch the frames queued for it (its `close`) during
    /// the shutdown grace period. The transport then checks that the session
    /// belongs to the returned identity.
    ///
    /// # Errors
    /// The [`Refusal`] to send (`forbidden`).
    pub async fn identify(&self, request: &http::request::Parts) -> Result<Identity, Refusal> {
        if !self.shared.origins.allows(request).await {
            return Err(Refusal::forbidden("origin not allowed"));
        }
        self.shared.authenticator.authenticate(request).await
    }

    /// Opens a session for an admitted identity; its `welcome` is already
    /// queued in the returned session's outbox.
    ///
    /// # Errors
    /// `server_full` (close 1013) at `max_sessions` or while shutting down.
    pub fn open(&self, identity: Identity, liveness: Liveness) -> Result<Session, Refusal> {
        if !self.shared.accepting.load(Ordering::Acquire) {
            return Err(shutting_down());
        }
        let sid = new_sid().map_err(|()| Refusal {
            code: ErrorCode::ServerFull,
            message: "no randomness for a session id".into(),
        })?;
        let outbox = Arc::new(Outbox::new(self.shared.runtime.max_outbound_bytes));
        let key = self.shared.run(|inner, now| {
            let key = inner
                .hub
                .connect(now, sid.clone(), identity.clone(), liveness)?;
            inner.outboxes.insert(key, Arc::clone(&outbox));
            Ok(key)
        });
        let key = key.map_err(|e: switchboard_core::ConnectError| Refusal {
            code: e.code(),
            message: "server full".into(),
        })?;
        Ok(Session {
            key,
            sid,
            identity,
            outbox,
            shared: Arc::clone(&self.shared),
            publishes: SessionPublishes::default(),
        })
    }
}

fn shutting_down() -> Refusal {
    Refusal {
        code: ErrorCode::ServerFull,
        message: "server is shutting down".into(),
    }
}

/// One client session, as a transport holds it. Frames go in with
/// [`Session::handle_frame`]; frames come out of [`Session::outbox`].
/// Dropping it tells the core the transport is gone (presence leave, memory
/// freed).
pub struct Session {
    key: SessionKey,
    sid: Sid,
    identity: Identity,
    outbox: Arc<Outbox>,
    shared: Arc<Shared>,
    /// Its publishes still at the broker.
    publishes: SessionPublishes,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("sid", &self.sid)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// The session id sent in `welcome`.
    #[must_use]
    pub fn sid(&self) -> &Sid {
        &self.sid
    }

    /// Who opened it.
    #[must_use]
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The core's handle.
    #[must_use]
    pub fn key(&self) -> SessionKey {
        self.key
    }

    /// The frames waiting for this session's transport.
    #[must_use]
    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// The core's `max_frame_bytes`.
    pub(crate) fn max_frame_bytes(&self) -> usize {
        self.shared.lock().hub.config().max_frame_bytes
    }

    /// How long one write may take (from [`RuntimeConfig`]).
    #[must_use]
    pub fn write_timeout(&self) -> Duration {
        self.shared.runtime.write_timeout
    }

    /// Applies one client frame. Errors are answered to the client through
    /// the outbox; nothing to do here.
    ///
    /// With a broker, returns once the broker has acted on the frame, so
    /// the session's next frame is applied after it; but for a `publish`,
    /// which returns once handed to the broker (its `ack` or `error` comes
    /// later, in order with the session's other answers: see
    /// [`Session::settle`]).
    pub async fn handle_frame(&self, frame: &[u8]) {
        self.shared
            .handle_frame(self.key, &self.sid, frame, &self.publishes)
            .await;
    }

    /// Returns once every frame handled so far was answered (with a
    /// broker, a `publish` is answered after [`Session::handle_frame`]
    /// returns).
    pub async fn settle(&self) {
        self.publishes.settle().await;
    }

    /// Counts bytes the transport wrote, for metrics.
    pub fn count_written(&self, bytes: usize) {
        self.shared.wire.add_out(bytes);
    }

    /// A transport attached (a long-poll request arrived).
    pub fn attach(&self) {
        let key = self.key;
        self.shared.run(|inner, now| inner.hub.attach(now, key));
    }

    /// The transport detached; the session lives for `session_idle`.
    pub fn detach(&self) {
        let key = self.key;
        self.shared.run(|inner, now| inner.hub.detach(now, key));
    }

    /// Ends the session from the server side with `reason` (its `close` frame
    /// is queued; the writer then closes the transport).
    pub fn close(&self, reason: CloseReason) {
        let key = self.key;
        self.shared
            .run(|inner, now| inner.hub.close(now, key, reason));
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let key = self.key;
        self.shared.run(|inner, now| {
            inner.outboxes.remove(key);
            inner.hub.handle_close(now, key)
        });
    }
}

fn random_bytes<const N: usize>() -> Result<[u8; N], ()> {
    let mut buf = [0u8; N];
    getrandom::fill(&mut buf).map_err(|_| ())?;
    Ok(buf)
}

/// 128 random bits from the OS, URL-safe base64 (22 characters).
fn new_sid() -> Result<Sid, ()> {
    let bytes = random_bytes::<16>()?;
    Ok(Sid::from(
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes),
    ))
}
