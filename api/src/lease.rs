//! The Lease object used for leader election between controller replicas.

use serde::{Deserialize, Serialize};

/// The longest lease a holder may claim: a standby takes over at most this long after a leader dies.
pub const MAX_LEASE_SECONDS: u64 = 3600;

/// A leader lease, written only with compare-and-swap on `resource_version`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Lease {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub holder: String,
    #[serde(default)]
    pub lease_duration_seconds: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acquired_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renewed_at: Option<String>,
    #[serde(default)]
    pub transitions: u64,
    #[serde(default)]
    pub resource_version: String,
}

impl Lease {
    /// The lease as JSON without `resource_version`, which only the store assigns.
    pub fn to_stored_json(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(self).expect("leases serialize");
        if let Some(map) = value.as_object_mut() {
            map.remove("resource_version");
        }
        value
    }
}
