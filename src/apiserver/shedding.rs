//! Load shedding in the spirit of Kubernetes' API Priority and Fairness: requests are classed
//! (`system`, `workload`, `long-running`), each class has its own bound on requests in flight, and a
//! request over its class's bound gets an immediate 429 with `Retry-After` instead of queueing.
//!
//! A user flood fills only `workload`, so controllers' status writes, heartbeats, leases and
//! `/metrics` (`system`) keep their share; watches, followed logs, exec and file transfers
//! (`long-running`) hold their slot until their response ends. Fair queueing per identity waits
//! for identities (issue 15).

use super::error::ApiError;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A request's priority class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Controllers and nodes: status writes, finalize, heartbeats, node registration, leases, metrics.
    System,
    /// Users: everything else.
    Workload,
    /// Requests whose answer is a stream: watches, followed logs, exec, file transfers.
    LongRunning,
}

impl Class {
    pub fn as_str(self) -> &'static str {
        match self {
            Class::System => "system",
            Class::Workload => "workload",
            Class::LongRunning => "long-running",
        }
    }
}

/// Requests in flight per class (from configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InflightLimits {
    pub system: usize,
    pub workload: usize,
    pub long_running: usize,
}

/// The permits of each class.
#[derive(Clone)]
pub struct Shedder {
    system: Arc<Semaphore>,
    workload: Arc<Semaphore>,
    long_running: Arc<Semaphore>,
    limits: InflightLimits,
}

impl Shedder {
    pub fn new(limits: InflightLimits) -> Shedder {
        Shedder {
            system: Arc::new(Semaphore::new(limits.system)),
            workload: Arc::new(Semaphore::new(limits.workload)),
            long_running: Arc::new(Semaphore::new(limits.long_running)),
            limits,
        }
    }

    fn admit(&self, class: Class) -> Result<OwnedSemaphorePermit, ApiError> {
        let (permits, limit) = match class {
            Class::System => (&self.system, self.limits.system),
            Class::Workload => (&self.workload, self.limits.workload),
            Class::LongRunning => (&self.long_running, self.limits.long_running),
        };
        permits.clone().try_acquire_owned().map_err(|_| {
            ApiError::TooManyRequests(format!(
                "the server is at its limit of {limit} {} requests in flight; retry after the Retry-After delay",
                class.as_str()
            ))
        })
    }
}

/// The class of a request, by method, path and query.
pub fn classify(method: &Method, path: &str, query: &str) -> Class {
    let streams = query.split('&').any(|p| p == "watch=true" || p == "follow=true");
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let data_plane = matches!(segments.as_slice(), ["api", "v1", "sandboxes", _, "exec" | "files", ..]);
    if streams || data_plane {
        return Class::LongRunning;
    }
    let system = match segments.as_slice() {
        ["metrics"] | ["api", "v1", "leases", ..] => true,
        ["api", "v1", "nodes"] => method == Method::POST,
        ["api", "v1", "nodes", _, "status" | "heartbeat"] => true,
        ["api", "v1", "sandboxes", _, "status" | "finalize"] => true,
        _ => false,
    };
    if system {
        Class::System
    } else {
        Class::Workload
    }
}

/// Admits a request into its class or answers 429; a long-running request keeps its slot until its
/// response body ends.
pub async fn shed(State(shedder): State<Shedder>, request: Request, next: Next) -> Response {
    let class = classify(request.method(), request.uri().path(), request.uri().query().unwrap_or(""));
    let permit = match shedder.admit(class) {
        Ok(permit) => permit,
        Err(refusal) => return refusal.into_response(),
    };
    let response = next.run(request).await;
    if class != Class::LongRunning {
        return response;
    }
    // The explicit content-length header (if any) stays; only the body is wrapped.
    let (parts, body) = response.into_parts();
    let body = body.into_data_stream().map(move |chunk| {
        let _held = &permit;
        chunk
    });
    Response::from_parts(parts, Body::from_stream(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_classed_by_route() {
        let class = |method: Method, path: &str, query: &str| classify(&method, path, query);
        assert_eq!(class(Method::PUT, "/api/v1/sandboxes/a/status", ""), Class::System);
        assert_eq!(class(Method::POST, "/api/v1/nodes/n/heartbeat", ""), Class::System);
        assert_eq!(class(Method::POST, "/api/v1/nodes", ""), Class::System);
        assert_eq!(class(Method::PUT, "/api/v1/leases/l", ""), Class::System);
        assert_eq!(class(Method::GET, "/metrics", ""), Class::System);
        assert_eq!(class(Method::GET, "/api/v1/nodes", ""), Class::Workload);
        assert_eq!(class(Method::POST, "/api/v1/sandboxes", ""), Class::Workload);
        assert_eq!(class(Method::GET, "/api/v1/sandboxes", "limit=5"), Class::Workload);
        assert_eq!(class(Method::GET, "/api/v1/sandboxes", "watch=true"), Class::LongRunning);
        assert_eq!(class(Method::GET, "/api/v1/sandboxes/a/logs", "follow=true&tail=1"), Class::LongRunning);
        assert_eq!(class(Method::GET, "/api/v1/sandboxes/a/logs", ""), Class::Workload);
        assert_eq!(class(Method::POST, "/api/v1/sandboxes/a/exec", ""), Class::LongRunning);
        assert_eq!(class(Method::PUT, "/api/v1/sandboxes/a/files/archive", "path=/x"), Class::LongRunning);
    }

    #[test]
    fn a_full_class_refuses_only_itself() {
        let shedder = Shedder::new(InflightLimits { system: 1, workload: 1, long_running: 1 });
        let held = shedder.admit(Class::Workload).unwrap();
        assert!(matches!(shedder.admit(Class::Workload), Err(ApiError::TooManyRequests(_))));
        assert!(shedder.admit(Class::System).is_ok(), "a user flood leaves the system class free");
        drop(held);
        assert!(shedder.admit(Class::Workload).is_ok());
    }
}
