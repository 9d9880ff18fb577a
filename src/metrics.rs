//! The API server's and the store's metric families, registered beside the controllers' in the
//! process registry, and the middleware that times every request.

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use prometheus::{Histogram, HistogramVec, IntCounter, IntGauge, IntGaugeVec};
use sandboxd_controllers::runtime::metrics::{self as m, METRICS};
use std::sync::LazyLock;
use std::time::Instant;

/// Writes per commit: one to a few thousand.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0];

pub struct ServerMetrics {
    pub store_commits: IntCounter,
    pub store_writes: IntCounter,
    pub store_commit_duration: Histogram,
    pub store_commit_batch: Histogram,
    pub history_events: IntGauge,
    pub history_bytes: IntGauge,
    pub request_duration: HistogramVec,
    pub inflight: IntGaugeVec,
    pub watches_open: IntGauge,
    pub watch_identities: IntGauge,
    pub inflight_identity_shares: IntGauge,
}

/// The process's API server and store families.
pub static SERVER: LazyLock<ServerMetrics> = LazyLock::new(ServerMetrics::new);

impl ServerMetrics {
    fn new() -> ServerMetrics {
        let s = ServerMetrics {
            store_commits: m::counter(
                "sandboxd_store_commits_total",
                "Durable commits (transactions) of the embedded store.",
            ),
            store_writes: m::counter(
                "sandboxd_store_writes_total",
                "Object writes the embedded store's commits carried.",
            ),
            store_commit_duration: m::histogram(
                "sandboxd_store_commit_duration_seconds",
                "Duration of one durable commit of the embedded store (the fsync included).",
                m::LATENCY_BUCKETS,
            ),
            store_commit_batch: m::histogram(
                "sandboxd_store_commit_batch_size",
                "Object writes per durable commit of the embedded store.",
                BATCH_BUCKETS,
            ),
            history_events: gauge("sandboxd_watch_history_events", "Events the watch history holds."),
            history_bytes: gauge("sandboxd_watch_history_bytes", "Bytes of the events the watch history holds."),
            request_duration: m::histogram_vec(
                "sandboxd_apiserver_request_duration_seconds",
                "API requests by route template, verb and status code, until the response head (a watch: verb WATCH).",
                &["route", "verb", "code"],
                m::LATENCY_BUCKETS,
            ),
            inflight: m::int_gauge_vec(
                "sandboxd_apiserver_current_inflight_requests",
                "API requests in flight by priority class (system, workload, long-running).",
                &["class"],
            ),
            watches_open: gauge("sandboxd_watches_open", "Watch streams open on this server."),
            watch_identities: gauge("sandboxd_watch_identities", "Identities holding at least one open watch."),
            inflight_identity_shares: gauge(
                "sandboxd_inflight_identity_shares",
                "Identities holding in-flight request slots now.",
            ),
        };
        let registry = METRICS.registry();
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(s.store_commits.clone()),
            Box::new(s.store_writes.clone()),
            Box::new(s.store_commit_duration.clone()),
            Box::new(s.store_commit_batch.clone()),
            Box::new(s.history_events.clone()),
            Box::new(s.history_bytes.clone()),
            Box::new(s.request_duration.clone()),
            Box::new(s.inflight.clone()),
            Box::new(s.watches_open.clone()),
            Box::new(s.watch_identities.clone()),
            Box::new(s.inflight_identity_shares.clone()),
        ];
        for collector in collectors {
            registry.register(collector).expect("metric families have distinct names");
        }
        s
    }
}

fn gauge(name: &str, help: &str) -> IntGauge {
    IntGauge::new(name, help).expect("valid metric name")
}

/// Times each request into `sandboxd_apiserver_request_duration_seconds`. The route is the matched
/// template, so ids never become label values; a path no route matched is `unmatched`.
pub async fn time_request(request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_owned();
    let verb = verb_of(&request);
    let started = Instant::now();
    let response = next.run(request).await;
    let code = code_label(response.status());
    SERVER.request_duration.with_label_values(&[route.as_str(), verb, code]).observe(started.elapsed().as_secs_f64());
    response
}

/// The status code as a label: the codes this API answers, or the class (`4xx`) for any other,
/// which a node agent's answer relayed by the data plane may be: an agent must not mint label values.
fn code_label(status: axum::http::StatusCode) -> &'static str {
    const KNOWN: [&str; 30] = [
        "101", "200", "201", "202", "204", "206", "301", "302", "304", "400", "401", "403", "404", "405", "406", "408",
        "409", "410", "411", "412", "413", "414", "415", "416", "422", "429", "431", "500", "502", "503",
    ];
    if let Some(known) = KNOWN.iter().find(|k| **k == status.as_str()) {
        return known;
    }
    match status.as_u16() / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        _ => "5xx",
    }
}

/// The method, or WATCH for a list's watch (its duration ends at the response head, not the stream's
/// end); methods the API does not serve are OTHER, so a client cannot mint label values.
fn verb_of(request: &Request) -> &'static str {
    use axum::http::Method;
    let watching = request.uri().query().is_some_and(|q| crate::apiserver::shedding::query_flag(q, "watch"));
    match *request.method() {
        Method::GET if watching => "WATCH",
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        _ => "OTHER",
    }
}

/// Serves `/metrics` and `/healthz` on `listener` until `shutdown`: the endpoint of a controllers
/// process, which has no API of its own.
pub async fn serve(listener: tokio::net::TcpListener, shutdown: tokio_util::sync::CancellationToken) {
    use axum::routing::get;
    let app = axum::Router::new()
        .route("/metrics", get(|| async { exposition() }))
        .route("/healthz", get(|| async { axum::Json(serde_json::json!({ "ok": true })) }));
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await {
        tracing::error!(error = %e, "metrics listener stopped");
    }
}

/// The process's families as a `/metrics` answer.
pub fn exposition() -> Response {
    use axum::response::IntoResponse;
    LazyLock::force(&SERVER);
    let headers = [(axum::http::header::CONTENT_TYPE, m::CONTENT_TYPE)];
    (headers, METRICS.render()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, uri: &str) -> Request {
        Request::builder().method(method).uri(uri).body(axum::body::Body::empty()).unwrap()
    }

    #[test]
    fn codes_are_a_closed_set() {
        use axum::http::StatusCode;
        assert_eq!(code_label(StatusCode::CREATED), "201");
        assert_eq!(code_label(StatusCode::TOO_MANY_REQUESTS), "429");
        assert_eq!(code_label(StatusCode::from_u16(499).unwrap()), "4xx", "an agent's odd code is its class");
        assert_eq!(code_label(StatusCode::from_u16(504).unwrap()), "5xx");
        assert_eq!(code_label(StatusCode::IM_A_TEAPOT), "4xx");
    }

    #[test]
    fn verbs_are_a_closed_set_and_watches_have_their_own() {
        assert_eq!(verb_of(&request("GET", "/api/v1/sandboxes?watch=true&resource_version=3")), "WATCH");
        assert_eq!(verb_of(&request("GET", "/api/v1/sandboxes?watch=false")), "GET");
        assert_eq!(verb_of(&request("GET", "/api/v1/sandboxes?nowatch=true")), "GET");
        assert_eq!(verb_of(&request("GET", "/api/v1/nodes?watch")), "WATCH", "as the handlers read the flag");
        assert_eq!(verb_of(&request("GET", "/api/v1/nodes?limit=5&watch=1")), "WATCH");
        assert_eq!(verb_of(&request("POST", "/api/v1/sandboxes")), "POST");
        assert_eq!(verb_of(&request("BREW", "/api/v1/sandboxes")), "OTHER");
    }
}
