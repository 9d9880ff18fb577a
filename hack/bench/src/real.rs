//! The real runtime (`sbxlet --runtime runc`, as root): create → Running with the image cached,
//! sandboxes per node until CPU or memory runs out (memory per sandbox, sbxlet's own RSS), and the
//! pull time of a 5 MB image from a local registry.

use crate::cluster::Cluster;
use crate::load::{create_paced, quantile};
use crate::observe::Observer;
use crate::scenarios::{report, Report};
use anyhow::{ensure, Context};
use sandboxd_api::node::NodeSpec;
use sandboxd_api::{Container, ContainerResource, NodeState, Phase, SandboxSpec};
use sandboxd_testkit::image::{busybox_available, busybox_image_with_padding};
use sandboxd_testkit::{LocalRegistry, RealNode};
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

/// Bytes of random data that bring the test image's layer to about 5 MB.
const PADDING_FOR_5_MB: usize = 4 << 20;

pub async fn real_runtime(bin_dir: &Path, smoke: bool) -> anyhow::Result<Report> {
    if let Some(missing) = missing_prerequisites() {
        let figures = json!({ "skipped": missing });
        return Ok(report("real-runtime", smoke, figures, "p99 create->Running <= 150 ms", None));
    }
    let (latency_n, capacity_limit) = if smoke { (5, 12) } else { (100, 400) };
    let registry = LocalRegistry::start().context("starting docker-registry")?;
    let image = busybox_image_with_padding(if smoke { 0 } else { PADDING_FOR_5_MB })?;
    image.push(&registry.addr().to_string(), "bench/busybox", "real").await.map_err(anyhow::Error::msg)?;
    let reference = format!("{}/bench/busybox:real", registry.addr());

    let spec = crate::scenarios::cluster_spec(0, "2s");
    let cluster = Cluster::start(bin_dir, &spec).await?;
    let node = RealNode::start(&bin_dir.join("sbxlet"), 5)?;
    let node_spec =
        NodeSpec { ip: node.addr.ip().to_string(), port: i64::from(node.addr.port()), ..Default::default() };
    cluster.client.apply_node("real", &node_spec).await?;
    wait_ready(&cluster).await?;

    // The first sandbox pulls the image; the agent logs how long the pull took.
    let sandbox = sleeper(&reference);
    cluster.client.create_sandbox("warm", &sandbox).await?;
    wait_phase(&cluster, "warm", Phase::Running, Duration::from_secs(120)).await?;
    let pull_ms = pull_millis(&node.log()).context("no \"image pulled\" line in the agent's log")?;

    // create -> Running, one sandbox at a time (5 a second), image cached.
    let observer = Observer::start(&cluster.client).await?;
    let ids: Vec<String> = (0..latency_n).map(|i| format!("lat-{i:04}")).collect();
    let sent = create_paced(&cluster.client, &ids, &sandbox, 5.0).await?;
    let running = observer.wait_for(&ids, Duration::from_secs(120), |s| s.running.is_some()).await;
    ensure!(running == ids.len(), "only {running}/{} Running", ids.len());
    let seen = observer.snapshot();
    let mut latencies: Vec<Duration> =
        sent.iter().filter_map(|s| seen.get(&s.id)?.running.map(|r| r.saturating_duration_since(s.at))).collect();
    let (p50, p99) = (quantile(&mut latencies, 0.5), quantile(&mut latencies, 0.99));

    // Fill the node until the scheduler finds no room.
    let filled = fill_node(&cluster, &sandbox, capacity_limit).await?;
    let running_now = count_running(&cluster).await?;
    let sandbox_memory = sandboxes_memory_bytes(&node.cgroup_parent);
    let agent_rss = node.pid().map(rss_bytes).unwrap_or(0);
    let runtime_rss = processes_rss_bytes(&node.state_dir().display().to_string());

    let started = Instant::now();
    let all: Vec<String> = cluster.client.list_sandboxes().await?.items.into_iter().map(|s| s.id).collect();
    for id in &all {
        cluster.client.delete_sandbox(id).await?;
    }
    wait_all_gone(&cluster, Duration::from_secs(300)).await?;
    let delete_all = started.elapsed();

    let per = |bytes: u64| if running_now == 0 { 0 } else { bytes / running_now as u64 };
    let figures = json!({
        "sandboxes_timed": latency_n,
        "create_to_running_p50_ms": ms(p50),
        "create_to_running_p99_ms": ms(p99),
        "image_pull_ms": pull_ms,
        "image_layer_mb": (image.layer.len() as f64 / 1e6 * 10.0).round() / 10.0,
        "sandboxes_until_full": running_now,
        "fill_stopped_because": filled,
        "container_memory_per_sandbox_kib": per(sandbox_memory) / 1024,
        "runc_and_shim_rss_per_sandbox_kib": per(runtime_rss) / 1024,
        "sbxlet_rss_mib": agent_rss / (1 << 20),
        "delete_all_s": (delete_all.as_secs_f64() * 10.0).round() / 10.0,
    });
    let met = p99 <= Duration::from_millis(150);
    Ok(report("real-runtime", smoke, figures, "p99 create->Running <= 150 ms", Some(met)))
}

pub(crate) fn missing_prerequisites() -> Option<String> {
    let root = std::fs::read_to_string("/proc/self/status")
        .map(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false);
    let mut missing = Vec::new();
    if !root {
        missing.push("root");
    }
    for program in ["runc", "docker-registry", "iptables", "ip"] {
        if std::process::Command::new(program).arg("--version").output().is_err() {
            missing.push(program);
        }
    }
    if !busybox_available() {
        missing.push("busybox-static");
    }
    (!missing.is_empty()).then(|| format!("needs {} (hack/deps.sh, as root)", missing.join(", ")))
}

