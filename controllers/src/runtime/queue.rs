//! Controller work queue: deduplicated keys, one worker per key, delayed and rate-limited re-adds.

use crate::runtime::error::ControllerError;
use crate::runtime::metrics::{Metrics, Sampled, METRICS};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures::FutureExt;
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Bounds every work queue key satisfies (controllers use `kind/name` strings).
pub trait QueueKey: Clone + Eq + Hash + Send + Sync + 'static {}

impl<T: Clone + Eq + Hash + Send + Sync + 'static> QueueKey for T {}

/// Retry pacing for `add_rate_limited`: per-key exponential backoff and a global token bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Per-key delay of the first retry; doubles with each consecutive failure.
    pub base_delay: Duration,
    /// Ceiling for the per-key delay.
    pub max_delay: Duration,
    /// Global refill rate in keys per second; 0 disables the global bucket.
    pub per_second: f64,
    /// Global bucket size: how many retries may go out back to back.
    pub burst: u32,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self {
            base_delay: Duration::from_millis(5),
            max_delay: Duration::from_secs(5 * 60),
            per_second: 50.0,
            burst: 500,
        }
    }
}

impl RateLimit {
    /// Per-key delay for a key that has already failed `failures` times.
    fn backoff_after(&self, failures: u32) -> Duration {
        1u32.checked_shl(failures)
            .and_then(|factor| self.base_delay.checked_mul(factor))
            .map_or(self.max_delay, |delay| delay.min(self.max_delay))
    }
}

/// Conflicts in a row retried after the base delay before they back off like other failures.
const CONFLICT_RETRIES_AT_BASE_DELAY: u32 = 3;

/// What a successful reconcile asks the queue to do with its key next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Converged: forget the key's failures and wait for the next change.
    Done,
    /// Converged for now: forget the key's failures and run again after the delay.
    Requeue(Duration),
}

/// What one reconcile returns: an `Outcome`, or an error the queue retries as its kind asks
/// (see `record_outcome`).
pub type Reconciled = Result<Outcome, ControllerError>;

/// A cheaply cloneable handle to one controller's work queue.
pub struct WorkQueue<K: QueueKey> {
    inner: Arc<Inner<K>>,
}

/// A key handed to one worker; dropping it marks the key done.
pub struct QueueItem<K: QueueKey> {
    key: K,
    queue: WorkQueue<K>,
}

struct Inner<K> {
    state: Mutex<State<K>>,
    /// Wakes workers parked in `next`.
    ready_wakeup: Notify,
    /// Wakes the delay pump when an earlier deadline arrives or the queue goes away.
    delay_wakeup: Arc<Notify>,
    rate_limit: RateLimit,
    /// The controller's series; `None` for an unnamed queue (tests, helpers), which reports nothing.
    series: Option<QueueSeries>,
}

/// A named queue's metric series, resolved once so the hot path does no label lookups.
struct QueueSeries {
    name: &'static str,
    adds: prometheus::IntCounter,
    retries: prometheus::IntCounter,
    queue_duration: prometheus::Histogram,
    work_duration: prometheus::Histogram,
    reconcile_time: prometheus::Histogram,
    succeeded: prometheus::IntCounter,
    requeued: prometheus::IntCounter,
    failed: prometheus::IntCounter,
}

impl QueueSeries {
    fn of(name: &'static str) -> QueueSeries {
        let m = &*METRICS;
        let result = |r: &str| m.reconcile_total.with_label_values(&[name, r]);
        QueueSeries {
            name,
            adds: m.workqueue_adds.with_label_values(&[name]),
            retries: m.workqueue_retries.with_label_values(&[name]),
            queue_duration: m.workqueue_queue_duration.with_label_values(&[name]),
            work_duration: m.workqueue_work_duration.with_label_values(&[name]),
            reconcile_time: m.reconcile_time.with_label_values(&[name]),
            succeeded: result("success"),
            requeued: result("requeue_after"),
            failed: result("error"),
        }
    }
}

struct State<K> {
    /// Keys in FIFO order, each with when it became ready (for the queue-wait histogram).
    ready: VecDeque<(K, Instant)>,
    /// Keys owed a run: those in `ready` plus those re-added while processing.
    dirty: HashSet<K>,
    /// Keys a worker holds, each with when it was taken.
    processing: HashMap<K, Instant>,
    delayed: DelaySet<K>,
    failures: HashMap<K, u32>,
    bucket: TokenBucket,
    shut_down: bool,
    pump_running: bool,
    /// Workers drain the queue. A standby's queue fills from its informers but reports nothing
    /// until it leads, so its idle keys do not read as a backlog.
    active: bool,
}

/// Per-key timers that only ever move earlier, ordered by deadline.
struct DelaySet<K> {
    /// The sequence number keeps slots unique and equal deadlines in FIFO order.
    by_deadline: BTreeMap<(Instant, u64), K>,
    slot_of: HashMap<K, (Instant, u64)>,
    next_seq: u64,
}

/// Global retry budget, refilled continuously like a `golang.org/x/time/rate` limiter.
struct TokenBucket {
    tokens: f64,
    capacity: f64,
    per_second: f64,
    refilled_at: Instant,
}

/// What the delay pump does after promoting due keys.
enum PumpStep {
    /// The queue was shut down or dropped.
    Stop,
    /// No timers pending: park until one is scheduled.
    Idle,
    /// Park until the earliest timer is due or an earlier one is scheduled.
    SleepUntil(Instant),
}

