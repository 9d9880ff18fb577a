//! The agent's Prometheus metrics: runtime operation latency and sandboxes by state per agent, image
//! pulls per process, and the process's own series where the agent is the process.

use crate::backend::Backend;
use prometheus::{Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};
use sandboxd_api::agent::AgentPhase;
use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock};

/// Runtime operations: a sim create takes microseconds, a runc create tens of milliseconds.
const OPERATION_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Image pulls: a local registry answers in milliseconds, a large image takes minutes.
const PULL_BUCKETS: &[f64] = &[0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];
const RESULTS: [&str; 2] = ["success", "error"];

/// One agent's families. Agents that share a process (a fleet, a server's demo agents) each have
/// their own, so every scrape describes the agent it reached.
pub struct AgentMetrics {
    registry: Registry,
    operation_duration: HistogramVec,
}

/// Image pulls, process-wide: only the runc runtime pulls, and it is alone in its process.
struct ImagePulls {
    total: IntCounterVec,
    duration: Histogram,
}

static PULLS: LazyLock<ImagePulls> = LazyLock::new(|| {
    let total = IntCounterVec::new(
        Opts::new("sbxlet_image_pulls_total", "Image pulls from a registry by result (success or error)."),
        &["result"],
    )
    .expect("valid metric");
    let duration = Histogram::with_opts(
        HistogramOpts::new("sbxlet_image_pull_duration_seconds", "Duration of one image pull, unpacking included.")
            .buckets(PULL_BUCKETS.to_vec()),
    )
    .expect("valid metric");
    // Both results exist from the start, so a rate over them is 0 rather than absent.
    for result in RESULTS {
        total.with_label_values(&[result]);
    }
    ImagePulls { total, duration }
});

/// Counts one image pull that took `seconds`.
pub fn observe_pull(succeeded: bool, seconds: f64) {
    PULLS.total.with_label_values(&[result_label(succeeded)]).inc();
    PULLS.duration.observe(seconds);
}

fn result_label(succeeded: bool) -> &'static str {
    RESULTS[usize::from(!succeeded)]
}

impl AgentMetrics {
    /// An agent's families; `process_series` adds `process_*` (RSS, CPU, fds), for an agent that is
    /// its whole process.
    pub fn new(process_series: bool) -> Arc<AgentMetrics> {
        let registry = Registry::new();
        let operation_duration = HistogramVec::new(
            HistogramOpts::new(
                "sbxlet_runtime_operation_duration_seconds",
                "Runtime operations (create, delete, reconcile) by result (success or error).",
            )
            .buckets(OPERATION_BUCKETS.to_vec()),
            &["operation", "result"],
        )
        .expect("valid metric");
        // Every operation and result exists from the start, so a rate over them is 0 rather than absent.
        for result in RESULTS {
            for operation in ["create", "delete", "reconcile"] {
                operation_duration.with_label_values(&[operation, result]);
            }
        }
        let mut collectors: Vec<Box<dyn prometheus::core::Collector>> =
            vec![Box::new(operation_duration.clone()), Box::new(PULLS.total.clone()), Box::new(PULLS.duration.clone())];
        if process_series {
            collectors.push(Box::new(prometheus::process_collector::ProcessCollector::for_self()));
        }
        for collector in collectors {
            registry.register(collector).expect("metric families have distinct names");
        }
        Arc::new(AgentMetrics { registry, operation_duration })
    }

    /// Times `operation` into `sbxlet_runtime_operation_duration_seconds`.
    pub async fn timed<T, E>(
        &self,
        operation: &str,
        call: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        let started = std::time::Instant::now();
        let outcome = call.await;
        self.observe_operation(operation, outcome.is_ok(), started.elapsed());
        outcome
    }

    /// Records one `operation` that took `took`.
    pub fn observe_operation(&self, operation: &str, succeeded: bool, took: std::time::Duration) {
        self.operation_duration.with_label_values(&[operation, result_label(succeeded)]).observe(took.as_secs_f64());
    }

    /// The text exposition: this agent's families plus `sbxlet_sandboxes` by state of `backend`.
    pub async fn render(&self, backend: &dyn Backend) -> String {
        let by_state = count_by_state(backend).await;
        let sandboxes =
            IntGaugeVec::new(Opts::new("sbxlet_sandboxes", "Sandboxes this agent holds, by state."), &["state"])
                .expect("valid metric");
        // Every state is present, at 0 when empty, so a query sees 0 rather than nothing.
        for phase in
            [AgentPhase::Creating, AgentPhase::Running, AgentPhase::Failed, AgentPhase::Exited, AgentPhase::Deleting]
        {
            sandboxes.with_label_values(&[phase.as_str()]);
        }
        for (state, count) in by_state {
            sandboxes.with_label_values(&[state]).set(i64::try_from(count).unwrap_or(i64::MAX));
        }
        let mut families = self.registry.gather();
        families.extend(prometheus::core::Collector::collect(&sandboxes));
        families.sort_by(|a, b| a.name().cmp(b.name()));
        let mut out = Vec::new();
        // Writing into a Vec cannot fail, and every family is valid by construction.
        let _ = prometheus::TextEncoder::new().encode(&families, &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Sandboxes listed per page while counting them by state.
const COUNT_PAGE: usize = 1000;

async fn count_by_state(backend: &dyn Backend) -> BTreeMap<&'static str, usize> {
    let mut counts = BTreeMap::new();
    let mut cursor = String::new();
    loop {
        let page = backend.list(&cursor, COUNT_PAGE).await;
        for sandbox in &page.items {
            *counts.entry(sandbox.phase.as_str()).or_insert(0) += 1;
        }
        if page.next_cursor.is_empty() || page.next_cursor == cursor {
            return counts;
        }
        cursor = page.next_cursor;
    }
}
