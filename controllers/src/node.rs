//! Node controller: heartbeats on a shared timer, streaks with hysteresis, and resources from agent reports.

use crate::agent::{AgentAddr, AgentClient, AgentError};
use crate::objects::{ObjectClient, ObjectError};
use crate::runtime::controller::Controller;
use crate::runtime::informer::{Change, Informer};
use crate::runtime::metrics::METRICS;
use crate::runtime::queue::{Outcome, Reconciled};
use futures::StreamExt;
use sandboxd_api::agent::AgentStatus;
use sandboxd_api::node::{NodeInfo, NodeStatus};
use sandboxd_api::{Node, NodeResources, NodeState};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Settings of the node controller, from configuration.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    pub ready_threshold: u32,
    pub failure_threshold: u32,
    pub default_max_alloc_percent: u32,
    /// Heartbeats in flight at once.
    pub workers: usize,
    /// A leader taking over from another keeps node states whose last heartbeat is recent (the
    /// previous leader's judgment still stands); otherwise every node starts over as Unknown.
    pub keep_fresh_states: bool,
    /// Where NodeReady, NodeNotReady and NodeLost events go.
    pub events: crate::events::Events,
    /// NotReady this long makes the node lost (its NodeLost event).
    pub node_lost_grace: Duration,
}

impl Default for NodeSettings {
    fn default() -> Self {
        NodeSettings {
            heartbeat_interval: Duration::from_secs(5),
            heartbeat_timeout: Duration::from_secs(2),
            ready_threshold: 2,
            failure_threshold: 3,
            default_max_alloc_percent: 90,
            workers: 256,
            keep_fresh_states: false,
            events: Default::default(),
            node_lost_grace: Duration::from_secs(60),
        }
    }
}

/// The outcome of one heartbeat as the API reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Health and status both succeeded.
    Ok,
    /// Health succeeded, status failed: a success for the streaks, resources unchanged.
    Degraded,
    /// Health failed: a failure for the streaks.
    Failed,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Degraded => "degraded",
            Verdict::Failed => "failed",
        }
    }
}

/// What the two agent calls of a heartbeat returned.
#[derive(Debug, Clone)]
pub struct Probe {
    pub health: Result<(), AgentError>,
    pub status: Result<AgentStatus, AgentError>,
}

/// What one heartbeat did to a node.
#[derive(Debug, Clone)]
pub struct HeartbeatReport {
    pub node: Node,
    pub verdict: Verdict,
    pub heartbeat_error: String,
    pub status_error: String,
}

/// Streak counters and state after one heartbeat; the state moves only when a threshold is reached.
pub fn next_streaks(
    state: NodeState,
    success_streak: u32,
    failure_streak: u32,
    success: bool,
    ready_threshold: u32,
    failure_threshold: u32,
) -> (NodeState, u32, u32) {
    if success {
        let streak = success_streak.saturating_add(1);
        let state = if streak >= ready_threshold { NodeState::Ready } else { state };
        (state, streak, 0)
    } else {
        let streak = failure_streak.saturating_add(1);
        let state = if streak >= failure_threshold { NodeState::NotReady } else { state };
        (state, 0, streak)
    }
}

/// Describes a failed agent call for `last_error`, keeping "unreachable" apart from "reported unhealthy".
pub fn describe_failure(error: &AgentError) -> String {
    match error {
        AgentError::Unreachable(why) => format!("unreachable: {why}"),
        AgentError::Status { status, message } => format!("unhealthy: agent answered {status}: {message}"),
        AgentError::Invalid(why) => format!("unhealthy: invalid answer: {why}"),
    }
}

/// Whether the agent answered that the caller's credential is missing or wrong.
fn refuses_credential(error: &AgentError) -> bool {
    matches!(error, AgentError::Status { status: 401 | 403, .. })
}

