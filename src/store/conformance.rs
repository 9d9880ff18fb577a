//! The store contract as a test suite, run against every backend.

use super::*;
use futures::StreamExt;
use serde_json::json;
use std::future::Future;
use std::pin::Pin;

type Open = fn(StoreOptions) -> Pin<Box<dyn Future<Output = Arc<dyn Store>>>>;

fn small_ring(max_events: usize) -> StoreOptions {
    StoreOptions { history: HistoryLimits::events(max_events, Duration::from_secs(600)), ..StoreOptions::default() }
}

async fn next_event(stream: &mut WatchStream) -> Event {
    loop {
        let item = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("event within 5s")
            .expect("stream still open");
        if let WatchItem::Event(e) = item {
            return e;
        }
    }
}

async fn next_item(stream: &mut WatchStream) -> WatchItem {
    tokio::time::timeout(Duration::from_secs(5), stream.next()).await.expect("item within 5s").expect("stream open")
}

fn field(v: &Versioned, name: &str) -> serde_json::Value {
    let value: serde_json::Value = v.decode().unwrap();
    value[name].clone()
}

async fn create_assigns_increasing_revisions_and_embeds_resource_version(open: Open) {
    let store = open(StoreOptions::default()).await;
    let start = store.revision().await.unwrap();
    let a = store.create(Kind::Sandboxes, "a", json!({"id": "a"})).await.unwrap();
    let b = store.create(Kind::Nodes, "b", json!({"id": "b"})).await.unwrap();
    assert_eq!(a.revision, start + 1);
    assert_eq!(b.revision, start + 2);
    assert_eq!(field(&a, "resource_version"), json!((start + 1).to_string()));
    assert_eq!(store.get(Kind::Sandboxes, "a").await.unwrap(), Some(a));
    assert_eq!(store.get(Kind::Nodes, "a").await.unwrap(), None, "kinds are separate");
    assert_eq!(store.revision().await.unwrap(), start + 2);
}

async fn create_of_existing_name_is_already_exists(open: Open) {
    let store = open(StoreOptions::default()).await;
    store.create(Kind::Sandboxes, "a", json!({"v": 1})).await.unwrap();
    let err = store.create(Kind::Sandboxes, "a", json!({"v": 2})).await.unwrap_err();
    assert!(matches!(err, StoreError::AlreadyExists { .. }), "{err:?}");
    let stored = store.get(Kind::Sandboxes, "a").await.unwrap().unwrap();
    assert_eq!(field(&stored, "v"), json!(1), "the failed create wrote nothing");
}

async fn update_with_stale_revision_is_conflict(open: Open) {
    let store = open(StoreOptions::default()).await;
    let v1 = store.create(Kind::Sandboxes, "a", json!({"v": 1})).await.unwrap();
    let v2 = store.update(Kind::Sandboxes, "a", json!({"v": 2}), Some(v1.revision)).await.unwrap();
    assert!(v2.revision > v1.revision);
    let err = store.update(Kind::Sandboxes, "a", json!({"v": 3}), Some(v1.revision)).await.unwrap_err();
    assert_eq!(
        err,
        StoreError::Conflict { kind: Kind::Sandboxes, name: "a".into(), expected: v1.revision, actual: v2.revision }
    );
    let v3 = store.update(Kind::Sandboxes, "a", json!({"v": 3}), None).await.unwrap();
    assert_eq!(field(&v3, "v"), json!(3));
    let missing = store.update(Kind::Sandboxes, "zz", json!({}), None).await.unwrap_err();
    assert!(matches!(missing, StoreError::NotFound { .. }));
    let at_zero = store.update(Kind::Sandboxes, "zz", json!({}), Some(0)).await.unwrap_err();
    assert!(matches!(at_zero, StoreError::NotFound { .. }), "an expected revision never creates: {at_zero:?}");
    let delete_at_zero = store.delete(Kind::Sandboxes, "zz", Some(0)).await.unwrap_err();
    assert!(matches!(delete_at_zero, StoreError::NotFound { .. }), "{delete_at_zero:?}");
    assert_eq!(store.get(Kind::Sandboxes, "zz").await.unwrap(), None);
}

