//! Command-line flags of the `sbxlet` binary and how a parsed command line runs.

use crate::config::SimConfig;
use crate::faults::Faults;
use crate::fleet::{start_fleet, FleetConfig, FleetError};
use clap::{Args, Parser, Subcommand, ValueEnum};
use sandboxd_api::quantity::{parse_bytes, parse_cpu_milli};
use sandboxd_api::RuntimeClass;
use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

/// Why the binary stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("starting agents")]
    Start(#[source] io::Error),
    #[error(transparent)]
    Fleet(#[from] FleetError),
    #[error("installing signal handlers")]
    Signals(#[source] io::Error),
    #[error(transparent)]
    Runtime(#[from] crate::error::RuntimeError),
    #[error("{0}")]
    Access(String),
}

/// `sbxlet`: one node agent, or `sbxlet fleet`: many in one process.
#[derive(Debug, Parser)]
#[command(name = "sbxlet", version, about = "The sandboxd-o node agent: real sandboxes under runc, or simulated ones")]
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Address the agent API listens on; published ports bind on the same IP.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub access: AccessFlags,
    #[command(flatten)]
    pub sim: SimFlags,
    #[command(flatten)]
    pub runc: RuncFlags,
}

/// Subcommands of `sbxlet`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run many simulated agents on consecutive loopback addresses.
    Fleet(FleetFlags),
    /// Manage the images of a real node.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Remove every sandbox a (stopped) real agent left on this node, its bridge and cgroups; images stay.
    Purge(RuncFlags),
}

/// `sbxlet image …`
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Import the images of an OCI image-layout archive (tar), for nodes without a registry.
    Import {
        /// The archive (`index.json`, `oci-layout`, `blobs/sha256/…`); each image needs a
        /// `org.opencontainers.image.ref.name` annotation.
        file: std::path::PathBuf,
        /// The agent's state directory.
        #[arg(long, default_value = "/var/lib/sbxlet")]
        state_dir: std::path::PathBuf,
    },
}

/// Settings of the real runtime (`--runtime runc`).
#[derive(Debug, Args)]
pub struct RuncFlags {
    /// Where images, sandbox records and container bundles live (survives agent restarts).
    #[arg(long, default_value = "/var/lib/sbxlet")]
    pub state_dir: std::path::PathBuf,
    /// Node bridge the sandboxes attach to (created when missing).
    #[arg(long, default_value = "sbx0")]
    pub bridge: String,
    /// Cgroup under which each sandbox gets its own.
    #[arg(long, default_value = "sandboxd")]
    pub cgroup_parent: String,
    /// Pull Docker Hub images from this registry (host:port) instead.
    #[arg(long)]
    pub registry_mirror: Option<String>,
    /// A registry (host:port) spoken to over plain http; loopback registries always are.
    #[arg(long)]
    pub insecure_registry: Vec<String>,
    /// The runc binary (runtime class `runc`).
    #[arg(long, default_value = "runc")]
    pub runc: String,
    /// An extra global flag for every runc call (repeatable), e.g. `--runc-flag=--systemd-cgroup`.
    #[arg(long = "runc-flag", allow_hyphen_values = true)]
    pub runc_flags: Vec<String>,
    /// The runsc binary (runtime class `gvisor`); the class is offered when it boots a sandbox.
    #[arg(long, default_value = "runsc")]
    pub runsc: String,
    /// An extra global flag for every runsc call (repeatable), e.g. `--runsc-flag=--debug`.
    #[arg(long = "runsc-flag", allow_hyphen_values = true)]
    pub runsc_flags: Vec<String>,
    /// gVisor's platform (ptrace, systrap, kvm); runsc's own default when absent.
    #[arg(long)]
    pub gvisor_platform: Option<String>,
    /// Rotate a container's log past this size.
    #[arg(long, value_parser = byte_quantity, default_value = "10Mi")]
    pub log_max_size: u64,
    /// Remove images no sandbox used for this long.
    #[arg(long, value_parser = parse_duration, default_value = "1h")]
    pub image_gc_after: Duration,
    /// Largest file read or written through the files API, and largest archive (over it: 413).
    #[arg(long, value_parser = byte_quantity, default_value = "100Mi")]
    pub max_file_size: u64,
    /// Bytes of stdout and of stderr a buffered exec returns; the rest is dropped and flagged.
    #[arg(long, value_parser = byte_quantity, default_value = "1Mi")]
    pub max_exec_output: u64,
    /// Streamed execs and log follows open at once; more get 429.
    #[arg(long, default_value_t = 4096)]
    pub max_sessions: usize,
}

