//! Sandbox write rules: create (idempotent), spec updates (only TTL and labels), deletes, status
//! writes (phases never move back, a bound sandbox never moves), and finalize.

use super::{encode, Registry, RegistryError, RegistryResult};
use crate::store::{Kind, StoreError, Versioned};
use sandboxd_api::time::{format_unix, parse_rfc3339};
use sandboxd_api::validate::{validate_name, validate_sandbox_spec};
use sandboxd_api::{Phase, Sandbox, SandboxSpec, SandboxStatus};

/// What a create did.
pub enum Created {
    New(Versioned),
    /// The id existed with an identical spec: the create is idempotent.
    Existing(Versioned),
}

impl Registry {
    pub async fn get_sandbox(&self, id: &str) -> RegistryResult<Versioned> {
        self.store
            .get(Kind::Sandboxes, id)
            .await?
            .ok_or_else(|| RegistryError::NotFound(format!("sandbox {id:?} not found")))
    }

    /// Creates a sandbox in phase Pending; posting the same id with an identical spec again is a no-op.
    pub async fn create_sandbox(&self, id: &str, spec: SandboxSpec) -> RegistryResult<Created> {
        self.check_spec(Some(id), &spec)?;
        let sandbox = new_sandbox(id, spec, self.clock.unix_now());
        match self.store.create_encoded(Kind::Sandboxes, id, encode(&sandbox)?).await {
            Ok(stored) => Ok(Created::New(stored)),
            Err(StoreError::AlreadyExists { .. }) => self.existing_if_identical(&sandbox).await.map(Created::Existing),
            Err(e) => Err(e.into()),
        }
    }

    fn check_spec(&self, id: Option<&str>, spec: &SandboxSpec) -> RegistryResult<()> {
        let mut problems = Vec::new();
        if let Some(Err(e)) = id.map(|id| validate_name("id", id)) {
            problems.push(e.to_string());
        }
        if let Err(e) = validate_sandbox_spec(spec, &self.policy) {
            problems.push(e.to_string());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(RegistryError::Invalid(problems.join("; ")))
        }
    }

    async fn existing_if_identical(&self, wanted: &Sandbox) -> RegistryResult<Versioned> {
        let Some(stored) = self.store.get(Kind::Sandboxes, &wanted.id).await? else {
            return Err(RegistryError::Conflict(format!("sandbox {:?} was deleted concurrently; retry", wanted.id)));
        };
        let existing: Sandbox = stored.decode()?;
        if existing.spec == wanted.spec {
            Ok(stored)
        } else {
            Err(RegistryError::Conflict(format!("sandbox {:?} already exists with a different spec", wanted.id)))
        }
    }

    /// Changes `ttl_seconds` and `labels` (everything else is immutable); CAS on `expect`, or retried.
    pub async fn update_sandbox_spec(
        &self,
        id: &str,
        spec: &SandboxSpec,
        expect: Option<u64>,
    ) -> RegistryResult<Versioned> {
        self.check_spec(None, spec)?;
        loop {
            let current = self.get_sandbox(id).await?;
            let mut sandbox: Sandbox = current.decode()?;
            check_immutable(&sandbox.spec, spec)?;
            sandbox.spec.ttl_seconds = spec.ttl_seconds;
            sandbox.spec.labels = spec.labels.clone();
            let created = parse_rfc3339(&sandbox.created_at).unwrap_or_else(|| self.clock.unix_now());
            sandbox.status.expire_at = expire_at(created, sandbox.spec.ttl_seconds);
            sandbox.updated_at = self.clock.rfc3339_now();
            match self.write(id, &sandbox, expect.or(Some(current.revision))).await {
                Err(StoreError::Conflict { .. }) if expect.is_none() => continue,
                result => return Ok(result?),
            }
        }
    }

    async fn write(&self, id: &str, sandbox: &Sandbox, expect: Option<u64>) -> Result<Versioned, StoreError> {
        let json = serde_json::to_vec(sandbox).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.store.update_encoded(Kind::Sandboxes, id, json, expect).await
    }

