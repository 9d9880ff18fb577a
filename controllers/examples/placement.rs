//! Times the scheduler's placement alone: 10,000 sandboxes onto 5,000 identical Ready nodes, as
//! scheduling-basic places them, without a server. Prints the best of seven rounds in µs per
//! placement. Run: `cargo run --release -p sandboxd-controllers --example placement`.

use sandboxd_api::{Node, Protocol};
use sandboxd_controllers::scheduler::{AllocationIndex, Policy, Request};
use std::time::Instant;

const NODES: usize = 5_000;
const SANDBOXES: usize = 10_000;
const ROUNDS: usize = 7;

fn ready_node(i: usize) -> Node {
    let name = format!("node-{i:05}");
    let mut node: Node = serde_json::from_value(serde_json::json!({
        "id": name, "name": name, "ip": "127.0.0.1", "port": 1, "state": "Ready",
        "created_at": "", "updated_at": "", "sbxlet_base_url": ""
    }))
    .expect("a node decodes");
    // scheduling-basic's agents: 64 cores and 256 GiB each.
    node.status.resources = sandboxd_api::NodeResources::derive(64_000, 256 << 30, 0, 0, 90);
    node
}

/// Microseconds per placement over one round on a fresh index.
fn one_round(request: &Request, names: &[String]) -> f64 {
    let mut index = AllocationIndex::default();
    for i in 0..NODES {
        index.upsert_node(&ready_node(i));
    }
    let started = Instant::now();
    for name in names {
        index.place(name, request, Policy::Spread, (10_000, 19_999)).expect("every sandbox fits");
    }
    started.elapsed().as_secs_f64() * 1e6 / names.len() as f64
}

fn main() {
    // scheduling-basic's sandbox: 100m, 64Mi and one automatic host port.
    let request = Request {
        cpu_milli: 100,
        memory_bytes: 64 << 20,
        ports: vec![(Protocol::Tcp, 80, None)],
        ..Request::default()
    };
    let names: Vec<String> = (0..SANDBOXES).map(|i| format!("sbx-{i:06}")).collect();
    let rounds: Vec<f64> = (0..ROUNDS).map(|_| one_round(&request, &names)).collect();
    let best = rounds.iter().copied().fold(f64::MAX, f64::min);
    println!(
        "{{\"scenario\":\"placement\",\"nodes\":{NODES},\"sandboxes\":{SANDBOXES},\"best_us_per_placement\":{best:.1},\"rounds_us\":{rounds:.1?}}}"
    );
}