// === impl WorkQueue ===

impl<K: QueueKey> WorkQueue<K> {
    /// Creates a queue with the default retry pacing.
    pub fn new() -> Self {
        Self::with_rate_limit(RateLimit::default())
    }

    /// Creates a queue with the default retry pacing that reports its depth, adds, retries, waits and
    /// reconciles under `name` on `/metrics`.
    pub fn named(name: &'static str) -> Self {
        let queue = Self::build(RateLimit::default(), Some(QueueSeries::of(name)));
        crate::runtime::metrics::sample_while_alive(&queue.inner);
        queue
    }

    /// Creates a queue with custom retry pacing.
    pub fn with_rate_limit(rate_limit: RateLimit) -> Self {
        Self::build(rate_limit, None)
    }

    fn build(rate_limit: RateLimit, series: Option<QueueSeries>) -> Self {
        let state = State {
            ready: VecDeque::new(),
            dirty: HashSet::new(),
            processing: HashMap::new(),
            delayed: DelaySet::new(),
            failures: HashMap::new(),
            bucket: TokenBucket::new(&rate_limit, Instant::now()),
            shut_down: false,
            pump_running: false,
            active: false,
        };
        let inner = Inner {
            state: Mutex::new(state),
            ready_wakeup: Notify::new(),
            delay_wakeup: Arc::new(Notify::new()),
            rate_limit,
            series,
        };
        Self { inner: Arc::new(inner) }
    }

    /// Queues `key` unless it is already waiting; a key being processed runs once more after it is done.
    pub fn add(&self, key: K) {
        let (became_ready, active) = {
            let mut state = self.inner.state.lock();
            (state.mark_dirty(key), state.active)
        };
        if let Some(series) = self.inner.series.as_ref().filter(|_| active) {
            series.adds.inc();
        }
        if became_ready {
            self.inner.ready_wakeup.notify_one();
        }
    }

    /// Adds `key` after `delay`; a key keeps only its earliest pending timer. Needs a tokio runtime.
    pub fn add_after(&self, key: K, delay: Duration) {
        if delay.is_zero() {
            return self.add(key);
        }
        // A deadline past the end of representable time would never fire anyway.
        let Some(deadline) = Instant::now().checked_add(delay) else {
            return;
        };
        let (moved_earliest, start_pump) = {
            let mut state = self.inner.state.lock();
            if state.shut_down {
                return;
            }
            let moved_earliest = state.delayed.schedule(key, deadline);
            let start_pump = !std::mem::replace(&mut state.pump_running, true);
            (moved_earliest, start_pump)
        };
        if start_pump {
            tokio::spawn(pump_delayed(Arc::downgrade(&self.inner), Arc::clone(&self.inner.delay_wakeup)));
        } else if moved_earliest {
            self.inner.delay_wakeup.notify_one();
        }
    }

    /// Records a failure of `key` and adds it after its backoff or the global budget, whichever is later.
    pub fn add_rate_limited(&self, key: K) {
        self.count_retry();
        let delay = {
            let mut state = self.inner.state.lock();
            let now = Instant::now();
            let failures = state.failures.entry(key.clone()).or_insert(0);
            let per_key = self.inner.rate_limit.backoff_after(*failures);
            *failures = failures.saturating_add(1);
            per_key.max(state.bucket.reserve(now))
        };
        self.add_after(key, delay);
    }

    fn count_retry(&self) {
        if let Some(series) = &self.inner.series {
            series.retries.inc();
        }
    }

    /// Marks the queue as drained by workers from now on: its series report, and keys that waited
    /// before (on a standby) count their wait from now.
    pub fn activate(&self) {
        let mut state = self.inner.state.lock();
        state.active = true;
        let now = Instant::now();
        state.ready.iter_mut().for_each(|(_, since)| *since = now);
    }

    fn count_failure(&self, key: &K) {
        let mut state = self.inner.state.lock();
        let failures = state.failures.entry(key.clone()).or_insert(0);
        *failures = failures.saturating_add(1);
    }

    /// Resets the failure count of `key`, so its next backoff starts at the base delay.
    pub fn forget(&self, key: &K) {
        self.inner.state.lock().failures.remove(key);
    }

    /// Drops `key`'s pending timer and failure count, for a key whose object is gone: a timer set for
    /// a deleted object would otherwise hold its key until it fires, which for a TTL can be a day.
    pub fn cancel(&self, key: &K) {
        let mut state = self.inner.state.lock();
        state.delayed.cancel(key);
        state.failures.remove(key);
    }

    /// Number of keys waiting on a timer.
    pub fn delayed_len(&self) -> usize {
        self.inner.state.lock().delayed.slot_of.len()
    }

