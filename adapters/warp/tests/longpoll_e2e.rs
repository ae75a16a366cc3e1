//! End-to-end tests of the long-poll transport over 127.0.0.1: a real warp
//! server with `switchboard_warp::routes` and a plain HTTP/1.1 client.

mod common_http;

use std::collections::BTreeMap;
use std::time::Duration;

use common_http::{
    builder, check_error, config, error_cases, eventually, ping_burst, runtime_config, within,
    KnownUsers, Poller, Reply, Server,
};
use http::StatusCode;
use serde_json::{json, Value};
use switchboard_runtime::AllowOrigins;

fn kinds(frames: &[Value]) -> Vec<&str> {
    frames
        .iter()
        .map(|f| f["type"].as_str().unwrap_or_default())
        .collect()
}

#[tokio::test]
async fn open_answers_welcome() {
    let server = Server::start().await;
    let opened = server.post("/poll/open?token=alice", "").await;
    assert_eq!(
        opened.headers.get("cache-control").map(|v| v.as_bytes()),
        Some(&b"no-store"[..])
    );
    let frames = opened.frames();
    assert_eq!(kinds(&frames), ["welcome"]);
    let welcome = &frames[0];
    assert_eq!(welcome["user"], "alice");
    assert_eq!(
        welcome["sid"].as_str().unwrap().len(),
        22,
        "128 bits, base64"
    );
    assert_eq!(
        welcome["limits"],
        json!({"max_frame_bytes": 1024, "max_rooms": 2, "rate_per_sec": 1})
    );
    assert!(welcome["heartbeat"]["interval_ms"].is_u64());
    assert_eq!(server.switchboard.metrics().sessions, 1);

    // Opening is a POST.
    server
        .get("/poll/open?token=alice")
        .await
        .assert_error(StatusCode::METHOD_NOT_ALLOWED, "invalid_frame");
}

