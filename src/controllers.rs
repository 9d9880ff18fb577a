//! Starts the controllers: all in the server process, or in their own process against a remote API server,
//! each behind its own leader lease.

use crate::apiserver::node_settings;
use crate::config::{Config, SchedulerPolicy};
use sandboxd_api::{Node, NodeState, Phase, Sandbox};
use sandboxd_contracts::clock::SystemClock;
use sandboxd_controllers::events::{Events, Recorder};
use sandboxd_controllers::node::{NodeController, NodeSettings};
use sandboxd_controllers::prober::Prober;
use sandboxd_controllers::runtime::informer::Informer;
use sandboxd_controllers::runtime::lease::{Elector, LeaseClient, LeaseSettings};
use sandboxd_controllers::runtime::metrics::{sample_while_alive, saturating_i64, Metrics, Sampled};
use sandboxd_controllers::sandbox::{SandboxController, SandboxSettings};
use sandboxd_controllers::scheduler::{Policy, Scheduler, SchedulerSettings};
use sandboxd_controllers::ttl::TtlController;
use sandboxd_controllers::{AgentClient, ObjectClient};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// The controllers a process can run; each has its own lease `sandboxd-controller-<name>`.
pub const CONTROLLERS: [&str; 4] = ["node", "scheduler", "sandbox", "ttl"];

/// Scheduler settings from configuration.
pub fn scheduler_settings(config: &Config) -> SchedulerSettings {
    SchedulerSettings {
        policy: match config.scheduler_policy {
            SchedulerPolicy::Spread => Policy::Spread,
            SchedulerPolicy::Binpack => Policy::Binpack,
        },
        host_port_range: config.host_port_range,
        requests: config.sandbox_policy(),
        ..SchedulerSettings::default()
    }
}

/// Sandbox controller settings from configuration.
pub fn sandbox_settings(config: &Config) -> SandboxSettings {
    SandboxSettings {
        node_lost_grace: config.node_lost_grace,
        sync_period: config.sync_period,
        // Real containers start in tens of milliseconds; backs off after two seconds (creating_poll_after).
        creating_poll: Duration::from_millis(25),
        creating_timeout: config.creating_timeout,
        ..SandboxSettings::default()
    }
}

type ControllerRun = Pin<Box<dyn Future<Output = ()> + Send>>;
/// Starts one controller's loop, given the token that stops it.
type StartController = Box<dyn FnOnce(CancellationToken) -> ControllerRun + Send>;

/// Every selected controller, subscribed to shared informers, ready to run; informers not yet started.
struct Built {
    nodes: Informer<Node>,
    sandboxes: Informer<Sandbox>,
    /// Writes the events of every controller of this process.
    recorder: Arc<Recorder>,
    runs: Vec<(&'static str, StartController)>,
}

/// How the controllers come to run: started with the process, or elected (taking over from a leader).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Start {
    WithProcess,
    Elected,
}

