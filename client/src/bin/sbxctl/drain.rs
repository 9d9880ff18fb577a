//! `sbxctl drain`: asks the server to drain a node, then follows its sandboxes off it.

use crate::{parse_duration, split_target};
use anyhow::bail;
use sandboxd_api::node::DrainRequest;
use sandboxd_api::Sandbox;
use sandboxd_client::Client;
use std::time::Duration;
use tokio::time::Instant;

/// How often the node's sandboxes are counted again.
const POLL: Duration = Duration::from_millis(500);
/// Sandboxes read per page while counting.
const PAGE: usize = 500;

/// Drains `node` and waits until none of its sandboxes is left there, printing progress. Exit code
/// 1 when the timeout passes first (the node stays cordoned, and the server keeps evicting).
pub async fn drain(client: &Client, node: &str, grace_period: &str, timeout: &str) -> anyhow::Result<i32> {
    let name = if node.contains('/') { split_target(node, "node")? } else { node };
    let grace = parse_duration(grace_period)?;
    let timeout = parse_duration(timeout)?;
    if timeout.is_zero() {
        bail!("--timeout must be longer than 0s");
    }
    let request = DrainRequest {
        grace_seconds: Some(grace.as_secs() as i64),
        deadline_seconds: Some(timeout.as_secs().max(1) as i64),
    };
    let started = Instant::now();
    let drained = client.drain_node(name, &request).await?;
    say!("node/{name} cordoned");
    say!(
        "evicting {} sandbox(es), rescheduling {} (grace {}s, deadline {})",
        drained.evicted.len(),
        drained.rescheduled.len(),
        grace.as_secs(),
        drained.deadline_at
    );
    let mut last_left = usize::MAX;
    loop {
        let left = sandboxes_on(client, name).await?;
        if left.len() != last_left {
            say!("node/{name}: {} sandbox(es) left", left.len());
            last_left = left.len();
        }
        if left.is_empty() {
            say!("node/{name} drained in {:.1}s", started.elapsed().as_secs_f64());
            return Ok(0);
        }
        if started.elapsed() >= timeout {
            let ids: Vec<&str> = left.iter().take(10).map(|s| s.id.as_str()).collect();
            say!("node/{name}: timed out after {}s; still there: {}", timeout.as_secs(), ids.join(", "));
            return Ok(1);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The sandboxes that still hold room on `node` (a Failed one until its agent confirmed it gone).
async fn sandboxes_on(client: &Client, node: &str) -> anyhow::Result<Vec<Sandbox>> {
    let mut left = Vec::new();
    let mut cursor = String::new();
    loop {
        let page = client.list_sandboxes_page(&cursor, PAGE).await?;
        left.extend(
            page.items
                .into_iter()
                .filter(|s| s.status.node_name.as_deref() == Some(node) && s.status.holds_node_resources()),
        );
        match page.next_cursor.filter(|c| !c.is_empty()) {
            Some(next) => cursor = next,
            None => return Ok(left),
        }
    }
}
