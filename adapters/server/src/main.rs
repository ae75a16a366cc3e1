//! `switchboard`: the standalone Switchboard server, for teams whose backend
//! is not Rust. It serves WebSocket clients at `/ws`, SSE at `/sse`, long-poll
//! at `/poll`, Prometheus metrics at `/metrics`, and the HTTP publish API
//! (`POST /api/publish`, `POST /api/direct`) through which a backend in any
//! language pushes to rooms and users. Every limit is a flag; `switchboard
//! --help` lists them. With `--redis URL`, several servers share rooms
//! through one Redis (given several times, rooms are sharded across those
//! Redis instances; `--redis-cluster URL`: through a Redis Cluster;
//! `--redis-sentinel URL`: through the master Sentinels name). SIGINT or SIGTERM shuts it down within
//! `--shutdown-timeout-ms` (a second signal exits at once).

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use switchboard_core::{
    Config, Identity, LatestValue, Policy, PublishRule, RoomName, RoomOptions,
    DEFAULT_NEVER_COALESCED,
};
use switchboard_runtime::{
    AllowOrigins, JwtAuthenticator, RuntimeConfig, Switchboard, TrustClientName,
};
use switchboard_service::{Options, Server, SwitchboardService};
use tower_layer::Layer;

/// The standalone Switchboard server.
#[derive(Debug, Parser)]
#[command(name = "switchboard", version, about, long_about = None)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8787")]
    listen: SocketAddr,
    /// Bearer key of the HTTP publish API (also read from SWITCHBOARD_API_KEY). Without one the API is off.
    #[arg(long, env = "SWITCHBOARD_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// How clients authenticate: `jwt` (HS256 tokens, user = `sub`) or `trust` (the token is the user name; demos only).
    #[arg(long, value_enum, default_value_t = AuthMode::Jwt)]
    auth: AuthMode,
    /// HS256 secret for `--auth jwt` (also read from SWITCHBOARD_JWT_SECRET).
    #[arg(long, env = "SWITCHBOARD_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// Browser origin allowed to connect besides the server's own (repeatable; `*` allows all).
    #[arg(long = "origin")]
    origins: Vec<String>,
    /// Most sessions at once (then `server_full`, close 1013).
    #[arg(long, default_value_t = 100_000)]
    max_sessions: usize,
    /// Largest client frame in bytes (then `frame_too_large`, close 1009).
    #[arg(long, default_value_t = 65_536)]
    max_frame_bytes: usize,
    /// Most rooms one session may join.
    #[arg(long, default_value_t = 100)]
    max_rooms: usize,
    /// Client frames per second per session.
    #[arg(long, default_value_t = 50)]
    rate_per_sec: u32,
    /// Client frames a session may send in a burst.
    #[arg(long, default_value_t = 100)]
    rate_burst: u32,
    /// Refused frames within the error window that close a session (1008).
    #[arg(long, default_value_t = 10)]
    max_errors: u32,
    /// The error window, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    error_window_ms: u64,
    /// Silence after which the server pings, in milliseconds.
    #[arg(long, default_value_t = 25_000)]
    heartbeat_interval_ms: u64,
    /// Further silence before `heartbeat_timeout`, in milliseconds.
    #[arg(long, default_value_t = 20_000)]
    heartbeat_timeout_ms: u64,
    /// How long a detached (long-poll) session lives without a poll, in milliseconds.
    #[arg(long, default_value_t = 60_000)]
    session_idle_ms: u64,
    /// Bytes a session's outbound queue may hold before it is closed as `slow_consumer` (for long-poll: with what the client has not acknowledged).
    #[arg(long, default_value_t = 1 << 20)]
    max_outbound_bytes: usize,
    /// How long a long-poll waits for frames before answering `[]`, in milliseconds.
    #[arg(long, default_value_t = 25_000, value_parser = clap::value_parser!(u64).range(1..))]
    poll_timeout_ms: u64,
    /// How long shutdown (SIGINT or SIGTERM) waits for clients to receive their `close` and for requests in flight to end, in milliseconds; then the process exits regardless.
    #[arg(long, default_value_t = 5_000)]
    shutdown_timeout_ms: u64,
    /// Refuse client frames over SSE (`POST /sse/send` answers 403): SSE becomes server push only. WebSocket and long-poll clients still send.
    #[arg(long)]
    sse_push_only: bool,
    /// Messages each room keeps for recovery (0 keeps none).
    #[arg(long, default_value_t = 100)]
    history: usize,
    /// Seconds an empty room keeps its history.
    #[arg(long, default_value_t = 300)]
    history_ttl_secs: u64,
    /// Redis URL (`redis://127.0.0.1:6379`): share rooms with every other node using the same Redis. Repeated (or comma-separated): rooms are sharded across these independent Redis instances by consistent hashing of their names; give every node the same set, in any order.
    #[arg(
        long,
        env = "SWITCHBOARD_REDIS",
        value_delimiter = ',',
        value_name = "URL"
    )]
    redis: Vec<String>,
    /// PEM file of the CA that signed the Redis servers' certificates, for `rediss://` URLs (without it, the system's trusted CAs).
    #[cfg(feature = "tls")]
    #[arg(long, value_name = "PATH")]
    redis_ca_file: Option<std::path::PathBuf>,
    /// Redis Sentinel URL (`redis://127.0.0.1:26379`, repeatable), instead of `--redis`: the node connects to the master the Sentinels name `--redis-sentinel-master`, and asks them again at every reconnect, so it follows a failover.
    #[arg(
        long,
        env = "SWITCHBOARD_REDIS_SENTINEL",
        value_delimiter = ',',
        value_name = "URL",
        conflicts_with = "redis",
        requires = "redis_sentinel_master"
    )]
    redis_sentinel: Vec<String>,
    /// With `--redis-sentinel`: the name of the master the Sentinels monitor.
    #[arg(long, value_name = "NAME", requires = "redis_sentinel")]
    redis_sentinel_master: Option<String>,
    /// Redis Cluster seed node URL (repeatable; one reachable seed is enough): share rooms with every other node using the same Redis Cluster. Instead of `--redis`.
    #[arg(
        long = "redis-cluster",
        value_name = "URL",
        conflicts_with_all = ["redis", "redis_sentinel"]
    )]
    redis_cluster: Vec<String>,
    /// With `--redis`, `--redis-cluster` or `--redis-sentinel`: milliseconds after which a silent node is taken for dead and its users leave presence.
    #[arg(long, default_value_t = 10_000)]
    redis_node_ttl_ms: u64,
    /// How long a client may take to send a request's headers, in milliseconds; slower ones (or a connection that sends nothing) are cut. Also the idle time of a kept-alive connection between requests.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    header_read_timeout_ms: u64,
    /// Most connections open at once that have not sent a request yet; beyond it the oldest of them is dropped, so a flood of idle sockets cannot lock real clients out.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..))]
    max_pending_connections: u64,
    /// Rooms with this name prefix take publishes only from the server (repeatable), e.g. `job_`.
    #[arg(long = "server-only-prefix")]
    server_only_prefixes: Vec<String>,
    /// Rooms with this name prefix are latest-value rooms (repeatable), e.g. `job_`: they keep only the newest message of each `event`, replay it to every joiner, and a slow subscriber gets the newest values instead of being closed.
    #[arg(long = "latest-prefix")]
    latest_prefixes: Vec<String>,
    /// In latest-value rooms, an event whose every message is kept and delivered (repeatable; given at least once, it replaces the defaults).
    #[arg(long = "never-coalesce", default_values_t = DEFAULT_NEVER_COALESCED.map(String::from))]
    never_coalesce: Vec<String>,
    /// How long one write to a client may take before the connection is dropped, in milliseconds.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    write_timeout_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum AuthMode {
    Jwt,
    Trust,
}

