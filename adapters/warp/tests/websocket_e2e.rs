//! End to end over 127.0.0.1: a warp server with `switchboard_warp::routes`,
//! real WebSocket clients (tokio-tungstenite) and raw HTTP requests, checking
//! PROTOCOL.md as a client sees it.
//!
//! Every test binds 127.0.0.1:0, bounds each of its waits, and stops its
//! server (a guard's `Drop` covers a test that fails half-way).

mod common;

use std::time::Duration;

use common::{
    handshake_small_buffer, http, read_event, within, Client, Event, TestServer, Ws, WAIT,
};
use futures_util::SinkExt;
use serde_json::{json, Value};
use switchboard_core::{Config, Identity, Policy, PublishRule, RoomName, Target};
use switchboard_runtime::{
    async_trait, token, AllowOrigins, Authenticator, Refusal, RuntimeConfig, Switchboard,
    DEFAULT_COOKIE,
};
use switchboard_warp::Options;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

fn switchboard(config: Config) -> Switchboard {
    Switchboard::builder()
        .config(config)
        .build()
        .expect("a valid config")
}

/// Checks an `error` frame: its code, the `id` and `room` it must echo (or
/// not carry), and a message for humans.
fn assert_error(frame: &Value, code: &str, id: Option<Value>, room: Option<&str>) {
    assert_eq!(frame["type"], "error", "{frame}");
    assert_eq!(frame["code"], code, "{frame}");
    assert!(
        frame["message"].as_str().is_some_and(|m| !m.is_empty()),
        "an error says why: {frame}"
    );
    assert_eq!(frame.get("id"), id.as_ref(), "error id: {frame}");
    assert_eq!(
        frame.get("room").and_then(Value::as_str),
        room,
        "error room: {frame}"
    );
}

/// Waits until `ready` holds, re-checking whenever the runtime had a chance to
/// move (a state the test cannot be told about directly, such as a session
/// freed after its socket closed).
async fn eventually(what: &str, mut ready: impl FnMut() -> bool) {
    let waited = tokio::time::timeout(WAIT, async {
        while !ready() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "never happened: {what}");
}

#[tokio::test]
async fn welcome_is_the_first_frame_of_every_session() {
    let mut config = Config::default();
    config.max_rooms_per_session = 7;
    config.heartbeat_interval = Duration::from_millis(30_000);
    let server = TestServer::start(switchboard(config)).await;

    let mut alice = Client::open(&server.ws_url("alice")).await;
    let welcome = alice.welcome().await;
    assert_eq!(welcome["user"], "alice");
    assert_eq!(
        welcome["heartbeat"],
        json!({"interval_ms": 30_000, "timeout_ms": 20_000})
    );
    assert_eq!(
        welcome["limits"],
        json!({"max_frame_bytes": 65_536, "max_rooms": 7, "rate_per_sec": 50})
    );
    // At least 128 random bits, URL-safe base64.
    assert!(alice.sid.len() >= 22, "sid {}", alice.sid);
    assert!(alice
        .sid
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));

    let mut anonymous = Client::open(&format!("ws://{}/ws", server.addr)).await;
    let welcome = anonymous.welcome().await;
    assert_eq!(welcome["user"], "anonymous");
    assert_ne!(anonymous.sid, alice.sid);

    server.stop().await;
}

#[tokio::test]
async fn publish_reaches_members_with_echo_unless_echo_is_false() {
    let server = TestServer::start(switchboard(Config::default())).await;
    let mut alice = server.connect("alice").await;
    let mut bob = server.connect("bob").await;
    let joined = alice.join("lobby", false).await;
    assert_eq!(joined["seq"], 0);
    let epoch = joined["epoch"].clone();
    assert!(epoch.as_str().is_some_and(|e| !e.is_empty()));
    assert_eq!(bob.join("lobby", false).await["epoch"], epoch);

    let frames = alice
        .request(
            json!({"type": "publish", "room": "lobby", "event": "chat", "data": {"text": "hi"}}),
            json!(1),
        )
        .await;
    assert_eq!(frames.len(), 2, "the echo, then the ack: {frames:?}");
    let echo = &frames[0];
    assert_eq!(frames[1], json!({"type": "ack", "id": 1}));
    let message = bob.recv_type("message").await;
    assert_eq!(&message, echo, "every member gets the same frame");
    assert_eq!(message["room"], "lobby");
    assert_eq!(message["seq"], 1);
    assert_eq!(message["epoch"], epoch);
    assert_eq!(message["event"], "chat");
    assert_eq!(message["data"], json!({"text": "hi"}));
    assert_eq!(message["from"], json!({"sid": alice.sid, "user": "alice"}));
    assert!(message["ts"]
        .as_u64()
        .is_some_and(|ts| ts > 1_600_000_000_000));

    let frames = alice
        .request(
            json!({"type": "publish", "room": "lobby", "data": 2, "echo": false}),
            json!("no-echo"),
        )
        .await;
    assert_eq!(frames, vec![json!({"type": "ack", "id": "no-echo"})]);
    let message = bob.recv_type("message").await;
    assert_eq!(message["seq"], 2);
    assert_eq!(message["data"], 2);
    assert!(message.get("event").is_none());

    // bob's own publish reaches alice, and only once each.
    bob.send(json!({"type": "publish", "room": "lobby", "data": "from bob"}))
        .await;
    assert_eq!(bob.recv_type("message").await["seq"], 3);
    let message = alice.recv_type("message").await;
    assert_eq!(message["from"]["user"], "bob");
    alice.expect_nothing_queued().await;
    bob.expect_nothing_queued().await;

    server.stop().await;
}