    /// Entries of each per-key structure: waiting, processing, timers and failure counts.
    pub fn footprint(&self) -> [(&'static str, usize); 4] {
        let state = self.inner.state.lock();
        [
            ("queue_waiting", state.dirty.len()),
            ("queue_processing", state.processing.len()),
            ("queue_timers", state.delayed.slot_of.len()),
            ("queue_failures", state.failures.len()),
        ]
    }

    /// Number of times `key` went through `add_rate_limited` since it was last forgotten.
    pub fn failures(&self, key: &K) -> u32 {
        self.inner.state.lock().failures.get(key).copied().unwrap_or(0)
    }

    /// Waits for the next ready key in FIFO order; `None` once the queue is shut down.
    pub async fn next(&self) -> Option<QueueItem<K>> {
        loop {
            let wakeup = self.inner.ready_wakeup.notified();
            tokio::pin!(wakeup);
            // Registered before the check, so a key or shutdown arriving in between still wakes us.
            wakeup.as_mut().enable();
            {
                let mut state = self.inner.state.lock();
                if state.shut_down {
                    return None;
                }
                if let Some((key, waited)) = state.take_ready() {
                    if let Some(series) = &self.inner.series {
                        series.queue_duration.observe(waited.as_secs_f64());
                    }
                    let queue = self.clone();
                    return Some(QueueItem { key, queue });
                }
            }
            wakeup.await;
        }
    }

    /// Drops all pending keys and timers, and makes every current and future `next` return `None`.
    pub fn shut_down(&self) {
        self.inner.state.lock().shut_down();
        self.inner.ready_wakeup.notify_waiters();
        self.inner.delay_wakeup.notify_one();
    }

    /// Whether workers drain this queue (see `activate`).
    pub fn is_active(&self) -> bool {
        self.inner.state.lock().active
    }

    /// Whether `shut_down` has been called.
    pub fn is_shut_down(&self) -> bool {
        self.inner.state.lock().shut_down
    }

    /// Number of keys ready to be handed out (delayed keys not included).
    pub fn len(&self) -> usize {
        self.inner.state.lock().ready.len()
    }

    /// Whether no key is ready to be handed out.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn done(&self, key: &K) {
        let (held, requeued) = self.inner.state.lock().finish(key);
        if let (Some(series), Some(held)) = (&self.inner.series, held) {
            series.work_duration.observe(held.as_secs_f64());
        }
        if requeued {
            self.inner.ready_wakeup.notify_one();
        }
    }

    /// Counts one reconcile of `took` by its result.
    fn observe_reconcile(&self, outcome: &Reconciled, took: Duration) {
        let Some(series) = &self.inner.series else { return };
        series.reconcile_time.observe(took.as_secs_f64());
        match outcome {
            Ok(Outcome::Done) => series.succeeded.inc(),
            Ok(Outcome::Requeue(_)) => series.requeued.inc(),
            Err(_) => series.failed.inc(),
        }
    }

    fn record_outcome(&self, key: K, outcome: Reconciled)
    where
        K: fmt::Debug,
    {
        match outcome {
            Ok(Outcome::Done) => self.forget(&key),
            Ok(Outcome::Requeue(after)) => {
                self.forget(&key);
                self.add_after(key, after);
            }
            // A stale read: the newer version is usually in the cache within milliseconds, so the
            // first few conflicts retry after the base delay; a cache that stays stale backs off.
            Err(ControllerError::Conflict(error)) => {
                tracing::debug!(?key, %error, "reconcile hit a conflict, retrying");
                if self.failures(&key) < CONFLICT_RETRIES_AT_BASE_DELAY {
                    self.count_failure(&key);
                    self.count_retry();
                    let base = self.inner.rate_limit.base_delay;
                    self.add_after(key, base);
                } else {
                    self.add_rate_limited(key);
                }
            }
            Err(ControllerError::Transient(error)) => {
                tracing::debug!(?key, %error, failures = self.failures(&key), "reconcile failed, retrying with backoff");
                self.add_rate_limited(key);
            }
            // Retrying cannot help; the next change of the object queues it again.
            Err(ControllerError::Invalid(error)) => {
                tracing::warn!(?key, %error, "reconcile refused as invalid; not retried until the object changes");
                self.forget(&key);
            }
        }
    }
}

impl<K: QueueKey> Default for WorkQueue<K> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: QueueKey> Clone for WorkQueue<K> {
    fn clone(&self) -> Self {
        Self { inner: Arc::clone(&self.inner) }
    }
}

impl<K: QueueKey> fmt::Debug for WorkQueue<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.inner.state.lock();
        f.debug_struct("WorkQueue")
            .field("ready", &state.ready.len())
            .field("processing", &state.processing.len())
            .field("delayed", &state.delayed.slot_of.len())
            .field("shut_down", &state.shut_down)
            .finish_non_exhaustive()
    }
}

impl<K: QueueKey> Sampled for Inner<K> {
    fn sample(&self, metrics: &Metrics) {
        let Some(series) = &self.series else { return };
        let (depth, longest, unfinished) = {
            let state = self.state.lock();
            if !state.active {
                return;
            }
            let now = Instant::now();
            let running = state.processing.values().map(|since| now.saturating_duration_since(*since));
            let (longest, unfinished) =
                running.fold((Duration::ZERO, Duration::ZERO), |(longest, sum), d| (longest.max(d), sum + d));
            (state.ready.len(), longest, unfinished)
        };
        let name = [series.name];
        metrics.workqueue_depth.with_label_values(&name).add(crate::runtime::metrics::saturating_i64(depth));
        let longest_gauge = metrics.workqueue_longest_running.with_label_values(&name);
        longest_gauge.set(longest_gauge.get().max(longest.as_secs_f64()));
        metrics.workqueue_unfinished_work.with_label_values(&name).add(unfinished.as_secs_f64());
    }
}

impl<K> Drop for Inner<K> {
    fn drop(&mut self) {
        // The pump holds only a weak handle; wake it so it notices and exits.
        self.delay_wakeup.notify_one();
    }
}

// === impl QueueItem ===

impl<K: QueueKey> QueueItem<K> {
    /// The key this worker now exclusively owns.
    pub fn key(&self) -> &K {
        &self.key
    }
}