#[tokio::test]
async fn messages_arrive_in_order_across_polls() {
    let server = Server::start().await;
    let mut poller = Poller::open(&server, Some("alice")).await;
    poller
        .send(json!({"type": "join", "room": "lobby", "id": 1}).to_string())
        .await;
    let (joined, _) = poller.until("joined").await;
    assert_eq!(joined["room"], "lobby");

    // Publish while polling: answers split the messages at arbitrary points.
    let total = 60;
    let publisher = async {
        for i in 1..=total {
            server.publish("lobby", json!(i)).await;
            if i % 7 == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    let receiver = async {
        let mut seqs = Vec::new();
        let mut answers = 0;
        while seqs.len() < total {
            let frames = poller.poll().await;
            answers += 1;
            for frame in frames.iter().filter(|f| f["type"] == "message") {
                assert_eq!(frame["data"], frame["seq"]);
                seqs.push(frame["seq"].as_u64().unwrap());
            }
        }
        (seqs, answers)
    };
    let ((), (seqs, answers)) =
        within("all messages", async { tokio::join!(publisher, receiver) }).await;
    assert_eq!(seqs, (1..=total as u64).collect::<Vec<_>>());
    assert!(answers >= 1);
}

#[tokio::test]
async fn lost_answer_is_sent_again_until_acknowledged() {
    let server = Server::start().await;
    let poller = Poller::open(&server, Some("alice")).await;
    poller
        .send(
            json!([
                {"type": "join", "room": "lobby", "id": "j"},
                {"type": "publish", "room": "lobby", "data": "one", "id": "p"},
            ])
            .to_string(),
        )
        .await;

    // ack=1: the client got `[welcome]` from open.
    let first = poller.poll_raw(1).await;
    let frames = first.frames();
    assert_eq!(kinds(&frames), ["joined", "ack", "message", "ack"]);

    // The answer was lost: poll again acknowledging nothing, get the same bytes.
    let again = poller.poll_raw(0).await;
    assert_eq!(again.body, first.body, "resent exactly");

    // Part of it arrived: the rest comes again, nothing twice.
    let rest = poller.poll_raw(2).await.frames();
    assert_eq!(rest, frames[2..]);

    // All acknowledged: only what is new.
    server.publish("lobby", json!("two")).await;
    let next = poller.poll_raw(2).await.frames();
    assert_eq!(kinds(&next), ["message"]);
    assert_eq!(next[0]["seq"], 2);
    assert_eq!(next[0]["data"], "two");

    // Nothing new: the poll waits out its timeout and answers [].
    let empty = poller.poll_raw(1).await.frames();
    assert!(empty.is_empty(), "{empty:?}");
}

#[tokio::test]
async fn second_poll_ends_the_first_with_empty_answer() {
    let mut runtime = runtime_config();
    // Far longer than the test: a poll that ends did not time out.
    runtime.poll_timeout = Duration::from_secs(60);
    let server = Server::with(builder().runtime_config(runtime)).await;
    let poller = Poller::open(&server, Some("alice")).await;

    // Both acknowledge `[welcome]`; whichever comes second acknowledges nothing more.
    let first = poller.poll_raw(1);
    let second = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        poller.poll_raw(1).await
    };
    tokio::pin!(first, second);
    // Whichever reached the server first is ended by the other with [].
    let (ended, waiting_is_first) = within("one poll to end the other", async {
        tokio::select! {
            reply = &mut first => (reply, false),
            reply = &mut second => (reply, true),
        }
    })
    .await;
    assert!(ended.frames().is_empty(), "{:?}", ended.body);

    let delivered = server
        .switchboard
        .send_to_session(&poller.sid, Some("hello"), &json!("direct"))
        .await
        .unwrap();
    assert_eq!(delivered, 1);
    let reply = if waiting_is_first {
        within("the current poll", first).await
    } else {
        within("the current poll", second).await
    };
    let frames = reply.frames();
    assert_eq!(kinds(&frames), ["direct"]);
    assert_eq!(frames[0]["from"], json!({"server": true}));
    assert_eq!(frames[0]["event"], "hello");
}

/// Polls a session the core has closed: the first poll gets its `close`
/// frame (unless the transport already freed it), then polls are refused.
async fn expect_closed(poller: &mut Poller<'_>, reason: &str) {
    let reply = poller.poll_raw(poller.ack).await;
    if reply.status == StatusCode::OK {
        let frames = reply.frames();
        let close = frames.last().expect("a closed session's last answer");
        assert_eq!(close["type"], "close", "{frames:?}");
        assert_eq!(close["reason"], reason);
        poller.ack = frames.len();
        let reply = poller.poll_raw(poller.ack).await;
        reply.assert_error(StatusCode::FORBIDDEN, "forbidden");
    } else {
        reply.assert_error(StatusCode::FORBIDDEN, "forbidden");
    }
    poller
        .send_raw(r#"{"type":"ping"}"#)
        .await
        .assert_error(StatusCode::FORBIDDEN, "forbidden");
    // Refused for good.
    poller
        .poll_raw(0)
        .await
        .assert_error(StatusCode::FORBIDDEN, "forbidden");
}

#[tokio::test]
async fn idle_session_is_closed_and_freed() {
    let mut config = config();
    config.session_idle = Duration::from_secs(1);
    let mut runtime = runtime_config();
    // The transport keeps a closed session one poll timeout for its `close`.
    runtime.poll_timeout = Duration::from_secs(5);
    let server = Server::with(builder().config(config).runtime_config(runtime)).await;
    let mut poller = Poller::open(&server, Some("alice")).await;
    poller
        .send(json!({"type": "join", "room": "lobby"}).to_string())
        .await;
    assert_eq!(server.switchboard.metrics().sessions, 1);

    // Never polled: detached longer than session_idle.
    let switchboard = server.switchboard.clone();
    eventually("the idle session to close", || {
        switchboard.metrics().sessions == 0
    })
    .await;
    let metrics = server.switchboard.metrics();
    let idle = metrics
        .closes
        .iter()
        .find(|(reason, _)| reason.as_str() == "idle")
        .map(|(_, n)| *n);
    assert_eq!(idle, Some(1));
    assert!(
        server
            .switchboard
            .room("lobby")
            .is_none_or(|r| r.sessions == 0),
        "the room no longer holds it"
    );

    // The client learns why (the joined frame is still unacknowledged, then close).
    let reply = poller.poll_raw(poller.ack).await;
    let frames = reply.frames();
    assert_eq!(kinds(&frames), ["joined", "close"]);
    assert_eq!(
        frames[1],
        json!({"type": "close", "code": 1001, "reason": "idle"})
    );
    poller.ack = frames.len();
    expect_closed(&mut poller, "idle").await;
}

#[tokio::test]
async fn a_poller_that_stops_polling_is_closed_idle_not_heartbeat_timeout() {
    let mut config = config();
    config.heartbeat_interval = Duration::from_millis(300);
    config.heartbeat_timeout = Duration::from_millis(300);
    config.session_idle = Duration::from_secs(1);
    let mut runtime = runtime_config();
    runtime.poll_timeout = Duration::from_secs(5);
    let server = Server::with(builder().config(config).runtime_config(runtime)).await;
    let mut poller = Poller::open(&server, Some("alice")).await;

    // While a poll waits the server pings; the answer ends the poll ...
    let (_ping, before) = poller.until("ping").await;
    assert!(before.is_empty(), "{before:?}");
    // ... and the client never answers nor polls again: it is the missing
    // polls that close it (`idle`), not the unanswered ping.
    let switchboard = server.switchboard.clone();
    eventually("the idle close", || switchboard.metrics().sessions == 0).await;
    let metrics = server.switchboard.metrics();
    assert_eq!(metrics.heartbeat_timeouts, 0, "{metrics:?}");
    assert_eq!(close_count(&server, "idle"), 1, "{metrics:?}");
    let frames = poller.poll().await;
    assert_eq!(
        frames,
        [json!({"type": "close", "code": 1001, "reason": "idle"})]
    );
    expect_closed(&mut poller, "idle").await;
}

/// How many sessions were closed with `reason`.
fn close_count(server: &Server, reason: &str) -> u64 {
    server
        .switchboard
        .metrics()
        .closes
        .iter()
        .find(|(r, _)| r.as_str() == reason)
        .map_or(0, |(_, n)| *n)
}

#[tokio::test]
async fn a_session_that_answers_pings_stays_open() {
    let mut config = config();
    config.heartbeat_interval = Duration::from_millis(300);
    config.heartbeat_timeout = Duration::from_millis(300);
    let server = Server::with(builder().config(config)).await;
    let mut poller = Poller::open(&server, Some("alice")).await;
    for _ in 0..3 {
        poller.until("ping").await;
        poller.send(r#"{"type":"pong"}"#).await;
    }
    assert_eq!(server.switchboard.metrics().sessions, 1);
    assert_eq!(server.switchboard.metrics().heartbeat_timeouts, 0);
}

#[tokio::test]
async fn every_error_code_comes_back_in_polls() {
    let server = Server::start().await;
    let mut poller = Poller::open(&server, Some("alice")).await;
    for case in error_cases() {
        for frame in &case.frames {
            poller.send(frame.clone()).await;
        }
        let (error, _) = poller.until("error").await;
        check_error(&case, &error);
    }

    let burst = 40;
    poller.send(ping_burst(burst)).await;
    let mut answered = BTreeMap::new();
    within("every ping answered", async {
        while answered.len() < burst {
            for frame in poller.poll().await {
                match frame["type"].as_str().unwrap() {
                    "pong" => continue,
                    "ack" => {}
                    "error" => assert_eq!(frame["code"], "rate_limited"),
                    other => panic!("unexpected {other}: {frame}"),
                }
                let id = frame["id"].as_u64().expect("answers carry the id");
                let kind = frame["type"].as_str().unwrap().to_owned();
                assert!(
                    answered.insert(id, kind).is_none(),
                    "id {id} answered twice"
                );
            }
        }
    })
    .await;
    assert!(
        answered.values().any(|kind| kind == "error"),
        "{answered:?}"
    );
    assert!(answered.values().any(|kind| kind == "ack"), "{answered:?}");
}

#[tokio::test]
async fn error_budget_closes_the_session() {
    let mut config = config();
    config.max_errors = 3;
    let server = Server::with(builder().config(config)).await;
    let mut poller = Poller::open(&server, Some("alice")).await;
    // No poll in flight: the close waits for the next one.
    let bad = json!([{"type": "x"}, {"type": "y"}, {"type": "z"}, {"type": "ping"}]);
    poller.send(bad.to_string()).await;
    assert_eq!(server.switchboard.metrics().sessions, 0);
    let frames = poller.poll().await;
    assert_eq!(kinds(&frames), ["error", "error", "error", "close"]);
    assert_eq!(
        frames[3],
        json!({"type": "close", "code": 1008, "reason": "too_many_errors"})
    );
    expect_closed(&mut poller, "too_many_errors").await;
}

#[tokio::test]
async fn server_full_answers_503() {
    let mut config = config();
    config.max_sessions = 1;
    let server = Server::with(builder().config(config)).await;
    let _first = Poller::open(&server, Some("alice")).await;
    server
        .post("/poll/open?token=bob", "")
        .await
        .assert_error(StatusCode::SERVICE_UNAVAILABLE, "server_full");
    server
        .get("/sse?token=bob")
        .await
        .assert_error(StatusCode::SERVICE_UNAVAILABLE, "server_full");
}

#[tokio::test]
async fn another_identitys_sid_is_refused() {
    let server = Server::start().await;
    let mut alice = Poller::open(&server, Some("alice")).await;
    let forged = r#"{"type":"join","room":"lobby"}"#;
    for auth in ["&token=bob", ""] {
        let thief = Poller {
            server: &server,
            sid: alice.sid.clone(),
            auth: auth.to_owned(),
            ack: 0,
        };
        thief
            .poll_raw(1)
            .await
            .assert_error(StatusCode::FORBIDDEN, "forbidden");
        thief
            .send_raw(forged)
            .await
            .assert_error(StatusCode::FORBIDDEN, "forbidden");
    }
    server
        .get("/poll?sid=no-such-session&token=alice")
        .await
        .assert_error(StatusCode::FORBIDDEN, "forbidden");
    server
        .get("/poll?token=alice")
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_frame");
    // Alice's session saw none of it.
    assert!(alice.poll().await.is_empty());
    assert!(server.switchboard.room("lobby").is_none());
}

#[tokio::test]
async fn oversize_send_body_is_413() {
    let server = Server::start().await;
    let mut poller = Poller::open(&server, Some("alice")).await;
    let body = format!(
        r#"{{"type":"ping","pad":"{}"}}"#,
        "x".repeat(4 * config().max_frame_bytes)
    );
    poller
        .send_raw(body)
        .await
        .assert_error(StatusCode::PAYLOAD_TOO_LARGE, "frame_too_large");
    poller.send(r#"{"type":"ping","id":1}"#).await;
    assert_eq!(
        poller.poll().await,
        [json!({"type": "pong"}), json!({"type": "ack", "id": 1})]
    );
}

#[tokio::test]
async fn authentication_refusal_is_403() {
    let server = Server::with(builder().authenticator(KnownUsers)).await;
    for path in ["/poll/open?token=mallory", "/poll/open"] {
        server
            .post(path, "")
            .await
            .assert_error(StatusCode::FORBIDDEN, "forbidden");
    }
    // The bearer header works as well as the query.
    let opened = server
        .fetch({
            let mut request = common_http::post(&server.addr.to_string(), "/poll/open", "");
            request
                .headers_mut()
                .insert("authorization", "Bearer bob".parse().unwrap());
            request
        })
        .await;
    assert_eq!(opened.frames()[0]["user"], "bob");
    let alice = Poller::open(&server, Some("alice")).await;
    let mallory = Poller {
        server: &server,
        sid: alice.sid.clone(),
        auth: "&token=mallory".to_owned(),
        ack: 1,
    };
    mallory
        .poll_raw(1)
        .await
        .assert_error(StatusCode::FORBIDDEN, "forbidden");
    mallory
        .send_raw(r#"{"type":"ping"}"#)
        .await
        .assert_error(StatusCode::FORBIDDEN, "forbidden");
    assert_eq!(server.switchboard.metrics().sessions, 2);
}

// ---- the outbound bound -----------------------------------------------------

/// The outbound bound of the slow-consumer tests, and the data of one
/// message (a `message` frame of about 250 bytes).
const SMALL_BOUND: usize = 4096;
fn payload(i: usize) -> Value {
    json!({"i": i, "pad": "x".repeat(150)})
}

fn small_bound_server_builder() -> switchboard_runtime::Builder {
    let mut runtime = runtime_config();
    runtime.max_outbound_bytes = SMALL_BOUND;
    builder().runtime_config(runtime)
}

/// Opens a poller for `alice` in `lobby`, with everything so far acknowledged.
async fn joined_poller(server: &Server) -> Poller<'_> {
    let mut poller = Poller::open(server, Some("alice")).await;
    poller
        .send(json!({"type": "join", "room": "lobby"}).to_string())
        .await;
    poller.until("joined").await;
    poller
}

/// Asserts an answer fits in the bound (frames, plus the array's commas and brackets).
fn assert_within_bound(reply: &Reply) {
    let frames = reply.frames().len();
    assert!(
        reply.body.len() <= SMALL_BOUND + frames + 1,
        "an answer of {} bytes passed the bound of {SMALL_BOUND}",
        reply.body.len()
    );
}

#[tokio::test]
async fn a_poller_that_never_acknowledges_is_closed_as_slow_consumer() {
    let server = Server::with(small_bound_server_builder()).await;
    let mut poller = joined_poller(&server).await;
    poller.poll_raw(poller.ack).await; // acknowledges `joined`, waits out a poll

    // Every poll says `ack=0`: the answers are sent again and grow with each
    // new message, until what the client holds unacknowledged plus the queue
    // passes the bound.
    let close = within("the slow_consumer close", async {
        for i in 0..10 * SMALL_BOUND {
            server.publish("lobby", payload(i)).await;
            let reply = poller.poll_raw(0).await;
            assert_within_bound(&reply);
            let frames = reply.frames();
            if let Some(last) = frames.last().filter(|f| f["type"] == "close") {
                // What was not acknowledged is dropped: the close comes alone.
                assert_eq!(frames.len(), 1, "{frames:?}");
                return last.clone();
            }
            assert!(frames.iter().all(|f| f["type"] == "message"), "{frames:?}");
            assert_eq!(frames.len(), i + 1, "resent whole, in order");
        }
        panic!("never closed: the resend buffer grows without bound");
    })
    .await;
    assert_eq!(
        close,
        json!({"type": "close", "code": 1013, "reason": "slow_consumer"})
    );
    assert_eq!(server.switchboard.metrics().slow_consumer_closes, 1);
    assert_eq!(server.switchboard.metrics().sessions, 0);
    poller.ack = 1;
    expect_closed(&mut poller, "slow_consumer").await;
}

#[tokio::test]
async fn acknowledged_answers_free_the_bound() {
    let server = Server::with(small_bound_server_builder()).await;
    let mut poller = joined_poller(&server).await;
    // Far more than the bound in all, a little at a time, each acknowledged.
    let total = 4 * SMALL_BOUND / 250;
    let mut seqs = Vec::new();
    for i in 0..total {
        server.publish("lobby", payload(i)).await;
        server.publish("lobby", payload(i)).await;
        within("both messages", async {
            while seqs.len() < 2 * (i + 1) {
                for frame in poller.poll().await {
                    assert_eq!(frame["type"], "message", "{frame}");
                    seqs.push(frame["seq"].as_u64().expect("a seq"));
                }
            }
        })
        .await;
    }
    assert_eq!(seqs, (1..=2 * total as u64).collect::<Vec<_>>());
    assert_eq!(server.switchboard.metrics().slow_consumer_closes, 0);
    assert_eq!(server.switchboard.metrics().sessions, 1);
}

#[tokio::test]
async fn a_poller_that_stops_polling_is_closed_as_slow_consumer() {
    let server = Server::with(small_bound_server_builder()).await;
    let mut poller = joined_poller(&server).await;
    // The answer with `joined` is acknowledged by no poll; then messages
    // queue up while nobody polls.
    let switchboard = server.switchboard.clone();
    within("the queue to overflow", async {
        let mut i = 0;
        while switchboard.metrics().slow_consumer_closes == 0 {
            server.publish("lobby", payload(i)).await;
            i += 1;
            tokio::task::yield_now().await; // lets `within` time out
        }
    })
    .await;
    assert_eq!(server.switchboard.metrics().sessions, 0);
    // What was queued is dropped; the client learns why, and recovers with `since`.
    let frames = poller.poll().await;
    assert_eq!(
        frames,
        [json!({"type": "close", "code": 1013, "reason": "slow_consumer"})]
    );
    expect_closed(&mut poller, "slow_consumer").await;
    assert_eq!(close_count(&server, "slow_consumer"), 1);
}

// ---- origins and other transports' sids -------------------------------------

/// `request` with an `Origin` header.
fn with_origin(
    mut request: http::Request<http_body_util::Full<bytes::Bytes>>,
    origin: &str,
) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    request
        .headers_mut()
        .insert("origin", origin.parse().expect("a header value"));
    request
}

#[tokio::test]
async fn a_refused_origin_is_403_forbidden() {
    let server = Server::with(builder().origins(AllowOrigins::new(["https://app.example"]))).await;
    let authority = server.addr.to_string();
    let open = |origin: &str| {
        with_origin(
            common_http::post(&authority, "/poll/open?token=alice", ""),
            origin,
        )
    };
    server
        .fetch(open("https://evil.example"))
        .await
        .assert_error(StatusCode::FORBIDDEN, "forbidden");
    assert_eq!(server.switchboard.metrics().sessions, 0);

    // A listed origin and the server's own are let in.
    let listed = server.fetch(open("https://app.example")).await.frames();
    assert_eq!(kinds(&listed), ["welcome"]);
    let own = server.fetch(open(&format!("http://{authority}"))).await;
    assert_eq!(kinds(&own.frames()), ["welcome"]);

    // A page of another origin cannot poll or send on an open session either.
    let sid = listed[0]["sid"].as_str().unwrap();
    let poll = common_http::get(&authority, &format!("/poll?sid={sid}&ack=1&token=alice"));
    server
        .fetch(with_origin(poll, "https://evil.example"))
        .await
        .assert_error(StatusCode::FORBIDDEN, "forbidden");
    let send = common_http::post(
        &authority,
        &format!("/poll/send?sid={sid}&token=alice"),
        json!({"type": "join", "room": "lobby"}).to_string(),
    );
    server
        .fetch(with_origin(send, "https://evil.example"))
        .await
        .assert_error(StatusCode::FORBIDDEN, "forbidden");
    assert!(
        server.switchboard.room("lobby").is_none(),
        "nothing was applied"
    );
}

#[tokio::test]
async fn sids_of_other_transports_take_no_frames_here() {
    let mut runtime = runtime_config();
    // Push-only SSE: a way around `/sse/send` through `/poll/send` would
    // let an SSE session send after all.
    runtime.sse_client_frames = false;
    let server = Server::with(builder().runtime_config(runtime)).await;
    let forged = json!({"type": "join", "room": "lobby", "id": 1}).to_string();

    let mut sse = server.sse("/sse?token=alice").await;
    let sse_sid = sse.welcome().await;
    server
        .post(
            &format!("/poll/send?sid={sse_sid}&token=alice"),
            forged.clone(),
        )
        .await
        .assert_error(StatusCode::FORBIDDEN, "forbidden");
    server
        .get(&format!("/poll?sid={sse_sid}&ack=0&token=alice"))
        .await
        .assert_error(StatusCode::FORBIDDEN, "forbidden");

    let (ws, ws_sid) = server.websocket("alice").await;
    server
        .post(
            &format!("/poll/send?sid={ws_sid}&token=alice"),
            forged.clone(),
        )
        .await
        .assert_error(StatusCode::FORBIDDEN, "forbidden");

    // A long-poll sid works here, and nowhere else.
    let mut poller = Poller::open(&server, Some("alice")).await;
    poller.send(forged.clone()).await;
    let (joined, _) = poller.until("joined").await;
    assert_eq!(joined["room"], "lobby");
    let room = server.switchboard.room("lobby").expect("the poller joined");
    assert_eq!(room.sessions, 1, "only the long-poll session joined");
    drop(ws);
    drop(sse);
}

// ---- shutdown ---------------------------------------------------------------

#[tokio::test]
async fn polls_during_shutdown_fetch_the_close_and_shutdown_does_not_wait_out_its_timeout() {
    let mut runtime = runtime_config();
    // Both far longer than the test: shutdown returning shows it waited for
    // neither the shutdown timeout nor the long-poll grace period.
    runtime.poll_timeout = Duration::from_secs(600);
    runtime.shutdown_timeout = Duration::from_secs(600);
    let server = Server::with(builder().runtime_config(runtime)).await;
    let mut waiting = Poller::open(&server, Some("alice")).await;
    let mut late = Poller::open(&server, Some("bob")).await;
    // `waiting` has a poll in flight when shutdown starts (give it a moment
    // to reach the server; if it comes later it is answered alike).
    let switchboard = server.switchboard.clone();
    let shutdown = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        switchboard.shutdown().await;
    });
    let in_flight = within("the poll in flight", waiting.poll_raw(1)).await;
    let going_away = json!({"type": "close", "code": 1001, "reason": "going_away"});
    assert_eq!(in_flight.frames(), std::slice::from_ref(&going_away));
    waiting.ack = 1;

    // No new sessions, but the late poll still gets its queued close.
    server
        .post("/poll/open?token=carol", "")
        .await
        .assert_error(StatusCode::SERVICE_UNAVAILABLE, "server_full");
    assert_eq!(late.poll().await, [going_away]);

    within("shutdown to return", shutdown)
        .await
        .expect("shutdown does not panic");
    for poller in [&mut waiting, &mut late] {
        poller
            .poll_raw(poller.ack)
            .await
            .assert_error(StatusCode::FORBIDDEN, "forbidden");
    }
}