#[tokio::test]
async fn direct_to_a_user_reaches_every_tab_and_nobody_else() {
    let server = TestServer::start(switchboard(Config::default())).await;
    let mut alice = server.connect("alice").await;
    let mut bob_tab1 = server.connect("bob").await;
    let mut bob_tab2 = server.connect("bob").await;
    let mut carol = server.connect("carol").await;

    let frames = alice
        .request(
            json!({"type": "direct", "to": {"user": "bob"}, "event": "dm", "data": {"text": "psst"}}),
            json!(1),
        )
        .await;
    assert_eq!(frames, vec![json!({"type": "ack", "id": 1})]);
    let expected = json!({
        "type": "direct",
        "from": {"sid": alice.sid, "user": "alice"},
        "event": "dm",
        "data": {"text": "psst"},
    });
    assert_eq!(bob_tab1.recv().await, expected);
    assert_eq!(bob_tab2.recv().await, expected);
    carol.expect_nothing_queued().await;

    // To one session: only that tab.
    let to_tab2 = json!({"type": "direct", "to": {"sid": bob_tab2.sid}, "data": "tab 2 only"});
    let frames = alice.request(to_tab2, json!(2)).await;
    assert_eq!(frames, vec![json!({"type": "ack", "id": 2})]);
    let direct = bob_tab2.recv_type("direct").await;
    assert_eq!(direct["data"], "tab 2 only");
    bob_tab1.expect_nothing_queued().await;
    carol.expect_nothing_queued().await;
    alice.expect_nothing_queued().await;

    server.stop().await;
}

#[tokio::test]
async fn presence_announces_first_joins_and_last_leaves_with_counts() {
    let server = TestServer::start(switchboard(Config::default())).await;
    let sb = server.switchboard.clone();
    let mut alice = server.connect("alice").await;
    assert_eq!(alice.join("lobby", true).await["members"], 1);

    let mut bob_tab1 = server.connect("bob").await;
    assert_eq!(bob_tab1.join("lobby", true).await["members"], 2);
    assert_eq!(
        alice.recv().await,
        json!({"type": "presence", "room": "lobby", "action": "join", "user": "bob", "count": 2})
    );

    // A second tab of the same user is no news.
    let mut bob_tab2 = server.connect("bob").await;
    assert_eq!(bob_tab2.join("lobby", true).await["members"], 2);
    alice.expect_nothing_queued().await;
    bob_tab1.expect_nothing_queued().await;

    // carol asks not to hear presence, but is announced to the others.
    let mut carol = server.connect("carol").await;
    assert_eq!(carol.join("lobby", false).await["members"], 3);
    let carol_joined =
        json!({"type": "presence", "room": "lobby", "action": "join", "user": "carol", "count": 3});
    assert_eq!(alice.recv().await, carol_joined);
    assert_eq!(bob_tab2.recv().await, carol_joined);

    let frames = bob_tab1
        .request(json!({"type": "presence", "room": "lobby"}), json!("who"))
        .await;
    assert_eq!(
        frames,
        vec![
            carol_joined.clone(),
            json!({"type": "presence", "room": "lobby", "action": "list",
                   "members": ["alice", "bob", "carol"], "count": 3}),
            json!({"type": "ack", "id": "who"}),
        ]
    );

    // bob closes one tab: he is still there.
    bob_tab1.close().await;
    eventually("bob's first tab is freed", || {
        sb.room("lobby").is_some_and(|r| r.sessions == 3)
    })
    .await;
    alice.expect_nothing_queued().await;

    // bob's last tab goes: he left.
    bob_tab2.close().await;
    assert_eq!(
        alice.recv().await,
        json!({"type": "presence", "room": "lobby", "action": "leave", "user": "bob", "count": 2})
    );
    carol.expect_nothing_queued().await;
    let frames = alice
        .request(json!({"type": "presence", "room": "lobby"}), json!(9))
        .await;
    assert_eq!(
        frames[0],
        json!({"type": "presence", "room": "lobby", "action": "list",
               "members": ["alice", "carol"], "count": 2})
    );

    server.stop().await;
}

