//! The soak scenario: steady create/delete churn with a flat live count, and the RSS slope after warm-up.
//!
//! Four clients create sandboxes at 100/s in total and each deletes its oldest once it holds more than
//! its share of 500, so the live state does not change while every per-object structure sees a steady
//! stream of new keys. After a warm-up past the watch history bound, the server's and the fleet's RSS
//! are sampled for 45 minutes; the figure is their least-squares slope in MiB per hour.

use crate::cluster::Cluster;
use crate::load::spec;
use crate::scenarios::{cluster_spec, report, Report};
use anyhow::ensure;
use sandboxd_client::Client;
use serde_json::{json, Map, Value};
use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CLIENTS: usize = 4;
const CREATES_PER_S: f64 = 100.0;
const LIVE: usize = 500;
const NODES: usize = 20;
const MIB: f64 = 1024.0 * 1024.0;

/// How long each phase lasts; the full run's can be overridden for quicker looks.
struct Phases {
    warmup: Duration,
    measure: Duration,
    sample_every: Duration,
    /// `--watch-history-bytes` for the server: the smoke run uses a small bound so warm-up passes it.
    history_bytes: &'static str,
}

fn phases(smoke: bool) -> Phases {
    let seconds = |var: &str, default: u64| {
        std::env::var(var)
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Duration::from_secs)
            .unwrap_or(Duration::from_secs(default))
    };
    if smoke {
        return Phases {
            warmup: Duration::from_secs(60),
            measure: Duration::from_secs(60),
            sample_every: Duration::from_secs(5),
            history_bytes: "1MiB",
        };
    }
    Phases {
        warmup: seconds("SOAK_WARMUP_S", 300),
        // 20 minutes caught jemalloc still settling (peak at ~25 min, then down); 45 show the trend.
        measure: seconds("SOAK_MEASURE_S", 2700),
        sample_every: Duration::from_secs(10),
        history_bytes: "64MiB",
    }
}

/// What the churn clients did so far.
#[derive(Default)]
struct Tally {
    created: AtomicU64,
    deleted: AtomicU64,
    errors: AtomicU64,
}

