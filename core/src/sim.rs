//! A deterministic harness with simulated time, for our tests and yours.
//!
//! [`Sim`] owns a [`Hub`], a simulated clock and one inbox per session. Every
//! call applies an input and then drains the hub's outputs into the inboxes,
//! so a test reads what each session received, in order, and no test ever
//! sleeps: [`Sim::advance`] jumps the clock from deadline to deadline. An
//! inbox behaves as a runtime's outbound queue: a latest-value message
//! replaces an unread one of the same room and event, so a session that
//! takes rarely is a slow subscriber.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use switchboard_core::{sim::Sim, Config, OpenPolicy};
//!
//! let mut sim = Sim::new(Config::default(), Arc::new(OpenPolicy));
//! let alice = sim.connect("alice");
//! let bob = sim.connect("bob");
//! sim.send(alice, r#"{"type":"join","room":"lobby"}"#).unwrap();
//! sim.send(bob, r#"{"type":"join","room":"lobby"}"#).unwrap();
//! sim.send(bob, r#"{"type":"publish","room":"lobby","data":"hi"}"#).unwrap();
//! let got = sim.take(alice);
//! assert_eq!(got.last().unwrap()["data"], "hi");
//!
//! sim.advance(Duration::from_secs(25)); // heartbeat interval of silence
//! assert_eq!(sim.take(alice).last().unwrap()["type"], "ping");
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::{
    CloseReason, Config, ConnectError, FrameError, FrameKind, HandleError, Hub, Identity,
    LatestKey, Liveness, Output, Policy, Refresh, SessionKey, Sid, Timestamp,
};

/// The time a [`Sim`] starts at: 2025-01-01T00:00:00Z, so `ts` values look real.
pub const SIM_EPOCH: Timestamp = Timestamp::from_millis(1_735_689_600_000);

/// A frame as a session received it.
#[derive(Debug, Clone)]
pub struct Received {
    /// The encoded frame, as the hub produced it.
    pub frame: Bytes,
    /// Its kind.
    pub kind: FrameKind,
    /// The key it supersedes unread frames with (see [`Delivery::latest`](crate::Delivery::latest)).
    pub latest: Option<LatestKey>,
}

impl Received {
    /// The frame parsed as JSON.
    ///
    /// # Panics
    /// Never for frames of the hub, which always encodes valid JSON.
    #[must_use]
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.frame).expect("the hub encodes valid JSON")
    }
}

/// A hub, a simulated clock and an inbox per session.
#[derive(Debug)]
pub struct Sim {
    hub: Hub,
    now: Timestamp,
    // Not `SecondaryMap`: a new session may reuse a closed one's slot, and a
    // `SecondaryMap` would then drop the closed session's unread frames and
    // close reason. Keyed by the full (versioned) key, every session keeps its own.
    inboxes: BTreeMap<SessionKey, Vec<Received>>,
    closed: BTreeMap<SessionKey, CloseReason>,
    refreshes: Vec<Refresh>,
    sids_drawn: u64,
}

impl Sim {
    /// A simulation starting at [`SIM_EPOCH`] with seed 0.
    ///
    /// # Panics
    /// When `config` is invalid.
    #[must_use]
    pub fn new(config: Config, policy: Arc<dyn Policy>) -> Self {
        Self::with_seed(config, policy, 0)
    }

    /// A simulation with the hub's randomness seeded by `seed`.
    ///
    /// # Panics
    /// When `config` is invalid.
    #[must_use]
    pub fn with_seed(config: Config, policy: Arc<dyn Policy>, seed: u64) -> Self {
        Self {
            hub: Hub::new(config, policy, seed).expect("valid config"),
            now: SIM_EPOCH,
            inboxes: BTreeMap::new(),
            closed: BTreeMap::new(),
            refreshes: Vec::new(),
            sids_drawn: 0,
        }
    }

    /// The hub, to read.
    #[must_use]
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// The hub, to call directly; call [`Sim::pump`] afterwards.
    pub fn hub_mut(&mut self) -> &mut Hub {
        &mut self.hub
    }

    /// The simulated time.
    #[must_use]
    pub fn now(&self) -> Timestamp {
        self.now
    }

