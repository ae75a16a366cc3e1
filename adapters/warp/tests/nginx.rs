//! Switchboard behind a real nginx terminating TLS, with the configuration the
//! README shows (`docs/nginx.conf`, loaded here with its placeholders filled
//! in): SSE is delivered as it is written (not buffered), long-poll round
//! trips, WebSocket upgrades through the proxy.
//!
//! Needs `nginx` and `openssl` installed (Debian: `apt-get install -y nginx
//! openssl`); without them these tests fail, they never pass silently.

mod common_http;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common_http::{get, post, send_on, within, Reply, Server, SseReader};
use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{self, RootCertStore};
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::Message;

/// The nginx configuration of the README, with `@…@` placeholders.
const NGINX_CONF: &str = include_str!("../../../docs/nginx.conf");

/// A program on `PATH` or in the sbin directories, where Debian puts nginx.
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

fn require(name: &str, package: &str) -> PathBuf {
    find_program(name).unwrap_or_else(|| {
        panic!("`{name}` is not installed; these tests need it: apt-get install -y {package}")
    })
}

/// A fresh directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir =
            std::env::temp_dir().join(format!("switchboard-nginx-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the nginx test directory");
        Self(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running nginx, stopped on drop. It runs as one process
/// (`master_process off`), so killing this child stops all of it.
struct Nginx {
    child: Child,
    port: u16,
    /// The self-signed certificate it serves, for the client to trust.
    cert_pem: Vec<u8>,
    dir: TempDir,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Nginx {
    /// Starts nginx on a free 127.0.0.1 port, proxying to `upstream` with the
    /// README's configuration, and waits until it accepts connections.
    async fn start(upstream: SocketAddr) -> Self {
        let nginx = require("nginx", "nginx");
        let openssl = require("openssl", "openssl");
        let dir = TempDir::new();

        // The certificate names the IP the client connects to, and is not a CA
        // (rustls refuses a CA certificate as a server's own).
        let generated = Command::new(openssl)
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args(["-subj", "/CN=127.0.0.1"])
            .args(["-addext", "subjectAltName=IP:127.0.0.1"])
            .args(["-addext", "basicConstraints=critical,CA:FALSE"])
            .arg("-keyout")
            .arg(dir.path("key.pem"))
            .arg("-out")
            .arg(dir.path("cert.pem"))
            .stdin(Stdio::null())
            .output()
            .expect("run openssl");
        assert!(
            generated.status.success(),
            "openssl failed: {}",
            String::from_utf8_lossy(&generated.stderr)
        );
        let cert_pem = std::fs::read(dir.path("cert.pem")).expect("read the certificate");

        let port = free_port();
        let site = fill(
            NGINX_CONF,
            &[
                ("@LISTEN@", format!("127.0.0.1:{port}")),
                ("@SERVER_NAME@", "127.0.0.1".to_owned()),
                ("@CERT@", path_str(&dir.path("cert.pem"))),
                ("@KEY@", path_str(&dir.path("key.pem"))),
                ("@UPSTREAM@", upstream.to_string()),
            ],
        );
        std::fs::write(dir.path("switchboard.conf"), site).expect("write the site config");
        let d = |name: &str| path_str(&dir.path(name));
        // The test's own nginx.conf: everything nginx writes stays in `dir`,
        // and the README's file is included as it is.
        let main = format!(
            "worker_processes 1;\n\
             pid {pid};\n\
             error_log {error_log} info;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n\
             \x20   access_log {access_log};\n\
             \x20   client_body_temp_path {body};\n\
             \x20   proxy_temp_path {proxy};\n\
             \x20   fastcgi_temp_path {fastcgi};\n\
             \x20   uwsgi_temp_path {uwsgi};\n\
             \x20   scgi_temp_path {scgi};\n\
             \x20   include {site};\n\
             }}\n",
            pid = d("nginx.pid"),
            error_log = d("error.log"),
            access_log = d("access.log"),
            body = d("client_body"),
            proxy = d("proxy"),
            fastcgi = d("fastcgi"),
            uwsgi = d("uwsgi"),
            scgi = d("scgi"),
            site = d("switchboard.conf"),
        );
        std::fs::write(dir.path("nginx.conf"), main).expect("write nginx.conf");
        let stderr = std::fs::File::create(dir.path("stderr.log")).expect("create stderr.log");
        let child = Command::new(nginx)
            .arg("-p")
            .arg(&dir.0)
            .arg("-c")
            .arg(dir.path("nginx.conf"))
            .arg("-e")
            .arg(dir.path("error.log"))
            .args(["-g", "daemon off; master_process off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start nginx");
        let mut nginx = Self {
            child,
            port,
            cert_pem,
            dir,
        };
        nginx.wait_ready().await;
        nginx
    }

    async fn wait_ready(&mut self) {
        let deadline = tokio::time::Instant::now() + common_http::WAIT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("nginx exited with {status}:\n{}", self.logs());
            }
            if TcpStream::connect(("127.0.0.1", self.port)).await.is_ok() {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "nginx did not listen on {}:\n{}",
                self.port,
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn logs(&self) -> String {
        ["stderr.log", "error.log"]
            .iter()
            .map(|name| std::fs::read_to_string(self.dir.path(name)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn authority(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// A TLS connection to nginx that trusts only its test certificate.
    async fn connect(&self) -> TlsStream<TcpStream> {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(&self.cert_pem).expect("a PEM certificate"))
            .expect("a usable certificate");
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let tcp = within(
            "connect to nginx",
            TcpStream::connect(("127.0.0.1", self.port)),
        )
        .await
        .expect("connect to nginx");
        let name = ServerName::from(IpAddr::V4(Ipv4Addr::LOCALHOST));
        within(
            "the TLS handshake",
            TlsConnector::from(Arc::new(config)).connect(name, tcp),
        )
        .await
        .unwrap_or_else(|e| panic!("TLS handshake with nginx: {e}\n{}", self.logs()))
    }

    async fn fetch(&self, request: http::Request<http_body_util::Full<bytes::Bytes>>) -> Reply {
        Reply::read(send_on(self.connect().await, request).await).await
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

fn path_str(path: &Path) -> String {
    path.to_str().expect("temp paths are UTF-8").to_owned()
}

/// Replaces each placeholder, which must occur in the config.
fn fill(template: &str, values: &[(&str, String)]) -> String {
    let mut text = template.to_owned();
    for (placeholder, value) in values {
        assert!(
            text.contains(placeholder),
            "docs/nginx.conf lost {placeholder}"
        );
        text = text.replace(placeholder, value);
    }
    assert!(
        !text
            .lines()
            .filter(|line| !line.trim_start().starts_with('#'))
            .any(|line| line.contains('@')),
        "an unfilled placeholder:\n{text}"
    );
    text
}

#[test]
fn the_readme_config_has_what_websocket_and_streams_need() {
    for directive in [
        "proxy_http_version 1.1;",
        "proxy_set_header Upgrade $http_upgrade;",
        "proxy_set_header Connection $connection_upgrade;",
        "map $http_upgrade $connection_upgrade",
        "proxy_buffering off;",
        "proxy_read_timeout 1h;",
    ] {
        assert!(
            NGINX_CONF.contains(directive),
            "docs/nginx.conf lacks {directive}"
        );
    }
}

#[tokio::test]
async fn sse_through_nginx_is_not_buffered() {
    let server = Server::start().await;
    let nginx = Nginx::start(server.addr).await;
    let request = get(&nginx.authority(), "/sse?rooms=news&token=alice");
    let response = send_on(nginx.connect().await, request).await;
    let mut stream = SseReader::open(response);
    stream.welcome().await;
    let (joined, _) = stream.until("joined").await;
    assert_eq!(joined.data["room"], "news");

    // Each message arrives while the stream stays open: nothing waits for a
    // buffer to fill or the response to end.
    for i in 1..=3 {
        server.publish("news", json!({"n": i})).await;
        let message = stream.expect().await;
        assert_eq!(message.kind(), "message");
        assert_eq!(message.data["seq"], i);
        assert!(message.id.is_some());
    }
    drop(nginx);
}

#[tokio::test]
async fn longpoll_round_trip_through_nginx() {
    let server = Server::start().await;
    let nginx = Nginx::start(server.addr).await;
    let authority = nginx.authority();

    let opened = nginx
        .fetch(post(&authority, "/poll/open?token=alice", ""))
        .await;
    let welcome = &opened.frames()[0];
    assert_eq!(welcome["type"], "welcome");
    let sid = welcome["sid"].as_str().unwrap().to_owned();

    let frames = json!([
        {"type": "join", "room": "lobby", "id": 1},
        {"type": "publish", "room": "lobby", "data": "through the proxy", "id": 2},
    ]);
    let sent = nginx
        .fetch(post(
            &authority,
            &format!("/poll/send?sid={sid}&token=alice"),
            frames.to_string(),
        ))
        .await;
    assert_eq!(sent.status, StatusCode::ACCEPTED);

    let polled = nginx
        .fetch(get(
            &authority,
            &format!("/poll?sid={sid}&ack=1&token=alice"),
        ))
        .await
        .frames();
    let kinds: Vec<&str> = polled.iter().map(|f| f["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["joined", "ack", "message", "ack"]);
    assert_eq!(polled[2]["data"], "through the proxy");

    // A poll that waits: answered when the server publishes.
    let waiting = nginx.fetch(get(
        &authority,
        &format!("/poll?sid={sid}&ack=4&token=alice"),
    ));
    let publish = async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        server.publish("lobby", json!("later")).await;
    };
    let (reply, ()) = tokio::join!(waiting, publish);
    let frames = reply.frames();
    // The poll may have timed out (500 ms) before the publish; then poll again.
    let message = if frames.is_empty() {
        nginx
            .fetch(get(
                &authority,
                &format!("/poll?sid={sid}&ack=0&token=alice"),
            ))
            .await
            .frames()
            .remove(0)
    } else {
        frames[0].clone()
    };
    assert_eq!(message["data"], "later");
    assert_eq!(message["seq"], 2);
}

async fn next_json<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>) -> Value
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        match within("a WebSocket frame", ws.next()).await {
            Some(Ok(Message::Text(text))) => {
                return serde_json::from_str(text.as_str()).expect("frames are JSON")
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn websocket_through_nginx() {
    let server = Server::start().await;
    let nginx = Nginx::start(server.addr).await;
    let url = format!("wss://{}/ws?token=alice", nginx.authority());
    let (mut ws, response) = within(
        "the WebSocket handshake",
        tokio_tungstenite::client_async(url, nginx.connect().await),
    )
    .await
    .unwrap_or_else(|e| panic!("upgrade through nginx: {e}\n{}", nginx.logs()));
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);

    let welcome = next_json(&mut ws).await;
    assert_eq!(welcome["type"], "welcome");
    let sid = welcome["sid"].as_str().unwrap().to_owned();

    let send = |frame: Value| Message::text(frame.to_string());
    ws.send(send(json!({"type": "join", "room": "lobby", "id": 1})))
        .await
        .unwrap();
    let joined = next_json(&mut ws).await;
    assert_eq!(joined["type"], "joined");
    assert_eq!(next_json(&mut ws).await, json!({"type": "ack", "id": 1}));

    ws.send(send(
        json!({"type": "publish", "room": "lobby", "data": "echo", "id": 2}),
    ))
    .await
    .unwrap();
    let message = next_json(&mut ws).await;
    assert_eq!(message["type"], "message");
    assert_eq!(message["data"], "echo");
    assert_eq!(message["from"]["sid"], sid.as_str());
    assert_eq!(next_json(&mut ws).await, json!({"type": "ack", "id": 2}));

    // And a server publish reaches it through the proxy.
    server.publish("lobby", json!("from the server")).await;
    let message = next_json(&mut ws).await;
    assert_eq!(message["data"], "from the server");
    ws.close(None).await.unwrap();
}
