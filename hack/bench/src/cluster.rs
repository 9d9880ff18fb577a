//! A real cluster for a benchmark: a `sandboxd-o serve` child (on SQLite in a temp dir, or on a throwaway
//! local etcd) and `sbxlet fleet` children.

use anyhow::{bail, Context};
use sandboxd_client::Client;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What to start.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub nodes: usize,
    pub heartbeat_interval: &'static str,
    /// Fleet agents' capacity.
    pub capacity_cpu: &'static str,
    pub capacity_memory: &'static str,
    /// First agent address; the fleet uses consecutive addresses from here.
    pub base_ip: &'static str,
    /// Store the objects in a local single-member etcd instead of SQLite.
    pub etcd: bool,
    /// More `serve` flags, e.g. `["--watch-history-bytes", "1MiB"]`.
    pub server_args: Vec<String>,
    /// Serve as `serve` does by default, HTTPS with tokens, instead of `--insecure-listen`.
    pub tls: bool,
    /// Run `sandboxd-o apiserver` (no controllers) instead of `serve`.
    pub api_only: bool,
}

/// Agents per `sbxlet fleet` child. Each agent holds two descriptors in its fleet (its listener and
/// the server's connection to it), and this machine's hard limit is 20,000 (not raisable here), so
/// 10,000 nodes take two fleets, as they would take two machines.
const NODES_PER_FLEET: usize = 5_000;

/// A running server (and fleets); all are killed on drop.
pub struct Cluster {
    pub client: Client,
    pub url: String,
    bin_dir: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    heartbeat_interval: &'static str,
    store_url: String,
    server_args: Vec<String>,
    subcommand: &'static str,
    server: Child,
    fleets: Vec<Child>,
    /// The client config the server wrote (HTTPS clusters), for raw HTTP clients.
    pub client_config: Option<sandboxd_client::ClientConfig>,
    /// Dropped after the server (fields drop in order), so the server never outlives its store.
    etcd: Option<sandboxd_testkit::LocalEtcd>,
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Cluster {
    pub async fn start(bin_dir: &Path, spec: &ClusterSpec) -> anyhow::Result<Cluster> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let url = format!("http://127.0.0.1:{port}");
        let etcd = if spec.etcd { Some(sandboxd_testkit::LocalEtcd::start()?) } else { None };
        let store_url = match &etcd {
            Some(etcd) => etcd.url(),
            None => format!("sqlite://{}", dir.path().join("store.db").display()),
        };
        let mut server_args = spec.server_args.clone();
        let data_dir = dir.path().join("data");
        if spec.tls {
            server_args.extend(["--data-dir".to_string(), data_dir.display().to_string()]);
        }
        let subcommand = if spec.api_only { "apiserver" } else { "serve" };
        let server =
            spawn_server(bin_dir, dir.path(), port, spec.heartbeat_interval, &store_url, subcommand, &server_args)?;
        let (client, url, client_config) = if spec.tls {
            let config = read_client_config(&data_dir.join("client.json"), Duration::from_secs(60)).await?;
            (Client::from_config(&config)?, config.server.clone(), Some(config))
        } else {
            (Client::new(&url, None)?, url, None)
        };
        let mut cluster = Cluster {
            client,
            client_config,
            url,
            bin_dir: bin_dir.to_path_buf(),
            dir,
            port,
            heartbeat_interval: spec.heartbeat_interval,
            store_url,
            server_args,
            subcommand,
            server,
            fleets: Vec::new(),
            etcd,
        };
        cluster.wait_serving(Duration::from_secs(60)).await?;
        if spec.nodes > 0 {
            let agent_port = free_port()?;
            let first: std::net::Ipv4Addr = spec.base_ip.parse().context("base_ip")?;
            for (shard, start) in (0..spec.nodes).step_by(NODES_PER_FLEET).enumerate() {
                let nodes = NODES_PER_FLEET.min(spec.nodes - start);
                let base_ip = std::net::Ipv4Addr::from(u32::from(first) + start as u32);
                // The first fleet keeps the plain `sim-N` names the other scenarios know.
                let prefix = if shard == 0 { "sim".to_string() } else { format!("sim{shard}") };
                let fleet = cluster.spawn_fleet(bin_dir, spec, nodes, base_ip, &prefix, agent_port)?;
                cluster.fleets.push(fleet);
            }
        }
        Ok(cluster)
    }

    fn spawn_fleet(
        &self,
        bin_dir: &Path,
        spec: &ClusterSpec,
        nodes: usize,
        base_ip: std::net::Ipv4Addr,
        name_prefix: &str,
        agent_port: u16,
    ) -> anyhow::Result<Child> {
        let log = std::fs::File::create(self.dir.path().join(format!("fleet-{name_prefix}.log")))?;
        Command::new(bin_dir.join("sbxlet"))
            .args(["fleet", "--nodes", &nodes.to_string(), "--base-ip", &base_ip.to_string()])
            .args(["--name-prefix", name_prefix, "--port", &agent_port.to_string(), "--register", &self.url])
            .args(["--capacity-cpu", spec.capacity_cpu, "--capacity-memory", spec.capacity_memory])
            .env("RUST_LOG", "warn")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting sbxlet fleet")
    }

