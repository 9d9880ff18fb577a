//! The versioned object store: one global revision, compare-and-swap writes and watch from a revision.

mod hub;
mod writer;

#[cfg(feature = "etcd")]
pub mod etcd;
pub mod memory;
pub mod sqlite;

#[cfg(test)]
mod conformance;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use std::sync::Arc;
use std::time::Duration;

pub use hub::HistoryLimits;
pub use writer::LocalStore;

/// Global revision: bumped by one on every write.
pub type Revision = u64;

/// The kinds of object the store holds (one definition, shared with the controllers).
pub use sandboxd_contracts::ObjectKind as Kind;

/// A stored object: its JSON (with `resource_version` embedded) and the revision of its last write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub name: Arc<str>,
    pub revision: Revision,
    pub data: Bytes,
}

impl Versioned {
    /// Decodes the stored JSON into a typed object.
    pub fn decode<T: serde::de::DeserializeOwned>(&self) -> Result<T, StoreError> {
        serde_json::from_slice(&self.data).map_err(|e| StoreError::Corrupt(format!("{}: {e}", self.name)))
    }
}

/// What a change did to an object. The wire's `sandboxd_api::watch::EventType` adds the stream's own
/// markers (BOOKMARK, ERROR), which the store carries as `WatchItem::Bookmark` and errors instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeType {
    Added,
    Modified,
    Deleted,
}

/// One change, in revision order. For `Deleted`, the object is its last state at the delete's revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: Kind,
    pub event_type: ChangeType,
    pub object: Versioned,
}

impl From<ChangeType> for sandboxd_api::watch::EventType {
    fn from(change: ChangeType) -> Self {
        match change {
            ChangeType::Added => sandboxd_api::watch::EventType::Added,
            ChangeType::Modified => sandboxd_api::watch::EventType::Modified,
            ChangeType::Deleted => sandboxd_api::watch::EventType::Deleted,
        }
    }
}

impl Event {
    pub fn revision(&self) -> Revision {
        self.object.revision
    }
}

/// What a watch stream yields: a change, or a bookmark saying every change up to a revision was sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchItem {
    Event(Event),
    Bookmark(Revision),
    /// The last item: the watcher fell more than its buffer behind and was cut off. Every event it
    /// was sent is still valid; it resumes by watching again from the last revision it saw.
    Lagged {
        buffer: usize,
    },
}

/// How far one watcher may fall behind: live events queued for it, and history replayed to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchLimits {
    /// Events queued for a watcher that does not read; one more cuts it off with `Lagged`.
    pub buffer: usize,
    /// Most history events a watch may replay; a watch from further back is `Gone`, so the client
    /// lists instead of streaming the whole history.
    pub max_replay: usize,
}

/// One page of a list, ordered by name.
#[derive(Debug, Clone)]
pub struct Page {
    pub items: Vec<Versioned>,
    pub revision: Revision,
    /// Name to pass as the next cursor; empty on the last page.
    pub next_cursor: String,
}