    /// Connects a session for `user` with sid `s{n}`.
    ///
    /// # Panics
    /// When the hub refuses it (use [`Sim::try_connect`] to test refusals).
    pub fn connect(&mut self, user: &str) -> SessionKey {
        self.try_connect(Identity::new(user), Liveness::Client)
            .expect("the hub accepts the session")
    }

    /// Connects a session, or reports why the hub refused it.
    ///
    /// # Errors
    /// The hub's [`ConnectError`].
    pub fn try_connect(
        &mut self,
        identity: Identity,
        liveness: Liveness,
    ) -> Result<SessionKey, ConnectError> {
        self.sids_drawn += 1;
        let sid = Sid::from(format!("s{}", self.sids_drawn));
        let key = self.hub.connect(self.now, sid, identity, liveness)?;
        self.inboxes.insert(key, Vec::new());
        self.pump();
        Ok(key)
    }

    /// Sends one client frame from `session` and delivers the results.
    ///
    /// # Errors
    /// The hub's [`HandleError`] when the frame was refused.
    pub fn send(&mut self, session: SessionKey, frame: &str) -> Result<(), HandleError> {
        let result = self.hub.handle_frame(self.now, session, frame.as_bytes());
        self.pump();
        result
    }

    /// Sends raw bytes (not necessarily UTF-8 or JSON).
    ///
    /// # Errors
    /// The hub's [`HandleError`] when the frame was refused.
    pub fn send_bytes(&mut self, session: SessionKey, frame: &[u8]) -> Result<(), HandleError> {
        let result = self.hub.handle_frame(self.now, session, frame);
        self.pump();
        result
    }

    /// The transport of `session` went away.
    pub fn disconnect(&mut self, session: SessionKey) {
        self.hub.handle_close(self.now, session);
        self.pump();
    }

    /// Moves the clock forward by `by`, firing every deadline on the way at its
    /// own time.
    pub fn advance(&mut self, by: Duration) {
        let end = self.now + by;
        while let Some(deadline) = self.hub.poll_timeout() {
            if deadline > end {
                break;
            }
            self.now = self.now.max(deadline);
            self.hub.handle_timeout(self.now);
            self.pump();
        }
        self.now = end;
    }

    /// Drains the hub's outputs into the inboxes.
    pub fn pump(&mut self) {
        while let Some(output) = self.hub.poll_output() {
            match output {
                Output::Deliver(delivery) => {
                    for key in delivery.to.iter() {
                        if let Some(inbox) = self.inboxes.get_mut(&key) {
                            if let Some(latest) = &delivery.latest {
                                // As a runtime's outbound queue does: an unread
                                // value is obsolete once a newer one is queued.
                                inbox.retain(|r| r.latest.as_ref() != Some(latest));
                            }
                            inbox.push(Received {
                                frame: delivery.frame.clone(),
                                kind: delivery.kind.clone(),
                                latest: delivery.latest.clone(),
                            });
                        }
                    }
                }
                Output::Close { session, reason } => {
                    self.closed.insert(session, reason);
                }
                Output::Refresh(refresh) => self.refreshes.push(refresh),
                // Broker mode is driven by the runtime, not by this harness.
                Output::Broker(_) => {}
            }
        }
    }

    /// Takes the `refresh` credentials waiting for an authenticator, oldest
    /// first; the test plays the authenticator with [`Sim::complete_refresh`].
    pub fn take_refreshes(&mut self) -> Vec<Refresh> {
        std::mem::take(&mut self.refreshes)
    }

    /// Reports what the authenticator made of a `refresh` and delivers the results.
    pub fn complete_refresh(&mut self, refresh: Refresh, result: Result<Identity, FrameError>) {
        self.hub.complete_refresh(self.now, refresh, result);
        self.pump();
    }

    /// Takes what `session` received so far, as JSON.
    pub fn take(&mut self, session: SessionKey) -> Vec<serde_json::Value> {
        self.take_raw(session).iter().map(Received::json).collect()
    }

    /// Takes what `session` received so far, as encoded frames.
    pub fn take_raw(&mut self, session: SessionKey) -> Vec<Received> {
        self.inboxes
            .get_mut(&session)
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Why the hub closed `session`, if it did.
    #[must_use]
    pub fn close_reason(&self, session: SessionKey) -> Option<CloseReason> {
        self.closed.get(&session).copied()
    }
}