impl<K: QueueKey> Drop for QueueItem<K> {
    fn drop(&mut self) {
        self.queue.done(&self.key);
    }
}

impl<K: QueueKey + fmt::Debug> fmt::Debug for QueueItem<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueueItem").field("key", &self.key).finish_non_exhaustive()
    }
}

// === impl State ===

impl<K: QueueKey> State<K> {
    /// Returns true when `key` was appended to the ready list.
    fn mark_dirty(&mut self, key: K) -> bool {
        if self.shut_down || self.dirty.contains(&key) {
            return false;
        }
        self.dirty.insert(key.clone());
        if self.processing.contains_key(&key) {
            return false;
        }
        self.ready.push_back((key, Instant::now()));
        true
    }

    /// The next ready key and how long it waited.
    fn take_ready(&mut self) -> Option<(K, Duration)> {
        let (key, since) = self.ready.pop_front()?;
        self.dirty.remove(&key);
        let now = Instant::now();
        self.processing.insert(key.clone(), now);
        Some((key, now.saturating_duration_since(since)))
    }

    /// How long `key` was held, and whether it changed while processing and went back on the ready list.
    fn finish(&mut self, key: &K) -> (Option<Duration>, bool) {
        let held = self.processing.remove(key).map(|since| since.elapsed());
        if self.shut_down || !self.dirty.contains(key) {
            return (held, false);
        }
        self.ready.push_back((key.clone(), Instant::now()));
        (held, true)
    }

    fn shut_down(&mut self) {
        self.shut_down = true;
        self.ready.clear();
        self.dirty.clear();
        self.delayed.clear();
    }

    /// Moves due timers onto the ready list; returns how many keys became ready.
    fn promote_due(&mut self, now: Instant) -> usize {
        let due = self.delayed.pop_due(now);
        due.into_iter().filter(|key| self.mark_dirty(key.clone())).count()
    }
}

// === impl DelaySet ===

impl<K: QueueKey> DelaySet<K> {
    fn new() -> Self {
        Self { by_deadline: BTreeMap::new(), slot_of: HashMap::new(), next_seq: 0 }
    }

    /// Returns true when `at` became the earliest deadline overall, so the pump must re-arm.
    fn schedule(&mut self, key: K, at: Instant) -> bool {
        if let Some(&(pending, seq)) = self.slot_of.get(&key) {
            if pending <= at {
                return false;
            }
            self.by_deadline.remove(&(pending, seq));
        }
        let slot = (at, self.next_seq);
        self.next_seq += 1;
        self.by_deadline.insert(slot, key.clone());
        self.slot_of.insert(key, slot);
        self.earliest() == Some(at)
    }

    fn earliest(&self) -> Option<Instant> {
        self.by_deadline.keys().next().map(|&(at, _)| at)
    }

    fn pop_due(&mut self, now: Instant) -> Vec<K> {
        let mut due = Vec::new();
        while let Some(entry) = self.by_deadline.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let key = entry.remove();
            self.slot_of.remove(&key);
            due.push(key);
        }
        due
    }

    fn cancel(&mut self, key: &K) {
        if let Some(slot) = self.slot_of.remove(key) {
            self.by_deadline.remove(&slot);
        }
    }

    fn clear(&mut self) {
        self.by_deadline.clear();
        self.slot_of.clear();
    }
}

// === impl TokenBucket ===

impl TokenBucket {
    fn new(rate_limit: &RateLimit, now: Instant) -> Self {
        let capacity = f64::from(rate_limit.burst);
        Self { tokens: capacity, capacity, per_second: rate_limit.per_second, refilled_at: now }
    }

    /// Takes one token, going into debt if empty; returns how long until that token exists.
    fn reserve(&mut self, now: Instant) -> Duration {
        if self.per_second <= 0.0 {
            return Duration::ZERO;
        }
        let elapsed = now.saturating_duration_since(self.refilled_at);
        self.tokens = (self.tokens + elapsed.as_secs_f64() * self.per_second).min(self.capacity);
        self.refilled_at = now;
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.per_second)
        }
    }
}

// === delay pump ===

/// One task per queue turns due timers into `add`s, instead of one task per delayed key.
async fn pump_delayed<K: QueueKey>(queue: Weak<Inner<K>>, wakeup: Arc<Notify>) {
    loop {
        let rearmed = wakeup.notified();
        tokio::pin!(rearmed);
        rearmed.as_mut().enable();
        match promote_due(&queue) {
            PumpStep::Stop => return,
            PumpStep::Idle => rearmed.await,
            PumpStep::SleepUntil(deadline) => {
                tokio::select! {
                    () = tokio::time::sleep_until(deadline) => {}
                    () = rearmed => {}
                }
            }
        }
    }
}

fn promote_due<K: QueueKey>(queue: &Weak<Inner<K>>) -> PumpStep {
    let Some(inner) = queue.upgrade() else {
        return PumpStep::Stop;
    };
    let (promoted, step, active) = {
        let mut state = inner.state.lock();
        if state.shut_down {
            return PumpStep::Stop;
        }
        let promoted = state.promote_due(Instant::now());
        let step = state.delayed.earliest().map_or(PumpStep::Idle, PumpStep::SleepUntil);
        (promoted, step, state.active)
    };
    // A timer's key counts as an add, as client-go's AddAfter does.
    if let Some(series) = inner.series.as_ref().filter(|_| active) {
        series.adds.inc_by(promoted as u64);
    }
    for _ in 0..promoted {
        inner.ready_wakeup.notify_one();
    }
    step
}

