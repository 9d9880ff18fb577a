//! The in-process `ObjectClient`: controllers in the server process use the store directly, with the API's rules.

use crate::apiserver::{self, ApiError, ApiState};
use crate::store::{EventType, Kind, StoreError, WatchItem};
use async_trait::async_trait;
use futures::StreamExt;
use sandboxd_api::node::NodeStatus;
use sandboxd_api::{Node, Sandbox, SandboxStatus};
use sandboxd_controllers::objects::{ObjectClient, ObjectError, ObjectKind, ObjectResult, RawEvent, RawWatch};

/// List/watch and status writes over the local store, with the same semantics as the HTTP API.
#[derive(Clone)]
pub struct InProcessObjects {
    state: ApiState,
}

impl InProcessObjects {
    pub fn new(state: ApiState) -> InProcessObjects {
        InProcessObjects { state }
    }
}

fn store_kind(kind: ObjectKind) -> Kind {
    match kind {
        ObjectKind::Nodes => Kind::Nodes,
        ObjectKind::Sandboxes => Kind::Sandboxes,
        ObjectKind::Leases => Kind::Leases,
    }
}

fn from_store(e: StoreError) -> ObjectError {
    from_api(ApiError::from(e))
}

fn from_api(e: ApiError) -> ObjectError {
    let message = e.to_string();
    match e {
        ApiError::Conflict(_) => ObjectError::Conflict(message),
        ApiError::NotFound(_) => ObjectError::NotFound(message),
        ApiError::Gone(_) => ObjectError::Gone(message),
        ApiError::BadRequest(_) => ObjectError::Invalid(message),
        _ => ObjectError::Unavailable(message),
    }
}

fn parse_revision(rv: &str) -> ObjectResult<u64> {
    rv.parse().map_err(|_| ObjectError::Invalid(format!("resource_version {rv:?} is not a revision")))
}

#[async_trait]
impl ObjectClient for InProcessObjects {
    async fn list(&self, kind: ObjectKind) -> ObjectResult<(Vec<Vec<u8>>, u64)> {
        let (items, revision) = self.state.store.list(store_kind(kind)).await.map_err(from_store)?;
        Ok((items.into_iter().map(|v| v.data.to_vec()).collect(), revision))
    }

    async fn watch(&self, kind: ObjectKind, from: u64) -> ObjectResult<RawWatch> {
        let stream = self.state.store.watch(store_kind(kind), from).await.map_err(from_store)?;
        Ok(stream
            .map(|item| {
                Ok(match item {
                    WatchItem::Bookmark(revision) => RawEvent::Bookmark(revision),
                    WatchItem::Event(e) => match e.event_type {
                        EventType::Added => RawEvent::Added(e.object.data.to_vec()),
                        EventType::Modified => RawEvent::Modified(e.object.data.to_vec()),
                        EventType::Deleted => RawEvent::Deleted(e.object.data.to_vec()),
                    },
                })
            })
            .boxed())
    }

    async fn get_node(&self, name: &str) -> ObjectResult<Option<Node>> {
        match self.state.store.get(Kind::Nodes, name).await.map_err(from_store)? {
            Some(v) => v.decode().map(Some).map_err(from_store),
            None => Ok(None),
        }
    }

    async fn get_sandbox(&self, id: &str) -> ObjectResult<Option<Sandbox>> {
        match self.state.store.get(Kind::Sandboxes, id).await.map_err(from_store)? {
            Some(v) => v.decode().map(Some).map_err(from_store),
            None => Ok(None),
        }
    }

    async fn put_node_status(&self, name: &str, status: &NodeStatus, resource_version: &str) -> ObjectResult<Node> {
        let expect = parse_revision(resource_version)?;
        let stored = apiserver::write_node_status(&self.state, name, status, Some(expect)).await.map_err(from_api)?;
        stored.decode().map_err(from_store)
    }

    async fn put_sandbox_status(
        &self,
        id: &str,
        status: &SandboxStatus,
        resource_version: &str,
    ) -> ObjectResult<Sandbox> {
        let expect = parse_revision(resource_version)?;
        let stored = apiserver::write_sandbox_status(&self.state, id, status, Some(expect)).await.map_err(from_api)?;
        stored.decode().map_err(from_store)
    }

    async fn remove_sandbox(&self, id: &str, resource_version: &str) -> ObjectResult<()> {
        let expect = parse_revision(resource_version)?;
        self.state.store.delete(Kind::Sandboxes, id, Some(expect)).await.map(|_| ()).map_err(from_store)
    }
}
