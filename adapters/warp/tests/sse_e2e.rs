//! End-to-end tests of the SSE transport over 127.0.0.1: a real warp server
//! with `switchboard_warp::routes`, a plain HTTP/1.1 client, the wire as
//! PROTOCOL.md writes it (`event:`, `id:`, `data:` lines).

mod common_http;

use std::collections::BTreeMap;
use std::time::Duration;

use common_http::{
    builder, check_error, config, error_cases, eventually, get, ping_burst, runtime_config,
    send_on, within, KnownUsers, Poller, Server, SseEvent, SseReader,
};
use http::StatusCode;
use serde_json::{json, Value};
use switchboard_runtime::AllowOrigins;
use switchboard_sse::{Cursor, Resume};

/// The `room~epoch~seq` form of one room's position (what `switchboard.js`
/// sends as `since=`).
fn cursor_item(room: &str, epoch: &str, seq: u64) -> String {
    format!("{room}~{epoch}~{seq}")
}

/// The compact id a stream over these rooms, at these positions, carries.
fn cursor(rooms: &[&str], positions: &[(&str, &str, u64)]) -> String {
    let mut cursor = Cursor::new(rooms.iter().copied());
    for (room, epoch, seq) in positions {
        assert!(cursor.set(room, epoch, *seq));
    }
    cursor.encode()
}

/// Reads the `joined` of `room`, checking its `id:` carries the room's position.
async fn joined(stream: &mut SseReader, room: &str) -> SseEvent {
    let event = stream.expect().await;
    assert_eq!(event.kind(), "joined", "{:?}", event.data);
    assert_eq!(event.data["room"], room);
    let id = event.id.as_deref().expect("`joined` events carry an id");
    let seq = event.data["seq"].as_u64().expect("joined has a seq");
    let Some(Resume::Compact { seqs, .. }) = Resume::parse(id) else {
        panic!("a compact cursor: {id}");
    };
    assert!(seqs.contains(&Some(seq)), "cursor {id} holds {room}");
    event
}

/// Reads `n` events, which must all be `message`s; returns them.
async fn messages(stream: &mut SseReader, n: usize) -> Vec<SseEvent> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let event = stream.expect().await;
        assert_eq!(event.kind(), "message", "{:?}", event.data);
        out.push(event);
    }
    out
}

/// The seqs of each room's messages, in arrival order.
fn seqs_by_room(events: &[SseEvent]) -> BTreeMap<String, Vec<u64>> {
    let mut by_room: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for event in events.iter().filter(|e| e.kind() == "message") {
        by_room
            .entry(event.data["room"].as_str().unwrap_or_default().to_owned())
            .or_default()
            .push(event.data["seq"].as_u64().expect("messages have a seq"));
    }
    by_room
}

#[tokio::test]
async fn welcome_first_then_messages_in_order_with_event_and_id_lines() {
    let server = Server::start().await;
    let mut stream = server.sse("/sse?rooms=lobby&token=alice").await;
    assert_eq!(
        stream.headers.get("cache-control").map(|v| v.as_bytes()),
        Some(&b"no-cache"[..])
    );

    let welcome = stream.expect().await;
    assert_eq!(welcome.kind(), "welcome");
    assert!(welcome.id.is_none(), "only positions carry ids");
    assert_eq!(welcome.data["user"], "alice");
    assert_eq!(welcome.data["limits"]["max_frame_bytes"], 1024);
    let joined = joined(&mut stream, "lobby").await;
    assert!(
        joined.data.get("recovered").is_none(),
        "no `since`, no `recovered`"
    );
    let epoch = joined.data["epoch"].as_str().unwrap().to_owned();

    for i in 1..=5 {
        server.publish("lobby", json!({"n": i})).await;
    }
    for (i, event) in (1..=5).zip(messages(&mut stream, 5).await) {
        assert_eq!(event.event.as_deref(), Some("message"));
        assert_eq!(
            event.id.as_deref(),
            Some(cursor(&["lobby"], &[("lobby", &epoch, i)]).as_str())
        );
        assert_eq!(event.data["seq"], i);
        assert_eq!(event.data["epoch"], epoch.as_str());
        assert_eq!(event.data["data"]["n"], i);
        assert_eq!(event.data["from"]["server"], true);
        assert!(event.data["ts"].is_u64());
    }
}