impl RuncFlags {
    /// The real runtime's configuration; capacity, external address and IP pool come from `sim`'s
    /// shared flags (capacity defaults to the node's own CPUs and memory).
    pub fn into_config(self, listen: SocketAddr, shared: &SimFlags) -> crate::runc::RuncConfig {
        crate::runc::RuncConfig {
            listen,
            state_dir: self.state_dir,
            ip_pool: shared.ip_pool.clone().unwrap_or_else(|| SimConfig::default().ip_pool),
            bridge: self.bridge,
            cgroup_parent: self.cgroup_parent,
            capacity_cpu_milli: shared.capacity_cpu,
            capacity_memory_bytes: shared.capacity_memory,
            external: shared.external.clone().unwrap_or_default(),
            images: crate::runc::image::ImageSettings {
                registry_mirror: self.registry_mirror,
                insecure_registries: self.insecure_registry,
            },
            classes: crate::runc::classes::ClassSettings {
                runc: self.runc,
                runc_flags: self.runc_flags,
                runsc: self.runsc,
                runsc_flags: self.runsc_flags,
                gvisor_platform: self.gvisor_platform,
                wanted: shared.runtime_classes.as_ref().map(|c| c.iter().copied().collect()),
            },
            log_max_bytes: self.log_max_size,
            image_gc_after: self.image_gc_after,
            data_plane: crate::backend::DataPlaneLimits {
                max_file_bytes: self.max_file_size,
                max_exec_output_bytes: self.max_exec_output as usize,
                max_sessions: self.max_sessions.max(1),
            },
            token: None,
        }
    }
}

/// Who may call the agent.
#[derive(Debug, Args)]
pub struct AccessFlags {
    /// File holding this node's token, which every call but /healthz must carry: what
    /// `sandboxd-o agent-token NODE` prints on the orchestrator. Without it the agent listens on
    /// loopback only.
    #[arg(long, env = "SBXLET_TOKEN_FILE")]
    pub token_file: Option<std::path::PathBuf>,
    /// Serve /sim/faults, /sim/restart and /sim/sandboxes/{id}/fail (simulator, loopback only).
    #[arg(long)]
    pub enable_fault_injection: bool,
}

impl AccessFlags {
    /// The token, read from its file; refuses an agent without one, or with fault injection,
    /// that would listen beyond loopback.
    pub fn token_for(&self, listen: std::net::IpAddr) -> Result<Option<String>, CliError> {
        if self.enable_fault_injection && !listen.is_loopback() {
            return Err(CliError::Access(format!("--enable-fault-injection needs a loopback address, not {listen}")));
        }
        let Some(path) = &self.token_file else {
            if !listen.is_loopback() {
                return Err(CliError::Access(format!(
                    "listening on {listen} without a credential: set --token-file (`sandboxd-o agent-token NODE` prints it)"
                )));
            }
            tracing::warn!("no --token-file: any local process may call this agent");
            return Ok(None);
        };
        crate::auth::read_token_file(path).map(Some).map_err(|e| CliError::Access(format!("{}: {e}", path.display())))
    }
}

/// Flags of `sbxlet fleet`.
#[derive(Debug, Args)]
pub struct FleetFlags {
    /// Number of agents.
    #[arg(long)]
    pub nodes: usize,
    /// Address of the first agent (must be in 127.0.0.0/8); the others follow it.
    #[arg(long, default_value = "127.1.0.1")]
    pub base_ip: Ipv4Addr,
    /// Port every agent listens on.
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Register every agent as a node with this sandboxd-o server (a loopback http URL).
    #[arg(long)]
    pub register: Option<String>,
    /// Node names are `{prefix}-1`, `{prefix}-2`, ...
    #[arg(long, default_value = "sim")]
    pub name_prefix: String,
    #[command(flatten)]
    pub sim: SimFlags,
}

