//! The process's Prometheus metrics: one registry, the families the controllers record into, the
//! gauges sampled at scrape time, and the text exposition `/metrics` serves.

use prometheus::core::Collector;
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use std::sync::{Arc, LazyLock, Mutex, Weak};

/// Latency buckets of requests, reconciles and agent calls: 100 µs to a minute.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Heartbeat lag: fine around the one-second target the scale benchmark holds it to.
const HEARTBEAT_LAG_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0];
/// Create → Running: milliseconds on the sim, seconds with an image pull.
const STARTUP_BUCKETS: &[f64] =
    &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];

/// Every family the controllers record into; the API server and the store add theirs to `registry`.
pub struct Metrics {
    registry: Registry,
    pub workqueue_depth: IntGaugeVec,
    pub workqueue_adds: IntCounterVec,
    pub workqueue_retries: IntCounterVec,
    pub workqueue_queue_duration: HistogramVec,
    pub workqueue_work_duration: HistogramVec,
    pub workqueue_longest_running: GaugeVec,
    pub workqueue_unfinished_work: GaugeVec,
    pub reconcile_total: IntCounterVec,
    pub reconcile_time: HistogramVec,
    pub leader: IntGaugeVec,
    pub heartbeat_lag: Histogram,
    pub heartbeats: IntCounter,
    pub binds: IntCounter,
    pub events_written: IntCounter,
    pub events_dropped: IntCounter,
    pub sandbox_startup: Histogram,
    pub agent_request_duration: HistogramVec,
    pub nodes: IntGaugeVec,
    pub sandboxes: IntGaugeVec,
    pub controller_entries: IntGaugeVec,
}

/// The process's metrics: a server is one process, so every part records into the same families.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