/// Drops a stream after some messages, publishes more while it is away, and
/// reconnects with `resume`: the missed messages are replayed before
/// `joined` with `recovered: true`, none twice, none lost.
async fn resume_after_drop(
    resume: impl FnOnce(&str, &str) -> http::Request<http_body_util::Full<bytes::Bytes>>,
) {
    let server = Server::start().await;
    let mut stream = server.sse("/sse?rooms=a,b&token=alice").await;
    stream.welcome().await;
    joined(&mut stream, "a").await;
    joined(&mut stream, "b").await;
    server.publish("a", json!("a1")).await;
    server.publish("a", json!("a2")).await;
    server.publish("b", json!("b1")).await;
    let seen = messages(&mut stream, 3).await;
    let last_id = seen[2].id.clone().expect("messages carry an id");
    let epoch_a = server.switchboard.room("a").unwrap().epoch;
    let epoch_b = server.switchboard.room("b").unwrap().epoch;
    assert_eq!(
        last_id,
        cursor(
            &["a", "b"],
            &[("a", epoch_a.as_str(), 2), ("b", epoch_b.as_str(), 1)]
        )
    );
    drop(stream);

    server.publish("a", json!("a3")).await;
    server.publish("a", json!("a4")).await;
    server.publish("b", json!("b2")).await;

    let authority = server.addr.to_string();
    let mut stream = server.sse_with(resume(&authority, &last_id)).await;
    stream.welcome().await;
    let (joined_a, replay_a) = stream.until("joined").await;
    let (joined_b, replay_b) = stream.until("joined").await;
    assert_eq!(joined_a.data["room"], "a");
    assert_eq!(joined_a.data["recovered"], true);
    assert_eq!(joined_a.data["seq"], 4);
    assert_eq!(joined_b.data["room"], "b");
    assert_eq!(joined_b.data["recovered"], true);
    let data = |events: &[SseEvent]| -> Vec<Value> {
        events.iter().map(|e| e.data["data"].clone()).collect()
    };
    assert_eq!(data(&replay_a), [json!("a3"), json!("a4")]);
    assert_eq!(data(&replay_b), [json!("b2")]);

    // Live again, and the cursor goes on from the resumed positions.
    server.publish("b", json!("b3")).await;
    let live = messages(&mut stream, 1).await;
    assert_eq!(live[0].data["seq"], 3);
    assert_eq!(
        live[0].id.as_deref(),
        Some(
            cursor(
                &["a", "b"],
                &[("a", epoch_a.as_str(), 4), ("b", epoch_b.as_str(), 3)]
            )
            .as_str()
        )
    );
}

#[tokio::test]
async fn resumes_with_last_event_id_without_loss_or_duplicate() {
    resume_after_drop(|authority, last_id| {
        // `since=` here names positions that would replay everything twice:
        // the header must win.
        let mut request = get(
            authority,
            "/sse?rooms=a,b&token=alice&since=a~stale~0,b~stale~0",
        );
        request.headers_mut().insert(
            "last-event-id",
            last_id.parse().expect("a cursor is a header value"),
        );
        request
    })
    .await;
}

#[tokio::test]
async fn resumes_with_since_query_without_loss_or_duplicate() {
    resume_after_drop(|authority, last_id| {
        get(
            authority,
            &format!("/sse?rooms=a,b&token=alice&since={last_id}"),
        )
    })
    .await;
}

