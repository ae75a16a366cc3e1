//! The Switchboard load generator: real WebSocket clients against a running
//! server, measuring what a user would feel.
//!
//! ```text
//! loadgen fanout --url ws://127.0.0.1:8787/ws --subscribers 1000 --messages 2000 --bytes 100 --window 50 --server-pid PID
//! loadgen fanout ... --rate 20            # fixed rate instead of a window: latency runs
//! loadgen fanout --url ws://127.0.0.1:8787/ws --url ws://127.0.0.1:8788/ws ...  # several nodes
//! loadgen idle --url ws://127.0.0.1:8787/ws --connections 19000 --server-pid PID
//! ```
//!
//! Fan-out: S subscribers join one room, one publisher sends M messages of B
//! bytes (`echo: false`), each carrying its send time; receivers record the
//! latency in an HDR histogram and check that every `seq` arrives once and in
//! order. The publisher keeps at most W messages ahead of the slowest
//! complete delivery (`--window`), or sends at a fixed rate (`--rate`).
//! Reports deliveries per second, p50/p99/max latency, loss, reordering and,
//! given the server's pid (or every node's), the server's CPU time per
//! delivery (from /proc/PID/stat), and given Redis's pid, its CPU time per
//! published message. With several `--url`s (nodes of one cluster), subscribers
//! are spread over them round-robin and the publisher uses the first.
//!
//! Idle: N connections held open, spread over source addresses 127.0.0.1 to
//! 127.0.0.K so the ephemeral port range of one address is never the limit;
//! reports the server's resident memory per connection (/proc/PID/status).
//!
//! The server must allow the publisher's rate: run it with a high
//! `--rate-per-sec` and `--rate-burst`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::Deserialize;
use switchboard_benches::clients::{Subscriber, Transport};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{client_async_with_config, MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;
use switchboard_benches::clients::BoxError;

#[derive(Debug, Parser)]
#[command(name = "loadgen", about = "Switchboard load generator")]
struct Args {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// S subscribers in one room, one publisher.
    Fanout(FanoutArgs),
    /// N idle connections; the server's memory per connection.
    Idle(IdleArgs),
}

#[derive(Debug, Parser)]
struct FanoutArgs {
    /// WebSocket URL of the server; repeat it for the nodes of a cluster
    /// (subscribers round-robin over them, the publisher on the first).
    #[arg(
        long = "url",
        value_name = "URL",
        default_value = "ws://127.0.0.1:8787/ws"
    )]
    urls: Vec<String>,
    /// Subscribers in the room.
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// Messages the publisher sends.
    #[arg(long, default_value_t = 1000)]
    messages: u64,
    /// Payload bytes per message (padding inside `data`).
    #[arg(long, default_value_t = 100)]
    bytes: usize,
    /// Most messages the publisher may be ahead of complete delivery.
    #[arg(long, default_value_t = 50)]
    window: u64,
    /// Send at this many messages per second instead of by window.
    #[arg(long)]
    rate: Option<f64>,
    /// A server's pid, to report its CPU time per delivery; repeat it for
    /// the nodes of a cluster (each is reported, and their sum).
    #[arg(long = "server-pid", value_name = "PID")]
    server_pids: Vec<u32>,
    /// The broker's (Redis's) pid, to report its CPU time per published
    /// message.
    #[arg(long)]
    redis_pid: Option<u32>,
    /// Source addresses 127.0.0.1..=127.0.0.K to spread clients over.
    #[arg(long, default_value_t = 8)]
    source_addrs: u8,
    /// Room name.
    #[arg(long, default_value = "bench")]
    room: String,
    /// The subscribers' transport: ws, sse or longpoll (the publisher uses
    /// WebSocket).
    #[arg(long, default_value = "ws")]
    transport: Transport,
}

#[derive(Debug, Parser)]
struct IdleArgs {
    /// WebSocket URL of the server.
    #[arg(long, default_value = "ws://127.0.0.1:8787/ws")]
    url: String,
    /// Connections to hold open.
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// The server's pid, to report its memory per connection.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Source addresses 127.0.0.1..=127.0.0.K to spread clients over.
    #[arg(long, default_value_t = 8)]
    source_addrs: u8,
    /// Also join this room with every connection.
    #[arg(long)]
    room: Option<String>,
    /// Seconds to hold the connections after they are all open.
    #[arg(long, default_value_t = 2)]
    hold_secs: u64,
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    match Args::parse().scenario {
        Scenario::Fanout(args) => fanout(args).await,
        Scenario::Idle(args) => idle(args).await,
    }
}

