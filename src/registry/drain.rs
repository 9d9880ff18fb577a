//! Node drain: cordon the node, mark each sandbox on it for eviction, then mark the node draining;
//! the sandbox controller stops them within the grace and fails them (`Evicted`) or places them
//! again (`Reschedule`).

use super::{Registry, RegistryError, RegistryResult};
use crate::store::{Kind, StoreError};
use sandboxd_api::node::{DrainRequest, DrainResponse};
use sandboxd_api::sandbox::{PendingEviction, RestartPolicy};
use sandboxd_api::time::format_unix;
use sandboxd_api::{Node, Phase, Sandbox};

/// Sandboxes read per store page while looking for a node's sandboxes, so memory stays bounded.
const SCAN_PAGE: usize = 500;

impl Registry {
    /// Cordons `name` and marks every sandbox bound there (and not already Failed or Terminating) for
    /// eviction. A repeated drain keeps the evictions already under way and marks any newcomer.
    pub async fn drain_node(&self, name: &str, request: &DrainRequest) -> RegistryResult<DrainResponse> {
        let (grace_seconds, deadline_seconds) = request.bounds().map_err(RegistryError::Invalid)?;
        let wanted = PendingEviction {
            message: format!("node {name} is drained"),
            grace_seconds,
            deadline_at: format_unix(self.clock.unix_now().saturating_add(i64::from(deadline_seconds))),
        };
        // Cordon first, so nothing new lands while the scan runs; the node is marked draining only
        // after the scan, so the sandbox controller never evicts (and moves away) a sandbox before
        // the scan has counted it.
        let cordoned = self.update_node(name, |node| node.unschedulable = true).await?;
        let eviction = cordoned.draining.clone().unwrap_or(wanted);
        let (mut evicted, mut rescheduled) = (Vec::new(), Vec::new());
        let mut cursor = String::new();
        loop {
            let page = self.store.list_page(Kind::Sandboxes, &cursor, SCAN_PAGE).await?;
            for stored in &page.items {
                let sandbox: Sandbox = stored.decode()?;
                if !evictable_from(&sandbox, name) {
                    continue;
                }
                if self.mark_evicted(stored.revision, sandbox.clone(), &eviction).await? {
                    match sandbox.spec.restart_policy {
                        RestartPolicy::Never => evicted.push(sandbox.id),
                        RestartPolicy::Reschedule => rescheduled.push(sandbox.id),
                    }
                }
            }
            if page.next_cursor.is_empty() {
                break;
            }
            cursor = page.next_cursor;
        }
        // A bind that raced the cordon lands after the scan: the marker lets the controller evict it.
        let node = self
            .update_node(name, |node| {
                node.unschedulable = true;
                node.draining.get_or_insert_with(|| eviction.clone());
            })
            .await?;
        tracing::info!(node = name, evicted = evicted.len(), rescheduled = rescheduled.len(), "node drain requested");
        Ok(DrainResponse { node, evicted, rescheduled, deadline_at: eviction.deadline_at })
    }

    /// Applies `change` to the node with compare-and-swap (nothing is written when it changes
    /// nothing) and returns the node.
    async fn update_node(&self, name: &str, change: impl Fn(&mut Node)) -> RegistryResult<Node> {
        loop {
            let current = self.get_node(name).await?;
            let mut node: Node = current.decode()?;
            let before = node.clone();
            change(&mut node);
            if node == before {
                node.resource_version = current.revision.to_string();
                return Ok(node);
            }
            node.updated_at = self.clock.rfc3339_now();
            let json = super::encode(&node)?;
            match self.store.update_encoded(Kind::Nodes, name, json, Some(current.revision)).await {
                Ok(stored) => {
                    node.resource_version = stored.revision.to_string();
                    return Ok(node);
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Marks one sandbox for eviction (keeping an eviction already under way), re-reading it after a
    /// conflicting write. `false` when it left the node or ended meanwhile.
    async fn mark_evicted(
        &self,
        mut revision: u64,
        mut sandbox: Sandbox,
        eviction: &PendingEviction,
    ) -> RegistryResult<bool> {
        loop {
            if sandbox.status.eviction.is_some() {
                return Ok(true);
            }
            let node = sandbox.status.node_name.clone().unwrap_or_default();
            sandbox.status.eviction = Some(eviction.clone());
            sandbox.status.ready = false;
            sandbox.updated_at = self.clock.rfc3339_now();
            let json = super::encode(&sandbox)?;
            match self.store.update_encoded(Kind::Sandboxes, &sandbox.id, json, Some(revision)).await {
                Ok(_) => return Ok(true),
                Err(StoreError::Conflict { .. }) => {
                    let Some(current) = self.store.get(Kind::Sandboxes, &sandbox.id).await? else { return Ok(false) };
                    revision = current.revision;
                    sandbox = current.decode()?;
                    if !evictable_from(&sandbox, &node) {
                        return Ok(false);
                    }
                }
                Err(StoreError::NotFound { .. }) => return Ok(false),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Whether a drain of `node` evicts `sandbox`: bound there, and neither Failed nor Terminating.
fn evictable_from(sandbox: &Sandbox, node: &str) -> bool {
    sandbox.status.node_name.as_deref() == Some(node)
        && !matches!(sandbox.status.phase, Phase::Failed | Phase::Terminating | Phase::Pending)
}
