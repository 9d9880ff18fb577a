//! The in-process `ObjectClient`: controllers in the server process use the registry directly, with the
//! same rules as the HTTP API.

use crate::registry::{Registry, RegistryError};
use crate::store::{ChangeType, Kind, StoreError, WatchItem};
use async_trait::async_trait;
use futures::StreamExt;
use sandboxd_api::node::NodeStatus;
use sandboxd_api::{Node, Sandbox, SandboxStatus};
use sandboxd_contracts::objects::{ObjectClient, ObjectError, ObjectKind, ObjectResult, RawEvent, RawWatch};
use sandboxd_contracts::LeaseClient;

/// List/watch and status writes over the local store, with the same semantics as the HTTP API.
#[derive(Clone)]
pub struct InProcessObjects {
    registry: Registry,
}

impl InProcessObjects {
    pub fn new(registry: Registry) -> InProcessObjects {
        InProcessObjects { registry }
    }

    fn store(&self) -> &dyn crate::store::Store {
        self.registry.store().as_ref()
    }
}

fn from_store(e: StoreError) -> ObjectError {
    from_registry(RegistryError::from(e))
}

/// The one mapping from registry errors to what controllers react to.
fn from_registry(e: RegistryError) -> ObjectError {
    match e {
        RegistryError::Conflict(m) => ObjectError::Conflict(m),
        RegistryError::NotFound(m) => ObjectError::NotFound(m),
        RegistryError::Gone(m) => ObjectError::Gone(m),
        RegistryError::Invalid(m) => ObjectError::Invalid(m),
        RegistryError::Unavailable(m) | RegistryError::Internal(m) => ObjectError::Unavailable(m),
    }
}

fn parse_revision(rv: &str) -> ObjectResult<u64> {
    rv.parse().map_err(|_| ObjectError::Invalid(format!("resource_version {rv:?} is not a revision")))
}

#[async_trait]
impl ObjectClient for InProcessObjects {
    async fn list(&self, kind: ObjectKind) -> ObjectResult<(Vec<Vec<u8>>, u64)> {
        let (items, revision) = self.store().list(kind).await.map_err(from_store)?;
        Ok((items.into_iter().map(|v| v.data.to_vec()).collect(), revision))
    }

    async fn watch(&self, kind: ObjectKind, from: u64) -> ObjectResult<RawWatch> {
        let stream = self.store().watch(kind, from).await.map_err(from_store)?;
        Ok(stream
            .map(|item| {
                Ok(match item {
                    WatchItem::Bookmark(revision) => RawEvent::Bookmark(revision),
                    WatchItem::Event(e) => match e.event_type {
                        ChangeType::Added => RawEvent::Added(e.object.data.to_vec()),
                        ChangeType::Modified => RawEvent::Modified(e.object.data.to_vec()),
                        ChangeType::Deleted => RawEvent::Deleted(e.object.data.to_vec()),
                    },
                    // Not Gone: the events already sent stand, so the informer resumes from its revision.
                    WatchItem::Lagged { buffer } => {
                        return Err(ObjectError::Unavailable(format!("watch fell more than {buffer} events behind")))
                    }
                })
            })
            .boxed())
    }

    async fn get_node(&self, name: &str) -> ObjectResult<Option<Node>> {
        match self.store().get(Kind::Nodes, name).await.map_err(from_store)? {
            Some(v) => v.decode().map(Some).map_err(from_store),
            None => Ok(None),
        }
    }

    async fn get_sandbox(&self, id: &str) -> ObjectResult<Option<Sandbox>> {
        match self.store().get(Kind::Sandboxes, id).await.map_err(from_store)? {
            Some(v) => v.decode().map(Some).map_err(from_store),
            None => Ok(None),
        }
    }

    async fn put_node_status(&self, name: &str, status: &NodeStatus, resource_version: &str) -> ObjectResult<Node> {
        let expect = parse_revision(resource_version)?;
        let (_, node) = self.registry.write_node_status(name, status, Some(expect)).await.map_err(from_registry)?;
        Ok(node)
    }

    async fn put_sandbox_status(
        &self,
        id: &str,
        status: &SandboxStatus,
        resource_version: &str,
    ) -> ObjectResult<Sandbox> {
        let expect = parse_revision(resource_version)?;
        let (_, sandbox) = self.registry.write_sandbox_status(id, status, Some(expect)).await.map_err(from_registry)?;
        Ok(sandbox)
    }

    async fn remove_sandbox(&self, id: &str, resource_version: &str) -> ObjectResult<()> {
        let expect = parse_revision(resource_version)?;
        self.registry.finalize_sandbox(id, expect).await.map_err(from_registry)
    }

    async fn record_events(&self, events: &[sandboxd_api::event::EventRecord]) -> ObjectResult<()> {
        self.registry.record_events(events).await.map_err(from_registry)
    }
}

#[async_trait]
impl LeaseClient for InProcessObjects {
    async fn get_lease(&self, name: &str) -> ObjectResult<Option<sandboxd_api::Lease>> {
        match self.store().get(Kind::Leases, name).await.map_err(from_store)? {
            Some(v) => v.decode().map(Some).map_err(from_store),
            None => Ok(None),
        }
    }

    async fn create_lease(&self, lease: &sandboxd_api::Lease) -> ObjectResult<sandboxd_api::Lease> {
        let stored =
            self.store().create(Kind::Leases, &lease.name, lease.to_stored_json()).await.map_err(from_store)?;
        stored.decode().map_err(from_store)
    }

    async fn update_lease(&self, lease: &sandboxd_api::Lease) -> ObjectResult<sandboxd_api::Lease> {
        let expect = parse_revision(&lease.resource_version)?;
        let stored = self
            .store()
            .update(Kind::Leases, &lease.name, lease.to_stored_json(), Some(expect))
            .await
            .map_err(from_store)?;
        stored.decode().map_err(from_store)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::store::{memory, StoreOptions};
    use sandboxd_controllers::runtime::lease::{Elector, LeaseSettings};
    use std::sync::Arc;
    use std::time::Duration;
    use tokio_util::sync::CancellationToken;

    #[tokio::test]
    async fn electors_over_the_store_hand_leadership_over_on_shutdown() {
        let store: Arc<dyn crate::store::Store> = Arc::new(memory::open(StoreOptions::default()));
        let objects = Arc::new(InProcessObjects::new(Registry::new(store, &Config::default())));
        let settings = LeaseSettings {
            duration: Duration::from_secs(3),
            renew_deadline: Duration::from_secs(2),
            retry: Duration::from_millis(200),
        };
        let start = |who: &str| {
            let (elector, leading) = Elector::new("sandboxd-controller-test", who, settings, objects.clone());
            let stop = CancellationToken::new();
            (leading, stop.clone(), tokio::spawn(elector.run(stop)))
        };
        let (a, stop_a, task_a) = start("a");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (b, stop_b, task_b) = start("b");
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(*a.borrow() && !*b.borrow());
        stop_a.cancel();
        task_a.await.unwrap();
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(*b.borrow(), "the standby took over well within the 3 s lease duration");
        let lease = objects.get_lease("sandboxd-controller-test").await.unwrap().unwrap();
        assert_eq!((lease.holder.as_str(), lease.transitions), ("b", 1));
        stop_b.cancel();
        task_b.await.unwrap();
    }
}