// === workers ===

/// Runs `workers` reconcile tasks until `shutdown`, then shuts the queue down and waits for them:
/// the loop every controller runs.
pub async fn run_until_shutdown<K, F, Fut>(
    queue: WorkQueue<K>,
    workers: usize,
    shutdown: tokio_util::sync::CancellationToken,
    reconcile: F,
) where
    K: QueueKey + fmt::Debug,
    F: Fn(K) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Reconciled> + Send + 'static,
{
    let stop = queue.clone();
    tokio::spawn(async move {
        shutdown.cancelled().await;
        stop.shut_down();
    });
    run_workers(queue, workers, reconcile).await;
}

/// Runs `workers` tasks that reconcile keys until the queue is shut down, then waits for them.
pub async fn run_workers<K, F, Fut>(queue: WorkQueue<K>, workers: usize, reconcile: F)
where
    K: QueueKey + fmt::Debug,
    F: Fn(K) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Reconciled> + Send + 'static,
{
    let mut pool = JoinSet::new();
    for _ in 0..workers {
        pool.spawn(reconcile_keys(queue.clone(), reconcile.clone()));
    }
    while let Some(joined) = pool.join_next().await {
        if let Err(error) = joined {
            tracing::warn!(%error, "reconcile worker ended abnormally");
        }
    }
}

async fn reconcile_keys<K, F, Fut>(queue: WorkQueue<K>, reconcile: F)
where
    K: QueueKey + fmt::Debug,
    F: Fn(K) -> Fut,
    Fut: Future<Output = Reconciled>,
{
    while let Some(item) = queue.next().await {
        let key = item.key().clone();
        let started = Instant::now();
        let outcome = reconcile_catching_panics(&reconcile, key.clone()).await;
        queue.observe_reconcile(&outcome, started.elapsed());
        queue.record_outcome(key, outcome);
        drop(item);
    }
}

