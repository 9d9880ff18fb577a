//! Load shedding in the spirit of Kubernetes' API Priority and Fairness: requests are classed
//! (`system`, `workload`, `long-running`), each class has its own bound on requests in flight, and a
//! request over its class's bound gets an immediate 429 with `Retry-After` instead of queueing.
//!
//! A user flood fills only `workload`, so controllers' status writes, heartbeats, leases and
//! `/metrics` (`system`) keep their share; watches, followed logs, exec and file transfers
//! (`long-running`) hold their slot until their response ends. Within a class no one identity may
//! hold more than its share of the slots (`max_inflight_share`), so one user's flood leaves room
//! for the others; requests are admitted after authentication, so refused callers take no slot.

use super::error::ApiError;
use axum::body::Body;
use axum::http::Method;
use axum::response::Response;
use futures::StreamExt;
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A request's priority class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// Controllers and nodes: status writes, finalize, heartbeats, node registration, leases, metrics.
    System,
    /// Users: everything else.
    Workload,
    /// Requests whose answer is a stream: watches, followed logs, exec, file transfers.
    LongRunning,
}

impl Class {
    pub const ALL: [Class; 3] = [Class::System, Class::Workload, Class::LongRunning];

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

/// The permits of each class, and what each identity holds of them.
#[derive(Clone)]
pub struct Shedder {
    system: Arc<Semaphore>,
    workload: Arc<Semaphore>,
    long_running: Arc<Semaphore>,
    limits: InflightLimits,
    /// Percent of a class one identity may hold (100: no per-identity bound).
    share_percent: u32,
    /// Slots held per (class, identity); an entry goes when its count returns to zero.
    held: Arc<dashmap::DashMap<(Class, Arc<str>), usize>>,
}

/// A request's place in its class: its slot, and its identity's count, both given back on drop.
pub struct Admission {
    _permit: OwnedSemaphorePermit,
    _share: Option<ShareGuard>,
}

struct ShareGuard {
    held: Arc<dashmap::DashMap<(Class, Arc<str>), usize>>,
    key: (Class, Arc<str>),
}

impl Drop for ShareGuard {
    fn drop(&mut self) {
        self.held.remove_if_mut(&self.key, |_, count| {
            *count -= 1;
            *count == 0
        });
    }
}

impl Shedder {
    pub fn new(limits: InflightLimits) -> Shedder {
        Shedder::with_share(limits, 100)
    }

    /// Classes bounded by `limits`, one identity holding at most `share_percent` of each.
    pub fn with_share(limits: InflightLimits, share_percent: u32) -> Shedder {
        Shedder {
            system: Arc::new(Semaphore::new(limits.system)),
            workload: Arc::new(Semaphore::new(limits.workload)),
            long_running: Arc::new(Semaphore::new(limits.long_running)),
            limits,
            share_percent: share_percent.clamp(1, 100),
            held: Arc::default(),
        }
    }

    fn limit(&self, class: Class) -> usize {
        match class {
            Class::System => self.limits.system,
            Class::Workload => self.limits.workload,
            Class::LongRunning => self.limits.long_running,
        }
    }

    /// Requests of `class` in flight now.
    pub fn in_flight(&self, class: Class) -> usize {
        let permits = match class {
            Class::System => &self.system,
            Class::Workload => &self.workload,
            Class::LongRunning => &self.long_running,
        };
        self.limit(class).saturating_sub(permits.available_permits())
    }

    /// Most slots of `class` one identity may hold.
    pub fn identity_cap(&self, class: Class) -> usize {
        (self.limit(class) * self.share_percent as usize / 100).max(1)
    }

    /// Identities holding slots now (a gauge for /metrics, and the bound on `held`).
    pub fn identities_holding(&self) -> usize {
        self.held.len()
    }

    /// Admits a request of `identity` (`None`: not bounded per identity) into `class`, or 429.
    pub fn admit(&self, class: Class, identity: Option<&str>) -> Result<Admission, ApiError> {
        let share = match identity.filter(|_| self.share_percent < 100) {
            Some(identity) => Some(self.take_share(class, identity)?),
            None => None,
        };
        let permits = match class {
            Class::System => &self.system,
            Class::Workload => &self.workload,
            Class::LongRunning => &self.long_running,
        };
        let permit = permits.clone().try_acquire_owned().map_err(|_| {
            ApiError::TooManyRequests(format!(
                "the server is at its limit of {} {} requests in flight; retry after the Retry-After delay",
                self.limit(class),
                class.as_str()
            ))
        })?;
        Ok(Admission { _permit: permit, _share: share })
    }

