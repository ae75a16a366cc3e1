//! Arbitrary bytes as client frames (split at newlines), sent by one session
//! of a room. Nothing may panic, and whatever the hub sends to anyone, the
//! sender or the other member, must still be one JSON object: one client's
//! bad frame never breaks another's parser.
#![no_main]

use std::sync::Arc;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use switchboard_core::{sim::Sim, Config, OpenPolicy};

fuzz_target!(|input: &[u8]| {
    let mut config = Config::default();
    config.max_frame_bytes = 4096;
    let mut sim = Sim::new(config, Arc::new(OpenPolicy));
    let sender = sim.connect("alice");
    let member = sim.connect("bob");
    sim.send(sender, r#"{"type":"join","room":"lobby"}"#)
        .expect("a valid join is accepted");
    sim.send(member, r#"{"type":"join","room":"lobby"}"#)
        .expect("a valid join is accepted");
    for frame in input.split(|&b| b == b'\n') {
        let _ = sim.send_bytes(sender, frame);
        sim.advance(Duration::from_millis(7));
        for session in [sender, member] {
            for received in sim.take_raw(session) {
                let value = received.json();
                assert!(value.is_object(), "every server frame is a JSON object");
            }
        }
    }
});