/// A panicking reconcile becomes a retried error instead of costing the pool a worker.
fn reconcile_catching_panics<K, F, Fut>(reconcile: &F, key: K) -> impl Future<Output = Reconciled>
where
    F: Fn(K) -> Fut,
    Fut: Future<Output = Reconciled>,
{
    let panicked = || Err(ControllerError::Transient("reconcile panicked".to_owned()));
    // Started outside the async block so the returned future does not borrow `reconcile`.
    let attempt = std::panic::catch_unwind(AssertUnwindSafe(|| reconcile(key)));
    async move {
        match attempt {
            Ok(attempt) => AssertUnwindSafe(attempt).catch_unwind().await.unwrap_or_else(|_| panicked()),
            Err(_) => panicked(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::sync::mpsc;
    use tokio::time::{advance, timeout};

    type Queue = WorkQueue<&'static str>;

    /// Lets spawned tasks (the delay pump, workers) run to their next await point.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    async fn next_key(queue: &Queue) -> (&'static str, QueueItem<&'static str>) {
        let item = timeout(Duration::from_secs(24 * 3600), queue.next())
            .await
            .expect("no key became ready")
            .expect("queue shut down");
        (*item.key(), item)
    }

    async fn stop_workers(queue: &Queue, workers: tokio::task::JoinHandle<()>) {
        queue.shut_down();
        timeout(Duration::from_secs(1), workers).await.expect("workers did not stop after shutdown").unwrap();
    }

    /// Waits (in paused time) for the next key and reports how long it took to become ready.
    async fn wait_for_ready(queue: &Queue) -> (Duration, &'static str) {
        let start = Instant::now();
        let (key, _item) = next_key(queue).await;
        (start.elapsed(), key)
    }

    async fn is_starved(queue: &Queue) -> bool {
        timeout(Duration::from_secs(3600), queue.next()).await.is_err()
    }

    #[tokio::test(start_paused = true)]
    async fn a_named_queue_reports_depth_adds_waits_work_and_results() {
        let name = "queue-metrics-test";
        let m = &*METRICS;
        let line = |family: &str, value: &str| format!("{family}{{name=\"{name}\"}} {value}\n");
        let queue: Queue = WorkQueue::named(name);
        queue.add("a");
        assert_eq!(m.workqueue_adds.with_label_values(&[name]).get(), 0, "a standby's queue counts nothing");
        assert!(!m.render().contains(&format!("sandboxd_workqueue_depth{{name=\"{name}\"}}")), "nor reports a depth");
        queue.activate();
        queue.add("b");
        queue.add("a");
        assert_eq!(m.workqueue_adds.with_label_values(&[name]).get(), 2, "every add counts, merged or not");
        assert!(m.render().contains(&line("sandboxd_workqueue_depth", "2")));

        advance(Duration::from_secs(2)).await;
        let (_, item) = next_key(&queue).await;
        assert_eq!(m.workqueue_queue_duration.with_label_values(&[name]).get_sample_sum(), 2.0, "waited 2 s");
        advance(Duration::from_secs(3)).await;
        let text = m.render();
        assert!(text.contains(&line("sandboxd_workqueue_depth", "1")), "{text}");
        assert!(text.contains(&line("sandboxd_workqueue_longest_running_processor_seconds", "3")), "{text}");
        drop(item);
        assert_eq!(m.workqueue_work_duration.with_label_values(&[name]).get_sample_sum(), 3.0, "held 3 s");

        queue.observe_reconcile(&Err(ControllerError::Transient("down".into())), Duration::from_millis(5));
        queue.observe_reconcile(&Ok(Outcome::Requeue(Duration::from_secs(1))), Duration::from_millis(5));
        queue.add_rate_limited("c");
        let result = |r: &str| m.reconcile_total.with_label_values(&[name, r]).get();
        assert_eq!((result("error"), result("requeue_after"), result("success")), (1, 1, 0));
        assert_eq!(m.workqueue_retries.with_label_values(&[name]).get(), 1);
        drop(queue);
        assert!(
            !m.render().contains(&format!("sandboxd_workqueue_depth{{name=\"{name}\"}}")),
            "a dropped queue leaves"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn add_dedups_waiting_key() {
        let queue = Queue::new();
        queue.add("sandboxes/a");
        queue.add("sandboxes/a");
        assert_eq!(queue.len(), 1);

        let (key, _item) = next_key(&queue).await;
        assert_eq!(key, "sandboxes/a");
        assert!(queue.is_empty());
        assert!(is_starved(&queue).await);
    }

    #[tokio::test(start_paused = true)]
    async fn key_added_during_processing_runs_once_more() {
        let queue = Queue::new();
        queue.add("sandboxes/a");
        let (_, item) = next_key(&queue).await;

        queue.add("sandboxes/a");
        queue.add("sandboxes/a");
        assert!(queue.is_empty(), "a processing key must not be queued");
        drop(item);

        assert_eq!(queue.len(), 1, "done re-queues the changed key exactly once");
        let (key, item) = next_key(&queue).await;
        assert_eq!(key, "sandboxes/a");
        drop(item);
        assert!(is_starved(&queue).await);
    }

    #[tokio::test(start_paused = true)]
    async fn key_never_processed_by_two_workers_at_once() {
        let queue = Queue::new();
        queue.add("sandboxes/a");
        let (_, first) = next_key(&queue).await;
        queue.add("sandboxes/a");

        assert!(is_starved(&queue).await, "a second worker got a key still being processed");
        drop(first);
        let (key, _second) = next_key(&queue).await;
        assert_eq!(key, "sandboxes/a");
    }

    #[tokio::test(start_paused = true)]
    async fn workers_never_overlap_on_one_key() {
        let queue = Queue::new();
        let running = Arc::new(AtomicUsize::new(0));
        let max_running = Arc::new(AtomicUsize::new(0));
        let runs = Arc::new(AtomicUsize::new(0));
        let workers = tokio::spawn(run_workers(queue.clone(), 4, {
            let (running, max_running, runs) = (running.clone(), max_running.clone(), runs.clone());
            move |_key| {
                let (running, max_running, runs) = (running.clone(), max_running.clone(), runs.clone());
                async move {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    max_running.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    running.fetch_sub(1, Ordering::SeqCst);
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok(Outcome::Done)
                }
            }
        }));

        for _ in 0..5 {
            queue.add("sandboxes/a");
            settle().await;
            advance(Duration::from_millis(3)).await;
        }
        advance(Duration::from_millis(100)).await;
        settle().await;

        assert_eq!(max_running.load(Ordering::SeqCst), 1);
        assert!(runs.load(Ordering::SeqCst) >= 2, "changes mid-run must re-run the key");
        stop_workers(&queue, workers).await;
    }

    #[tokio::test(start_paused = true)]
    async fn add_after_fires_at_deadline() {
        let queue = Queue::new();
        queue.add_after("sandboxes/a", Duration::from_secs(10));
        settle().await;

        advance(Duration::from_millis(9_999)).await;
        settle().await;
        assert!(queue.is_empty(), "fired before its deadline");

        advance(Duration::from_millis(1)).await;
        settle().await;
        assert_eq!(queue.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn add_after_zero_adds_immediately() {
        let queue = Queue::new();
        queue.add_after("sandboxes/a", Duration::ZERO);
        assert_eq!(queue.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn add_after_only_moves_earlier() {
        let queue = Queue::new();
        queue.add_after("sandboxes/a", Duration::from_secs(10));
        queue.add_after("sandboxes/a", Duration::from_secs(20));
        queue.add_after("sandboxes/b", Duration::from_secs(10));
        queue.add_after("sandboxes/b", Duration::from_secs(2));

        assert_eq!(wait_for_ready(&queue).await, (Duration::from_secs(2), "sandboxes/b"));
        assert_eq!(wait_for_ready(&queue).await, (Duration::from_secs(8), "sandboxes/a"));
        assert!(is_starved(&queue).await, "a replaced or later timer still fired");
    }

    #[tokio::test(start_paused = true)]
    async fn earlier_timer_wakes_sleeping_pump() {
        let queue = Queue::new();
        queue.add_after("sandboxes/a", Duration::from_secs(10));
        settle().await;
        queue.add_after("sandboxes/b", Duration::from_secs(1));

        advance(Duration::from_secs(1)).await;
        settle().await;
        assert_eq!(queue.len(), 1, "the pump kept sleeping until the later deadline");
    }

    #[tokio::test(start_paused = true)]
    async fn add_after_for_waiting_key_does_not_queue_twice() {
        let queue = Queue::new();
        queue.add("sandboxes/a");
        queue.add_after("sandboxes/a", Duration::from_secs(1));
        advance(Duration::from_secs(1)).await;
        settle().await;
        assert_eq!(queue.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limited_delay_doubles_per_failure() {
        let queue = Queue::new();
        for expected_ms in [5, 10, 20, 40, 80] {
            queue.add_rate_limited("sandboxes/a");
            let (waited, _) = wait_for_ready(&queue).await;
            assert_eq!(waited, Duration::from_millis(expected_ms));
        }
        assert_eq!(queue.failures(&"sandboxes/a"), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limited_delay_caps_at_five_minutes() {
        let queue = Queue::new();
        let mut waits = Vec::new();
        for _ in 0..40 {
            queue.add_rate_limited("sandboxes/a");
            waits.push(wait_for_ready(&queue).await.0);
        }
        // 5 ms · 2^15 ≈ 164 s is the last step below the cap.
        assert_eq!(waits[15], Duration::from_millis(5 << 15));
        assert!(waits[16..].iter().all(|&waited| waited == Duration::from_secs(300)));
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limit_is_configurable() {
        let queue = Queue::with_rate_limit(RateLimit {
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(3),
            ..RateLimit::default()
        });
        let mut waits = Vec::new();
        for _ in 0..4 {
            queue.add_rate_limited("sandboxes/a");
            waits.push(wait_for_ready(&queue).await.0.as_secs());
        }
        assert_eq!(waits, [1, 2, 3, 3]);
    }

    #[tokio::test(start_paused = true)]
    async fn forget_resets_backoff() {
        let queue = Queue::new();
        for _ in 0..3 {
            queue.add_rate_limited("sandboxes/a");
            wait_for_ready(&queue).await;
        }
        assert_eq!(queue.failures(&"sandboxes/a"), 3);

        queue.forget(&"sandboxes/a");
        assert_eq!(queue.failures(&"sandboxes/a"), 0);
        queue.add_rate_limited("sandboxes/a");
        assert_eq!(wait_for_ready(&queue).await.0, Duration::from_millis(5));
    }

    #[tokio::test(start_paused = true)]
    async fn cancel_drops_the_timer_and_the_failures_of_a_key() {
        let queue = Queue::new();
        queue.add_after("sandboxes/a", Duration::from_secs(10));
        queue.add_after("sandboxes/b", Duration::from_secs(10));
        queue.add_rate_limited("sandboxes/a");
        queue.cancel(&"sandboxes/a");
        assert_eq!((queue.delayed_len(), queue.failures(&"sandboxes/a")), (1, 0));

        tokio::time::advance(Duration::from_secs(11)).await;
        settle().await;
        assert_eq!(queue.len(), 1, "only b fires");
        assert_eq!(queue.next().await.unwrap().key(), &"sandboxes/b");
        assert_eq!(queue.delayed_len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn global_bucket_limits_burst() {
        let queue = WorkQueue::<String>::new();
        for n in 0..501 {
            queue.add_rate_limited(format!("sandboxes/{n}"));
        }
        settle().await;

        advance(Duration::from_millis(5)).await;
        settle().await;
        assert_eq!(queue.len(), 500, "the burst goes out after the per-key delay");

        // The 501st waits for one token at 50/s: 20 ms.
        advance(Duration::from_millis(14)).await;
        settle().await;
        assert_eq!(queue.len(), 500);
        advance(Duration::from_millis(1)).await;
        settle().await;
        assert_eq!(queue.len(), 501);
    }

    #[tokio::test(start_paused = true)]
    async fn global_bucket_refills_over_time() {
        let queue = WorkQueue::<String>::new();
        for n in 0..500 {
            queue.add_rate_limited(format!("sandboxes/{n}"));
        }
        advance(Duration::from_secs(10)).await;
        for n in 500..1000 {
            queue.add_rate_limited(format!("sandboxes/{n}"));
        }
        settle().await;
        advance(Duration::from_millis(5)).await;
        settle().await;
        assert_eq!(queue.len(), 1000);
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_item_marks_done() {
        let queue = Queue::new();
        queue.add("sandboxes/a");
        let (_, item) = next_key(&queue).await;
        drop(item);

        queue.add("sandboxes/a");
        assert_eq!(queue.len(), 1, "a key never marked done would only be marked dirty");
    }

    #[tokio::test(start_paused = true)]
    async fn panicking_reconcile_releases_key() {
        let queue = Queue::new();
        queue.add("sandboxes/a");
        let worker = tokio::spawn({
            let queue = queue.clone();
            async move {
                let _item = queue.next().await;
                panic!("reconcile blew up");
            }
        });
        assert!(worker.await.is_err());

        queue.add("sandboxes/a");
        assert_eq!(queue.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_wakes_waiters() {
        let queue = Queue::new();
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let queue = queue.clone();
                tokio::spawn(async move { queue.next().await.is_none() })
            })
            .collect();
        settle().await;

        queue.shut_down();
        for waiter in waiters {
            let woke = timeout(Duration::from_secs(1), waiter).await;
            assert!(woke.expect("waiter never woke").unwrap(), "a waiter got a key after shutdown");
        }
        assert!(queue.next().await.is_none());
        assert!(queue.is_shut_down());
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_drops_pending_keys() {
        let queue = Queue::new();
        queue.add("sandboxes/a");
        queue.add_after("sandboxes/b", Duration::from_secs(1));
        queue.shut_down();
        assert!(queue.is_empty());
        assert!(queue.next().await.is_none());

        queue.add("sandboxes/c");
        advance(Duration::from_secs(2)).await;
        settle().await;
        assert!(queue.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn fifo_order_for_ready_keys() {
        let queue = Queue::new();
        for key in ["sandboxes/c", "sandboxes/a", "sandboxes/b"] {
            queue.add(key);
        }
        let mut order = Vec::new();
        for _ in 0..3 {
            order.push(next_key(&queue).await.0);
        }
        assert_eq!(order, ["sandboxes/c", "sandboxes/a", "sandboxes/b"]);
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_worker_wakes_on_add() {
        let queue = Queue::new();
        let waiter = tokio::spawn({
            let queue = queue.clone();
            async move { queue.next().await.map(|item| *item.key()) }
        });
        settle().await;
        queue.add("sandboxes/a");
        let woke = timeout(Duration::from_secs(1), waiter).await;
        assert_eq!(woke.expect("waiter never woke").unwrap(), Some("sandboxes/a"));
    }

    #[tokio::test(start_paused = true)]
    async fn run_workers_requeues_on_error_and_forgets_on_done() {
        let queue = Queue::new();
        let (runs_tx, mut runs) = mpsc::unbounded_channel();
        let attempts = Arc::new(AtomicUsize::new(0));
        let workers = tokio::spawn(run_workers(queue.clone(), 2, {
            let queue = queue.clone();
            move |key: &'static str| {
                let (queue, runs_tx, attempts) = (queue.clone(), runs_tx.clone(), attempts.clone());
                async move {
                    runs_tx.send((Instant::now(), queue.failures(&key))).unwrap();
                    match attempts.fetch_add(1, Ordering::SeqCst) {
                        0 | 1 | 3 => Err(ControllerError::Transient("agent unreachable".to_owned())),
                        2 => Ok(Outcome::Requeue(Duration::from_secs(1))),
                        _ => Ok(Outcome::Done),
                    }
                }
            }
        }));

        queue.add("sandboxes/a");
        let mut seen = Vec::new();
        for _ in 0..5 {
            let run = timeout(Duration::from_secs(3600), runs.recv()).await;
            seen.push(run.expect("key was not retried").unwrap());
        }
        let start = seen[0].0;
        let timeline: Vec<_> = seen.iter().map(|&(at, failures)| ((at - start).as_millis(), failures)).collect();
        // Errors back off 5 ms then 10 ms; the requeue forgets them and waits 1 s; backoff restarts at 5 ms.
        assert_eq!(timeline, [(0, 0), (5, 1), (15, 2), (1015, 0), (1020, 1)]);

        settle().await;
        assert_eq!(queue.failures(&"sandboxes/a"), 0, "done forgets the key");
        advance(Duration::from_secs(3600)).await;
        settle().await;
        assert!(runs.try_recv().is_err(), "done must not requeue");

        stop_workers(&queue, workers).await;
    }

    /// Runs `outcomes` in order for one key and returns when each run started, relative to the first.
    async fn timeline_of(outcomes: Vec<Reconciled>) -> Vec<u128> {
        let queue = Queue::new();
        let (runs_tx, mut runs) = mpsc::unbounded_channel();
        let outcomes = Arc::new(parking_lot::Mutex::new(std::collections::VecDeque::from(outcomes)));
        let workers = tokio::spawn(run_workers(queue.clone(), 1, move |_key: &'static str| {
            let (runs_tx, outcomes) = (runs_tx.clone(), outcomes.clone());
            async move {
                runs_tx.send(Instant::now()).unwrap();
                outcomes.lock().pop_front().unwrap_or(Ok(Outcome::Done))
            }
        }));
        queue.add("sandboxes/a");
        let mut seen = Vec::new();
        while let Ok(Some(at)) = timeout(Duration::from_secs(3600), runs.recv()).await {
            seen.push(at);
        }
        stop_workers(&queue, workers).await;
        seen.iter().map(|at| (*at - seen[0]).as_millis()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn each_error_kind_is_retried_its_own_way() {
        let conflict = || Err(ControllerError::Conflict("stale".into()));
        let transient = || Err(ControllerError::Transient("agent unreachable".into()));
        // Conflicts retry at the 5 ms base delay three times, then back off like other failures.
        assert_eq!(timeline_of(vec![conflict(), conflict(), conflict(), conflict()]).await, [0, 5, 10, 15, 55]);
        // Transient failures back off per key: 5, 10, 20 ms.
        assert_eq!(timeline_of(vec![transient(), transient(), transient()]).await, [0, 5, 15, 35]);
        // An invalid object is not retried at all.
        assert_eq!(timeline_of(vec![Err(ControllerError::Invalid("refused".into()))]).await, [0]);
    }

    #[tokio::test(start_paused = true)]
    async fn run_workers_survives_panicking_reconcile() {
        let queue = Queue::new();
        let attempts = Arc::new(AtomicUsize::new(0));
        let workers = tokio::spawn(run_workers(queue.clone(), 1, {
            let attempts = attempts.clone();
            move |_key| {
                let attempts = attempts.clone();
                async move {
                    if attempts.fetch_add(1, Ordering::SeqCst) == 0 {
                        panic!("reconcile blew up");
                    }
                    Ok(Outcome::Done)
                }
            }
        }));

        queue.add("sandboxes/a");
        settle().await;
        assert_eq!(attempts.load(Ordering::SeqCst), 1);
        assert_eq!(queue.failures(&"sandboxes/a"), 1, "the panic counts as a failure");

        advance(Duration::from_millis(5)).await;
        settle().await;
        assert_eq!(attempts.load(Ordering::SeqCst), 2, "the panic was not retried");

        stop_workers(&queue, workers).await;
    }
}