/// One client: paced creates, and a delete of its oldest sandbox whenever it holds more than `keep`.
async fn churn(client: Client, index: usize, keep: usize, per_s: f64, until: Instant, tally: Arc<Tally>) {
    let template = spec("10m", 1);
    let mut held = VecDeque::with_capacity(keep + 1);
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / per_s));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0u64;
    while Instant::now() < until {
        ticker.tick().await;
        let id = format!("soak-{index}-{n:08}");
        n += 1;
        match client.create_sandbox(&id, &template).await {
            Ok(_) => {
                tally.created.fetch_add(1, Ordering::Relaxed);
                held.push_back(id);
            }
            Err(_) => {
                tally.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        if held.len() > keep {
            let oldest = held.pop_front().expect("non-empty");
            match client.delete_sandbox(&oldest).await {
                Ok(()) => tally.deleted.fetch_add(1, Ordering::Relaxed),
                Err(_) => tally.errors.fetch_add(1, Ordering::Relaxed),
            };
        }
    }
}

/// Least-squares slope of `(seconds, bytes)` samples, in MiB per hour.
fn slope_mib_per_hour(samples: &[(f64, u64)]) -> f64 {
    let n = samples.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let mean_t = samples.iter().map(|(t, _)| t).sum::<f64>() / n;
    let mean_b = samples.iter().map(|(_, b)| *b as f64).sum::<f64>() / n;
    let cov: f64 = samples.iter().map(|(t, b)| (t - mean_t) * (*b as f64 - mean_b)).sum();
    let var: f64 = samples.iter().map(|(t, _)| (t - mean_t).powi(2)).sum();
    if var == 0.0 {
        return 0.0;
    }
    cov / var * 3600.0 / MIB
}

fn mib(bytes: u64) -> f64 {
    (bytes as f64 / MIB * 10.0).round() / 10.0
}

pub async fn soak(bin_dir: &Path, smoke: bool) -> anyhow::Result<Report> {
    let phases = phases(smoke);
    let mut spec = cluster_spec(NODES, "5s");
    // Its own addresses, so a soak can run beside another scenario (or another soak, with SOAK_BASE_IP).
    spec.base_ip = std::env::var("SOAK_BASE_IP").map(|ip| &*ip.leak()).unwrap_or("127.9.0.1");
    spec.server_args = vec!["--watch-history-bytes".into(), phases.history_bytes.into()];
    let cluster = Cluster::start(bin_dir, &spec).await?;
    cluster.wait_nodes_ready(NODES, Duration::from_secs(60)).await?;

    let start = Instant::now();
    let until = start + phases.warmup + phases.measure;
    let tally = Arc::new(Tally::default());
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let client = cluster.client.clone();
            let per_client = CREATES_PER_S / CLIENTS as f64;
            tokio::spawn(churn(client, i, LIVE / CLIENTS, per_client, until, tally.clone()))
        })
        .collect();

    tokio::time::sleep(phases.warmup).await;
    let (rss_after_warmup, fleet_after_warmup) = (cluster.server_rss_bytes(), cluster.fleet_rss_bytes());
    let history_after_warmup = cluster.metric("sandboxd_watch_history_bytes").await?;
    let mut server_samples = Vec::new();
    let mut fleet_samples = Vec::new();
    let mut server_peak = 0;
    while Instant::now() < until {
        let t = start.elapsed().as_secs_f64();
        let (server, fleet) = (cluster.server_rss_bytes(), cluster.fleet_rss_bytes());
        server_peak = server_peak.max(server);
        server_samples.push((t, server));
        fleet_samples.push((t, fleet));
        eprintln!(
            "soak t={t:.0}s server_rss={:.1}MiB fleet_rss={:.1}MiB created={} deleted={}",
            mib(server),
            mib(fleet),
            tally.created.load(Ordering::Relaxed),
            tally.deleted.load(Ordering::Relaxed)
        );
        tokio::time::sleep(phases.sample_every).await;
    }
    for c in clients {
        c.await?;
    }
    let (rss_end, fleet_end) = (cluster.server_rss_bytes(), cluster.fleet_rss_bytes());
    let live = cluster.client.list_sandboxes().await?.items.len();
    let created = tally.created.load(Ordering::Relaxed);
    let deleted = tally.deleted.load(Ordering::Relaxed);
    let errors = tally.errors.load(Ordering::Relaxed);
    let server_slope = slope_mib_per_hour(&server_samples);
    let fleet_slope = slope_mib_per_hour(&fleet_samples);

    ensure!(created > 0, "no sandbox was created");
    ensure!(errors * 100 <= created, "{errors} failed calls for {created} creates");
    ensure!(live <= LIVE + LIVE / 2, "{live} sandboxes live at the end; the churn keeps about {LIVE}");
    if smoke {
        // A generous bound that a map gaining a key per create, or an unbounded history, would break.
        let grown = rss_end.saturating_sub(rss_after_warmup);
        // Measured: +0.1 MiB for each in a minute; an unbounded history alone adds ~20 MiB a minute.
        ensure!(grown < 16 << 20, "server RSS grew {} MiB after warm-up", mib(grown));
        let fleet_grown = fleet_end.saturating_sub(fleet_after_warmup);
        ensure!(fleet_grown < 8 << 20, "fleet RSS grew {} MiB after warm-up", mib(fleet_grown));
    }

    let mut figures = Map::new();
    figures.insert("warmup_s".into(), json!(phases.warmup.as_secs()));
    figures.insert("measured_s".into(), json!(phases.measure.as_secs()));
    figures.insert("created".into(), json!(created));
    figures.insert("deleted".into(), json!(deleted));
    figures.insert("errors".into(), json!(errors));
    figures.insert("live_at_end".into(), json!(live));
    figures.insert("watch_history_mib_after_warmup".into(), json!(mib(history_after_warmup as u64)));
    figures.insert("server_rss_after_warmup_mib".into(), json!(mib(rss_after_warmup)));
    figures.insert("server_rss_end_mib".into(), json!(mib(rss_end)));
    figures.insert("server_rss_peak_mib".into(), json!(mib(server_peak)));
    figures.insert("server_slope_mib_per_h".into(), json!((server_slope * 10.0).round() / 10.0));
    figures.insert("fleet_rss_after_warmup_mib".into(), json!(mib(fleet_after_warmup)));
    figures.insert("fleet_rss_end_mib".into(), json!(mib(fleet_end)));
    figures.insert("fleet_slope_mib_per_h".into(), json!((fleet_slope * 10.0).round() / 10.0));
    let met = server_slope <= 1.0 && fleet_slope <= 1.0;
    Ok(report("soak", smoke, Value::Object(figures), "RSS slope <= 1 MiB/h for server and fleet", Some(met)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_is_in_mib_per_hour() {
        let flat = [(0.0, 100 << 20), (60.0, 100 << 20), (120.0, 100 << 20)];
        assert_eq!(slope_mib_per_hour(&flat), 0.0);
        // 1 MiB per minute is 60 MiB per hour.
        let growing = [(0.0, 100 << 20), (60.0, 101 << 20), (120.0, 102 << 20)];
        assert!((slope_mib_per_hour(&growing) - 60.0).abs() < 1e-9);
    }
}
