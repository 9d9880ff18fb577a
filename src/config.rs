//! Configuration: one struct with defaults, fed by the TOML file, `SANDBOXD_<KEY>` env vars and flags.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::address_policy::AddressPolicy;
use sandboxd_api::quantity::{parse_bytes, parse_cpu_milli};

/// A configuration value that failed to parse or validate, naming its key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
    #[error("config file {path}: {message}")]
    File { path: PathBuf, message: String },
}

/// How the scheduler scores nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SchedulerPolicy {
    /// Least allocated node first.
    Spread,
    /// Most allocated node first.
    Binpack,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// A node declared in the configuration file (`source: config`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticNode {
    #[serde(alias = "name")]
    pub id: String,
    pub ip: String,
    pub port: u16,
    #[serde(default)]
    pub external: Option<String>,
    #[serde(default)]
    pub max_alloc_percent: Option<u32>,
    /// The node's labels; absent leaves what the API set.
    #[serde(default)]
    pub labels: Option<std::collections::BTreeMap<String, String>>,
    /// Taints, as in `POST /api/v1/nodes`; absent keeps what the node has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub taints: Option<Vec<sandboxd_api::taints::Taint>>,
}

/// Every setting of the orchestrator, with the defaults of semantics.md.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub listen: SocketAddr,
    pub store: String,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    pub node_ready_threshold: u32,
    pub node_failure_threshold: u32,
    pub node_lost_grace: Duration,
    /// A sandbox Scheduled or Creating longer than this fails with `CreateTimeout`.
    pub creating_timeout: Duration,
    pub max_alloc_percent: u32,
    pub host_port_range: (u16, u16),
    pub scheduler_policy: SchedulerPolicy,
    pub sync_period: Duration,
    pub agent_timeout: Duration,
    /// Which agent addresses may be called: `agent_allowed_networks`, replaced by loopback only when
    /// `SANDBOXD_LOOPBACK_ONLY=1` (tests and demos on a closed network).
    pub agent_policy: AddressPolicy,
    pub max_ttl_seconds: i64,
    pub default_cpu_milli: u64,
    pub default_memory_bytes: u64,
    pub nodes: Vec<StaticNode>,
    pub auth_token_file: Option<PathBuf>,
    /// Plain HTTP, no authentication, on this loopback address; `None`: HTTPS with tokens on `listen`.
    pub insecure_listen: Option<SocketAddr>,
    /// A second listener, on its own thread, for controllers, nodes, `/metrics` and `/healthz` only.
    pub system_listen: Option<SocketAddr>,
    pub data_dir: PathBuf,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// Names and addresses the generated serving certificate covers besides loopback and the host's.
    pub tls_san: Vec<String>,
    pub agent_secret_file: Option<PathBuf>,
    pub audit_log: Option<PathBuf>,
    pub audit_log_max_bytes: u64,
    pub max_body_bytes: usize,
    /// Largest file or archive uploaded through the data plane (`…/files`, `…/files/archive`).
    pub max_file_bytes: u64,
    /// Request headers must arrive within this; idle keep-alive connections are closed after it.
    pub header_read_timeout: Duration,
    /// Connections open at once (lowered to fit the descriptor limit); more are answered 503.
    pub max_connections: usize,
    /// Requests in flight per priority class; more get 429 with `Retry-After`.
    pub max_inflight_system: usize,
    pub max_inflight_workload: usize,
    pub max_inflight_long_running: usize,
    pub log_format: LogFormat,
    pub watch_history_bytes: usize,
    /// HTTP watches open at once; more get 429.
    pub max_watches: usize,
    pub max_watches_per_identity: usize,
    /// Percent of a class one identity may hold.
    pub max_inflight_share: u32,
    /// Events queued for one HTTP watcher that does not read; one more cuts it off.
    pub watch_buffer: usize,
    /// Most history events one HTTP watch may replay; from further back it gets 410 and lists.
    pub watch_max_replay: usize,
    /// Events last seen longer ago than this are deleted.
    pub event_ttl: Duration,
    /// Most events kept.
    pub event_max: usize,
    /// How long a small store commit waits for more writes while several writers are busy.
    pub store_commit_delay: Duration,
}

/// One configuration key: its file key (also `--flag-name` and `SANDBOXD_KEY`), default and help text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    pub name: &'static str,
    pub default: &'static str,
    pub help: &'static str,
}

impl Key {
    /// The command-line flag: `heartbeat_interval` → `heartbeat-interval` (used as `--heartbeat-interval`).
    pub fn flag(&self) -> String {
        self.name.replace('_', "-")
    }

    /// The environment variable: `heartbeat_interval` → `SANDBOXD_HEARTBEAT_INTERVAL`.
    pub fn env_var(&self) -> String {
        format!("SANDBOXD_{}", self.name.to_ascii_uppercase())
    }
}

const fn key(name: &'static str, default: &'static str, help: &'static str) -> Key {
    Key { name, default, help }
}

