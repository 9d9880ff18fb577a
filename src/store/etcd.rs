//! The etcd backend: objects live in etcd, each API server serves reads and watches from its own cache.
//!
//! Writes are etcd transactions that compare `create_revision`/`mod_revision`, so the etcd revision is
//! our `resource_version`. One etcd watch on the whole key prefix feeds the in-memory hub, which
//! answers every list and watch: N clients watching cost one etcd watch per API server. A write
//! returns only after the hub has applied it, so a client reads its own writes through the same
//! server. A GET reads etcd itself, so it is current across servers.

use super::hub::{Change, Hub};
use super::writer::{encode, spawn_bookmarks, stamp_encoded};
use super::{
    ChangeType, Kind, Page, Result, Revision, Store, StoreError, StoreOptions, Versioned, WatchLimits, WatchStream,
};
use async_trait::async_trait;
use bytes::Bytes;
use etcd_client::{Compare, CompareOp, DeleteOptions, GetOptions, Txn, TxnOp, TxnOpResponse, WatchOptions};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Where every object lives: `/sandboxd/<kind>/<name>`.
pub const DEFAULT_PREFIX: &str = "/sandboxd/";

/// Longest any one etcd request may take before the caller gets `Unavailable`.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a write waits for the local cache to show it before it is answered anyway.
const CACHE_WAIT: Duration = Duration::from_secs(10);
/// Keys per range request when loading the cache.
const LIST_CHUNK: i64 = 1000;
/// gRPC messages can carry a whole page of objects.
const MAX_MESSAGE: usize = 64 << 20;

/// A store whose objects live in etcd, shared by every API server pointed at the same cluster.
pub struct EtcdStore {
    client: etcd_client::Client,
    prefix: Arc<str>,
    hub: Arc<Hub>,
    closed: AtomicBool,
    feeder: tokio::task::JoinHandle<()>,
}

/// Connects to `endpoints` (`host:port`), loads every object under `prefix` and starts the watch.
pub async fn open(endpoints: &[String], prefix: &str, options: StoreOptions) -> Result<EtcdStore> {
    let connect = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
        // A member cut off from the quorum cancels our watch instead of going silent, so the feeder resumes
        // through a healthy member.
        .with_require_leader(true);
    let joined = endpoints.join(",");
    let at = |e: StoreError| match e {
        StoreError::Unavailable(why) => StoreError::Unavailable(format!("{why} (endpoints {joined})")),
        other => other,
    };
    let client = within(etcd_client::Client::connect(endpoints, Some(connect))).await.map_err(at)?;
    let prefix: Arc<str> = Arc::from(prefix);
    let (objects, revision) = load(&client, &prefix).await.map_err(at)?;
    let hub = Arc::new(
        Hub::new(objects, revision, options.history, options.watcher_buffer).with_batch_headroom(options.max_batch),
    );
    spawn_bookmarks(&hub, options.bookmark_interval);
    let feeder = tokio::spawn(feed(client.clone(), prefix.clone(), Arc::downgrade(&hub), revision));
    Ok(EtcdStore { client, prefix, hub, closed: AtomicBool::new(false), feeder })
}

/// Splits an `etcd://host:port[,host:port...]` URL into endpoints.
pub fn endpoints(url_rest: &str) -> Result<Vec<String>> {
    let endpoints: Vec<String> =
        url_rest.split(',').map(str::trim).filter(|e| !e.is_empty()).map(|e| format!("http://{e}")).collect();
    if endpoints.is_empty() {
        return Err(StoreError::Unavailable("etcd:// needs at least one host:port, e.g. etcd://127.0.0.1:2379".into()));
    }
    Ok(endpoints)
}

async fn within<T>(call: impl std::future::Future<Output = Result<T, etcd_client::Error>>) -> Result<T> {
    match tokio::time::timeout(REQUEST_TIMEOUT, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(StoreError::Unavailable(format!("etcd: {}", root_cause(&e)))),
        Err(_) => Err(StoreError::Unavailable(format!("etcd: no answer within {REQUEST_TIMEOUT:?}"))),
    }
}

