//! What the browser tests share: finding Chromium and Node (and failing,
//! saying what to install, when they are missing), installing
//! playwright-core once (`npm ci` in `examples/browser-tests`), and running
//! `node --test` on a test file with a time limit.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use tokio::process::Command;

/// `npm ci` of one package.
const NPM_CI_TIMEOUT: Duration = Duration::from_secs(300);
const INSTALL: &str = "the browser tests need Chromium and Node.js 20+ with npm: \
                       `apt-get update && apt-get install -y chromium nodejs npm` \
                       (or point CHROMIUM_PATH at a Chromium binary)";

/// The browser: `CHROMIUM_PATH`, else Debian's `/usr/bin/chromium`.
pub(crate) fn chromium() -> PathBuf {
    std::env::var_os("CHROMIUM_PATH")
        .map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from)
}

/// The workspace root.
pub(crate) fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("examples/ sits in the workspace")
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
pub(crate) async fn run(mut command: Command, limit: Duration, what: &str) -> Output {
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

/// A child's stdout and stderr, for messages.
pub(crate) fn text(output: &Output) -> String {
    format!(
        "--- stdout ---\n{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Fails the test, saying what to install, unless Chromium and Node 20+ are
/// here; installs playwright-core (`npm ci`) when it is not yet. Missing
/// tools fail the test: a browser test that passes without a browser would
/// hide that it never ran.
pub(crate) async fn prepare() -> PathBuf {
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
    let tests_dir = workspace().join("examples/browser-tests");
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
    chromium
}

/// Runs `node --test examples/browser-tests/<file>` from the workspace root
/// with `env` (plus `CHROMIUM_PATH` and `SCREENSHOT_DIR`), prints its output,
/// and fails the test when it fails.
pub(crate) async fn node_test(
    file: &str,
    env: &[(&str, String)],
    screenshots: &Path,
    limit: Duration,
) -> Output {
    let mut node = Command::new("node");
    node.args(["--test", &format!("examples/browser-tests/{file}")])
        .current_dir(workspace())
        .env("CHROMIUM_PATH", chromium())
        .env("SCREENSHOT_DIR", screenshots);
    for (key, value) in env {
        node.env(key, value);
    }
    let output = run(node, limit, &format!("node --test {file}")).await;
    // Shown with `--nocapture`, and by the harness when the test fails.
    println!("{}", text(&output));
    assert!(
        output.status.success(),
        "the browser test {file} failed:\n{}",
        text(&output)
    );
    println!("screenshots: {}", screenshots.display());
    output
}