#[tokio::test]
async fn stale_epoch_or_lost_history_is_not_recovered() {
    let server = Server::start().await;
    server.publish("a", json!(1)).await;
    // 101 messages: the default history keeps the last 100, so seq 1 is gone.
    for i in 0..101 {
        server.publish("long", json!(i)).await;
    }
    let epoch_long = server.switchboard.room("long").unwrap().epoch;

    let mut request = get(&server.addr.to_string(), "/sse?rooms=a,long&token=alice");
    let cursor = format!(
        "{},{}",
        cursor_item("a", "an-epoch-from-before-a-restart", 1),
        cursor_item("long", epoch_long.as_str(), 0)
    );
    request
        .headers_mut()
        .insert("last-event-id", cursor.parse().unwrap());
    let mut stream = server.sse_with(request).await;
    stream.welcome().await;
    // Nothing replayed: `joined` comes straight away, saying so.
    let a = joined(&mut stream, "a").await;
    assert_eq!(a.data["recovered"], false);
    assert_eq!(a.data["seq"], 1);
    let long = joined(&mut stream, "long").await;
    assert_eq!(long.data["recovered"], false);
    assert_eq!(long.data["seq"], 101);
}

#[tokio::test]
async fn many_rooms_in_one_stream() {
    let mut config = config();
    config.max_rooms_per_session = 16;
    let server = Server::with(builder().config(config)).await;
    let rooms: Vec<String> = (0..10).map(|i| format!("room-{i}")).collect();
    let mut stream = server
        .sse(&format!("/sse?rooms={}&token=alice", rooms.join(",")))
        .await;
    stream.welcome().await;
    for room in &rooms {
        joined(&mut stream, room).await;
    }
    for round in 1..=3 {
        for room in &rooms {
            server.publish(room, json!({"round": round})).await;
        }
    }
    let events = messages(&mut stream, 30).await;
    let by_room = seqs_by_room(&events);
    assert_eq!(by_room.len(), 10);
    for seqs in by_room.values() {
        assert_eq!(seqs, &[1, 2, 3]);
    }
    let last = events.last().unwrap().id.as_deref().unwrap();
    let epochs: Vec<String> = rooms
        .iter()
        .map(|room| {
            server
                .switchboard
                .room(room)
                .unwrap()
                .epoch
                .as_str()
                .to_owned()
        })
        .collect();
    let names: Vec<&str> = rooms.iter().map(String::as_str).collect();
    let positions: Vec<(&str, &str, u64)> = names
        .iter()
        .zip(&epochs)
        .map(|(room, epoch)| (*room, epoch.as_str(), 3))
        .collect();
    assert_eq!(last, cursor(&names, &positions));
}

