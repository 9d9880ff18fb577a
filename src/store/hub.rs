//! In-memory state shared by the in-process backends: objects, revision, history ring and watchers.

use super::{
    ChangeType, Event, Kind, Page, Result, Revision, StoreError, Versioned, WatchItem, WatchLimits, WatchStream,
};
use futures::StreamExt;
use parking_lot::RwLock;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How much history the watch ring keeps: bounded by count, by bytes and by age.
#[derive(Debug, Clone, Copy)]
pub struct HistoryLimits {
    pub max_events: usize,
    /// Bytes of the events kept (encoded object, name and per-event overhead), so large objects
    /// shorten the history instead of growing the server.
    pub max_bytes: usize,
    pub max_age: Duration,
}

impl HistoryLimits {
    /// Limits by count and age only (tests and small rings).
    pub fn events(max_events: usize, max_age: Duration) -> HistoryLimits {
        HistoryLimits { max_events, max_bytes: usize::MAX, max_age }
    }
}

/// What one event in the ring costs: the encoded object, its name and the ring slot.
fn event_cost(event: &Event) -> usize {
    event.object.data.len() + event.object.name.len() + std::mem::size_of::<(Instant, Event)>()
}

struct Watcher {
    tx: mpsc::Sender<WatchItem>,
    /// Set when the watcher is cut off for a full buffer, so its stream ends with `Lagged`.
    lagged: Arc<AtomicBool>,
}

