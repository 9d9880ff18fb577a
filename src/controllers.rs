//! Starts the controllers of an all-in-one server over the in-process object client.

use crate::apiserver::{node_settings, ApiState};
use crate::config::Config;
use crate::objects::InProcessObjects;
use sandboxd_api::{Node, Sandbox};
use sandboxd_controllers::runtime::informer::Informer;
use sandboxd_controllers::{node, AgentClient, ObjectClient};
use std::sync::Arc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Shared informers, one per kind, so every controller reads the same caches.
#[derive(Clone)]
pub struct Informers {
    pub nodes: Informer<Node>,
    pub sandboxes: Informer<Sandbox>,
}

/// Spawns informers and every controller; they stop when `shutdown` is cancelled.
pub fn start(
    state: &ApiState,
    config: &Config,
    agents: Arc<dyn AgentClient>,
    shutdown: CancellationToken,
) -> JoinSet<()> {
    let objects: Arc<dyn ObjectClient> = Arc::new(InProcessObjects::new(state.clone()));
    let informers = Informers { nodes: Informer::new(), sandboxes: Informer::new() };
    let mut tasks = JoinSet::new();
    tasks.spawn(node::run(
        informers.nodes.clone(),
        objects.clone(),
        agents.clone(),
        node_settings(config),
        shutdown.clone(),
    ));
    tasks.spawn(informers.nodes.clone().run(objects.clone(), shutdown.clone()));
    tasks.spawn(informers.sandboxes.clone().run(objects, shutdown));
    tasks
}
