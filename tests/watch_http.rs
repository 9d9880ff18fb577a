//! A watch client over real HTTP sees every change in order and resumes without gaps.

mod common;

use common::{sandbox_spec, start_api_server, start_server, test_config};
use futures::StreamExt;
use sandboxd_api::watch::WatchEvent;
use sandboxd_api::EventType;
use std::time::Duration;

async fn next(
    stream: &mut futures::stream::BoxStream<'static, sandboxd_client::Result<WatchEvent<serde_json::Value>>>,
) -> WatchEvent<serde_json::Value> {
    loop {
        let event = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("event within 5s")
            .expect("stream open")
            .expect("valid event");
        if event.event_type != EventType::Bookmark {
            return event;
        }
    }
}

fn revision(event: &WatchEvent<serde_json::Value>) -> u64 {
    event.object["resource_version"].as_str().unwrap().parse().unwrap()
}

#[tokio::test]
async fn watch_sees_create_update_delete_in_order_and_resumes_without_gaps() {
    let (server, client) = start_api_server(test_config(&[])).await;
    let start = client.list_sandboxes().await.unwrap().resource_version;
    let mut stream = client.watch("sandboxes", Some(&start)).await.unwrap();

    let created = client.create_sandbox("w1", &sandbox_spec("100m")).await.unwrap().object;
    let mut spec = created.spec.clone();
    spec.ttl_seconds = Some(60);
    client.update_sandbox("w1", &spec, None).await.unwrap();
    client.delete_sandbox("w1").await.unwrap();

    let events = [next(&mut stream).await, next(&mut stream).await, next(&mut stream).await];
    let types: Vec<EventType> = events.iter().map(|e| e.event_type).collect();
    assert_eq!(types, [EventType::Added, EventType::Modified, EventType::Deleted]);
    assert!(events.windows(2).all(|w| revision(&w[0]) < revision(&w[1])));
    assert_eq!(events[1].object["spec"]["ttl_seconds"], 60);

    // Disconnect, miss two creates, then resume from the last revision seen.
    let last = revision(&events[2]);
    drop(stream);
    client.create_sandbox("w2", &sandbox_spec("100m")).await.unwrap();
    client.create_sandbox("w3", &sandbox_spec("100m")).await.unwrap();
    let mut resumed = client.watch("sandboxes", Some(&last.to_string())).await.unwrap();
    let ids =
        [next(&mut resumed).await, next(&mut resumed).await].map(|e| e.object["id"].as_str().unwrap().to_string());
    assert_eq!(ids, ["w2", "w3"]);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn graceful_stop_ends_open_watches() {
    let (server, client) = start_server(test_config(&[])).await;
    let mut stream = client.watch("nodes", None).await.unwrap();
    server.stop().await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), stream.next()).await.expect("stream ends on shutdown");
    assert!(end.is_none() || end.unwrap().is_err());
}

// === a watch that falls behind the history ===

/// An API server over real HTTP whose store keeps two events of history, so a watch from an older
/// revision is answered with `ERROR 410`.
async fn serve_short_history() -> (sandboxd_client::Client, tokio_util::sync::CancellationToken) {
    use sandboxd_o::store::{HistoryLimits, StoreOptions};
    let options =
        StoreOptions { history: HistoryLimits::events(2, Duration::from_secs(600)), ..StoreOptions::default() };
    serve_store(options, sandboxd_o::config::Config::default()).await
}

/// An API server over real HTTP on a memory store with `options`.
async fn serve_store(
    options: sandboxd_o::store::StoreOptions,
    config: sandboxd_o::config::Config,
) -> (sandboxd_client::Client, tokio_util::sync::CancellationToken) {
    let store: std::sync::Arc<dyn sandboxd_o::store::Store> =
        std::sync::Arc::new(sandboxd_o::store::memory::open(options));
    let state = sandboxd_o::apiserver::ApiState::new(store, &config);
    let router = sandboxd_o::apiserver::router(state, config.max_body_bytes);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let signal = stop.clone();
    tokio::spawn(async move {
        axum::serve(listener, router).with_graceful_shutdown(async move { signal.cancelled().await }).await.unwrap();
    });
    (sandboxd_client::Client::new(&format!("http://{addr}"), None).unwrap(), stop)
}

