//! `Controller`: the harness every controller runs in. Watched informers map changes to keys on one
//! work queue; once they have synced, workers reconcile the keys and the queue retries each error by
//! its kind.

use crate::runtime::informer::{Change, Informer, Object};
use crate::runtime::queue::{run_until_shutdown, QueueKey, Reconciled, WorkQueue};
use futures::future::BoxFuture;
use parking_lot::Mutex;
use std::fmt;
use std::future::Future;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

type SyncWait = Box<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>;

/// One controller's queue, its watches and its worker count.
pub struct Controller<K: QueueKey> {
    name: &'static str,
    queue: WorkQueue<K>,
    workers: usize,
    sources: Mutex<Vec<SyncWait>>,
}

impl<K: QueueKey + fmt::Debug> Controller<K> {
    /// A controller named `name` (for logs) with `workers` concurrent reconciles (at least one).
    pub fn new(name: &'static str, workers: usize) -> Controller<K> {
        Controller { name, queue: WorkQueue::named(name), workers: workers.max(1), sources: Mutex::new(Vec::new()) }
    }

    /// The queue the watches feed, for keys that come from elsewhere (a probe to schedule, a timer).
    pub fn queue(&self) -> &WorkQueue<K> {
        &self.queue
    }

    /// Queues the keys `keys_of` maps each change of `informer` to. Workers start only after every
    /// watched informer has synced, so a reconcile never judges from a half-filled cache.
    pub fn watches<T, I>(&self, informer: &Informer<T>, keys_of: impl Fn(&Change<'_, T>) -> I + Send + Sync + 'static)
    where
        T: Object,
        I: IntoIterator<Item = K>,
    {
        let queue = self.queue.clone();
        self.watches_with(informer, move |change, _| {
            for key in keys_of(change) {
                queue.add(key);
            }
        });
    }

    /// Like `watches`, for a controller that decides how a change reaches its queue (a timer, a cache
    /// that must be updated first).
    pub fn watches_with<T: Object>(
        &self,
        informer: &Informer<T>,
        on_change: impl Fn(&Change<'_, T>, &WorkQueue<K>) + Send + Sync + 'static,
    ) {
        let queue = self.queue.clone();
        informer.subscribe(move |change| on_change(change, &queue));
        let informer = informer.clone();
        self.sources.lock().push(Box::new(move || {
            let informer = informer.clone();
            Box::pin(async move { informer.wait_synced().await })
        }));
    }

    /// Waits until every watched informer has applied its first list.
    pub async fn wait_synced(&self) {
        let waits: Vec<_> = self.sources.lock().iter().map(|wait| wait()).collect();
        futures::future::join_all(waits).await;
    }

    /// Waits for the watches to sync, then reconciles keys until `shutdown`.
    pub async fn run<F, Fut>(&self, shutdown: CancellationToken, reconcile: F)
    where
        F: Fn(K) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = Reconciled> + Send + 'static,
    {
        self.wait_synced().await;
        self.queue.activate();
        tracing::debug!(controller = self.name, workers = self.workers, "controller started");
        run_until_shutdown(self.queue.clone(), self.workers, shutdown, reconcile).await;
    }
}

/// Runs `tick` every `period` (the first after one period) until `shutdown`: a controller's periodic
/// pass beside its queue, such as a resync with the agents. A slow tick delays the next, never overlaps it.
pub fn every<F, Fut>(period: Duration, shutdown: CancellationToken, tick: F) -> tokio::task::JoinHandle<()>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            tick().await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::error::ControllerError;
    use crate::runtime::informer::Informer;
    use crate::runtime::queue::Outcome;
    use crate::testing::FakeObjects;
    use sandboxd_api::Sandbox;
    use std::sync::Arc;

    fn sandbox(id: &str, rv: &str) -> Sandbox {
        serde_json::from_value(serde_json::json!({
            "id": id, "created_at": "", "updated_at": "", "resource_version": rv,
            "spec": {"containers": []}, "status": {"phase": "Pending"}
        }))
        .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn workers_wait_for_the_watches_then_reconcile_mapped_keys_and_retry_errors() {
        let objects = Arc::new(FakeObjects::new(vec![], vec![]));
        objects.queue_list(vec![sandbox("a", "1"), sandbox("b", "2")], 2);
        let informer: Informer<Sandbox> = Informer::new();
        let controller = Arc::new(Controller::<String>::new("test", 2));
        controller.watches(&informer, |change| match change {
            Change::Upsert { new, .. } => Some(format!("key-{}", new.id)),
            Change::Delete(_) => None,
        });
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let run = tokio::spawn({
            let (controller, seen, stop) = (controller.clone(), seen.clone(), stop.clone());
            async move {
                controller
                    .run(stop, move |key: String| {
                        let seen = seen.clone();
                        async move {
                            let first = !seen.lock().contains(&key);
                            seen.lock().push(key.clone());
                            if key == "key-b" && first {
                                return Err(ControllerError::Transient("agent down".into()));
                            }
                            Ok(Outcome::Done)
                        }
                    })
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(seen.lock().is_empty(), "no reconcile before the informer synced");

        let informer_task = tokio::spawn({
            let (informer, objects, stop) = (informer.clone(), objects.clone(), stop.clone());
            async move { informer.run(objects as Arc<dyn crate::ObjectClient>, stop).await }
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        let mut keys = seen.lock().clone();
        keys.sort();
        assert_eq!(keys, ["key-a", "key-b", "key-b"], "each mapped key ran; the failed one was retried");

        stop.cancel();
        run.await.unwrap();
        informer_task.await.unwrap();
    }
}
