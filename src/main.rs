//! The `sandboxd-o` binary: `serve` (all in one), `apiserver` and `controllers`.

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use sandboxd_o::config::{self, Config, LogFormat, StaticNode};
use sandboxd_o::server::{self, Mode};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sandboxd_controllers::runtime::lease::LeaseSettings;

/// jemalloc, not glibc's malloc: under steady create/delete churn glibc's arenas fragmented and the
/// server grew without bound (figures in docs/benchmarks.md, soak scenario).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
    /// Print the token NODE's agent must hold (`sbxlet --token-file`), from the agent secret.
    AgentToken(AgentTokenArgs),
}

#[derive(Args)]
struct AgentTokenArgs {
    /// The node's name, as registered.
    node: String,
    /// TOML configuration file (its data_dir or agent_secret_file name the secret).
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    flags: ConfigFlags,
}

#[derive(Args)]
struct ControllersArgs {
    /// API server URL (default: the client config's).
    #[arg(long, required_unless_present = "client_config")]
    server: Option<String>,
    /// Client config with the server URL, its CA and a token, as `serve` writes to
    /// <data_dir>/client.json; --server and --token win over it.
    #[arg(long, env = "SANDBOXD_CONFIG")]
    client_config: Option<PathBuf>,
    /// Controllers to run (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "node,scheduler,sandbox,ttl")]
    only: Vec<String>,
    /// Name this replica writes into the leases it holds (default: <token identity>/<host>-<pid>,
    /// or controllers-<host>-<pid> on a server without authentication).
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
    /// Serve this process's /metrics (and /healthz) on ADDR, plain HTTP without authentication:
    /// bind it to loopback or a network only Prometheus reaches (e.g. 127.0.0.1:9464). Off by default.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
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
    /// Controllers to run in this process (comma-separated; `serve` only), as
    /// kube-controller-manager's --controllers: e.g. node,scheduler to leave sandbox starts to a
    /// `controllers --only sandbox` process elsewhere.
    #[arg(long, value_delimiter = ',', default_value = "node,scheduler,sandbox,ttl")]
    controllers: Vec<String>,
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

/// One flag per configuration key, built from `config::KEYS`; each wins over `SANDBOXD_<KEY>` and the file.
#[derive(Default)]
struct ConfigFlags {
    values: HashMap<String, String>,
}

impl ConfigFlags {
    fn into_map(self) -> HashMap<String, String> {
        self.values
    }
}

impl clap::FromArgMatches for ConfigFlags {
    fn from_arg_matches(matches: &clap::ArgMatches) -> Result<Self, clap::Error> {
        let mut flags = ConfigFlags::default();
        flags.update_from_arg_matches(matches)?;
        Ok(flags)
    }

