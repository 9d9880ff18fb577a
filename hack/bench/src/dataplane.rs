//! The data plane on the real runtime (as root): exec round trip of `true` through orchestrator →
//! agent → container (and straight to the agent, the floor), file upload and download throughput,
//! and how many streaming exec sessions one agent holds, each still answering.

use crate::cluster::Cluster;
use crate::load::quantile;
use crate::real::{missing_prerequisites, ms, rss_bytes, rss_of_processes, sleeping_sandbox, wait_phase, wait_ready};
use crate::scenarios::{report, Report};
use anyhow::{ensure, Context};
use futures::StreamExt;
use sandboxd_api::dataplane::{ExecRequest, ExecResult};
use sandboxd_api::node::NodeSpec;
use sandboxd_api::{Phase, SandboxSpec};
use sandboxd_client::dataplane::ExecOutput;
use sandboxd_testkit::image::busybox_image;
use sandboxd_testkit::RealNode;
use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};

const TARGET: &str = "exec round trip p99 <= 50 ms";

pub async fn data_plane(bin_dir: &Path, smoke: bool) -> anyhow::Result<Report> {
    if let Some(missing) = missing_prerequisites() {
        return Ok(report("data-plane", smoke, json!({ "skipped": missing }), TARGET, None));
    }
    let (execs, upload_mib, sessions) = if smoke { (10, 4, 8) } else { (300, 64, 256) };
    let reference = "bench.test/busybox:data-plane";
    let (cluster, node) = cluster_with_real_node(bin_dir, 7, reference).await?;
    cluster.client.create_sandbox("dp", &workspace(reference)).await?;
    wait_phase(&cluster, "dp", Phase::Running, Duration::from_secs(60)).await?;

    let through_orchestrator = exec_latencies(execs, || async {
        cluster.client.exec("dp", &request(&["true"])).await.map_err(anyhow::Error::from)
    })
    .await?;
    let agent = reqwest::Client::new();
    let agent_url = format!("http://{}/api/v1/sandboxes/dp/exec", node.addr);
    let direct = exec_latencies(execs, || async {
        let answer = agent.post(&agent_url).json(&request(&["true"])).send().await?;
        Ok(answer.error_for_status()?.json::<ExecResult>().await?)
    })
    .await?;

    let (upload_mib_s, download_mib_s) = transfer(&cluster, upload_mib).await?;
    let agent_rss_before = node.pid().map(rss_bytes).unwrap_or(0);
    let held = hold_sessions(&cluster, sessions).await?;
    let agent_rss_after = node.pid().map(rss_bytes).unwrap_or(0);

    cluster.client.delete_sandbox("dp").await?;
    let mut orchestrated = through_orchestrator;
    let mut floor = direct;
    let (p50, p99) = (quantile(&mut orchestrated, 0.5), quantile(&mut orchestrated, 0.99));
    let figures = json!({
        "execs_timed": execs,
        "exec_true_p50_ms": ms(p50),
        "exec_true_p99_ms": ms(p99),
        "exec_true_direct_to_agent_p50_ms": ms(quantile(&mut floor, 0.5)),
        "exec_true_direct_to_agent_p99_ms": ms(quantile(&mut floor, 0.99)),
        "upload_mib": upload_mib,
        "upload_mib_per_s": upload_mib_s,
        "download_mib_per_s": download_mib_s,
        "streaming_sessions_held": held.open,
        "sessions_answering": held.answering,
        "session_echo_p99_ms": ms(held.echo_p99),
        "runc_rss_per_session_kib": held.runc_rss / held.open.max(1) as u64 / 1024,
        "sbxlet_rss_per_session_kib": agent_rss_after.saturating_sub(agent_rss_before) / held.open.max(1) as u64 / 1024,
    });
    Ok(report("data-plane", smoke, figures, TARGET, Some(p99 <= Duration::from_millis(50))))
}

/// A sandbox with room for the execs (a 10m CPU quota would throttle them, not the data plane).
fn workspace(image: &str) -> SandboxSpec {
    sleeping_sandbox(image, "1", "256Mi")
}

fn request(command: &[&str]) -> ExecRequest {
    ExecRequest { command: command.iter().map(|s| s.to_string()).collect(), ..ExecRequest::default() }
}