/// Every key, in the order of the table in semantics.md. This is the one declaration of each key:
/// the file layer, the env layer, the flags and their `--help` all read it.
pub const KEYS: [Key; 45] = [
    key("listen", "0.0.0.0:8082", "Address the API listens on"),
    key(
        "store",
        "sqlite://./sandboxd-data/store.db",
        "Store: memory://, sqlite://PATH or etcd://HOST:PORT[,HOST:PORT...]",
    ),
    key("heartbeat_interval", "5s", "How often each node's agent is heartbeated (±10 %, steered so that nodes spread evenly over it)"),
    key("heartbeat_timeout", "2s", "Bound on each heartbeat call to an agent (at most heartbeat_interval)"),
    key("node_ready_threshold", "2", "Successful heartbeats in a row that make a node Ready"),
    key("node_failure_threshold", "3", "Failed heartbeats in a row that make a node NotReady"),
    key("node_lost_grace", "60s", "How long a node may stay NotReady before its sandboxes fail with NodeLost"),
    key(
        "creating_timeout",
        "5m",
        "How long a sandbox may wait for its agent (Scheduled or Creating) before it fails with CreateTimeout",
    ),
    key(
        "max_alloc_percent",
        "90",
        "Share of a node's capacity the scheduler may allocate (1-100), unless the node sets its own",
    ),
    key("host_port_range", "10000-19999", "Range host ports are allocated from"),
    key("scheduler_policy", "spread", "Node scoring: spread (least allocated first) or binpack (most allocated first)"),
    key("sync_period", "30s", "How often controllers resync every object they cache against the agents"),
    key("agent_timeout", "5s", "Bound on each call to an agent other than heartbeats"),
    key(
        "agent_allowed_networks",
        "",
        "Networks (CIDRs, comma-separated) agent addresses must be in; empty: any address but unspecified, \
         broadcast, multicast, link-local and cloud metadata ones, which are always refused",
    ),
    key("max_ttl_seconds", "86400", "Largest ttl_seconds a sandbox may ask for"),
    key("default_cpu", "100m", "CPU request of a container without a resource block"),
    key("default_memory", "128Mi", "Memory request of a container without a resource block"),
    key("nodes", "[]", "Static nodes as JSON: [{\"id\": \"n1\", \"ip\": \"127.0.1.1\", \"port\": 8080}]"),
    key(
        "insecure_listen",
        "",
        "Serve plain HTTP without authentication on this loopback address instead of HTTPS on listen (local development only)",
    ),
    key(
        "system_listen",
        "",
        "Also serve controllers, nodes, /metrics and /healthz (no user requests) on this address, on a thread of its own, \
         so they are answered while users saturate the main listener; loopback only with insecure_listen",
    ),
    key(
        "data_dir",
        "./sandboxd-data",
        "Directory of the generated credentials (CA, serving certificate, admin token, agent token, client.json), mode 0700",
    ),
    key("tls_cert_file", "", "PEM serving certificate (chain) to use instead of the generated one"),
    key("tls_key_file", "", "PEM private key of tls_cert_file"),
    key(
        "tls_san",
        "",
        "More names and addresses (comma-separated) the generated serving certificate covers, for clients that reach the server by them",
    ),
    key(
        "auth_token_file",
        "",
        "File holding the admin bearer token (empty: <data_dir>/admin.token, generated on first start)",
    ),
    key("audit_log", "", "File of the audit log: one JSON line per mutating request (empty: off)"),
    key("audit_log_max_bytes", "100MiB", "Size past which the audit log rotates (three older files are kept)"),
    key(
        "agent_secret_file",
        "",
        "File holding the secret each node's agent token is derived from (empty: <data_dir>/agent.secret, generated on first start)",
    ),
    key("max_body_bytes", "1MiB", "Largest request body the API accepts"),
    key("max_file_bytes", "100MiB", "Largest file or archive uploaded into a sandbox (over it: 413)"),
    key(
        "header_read_timeout",
        "30s",
        "Request headers must arrive within this; an idle keep-alive connection is closed after it",
    ),
    key("max_connections", "10000", "Connections open at once; more get 503 with Retry-After (GET /healthz still 200)"),
    key(
        "max_inflight_system",
        "200",
        "Requests in flight from controllers and nodes (status, heartbeats, leases, metrics); more get 429",
    ),
    key("max_inflight_workload", "400", "Requests in flight from users (everything else); more get 429"),
    key(
        "max_inflight_long_running",
        "2000",
        "Streams open at once (watches, followed logs, exec, file transfers); more get 429",
    ),
    key("log_format", "text", "Log output: text or json"),
    key(
        "watch_history_bytes",
        "64MiB",
        "Bytes of recent changes kept for watches to resume from (older: 410, list again)",
    ),
    key(
        "max_inflight_share",
        "50",
        "Percent of each class's in-flight requests one identity may hold (1-100); more get 429",
    ),
    key("max_watches", "1000", "HTTP watches open at once; more get 429 with Retry-After"),
    key("max_watches_per_identity", "100", "HTTP watches one identity may hold open; more get 429"),
    key(
        "watch_buffer",
        "1000",
        "Events queued for one HTTP watcher that stops reading; one more ends its stream with an ERROR event (429)",
    ),
    key(
        "watch_max_replay",
        "10000",
        "Most past events one watch may replay; a watch from further back gets 410 and lists again",
    ),
    key("event_ttl", "1h", "How long an Event is kept after it last happened (1m-30d)"),
    key("event_max", "20000", "Most Events kept; past it the ones last seen longest ago are deleted first"),
    key(
        "store_commit_delay",
        "0",
        "How long a small SQLite commit waits for more writes while several writers are busy (0-10ms; 0: never)",
    ),
];