/// A client-side config as lean as the server's: many connections, small frames.
fn client_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
}

/// The server's socket address in a `ws://host:port/...` URL.
async fn server_addr(url: &str) -> Result<SocketAddr, BoxError> {
    let uri: http::Uri = url.parse()?;
    let host = uri.host().ok_or("url has no host")?;
    let port = uri.port_u16().unwrap_or(80);
    let addr = tokio::net::lookup_host((host, port))
        .await?
        .next()
        .ok_or("cannot resolve host")?;
    Ok(addr)
}

async fn connect(url: &str, source: IpAddr, user: &str) -> Result<Ws, BoxError> {
    let uri: http::Uri = url.parse()?;
    let host = uri.host().ok_or("url has no host")?;
    let port = uri.port_u16().unwrap_or(80);
    let target: SocketAddr = tokio::net::lookup_host((host, port))
        .await?
        .next()
        .ok_or("cannot resolve host")?;
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    let stream = socket.connect(target).await?;
    stream.set_nodelay(true)?;
    let request = format!(
        "{url}{}token={user}",
        if url.contains('?') { '&' } else { '?' }
    );
    let (ws, _) = client_async_with_config(
        request,
        MaybeTlsStream::Plain(stream),
        Some(client_config()),
    )
    .await?;
    Ok(ws)
}

fn source_addr(i: usize, spread: u8) -> IpAddr {
    let last = 1 + (i % usize::from(spread.max(1))) as u8;
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(default)]
    seq: u64,
    #[serde(default)]
    data: Option<Payload>,
    #[serde(default)]
    code: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Payload {
    /// Send time, microseconds since the run's start.
    t: u64,
}

#[derive(Default)]
struct Tally {
    received: AtomicU64,
    reordered: AtomicU64,
    duplicates: AtomicU64,
}

async fn wait_for(ws: &mut Ws, kind: &str) -> Result<(), BoxError> {
    while let Some(message) = ws.next().await {
        if let Message::Text(text) = message? {
            let frame: Frame<'_> = serde_json::from_str(&text)?;
            if frame.kind == kind {
                return Ok(());
            }
            if frame.kind == "error" || frame.kind == "close" {
                return Err(format!("server said {text}").into());
            }
        }
    }
    Err("connection closed".into())
}