    /// The etcd the server stores in, as `host:port`, if it runs on one.
    pub fn etcd_endpoint(&self) -> Option<String> {
        self.etcd.as_ref().map(|etcd| etcd.url().trim_start_matches("etcd://").to_string())
    }

    /// A plain reqwest client for this server: its CA and token when it serves HTTPS.
    pub fn raw_http(&self) -> anyhow::Result<reqwest::Client> {
        let mut builder = reqwest::Client::builder();
        if let Some(config) = &self.client_config {
            if let Some(ca) = &config.ca_pem {
                builder = builder
                    .tls_built_in_root_certs(false)
                    .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes())?);
            }
            if let Some(token) = &config.token {
                let mut headers = reqwest::header::HeaderMap::new();
                headers.insert(reqwest::header::AUTHORIZATION, format!("Bearer {token}").parse()?);
                builder = builder.default_headers(headers);
            }
        }
        Ok(builder.build()?)
    }

    /// Waits until `/healthz` answers; returns how long that took.
    pub async fn wait_serving(&mut self, limit: Duration) -> anyhow::Result<Duration> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if self.client.healthz().await.is_ok() {
                return Ok(start.elapsed());
            }
            if let Some(status) = self.server.try_wait()? {
                bail!("server exited with {status}; see {}", self.dir.path().join("server.log").display());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bail!("server did not serve within {limit:?}")
    }

    /// How many nodes are Ready now.
    pub async fn ready_nodes(&self) -> anyhow::Result<usize> {
        let nodes = self.client.list_nodes().await?.items;
        Ok(nodes.iter().filter(|n| n.status.state == sandboxd_api::NodeState::Ready).count())
    }

    /// Waits until `count` nodes are Ready.
    pub async fn wait_nodes_ready(&self, count: usize, limit: Duration) -> anyhow::Result<Duration> {
        let start = Instant::now();
        loop {
            let ready = self.ready_nodes().await?;
            if ready >= count {
                return Ok(start.elapsed());
            }
            if start.elapsed() > limit {
                bail!("only {ready}/{count} nodes Ready after {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// SIGKILLs the server and starts it again on the same store; returns kill-to-serving time.
    pub async fn crash_and_restart(&mut self) -> anyhow::Result<Duration> {
        self.server.kill()?;
        self.server.wait()?;
        let start = Instant::now();
        self.server = spawn_server(
            &self.bin_dir,
            self.dir.path(),
            self.port,
            self.heartbeat_interval,
            &self.store_url,
            self.subcommand,
            &self.server_args,
        )?;
        self.wait_serving(Duration::from_secs(120)).await?;
        Ok(start.elapsed())
    }

    /// The plain-HTTP address of the API, for raw connections.
    pub fn addr(&self) -> anyhow::Result<std::net::SocketAddr> {
        let host = self.url.strip_prefix("http://").context("raw connections need a plain-HTTP cluster")?;
        host.parse().with_context(|| format!("server address {host}"))
    }

    /// Resident memory of the server process.
    pub fn server_rss_bytes(&self) -> u64 {
        proc_status_kib(self.server.id(), "VmRSS:") * 1024
    }

    /// Resident memory of the fleet processes (zero without a fleet).
    pub fn fleet_rss_bytes(&self) -> u64 {
        self.fleets.iter().map(|f| proc_status_kib(f.id(), "VmRSS:") * 1024).sum()
    }

    /// CPU seconds (user + system) the server has used so far.
    pub fn server_cpu_seconds(&self) -> f64 {
        process_cpu_seconds(self.server.id())
    }

    /// CPU time the agent fleets have used so far.
    pub fn fleet_cpu_seconds(&self) -> f64 {
        self.fleets.iter().map(|f| process_cpu_seconds(f.id())).sum()
    }

    /// The histogram `name` on `/metrics` as it stands now.
    pub async fn histogram(&self, name: &str) -> anyhow::Result<Buckets> {
        let text = reqwest::get(format!("{}/metrics", self.url)).await?.text().await?;
        Buckets::parse(&text, name).with_context(|| format!("histogram {name} missing"))
    }

    /// Reads one Prometheus value from `/metrics`.
    pub async fn metric(&self, name: &str) -> anyhow::Result<f64> {
        let text = reqwest::get(format!("{}/metrics", self.url)).await?.text().await?;
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("metric {name} missing"))
    }
}

/// CPU time (user and system) process `pid` has used so far.
pub fn process_cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15; after the ')' they are at 11 and 12. Kernel ticks are 100 Hz here.
    (ticks(11) + ticks(12)) / 100.0
}

/// The cumulative buckets of one unlabelled Prometheus histogram: (upper bound, count) in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Buckets(Vec<(f64, f64)>);

impl Buckets {
    /// The histogram `name` in the exposition `text`.
    pub fn parse(text: &str, name: &str) -> Option<Buckets> {
        let prefix = format!("{name}_bucket{{le=\"");
        let buckets: Vec<(f64, f64)> = text
            .lines()
            .filter_map(|line| line.strip_prefix(&prefix))
            .filter_map(|rest| {
                let (le, count) = rest.split_once("\"} ")?;
                let bound = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
                Some((bound, count.trim().parse().ok()?))
            })
            .collect();
        (!buckets.is_empty()).then_some(Buckets(buckets))
    }

    /// What was observed after `earlier` (the same histogram scraped before), as PromQL's
    /// `increase` over a window.
    pub fn since(&self, earlier: &Buckets) -> Buckets {
        let counts = self.0.iter().zip(&earlier.0).map(|(&(bound, now), &(_, then))| (bound, (now - then).max(0.0)));
        Buckets(counts.collect())
    }

    /// Observations above `bound`, which must be one of the bucket bounds.
    pub fn over(&self, bound: f64) -> f64 {
        let within = self.0.iter().find(|&&(le, _)| le == bound).map_or(0.0, |&(_, count)| count);
        self.count() - within
    }

    /// Observations counted.
    pub fn count(&self) -> f64 {
        self.0.last().map_or(0.0, |&(_, count)| count)
    }

    /// The `q` quantile, interpolated linearly within its bucket as PromQL's `histogram_quantile` does.
    pub fn quantile(&self, q: f64) -> f64 {
        let total = self.count();
        if total == 0.0 {
            return 0.0;
        }
        let rank = q * total;
        let (mut lower, mut below) = (0.0, 0.0);
        for &(bound, count) in &self.0 {
            if count >= rank {
                if bound.is_infinite() {
                    return lower;
                }
                let within = if count > below { (rank - below) / (count - below) } else { 1.0 };
                return lower + (bound - lower) * within;
            }
            (lower, below) = (bound, count);
        }
        lower
    }
}

fn proc_status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Waits for the client config an HTTPS server writes before it serves.
async fn read_client_config(path: &Path, limit: Duration) -> anyhow::Result<sandboxd_client::ClientConfig> {
    let start = Instant::now();
    loop {
        if let Ok(config) = sandboxd_client::ClientConfig::load(path) {
            return Ok(config);
        }
        if start.elapsed() > limit {
            bail!("{} did not appear within {limit:?}", path.display());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn spawn_server(
    bin_dir: &Path,
    dir: &Path,
    port: u16,
    heartbeat_interval: &str,
    store: &str,
    subcommand: &str,
    extra_args: &[String],
) -> anyhow::Result<Child> {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("server.log"))?;
    let tls = extra_args.iter().any(|a| a == "--data-dir");
    let listen = if tls { "--listen" } else { "--insecure-listen" };
    Command::new(bin_dir.join("sandboxd-o"))
        .args([subcommand, listen, &format!("127.0.0.1:{port}")])
        .args(["--store", store])
        .args(["--heartbeat-interval", heartbeat_interval])
        .args(["--max-body-bytes", "1MiB"])
        .args(extra_args)
        .env("SANDBOXD_LOOPBACK_ONLY", "1")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", bin_dir.join("sandboxd-o").display()))
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        for fleet in &mut self.fleets {
            let _ = fleet.kill();
            let _ = fleet.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Buckets;

    fn lag(le_01: u32, le_1: u32, all: u32) -> String {
        format!(
            "# TYPE lag_seconds histogram\nlag_seconds_bucket{{le=\"0.1\"}} {le_01}\nlag_seconds_bucket{{le=\"1\"}} {le_1}\n\
             lag_seconds_bucket{{le=\"+Inf\"}} {all}\nlag_seconds_sum 9\nlag_seconds_count {all}\n"
        )
    }

    #[test]
    fn quantiles_interpolate_within_the_bucket_as_promql_does() {
        let buckets = Buckets::parse(&lag(50, 90, 100), "lag_seconds").unwrap();
        assert_eq!(buckets.quantile(0.5), 0.1);
        let p70 = buckets.quantile(0.7);
        assert!((p70 - 0.55).abs() < 1e-9, "{p70}");
        assert_eq!(buckets.quantile(0.99), 1.0, "+Inf answers the last finite bound");
        assert_eq!(Buckets::parse(&lag(50, 90, 100), "other_seconds"), None);
    }

    #[test]
    fn a_window_counts_only_what_was_observed_in_it() {
        let before = Buckets::parse(&lag(0, 0, 100), "lag_seconds").unwrap(); // 100 late ones while loading
        let after = Buckets::parse(&lag(1_000, 1_000, 1_100), "lag_seconds").unwrap();
        assert_eq!(after.quantile(0.99), 1.0, "over the whole run the late ones set the p99");
        let window = after.since(&before);
        assert_eq!(window.count(), 1_000.0);
        assert!(window.quantile(0.99) <= 0.1, "the window's p99 is {}", window.quantile(0.99));
    }
}
