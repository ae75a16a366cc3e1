//! The `switchboard` binary itself: its flags, and its shutdown.
//!
//! Each test runs the built binary (`CARGO_BIN_EXE_switchboard`); processes
//! are killed on drop, so a failing test leaves nothing running. Every wait is
//! bounded by [`WAIT`]; nothing asserts on timing.

use std::future::Future;
use std::net::{Ipv4Addr, TcpListener};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use switchboard_testkit::{http, Poller, SseClient, WsClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The longest any one wait may take.
const WAIT: Duration = Duration::from_secs(30);

const BIN: &str = env!("CARGO_BIN_EXE_switchboard");

async fn within<F: Future>(what: &str, future: F) -> F::Output {
    match tokio::time::timeout(WAIT, future).await {
        Ok(output) => output,
        Err(_) => panic!("timed out after {WAIT:?}: {what}"),
    }
}

#[test]
fn help_lists_the_poll_shutdown_and_push_only_flags_with_defaults() {
    let output = Command::new(BIN)
        .arg("--help")
        .output()
        .expect("run switchboard --help");
    assert!(output.status.success(), "{output:?}");
    let help = String::from_utf8(output.stdout).expect("help is UTF-8");
    // Each flag with its doc text and its default, as clap prints them.
    let expected: [(&str, &str, Option<&str>); 3] = [
        (
            "--poll-timeout-ms",
            "long-poll waits for frames",
            Some("[default: 25000]"),
        ),
        ("--shutdown-timeout-ms", "shutdown", Some("[default: 5000]")),
        ("--sse-push-only", "server push only", None),
    ];
    // One entry per option: its line and the indented lines after it, with
    // whitespace collapsed (clap may wrap the text).
    let mut entries: Vec<String> = Vec::new();
    for line in help.lines() {
        let line = line.trim();
        match entries.last_mut() {
            Some(entry) if !line.starts_with('-') => {
                entry.push(' ');
                entry.push_str(line);
            }
            _ => entries.push(line.to_owned()),
        }
    }
    let entries: Vec<String> = entries
        .iter()
        .map(|e| e.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    for (flag, doc, default) in expected {
        let entry = entries
            .iter()
            .find(|entry| entry.starts_with(flag) || entry.contains(&format!(", {flag}")))
            .unwrap_or_else(|| panic!("{flag} is missing from --help:\n{help}"));
        assert!(entry.contains(doc), "{flag} lacks its doc text: {entry}");
        if let Some(default) = default {
            assert!(entry.contains(default), "{flag} lacks {default}: {entry}");
        }
    }
}

/// A `switchboard` child; killed on drop.
struct Node {
    child: Child,
    port: u16,
}

impl Node {
    fn start(args: &[&str]) -> Self {
        Self::start_with_auth(&["--auth", "trust"], args)
    }

    /// Started with `auth` (`--auth …` and its flags) instead of `--auth trust`.
    fn start_with_auth(auth: &[&str], args: &[&str]) -> Self {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .expect("bind 127.0.0.1:0")
            .port();
        let child = Command::new(BIN)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(auth)
            .args(["--api-key", "k"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start switchboard");
        Self { child, port }
    }

    /// Waits until the server answers `GET /`.
    async fn ready(&mut self) {
        let port = self.port;
        within("the server to answer", async {
            loop {
                if let Some(status) = self.child.try_wait().expect("poll the child") {
                    panic!("switchboard exited early: {status}");
                }
                if let Ok(mut tcp) = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await {
                    let request = "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
                    let mut answer = String::new();
                    if tcp.write_all(request.as_bytes()).await.is_ok()
                        && tcp.read_to_string(&mut answer).await.is_ok()
                        && answer.contains("switchboard")
                    {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    }

    /// Sends SIGINT, as Ctrl-C does.
    fn interrupt(&self) {
        let status = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    async fn exited(&mut self) -> ExitStatus {
        within("the server to exit", async {
            loop {
                if let Some(status) = self.child.try_wait().expect("poll the child") {
                    return status;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn shutdown_ends_within_its_timeout_despite_a_stalled_client() {
    // The shutdown timeout is far below WAIT: exiting within WAIT shows the
    // stalled request did not hold the process.
    let mut node = Node::start(&["--shutdown-timeout-ms", "300"]);
    node.ready().await;

    // A client that announces a body and never sends it: the request stays
    // in flight, and a graceful shutdown with no bound waits for it forever.
    let mut stalled = TcpStream::connect((Ipv4Addr::LOCALHOST, node.port))
        .await
        .expect("connect");
    stalled
        .write_all(
            b"POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n\
              Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"room\":",
        )
        .await
        .expect("send the head");
    // An SSE stream too, which shutdown closes with 1001.
    let mut sse = TcpStream::connect((Ipv4Addr::LOCALHOST, node.port))
        .await
        .expect("connect");
    sse.write_all(b"GET /sse?token=alice HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("send the SSE request");
    let mut seen = Vec::new();
    within("the SSE welcome", async {
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains("event: welcome") {
            let n = sse.read(&mut buf).await.expect("read the stream");
            assert!(n > 0, "the stream ended before its welcome");
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await;

    node.interrupt();
    within("the SSE close", async {
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains("\"reason\":\"going_away\"") {
            let n = sse.read(&mut buf).await.expect("read the stream");
            assert!(n > 0, "the stream ended without its close");
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    let status = node.exited().await;
    assert!(status.success(), "exit status {status}");
    drop(stalled);
}

/// Reads until the server ends the connection (EOF or reset); fails the test
/// if it does not within [`WAIT`].
async fn cut_by_server(stream: &mut TcpStream, what: &str) {
    within(what, async {
        let mut buf = [0u8; 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
}

#[tokio::test]
async fn slow_or_silent_request_heads_are_cut_after_the_header_read_timeout() {
    let mut node = Node::start(&["--header-read-timeout-ms", "400"]);
    node.ready().await;
    let addr = (Ipv4Addr::LOCALHOST, node.port);

    let mut silent = TcpStream::connect(addr).await.expect("connect");
    // Slowloris: a byte of the head every 100 ms, never its end.
    let mut slow = TcpStream::connect(addr).await.expect("connect");
    let dribble = tokio::spawn(async move {
        for byte in b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
            if slow.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        slow
    });
    cut_by_server(&mut silent, "the silent connection to be cut").await;
    let mut slow = within("the dribbling client to finish", dribble)
        .await
        .expect("the dribbling task");
    cut_by_server(&mut slow, "the slow head to be cut").await;

    // A prompt client is served as usual.
    node.ready().await;
}

/// Open file descriptors of a process, from `/proc`.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read /proc/<pid>/fd")
        .count()
}

#[tokio::test]
async fn ten_thousand_idle_connections_neither_pile_up_nor_lock_out_a_real_client() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

    const IDLE: usize = 10_000;
    const MAX_PENDING: usize = 100;
    // The default header-read timeout (10 s) is far longer than this test's
    // flood: what bounds the idle sockets here is the pending bound alone.
    let mut node = Node::start(&["--max-pending-connections", &MAX_PENDING.to_string()]);
    node.ready().await;
    let addr = (Ipv4Addr::LOCALHOST, node.port);
    let baseline = open_fds(node.child.id());

    let mut idle = Vec::with_capacity(IDLE);
    within("the idle connections to open", async {
        for _ in 0..IDLE {
            idle.push(
                TcpStream::connect(addr)
                    .await
                    .expect("connect an idle socket"),
            );
        }
    })
    .await;

    // A real client still gets in and is served while the flood sits there.
    let url = format!("ws://127.0.0.1:{}/ws?token=bob", node.port);
    let (mut ws, _) = within(
        "the WebSocket handshake",
        tokio_tungstenite::connect_async(url),
    )
    .await
    .expect("a real client connects");
    let next_of = async |ws: &mut Ws, kind: &str| loop {
        match within("a frame", ws.next()).await {
            Some(Ok(Message::Text(text))) => {
                let frame: serde_json::Value = serde_json::from_str(&text).expect("JSON");
                if frame["type"] == kind {
                    return frame;
                }
            }
            Some(Ok(_)) => {}
            other => panic!("the session ended: {other:?}"),
        }
    };
    next_of(&mut ws, "welcome").await;
    ws.send(Message::text(r#"{"type":"join","room":"lobby","id":1}"#))
        .await
        .expect("send join");
    let joined = next_of(&mut ws, "joined").await;
    assert_eq!(joined["room"], "lobby");

    // The server holds at most MAX_PENDING of the idle sockets (plus the
    // real client's and a margin for whatever it accepted but has not yet
    // dropped): the rest were closed, oldest first.
    let held = open_fds(node.child.id()).saturating_sub(baseline);
    assert!(
        held <= MAX_PENDING + 16,
        "the server holds {held} more descriptors than before the flood"
    );
    drop(idle);
}

/// A WebSocket client over plain TCP.
type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

/// Sends one JSON frame.
async fn ws_send(ws: &mut Ws, frame: &serde_json::Value) {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    within("a send", ws.send(Message::text(frame.to_string())))
        .await
        .expect("send a frame");
}

/// The next JSON frame; fails the test if the connection ends first.
async fn ws_recv(ws: &mut Ws, who: &str) -> serde_json::Value {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    within(&format!("a frame for {who}"), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) => {
                    let frame: serde_json::Value = serde_json::from_str(&text).expect("JSON");
                    assert_ne!(frame["type"], "close", "{who} was closed: {frame}");
                    return frame;
                }
                Some(Ok(Message::Close(close))) => panic!("{who} was closed: {close:?}"),
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("{who}'s connection failed: {e}"),
                None => panic!("{who}'s connection ended"),
            }
        }
    })
    .await
}

/// A WebSocket session for `user` (`--auth trust`), its `welcome` read. With
/// `recv_buffer`, the socket's receive buffer is that small, so the kernel
/// holds little for a client that stops reading.
async fn ws_connect(port: u16, user: &str, recv_buffer: Option<u32>) -> Ws {
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    if let Some(size) = recv_buffer {
        socket.set_recv_buffer_size(size).expect("SO_RCVBUF");
    }
    let tcp = within(
        "connect",
        socket.connect((Ipv4Addr::LOCALHOST, port).into()),
    )
    .await
    .expect("connect");
    let url = format!("ws://127.0.0.1:{port}/ws?token={user}");
    let (mut ws, _) = within("the handshake", tokio_tungstenite::client_async(url, tcp))
        .await
        .expect("the WebSocket handshake");
    assert_eq!(ws_recv(&mut ws, user).await["type"], "welcome");
    ws
}

/// `GET /metrics`: the value of one counter.
async fn metric(port: u16, name: &str) -> u64 {
    let text = within("GET /metrics", async {
        let mut tcp = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
            .await
            .expect("connect");
        let request = "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        tcp.write_all(request.as_bytes()).await.expect("send");
        let mut answer = String::new();
        tcp.read_to_string(&mut answer).await.expect("read");
        answer
    })
    .await;
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_subscriber_that_stops_reading_a_latest_value_room_converges_and_gets_every_outcome() {
    use std::collections::BTreeMap;

    use serde_json::{json, Value};

    const JOBS: usize = 4;
    // A small outbound bound: without coalescing, a dozen unread progress
    // messages close the subscriber as `slow_consumer`.
    let mut node = Node::start(&[
        "--latest-prefix",
        "job_",
        "--max-outbound-bytes",
        "16384",
        "--rate-per-sec",
        "1000000",
        "--rate-burst",
        "1000000",
        // The stalled reader's writer sits in a blocked write until the test
        // reads again; the write timeout must not end the connection first.
        "--write-timeout-ms",
        "600000",
        // Nor may the heartbeat: the blocked writer reads nothing from it.
        "--heartbeat-interval-ms",
        "600000",
    ]);
    node.ready().await;
    let rooms: Vec<String> = (0..JOBS).map(|j| format!("job_{j}")).collect();

    let mut slow = ws_connect(node.port, "slow", Some(4096)).await;
    let mut publisher = ws_connect(node.port, "worker", None).await;
    for ws in [&mut slow, &mut publisher] {
        for room in &rooms {
            ws_send(
                ws,
                &json!({"type": "join", "room": room, "presence": false}),
            )
            .await;
            let joined = ws_recv(ws, "a joiner").await;
            assert_eq!(joined["type"], "joined", "{joined}");
            assert_eq!(joined["latest"], true, "{joined}");
        }
    }

    // The newest value the worker published per (room, event), and every
    // outcome it published.
    let mut latest: BTreeMap<(String, String), Value> = BTreeMap::new();
    let mut outcomes: Vec<(String, String)> = Vec::new();
    let pad = "x".repeat(1000);
    let mut publish =
        async |publisher: &mut Ws, room: &str, event: &str, data: Value, id: Option<u64>| {
            let mut frame = json!({"type": "publish", "room": room, "event": event,
                               "data": data, "echo": false});
            if let Some(id) = id {
                frame["id"] = json!(id);
            }
            ws_send(publisher, &frame).await;
            let key = (room.to_owned(), event.to_owned());
            if event.starts_with("job_") {
                outcomes.push(key.clone());
            }
            latest.insert(key, data);
            if let Some(id) = id {
                let ack = ws_recv(publisher, "the worker").await;
                assert_eq!(ack, json!({"type": "ack", "id": id}));
            }
        };

    // From here `slow` is not read until its queue has been coalescing for a
    // while: progress keeps coming, and a job fails once along the way.
    let mut round = 0u64;
    loop {
        round += 1;
        assert!(round < 5_000, "the slow subscriber's queue never coalesced");
        for room in &rooms {
            let data = json!({"pct": round % 100, "round": round, "pad": pad});
            publish(&mut publisher, room, "progress", data, None).await;
        }
        if round % 25 == 0 {
            publish(
                &mut publisher,
                &rooms[0],
                "stage",
                json!(format!("stage {round}")),
                None,
            )
            .await;
        }
        if round == 10 {
            publish(
                &mut publisher,
                &rooms[1],
                "job_error",
                json!("retrying"),
                None,
            )
            .await;
        }
        // Every round ends with an acknowledged publish: the server has
        // queued the round before the metrics are read.
        publish(&mut publisher, &rooms[2], "eta", json!(round), Some(round)).await;
        if round % 20 != 0 {
            continue;
        }
        assert_eq!(
            metric(node.port, "switchboard_slow_consumer_closes_total").await,
            0,
            "the subscriber that stopped reading was closed as a slow consumer"
        );
        if metric(node.port, "switchboard_superseded_total").await >= 2_000 {
            break;
        }
    }
    eprintln!("{round} rounds published while the subscriber did not read");
    for room in &rooms {
        publish(&mut publisher, room, "progress", json!({"pct": 100}), None).await;
        publish(
            &mut publisher,
            room,
            "job_completed",
            json!({"out": room}),
            None,
        )
        .await;
    }
    publish(&mut publisher, &rooms[3], "eta", json!("done"), Some(0)).await;

    // `slow` reads again: everything queued arrives, in seq order per room,
    // ending with the newest value of every event and every outcome.
    let mut seen: BTreeMap<(String, String), Value> = BTreeMap::new();
    let mut seen_outcomes: Vec<(String, String)> = Vec::new();
    let mut last_seq: BTreeMap<String, u64> = BTreeMap::new();
    let mut completed = 0;
    while completed < JOBS {
        let frame = ws_recv(&mut slow, "the slow subscriber").await;
        assert_eq!(frame["type"], "message", "{frame}");
        let room = frame["room"].as_str().expect("room").to_owned();
        let event = frame["event"].as_str().expect("event").to_owned();
        let seq = frame["seq"].as_u64().expect("seq");
        let previous = last_seq.insert(room.clone(), seq).unwrap_or(0);
        assert!(seq > previous, "{room}: seq {seq} after {previous}");
        if event.starts_with("job_") {
            seen_outcomes.push((room.clone(), event.clone()));
        }
        completed += usize::from(event == "job_completed");
        seen.insert((room, event), frame["data"].clone());
    }
    // Nothing else is due: the next frame is the answer to a ping.
    ws_send(&mut slow, &json!({"type": "ping"})).await;
    loop {
        let frame = ws_recv(&mut slow, "the slow subscriber").await;
        if frame["type"] == "pong" {
            break;
        }
        let key = (
            frame["room"].as_str().unwrap_or("").to_owned(),
            frame["event"].as_str().unwrap_or("").to_owned(),
        );
        seen.insert(key, frame["data"].clone());
    }
    assert_eq!(
        seen, latest,
        "the subscriber converged on the newest values"
    );
    let mut expected_outcomes = outcomes.clone();
    expected_outcomes.sort();
    seen_outcomes.sort();
    assert_eq!(seen_outcomes, expected_outcomes, "every outcome, once");

    // A late joiner gets each event's newest value at once, before `joined`.
    let mut late = ws_connect(node.port, "late", None).await;
    ws_send(
        &mut late,
        &json!({"type": "join", "room": rooms[1], "presence": false}),
    )
    .await;
    let mut state = BTreeMap::new();
    loop {
        let frame = ws_recv(&mut late, "the late joiner").await;
        if frame["type"] == "joined" {
            break;
        }
        let event = frame["event"].as_str().expect("event").to_owned();
        assert!(
            state.insert(event, frame["data"].clone()).is_none(),
            "one per event"
        );
    }
    let expected: BTreeMap<String, Value> = latest
        .iter()
        .filter(|((room, _), _)| *room == rooms[1])
        .map(|((_, event), data)| (event.clone(), data.clone()))
        .collect();
    assert_eq!(state, expected);
    assert_eq!(
        metric(node.port, "switchboard_slow_consumer_closes_total").await,
        0
    );
}

const JWT_SECRET: &str = "token-expiry-test-secret";

/// HS256 tokens for `user`, all issued at the same second (so they expire
/// together), valid for each of `ttls` seconds.
fn jwts(user: &str, ttls: &[u64]) -> Vec<String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is past 1970")
        .as_secs();
    let issuer = switchboard_runtime::JwtAuthenticator::hs256(JWT_SECRET.as_bytes());
    ttls.iter()
        .map(|ttl| {
            issuer
                .issue(user, now, *ttl, serde_json::Value::Null)
                .expect("sign")
        })
        .collect()
}

async fn jwt_node() -> Node {
    let mut node = Node::start_with_auth(&["--auth", "jwt", "--jwt-secret", JWT_SECRET], &[]);
    node.ready().await;
    node
}

fn refresh(token: &str, id: u32) -> String {
    serde_json::json!({"type": "refresh", "token": token, "id": id}).to_string()
}

fn assert_token_expired(close: &serde_json::Value) {
    assert_eq!(close["code"], 1008, "{close}");
    assert_eq!(close["reason"], "token_expired", "{close}");
}

#[tokio::test]
async fn over_websocket_a_jwt_session_closes_at_exp_unless_its_own_user_refreshed_it() {
    let node = jwt_node().await;
    // Three sessions whose tokens expire in 3 s, at the same second.
    let old = jwts("alice", &[3, 3, 3]);
    let fresh = &jwts("alice", &[60])[0];
    let bobs = &jwts("bob", &[60])[0];
    let url = |token: &str| format!("ws://127.0.0.1:{}/ws?token={token}", node.port);
    let mut idle = WsClient::connect(&url(&old[0])).await;
    let mut refreshed = WsClient::connect(&url(&old[1])).await;
    let mut stolen = WsClient::connect(&url(&old[2])).await;

    refreshed
        .send(&serde_json::from_str(&refresh(fresh, 1)).unwrap())
        .await;
    let ack = refreshed.next_of("ack").await;
    assert_eq!(ack["id"], 1, "{ack}");
    assert!(ack["expires_in_ms"].as_u64().unwrap() > 3_000, "{ack}");

    stolen
        .send(&serde_json::from_str(&refresh(bobs, 1)).unwrap())
        .await;
    let error = stolen.next_of("error").await;
    assert_eq!(error["code"], "forbidden", "{error}");
    assert_eq!(error["id"], 1, "{error}");

    // At exp: the unrefreshed session and the one refused are closed...
    assert_token_expired(&idle.next_of("close").await);
    assert_token_expired(&stolen.next_of("close").await);
    // ...and the refreshed one, whose first token expired with theirs, lives.
    refreshed
        .send(&serde_json::json!({"type": "join", "room": "after", "id": 2}))
        .await;
    assert_eq!(refreshed.next_of("joined").await["room"], "after");
}

#[tokio::test]
async fn over_sse_and_long_poll_refresh_frames_keep_a_jwt_session_past_exp() {
    let node = jwt_node().await;
    let addr = std::net::SocketAddr::from((Ipv4Addr::LOCALHOST, node.port));
    let old = jwts("alice", &[3, 3, 3, 3]);
    let fresh = &jwts("alice", &[60])[0];
    let bobs = &jwts("bob", &[60])[0];
    let post = |path: String, body: String| async move {
        let reply = http(addr, "POST", &path, &[], body.as_bytes()).await;
        assert_eq!(reply.status, 202, "POST {path}: {:?}", reply.json());
    };

    // SSE: one stream refreshed through `/sse/send`, one left to expire.
    let mut sse_idle = SseClient::open(addr, &format!("/sse?rooms=r&token={}", old[0]), &[]).await;
    let mut sse = SseClient::open(addr, &format!("/sse?rooms=r&token={}", old[1]), &[]).await;
    sse_idle.next_of("welcome").await;
    let sse_sid = sse.next_of("welcome").await.data["sid"]
        .as_str()
        .expect("a sid")
        .to_owned();
    post(
        format!("/sse/send?sid={sse_sid}&token={}", old[1]),
        refresh(fresh, 1),
    )
    .await;
    assert_eq!(sse.next_of("ack").await.data["id"], 1);

    // Long-poll: one refreshed, one refused another user's token.
    let mut polls = Vec::new();
    for token in &old[2..] {
        let open = http(addr, "POST", &format!("/poll/open?token={token}"), &[], b"").await;
        assert_eq!(open.status, 200, "POST /poll/open");
        let sid = open.json()[0]["sid"].as_str().expect("a sid").to_owned();
        polls.push((
            sid.clone(),
            Poller::new(addr, format!("/poll?sid={sid}&token={token}")),
        ));
    }
    let (poll_sid, poller) = &mut polls[0];
    post(
        format!("/poll/send?sid={poll_sid}&token={}", old[2]),
        refresh(fresh, 1),
    )
    .await;
    // Later polls carry the fresh token: the first one expires.
    poller.path = format!("/poll?sid={poll_sid}&token={fresh}");
    assert_eq!(poller.next_of("ack").await["id"], 1);
    let (stolen_sid, stolen) = &mut polls[1];
    post(
        format!("/poll/send?sid={stolen_sid}&token={}", old[3]),
        refresh(bobs, 1),
    )
    .await;
    let error = stolen.next_of("error").await;
    assert_eq!(error["code"], "forbidden", "{error}");
    // This poll waits (it was let in before exp) and gets the `close`.
    assert_token_expired(&stolen.next_of("close").await);
    assert_token_expired(&sse_idle.next_of("close").await.data);

    // The refreshed ones live on past exp.
    let join = serde_json::json!({"type": "join", "room": "after"}).to_string();
    post(
        format!("/sse/send?sid={sse_sid}&token={fresh}"),
        join.clone(),
    )
    .await;
    assert_eq!(sse.next_of("joined").await.data["room"], "after");
    let (poll_sid, poller) = &mut polls[0];
    post(format!("/poll/send?sid={poll_sid}&token={fresh}"), join).await;
    assert_eq!(poller.next_of("joined").await["room"], "after");
}