#[tokio::test]
async fn refused_frames_are_answered_with_their_codes_and_change_nothing() {
    let server = TestServer::start(switchboard(Config::default())).await;
    let mut alice = server.connect("alice").await;

    alice.send_text("this is not json").await;
    assert_error(&alice.recv().await, "invalid_json", None, None);
    alice.send_text("[1, 2, 3]").await;
    assert_error(&alice.recv().await, "invalid_json", None, None);

    alice.send(json!({"type": "join", "id": 5})).await;
    assert_error(&alice.recv().await, "invalid_frame", Some(json!(5)), None);

    alice
        .send(json!({"type": "publish", "room": "lobby", "id": 6}))
        .await;
    assert_error(
        &alice.recv().await,
        "invalid_frame",
        Some(json!(6)),
        Some("lobby"),
    );

    alice.send(json!({"type": "dance", "id": "x"})).await;
    assert_error(&alice.recv().await, "unknown_type", Some(json!("x")), None);

    alice
        .send(json!({"type": "join", "room": "no spaces allowed", "id": 7}))
        .await;
    assert_error(&alice.recv().await, "invalid_room", Some(json!(7)), None);

    alice
        .send(json!({"type": "publish", "room": "lobby", "data": 1, "id": 8}))
        .await;
    assert_error(
        &alice.recv().await,
        "not_joined",
        Some(json!(8)),
        Some("lobby"),
    );
    assert!(
        server.switchboard.room("lobby").is_none(),
        "a refused publish creates no room"
    );

    alice
        .send(json!({"type": "direct", "to": {"user": "nobody"}, "data": 1, "id": 9}))
        .await;
    assert_error(&alice.recv().await, "unknown_target", Some(json!(9)), None);

    // 8 errors, under the budget of 10: the session goes on.
    alice.expect_nothing_queued().await;
    assert_eq!(alice.join("lobby", true).await["seq"], 0);

    server.stop().await;
}

/// A policy with something to refuse: `vault` may not be joined, `news` takes
/// publishes only from the server, and nobody may message `ceo` directly.
struct Rules;

impl Policy for Rules {
    fn may_join(&self, _who: &Identity, room: &RoomName) -> bool {
        room.as_str() != "vault"
    }

    fn publish_rule(&self, _who: &Identity, room: &RoomName) -> PublishRule {
        if room.as_str() == "news" {
            PublishRule::ServerOnly
        } else {
            PublishRule::Members
        }
    }

    fn may_direct(&self, _who: &Identity, to: &Target<'_>) -> bool {
        !matches!(to, Target::User(user) if user == "ceo")
    }
}

#[tokio::test]
async fn the_policy_refuses_with_forbidden() {
    let sb = Switchboard::builder()
        .policy(Rules)
        .build()
        .expect("a valid config");
    let server = TestServer::start(sb).await;
    let mut alice = server.connect("alice").await;
    let _ceo = server.connect("ceo").await;

    alice
        .send(json!({"type": "join", "room": "vault", "id": 1}))
        .await;
    assert_error(
        &alice.recv().await,
        "forbidden",
        Some(json!(1)),
        Some("vault"),
    );
    assert!(server.switchboard.room("vault").is_none());

    alice.join("news", false).await;
    alice
        .send(json!({"type": "publish", "room": "news", "data": "fake", "id": 2}))
        .await;
    assert_error(
        &alice.recv().await,
        "forbidden",
        Some(json!(2)),
        Some("news"),
    );
    assert_eq!(server.switchboard.room("news").map(|r| r.seq), Some(0));

    alice
        .send(json!({"type": "direct", "to": {"user": "ceo"}, "data": "hi", "id": 3}))
        .await;
    assert_error(&alice.recv().await, "forbidden", Some(json!(3)), None);

    // What the policy allows still works: the server publishes to `news`.
    server
        .switchboard
        .publish("news", None, &json!("real"))
        .await
        .expect("server publish");
    let message = alice.recv_type("message").await;
    assert_eq!(message["from"], json!({"server": true}));

    server.stop().await;
}