async fn fanout(args: FanoutArgs) -> Result<(), BoxError> {
    let start = Instant::now();
    let join = format!(r#"{{"type":"join","room":"{}"}}"#, args.room);
    println!(
        "connecting {} subscribers to {}",
        args.subscribers,
        args.urls.join(", ")
    );
    let mut subscribers = Vec::with_capacity(args.subscribers);
    // Connect in small concurrent batches: fast, without flooding the accept queue.
    for chunk in (0..args.subscribers).collect::<Vec<_>>().chunks(200) {
        let mut pending = Vec::new();
        for &i in chunk {
            let url = args.urls[i % args.urls.len()].clone();
            let source = source_addr(i, args.source_addrs);
            let (transport, room) = (args.transport, args.room.clone());
            pending.push(tokio::spawn(async move {
                let target = server_addr(&url).await?;
                Subscriber::connect(transport, target, source, &format!("sub{i}"), &room).await
            }));
        }
        for task in pending {
            subscribers.push(task.await??);
        }
    }
    println!(
        "all {} subscribers joined in {:.1?}",
        subscribers.len(),
        start.elapsed()
    );

    let tally = Arc::new(Tally::default());
    let histogram = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
        1, 60_000_000, 3,
    )?));
    let expected = args.messages;
    let run_start = Instant::now();
    let mut receivers = Vec::new();
    for mut subscriber in subscribers {
        let tally = Arc::clone(&tally);
        let histogram = Arc::clone(&histogram);
        receivers.push(tokio::spawn(async move {
            let mut local =
                Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
            let mut last_seq = 0u64;
            let mut skipped = std::collections::HashSet::new();
            let mut got = 0u64;
            while got < expected {
                let Some(text) = subscriber.next_frame().await else {
                    break;
                };
                let Ok(frame) = serde_json::from_str::<Frame<'_>>(&text) else {
                    continue;
                };
                match frame.kind {
                    "message" => {
                        // Seqs skipped so far: one arriving later is reordered,
                        // any other seq at or below the last is a duplicate.
                        if frame.seq <= last_seq {
                            if skipped.remove(&frame.seq) {
                                tally.reordered.fetch_add(1, Ordering::Relaxed);
                            } else {
                                tally.duplicates.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                        } else {
                            if last_seq != 0 {
                                skipped.extend(last_seq + 1..frame.seq);
                            }
                            last_seq = frame.seq;
                        }
                        if let Some(payload) = frame.data {
                            let now = run_start.elapsed().as_micros() as u64;
                            let _ = local.record(now.saturating_sub(payload.t).max(1));
                        }
                        got += 1;
                        tally.received.fetch_add(1, Ordering::Relaxed);
                    }
                    "close" => break,
                    _ => {}
                }
            }
            if let Ok(mut shared) = histogram.lock() {
                let _ = shared.add(&local);
            }
            subscriber
        }));
    }

    let mut publisher = connect(&args.urls[0], source_addr(0, 1), "publisher").await?;
    wait_for(&mut publisher, "welcome").await?;
    publisher.send(Message::text(join.clone())).await?;
    wait_for(&mut publisher, "joined").await?;
    let (mut sink, mut stream) = publisher.split();
    let errors = Arc::new(AtomicU64::new(0));
    let publisher_errors = Arc::clone(&errors);
    let drain = tokio::spawn(async move {
        while let Some(Ok(message)) = stream.next().await {
            if let Message::Text(text) = message {
                if let Ok(frame) = serde_json::from_str::<Frame<'_>>(&text) {
                    if frame.kind == "error" {
                        publisher_errors.fetch_add(1, Ordering::Relaxed);
                        eprintln!("publisher error: {:?}", frame.code);
                    }
                }
            }
        }
    });

    let cpu_before: Vec<Option<f64>> = args
        .server_pids
        .iter()
        .map(|pid| process_cpu_seconds(*pid))
        .collect();
    let redis_before = args.redis_pid.and_then(process_cpu_seconds);
    let pad = "x".repeat(args.bytes.saturating_sub(40));
    let subscribers = args.subscribers as u64;
    let send_start = Instant::now();
    for i in 0..args.messages {
        match args.rate {
            Some(rate) => {
                let due = send_start + Duration::from_secs_f64(i as f64 / rate);
                tokio::time::sleep_until(due.into()).await;
            }
            None => {
                // Stay at most `window` messages ahead of complete delivery.
                while tally.received.load(Ordering::Relaxed) + args.window * subscribers
                    < (i + 1) * subscribers
                {
                    tokio::time::sleep(Duration::from_micros(200)).await;
                }
            }
        }
        let t = run_start.elapsed().as_micros() as u64;
        let frame = format!(
            r#"{{"type":"publish","room":"{}","echo":false,"data":{{"t":{t},"i":{i},"pad":"{pad}"}}}}"#,
            args.room
        );
        sink.send(Message::text(frame)).await?;
    }
    let sent_at = Instant::now();
    let deadline = sent_at + Duration::from_secs(30);
    let total = subscribers * args.messages;
    while tally.received.load(Ordering::Relaxed) < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = send_start.elapsed();
    let cpu_after: Vec<Option<f64>> = args
        .server_pids
        .iter()
        .map(|pid| process_cpu_seconds(*pid))
        .collect();
    let redis_after = args.redis_pid.and_then(process_cpu_seconds);
    let received = tally.received.load(Ordering::Relaxed);
    for receiver in receivers {
        receiver.abort();
    }
    drain.abort();

    let histogram = histogram.lock().map_err(|_| "histogram lock poisoned")?;
    println!(
        "fan-out: {} subscribers, {} messages of {} bytes, {}",
        args.subscribers,
        args.messages,
        args.bytes,
        match args.rate {
            Some(r) => format!("rate {r}/s"),
            None => format!("window {}", args.window),
        }
    );
    println!("delivered        {received} of {total} ({:.1?})", elapsed);
    println!(
        "deliveries/s     {:.0}",
        received as f64 / elapsed.as_secs_f64()
    );
    println!(
        "latency p50      {:.2} ms",
        histogram.value_at_quantile(0.50) as f64 / 1000.0
    );
    println!(
        "latency p99      {:.2} ms",
        histogram.value_at_quantile(0.99) as f64 / 1000.0
    );
    println!("latency max      {:.2} ms", histogram.max() as f64 / 1000.0);
    println!("lost             {}", total - received.min(total));
    println!(
        "reordered        {}",
        tally.reordered.load(Ordering::Relaxed)
    );
    println!(
        "duplicates       {}",
        tally.duplicates.load(Ordering::Relaxed)
    );
    println!("publisher errors {}", errors.load(Ordering::Relaxed));
    // CPU from /proc (USER_HZ ticks: 10 ms resolution, so short runs are coarse).
    let cpus: Vec<f64> = cpu_before
        .iter()
        .zip(&cpu_after)
        .filter_map(|(before, after)| Some((*after)? - (*before)?))
        .collect();
    if cpus.len() > 1 {
        for (pid, cpu) in args.server_pids.iter().zip(&cpus) {
            println!("server {pid} cpu {cpu:.2} s");
        }
    }
    if !cpus.is_empty() {
        let cpu: f64 = cpus.iter().sum();
        // With several nodes: the sum of their CPU over every delivery.
        println!("server cpu       {cpu:.2} s");
        if received > 0 {
            println!("server cpu/delivery {:.3} us", cpu * 1e6 / received as f64);
        }
    }
    if let (Some(before), Some(after)) = (redis_before, redis_after) {
        let cpu = after - before;
        println!("redis cpu        {cpu:.2} s");
        if args.messages > 0 {
            println!(
                "redis cpu/publish {:.1} us",
                cpu * 1e6 / args.messages as f64
            );
        }
    }
    Ok(())
}

