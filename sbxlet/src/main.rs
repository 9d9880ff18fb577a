//! The `sbxlet` binary: parses flags, sets up logging and runs until SIGINT or SIGTERM.

use clap::Parser;
use sbxlet::cli::{run, shutdown_signal, Cli};
use tracing::Level;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let level = std::env::var("RUST_LOG").ok().and_then(|v| v.parse::<Level>().ok()).unwrap_or(Level::INFO);
    tracing_subscriber::fmt().with_max_level(level).init();
    let cli = Cli::parse();
    run(cli, shutdown_signal()?).await?;
    Ok(())
}
