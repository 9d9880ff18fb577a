//! The single writer: validates compare-and-swap writes, groups them into one durable commit, then publishes.

use super::hub::{Change, Hub};
use super::{
    ChangeType, Kind, Page, Result, Revision, Store, StoreError, StoreOptions, Versioned, WatchLimits, WatchStream,
};
use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// A row change handed to the durable layer.
pub(super) struct Mutation {
    pub kind: Kind,
    pub name: Arc<str>,
    pub revision: Revision,
    /// `None` deletes the row.
    pub data: Option<Bytes>,
}

/// Durable layer under the hub; `commit` returns only once the batch is on disk.
pub(super) trait Persist: Send + 'static {
    fn commit(&mut self, batch: &[Mutation], revision: Revision) -> std::result::Result<(), String>;
}

/// A batch this large already shares its commit well; it never waits, and a wait ends once it is reached.
const GROUPED_ENOUGH: usize = 8;

/// How often a waiting writer looks for more writes.
const WAIT_SLICE: Duration = Duration::from_micros(250);

/// Whether the writer waits `delay` (`store_commit_delay`) for more writes before committing a
/// batch of `batch` requests, the one before having carried `previous`. Like PostgreSQL's
/// `commit_delay` with `commit_siblings`, it waits only while the batch is small and writers are
/// concurrent: two are in this batch, or the last commit was already grouped. A client that writes
/// one thing at a time is delayed only when another write (a controller's, say) lands beside its own.
fn waits_for_company(previous: usize, batch: usize, delay: Duration) -> bool {
    !delay.is_zero() && batch < GROUPED_ENOUGH && (batch >= 2 || previous >= GROUPED_ENOUGH)
}

/// The memory backend persists nothing.
pub(super) struct NoPersist;

impl Persist for NoPersist {
    fn commit(&mut self, _: &[Mutation], _: Revision) -> std::result::Result<(), String> {
        Ok(())
    }
}

/// The new content of an object: a JSON tree, or JSON already encoded from a typed object.
enum Content {
    Tree(serde_json::Value),
    Encoded(Vec<u8>),
}

enum Op {
    Create(Content),
    Update(Content, Option<Revision>),
    Delete(Option<Revision>),
}

struct Request {
    kind: Kind,
    name: Arc<str>,
    op: Op,
    reply: oneshot::Sender<Result<Versioned>>,
}

/// A store kept in memory, optionally backed by a durable layer; the memory and SQLite backends.
pub struct LocalStore {
    hub: Arc<Hub>,
    requests: Mutex<Option<mpsc::Sender<Request>>>,
    writer_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl LocalStore {
    pub(super) fn start(
        objects: Vec<(Kind, Versioned)>,
        revision: Revision,
        persist: impl Persist,
        options: StoreOptions,
    ) -> LocalStore {
        let hub = Arc::new(
            Hub::new(objects, revision, options.history, options.watcher_buffer).with_batch_headroom(options.max_batch),
        );
        spawn_bookmarks(&hub, options.bookmark_interval);
        let (tx, rx) = mpsc::channel(options.max_batch.max(1) * 4);
        let writer = BatchWriter {
            hub: hub.clone(),
            persist,
            max_batch: options.max_batch.max(1),
            commit_delay: options.commit_delay,
        };
        let thread = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer.run(rx))
            .expect("spawn store writer thread");
        LocalStore { hub, requests: Mutex::new(Some(tx)), writer_thread: Mutex::new(Some(thread)) }
    }

    async fn write(&self, kind: Kind, name: &str, op: Op) -> Result<Versioned> {
        let sender = self.requests.lock().clone();
        let Some(sender) = sender else {
            return Err(StoreError::Unavailable("store is closed".into()));
        };
        let (reply, answer) = oneshot::channel();
        let request = Request { kind, name: Arc::from(name), op, reply };
        sender.send(request).await.map_err(|_| StoreError::Unavailable("store is closed".into()))?;
        answer.await.map_err(|_| StoreError::Unavailable("store writer stopped".into()))?
    }
}

