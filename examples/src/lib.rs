//! Runnable Switchboard apps.
//!
//! - [`chat`]: the classic chat room, several rooms, presence, private
//!   messages (`cargo run -p switchboard-examples --bin chat`).
//! - [`jobs`]: background jobs with live progress bars, JWT sign-in, a
//!   per-owner room policy and a REST status endpoint
//!   (`cargo run -p switchboard-examples --bin jobs`).

pub mod chat;
#[cfg(feature = "jobs")]
pub mod jobs;
