//! The `sandboxd-o` binary: `serve` (all in one) and `apiserver`.

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use sandboxd_o::config::{Config, LogFormat};
use sandboxd_o::server::{self, Mode};
use std::collections::HashMap;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "sandboxd-o", version, about = "Control plane for fleets of sandboxes")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the API, the store and every controller in one process.
    Serve(ServeArgs),
    /// Run the API and the store only.
    Apiserver(ServeArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// TOML configuration file.
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    flags: ConfigFlags,
}

/// One flag per configuration key; each wins over `SANDBOXD_<KEY>` and the file.
#[derive(Args, Default)]
struct ConfigFlags {
    #[arg(long)]
    listen: Option<String>,
    #[arg(long)]
    store: Option<String>,
    #[arg(long)]
    heartbeat_interval: Option<String>,
    #[arg(long)]
    heartbeat_timeout: Option<String>,
    #[arg(long)]
    node_ready_threshold: Option<String>,
    #[arg(long)]
    node_failure_threshold: Option<String>,
    #[arg(long)]
    node_lost_grace: Option<String>,
    #[arg(long)]
    max_alloc_percent: Option<String>,
    #[arg(long)]
    host_port_range: Option<String>,
    #[arg(long)]
    scheduler_policy: Option<String>,
    #[arg(long)]
    sync_period: Option<String>,
    #[arg(long)]
    agent_timeout: Option<String>,
    #[arg(long)]
    max_ttl_seconds: Option<String>,
    #[arg(long)]
    default_cpu: Option<String>,
    #[arg(long)]
    default_memory: Option<String>,
    /// Static nodes as JSON: `[{"id": "n1", "ip": "127.0.1.1", "port": 8080}]`.
    #[arg(long)]
    nodes: Option<String>,
    #[arg(long)]
    auth_token_file: Option<String>,
    #[arg(long)]
    max_body_bytes: Option<String>,
    #[arg(long)]
    log_format: Option<String>,
}

impl ConfigFlags {
    fn into_map(self) -> HashMap<String, String> {
        let pairs = [
            ("listen", self.listen),
            ("store", self.store),
            ("heartbeat_interval", self.heartbeat_interval),
            ("heartbeat_timeout", self.heartbeat_timeout),
            ("node_ready_threshold", self.node_ready_threshold),
            ("node_failure_threshold", self.node_failure_threshold),
            ("node_lost_grace", self.node_lost_grace),
            ("max_alloc_percent", self.max_alloc_percent),
            ("host_port_range", self.host_port_range),
            ("scheduler_policy", self.scheduler_policy),
            ("sync_period", self.sync_period),
            ("agent_timeout", self.agent_timeout),
            ("max_ttl_seconds", self.max_ttl_seconds),
            ("default_cpu", self.default_cpu),
            ("default_memory", self.default_memory),
            ("nodes", self.nodes),
            ("auth_token_file", self.auth_token_file),
            ("max_body_bytes", self.max_body_bytes),
            ("log_format", self.log_format),
        ];
        pairs.into_iter().filter_map(|(k, v)| v.map(|v| (k.to_string(), v))).collect()
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let (args, mode) = match cli.command {
        Command::Serve(args) => (args, Mode::AllInOne),
        Command::Apiserver(args) => (args, Mode::ApiOnly),
    };
    let env: HashMap<String, String> = std::env::vars().collect();
    let config = Config::load(args.config.as_deref(), &env, &args.flags.into_map())
        .context("invalid configuration")?;
    init_logging(config.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(run(config, mode))
}

async fn run(config: Config, mode: Mode) -> anyhow::Result<()> {
    let running = server::start(config, mode).await?;
    let shutdown = running.shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        shutdown.cancel();
    });
    running.wait().await?;
    Ok(())
}

async fn wait_for_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn init_logging(format: LogFormat) {
    let filter: tracing_subscriber::filter::Targets = std::env::var("RUST_LOG")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| "info".parse().expect("static filter"));
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Json => registry.with(tracing_subscriber::fmt::layer().json()).init(),
        LogFormat::Text => registry.with(tracing_subscriber::fmt::layer()).init(),
    }
}
