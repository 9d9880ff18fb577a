//! The `sandboxd-o` binary: `serve` (all in one), `apiserver` and `controllers`.

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use sandboxd_o::config::{Config, LogFormat, StaticNode};
use sandboxd_o::server::{self, Mode};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sandboxd_controllers::runtime::lease::LeaseSettings;

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
    /// Run controllers in their own process against a remote API server, each behind a leader lease.
    Controllers(ControllersArgs),
}

#[derive(Args)]
struct ControllersArgs {
    /// API server URL.
    #[arg(long)]
    server: String,
    /// Controllers to run (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "node,scheduler,sandbox,ttl")]
    only: Vec<String>,
    /// Name this replica writes into the leases it holds (default: controllers-<host>-<pid>).
    #[arg(long)]
    identity: Option<String>,
    /// Bearer token for the API server.
    #[arg(long, env = "SANDBOXD_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(flatten)]
    leases: LeaseFlags,
    /// TOML configuration file (heartbeat, scheduler and sync settings apply here too).
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    flags: ConfigFlags,
}

#[derive(Args)]
struct ServeArgs {
    /// TOML configuration file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Also start N simulated agents on 127.0.2.1, 127.0.2.2, ... and declare them as config nodes.
    #[arg(long, default_value_t = 0)]
    demo_agents: usize,
    /// Port the demo agents listen on (each on its own loopback address).
    #[arg(long, default_value_t = 8080)]
    demo_agent_port: u16,
    /// Run each controller only while holding its lease, so several `serve` processes can share one
    /// etcd store (`serve` only).
    #[arg(long)]
    leader_elect: bool,
    /// Name written into the leases this server holds (default: sandboxd-<host>-<pid>).
    #[arg(long, requires = "leader_elect")]
    identity: Option<String>,
    #[command(flatten)]
    leases: LeaseFlags,
    #[command(flatten)]
    flags: ConfigFlags,
}

/// Leader lease timing, as kube-controller-manager's --leader-elect-* flags.
#[derive(Args)]
struct LeaseFlags {
    /// How long a lease holds without renewal before a standby may take it.
    #[arg(long, default_value = "15s", value_parser = sandboxd_o::config::parse_duration)]
    lease_duration: Duration,
    /// How long a leader keeps trying to renew before it stops every controller.
    #[arg(long, default_value = "10s", value_parser = sandboxd_o::config::parse_duration)]
    renew_deadline: Duration,
    /// How often candidates try to acquire and leaders renew (with jitter).
    #[arg(long, default_value = "2s", value_parser = sandboxd_o::config::parse_duration)]
    retry_period: Duration,
}

impl LeaseFlags {
    fn settings(&self) -> LeaseSettings {
        LeaseSettings { duration: self.lease_duration, renew_deadline: self.renew_deadline, retry: self.retry_period }
    }
}

/// Default identity written into leases: `<role>-<host>-<pid>`.
fn default_identity(role: &str) -> String {
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default().trim().to_string();
    format!("{role}-{}-{}", if host.is_empty() { "host" } else { &host }, std::process::id())
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

fn main() {
    if let Err(e) = run_cli() {
        // One readable line with the whole cause chain; no backtrace even when RUST_BACKTRACE is set.
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run_cli() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let (args, mode) = match cli.command {
        Command::Serve(args) if args.leader_elect => {
            let candidacy = sandboxd_o::controllers::Candidacy {
                identity: args.identity.clone().unwrap_or_else(|| default_identity("sandboxd")),
                only: sandboxd_o::controllers::CONTROLLERS.iter().map(|c| c.to_string()).collect(),
                lease: args.leases.settings(),
            };
            (args, Mode::AllInOneElected(candidacy))
        }
        Command::Serve(args) => (args, Mode::AllInOne),
        Command::Apiserver(args) if args.leader_elect => {
            anyhow::bail!("--leader-elect is for `serve`; `apiserver` runs no controllers")
        }
        Command::Apiserver(args) => (args, Mode::ApiOnly),
        Command::Controllers(args) => return run_controllers(args),
    };
    let env: HashMap<String, String> = std::env::vars().collect();
    let mut config =
        Config::load(args.config.as_deref(), &env, &args.flags.into_map()).context("invalid configuration")?;
    config.loopback_only_agents = env.get("SANDBOXD_LOOPBACK_ONLY").is_some_and(|v| v == "1" || v == "true");
    init_logging(config.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let demo = DemoAgents { count: args.demo_agents, port: args.demo_agent_port };
    runtime.block_on(run(config, mode, demo))
}

/// Simulated agents the `serve --demo-agents N` demo starts in-process.
struct DemoAgents {
    count: usize,
    port: u16,
}

/// Starts the demo fleet and declares its agents as config nodes `demo-1..N`.
async fn start_demo_agents(demo: &DemoAgents, config: &mut Config) -> anyhow::Result<Option<sbxlet::Fleet>> {
    if demo.count == 0 {
        return Ok(None);
    }
    let fleet = sbxlet::start_fleet(sbxlet::FleetConfig {
        nodes: demo.count,
        base_ip: std::net::Ipv4Addr::new(127, 0, 2, 1),
        port: demo.port,
        template: sbxlet::SimConfig::default(),
        name_prefix: "demo".into(),
    })
    .await
    .context("starting demo agents (is the port in use? set --demo-agent-port)")?;
    for (i, agent) in fleet.agents().iter().enumerate() {
        config.nodes.push(StaticNode {
            id: fleet.node_name(i),
            ip: agent.addr().ip().to_string(),
            port: agent.addr().port(),
            // Published ports listen on the agent's own address, so that is where clients reach them.
            external: Some(agent.addr().ip().to_string()),
            max_alloc_percent: None,
        });
        tracing::info!(node = %fleet.node_name(i), addr = %agent.addr(), "demo agent started");
    }
    Ok(Some(fleet))
}

async fn run(mut config: Config, mode: Mode, demo: DemoAgents) -> anyhow::Result<()> {
    let fleet = start_demo_agents(&demo, &mut config).await?;
    let running = server::start(config, mode).await?;
    let shutdown = running.shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        shutdown.cancel();
    });
    running.wait().await?;
    if let Some(fleet) = fleet {
        fleet.shutdown().await;
    }
    Ok(())
}

fn run_controllers(args: ControllersArgs) -> anyhow::Result<()> {
    let env: HashMap<String, String> = std::env::vars().collect();
    let mut config =
        Config::load(args.config.as_deref(), &env, &args.flags.into_map()).context("invalid configuration")?;
    config.loopback_only_agents = env.get("SANDBOXD_LOOPBACK_ONLY").is_some_and(|v| v == "1" || v == "true");
    init_logging(config.log_format);
    let identity = args.identity.unwrap_or_else(|| default_identity("controllers"));
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let client = sandboxd_client::Client::new(&args.server, args.token.clone())?;
        let objects = Arc::new(sandboxd_client::objects::HttpObjects::new(client));
        let mut agents = sandboxd_o::agent_client::HttpAgentClient::new(config.agent_timeout);
        if config.loopback_only_agents {
            agents = agents.loopback_only();
        }
        let shutdown = tokio_util::sync::CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutting down: releasing leases");
            stop.cancel();
        });
        tracing::info!(server = %args.server, identity = %identity, only = ?args.only, "controllers starting");
        let candidacy =
            sandboxd_o::controllers::Candidacy { identity, only: args.only.clone(), lease: args.leases.settings() };
        sandboxd_o::controllers::run_elected(objects.clone(), objects, Arc::new(agents), &config, &candidacy, shutdown)
            .await?;
        anyhow::Ok(())
    })
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
