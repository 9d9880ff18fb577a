//! Leader election over a `Lease` object: acquire, renew, step down past the renew deadline, take over expired leases.

use crate::clock::rfc3339_now;
use crate::objects::{ObjectError, ObjectResult};
use sandboxd_api::Lease;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use sandboxd_contracts::lease::LeaseClient;

/// Timing of an election.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseSettings {
    /// How long a lease holds without renewal before another candidate may take it.
    pub duration: Duration,
    /// A leader that has not renewed for this long stops acting.
    pub renew_deadline: Duration,
    /// How often candidates try and leaders renew (jittered).
    pub retry: Duration,
}

impl Default for LeaseSettings {
    fn default() -> Self {
        LeaseSettings {
            duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry: Duration::from_secs(2),
        }
    }
}

impl LeaseSettings {
    /// `duration > renew_deadline > 1.2 × retry`, so a leader always steps down before anyone may take over.
    pub fn validate(&self) -> Result<(), String> {
        let max = sandboxd_api::lease::MAX_LEASE_SECONDS;
        if self.duration > std::time::Duration::from_secs(max) {
            return Err(format!("lease duration {:?} is more than the server allows ({max} s)", self.duration));
        }
        if self.duration <= self.renew_deadline {
            return Err(format!(
                "lease duration {:?} must exceed the renew deadline {:?}",
                self.duration, self.renew_deadline
            ));
        }
        if self.renew_deadline.as_secs_f64() <= 1.2 * self.retry.as_secs_f64() {
            return Err(format!("renew deadline {:?} must exceed 1.2 × retry {:?}", self.renew_deadline, self.retry));
        }
        Ok(())
    }
}

/// What a candidate does after reading the lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// No lease yet: create it, holding it.
    Create,
    /// We hold it: renew.
    Renew,
    /// Released, or unchanged for a whole lease duration by the local clock: take it.
    TakeOver,
    /// Someone else holds a live lease.
    Follow,
}

/// Decides the next step (pure). Expiry is judged from `seen_changed_at`, the local time this candidate
/// last saw the lease change, never from the timestamps in it: clocks of other hosts do not matter.
pub fn decide(observed: Option<&Lease>, me: &str, seen_changed_at: Instant, now: Instant) -> Step {
    let Some(lease) = observed else { return Step::Create };
    if lease.holder == me {
        return Step::Renew;
    }
    if lease.holder.is_empty() {
        return Step::TakeOver;
    }
    let duration = Duration::from_secs(lease.lease_duration_seconds.max(1));
    if now.saturating_duration_since(seen_changed_at) >= duration {
        Step::TakeOver
    } else {
        Step::Follow
    }
}

/// One candidate in one election; leadership is published on a `watch` channel.
pub struct Elector {
    name: String,
    identity: String,
    settings: LeaseSettings,
    client: Arc<dyn LeaseClient>,
    leading: watch::Sender<bool>,
}

/// `sandboxd_leader_election_master_status{lease}`.
fn report_leading(lease: &str, leading: bool) {
    crate::runtime::metrics::METRICS.leader.with_label_values(&[lease]).set(i64::from(leading));
}

/// Reports the lease as not led when the elector's run ends, however it ends (aborted included).
struct NotLeadingOnDrop(String);

impl Drop for NotLeadingOnDrop {
    fn drop(&mut self) {
        report_leading(&self.0, false);
    }
}

impl Elector {
    /// A candidate for lease `name`; the receiver says whether it leads right now.
    pub fn new(
        name: &str,
        identity: &str,
        settings: LeaseSettings,
        client: Arc<dyn LeaseClient>,
    ) -> (Elector, watch::Receiver<bool>) {
        let (leading, rx) = watch::channel(false);
        (Elector { name: name.into(), identity: identity.into(), settings, client, leading }, rx)
    }

