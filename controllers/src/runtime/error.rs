//! `ControllerError`: why a reconcile failed, typed, so the queue retries each kind the right way.

use crate::agent::AgentError;
use crate::objects::ObjectError;

/// Why a reconcile failed. The work queue picks the retry from the kind (`WorkQueue::record_outcome`):
/// a conflict is retried after the base delay without growing the key's backoff, a transient failure
/// backs off per key, and an invalid object is not retried until it changes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControllerError {
    /// Another writer changed the object first: read the new version and try again.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The API or an agent failed or could not be reached.
    #[error("{0}")]
    Transient(String),
    /// The object can never be reconciled as it is (e.g. the API refuses the write as illegal).
    #[error("invalid: {0}")]
    Invalid(String),
}

impl ControllerError {
    /// The same error with `what` in front of its message, keeping the kind.
    pub fn context(self, what: impl std::fmt::Display) -> ControllerError {
        match self {
            ControllerError::Conflict(m) => ControllerError::Conflict(format!("{what}: {m}")),
            ControllerError::Transient(m) => ControllerError::Transient(format!("{what}: {m}")),
            ControllerError::Invalid(m) => ControllerError::Invalid(format!("{what}: {m}")),
        }
    }
}

/// The one mapping from object-client errors to retry kinds.
impl From<ObjectError> for ControllerError {
    fn from(e: ObjectError) -> Self {
        match e {
            ObjectError::Conflict(m) => ControllerError::Conflict(m),
            ObjectError::Invalid(m) => ControllerError::Invalid(m),
            other @ (ObjectError::NotFound(_) | ObjectError::Gone(_) | ObjectError::Unavailable(_)) => {
                ControllerError::Transient(other.to_string())
            }
        }
    }
}

/// Agent failures are retried with backoff: even a refusal (a 4xx) can pass once the agent's state changes.
impl From<AgentError> for ControllerError {
    fn from(e: AgentError) -> Self {
        ControllerError::Transient(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_errors_map_to_retry_kinds() {
        assert!(matches!(ObjectError::Conflict("x".into()).into(), ControllerError::Conflict(_)));
        assert!(matches!(ObjectError::Invalid("x".into()).into(), ControllerError::Invalid(_)));
        assert!(matches!(ObjectError::Unavailable("x".into()).into(), ControllerError::Transient(_)));
        assert!(matches!(ObjectError::NotFound("x".into()).into(), ControllerError::Transient(_)));
        let unreachable: ControllerError = AgentError::Unreachable("x".into()).into();
        assert!(
            matches!(unreachable.context("node n"), ControllerError::Transient(m) if m == "node n: unreachable: x")
        );
    }
}
