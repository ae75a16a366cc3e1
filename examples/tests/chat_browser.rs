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

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use switchboard_examples::chat;
use tokio::process::Command;

/// The whole browser run (about 45 s here, most of it the heartbeat check).
const BROWSER_TEST_TIMEOUT: Duration = Duration::from_secs(300);
/// `npm ci` of one package.
const NPM_CI_TIMEOUT: Duration = Duration::from_secs(300);
const INSTALL: &str = "the chat's browser test needs Chromium and Node.js 20+ with npm: \
                       `apt-get update && apt-get install -y chromium nodejs npm` \
                       (or point CHROMIUM_PATH at a Chromium binary)";

fn chromium() -> PathBuf {
    std::env::var_os("CHROMIUM_PATH")
        .map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from)
}

/// Node's major version, if `node` runs at all.
fn node_major() -> Option<u32> {
    let output = std::process::Command::new("node")
        .arg("--version")
        .output()
        .ok()?;
    let version = String::from_utf8(output.stdout).ok()?;
    version
        .trim()
        .trim_start_matches('v')
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// Runs `command` to completion within `limit`; the child is killed if the
/// limit passes or the test panics (kill_on_drop).
async fn run(mut command: Command, limit: Duration, what: &str) -> Output {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = command
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}; {INSTALL}"));
    match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => panic!("{what} failed to run: {e}"),
        // Dropping the future dropped the child, which kills it.
        Err(_) => panic!("{what} did not finish within {limit:?}; killed"),
    }
}

fn text(output: &Output) -> String {
    format!(
        "--- stdout ---\n{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_works_in_a_real_browser() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR"));
    let workspace = examples.parent().expect("examples/ sits in the workspace");
    let tests_dir = examples.join("browser-tests");

    // Missing tools fail the test: a browser test that passes without a
    // browser would hide that it never ran.
    let chromium = chromium();
    assert!(
        chromium.exists(),
        "no Chromium at {}: {INSTALL}",
        chromium.display()
    );
    match node_major() {
        Some(major) if major >= 20 => {}
        Some(major) => panic!("Node.js {major} is too old: {INSTALL}"),
        None => panic!("`node` not found: {INSTALL}"),
    }
    if !tests_dir
        .join("node_modules/playwright-core/package.json")
        .exists()
    {
        let mut npm = Command::new("npm");
        npm.args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&tests_dir);
        let output = run(npm, NPM_CI_TIMEOUT, "`npm ci` in examples/browser-tests").await;
        assert!(output.status.success(), "npm ci failed:\n{}", text(&output));
    }

    let switchboard = chat::switchboard().expect("chat switchboard");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let url = format!("http://{}/", listener.local_addr().expect("local addr"));
    let server = tokio::spawn(chat::serve(listener, switchboard.clone()));

    let screenshots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("chat-browser");
    let mut node = Command::new("node");
    node.args(["--test", "examples/browser-tests/chat.test.mjs"])
        .current_dir(workspace)
        .env("CHAT_URL", &url)
        .env("CHROMIUM_PATH", &chromium)
        .env("SCREENSHOT_DIR", &screenshots);
    let output = run(node, BROWSER_TEST_TIMEOUT, "node --test chat.test.mjs").await;
    // Shown with `--nocapture`, and by the harness when the test fails.
    println!("{}", text(&output));
    assert!(
        output.status.success(),
        "the browser test failed (chat at {url}):\n{}",
        text(&output)
    );
    println!("screenshots: {}", screenshots.display());

    switchboard.shutdown().await;
    server.await.expect("chat server task");
}