    fn update_from_arg_matches(&mut self, matches: &clap::ArgMatches) -> Result<(), clap::Error> {
        for key in &config::KEYS {
            if let Some(value) = matches.get_one::<String>(key.name) {
                self.values.insert(key.name.to_string(), value.clone());
            }
        }
        Ok(())
    }
}

impl Args for ConfigFlags {
    fn augment_args(mut cmd: clap::Command) -> clap::Command {
        for key in &config::KEYS {
            cmd = cmd.arg(config_flag(key));
        }
        cmd
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

/// `--heartbeat-interval <VALUE>  How often ... [default: 5s] [env: SANDBOXD_HEARTBEAT_INTERVAL]`.
/// The default is shown, not applied by clap: the env var and the file come between flag and default.
fn config_flag(key: &config::Key) -> clap::Arg {
    let default = if key.default.is_empty() { "none" } else { key.default };
    clap::Arg::new(key.name).long(key.flag()).value_name("VALUE").help(format!(
        "{} [default: {default}] [env: {}]",
        key.help,
        key.env_var()
    ))
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
            let chosen = sandboxd_o::controllers::choose(&args.controllers)?;
            let candidacy = sandboxd_o::controllers::Candidacy {
                identity: args.identity.clone().unwrap_or_else(|| default_identity("sandboxd")),
                only: chosen.iter().map(|c| c.to_string()).collect(),
                lease: args.leases.settings(),
            };
            (args, Mode::AllInOneElected(candidacy))
        }
        Command::Serve(args) => {
            let chosen = sandboxd_o::controllers::choose(&args.controllers)?;
            (args, Mode::AllInOne(chosen))
        }
        Command::Apiserver(args) if args.leader_elect => {
            anyhow::bail!("--leader-elect is for `serve`; `apiserver` runs no controllers")
        }
        Command::Apiserver(args) if args.controllers != sandboxd_o::controllers::CONTROLLERS => {
            anyhow::bail!("--controllers is for `serve`; `apiserver` runs no controllers")
        }
        Command::Apiserver(args) => (args, Mode::ApiOnly),
        Command::Controllers(args) => return run_controllers(args),
        Command::AgentToken(args) => return print_agent_token(args),
    };
    let env: HashMap<String, String> = std::env::vars().collect();
    let config = Config::load(args.config.as_deref(), &env, &args.flags.into_map()).context("invalid configuration")?;
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
    // Each demo agent holds its own node's token, as a real one would, and has no fault routes.
    let names: Vec<String> = (1..=demo.count).map(|i| format!("demo-{i}")).collect();
    let tokens = match server::agent_secret(config)? {
        Some(secret) => {
            let current = secret.lines().next().unwrap_or_default().trim().to_string();
            names.iter().map(|name| sandboxd_o::tls::agent_token(&current, name)).collect()
        }
        None => Vec::new(),
    };
    let fleet = sbxlet::start_fleet(sbxlet::FleetConfig {
        nodes: demo.count,
        base_ip: std::net::Ipv4Addr::new(127, 0, 2, 1),
        port: demo.port,
        template: sbxlet::SimConfig { fault_injection: false, ..sbxlet::SimConfig::default() },
        name_prefix: "demo".into(),
        tokens,
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
            labels: None,
            taints: None,
        });
        tracing::info!(node = %fleet.node_name(i), addr = %agent.addr(), "demo agent started");
    }
    Ok(Some(fleet))
}

async fn run(mut config: Config, mode: Mode, demo: DemoAgents) -> anyhow::Result<()> {
    // Keys, tokens and the store are the owner's alone (the store files were 0644).
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
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

fn print_agent_token(args: AgentTokenArgs) -> anyhow::Result<()> {
    sandboxd_api::validate::validate_name("node", &args.node).map_err(|e| anyhow::anyhow!("{e}"))?;
    let env: HashMap<String, String> = std::env::vars().collect();
    let config = Config::load(args.config.as_deref(), &env, &args.flags.into_map()).context("invalid configuration")?;
    let secret = server::existing_agent_secret(&config)?.ok_or_else(|| {
        anyhow::anyhow!(
            "no agent secret in {}: run this where the server's data_dir is (or set agent_secret_file)",
            config.data_dir.display()
        )
    })?;
    let current = secret.lines().next().unwrap_or_default().trim();
    println!("{}", sandboxd_o::tls::agent_token(current, &args.node));
    Ok(())
}

fn run_controllers(args: ControllersArgs) -> anyhow::Result<()> {
    let env: HashMap<String, String> = std::env::vars().collect();
    let config = Config::load(args.config.as_deref(), &env, &args.flags.into_map()).context("invalid configuration")?;
    init_logging(config.log_format);
    let mut client_config = match &args.client_config {
        Some(path) => sandboxd_client::ClientConfig::load(path).map_err(|e| anyhow::anyhow!("client config {e}"))?,
        None => sandboxd_client::ClientConfig::default(),
    };
    if let Some(server) = &args.server {
        client_config.server = server.clone();
    }
    if args.token.is_some() {
        client_config.token = args.token.clone();
    }
    let agent_secret = server::existing_agent_secret(&config)?;
    if agent_secret.is_none() && client_config.server.starts_with("https://") {
        tracing::warn!(
            data_dir = %config.data_dir.display(),
            "no agent secret (agent_secret_file, or <data_dir>/agent.secret): agents that ask for their token will refuse these controllers, and their nodes will go NotReady"
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let client = sandboxd_client::Client::from_config(&client_config)?;
        let identity = match args.identity {
            Some(identity) => identity,
            None => replica_identity(&client).await?,
        };
        let objects = Arc::new(sandboxd_client::objects::HttpObjects::new(client));
        let mut agents = sandboxd_o::agent_client::HttpAgentClient::new(config.agent_timeout)
            .with_policy(config.agent_policy.clone());
        if let Some(secret) = &agent_secret {
            agents = agents.with_agent_secret(secret);
        }
        let shutdown = tokio_util::sync::CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutting down: releasing leases");
            stop.cancel();
        });
        if let Some(addr) = args.metrics_listen {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("listening for /metrics on {addr}"))?;
            tracing::info!(%addr, "serving /metrics");
            tokio::spawn(sandboxd_o::metrics::serve(listener, shutdown.clone()));
        }
        tracing::info!(server = %client_config.server, identity = %identity, only = ?args.only, "controllers starting");
        let candidacy =
            sandboxd_o::controllers::Candidacy { identity, only: args.only.clone(), lease: args.leases.settings() };
        sandboxd_o::controllers::run_elected(objects.clone(), objects, Arc::new(agents), &config, &candidacy, shutdown)
            .await?;
        anyhow::Ok(())
    })
}