impl Metrics {
    fn new() -> Metrics {
        let registry = Registry::new();
        let m = Metrics {
            workqueue_depth: int_gauge_vec(
                "sandboxd_workqueue_depth",
                "Keys waiting in a controller's work queue.",
                &["name"],
            ),
            workqueue_adds: counter_vec(
                "sandboxd_workqueue_adds_total",
                "Keys added to a controller's work queue.",
                &["name"],
            ),
            workqueue_retries: counter_vec(
                "sandboxd_workqueue_retries_total",
                "Keys a controller's work queue re-added after a failed reconcile.",
                &["name"],
            ),
            workqueue_queue_duration: histogram_vec(
                "sandboxd_workqueue_queue_duration_seconds",
                "How long a key waited in the work queue before a worker took it.",
                &["name"],
                LATENCY_BUCKETS,
            ),
            workqueue_work_duration: histogram_vec(
                "sandboxd_workqueue_work_duration_seconds",
                "How long a worker held a key (one reconcile).",
                &["name"],
                LATENCY_BUCKETS,
            ),
            workqueue_longest_running: float_gauge_vec(
                "sandboxd_workqueue_longest_running_processor_seconds",
                "How long the longest reconcile in progress has been running.",
                &["name"],
            ),
            workqueue_unfinished_work: float_gauge_vec(
                "sandboxd_workqueue_unfinished_work_seconds",
                "Seconds of work in progress not yet finished, summed over the reconciles running now.",
                &["name"],
            ),
            reconcile_total: counter_vec(
                "sandboxd_controller_reconcile_total",
                "Reconciles by result: success, requeue_after (converged, check again later) or error.",
                &["controller", "result"],
            ),
            reconcile_time: histogram_vec(
                "sandboxd_controller_reconcile_time_seconds",
                "Duration of one reconcile.",
                &["controller"],
                LATENCY_BUCKETS,
            ),
            leader: int_gauge_vec(
                "sandboxd_leader_election_master_status",
                "1 while this process holds the lease, 0 while it is a standby.",
                &["lease"],
            ),
            heartbeat_lag: histogram(
                "sandboxd_heartbeat_lag_seconds",
                "How late each node heartbeat started after it was due.",
                HEARTBEAT_LAG_BUCKETS,
            ),
            heartbeats: counter("sandboxd_heartbeats_total", "Node heartbeats the node controller ran."),
            binds: counter("sandboxd_binds_total", "Sandboxes the scheduler bound to a node."),
            events_written: counter(
                "sandboxd_events_written_total",
                "Events this process's recorders wrote (a merged repeat counts once).",
            ),
            events_dropped: counter(
                "sandboxd_events_dropped_total",
                "Events dropped: the recorder's buffer was full, or the write failed.",
            ),
            sandbox_startup: histogram(
                "sandboxd_sandbox_startup_duration_seconds",
                "From a sandbox's creation, as the controllers first saw it, to its first Running.",
                STARTUP_BUCKETS,
            ),
            agent_request_duration: histogram_vec(
                "sandboxd_agent_request_duration_seconds",
                "Calls to node agents by operation and result (success, unreachable, status, invalid).",
                &["operation", "result"],
                LATENCY_BUCKETS,
            ),
            nodes: int_gauge_vec("sandboxd_nodes", "Nodes by state, as the controllers' cache holds them.", &["state"]),
            sandboxes: int_gauge_vec(
                "sandboxd_sandboxes",
                "Sandboxes by phase, as the controllers' cache holds them.",
                &["phase"],
            ),
            controller_entries: int_gauge_vec(
                "sandboxd_controller_entries",
                "Entries of each per-object structure the controllers keep: flat under churn, zero once deleted.",
                &["owner", "structure"],
            ),
            registry,
        };
        let collectors: Vec<Box<dyn Collector>> = vec![
            Box::new(m.workqueue_depth.clone()),
            Box::new(m.workqueue_adds.clone()),
            Box::new(m.workqueue_retries.clone()),
            Box::new(m.workqueue_queue_duration.clone()),
            Box::new(m.workqueue_work_duration.clone()),
            Box::new(m.workqueue_longest_running.clone()),
            Box::new(m.workqueue_unfinished_work.clone()),
            Box::new(m.reconcile_total.clone()),
            Box::new(m.reconcile_time.clone()),
            Box::new(m.leader.clone()),
            Box::new(m.heartbeat_lag.clone()),
            Box::new(m.heartbeats.clone()),
            Box::new(m.binds.clone()),
            Box::new(m.events_written.clone()),
            Box::new(m.events_dropped.clone()),
            Box::new(m.sandbox_startup.clone()),
            Box::new(m.agent_request_duration.clone()),
            Box::new(m.nodes.clone()),
            Box::new(m.sandboxes.clone()),
            Box::new(m.controller_entries.clone()),
            Box::new(prometheus::process_collector::ProcessCollector::for_self()),
        ];
        for collector in collectors {
            m.registry.register(collector).expect("metric families have distinct names");
        }
        m
    }

    /// The registry the API server and the store register their own families in.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The Prometheus text exposition (format 0.0.4) of every family, after sampling the gauges
    /// that are read at scrape time.
    pub fn render(&self) -> String {
        // One scrape at a time: sampling resets and refills the sampled gauges.
        static SCRAPE: Mutex<()> = Mutex::new(());
        let _one = SCRAPE.lock().unwrap_or_else(|e| e.into_inner());
        self.sample();
        encode(&self.registry)
    }

    fn sample(&self) {
        for family in [&self.workqueue_depth, &self.nodes, &self.sandboxes, &self.controller_entries] {
            family.reset();
        }
        self.workqueue_longest_running.reset();
        self.workqueue_unfinished_work.reset();
        for part in live_sampled() {
            part.sample(self);
        }
        for ((owner, structure), entries) in crate::runtime::footprint::snapshot() {
            self.controller_entries.with_label_values(&[owner, structure]).set(saturating_i64(entries));
        }
    }
}

/// Encodes `registry` in the Prometheus text format.
pub fn encode(registry: &Registry) -> String {
    let mut out = Vec::new();
    // Writing into a Vec cannot fail, and every family is valid by construction.
    let _ = TextEncoder::new().encode(&registry.gather(), &mut out);
    String::from_utf8(out).unwrap_or_default()
}