#[tokio::test]
async fn send_publishes_with_echo_and_answers_on_the_stream() {
    let server = Server::start().await;
    let mut alice = server.sse("/sse?rooms=lobby&token=alice").await;
    let alice_sid = alice.welcome().await;
    joined(&mut alice, "lobby").await;
    let mut bob = server.sse("/sse?rooms=lobby&token=bob").await;
    let bob_sid = bob.welcome().await;
    joined(&mut bob, "lobby").await;
    let (presence, _) = alice.until("presence").await;
    assert_eq!(presence.data["action"], "join");
    assert_eq!(presence.data["user"], "bob");

    let send = |sid: &str, user: &str| format!("/sse/send?sid={sid}&token={user}");
    let reply = server
        .post(
            &send(&alice_sid, "alice"),
            json!({"type": "publish", "room": "lobby", "event": "chat", "data": {"text": "hi"}, "id": 1})
                .to_string(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    assert_eq!(reply.json(), json!({"accepted": 1}));

    // The sender hears its own message (echo), then the ack.
    let (message, _) = alice.until("message").await;
    assert_eq!(message.data["event"], "chat");
    assert_eq!(message.data["data"]["text"], "hi");
    assert_eq!(message.data["from"]["sid"], alice_sid.as_str());
    assert_eq!(message.data["from"]["user"], "alice");
    let ack = alice.expect().await;
    assert_eq!(ack.data, json!({"type": "ack", "id": 1}));
    assert!(ack.id.is_none());
    let (message, _) = bob.until("message").await;
    assert_eq!(message.data["data"]["text"], "hi");

    // Without echo, and two frames in one body.
    let batch = json!([
        {"type": "publish", "room": "lobby", "data": "quiet", "echo": false, "id": "q"},
        {"type": "ping", "id": "p"},
    ]);
    let reply = server
        .post(&send(&alice_sid, "alice"), batch.to_string())
        .await;
    assert_eq!(reply.json(), json!({"accepted": 2}));
    let ack = alice.expect().await;
    assert_eq!(ack.data, json!({"type": "ack", "id": "q"}), "no echo first");
    assert_eq!(alice.expect().await.data["type"], "pong");
    assert_eq!(alice.expect().await.data, json!({"type": "ack", "id": "p"}));
    let message = bob.expect().await;
    assert_eq!(message.data["data"], "quiet");
    assert_eq!(message.data["seq"], 2);

    // A direct message from bob to alice's session.
    server
        .post(
            &send(&bob_sid, "bob"),
            json!({"type": "direct", "to": {"sid": alice_sid}, "data": "psst"}).to_string(),
        )
        .await;
    let direct = alice.expect().await;
    assert_eq!(direct.kind(), "direct");
    assert_eq!(direct.data["from"]["user"], "bob");
    assert_eq!(direct.data["data"], "psst");

    // A refused frame is answered on the stream; the POST itself succeeded.
    let reply = server
        .post(&send(&alice_sid, "alice"), r#"{"type":"nope"}"#)
        .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    let error = alice.expect().await;
    assert_eq!(error.data["code"], "unknown_type");
}

#[tokio::test]
async fn sse_only_mode_refuses_client_frames() {
    let mut runtime = common_http::runtime_config();
    runtime.sse_client_frames = false;
    let server = Server::with(builder().runtime_config(runtime)).await;
    let mut stream = server.sse("/sse?rooms=news&token=alice").await;
    let sid = stream.welcome().await;
    joined(&mut stream, "news").await;
    let reply = server
        .post(
            &format!("/sse/send?sid={sid}&token=alice"),
            r#"{"type":"ping"}"#,
        )
        .await;
    reply.assert_error(StatusCode::FORBIDDEN, "forbidden");
    // Server push still works.
    server.publish("news", json!("headline")).await;
    let message = messages(&mut stream, 1).await;
    assert_eq!(message[0].data["data"], "headline");
}

#[tokio::test]
async fn every_error_code_comes_back_on_the_stream() {
    let server = Server::start().await;
    let mut stream = server.sse("/sse?token=alice").await;
    let sid = stream.welcome().await;
    let send = format!("/sse/send?sid={sid}&token=alice");
    for case in error_cases() {
        for frame in &case.frames {
            let reply = server.post(&send, frame.clone()).await;
            assert_eq!(reply.status, StatusCode::ACCEPTED, "{case:?}");
        }
        let (error, _) = stream.until("error").await;
        check_error(&case, &error.data);
    }

    // More frames at once than the bucket holds: each one is answered
    // exactly once, by an ack or by `rate_limited`.
    let burst = 40;
    server.post(&send, ping_burst(burst)).await;
    let mut answered = BTreeMap::new();
    while answered.len() < burst {
        let event = stream.expect().await;
        match event.kind() {
            "pong" => continue,
            "ack" => {}
            "error" => assert_eq!(event.data["code"], "rate_limited"),
            other => panic!("unexpected {other}: {:?}", event.data),
        }
        let id = event.data["id"].as_u64().expect("answers carry the id");
        assert!(
            answered.insert(id, event.kind().to_owned()).is_none(),
            "id {id} answered twice"
        );
    }
    assert!(
        answered.values().any(|kind| kind == "error"),
        "{answered:?}"
    );
    assert!(answered.values().any(|kind| kind == "ack"), "{answered:?}");
}

#[tokio::test]
async fn rooms_in_the_query_are_checked_like_joins() {
    let server = Server::start().await;
    let mut stream = server
        .sse("/sse?rooms=one,no%20spaces,private_x,two,three&token=alice")
        .await;
    stream.welcome().await;
    joined(&mut stream, "one").await;
    let error = stream.expect().await;
    assert_eq!(error.data["code"], "invalid_room");
    let error = stream.expect().await;
    assert_eq!(error.data["code"], "forbidden");
    assert_eq!(error.data["room"], "private_x");
    joined(&mut stream, "two").await;
    let error = stream.expect().await;
    assert_eq!(error.data["code"], "too_many_rooms");
    assert_eq!(error.data["room"], "three");
}

#[tokio::test]
async fn error_budget_closes_the_stream() {
    let mut config = config();
    config.max_errors = 3;
    let server = Server::with(builder().config(config)).await;
    let mut stream = server.sse("/sse?token=alice").await;
    let sid = stream.welcome().await;
    let send = format!("/sse/send?sid={sid}&token=alice");
    let bad = json!([{"type": "x"}, {"type": "y"}, {"type": "z"}, {"type": "ping"}]);
    server.post(&send, bad.to_string()).await;
    for _ in 0..3 {
        assert_eq!(stream.expect().await.data["code"], "unknown_type");
    }
    let close = stream.expect().await;
    assert_eq!(
        close.data,
        json!({"type": "close", "code": 1008, "reason": "too_many_errors"})
    );
    assert!(stream.next().await.is_none(), "the stream ends after close");
    assert_eq!(server.switchboard.metrics().sessions, 0);
    let reply = server.post(&send, r#"{"type":"ping"}"#).await;
    reply.assert_error(StatusCode::FORBIDDEN, "forbidden");
}

#[tokio::test]
async fn server_full_answers_503() {
    let mut config = config();
    config.max_sessions = 1;
    let server = Server::with(builder().config(config)).await;
    let mut first = server.sse("/sse?token=alice").await;
    first.welcome().await;
    server
        .get("/sse?token=bob")
        .await
        .assert_error(StatusCode::SERVICE_UNAVAILABLE, "server_full");
    server
        .post("/poll/open?token=bob", "")
        .await
        .assert_error(StatusCode::SERVICE_UNAVAILABLE, "server_full");
}

#[tokio::test]
async fn another_identitys_sid_is_refused() {
    let server = Server::start().await;
    let mut stream = server.sse("/sse?rooms=lobby&token=alice").await;
    let sid = stream.welcome().await;
    let frame = r#"{"type":"publish","room":"lobby","data":"forged"}"#;
    for path in [
        format!("/sse/send?sid={sid}&token=bob"),
        format!("/sse/send?sid={sid}"),
        "/sse/send?sid=not-a-session&token=alice".to_owned(),
    ] {
        server
            .post(&path, frame)
            .await
            .assert_error(StatusCode::FORBIDDEN, "forbidden");
    }
    server
        .post("/sse/send?token=alice", frame)
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_frame");
    // Nothing was published.
    joined(&mut stream, "lobby").await;
    server.publish("lobby", json!("real")).await;
    assert_eq!(messages(&mut stream, 1).await[0].data["seq"], 1);
}

#[tokio::test]
async fn oversize_send_body_is_413() {
    let server = Server::start().await;
    let mut stream = server.sse("/sse?token=alice").await;
    let sid = stream.welcome().await;
    let body = format!(
        r#"{{"type":"ping","pad":"{}"}}"#,
        "x".repeat(4 * config().max_frame_bytes)
    );
    server
        .post(&format!("/sse/send?sid={sid}&token=alice"), body)
        .await
        .assert_error(StatusCode::PAYLOAD_TOO_LARGE, "frame_too_large");
    // The session is unharmed.
    server
        .post(
            &format!("/sse/send?sid={sid}&token=alice"),
            r#"{"type":"ping"}"#,
        )
        .await;
    assert_eq!(stream.expect().await.kind(), "pong");
}

#[tokio::test]
async fn authentication_refusal_is_403() {
    let server = Server::with(builder().authenticator(KnownUsers)).await;
    for path in ["/sse?rooms=lobby&token=mallory", "/sse?rooms=lobby"] {
        server
            .get(path)
            .await
            .assert_error(StatusCode::FORBIDDEN, "forbidden");
    }
    let mut stream = server.sse("/sse?rooms=lobby&token=alice").await;
    let sid = stream.welcome().await;
    server
        .post(
            &format!("/sse/send?sid={sid}&token=mallory"),
            r#"{"type":"ping"}"#,
        )
        .await
        .assert_error(StatusCode::FORBIDDEN, "forbidden");
    assert_eq!(server.switchboard.metrics().sessions, 1);
}

#[tokio::test]
async fn keepalive_comments_while_idle() {
    let mut config = config();
    config.heartbeat_interval = Duration::from_millis(50);
    let server = Server::with(builder().config(config)).await;
    let mut stream = server.sse("/sse?rooms=lobby&token=alice").await;
    stream.welcome().await;
    joined(&mut stream, "lobby").await;
    within("keepalive comments", async {
        while stream.comments < 2 {
            tokio::time::sleep(Duration::from_millis(60)).await;
            // A message flushes whatever comments came before it.
            server.publish("lobby", json!("tick")).await;
            assert_eq!(stream.expect().await.kind(), "message");
        }
    })
    .await;
}

#[tokio::test]
async fn dropped_stream_frees_its_session() {
    let server = Server::start().await;
    let mut alice = server.sse("/sse?rooms=lobby&token=alice").await;
    alice.welcome().await;
    joined(&mut alice, "lobby").await;
    let mut bob = server.sse("/sse?rooms=lobby&token=bob").await;
    bob.welcome().await;
    joined(&mut bob, "lobby").await;
    assert_eq!(server.switchboard.metrics().sessions, 2);

    drop(bob);
    let switchboard = server.switchboard.clone();
    eventually("the dropped stream's session to be freed", || {
        switchboard.metrics().sessions == 1
    })
    .await;
    // Alice saw bob come and go.
    let (left, _) = alice.until("presence").await;
    assert_eq!(left.data["action"], "join");
    let (left, _) = alice.until("presence").await;
    assert_eq!(left.data["action"], "leave");
    assert_eq!(left.data["user"], "bob");
}

#[tokio::test]
async fn a_reader_that_stops_reading_is_closed_as_slow_consumer() {
    let mut runtime = runtime_config();
    runtime.max_outbound_bytes = 16 * 1024;
    let server = Server::with(builder().runtime_config(runtime)).await;
    // A small receive window, so the server's writes stall soon.
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let tcp = within("connect", socket.connect(server.addr))
        .await
        .expect("connect");
    let request = get(&server.addr.to_string(), "/sse?rooms=lobby&token=alice");
    let mut stream = SseReader::open(send_on(tcp, request).await);
    stream.welcome().await;
    joined(&mut stream, "lobby").await;

    // The client stops reading; the server keeps publishing.
    let switchboard = server.switchboard.clone();
    let data = json!({"pad": "x".repeat(600)});
    let published = within("the queue to overflow", async {
        let mut published = 0u64;
        while switchboard.metrics().slow_consumer_closes == 0 {
            server.publish("lobby", data.clone()).await;
            published += 1;
            tokio::task::yield_now().await; // the writer writes what it can
        }
        published
    })
    .await;
    assert_eq!(server.switchboard.metrics().sessions, 0);

    // Reading again: what was written arrives in order, then the close, then
    // the end of the stream; what was still queued was dropped.
    let mut seqs = Vec::new();
    let close = loop {
        let event = stream.expect().await;
        match event.kind() {
            "message" => seqs.push(event.data["seq"].as_u64().expect("a seq")),
            "close" => break event,
            other => panic!("unexpected {other}: {:?}", event.data),
        }
    };
    assert_eq!(
        close.data,
        json!({"type": "close", "code": 1013, "reason": "slow_consumer"})
    );
    assert!(stream.next().await.is_none(), "the stream ends after close");
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "in order, no gap"
    );
    assert!(
        (seqs.len() as u64) < published,
        "the queued rest was dropped"
    );
}

#[tokio::test]
async fn a_refused_origin_is_403_forbidden() {
    let server = Server::with(builder().origins(AllowOrigins::new(["https://app.example"]))).await;
    let authority = server.addr.to_string();
    let with_origin = |mut request: http::Request<_>, origin: &str| {
        request
            .headers_mut()
            .insert("origin", origin.parse().expect("a header value"));
        request
    };
    let open = |origin: &str| with_origin(get(&authority, "/sse?rooms=lobby&token=alice"), origin);
    server
        .fetch(open("https://evil.example"))
        .await
        .assert_error(StatusCode::FORBIDDEN, "forbidden");
    assert_eq!(server.switchboard.metrics().sessions, 0);
    assert!(
        server.switchboard.room("lobby").is_none(),
        "nothing was joined"
    );

    // A listed origin and the server's own are let in.
    let mut listed = server.sse_with(open("https://app.example")).await;
    let sid = listed.welcome().await;
    joined(&mut listed, "lobby").await;
    let mut own = server.sse_with(open(&format!("http://{authority}"))).await;
    own.welcome().await;

    // A page of another origin cannot send on an open stream either.
    let send = common_http::post(
        &authority,
        &format!("/sse/send?sid={sid}&token=alice"),
        json!({"type": "publish", "room": "lobby", "data": "forged"}).to_string(),
    );
    server
        .fetch(with_origin(send, "https://evil.example"))
        .await
        .assert_error(StatusCode::FORBIDDEN, "forbidden");
    server.publish("lobby", json!("real")).await;
    let message = messages(&mut listed, 1).await;
    assert_eq!(message[0].data["data"], "real");
    assert_eq!(
        message[0].data["seq"], 1,
        "the forged publish took no effect"
    );
}

#[tokio::test]
async fn sids_of_other_transports_take_no_frames_here() {
    let server = Server::start().await;
    let forged = json!({"type": "join", "room": "lobby", "id": 1}).to_string();

    let poller = Poller::open(&server, Some("alice")).await;
    server
        .post(
            &format!("/sse/send?sid={}&token=alice", poller.sid),
            forged.clone(),
        )
        .await
        .assert_error(StatusCode::FORBIDDEN, "forbidden");

    let (ws, ws_sid) = server.websocket("alice").await;
    server
        .post(
            &format!("/sse/send?sid={ws_sid}&token=alice"),
            forged.clone(),
        )
        .await
        .assert_error(StatusCode::FORBIDDEN, "forbidden");
    assert!(
        server.switchboard.room("lobby").is_none(),
        "nothing was joined"
    );

    // An SSE sid works here.
    let mut stream = server.sse("/sse?token=alice").await;
    let sid = stream.welcome().await;
    let reply = server
        .post(&format!("/sse/send?sid={sid}&token=alice"), forged)
        .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    let event = stream.expect().await;
    assert_eq!(
        (event.kind(), &event.data["room"]),
        ("joined", &json!("lobby"))
    );
    // Not a room of the stream's query, so not in its cursor.
    assert!(event.id.is_none(), "{:?}", event.id);
    assert_eq!(
        server.switchboard.room("lobby").expect("joined").sessions,
        1
    );
    drop(ws);
}