#[tokio::test]
async fn joining_past_max_rooms_is_too_many_rooms() {
    let mut config = Config::default();
    config.max_rooms_per_session = 2;
    let server = TestServer::start(switchboard(config)).await;
    let mut alice = server.connect("alice").await;
    alice.join("a", false).await;
    alice.join("b", false).await;

    alice
        .send(json!({"type": "join", "room": "c", "id": 1}))
        .await;
    assert_error(
        &alice.recv().await,
        "too_many_rooms",
        Some(json!(1)),
        Some("c"),
    );
    assert!(server.switchboard.room("c").is_none());

    // Joining a room it is already in is not one more.
    alice.join("a", false).await;
    let frames = alice
        .request(json!({"type": "leave", "room": "b"}), json!(2))
        .await;
    assert_eq!(frames, vec![json!({"type": "ack", "id": 2})]);
    alice.join("c", false).await;

    server.stop().await;
}

#[tokio::test]
async fn frames_past_the_rate_are_rate_limited() {
    let mut config = Config::default();
    config.rate_per_sec = 1;
    config.rate_burst = 3;
    // Every refused frame counts against the error budget; keep this session open.
    config.max_errors = 100;
    let server = TestServer::start(switchboard(config)).await;
    let mut alice = server.connect("alice").await;

    for id in 0..20 {
        alice.feed(json!({"type": "ping", "id": id})).await;
    }
    alice.flush().await;

    let mut answered = Vec::new();
    let mut limited = Vec::new();
    while answered.last() != Some(&19) {
        let frame = alice.recv().await;
        match frame["type"].as_str() {
            Some("pong") => {
                let ack = alice.recv_type("ack").await;
                answered.push(ack["id"].as_u64().expect("a numeric id"));
            }
            Some("error") => {
                let id = frame["id"].as_u64().expect("the error carries the id");
                assert_error(&frame, "rate_limited", Some(json!(id)), None);
                limited.push(id);
                answered.push(id);
            }
            _ => panic!("unexpected {frame}"),
        }
    }
    assert_eq!(answered, (0..20).collect::<Vec<_>>(), "answered in order");
    // The burst is always served; at one token a second, 20 frames sent at
    // once cannot all be.
    assert!(limited.iter().all(|id| *id >= 3), "limited: {limited:?}");
    assert!(!limited.is_empty());

    server.stop().await;
}

#[tokio::test]
async fn a_frame_over_max_frame_bytes_closes_with_1009() {
    let mut config = Config::default();
    config.max_frame_bytes = 1024;
    let server = TestServer::start(switchboard(config)).await;

    // Exactly at the limit is fine.
    let mut alice = server.connect("alice").await;
    let mut frame = json!({"type": "join", "room": "a", "pad": ""});
    let pad = 1024 - frame.to_string().len();
    frame["pad"] = Value::from("p".repeat(pad));
    assert_eq!(frame.to_string().len(), 1024);
    alice.send(frame).await;
    alice.recv_type("joined").await;

    // One byte over closes the session, every time (several connections: the
    // close must not depend on which of the transport's branches runs first).
    for _ in 0..16 {
        let mut client = server.connect("bob").await;
        let mut frame = json!({"type": "publish", "room": "a", "data": ""});
        let pad = 1025 - frame.to_string().len();
        frame["data"] = Value::from("d".repeat(pad));
        client.send(frame).await;
        client.expect_close(1009, "frame_too_large").await;
    }
    alice.expect_nothing_queued().await;
    let metrics = server.switchboard.metrics();
    assert!(metrics
        .errors
        .iter()
        .any(|(code, n)| code.as_str() == "frame_too_large" && *n == 16));

    server.stop().await;
}

#[tokio::test]
async fn a_full_server_refuses_with_server_full_and_1013() {
    let mut config = Config::default();
    config.max_sessions = 1;
    let server = TestServer::start(switchboard(config)).await;
    let sb = server.switchboard.clone();
    let mut alice = server.connect("alice").await;

    let mut bob = Client::open(&server.ws_url("bob")).await;
    let refusal = bob.recv().await;
    assert_error(&refusal, "server_full", None, None);
    bob.expect_close(1013, "server_full").await;
    alice.expect_nothing_queued().await;

    alice.close().await;
    eventually("alice's session is freed", || sb.metrics().sessions == 0).await;
    let mut bob = server.connect("bob").await;
    bob.expect_nothing_queued().await;

    server.stop().await;
}

#[tokio::test]
async fn too_many_errors_close_with_1008() {
    let server = TestServer::start(switchboard(Config::default())).await;
    let mut alice = server.connect("alice").await;
    let mut bob = server.connect("bob").await;
    bob.join("lobby", true).await;
    alice.join("lobby", true).await;
    bob.recv_type("presence").await;

    // One at a time, up to one short of the budget of 10.
    for id in 0..9 {
        alice.send(json!({"type": "nope", "id": id})).await;
        assert_error(&alice.recv().await, "unknown_type", Some(json!(id)), None);
    }
    // Then a burst, larger than the server reads at once: the 10th error
    // closes the session; the frames after it are never answered, and the
    // close still reaches the client.
    let pad = "p".repeat(500);
    for id in 9..30 {
        alice
            .feed(json!({"type": "nope", "id": id, "pad": pad}))
            .await;
    }
    alice.flush().await;
    assert_error(&alice.recv().await, "unknown_type", Some(json!(9)), None);
    alice.expect_close(1008, "too_many_errors").await;

    // Nobody else is affected, but for hearing that alice left.
    assert_eq!(
        bob.recv().await,
        json!({"type": "presence", "room": "lobby", "action": "leave", "user": "alice", "count": 1})
    );
    bob.expect_nothing_queued().await;

    server.stop().await;
}