    /// Campaigns, renews and steps down until `shutdown`; then releases the lease if held.
    pub async fn run(self, shutdown: CancellationToken) {
        self.report_leading(false);
        // An elector aborted with its process's other controllers must not read as leading.
        let _not_leading_after = NotLeadingOnDrop(self.name.clone());
        let mut seen: Option<(String, Instant)> = None;
        let mut last_renewed: Option<Instant> = None;
        loop {
            // Renewal counts from when the attempt started, not when its answer came back: a slow write
            // must not stretch leadership past the deadline the standbys are counting on.
            let started = Instant::now();
            if last_renewed.is_some_and(|at| started.saturating_duration_since(at) >= self.settings.renew_deadline) {
                // Past the deadline we no longer lead: say so before campaigning again from scratch.
                last_renewed = None;
                self.publish(false);
            }
            let left = match last_renewed {
                Some(at) => self.settings.renew_deadline.saturating_sub(started.saturating_duration_since(at)),
                None => self.settings.renew_deadline,
            };
            let held = match tokio::time::timeout(left, self.attempt(&mut seen)).await {
                Ok(held) => held,
                Err(_) => Err(ObjectError::Unavailable(format!("no answer within {left:?}"))),
            };
            let now = Instant::now();
            match held {
                Ok(true) => last_renewed = Some(started),
                Ok(false) => last_renewed = None,
                Err(e) => tracing::debug!(lease = %self.name, error = %e, "lease attempt failed"),
            }
            let deadline = last_renewed.map(|at| at + self.settings.renew_deadline).filter(|d| *d > now);
            self.publish(deadline.is_some());
            // A leader wakes up at its deadline at the latest, so it never leads past it while pausing.
            let mut pause = self.settings.retry.mul_f64(0.9 + fastrand::f64() * 0.2);
            if let Some(deadline) = deadline {
                pause = pause.min(deadline.saturating_duration_since(now));
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(pause) => {}
            }
        }
        self.leading.send_replace(false);
        self.report_leading(false);
        // Bounded: a shutdown must not hang on a server that does not answer.
        match tokio::time::timeout(self.settings.renew_deadline, self.release()).await {
            Ok(Err(e)) => tracing::debug!(lease = %self.name, error = %e, "lease not released"),
            Err(_) => tracing::debug!(lease = %self.name, "lease not released: no answer"),
            Ok(Ok(())) => {}
        }
    }

    fn publish(&self, leading: bool) {
        if *self.leading.borrow() != leading {
            tracing::info!(lease = %self.name, identity = %self.identity, leading, "leadership changed");
            self.leading.send_replace(leading);
            self.report_leading(leading);
        }
    }

    fn report_leading(&self, leading: bool) {
        report_leading(&self.name, leading);
    }

