//! watch-fanout (issue 19, target 3): many watchers on one server. Server memory per idle watcher,
//! create → event delivery across the active watchers while the idle ones stay open, and what
//! happens to a watcher that stops reading.

use crate::cluster::{Cluster, ClusterSpec};
use crate::load::{create_paced, ms, quantile, spec, Sent};
use crate::scenarios::{cluster_spec, ids, report, Report};
use anyhow::{ensure, Context};
use futures::StreamExt;
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Idle watchers held, active watchers, creates per second and for how long.
struct Sizes {
    idle: usize,
    active: usize,
    per_second: f64,
    seconds: u64,
}

pub async fn watch_fanout(bin_dir: &Path, smoke: bool) -> anyhow::Result<Report> {
    let sizes = if smoke {
        Sizes { idle: 100, active: 5, per_second: 100.0, seconds: 2 }
    } else {
        Sizes { idle: 10_000, active: 100, per_second: 1_000.0, seconds: 10 }
    };
    let watches = (sizes.idle + sizes.active + 10).to_string();
    // Room for the creating client's connections beside the watches (the fd limit here is 20,000).
    let connections = (sizes.idle + sizes.active + 2_000).to_string();
    // Every watch holds a long-running slot and a connection too.
    let server_args = [
        "--max-watches",
        &watches,
        "--max-watches-per-identity",
        &watches,
        "--max-inflight-long-running",
        &watches,
        "--max-connections",
        &connections,
        "--watch-buffer",
        "1000",
    ];
    let cluster_spec = ClusterSpec {
        api_only: true,
        server_args: server_args.iter().map(|a| a.to_string()).collect(),
        ..cluster_spec(0, "5s")
    };
    let cluster = Cluster::start(bin_dir, &cluster_spec).await?;
    let host = cluster.url.trim_start_matches("http://").to_string();

    // Idle: watching nodes, which nothing writes here. The first tenth warms the server up (its
    // one-time allocations on first use); the rest is what is counted.
    let warm_up = sizes.idle / 10;
    let mut idle = Vec::with_capacity(sizes.idle);
    for _ in 0..warm_up {
        idle.push(open_raw_watch(&host, "/api/v1/nodes?watch=true", None).await?);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before = cluster.server_rss_bytes();
    for _ in warm_up..sizes.idle {
        idle.push(open_raw_watch(&host, "/api/v1/nodes?watch=true", None).await?);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_idle = cluster.server_rss_bytes();
    let per_idle_bytes = rss_idle.saturating_sub(rss_before) as f64 / (sizes.idle - warm_up) as f64;

    // Active: watching sandboxes while they are created; one more never reads.
    let slow = open_raw_watch(&host, "/api/v1/sandboxes?watch=true", Some(4096)).await?;
    let http = reqwest::Client::builder().no_proxy().build()?;
    // Each watcher's first arrival per id; the tasks end when the set is dropped.
    let mut watchers = tokio::task::JoinSet::new();
    let mut seen_by: Vec<Arrivals> = Vec::with_capacity(sizes.active);
    for _ in 0..sizes.active {
        let response = http.get(format!("{}/api/v1/sandboxes?watch=true", cluster.url)).send().await?;
        ensure!(response.status().is_success(), "watch refused: {}", response.status());
        let arrivals = Arrivals::default();
        watchers.spawn(record_arrivals(response, arrivals.clone()));
        seen_by.push(arrivals);
    }
    let n = (sizes.per_second * sizes.seconds as f64) as usize;
    let names = ids("fan", n);
    let sent = create_paced(&cluster.client, &names, &spec("10m", 0), sizes.per_second).await?;
    let sent_at: HashMap<&str, &Sent> = sent.iter().map(|s| (s.id.as_str(), s)).collect();
    // Every active watcher has had 2 s after the last create to get every event.
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(watchers);
    let mut delays = Vec::with_capacity(n * sizes.active);
    let mut missing = 0usize;
    for arrivals in &seen_by {
        let arrivals = arrivals.lock();
        for (id, sent) in &sent_at {
            match arrivals.get(*id) {
                Some(at) => delays.push(at.saturating_duration_since(sent.at)),
                None => missing += 1,
            }
        }
    }
    ensure!(!smoke || missing == 0, "{missing} of {} deliveries never arrived", n * sizes.active);
    let rss_after = cluster.server_rss_bytes();
    let slow_outcome = drain_slow(slow).await;
    drop(idle);

    let p99 = quantile(&mut delays, 0.99);
    let figures = json!({
        "idle_watchers": sizes.idle,
        "server_rss_before_mib": mib(rss_before),
        "server_rss_with_idle_mib": mib(rss_idle),
        "server_bytes_per_idle_watcher": per_idle_bytes.round(),
        "active_watchers": sizes.active,
        "creates": n,
        "creates_per_s": sizes.per_second,
        "deliveries": delays.len(),
        "missing_deliveries": missing,
        "create_to_event_p50_ms": ms(quantile(&mut delays, 0.5)),
        "create_to_event_p99_ms": ms(p99),
        "create_to_event_max_ms": ms(quantile(&mut delays, 1.0)),
        "server_rss_after_mib": mib(rss_after),
        "slow_watcher_events_before_cut": slow_outcome.events,
        "slow_watcher_got_error_event": slow_outcome.error_event,
        "slow_watcher_stream_closed": slow_outcome.closed,
    });
    let cut_off = slow_outcome.error_event && slow_outcome.closed;
    let met = (!smoke).then(|| missing == 0 && p99 <= Duration::from_millis(10) && per_idle_bytes <= 1024.0 && cut_off);
    let target = "idle watcher <= 1 KiB; create -> event p99 <= 10 ms; a watcher that stops reading is cut off";
    Ok(report("watch-fanout", smoke, figures, target, met))
}

/// One watcher's first arrival of each sandbox's ADDED event.
type Arrivals = std::sync::Arc<parking_lot::Mutex<HashMap<String, Instant>>>;

/// Records when each ADDED event arrives, reading only as far as the id (no JSON parse: a hundred
/// watchers parsing a thousand events a second would load the client more than the server).
async fn record_arrivals(response: reqwest::Response, arrivals: Arrivals) {
    let mut stream = response.bytes_stream();
    let mut pending: Vec<u8> = Vec::new();
    while let Some(Ok(chunk)) = stream.next().await {
        let now = Instant::now();
        pending.extend_from_slice(&chunk);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            if let Some(id) = added_id(&line) {
                arrivals.lock().entry(id).or_insert(now);
            }
        }
    }
}

/// The object id of an `ADDED` watch line.
fn added_id(line: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(line).ok()?;
    let rest = text.strip_prefix("{\"type\":\"ADDED\"")?;
    let start = rest.find("\"id\":\"")? + 6;
    let len = rest[start..].find('"')?;
    Some(rest[start..start + len].to_string())
}

/// A watch over a raw connection, its response head read; `receive_buffer` shrinks the socket's
/// buffer so that a watcher that never reads is seen to fall behind in seconds, not megabytes.
async fn open_raw_watch(host: &str, path: &str, receive_buffer: Option<u32>) -> anyhow::Result<TcpStream> {
    let addr: std::net::SocketAddr = host.parse().with_context(|| format!("server address {host}"))?;
    let socket = tokio::net::TcpSocket::new_v4()?;
    if let Some(bytes) = receive_buffer {
        socket.set_recv_buffer_size(bytes)?;
    }
    let mut stream = socket.connect(addr).await?;
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes()).await?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        ensure!(stream.read(&mut byte).await? == 1, "watch closed before its response head");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    ensure!(head.starts_with("HTTP/1.1 200"), "watch refused: {}", head.lines().next().unwrap_or(""));
    Ok(stream)
}