/// Store failures; each maps to one HTTP status.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    #[error("{} {name:?} already exists", kind.singular())]
    AlreadyExists { kind: Kind, name: String },
    #[error("{} {name:?} not found", kind.singular())]
    NotFound { kind: Kind, name: String },
    #[error("conflict: {} {name:?} is at resource_version {actual}, not {expected}", kind.singular())]
    Conflict { kind: Kind, name: String, expected: Revision, actual: Revision },
    #[error("resource_version {requested} is too old: the oldest available is {oldest}")]
    Gone { requested: Revision, oldest: Revision },
    /// A revision the store never reached: it was reset, or the revision came from another store.
    #[error("resource_version {requested} is ahead of this store, which is at {current}: list again")]
    Ahead { requested: Revision, current: Revision },
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("stored object is corrupt: {0}")]
    Corrupt(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A stream of events that ends when the watcher falls behind or the store closes.
pub type WatchStream = BoxStream<'static, WatchItem>;

/// The store contract every backend passes (see `conformance`).
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The current object, if any.
    async fn get(&self, kind: Kind, name: &str) -> Result<Option<Versioned>>;
    /// Every object of a kind, ordered by name, with the revision the list was taken at.
    async fn list(&self, kind: Kind) -> Result<(Vec<Versioned>, Revision)>;
    /// Up to `limit` objects with names after `cursor`, ordered by name.
    async fn list_page(&self, kind: Kind, cursor: &str, limit: usize) -> Result<Page>;
    /// Creates an object; `AlreadyExists` if the name is taken.
    async fn create(&self, kind: Kind, name: &str, value: serde_json::Value) -> Result<Versioned>;
    /// Replaces an object; with `expect`, only if it is still at that revision.
    async fn update(
        &self,
        kind: Kind,
        name: &str,
        value: serde_json::Value,
        expect: Option<Revision>,
    ) -> Result<Versioned>;
    /// Creates an object from JSON already encoded from a typed API object, whose last field is
    /// `resource_version`: the hot write paths skip building a `serde_json::Value` tree.
    async fn create_encoded(&self, kind: Kind, name: &str, json: Vec<u8>) -> Result<Versioned> {
        let value = serde_json::from_slice(&json).map_err(|e| StoreError::Corrupt(format!("{name}: {e}")))?;
        self.create(kind, name, value).await
    }
    /// `update` from JSON already encoded, as `create_encoded`.
    async fn update_encoded(
        &self,
        kind: Kind,
        name: &str,
        json: Vec<u8>,
        expect: Option<Revision>,
    ) -> Result<Versioned> {
        let value = serde_json::from_slice(&json).map_err(|e| StoreError::Corrupt(format!("{name}: {e}")))?;
        self.update(kind, name, value, expect).await
    }
    /// Removes an object; with `expect`, only if it is still at that revision. Returns its last state.
    async fn delete(&self, kind: Kind, name: &str, expect: Option<Revision>) -> Result<Versioned>;
    /// Changes after revision `from`, then live; `Gone` if `from` is older than the history kept.
    async fn watch(&self, kind: Kind, from: Revision) -> Result<WatchStream>;
    /// `watch` with a smaller buffer and replay than the store's own, for watchers outside the process.
    async fn watch_limited(&self, kind: Kind, from: Revision, limits: WatchLimits) -> Result<WatchStream>;
    /// The latest revision.
    async fn revision(&self) -> Result<Revision>;
    /// Flushes and stops accepting writes; open watches end.
    async fn close(&self);
}

/// The default bound of the watch history in bytes (the `watch_history_bytes` key).
pub const DEFAULT_HISTORY_BYTES: usize = 64 << 20;

/// Options shared by the in-process backends.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub history: HistoryLimits,
    /// Events a watcher may fall behind by before it is cut off.
    pub watcher_buffer: usize,
    /// Most writes grouped into one transaction.
    pub max_batch: usize,
    /// How often every watcher gets a bookmark.
    pub bookmark_interval: Duration,
    /// How long a small batch waits for more writes while several writers are busy (SQLite only).
    pub commit_delay: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            history: HistoryLimits {
                max_events: 200_000,
                max_bytes: DEFAULT_HISTORY_BYTES,
                max_age: Duration::from_secs(600),
            },
            watcher_buffer: 16_384,
            max_batch: 1024,
            bookmark_interval: Duration::from_secs(30),
            commit_delay: Duration::ZERO,
        }
    }
}

#[cfg(feature = "etcd")]
async fn open_etcd(endpoints: &str, options: StoreOptions) -> Result<Arc<dyn Store>> {
    let endpoints = etcd::endpoints(endpoints)?;
    Ok(Arc::new(etcd::open(&endpoints, etcd::DEFAULT_PREFIX, options).await?))
}

#[cfg(not(feature = "etcd"))]
async fn open_etcd(_endpoints: &str, _options: StoreOptions) -> Result<Arc<dyn Store>> {
    Err(StoreError::Unavailable(
        "this sandboxd-o was built without etcd support (cargo --no-default-features); \
         rebuild with the default `etcd` feature"
            .into(),
    ))
}

/// Opens the backend a `store` URL names: `memory://`, `sqlite://PATH`, `etcd://HOST:PORT[,HOST:PORT...]`.
pub async fn open(url: &str, options: StoreOptions) -> Result<Arc<dyn Store>> {
    if url == "memory://" {
        return Ok(Arc::new(memory::open(options)));
    }
    if let Some(path) = url.strip_prefix("sqlite://") {
        if path.is_empty() {
            return Err(StoreError::Unavailable("sqlite:// needs a path, e.g. sqlite://./data/store.db".into()));
        }
        return Ok(Arc::new(sqlite::open(std::path::Path::new(path), options).await?));
    }
    if let Some(rest) = url.strip_prefix("etcd://") {
        return open_etcd(rest, options).await;
    }
    Err(StoreError::Unavailable(format!(
        "unknown store URL {url:?}: expected memory://, sqlite://PATH or etcd://HOST:PORT[,HOST:PORT...]"
    )))
}
