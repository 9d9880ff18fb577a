//! The `LeaseClient` trait: how a leader elector reads and compare-and-swaps its `Lease`.

use crate::objects::ObjectResult;
use async_trait::async_trait;
use sandboxd_api::Lease;

/// Lease reads and compare-and-swap writes.
#[async_trait]
pub trait LeaseClient: Send + Sync + 'static {
    async fn get_lease(&self, name: &str) -> ObjectResult<Option<Lease>>;
    /// Creates the lease; `Conflict` if it exists.
    async fn create_lease(&self, lease: &Lease) -> ObjectResult<Lease>;
    /// Replaces the lease if it is still at `lease.resource_version`; `Conflict` otherwise.
    async fn update_lease(&self, lease: &Lease) -> ObjectResult<Lease>;
}