/// The innermost cause (e.g. "Connection refused"), not tonic's whole nested chain.
fn root_cause(e: &etcd_client::Error) -> String {
    if let etcd_client::Error::GRpcStatus(status) = e {
        if let Some(inner) = std::error::Error::source(status) {
            return root_of(inner);
        }
        return format!("{:?}: {}", status.code(), status.message());
    }
    root_of(e)
}

fn root_of(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(inner) = cause.source() {
        cause = inner;
    }
    cause.to_string()
}

fn kv_client(client: &etcd_client::Client) -> etcd_client::KvClient {
    client.kv_client().max_decoding_message_size(MAX_MESSAGE)
}

/// Every object under the prefix, read page by page at one revision, and that revision.
async fn load(client: &etcd_client::Client, prefix: &str) -> Result<(Vec<(Kind, Versioned)>, Revision)> {
    let mut kv = kv_client(client);
    let end = prefix_end(prefix.as_bytes());
    let mut from = prefix.as_bytes().to_vec();
    let mut at = 0i64;
    let mut objects = Vec::new();
    loop {
        let mut options = GetOptions::new().with_range(end.clone()).with_limit(LIST_CHUNK);
        if at > 0 {
            options = options.with_revision(at);
        }
        let response = within(kv.get(from.clone(), Some(options))).await?;
        if at == 0 {
            at = header_revision(response.header())?;
        }
        for item in response.kvs() {
            if let Some((kind, name)) = parse_key(prefix, item.key()) {
                objects.push((kind, stamp(&name, item.value(), item.mod_revision() as Revision)?));
            }
        }
        match response.kvs().last() {
            Some(last) if response.more() => {
                from = last.key().to_vec();
                from.push(0);
            }
            _ => return Ok((objects, at as Revision)),
        }
    }
}

fn header_revision(header: Option<&etcd_client::ResponseHeader>) -> Result<i64> {
    header.map(|h| h.revision()).ok_or_else(|| StoreError::Unavailable("etcd answered without a header".into()))
}

/// The first key after every key that starts with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn key(prefix: &str, kind: Kind, name: &str) -> String {
    format!("{prefix}{}/{name}", kind.as_str())
}

fn parse_key(prefix: &str, key: &[u8]) -> Option<(Kind, Arc<str>)> {
    let rest = std::str::from_utf8(key).ok()?.strip_prefix(prefix)?;
    let (kind, name) = rest.split_once('/')?;
    Some((Kind::parse(kind)?, Arc::from(name)))
}

/// The stored bytes with the revision etcd gave them embedded as `resource_version`.
fn stamp(name: &Arc<str>, stored: &[u8], revision: Revision) -> Result<Versioned> {
    if let Some(data) = stamp_encoded(stored, revision) {
        return Ok(Versioned { name: name.clone(), revision, data: Bytes::from(data) });
    }
    let value = serde_json::from_slice(stored).map_err(|e| StoreError::Corrupt(format!("{name}: {e}")))?;
    encode(name, value, revision)
}

/// JSON to store, with `resource_version` as its last field so reads can stamp it in place.
fn to_stored(name: &str, mut value: serde_json::Value) -> Result<Vec<u8>> {
    let Some(map) = value.as_object_mut() else {
        return Err(StoreError::Corrupt(format!("{name}: stored objects must be JSON objects")));
    };
    map.shift_remove("resource_version");
    map.insert("resource_version".into(), serde_json::Value::String(String::new()));
    serde_json::to_vec(&value).map_err(|e| StoreError::Corrupt(format!("{name}: {e}")))
}

fn encoded_to_stored(name: &str, json: Vec<u8>) -> Result<Vec<u8>> {
    if stamp_encoded(&json, 0).is_some() {
        return Ok(json);
    }
    let value = serde_json::from_slice(&json).map_err(|e| StoreError::Corrupt(format!("{name}: {e}")))?;
    to_stored(name, value)
}