/// `n` sequential execs after 5 unmeasured ones; each must exit 0.
async fn exec_latencies<F, Fut>(n: usize, mut exec: F) -> anyhow::Result<Vec<Duration>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<ExecResult>>,
{
    let mut latencies = Vec::with_capacity(n);
    for i in 0..n + 5 {
        let started = Instant::now();
        let result = exec().await?;
        ensure!(result.exit_code == 0, "exec exited {}: {}", result.exit_code, result.stderr);
        if i >= 5 {
            latencies.push(started.elapsed());
        }
    }
    Ok(latencies)
}

/// Uploads `mib` MiB to the container's disk and reads it back; MiB/s each way.
async fn transfer(cluster: &Cluster, mib: usize) -> anyhow::Result<(f64, f64)> {
    let data: Vec<u8> = (0..mib << 20).map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3]).collect();
    let started = Instant::now();
    let written = cluster.client.upload("dp", &[("path", "/root/upload.bin")], false, data.clone().into()).await?;
    let up = started.elapsed();
    ensure!(written.size == data.len() as u64, "wrote {} of {} bytes", written.size, data.len());
    let started = Instant::now();
    let mut stream = cluster.client.download("dp", &[("path", "/root/upload.bin")], false).await?;
    let mut back = 0usize;
    while let Some(chunk) = stream.next().await {
        back += chunk?.len();
    }
    let down = started.elapsed();
    ensure!(back == data.len(), "read back {back} of {} bytes", data.len());
    cluster.client.remove_path("dp", "/root/upload.bin", false).await?;
    let rate = |d: Duration| ((mib as f64 / d.as_secs_f64()) * 10.0).round() / 10.0;
    Ok((rate(up), rate(down)))
}

struct Held {
    open: usize,
    answering: usize,
    echo_p99: Duration,
    runc_rss: u64,
}

/// Opens `n` streamed `cat` sessions at once, then sends each a line and times its echo.
async fn hold_sessions(cluster: &Cluster, n: usize) -> anyhow::Result<Held> {
    let mut sessions = Vec::with_capacity(n);
    for _ in 0..n {
        sessions.push(cluster.client.exec_stream("dp", &request(&["cat"])).await?);
    }
    let runc_rss = runc_rss_bytes();
    let mut echoes = Vec::with_capacity(n);
    for (input, outputs) in sessions.iter_mut() {
        let started = Instant::now();
        input.stdin(b"ping\n").await?;
        match tokio::time::timeout(Duration::from_secs(10), outputs.next()).await {
            Ok(Some(Ok(ExecOutput::Stdout(data)))) if data.as_ref() == b"ping\n" => echoes.push(started.elapsed()),
            other => anyhow::bail!("a session did not echo: {other:?}"),
        }
    }
    let answering = echoes.len();
    for (mut input, mut outputs) in sessions {
        input.close_stdin().await?;
        let _ = tokio::time::timeout(Duration::from_secs(10), outputs.next()).await;
    }
    Ok(Held { open: n, answering, echo_p99: quantile(&mut echoes, 0.99), runc_rss })
}

/// RSS of every `runc … exec` process on the host (one per streaming session).
fn runc_rss_bytes() -> u64 {
    rss_of_processes(|args| args.first().is_some_and(|a| a.ends_with("runc")) && args.iter().any(|a| a == "exec"))
}

/// A cluster with one real node (`slot`) registered as `real` and Ready, the busybox image imported
/// on it as `reference`.
pub(crate) async fn cluster_with_real_node(
    bin_dir: &Path,
    slot: u32,
    reference: &str,
) -> anyhow::Result<(Cluster, RealNode)> {
    let spec = crate::scenarios::cluster_spec(0, "2s");
    let cluster = Cluster::start(bin_dir, &spec).await?;
    let node = RealNode::start(&bin_dir.join("sbxlet"), slot)?;
    let archive = node.state_dir().join("busybox.tar");
    busybox_image()?.write_oci_archive(&archive, reference)?;
    node.import(&archive).context("importing the image")?;
    let node_spec =
        NodeSpec { ip: node.addr.ip().to_string(), port: i64::from(node.addr.port()), ..Default::default() };
    cluster.client.apply_node("real", &node_spec).await?;
    wait_ready(&cluster).await?;
    Ok((cluster, node))
}
