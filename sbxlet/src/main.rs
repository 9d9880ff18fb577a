//! The `sbxlet` binary: parses flags, sets up logging and runs until SIGINT or SIGTERM.

use clap::Parser;
use sbxlet::cli::{run, shutdown_signal, Cli};
use tracing::Level;

/// jemalloc, as the orchestrator: an agent runs for months under create/delete churn.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() {
    let level = std::env::var("RUST_LOG").ok().and_then(|v| v.parse::<Level>().ok()).unwrap_or(Level::INFO);
    // Colours only on a terminal: logs redirected to a file are read by people and by tools.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    tracing_subscriber::fmt().with_max_level(level).with_ansi(ansi).init();
    let cli = Cli::parse();
    let result = match shutdown_signal() {
        Ok(signal) => run(cli, signal).await,
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        // One readable line; no backtrace even when RUST_BACKTRACE is set.
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
