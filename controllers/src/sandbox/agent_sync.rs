//! The sandbox controller's periodic pass: one paged list per Ready node, queueing the sandboxes whose
//! agent view differs and removing managed orphans.

use super::{apply_agent_view, SandboxController};
use crate::agent::{list_all_sandboxes, AgentAddr};
use sandboxd_api::agent::{AgentPhase, AgentSandbox};
use sandboxd_api::{Node, NodeState, Phase, Sandbox, MANAGED_LABEL};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

impl SandboxController {
    /// One pass of the periodic sync: one paged list per Ready node instead of one call per sandbox.
    ///
    /// Sandboxes whose agent view differs from their status (missing, other phase, other address) and
    /// sandboxes not settled (Scheduled, Terminating, unreleased Failed, on a node not Ready) are queued;
    /// managed sandboxes the store does not know on that node are deleted (orphans).
    pub async fn sync_with_agents(&self) {
        let mut listed_nodes = HashSet::new();
        let ready: Vec<Arc<Node>> =
            self.nodes.list().into_iter().filter(|n| n.status.state == NodeState::Ready).collect();
        for node in ready {
            let held = match list_all_sandboxes(self.agents.as_ref(), AgentAddr::of(&node)).await {
                Ok(held) => held,
                Err(e) => {
                    tracing::debug!(node = %node.name, error = %e, "agent sync skipped");
                    continue;
                }
            };
            listed_nodes.insert(node.name.clone());
            let held: HashMap<String, AgentSandbox> = held.into_iter().map(|a| (a.id.clone(), a)).collect();
            self.remove_orphans(&node, &held).await;
            let bound: Vec<String> =
                self.by_node.lock().get(&node.name).map(|ids| ids.iter().cloned().collect()).unwrap_or_default();
            for id in bound {
                let Some(sandbox) = self.sandboxes.get(&id) else { continue };
                if needs_sync(&sandbox, held.get(&id), &node) {
                    self.controller.queue().add(id);
                }
            }
        }
        // Everything not covered by a node list (unbound, or on a node that was not listed) gets a full look.
        for sandbox in self.sandboxes.list() {
            let listed = sandbox.status.node_name.as_ref().is_some_and(|n| listed_nodes.contains(n));
            if !listed && sandbox.status.phase != Phase::Pending {
                self.controller.queue().add(sandbox.id.clone());
            }
        }
    }

    /// Asks the API itself before deleting: a cache that lags (or stopped) must never delete a live sandbox.
    async fn confirmed_orphan(&self, id: &str, node: &str) -> bool {
        match self.objects.get_sandbox(id).await {
            Ok(None) => true,
            Ok(Some(s)) => s.status.node_name.as_deref() != Some(node) || s.status.released,
            Err(_) => false,
        }
    }

    /// Deletes sandboxes an agent holds with the managed label that the store no longer knows on that node.
    async fn remove_orphans(&self, node: &Node, held: &HashMap<String, AgentSandbox>) {
        for agent_sandbox in held.values() {
            let managed = agent_sandbox.labels.get(MANAGED_LABEL).is_some_and(|v| v == "true");
            // Released sandboxes gave up their ports: whatever the agent still holds of them is an orphan.
            let known = self
                .sandboxes
                .get(&agent_sandbox.id)
                .is_some_and(|s| s.status.node_name.as_deref() == Some(node.name.as_str()) && !s.status.released);
            if managed && !known && self.confirmed_orphan(&agent_sandbox.id, &node.name).await {
                match self.agents.delete_sandbox(AgentAddr::of(node), &agent_sandbox.id).await {
                    Ok(()) => {
                        tracing::info!(node = %node.name, sandbox = %agent_sandbox.id, "removed managed orphan");
                        let why = format!("removed from node {}, which the sandbox is no longer bound to", node.name);
                        self.settings.events.normal(
                            sandboxd_api::event::ObjectReference::sandbox(&agent_sandbox.id),
                            "OrphanDeleted",
                            why,
                        );
                    }
                    Err(e) => {
                        tracing::debug!(node = %node.name, sandbox = %agent_sandbox.id, error = %e, "orphan removal failed")
                    }
                }
            }
        }
    }
}

/// Whether a bound sandbox's status disagrees with what its agent reports (pure): the periodic sync
/// reconciles only these, plus the phases that are not settled.
pub fn needs_sync(sandbox: &Sandbox, on_agent: Option<&AgentSandbox>, node: &Node) -> bool {
    let status = &sandbox.status;
    if status.eviction.is_some() {
        // A drain's eviction is under way until the sandbox leaves the node.
        return true;
    }
    match status.phase {
        Phase::Pending => false,
        Phase::Scheduled | Phase::Terminating => true,
        Phase::Failed => status.holds_node_resources(),
        Phase::Creating | Phase::Running => {
            let Some(agent) = on_agent else { return true };
            let mut synced = status.clone();
            apply_agent_view(&mut synced, agent, node);
            synced != *status || (status.phase == Phase::Creating && agent.phase == AgentPhase::Running)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::test_node as node;
    use crate::sandbox::tests::agent_sandbox;

    #[test]
    fn the_periodic_sync_only_reconciles_what_differs() {
        let node = node(NodeState::Ready, None);
        let mut running: Sandbox = serde_json::from_value(serde_json::json!({
            "id": "s", "created_at": "", "updated_at": "", "spec": {"containers": []},
            "status": {"phase": "Running", "node_name": "n", "ready": true, "agent_phase": "running",
                       "private_ip": "10.88.0.5"}
        }))
        .unwrap();
        let agent = agent_sandbox(AgentPhase::Running, "");
        assert!(!needs_sync(&running, Some(&agent), &node), "in agreement: nothing to do");
        assert!(needs_sync(&running, None, &node), "missing on the agent: look (it may have vanished)");
        let moved = AgentSandbox { private_ip: "10.88.0.9".into(), ..agent.clone() };
        assert!(needs_sync(&running, Some(&moved), &node), "a new private IP is synced");
        let failed = agent_sandbox(AgentPhase::Failed, "oom");
        assert!(needs_sync(&running, Some(&failed), &node));
        running.status.phase = Phase::Terminating;
        assert!(needs_sync(&running, Some(&agent), &node), "unsettled phases are always looked at");
    }
}
