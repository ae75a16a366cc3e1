//! The job-progress example: `cargo run -p switchboard-examples --bin jobs`,
//! then open the printed address, sign in, and start a few jobs.
//!
//! `--transports sse,longpoll` refuses WebSocket at the server (and
//! `--transports longpoll` SSE too), to watch the browser client fall back.
//! `JOBS_JWT_SECRET` and `--state FILE` let sign-ins and jobs survive a
//! restart.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use switchboard_examples::jobs;

/// Background jobs with live progress bars on Switchboard.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "JOBS_JWT_SECRET (32 bytes or more) signs the sign-in tokens; unset, a random \
                  secret does, and a restart signs everybody out."
)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8081", env = "JOBS_LISTEN")]
    listen: SocketAddr,
    /// Transports to offer, comma-separated: websocket, sse, longpoll. Leave
    /// some out to refuse them (the page falls back to the next).
    #[arg(
        long,
        default_value = "websocket,sse,longpoll",
        env = "JOBS_TRANSPORTS"
    )]
    transports: jobs::Transports,
    /// Milliseconds between two steps of a job.
    #[arg(long, default_value_t = 1500, env = "JOBS_STEP_MS")]
    step_ms: u64,
    /// Keep jobs in this JSON file, so they survive a restart (unfinished
    /// ones resume).
    #[arg(long, env = "JOBS_STATE")]
    state: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();

    let mut options = jobs::Options::default()
        .transports(args.transports)
        .step(Duration::from_millis(args.step_ms));
    // The token signing secret: from the environment, so sign-ins survive a
    // restart, or random (every restart signs everybody out).
    match std::env::var("JOBS_JWT_SECRET") {
        Ok(secret) if secret.len() >= 32 => options = options.secret(secret),
        Ok(_) => return Err("JOBS_JWT_SECRET must be at least 32 bytes".into()),
        Err(_) => tracing::info!("JOBS_JWT_SECRET not set: a random secret signs the tokens"),
    }
    if let Some(state) = args.state {
        options = options.state_file(state);
    }
    let app = jobs::App::new(options)?;
    // A large accept backlog: after a restart every open tab reconnects at once.
    let listener = switchboard_websocket::bind(args.listen)?;
    let addr = listener.local_addr()?;
    println!("Jobs running: open http://{addr}/ in your browser");

    let sb = app.switchboard().clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            tracing::info!("shutting down");
            // Tells every tab `close` 1001 (they reconnect when the server is
            // back), stops the job workers, and ends `serve`.
            sb.shutdown().await;
        }
    });
    jobs::serve(listener, app).await;
    Ok(())
}
