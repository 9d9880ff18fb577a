//! Runtime classes side by side (as root): runc and gvisor on one real node in the same run, each
//! measured the same way: create → Running, exec round trip, memory per idle sandbox, and one
//! HTTP request loop served from inside a sandbox through its host port.

use crate::cluster::Cluster;
use crate::load::{create_paced, quantile};
use crate::observe::Observer;
use crate::real::{missing_prerequisites, ms, rss_bytes, sleeping_sandbox, wait_phase};
use crate::scenarios::{report, Report};
use anyhow::ensure;
use sandboxd_api::dataplane::ExecRequest;
use sandboxd_api::{Phase, PortSpec, Protocol, RuntimeClass, SandboxSpec};
use sandboxd_testkit::image::INDEX_HTML;
use sandboxd_testkit::RealNode;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

const TARGET: &str = "gvisor beside runc, same run (no target: the cost of the stronger class)";

/// How much of each measurement a run takes.
struct Sizes {
    sandboxes: usize,
    execs: usize,
    idle: usize,
    http_for: Duration,
}

pub async fn runtime_classes(bin_dir: &Path, smoke: bool) -> anyhow::Result<Report> {
    if let Some(missing) = missing_prerequisites() {
        return Ok(report("runtime-classes", smoke, json!({ "skipped": missing }), TARGET, None));
    }
    let sizes = if smoke {
        Sizes { sandboxes: 3, execs: 5, idle: 2, http_for: Duration::from_secs(1) }
    } else {
        Sizes { sandboxes: 40, execs: 100, idle: 10, http_for: Duration::from_secs(10) }
    };
    let reference = "bench.test/busybox:classes";
    let (cluster, node) = crate::dataplane::cluster_with_real_node(bin_dir, 8, reference).await?;
    let offered = offered_classes(&cluster).await?;
    if !offered.contains("gvisor") {
        let figures = json!({ "skipped": "the node does not offer gvisor (runsc missing or cannot boot here)" });
        return Ok(report("runtime-classes", smoke, figures, TARGET, None));
    }

    let mut figures = serde_json::Map::new();
    for class in RuntimeClass::ALL {
        let measured = measure_class(&cluster, &node, reference, class, &sizes).await?;
        figures.insert(class.to_string(), measured);
    }
    Ok(report("runtime-classes", smoke, Value::Object(figures), TARGET, None))
}