/// Applies one heartbeat's probe to a node's status (pure; `now` is the RFC 3339 time of the probe).
pub fn apply_probe(node: &Node, probe: &Probe, settings: &NodeSettings, now: &str) -> (NodeStatus, Verdict) {
    let mut status = node.status.clone();
    let verdict = match (&probe.health, &probe.status) {
        (Err(_), _) => Verdict::Failed,
        // `/healthz` is open, so only the status call shows that the agent refuses this node's
        // credential: whatever answers is not this node's agent, and must not count as it.
        (Ok(()), Err(e)) if refuses_credential(e) => Verdict::Failed,
        (Ok(()), Err(_)) => Verdict::Degraded,
        (Ok(()), Ok(_)) => Verdict::Ok,
    };
    let success = verdict != Verdict::Failed;
    let (state, successes, failures) = next_streaks(
        status.state,
        status.success_streak,
        status.failure_streak,
        success,
        settings.ready_threshold,
        settings.failure_threshold,
    );
    if state != status.state {
        status.last_transition_at = Some(now.to_string());
    }
    status.state = state;
    status.success_streak = successes;
    status.failure_streak = failures;
    match (&probe.health, &probe.status) {
        (Err(e), _) => status.last_error = describe_failure(e),
        (Ok(()), Err(e)) if refuses_credential(e) => {
            status.last_error = format!("unauthorized: the agent refuses this node's token: {}", describe_failure(e))
        }
        (Ok(()), Err(e)) => {
            status.last_heartbeat = Some(now.to_string());
            status.last_error = format!("degraded: status call failed: {}", describe_failure(e));
        }
        (Ok(()), Ok(report)) => {
            status.last_heartbeat = Some(now.to_string());
            status.last_error.clear();
            status.resources =
                derive_resources(node, &Reported::from_agent(report, now), settings.default_max_alloc_percent);
            status.node_info = NodeInfo::reported(report);
        }
    }
    (status, verdict)
}

/// What an agent last said about a node's resources; all zero before its first report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reported {
    pub capacity_cpu_milli: u64,
    pub capacity_memory_bytes: u64,
    pub used_cpu_milli: u64,
    pub used_memory_bytes: u64,
    /// The address the agent reports for reaching its sandboxes.
    pub external: String,
    pub updated_at: Option<String>,
}

impl Reported {
    /// A fresh report, received at `now`.
    pub fn from_agent(report: &AgentStatus, now: &str) -> Reported {
        Reported {
            capacity_cpu_milli: report.capacity_cpu_milli,
            capacity_memory_bytes: report.capacity_memory_bytes,
            used_cpu_milli: report.used_cpu_milli,
            used_memory_bytes: report.used_memory_bytes,
            external: report.external.clone(),
            updated_at: Some(now.to_string()),
        }
    }

    /// The report behind resources already stored, to derive them again after the node's spec changed.
    pub fn from_resources(r: &NodeResources) -> Reported {
        Reported {
            capacity_cpu_milli: r.capacity_cpu_milli,
            capacity_memory_bytes: r.capacity_memory_bytes,
            used_cpu_milli: r.used_cpu_milli,
            used_memory_bytes: r.used_memory_bytes,
            external: r.external.clone(),
            updated_at: r.updated_at.clone(),
        }
    }
}

/// The one derivation of a node's resources, from its spec and what its agent reported:
/// allocatable = floor(capacity × percent / 100), available = max(0, allocatable − used), and the
/// spec's `external` wins over the agent's.
pub fn derive_resources(node: &Node, reported: &Reported, default_max_alloc_percent: u32) -> NodeResources {
    let percent = node.max_alloc_percent.unwrap_or(default_max_alloc_percent);
    let mut resources = NodeResources::derive(
        reported.capacity_cpu_milli,
        reported.capacity_memory_bytes,
        reported.used_cpu_milli,
        reported.used_memory_bytes,
        percent,
    );
    resources.external = match node.external.as_deref().filter(|e| !e.is_empty()) {
        Some(from_spec) => from_spec.to_string(),
        None => reported.external.clone(),
    };
    resources.updated_at = reported.updated_at.clone();
    resources
}

/// Calls the agent's health endpoint, then, if it answered healthy, its status endpoint; each is
/// bounded by `timeout`.
///
/// One call at a time, so a heartbeat reuses one pooled connection per agent: two concurrent calls
/// kept two open per agent, 20,000 descriptors at 10,000 nodes. A failed health check already
/// fails the heartbeat, so its error stands for the status call that is skipped (and the report
/// shows no `status_error`).
pub async fn probe_agent(agents: &dyn AgentClient, agent: AgentAddr<'_>, timeout: Duration) -> Probe {
    let health = agents.health(agent, timeout).await;
    let status = match &health {
        Ok(()) => agents.status(agent, timeout).await,
        Err(e) => Err(e.clone()),
    };
    Probe { health, status }
}