async fn delete_checks_revision_and_returns_last_state(open: Open) {
    let store = open(StoreOptions::default()).await;
    let v1 = store.create(Kind::Sandboxes, "a", json!({"v": 1})).await.unwrap();
    let err = store.delete(Kind::Sandboxes, "a", Some(v1.revision + 100)).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }));
    let gone = store.delete(Kind::Sandboxes, "a", Some(v1.revision)).await.unwrap();
    assert_eq!(field(&gone, "v"), json!(1));
    assert_eq!(gone.revision, v1.revision + 1, "a delete is a write with its own revision");
    assert_eq!(store.get(Kind::Sandboxes, "a").await.unwrap(), None);
    let again = store.delete(Kind::Sandboxes, "a", None).await.unwrap_err();
    assert!(matches!(again, StoreError::NotFound { .. }));
}

async fn list_is_ordered_and_pages_with_cursor(open: Open) {
    let store = open(StoreOptions::default()).await;
    for name in ["c", "a", "e", "b", "d"] {
        store.create(Kind::Sandboxes, name, json!({})).await.unwrap();
    }
    store.create(Kind::Nodes, "n", json!({})).await.unwrap();
    let (items, revision) = store.list(Kind::Sandboxes).await.unwrap();
    let names: Vec<&str> = items.iter().map(|v| &*v.name).collect();
    assert_eq!(names, ["a", "b", "c", "d", "e"]);
    assert_eq!(revision, store.revision().await.unwrap());
    let first = store.list_page(Kind::Sandboxes, "", 2).await.unwrap();
    assert_eq!(first.items.iter().map(|v| &*v.name).collect::<Vec<_>>(), ["a", "b"]);
    assert_eq!(first.next_cursor, "b");
    let last = store.list_page(Kind::Sandboxes, "c", 2).await.unwrap();
    assert_eq!(last.items.iter().map(|v| &*v.name).collect::<Vec<_>>(), ["d", "e"]);
    assert_eq!(last.next_cursor, "", "no cursor on the last page");
}

async fn watch_replays_changes_after_revision_in_order(open: Open) {
    let store = open(StoreOptions::default()).await;
    let base = store.create(Kind::Sandboxes, "before", json!({})).await.unwrap().revision;
    let a = store.create(Kind::Sandboxes, "a", json!({"v": 1})).await.unwrap();
    store.create(Kind::Nodes, "other-kind", json!({})).await.unwrap();
    let mut stream = store.watch(Kind::Sandboxes, base).await.unwrap();
    store.update(Kind::Sandboxes, "a", json!({"v": 2}), Some(a.revision)).await.unwrap();
    store.delete(Kind::Sandboxes, "a", None).await.unwrap();
    let events: Vec<Event> =
        [next_event(&mut stream).await, next_event(&mut stream).await, next_event(&mut stream).await].into();
    let types: Vec<ChangeType> = events.iter().map(|e| e.event_type).collect();
    assert_eq!(types, [ChangeType::Added, ChangeType::Modified, ChangeType::Deleted]);
    assert!(events.iter().all(|e| &*e.object.name == "a" && e.kind == Kind::Sandboxes));
    assert!(events.windows(2).all(|w| w[0].revision() < w[1].revision()), "revision order");
    assert_eq!(field(&events[2].object, "resource_version"), json!(events[2].revision().to_string()));
}

async fn watch_resumes_from_last_seen_revision_without_gaps(open: Open) {
    let store = open(StoreOptions::default()).await;
    let start = store.revision().await.unwrap();
    let mut stream = store.watch(Kind::Sandboxes, start).await.unwrap();
    for i in 0..3 {
        store.create(Kind::Sandboxes, &format!("s{i}"), json!({})).await.unwrap();
    }
    let mut last = start;
    for _ in 0..2 {
        last = next_event(&mut stream).await.revision();
    }
    drop(stream);
    for i in 3..5 {
        store.create(Kind::Sandboxes, &format!("s{i}"), json!({})).await.unwrap();
    }
    let mut resumed = store.watch(Kind::Sandboxes, last).await.unwrap();
    let mut names = Vec::new();
    for _ in 0..3 {
        names.push(next_event(&mut resumed).await.object.name.to_string());
    }
    assert_eq!(names, ["s2", "s3", "s4"]);
}