struct SlowOutcome {
    events: usize,
    error_event: bool,
    closed: bool,
}

/// Reads what the server left for the watcher that never read: did it end the stream, and how?
async fn drain_slow(mut stream: TcpStream) -> SlowOutcome {
    let mut body = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut closed = false;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await {
            Ok(Ok(0)) => {
                closed = true;
                break;
            }
            Ok(Ok(n)) => body.extend_from_slice(&buf[..n]),
            Ok(Err(_)) => {
                closed = true;
                break;
            }
            Err(_) => break,
        }
    }
    let text = String::from_utf8_lossy(&body);
    SlowOutcome {
        events: text.matches("\"type\":\"ADDED\"").count(),
        error_event: text.contains("\"type\":\"ERROR\""),
        closed: closed || text.ends_with("0\r\n\r\n"),
    }
}

fn mib(bytes: u64) -> f64 {
    (bytes as f64 / (1 << 20) as f64 * 10.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::added_id;

    #[test]
    fn ids_come_from_added_lines_only() {
        assert_eq!(added_id(br#"{"type":"ADDED","object":{"id":"fan-7","spec":{}}}"#).as_deref(), Some("fan-7"));
        assert_eq!(added_id(br#"{"type":"MODIFIED","object":{"id":"fan-7"}}"#), None);
        assert_eq!(added_id(br#"{"type":"BOOKMARK","object":{"resource_version":"9"}}"#), None);
    }
}