/// A sandbox whose one container sleeps: the smallest real workload (10m CPU, 16Mi).
fn sleeper(image: &str) -> SandboxSpec {
    sleeping_sandbox(image, "10m", "16Mi")
}

/// A sandbox whose one container (`main`) sleeps, with these requests.
pub(crate) fn sleeping_sandbox(image: &str, cpu: &str, memory: &str) -> SandboxSpec {
    SandboxSpec {
        containers: vec![Container {
            name: "main".into(),
            image: image.into(),
            args: vec!["sleep".into(), "100000".into()],
            env: vec![],
            work_dir: String::new(),
            resource: Some(ContainerResource {
                cpu: Some(cpu.into()),
                memory: Some(memory.into()),
                ephemeral_storage: None,
            }),
        }],
        ..SandboxSpec::default()
    }
}

pub(crate) async fn wait_ready(cluster: &Cluster) -> anyhow::Result<()> {
    for _ in 0..600 {
        if cluster.client.get_node("real").await.is_ok_and(|n| n.status.state == NodeState::Ready) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("the real node never became Ready")
}

pub(crate) async fn wait_phase(cluster: &Cluster, id: &str, phase: Phase, limit: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    while start.elapsed() < limit {
        let s = cluster.client.get_sandbox(id).await?;
        ensure!(s.status.phase != Phase::Failed, "{id} failed: {:?}", s.status.message);
        if s.status.phase == phase {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("{id} not {phase:?} within {limit:?}")
}

/// Creates sandboxes in batches until one is judged Unschedulable (or `limit` exist); says why it stopped.
async fn fill_node(cluster: &Cluster, spec: &SandboxSpec, limit: usize) -> anyhow::Result<String> {
    let mut created = 0;
    while created < limit {
        let batch: Vec<String> = (created..(created + 20).min(limit)).map(|i| format!("fill-{i:04}")).collect();
        for id in &batch {
            cluster.client.create_sandbox(id, spec).await?;
        }
        created += batch.len();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let items = cluster.client.list_sandboxes().await?.items;
            let batch_items: Vec<_> = items.iter().filter(|s| batch.contains(&s.id)).collect();
            if let Some(full) = batch_items.iter().find(|s| s.status.reason.as_deref() == Some("Unschedulable")) {
                return Ok(full.status.message.clone().unwrap_or_default());
            }
            if let Some(failed) = batch_items.iter().find(|s| s.status.phase == Phase::Failed) {
                anyhow::bail!("{} failed: {:?}", failed.id, failed.status.message);
            }
            if batch_items.iter().all(|s| s.status.phase == Phase::Running) {
                break;
            }
            ensure!(Instant::now() < deadline, "a batch did not settle within 120 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(format!("the {limit}-sandbox limit of the scenario"))
}

async fn count_running(cluster: &Cluster) -> anyhow::Result<usize> {
    let items = cluster.client.list_sandboxes().await?.items;
    Ok(items.iter().filter(|s| s.status.phase == Phase::Running).count())
}

async fn wait_all_gone(cluster: &Cluster, limit: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cluster.client.list_sandboxes().await?.items.is_empty() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("sandboxes still listed after {limit:?}")
}

/// `elapsed_ms=N` of the agent's "image pulled" log line.
fn pull_millis(log: &str) -> Option<u64> {
    let line = log.lines().find(|l| l.contains("image pulled"))?;
    let after = &line[line.find("elapsed_ms=")? + "elapsed_ms=".len()..];
    after.chars().take_while(char::is_ascii_digit).collect::<String>().parse().ok()
}

/// Resident memory the containers of every sandbox use (anonymous memory, not page cache).
fn sandboxes_memory_bytes(cgroup_parent: &str) -> u64 {
    let (file, key) = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        (format!("/sys/fs/cgroup/{cgroup_parent}/memory.stat"), "anon")
    } else {
        (format!("/sys/fs/cgroup/memory/{cgroup_parent}/memory.stat"), "total_rss")
    };
    let stat = std::fs::read_to_string(file).unwrap_or_default();
    stat.lines().find_map(|l| l.strip_prefix(key)?.trim().parse().ok()).unwrap_or(0)
}

pub(crate) fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:")?.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// RSS of the processes that keep containers running (the shims and the runc that waits on each
/// container), found by the state directory in their command lines; the agent itself excluded.
fn processes_rss_bytes(state_dir: &str) -> u64 {
    rss_of_processes(|args| {
        let cmdline = args.join(" ");
        cmdline.contains(state_dir) && !cmdline.contains("--runtime")
    })
}

/// Summed RSS of the host's processes whose arguments (`/proc/PID/cmdline`) match.
pub(crate) fn rss_of_processes(matches: impl Fn(&[String]) -> bool) -> u64 {
    let Ok(entries) = std::fs::read_dir("/proc") else { return 0 };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            matches(&args)
        })
        .map(rss_bytes)
        .sum()
}

pub(crate) fn ms(d: Duration) -> Value {
    json!((d.as_secs_f64() * 10_000.0).round() / 10.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pull_time_is_read_from_the_agent_log() {
        let log = "2026 INFO sbxlet::runc::image: image pulled image=x elapsed_ms=412\n";
        assert_eq!(pull_millis(log), Some(412));
        assert_eq!(pull_millis("nothing"), None);
    }
}