fn known_keys() -> impl Iterator<Item = &'static str> {
    KEYS.iter().map(|k| k.name)
}

/// `tls_san`: comma-separated DNS names or IP addresses.
fn parse_sans(s: &str) -> Result<Vec<String>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .map(|name| {
            let ip = name.parse::<std::net::IpAddr>().is_ok();
            if ip || sandboxd_api::validate::is_ip_or_dns_name(name) {
                Ok(name.to_string())
            } else {
                Err(format!("{name:?} is neither an IP address nor a DNS name"))
            }
        })
        .collect()
}

fn optional_path(value: &str) -> Option<PathBuf> {
    (!value.is_empty()).then(|| PathBuf::from(value))
}

/// `insecure_listen`: empty, or a loopback address: plain HTTP without authentication must not
/// be reachable from another machine.
fn parse_insecure_listen(s: &str) -> Result<Option<SocketAddr>, String> {
    if s.is_empty() {
        return Ok(None);
    }
    let addr = s.parse::<SocketAddr>().map_err(|e| e.to_string())?;
    if !addr.ip().is_loopback() {
        return Err(format!("{addr} is not a loopback address; without TLS and tokens only loopback is allowed"));
    }
    Ok(Some(addr))
}

/// An address, or empty for none.
fn parse_optional_addr(s: &str) -> Result<Option<SocketAddr>, String> {
    if s.is_empty() {
        return Ok(None);
    }
    s.parse::<SocketAddr>().map(Some).map_err(|e| e.to_string())
}

fn default_of(name: &str) -> &'static str {
    KEYS.iter().find(|k| k.name == name).map(|k| k.default).unwrap_or_default()
}

/// Whether `SANDBOXD_LOOPBACK_ONLY` asks to refuse agent addresses outside loopback (it beats
/// `agent_allowed_networks`).
fn loopback_only_from_env(env: &HashMap<String, String>) -> bool {
    env.get("SANDBOXD_LOOPBACK_ONLY").is_some_and(|v| v == "1" || v == "true")
}

impl Default for Config {
    fn default() -> Self {
        Config::from_layers(&HashMap::new(), false).expect("defaults are valid")
    }
}

impl Config {
    /// Builds the configuration: flag > env > file > default. `flags` maps keys to raw flag values.
    pub fn load(
        file: Option<&Path>,
        env: &HashMap<String, String>,
        flags: &HashMap<String, String>,
    ) -> Result<Config, ConfigError> {
        let mut raw: HashMap<String, String> = HashMap::new();
        if let Some(path) = file {
            raw.extend(read_file(path)?);
        }
        for key in &KEYS {
            if let Some(v) = env.get(&key.env_var()) {
                raw.insert(key.name.to_string(), v.clone());
            }
        }
        for (k, v) in flags {
            raw.insert(k.clone(), v.clone());
        }
        Config::from_layers(&raw, loopback_only_from_env(env))
    }