impl EtcdStore {
    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(StoreError::Unavailable("store is closed".into()));
        }
        Ok(())
    }

    async fn put(&self, kind: Kind, name: &str, stored: Vec<u8>, guard: Vec<Compare>) -> Result<Versioned> {
        self.check_open()?;
        let key = key(&self.prefix, kind, name);
        let txn = Txn::new()
            .when(guard)
            .and_then([TxnOp::put(key.clone(), stored.clone(), None)])
            .or_else([TxnOp::get(key, None)]);
        let response = within(kv_client(&self.client).txn(txn)).await?;
        let revision = header_revision(response.header())? as Revision;
        if !response.succeeded() {
            return Err(refusal(kind, name, &response));
        }
        let object = stamp(&Arc::from(name), &stored, revision)?;
        self.wait_for_cache(revision).await;
        Ok(object)
    }

    /// Waits until this server's cache holds `revision`, so its reads and watches show the write.
    async fn wait_for_cache(&self, revision: Revision) {
        if !self.hub.wait_for(revision, CACHE_WAIT).await {
            tracing::warn!(revision, "etcd watch cache did not catch up with a write in time");
        }
    }
}

/// Why a guarded write's comparison failed, from the current value read in the same transaction.
fn refusal(kind: Kind, name: &str, response: &etcd_client::TxnResponse) -> StoreError {
    let current = response.op_responses().into_iter().find_map(|op| match op {
        TxnOpResponse::Get(get) => get.kvs().first().map(|kv| kv.mod_revision() as Revision),
        _ => None,
    });
    match current {
        None => StoreError::NotFound { kind, name: name.to_string() },
        Some(actual) => StoreError::Conflict { kind, name: name.to_string(), expected: 0, actual },
    }
}

/// The comparisons an update or delete must pass: the key exists and, if given, is at the expected revision.
/// (etcd compares a missing key as all zeros, so `mod_revision == 0` alone would pass for a missing key.)
fn guard(key: &str, expect: Option<Revision>) -> Vec<Compare> {
    let exists = Compare::create_revision(key, CompareOp::Greater, 0);
    match expect {
        Some(revision) => vec![exists, Compare::mod_revision(key, CompareOp::Equal, revision as i64)],
        None => vec![exists],
    }
}

fn with_expected(err: StoreError, expect: Option<Revision>) -> StoreError {
    match (err, expect) {
        (StoreError::Conflict { kind, name, actual, .. }, Some(expected)) => {
            StoreError::Conflict { kind, name, expected, actual }
        }
        (err, _) => err,
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, kind: Kind, name: &str) -> Result<Option<Versioned>> {
        self.check_open()?;
        let response = within(kv_client(&self.client).get(key(&self.prefix, kind, name), None)).await?;
        match response.kvs().first() {
            Some(kv) => Ok(Some(stamp(&Arc::from(name), kv.value(), kv.mod_revision() as Revision)?)),
            None => Ok(None),
        }
    }

    async fn list(&self, kind: Kind) -> Result<(Vec<Versioned>, Revision)> {
        self.check_open()?;
        Ok(self.hub.list(kind))
    }

    async fn list_page(&self, kind: Kind, cursor: &str, limit: usize) -> Result<Page> {
        self.check_open()?;
        Ok(self.hub.list_page(kind, cursor, limit))
    }

    async fn create(&self, kind: Kind, name: &str, value: serde_json::Value) -> Result<Versioned> {
        let stored = to_stored(name, value)?;
        self.create_encoded_stored(kind, name, stored).await
    }

    async fn create_encoded(&self, kind: Kind, name: &str, json: Vec<u8>) -> Result<Versioned> {
        let stored = encoded_to_stored(name, json)?;
        self.create_encoded_stored(kind, name, stored).await
    }

    async fn update(
        &self,
        kind: Kind,
        name: &str,
        value: serde_json::Value,
        expect: Option<Revision>,
    ) -> Result<Versioned> {
        self.update_stored(kind, name, to_stored(name, value)?, expect).await
    }

    async fn update_encoded(
        &self,
        kind: Kind,
        name: &str,
        json: Vec<u8>,
        expect: Option<Revision>,
    ) -> Result<Versioned> {
        self.update_stored(kind, name, encoded_to_stored(name, json)?, expect).await
    }

    async fn delete(&self, kind: Kind, name: &str, expect: Option<Revision>) -> Result<Versioned> {
        self.check_open()?;
        let key = key(&self.prefix, kind, name);
        let txn = Txn::new()
            .when(guard(&key, expect))
            .and_then([TxnOp::delete(key.clone(), Some(DeleteOptions::new().with_prev_key()))])
            .or_else([TxnOp::get(key, None)]);
        let response = within(kv_client(&self.client).txn(txn)).await?;
        let revision = header_revision(response.header())? as Revision;
        if !response.succeeded() {
            return Err(with_expected(refusal(kind, name, &response), expect));
        }
        let last = response.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Delete(deleted) => deleted.prev_kvs().first().map(|kv| kv.value().to_vec()),
            _ => None,
        });
        let Some(last) = last else {
            return Err(StoreError::NotFound { kind, name: name.to_string() });
        };
        let object = stamp(&Arc::from(name), &last, revision)?;
        self.wait_for_cache(revision).await;
        Ok(object)
    }

    async fn watch(&self, kind: Kind, from: Revision) -> Result<WatchStream> {
        self.watch_limited(kind, from, self.hub.default_watch_limits()).await
    }

    async fn watch_limited(&self, kind: Kind, from: Revision, limits: WatchLimits) -> Result<WatchStream> {
        self.check_open()?;
        if from > self.hub.revision() {
            // The client saw a newer revision (a GET through etcd, or another server); wait for the
            // cache unless etcd itself never reached it.
            let response = within(kv_client(&self.client).get(self.prefix.as_bytes(), None)).await?;
            let newest = header_revision(response.header())? as Revision;
            if from <= newest {
                self.hub.wait_for(from, CACHE_WAIT).await;
            }
        }
        self.hub.watch_limited(kind, from, limits)
    }

    async fn revision(&self) -> Result<Revision> {
        self.check_open()?;
        Ok(self.hub.revision())
    }

    async fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.feeder.abort();
        self.hub.close();
    }
}