#[tokio::test]
async fn a_plain_get_on_the_websocket_path_is_400() {
    let server = TestServer::start(switchboard(Config::default())).await;
    let response = http(server.addr, "GET", "/ws", &[], b"").await;
    assert_eq!(response.status, 400);
    assert_eq!(server.switchboard.metrics().sessions_opened, 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_of_one_session_are_handled_in_order() {
    const N: u64 = 200;
    let mut config = Config::default();
    config.rate_per_sec = 100_000;
    config.rate_burst = 100_000;
    let server = TestServer::start(switchboard(config)).await;
    let mut alice = server.connect("alice").await;
    let mut bob = server.connect("bob").await;
    alice.join("stream", false).await;
    bob.join("stream", false).await;

    // Pipelined: all 200 are on the wire before alice reads anything.
    for i in 0..N {
        alice
            .feed(json!({"type": "publish", "room": "stream", "data": {"i": i}, "id": i}))
            .await;
    }
    alice.flush().await;

    for i in 0..N {
        let message = alice.recv_type("message").await;
        assert_eq!(message["seq"], i + 1);
        assert_eq!(message["data"], json!({"i": i}));
        assert_eq!(alice.recv().await, json!({"type": "ack", "id": i}));
    }
    for i in 0..N {
        let message = bob.recv_type("message").await;
        assert_eq!(message["seq"], i + 1);
        assert_eq!(message["data"], json!({"i": i}));
    }
    alice.expect_nothing_queued().await;
    bob.expect_nothing_queued().await;

    server.stop().await;
}

/// Runs on tokio's paused clock: once the clients are connected, time moves
/// only when every task waits, straight to the next timer, so the default 25 s
/// heartbeat and 20 s timeout take no real time.
#[tokio::test]
async fn heartbeat_pings_idle_clients_and_closes_silent_ones() {
    // Far beyond any heartbeat deadline; reached only if the server never acts.
    const LONG: Duration = Duration::from_secs(600);
    let server = TestServer::start(switchboard(Config::default())).await;
    let mut alice = server.connect("alice").await;
    let mut bob = server.connect("bob").await;
    tokio::time::pause();
    let start = tokio::time::Instant::now();

    // alice answers every ping: three intervals later, past interval + timeout, she is still here.
    for round in 1..=3 {
        let ping = alice.next_event_within(LONG).await;
        assert_eq!(ping, Event::Frame(json!({"type": "ping"})), "round {round}");
        alice.send(json!({"type": "pong"})).await;
    }
    assert!(start.elapsed() >= Duration::from_secs(45));

    // bob never answered: pinged, then closed.
    assert_eq!(
        bob.next_event_within(LONG).await,
        Event::Frame(json!({"type": "ping"}))
    );
    assert_eq!(
        bob.next_event_within(LONG).await,
        Event::Frame(json!({"type": "close", "code": 1001, "reason": "heartbeat_timeout"}))
    );
    match bob.next_event_within(LONG).await {
        Event::Closed(Some((1001, _))) => {}
        other => panic!("expected the websocket close 1001, got {other:?}"),
    }

    // alice stops answering: the same end.
    let ping = alice.next_event_within(LONG).await;
    assert_eq!(ping, Event::Frame(json!({"type": "ping"})));
    let pinged_at = tokio::time::Instant::now();
    let close = alice.next_event_within(LONG).await;
    assert_eq!(
        close,
        Event::Frame(json!({"type": "close", "code": 1001, "reason": "heartbeat_timeout"}))
    );
    assert!(
        pinged_at.elapsed() >= Duration::from_secs(20),
        "closed before the timeout"
    );

    let metrics = server.switchboard.metrics();
    assert_eq!(metrics.heartbeat_timeouts, 2);
    assert!(metrics
        .errors
        .iter()
        .any(|(code, n)| code.as_str() == "heartbeat_timeout" && *n == 2));
    server.stop().await;
}

#[tokio::test]
async fn a_refused_origin_gets_forbidden_and_1008() {
    let sb = Switchboard::builder()
        .origins(AllowOrigins::new(["https://app.example"]))
        .build()
        .expect("a valid config");
    let server = TestServer::start(sb).await;
    let with_origin = |origin: &str| {
        let mut request = server
            .ws_url("alice")
            .into_client_request()
            .expect("a valid url");
        request
            .headers_mut()
            .insert("origin", origin.parse().expect("a header value"));
        request
    };

    let mut evil = Client::open_request(with_origin("https://evil.example")).await;
    assert_error(&evil.recv().await, "forbidden", None, None);
    evil.expect_close(1008, "forbidden").await;
    assert_eq!(server.switchboard.metrics().sessions_opened, 0);

    let mut listed = Client::open_request(with_origin("https://app.example")).await;
    listed.welcome().await;
    let same_origin = format!("http://{}", server.addr);
    let mut same = Client::open_request(with_origin(&same_origin)).await;
    same.welcome().await;
    // Not a browser (no Origin header): nothing for a cross-site attack to forge.
    server.connect("alice").await;

    server.stop().await;
}

/// Lets in only the bearer of the one good token, as `alice`.
struct OneToken;

#[async_trait]
impl Authenticator for OneToken {
    async fn authenticate(&self, request: &http::request::Parts) -> Result<Identity, Refusal> {
        match token(request, DEFAULT_COOKIE).as_deref() {
            Some("let-me-in") => Ok(Identity::new("alice")),
            _ => Err(Refusal::forbidden("bad or missing token")),
        }
    }
}

#[tokio::test]
async fn a_refused_credential_gets_forbidden_and_1008() {
    let sb = Switchboard::builder()
        .authenticator(OneToken)
        .build()
        .expect("a valid config");
    let server = TestServer::start(sb).await;

    for url in [
        format!("ws://{}/ws?token=wrong", server.addr),
        format!("ws://{}/ws", server.addr),
    ] {
        let mut client = Client::open(&url).await;
        let refusal = client.recv().await;
        assert_error(&refusal, "forbidden", None, None);
        assert_eq!(refusal["message"], "bad or missing token");
        client.expect_close(1008, "forbidden").await;
    }
    assert_eq!(server.switchboard.metrics().sessions_opened, 0);

    let mut request = format!("ws://{}/ws", server.addr)
        .into_client_request()
        .expect("a valid url");
    request.headers_mut().insert(
        "authorization",
        "Bearer let-me-in".parse().expect("a header value"),
    );
    let mut alice = Client::open_request(request).await;
    assert_eq!(alice.welcome().await["user"], "alice");

    server.stop().await;
}

/// The next frame of a client read by hand.
async fn raw_recv(ws: &mut Ws) -> Value {
    match within(WAIT, read_event(ws)).await {
        Event::Frame(frame) => frame,
        closed => panic!("closed while a frame was due: {closed:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_is_cut_off_while_fast_members_get_every_message() {
    const ROOM: &str = "firehose";
    // Messages per round: about 17 KB, well under the 32 KiB outbound bound,
    // and fast members drain each round before the next.
    const ROUND: u64 = 8;
    let mut runtime = RuntimeConfig::default();
    runtime.max_outbound_bytes = 32 * 1024;
    // The slow reader's writer sits in a blocked write until the test reads
    // again; the write timeout must not end the connection first.
    runtime.write_timeout = Duration::from_secs(120);
    let sb = Switchboard::builder()
        .runtime_config(runtime)
        .build()
        .expect("a valid config");
    let server = TestServer::start(sb).await;

    // Read by hand, with a small receive buffer: the kernel holds little for
    // a client that stops reading.
    let mut slow = handshake_small_buffer(server.addr, &server.ws_url("slow"), 4096).await;
    assert_eq!(raw_recv(&mut slow).await["type"], "welcome");
    let join = json!({"type": "join", "room": ROOM, "presence": false});
    within(WAIT, slow.send(Message::text(join.to_string())))
        .await
        .expect("send");
    assert_eq!(raw_recv(&mut slow).await["type"], "joined");
    let mut fast = Vec::new();
    for name in ["fast1", "fast2"] {
        let mut client = server.connect(name).await;
        client.join(ROOM, false).await;
        fast.push(client);
    }

    // From here `slow` is not read until it has been cut off.
    let pad = "x".repeat(2000);
    let mut published = 0;
    let mut cut_at = None;
    while cut_at.is_none_or(|cut| published < cut + 10 * ROUND) {
        assert!(published < 40_000, "the slow reader was never cut off");
        for _ in 0..ROUND {
            published += 1;
            let data = json!({"n": published, "pad": pad});
            server
                .switchboard
                .publish(ROOM, Some("tick"), &data)
                .await
                .expect("publish");
        }
        for (member, client) in fast.iter_mut().enumerate() {
            for seq in published - ROUND + 1..=published {
                let message = client.recv().await;
                assert_eq!(message["type"], "message", "fast{member}: {message}");
                assert_eq!(message["seq"], seq, "fast{member} in order, no gap");
                assert_eq!(message["data"]["n"], seq);
            }
        }
        if cut_at.is_none() && server.switchboard.metrics().slow_consumer_closes > 0 {
            cut_at = Some(published);
        }
    }
    let metrics = server.switchboard.metrics();
    assert_eq!(metrics.slow_consumer_closes, 1, "only the slow reader");
    assert_eq!(metrics.sessions, 2);
    assert_eq!(server.switchboard.room(ROOM).map(|r| r.sessions), Some(2));
    for client in &mut fast {
        client.expect_nothing_queued().await;
    }

    // The slow reader gets what was already on its way, in order and without
    // a gap, then the close: no silent drop in the middle of its stream.
    let mut slow = Client::from_ws(slow);
    let mut next_seq = 1;
    loop {
        let frame = slow.recv().await;
        if frame["type"] == "message" {
            assert_eq!(frame["seq"], next_seq);
            next_seq += 1;
        } else {
            assert_eq!(
                frame,
                json!({"type": "close", "code": 1013, "reason": "slow_consumer"})
            );
            break;
        }
    }
    assert!(next_seq <= published, "the slow reader missed messages");
    slow.expect_ws_close(1013).await;

    server.stop().await;
}

#[tokio::test]
async fn shutdown_sends_going_away_to_everyone() {
    let server = TestServer::start(switchboard(Config::default())).await;
    let addr = server.addr;
    let sb = server.switchboard.clone();
    let mut alice = server.connect("alice").await;
    alice.join("lobby", true).await;
    let mut bob = server.connect("bob").await;
    bob.join("lobby", true).await;
    alice.recv_type("presence").await;
    let mut carol = server.connect("carol").await;

    within(WAIT, sb.shutdown()).await;
    for client in [&mut alice, &mut bob, &mut carol] {
        // Sessions close one by one, so a member may first hear that
        // another one left.
        let mut frame = client.recv().await;
        while frame["type"] == "presence" {
            assert_eq!(frame["action"], "leave", "{frame}");
            frame = client.recv().await;
        }
        assert_eq!(
            frame,
            json!({"type": "close", "code": 1001, "reason": "going_away"})
        );
        client.expect_ws_close(1001).await;
    }
    assert_eq!(sb.metrics().sessions, 0);
    let publish = sb.publish("lobby", None, &1).await;
    assert!(publish.is_err_and(|e| e.is_shutting_down()));

    server.stop().await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the listener is closed"
    );
}

#[tokio::test]
async fn the_http_publish_api_needs_its_key_and_a_good_body() {
    let mut config = Config::default();
    config.max_frame_bytes = 1024;
    let server =
        TestServer::start_with(switchboard(config), Options::default().api_key("s3cret")).await;
    let addr = server.addr;
    let mut alice = server.connect("alice").await;
    let joined = alice.join("news", false).await;
    let auth = [("authorization", "Bearer s3cret")];
    let body = br#"{"room": "news", "event": "headline", "data": {"n": 1}}"#;

    for headers in [
        &[][..],
        &[("authorization", "Bearer wrong")][..],
        &[("authorization", "s3cret")][..],
    ] {
        let response = http(addr, "POST", "/api/publish", headers, body).await;
        assert_eq!(response.status, 401, "{headers:?}");
        assert_eq!(response.json()["error"]["code"], "forbidden");
    }
    alice.expect_nothing_queued().await;

    let bad_bodies: [(&[u8], u16, &str); 5] = [
        (b"not json", 400, "invalid_json"),
        (b"[1]", 400, "invalid_json"),
        (br#"{"data": 1}"#, 400, "invalid_frame"),
        (br#"{"room": "no spaces", "data": 1}"#, 400, "invalid_room"),
        (&[b' '; 2000], 413, "frame_too_large"),
    ];
    for (body, status, code) in bad_bodies {
        let response = http(addr, "POST", "/api/publish", &auth, body).await;
        assert_eq!(response.status, status, "{}", response.text());
        assert_eq!(response.json()["error"]["code"], code);
        assert!(response.json()["error"]["message"].is_string());
    }
    // A body under the limit whose message would not be.
    let data = "d".repeat(1000);
    let long = json!({"room": "news", "data": data}).to_string();
    let response = http(addr, "POST", "/api/publish", &auth, long.as_bytes()).await;
    assert_eq!(response.status, 413, "{}", response.text());
    alice.expect_nothing_queued().await;

    let response = http(addr, "POST", "/api/publish", &auth, body).await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.header("content-type"), Some("application/json"));
    assert_eq!(response.json(), json!({"seq": 1, "epoch": joined["epoch"]}));
    let message = alice.recv_type("message").await;
    assert_eq!(message["room"], "news");
    assert_eq!(message["seq"], 1);
    assert_eq!(message["epoch"], joined["epoch"]);
    assert_eq!(message["event"], "headline");
    assert_eq!(message["from"], json!({"server": true}));
    assert_eq!(message["data"], json!({"n": 1}));

    // Direct: every tab of the user, or nobody.
    let mut alice_tab2 = server.connect("alice").await;
    let direct = br#"{"user": "alice", "event": "note", "data": "hello"}"#;
    let response = http(addr, "POST", "/api/direct", &auth, direct).await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.json(), json!({"delivered": 2}));
    let expected =
        json!({"type": "direct", "from": {"server": true}, "event": "note", "data": "hello"});
    assert_eq!(alice.recv().await, expected);
    assert_eq!(alice_tab2.recv().await, expected);
    let nobody = br#"{"user": "nobody", "data": 1}"#;
    let response = http(addr, "POST", "/api/direct", &auth, nobody).await;
    assert_eq!(response.json(), json!({"delivered": 0}));
    let both = format!(r#"{{"user": "alice", "sid": "{}", "data": 1}}"#, alice.sid);
    let response = http(addr, "POST", "/api/direct", &auth, both.as_bytes()).await;
    assert_eq!(response.status, 400);
    let response = http(addr, "POST", "/api/direct", &[], direct).await;
    assert_eq!(response.status, 401);
    alice.expect_nothing_queued().await;
    alice_tab2.expect_nothing_queued().await;

    server.stop().await;

    // Without a key configured, the API is off.
    let server = TestServer::start(switchboard(Config::default())).await;
    let response = http(server.addr, "POST", "/api/publish", &auth, body).await;
    assert_eq!(response.status, 401);
    assert!(server.switchboard.room("news").is_none());
    server.stop().await;
}

/// The value of one sample line (`name value`) of a Prometheus text body.
fn sample(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {name} in:\n{metrics}"))
        .parse()
        .expect("an integer sample")
}

#[tokio::test]
async fn metrics_show_the_counters() {
    let server = TestServer::start(switchboard(Config::default())).await;
    let sb = server.switchboard.clone();
    let mut alice = server.connect("alice").await;
    let mut bob = server.connect("bob").await;
    let mut bytes_in = 0;
    for client in [&mut alice, &mut bob] {
        let join = json!({"type": "join", "room": "m", "presence": false});
        bytes_in += join.to_string().len();
        client.send(join).await;
        client.recv_type("joined").await;
    }
    for id in 0..3 {
        let publish = json!({"type": "publish", "room": "m", "data": id, "id": id});
        bytes_in += publish.to_string().len();
        alice.send(publish).await;
        alice.recv_type("message").await;
        alice.recv_type("ack").await;
        bob.recv_type("message").await;
    }
    alice.send_text("garbage").await;
    bytes_in += "garbage".len();
    alice.recv_type("error").await;
    bob.close().await;
    eventually("bob's session is freed", || sb.metrics().sessions == 1).await;

    let response = http(server.addr, "GET", "/metrics", &[], b"").await;
    assert_eq!(response.status, 200);
    assert!(response
        .header("content-type")
        .is_some_and(|t| t.starts_with("text/plain")));
    let text = response.text();
    assert_eq!(sample(&text, "switchboard_sessions"), 1);
    assert_eq!(sample(&text, "switchboard_rooms"), 1);
    assert_eq!(sample(&text, "switchboard_sessions_opened_total"), 2);
    assert_eq!(sample(&text, "switchboard_frames_in_total"), 6);
    assert_eq!(sample(&text, "switchboard_bytes_in_total"), bytes_in as u64);
    // alice: welcome, joined, 3 messages, 3 acks, 1 error; bob: welcome, joined, 3 messages.
    assert_eq!(sample(&text, "switchboard_frames_out_total"), 14);
    assert!(sample(&text, "switchboard_bytes_out_total") > 0);
    assert_eq!(sample(&text, "switchboard_messages_total"), 3);
    assert_eq!(
        sample(&text, "switchboard_errors_total{code=\"invalid_json\"}"),
        1
    );
    assert_eq!(
        sample(&text, "switchboard_errors_total{code=\"not_joined\"}"),
        0
    );
    assert_eq!(
        sample(&text, "switchboard_closes_total{reason=\"normal\"}"),
        1
    );
    assert_eq!(sample(&text, "switchboard_slow_consumer_closes_total"), 0);
    assert!(text.contains("# TYPE switchboard_messages_total counter"));

    server.stop().await;
}