/// The container runtime behind the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RuntimeKind {
    /// Simulated sandboxes with real published ports.
    Sim,
    /// Real sandboxes: OCI containers under runc in network namespaces (needs root).
    Runc,
}

/// Settings of each agent; unset flags keep the defaults of [`SimConfig`].
#[derive(Debug, Args)]
pub struct SimFlags {
    /// Container runtime.
    #[arg(long, value_enum, default_value = "sim")]
    pub runtime: RuntimeKind,
    /// CPU capacity, as a quantity (4000m, 4, 0.5).
    #[arg(long, value_parser = cpu_quantity)]
    pub capacity_cpu: Option<u64>,
    /// Memory capacity, as a quantity (16Gi, 512Mi).
    #[arg(long, value_parser = byte_quantity)]
    pub capacity_memory: Option<u64>,
    /// External address reported in the status.
    #[arg(long)]
    pub external: Option<String>,
    /// Time a sandbox stays creating before it runs (500ms, 5s, 2m).
    #[arg(long, value_parser = parse_duration)]
    pub create_delay: Option<Duration>,
    /// IPv4 CIDR private sandbox addresses come from.
    #[arg(long)]
    pub ip_pool: Option<String>,
    /// Runtime classes offered, comma-separated (runc, gvisor). Simulated agents offer both by
    /// default; a real agent offers those whose binary it finds, and fails to start when a class
    /// named here cannot run.
    #[arg(long, value_delimiter = ',', value_parser = runtime_class)]
    pub runtime_classes: Option<Vec<RuntimeClass>>,
    /// Fault: /healthz answers 500.
    #[arg(long)]
    pub fault_health_failing: bool,
    /// Fault: /api/v1/status answers 500.
    #[arg(long)]
    pub fault_status_failing: bool,
    /// Fault: delay before every answer, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub fault_latency_ms: u64,
    /// Fault: probability (0.0-1.0) that a sandbox call answers 500.
    #[arg(long, value_parser = probability, default_value_t = 0.0)]
    pub fault_error_rate: f64,
    /// Fault: every answer is non-JSON text with status 200.
    #[arg(long)]
    pub fault_garbage: bool,
    /// Fault: published ports answer 503.
    #[arg(long)]
    pub fault_probe_503: bool,
}

impl SimFlags {
    /// The agent configuration these flags describe, listening on `listen`.
    pub fn into_config(self, listen: SocketAddr) -> SimConfig {
        let defaults = SimConfig::default();
        SimConfig {
            listen,
            capacity_cpu_milli: self.capacity_cpu.unwrap_or(defaults.capacity_cpu_milli),
            capacity_memory_bytes: self.capacity_memory.unwrap_or(defaults.capacity_memory_bytes),
            external: self.external.unwrap_or(defaults.external),
            create_delay: self.create_delay.unwrap_or(defaults.create_delay),
            ip_pool: self.ip_pool.unwrap_or(defaults.ip_pool),
            runtime_classes: self.runtime_classes.map_or(defaults.runtime_classes, |c| c.into_iter().collect()),
            faults: Faults {
                health_failing: self.fault_health_failing,
                status_failing: self.fault_status_failing,
                latency_ms: self.fault_latency_ms,
                error_rate: self.fault_error_rate,
                garbage: self.fault_garbage,
                probe_503: self.fault_probe_503,
            },
            record_admissions: false,
            token: None,
            fault_injection: false,
            process_metrics: false,
        }
    }
}

fn cpu_quantity(s: &str) -> Result<u64, String> {
    parse_cpu_milli(s).map_err(|e| e.to_string())
}

fn byte_quantity(s: &str) -> Result<u64, String> {
    parse_bytes(s).map_err(|e| e.to_string())
}

fn runtime_class(s: &str) -> Result<RuntimeClass, String> {
    RuntimeClass::parse(s.trim()).ok_or_else(|| format!("unknown runtime class {s:?} (known: runc, gvisor)"))
}

fn probability(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
        _ => Err(format!("{s:?} is not a number in 0.0-1.0")),
    }
}