    fn from_layers(raw: &HashMap<String, String>, loopback_only: bool) -> Result<Config, ConfigError> {
        let value = |key: &str| -> String { raw.get(key).cloned().unwrap_or_else(|| default_of(key).to_string()) };
        let allowed_networks = parse_key("agent_allowed_networks", &value("agent_allowed_networks"), |s| {
            AddressPolicy::parse_networks(s).map_err(|e| e.to_string())
        })?;
        let config = Config {
            listen: parse_key("listen", &value("listen"), |s| s.parse::<SocketAddr>().map_err(|e| e.to_string()))?,
            store: parse_key("store", &value("store"), parse_store_url)?,
            heartbeat_interval: parse_key("heartbeat_interval", &value("heartbeat_interval"), positive_duration)?,
            heartbeat_timeout: parse_key("heartbeat_timeout", &value("heartbeat_timeout"), positive_duration)?,
            node_ready_threshold: parse_key("node_ready_threshold", &value("node_ready_threshold"), at_least_one)?,
            node_failure_threshold: parse_key(
                "node_failure_threshold",
                &value("node_failure_threshold"),
                at_least_one,
            )?,
            node_lost_grace: parse_key("node_lost_grace", &value("node_lost_grace"), parse_duration)?,
            creating_timeout: parse_key("creating_timeout", &value("creating_timeout"), positive_duration)?,
            max_alloc_percent: parse_key("max_alloc_percent", &value("max_alloc_percent"), percent)?,
            host_port_range: parse_key("host_port_range", &value("host_port_range"), parse_port_range)?,
            scheduler_policy: parse_key("scheduler_policy", &value("scheduler_policy"), parse_policy)?,
            sync_period: parse_key("sync_period", &value("sync_period"), positive_duration)?,
            agent_timeout: parse_key("agent_timeout", &value("agent_timeout"), positive_duration)?,
            agent_policy: if loopback_only {
                AddressPolicy::loopback_only()
            } else {
                AddressPolicy::allowing(allowed_networks)
            },
            max_ttl_seconds: parse_key("max_ttl_seconds", &value("max_ttl_seconds"), |s| {
                s.parse::<i64>()
                    .ok()
                    .filter(|v| (0..=MAX_TTL_CEILING).contains(v))
                    .ok_or_else(|| format!("{s:?} is not an integer in 0-{MAX_TTL_CEILING} (ten years)"))
            })?,
            default_cpu_milli: parse_key("default_cpu", &value("default_cpu"), |s| {
                parse_cpu_milli(s).map_err(|e| e.to_string()).and_then(nonzero)
            })?,
            default_memory_bytes: parse_key("default_memory", &value("default_memory"), |s| {
                parse_bytes(s).map_err(|e| e.to_string()).and_then(nonzero)
            })?,
            nodes: parse_key("nodes", &value("nodes"), parse_nodes)?,
            auth_token_file: optional_path(&value("auth_token_file")),
            insecure_listen: parse_key("insecure_listen", &value("insecure_listen"), parse_insecure_listen)?,
            system_listen: parse_key("system_listen", &value("system_listen"), parse_optional_addr)?,
            data_dir: PathBuf::from(value("data_dir")),
            tls_cert_file: optional_path(&value("tls_cert_file")),
            tls_key_file: optional_path(&value("tls_key_file")),
            tls_san: parse_key("tls_san", &value("tls_san"), parse_sans)?,
            agent_secret_file: optional_path(&value("agent_secret_file")),
            audit_log: optional_path(&value("audit_log")),
            audit_log_max_bytes: parse_key("audit_log_max_bytes", &value("audit_log_max_bytes"), |s| {
                let bytes = parse_byte_size(s)?;
                if bytes < 4096 {
                    return Err(format!("{s:?} is below 4KiB"));
                }
                Ok(bytes as u64)
            })?,
            max_body_bytes: parse_key("max_body_bytes", &value("max_body_bytes"), |s| {
                at_most(parse_byte_size(s)?, 64 << 20, "64MiB (JSON bodies are read whole)")
            })?,
            max_file_bytes: parse_key("max_file_bytes", &value("max_file_bytes"), |s| {
                at_most(parse_byte_size(s)?, 64 << 30, "64GiB")
            })? as u64,
            header_read_timeout: parse_key("header_read_timeout", &value("header_read_timeout"), |s| {
                let d = positive_duration(s)?;
                if d > Duration::from_secs(3600) {
                    return Err(format!("{s:?} is more than 1h"));
                }
                Ok(d)
            })?,
            max_inflight_system: parse_key("max_inflight_system", &value("max_inflight_system"), in_flight)?,
            max_inflight_workload: parse_key("max_inflight_workload", &value("max_inflight_workload"), in_flight)?,
            max_inflight_long_running: parse_key(
                "max_inflight_long_running",
                &value("max_inflight_long_running"),
                in_flight,
            )?,
            max_connections: parse_key("max_connections", &value("max_connections"), |s| count_in(s, 16, 1_000_000))?,
            log_format: parse_key("log_format", &value("log_format"), |s| match s {
                "text" => Ok(LogFormat::Text),
                "json" => Ok(LogFormat::Json),
                _ => Err(format!("{s:?} is not one of text, json")),
            })?,
            watch_history_bytes: parse_key("watch_history_bytes", &value("watch_history_bytes"), |s| {
                parse_byte_size(s).and_then(|b| {
                    if b < 1 << 20 {
                        Err(format!("{s:?} is below the smallest history, 1MiB"))
                    } else {
                        Ok(b)
                    }
                })
            })?,
            max_watches: parse_key("max_watches", &value("max_watches"), |s| count_in(s, 1, 1_000_000))?,
            max_watches_per_identity: parse_key("max_watches_per_identity", &value("max_watches_per_identity"), |s| {
                count_in(s, 1, 1_000_000)
            })?,
            max_inflight_share: parse_key("max_inflight_share", &value("max_inflight_share"), |s| {
                count_in(s, 1, 100).map(|v| v as u32)
            })?,
            watch_buffer: parse_key("watch_buffer", &value("watch_buffer"), |s| count_in(s, 16, 1_000_000))?,
            watch_max_replay: parse_key("watch_max_replay", &value("watch_max_replay"), |s| {
                count_in(s, 1, 10_000_000)
            })?,
            event_ttl: parse_key("event_ttl", &value("event_ttl"), |s| {
                duration_in(s, Duration::from_secs(60), Duration::from_secs(30 * 86_400), "1m-30d")
            })?,
            event_max: parse_key("event_max", &value("event_max"), |s| count_in(s, 100, 1_000_000))?,
            // A few writers that each wait for their answer write at most once per delay.
            store_commit_delay: parse_key("store_commit_delay", &value("store_commit_delay"), |s| {
                duration_in(s, Duration::ZERO, Duration::from_millis(10), "0-10ms")
            })?,
        };
        config.check_relations()?;
        Ok(config)
    }

