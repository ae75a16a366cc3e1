//! Nodes reaching Redis over TLS (`rediss://`, feature `tls`, on by default
//! in this crate): a CA and a server certificate for 127.0.0.1 are made
//! with `openssl`, `redis-server` serves TLS only, and two nodes given the
//! CA with `--redis-ca-file` share a room through it. A node without the CA
//! refuses the server's certificate (no insecure fallback).
//!
//! Processes are owned by guards that kill them on drop; every wait is
//! bounded by [`WAIT`]. Logs: `$CARGO_TARGET_TMPDIR/cluster/<test>-<name>.log`.

#![cfg(feature = "tls")]

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;

use support::*;

/// A child process killed on drop.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!("openssl is needed for the TLS test (apt-get install -y openssl): {e}")
        });
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A CA (`ca.crt`) and a certificate it signed for IP 127.0.0.1
/// (`server.crt`, `server.key`), in `dir`.
fn make_certificates(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec![
        "req",
        "-x509",
        "-days",
        "2",
        "-subj",
        "/CN=switchboard test CA",
    ];
    ca.extend(ec);
    ca.extend(["-keyout", "ca.key", "-out", "ca.crt"]);
    ca.extend(["-addext", "basicConstraints=critical,CA:TRUE"]);
    ca.extend(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
    openssl(dir, &ca);
    let mut csr = vec!["req", "-subj", "/CN=127.0.0.1"];
    csr.extend(ec);
    csr.extend(["-keyout", "server.key", "-out", "server.csr"]);
    openssl(dir, &csr);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
         keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .expect("write server.ext");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "server.ext",
            "-out",
            "server.crt",
        ],
    );
}

/// `redis-server` listening only for TLS, with the certificate in `dir`.
async fn tls_redis(test: &str, dir: &Path) -> RedisProcess {
    let file = |name: &str| dir.join(name).display().to_string();
    RedisProcess::start(test, "redis-tls", |port| {
        [
            "--port",
            "0",
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .chain([
            "--tls-port".to_owned(),
            port.to_string(),
            "--tls-cert-file".to_owned(),
            file("server.crt"),
            "--tls-key-file".to_owned(),
            file("server.key"),
            "--tls-ca-cert-file".to_owned(),
            file("ca.crt"),
            "--tls-auth-clients".to_owned(),
            "no".to_owned(),
            "--dir".to_owned(),
            dir.display().to_string(),
        ])
        .collect()
    })
    .await
}

/// Two nodes with the CA share a room over `rediss://`: joins, publishes
/// and delivery across nodes (commands and pub/sub both over TLS). A node
/// without the CA does not start: the certificate is checked.
#[test]
fn nodes_share_rooms_through_redis_over_tls() {
    run(async {
        let test = "redis-tls";
        let dir = log_path(test, "certs");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the certificate directory");
        make_certificates(&dir);
        let redis = tls_redis(test, &dir).await;
        let url = format!("rediss://127.0.0.1:{}", redis.port);
        let ca = dir.join("ca.crt").display().to_string();

        let n1 = Node::start_with(test, "n1", &url, &["--redis-ca-file", &ca]).await;
        let n2 = Node::start_with(test, "n2", &url, &["--redis-ca-file", &ca]).await;
        let mut ann = Client::connect(&n1, "ann").await;
        let mut bob = Client::connect(&n2, "bob").await;
        ann.join("tls").await;
        bob.join("tls").await;
        let epoch = publish_first(&n2, "tls", 3, &mut [&mut ann, &mut bob]).await;
        ann.publish("tls", "p1", json!({"from": "ann"})).await;
        assert_eq!(ann.answer("p1").await["type"], "ack");
        let message = bob.next_message().await;
        assert_eq!(
            (seq(&message), &message["data"]["from"]),
            (4, &json!("ann"))
        );
        // Recovery through the other node, from what Redis keeps over TLS.
        let mut late = Client::connect(&n1, "late").await;
        let (replay, joined) = late.join_since("tls", Some((1, &epoch))).await;
        assert_eq!(joined["recovered"], true, "{joined}");
        assert_consecutive("late", &replay, 2);
        assert_eq!(replay.len(), 3, "{replay:?}");

        // Without the CA: the certificate is not trusted, and the node says
        // so at start instead of connecting.
        let log = log_path(test, "untrusting");
        let (stdout, stderr) = log_file(&log);
        let mut untrusting = Killed(
            Command::new(env!("CARGO_BIN_EXE_switchboard"))
                .args([
                    "--listen",
                    "127.0.0.1:0",
                    "--auth",
                    "trust",
                    "--redis",
                    &url,
                ])
                .stdin(Stdio::null())
                .stdout(stdout)
                .stderr(stderr)
                .spawn()
                .expect("start the switchboard binary"),
        );
        let status = within("the untrusting node to exit", async {
            loop {
                if let Ok(Some(status)) = untrusting.0.try_wait() {
                    return status;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(!status.success(), "a node without the CA started");
        let output = read_log(&log);
        assert!(
            output.to_lowercase().contains("certificate"),
            "not a certificate error: {output}"
        );
    });
}