/// Parses a whole number with a unit: `500ms`, `5s`, `2m`, `1h`; a bare `0` is zero.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number.parse().map_err(|_| format!("{s:?} is not a duration like 500ms, 5s or 2m"))?;
    let unit_secs = match unit {
        "ms" => return Ok(Duration::from_millis(n)),
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return Err(format!("{s:?} has no unit of ms, s, m or h")),
    };
    n.checked_mul(unit_secs).map(Duration::from_secs).ok_or_else(|| format!("{s:?} is too long"))
}

/// Runs what the command line asks for until `shutdown` completes.
pub async fn run(cli: Cli, shutdown: impl Future<Output = ()>) -> Result<(), CliError> {
    match cli.command {
        None if cli.sim.runtime == RuntimeKind::Runc => {
            let token = cli.access.token_for(cli.listen.ip())?;
            let config = crate::runc::RuncConfig { token, ..cli.runc.into_config(cli.listen, &cli.sim) };
            run_real_agent(config, shutdown).await
        }
        None => {
            let token = cli.access.token_for(cli.listen.ip())?;
            let fault_injection = cli.access.enable_fault_injection;
            let config = SimConfig { token, fault_injection, process_metrics: true, ..cli.sim.into_config(cli.listen) };
            run_agent(config, shutdown).await
        }
        Some(Command::Fleet(flags)) => {
            let token = cli.access.token_for(std::net::IpAddr::V4(flags.base_ip))?;
            run_fleet(flags, token, cli.access.enable_fault_injection, shutdown).await
        }
        Some(Command::Purge(flags)) => {
            crate::runc::purge(&flags.into_config(cli.listen, &cli.sim)).await;
            Ok(())
        }
        Some(Command::Image(ImageCommand::Import { file, state_dir })) => {
            let store = crate::runc::image::ImageStore::open(&state_dir.join("images"), Default::default())
                .map_err(CliError::Start)?;
            for reference in store.import_archive(&file).await? {
                println!("{reference}");
            }
            Ok(())
        }
    }
}

async fn run_real_agent(config: crate::runc::RuncConfig, shutdown: impl Future<Output = ()>) -> Result<(), CliError> {
    let agent = crate::runc::start(config).await?;
    tracing::info!(addr = %agent.addr(), "ready (runtime runc)");
    shutdown.await;
    tracing::info!("shutting down; sandboxes keep running");
    agent.shutdown().await;
    Ok(())
}

async fn run_agent(config: SimConfig, shutdown: impl Future<Output = ()>) -> Result<(), CliError> {
    let agent = crate::start(config).await.map_err(CliError::Start)?;
    tracing::info!(addr = %agent.addr(), "ready");
    shutdown.await;
    tracing::info!("shutting down");
    agent.shutdown().await;
    Ok(())
}

async fn run_fleet(
    flags: FleetFlags,
    token: Option<String>,
    fault_injection: bool,
    shutdown: impl Future<Output = ()>,
) -> Result<(), CliError> {
    let started = Instant::now();
    let template = flags.sim.into_config(SocketAddr::from((flags.base_ip, flags.port)));
    let config = FleetConfig {
        nodes: flags.nodes,
        base_ip: flags.base_ip,
        port: flags.port,
        template: SimConfig { token, fault_injection, ..template },
        tokens: Vec::new(),
        name_prefix: flags.name_prefix,
    };
    let fleet = start_fleet(config).await.map_err(CliError::Start)?;
    tracing::info!(nodes = flags.nodes, elapsed_ms = started.elapsed().as_millis() as u64, "agents started");
    if let Some(server) = &flags.register {
        if let Err(e) = fleet.register(server).await {
            fleet.shutdown().await;
            return Err(e.into());
        }
        tracing::info!(nodes = flags.nodes, %server, elapsed_ms = started.elapsed().as_millis() as u64, "registered");
    }
    tracing::info!(nodes = flags.nodes, elapsed_ms = started.elapsed().as_millis() as u64, "ready");
    shutdown.await;
    tracing::info!("shutting down");
    fleet.shutdown().await;
    Ok(())
}