    fn check_relations(&self) -> Result<(), ConfigError> {
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return Err(invalid("tls_cert_file", "tls_cert_file and tls_key_file go together".to_string()));
        }
        if self.heartbeat_timeout > self.heartbeat_interval {
            return Err(invalid(
                "heartbeat_timeout",
                format!("{:?} is longer than heartbeat_interval {:?}", self.heartbeat_timeout, self.heartbeat_interval),
            ));
        }
        if let (Some(_), Some(system)) = (self.insecure_listen, self.system_listen) {
            if !system.ip().is_loopback() {
                return Err(invalid(
                    "system_listen",
                    format!(
                        "{system} is not a loopback address; with insecure_listen it serves without TLS and tokens"
                    ),
                ));
            }
        }
        for (i, node) in self.nodes.iter().enumerate() {
            if let Err(refusal) = self.agent_policy.check_host(&node.ip) {
                return Err(invalid("nodes", format!("[{i}].ip: {refusal}")));
            }
        }
        Ok(())
    }

    /// Reads a token file: one line, not empty.
    pub fn read_token(key: &str, path: &Path) -> Result<String, ConfigError> {
        let token =
            std::fs::read_to_string(path).map_err(|e| invalid(key, format!("reading {}: {e}", path.display())))?;
        let token = token.trim().to_string();
        if token.is_empty() {
            return Err(invalid(key, format!("{} is empty", path.display())));
        }
        Ok(token)
    }

    /// Reads the bearer token named by `auth_token_file`, if any.
    pub fn auth_token(&self) -> Result<Option<String>, ConfigError> {
        self.auth_token_file.as_deref().map(|path| Config::read_token("auth_token_file", path)).transpose()
    }

    /// Validation limits and request defaults for sandboxes.
    pub fn sandbox_policy(&self) -> sandboxd_api::validate::SandboxPolicy {
        sandboxd_api::validate::SandboxPolicy {
            max_ttl_seconds: self.max_ttl_seconds,
            default_cpu_milli: self.default_cpu_milli,
            default_memory_bytes: self.default_memory_bytes,
            host_port_range: Some(self.host_port_range),
        }
    }
}

/// An integer within `min..=max`, for counts of things the server holds.
/// A duration within `min..=max`, which the error names as `range`.
fn duration_in(s: &str, min: Duration, max: Duration, range: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < min || d > max {
        return Err(format!("{s:?} is outside {range}"));
    }
    Ok(d)
}

fn count_in(s: &str, min: usize, max: usize) -> Result<usize, String> {
    s.parse::<usize>()
        .ok()
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| format!("{s:?} is not an integer in {min}-{max}"))
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.to_string(), message: message.into() }
}

fn parse_key<T>(key: &str, raw: &str, parse: impl Fn(&str) -> Result<T, String>) -> Result<T, ConfigError> {
    parse(raw.trim()).map_err(|message| invalid(key, message))
}

fn read_file(path: &Path) -> Result<HashMap<String, String>, ConfigError> {
    let file_error = |message: String| ConfigError::File { path: path.to_path_buf(), message };
    let text = std::fs::read_to_string(path).map_err(|e| file_error(e.to_string()))?;
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| file_error(e.to_string()))?;
    let mut raw = HashMap::new();
    for (key, value) in table {
        if !known_keys().any(|k| k == key) {
            return Err(file_error(format!("unknown key {key:?}")));
        }
        let text = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            // Tables and arrays (the `nodes` list) travel as JSON so every layer parses alike.
            other => serde_json::to_string(&other).map_err(|e| file_error(e.to_string()))?,
        };
        raw.insert(key, text);
    }
    Ok(raw)
}

/// Parses `500ms`, `5s`, `2m`, `1h` (or `0`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration (use e.g. 500ms, 5s, 2m)");
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (number, unit) = s.split_at(split);
    let n: u64 = number.parse().map_err(|_| bad())?;
    let millis = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => None,
    };
    millis.map(Duration::from_millis).ok_or_else(bad)
}

