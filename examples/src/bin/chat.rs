//! The chat example: `cargo run -p switchboard-examples --bin chat`, then open
//! the printed address in a browser (two browsers, or several tabs, to chat
//! with yourself).

use std::net::SocketAddr;

use clap::Parser;

/// A chat on Switchboard: rooms, presence, private messages.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080", env = "CHAT_LISTEN")]
    listen: SocketAddr,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();

    let switchboard = switchboard_examples::chat::switchboard()?;
    // A large accept backlog: after a restart every open tab reconnects at once.
    let listener = switchboard_websocket::bind(args.listen)?;
    let addr = listener.local_addr()?;
    println!("Chat running: open http://{addr}/ in your browser");

    let sb = switchboard.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            tracing::info!("shutting down");
            // Tells every tab `close` 1001 (they reconnect when the server is
            // back) and ends `serve`.
            sb.shutdown().await;
        }
    });
    switchboard_examples::chat::serve(listener, switchboard).await;
    Ok(())
}