/// The lease holder of this replica: `<identity>/<host>-<pid>` under the token's identity, which
/// the server requires of a controller's leases; `controllers-<host>-<pid>` on an open server.
async fn replica_identity(client: &sandboxd_client::Client) -> anyhow::Result<String> {
    let (_, me): (u16, serde_json::Value) =
        client.call(reqwest::Method::GET, "/api/v1/whoami", None).await.context("asking the server who we are")?;
    let replica = default_identity("controllers");
    Ok(match me["identity"].as_str() {
        Some(name) if me["source"] != "anonymous" => format!("{name}/{}", replica.trim_start_matches("controllers-")),
        _ => replica,
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
        LogFormat::Text => {
            // Colours only on a terminal: logs redirected to a file are read by people and by tools.
            let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
            registry.with(tracing_subscriber::fmt::layer().with_ansi(ansi)).init()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn every_flag_of_every_subcommand_says_what_it_does() {
        let cli = Cli::command();
        for sub in cli.get_subcommands() {
            for arg in sub.get_arguments().filter(|a| a.get_id() != "help") {
                let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
                assert!(!help.trim().is_empty(), "{} --{}: no help text", sub.get_name(), arg.get_id());
            }
        }
    }

    #[test]
    fn config_flags_show_their_default_and_env_var() {
        let cli = Cli::command();
        let serve = cli.find_subcommand("serve").expect("serve");
        for key in &config::KEYS {
            let arg = serve.get_arguments().find(|a| a.get_long() == Some(key.flag().as_str()));
            let help = arg.and_then(|a| a.get_help()).map(|h| h.to_string()).unwrap_or_default();
            assert!(help.contains("[default: "), "--{}: {help:?}", key.flag());
            assert!(help.contains(&key.env_var()), "--{}: {help:?}", key.flag());
        }
    }

    #[test]
    fn config_flags_reach_the_config_by_their_key() {
        let cli = Cli::try_parse_from(["sandboxd-o", "serve", "--heartbeat-interval", "7s", "--log-format", "json"])
            .expect("parses");
        let Command::Serve(args) = cli.command else { panic!("serve") };
        let config = Config::load(None, &HashMap::new(), &args.flags.into_map()).expect("valid");
        assert_eq!(config.heartbeat_interval, Duration::from_secs(7));
        assert_eq!(config.log_format, LogFormat::Json);
        assert_eq!(config.sync_period, Duration::from_secs(30), "flags not given keep their default");
    }
}