/// `HttpObjects` whose first watch waits until the test lets it go, so changes can pile up between
/// the informer's list and its watch.
struct HeldFirstWatch {
    inner: sandboxd_client::objects::HttpObjects,
    release: tokio::sync::Semaphore,
    lists: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl sandboxd_contracts::ObjectClient for HeldFirstWatch {
    async fn list(&self, kind: ObjectKind) -> ObjectResult<(Vec<Vec<u8>>, u64)> {
        self.lists.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.list(kind).await
    }
    async fn watch(&self, kind: ObjectKind, from: u64) -> ObjectResult<RawWatch> {
        self.release.acquire().await.expect("semaphore open").forget();
        self.release.add_permits(1);
        self.inner.watch(kind, from).await
    }
    async fn get_node(&self, name: &str) -> ObjectResult<Option<sandboxd_api::Node>> {
        self.inner.get_node(name).await
    }
    async fn get_sandbox(&self, id: &str) -> ObjectResult<Option<sandboxd_api::Sandbox>> {
        self.inner.get_sandbox(id).await
    }
    async fn put_node_status(
        &self,
        name: &str,
        status: &sandboxd_api::node::NodeStatus,
        rv: &str,
    ) -> ObjectResult<sandboxd_api::Node> {
        self.inner.put_node_status(name, status, rv).await
    }
    async fn put_sandbox_status(
        &self,
        id: &str,
        status: &sandboxd_api::SandboxStatus,
        rv: &str,
    ) -> ObjectResult<sandboxd_api::Sandbox> {
        self.inner.put_sandbox_status(id, status, rv).await
    }
    async fn record_events(&self, events: &[sandboxd_api::event::EventRecord]) -> ObjectResult<()> {
        self.inner.record_events(events).await
    }
    async fn remove_sandbox(&self, id: &str, rv: &str) -> ObjectResult<()> {
        self.inner.remove_sandbox(id, rv).await
    }
}

use sandboxd_contracts::objects::{ObjectError, ObjectKind, ObjectResult, RawWatch};

#[tokio::test]
async fn the_http_client_turns_a_compacted_watch_into_gone() {
    let (client, stop) = serve_short_history().await;
    let objects = sandboxd_client::objects::HttpObjects::new(client.clone());
    use sandboxd_contracts::ObjectClient;
    let (_, start) = objects.list(ObjectKind::Sandboxes).await.unwrap();
    for id in ["g1", "g2", "g3", "g4"] {
        client.create_sandbox(id, &sandbox_spec("100m")).await.unwrap();
    }
    let mut watch = objects.watch(ObjectKind::Sandboxes, start).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), watch.next()).await.expect("an answer within 5 s");
    assert!(matches!(first, Some(Err(ObjectError::Gone(_)))), "{first:?}");
    stop.cancel();
}