fn build(
    objects: &Arc<dyn ObjectClient>,
    agents: &Arc<dyn AgentClient>,
    config: &Config,
    only: &[&str],
    start: Start,
) -> Built {
    let nodes: Informer<Node> = Informer::new();
    let sandboxes: Informer<Sandbox> = Informer::new();
    let recorder = Recorder::new(objects.clone());
    let mut runs: Vec<(&'static str, StartController)> = Vec::new();
    // Every controller subscribes before the informers list, so none misses the first list.
    for name in CONTROLLERS.into_iter().filter(|n| only.contains(n)) {
        let run: StartController = match name {
            "node" => {
                // A new leader continues the old one's fresh judgments instead of blacking out every node.
                let settings = NodeSettings {
                    keep_fresh_states: start == Start::Elected,
                    events: Events::new(&recorder, "node-controller"),
                    ..node_settings(config)
                };
                let c = NodeController::new(nodes.clone(), objects.clone(), agents.clone(), settings);
                Box::new(move |stop| Box::pin(c.run(stop)))
            }
            "scheduler" => {
                let settings =
                    SchedulerSettings { events: Events::new(&recorder, "scheduler"), ..scheduler_settings(config) };
                let c = Scheduler::new(nodes.clone(), sandboxes.clone(), objects.clone(), settings);
                Box::new(move |stop| Box::pin(c.run(stop)))
            }
            "sandbox" => {
                let prober = Prober::new(
                    nodes.clone(),
                    sandboxes.clone(),
                    objects.clone(),
                    agents.clone(),
                    64,
                    Events::new(&recorder, "prober"),
                );
                let c = SandboxController::new(
                    nodes.clone(),
                    sandboxes.clone(),
                    objects.clone(),
                    agents.clone(),
                    prober.clone(),
                    SandboxSettings {
                        events: Events::new(&recorder, "sandbox-controller"),
                        ..sandbox_settings(config)
                    },
                    Arc::new(SystemClock),
                );
                Box::new(move |stop: CancellationToken| {
                    Box::pin(async move {
                        tokio::join!(prober.run(stop.clone()), c.run(stop));
                    })
                })
            }
            _ => {
                let events = Events::new(&recorder, "ttl-controller");
                let c = TtlController::new(sandboxes.clone(), objects.clone(), Arc::new(SystemClock), events);
                Box::new(move |stop| Box::pin(c.run(stop)))
            }
        };
        runs.push((name, run));
    }
    Built { nodes, sandboxes, recorder, runs }
}

fn spawn_informers(
    built: &Built,
    objects: &Arc<dyn ObjectClient>,
    tasks: &mut JoinSet<()>,
    shutdown: &CancellationToken,
) {
    tasks.spawn(built.nodes.clone().run(objects.clone(), shutdown.clone()));
    tasks.spawn(built.sandboxes.clone().run(objects.clone(), shutdown.clone()));
    tasks.spawn(built.recorder.clone().run(shutdown.clone()));
    let counts = Arc::new(CacheCounts { nodes: built.nodes.clone(), sandboxes: built.sandboxes.clone() });
    sample_while_alive(&counts);
    let stop = shutdown.clone();
    // Reported for as long as the informers run.
    tasks.spawn(async move {
        stop.cancelled().await;
        drop(counts);
    });
}

/// `sandboxd_nodes` by state and `sandboxd_sandboxes` by phase, counted in the informers' caches at
/// each scrape (a standby's warm caches report too).
struct CacheCounts {
    nodes: Informer<Node>,
    sandboxes: Informer<Sandbox>,
}

/// Every state and phase is reported, at 0 when empty, so a query sees 0 rather than nothing.
const NODE_STATES: [&str; 3] = ["Unknown", "Ready", "NotReady"];
const PHASES: [Phase; 6] =
    [Phase::Pending, Phase::Scheduled, Phase::Creating, Phase::Running, Phase::Terminating, Phase::Failed];

impl Sampled for CacheCounts {
    fn sample(&self, metrics: &Metrics) {
        for state in NODE_STATES {
            metrics.nodes.with_label_values(&[state]);
        }
        for phase in PHASES {
            metrics.sandboxes.with_label_values(&[phase.as_str()]);
        }
        let nodes = self.nodes.count_by(|node| match node.status.state {
            NodeState::Unknown => NODE_STATES[0],
            NodeState::Ready => NODE_STATES[1],
            NodeState::NotReady => NODE_STATES[2],
        });
        for (state, count) in nodes {
            metrics.nodes.with_label_values(&[state]).add(saturating_i64(count));
        }
        for (phase, count) in self.sandboxes.count_by(|sandbox| sandbox.status.phase.as_str()) {
            metrics.sandboxes.with_label_values(&[phase]).add(saturating_i64(count));
        }
    }
}

/// Spawns shared informers and the controllers in `only` in this process; they stop when `shutdown` is cancelled.
pub fn start(
    objects: Arc<dyn ObjectClient>,
    config: &Config,
    agents: Arc<dyn AgentClient>,
    only: &[&'static str],
    shutdown: CancellationToken,
) -> JoinSet<()> {
    let built = build(&objects, &agents, config, only, Start::WithProcess);
    let mut tasks = JoinSet::new();
    spawn_informers(&built, &objects, &mut tasks, &shutdown);
    for (_, run) in built.runs {
        tasks.spawn(run(shutdown.clone()));
    }
    tasks
}

/// Aborts the task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Why a controllers process stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum ControllersError {
    #[error("unknown controller {0:?}; known: node, scheduler, sandbox, ttl")]
    Unknown(String),
    #[error("lease settings: {0}")]
    Lease(String),
    /// Writes and agent calls stop at once; a supervisor restarts the process as a standby.
    #[error("lost the lease of the {0} controller")]
    LostLeadership(&'static str),
}

/// The known controllers named in `names`, in their start order; an unknown name is an error.
pub fn choose(names: &[String]) -> Result<Vec<&'static str>, ControllersError> {
    if let Some(unknown) = names.iter().find(|n| !CONTROLLERS.contains(&n.as_str())) {
        return Err(ControllersError::Unknown(unknown.clone()));
    }
    Ok(CONTROLLERS.into_iter().filter(|c| names.iter().any(|n| n == c)).collect())
}

/// Who this replica is and which controllers it campaigns for.
#[derive(Debug, Clone)]
pub struct Candidacy {
    /// Written into the leases this replica holds.
    pub identity: String,
    /// Controllers to run: any of node, scheduler, sandbox, ttl.
    pub only: Vec<String>,
    pub lease: LeaseSettings,
}

/// Runs the chosen controllers, each only while it holds its lease; informers stay warm on standbys.
///
/// Returns `LostLeadership` the moment a held lease is lost (every controller task is aborted first),
/// or `Ok` after `shutdown`, having released the leases.
pub async fn run_elected(
    objects: Arc<dyn ObjectClient>,
    leases: Arc<dyn LeaseClient>,
    agents: Arc<dyn AgentClient>,
    config: &Config,
    candidacy: &Candidacy,
    shutdown: CancellationToken,
) -> Result<(), ControllersError> {
    let (only, identity, lease_settings) = (&candidacy.only, candidacy.identity.as_str(), candidacy.lease);
    lease_settings.validate().map_err(ControllersError::Lease)?;
    let chosen = choose(only)?;
    let built = build(&objects, &agents, config, &chosen, Start::Elected);
    let mut background = JoinSet::new();
    spawn_informers(&built, &objects, &mut background, &shutdown);
    let mut controllers = JoinSet::new();
    let (lost_tx, mut lost_rx) = tokio::sync::mpsc::unbounded_channel::<&'static str>();
    // Cancelled only after the controllers have stopped, so a lease is never released while its
    // controller still writes.
    let electors = CancellationToken::new();
    for (name, run) in built.runs {
        let lease = format!("sandboxd-controller-{name}");
        let (elector, leading) = Elector::new(&lease, identity, lease_settings, leases.clone());
        background.spawn(elector.run(electors.clone()));
        controllers.spawn(lead_while_elected(name, run, leading, shutdown.clone(), lost_tx.clone()));
    }
    drop(lost_tx);
    tokio::select! {
        Some(name) = lost_rx.recv() => {
            controllers.abort_all();
            tracing::error!(controller = name, "lost leadership: stopping every controller at once");
            Err(ControllersError::LostLeadership(name))
        }
        _ = shutdown.cancelled() => {
            let joined = async { while controllers.join_next().await.is_some() {} };
            if tokio::time::timeout(Duration::from_secs(10), joined).await.is_err() {
                controllers.abort_all();
            }
            // Electors release their leases on the way out, so standbys take over at once.
            electors.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(5), async { while background.join_next().await.is_some() {} }).await;
            Ok(())
        }
    }
}