#[async_trait]
impl Store for LocalStore {
    async fn get(&self, kind: Kind, name: &str) -> Result<Option<Versioned>> {
        Ok(self.hub.get(kind, name))
    }

    async fn list(&self, kind: Kind) -> Result<(Vec<Versioned>, Revision)> {
        Ok(self.hub.list(kind))
    }

    async fn list_page(&self, kind: Kind, cursor: &str, limit: usize) -> Result<Page> {
        Ok(self.hub.list_page(kind, cursor, limit))
    }

    async fn create(&self, kind: Kind, name: &str, value: serde_json::Value) -> Result<Versioned> {
        self.write(kind, name, Op::Create(Content::Tree(value))).await
    }

    async fn create_encoded(&self, kind: Kind, name: &str, json: Vec<u8>) -> Result<Versioned> {
        self.write(kind, name, Op::Create(Content::Encoded(json))).await
    }

    async fn update_encoded(
        &self,
        kind: Kind,
        name: &str,
        json: Vec<u8>,
        expect: Option<Revision>,
    ) -> Result<Versioned> {
        self.write(kind, name, Op::Update(Content::Encoded(json), expect)).await
    }

    async fn update(
        &self,
        kind: Kind,
        name: &str,
        value: serde_json::Value,
        expect: Option<Revision>,
    ) -> Result<Versioned> {
        self.write(kind, name, Op::Update(Content::Tree(value), expect)).await
    }

    async fn delete(&self, kind: Kind, name: &str, expect: Option<Revision>) -> Result<Versioned> {
        self.write(kind, name, Op::Delete(expect)).await
    }

    async fn watch(&self, kind: Kind, from: Revision) -> Result<WatchStream> {
        self.hub.watch(kind, from)
    }

    async fn watch_limited(&self, kind: Kind, from: Revision, limits: WatchLimits) -> Result<WatchStream> {
        self.hub.watch_limited(kind, from, limits)
    }

    async fn revision(&self) -> Result<Revision> {
        Ok(self.hub.revision())
    }

    async fn close(&self) {
        self.requests.lock().take();
        let thread = self.writer_thread.lock().take();
        if let Some(thread) = thread {
            // The writer drains queued requests and commits them before it exits.
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        self.hub.close();
    }
}

impl Drop for LocalStore {
    fn drop(&mut self) {
        self.requests.lock().take();
        self.hub.close();
    }
}

/// Sends bookmarks to every watcher until the store is dropped.
pub(super) fn spawn_bookmarks(hub: &Arc<Hub>, interval: Duration) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
    let hub = Arc::downgrade(hub);
    runtime.spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            match hub.upgrade() {
                Some(hub) => hub.bookmark(),
                None => return,
            }
        }
    });
}

struct BatchWriter<P> {
    hub: Arc<Hub>,
    persist: P,
    max_batch: usize,
    commit_delay: Duration,
}

/// The outcome of one request inside a batch, before the commit decides its fate.
struct Planned {
    reply: oneshot::Sender<Result<Versioned>>,
    outcome: Result<Versioned>,
}