async fn watch_from_compacted_revision_is_gone(open: Open) {
    let store = open(small_ring(3)).await;
    let start = store.revision().await.unwrap();
    for i in 0..10 {
        store.create(Kind::Sandboxes, &format!("s{i}"), json!({})).await.unwrap();
    }
    let err = match store.watch(Kind::Sandboxes, start).await {
        Err(e) => e,
        Ok(_) => panic!("watch from a rolled-over revision must fail"),
    };
    assert!(matches!(err, StoreError::Gone { requested, .. } if requested == start), "{err:?}");
    let recent = store.revision().await.unwrap() - 2;
    assert!(store.watch(Kind::Sandboxes, recent).await.is_ok(), "recent revisions are still served");
}

async fn watch_from_a_revision_never_reached_is_gone(open: Open) {
    let store = open(StoreOptions::default()).await;
    store.create(Kind::Sandboxes, "a", json!({})).await.unwrap();
    let ahead = store.revision().await.unwrap() + 10;
    let err = store.watch(Kind::Sandboxes, ahead).await.err().unwrap();
    assert!(matches!(err, StoreError::Ahead { requested, .. } if requested == ahead), "{err:?}");
    assert!(err.to_string().contains("ahead of this store"), "says why, not \"too old\": {err}");
}

async fn slow_watcher_is_cut_off_not_waited_for(open: Open) {
    // Batches of one write, so the queue's room is the buffer plus one event.
    let options = StoreOptions { watcher_buffer: 2, max_batch: 1, ..StoreOptions::default() };
    let store = open(options).await;
    let start = store.revision().await.unwrap();
    let mut stream = store.watch(Kind::Sandboxes, start).await.unwrap();
    for i in 0..10 {
        let name = format!("s{i}");
        let write = store.create(Kind::Sandboxes, &name, json!({}));
        tokio::time::timeout(Duration::from_secs(5), write).await.expect("writes never wait for watchers").unwrap();
    }
    let mut seen = Vec::new();
    while let Some(item) = tokio::time::timeout(Duration::from_secs(5), stream.next()).await.unwrap() {
        seen.push(item);
    }
    assert!(seen.len() < 10, "the watcher was cut off after falling behind (saw {})", seen.len());
    assert_eq!(seen.last(), Some(&WatchItem::Lagged { buffer: 2 }), "and told so last");
}