/// Runs one controller while `leading` says so; reports its name on `lost` when leadership goes.
async fn lead_while_elected(
    name: &'static str,
    run: StartController,
    mut leading: tokio::sync::watch::Receiver<bool>,
    shutdown: CancellationToken,
    lost: tokio::sync::mpsc::UnboundedSender<&'static str>,
) {
    tokio::select! {
        led = async { leading.wait_for(|l| *l).await.is_ok() } => if !led { return },
        _ = shutdown.cancelled() => return,
    }
    tracing::info!(controller = name, "leading: controller started");
    // This term's own token: what the controller spawns stops with it, even when this task is aborted.
    let term = shutdown.child_token();
    let _end_of_term = term.clone().drop_guard();
    // Aborted with this task too, so a controller never outlives the lease that allowed it.
    let mut running = AbortOnDrop(tokio::spawn(run(term)));
    tokio::select! {
        _ = async { let _ = leading.wait_for(|l| !*l).await; } => {
            running.0.abort();
            let _ = lost.send(name);
        }
        _ = shutdown.cancelled() => {
            let _ = (&mut running.0).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A controller that spawns a detached task, as the sandbox controller's resync loop does, which
    /// runs until the token it was given is cancelled.
    fn controller_with_detached_task(stopped: tokio::sync::oneshot::Sender<()>) -> StartController {
        Box::new(move |term: CancellationToken| {
            Box::pin(async move {
                tokio::spawn(async move {
                    term.cancelled().await;
                    let _ = stopped.send(());
                });
                std::future::pending::<()>().await;
            })
        })
    }

    #[tokio::test]
    async fn losing_the_lease_stops_what_the_controller_spawned_too() {
        let (stopped_tx, stopped) = tokio::sync::oneshot::channel();
        let (leading_tx, leading) = tokio::sync::watch::channel(true);
        let (lost_tx, mut lost) = tokio::sync::mpsc::unbounded_channel();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(lead_while_elected(
            "test",
            controller_with_detached_task(stopped_tx),
            leading,
            shutdown.clone(),
            lost_tx,
        ));
        tokio::time::sleep(Duration::from_millis(20)).await;
        leading_tx.send_replace(false);
        assert_eq!(lost.recv().await, Some("test"));
        task.await.unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(1), stopped).await;
        assert!(matches!(ended, Ok(Ok(()))), "the detached task outlived the lease");
        assert!(!shutdown.is_cancelled(), "only this term ended, not the process");
    }
}