impl EtcdStore {
    async fn update_stored(
        &self,
        kind: Kind,
        name: &str,
        stored: Vec<u8>,
        expect: Option<Revision>,
    ) -> Result<Versioned> {
        let guard = guard(&key(&self.prefix, kind, name), expect);
        self.put(kind, name, stored, guard).await.map_err(|e| with_expected(e, expect))
    }

    async fn create_encoded_stored(&self, kind: Kind, name: &str, stored: Vec<u8>) -> Result<Versioned> {
        let key = key(&self.prefix, kind, name);
        let guard = vec![Compare::create_revision(key, CompareOp::Equal, 0)];
        self.put(kind, name, stored, guard).await.map_err(|e| match e {
            StoreError::Conflict { kind, name, .. } => StoreError::AlreadyExists { kind, name },
            other => other,
        })
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        self.feeder.abort();
        self.hub.close();
    }
}

/// Keeps the hub in step with etcd: one prefix watch, resumed after errors, relisted after compaction.
async fn feed(client: etcd_client::Client, prefix: Arc<str>, hub: std::sync::Weak<Hub>, mut revision: Revision) {
    const FIRST_DELAY: Duration = Duration::from_millis(100);
    let mut delay = FIRST_DELAY;
    loop {
        let before = revision;
        let outcome = follow(&client, &prefix, &hub, &mut revision).await;
        if revision > before {
            // A stretch of progress: the next break is a new incident, not a repeat.
            delay = FIRST_DELAY;
        }
        match outcome {
            Ok(()) => return,
            Err(FeedError::Compacted) => {
                tracing::warn!(revision, "etcd compacted past the watch cache; reloading every object");
                match load(&client, &prefix).await {
                    Ok((objects, at)) => {
                        let Some(hub) = hub.upgrade() else { return };
                        hub.reset(objects, at);
                        revision = at;
                        delay = FIRST_DELAY;
                        continue;
                    }
                    Err(e) => tracing::warn!(error = %e, "etcd reload failed"),
                }
            }
            Err(FeedError::Broken(e)) => tracing::warn!(error = %e, revision, "etcd watch broke; resuming"),
        }
        if hub.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

enum FeedError {
    Compacted,
    Broken(String),
}

/// Applies watch events from `revision + 1` until the stream breaks; `Ok` once the hub is gone.
async fn follow(
    client: &etcd_client::Client,
    prefix: &str,
    hub: &std::sync::Weak<Hub>,
    revision: &mut Revision,
) -> Result<(), FeedError> {
    let options = WatchOptions::new().with_prefix().with_prev_key().with_start_revision(*revision as i64 + 1);
    let mut watcher = client.watch_client().max_decoding_message_size(MAX_MESSAGE);
    let mut stream = watcher.watch(prefix, Some(options)).await.map_err(|e| FeedError::Broken(e.to_string()))?;
    loop {
        let response = match stream.message().await {
            Ok(Some(response)) => response,
            Ok(None) => return Err(FeedError::Broken("etcd closed the watch".into())),
            Err(e) => return Err(FeedError::Broken(e.to_string())),
        };
        if response.compact_revision() > 0 {
            return Err(FeedError::Compacted);
        }
        if response.canceled() {
            return Err(FeedError::Broken(format!("etcd canceled the watch: {}", response.cancel_reason())));
        }
        let Some(hub) = hub.upgrade() else { return Ok(()) };
        let changes: Vec<Change> = response.events().iter().filter_map(|e| to_change(prefix, e, &hub)).collect();
        // Events that were not ours to apply still move the revision, so waiters for them are released.
        let newest = response.events().iter().filter_map(|e| e.kv()).map(|kv| kv.mod_revision() as Revision).max();
        if !changes.is_empty() {
            hub.apply(changes);
        }
        if let Some(newest) = newest {
            *revision = newest;
            hub.advance(newest);
        }
    }
}

/// One etcd event as a hub change; `None` for keys that are not ours or values that do not decode.
fn to_change(prefix: &str, event: &etcd_client::Event, hub: &Hub) -> Option<Change> {
    let kv = event.kv()?;
    let (kind, name) = parse_key(prefix, kv.key())?;
    let revision = kv.mod_revision() as Revision;
    let (event_type, object) = match event.event_type() {
        etcd_client::EventType::Put => {
            let event_type = if kv.version() == 1 { ChangeType::Added } else { ChangeType::Modified };
            (event_type, stamp(&name, kv.value(), revision))
        }
        etcd_client::EventType::Delete => {
            // The last state comes with the event; the cache's copy is the fallback.
            let last = match event.prev_kv() {
                Some(prev) => stamp(&name, prev.value(), revision),
                None => {
                    let cached = hub.get(kind, &name)?;
                    stamp(&name, &cached.data, revision)
                }
            };
            (ChangeType::Deleted, last)
        }
    };
    match object {
        Ok(object) => Some(Change { kind, name, event_type, object }),
        Err(e) => {
            tracing::error!(error = %e, "skipping an etcd value that is not a stored object");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_foreign_keys_are_ignored() {
        let k = key(DEFAULT_PREFIX, Kind::Sandboxes, "sbx-1");
        assert_eq!(k, "/sandboxd/sandboxes/sbx-1");
        assert_eq!(parse_key(DEFAULT_PREFIX, k.as_bytes()), Some((Kind::Sandboxes, Arc::from("sbx-1"))));
        assert_eq!(parse_key(DEFAULT_PREFIX, b"/sandboxd/pods/x"), None);
        assert_eq!(parse_key(DEFAULT_PREFIX, b"/other/nodes/x"), None);
    }

    #[test]
    fn prefix_end_is_the_first_key_after_the_prefix() {
        assert_eq!(prefix_end(b"/sandboxd/"), b"/sandboxd0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
    }

    #[test]
    fn stored_json_ends_with_resource_version_so_reads_stamp_in_place() {
        let stored = to_stored("a", serde_json::json!({"resource_version": "9", "id": "a"})).unwrap();
        assert_eq!(stored, br#"{"id":"a","resource_version":""}"#);
        let object = stamp(&Arc::from("a"), &stored, 42).unwrap();
        assert_eq!(&object.data[..], br#"{"id":"a","resource_version":"42"}"#);
    }

    #[test]
    fn endpoints_are_parsed_from_the_url() {
        assert_eq!(
            endpoints("127.0.0.1:2379, 127.0.0.2:2379").unwrap(),
            ["http://127.0.0.1:2379", "http://127.0.0.2:2379"]
        );
        assert!(endpoints("").is_err());
    }
}