/// Parses a byte size as the semantics table writes it (`1MiB`) or as a quantity (`1Mi`, `1048576`).
fn parse_byte_size(s: &str) -> Result<usize, String> {
    let quantity = s.strip_suffix("iB").map(|p| format!("{p}i")).unwrap_or_else(|| s.to_string());
    parse_bytes(&quantity).map_err(|e| e.to_string()).and_then(nonzero).map(|b| b as usize)
}

/// The largest `max_ttl_seconds`: ten years, far from any overflow of a timestamp sum.
const MAX_TTL_CEILING: i64 = 10 * 365 * 86_400;

fn in_flight(s: &str) -> Result<usize, String> {
    count_in(s, 1, 100_000)
}

fn at_most(value: usize, max: usize, shown: &str) -> Result<usize, String> {
    if value > max {
        Err(format!("{value} bytes is more than {shown}"))
    } else {
        Ok(value)
    }
}

fn positive_duration(s: &str) -> Result<Duration, String> {
    parse_duration(s).and_then(|d| if d.is_zero() { Err("must be greater than zero".into()) } else { Ok(d) })
}

fn at_least_one(s: &str) -> Result<u32, String> {
    s.parse::<u32>().ok().filter(|v| *v >= 1).ok_or_else(|| format!("{s:?} is not an integer of at least 1"))
}

fn percent(s: &str) -> Result<u32, String> {
    s.parse::<u32>().ok().filter(|v| (1..=100).contains(v)).ok_or_else(|| format!("{s:?} is not in 1-100"))
}

fn nonzero(v: u64) -> Result<u64, String> {
    if v == 0 {
        Err("must be greater than zero".into())
    } else {
        Ok(v)
    }
}

fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let bad = || format!("{s:?} is not a port range like 10000-19999");
    let (lo, hi) = s.split_once('-').ok_or_else(bad)?;
    let lo: u16 = lo.trim().parse().map_err(|_| bad())?;
    let hi: u16 = hi.trim().parse().map_err(|_| bad())?;
    if lo == 0 || lo > hi {
        return Err(bad());
    }
    Ok((lo, hi))
}

fn parse_policy(s: &str) -> Result<SchedulerPolicy, String> {
    match s {
        "spread" => Ok(SchedulerPolicy::Spread),
        "binpack" => Ok(SchedulerPolicy::Binpack),
        _ => Err(format!("{s:?} is not one of spread, binpack")),
    }
}

fn parse_store_url(s: &str) -> Result<String, String> {
    let ok = s == "memory://"
        || s.strip_prefix("sqlite://").is_some_and(|p| !p.is_empty())
        || s.strip_prefix("etcd://").is_some_and(|p| !p.is_empty());
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!("{s:?} is not memory://, sqlite://PATH or etcd://HOST:PORT[,HOST:PORT...]"))
    }
}

