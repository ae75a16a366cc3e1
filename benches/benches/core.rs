//! Benches of the sans-IO core, one criterion group per layer:
//!
//! - `codec/decode`: decode and validate one small client frame (frames/s).
//! - `core/apply`: `Hub::handle_frame` on one small frame, outputs drained
//!   (frames/s on one core).
//! - `core/join_leave`: a `join` then a `leave` of a room (2 frames each).
//! - `core/broadcast`: one publish to a room of 10,000 members, per member
//!   (`fan_out`: the way a runtime drains it, one `Bytes` clone per member;
//!   `recipients_only`: walking the recipients without cloning; `core_only`:
//!   publish and `poll_output` without touching recipients).
//!
//! Before the timed groups it prints allocation counts of single operations,
//! measured with a counting global allocator, one line each, such as
//! `allocations per publish to 10000 members: 3`.
//!
//! ```sh
//! cargo bench -p switchboard-benches --bench core
//! cargo bench -p switchboard-benches --bench core -- core/broadcast   # one group
//! ```
//!
//! Defaults are short (1 s warm-up, 3 s measurement) because the bench
//! machines are small and shared; pass `--measurement-time` for tighter
//! intervals.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, Throughput};
use switchboard_core::codec::decode_client;
use switchboard_core::{
    Config, FrameKind, Hub, Identity, Liveness, OpenPolicy, Output, Policy, RawValue, RoomName,
    RoomOptions, SessionKey, Sid, Timestamp,
};

// ---- allocation counting ---------------------------------------------------

/// Number of allocation calls (`alloc`, `alloc_zeroed`, `realloc`) since start.
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

/// `System`, counting allocation calls. The relaxed increment costs a few
/// nanoseconds per allocation in the timed groups too, which is noise next to
/// the allocation itself.
struct CountingAlloc;

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

// SAFETY: every method forwards its arguments unchanged to `System`, which
// upholds `GlobalAlloc`'s contract; the counter never touches the memory.
#[allow(unsafe_code)] // The one unsafe item of the workspace; see benches/Cargo.toml.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller upholds `alloc`'s contract, which we pass on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` through this allocator with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as for `dealloc`, and the caller upholds `realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Allocation calls made while `f` runs (the bench is single-threaded then).
fn allocations_in(f: impl FnOnce()) -> u64 {
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    f();
    ALLOCATIONS.load(Ordering::Relaxed) - before
}

// ---- fixtures --------------------------------------------------------------

/// Fixed: nothing timed here depends on time passing.
const NOW: Timestamp = Timestamp::from_millis(1_735_689_600_000);

/// Members of the broadcast room.
const BIG_ROOM: usize = 10_000;

/// 100 bytes of `data`, a typical chat message or progress event.
const DATA: &str = r#"{"text":"the quick brown fox jumps over the lazy dog again and again","progress":30,"step":7,"of":9}"#;

const PING: &[u8] = br#"{"type":"ping"}"#;
const JOIN: &[u8] = br#"{"type":"join","room":"chat:lobby","id":1}"#;
const DIRECT: &[u8] = br#"{"type":"direct","to":{"user":"bob"},"data":{"text":"hello bob"}}"#;

