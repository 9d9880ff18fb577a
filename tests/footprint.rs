//! A server runs for months: once every sandbox is deleted, no controller keeps an entry for any of them.
//!
//! Its own test binary, because `/metrics` sums the controllers of every server in the process.

mod common;

use common::*;
use sandboxd_api::{NodeState, Phase};
use std::collections::BTreeMap;

/// `sandboxd_controller_entries` from `/metrics`, by `owner/structure`.
async fn controller_entries(base: &str) -> BTreeMap<String, u64> {
    let text = reqwest::get(format!("{base}/metrics")).await.unwrap().text().await.unwrap();
    text.lines()
        .filter_map(|line| line.strip_prefix("sandboxd_controller_entries{owner=\""))
        .filter_map(|rest| {
            let (owner, rest) = rest.split_once("\",structure=\"")?;
            let (structure, value) = rest.split_once("\"} ")?;
            Some((format!("{owner}/{structure}"), value.parse().ok()?))
        })
        .collect()
}

/// Entries kept per node (heartbeats, the node cache), which rightly outlive every sandbox.
fn is_per_node(name: &str) -> bool {
    name.starts_with("node/") || name == "informer/nodes" || name == "sandbox/by_node_nodes"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_every_sandbox_empties_every_per_sandbox_structure() {
    let (server, client) = start_server(test_config(&[])).await;
    let base = format!("http://{}", server.addr);
    let mut agents = Vec::new();
    for name in ["fp-1", "fp-2"] {
        let agent = start_isolated_agent(isolated_sim_config()).await;
        register(&client, name, agent.addr()).await;
        wait_node_state(&client, name, NodeState::Ready).await;
        agents.push(agent);
    }

    // Every kind of per-sandbox state: ports, probes, day-long TTLs, and some that never fit.
    let mut ids = Vec::new();
    for i in 0..40 {
        let mut spec = with_port(sandbox_spec("10m"), 80);
        spec.ttl_seconds = Some(86_400);
        if i % 2 == 0 {
            spec = with_http_probe(spec);
        }
        let id = format!("fp-{i}");
        client.create_sandbox(&id, &spec).await.unwrap();
        ids.push(id);
    }
    for i in 0..5 {
        let id = format!("fp-huge-{i}");
        client.create_sandbox(&id, &sandbox_spec("1000")).await.unwrap();
        ids.push(id);
    }
    eventually(20, "40 Running, 5 Pending", || {
        let client = client.clone();
        async move {
            let items = client.list_sandboxes().await.ok()?.items;
            let running = items.iter().filter(|s| s.status.phase == Phase::Running).count();
            let pending = items.iter().filter(|s| s.status.phase == Phase::Pending).count();
            (running == 40 && pending == 5).then_some(())
        }
    })
    .await;
    let busy = controller_entries(&base).await;
    for name in
        ["informer/sandboxes", "scheduler/held", "scheduler/unschedulable", "prober/tracked", "ttl/queue_timers"]
    {
        assert!(busy.get(name).copied().unwrap_or(0) > 0, "{name} should hold entries while sandboxes live: {busy:?}");
    }

    for id in &ids {
        client.delete_sandbox(id).await.unwrap();
    }
    eventually(20, "every sandbox removed", || {
        let client = client.clone();
        async move { client.list_sandboxes().await.ok()?.items.is_empty().then_some(()) }
    })
    .await;
    // Timers a deleted key still had (a creating poll, a resync) fire within a sync period and find nothing.
    let left = eventually(15, "no per-sandbox entries", || {
        let base = base.clone();
        async move {
            let entries = controller_entries(&base).await;
            let left: BTreeMap<String, u64> =
                entries.into_iter().filter(|(name, n)| !is_per_node(name) && *n > 0).collect();
            left.is_empty().then_some(left)
        }
    })
    .await;
    assert!(left.is_empty());
    for agent in &agents {
        assert_eq!(agent.sandbox_count(), 0, "the agent released every sandbox");
    }
    server.stop().await.unwrap();
}