#[tokio::test]
async fn an_informer_over_http_relists_after_410_and_loses_nothing() {
    use sandboxd_controllers::runtime::informer::{Change, Informer};
    let (client, stop) = serve_short_history().await;
    for id in ["keep", "gone"] {
        client.create_sandbox(id, &sandbox_spec("100m")).await.unwrap();
    }
    let objects = std::sync::Arc::new(HeldFirstWatch {
        inner: sandboxd_client::objects::HttpObjects::new(client.clone()),
        release: tokio::sync::Semaphore::new(0),
        lists: Default::default(),
    });
    let informer: Informer<sandboxd_api::Sandbox> = Informer::new();
    let deleted = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
    informer.subscribe({
        let deleted = deleted.clone();
        move |change| {
            if let Change::Delete(gone) = change {
                deleted.lock().push(gone.id.clone());
            }
        }
    });
    let task = tokio::spawn(informer.clone().run(objects.clone(), stop.clone()));
    informer.wait_synced().await;
    assert_eq!(sorted(informer.keys()), ["gone", "keep"]);

    // While the informer's watch is held back, more changes than the history keeps happen.
    client.delete_sandbox("gone").await.unwrap();
    for id in ["new-1", "new-2", "new-3"] {
        client.create_sandbox(id, &sandbox_spec("100m")).await.unwrap();
    }
    objects.release.add_permits(1);

    let want = ["keep", "new-1", "new-2", "new-3"];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while sorted(informer.keys()) != want {
        assert!(tokio::time::Instant::now() < deadline, "cache never caught up: {:?}", sorted(informer.keys()));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(*deleted.lock(), ["gone"], "the relist told subscribers of the delete it missed");
    assert_eq!(objects.lists.load(std::sync::atomic::Ordering::SeqCst), 2, "caught up by a relist after the 410");
    stop.cancel();
    task.await.unwrap();
}

fn sorted(mut keys: Vec<String>) -> Vec<String> {
    keys.sort();
    keys
}

// === bounds on watches (issue 16) ===

/// Reads a watch to its end, returning every event (bookmarks left out); fails after 20 s.
async fn drain(
    mut stream: futures::stream::BoxStream<'static, sandboxd_client::Result<WatchEvent<serde_json::Value>>>,
) -> Vec<WatchEvent<serde_json::Value>> {
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while let Ok(Some(item)) = tokio::time::timeout_at(deadline, stream.next()).await {
        match item {
            Ok(e) if e.event_type == EventType::Bookmark => {}
            Ok(e) => events.push(e),
            Err(_) => break,
        }
    }
    events
}

#[tokio::test]
async fn watches_over_max_watches_get_429_and_a_closed_watch_gives_its_slot_back() {
    let (server, client) = start_api_server(test_config(&[("max_watches", "2")])).await;
    let first = client.watch("sandboxes", None).await.unwrap();
    let _second = client.watch("nodes", None).await.unwrap();
    let refused = client.watch("sandboxes", None).await.err().expect("a third watch is refused");
    assert_eq!(refused.status(), Some(429), "{refused}");
    assert!(refused.to_string().contains("max_watches"), "{refused}");

    drop(first);
    // The server learns of the closed connection when it next writes to it.
    client.create_sandbox("nudge", &sandbox_spec("100m")).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match client.watch("sandboxes", None).await {
            Ok(_) => break,
            Err(e) if e.status() == Some(429) && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("the slot never came back: {e}"),
        }
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_watch_replaying_more_than_watch_max_replay_gets_410_and_a_closer_one_replays() {
    let (server, client) = start_api_server(test_config(&[("watch_max_replay", "3")])).await;
    let start = client.list_sandboxes().await.unwrap().resource_version;
    let mut revisions = Vec::new();
    for i in 0..5 {
        let created = client.create_sandbox(&format!("r{i}"), &sandbox_spec("100m")).await.unwrap();
        revisions.push(created.object.resource_version);
    }
    let too_far = drain(client.watch("sandboxes", Some(&start)).await.unwrap()).await;
    assert_eq!(too_far.len(), 1, "{too_far:?}");
    assert_eq!(too_far[0].event_type, EventType::Error);
    assert_eq!(too_far[0].object["code"], 410);

    let mut near = client.watch("sandboxes", Some(&revisions[1])).await.unwrap();
    let ids = [next(&mut near).await, next(&mut near).await, next(&mut near).await]
        .map(|e| e.object["id"].as_str().unwrap().to_string());
    assert_eq!(ids, ["r2", "r3", "r4"]);
    server.stop().await.unwrap();
}

/// A sandbox spec of about `bytes` bytes (one long argument), so a few events fill socket buffers.
fn bulky_spec(bytes: usize) -> sandboxd_api::sandbox::SandboxSpec {
    let mut spec = sandbox_spec("1m");
    spec.containers[0].args = vec!["x".repeat(bytes)];
    spec
}

#[tokio::test]
async fn a_watcher_that_stops_reading_is_closed_with_a_429_error_event_after_what_it_was_sent() {
    // Write batches of at most 16, so the slow watcher's queue holds 16 + 16 events.
    let options = sandboxd_o::store::StoreOptions { max_batch: 16, ..Default::default() };
    let (client, stop) = serve_store(options, test_config(&[("watch_buffer", "16")])).await;
    let start = client.list_sandboxes().await.unwrap().resource_version;
    let slow = client.watch("sandboxes", Some(&start)).await.unwrap();
    let mut reader = client.watch("sandboxes", Some(&start)).await.unwrap();
    // ~40 MB of events: far more than the socket buffers between the server and an idle reader.
    let total = 200;
    for i in 0..total {
        client.create_sandbox(&format!("b{i}"), &bulky_spec(200_000)).await.unwrap();
        let seen = next(&mut reader).await;
        assert_eq!(seen.object["id"], format!("b{i}"), "a reading watcher keeps up");
    }
    let events = drain(slow).await;
    let last = events.last().expect("some events");
    assert_eq!(last.event_type, EventType::Error, "ends with an ERROR event");
    assert_eq!(last.object["code"], 429, "{}", last.object);
    assert!(last.object["error"].as_str().unwrap().contains("watch_buffer"), "{}", last.object);
    let added = &events[..events.len() - 1];
    assert!(added.len() < total, "it was cut off before the end: {}", added.len());
    for (i, event) in added.iter().enumerate() {
        assert_eq!(event.object["id"], format!("b{i}"), "what it was sent is a gap-free prefix");
    }
    stop.cancel();
}

// === many watches over one stream (POST /api/v1/watch) ===

fn watch_spec(id: &str, name: Option<&str>, resource_version: Option<&str>) -> sandboxd_api::watch::WatchSpec {
    sandboxd_api::watch::WatchSpec {
        id: id.into(),
        name: name.map(Into::into),
        resource_version: resource_version.map(Into::into),
    }
}

fn watch_many_request(
    kind: &str,
    watches: Vec<sandboxd_api::watch::WatchSpec>,
) -> sandboxd_api::watch::WatchManyRequest {
    sandboxd_api::watch::WatchManyRequest { kind: kind.into(), watches }
}

type Tagged = sandboxd_api::watch::TaggedWatchEvent<serde_json::Value>;

/// The next `n` lines that are not bookmarks, as (watch, type, object id).
async fn next_tagged(
    stream: &mut futures::stream::BoxStream<'static, sandboxd_client::Result<Tagged>>,
    n: usize,
) -> Vec<(String, EventType, String)> {
    let mut seen = Vec::new();
    while seen.len() < n {
        let event = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("event within 5s")
            .expect("stream open")
            .expect("valid line");
        if event.event_type == EventType::Bookmark {
            assert_eq!(event.watch, None, "a bookmark speaks for every watch");
            continue;
        }
        let id = event.object["id"].as_str().unwrap_or_default().to_string();
        seen.push((event.watch.expect("an object line names its watch"), event.event_type, id));
    }
    seen
}

fn line(watch: &str, event_type: EventType, id: &str) -> (String, EventType, String) {
    (watch.into(), event_type, id.into())
}

#[tokio::test]
async fn one_stream_carries_many_watches_each_routed_by_name_and_revision() {
    let (server, client) = start_api_server(test_config(&[])).await;
    client.create_sandbox("a", &sandbox_spec("100m")).await.unwrap();
    client.create_sandbox("b", &sandbox_spec("100m")).await.unwrap();
    let now = client.list_sandboxes().await.unwrap().resource_version;
    let request = watch_many_request(
        "sandboxes",
        vec![
            watch_spec("every", None, None),
            watch_spec("only-b", Some("b"), None),
            watch_spec("c-from-now", Some("c"), Some(&now)),
        ],
    );
    let mut stream = client.watch_many(&request).await.unwrap();
    // Watches without a revision get the current objects first, in list order.
    assert_eq!(
        next_tagged(&mut stream, 3).await,
        [
            line("every", EventType::Added, "a"),
            line("every", EventType::Added, "b"),
            line("only-b", EventType::Added, "b")
        ]
    );
    client.create_sandbox("c", &sandbox_spec("100m")).await.unwrap();
    assert_eq!(
        next_tagged(&mut stream, 2).await,
        [line("every", EventType::Added, "c"), line("c-from-now", EventType::Added, "c")]
    );
    client.delete_sandbox("b").await.unwrap();
    assert_eq!(
        next_tagged(&mut stream, 2).await,
        [line("every", EventType::Deleted, "b"), line("only-b", EventType::Deleted, "b")]
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_stream_of_many_watches_takes_one_slot_and_bad_requests_get_400() {
    let (server, client) = start_api_server(test_config(&[("max_watches", "1")])).await;
    let bad = [
        watch_many_request("leases", vec![watch_spec("a", None, None)]),
        watch_many_request("sandboxes", vec![]),
        watch_many_request("sandboxes", vec![watch_spec("a", None, None), watch_spec("a", Some("x"), None)]),
        watch_many_request("sandboxes", vec![watch_spec("a", Some("No"), None)]),
        watch_many_request("sandboxes", vec![watch_spec("a", None, Some("-1"))]),
    ];
    for request in &bad {
        let refused = client.watch_many(request).await.err().expect("refused");
        assert_eq!(refused.status(), Some(400), "{request:?}: {refused}");
    }
    let thousand = (0..1000).map(|i| watch_spec(&format!("w{i}"), Some(&format!("s{i}")), None)).collect();
    let _held = client.watch_many(&watch_many_request("sandboxes", thousand)).await.unwrap();
    let refused = client.watch("nodes", None).await.err().expect("the server's one slot is taken");
    assert_eq!(refused.status(), Some(429), "{refused}");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_stream_with_a_watch_ahead_of_the_store_ends_with_one_410_at_once() {
    let (server, client) = start_api_server(test_config(&[])).await;
    client.create_sandbox("h1", &sandbox_spec("100m")).await.unwrap();
    let request = watch_many_request(
        "sandboxes",
        vec![watch_spec("now", None, None), watch_spec("future", Some("h1"), Some("5000"))],
    );
    let mut stream = client.watch_many(&request).await.unwrap();
    let first =
        tokio::time::timeout(Duration::from_secs(5), stream.next()).await.expect("a line at once").unwrap().unwrap();
    assert_eq!((first.watch, first.event_type), (None, EventType::Error), "{:?}", first.object);
    assert_eq!(first.object["code"], 410);
    assert!(first.object["error"].as_str().unwrap().contains("ahead"), "{:?}", first.object);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_stream_whose_earliest_revision_is_gone_ends_with_one_410() {
    let (server, client) = start_api_server(test_config(&[("watch_max_replay", "2")])).await;
    let start = client.list_sandboxes().await.unwrap().resource_version;
    for i in 0..4 {
        client.create_sandbox(&format!("g{i}"), &sandbox_spec("100m")).await.unwrap();
    }
    let request =
        watch_many_request("sandboxes", vec![watch_spec("old", None, Some(&start)), watch_spec("new", None, None)]);
    let mut stream = client.watch_many(&request).await.unwrap();
    let mut lines = Vec::new();
    while let Ok(Some(Ok(event))) = tokio::time::timeout(Duration::from_secs(5), stream.next()).await {
        lines.push(event);
    }
    let errors: Vec<&Tagged> = lines.iter().filter(|e| e.event_type == EventType::Error).collect();
    assert_eq!(errors.len(), 1, "{lines:?}");
    assert_eq!((errors[0].watch.as_deref(), &errors[0].object["code"]), (None, &serde_json::json!(410)));
    server.stop().await.unwrap();
}
