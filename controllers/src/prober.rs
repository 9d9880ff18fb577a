//! Readiness prober: one shared timer queue with bounded concurrency probes running sandboxes and writes `ready`.

use crate::agent::{AgentClient, ProbeTarget};
use crate::events::Events;
use crate::node::rfc3339_now;
use crate::objects::{ObjectClient, ObjectError};
use crate::runtime::controller::Controller;
use crate::runtime::informer::Informer;
use crate::runtime::queue::{Outcome, Reconciled};
use parking_lot::Mutex;
use sandboxd_api::{Node, Phase, Probe, ProbeProtocol, Readiness, Sandbox};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Probe bookkeeping of one sandbox, kept in memory between tries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeState {
    pub success_streak: u32,
    pub failure_streak: u32,
    pub ready: bool,
    pub last_error: String,
}

/// Applies one probe result (pure): thresholds flip `ready`, which otherwise keeps its value.
pub fn record_probe(state: &ProbeState, result: &Result<(), String>, probe: &Probe) -> ProbeState {
    let mut next = state.clone();
    match result {
        Ok(()) => {
            next.success_streak = state.success_streak.saturating_add(1);
            next.failure_streak = 0;
            next.last_error.clear();
            if next.success_streak >= probe.success_threshold as u32 {
                next.ready = true;
            }
        }
        Err(why) => {
            next.failure_streak = state.failure_streak.saturating_add(1);
            next.success_streak = 0;
            next.last_error = why.clone();
            if next.failure_streak >= probe.failure_threshold as u32 {
                next.ready = false;
            }
        }
    }
    next
}

/// Probe state to resume from: the stored `ready` and streaks, so thresholds hold across restarts.
pub fn seed_state(sandbox: &Sandbox) -> ProbeState {
    let stored = sandbox.status.readiness.clone().unwrap_or_default();
    ProbeState {
        success_streak: stored.success_streak,
        failure_streak: stored.failure_streak,
        ready: sandbox.status.ready,
        last_error: stored.last_error,
    }
}

struct Tracked {
    /// When the agent was first seen to run the sandbox; probing starts `initial_delay_seconds` later.
    running_since: Instant,
    state: ProbeState,
    /// When `readiness` was last written; counters are refreshed at most every `REFRESH` otherwise.
    published_at: Option<Instant>,
}

/// How stale `status.readiness` counters may get when nothing else about readiness changes.
const REFRESH: Duration = Duration::from_secs(10);

/// Probes every tracked sandbox on its own period from one timer queue.
pub struct Prober {
    nodes: Informer<Node>,
    sandboxes: Informer<Sandbox>,
    objects: Arc<dyn ObjectClient>,
    agents: Arc<dyn AgentClient>,
    events: Events,
    /// Keys come from `track`, not from a watch: a sandbox is probed once its agent runs it.
    controller: Controller<String>,
    tracked: Mutex<HashMap<String, Tracked>>,
}

impl crate::runtime::footprint::Footprint for Prober {
    fn footprint(&self) -> Vec<(&'static str, usize)> {
        let mut sizes = vec![("tracked", self.tracked.lock().len())];
        sizes.extend(self.controller.queue().footprint());
        sizes
    }
}

impl Prober {
    pub fn new(
        nodes: Informer<Node>,
        sandboxes: Informer<Sandbox>,
        objects: Arc<dyn ObjectClient>,
        agents: Arc<dyn AgentClient>,
        workers: usize,
        events: Events,
    ) -> Arc<Prober> {
        let prober = Arc::new(Prober {
            nodes,
            sandboxes,
            objects,
            agents,
            events,
            controller: Controller::new("prober", workers),
            tracked: Mutex::new(HashMap::new()),
        });
        crate::runtime::footprint::register("prober", &prober);
        prober
    }

