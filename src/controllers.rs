//! Starts the controllers of an all-in-one server over the in-process object client.

use crate::apiserver::{node_settings, ApiState};
use crate::config::{Config, SchedulerPolicy};
use crate::objects::InProcessObjects;
use sandboxd_api::{Node, Sandbox};
use sandboxd_controllers::node::NodeController;
use sandboxd_controllers::prober::Prober;
use sandboxd_controllers::runtime::informer::Informer;
use sandboxd_controllers::sandbox::{SandboxController, SandboxSettings};
use sandboxd_controllers::scheduler::{Policy, Scheduler, SchedulerSettings};
use sandboxd_controllers::ttl::TtlController;
use sandboxd_controllers::{AgentClient, ObjectClient};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

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
        creating_poll: Duration::from_millis(50),
        ..SandboxSettings::default()
    }
}

/// Spawns shared informers and every controller; they stop when `shutdown` is cancelled.
pub fn start(
    state: &ApiState,
    config: &Config,
    agents: Arc<dyn AgentClient>,
    shutdown: CancellationToken,
) -> JoinSet<()> {
    let objects: Arc<dyn ObjectClient> = Arc::new(InProcessObjects::new(state.clone()));
    let nodes: Informer<Node> = Informer::new();
    let sandboxes: Informer<Sandbox> = Informer::new();
    // Every controller subscribes before the informers list, so none misses the first list.
    let prober = Prober::new(nodes.clone(), sandboxes.clone(), objects.clone(), agents.clone(), 64);
    let scheduler = Scheduler::new(nodes.clone(), sandboxes.clone(), objects.clone(), scheduler_settings(config));
    let sandbox_controller = SandboxController::new(
        nodes.clone(),
        sandboxes.clone(),
        objects.clone(),
        agents.clone(),
        prober.clone(),
        sandbox_settings(config),
    );
    let ttl = TtlController::new(sandboxes.clone(), objects.clone());
    let node_controller = NodeController::new(nodes.clone(), objects.clone(), agents, node_settings(config));
    let mut tasks = JoinSet::new();
    tasks.spawn(node_controller.run(shutdown.clone()));
    tasks.spawn(scheduler.run(shutdown.clone()));
    tasks.spawn(sandbox_controller.run(shutdown.clone()));
    tasks.spawn(prober.run(shutdown.clone()));
    tasks.spawn(ttl.run(shutdown.clone()));
    tasks.spawn(nodes.run(objects.clone(), shutdown.clone()));
    tasks.spawn(sandboxes.run(objects, shutdown));
    tasks
}
