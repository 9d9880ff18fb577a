//! What the store binds versus what the agents hold, for tests that converge a fleet after a failure.

use super::{agent_sandboxes, isolated_sim_config, start_isolated_agent};
use sandboxd_api::{Protocol, Sandbox};
use sandboxd_client::Client;
use sbxlet::{AgentHandle, SimConfig};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// One sandbox's host ports as (host port, container port, protocol), sorted.
pub type Ports = Vec<(u16, u16, Protocol)>;

/// The store's sandboxes and, per node, the sandboxes its agent holds.
pub struct World {
    pub store: Vec<Sandbox>,
    pub agents: BTreeMap<String, BTreeMap<String, Ports>>,
}

/// The node name the i-th agent is registered under.
pub fn node_name(i: usize) -> String {
    format!("node-{}", i + 1)
}

/// `count` roomy agents, each on its own loopback address.
pub async fn start_agents(count: usize) -> Vec<AgentHandle> {
    let mut agents = Vec::new();
    for _ in 0..count {
        let config = SimConfig {
            capacity_cpu_milli: 64_000,
            capacity_memory_bytes: 256 << 30,
            record_admissions: true,
            ..isolated_sim_config()
        };
        agents.push(start_isolated_agent(config).await);
    }
    agents
}

/// The agents as the `--nodes` JSON that declares them as `node-1..N`.
pub fn nodes_json(agents: &[AgentHandle]) -> String {
    let nodes: Vec<serde_json::Value> = agents
        .iter()
        .enumerate()
        .map(|(i, a)| serde_json::json!({"id": node_name(i), "ip": a.addr().ip().to_string(), "port": a.addr().port()}))
        .collect();
    serde_json::to_string(&nodes).unwrap()
}

/// Waits up to 60 s until `expected` sandboxes are Running and every agent holds exactly what is bound to it.
pub async fn converge(client: &Client, agents: &[AgentHandle], expected: usize) -> World {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let world = observe(client, agents).await;
        match mismatch(&world, expected) {
            None => return world,
            Some(why) if tokio::time::Instant::now() > deadline => panic!("no convergence within 60 s: {why}"),
            Some(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

async fn observe(client: &Client, agents: &[AgentHandle]) -> World {
    let store = client.list_sandboxes().await.unwrap().items;
    let mut held = BTreeMap::new();
    for (i, agent) in agents.iter().enumerate() {
        let on_agent = agent_sandboxes(agent.addr())
            .await
            .into_iter()
            .map(|a| (a.id, sorted(a.ports.iter().map(|p| (p.host_port, p.container_port, p.protocol)).collect())))
            .collect();
        held.insert(node_name(i), on_agent);
    }
    World { store, agents: held }
}

/// What still differs from a converged world, if anything.
fn mismatch(world: &World, expected: usize) -> Option<String> {
    let phases = phase_counts(&world.store);
    if phases.get("Running") != Some(&expected) {
        return Some(format!("phases in the store: {phases:?}"));
    }
    for (node, held) in &world.agents {
        let bound = bound_to(&world.store, node);
        if held != &bound {
            let extra: Vec<&String> = held.keys().filter(|id| !bound.contains_key(*id)).collect();
            let missing: Vec<&String> = bound.keys().filter(|id| !held.contains_key(*id)).collect();
            return Some(format!("{node}: agent has extra {extra:?}, misses {missing:?}, or ports differ"));
        }
    }
    None
}

pub fn assert_no_host_port_twice(store: &[Sandbox]) {
    let mut handed_out = BTreeSet::new();
    for s in store {
        for p in &s.status.assigned_ports {
            let key = (s.status.node_name.clone().unwrap(), p.protocol, p.host_port);
            assert!(handed_out.insert(key.clone()), "(node, protocol, host port) {key:?} handed out twice");
        }
    }
}

pub fn phase_counts(store: &[Sandbox]) -> BTreeMap<&'static str, usize> {
    let mut counts = BTreeMap::new();
    for s in store {
        *counts.entry(s.status.phase.as_str()).or_default() += 1;
    }
    counts
}

/// The sandboxes the store binds to `node`, with their assigned ports.
pub fn bound_to(store: &[Sandbox], node: &str) -> BTreeMap<String, Ports> {
    store
        .iter()
        .filter(|s| s.status.node_name.as_deref() == Some(node))
        .map(|s| {
            let ports = s.status.assigned_ports.iter().map(|p| (p.host_port, p.container_port, p.protocol)).collect();
            (s.id.clone(), sorted(ports))
        })
        .collect()
}

fn sorted(mut ports: Ports) -> Ports {
    ports.sort();
    ports
}