    /// Starts probing a sandbox its agent reports running (no-op when already tracked).
    ///
    /// Streaks and `ready` start from the stored status, so a restarted controller keeps the thresholds.
    pub fn track(&self, sandbox: &Sandbox) {
        let id = sandbox.id.as_str();
        let mut tracked = self.tracked.lock();
        if tracked.contains_key(id) {
            return;
        }
        let state = seed_state(sandbox);
        tracked.insert(id.to_string(), Tracked { running_since: Instant::now(), state, published_at: None });
        drop(tracked);
        self.controller.queue().add(id.to_string());
    }

    /// Stops probing a sandbox.
    pub fn forget(&self, id: &str) {
        self.tracked.lock().remove(id);
    }

    /// One probe try of one sandbox, then its next try is scheduled.
    pub async fn probe_once(&self, id: &str) -> Reconciled {
        let Some(sandbox) = self.sandboxes.get(id) else {
            self.forget(id);
            return Ok(Outcome::Done);
        };
        // A sandbox being evicted stays not ready: it is on its way off the node.
        let probing =
            matches!(sandbox.status.phase, Phase::Creating | Phase::Running) && sandbox.status.eviction.is_none();
        let (Some(probe), true) = (sandbox.spec.readiness_probe.clone(), probing) else {
            self.forget(id);
            return Ok(Outcome::Done);
        };
        let Some((since, state, published_at)) =
            self.tracked.lock().get(id).map(|t| (t.running_since, t.state.clone(), t.published_at))
        else {
            return Ok(Outcome::Done);
        };
        let start_at = since + Duration::from_secs(probe.initial_delay_seconds as u64);
        let now = Instant::now();
        if now < start_at {
            return Ok(Outcome::Requeue(start_at - now));
        }
        let period = Duration::from_secs(probe.period_seconds as u64);
        let result = match self.target_of(&sandbox, &probe) {
            Some(target) => self.agents.probe(&target).await,
            None => Err(format!("no tcp host port for probe port {} on a known node", probe.port)),
        };
        let next = record_probe(&state, &result, &probe);
        if let Err(why) = &result {
            // Repeats of the same error merge into one event with a count, as kubelet's do.
            let object = sandboxd_api::event::ObjectReference::sandbox(id);
            self.events.warning(object, "Unhealthy", format!("readiness probe failed: {why}"));
        }
        match self.tracked.lock().get_mut(id) {
            Some(t) => t.state = next.clone(),
            None => return Ok(Outcome::Done),
        }
        let refresh_due = published_at.is_none_or(|at| at.elapsed() >= REFRESH);
        match self.publish(id, &next, refresh_due).await {
            Ok(true) => {
                if let Some(t) = self.tracked.lock().get_mut(id) {
                    t.published_at = Some(Instant::now());
                }
            }
            Ok(false) => {}
            Err(e) => tracing::debug!(sandbox = id, error = %e, "readiness not written; next try will"),
        }
        Ok(Outcome::Requeue(period))
    }

    fn target_of(&self, sandbox: &Sandbox, probe: &Probe) -> Option<ProbeTarget> {
        let node = self.nodes.get(sandbox.status.node_name.as_deref()?)?;
        let host_port = sandbox
            .status
            .assigned_ports
            .iter()
            .find(|p| i64::from(p.container_port) == probe.port && p.protocol == sandboxd_api::Protocol::Tcp)?
            .host_port;
        Some(ProbeTarget {
            host: node.ip.clone(),
            port: host_port,
            http_path: (probe.protocol == ProbeProtocol::Http).then(|| probe.http_path().to_string()),
            timeout: Duration::from_secs(probe.timeout_seconds as u64),
        })
    }

