//! The `ObjectClient` trait: how controllers list, watch and write objects, in-process or over HTTP.

use async_trait::async_trait;
use futures::stream::BoxStream;
use sandboxd_api::node::NodeStatus;
use sandboxd_api::{Node, Sandbox, SandboxStatus};

/// The kinds of object: the one definition the store, the API and the controllers share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjectKind {
    Nodes,
    Sandboxes,
    Leases,
    /// Issued API tokens (their hashes): the one kind no watch or list route serves.
    Tokens,
    /// What happened to sandboxes and nodes, merged by repeat and expired after `event_ttl`.
    Events,
}

impl ObjectKind {
    pub const ALL: [ObjectKind; 5] =
        [ObjectKind::Nodes, ObjectKind::Sandboxes, ObjectKind::Leases, ObjectKind::Tokens, ObjectKind::Events];

    pub fn as_str(self) -> &'static str {
        match self {
            ObjectKind::Nodes => "nodes",
            ObjectKind::Sandboxes => "sandboxes",
            ObjectKind::Leases => "leases",
            ObjectKind::Tokens => "tokens",
            ObjectKind::Events => "events",
        }
    }

    pub fn parse(s: &str) -> Option<ObjectKind> {
        ObjectKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Singular noun used in error messages.
    pub fn singular(self) -> &'static str {
        match self {
            ObjectKind::Nodes => "node",
            ObjectKind::Sandboxes => "sandbox",
            ObjectKind::Leases => "lease",
            ObjectKind::Tokens => "token",
            ObjectKind::Events => "event",
        }
    }
}

impl std::fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Failures of object calls that controllers react to differently.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ObjectError {
    /// The `resource_version` precondition failed: read again and retry.
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("not found: {0}")]
    NotFound(String),
    /// The watch revision is older than the history kept: list again.
    #[error("gone: {0}")]
    Gone(String),
    /// The write was refused as invalid (e.g. an illegal phase transition).
    #[error("invalid: {0}")]
    Invalid(String),
    #[error("unavailable: {0}")]
    Unavailable(String),
}

pub type ObjectResult<T> = Result<T, ObjectError>;

/// One change from a watch, still encoded as JSON.
#[derive(Debug, Clone)]
pub enum RawEvent {
    Added(Vec<u8>),
    Modified(Vec<u8>),
    Deleted(Vec<u8>),
    /// Every change up to this revision has been delivered.
    Bookmark(u64),
}

/// A stream of raw watch events; ends when the watch must be re-opened.
pub type RawWatch = BoxStream<'static, ObjectResult<RawEvent>>;

/// What controllers need from the API: list/watch and status writes with compare-and-swap.
#[async_trait]
pub trait ObjectClient: Send + Sync + 'static {
    /// Every object of a kind as JSON, with the revision of the list.
    async fn list(&self, kind: ObjectKind) -> ObjectResult<(Vec<Vec<u8>>, u64)>;
    /// Changes after `from`; `Gone` when `from` is too old.
    async fn watch(&self, kind: ObjectKind, from: u64) -> ObjectResult<RawWatch>;
    async fn get_node(&self, name: &str) -> ObjectResult<Option<Node>>;
    async fn get_sandbox(&self, id: &str) -> ObjectResult<Option<Sandbox>>;
    /// Writes a node's status if it is still at `resource_version`.
    async fn put_node_status(&self, name: &str, status: &NodeStatus, resource_version: &str) -> ObjectResult<Node>;
    /// Writes a sandbox's status if it is still at `resource_version`.
    async fn put_sandbox_status(
        &self,
        id: &str,
        status: &SandboxStatus,
        resource_version: &str,
    ) -> ObjectResult<Sandbox>;
    /// Removes a Terminating sandbox once its agent confirmed it gone, if still at `resource_version`.
    async fn remove_sandbox(&self, id: &str, resource_version: &str) -> ObjectResult<()>;
    /// Records events, each merged into the stored one with the same name (count added up).
    async fn record_events(&self, events: &[sandboxd_api::event::EventRecord]) -> ObjectResult<()>;
}