async fn offered_classes(cluster: &Cluster) -> anyhow::Result<BTreeSet<String>> {
    for _ in 0..100 {
        let node = cluster.client.get_node("real").await?;
        if !node.status.node_info.runtime_classes.is_empty() {
            return Ok(node.status.node_info.runtime_classes.into_iter().collect());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("the node never reported its runtime classes")
}

/// Every figure of one class; leaves no sandbox behind.
async fn measure_class(
    cluster: &Cluster,
    node: &RealNode,
    image: &str,
    class: RuntimeClass,
    sizes: &Sizes,
) -> anyhow::Result<Value> {
    let prefix = class.as_str();
    // Idle sandboxes: 10m CPU, 64Mi (gVisor's own kernel counts against the limit).
    let idle = SandboxSpec { runtime_class: class, ..sleeping_sandbox(image, "10m", "64Mi") };

    // create -> Running, one at a time (5 a second), the image already on the node.
    let observer = Observer::start(&cluster.client).await?;
    let ids: Vec<String> = (0..sizes.sandboxes).map(|i| format!("{prefix}-lat-{i:03}")).collect();
    let sent = create_paced(&cluster.client, &ids, &idle, 5.0).await?;
    let running = observer.wait_for(&ids, Duration::from_secs(120), |s| s.running.is_some()).await;
    ensure!(running == ids.len(), "{class}: only {running}/{} Running", ids.len());
    let seen = observer.snapshot();
    let mut startup: Vec<Duration> =
        sent.iter().filter_map(|s| seen.get(&s.id)?.running.map(|r| r.saturating_duration_since(s.at))).collect();
    delete_all(cluster, &ids).await?;

    // Memory of `idle` idle sandboxes: every process in their cgroups or naming the node's state
    // directory (shims, runc/runsc, gVisor's sentry and gofer), each counted once.
    let before = runtime_pids(node);
    let ids: Vec<String> = (0..sizes.idle).map(|i| format!("{prefix}-idle-{i:03}")).collect();
    for id in &ids {
        cluster.client.create_sandbox(id, &idle).await?;
    }
    for id in &ids {
        wait_phase(cluster, id, Phase::Running, Duration::from_secs(60)).await?;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let added: Vec<u32> = runtime_pids(node).difference(&before).copied().collect();
    let rss: u64 = added.iter().map(|pid| rss_bytes(*pid)).sum();
    delete_all(cluster, &ids).await?;

    // Exec round trip of `true`, and an HTTP loop served from inside (busybox httpd).
    let web = SandboxSpec {
        runtime_class: class,
        ports: vec![PortSpec { container_port: 80, protocol: Protocol::Tcp, host_port: None }],
        containers: vec![sandboxd_api::Container {
            args: ["httpd", "-f", "-p", "80", "-h", "/www"].map(String::from).to_vec(),
            ..sleeping_sandbox(image, "1", "256Mi").containers.remove(0)
        }],
        ..SandboxSpec::default()
    };
    let web_id = format!("{prefix}-web");
    cluster.client.create_sandbox(&web_id, &web).await?;
    wait_phase(cluster, &web_id, Phase::Running, Duration::from_secs(60)).await?;
    let mut execs = Vec::with_capacity(sizes.execs);
    let request = ExecRequest { command: vec!["true".into()], ..ExecRequest::default() };
    for i in 0..sizes.execs + 3 {
        let started = Instant::now();
        let result = cluster.client.exec(&web_id, &request).await?;
        ensure!(result.exit_code == 0, "{class}: exec exited {}: {}", result.exit_code, result.stderr);
        if i >= 3 {
            execs.push(started.elapsed());
        }
    }
    let host_port = cluster.client.get_sandbox(&web_id).await?.status.assigned_ports[0].host_port;
    let http = http_loop(&format!("http://{}:{host_port}/", node.addr.ip()), sizes.http_for).await;
    delete_all(cluster, std::slice::from_ref(&web_id)).await?;

    let (start_p50, start_p99) = (quantile(&mut startup, 0.5), quantile(&mut startup, 0.99));
    let (exec_p50, exec_p99) = (quantile(&mut execs, 0.5), quantile(&mut execs, 0.99));
    Ok(json!({
        "create_to_running_p50_ms": ms(start_p50),
        "create_to_running_p99_ms": ms(start_p99),
        "exec_true_p50_ms": ms(exec_p50),
        "exec_true_p99_ms": ms(exec_p99),
        "idle_sandboxes": sizes.idle,
        "rss_per_idle_sandbox_kib": rss / sizes.idle.max(1) as u64 / 1024,
        "http_requests_per_s": http.per_second,
        "http_ok": http.ok,
        "http_failed": http.failed,
    }))
}

struct HttpLoop {
    per_second: f64,
    ok: u64,
    failed: u64,
}

/// One client fetching `url` back to back for `length`: answers of the expected page per second,
/// and how many requests failed (connection errors, other bodies).
async fn http_loop(url: &str, length: Duration) -> HttpLoop {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().expect("a client");
    let (mut ok, mut failed) = (0u64, 0u64);
    let started = Instant::now();
    while started.elapsed() < length {
        let body = match http.get(url).send().await {
            Ok(answer) => answer.text().await.ok(),
            Err(_) => None,
        };
        match body {
            Some(body) if body == INDEX_HTML => ok += 1,
            _ => failed += 1,
        }
    }
    let per_second = (ok as f64 / started.elapsed().as_secs_f64() * 10.0).round() / 10.0;
    HttpLoop { per_second, ok, failed }
}

/// Pids of the node's container processes: members of its sandboxes' cgroups (memory hierarchy)
/// and processes whose command line names its state directory, but not the agent itself.
fn runtime_pids(node: &RealNode) -> BTreeSet<u32> {
    let mut pids = BTreeSet::new();
    let unified = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    let parent = if unified {
        format!("/sys/fs/cgroup/{}", node.cgroup_parent)
    } else {
        format!("/sys/fs/cgroup/memory/{}", node.cgroup_parent)
    };
    collect_cgroup_pids(Path::new(&parent), &mut pids);
    let state = node.state_dir().display().to_string();
    let agent = node.pid();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else { continue };
        let cmdline = String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default())
            .replace('\0', " ");
        if cmdline.contains(&state) && Some(pid) != agent {
            pids.insert(pid);
        }
    }
    pids
}

fn collect_cgroup_pids(dir: &Path, pids: &mut BTreeSet<u32>) {
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    pids.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            collect_cgroup_pids(&entry.path(), pids);
        }
    }
}

async fn delete_all(cluster: &Cluster, ids: &[String]) -> anyhow::Result<()> {
    for id in ids {
        cluster.client.delete_sandbox(id).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    for id in ids {
        while cluster.client.get_sandbox(id).await.is_ok() {
            ensure!(Instant::now() < deadline, "{id} not deleted within 120 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}