impl Watcher {
    /// Queues `item`; false when the watcher is gone or, with its buffer full, cut off.
    fn offer(&self, item: WatchItem) -> bool {
        match self.tx.try_send(item) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.lagged.store(true, Ordering::Release);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

/// Watchers of one kind past which a new watch first drops those whose readers are gone.
const PRUNE_FROM: usize = 64;

/// Drops the watchers whose readers are gone when the list reaches a power of two (from
/// `PRUNE_FROM`): events and bookmarks drop them too, but a kind nobody writes could otherwise
/// gather a bookmark interval's worth of closed watches (and their buffers) from clients that
/// reconnect. Doubling keeps the cost per watch constant and the dead at most the live plus
/// `PRUNE_FROM`.
fn drop_closed_on_growth(watchers: &mut Vec<Watcher>) {
    if watchers.len() >= PRUNE_FROM && watchers.len().is_power_of_two() {
        watchers.retain(|w| !w.tx.is_closed());
    }
}

struct State {
    objects: HashMap<Kind, BTreeMap<Arc<str>, Versioned>>,
    revision: Revision,
    /// Every event with a revision above this one is still in `ring`.
    compacted: Revision,
    ring: VecDeque<(Instant, Event)>,
    /// `event_cost` summed over `ring`.
    ring_bytes: usize,
    /// By kind, so an event walks only the watchers of its own kind (10,000 watchers of nodes cost a
    /// sandbox write nothing).
    watchers: HashMap<Kind, Vec<Watcher>>,
    closed: bool,
}

/// A committed change the writer hands to the hub.
pub(super) struct Change {
    pub kind: Kind,
    pub name: Arc<str>,
    pub event_type: ChangeType,
    pub object: Versioned,
}

/// Sets the `/metrics` gauges of the watch history (the last hub to change wins; a server has one).
fn publish_history_size(state: &State) {
    let metrics = &*crate::metrics::SERVER;
    metrics.history_events.set(sandboxd_controllers::runtime::metrics::saturating_i64(state.ring.len()));
    metrics.history_bytes.set(sandboxd_controllers::runtime::metrics::saturating_i64(state.ring_bytes));
}

/// Objects and watchers; readers never wait for the writer's disk IO.
pub(super) struct Hub {
    state: RwLock<State>,
    limits: HistoryLimits,
    watcher_buffer: usize,
    /// Events one `apply` may carry (the writer's batch): every watcher's queue has this much room
    /// beyond its buffer, since a batch is handed out whole before any reader can take from it.
    batch_headroom: usize,
    /// The revision applied so far, for writers that must wait until the hub has seen their write.
    applied: tokio::sync::watch::Sender<Revision>,
    /// Set by `close`, so waiters stop waiting.
    shut: std::sync::atomic::AtomicBool,
}

impl Hub {
    pub fn new(
        objects: Vec<(Kind, Versioned)>,
        revision: Revision,
        limits: HistoryLimits,
        watcher_buffer: usize,
    ) -> Hub {
        Hub {
            state: RwLock::new(State {
                objects: group_by_kind(objects),
                revision,
                compacted: revision,
                ring: VecDeque::new(),
                ring_bytes: 0,
                watchers: HashMap::new(),
                closed: false,
            }),
            limits,
            watcher_buffer: watcher_buffer.max(1),
            batch_headroom: 0,
            applied: tokio::sync::watch::Sender::new(revision),
            shut: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The same hub, with queue room for batches of up to `events` changes.
    pub fn with_batch_headroom(mut self, events: usize) -> Hub {
        self.batch_headroom = events;
        self
    }

    pub fn get(&self, kind: Kind, name: &str) -> Option<Versioned> {
        self.state.read().objects.get(&kind).and_then(|m| m.get(name)).cloned()
    }

    pub fn list(&self, kind: Kind) -> (Vec<Versioned>, Revision) {
        let state = self.state.read();
        let items = state.objects.get(&kind).map(|m| m.values().cloned().collect()).unwrap_or_default();
        (items, state.revision)
    }

    pub fn list_page(&self, kind: Kind, cursor: &str, limit: usize) -> Page {
        let state = self.state.read();
        let limit = limit.max(1);
        let mut items = Vec::with_capacity(limit.min(1024));
        let mut more = false;
        if let Some(map) = state.objects.get(&kind) {
            let start: Bound<&str> = if cursor.is_empty() { Bound::Unbounded } else { Bound::Excluded(cursor) };
            for (_, v) in map.range::<str, _>((start, Bound::Unbounded)) {
                if items.len() == limit {
                    more = true;
                    break;
                }
                items.push(v.clone());
            }
        }
        let next_cursor = match (more, items.last()) {
            (true, Some(last)) => last.name.to_string(),
            _ => String::new(),
        };
        Page { items, revision: state.revision, next_cursor }
    }

    pub fn revision(&self) -> Revision {
        self.state.read().revision
    }

    /// Applies committed changes in revision order and fans them out to watchers.
    pub fn apply(&self, changes: Vec<Change>) {
        self.apply_then(changes, || {});
    }

    /// Like `apply`, running `applied` once the objects are in place and before any watcher is
    /// offered the events: the writer answers its callers there, so under a wide fan-out their
    /// answers do not queue behind every watcher's wake-up, and a read after an answer sees the write.
    pub fn apply_then(&self, changes: Vec<Change>, applied: impl FnOnce()) {
        let mut guard = self.state.write();
        let state = &mut *guard;
        let now = Instant::now();
        let first_new = state.ring.len();
        for change in changes {
            let map = state.objects.entry(change.kind).or_default();
            match change.event_type {
                ChangeType::Deleted => {
                    map.remove(&change.name);
                }
                _ => {
                    map.insert(change.name.clone(), change.object.clone());
                }
            }
            state.revision = change.object.revision;
            let event = Event { kind: change.kind, event_type: change.event_type, object: change.object };
            state.ring_bytes += event_cost(&event);
            state.ring.push_back((now, event));
        }
        applied();
        let State { ring, watchers, .. } = state;
        for (_, event) in ring.range(first_new..) {
            if let Some(of_kind) = watchers.get_mut(&event.kind) {
                // A watcher that cannot take the event now is cut off: it will re-watch from its last revision.
                of_kind.retain(|w| w.offer(WatchItem::Event(event.clone())));
            }
        }
        self.trim_ring(state, now);
        self.applied.send_replace(state.revision);
    }

    /// Waits until the hub has applied `revision`; false if `limit` passed first or the hub closed.
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))] // only a shared (etcd) source drives these
    pub async fn wait_for(&self, revision: Revision, limit: Duration) -> bool {
        let mut applied = self.applied.subscribe();
        let shut = || self.shut.load(std::sync::atomic::Ordering::Acquire);
        let reached = tokio::time::timeout(limit, applied.wait_for(|r| *r >= revision || shut())).await;
        matches!(reached, Ok(Ok(_))) && !shut()
    }

    /// Moves the revision forward past changes that carried nothing to apply (e.g. keys that are not
    /// objects), so waiters for those revisions are released; never backwards.
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))] // only a shared (etcd) source drives these
    pub fn advance(&self, revision: Revision) {
        let mut state = self.state.write();
        if revision > state.revision {
            state.revision = revision;
            self.applied.send_replace(revision);
        }
    }

    /// Replaces every object after the history was lost (e.g. the source compacted it): open watches
    /// end, and re-watching from any earlier revision is `Gone`, so clients list again.
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))] // only a shared (etcd) source drives these
    pub fn reset(&self, objects: Vec<(Kind, Versioned)>, revision: Revision) {
        let mut state = self.state.write();
        state.objects = group_by_kind(objects);
        state.revision = revision;
        state.compacted = revision;
        state.ring.clear();
        state.ring_bytes = 0;
        publish_history_size(&state);
        state.watchers.clear();
        self.applied.send_replace(revision);
    }

    fn trim_ring(&self, state: &mut State, now: Instant) {
        while let Some((at, event)) = state.ring.front() {
            let too_many = state.ring.len() > self.limits.max_events;
            let too_big = state.ring_bytes > self.limits.max_bytes;
            let too_old = now.duration_since(*at) > self.limits.max_age;
            if !too_many && !too_big && !too_old {
                break;
            }
            state.compacted = event.revision();
            state.ring_bytes -= event_cost(event);
            state.ring.pop_front();
        }
        publish_history_size(state);
    }

    /// The limits of `watch`: the store's buffer, and replay bounded only by the history ring.
    pub fn default_watch_limits(&self) -> WatchLimits {
        WatchLimits { buffer: self.watcher_buffer, max_replay: usize::MAX }
    }

    /// Registers a watcher atomically with the backlog it must replay, so no event falls between.
    pub fn watch(&self, kind: Kind, from: Revision) -> Result<WatchStream> {
        self.watch_limited(kind, from, self.default_watch_limits())
    }

    /// `watch` with its own buffer, and `Gone` when more than `max_replay` events lie after `from`.
    pub fn watch_limited(&self, kind: Kind, from: Revision, limits: WatchLimits) -> Result<WatchStream> {
        let mut state = self.state.write();
        if state.closed {
            return Err(StoreError::Unavailable("store is closed".into()));
        }
        if from < state.compacted {
            return Err(StoreError::Gone { requested: from, oldest: state.compacted });
        }
        // A revision this store never reached (it was reset, or the client is confused): list again.
        if from > state.revision {
            return Err(StoreError::Ahead { requested: from, current: state.revision });
        }
        let backlog: Vec<&Event> = state
            .ring
            .iter()
            .rev()
            .map(|(_, e)| e)
            .take_while(|e| e.revision() > from)
            .filter(|e| e.kind == kind)
            .collect();
        if backlog.len() > limits.max_replay {
            // Watching from the revision just before the oldest event that still fits replays exactly `max_replay`.
            let oldest = backlog[limits.max_replay].revision();
            return Err(StoreError::Gone { requested: from, oldest });
        }
        let backlog: Vec<WatchItem> = backlog.into_iter().rev().map(|e| WatchItem::Event(e.clone())).collect();
        let (tx, rx) = mpsc::channel(limits.buffer.max(1) + self.batch_headroom);
        let lagged = Arc::new(AtomicBool::new(false));
        let of_kind = state.watchers.entry(kind).or_default();
        drop_closed_on_growth(of_kind);
        of_kind.push(Watcher { tx, lagged: lagged.clone() });
        let live = futures::stream::unfold(Some(rx), move |rx| {
            let lagged = lagged.clone();
            async move {
                let mut rx = rx?;
                match rx.recv().await {
                    Some(item) => Some((item, Some(rx))),
                    None if lagged.load(Ordering::Acquire) => Some((WatchItem::Lagged { buffer: limits.buffer }, None)),
                    None => None,
                }
            }
        });
        Ok(futures::stream::iter(backlog).chain(live).boxed())
    }

    /// Tells every watcher the current revision; ordered after every event already sent to it.
    pub fn bookmark(&self) {
        let mut state = self.state.write();
        let revision = state.revision;
        for of_kind in state.watchers.values_mut() {
            of_kind.retain(|w| w.offer(WatchItem::Bookmark(revision)));
        }
    }

    /// Ends every watch and refuses new ones.
    pub fn close(&self) {
        let mut state = self.state.write();
        state.closed = true;
        state.watchers.clear();
        self.shut.store(true, std::sync::atomic::Ordering::Release);
        // Wakes every `wait_for`, which then sees `shut`.
        self.applied.send_modify(|_| {});
    }

    /// Reads an object for the writer's CAS checks.
    pub fn current(&self, kind: Kind, name: &str) -> Option<Versioned> {
        self.get(kind, name)
    }
}