    /// Reads the lease and acts on it; returns whether we hold it afterwards.
    async fn attempt(&self, seen: &mut Option<(String, Instant)>) -> ObjectResult<bool> {
        let observed = self.client.get_lease(&self.name).await?;
        let now = Instant::now();
        if let Some(lease) = &observed {
            if seen.as_ref().is_none_or(|(rv, _)| *rv != lease.resource_version) {
                *seen = Some((lease.resource_version.clone(), now));
            }
        }
        let seen_at = seen.as_ref().map(|(_, at)| *at).unwrap_or(now);
        let at = rfc3339_now();
        let written = match (decide(observed.as_ref(), &self.identity, seen_at, now), observed) {
            (Step::Create, _) => {
                let lease = Lease {
                    name: self.name.clone(),
                    holder: self.identity.clone(),
                    lease_duration_seconds: self.settings.duration.as_secs().max(1),
                    acquired_at: Some(at.clone()),
                    renewed_at: Some(at),
                    transitions: 0,
                    resource_version: String::new(),
                };
                self.client.create_lease(&lease).await
            }
            (Step::Renew, Some(lease)) => self.client.update_lease(&Lease { renewed_at: Some(at), ..lease }).await,
            (Step::TakeOver, Some(lease)) => {
                let taken = Lease {
                    holder: self.identity.clone(),
                    lease_duration_seconds: self.settings.duration.as_secs().max(1),
                    acquired_at: Some(at.clone()),
                    renewed_at: Some(at),
                    transitions: lease.transitions + 1,
                    ..lease
                };
                self.client.update_lease(&taken).await
            }
            _ => return Ok(false),
        };
        match written {
            Ok(lease) => {
                *seen = Some((lease.resource_version.clone(), Instant::now()));
                Ok(true)
            }
            // Another candidate wrote first: it leads, we follow.
            Err(ObjectError::Conflict(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the lease up so a standby takes over at once instead of after a whole duration.
    async fn release(&self) -> ObjectResult<()> {
        let Some(lease) = self.client.get_lease(&self.name).await? else { return Ok(()) };
        if lease.holder != self.identity {
            return Ok(());
        }
        self.client.update_lease(&Lease { holder: String::new(), ..lease }).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use parking_lot::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// An in-memory lease store with CAS and a switch that makes every call fail.
    #[derive(Default)]
    struct FakeLeases {
        lease: Mutex<Option<Lease>>,
        revision: Mutex<u64>,
        down: AtomicBool,
        /// Yield after every read, so two candidates read the same version before either writes.
        interleave: AtomicBool,
        /// Every call hangs (a server that accepts the connection and never answers).
        hang: AtomicBool,
        conflicts: AtomicUsize,
    }

    impl FakeLeases {
        async fn hang_if_asked(&self) {
            if self.hang.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
        }

        fn check_up(&self) -> ObjectResult<()> {
            if self.down.load(Ordering::SeqCst) {
                Err(ObjectError::Unavailable("down".into()))
            } else {
                Ok(())
            }
        }

        fn stamp(&self, mut lease: Lease) -> Lease {
            let mut rev = self.revision.lock();
            *rev += 1;
            lease.resource_version = rev.to_string();
            lease
        }

        fn current(&self) -> Option<Lease> {
            self.lease.lock().clone()
        }
    }

    #[async_trait]
    impl LeaseClient for FakeLeases {
        async fn get_lease(&self, _: &str) -> ObjectResult<Option<Lease>> {
            self.hang_if_asked().await;
            self.check_up()?;
            let current = self.current();
            if self.interleave.load(Ordering::SeqCst) {
                tokio::task::yield_now().await;
            }
            Ok(current)
        }
        async fn create_lease(&self, lease: &Lease) -> ObjectResult<Lease> {
            self.check_up()?;
            let mut slot = self.lease.lock();
            if slot.is_some() {
                self.conflicts.fetch_add(1, Ordering::SeqCst);
                return Err(ObjectError::Conflict("exists".into()));
            }
            let stored = self.stamp(lease.clone());
            *slot = Some(stored.clone());
            Ok(stored)
        }
        async fn update_lease(&self, lease: &Lease) -> ObjectResult<Lease> {
            self.check_up()?;
            let mut slot = self.lease.lock();
            match slot.as_ref() {
                Some(cur) if cur.resource_version == lease.resource_version => {
                    let stored = self.stamp(lease.clone());
                    *slot = Some(stored.clone());
                    Ok(stored)
                }
                Some(_) => {
                    self.conflicts.fetch_add(1, Ordering::SeqCst);
                    Err(ObjectError::Conflict("stale".into()))
                }
                None => Err(ObjectError::NotFound("gone".into())),
            }
        }
    }

    fn start(
        client: &Arc<FakeLeases>,
        who: &str,
    ) -> (watch::Receiver<bool>, CancellationToken, tokio::task::JoinHandle<()>) {
        let (elector, leading) =
            Elector::new("sandboxd-controller-test", who, LeaseSettings::default(), client.clone());
        let stop = CancellationToken::new();
        let task = tokio::spawn(elector.run(stop.clone()));
        (leading, stop, task)
    }

    async fn settle(secs: u64) {
        for _ in 0..secs * 10 {
            tokio::time::advance(Duration::from_millis(100)).await;
            tokio::task::yield_now().await;
        }
    }

    #[test]
    fn settings_need_duration_over_deadline_over_retry() {
        assert!(LeaseSettings::default().validate().is_ok());
        let s = |d, r, t| LeaseSettings {
            duration: Duration::from_secs(d),
            renew_deadline: Duration::from_secs(r),
            retry: Duration::from_secs(t),
        };
        assert!(s(10, 10, 2).validate().is_err());
        assert!(s(15, 2, 2).validate().is_err());
    }

    #[test]
    fn decisions_follow_holder_and_local_expiry() {
        let t0 = Instant::now();
        let held = |holder: &str| Lease { holder: holder.into(), lease_duration_seconds: 15, ..Lease::default() };
        assert_eq!(decide(None, "a", t0, t0), Step::Create);
        assert_eq!(decide(Some(&held("a")), "a", t0, t0), Step::Renew);
        assert_eq!(decide(Some(&held("")), "a", t0, t0), Step::TakeOver);
        assert_eq!(decide(Some(&held("b")), "a", t0, t0 + Duration::from_secs(14)), Step::Follow);
        assert_eq!(decide(Some(&held("b")), "a", t0, t0 + Duration::from_secs(15)), Step::TakeOver);
    }

    #[tokio::test(start_paused = true)]
    async fn acquires_a_missing_lease_and_keeps_renewing_it() {
        let leases = Arc::new(FakeLeases::default());
        let (leading, stop, task) = start(&leases, "a");
        settle(1).await;
        assert!(*leading.borrow());
        let first = leases.current().unwrap();
        assert_eq!((first.holder.as_str(), first.transitions), ("a", 0));
        settle(10).await;
        let later = leases.current().unwrap();
        assert!(
            later.resource_version.parse::<u64>().unwrap() > first.resource_version.parse::<u64>().unwrap(),
            "renewed"
        );
        assert!(*leading.borrow());
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn leader_status_is_exported_while_leading_and_cleared_on_release() {
        let status =
            || crate::runtime::metrics::METRICS.leader.with_label_values(&["sandboxd-controller-metrics-test"]).get();
        let leases = Arc::new(FakeLeases::default());
        let (elector, leading) =
            Elector::new("sandboxd-controller-metrics-test", "a", LeaseSettings::default(), leases.clone());
        let stop = CancellationToken::new();
        let task = tokio::spawn(elector.run(stop.clone()));
        settle(1).await;
        assert!(*leading.borrow());
        assert_eq!(status(), 1);
        stop.cancel();
        task.await.unwrap();
        assert_eq!(status(), 0, "a released lease reads 0");
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_that_cannot_renew_steps_down_at_the_deadline() {
        let leases = Arc::new(FakeLeases::default());
        let (leading, stop, task) = start(&leases, "a");
        settle(1).await;
        assert!(*leading.borrow());
        leases.down.store(true, Ordering::SeqCst);
        settle(8).await;
        assert!(*leading.borrow(), "still within the renew deadline");
        settle(2).await;
        assert!(!*leading.borrow(), "stopped acting at the 10 s renew deadline, not at the next retry after it");
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_standby_takes_over_an_expired_lease() {
        let leases = Arc::new(FakeLeases::default());
        leases
            .create_lease(&Lease {
                name: "l".into(),
                holder: "dead".into(),
                lease_duration_seconds: 15,
                ..Lease::default()
            })
            .await
            .unwrap();
        let (leading, stop, task) = start(&leases, "b");
        settle(10).await;
        assert!(!*leading.borrow(), "the lease is still live by our clock");
        settle(8).await;
        assert!(*leading.borrow(), "taken over once unchanged for a whole duration");
        let taken = leases.current().unwrap();
        assert_eq!((taken.holder.as_str(), taken.transitions), ("b", 1));
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn two_candidates_never_lead_at_once() {
        let leases = Arc::new(FakeLeases::default());
        let (a, stop_a, task_a) = start(&leases, "a");
        let (b, stop_b, task_b) = start(&leases, "b");
        for _ in 0..300 {
            settle(0).await;
            tokio::time::advance(Duration::from_millis(100)).await;
            tokio::task::yield_now().await;
            assert!(!(*a.borrow() && *b.borrow()), "both lead");
        }
        assert!(*a.borrow() ^ *b.borrow(), "exactly one leads");
        stop_a.cancel();
        stop_b.cancel();
        task_a.await.unwrap();
        task_b.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_releases_so_the_standby_takes_over_at_once() {
        let leases = Arc::new(FakeLeases::default());
        let (a, stop_a, task_a) = start(&leases, "a");
        settle(1).await;
        let (b, stop_b, task_b) = start(&leases, "b");
        settle(3).await;
        assert!(*a.borrow() && !*b.borrow());
        stop_a.cancel();
        task_a.await.unwrap();
        assert_eq!(leases.current().unwrap().holder, "", "released");
        settle(3).await;
        assert!(*b.borrow(), "took over within a retry, not a whole lease duration");
        assert_eq!(leases.current().unwrap().transitions, 1);
        stop_b.cancel();
        task_b.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn two_candidates_racing_for_a_free_lease_get_one_409_and_one_leader() {
        let leases = Arc::new(FakeLeases::default());
        // Both read before either writes.
        leases.interleave.store(true, Ordering::SeqCst);
        let candidate = |who: &str| Elector::new("l", who, LeaseSettings::default(), leases.clone()).0;
        let (a, b) = (candidate("a"), candidate("b"));
        let (mut seen_a, mut seen_b) = (None, None);

        // Missing lease: both create, one gets the 409.
        let (won_a, won_b) = tokio::join!(a.attempt(&mut seen_a), b.attempt(&mut seen_b));
        assert!(won_a.unwrap() ^ won_b.unwrap(), "exactly one created the lease");
        assert_eq!(leases.conflicts.load(Ordering::SeqCst), 1);

        // Released lease: both take it over, one gets the 409, one transition is recorded.
        let holder = leases.current().unwrap().holder;
        let released = Lease { holder: String::new(), ..leases.current().unwrap() };
        leases.update_lease(&released).await.unwrap();
        let (won_a, won_b) = tokio::join!(a.attempt(&mut seen_a), b.attempt(&mut seen_b));
        assert!(won_a.as_ref().unwrap() ^ won_b.as_ref().unwrap(), "exactly one took the released lease");
        assert_eq!(leases.conflicts.load(Ordering::SeqCst), 2);
        let taken = leases.current().unwrap();
        assert_eq!(taken.transitions, 1, "one change of holder, not two");
        assert_eq!(taken.holder, if *won_a.as_ref().unwrap() { "a" } else { "b" });
        assert!(!holder.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_whose_renewals_hang_steps_down_at_the_deadline() {
        let leases = Arc::new(FakeLeases::default());
        let (leading, stop, task) = start(&leases, "a");
        settle(1).await;
        assert!(*leading.borrow());
        leases.hang.store(true, Ordering::SeqCst);
        settle(8).await;
        assert!(*leading.borrow(), "still within the renew deadline");
        settle(4).await;
        assert!(!*leading.borrow(), "a renewal that never answers must not keep it leading past 10 s");
        leases.hang.store(false, Ordering::SeqCst);
        // Answers take a scheduling round trip, as over a network, so a zero time budget would time out.
        leases.interleave.store(true, Ordering::SeqCst);
        // The attempt hanging right now gives up after a renew deadline; the next one succeeds.
        settle(13).await;
        assert!(*leading.borrow(), "once the store answers again, the candidate campaigns and leads again");
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(30), task).await.expect("shutdown is bounded").unwrap();
    }
}