/// The content type of `encode`'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A part whose gauges are read at scrape time (a queue's depth, a cache's counts by state).
pub trait Sampled: Send + Sync {
    /// Adds this part's current values to the sampled gauges (`workqueue_depth`, `nodes`, …);
    /// several parts of one kind in a process are summed.
    fn sample(&self, metrics: &Metrics);
}

/// Sampled parts; weak, so a part that is dropped (a lost lease, a stopped server) leaves the report.
static SAMPLED: Mutex<Vec<Weak<dyn Sampled>>> = Mutex::new(Vec::new());

/// Samples `part` at every scrape for as long as it lives.
pub fn sample_while_alive<T: Sampled + 'static>(part: &Arc<T>) {
    let weak: Weak<dyn Sampled> = Arc::downgrade(part) as Weak<dyn Sampled>;
    let mut parts = SAMPLED.lock().unwrap_or_else(|e| e.into_inner());
    parts.retain(|p| p.strong_count() > 0);
    parts.push(weak);
}

fn live_sampled() -> Vec<Arc<dyn Sampled>> {
    let mut parts = SAMPLED.lock().unwrap_or_else(|e| e.into_inner());
    parts.retain(|p| p.strong_count() > 0);
    parts.iter().filter_map(Weak::upgrade).collect()
}

/// `value` as a gauge's i64, saturating.
pub fn saturating_i64(value: usize) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Times `call` into `family{operation, result}`, `result` being what `result_of` calls the outcome.
pub async fn timed<T, F>(family: &HistogramVec, operation: &str, result_of: impl Fn(&T) -> &'static str, call: F) -> T
where
    F: std::future::Future<Output = T>,
{
    let started = std::time::Instant::now();
    let outcome = call.await;
    family.with_label_values(&[operation, result_of(&outcome)]).observe(started.elapsed().as_secs_f64());
    outcome
}

pub fn counter(name: &str, help: &str) -> IntCounter {
    IntCounter::new(name, help).expect("valid metric name")
}

pub fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric name")
}

pub fn int_gauge_vec(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric name")
}

pub fn float_gauge_vec(name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    GaugeVec::new(Opts::new(name, help), labels).expect("valid metric name")
}

pub fn float_gauge(name: &str, help: &str) -> Gauge {
    Gauge::new(name, help).expect("valid metric name")
}

pub fn histogram(name: &str, help: &str, buckets: &[f64]) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec())).expect("valid metric name")
}

pub fn histogram_vec(name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> HistogramVec {
    HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), labels).expect("valid metric name")
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Depth(i64);
    impl Sampled for Depth {
        fn sample(&self, metrics: &Metrics) {
            metrics.workqueue_depth.with_label_values(&["metrics-test"]).add(self.0);
        }
    }

    #[test]
    fn sampled_parts_are_summed_at_scrape_and_leave_when_dropped() {
        let a = Arc::new(Depth(2));
        let b = Arc::new(Depth(3));
        sample_while_alive(&a);
        sample_while_alive(&b);
        assert!(METRICS.render().contains("sandboxd_workqueue_depth{name=\"metrics-test\"} 5\n"));
        drop(b);
        assert!(METRICS.render().contains("sandboxd_workqueue_depth{name=\"metrics-test\"} 2\n"));
        drop(a);
        assert!(!METRICS.render().contains("name=\"metrics-test\""));
    }

    #[test]
    fn every_family_has_help_and_type() {
        METRICS.heartbeats.inc();
        let text = METRICS.render();
        assert!(text.contains("# HELP sandboxd_heartbeats_total Node heartbeats"));
        assert!(text.contains("# TYPE sandboxd_heartbeat_lag_seconds histogram"));
        assert!(text.contains("# TYPE process_resident_memory_bytes gauge"), "process metrics are exported");
    }
}