impl<P: Persist> BatchWriter<P> {
    fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        let mut previous = 0;
        while let Some(first) = rx.blocking_recv() {
            let mut batch = vec![first];
            self.take_queued(&mut rx, &mut batch);
            if waits_for_company(previous, batch.len(), self.commit_delay) {
                self.wait_for_company(&mut rx, &mut batch);
            }
            previous = batch.len();
            self.write_batch(batch);
        }
    }

    /// Takes writes as they come for up to `commit_delay`, and stops early once the batch is
    /// grouped enough or the store is closing.
    fn wait_for_company(&self, rx: &mut mpsc::Receiver<Request>, batch: &mut Vec<Request>) {
        let deadline = std::time::Instant::now() + self.commit_delay;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() || batch.len() >= GROUPED_ENOUGH || rx.is_closed() {
                return;
            }
            std::thread::sleep(left.min(WAIT_SLICE));
            self.take_queued(rx, batch);
        }
    }

    fn take_queued(&self, rx: &mut mpsc::Receiver<Request>, batch: &mut Vec<Request>) {
        while batch.len() < self.max_batch {
            match rx.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
    }

    fn write_batch(&mut self, batch: Vec<Request>) {
        let mut revision = self.hub.revision();
        let mut staged: HashMap<(Kind, Arc<str>), Option<Versioned>> = HashMap::new();
        let mut planned = Vec::with_capacity(batch.len());
        let mut changes = Vec::new();
        let mut mutations = Vec::new();
        for mut request in batch {
            let key = (request.kind, request.name.clone());
            let current = match staged.get(&key) {
                Some(staged) => staged.clone(),
                None => self.hub.current(request.kind, &request.name),
            };
            let outcome = plan(&mut request, current, revision + 1);
            if let Ok((event_type, object)) = &outcome {
                revision += 1;
                let deleted = *event_type == ChangeType::Deleted;
                staged.insert(key, (!deleted).then(|| object.clone()));
                mutations.push(Mutation {
                    kind: request.kind,
                    name: request.name.clone(),
                    revision,
                    data: (!deleted).then(|| object.data.clone()),
                });
                changes.push(Change {
                    kind: request.kind,
                    name: request.name.clone(),
                    event_type: *event_type,
                    object: object.clone(),
                });
            }
            planned.push(Planned { reply: request.reply, outcome: outcome.map(|(_, v)| v) });
        }
        if !mutations.is_empty() {
            let started = std::time::Instant::now();
            let committed = self.persist.commit(&mutations, revision);
            let metrics = &*crate::metrics::SERVER;
            if let Err(e) = committed {
                tracing::error!(error = %e, writes = mutations.len(), "store commit failed");
                for p in planned {
                    let outcome = p.outcome.and(Err(StoreError::Unavailable(e.clone())));
                    let _ = p.reply.send(outcome);
                }
                return;
            }
            metrics.store_commit_duration.observe(started.elapsed().as_secs_f64());
            metrics.store_commits.inc();
            metrics.store_writes.inc_by(mutations.len() as u64);
            metrics.store_commit_batch.observe(mutations.len() as f64);
            // Callers hear back before any watcher is woken (see `Hub::apply_then`).
            self.hub.apply_then(changes, || answer(planned));
            return;
        }
        answer(planned);
    }
}

fn answer(planned: Vec<Planned>) {
    for p in planned {
        let _ = p.reply.send(p.outcome);
    }
}

/// Decides one write against the object's current state; `revision` is the one it would get.
fn plan(request: &mut Request, current: Option<Versioned>, revision: Revision) -> Result<(ChangeType, Versioned)> {
    let (kind, name) = (request.kind, &request.name);
    let check = |current: &Option<Versioned>, expect: Option<Revision>| -> Result<()> {
        let Some(cur) = current else {
            return Err(StoreError::NotFound { kind, name: name.to_string() });
        };
        match expect {
            Some(expected) if expected != cur.revision => {
                Err(StoreError::Conflict { kind, name: name.to_string(), expected, actual: cur.revision })
            }
            _ => Ok(()),
        }
    };
    match &mut request.op {
        Op::Create(value) => {
            if current.is_some() {
                return Err(StoreError::AlreadyExists { kind, name: name.to_string() });
            }
            Ok((ChangeType::Added, encode_content(name, value, revision)?))
        }
        Op::Update(value, expect) => {
            check(&current, *expect)?;
            Ok((ChangeType::Modified, encode_content(name, value, revision)?))
        }
        Op::Delete(expect) => {
            check(&current, *expect)?;
            let last: serde_json::Value = current.expect("checked above").decode()?;
            Ok((ChangeType::Deleted, encode(name, last, revision)?))
        }
    }
}

fn encode_content(name: &Arc<str>, content: &mut Content, revision: Revision) -> Result<Versioned> {
    match content {
        Content::Tree(value) => encode(name, std::mem::take(value), revision),
        Content::Encoded(json) => match stamp_encoded(json, revision) {
            Some(data) => Ok(Versioned { name: name.clone(), revision, data: Bytes::from(data) }),
            None => {
                let value = serde_json::from_slice(json).map_err(|e| StoreError::Corrupt(format!("{name}: {e}")))?;
                encode(name, value, revision)
            }
        },
    }
}

