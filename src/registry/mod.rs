//! Each kind's write rules, below both the HTTP API and the in-process client: creates with defaults,
//! spec updates, status writes with their transition checks, the finalize rule, and CAS retries.
//!
//! HTTP handlers and `InProcessObjects` call this layer and never each other, so a rule holds the same
//! whichever way a write arrives, and each caller maps `RegistryError` once.

mod drain;
mod events;
mod nodes;
mod sandboxes;

pub use events::Swept;
pub use sandboxes::{check_status_transition, mark_terminating, Created};

use crate::address_policy::AddressPolicy;
use crate::config::Config;
use crate::store::{Store, StoreError};
use sandboxd_api::validate::SandboxPolicy;
use sandboxd_contracts::clock::{Clock, SystemClock};
use sandboxd_contracts::AgentClient;
use std::sync::Arc;
use std::time::Duration;

/// How a registry write failed; each caller maps these to its own errors in one place.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The request breaks a rule (validation, an illegal transition, an immutable field).
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    /// A precondition failed (stale `resource_version`, a different spec, the wrong phase).
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Gone(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl From<StoreError> for RegistryError {
    fn from(e: StoreError) -> Self {
        let message = e.to_string();
        match e {
            StoreError::AlreadyExists { .. } | StoreError::Conflict { .. } => RegistryError::Conflict(message),
            StoreError::NotFound { .. } => RegistryError::NotFound(message),
            StoreError::Gone { .. } | StoreError::Ahead { .. } => RegistryError::Gone(message),
            StoreError::Unavailable(_) => RegistryError::Unavailable(message),
            StoreError::Corrupt(_) => RegistryError::Internal(message),
        }
    }
}

pub type RegistryResult<T> = Result<T, RegistryError>;

/// The write rules of every kind, over one store.
#[derive(Clone)]
pub struct Registry {
    store: Arc<dyn Store>,
    policy: SandboxPolicy,
    default_max_alloc_percent: u32,
    /// Which node addresses may be registered: a literal `spec.ip` the agent client would refuse is a 400.
    agent_policy: AddressPolicy,
    /// Asked once, best effort, for a new node's resources; `None` makes no agent calls.
    agents: Option<Arc<dyn AgentClient>>,
    initial_status_bound: Duration,
    /// Where timestamps come from (`created_at`, `updated_at`, `last_transition_at`, `expire_at`).
    clock: Arc<dyn Clock>,
}

/// How long a node create may wait for the agent's first status report.
const INITIAL_STATUS_BOUND: Duration = Duration::from_secs(1);

impl Registry {
    pub fn new(store: Arc<dyn Store>, config: &Config) -> Registry {
        Registry {
            store,
            policy: config.sandbox_policy(),
            default_max_alloc_percent: config.max_alloc_percent,
            agent_policy: config.agent_policy.clone(),
            agents: None,
            initial_status_bound: INITIAL_STATUS_BOUND.min(config.heartbeat_timeout),
            clock: Arc::new(SystemClock),
        }
    }

    /// The same rules, stamping times from `clock` (tests move it instead of sleeping).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Registry {
        self.clock = clock;
        self
    }

    /// The same rules, asking `agents` for a new node's resources.
    pub fn with_agents(mut self, agents: Arc<dyn AgentClient>) -> Registry {
        self.agents = Some(agents);
        self
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn policy(&self) -> &SandboxPolicy {
        &self.policy
    }
}

/// Encodes an object for the store; API objects always serialize.
fn encode<T: serde::Serialize>(object: &T) -> RegistryResult<Vec<u8>> {
    serde_json::to_vec(object).map_err(|e| RegistryError::Internal(e.to_string()))
}
