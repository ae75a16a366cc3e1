//! Runnable Switchboard apps.
//!
//! - [`chat`]: the classic chat room, several rooms, presence, private
//!   messages (`cargo run -p switchboard-examples --bin chat`).

pub mod chat;
