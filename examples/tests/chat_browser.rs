//! The chat example in a real browser.
//!
//! Starts the chat in this process on a free port, then runs
//! `node --test examples/browser-tests/chat.test.mjs`, which drives headless
//! Chromium through playwright-core: three tabs as two users, messages, sides,
//! private messages, escaping, several rooms, reconnection with `since`,
//! leave notices and the heartbeat. Screenshots land in
//! `target/tmp/chat-browser/`.
//!
//! Needs Chromium (`apt-get install -y chromium`, or `CHROMIUM_PATH`) and
//! Node 20+ with npm; it fails, saying what to install, when they are missing.
//! It runs `npm ci` in `examples/browser-tests` when its `node_modules` is not
//! there yet (that needs the npm registry once).

mod browser;

use std::path::Path;
use std::time::Duration;

use switchboard_examples::chat;

/// The whole browser run (about 45 s here, most of it the heartbeat check).
const BROWSER_TEST_TIMEOUT: Duration = Duration::from_secs(300);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_works_in_a_real_browser() {
    browser::prepare().await;

    let switchboard = chat::switchboard().expect("chat switchboard");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let url = format!("http://{}/", listener.local_addr().expect("local addr"));
    let server = tokio::spawn(chat::serve(listener, switchboard.clone()));

    let screenshots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("chat-browser");
    browser::node_test(
        "chat.test.mjs",
        &[("CHAT_URL", url)],
        &screenshots,
        BROWSER_TEST_TIMEOUT,
    )
    .await;

    switchboard.shutdown().await;
    server.await.expect("chat server task");
}