/// Rooms keep `--history`; `--server-only-prefix` rooms take only server
/// publishes; `--latest-prefix` rooms are latest-value rooms.
struct ServerPolicy {
    options: RoomOptions,
    server_only: Vec<String>,
    latest: Vec<String>,
    latest_options: RoomOptions,
}

fn has_prefix(room: &RoomName, prefixes: &[String]) -> bool {
    prefixes
        .iter()
        .any(|p| room.as_str().starts_with(p.as_str()))
}

impl Policy for ServerPolicy {
    fn publish_rule(&self, _who: &Identity, room: &RoomName) -> PublishRule {
        if has_prefix(room, &self.server_only) {
            PublishRule::ServerOnly
        } else {
            PublishRule::Members
        }
    }

    fn room_options(&self, room: &RoomName) -> RoomOptions {
        if has_prefix(room, &self.latest) {
            self.latest_options.clone()
        } else {
            self.options.clone()
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();

    let mut config = Config::default();
    config.max_sessions = args.max_sessions;
    config.max_frame_bytes = args.max_frame_bytes;
    config.max_rooms_per_session = args.max_rooms;
    config.rate_per_sec = args.rate_per_sec;
    config.rate_burst = args.rate_burst;
    config.max_errors = args.max_errors;
    config.error_window = Duration::from_millis(args.error_window_ms);
    config.heartbeat_interval = Duration::from_millis(args.heartbeat_interval_ms);
    config.heartbeat_timeout = Duration::from_millis(args.heartbeat_timeout_ms);
    config.session_idle = Duration::from_millis(args.session_idle_ms);
    let mut runtime = RuntimeConfig::default();
    runtime.max_outbound_bytes = args.max_outbound_bytes;
    runtime.poll_timeout = Duration::from_millis(args.poll_timeout_ms);
    runtime.shutdown_timeout = Duration::from_millis(args.shutdown_timeout_ms);
    runtime.sse_client_frames = !args.sse_push_only;
    let shutdown_timeout = runtime.shutdown_timeout;

    runtime.write_timeout = Duration::from_millis(args.write_timeout_ms);
    let options = RoomOptions::default()
        .history(args.history)
        .history_ttl(Duration::from_secs(args.history_ttl_secs));
    let policy = ServerPolicy {
        latest_options: options
            .clone()
            .latest_value(LatestValue::never_coalescing(args.never_coalesce.clone())),
        options,
        server_only: args.server_only_prefixes.clone(),
        latest: args.latest_prefixes.clone(),
    };
    let builder = Switchboard::builder()
        .config(config)
        .runtime_config(runtime)
        .policy(policy)
        .origins(AllowOrigins::new(args.origins.clone()));
    let builder = match args.auth {
        AuthMode::Jwt => {
            let secret = args
                .jwt_secret
                .as_deref()
                .ok_or("--auth jwt needs --jwt-secret (or SWITCHBOARD_JWT_SECRET); use --auth trust for a demo")?;
            builder.authenticator(JwtAuthenticator::hs256(secret.as_bytes()))
        }
        AuthMode::Trust => builder.authenticator(TrustClientName),
    };
    let clustered =
        !args.redis.is_empty() || !args.redis_sentinel.is_empty() || !args.redis_cluster.is_empty();
    if clustered && !args.latest_prefixes.is_empty() {
        tracing::warn!(
            "--latest-prefix has no effect with --redis: the broker keeps every message"
        );
    }
    let node_ttl = Duration::from_millis(args.redis_node_ttl_ms);
    #[cfg(feature = "tls")]
    let ca = match &args.redis_ca_file {
        Some(path) => Some(
            std::fs::read(path)
                .map_err(|e| format!("cannot read --redis-ca-file {}: {e}", path.display()))?,
        ),
        None => None,
    };
    #[cfg(feature = "tls")]
    if ca.is_some() && !args.redis.iter().any(|url| url.starts_with("rediss://")) {
        tracing::warn!("--redis-ca-file has no effect without a rediss:// --redis URL");
    }
    let open = |url: &str| {
        #[cfg(feature = "tls")]
        if let Some(ca) = &ca {
            if url.starts_with("rediss://") {
                return Ok(switchboard_redis::RedisBroker::with_ca(url, ca)?.node_ttl(node_ttl));
            }
        }
        Ok::<_, switchboard_runtime::broker::BrokerError>(
            switchboard_redis::RedisBroker::new(url)?.node_ttl(node_ttl),
        )
    };
    let switchboard = match args.redis.as_slice() {
        [] if !args.redis_cluster.is_empty() => {
            let broker =
                switchboard_redis::RedisBroker::cluster(&args.redis_cluster)?.node_ttl(node_ttl);
            tracing::info!(
                node = broker.node_id(),
                "sharing rooms through a Redis Cluster"
            );
            builder.broker(broker).start().await?
        }
        [] if !args.redis_sentinel.is_empty() => {
            let master = args.redis_sentinel_master.as_deref().unwrap_or_default();
            let broker = switchboard_redis::RedisBroker::sentinel(&args.redis_sentinel, master)?
                .node_ttl(node_ttl);
            tracing::info!(
                node = broker.node_id(),
                master,
                "sharing rooms through Redis (Sentinel)"
            );
            builder.broker(broker).start().await?
        }
        [] => builder.build()?,
        // One Redis: the plain broker, no sharding layer.
        [url] => {
            let broker = open(url)?;
            tracing::info!(node = broker.node_id(), "sharing rooms through Redis");
            builder.broker(broker).start().await?
        }
        urls => {
            let broker = switchboard_redis::ShardedBroker::new(urls, open)?;
            tracing::info!(shards = ?broker.shard_ids(), "sharing rooms through sharded Redis");
            builder.broker(broker).start().await?
        }
    };

    let mut options = Options::default();
    options.api_key = args.api_key.clone();
    if options.api_key.is_none() {
        tracing::warn!("no --api-key: the HTTP publish API is off");
    }
    let service = SwitchboardService::new(&switchboard, options)
        .layer()
        .layer(Root);
    let http = Server::default()
        .header_read_timeout(Duration::from_millis(args.header_read_timeout_ms))
        .max_pending_connections(
            usize::try_from(args.max_pending_connections).unwrap_or(usize::MAX),
        );

    let listener = switchboard_websocket::bind(args.listen)?;
    tracing::info!(addr = %listener.local_addr()?, "switchboard listening");
    // Until a signal, serve; then shut the Switchboard down while still
    // serving (long-poll clients fetch their `close` during it), then stop
    // accepting and let requests in flight end. The whole shutdown is
    // bounded by --shutdown-timeout-ms: a stalled client (an SSE stream
    // whose reader stopped reading, an upload that never ends) would
    // otherwise hold the server's graceful shutdown forever.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = http.serve(listener, service, async move {
        let _ = stopped.await;
    });
    tokio::pin!(server);
    tokio::select! {
        () = &mut server => return Ok(()),
        () = signalled() => {}
    }
    tracing::info!("shutting down");
    let deadline = tokio::time::Instant::now() + shutdown_timeout;
    tokio::select! {
        () = switchboard.shutdown() => {}
        () = signalled() => {
            tracing::warn!("second signal: exiting now");
            return Ok(());
        }
    }
    let _ = stop.send(());
    tokio::select! {
        result = tokio::time::timeout_at(deadline, &mut server) => {
            if result.is_err() {
                tracing::warn!("connections still open at the shutdown timeout: exiting anyway");
            }
        }
        () = signalled() => tracing::warn!("second signal: exiting now"),
    }
    Ok(())
}

/// Every path Switchboard does not serve: 404, but `GET /` answers one line,
/// for a load balancer's health check and a human's curl.
#[derive(Debug, Clone, Copy)]
struct Root;

impl<B> tower_service::Service<http::Request<B>> for Root {
    type Response = http::Response<http_body_util::Full<bytes::Bytes>>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let mut response =
            http::Response::new(http_body_util::Full::from("switchboard: connect to /ws\n"));
        if request.uri().path() != "/" {
            *response.status_mut() = http::StatusCode::NOT_FOUND;
            *response.body_mut() = http_body_util::Full::from("not found\n");
        }
        std::future::ready(Ok(response))
    }
}

/// Completes on SIGINT (Ctrl-C) or, on Unix, SIGTERM.
async fn signalled() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