    /// Writes `ready` and `readiness` when `ready` flips, the error changes, or a refresh is due.
    /// Returns whether it wrote. The prober never writes `phase`: its write reaches the sandbox
    /// controller through the informer, and that controller alone moves Creating to Running.
    async fn publish(&self, id: &str, state: &ProbeState, refresh_due: bool) -> Result<bool, ObjectError> {
        for _ in 0..5 {
            let Some(sandbox) = self.objects.get_sandbox(id).await? else { return Ok(false) };
            if !matches!(sandbox.status.phase, Phase::Creating | Phase::Running) || sandbox.status.eviction.is_some() {
                return Ok(false);
            }
            let previous = sandbox.status.readiness.clone().unwrap_or_default();
            let unchanged = sandbox.status.ready == state.ready && previous.last_error == state.last_error;
            if unchanged && !refresh_due {
                return Ok(false);
            }
            let mut status = sandbox.status.clone();
            status.ready = state.ready;
            status.readiness = Some(Readiness {
                success_streak: state.success_streak,
                failure_streak: state.failure_streak,
                last_probe_at: Some(rfc3339_now()),
                last_error: state.last_error.clone(),
            });
            match crate::status::write_status(self.objects.as_ref(), &sandbox, status).await {
                Ok(_) => return Ok(true),
                Err(ObjectError::Conflict(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(ObjectError::Conflict(format!("sandbox {id} kept changing")))
    }

    /// Probes until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let me = self.clone();
        self.controller
            .run(shutdown, move |id: String| {
                let me = me.clone();
                async move { me.probe_once(&id).await }
            })
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(success: i64, failure: i64) -> Probe {
        Probe {
            protocol: ProbeProtocol::Http,
            port: 80,
            path: None,
            initial_delay_seconds: 0,
            period_seconds: 1,
            timeout_seconds: 1,
            success_threshold: success,
            failure_threshold: failure,
        }
    }

    fn run(results: &[bool], p: &Probe) -> Vec<bool> {
        let mut state = ProbeState { success_streak: 0, failure_streak: 0, ready: false, last_error: String::new() };
        results
            .iter()
            .map(|ok| {
                let result = if *ok { Ok(()) } else { Err("503".to_string()) };
                state = record_probe(&state, &result, p);
                state.ready
            })
            .collect()
    }

    #[test]
    fn ready_needs_success_threshold_consecutive_successes() {
        assert_eq!(run(&[true, false, true, true], &probe(2, 3)), [false, false, false, true]);
        assert_eq!(run(&[true], &probe(1, 3)), [true]);
    }

    #[test]
    fn not_ready_needs_failure_threshold_consecutive_failures() {
        assert_eq!(
            run(&[true, false, false, true, false, false, false], &probe(1, 3)),
            [true, true, true, true, true, true, false]
        );
    }

    #[test]
    fn a_restarted_prober_keeps_a_ready_sandbox_ready_until_the_failure_threshold() {
        let p = probe(1, 3);
        let mut stored: Sandbox = serde_json::from_value(serde_json::json!({
            "id": "s", "created_at": "", "updated_at": "", "spec": {"containers": []},
            "status": {"phase": "Running", "ready": true, "readiness": {"success_streak": 5, "failure_streak": 0}}
        }))
        .unwrap();
        stored.status.ready = true;
        let seeded = seed_state(&stored);
        assert_eq!((seeded.ready, seeded.success_streak), (true, 5));
        let once = record_probe(&seeded, &Err("503".into()), &p);
        let twice = record_probe(&once, &Err("503".into()), &p);
        assert!(once.ready && twice.ready, "one or two failures do not flip a ready sandbox");
        assert!(!record_probe(&twice, &Err("503".into()), &p).ready);
    }

    #[test]
    fn failures_record_the_error_and_successes_clear_it() {
        let p = probe(1, 3);
        let start = ProbeState { success_streak: 0, failure_streak: 0, ready: false, last_error: String::new() };
        let failed = record_probe(&start, &Err("http probe answered 503".into()), &p);
        assert_eq!((failed.failure_streak, failed.last_error.as_str()), (1, "http probe answered 503"));
        let ok = record_probe(&failed, &Ok(()), &p);
        assert_eq!((ok.success_streak, ok.failure_streak, ok.last_error.as_str()), (1, 0, ""));
    }
}