fn parse_nodes(s: &str) -> Result<Vec<StaticNode>, String> {
    let nodes: Vec<StaticNode> = serde_json::from_str(s).map_err(|e| format!("not a list of {{id, ip, port}}: {e}"))?;
    for (i, node) in nodes.iter().enumerate() {
        if let Some(problem) = sandboxd_api::names::name_problem(&node.id) {
            return Err(format!("[{i}].id: {problem}"));
        }
        let spec = sandboxd_api::node::NodeSpec {
            ip: node.ip.clone(),
            port: i64::from(node.port),
            external: node.external.clone(),
            max_alloc_percent: node.max_alloc_percent.map(i64::from),
            // A restart declares config nodes again; it must not uncordon them.
            unschedulable: None,
            labels: node.labels.clone(),
            taints: node.taints.clone(),
        };
        if let Err(e) = sandboxd_api::validate::validate_node_spec(&spec) {
            return Err(format!("[{i}]: {e}"));
        }
    }
    Ok(nodes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_match_the_semantics_table() {
        let c = Config::default();
        assert_eq!(c.listen, "0.0.0.0:8082".parse().unwrap());
        assert_eq!(c.store, "sqlite://./sandboxd-data/store.db");
        assert_eq!(c.heartbeat_interval, Duration::from_secs(5));
        assert_eq!(c.heartbeat_timeout, Duration::from_secs(2));
        assert_eq!((c.node_ready_threshold, c.node_failure_threshold), (2, 3));
        assert_eq!(c.node_lost_grace, Duration::from_secs(60));
        assert_eq!(c.max_alloc_percent, 90);
        assert_eq!(c.host_port_range, (10000, 19999));
        assert_eq!(c.scheduler_policy, SchedulerPolicy::Spread);
        assert_eq!(c.sync_period, Duration::from_secs(30));
        assert_eq!(c.agent_timeout, Duration::from_secs(5));
        assert_eq!(c.agent_policy, AddressPolicy::default());
        assert!(c.agent_policy.allowed_networks().is_empty());
        assert_eq!(c.max_ttl_seconds, 86_400);
        assert_eq!((c.default_cpu_milli, c.default_memory_bytes), (100, 128 << 20));
        assert!(c.nodes.is_empty());
        assert_eq!(c.auth_token_file, None);
        assert_eq!(c.max_body_bytes, 1 << 20);
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.watch_history_bytes, 64 << 20);
        assert_eq!(c.watch_history_bytes, crate::store::DEFAULT_HISTORY_BYTES);
    }

    #[test]
    fn readme_table_lists_every_key_with_its_default() {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
        for key in &KEYS {
            let default = if key.default.is_empty() { "none".to_string() } else { format!("`{}`", key.default) };
            let row = readme.lines().find(|l| l.starts_with('|') && l.contains(&format!("`{}`", key.name)));
            let row = row.unwrap_or_else(|| panic!("README's configuration table has no row for {}", key.name));
            assert!(row.contains(&default), "README row for {} does not show its default {default}: {row}", key.name);
        }
    }

    #[test]
    fn every_key_has_help_text() {
        for key in &KEYS {
            assert!(!key.help.is_empty(), "{} has no help text", key.name);
        }
    }

    #[test]
    fn flag_beats_env_beats_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "heartbeat_interval = \"7s\"\nsync_period = \"9s\"\nmax_alloc_percent = 80\n\
             [[nodes]]\nid = \"n1\"\nip = \"127.0.1.1\"\nport = 8080\n",
        )
        .unwrap();
        let env = map(&[("SANDBOXD_HEARTBEAT_INTERVAL", "3s"), ("SANDBOXD_SYNC_PERIOD", "4s")]);
        let flags = map(&[("sync_period", "1s")]);
        let c = Config::load(Some(&file), &env, &flags).unwrap();
        assert_eq!(c.heartbeat_interval, Duration::from_secs(3), "env over file");
        assert_eq!(c.sync_period, Duration::from_secs(1), "flag over env");
        assert_eq!(c.max_alloc_percent, 80, "file over default");
        assert_eq!(c.nodes.len(), 1);
        assert_eq!(c.nodes[0].id, "n1");
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            ("heartbeat_interval", "5x"),
            ("heartbeat_timeout", "0s"),
            ("node_ready_threshold", "0"),
            ("max_alloc_percent", "101"),
            ("host_port_range", "20000-10000"),
            ("host_port_range", "0-10"),
            ("scheduler_policy", "random"),
            ("listen", "nowhere"),
            ("insecure_listen", "0.0.0.0:8082"),
            ("system_listen", "nowhere"),
            ("tls_san", "a b,example.org"),
            ("max_inflight_share", "0"),
            ("max_watches_per_identity", "0"),
            ("audit_log_max_bytes", "1KiB"),
            ("store", "postgres://x"),
            ("default_cpu", "2x"),
            ("default_memory", "0"),
            ("max_body_bytes", "-1"),
            ("log_format", "xml"),
            ("nodes", "[{\"id\": \"Bad_Name\", \"ip\": \"127.0.0.1\", \"port\": 1}]"),
            ("max_ttl_seconds", "-5"),
            ("max_ttl_seconds", "9223372036854775807"),
            ("max_body_bytes", "100GiB"),
            ("max_file_bytes", "1Ti"),
            ("header_read_timeout", "0s"),
            ("header_read_timeout", "2h"),
            ("max_connections", "3"),
            ("max_inflight_workload", "0"),
            ("watch_history_bytes", "1Ki"),
            ("watch_history_bytes", "lots"),
            ("max_watches", "0"),
            ("creating_timeout", "0s"),
            ("watch_buffer", "8"),
            ("watch_max_replay", "many"),
            ("event_ttl", "5s"),
            ("event_max", "10"),
            ("store_commit_delay", "11ms"),
            ("store_commit_delay", "soon"),
            ("agent_allowed_networks", "10.0.0.0/33"),
            ("agent_allowed_networks", "10.0.0.0/8,example.com"),
            ("nodes", "[{\"id\": \"n1\", \"ip\": \"169.254.169.254\", \"port\": 80}]"),
        ];
        for (key, value) in cases {
            let err = Config::load(None, &HashMap::new(), &map(&[(key, value)])).unwrap_err();
            assert!(err.to_string().starts_with(&format!("{key}: ")), "{key}={value}: {err}");
        }
    }

    #[test]
    fn an_insecure_system_listener_stays_on_loopback() {
        let insecure = |system: &str| {
            Config::load(
                None,
                &HashMap::new(),
                &map(&[("insecure_listen", "127.0.0.1:8082"), ("system_listen", system)]),
            )
        };
        let err = insecure("0.0.0.0:8083").unwrap_err();
        assert!(err.to_string().starts_with("system_listen: "), "{err}");
        assert_eq!(insecure("127.0.0.1:8083").unwrap().system_listen, Some("127.0.0.1:8083".parse().unwrap()));
        let secure = Config::load(None, &HashMap::new(), &map(&[("system_listen", "0.0.0.0:8083")])).unwrap();
        assert_eq!(secure.system_listen, Some("0.0.0.0:8083".parse().unwrap()), "with TLS and tokens any address");
        assert_eq!(Config::load(None, &HashMap::new(), &HashMap::new()).unwrap().system_listen, None, "off by default");
    }

    #[test]
    fn env_keys_are_upper_case_with_prefix() {
        let env = map(&[("SANDBOXD_HOST_PORT_RANGE", "31000-31999"), ("SANDBOXD_LOG_FORMAT", "json")]);
        let c = Config::load(None, &env, &HashMap::new()).unwrap();
        assert_eq!(c.host_port_range, (31000, 31999));
        assert_eq!(c.log_format, LogFormat::Json);
    }

    #[test]
    fn unknown_file_key_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "heartbeat_intervl = \"5s\"\n").unwrap();
        let err = Config::load(Some(&file), &HashMap::new(), &HashMap::new()).unwrap_err();
        assert!(err.to_string().contains("unknown key \"heartbeat_intervl\""), "{err}");
    }

    #[test]
    fn durations_accept_ms_s_m_h() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in ["", "5", "s", "5 s", "1.5s", "-1s", "5d"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn agent_allowed_networks_come_from_flags_env_and_file_lists() {
        let want: Vec<crate::address_policy::Cidr> =
            ["127.0.0.0/8", "::1/128", "10.20.0.0/16"].map(|n| n.parse().unwrap()).to_vec();
        let flags = map(&[("agent_allowed_networks", "127.0.0.0/8, ::1/128,10.20.0.0/16")]);
        let c = Config::load(None, &HashMap::new(), &flags).unwrap();
        assert_eq!(c.agent_policy.allowed_networks(), want);

        let env = map(&[("SANDBOXD_AGENT_ALLOWED_NETWORKS", "127.0.0.0/8,::1/128,10.20.0.0/16")]);
        assert_eq!(Config::load(None, &env, &HashMap::new()).unwrap().agent_policy.allowed_networks(), want);

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "agent_allowed_networks = [\"127.0.0.0/8\", \"::1/128\", \"10.20.0.0/16\"]\n").unwrap();
        let c = Config::load(Some(&file), &HashMap::new(), &HashMap::new()).unwrap();
        assert_eq!(c.agent_policy.allowed_networks(), want);
    }

    #[test]
    fn a_bad_allowed_network_names_the_key_and_the_problem() {
        let flags = map(&[("agent_allowed_networks", "10.0.0.0/8,10.20.0.1/16")]);
        let err = Config::load(None, &HashMap::new(), &flags).unwrap_err().to_string();
        assert_eq!(
            err,
            "agent_allowed_networks: \"10.20.0.1/16\" is not a network like 10.0.0.0/8 or fd00::/8: \
             host bits are set; the network is 10.20.0.0/16"
        );
    }

    #[test]
    fn loopback_only_env_replaces_the_allowed_networks() {
        let env = map(&[("SANDBOXD_LOOPBACK_ONLY", "1"), ("SANDBOXD_AGENT_ALLOWED_NETWORKS", "10.0.0.0/8")]);
        let c = Config::load(None, &env, &HashMap::new()).unwrap();
        assert_eq!(c.agent_policy, AddressPolicy::loopback_only());
        let c = Config::load(None, &map(&[("SANDBOXD_LOOPBACK_ONLY", "0")]), &HashMap::new()).unwrap();
        assert_eq!(c.agent_policy, AddressPolicy::default());
    }

    #[test]
    fn config_nodes_outside_the_policy_are_refused_at_load() {
        let nodes =
            |ip: &str| map(&[("nodes", format!("[{{\"id\": \"n1\", \"ip\": \"{ip}\", \"port\": 8080}}]").as_str())]);
        let err = Config::load(None, &HashMap::new(), &nodes("::ffff:169.254.169.254")).unwrap_err().to_string();
        assert!(err.starts_with("nodes: [0].ip: ::ffff:169.254.169.254 embeds 169.254.169.254"), "{err}");

        let mut flags = nodes("192.168.0.3");
        flags.insert("agent_allowed_networks".into(), "10.0.0.0/8".into());
        let err = Config::load(None, &HashMap::new(), &flags).unwrap_err().to_string();
        assert_eq!(err, "nodes: [0].ip: 192.168.0.3 is outside agent_allowed_networks (10.0.0.0/8)");

        let c = Config::load(None, &HashMap::new(), &nodes("worker-1.example")).unwrap();
        assert_eq!(c.nodes[0].ip, "worker-1.example", "host names are checked when they are resolved");
    }

    #[test]
    fn timeout_longer_than_interval_is_rejected() {
        let err = Config::load(None, &HashMap::new(), &map(&[("heartbeat_interval", "1s")])).unwrap_err();
        assert!(err.to_string().starts_with("heartbeat_timeout: "), "{err}");
    }
}
