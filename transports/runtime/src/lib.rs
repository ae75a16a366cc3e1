//! Switchboard on tokio: the [`Switchboard`] handle applications hold, and the
//! narrow seam transports plug into.
//!
//! The runtime owns the only clock and the only randomness (session ids,
//! room epochs), and drives the pure core (`switchboard-core`). It never waits
//! on a socket: each session has a bounded [`Outbox`]; the core's outputs are
//! pushed into outboxes and each connection's writer drains its own, writing
//! everything queued at once. A session whose outbox overflows is closed as
//! `slow_consumer`; the rest of its rooms never wait for it.
//!
//! One session's frames are applied strictly in arrival order (its transport
//! calls [`Session::handle_frame`] from one task), and every room's messages
//! reach every member in `seq` order: the core applies inputs one at a time
//! and pushes each message into all member queues before the next input.
//!
//! ```text
//!   transport ── admit(request) ─▶ Identity ── open() ─▶ Session
//!   reader    ── session.handle_frame(bytes) ─▶ core ─▶ outboxes
//!   writer    ◀─ session.outbox().recv(&mut batch) ── one write per batch
//!   drop(session) ─▶ core frees it (presence leave)
//! ```
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use switchboard_runtime::Switchboard;
//!
//! let switchboard = Switchboard::builder().build()?;
//! switchboard
//!     .publish("job_42", Some("job_progress"), &serde_json::json!({"progress": 30}))
//!     .await?;
//! println!("{}", switchboard.metrics().to_prometheus());
//! switchboard.shutdown().await;
//! # Ok(()) }
//! ```

mod auth;
pub mod broker;
mod clock;
mod cluster;
mod error;
pub mod http_api;
#[cfg(feature = "jwt")]
mod jwt;
mod metrics;
mod outbox;
mod switchboard;

pub use auth::{
    query_param, token, AllowOrigins, Authenticator, OriginCheck, Refusal, TrustClientName,
    DEFAULT_COOKIE,
};
pub use error::Error;
#[cfg(feature = "jwt")]
pub use jwt::JwtAuthenticator;
pub use metrics::Metrics;
pub use outbox::{Drained, OutFrame, Outbox};
pub use switchboard::{BuildError, Builder, RuntimeConfig, Session, Switchboard};

pub use async_trait::async_trait;
pub use switchboard_core as core;
