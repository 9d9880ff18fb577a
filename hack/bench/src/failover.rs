//! The failover scenario: etcd, two API servers, two controllers replicas and a fleet; the leading
//! replica is SIGKILLed (then, once it is back as a standby, the new leader gets SIGTERM), and the
//! time until the standby holds every lease and runs a sandbox created right after the kill is measured.

use crate::cluster::free_port;
use crate::load::spec;
use crate::scenarios::Report;
use anyhow::{bail, Context};
use sandboxd_client::Client;
use serde_json::{json, Map};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CONTROLLERS: [&str; 4] = ["node", "scheduler", "sandbox", "ttl"];

/// One `sandboxd-o` or `sbxlet` child process, killed on drop.
struct Proc {
    child: Child,
}

impl Proc {
    fn spawn(bin: PathBuf, args: &[&str], log: &Path) -> anyhow::Result<Proc> {
        let out = std::fs::File::create(log)?;
        let child = Command::new(&bin)
            .args(args)
            .env("SANDBOXD_LOOPBACK_ONLY", "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Proc { child })
    }

    fn signal(&mut self, signal: &str) -> anyhow::Result<()> {
        let status = Command::new("kill").args(["-s", signal, &self.child.id().to_string()]).status()?;
        anyhow::ensure!(status.success(), "kill -s {signal} failed");
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Lease timing: the defaults for the real figure, short ones for the smoke run.
fn lease_flags(smoke: bool) -> [&'static str; 6] {
    match smoke {
        true => ["--lease-duration", "3s", "--renew-deadline", "2s", "--retry-period", "500ms"],
        false => ["--lease-duration", "15s", "--renew-deadline", "10s", "--retry-period", "2s"],
    }
}

pub async fn failover(bin_dir: &Path, smoke: bool) -> anyhow::Result<Report> {
    let dir = tempfile::tempdir()?;
    let etcd = sandboxd_testkit::LocalEtcd::start()?;
    let (port_a, port_b, agent_port) = (free_port()?, free_port()?, free_port()?);
    let (url_a, url_b) = (format!("http://127.0.0.1:{port_a}"), format!("http://127.0.0.1:{port_b}"));
    let sandboxd = bin_dir.join("sandboxd-o");
    let mut procs = Vec::new();
    for (port, name) in [(port_a, "api-a"), (port_b, "api-b")] {
        let listen = format!("127.0.0.1:{port}");
        let args = ["apiserver", "--insecure-listen", &listen, "--store", &etcd.url()];
        procs.push(Proc::spawn(sandboxd.clone(), &args, &dir.path().join(format!("{name}.log")))?);
    }
    let client = Client::new(&url_b, None)?;
    wait_until(Duration::from_secs(30), "API servers healthy", || async {
        Ok(client.healthz().await.is_ok() && Client::new(&url_a, None)?.healthz().await.is_ok())
    })
    .await?;
    let agent_port = agent_port.to_string();
    let fleet_args = ["fleet", "--nodes", "5", "--base-ip", "127.4.0.1", "--port", &agent_port, "--register", &url_a];
    procs.push(Proc::spawn(bin_dir.join("sbxlet"), &fleet_args, &dir.path().join("fleet.log"))?);

    let replica = |url: &str, identity: &str| -> anyhow::Result<Proc> {
        let args: Vec<&str> =
            ["controllers", "--server", url, "--identity", identity].into_iter().chain(lease_flags(smoke)).collect();
        Proc::spawn(sandboxd.clone(), &args, &dir.path().join(format!("{identity}.log")))
    };
    let mut first = replica(&url_a, "replica-1")?;
    wait_leases(&client, "replica-1", Duration::from_secs(60)).await?;
    let mut second = replica(&url_b, "replica-2")?;
    wait_ready_nodes(&client, 5).await?;
    create_and_wait_running(&client, "warmup").await?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut figures = Map::new();
    first.signal("KILL")?;
    let (leases_after, running_after) = measure_takeover(&client, "replica-2", "after-sigkill").await?;
    figures.insert("sigkill_to_all_leases_s".into(), json!(secs(leases_after)));
    figures.insert("sigkill_to_new_sandbox_running_s".into(), json!(secs(running_after)));

    // The killed replica comes back as a standby; a graceful stop of the leader hands over at once.
    drop(first);
    let _first = replica(&url_a, "replica-1-again")?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    second.signal("TERM")?;
    let (leases_after, running_after) = measure_takeover(&client, "replica-1-again", "after-sigterm").await?;
    figures.insert("sigterm_to_all_leases_s".into(), json!(secs(leases_after)));
    figures.insert("sigterm_to_new_sandbox_running_s".into(), json!(secs(running_after)));
    let lease_flags = lease_flags(smoke);
    figures.insert("lease_duration".into(), json!(lease_flags[1]));
    figures.insert("retry_period".into(), json!(lease_flags[5]));
    drop(procs);
    Ok(crate::scenarios::report(
        "failover",
        smoke,
        serde_json::Value::Object(figures),
        "figures for issue 7: kill → first action by the new leader (no target)",
        None,
    ))
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 100.0).round() / 100.0
}

/// Creates a sandbox right after a leader stopped; returns (stop → `holder` holds every lease,
/// stop → that sandbox Running, the first thing the new leader's controllers do).
async fn measure_takeover(client: &Client, holder: &str, id: &str) -> anyhow::Result<(Duration, Duration)> {
    let stopped = Instant::now();
    client.create_sandbox(id, &spec("10m", 1)).await?;
    let mut leases_at = None;
    loop {
        if leases_at.is_none() && holds_every_lease(client, holder).await? {
            leases_at = Some(stopped.elapsed());
        }
        let sandbox = client.get_sandbox(id).await?;
        if let (Some(leases), sandboxd_api::Phase::Running) = (leases_at, sandbox.status.phase) {
            return Ok((leases, stopped.elapsed()));
        }
        if stopped.elapsed() > Duration::from_secs(90) {
            bail!("{holder} did not take over within 90 s (phase {:?})", sandbox.status.phase);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn holds_every_lease(client: &Client, holder: &str) -> anyhow::Result<bool> {
    for name in CONTROLLERS {
        let url = format!("{}/api/v1/leases/sandboxd-controller-{name}", client.base());
        let lease: serde_json::Value = reqwest::get(&url).await?.json().await?;
        if lease["lease"]["holder"] != holder && lease["holder"] != holder {
            return Ok(false);
        }
    }
    Ok(true)
}

async fn wait_leases(client: &Client, holder: &str, limit: Duration) -> anyhow::Result<()> {
    wait_until(limit, "first replica leads", || holds_every_lease(client, holder)).await
}

async fn wait_ready_nodes(client: &Client, count: usize) -> anyhow::Result<()> {
    wait_until(Duration::from_secs(60), "nodes Ready", || async {
        let nodes = client.list_nodes().await?.items;
        Ok(nodes.iter().filter(|n| n.status.state == sandboxd_api::NodeState::Ready).count() >= count)
    })
    .await
}

async fn create_and_wait_running(client: &Client, id: &str) -> anyhow::Result<()> {
    client.create_sandbox(id, &spec("10m", 1)).await?;
    wait_until(Duration::from_secs(30), "warm-up sandbox Running", || async {
        Ok(client.get_sandbox(id).await?.status.phase == sandboxd_api::Phase::Running)
    })
    .await
}

async fn wait_until<F, Fut>(limit: Duration, what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let start = Instant::now();
    while start.elapsed() < limit {
        if check().await.unwrap_or(false) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{what}: not within {limit:?}")
}
