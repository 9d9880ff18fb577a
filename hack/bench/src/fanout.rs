//! watch-fanout (issue 19, target 3): many watchers on one server. Server memory per idle watcher,
//! each on its own connection and many over one stream (`POST /api/v1/watch`), create → event
//! delivery across the active watchers while the idle ones stay open, and what happens to a
//! watcher that stops reading.

use crate::cluster::{Cluster, ClusterSpec};
use crate::load::{create_paced, ms, quantile, spec, OwnThread};
use crate::scenarios::{cluster_spec, ids, report, Report};
use anyhow::{ensure, Context};
use serde_json::json;
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
    /// Streams the `idle` multiplexed watches are spread over.
    streams: usize,
}

pub async fn watch_fanout(bin_dir: &Path, smoke: bool) -> anyhow::Result<Report> {
    let sizes = if smoke {
        Sizes { idle: 100, active: 5, per_second: 100.0, seconds: 2, streams: 2 }
    } else {
        Sizes { idle: 10_000, active: 100, per_second: 1_000.0, seconds: 10, streams: 10 }
    };
    let watches = (sizes.idle + sizes.active + sizes.streams + 10).to_string();
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
        idle.push(open_raw(&host, &get(&host, "/api/v1/nodes?watch=true"), None).await?);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before = cluster.server_rss_bytes();
    for _ in warm_up..sizes.idle {
        idle.push(open_raw(&host, &get(&host, "/api/v1/nodes?watch=true"), None).await?);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_idle = cluster.server_rss_bytes();
    let per_idle_bytes = rss_idle.saturating_sub(rss_before) as f64 / (sizes.idle - warm_up) as f64;

    // Multiplexed: as many watches again, each of one sandbox the active phase creates (a client
    // waiting for its own sandbox), spread over a few streams. The first stream warms up.
    let per_stream = sizes.idle / sizes.streams;
    let mut multiplexed = Vec::with_capacity(sizes.streams);
    let mut rss_before_multiplexed = 0;
    for k in 0..sizes.streams {
        let held = k * per_stream..(k + 1) * per_stream;
        multiplexed.push((held.clone(), open_raw(&host, &watch_many_request(&host, held), None).await?));
        if k == 0 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            rss_before_multiplexed = cluster.server_rss_bytes();
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_multiplexed = cluster.server_rss_bytes();
    let per_multiplexed_bytes =
        rss_multiplexed.saturating_sub(rss_before_multiplexed) as f64 / (sizes.idle - per_stream) as f64;

    // Active: watching sandboxes while they are created; one more never reads.
    let slow = open_raw(&host, &get(&host, "/api/v1/sandboxes?watch=true"), Some(4096)).await?;
    // Each watcher records the first arrival of each create's ADDED event until told to stop.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let n = (sizes.per_second * sizes.seconds as f64) as usize;
    let mut watchers = tokio::task::JoinSet::new();
    for _ in 0..sizes.active {
        let stream = open_raw(&host, &get(&host, "/api/v1/sandboxes?watch=true"), None).await?;
        watchers.spawn(record_arrivals(stream, n, Lines::Plain, stopped.clone()));
    }
    let mut waiting = tokio::task::JoinSet::new();
    for (held, stream) in multiplexed {
        let stopped = stopped.clone();
        waiting.spawn(async move { (held, record_arrivals(stream, n, Lines::Tagged, stopped).await) });
    }
    let names = ids(FANOUT_PREFIX, n);
    let commits_before = cluster.histogram(COMMIT_DURATION).await?;
    // On a thread of their own, so a create's send and answer do not wait behind the watcher tasks.
    let (url, per_second) = (cluster.url.clone(), sizes.per_second);
    let sent = OwnThread::spawn(move || async move {
        let client = sandboxd_client::Client::new(&url, None)?;
        create_paced(&client, &names, &spec("10m", 0), per_second).await
    })
    .finish()
    .await?;
    let commits = cluster.histogram(COMMIT_DURATION).await?.since(&commits_before);
    // Every active watcher has had 2 s after the last create to get every event.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.send(true)?;
    let mut delays = Vec::with_capacity(n * sizes.active);
    // From the create's answer, when the write is durable: an event that came first counts as 0.
    let mut after_answer = Vec::with_capacity(n * sizes.active);
    let mut missing = 0usize;
    while let Some(arrivals) = watchers.join_next().await {
        for (sent, arrived) in sent.iter().zip(arrivals?) {
            match arrived {
                Some(at) => {
                    delays.push(at.saturating_duration_since(sent.at));
                    after_answer.push(at.saturating_duration_since(sent.at + sent.latency));
                }
                None => missing += 1,
            }
        }
    }
    ensure!(!smoke || missing == 0, "{missing} of {} deliveries never arrived", n * sizes.active);
    // Each multiplexed watch waits for the one sandbox it names: one delivery each, in its stream.
    let mut waited = Vec::with_capacity(sizes.idle);
    let mut waited_missing = 0usize;
    while let Some(joined) = waiting.join_next().await {
        let (held, arrivals) = joined?;
        let strays = arrivals.iter().enumerate().filter(|(i, a)| a.is_some() && !held.contains(i)).count();
        ensure!(strays == 0, "a stream had {strays} events of sandboxes none of its watches named");
        for (sent, arrived) in sent.iter().zip(&arrivals).skip(held.start).take(held.len()) {
            match arrived {
                Some(at) => waited.push(at.saturating_duration_since(sent.at)),
                None => waited_missing += 1,
            }
        }
    }
    let waited_expected = sizes.idle.min(n);
    ensure!(
        waited.len() + waited_missing == waited_expected && (!smoke || waited_missing == 0),
        "multiplexed watches: {} of {waited_expected} deliveries, {waited_missing} missing",
        waited.len()
    );
    let rss_after = cluster.server_rss_bytes();
    let slow_outcome = drain_slow(slow).await;
    drop(idle);

    let p99 = quantile(&mut delays, 0.99);
    let mut create_latencies: Vec<Duration> = sent.iter().map(|s| s.latency).collect();
    let figures = json!({
        "idle_watchers": sizes.idle,
        "server_rss_before_mib": mib(rss_before),
        "server_rss_with_idle_mib": mib(rss_idle),
        "server_bytes_per_idle_watcher": per_idle_bytes.round(),
        "multiplexed_watches": sizes.idle,
        "multiplexed_streams": sizes.streams,
        "server_rss_with_multiplexed_mib": mib(rss_multiplexed),
        "server_bytes_per_multiplexed_watch": per_multiplexed_bytes.round(),
        "multiplexed_deliveries": waited.len(),
        "multiplexed_missing": waited_missing,
        "multiplexed_create_to_event_p99_ms": ms(quantile(&mut waited, 0.99)),
        "active_watchers": sizes.active,
        "creates": n,
        "creates_per_s": sizes.per_second,
        "deliveries": delays.len(),
        "missing_deliveries": missing,
        "create_to_event_p50_ms": ms(quantile(&mut delays, 0.5)),
        "create_to_event_p99_ms": ms(p99),
        "create_to_event_max_ms": ms(quantile(&mut delays, 1.0)),
        "create_latency_p50_ms": ms(quantile(&mut create_latencies, 0.5)),
        "create_latency_p99_ms": ms(quantile(&mut create_latencies, 0.99)),
        "create_latency_max_ms": ms(quantile(&mut create_latencies, 1.0)),
        "store_commits": commits.count(),
        "store_commits_over_25ms": commits.over(0.025),
        "store_commits_over_100ms": commits.over(0.1),
        "answer_to_event_p50_ms": ms(quantile(&mut after_answer, 0.5)),
        "answer_to_event_p99_ms": ms(quantile(&mut after_answer, 0.99)),
        "server_rss_after_mib": mib(rss_after),
        "slow_watcher_events_before_cut": slow_outcome.events,
        "slow_watcher_got_error_event": slow_outcome.error_event,
        "slow_watcher_stream_closed": slow_outcome.closed,
    });
    let cut_off = slow_outcome.error_event && slow_outcome.closed;
    // Memory per idle watcher is judged on the multiplexed watches, as etcd's 350 B is: a
    // connection per watcher costs what the HTTP connection costs (`server_bytes_per_idle_watcher`).
    let met = (!smoke).then(|| {
        missing == 0
            && waited_missing == 0
            && p99 <= Duration::from_millis(10)
            && per_multiplexed_bytes <= 1024.0
            && cut_off
    });
    let target =
        "idle watcher (multiplexed) <= 1 KiB; create -> event p99 <= 10 ms; a watcher that stops reading is cut off";
    Ok(report("watch-fanout", smoke, figures, target, met))
}

/// The store's commit durations (fsync and any WAL checkpoint included).
const COMMIT_DURATION: &str = "sandboxd_store_commit_duration_seconds";

/// Names of the sandboxes the active watchers wait for: `fan-000123` (`added_indexes` looks for it).
const FANOUT_PREFIX: &str = "fan";

/// How a watcher's lines name the sandbox of an `ADDED` event.
#[derive(Debug, Clone, Copy)]
enum Lines {
    /// `?watch=true`: `{"type":"ADDED","object":{"id":"fan-000123",...`
    Plain,
    /// `POST /api/v1/watch`, each watch named after its sandbox: `{"watch":"fan-000123","type":"ADDED",...`
    Tagged,
}

/// When each create's `ADDED` event first reached this watcher, by create index, until `stop`.
/// It reads the raw stream and looks only for the id, without decoding the chunked framing or
/// the JSON (each event is one chunk, so no marker spans chunk framing): a hundred watchers
/// decoding a thousand events a second each would take the cores the server is measured on.
async fn record_arrivals(
    mut stream: TcpStream,
    creates: usize,
    lines: Lines,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Vec<Option<Instant>> {
    let mut arrivals = vec![None; creates];
    let mut pending: Vec<u8> = Vec::with_capacity(128 << 10);
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let read = tokio::select! {
            read = stream.read(&mut buf) => read,
            _ = stop.changed() => break,
        };
        let Ok(n @ 1..) = read else { break };
        let now = Instant::now();
        pending.extend_from_slice(&buf[..n]);
        let Some(last_line_end) = pending.iter().rposition(|b| *b == b'\n') else { continue };
        for index in added_indexes(&pending[..=last_line_end], lines) {
            if let Some(slot @ None) = arrivals.get_mut(index) {
                *slot = Some(now);
            }
        }
        pending.drain(..=last_line_end);
    }
    arrivals
}

/// The create indexes of the `ADDED` events of `fan-NNNNNN` sandboxes in `bytes`: each line's
/// event starts at its first `{`, after at most the chunk framing of the line before.
fn added_indexes(bytes: &[u8], lines: Lines) -> impl Iterator<Item = usize> + '_ {
    let (marker, after): (&[u8], &[u8]) = match lines {
        Lines::Plain => (b"{\"type\":\"ADDED\",\"object\":{\"id\":\"fan-", b"\""),
        Lines::Tagged => (b"{\"watch\":\"fan-", b"\",\"type\":\"ADDED\""),
    };
    bytes.split(|b| *b == b'\n').filter_map(move |line| {
        let start = line.iter().take(16).position(|b| *b == b'{')?;
        let digits = line[start..].strip_prefix(marker)?;
        let len = digits.iter().take_while(|b| b.is_ascii_digit()).count();
        digits[len..].starts_with(after).then_some(())?;
        std::str::from_utf8(&digits[..len]).ok()?.parse().ok()
    })
}

/// A `GET` of `path`.
fn get(host: &str, path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").into_bytes()
}

/// A `POST /api/v1/watch` with one watch per index, each of the sandbox `fan-NNNNNN` and named
/// after it, from now (no current objects listed first).
fn watch_many_request(host: &str, indexes: std::ops::Range<usize>) -> Vec<u8> {
    let watches: Vec<serde_json::Value> = indexes
        .map(|i| {
            let name = format!("{FANOUT_PREFIX}-{i:06}");
            json!({ "id": name, "name": name })
        })
        .collect();
    let body = json!({ "kind": "sandboxes", "watches": watches }).to_string();
    let head = format!(
        "POST /api/v1/watch HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    [head.into_bytes(), body.into_bytes()].concat()
}

/// A watch over a raw connection, opened by `request`, its response head read; `receive_buffer`
/// shrinks the socket's buffer so that a watcher that never reads is seen to fall behind in
/// seconds, not megabytes.
async fn open_raw(host: &str, request: &[u8], receive_buffer: Option<u32>) -> anyhow::Result<TcpStream> {
    let addr: std::net::SocketAddr = host.parse().with_context(|| format!("server address {host}"))?;
    let socket = tokio::net::TcpSocket::new_v4()?;
    if let Some(bytes) = receive_buffer {
        socket.set_recv_buffer_size(bytes)?;
    }
    let mut stream = socket.connect(addr).await?;
    stream.write_all(request).await?;
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
    use super::{added_indexes, Lines};

    #[test]
    fn indexes_come_from_added_lines_only_across_chunk_framing() {
        let stream = concat!(
            "3a\r\n{\"type\":\"ADDED\",\"object\":{\"id\":\"fan-000007\",\"spec\":{}}}\n\r\n",
            "2f\r\n{\"type\":\"MODIFIED\",\"object\":{\"id\":\"fan-000008\"}}\n\r\n",
            "35\r\n{\"type\":\"BOOKMARK\",\"object\":{\"resource_version\":\"9\"}}\n\r\n",
            "{\"type\":\"ADDED\",\"object\":{\"id\":\"fan-\"}}\n",
            "{\"type\":\"ADDED\",\"object\":{\"id\":\"fan-012345\"}}\n",
        );
        assert_eq!(added_indexes(stream.as_bytes(), Lines::Plain).collect::<Vec<_>>(), vec![7, 12345]);
    }

    #[test]
    fn tagged_lines_give_their_watch_index_for_added_only() {
        let stream = concat!(
            "4c\r\n{\"watch\":\"fan-000003\",\"type\":\"ADDED\",\"object\":{\"id\":\"fan-000003\"}}\n\r\n",
            "{\"watch\":\"fan-000004\",\"type\":\"DELETED\",\"object\":{\"id\":\"fan-000004\"}}\n",
            "{\"type\":\"BOOKMARK\",\"object\":{\"resource_version\":\"9\"}}\n",
            "{\"watch\":\"fan-000005\",\"type\":\"ADDED\",\"object\":{}}\n",
        );
        assert_eq!(added_indexes(stream.as_bytes(), Lines::Tagged).collect::<Vec<_>>(), vec![3, 5]);
        assert_eq!(added_indexes(stream.as_bytes(), Lines::Plain).count(), 0);
    }
}