/// `{"type":"publish","room":ROOM,"event":"chat","data":DATA}`.
fn publish_frame(room: &str) -> Vec<u8> {
    format!(r#"{{"type":"publish","room":"{room}","event":"chat","data":{DATA}}}"#).into_bytes()
}

/// The default config, with the rate limiter out of the way: these benches
/// send millions of frames from one session at one instant, and must measure
/// work, not `rate_limited` refusals (checked after every timed run).
fn config() -> Config {
    let mut config = Config::default();
    config.rate_per_sec = u32::MAX;
    // At a fixed `now` the bucket never refills: 4.29e9 frames per session.
    config.rate_burst = u32::MAX;
    config
}

/// Rooms without presence events, like a large broadcast room would be set up.
/// (With presence on, building a 10,000-member room announces every join to
/// every member: quadratic setup, and nothing a publish pays for.)
struct QuietRooms;

impl Policy for QuietRooms {
    fn room_options(&self, _room: &RoomName) -> RoomOptions {
        RoomOptions::default().presence(false)
    }
}

/// A hub with `members` sessions (user `u{i}`, sid `s{i}`) joined to `room`,
/// outputs drained.
fn hub_with_room(policy: Arc<dyn Policy>, room: &str, members: usize) -> (Hub, Vec<SessionKey>) {
    let mut hub = Hub::new(config(), policy, 7).expect("valid config");
    let join = format!(r#"{{"type":"join","room":"{room}"}}"#);
    let keys = (0..members)
        .map(|i| {
            let key = hub
                .connect(
                    NOW,
                    Sid::from(format!("s{i}")),
                    Identity::new(format!("u{i}").as_str()),
                    Liveness::Client,
                )
                .expect("room for the session");
            hub.handle_frame(NOW, key, join.as_bytes())
                .expect("join accepted");
            drain(&mut hub);
            key
        })
        .collect();
    (hub, keys)
}

/// Connects one more session, outputs drained.
fn connect(hub: &mut Hub, sid: &str, user: &str) -> SessionKey {
    let key = hub
        .connect(NOW, Sid::new(sid), Identity::new(user), Liveness::Client)
        .expect("room for the session");
    drain(hub);
    key
}

/// Drains and drops every output; returns how many recipients they had.
fn drain(hub: &mut Hub) -> usize {
    let mut recipients = 0;
    while let Some(output) = hub.poll_output() {
        if let Output::Deliver(d) = &output {
            recipients += d.to.len();
        }
        black_box(output);
    }
    recipients
}

/// Drains outputs as a runtime does: one `(recipient, frame)` per member into
/// `sink` (preallocated and reused, standing in for per-session queues).
fn fan_out(hub: &mut Hub, sink: &mut Vec<(SessionKey, Bytes)>) {
    while let Some(output) = hub.poll_output() {
        if let Output::Deliver(d) = output {
            sink.extend(d.to.iter().map(|to| (to, d.frame.clone())));
        }
    }
}

fn errors(hub: &Hub) -> u64 {
    hub.stats().errors.iter().sum()
}

fn data() -> Box<RawValue> {
    assert_eq!(DATA.len(), 100);
    RawValue::from_string(DATA.to_owned()).expect("DATA is JSON")
}

// ---- codec/decode ----------------------------------------------------------

fn codec_decode(c: &mut Criterion) {
    let publish = publish_frame("chat:lobby");
    let frames: [(&str, &[u8]); 4] = [
        ("publish_100B", &publish),
        ("join", JOIN),
        ("ping", PING),
        ("direct", DIRECT),
    ];
    let mut group = c.benchmark_group("codec/decode");
    group.throughput(Throughput::Elements(1));
    for (name, frame) in frames {
        assert!(decode_client(frame).is_ok(), "{name} must decode");
        group.bench_function(name, |b| b.iter(|| decode_client(black_box(frame)).is_ok()));
    }
    group.finish();
}

// ---- core/apply ------------------------------------------------------------

fn core_apply(c: &mut Criterion) {
    let (mut hub, keys) = hub_with_room(Arc::new(OpenPolicy), "chat:lobby", 4);
    let sender = keys[0];
    let publish = publish_frame("chat:lobby");

    // Setup check: both frames are accepted and do what the names say.
    hub.handle_frame(NOW, sender, &publish)
        .expect("publish accepted");
    assert_eq!(drain(&mut hub), 4, "publish reaches the 4 members");
    hub.handle_frame(NOW, sender, PING).expect("ping accepted");
    assert!(matches!(
        hub.poll_output(),
        Some(Output::Deliver(d)) if d.kind == FrameKind::Pong
    ));
    assert!(hub.poll_output().is_none());

    let mut group = c.benchmark_group("core/apply");
    group.throughput(Throughput::Elements(1));
    for (name, frame) in [("publish_room_of_4", &publish[..]), ("ping", PING)] {
        group.bench_function(name, |b| {
            let before = errors(&hub);
            b.iter(|| {
                let applied = hub.handle_frame(NOW, sender, black_box(frame));
                drain(&mut hub);
                applied
            });
            assert_eq!(errors(&hub), before, "{name}: every frame accepted");
        });
    }
    group.finish();
}

// ---- core/join_leave -------------------------------------------------------

fn core_join_leave(c: &mut Criterion) {
    let mut group = c.benchmark_group("core/join_leave");
    // One element per frame: a join and a leave per iteration.
    group.throughput(Throughput::Elements(2));

    // An empty room: created by the join, freed by the leave (no history yet).
    // A populated one: 100 members, presence announced to them both ways.
    for (name, others) in [("new_room", 0), ("room_of_100", 100)] {
        let (mut hub, _) = hub_with_room(Arc::new(OpenPolicy), "chat:room", others);
        let me = connect(&mut hub, "s-me", "me");
        let join = br#"{"type":"join","room":"chat:room"}"#;
        let leave = br#"{"type":"leave","room":"chat:room"}"#;
        hub.handle_frame(NOW, me, join).expect("join accepted");
        drain(&mut hub);
        assert!(hub.is_member(me, "chat:room"));
        hub.handle_frame(NOW, me, leave).expect("leave accepted");
        drain(&mut hub);
        assert!(!hub.is_member(me, "chat:room"));
        assert_eq!(hub.room_count(), usize::from(others > 0));

        group.bench_function(name, |b| {
            let before = errors(&hub);
            b.iter(|| {
                let joined = hub.handle_frame(NOW, me, black_box(join));
                drain(&mut hub);
                let left = hub.handle_frame(NOW, me, black_box(leave));
                drain(&mut hub);
                (joined, left)
            });
            assert_eq!(errors(&hub), before, "{name}: every frame accepted");
        });
    }
    group.finish();
}

// ---- core/broadcast --------------------------------------------------------

/// The broadcast room, its 10,000 members, and a checked first publish so the
/// room's member snapshot and history exist before timing.
struct Broadcast {
    hub: Hub,
    sender: SessionKey,
    room: RoomName,
    data: Box<RawValue>,
    frame: Vec<u8>,
    sink: Vec<(SessionKey, Bytes)>,
}

impl Broadcast {
    fn new() -> Self {
        let (hub, keys) = hub_with_room(Arc::new(QuietRooms), "live", BIG_ROOM);
        let mut this = Self {
            hub,
            sender: keys[0],
            room: RoomName::new("live").expect("valid room name"),
            data: data(),
            frame: publish_frame("live"),
            sink: Vec::with_capacity(BIG_ROOM),
        };
        let published = this
            .hub
            .publish(NOW, &this.room, Some("tick"), &this.data)
            .expect("publish accepted");
        assert_eq!(
            published.delivered, BIG_ROOM,
            "server publish reaches everyone"
        );
        fan_out(&mut this.hub, &mut this.sink);
        assert_eq!(this.sink.len(), BIG_ROOM);
        this.sink.clear();
        this.client_publish();
        fan_out(&mut this.hub, &mut this.sink);
        assert_eq!(this.sink.len(), BIG_ROOM, "client publish reaches everyone");
        this.sink.clear();
        this
    }

    fn server_publish(&mut self) {
        let published = self
            .hub
            .publish(NOW, &self.room, Some("tick"), &self.data)
            .expect("publish accepted");
        black_box(published);
    }

    fn client_publish(&mut self) {
        self.hub
            .handle_frame(NOW, self.sender, &self.frame)
            .expect("publish accepted");
    }
}

fn core_broadcast(c: &mut Criterion) {
    let mut bc = Broadcast::new();
    let mut group = c.benchmark_group("core/broadcast");
    // Reported per member: ns/element is ns per delivered member.
    group.throughput(Throughput::Elements(BIG_ROOM as u64));

    group.bench_function("server_publish/fan_out", |b| {
        b.iter(|| {
            bc.sink.clear();
            bc.server_publish();
            fan_out(&mut bc.hub, &mut bc.sink);
        });
    });
    group.bench_function("client_publish/fan_out", |b| {
        b.iter(|| {
            bc.sink.clear();
            bc.client_publish();
            fan_out(&mut bc.hub, &mut bc.sink);
        });
    });
    assert_eq!(bc.sink.len(), BIG_ROOM);
    bc.sink.clear();
    // The core's part of a fan-out: walking the shared member list, without
    // the per-member `Bytes` refcount traffic that `fan_out` adds.
    let mut keys: Vec<SessionKey> = Vec::with_capacity(BIG_ROOM);
    group.bench_function("server_publish/recipients_only", |b| {
        b.iter(|| {
            keys.clear();
            bc.server_publish();
            while let Some(output) = bc.hub.poll_output() {
                if let Output::Deliver(d) = output {
                    keys.extend(d.to.iter());
                }
            }
        });
    });
    assert_eq!(keys.len(), BIG_ROOM);
    group.bench_function("server_publish/core_only", |b| {
        b.iter(|| {
            bc.server_publish();
            drain(&mut bc.hub)
        });
    });
    group.bench_function("client_publish/core_only", |b| {
        b.iter(|| {
            bc.client_publish();
            drain(&mut bc.hub)
        });
    });
    group.finish();
}

// ---- allocations -----------------------------------------------------------

/// Prints allocation calls of single operations, each after a few warm-up
/// runs so buffers that grow once (history, output queue, member snapshot)
/// are already grown, as in a long-running server.
fn report_allocations() {
    let mut bc = Broadcast::new();
    let measure = |bc: &mut Broadcast, f: &dyn Fn(&mut Broadcast)| {
        for _ in 0..200 {
            f(bc);
        }
        allocations_in(|| f(bc))
    };
    let server = measure(&mut bc, &|bc| {
        bc.server_publish();
        drain(&mut bc.hub);
    });
    println!("allocations per publish to {BIG_ROOM} members: {server}");
    let client = measure(&mut bc, &|bc| {
        bc.client_publish();
        drain(&mut bc.hub);
    });
    println!("allocations per client publish to {BIG_ROOM} members: {client}");
    let fanned = measure(&mut bc, &|bc| {
        bc.sink.clear();
        bc.server_publish();
        fan_out(&mut bc.hub, &mut bc.sink);
    });
    println!(
        "allocations per publish to {BIG_ROOM} members, fanned out into a reused sink: {fanned}"
    );
    drop(bc);

    let (mut hub, keys) = hub_with_room(Arc::new(OpenPolicy), "chat:lobby", 4);
    let publish = publish_frame("chat:lobby");
    for (name, frame) in [("publish to 4 members", &publish[..]), ("ping", PING)] {
        let mut apply = || {
            hub.handle_frame(NOW, keys[0], frame)
                .expect("frame accepted");
            drain(&mut hub);
        };
        for _ in 0..200 {
            apply();
        }
        let n = allocations_in(apply);
        println!("allocations per client frame applied ({name}): {n}");
    }
    for (name, frame) in [("publish", &publish[..]), ("ping", PING)] {
        let n = allocations_in(|| {
            black_box(decode_client(frame).is_ok());
        });
        println!("allocations per client frame decoded ({name}): {n}");
    }
}

// ---- main ------------------------------------------------------------------

/// `criterion_group!` and `criterion_main!` written out, with the allocation
/// report first (outside any timing).
fn main() {
    report_allocations();
    // Short by default, as the bench machines are small and shared; the
    // command line overrides it.
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    codec_decode(&mut c);
    core_apply(&mut c);
    core_join_leave(&mut c);
    core_broadcast(&mut c);
    c.final_summary();
}