/// Runs one heartbeat against a node and writes the result with compare-and-swap.
///
/// A node deleted meanwhile is not resurrected: the write fails with `NotFound`.
pub async fn heartbeat_once(
    objects: &dyn ObjectClient,
    agents: &dyn AgentClient,
    settings: &NodeSettings,
    name: &str,
) -> Result<HeartbeatReport, ObjectError> {
    let node = objects.get_node(name).await?.ok_or_else(|| ObjectError::NotFound(format!("node {name:?}")))?;
    heartbeat_from(objects, agents, settings, Arc::new(node)).await
}

/// `heartbeat_once` from a copy of the node already at hand (the node controller's informer holds
/// one): a copy behind the store only costs a compare-and-swap retry, which reads the node again.
pub async fn heartbeat_from(
    objects: &dyn ObjectClient,
    agents: &dyn AgentClient,
    settings: &NodeSettings,
    mut node: Arc<Node>,
) -> Result<HeartbeatReport, ObjectError> {
    let name = node.name.clone();
    let name = name.as_str();
    let probe = probe_agent(agents, AgentAddr::of(&node), settings.heartbeat_timeout).await;
    let now = rfc3339_now();
    loop {
        let (status, verdict) = apply_probe(&node, &probe, settings, &now);
        if status.state != node.status.state {
            tracing::info!(node = name, from = ?node.status.state, to = ?status.state, error = %status.last_error, "node state changed");
        }
        match objects.put_node_status(name, &status, &node.resource_version).await {
            Ok(written) => {
                if written.status.state != node.status.state {
                    report_transition(&settings.events, &written);
                }
                return Ok(HeartbeatReport {
                    node: written,
                    verdict,
                    heartbeat_error: probe.health.as_ref().err().map(describe_failure).unwrap_or_default(),
                    // A failed health check skips the status call: there is no status error to show.
                    status_error: match (&probe.health, &probe.status) {
                        (Ok(()), Err(e)) => describe_failure(e),
                        _ => String::new(),
                    },
                });
            }
            // Someone else wrote the node (a user, the on-demand heartbeat): apply the same probe to the new version.
            Err(ObjectError::Conflict(_)) => {
                let probed = node.sbxlet_base_url.clone();
                node = Arc::new(
                    objects.get_node(name).await?.ok_or_else(|| ObjectError::NotFound(format!("node {name:?}")))?,
                );
                if node.sbxlet_base_url != probed {
                    // The address changed under us: this probe says nothing about the new one.
                    return Err(ObjectError::Conflict(format!("node {name} moved to {}", node.sbxlet_base_url)));
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// The event of a node's state change.
fn report_transition(events: &crate::events::Events, node: &Node) {
    let object = sandboxd_api::event::ObjectReference::node(&node.name);
    match node.status.state {
        NodeState::Ready => events.normal(object, "NodeReady", format!("node {} is Ready", node.name)),
        NodeState::NotReady => {
            let why = if node.status.last_error.is_empty() { "heartbeats failed" } else { &node.status.last_error };
            events.warning(object, "NodeNotReady", format!("node {} is NotReady: {why}", node.name))
        }
        NodeState::Unknown => {}
    }
}

/// Whether a NotReady node has been so for `grace` by `now` (its NodeLost moment).
pub fn lost_by(node: &Node, grace: Duration, now_unix: i64) -> bool {
    let since = node.status.last_transition_at.as_deref().and_then(sandboxd_api::time::parse_rfc3339);
    node.status.state == NodeState::NotReady
        && since.is_some_and(|s| s.saturating_add(grace.as_secs() as i64) <= now_unix)
}

pub use crate::clock::rfc3339_now;

/// How far one gap may stray from `heartbeat_interval` (the ±10 % of the contract).
const GAP_SLACK: f64 = 0.1;

/// Where in each interval a node's heartbeats fall, from a hash of its name: evenly spread over the
/// fleet, and the same on every replica and after every restart.
pub fn heartbeat_phase(name: &str, interval: Duration) -> Duration {
    let spread = crate::scheduler::tie_break(0, name);
    Duration::from_nanos(spread % interval.as_nanos().max(1) as u64)
}

/// The gap until a node's next heartbeat, `elapsed` after the controller's epoch: the interval,
/// stretched or shortened by up to 10 % toward the node's `phase`. Nodes registered together, or
/// all beaten at once when a controller starts, would otherwise beat in rounds (every node within
/// a second, then nothing for four), which random ±10 % jitter takes minutes to smear out; steered,
/// a round is spread over the whole interval within five intervals.
pub fn next_heartbeat_gap(elapsed: Duration, phase: Duration, interval: Duration) -> Duration {
    let period = interval.as_nanos().max(1) as i128;
    // How far past its phase the node is now, in (-period/2, period/2].
    let mut late = (elapsed.as_nanos() as i128 - phase.as_nanos() as i128).rem_euclid(period);
    if late > period / 2 {
        late -= period;
    }
    let slack = (period as f64 * GAP_SLACK) as i128;
    Duration::from_nanos((period - late.clamp(-slack, slack)) as u64)
}

/// The node controller: one timer queue of due heartbeats drained by a bounded set of workers.
pub struct NodeController {
    nodes: Informer<Node>,
    objects: Arc<dyn ObjectClient>,
    agents: Arc<dyn AgentClient>,
    settings: NodeSettings,
    controller: Controller<String>,
    /// When each node's next heartbeat is due, to measure how late it starts.
    due: parking_lot::Mutex<std::collections::HashMap<String, tokio::time::Instant>>,
    /// What heartbeat phases are measured from.
    epoch: tokio::time::Instant,
    /// Nodes whose NodeLost event was reported in their current NotReady spell.
    reported_lost: parking_lot::Mutex<std::collections::HashSet<String>>,
}

impl crate::runtime::footprint::Footprint for NodeController {
    fn footprint(&self) -> Vec<(&'static str, usize)> {
        let mut sizes =
            vec![("heartbeats_due", self.due.lock().len()), ("reported_lost", self.reported_lost.lock().len())];
        sizes.extend(self.controller.queue().footprint());
        sizes
    }
}

impl NodeController {
    /// Subscribes to `nodes` at once, so no node of the informer's first list is missed.
    pub fn new(
        nodes: Informer<Node>,
        objects: Arc<dyn ObjectClient>,
        agents: Arc<dyn AgentClient>,
        settings: NodeSettings,
    ) -> Arc<NodeController> {
        let controller = Controller::new("node", settings.workers);
        controller.watches(&nodes, heartbeat_now);
        let controller = Arc::new(NodeController {
            nodes,
            objects,
            agents,
            settings,
            controller,
            due: Default::default(),
            epoch: tokio::time::Instant::now(),
            reported_lost: Default::default(),
        });
        crate::runtime::footprint::register("node", &controller);
        controller
    }

    /// One heartbeat of one node, then the next one is scheduled an interval (±10 %) later.
    pub async fn beat(&self, name: &str) -> Reconciled {
        let due = self.due.lock().remove(name);
        let Some(node) = self.nodes.get(name) else {
            self.reported_lost.lock().remove(name);
            return Ok(Outcome::Done);
        };
        if let Some(due) = due {
            METRICS.heartbeat_lag.observe(tokio::time::Instant::now().saturating_duration_since(due).as_secs_f64());
        }
        METRICS.heartbeats.inc();
        let result = heartbeat_from(self.objects.as_ref(), self.agents.as_ref(), &self.settings, node).await;
        if let Ok(report) = &result {
            self.report_lost(&report.node);
        }
        if let Err(e) = &result {
            if matches!(e, ObjectError::NotFound(_)) {
                self.reported_lost.lock().remove(name);
                return Ok(Outcome::Done);
            }
            tracing::debug!(node = %name, error = %e, "heartbeat not recorded");
        }
        let interval = self.settings.heartbeat_interval;
        let now = tokio::time::Instant::now();
        let next = next_heartbeat_gap(now - self.epoch, heartbeat_phase(name, interval), interval);
        self.due.lock().insert(name.to_string(), now + next);
        // A failed heartbeat is already recorded in the node's streaks; the next one comes on time.
        Ok(Outcome::Requeue(next))
    }

    /// Reports NodeLost once per NotReady spell, when it has lasted `node_lost_grace`.
    fn report_lost(&self, node: &Node) {
        if !lost_by(node, self.settings.node_lost_grace, crate::clock::unix_now()) {
            if node.status.state != NodeState::NotReady {
                self.reported_lost.lock().remove(&node.name);
            }
            return;
        }
        if self.reported_lost.lock().insert(node.name.clone()) {
            let grace = self.settings.node_lost_grace.as_secs();
            self.settings.events.warning(
                sandboxd_api::event::ObjectReference::node(&node.name),
                "NodeLost",
                format!("node {} is NotReady longer than node_lost_grace ({grace}s): its sandboxes fail NodeLost unless they tolerate sandboxd.io/not-ready longer", node.name),
            );
        }
    }

    /// Runs heartbeats until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        self.controller.wait_synced().await;
        forget_stale_states(self.objects.as_ref(), self.nodes.list(), &self.settings).await;
        let me = self.clone();
        self.controller
            .run(shutdown, move |name: String| {
                let me = me.clone();
                async move { me.beat(&name).await }
            })
            .await;
    }
}

/// The status a node starts over with when a controller starts, or `None` to keep the stored one:
/// a state from before the start says nothing now, unless `keep_fresh_states` and a heartbeat
/// recorded it recently.
pub fn start_over(status: &NodeStatus, settings: &NodeSettings, unix_now: i64, now: &str) -> Option<NodeStatus> {
    let blank = status.state == NodeState::Unknown && status.success_streak == 0 && status.failure_streak == 0;
    if blank || (settings.keep_fresh_states && heartbeat_is_fresh(status, settings, unix_now)) {
        return None;
    }
    Some(NodeStatus {
        state: NodeState::Unknown,
        success_streak: 0,
        failure_streak: 0,
        last_transition_at: Some(now.to_string()),
        ..status.clone()
    })
}

/// State resets written at once. The store groups concurrent writes into one commit, so 10,000 nodes
/// reset in a few hundred commits instead of 10,000 (8 s before a restarted server answered); 64
/// stays well inside one identity's share of the `system` class when the writer is a remote replica.
pub const STATE_RESETS_IN_FLIGHT: usize = 64;

/// Writes `start_over` for each node. The server runs it before it answers requests, so no stale state
/// is ever served; the node controller runs it again when it starts (a new leader, a remote replica).
pub async fn forget_stale_states(
    objects: &dyn ObjectClient,
    nodes: impl IntoIterator<Item = impl std::ops::Deref<Target = Node>>,
    settings: &NodeSettings,
) {
    let (now, unix_now) = (rfc3339_now(), crate::clock::unix_now());
    let resets = nodes.into_iter().filter_map(|node| {
        let fresh = start_over(&node.status, settings, unix_now, &now)?;
        Some((node.name.clone(), node.resource_version.clone(), fresh))
    });
    futures::stream::iter(resets)
        .for_each_concurrent(STATE_RESETS_IN_FLIGHT, |(name, version, fresh)| async move {
            if let Err(e) = objects.put_node_status(&name, &fresh, &version).await {
                // A concurrent write (an on-demand heartbeat) already judged the node afresh.
                tracing::debug!(node = %name, error = %e, "node state not reset");
            }
        })
        .await;
}

/// Whether the last recorded heartbeat is recent enough to carry its judgment over: no heartbeat has
/// been missed yet (one interval plus the call's timeout, plus a second for the timestamp's precision),
/// so the streaks the new controller continues are the ones a single controller would have.
pub fn heartbeat_is_fresh(status: &NodeStatus, settings: &NodeSettings, unix_now: i64) -> bool {
    let Some(last) = status.last_heartbeat.as_deref().and_then(sandboxd_api::time::parse_rfc3339) else {
        return false;
    };
    let window = settings.heartbeat_interval + settings.heartbeat_timeout + Duration::from_secs(1);
    unix_now.saturating_sub(last) <= window.as_secs() as i64
}

/// New nodes and nodes whose address changed get a heartbeat at once; status writes do not retrigger.
fn heartbeat_now(change: &Change<'_, Node>) -> Option<String> {
    match change {
        Change::Upsert { old, new } if old.is_none_or(|old| old.ip != new.ip || old.port != new.port) => {
            Some(new.name.clone())
        }
        _ => None,
    }
}

/// A node named `n` in `state` since `since`, for tests of the controllers.
#[cfg(test)]
pub(crate) fn test_node(state: NodeState, since: Option<&str>) -> Node {
    Node {
        id: "n".into(),
        name: "n".into(),
        ip: "127.0.0.1".into(),
        port: 1,
        external: None,
        max_alloc_percent: None,
        source: Default::default(),
        unschedulable: false,
        labels: Default::default(),
        taints: Vec::new(),
        draining: None,
        status: NodeStatus { state, last_transition_at: since.map(String::from), ..NodeStatus::default() },
        created_at: String::new(),
        updated_at: String::new(),
        sbxlet_base_url: String::new(),
        resource_version: "1".into(),
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_heartbeat_is_fresh_until_one_is_missed() {
        let settings = NodeSettings::default(); // 5 s interval + 2 s timeout (+1 s precision)
        let at = |secs: i64| NodeStatus {
            last_heartbeat: Some(sandboxd_api::time::format_unix(secs)),
            ..NodeStatus::default()
        };
        assert!(heartbeat_is_fresh(&at(1_000), &settings, 1_000));
        assert!(heartbeat_is_fresh(&at(1_000), &settings, 1_008));
        assert!(!heartbeat_is_fresh(&at(1_000), &settings, 1_009), "a heartbeat was missed since");
        assert!(!heartbeat_is_fresh(&NodeStatus::default(), &settings, 1_000), "never heartbeated");
    }

    #[test]
    fn a_start_forgets_every_judged_state_unless_kept_fresh() {
        let ready = NodeStatus {
            state: NodeState::Ready,
            success_streak: 7,
            last_heartbeat: Some(sandboxd_api::time::format_unix(1_000)),
            last_error: String::new(),
            ..NodeStatus::default()
        };
        let started = start_over(&ready, &NodeSettings::default(), 1_001, "T").expect("a single server forgets");
        assert_eq!((started.state, started.success_streak, started.failure_streak), (NodeState::Unknown, 0, 0));
        assert_eq!(
            (started.last_transition_at.as_deref(), started.last_heartbeat),
            (Some("T"), ready.last_heartbeat.clone())
        );

        let elected = NodeSettings { keep_fresh_states: true, ..NodeSettings::default() };
        assert_eq!(start_over(&ready, &elected, 1_001, "T"), None, "a fresh judgment is continued");
        assert!(start_over(&ready, &elected, 1_060, "T").is_some(), "a stale one is not");
        assert_eq!(start_over(&NodeStatus::default(), &NodeSettings::default(), 1_001, "T"), None, "nothing to forget");
    }

    use super::*;
    use NodeState::*;

    #[tokio::test(start_paused = true)]
    async fn a_start_resets_stale_states_concurrently_and_each_once() {
        let nodes: Vec<Node> = (0..1_000)
            .map(|i| Node {
                name: format!("n{i}"),
                status: NodeStatus { state: NodeState::Ready, success_streak: 3, ..NodeStatus::default() },
                ..test_node(NodeState::Ready, None)
            })
            .collect();
        let objects = crate::testing::FakeObjects::new(nodes.clone(), Vec::new())
            .with_node_write_latency(Duration::from_millis(10));
        let started = tokio::time::Instant::now();
        forget_stale_states(&objects, nodes.iter(), &NodeSettings::default()).await;

        let mut reset: Vec<String> = objects
            .writes()
            .into_iter()
            .filter_map(|w| match w {
                crate::testing::Write::NodeStatus { name, status } if status.state == NodeState::Unknown => Some(name),
                _ => None,
            })
            .collect();
        reset.sort();
        reset.dedup();
        assert_eq!((reset.len(), objects.writes().len()), (1_000, 1_000), "every node reset exactly once");
        let most = objects.max_node_writes_in_flight();
        assert!(most > 1 && most <= STATE_RESETS_IN_FLIGHT, "{most} resets in flight at once");
        // One at a time, 1,000 writes of 10 ms would take 10 s before the server answers anything.
        assert!(started.elapsed() < Duration::from_secs(1), "resets took {:?}", started.elapsed());
    }

    fn agent_addr() -> AgentAddr<'static> {
        AgentAddr { node: "n1", base_url: "http://127.0.0.1:1" }
    }

    #[tokio::test(start_paused = true)]
    async fn a_heartbeat_makes_one_agent_call_at_a_time() {
        let agent = crate::testing::ScriptedAgent::new(Ok(()), Duration::from_millis(100));
        let probe = probe_agent(&agent, agent_addr(), Duration::from_secs(2)).await;
        assert!(probe.health.is_ok() && probe.status.is_ok());
        assert_eq!(agent.max_in_flight.load(std::sync::atomic::Ordering::SeqCst), 1, "health and status overlapped");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_health_check_skips_the_status_call_and_stands_for_it() {
        let down = AgentError::Unreachable("connection refused".into());
        let agent = crate::testing::ScriptedAgent::new(Err(down.clone()), Duration::ZERO);
        let probe = probe_agent(&agent, agent_addr(), Duration::from_secs(2)).await;
        assert_eq!((probe.health, probe.status), (Err(down.clone()), Err(down)));
        assert_eq!(agent.status_calls.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    #[test]
    fn streaks_and_state_follow_thresholds_with_hysteresis() {
        // (state, successes, failures, heartbeat ok?) -> (state, successes, failures); thresholds 2 and 3.
        let table = [
            ((Unknown, 0, 0, true), (Unknown, 1, 0)),
            ((Unknown, 1, 0, true), (Ready, 2, 0)),
            ((Unknown, 0, 0, false), (Unknown, 0, 1)),
            ((Unknown, 0, 2, false), (NotReady, 0, 3)),
            ((Ready, 5, 0, false), (Ready, 0, 1)),
            ((Ready, 0, 1, false), (Ready, 0, 2)),
            ((Ready, 0, 2, false), (NotReady, 0, 3)),
            ((Ready, 0, 2, true), (Ready, 1, 0)),
            ((NotReady, 0, 7, true), (NotReady, 1, 0)),
            ((NotReady, 1, 0, true), (Ready, 2, 0)),
            ((NotReady, 1, 0, false), (NotReady, 0, 1)),
            ((Ready, u32::MAX, 0, true), (Ready, u32::MAX, 0)),
        ];
        for ((state, s, f, ok), want) in table {
            assert_eq!(next_streaks(state, s, f, ok, 2, 3), want, "from {state:?} s={s} f={f} ok={ok}");
        }
    }

    #[test]
    fn thresholds_come_from_configuration() {
        assert_eq!(next_streaks(Unknown, 0, 0, true, 1, 1), (Ready, 1, 0));
        assert_eq!(next_streaks(Ready, 0, 0, false, 1, 1), (NotReady, 0, 1));
        assert_eq!(next_streaks(Unknown, 3, 0, true, 5, 1), (Unknown, 4, 0));
    }

    fn node() -> Node {
        test_node(Unknown, None)
    }

    fn report() -> AgentStatus {
        AgentStatus {
            capacity_cpu_milli: 4000,
            capacity_memory_bytes: 16_709_799_936,
            used_cpu_milli: 100,
            used_memory_bytes: 134_217_728,
            external: "203.0.113.10".into(),
            sandboxes: 1,
            ..AgentStatus::default()
        }
    }

    #[test]
    fn ok_heartbeat_refreshes_resources_and_clears_error() {
        let mut n = node();
        n.status.last_error = "unreachable: x".into();
        let probe = Probe { health: Ok(()), status: Ok(report()) };
        let (status, verdict) = apply_probe(&n, &probe, &NodeSettings::default(), "2026-05-15T04:31:30Z");
        assert_eq!(verdict, Verdict::Ok);
        assert_eq!(status.last_error, "");
        assert_eq!(status.last_heartbeat.as_deref(), Some("2026-05-15T04:31:30Z"));
        assert_eq!(status.resources.allocatable_cpu_milli, 3600);
        assert_eq!(status.resources.available_memory_bytes, 14_904_602_214);
        assert_eq!(status.resources.external, "203.0.113.10");
    }

    #[test]
    fn spec_external_wins_over_agent_report() {
        let mut n = node();
        n.external = Some("198.51.100.7".into());
        n.max_alloc_percent = Some(50);
        let r = derive_resources(&n, &Reported::from_agent(&report(), "t"), 90);
        assert_eq!(r.external, "198.51.100.7");
        assert_eq!(r.allocatable_cpu_milli, 2000);
    }

    #[test]
    fn degraded_counts_as_success_and_keeps_resources() {
        let mut n = node();
        n.status.resources.capacity_cpu_milli = 1234;
        let probe = Probe { health: Ok(()), status: Err(AgentError::Status { status: 500, message: "boom".into() }) };
        let (status, verdict) = apply_probe(&n, &probe, &NodeSettings::default(), "t");
        assert_eq!(verdict, Verdict::Degraded);
        assert_eq!(status.success_streak, 1);
        assert_eq!(status.resources.capacity_cpu_milli, 1234);
        assert!(status.last_error.contains("boom"));
    }

    #[test]
    fn an_agent_refusing_the_nodes_token_is_a_failed_heartbeat() {
        let n = node();
        let refused = AgentError::Status { status: 401, message: "missing or invalid bearer token".into() };
        let probe = Probe { health: Ok(()), status: Err(refused) };
        let (status, verdict) = apply_probe(&n, &probe, &NodeSettings::default(), "t");
        assert_eq!(verdict, Verdict::Failed);
        assert_eq!((status.success_streak, status.failure_streak), (0, 1));
        assert!(status.last_error.starts_with("unauthorized:"), "{}", status.last_error);
    }

    #[test]
    fn failure_keeps_unreachable_apart_from_unhealthy() {
        let n = node();
        let unreachable =
            Probe { health: Err(AgentError::Unreachable("connection refused".into())), status: Ok(report()) };
        let (status, verdict) = apply_probe(&n, &unreachable, &NodeSettings::default(), "t");
        assert_eq!(verdict, Verdict::Failed);
        assert_eq!(status.failure_streak, 1);
        assert!(status.last_error.starts_with("unreachable: "), "{}", status.last_error);
        assert_eq!(status.last_heartbeat, None);
        let unhealthy =
            Probe { health: Err(AgentError::Status { status: 500, message: "sick".into() }), status: Ok(report()) };
        let (status, _) = apply_probe(&n, &unhealthy, &NodeSettings::default(), "t");
        assert!(status.last_error.starts_with("unhealthy: "), "{}", status.last_error);
    }

    #[test]
    fn state_change_stamps_transition_time() {
        let mut n = node();
        n.status.success_streak = 1;
        let probe = Probe { health: Ok(()), status: Ok(report()) };
        let (status, _) = apply_probe(&n, &probe, &NodeSettings::default(), "2026-05-15T04:31:30Z");
        assert_eq!(status.state, Ready);
        assert_eq!(status.last_transition_at.as_deref(), Some("2026-05-15T04:31:30Z"));
    }

    #[test]
    fn a_gap_stays_within_ten_percent_of_the_interval() {
        let interval = Duration::from_secs(5);
        for step in 0..2_000u64 {
            let elapsed = Duration::from_millis(step * 37);
            let phase = heartbeat_phase(&format!("node-{step}"), interval);
            let gap = next_heartbeat_gap(elapsed, phase, interval);
            assert!(gap >= Duration::from_millis(4500) && gap <= Duration::from_millis(5500), "{gap:?}");
        }
    }

    #[test]
    fn a_node_on_its_phase_beats_exactly_every_interval() {
        let interval = Duration::from_secs(5);
        let phase = Duration::from_millis(1234);
        for round in 1..4u32 {
            assert_eq!(next_heartbeat_gap(phase + interval * round, phase, interval), interval);
        }
    }

    /// Heartbeat starts of `nodes` over one interval, in tenths of it, after `rounds` beats that all
    /// began at the same instant (nodes registered together, or a controller that just started).
    fn tenths_after(nodes: usize, rounds: usize) -> [usize; 10] {
        let interval = Duration::from_secs(5);
        let mut tenths = [0; 10];
        for i in 0..nodes {
            let name = format!("node-{i:04}");
            let phase = heartbeat_phase(&name, interval);
            let mut at = Duration::from_secs(60);
            for _ in 0..rounds {
                at += next_heartbeat_gap(at, phase, interval);
            }
            tenths[(at.as_millis() % 5_000 / 500) as usize] += 1;
        }
        tenths
    }

    #[test]
    fn nodes_that_beat_together_spread_over_the_interval_within_five_rounds() {
        let (nodes, even) = (5_000, 500);
        let first = tenths_after(nodes, 1);
        assert!(first.iter().filter(|n| **n > 0).count() <= 3, "one round moves each node by 10 % at most: {first:?}");
        let fifth = tenths_after(nodes, 5);
        for n in fifth {
            assert!(n.abs_diff(even) < even / 5, "not spread evenly: {fifth:?}");
        }
    }
}