async fn bookmarks_carry_the_revision_after_sent_events(open: Open) {
    let options = StoreOptions { bookmark_interval: Duration::from_millis(50), ..StoreOptions::default() };
    let store = open(options).await;
    let start = store.revision().await.unwrap();
    let mut stream = store.watch(Kind::Sandboxes, start).await.unwrap();
    let created = store.create(Kind::Sandboxes, "a", json!({})).await.unwrap();
    store.create(Kind::Nodes, "n", json!({})).await.unwrap();
    // A slow write (etcd's fsync) may let a bookmark tick first; it must not claim the write yet.
    loop {
        match next_item(&mut stream).await {
            WatchItem::Bookmark(rev) => assert!(rev < created.revision, "bookmark {rev} sent before its event"),
            WatchItem::Event(e) => {
                assert_eq!(e.object, created);
                break;
            }
            lagged @ WatchItem::Lagged { .. } => panic!("unexpected {lagged:?}"),
        }
    }
    loop {
        match next_item(&mut stream).await {
            WatchItem::Bookmark(rev) if rev == created.revision => continue,
            WatchItem::Bookmark(rev) => {
                assert_eq!(rev, created.revision + 1, "bookmarks name the global revision");
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

async fn concurrent_cas_writers_lose_no_update(open: Open) {
    let store = open(StoreOptions::default()).await;
    store.create(Kind::Sandboxes, "counter", json!({"n": 0})).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..25 {
                loop {
                    let cur = store.get(Kind::Sandboxes, "counter").await.unwrap().unwrap();
                    let n = field(&cur, "n").as_u64().unwrap();
                    match store.update(Kind::Sandboxes, "counter", json!({"n": n + 1}), Some(cur.revision)).await {
                        Ok(_) => break,
                        Err(StoreError::Conflict { .. }) => continue,
                        Err(e) => panic!("{e}"),
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let done = store.get(Kind::Sandboxes, "counter").await.unwrap().unwrap();
    assert_eq!(field(&done, "n"), json!(400));
}

async fn closed_store_refuses_writes(open: Open) {
    let store = open(StoreOptions::default()).await;
    store.create(Kind::Leases, "l", json!({})).await.unwrap();
    store.close().await;
    let err = store.create(Kind::Leases, "m", json!({})).await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)));
}

macro_rules! conformance {
    ($backend:ident, $open:expr) => {
        mod $backend {
            use super::*;
            const OPEN: Open = $open;
            #[tokio::test]
            async fn create_assigns_increasing_revisions_and_embeds_resource_version() {
                super::create_assigns_increasing_revisions_and_embeds_resource_version(OPEN).await
            }
            #[tokio::test]
            async fn create_of_existing_name_is_already_exists() {
                super::create_of_existing_name_is_already_exists(OPEN).await
            }
            #[tokio::test]
            async fn update_with_stale_revision_is_conflict() {
                super::update_with_stale_revision_is_conflict(OPEN).await
            }
            #[tokio::test]
            async fn delete_checks_revision_and_returns_last_state() {
                super::delete_checks_revision_and_returns_last_state(OPEN).await
            }
            #[tokio::test]
            async fn list_is_ordered_and_pages_with_cursor() {
                super::list_is_ordered_and_pages_with_cursor(OPEN).await
            }
            #[tokio::test]
            async fn watch_replays_changes_after_revision_in_order() {
                super::watch_replays_changes_after_revision_in_order(OPEN).await
            }
            #[tokio::test]
            async fn watch_resumes_from_last_seen_revision_without_gaps() {
                super::watch_resumes_from_last_seen_revision_without_gaps(OPEN).await
            }
            #[tokio::test]
            async fn watch_from_compacted_revision_is_gone() {
                super::watch_from_compacted_revision_is_gone(OPEN).await
            }
            #[tokio::test]
            async fn watch_from_a_revision_never_reached_is_gone() {
                super::watch_from_a_revision_never_reached_is_gone(OPEN).await
            }
            #[tokio::test]
            async fn slow_watcher_is_cut_off_not_waited_for() {
                super::slow_watcher_is_cut_off_not_waited_for(OPEN).await
            }
            #[tokio::test]
            async fn bookmarks_carry_the_revision_after_sent_events() {
                super::bookmarks_carry_the_revision_after_sent_events(OPEN).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_cas_writers_lose_no_update() {
                super::concurrent_cas_writers_lose_no_update(OPEN).await
            }
            #[tokio::test]
            async fn closed_store_refuses_writes() {
                super::closed_store_refuses_writes(OPEN).await
            }
        }
    };
}

conformance!(memory_backend, |options| Box::pin(
    async move { Arc::new(super::memory::open(options)) as Arc<dyn Store> }
));

conformance!(sqlite_backend, |options| Box::pin(async move {
    // The directory is leaked on purpose: the store outlives this closure.
    let dir = tempfile::tempdir().unwrap().keep();
    Arc::new(super::sqlite::open(&dir.join("store.db"), options).await.unwrap()) as Arc<dyn Store>
}));

#[cfg(feature = "etcd")]
conformance!(etcd_backend, |options| Box::pin(async move {
    // One etcd per test: revisions are global to an etcd cluster, and the suite counts them.
    // The etcd process lives as long as the store and is killed when the test drops it.
    let etcd = sandboxd_testkit::LocalEtcd::start().expect("local etcd starts");
    let endpoints = vec![format!("http://{}", etcd.addr())];
    let store = super::etcd::open(&endpoints, super::etcd::DEFAULT_PREFIX, options).await.unwrap();
    Arc::new(WithEtcd { store, _etcd: etcd }) as Arc<dyn Store>
}));

#[tokio::test]
async fn sqlite_keeps_objects_and_revision_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let store = super::sqlite::open(&path, StoreOptions::default()).await.unwrap();
    store.create(Kind::Sandboxes, "kept", json!({"v": 1})).await.unwrap();
    store.create(Kind::Sandboxes, "dropped", json!({})).await.unwrap();
    let last = store.delete(Kind::Sandboxes, "dropped", None).await.unwrap().revision;
    store.close().await;
    drop(store);

    let reopened = super::sqlite::open(&path, StoreOptions::default()).await.unwrap();
    assert_eq!(reopened.revision().await.unwrap(), last, "a trailing delete's revision survives");
    let kept = reopened.get(Kind::Sandboxes, "kept").await.unwrap().unwrap();
    assert_eq!(field(&kept, "v"), json!(1));
    assert_eq!(reopened.get(Kind::Sandboxes, "dropped").await.unwrap(), None);
    let next = reopened.create(Kind::Sandboxes, "new", json!({})).await.unwrap();
    assert_eq!(next.revision, last + 1, "revisions stay monotonic after restart");
    assert!(
        matches!(reopened.watch(Kind::Sandboxes, 0).await, Err(StoreError::Gone { .. })),
        "history from before the restart is gone"
    );
}

#[tokio::test]
async fn sqlite_refuses_a_second_process_on_the_same_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let first = super::sqlite::open(&path, StoreOptions::default()).await.unwrap();
    first.create(Kind::Nodes, "n", json!({})).await.unwrap();
    let second = super::sqlite::open(&path, StoreOptions::default()).await;
    let Err(err) = second else { panic!("a second store on the same file must be refused") };
    assert!(err.to_string().contains("in use by another process"), "{err}");
    first.close().await;
}

#[cfg(feature = "etcd")]
/// An etcd store that owns the throwaway etcd under it.
struct WithEtcd {
    store: super::etcd::EtcdStore,
    _etcd: sandboxd_testkit::LocalEtcd,
}

#[cfg(feature = "etcd")]
#[async_trait]
impl Store for WithEtcd {
    async fn get(&self, kind: Kind, name: &str) -> Result<Option<Versioned>> {
        self.store.get(kind, name).await
    }
    async fn list(&self, kind: Kind) -> Result<(Vec<Versioned>, Revision)> {
        self.store.list(kind).await
    }
    async fn list_page(&self, kind: Kind, cursor: &str, limit: usize) -> Result<Page> {
        self.store.list_page(kind, cursor, limit).await
    }
    async fn create(&self, kind: Kind, name: &str, value: serde_json::Value) -> Result<Versioned> {
        self.store.create(kind, name, value).await
    }
    async fn update(
        &self,
        kind: Kind,
        name: &str,
        value: serde_json::Value,
        expect: Option<Revision>,
    ) -> Result<Versioned> {
        self.store.update(kind, name, value, expect).await
    }
    async fn delete(&self, kind: Kind, name: &str, expect: Option<Revision>) -> Result<Versioned> {
        self.store.delete(kind, name, expect).await
    }
    async fn watch(&self, kind: Kind, from: Revision) -> Result<WatchStream> {
        self.store.watch(kind, from).await
    }
    async fn watch_limited(&self, kind: Kind, from: Revision, limits: super::WatchLimits) -> Result<WatchStream> {
        self.store.watch_limited(kind, from, limits).await
    }
    async fn revision(&self) -> Result<Revision> {
        self.store.revision().await
    }
    async fn close(&self) {
        self.store.close().await
    }
}

#[cfg(feature = "etcd")]
#[tokio::test]
async fn etcd_stores_on_one_cluster_share_objects_and_see_each_others_writes() {
    let etcd = sandboxd_testkit::LocalEtcd::start().expect("local etcd starts");
    let endpoints = vec![format!("http://{}", etcd.addr())];
    let prefix = super::etcd::DEFAULT_PREFIX;
    let a = super::etcd::open(&endpoints, prefix, StoreOptions::default()).await.unwrap();
    let b = super::etcd::open(&endpoints, prefix, StoreOptions::default()).await.unwrap();
    let mut watch_b = b.watch(Kind::Sandboxes, b.revision().await.unwrap()).await.unwrap();

    let created = a.create(Kind::Sandboxes, "s", json!({"v": 1})).await.unwrap();
    assert_eq!(b.get(Kind::Sandboxes, "s").await.unwrap(), Some(created.clone()), "a GET through B reads etcd");
    assert_eq!(next_event(&mut watch_b).await.object, created, "B's cache is fed by etcd's watch");
    let dup = b.create(Kind::Sandboxes, "s", json!({})).await.unwrap_err();
    assert!(matches!(dup, StoreError::AlreadyExists { .. }), "{dup:?}");

    let updated = b.update(Kind::Sandboxes, "s", json!({"v": 2}), Some(created.revision)).await.unwrap();
    let stale = a.update(Kind::Sandboxes, "s", json!({"v": 3}), Some(created.revision)).await.unwrap_err();
    assert_eq!(
        stale,
        StoreError::Conflict {
            kind: Kind::Sandboxes,
            name: "s".into(),
            expected: created.revision,
            actual: updated.revision
        },
        "a CAS write through A loses to B's newer write"
    );
    // A watch from a revision the other server produced waits for this server's cache instead of failing.
    let mut watch_a = a.watch(Kind::Sandboxes, updated.revision).await.unwrap();
    b.delete(Kind::Sandboxes, "s", None).await.unwrap();
    assert_eq!(next_event(&mut watch_a).await.event_type, ChangeType::Deleted);

    // A restarted server loads what is already there.
    a.close().await;
    b.create(Kind::Nodes, "n", json!({})).await.unwrap();
    let c = super::etcd::open(&endpoints, prefix, StoreOptions::default()).await.unwrap();
    let (nodes, revision) = c.list(Kind::Nodes).await.unwrap();
    assert_eq!(nodes.iter().map(|n| &*n.name).collect::<Vec<_>>(), ["n"]);
    assert_eq!(revision, b.revision().await.unwrap());
    assert!(c.list(Kind::Sandboxes).await.unwrap().0.is_empty(), "deleted objects stay deleted");
}

#[cfg(feature = "etcd")]
#[tokio::test]
async fn etcd_store_reports_an_unreachable_cluster_as_unavailable() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let endpoints = vec![format!("http://127.0.0.1:{port}")];
    let err = match super::etcd::open(&endpoints, super::etcd::DEFAULT_PREFIX, StoreOptions::default()).await {
        Err(e) => e,
        Ok(_) => panic!("nothing listens there"),
    };
    assert!(matches!(err, StoreError::Unavailable(ref m) if m.contains(&port.to_string())), "{err}");
}

#[cfg(feature = "etcd")]
#[tokio::test]
async fn etcd_store_refuses_writes_while_etcd_is_down_and_resumes_its_watch_after() {
    let mut etcd = sandboxd_testkit::LocalEtcd::start().expect("local etcd starts");
    let endpoints = vec![format!("http://{}", etcd.addr())];
    let store = super::etcd::open(&endpoints, super::etcd::DEFAULT_PREFIX, StoreOptions::default()).await.unwrap();
    let before = store.create(Kind::Sandboxes, "before", json!({})).await.unwrap();
    let mut watch = store.watch(Kind::Sandboxes, before.revision).await.unwrap();

    etcd.kill();
    let refused = store.create(Kind::Sandboxes, "during", json!({})).await.unwrap_err();
    assert!(matches!(refused, StoreError::Unavailable(_)), "{refused:?}");
    let (cached, _) = store.list(Kind::Sandboxes).await.unwrap();
    assert_eq!(cached.len(), 1, "lists keep serving the cache while etcd is down");

    etcd.restart().expect("etcd comes back");
    let after = eventually_created(&store, "after").await;
    let event = next_event(&mut watch).await;
    assert_eq!((event.event_type, event.object), (ChangeType::Added, after), "the same watch goes on");
    assert_eq!(store.get(Kind::Sandboxes, "during").await.unwrap(), None, "the refused write left nothing");
}

/// Creates `name`, retrying while etcd finishes coming back.
#[cfg(feature = "etcd")]
async fn eventually_created(store: &super::etcd::EtcdStore, name: &str) -> Versioned {
    for _ in 0..100 {
        match store.create(Kind::Sandboxes, name, json!({})).await {
            Ok(v) => return v,
            Err(StoreError::Unavailable(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => panic!("{e}"),
        }
    }
    panic!("etcd did not take writes within 10 s of coming back");
}
