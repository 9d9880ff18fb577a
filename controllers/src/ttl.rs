//! TTL controller: a delay queue keyed by `expire_at` that moves expired sandboxes to Terminating.

use crate::clock::unix_now;
use crate::objects::{ObjectClient, ObjectError};
use crate::runtime::informer::{Change, Informer};
use crate::runtime::queue::{run_until_shutdown, Outcome, WorkQueue};
use sandboxd_api::time::parse_rfc3339;
use sandboxd_api::{Phase, Sandbox, SandboxStatus};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// When a sandbox expires, relative to `now_unix` (pure): `None` without a TTL or once Terminating.
pub fn time_to_expiry(sandbox: &Sandbox, now_unix: i64) -> Option<Duration> {
    if sandbox.status.phase == Phase::Terminating {
        return None;
    }
    let expire_at = parse_rfc3339(sandbox.status.expire_at.as_deref()?)?;
    Some(Duration::from_secs(expire_at.saturating_sub(now_unix).max(0) as u64))
}

/// The TTL controller.
pub struct TtlController {
    sandboxes: Informer<Sandbox>,
    objects: Arc<dyn ObjectClient>,
    queue: WorkQueue<String>,
}

impl TtlController {
    pub fn new(sandboxes: Informer<Sandbox>, objects: Arc<dyn ObjectClient>) -> Arc<TtlController> {
        let controller = Arc::new(TtlController { sandboxes, objects, queue: WorkQueue::new() });
        let queue = controller.queue.clone();
        // Rebuilt from the informer's list on every start, so expiries due while down fire at once.
        controller.sandboxes.subscribe(move |change| {
            if let Change::Upsert { new, .. } = change {
                if let Some(after) = time_to_expiry(new, unix_now()) {
                    queue.add_after(new.id.clone(), after);
                }
            }
        });
        controller
    }

    /// Expires one sandbox if its time has come; an extended TTL just waits longer.
    pub async fn expire_one(&self, id: &str) -> Outcome {
        let Some(sandbox) = self.sandboxes.get(id) else { return Outcome::Done };
        let Some(remaining) = time_to_expiry(&sandbox, unix_now()) else { return Outcome::Done };
        if !remaining.is_zero() {
            return Outcome::Requeue(remaining);
        }
        let result = if sandbox.status.node_name.is_none() {
            // Never bound: nothing to remove from an agent.
            self.objects.remove_sandbox(&sandbox.id, &sandbox.resource_version).await
        } else {
            let ttl = sandbox.spec.ttl_seconds.unwrap_or_default();
            let status = SandboxStatus {
                phase: Phase::Terminating,
                ready: false,
                reason: Some("Expired".into()),
                message: Some(format!("ttl of {ttl}s expired")),
                ..sandbox.status.clone()
            };
            crate::sandbox::write_status(self.objects.as_ref(), &sandbox, status).await.map(|_| ())
        };
        match result {
            Ok(()) | Err(ObjectError::NotFound(_)) => Outcome::Done,
            Err(e) => Outcome::Err(format!("expiring {id}: {e}")),
        }
    }

    /// Expires sandboxes until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        self.sandboxes.wait_synced().await;
        let queue = self.queue.clone();
        let me = self.clone();
        run_until_shutdown(queue, 8, shutdown, move |id: String| {
            let me = me.clone();
            async move { me.expire_one(&id).await }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox(phase: Phase, expire_at: Option<&str>) -> Sandbox {
        Sandbox {
            id: "s".into(),
            spec: Default::default(),
            status: SandboxStatus { phase, expire_at: expire_at.map(String::from), ..Default::default() },
            created_at: String::new(),
            updated_at: String::new(),
            resource_version: "1".into(),
        }
    }

    #[test]
    fn expiry_is_relative_to_now_and_never_negative() {
        let now = parse_rfc3339("2026-05-15T04:30:00Z").unwrap();
        let cases = [
            (sandbox(Phase::Running, Some("2026-05-15T04:31:00Z")), Some(Duration::from_secs(60))),
            (sandbox(Phase::Pending, Some("2026-05-15T04:00:00Z")), Some(Duration::ZERO)),
            (sandbox(Phase::Running, None), None),
            (sandbox(Phase::Terminating, Some("2026-05-15T04:00:00Z")), None),
        ];
        for (s, want) in cases {
            assert_eq!(time_to_expiry(&s, now), want, "{:?}", s.status);
        }
    }
}