/// Completes on SIGINT or SIGTERM.
pub fn shutdown_signal() -> Result<impl Future<Output = ()>, CliError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt()).map_err(CliError::Signals)?;
    let mut terminate = signal(SignalKind::terminate()).map_err(CliError::Signals)?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_ms_s_m_h() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        for bad in ["", "5", "s", "1.5s", "5d", "-1s", "5 s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn agent_flags_fill_the_config() {
        let cli = Cli::parse_from([
            "sbxlet",
            "--listen",
            "127.0.1.1:8080",
            "--capacity-cpu",
            "2500m",
            "--capacity-memory",
            "8Gi",
            "--external",
            "203.0.113.10",
            "--create-delay",
            "500ms",
            "--fault-error-rate",
            "0.25",
            "--fault-probe-503",
        ]);
        assert!(cli.command.is_none());
        let config = cli.sim.into_config(cli.listen);
        assert_eq!(config.listen, "127.0.1.1:8080".parse().unwrap());
        assert_eq!((config.capacity_cpu_milli, config.capacity_memory_bytes), (2500, 8 << 30));
        assert_eq!(config.external, "203.0.113.10");
        assert_eq!(config.create_delay, Duration::from_millis(500));
        assert_eq!(config.ip_pool, "10.88.0.0/16");
        assert_eq!(config.faults, Faults { error_rate: 0.25, probe_503: true, ..Faults::default() });
    }

    #[test]
    fn unset_flags_keep_the_config_defaults() {
        let cli = Cli::parse_from(["sbxlet"]);
        let config = cli.sim.into_config(cli.listen);
        let listen = "127.0.0.1:8080".parse().unwrap();
        assert_eq!(config, SimConfig { listen, fault_injection: false, ..SimConfig::default() });
    }

    #[test]
    fn an_agent_without_a_token_or_with_faults_stays_on_loopback() {
        let cli = Cli::parse_from(["sbxlet", "--listen", "10.0.0.5:8080"]);
        assert!(cli.access.token_for(cli.listen.ip()).is_err(), "no token beyond loopback");
        let cli = Cli::parse_from(["sbxlet"]);
        assert_eq!(cli.access.token_for(cli.listen.ip()).unwrap(), None);
        assert!(!cli.access.enable_fault_injection, "fault routes are off unless asked for");
        let cli = Cli::parse_from(["sbxlet", "--listen", "10.0.0.5:8080", "--enable-fault-injection"]);
        assert!(cli.access.token_for(cli.listen.ip()).is_err());
        let dir = std::env::temp_dir().join(format!("sbxlet-token-{}", std::process::id()));
        std::fs::write(&dir, "s3cret\n").unwrap();
        let file = dir.to_str().unwrap();
        let cli = Cli::parse_from(["sbxlet", "--listen", "10.0.0.5:8080", "--token-file", file]);
        assert_eq!(cli.access.token_for(cli.listen.ip()).unwrap().as_deref(), Some("s3cret"));
        std::fs::remove_file(&dir).unwrap();
    }

    #[test]
    fn fleet_flags_parse() {
        let cli = Cli::parse_from([
            "sbxlet",
            "fleet",
            "--nodes",
            "3",
            "--base-ip",
            "127.1.0.1",
            "--port",
            "9000",
            "--register",
            "http://127.0.0.1:8082",
            "--capacity-cpu",
            "8",
        ]);
        let Some(Command::Fleet(f)) = cli.command else { panic!("not fleet") };
        assert_eq!((f.nodes, f.port, f.name_prefix.as_str()), (3, 9000, "sim"));
        assert_eq!(f.register.as_deref(), Some("http://127.0.0.1:8082"));
        assert_eq!(f.sim.capacity_cpu, Some(8000));
    }

    #[test]
    fn bad_quantities_and_rates_are_rejected() {
        assert!(Cli::try_parse_from(["sbxlet", "--capacity-cpu", "lots"]).is_err());
        assert!(Cli::try_parse_from(["sbxlet", "--fault-error-rate", "1.5"]).is_err());
        assert!(Cli::try_parse_from(["sbxlet", "--capacity-cpu", "1", "fleet", "--nodes", "1"]).is_err());
    }
}