/// Rewrites the trailing `"resource_version":"…"}` of encoded JSON; `None` when it does not end that way.
pub(super) fn stamp_encoded(json: &[u8], revision: Revision) -> Option<Vec<u8>> {
    const FIELD: &[u8] = b"\"resource_version\":\"";
    let start = json.windows(FIELD.len()).rposition(|w| w == FIELD)?;
    let tail = &json[start + FIELD.len()..];
    let old_len = tail.iter().position(|b| *b == b'"')?;
    if !tail[..old_len].iter().all(u8::is_ascii_digit) || &tail[old_len..] != b"\"}" {
        return None;
    }
    let number = revision.to_string();
    let mut out = Vec::with_capacity(start + FIELD.len() + number.len() + 2);
    out.extend_from_slice(&json[..start + FIELD.len()]);
    out.extend_from_slice(number.as_bytes());
    out.extend_from_slice(b"\"}");
    Some(out)
}

/// Serializes an object with its new `resource_version` embedded.
pub(super) fn encode(name: &Arc<str>, mut value: serde_json::Value, revision: Revision) -> Result<Versioned> {
    let Some(map) = value.as_object_mut() else {
        return Err(StoreError::Corrupt(format!("{name}: stored objects must be JSON objects")));
    };
    map.insert("resource_version".into(), serde_json::Value::String(revision.to_string()));
    let data = serde_json::to_vec(&value).map_err(|e| StoreError::Corrupt(format!("{name}: {e}")))?;
    Ok(Versioned { name: name.clone(), revision, data: Bytes::from(data) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// Records each commit's size. With a gate, the first commit holds until the gate opens, so
    /// the test decides which writes queue behind it.
    struct Recording {
        batches: Arc<Mutex<Vec<usize>>>,
        commits_entered: Arc<std::sync::atomic::AtomicUsize>,
        gate: Option<std::sync::mpsc::Receiver<()>>,
    }

    impl Persist for Recording {
        fn commit(&mut self, batch: &[Mutation], _: Revision) -> std::result::Result<(), String> {
            self.commits_entered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if let Some(gate) = self.gate.take() {
                let _ = gate.recv();
            }
            self.batches.lock().push(batch.len());
            Ok(())
        }
    }

    struct Recorded {
        store: Arc<LocalStore>,
        batches: Arc<Mutex<Vec<usize>>>,
        commits_entered: Arc<std::sync::atomic::AtomicUsize>,
        open_gate: std::sync::mpsc::Sender<()>,
    }

    impl Recorded {
        fn new(gated: bool, commit_delay: Duration) -> Recorded {
            let (open_gate, gate) = std::sync::mpsc::channel();
            let batches = Arc::new(Mutex::new(Vec::new()));
            let commits_entered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let persist = Recording {
                batches: batches.clone(),
                commits_entered: commits_entered.clone(),
                gate: gated.then_some(gate),
            };
            let options = StoreOptions { commit_delay, ..StoreOptions::default() };
            let store = Arc::new(LocalStore::start(Vec::new(), 0, persist, options));
            Recorded { store, batches, commits_entered, open_gate }
        }

        fn create(&self, name: &str) -> tokio::task::JoinHandle<Result<Versioned>> {
            let (store, name) = (self.store.clone(), name.to_string());
            tokio::spawn(async move { store.create(Kind::Sandboxes, &name, serde_json::json!({"id": name})).await })
        }

        /// Writes sent and not yet taken by the writer.
        fn queued(&self) -> usize {
            let sender = self.store.requests.lock().clone().expect("store open");
            sender.max_capacity() - sender.capacity()
        }

        fn entered(&self) -> usize {
            self.commits_entered.load(std::sync::atomic::Ordering::SeqCst)
        }

        /// Writes a, then b and c while a's commit is held, then d once the writer has taken b and c.
        async fn a_then_b_c_then_d(&self) {
            let a = self.create("a");
            until(|| self.entered() == 1).await;
            let (b, c) = (self.create("b"), self.create("c"));
            until(|| self.queued() == 2).await;
            self.open_gate.send(()).unwrap();
            until(|| self.queued() == 0).await;
            let d = self.create("d");
            for write in [a, b, c, d] {
                write.await.unwrap().unwrap();
            }
        }
    }

    async fn until(condition: impl Fn() -> bool) {
        let started = Instant::now();
        while !condition() {
            assert!(started.elapsed() < Duration::from_secs(10), "condition not reached in 10 s");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    #[test]
    fn only_a_small_batch_of_concurrent_writes_waits_for_company() {
        let delay = Duration::from_millis(1);
        assert!(!waits_for_company(0, 1, delay), "one write at a time");
        assert!(!waits_for_company(2, 1, delay), "one write beside an occasional other");
        assert!(waits_for_company(GROUPED_ENOUGH, 1, delay), "a lone write while the last commit was grouped");
        assert!(waits_for_company(1, 2, delay));
        assert!(waits_for_company(1, GROUPED_ENOUGH - 1, delay));
        assert!(!waits_for_company(GROUPED_ENOUGH, GROUPED_ENOUGH, delay), "already grouped");
        assert!(!waits_for_company(GROUPED_ENOUGH, 2, Duration::ZERO), "the default never waits");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_writer_at_a_time_is_never_delayed() {
        let recorded = Recorded::new(false, Duration::from_millis(300));
        let started = Instant::now();
        for i in 0..10 {
            recorded.create(&format!("s{i}")).await.unwrap().unwrap();
        }
        assert!(started.elapsed() < Duration::from_millis(1500), "took {:?}", started.elapsed());
        assert_eq!(*recorded.batches.lock(), vec![1; 10]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_wait_for_the_next_one_to_share_a_commit() {
        let recorded = Recorded::new(true, Duration::from_millis(400));
        recorded.a_then_b_c_then_d().await;
        assert_eq!(*recorded.batches.lock(), vec![1, 3], "b and c queued behind a's commit and waited for d");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_a_commit_delay_concurrent_writes_do_not_wait() {
        let recorded = Recorded::new(true, Duration::ZERO);
        recorded.a_then_b_c_then_d().await;
        assert_eq!(*recorded.batches.lock(), vec![1, 2, 1]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_wait_ends_once_the_batch_is_grouped_enough() {
        let recorded = Recorded::new(true, Duration::from_secs(5));
        let first = recorded.create("first");
        until(|| recorded.entered() == 1).await;
        let mut writes: Vec<_> = (1..GROUPED_ENOUGH).map(|i| recorded.create(&format!("s{i}"))).collect();
        until(|| recorded.queued() == GROUPED_ENOUGH - 1).await;
        recorded.open_gate.send(()).unwrap();
        until(|| recorded.queued() == 0).await;
        let last_sent = Instant::now();
        writes.push(recorded.create("last"));
        for write in writes.into_iter().chain([first]) {
            write.await.unwrap().unwrap();
        }
        assert!(last_sent.elapsed() < Duration::from_secs(4), "waited the whole delay: {:?}", last_sent.elapsed());
        assert_eq!(*recorded.batches.lock(), vec![1, GROUPED_ENOUGH]);
    }

    #[test]
    fn encoded_objects_get_their_revision_stamped_in_place() {
        let got = stamp_encoded(br#"{"id":"a","resource_version":""}"#, 42).unwrap();
        assert_eq!(got, br#"{"id":"a","resource_version":"42"}"#);
        let again = stamp_encoded(&got, 43).unwrap();
        assert_eq!(again, br#"{"id":"a","resource_version":"43"}"#);
        assert_eq!(stamp_encoded(br#"{"resource_version":"1","id":"a"}"#, 2), None, "not the last field");
        assert_eq!(stamp_encoded(br#"{"id":"a"}"#, 2), None);
    }
}