async fn idle(args: IdleArgs) -> Result<(), BoxError> {
    let rss_before = args.server_pid.and_then(process_rss_bytes);
    let start = Instant::now();
    let mut connections = Vec::with_capacity(args.connections);
    let join = args
        .room
        .as_ref()
        .map(|room| format!(r#"{{"type":"join","room":"{room}"}}"#));
    for chunk in (0..args.connections).collect::<Vec<_>>().chunks(250) {
        let mut pending = Vec::new();
        for &i in chunk {
            let url = args.url.clone();
            let join = join.clone();
            let source = source_addr(i, args.source_addrs);
            pending.push(tokio::spawn(async move {
                let mut ws = connect(&url, source, &format!("idle{i}")).await?;
                wait_for(&mut ws, "welcome").await?;
                if let Some(join) = join {
                    ws.send(Message::text(join)).await?;
                    wait_for(&mut ws, "joined").await?;
                }
                Ok::<_, BoxError>(ws)
            }));
        }
        for task in pending {
            match task.await? {
                Ok(ws) => connections.push(ws),
                Err(e) => eprintln!("connection failed: {e}"),
            }
        }
    }
    println!(
        "{} connections open in {:.1?}",
        connections.len(),
        start.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(args.hold_secs)).await;
    let rss_after = args.server_pid.and_then(process_rss_bytes);
    if let (Some(before), Some(after)) = (rss_before, rss_after) {
        let per = (after.saturating_sub(before)) as f64 / connections.len().max(1) as f64;
        println!(
            "server rss before {:.1} MiB, after {:.1} MiB",
            before as f64 / 1048576.0,
            after as f64 / 1048576.0
        );
        println!(
            "server memory per idle connection {:.0} bytes ({:.2} KiB)",
            per,
            per / 1024.0
        );
    }
    drop(connections);
    Ok(())
}

/// utime + stime of a process, in seconds.
fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let ticks = clock_ticks_per_second();
    Some((utime + stime) / ticks)
}

fn clock_ticks_per_second() -> f64 {
    // USER_HZ is 100 on every Linux this runs on; `getconf CLK_TCK` confirms it.
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// Resident set size of a process, in bytes.
fn process_rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
