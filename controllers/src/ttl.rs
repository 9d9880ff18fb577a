//! TTL controller: a delay queue keyed by `expire_at` that moves expired sandboxes to Terminating.

use crate::clock::Clock;
use crate::events::Events;
use crate::objects::{ObjectClient, ObjectError};
use crate::runtime::controller::Controller;
use crate::runtime::error::ControllerError;
use crate::runtime::informer::{Change, Informer};
use crate::runtime::queue::{Outcome, Reconciled, WorkQueue};
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

/// Keeps one timer per sandbox that has a TTL, and none for a deleted one.
fn schedule_expiry(queue: &WorkQueue<String>, change: &Change<'_, Sandbox>, now_unix: i64) {
    match change {
        Change::Upsert { new, .. } => {
            if let Some(after) = time_to_expiry(new, now_unix) {
                queue.add_after(new.id.clone(), after);
            }
        }
        Change::Delete(gone) => queue.cancel(&gone.id),
    }
}

/// The TTL controller.
pub struct TtlController {
    sandboxes: Informer<Sandbox>,
    objects: Arc<dyn ObjectClient>,
    controller: Controller<String>,
    clock: Arc<dyn Clock>,
    events: Events,
}

impl crate::runtime::footprint::Footprint for TtlController {
    fn footprint(&self) -> Vec<(&'static str, usize)> {
        self.controller.queue().footprint().to_vec()
    }
}

impl TtlController {
    pub fn new(
        sandboxes: Informer<Sandbox>,
        objects: Arc<dyn ObjectClient>,
        clock: Arc<dyn Clock>,
        events: Events,
    ) -> Arc<TtlController> {
        let controller = Controller::new("ttl", 8);
        // Rebuilt from the informer's list on every start, so expiries due while down fire at once.
        let now = clock.clone();
        controller.watches_with(&sandboxes, move |change, queue| schedule_expiry(queue, change, now.unix_now()));
        let controller = Arc::new(TtlController { sandboxes, objects, controller, clock, events });
        crate::runtime::footprint::register("ttl", &controller);
        controller
    }

    /// Expires one sandbox if its time has come; an extended TTL just waits longer.
    pub async fn expire_one(&self, id: &str) -> Reconciled {
        let Some(sandbox) = self.sandboxes.get(id) else { return Ok(Outcome::Done) };
        let Some(remaining) = time_to_expiry(&sandbox, self.clock.unix_now()) else { return Ok(Outcome::Done) };
        if !remaining.is_zero() {
            return Ok(Outcome::Requeue(remaining));
        }
        let ttl = sandbox.spec.ttl_seconds.unwrap_or_default();
        let at = crate::events::Events::stamp();
        let result = if sandbox.status.node_name.is_none() {
            // Never bound: nothing to remove from an agent.
            self.objects.remove_sandbox(&sandbox.id, &sandbox.resource_version).await
        } else {
            let status = SandboxStatus {
                phase: Phase::Terminating,
                ready: false,
                reason: Some("Expired".into()),
                message: Some(format!("ttl of {ttl}s expired")),
                ..sandbox.status.clone()
            };
            crate::status::write_status(self.objects.as_ref(), &sandbox, status).await.map(|_| ())
        };
        match result {
            Ok(()) => {
                let object = sandboxd_api::event::ObjectReference::sandbox(&sandbox.id);
                self.events.normal_at(at, object, "Expired", format!("ttl of {ttl}s expired: deleting the sandbox"));
                Ok(Outcome::Done)
            }
            Err(ObjectError::NotFound(_)) => Ok(Outcome::Done),
            Err(e) => Err(ControllerError::from(e).context(format!("expiring {id}"))),
        }
    }

    /// Expires sandboxes until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let me = self.clone();
        self.controller
            .run(shutdown, move |id: String| {
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

    use crate::clock::TokioClock;
    use crate::testing::FakeObjects;

    const T0: i64 = 1_780_000_000;

    fn expiring(id: &str, phase: Phase, node: Option<&str>, expire_at: i64) -> Sandbox {
        let mut s = Sandbox { id: id.into(), ..sandbox(phase, Some(&sandboxd_api::time::format_unix(expire_at))) };
        s.status.node_name = node.map(String::from);
        s.spec.ttl_seconds = Some(60);
        s
    }

    /// Lets every task that is ready run, without moving paused time.
    async fn settle() {
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn sandboxes_expire_when_their_ttl_runs_out_in_every_phase_on_paused_time() {
        let objects = Arc::new(FakeObjects::new(
            vec![],
            vec![
                expiring("running", Phase::Running, Some("n"), T0 + 60),
                expiring("never-bound", Phase::Pending, None, T0 + 30),
                expiring("failed", Phase::Failed, Some("n"), T0 + 45),
                // Fell due while the controllers were down: expires as soon as they are back.
                expiring("due-while-down", Phase::Running, Some("n"), T0 - 100),
            ],
        ));
        let sandboxes = Informer::new();
        let controller = TtlController::new(
            sandboxes.clone(),
            objects.clone(),
            Arc::new(TokioClock::starting_at(T0)),
            Default::default(),
        );
        let stop = CancellationToken::new();
        tokio::spawn(sandboxes.run(objects.clone(), stop.clone()));
        tokio::spawn(controller.run(stop.clone()));
        settle().await;
        let expired = |id: &str| {
            objects
                .last_sandbox_status(id)
                .is_some_and(|s| s.phase == Phase::Terminating && s.reason.as_deref() == Some("Expired"))
        };
        assert!(expired("due-while-down"), "{:?}", objects.writes());
        assert!(!expired("running") && !objects.removed("never-bound"));

        tokio::time::advance(Duration::from_secs(29)).await;
        settle().await;
        assert!(!objects.removed("never-bound"), "not before its time");
        tokio::time::advance(Duration::from_secs(2)).await;
        settle().await;
        assert!(objects.removed("never-bound"), "a never-bound sandbox is removed outright");

        tokio::time::advance(Duration::from_secs(15)).await;
        settle().await;
        assert!(expired("failed"), "a Failed sandbox still expires: {:?}", objects.writes());
        assert!(!expired("running"));
        tokio::time::advance(Duration::from_secs(15)).await;
        settle().await;
        assert!(expired("running"), "{:?}", objects.writes());
        stop.cancel();
    }

    #[tokio::test]
    async fn deleted_sandboxes_keep_no_expiry_timer() {
        tokio::time::pause();
        let now = parse_rfc3339("2026-05-15T04:30:00Z").unwrap();
        let queue = WorkQueue::new();
        let sandboxes: Vec<Arc<Sandbox>> = (0..100)
            .map(|i| {
                Arc::new(Sandbox { id: format!("s-{i}"), ..sandbox(Phase::Running, Some("2026-05-16T04:30:00Z")) })
            })
            .collect();
        for s in &sandboxes {
            schedule_expiry(&queue, &Change::Upsert { old: None, new: s }, now);
        }
        assert_eq!(queue.delayed_len(), 100, "one timer per sandbox with a TTL");
        for s in &sandboxes {
            schedule_expiry(&queue, &Change::Delete(s), now);
        }
        assert_eq!(queue.delayed_len(), 0, "a day-long TTL must not hold a deleted sandbox's key");
        tokio::time::advance(Duration::from_secs(86_401)).await;
        assert!(queue.is_empty(), "a cancelled timer never fires");
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
