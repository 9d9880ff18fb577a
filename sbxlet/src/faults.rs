//! Injected faults: what can be switched on, and the middleware that applies them to agent answers.

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// Faults a simulated agent can be told to show; the default is a healthy agent.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Faults {
    /// `GET /healthz` answers 500.
    pub health_failing: bool,
    /// `GET /api/v1/status` answers 500.
    pub status_failing: bool,
    /// Delay added before every answer.
    pub latency_ms: u64,
    /// Probability (0.0–1.0) that a `/api/v1/sandboxes*` call answers 500 without doing anything.
    pub error_rate: f64,
    /// Every answer is a 200 with a non-JSON body (the call itself still takes effect).
    pub garbage: bool,
    /// Published ports answer 503 instead of 200.
    pub probe_503: bool,
}

impl Faults {
    /// Why these faults cannot be applied, if they cannot.
    pub fn problem(&self) -> Option<String> {
        if !(0.0..=1.0).contains(&self.error_rate) {
            return Some(format!("error_rate {} is not in 0.0-1.0", self.error_rate));
        }
        None
    }
}

/// The faults currently in force on one agent, shared by its API and its published ports.
#[derive(Debug, Default)]
pub(crate) struct FaultSwitch(RwLock<Faults>);

impl FaultSwitch {
    pub(crate) fn new(faults: Faults) -> Self {
        FaultSwitch(RwLock::new(faults))
    }

    pub(crate) fn current(&self) -> Faults {
        self.0.read().clone()
    }

    pub(crate) fn replace(&self, faults: Faults) {
        *self.0.write() = faults;
    }

    pub(crate) fn probe_503(&self) -> bool {
        self.0.read().probe_503
    }
}

/// The failure an agent fakes for one request, before running it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InjectedFailure {
    Health,
    Status,
    Random,
}

impl InjectedFailure {
    fn message(self) -> &'static str {
        match self {
            InjectedFailure::Health => "injected fault: health failing",
            InjectedFailure::Status => "injected fault: status failing",
            InjectedFailure::Random => "injected fault: random error",
        }
    }
}

/// Decides which failure, if any, a request to `path` gets; `roll` is a uniform sample in [0, 1).
pub(crate) fn failure_for(path: &str, faults: &Faults, roll: f64) -> Option<InjectedFailure> {
    match path {
        "/healthz" if faults.health_failing => Some(InjectedFailure::Health),
        "/api/v1/status" if faults.status_failing => Some(InjectedFailure::Status),
        p if is_sandbox_path(p) && roll < faults.error_rate => Some(InjectedFailure::Random),
        _ => None,
    }
}

fn is_sandbox_path(path: &str) -> bool {
    path == "/api/v1/sandboxes" || path.starts_with("/api/v1/sandboxes/")
}

/// Applies the agent's faults around every request except the `/sim/*` admin endpoints.
pub(crate) async fn inject_faults(State(switch): State<Arc<FaultSwitch>>, request: Request, next: Next) -> Response {
    // The admin endpoints stay truthful so a test can always switch faults back off.
    if request.uri().path().starts_with("/sim/") {
        return next.run(request).await;
    }
    let faults = switch.current();
    if faults.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(faults.latency_ms)).await;
    }
    let answer = match failure_for(request.uri().path(), &faults, fastrand::f64()) {
        Some(failure) => injected_error(failure),
        None => next.run(request).await,
    };
    if faults.garbage {
        return garbage_answer();
    }
    answer
}

fn injected_error(failure: InjectedFailure) -> Response {
    let body = sandboxd_api::agent::ErrorBody { error: failure.message().into() };
    (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(body)).into_response()
}

fn garbage_answer() -> Response {
    (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain")], "<<garbage>> this is not json {").into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_fault_hits_only_its_paths() {
        let health = Faults { health_failing: true, ..Faults::default() };
        assert_eq!(failure_for("/healthz", &health, 0.5), Some(InjectedFailure::Health));
        assert_eq!(failure_for("/api/v1/status", &health, 0.5), None);

        let status = Faults { status_failing: true, ..Faults::default() };
        assert_eq!(failure_for("/api/v1/status", &status, 0.5), Some(InjectedFailure::Status));
        assert_eq!(failure_for("/healthz", &status, 0.5), None);

        let flaky = Faults { error_rate: 0.3, ..Faults::default() };
        assert_eq!(failure_for("/api/v1/sandboxes", &flaky, 0.29), Some(InjectedFailure::Random));
        assert_eq!(failure_for("/api/v1/sandboxes/a/logs", &flaky, 0.1), Some(InjectedFailure::Random));
        assert_eq!(failure_for("/api/v1/sandboxes", &flaky, 0.3), None);
        assert_eq!(failure_for("/api/v1/sandboxesx", &flaky, 0.0), None);
        assert_eq!(failure_for("/api/v1/reconcile", &flaky, 0.0), None);
    }

    #[test]
    fn healthy_faults_inject_nothing() {
        for path in ["/healthz", "/api/v1/status", "/api/v1/sandboxes"] {
            assert_eq!(failure_for(path, &Faults::default(), 0.0), None);
        }
    }

    #[test]
    fn error_rate_outside_unit_interval_is_a_problem() {
        assert!(Faults { error_rate: 1.5, ..Faults::default() }.problem().is_some());
        assert!(Faults { error_rate: -0.1, ..Faults::default() }.problem().is_some());
        assert!(Faults { error_rate: f64::NAN, ..Faults::default() }.problem().is_some());
        assert_eq!(Faults { error_rate: 1.0, ..Faults::default() }.problem(), None);
    }

    #[test]
    fn partial_fault_json_leaves_the_rest_off() {
        let f: Faults = serde_json::from_str(r#"{"latency_ms": 20}"#).unwrap();
        assert_eq!(f, Faults { latency_ms: 20, ..Faults::default() });
    }
}