fn group_by_kind(objects: Vec<(Kind, Versioned)>) -> HashMap<Kind, BTreeMap<Arc<str>, Versioned>> {
    let mut by_kind: HashMap<Kind, BTreeMap<Arc<str>, Versioned>> =
        Kind::ALL.iter().map(|k| (*k, BTreeMap::new())).collect();
    for (kind, object) in objects {
        by_kind.entry(kind).or_default().insert(object.name.clone(), object);
    }
    by_kind
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn object(name: &str, revision: Revision) -> Versioned {
        Versioned { name: Arc::from(name), revision, data: bytes::Bytes::from_static(b"{}") }
    }

    fn change(name: &str, revision: Revision) -> Change {
        Change {
            kind: Kind::Sandboxes,
            name: Arc::from(name),
            event_type: ChangeType::Added,
            object: object(name, revision),
        }
    }

    fn ring_bytes(hub: &Hub) -> usize {
        hub.state.read().ring_bytes
    }

    #[tokio::test]
    async fn callers_are_answered_before_any_watcher_hears_and_only_watchers_of_the_kind_hear() {
        let hub = Hub::new(vec![], 0, HistoryLimits::events(1000, Duration::from_secs(60)), 16);
        let mut sandboxes = hub.watch(Kind::Sandboxes, 0).unwrap();
        let mut nodes = hub.watch(Kind::Nodes, 0).unwrap();
        let mut answered_before_watchers = None;
        hub.apply_then(vec![change("a", 1)], || {
            answered_before_watchers = Some(futures::FutureExt::now_or_never(sandboxes.next()).is_none());
        });
        assert_eq!(answered_before_watchers, Some(true), "the callback ran once, before the watcher had the event");
        assert!(hub.current(Kind::Sandboxes, "a").is_some());
        assert!(matches!(sandboxes.next().await, Some(WatchItem::Event(e)) if e.revision() == 1));
        assert!(futures::FutureExt::now_or_never(nodes.next()).is_none(), "a node watcher hears no sandbox");
    }

    #[tokio::test]
    async fn history_is_bounded_by_bytes_and_older_revisions_are_gone() {
        let one = event_cost(&Event { kind: Kind::Sandboxes, event_type: ChangeType::Added, object: object("s-0", 1) });
        let limits = HistoryLimits { max_events: 1_000, max_bytes: 3 * one, max_age: Duration::from_secs(60) };
        let hub = Hub::new(vec![], 0, limits, 16);
        hub.apply((1..=10).map(|r| change(&format!("s-{}", r % 10), r)).collect());

        assert_eq!(hub.state.read().ring.len(), 3, "names of one length cost the same, so three fit");
        assert_eq!(ring_bytes(&hub), 3 * one);
        assert!(matches!(hub.watch(Kind::Sandboxes, 6), Err(StoreError::Gone { .. })));
        assert!(hub.watch(Kind::Sandboxes, 7).is_ok(), "the three newest events are still replayed");
    }

    #[tokio::test]
    async fn a_watcher_over_its_buffer_is_cut_off_and_told_so_after_what_it_was_sent() {
        let hub = Hub::new(vec![], 0, HistoryLimits::events(100, Duration::from_secs(60)), 16).with_batch_headroom(1);
        let limits = WatchLimits { buffer: 1, max_replay: usize::MAX };
        let mut slow = hub.watch_limited(Kind::Sandboxes, 0, limits).unwrap();
        let mut reading = hub.watch_limited(Kind::Sandboxes, 0, limits).unwrap();
        hub.apply(vec![change("a", 1), change("b", 2)]);
        assert!(matches!(reading.next().await, Some(WatchItem::Event(_))));
        assert!(matches!(reading.next().await, Some(WatchItem::Event(_))));
        hub.apply(vec![change("c", 3)]);

        let mut seen = Vec::new();
        while let Some(item) = slow.next().await {
            seen.push(item);
        }
        assert_eq!(seen.len(), 3, "both queued events, then the marker: {seen:?}");
        assert!(matches!(seen[..2], [WatchItem::Event(_), WatchItem::Event(_)]));
        assert_eq!(seen[2], WatchItem::Lagged { buffer: 1 });
        assert!(matches!(reading.next().await, Some(WatchItem::Event(e)) if e.revision() == 3), "readers go on");
        let open: usize = hub.state.read().watchers.values().map(Vec::len).sum();
        assert_eq!(open, 1, "the slow watcher's slot is gone");
    }

    #[tokio::test]
    async fn closed_watches_of_a_kind_nobody_writes_do_not_pile_up_between_bookmarks() {
        let hub = Hub::new(vec![], 0, HistoryLimits::events(100, Duration::from_secs(60)), 16);
        let mut live = Vec::new();
        for i in 0..10_000 {
            let watch = hub.watch(Kind::Nodes, 0).unwrap();
            if i % 100 == 0 {
                live.push(watch);
            }
        }
        let held = hub.state.read().watchers[&Kind::Nodes].len();
        assert!(held <= live.len() * 2 + PRUNE_FROM, "{held} watchers held for {} open", live.len());
        hub.apply(vec![Change { kind: Kind::Nodes, ..change("n", 1) }]);
        for watch in &mut live {
            assert!(
                matches!(watch.next().await, Some(WatchItem::Event(e)) if e.revision() == 1),
                "an open watch hears"
            );
        }
    }

    #[tokio::test]
    async fn a_batch_larger_than_the_buffer_never_cuts_off_a_reader_that_keeps_up() {
        let hub = Hub::new(vec![], 0, HistoryLimits::events(1000, Duration::from_secs(60)), 16).with_batch_headroom(64);
        let mut reader =
            hub.watch_limited(Kind::Sandboxes, 0, WatchLimits { buffer: 4, max_replay: usize::MAX }).unwrap();
        hub.apply((1..=64).map(|r| change(&format!("s{r}"), r)).collect());
        for r in 1..=64 {
            assert!(matches!(reader.next().await, Some(WatchItem::Event(e)) if e.revision() == r), "event {r}");
        }
        hub.apply(vec![change("next", 65)]);
        assert!(matches!(reader.next().await, Some(WatchItem::Event(e)) if e.revision() == 65), "still watching");
    }

    #[tokio::test]
    async fn a_closed_hub_ends_watches_without_a_lag_marker() {
        let hub = Hub::new(vec![], 0, HistoryLimits::events(100, Duration::from_secs(60)), 16);
        let mut watch = hub.watch(Kind::Sandboxes, 0).unwrap();
        hub.close();
        assert_eq!(watch.next().await, None);
    }

    #[tokio::test]
    async fn replay_beyond_max_replay_is_gone_naming_the_oldest_revision_that_fits() {
        let hub = Hub::new(vec![], 0, HistoryLimits::events(100, Duration::from_secs(60)), 16);
        let mut changes: Vec<Change> = (1..=10).map(|r| change(&format!("s{r}"), r)).collect();
        changes[4].kind = Kind::Nodes; // revision 5 is another kind: it does not count
        hub.apply(changes);
        let limits = WatchLimits { buffer: 16, max_replay: 3 };

        let gone = hub.watch_limited(Kind::Sandboxes, 0, limits).err();
        assert_eq!(gone, Some(StoreError::Gone { requested: 0, oldest: 7 }));
        let replayed: Vec<Revision> = hub
            .watch_limited(Kind::Sandboxes, 7, limits)
            .unwrap()
            .take(3)
            .map(|i| match i {
                WatchItem::Event(e) => e.revision(),
                other => panic!("{other:?}"),
            })
            .collect()
            .await;
        assert_eq!(replayed, [8, 9, 10]);
        assert!(hub.watch_limited(Kind::Sandboxes, 3, limits).is_err(), "revisions 4, 6..=10: five sandboxes");
        assert!(hub.watch(Kind::Sandboxes, 0).is_ok(), "the store's own watch replays the whole ring");
    }

    #[tokio::test]
    async fn history_bytes_follow_events_out_of_the_ring() {
        let hub = Hub::new(vec![], 0, HistoryLimits::events(100, Duration::from_secs(60)), 16);
        hub.apply(vec![change("a", 1), change("b", 2)]);
        assert!(ring_bytes(&hub) > 0);
        // Age is judged by std's clock when the next write trims the ring: a zero-age ring drops the older.
        let aged = Hub::new(vec![], 0, HistoryLimits::events(100, Duration::ZERO), 16);
        aged.apply(vec![change("a", 1)]);
        std::thread::sleep(Duration::from_millis(2));
        aged.apply(vec![change("b", 2)]);
        assert_eq!(aged.state.read().ring.len(), 1);
        assert_eq!(ring_bytes(&aged), event_cost(&aged.state.read().ring[0].1));
        hub.reset(vec![], 5);
        assert_eq!(ring_bytes(&hub), 0, "a reset empties the ring and its byte count");
    }

    #[tokio::test]
    async fn reset_replaces_objects_ends_watches_and_makes_older_revisions_gone() {
        let limits = HistoryLimits::events(100, Duration::from_secs(60));
        let hub = Hub::new(vec![], 0, limits, 16);
        hub.apply(vec![change("a", 1), change("b", 2)]);
        let mut watch = hub.watch(Kind::Sandboxes, 2).unwrap();

        hub.reset(vec![(Kind::Sandboxes, object("c", 7))], 9);
        assert!(watch.next().await.is_none(), "open watches end, so clients re-watch");
        let names: Vec<String> = hub.list(Kind::Sandboxes).0.iter().map(|v| v.name.to_string()).collect();
        assert_eq!(names, ["c"]);
        assert_eq!(hub.revision(), 9);
        assert!(matches!(hub.watch(Kind::Sandboxes, 2), Err(StoreError::Gone { requested: 2, oldest: 9 })));
        assert!(hub.watch(Kind::Sandboxes, 9).is_ok());
        assert!(hub.wait_for(9, Duration::from_millis(10)).await, "writers waiting for 9 are released");
    }

    #[tokio::test]
    async fn close_releases_waiters_at_once_and_advance_never_goes_back() {
        let limits = HistoryLimits::events(100, Duration::from_secs(60));
        let hub = Arc::new(Hub::new(vec![], 5, limits, 16));
        hub.advance(3);
        assert_eq!(hub.revision(), 5);
        hub.advance(8);
        assert!(hub.wait_for(8, Duration::from_millis(1)).await);
        let waiter = tokio::spawn({
            let hub = hub.clone();
            async move { hub.wait_for(20, Duration::from_secs(3600)).await }
        });
        tokio::task::yield_now().await;
        hub.close();
        let released = tokio::time::timeout(Duration::from_secs(1), waiter).await;
        assert!(!released.expect("released at once").unwrap(), "a closed hub reports the revision not reached");
    }
}