    fn take_share(&self, class: Class, identity: &str) -> Result<ShareGuard, ApiError> {
        let cap = self.identity_cap(class);
        let key = (class, Arc::<str>::from(identity));
        let mut count = self.held.entry(key.clone()).or_insert(0);
        if *count >= cap {
            return Err(ApiError::TooManyRequests(format!(
                "{identity} holds {cap} {} requests in flight, its share of the server (max_inflight_share); retry after the Retry-After delay",
                class.as_str()
            )));
        }
        *count += 1;
        Ok(ShareGuard { held: self.held.clone(), key })
    }
}

/// The class of a request of `identity`: streams are long-running; controllers and nodes are
/// system, whatever they call; others by route (`classify`).
pub fn classify_for(role: &sandboxd_api::auth::Role, method: &Method, path: &str, query: &str) -> Class {
    use sandboxd_api::auth::Role;
    match classify(method, path, query) {
        Class::Workload if matches!(role, Role::Controller | Role::Node(_)) => Class::System,
        class => class,
    }
}

/// Whether `system_listen` answers a request of `role` in `class`: controllers and nodes whatever
/// they call (a remote controller's informers watch there too), anyone else only system-class
/// routes (`/metrics`, leases, status writes); users' work belongs on the main listener.
pub fn serves_on_system_listener(role: &sandboxd_api::auth::Role, class: Class) -> bool {
    use sandboxd_api::auth::Role;
    matches!(role, Role::Controller | Role::Node(_)) || class == Class::System
}

/// Whether the boolean query flag `name` is on, as the handlers read it: `name`, `name=`,
/// `name=true` and `name=1` all are.
pub fn query_flag(query: &str, name: &str) -> bool {
    query.split('&').any(|p| {
        let (key, value) = p.split_once('=').unwrap_or((p, ""));
        key == name && matches!(value, "" | "true" | "1")
    })
}

/// The class of a request, by method, path and query.
pub fn classify(method: &Method, path: &str, query: &str) -> Class {
    let streams = query_flag(query, "watch") || query_flag(query, "follow");
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let data_plane = matches!(segments.as_slice(), ["api", "v1", "sandboxes", _, "exec" | "files", ..]);
    let watch_many = segments.as_slice() == ["api", "v1", "watch"];
    if streams || data_plane || watch_many {
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

/// A request's admission, for a handler that must keep it past its response: a WebSocket session
/// runs after the 101 answer, whose empty body would give the slot back at once.
#[derive(Clone)]
pub struct AdmissionCell(Arc<parking_lot::Mutex<Option<Admission>>>);

impl AdmissionCell {
    pub fn new(admission: Admission) -> AdmissionCell {
        AdmissionCell(Arc::new(parking_lot::Mutex::new(Some(admission))))
    }

    /// The admission, once: whoever takes it holds the slot until dropping it.
    pub fn take(&self) -> Option<Admission> {
        self.0.lock().take()
    }
}

/// Holds `admission` until the body of `response` ends (long-running requests), or returns.
pub fn hold_until_streamed(class: Class, admission: Admission, response: Response) -> Response {
    if class != Class::LongRunning {
        return response;
    }
    // The explicit content-length header (if any) stays; only the body is wrapped.
    let (parts, body) = response.into_parts();
    let body = body.into_data_stream().map(move |chunk| {
        let _held = &admission;
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
        assert_eq!(class(Method::GET, "/api/v1/sandboxes", "limit=5&watch=1"), Class::LongRunning);
        assert_eq!(class(Method::GET, "/api/v1/sandboxes", "watch"), Class::LongRunning);
        assert_eq!(class(Method::GET, "/api/v1/sandboxes", "watch=false"), Class::Workload);
        assert_eq!(class(Method::GET, "/api/v1/sandboxes/a/logs", "follow=true&tail=1"), Class::LongRunning);
        assert_eq!(class(Method::GET, "/api/v1/sandboxes/a/logs", ""), Class::Workload);
        assert_eq!(class(Method::POST, "/api/v1/sandboxes/a/exec", ""), Class::LongRunning);
        assert_eq!(class(Method::POST, "/api/v1/watch", ""), Class::LongRunning);
        assert_eq!(class(Method::PUT, "/api/v1/sandboxes/a/files/archive", "path=/x"), Class::LongRunning);
    }

    #[test]
    fn a_full_class_refuses_only_itself() {
        let shedder = Shedder::new(InflightLimits { system: 1, workload: 1, long_running: 1 });
        let held = shedder.admit(Class::Workload, None).unwrap();
        assert!(matches!(shedder.admit(Class::Workload, None), Err(ApiError::TooManyRequests(_))));
        assert!(shedder.admit(Class::System, None).is_ok(), "a user flood leaves the system class free");
        drop(held);
        assert!(shedder.admit(Class::Workload, None).is_ok());
    }

    #[test]
    fn one_identity_holds_at_most_its_share_and_leaves_the_rest_to_others() {
        let shedder = Shedder::with_share(InflightLimits { system: 4, workload: 4, long_running: 4 }, 50);
        assert_eq!(shedder.identity_cap(Class::Workload), 2);
        let a1 = shedder.admit(Class::Workload, Some("alice")).unwrap();
        let a2 = shedder.admit(Class::Workload, Some("alice")).unwrap();
        let refused = shedder.admit(Class::Workload, Some("alice")).err().unwrap();
        assert!(refused.to_string().contains("alice holds 2 workload requests"), "{refused}");
        let b1 = shedder.admit(Class::Workload, Some("bob")).unwrap();
        assert!(shedder.admit(Class::System, Some("alice")).is_ok(), "shares are per class");
        drop((a1, a2, b1));
        assert_eq!(shedder.identities_holding(), 0, "no entry outlives its requests");
        assert!(shedder.admit(Class::Workload, Some("alice")).is_ok());
    }

    #[test]
    fn controllers_and_nodes_are_system_whatever_they_read() {
        use sandboxd_api::auth::Role;
        let get = Method::GET;
        assert_eq!(classify_for(&Role::Controller, &get, "/api/v1/nodes", ""), Class::System);
        assert_eq!(classify_for(&Role::Node("n".into()), &get, "/api/v1/nodes/n", ""), Class::System);
        assert_eq!(classify_for(&Role::User, &get, "/api/v1/nodes", ""), Class::Workload);
        assert_eq!(classify_for(&Role::Controller, &get, "/api/v1/nodes", "watch=true"), Class::LongRunning);
    }
}