    /// Asks for a sandbox's deletion: removed at once when nothing on a node needs cleaning up,
    /// otherwise Terminating until its node confirms. Deleting a Terminating sandbox again is accepted.
    pub async fn delete_sandbox(&self, id: &str) -> RegistryResult<()> {
        loop {
            let current = self.get_sandbox(id).await?;
            let mut sandbox: Sandbox = current.decode()?;
            let phase_before = sandbox.status.phase.as_str();
            let result = match self.removal_for(&sandbox).await? {
                Removal::AlreadyTerminating => return Ok(()),
                Removal::Now => self.store.delete(Kind::Sandboxes, id, Some(current.revision)).await,
                Removal::AfterNodeConfirms => {
                    mark_terminating(&mut sandbox, "Deleted", "deletion requested", &self.clock.rfc3339_now());
                    self.write(id, &sandbox, Some(current.revision)).await
                }
            };
            match result {
                Ok(_) => {
                    let node = sandbox.status.node_name.as_deref().unwrap_or("");
                    tracing::info!(sandbox = %id, node, from = %phase_before, reason = "Deleted", "sandbox deletion requested");
                    return Ok(());
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(StoreError::NotFound { .. }) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
    }

    async fn removal_for(&self, sandbox: &Sandbox) -> RegistryResult<Removal> {
        let Some(node) = sandbox.status.node_name.as_deref() else {
            return Ok(Removal::Now);
        };
        // With its node gone nothing will ever confirm the removal, even if it was already Terminating.
        if self.store.get(Kind::Nodes, node).await?.is_none() {
            return Ok(Removal::Now);
        }
        if sandbox.status.phase == Phase::Terminating {
            return Ok(Removal::AlreadyTerminating);
        }
        Ok(Removal::AfterNodeConfirms)
    }

    /// Writes a sandbox's status (CAS when `expect` is set, retried otherwise), refusing illegal
    /// transitions. The server owns `expire_at` (from the spec) and `last_transition_at` (from the phase).
    pub async fn write_sandbox_status(
        &self,
        id: &str,
        status: &SandboxStatus,
        expect: Option<u64>,
    ) -> RegistryResult<(Versioned, Sandbox)> {
        loop {
            let current = self.get_sandbox(id).await?;
            if let Some(expected) = expect {
                if expected != current.revision {
                    return Err(StoreError::Conflict {
                        kind: Kind::Sandboxes,
                        name: id.to_string(),
                        expected,
                        actual: current.revision,
                    }
                    .into());
                }
            }
            let mut sandbox: Sandbox = current.decode()?;
            check_status_transition(&sandbox.status, status)?;
            let mut status = status.clone();
            keep_drain_marks(&sandbox.status, &mut status);
            let previous = std::mem::replace(&mut sandbox.status, status.clone());
            sandbox.status.expire_at = previous.expire_at;
            sandbox.status.last_transition_at = if previous.phase != status.phase {
                Some(self.clock.rfc3339_now())
            } else {
                previous.last_transition_at
            };
            sandbox.updated_at = self.clock.rfc3339_now();
            match self.write(id, &sandbox, Some(current.revision)).await {
                Err(StoreError::Conflict { .. }) if expect.is_none() => continue,
                // The typed copy saves in-process callers decoding what was just encoded.
                result => {
                    let stored = result?;
                    sandbox.resource_version = stored.revision.to_string();
                    return Ok((stored, sandbox));
                }
            }
        }
    }

    /// Removes a sandbox once its agent confirmed it gone (the sandbox controller's last step), or one
    /// that was never bound. Only Terminating or unbound sandboxes are finalized, at `expect`.
    pub async fn finalize_sandbox(&self, id: &str, expect: u64) -> RegistryResult<()> {
        let current = self.get_sandbox(id).await?;
        let sandbox: Sandbox = current.decode()?;
        if sandbox.status.phase != Phase::Terminating && sandbox.status.node_name.is_some() {
            return Err(RegistryError::Conflict(format!(
                "sandbox {id:?} is {} on a node: only Terminating or unbound sandboxes are finalized",
                sandbox.status.phase.as_str()
            )));
        }
        self.store.delete(Kind::Sandboxes, id, Some(expect)).await?;
        Ok(())
    }
}

enum Removal {
    AlreadyTerminating,
    /// Never bound, or its node is gone: nothing to clean up on an agent.
    Now,
    AfterNodeConfirms,
}

/// A new sandbox in phase Pending, with `expire_at` from its TTL.
fn new_sandbox(id: &str, spec: SandboxSpec, created: i64) -> Sandbox {
    let at = format_unix(created);
    Sandbox {
        id: id.to_string(),
        status: SandboxStatus {
            phase: Phase::Pending,
            expire_at: expire_at(created, spec.ttl_seconds),
            last_transition_at: Some(at.clone()),
            ..SandboxStatus::default()
        },
        spec,
        created_at: at.clone(),
        updated_at: at,
        resource_version: String::new(),
    }
}

fn expire_at(created_unix: i64, ttl_seconds: Option<i64>) -> Option<String> {
    // Validation bounds the TTL far below an overflow; saturating keeps a bad config from wrapping.
    ttl_seconds.filter(|t| *t > 0).map(|t| format_unix(created_unix.saturating_add(t)))
}

/// Only `ttl_seconds` and `labels` may change after create.
fn check_immutable(current: &SandboxSpec, wanted: &SandboxSpec) -> RegistryResult<()> {
    let fields = [
        ("spec.containers", current.containers != wanted.containers),
        ("spec.ports", current.ports != wanted.ports),
        ("spec.readiness_probe", current.readiness_probe != wanted.readiness_probe),
        ("spec.egress", current.egress != wanted.egress),
        ("spec.node_selector", current.node_selector != wanted.node_selector),
        ("spec.affinity", current.affinity != wanted.affinity),
        ("spec.runtime_class", current.runtime_class != wanted.runtime_class),
        ("spec.priority", current.priority != wanted.priority),
        ("spec.tolerations", current.tolerations != wanted.tolerations),
        ("spec.restart_policy", current.restart_policy != wanted.restart_policy),
    ];
    let changed: Vec<&str> = fields.iter().filter(|(_, differs)| *differs).map(|(field, _)| *field).collect();
    if changed.is_empty() {
        return Ok(());
    }
    let problems: Vec<String> = changed
        .iter()
        .map(|field| {
            format!("{field}: is immutable (only ttl_seconds and labels may change; delete and re-create instead)")
        })
        .collect();
    Err(RegistryError::Invalid(problems.join("; ")))
}

/// Moves a sandbox to Terminating with a reason, stamping the transition.
pub fn mark_terminating(sandbox: &mut Sandbox, reason: &str, message: &str, at: &str) {
    sandbox.status.phase = Phase::Terminating;
    sandbox.status.ready = false;
    // A deletion overrides a drain's eviction: the sandbox goes away rather than elsewhere.
    sandbox.status.eviction = None;
    sandbox.status.reason = Some(reason.to_string());
    sandbox.status.message = Some(message.to_string());
    sandbox.status.last_transition_at = Some(at.to_string());
    sandbox.updated_at = at.to_string();
}

/// Phases never move backwards, and a bound sandbox never moves to another node, except that a
/// sandbox a drain evicted goes back to Pending, unbound, counting one more reschedule.
pub fn check_status_transition(current: &SandboxStatus, next: &SandboxStatus) -> RegistryResult<()> {
    if is_reschedule(current, next) {
        return Ok(());
    }
    if next.phase.rank() < current.phase.rank() {
        return Err(RegistryError::Invalid(format!(
            "status.phase: cannot move from {} back to {}",
            current.phase.as_str(),
            next.phase.as_str()
        )));
    }
    if let (Some(bound), Some(wanted)) = (&current.node_name, &next.node_name) {
        if bound != wanted {
            return Err(RegistryError::Invalid(format!(
                "status.node_name: already bound to {bound:?}, cannot move to {wanted:?}"
            )));
        }
    }
    if current.node_name.is_some() && next.node_name.is_none() && next.phase != Phase::Terminating {
        return Err(RegistryError::Invalid("status.node_name: cannot unbind a scheduled sandbox".into()));
    }
    Ok(())
}

/// A drain's marks survive writes that do not end them: `eviction` stays until the sandbox is
/// rescheduled, fails or terminates (and is dropped then), and `reschedules` never goes down.
fn keep_drain_marks(current: &SandboxStatus, next: &mut SandboxStatus) {
    if matches!(next.phase, Phase::Failed | Phase::Terminating) {
        next.eviction = None;
    } else if next.eviction.is_none() && !is_reschedule(current, next) {
        next.eviction = current.eviction.clone();
    }
    next.reschedules = next.reschedules.max(current.reschedules);
}

fn is_reschedule(current: &SandboxStatus, next: &SandboxStatus) -> bool {
    current.eviction.is_some()
        && !matches!(current.phase, Phase::Failed | Phase::Terminating)
        && next.phase == Phase::Pending
        && next.node_name.is_none()
        && next.eviction.is_none()
        && next.reschedules == current.reschedules + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(phase: Phase, node: Option<&str>) -> SandboxStatus {
        SandboxStatus { phase, node_name: node.map(String::from), ..SandboxStatus::default() }
    }

    #[test]
    fn phase_transitions_only_move_forward() {
        use Phase::*;
        let allowed = [
            (Pending, Scheduled),
            (Scheduled, Creating),
            (Scheduled, Running),
            (Creating, Running),
            (Running, Failed),
            (Failed, Terminating),
            (Pending, Terminating),
            (Running, Running),
            (Scheduled, Failed),
        ];
        for (from, to) in allowed {
            assert!(
                check_status_transition(&status(from, Some("n")), &status(to, Some("n"))).is_ok(),
                "{from:?}->{to:?}"
            );
        }
        let refused = [
            (Running, Creating),
            (Scheduled, Pending),
            (Terminating, Failed),
            (Terminating, Running),
            (Failed, Running),
        ];
        for (from, to) in refused {
            assert!(
                check_status_transition(&status(from, Some("n")), &status(to, Some("n"))).is_err(),
                "{from:?}->{to:?}"
            );
        }
    }

    #[test]
    fn only_an_evicted_sandbox_goes_back_to_pending_and_only_once_per_eviction() {
        let evicting = SandboxStatus {
            eviction: Some(sandboxd_api::sandbox::PendingEviction {
                message: "node n is drained".into(),
                grace_seconds: 30,
                deadline_at: "2026-12-01T00:05:00Z".into(),
            }),
            ..status(Phase::Running, Some("n"))
        };
        let rescheduled = SandboxStatus { reschedules: 1, ..status(Phase::Pending, None) };
        assert!(check_status_transition(&evicting, &rescheduled).is_ok());
        assert!(check_status_transition(&status(Phase::Running, Some("n")), &rescheduled).is_err(), "not evicted");
        let twice = SandboxStatus { reschedules: 2, ..rescheduled.clone() };
        assert!(check_status_transition(&evicting, &twice).is_err(), "one reschedule per eviction");
        let failed = SandboxStatus { phase: Phase::Failed, ..evicting.clone() };
        assert!(check_status_transition(&failed, &rescheduled).is_err(), "a Failed sandbox stays failed");
        let still_bound = SandboxStatus { node_name: Some("n".into()), ..rescheduled };
        assert!(check_status_transition(&evicting, &still_bound).is_err());
    }

    #[test]
    fn writes_that_do_not_end_an_eviction_keep_it_and_reschedules_never_drop() {
        let eviction = sandboxd_api::sandbox::PendingEviction {
            message: "node n is drained".into(),
            grace_seconds: 30,
            deadline_at: "2026-12-01T00:05:00Z".into(),
        };
        let current =
            SandboxStatus { eviction: Some(eviction.clone()), reschedules: 2, ..status(Phase::Running, Some("n")) };
        let mut stale = status(Phase::Running, Some("n"));
        keep_drain_marks(&current, &mut stale);
        assert_eq!((stale.eviction.as_ref(), stale.reschedules), (Some(&eviction), 2), "a write without them");
        let mut failed = SandboxStatus { eviction: Some(eviction.clone()), ..status(Phase::Failed, Some("n")) };
        keep_drain_marks(&current, &mut failed);
        assert_eq!(failed.eviction, None, "a Failed sandbox is no longer being evicted");
        let mut moved = SandboxStatus { reschedules: 3, ..status(Phase::Pending, None) };
        keep_drain_marks(&current, &mut moved);
        assert_eq!((moved.eviction, moved.reschedules), (None, 3), "the reschedule ends the eviction");
    }

    #[test]
    fn a_bound_sandbox_never_changes_node() {
        let err = check_status_transition(&status(Phase::Scheduled, Some("a")), &status(Phase::Creating, Some("b")));
        assert!(err.unwrap_err().to_string().starts_with("status.node_name"));
    }
}
