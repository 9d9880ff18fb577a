//! Integration tests of every REST route, driven in process with `tower::ServiceExt::oneshot`.
//!
//! The contract is `shared/spec/semantics.md` (error codes, validation, node and sandbox rules)
//! with the JSON shapes of `shared/spec/sandboxd-o-api.txt`. Tests marked
//! `` assert the contract where the server currently departs from it.

use axum::body::{Body, BodyDataStream};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::{Request, StatusCode};
use axum::Router;
use futures::StreamExt;
use sandboxd_api::time::parse_rfc3339;
use sandboxd_o::apiserver::auth::{Authenticator, Identity};
use sandboxd_o::apiserver::{router, ApiState};
use sandboxd_o::config::Config;
use sandboxd_o::store::{memory, HistoryLimits, Store, StoreOptions};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tower::ServiceExt;

// === fixtures ===

const TOKEN: &str = "t0ken-for-tests";
/// How long a watch read may wait for its next frame before the test fails.
const WATCH_WAIT: Duration = Duration::from_secs(5);

/// An app over a fresh memory store with the default configuration.
fn app() -> Router {
    app_with(StoreOptions::default(), None, Config::default().max_body_bytes)
}

fn app_with(options: StoreOptions, token: Option<&str>, max_body_bytes: usize) -> Router {
    let store: Arc<dyn Store> = Arc::new(memory::open(options));
    let mut state = ApiState::new(store.clone(), &Config::default());
    if let Some(token) = token {
        state = state.with_auth(Authenticator::required(store, vec![(token.to_string(), Identity::bootstrap_admin())]));
    }
    router(state, max_body_bytes)
}

/// A store that keeps only two events of history, so old revisions are compacted at once.
fn short_history() -> StoreOptions {
    StoreOptions { history: HistoryLimits::events(2, Duration::from_secs(600)), ..StoreOptions::default() }
}

fn request(method: &str, uri: &str, token: Option<&str>, body: Option<&Value>) -> Request<Body> {
    let mut builder = Request::builder().method(method).uri(uri);
    if let Some(token) = token {
        builder = builder.header(AUTHORIZATION, format!("Bearer {token}"));
    }
    match body {
        Some(body) => builder.header(CONTENT_TYPE, "application/json").body(Body::from(body.to_string())).unwrap(),
        None => builder.body(Body::empty()).unwrap(),
    }
}

/// Sends a request; returns the status and the body, which must be JSON.
async fn send(app: &Router, request: Request<Body>) -> (StatusCode, Value) {
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("{status} body is not JSON ({e}): {}", String::from_utf8_lossy(&bytes)));
    (status, body)
}

async fn call(app: &Router, method: &str, uri: &str, body: Option<Value>) -> (StatusCode, Value) {
    send(app, request(method, uri, None, body.as_ref())).await
}

/// A request with a raw body and content type (`None`: no content-type header).
async fn call_raw(app: &Router, uri: &str, content_type: Option<&str>, body: impl Into<Body>) -> (StatusCode, Value) {
    let mut builder = Request::builder().method("POST").uri(uri);
    if let Some(content_type) = content_type {
        builder = builder.header(CONTENT_TYPE, content_type);
    }
    send(app, builder.body(body.into()).unwrap()).await
}

/// The `error` message of an error body, asserting the `{"error": "..."}` shape.
fn error_of(body: &Value) -> &str {
    assert_eq!(body.as_object().map(|o| o.len()), Some(1), "error body has only `error`: {body}");
    body["error"].as_str().unwrap_or_else(|| panic!("no error message in {body}"))
}

/// Asserts status and that the error message contains `needle`; returns the message.
fn assert_error(got: (StatusCode, Value), want: StatusCode, needle: &str) -> String {
    let (status, body) = got;
    assert_eq!(status, want, "body: {body}");
    let message = error_of(&body).to_string();
    assert!(message.contains(needle), "error {message:?} should contain {needle:?}");
    message
}

/// Asserts a 400 whose message names `field` (as `field: why`) and contains `why`.
fn assert_invalid(got: (StatusCode, Value), field: &str, why: &str) {
    let message = assert_error(got, StatusCode::BAD_REQUEST, &format!("{field}: "));
    assert!(message.contains(why), "error {message:?} should say {why:?}");
}

/// `YYYY-MM-DDTHH:MM:SSZ`, parsed into Unix seconds.
fn timestamp(value: &Value) -> i64 {
    let s = value.as_str().unwrap_or_else(|| panic!("timestamp is not a string: {value}"));
    let shape_ok = s.len() == 20
        && s.bytes().enumerate().all(|(i, b)| match i {
            4 | 7 => b == b'-',
            10 => b == b'T',
            13 | 16 => b == b':',
            19 => b == b'Z',
            _ => b.is_ascii_digit(),
        });
    assert!(shape_ok, "{s:?} is not YYYY-MM-DDTHH:MM:SSZ");
    parse_rfc3339(s).unwrap_or_else(|| panic!("{s:?} does not parse"))
}

/// `resource_version` as a number (it must be a string on the wire).
fn revision(value: &Value) -> u64 {
    let s = value.as_str().unwrap_or_else(|| panic!("resource_version is not a string: {value}"));
    s.parse().unwrap_or_else(|_| panic!("resource_version {s:?} is not a number"))
}

fn node_body(id: &str, ip: &str, port: i64) -> Value {
    json!({ "id": id, "spec": { "ip": ip, "port": port } })
}

/// The create request of the reference.
fn sandbox_body(id: &str) -> Value {
    json!({
        "id": id,
        "spec": {
            "egress": true,
            "ttl_seconds": 3600,
            "ports": [{ "container_port": 80, "protocol": "tcp" }],
            "readiness_probe": {
                "protocol": "http", "port": 80, "path": "/",
                "initial_delay_seconds": 1, "period_seconds": 1, "timeout_seconds": 1,
                "success_threshold": 2, "failure_threshold": 3
            },
            "containers": [{
                "name": "web", "image": "nginx:latest", "args": [], "env": [], "work_dir": "",
                "resource": { "cpu": "200m", "memory": "256Mi", "ephemeral_storage": "96Mi" }
            }]
        }
    })
}

/// The smallest valid sandbox: one container, nothing else.
fn minimal_sandbox(id: &str) -> Value {
    json!({ "id": id, "spec": { "containers": [{ "name": "web", "image": "nginx:latest" }] } })
}

async fn create_node(app: &Router, id: &str) -> Value {
    let (status, body) = call(app, "POST", "/api/v1/nodes", Some(node_body(id, "192.168.0.3", 8080))).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body["node"].clone()
}

async fn create_sandbox(app: &Router, body: Value) -> Value {
    let (status, body) = call(app, "POST", "/api/v1/sandboxes", Some(body)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body["sandbox"].clone()
}

async fn get_sandbox(app: &Router, id: &str) -> (StatusCode, Value) {
    call(app, "GET", &format!("/api/v1/sandboxes/{id}"), None).await
}

/// Binds a sandbox to a node the way the scheduler does: phase Scheduled with `node_name`.
async fn bind(app: &Router, id: &str, node: &str) -> Value {
    let update = json!({ "status": { "phase": "Scheduled", "node_name": node } });
    let (status, body) = call(app, "PUT", &format!("/api/v1/sandboxes/{id}/status"), Some(update)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["sandbox"].clone()
}

/// The ids of the listed sandboxes and the list's top-level revision.
async fn list_sandboxes(app: &Router) -> (Vec<String>, u64) {
    let (status, body) = call(app, "GET", "/api/v1/sandboxes", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let ids = body["items"].as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap().to_string()).collect();
    (ids, revision(&body["resource_version"]))
}

/// Posts an invalid sandbox: asserts 400, that nothing was written, and returns the error.
async fn post_invalid_sandbox(body: Value) -> (StatusCode, Value) {
    let app = app();
    let got = call(&app, "POST", "/api/v1/sandboxes", Some(body)).await;
    assert_eq!(list_sandboxes(&app).await, (vec![], 0), "a rejected create wrote something");
    got
}

/// A watch response read one NDJSON line at a time.
struct Watch {
    frames: BodyDataStream,
    buffer: Vec<u8>,
}

impl Watch {
    async fn open(app: &Router, uri: &str) -> Watch {
        let response = app.clone().oneshot(request("GET", uri, None, None)).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[CONTENT_TYPE], "application/x-ndjson");
        Watch { frames: response.into_body().into_data_stream(), buffer: Vec::new() }
    }

    /// The next event, or `None` once the stream has ended.
    async fn next(&mut self) -> Option<Value> {
        loop {
            if let Some(end) = self.buffer.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=end).collect();
                return Some(serde_json::from_slice(&line[..end]).expect("each watch line is JSON"));
            }
            let frame = tokio::time::timeout(WATCH_WAIT, self.frames.next()).await.expect("watch stalled");
            match frame {
                Some(bytes) => self.buffer.extend_from_slice(&bytes.expect("watch body frame")),
                None => {
                    assert!(self.buffer.is_empty(), "watch ended inside a line");
                    return None;
                }
            }
        }
    }

    /// The next event's type and object, skipping bookmarks.
    async fn event(&mut self) -> (String, Value) {
        loop {
            let event = self.next().await.expect("watch ended early");
            let kind = event["type"].as_str().expect("event type").to_string();
            if kind != "BOOKMARK" {
                return (kind, event["object"].clone());
            }
        }
    }
}

// === health, fallbacks and openapi ===

#[tokio::test]
async fn healthz_returns_ok_true() {
    assert_eq!(call(&app(), "GET", "/healthz", None).await, (StatusCode::OK, json!({ "ok": true })));
}

#[tokio::test]
async fn unknown_route_is_404_json() {
    let got = call(&app(), "GET", "/api/v2/things", None).await;
    assert_error(got, StatusCode::NOT_FOUND, "/api/v2/things");
}

#[tokio::test]
async fn errors_are_served_as_application_json() {
    let app = app();
    for (method, uri) in [("GET", "/nope"), ("PATCH", "/api/v1/nodes"), ("GET", "/api/v1/nodes/x")] {
        let response = app.clone().oneshot(request(method, uri, None, None)).await.unwrap();
        assert!(response.status().is_client_error(), "{method} {uri}");
        assert_eq!(response.headers()[CONTENT_TYPE], "application/json", "{method} {uri}");
    }
}

#[tokio::test]
async fn wrong_method_is_405_json() {
    let app = app();
    for (method, uri) in [
        ("PATCH", "/api/v1/nodes"),
        ("POST", "/api/v1/nodes/node-a"),
        ("GET", "/api/v1/nodes/node-a/status"),
        ("DELETE", "/api/v1/sandboxes"),
        ("POST", "/api/v1/sandboxes/sbx-1"),
        ("GET", "/api/v1/sandboxes/sbx-1/status"),
        ("POST", "/healthz"),
    ] {
        let got = call(&app, method, uri, None).await;
        assert_error(got, StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    }
}

#[tokio::test]
async fn openapi_lists_every_route_path() {
    let (status, body) = call(&app(), "GET", "/openapi.json", None).await;
    assert_eq!(status, StatusCode::OK);
    let paths = body["paths"].as_object().expect("paths object");
    // Every path the router serves, read from the router's own source, so a new route cannot be missed.
    let router = include_str!("../src/apiserver/mod.rs");
    let routed: Vec<&str> = router
        .split(".route(\"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .filter(|path| *path != "/openapi.json")
        .collect();
    assert!(routed.len() >= 17, "found only {} routes in the router: {routed:?}", routed.len());
    for path in routed {
        assert!(paths.contains_key(path), "openapi.json lacks {path}: {:?}", paths.keys());
    }
    assert!(paths["/api/v1/sandboxes/{id}"].get("put").is_some(), "PUT /api/v1/sandboxes/{{id}} is documented");
}

#[tokio::test]
async fn openapi_states_what_validation_enforces() {
    let (_, doc) = call(&app(), "GET", "/openapi.json", None).await;
    let schemas = &doc["components"]["schemas"];
    let policy = Config::default().sandbox_policy();
    let (low, high) = policy.host_port_range.unwrap();
    let host_port = &schemas["PortSpec"]["properties"]["host_port"]["oneOf"];
    let bounds = host_port.as_array().and_then(|b| b.iter().find(|b| b.get("minimum").is_some()));
    let host_port = bounds.unwrap_or(&schemas["PortSpec"]["properties"]["host_port"]);
    assert_eq!((host_port["minimum"].as_u64(), host_port["maximum"].as_u64()), (Some(low.into()), Some(high.into())));
    assert_eq!(schemas["SandboxSpec"]["properties"]["containers"]["maxItems"], 32);
    assert_eq!(schemas["SandboxSpec"]["additionalProperties"], false);
    assert_eq!(schemas["Container"]["properties"]["name"]["pattern"], sandboxd_api::schema_rules::NAME);
    assert_eq!(schemas["Lease"]["properties"]["lease_duration_seconds"]["maximum"], 3600);
    let required: Vec<&str> =
        schemas["SandboxCreateRequest"]["required"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert!(required.contains(&"spec"), "{required:?}");
    assert_eq!(schemas["SandboxCreateRequest"]["oneOf"], json!([{ "required": ["id"] }, { "required": ["name"] }]));
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let responses = operation["responses"].as_object().unwrap();
            if path != "/healthz" {
                for status in ["400", "401", "429", "503"] {
                    assert!(responses.contains_key(status), "{method} {path} does not document {status}");
                }
            }
            if operation.get("requestBody").is_some() {
                assert!(responses.contains_key("413") && responses.contains_key("415"), "{method} {path}");
            }
            for parameter in operation["parameters"].as_array().into_iter().flatten() {
                if parameter["in"] == "path" {
                    assert_eq!(parameter["schema"]["pattern"], sandboxd_api::schema_rules::NAME, "{method} {path}");
                }
            }
        }
    }
}

#[tokio::test]
async fn an_overlong_request_target_is_a_json_414() {
    let long = format!("/api/v1/sandboxes/{}", "a".repeat(sandboxd_o::apiserver::MAX_URI_BYTES));
    assert_error(call(&app(), "GET", &long, None).await, StatusCode::URI_TOO_LONG, "more than 16384");
    let query = format!("/api/v1/sandboxes?cursor={}", "a".repeat(sandboxd_o::apiserver::MAX_URI_BYTES));
    assert_error(call(&app(), "GET", &query, None).await, StatusCode::URI_TOO_LONG, "request target");
}

#[tokio::test]
async fn structs_given_as_arrays_are_400_and_whole_floats_are_integers() {
    let app = app();
    let mut body = minimal_sandbox("shapes");
    body["spec"]["containers"][0]["resource"] = json!([null, null, null]);
    assert_error(
        call(&app, "POST", "/api/v1/sandboxes", Some(body)).await,
        StatusCode::BAD_REQUEST,
        "expected an object",
    );
    let mut body = minimal_sandbox("floats");
    body["spec"]["ports"] = json!([{ "container_port": 80.0 }]);
    body["spec"]["ttl_seconds"] = json!(60.0);
    let created = create_sandbox(&app, body).await;
    assert_eq!(created["spec"]["ports"][0]["container_port"], 80);
    let mut body = minimal_sandbox("fraction");
    body["spec"]["ports"] = json!([{ "container_port": 80.5 }]);
    assert_error(call(&app, "POST", "/api/v1/sandboxes", Some(body)).await, StatusCode::BAD_REQUEST, "container_port");
}

#[tokio::test]
async fn lease_bounds_and_list_cursors_are_checked() {
    let app = app();
    let lease = |duration: u64, transitions: u64| json!({ "name": "ctl", "holder": "a", "lease_duration_seconds": duration, "transitions": transitions });
    let hijack = call(&app, "POST", "/api/v1/leases", Some(lease(u64::MAX, 0))).await;
    assert_error(hijack, StatusCode::BAD_REQUEST, "lease_duration_seconds");
    let wrapped = call(&app, "POST", "/api/v1/leases", Some(lease(15, 1 << 63))).await;
    assert_error(wrapped, StatusCode::BAD_REQUEST, "transitions");
    assert_eq!(call(&app, "POST", "/api/v1/leases", Some(lease(3600, 0))).await.0, StatusCode::CREATED);
    assert_error(
        call(&app, "GET", "/api/v1/sandboxes?cursor=Not_A_Name", None).await,
        StatusCode::BAD_REQUEST,
        "cursor",
    );
    assert_eq!(call(&app, "GET", "/api/v1/sandboxes?cursor=&limit=5", None).await.0, StatusCode::OK);
}

// === request bodies: content type, size, JSON ===

#[tokio::test]
async fn malformed_json_is_400() {
    let got = call_raw(&app(), "/api/v1/sandboxes", Some("application/json"), r#"{"id": "sbx-1", "spec": "#).await;
    assert_error(got, StatusCode::BAD_REQUEST, "EOF while parsing");
}

#[tokio::test]
async fn empty_body_is_400() {
    let got = call_raw(&app(), "/api/v1/sandboxes", Some("application/json"), "").await;
    assert_error(got, StatusCode::BAD_REQUEST, "empty");
}

#[tokio::test]
async fn non_json_content_type_is_415() {
    let body = minimal_sandbox("sbx-1").to_string();
    let got = call_raw(&app(), "/api/v1/sandboxes", Some("text/plain"), body).await;
    assert_error(got, StatusCode::UNSUPPORTED_MEDIA_TYPE, "text/plain");
}

#[tokio::test]
async fn missing_content_type_is_415() {
    let app = app();
    let got = call_raw(&app, "/api/v1/sandboxes", None, minimal_sandbox("sbx-1").to_string()).await;
    assert_error(got, StatusCode::UNSUPPORTED_MEDIA_TYPE, "content-type");
    assert_eq!(list_sandboxes(&app).await, (vec![], 0));
}

#[tokio::test]
async fn json_content_type_with_charset_is_accepted() {
    let body = minimal_sandbox("sbx-1").to_string();
    let (status, body) = call_raw(&app(), "/api/v1/sandboxes", Some("application/json; charset=utf-8"), body).await;
    assert_eq!((status, &body["sandbox"]["id"]), (StatusCode::CREATED, &json!("sbx-1")));
}

#[tokio::test]
async fn body_over_the_limit_is_413_and_under_it_works() {
    let app = app_with(StoreOptions::default(), None, 1024);
    let mut big = minimal_sandbox("sbx-big");
    big["spec"]["labels"] = json!({ "filler": "x".repeat(2048) });
    let got = call(&app, "POST", "/api/v1/sandboxes", Some(big)).await;
    assert_error(got, StatusCode::PAYLOAD_TOO_LARGE, "max_body_bytes");
    assert_eq!(list_sandboxes(&app).await, (vec![], 0));
    let (status, _) = call(&app, "POST", "/api/v1/sandboxes", Some(minimal_sandbox("sbx-small"))).await;
    assert_eq!(status, StatusCode::CREATED);
}

// === nodes ===

#[tokio::test]
async fn post_node_creates_with_the_reference_shape() {
    let app = app();
    let (status, body) = call(&app, "POST", "/api/v1/nodes", Some(node_body("node-a", "192.168.0.3", 8080))).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let node = &body["node"];
    assert_eq!((&node["id"], &node["name"]), (&json!("node-a"), &json!("node-a")));
    assert_eq!((&node["ip"], &node["port"]), (&json!("192.168.0.3"), &json!(8080)));
    assert_eq!((&node["state"], &node["source"]), (&json!("Unknown"), &json!("api")));
    assert_eq!((&node["success_streak"], &node["failure_streak"]), (&json!(0), &json!(0)));
    assert_eq!(timestamp(&node["created_at"]), timestamp(&node["updated_at"]));
    assert!(node["resources"].is_object(), "{node}");
    assert_eq!(node["resources"]["max_alloc_percent"], 90);
    assert_eq!(node["sbxlet_base_url"], "http://192.168.0.3:8080");
    assert_eq!(revision(&node["resource_version"]), 1);
}

#[tokio::test]
async fn post_node_again_updates_with_200() {
    let app = app();
    let created = create_node(&app, "node-a").await;
    let (status, body) = call(&app, "POST", "/api/v1/nodes", Some(node_body("node-a", "192.168.0.3", 9090))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let node = &body["node"];
    assert_eq!(node["port"], 9090);
    assert_eq!(node["sbxlet_base_url"], "http://192.168.0.3:9090");
    assert_eq!(node["created_at"], created["created_at"]);
    assert!(revision(&node["resource_version"]) > revision(&created["resource_version"]));
}

#[tokio::test]
async fn post_node_accepts_name_as_id_alias_and_dns_names() {
    let body = json!({ "name": "node-b", "spec": { "ip": "worker-1.example", "port": 8080 } });
    let (status, body) = call(&app(), "POST", "/api/v1/nodes", Some(body)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["node"]["id"], "node-b");
    assert_eq!(body["node"]["sbxlet_base_url"], "http://worker-1.example:8080");
}

#[tokio::test]
async fn post_node_with_ipv6_brackets_the_base_url() {
    let (status, body) = call(&app(), "POST", "/api/v1/nodes", Some(node_body("node-6", "fd00::3", 8080))).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["node"]["ip"], "fd00::3");
    assert_eq!(body["node"]["sbxlet_base_url"], "http://[fd00::3]:8080");
}

#[tokio::test]
async fn post_node_rejects_a_bad_ip() {
    let app = app();
    for ip in ["300.1.1.1", "bad host", ""] {
        let got = call(&app, "POST", "/api/v1/nodes", Some(node_body("node-a", ip, 8080))).await;
        assert_invalid(got, "spec.ip", "");
    }
    assert_eq!(call(&app, "GET", "/api/v1/nodes", None).await.1["items"], json!([]));
}

#[tokio::test]
async fn post_node_rejects_a_port_out_of_range() {
    let app = app();
    for port in [0, 70000, -1] {
        let got = call(&app, "POST", "/api/v1/nodes", Some(node_body("node-a", "192.168.0.3", port))).await;
        assert_invalid(got, "spec.port", &format!("{port} is not in 1-65535"));
    }
    assert_eq!(call(&app, "GET", "/api/v1/nodes", None).await.1["items"], json!([]));
}

#[tokio::test]
async fn post_node_rejects_bad_names() {
    let app = app();
    for name in ["Node-A".to_string(), "n".repeat(64), String::new(), "node_a".into(), "-node".into()] {
        let got = call(&app, "POST", "/api/v1/nodes", Some(node_body(&name, "192.168.0.3", 8080))).await;
        assert_invalid(got, "id", "");
    }
    assert_eq!(call(&app, "GET", "/api/v1/nodes", None).await.1["items"], json!([]));
}

#[tokio::test]
async fn post_node_reports_every_problem_together() {
    let got = call(&app(), "POST", "/api/v1/nodes", Some(node_body("Bad", "300.1.1.1", 0))).await;
    let message = assert_error(got, StatusCode::BAD_REQUEST, "id: ");
    assert!(message.contains("spec.ip: ") && message.contains("spec.port: "), "{message}");
}

#[tokio::test]
async fn post_node_rejects_unknown_spec_fields() {
    let body = json!({ "id": "node-a", "spec": { "ip": "192.168.0.3", "port": 8080, "prot": 1 } });
    let got = call(&app(), "POST", "/api/v1/nodes", Some(body)).await;
    assert_error(got, StatusCode::BAD_REQUEST, "unknown field `prot`");
}

#[tokio::test]
async fn list_nodes_has_items_and_a_top_level_resource_version() {
    let app = app();
    create_node(&app, "node-b").await;
    create_node(&app, "node-a").await;
    let (status, body) = call(&app, "GET", "/api/v1/nodes", None).await;
    assert_eq!(status, StatusCode::OK);
    let names: Vec<&Value> = body["items"].as_array().unwrap().iter().map(|n| &n["name"]).collect();
    assert_eq!(names, [&json!("node-a"), &json!("node-b")]);
    assert_eq!(revision(&body["resource_version"]), 2);
}

#[tokio::test]
async fn get_node_returns_it() {
    let app = app();
    let created = create_node(&app, "node-a").await;
    assert_eq!(call(&app, "GET", "/api/v1/nodes/node-a", None).await, (StatusCode::OK, json!({ "node": created })));
}

#[tokio::test]
async fn get_unknown_node_is_404() {
    let got = call(&app(), "GET", "/api/v1/nodes/node-x", None).await;
    assert_error(got, StatusCode::NOT_FOUND, "node-x");
}

#[tokio::test]
async fn delete_node_returns_deleted_then_get_is_404() {
    let app = app();
    create_node(&app, "node-a").await;
    let got = call(&app, "DELETE", "/api/v1/nodes/node-a", None).await;
    assert_eq!(got, (StatusCode::OK, json!({ "deleted": "node-a" })));
    assert_error(call(&app, "GET", "/api/v1/nodes/node-a", None).await, StatusCode::NOT_FOUND, "node-a");
}

#[tokio::test]
async fn delete_unknown_node_is_404() {
    let got = call(&app(), "DELETE", "/api/v1/nodes/node-x", None).await;
    assert_error(got, StatusCode::NOT_FOUND, "node-x");
}

#[tokio::test]
async fn reposting_the_same_address_keeps_the_node_state() {
    let app = app();
    create_node(&app, "node-a").await;
    let ready = json!({ "status": { "state": "Ready", "success_streak": 2 } });
    assert_eq!(call(&app, "PUT", "/api/v1/nodes/node-a/status", Some(ready)).await.0, StatusCode::OK);
    let (_, body) = call(&app, "POST", "/api/v1/nodes", Some(node_body("node-a", "192.168.0.3", 8080))).await;
    assert_eq!((&body["node"]["state"], &body["node"]["success_streak"]), (&json!("Ready"), &json!(2)));
}

#[tokio::test]
async fn changing_the_ip_resets_the_state_to_unknown() {
    let app = app();
    create_node(&app, "node-a").await;
    let ready = json!({ "status": { "state": "Ready", "success_streak": 2, "last_error": "" } });
    assert_eq!(call(&app, "PUT", "/api/v1/nodes/node-a/status", Some(ready)).await.0, StatusCode::OK);
    let (status, body) = call(&app, "POST", "/api/v1/nodes", Some(node_body("node-a", "192.168.0.4", 8080))).await;
    assert_eq!(status, StatusCode::OK);
    let node = &body["node"];
    assert_eq!((&node["state"], &node["success_streak"]), (&json!("Unknown"), &json!(0)));
    assert_eq!(node["sbxlet_base_url"], "http://192.168.0.4:8080");
}

#[tokio::test]
async fn a_config_node_posted_through_the_api_keeps_source_config() {
    let store: Arc<dyn Store> = Arc::new(memory::open(StoreOptions::default()));
    let state = ApiState::new(store, &Config::default());
    let spec = sandboxd_api::node::NodeSpec { ip: "192.168.0.3".into(), port: 8080, ..Default::default() };
    sandboxd_o::apiserver::register_static_node(&state, "node-c", &spec).await.unwrap();
    let app = router(state, 1 << 20);
    let (status, body) = call(&app, "POST", "/api/v1/nodes", Some(node_body("node-c", "192.168.0.3", 8081))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!((&body["node"]["source"], &body["node"]["port"]), (&json!("config"), &json!(8081)));
}

#[tokio::test]
async fn watch_nodes_streams_node_events() {
    let app = app();
    let mut watch = Watch::open(&app, "/api/v1/nodes?watch=true&resource_version=0").await;
    create_node(&app, "node-a").await;
    call(&app, "DELETE", "/api/v1/nodes/node-a", None).await;
    let (added, node) = watch.event().await;
    assert_eq!((added.as_str(), &node["name"]), ("ADDED", &json!("node-a")));
    assert_eq!(watch.event().await.0, "DELETED");
}

// === nodes: PUT /api/v1/nodes/{name}/status ===

#[tokio::test]
async fn put_node_status_writes_the_status() {
    let app = app();
    let created = create_node(&app, "node-a").await;
    let update = json!({
        "resource_version": created["resource_version"],
        "status": { "state": "NotReady", "failure_streak": 3, "last_error": "unreachable: connect refused" }
    });
    let (status, body) = call(&app, "PUT", "/api/v1/nodes/node-a/status", Some(update)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, got) = call(&app, "GET", "/api/v1/nodes/node-a", None).await;
    assert_eq!(got["node"], body["node"]);
    assert_eq!((&got["node"]["state"], &got["node"]["failure_streak"]), (&json!("NotReady"), &json!(3)));
    assert_eq!(got["node"]["last_error"], "unreachable: connect refused");
    assert_eq!((&got["node"]["ip"], &got["node"]["port"]), (&json!("192.168.0.3"), &json!(8080)));
}

#[tokio::test]
async fn put_node_status_with_a_stale_resource_version_is_409() {
    let app = app();
    let created = create_node(&app, "node-a").await;
    let update = json!({ "resource_version": created["resource_version"], "status": { "state": "Ready" } });
    assert_eq!(call(&app, "PUT", "/api/v1/nodes/node-a/status", Some(update.clone())).await.0, StatusCode::OK);
    let got = call(&app, "PUT", "/api/v1/nodes/node-a/status", Some(update)).await;
    assert_error(got, StatusCode::CONFLICT, "resource_version");
}

#[tokio::test]
async fn put_node_status_with_a_non_numeric_resource_version_is_400() {
    let app = app();
    create_node(&app, "node-a").await;
    let update = json!({ "resource_version": "abc", "status": { "state": "Ready" } });
    let got = call(&app, "PUT", "/api/v1/nodes/node-a/status", Some(update)).await;
    assert_invalid(got, "resource_version", "abc");
}

#[tokio::test]
async fn put_status_of_an_unknown_node_is_404() {
    let update = json!({ "status": { "state": "Ready" } });
    let got = call(&app(), "PUT", "/api/v1/nodes/node-x/status", Some(update)).await;
    assert_error(got, StatusCode::NOT_FOUND, "node-x");
}

// === sandboxes: POST /api/v1/sandboxes ===

#[tokio::test]
async fn post_sandbox_creates_it_pending_with_expire_at() {
    let (status, body) = call(&app(), "POST", "/api/v1/sandboxes", Some(sandbox_body("sbx-demo-1"))).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let sandbox = &body["sandbox"];
    assert_eq!(sandbox["id"], "sbx-demo-1");
    assert_eq!(sandbox["status"]["phase"], "Pending");
    let created = timestamp(&sandbox["created_at"]);
    assert_eq!(timestamp(&sandbox["updated_at"]), created);
    assert_eq!(timestamp(&sandbox["status"]["expire_at"]), created + 3600);
    assert_eq!(revision(&sandbox["resource_version"]), 1);
}

#[tokio::test]
async fn post_sandbox_echoes_the_spec() {
    let request = sandbox_body("sbx-demo-1");
    let sandbox = create_sandbox(&app(), request.clone()).await;
    let (want, got) = (&request["spec"], &sandbox["spec"]);
    assert_eq!(got["egress"], true);
    assert_eq!(got["ttl_seconds"], 3600);
    assert_eq!(got["ports"], json!([{ "container_port": 80, "protocol": "tcp" }]));
    assert_eq!(got["readiness_probe"], want["readiness_probe"]);
    let container = &got["containers"][0];
    assert_eq!((&container["name"], &container["image"]), (&json!("web"), &json!("nginx:latest")));
    assert_eq!(container["resource"], want["containers"][0]["resource"]);
    assert_eq!(got["containers"].as_array().map(Vec::len), Some(1));
}

#[tokio::test]
async fn post_sandbox_without_ttl_has_no_expire_at_and_defaults_tcp() {
    let mut body = minimal_sandbox("sbx-1");
    body["spec"]["ports"] = json!([{ "container_port": 53 }]);
    let sandbox = create_sandbox(&app(), body).await;
    assert_eq!(sandbox["status"].get("expire_at"), None, "{sandbox}");
    assert_eq!(sandbox["spec"]["ports"][0]["protocol"], "tcp");
}

#[tokio::test]
async fn reposting_an_identical_sandbox_is_200_with_the_same_resource_version() {
    let app = app();
    let created = create_sandbox(&app, sandbox_body("sbx-1")).await;
    let (status, body) = call(&app, "POST", "/api/v1/sandboxes", Some(sandbox_body("sbx-1"))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["sandbox"], created);
    assert_eq!(list_sandboxes(&app).await, (vec!["sbx-1".into()], 1));
}

#[tokio::test]
async fn reposting_a_sandbox_with_a_different_spec_is_409() {
    let app = app();
    let created = create_sandbox(&app, sandbox_body("sbx-1")).await;
    let mut changed = sandbox_body("sbx-1");
    changed["spec"]["containers"][0]["image"] = json!("nginx:1.27");
    assert_error(call(&app, "POST", "/api/v1/sandboxes", Some(changed)).await, StatusCode::CONFLICT, "sbx-1");
    assert_eq!(get_sandbox(&app, "sbx-1").await.1["sandbox"], created);
}

#[tokio::test]
async fn post_sandbox_rejects_a_bad_cpu_quantity() {
    let mut body = minimal_sandbox("sbx-1");
    body["spec"]["containers"][0]["resource"] = json!({ "cpu": "2x" });
    let (status, body) = post_invalid_sandbox(body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_of(&body), r#"spec.containers[0].resource.cpu: invalid quantity "2x""#);
}

#[tokio::test]
async fn post_sandbox_rejects_zero_and_bad_byte_quantities() {
    let mut body = minimal_sandbox("sbx-1");
    body["spec"]["containers"][0]["resource"] = json!({ "memory": "0", "ephemeral_storage": "1MiB" });
    let got = post_invalid_sandbox(body).await;
    let message = assert_error(got, StatusCode::BAD_REQUEST, "spec.containers[0].resource.memory: ");
    assert!(message.contains(r#"spec.containers[0].resource.ephemeral_storage: invalid quantity "1MiB""#), "{message}");
}

#[tokio::test]
async fn post_sandbox_rejects_duplicate_container_names() {
    let mut body = minimal_sandbox("sbx-1");
    body["spec"]["containers"] = json!([{ "name": "web", "image": "a" }, { "name": "web", "image": "b" }]);
    assert_invalid(post_invalid_sandbox(body).await, "spec.containers[1].name", "duplicate \"web\"");
}

#[tokio::test]
async fn post_sandbox_rejects_a_bad_container_name() {
    let mut body = minimal_sandbox("sbx-1");
    body["spec"]["containers"][0]["name"] = json!("Web_1");
    assert_invalid(post_invalid_sandbox(body).await, "spec.containers[0].name", "Web_1");
}

#[tokio::test]
async fn post_sandbox_requires_a_container() {
    let body = json!({ "id": "sbx-1", "spec": { "containers": [] } });
    assert_invalid(post_invalid_sandbox(body).await, "spec.containers", "at least one container");
}

#[tokio::test]
async fn post_sandbox_requires_an_image() {
    let mut body = minimal_sandbox("sbx-1");
    body["spec"]["containers"][0]["image"] = json!("");
    assert_invalid(post_invalid_sandbox(body).await, "spec.containers[0].image", "required");
}

#[tokio::test]
async fn post_sandbox_rejects_port_zero() {
    let mut body = minimal_sandbox("sbx-1");
    body["spec"]["ports"] = json!([{ "container_port": 0 }]);
    assert_invalid(post_invalid_sandbox(body).await, "spec.ports[0].container_port", "0 is not in 1-65535");
}

#[tokio::test]
async fn post_sandbox_rejects_a_duplicate_port_per_protocol() {
    let mut body = minimal_sandbox("sbx-1");
    body["spec"]["ports"] = json!([{ "container_port": 80 }, { "container_port": 80, "protocol": "tcp" }]);
    assert_invalid(post_invalid_sandbox(body).await, "spec.ports[1].container_port", "duplicate 80/tcp");
}

#[tokio::test]
async fn post_sandbox_allows_the_same_port_on_tcp_and_udp() {
    let mut body = minimal_sandbox("sbx-1");
    body["spec"]["ports"] = json!([{ "container_port": 53 }, { "container_port": 53, "protocol": "udp" }]);
    let sandbox = create_sandbox(&app(), body).await;
    assert_eq!(sandbox["spec"]["ports"][1]["protocol"], "udp");
}

#[tokio::test]
async fn post_sandbox_rejects_a_negative_ttl() {
    let mut body = minimal_sandbox("sbx-1");
    body["spec"]["ttl_seconds"] = json!(-1);
    assert_invalid(post_invalid_sandbox(body).await, "spec.ttl_seconds", "-1");
}

#[tokio::test]
async fn post_sandbox_rejects_a_ttl_over_the_maximum() {
    let mut body = minimal_sandbox("sbx-1");
    body["spec"]["ttl_seconds"] = json!(86_401);
    assert_invalid(post_invalid_sandbox(body).await, "spec.ttl_seconds", "86400");
    let mut at_max = minimal_sandbox("sbx-1");
    at_max["spec"]["ttl_seconds"] = json!(86_400);
    create_sandbox(&app(), at_max).await;
}

#[tokio::test]
async fn post_sandbox_rejects_a_probe_port_not_in_ports() {
    let mut body = sandbox_body("sbx-1");
    body["spec"]["readiness_probe"]["port"] = json!(8080);
    assert_invalid(post_invalid_sandbox(body).await, "spec.readiness_probe.port", "8080");
}

#[tokio::test]
async fn post_sandbox_rejects_a_probe_period_of_zero() {
    let mut body = sandbox_body("sbx-1");
    body["spec"]["readiness_probe"]["period_seconds"] = json!(0);
    assert_invalid(post_invalid_sandbox(body).await, "spec.readiness_probe.period_seconds", "at least 1");
}

#[tokio::test]
async fn post_sandbox_rejects_an_unknown_protocol() {
    let mut body = minimal_sandbox("sbx-1");
    body["spec"]["ports"] = json!([{ "container_port": 80, "protocol": "sctp" }]);
    assert_invalid(post_invalid_sandbox(body).await, "spec.ports[0].protocol", "sctp");
}

#[tokio::test]
async fn post_sandbox_rejects_an_unknown_spec_field() {
    let mut body = minimal_sandbox("sbx-1");
    body["spec"]["ttl_second"] = json!(60);
    let message = assert_error(post_invalid_sandbox(body).await, StatusCode::BAD_REQUEST, "spec");
    assert!(message.contains("unknown field `ttl_second`"), "{message}");
}

#[tokio::test]
async fn post_sandbox_rejects_a_wrong_type() {
    let mut body = minimal_sandbox("sbx-1");
    body["spec"]["ttl_seconds"] = json!("1h");
    assert_invalid(post_invalid_sandbox(body).await, "spec.ttl_seconds", "invalid type");
}

#[tokio::test]
async fn post_sandbox_rejects_a_bad_id() {
    let body = minimal_sandbox("Sbx_1");
    assert_invalid(post_invalid_sandbox(body).await, "id", "Sbx_1");
}

#[tokio::test]
async fn post_sandbox_reports_several_errors_together() {
    let mut body = minimal_sandbox("sbx-1");
    body["spec"]["containers"] = json!([{ "name": "web", "image": "a" }, { "name": "web", "image": "" }]);
    body["spec"]["ttl_seconds"] = json!(-5);
    body["spec"]["ports"] = json!([{ "container_port": 0 }]);
    let message = assert_error(post_invalid_sandbox(body).await, StatusCode::BAD_REQUEST, "; ");
    for field in [
        "spec.containers[1].name: ",
        "spec.containers[1].image: ",
        "spec.ports[0].container_port: ",
        "spec.ttl_seconds: ",
    ] {
        assert!(message.contains(field), "{message:?} lacks {field:?}");
    }
}

// === sandboxes: GET ===

#[tokio::test]
async fn list_sandboxes_has_items_and_a_top_level_resource_version() {
    let app = app();
    create_sandbox(&app, minimal_sandbox("sbx-b")).await;
    create_sandbox(&app, minimal_sandbox("sbx-a")).await;
    assert_eq!(list_sandboxes(&app).await, (vec!["sbx-a".into(), "sbx-b".into()], 2));
}

#[tokio::test]
async fn list_sandboxes_pages_with_limit_and_cursor() {
    let app = app();
    for id in ["sbx-c", "sbx-a", "sbx-b"] {
        create_sandbox(&app, minimal_sandbox(id)).await;
    }
    let (status, page) = call(&app, "GET", "/api/v1/sandboxes?limit=2&cursor=", None).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let ids = |page: &Value| page["items"].as_array().unwrap().iter().map(|s| s["id"].clone()).collect::<Vec<_>>();
    assert_eq!(ids(&page), [json!("sbx-a"), json!("sbx-b")]);
    assert_eq!((&page["next_cursor"], revision(&page["resource_version"])), (&json!("sbx-b"), 3));
    let (_, last) = call(&app, "GET", "/api/v1/sandboxes?limit=2&cursor=sbx-b", None).await;
    assert_eq!(ids(&last), [json!("sbx-c")]);
    assert_eq!(last["next_cursor"], "");
}

#[tokio::test]
async fn list_sandboxes_rejects_a_limit_out_of_range() {
    let app = app();
    for limit in ["0", "5000"] {
        let got = call(&app, "GET", &format!("/api/v1/sandboxes?limit={limit}"), None).await;
        assert_invalid(got, "limit", limit);
    }
}

#[tokio::test]
async fn a_non_numeric_limit_names_the_field() {
    let got = call(&app(), "GET", "/api/v1/sandboxes?limit=ten", None).await;
    assert_error(got, StatusCode::BAD_REQUEST, "limit");
}

#[tokio::test]
async fn list_sandboxes_rejects_a_bad_resource_version() {
    let got = call(&app(), "GET", "/api/v1/sandboxes?resource_version=abc", None).await;
    assert_invalid(got, "resource_version", "abc");
}

#[tokio::test]
async fn get_sandbox_returns_it() {
    let app = app();
    let created = create_sandbox(&app, sandbox_body("sbx-1")).await;
    assert_eq!(get_sandbox(&app, "sbx-1").await, (StatusCode::OK, json!({ "sandbox": created })));
}

#[tokio::test]
async fn get_unknown_sandbox_is_404() {
    assert_error(get_sandbox(&app(), "sbx-x").await, StatusCode::NOT_FOUND, "sbx-x");
}

// === sandboxes: PUT /api/v1/sandboxes/{id} ===

#[tokio::test]
async fn put_sandbox_changes_ttl_and_labels_and_moves_expire_at() {
    let app = app();
    let created = create_sandbox(&app, sandbox_body("sbx-1")).await;
    let mut spec = sandbox_body("sbx-1")["spec"].clone();
    spec["ttl_seconds"] = json!(7200);
    spec["labels"] = json!({ "team": "infra" });
    let (status, body) = call(&app, "PUT", "/api/v1/sandboxes/sbx-1", Some(json!({ "spec": spec }))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, got) = get_sandbox(&app, "sbx-1").await;
    let sandbox = &got["sandbox"];
    assert_eq!(sandbox, &body["sandbox"]);
    assert_eq!(
        (&sandbox["spec"]["ttl_seconds"], &sandbox["spec"]["labels"]),
        (&json!(7200), &json!({ "team": "infra" }))
    );
    assert_eq!(timestamp(&sandbox["status"]["expire_at"]), timestamp(&created["created_at"]) + 7200);
    assert!(revision(&sandbox["resource_version"]) > revision(&created["resource_version"]));
}

#[tokio::test]
async fn put_sandbox_refuses_to_change_immutable_fields() {
    let app = app();
    let created = create_sandbox(&app, sandbox_body("sbx-1")).await;
    let cases: [(&str, &str, Value); 8] = [
        ("spec.priority", "priority", json!(7)),
        ("spec.restart_policy", "restart_policy", json!("Reschedule")),
        ("spec.tolerations", "tolerations", json!([{ "key": "gpu", "operator": "Exists" }])),
        ("spec.containers", "containers", json!([{ "name": "web", "image": "nginx:1.27" }])),
        ("spec.runtime_class", "runtime_class", json!("gvisor")),
        ("spec.ports", "ports", json!([{ "container_port": 80 }, { "container_port": 443 }])),
        ("spec.egress", "egress", json!(false)),
        ("spec.readiness_probe", "readiness_probe", json!({ "protocol": "tcp", "port": 80 })),
    ];
    for (field, key, value) in cases {
        let mut spec = sandbox_body("sbx-1")["spec"].clone();
        spec[key] = value;
        let got = call(&app, "PUT", "/api/v1/sandboxes/sbx-1", Some(json!({ "spec": spec }))).await;
        assert_invalid(got, field, "immutable");
    }
    assert_eq!(get_sandbox(&app, "sbx-1").await.1["sandbox"], created);
}

#[tokio::test]
async fn put_sandbox_validates_the_new_spec() {
    let app = app();
    create_sandbox(&app, sandbox_body("sbx-1")).await;
    let mut spec = sandbox_body("sbx-1")["spec"].clone();
    spec["ttl_seconds"] = json!(90_000);
    let got = call(&app, "PUT", "/api/v1/sandboxes/sbx-1", Some(json!({ "spec": spec }))).await;
    assert_invalid(got, "spec.ttl_seconds", "86400");
}

#[tokio::test]
async fn put_sandbox_with_a_stale_resource_version_is_409() {
    let app = app();
    let created = create_sandbox(&app, sandbox_body("sbx-1")).await;
    let mut spec = sandbox_body("sbx-1")["spec"].clone();
    spec["ttl_seconds"] = json!(60);
    let update = json!({ "resource_version": created["resource_version"], "spec": spec });
    assert_eq!(call(&app, "PUT", "/api/v1/sandboxes/sbx-1", Some(update.clone())).await.0, StatusCode::OK);
    let got = call(&app, "PUT", "/api/v1/sandboxes/sbx-1", Some(update)).await;
    assert_error(got, StatusCode::CONFLICT, "resource_version");
}

#[tokio::test]
async fn put_sandbox_with_ttl_zero_clears_expire_at() {
    let app = app();
    create_sandbox(&app, sandbox_body("sbx-1")).await;
    let mut spec = sandbox_body("sbx-1")["spec"].clone();
    spec["ttl_seconds"] = json!(0);
    let (status, body) = call(&app, "PUT", "/api/v1/sandboxes/sbx-1", Some(json!({ "spec": spec }))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["sandbox"]["status"].get("expire_at"), None, "{body}");
}

#[tokio::test]
async fn put_unknown_sandbox_is_404() {
    let update = json!({ "spec": minimal_sandbox("sbx-x")["spec"] });
    let got = call(&app(), "PUT", "/api/v1/sandboxes/sbx-x", Some(update)).await;
    assert_error(got, StatusCode::NOT_FOUND, "sbx-x");
}

// === sandboxes: DELETE /api/v1/sandboxes/{id} ===

#[tokio::test]
async fn deleting_a_never_bound_sandbox_removes_it_at_once() {
    let app = app();
    create_sandbox(&app, minimal_sandbox("sbx-1")).await;
    let got = call(&app, "DELETE", "/api/v1/sandboxes/sbx-1", None).await;
    assert_eq!(got, (StatusCode::OK, json!({ "deleted": "sbx-1" })));
    assert_error(get_sandbox(&app, "sbx-1").await, StatusCode::NOT_FOUND, "sbx-1");
    assert_eq!(list_sandboxes(&app).await.0, Vec::<String>::new());
}

#[tokio::test]
async fn deleting_a_sandbox_bound_to_a_node_makes_it_terminating() {
    let app = app();
    create_node(&app, "node-a").await;
    create_sandbox(&app, minimal_sandbox("sbx-1")).await;
    bind(&app, "sbx-1", "node-a").await;
    let got = call(&app, "DELETE", "/api/v1/sandboxes/sbx-1", None).await;
    assert_eq!(got, (StatusCode::OK, json!({ "deleted": "sbx-1" })));
    let (status, body) = get_sandbox(&app, "sbx-1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (&body["sandbox"]["status"]["phase"], &body["sandbox"]["status"]["node_name"]),
        (&json!("Terminating"), &json!("node-a"))
    );
}

#[tokio::test]
async fn deleting_a_terminating_sandbox_again_is_accepted() {
    let app = app();
    create_node(&app, "node-a").await;
    create_sandbox(&app, minimal_sandbox("sbx-1")).await;
    bind(&app, "sbx-1", "node-a").await;
    call(&app, "DELETE", "/api/v1/sandboxes/sbx-1", None).await;
    let got = call(&app, "DELETE", "/api/v1/sandboxes/sbx-1", None).await;
    assert_eq!(got, (StatusCode::OK, json!({ "deleted": "sbx-1" })));
    assert_eq!(get_sandbox(&app, "sbx-1").await.1["sandbox"]["status"]["phase"], "Terminating");
}

#[tokio::test]
async fn deleting_a_sandbox_whose_node_was_deleted_removes_it_at_once() {
    let app = app();
    create_node(&app, "node-a").await;
    create_sandbox(&app, minimal_sandbox("sbx-1")).await;
    bind(&app, "sbx-1", "node-a").await;
    assert_eq!(call(&app, "DELETE", "/api/v1/nodes/node-a", None).await.0, StatusCode::OK);
    let got = call(&app, "DELETE", "/api/v1/sandboxes/sbx-1", None).await;
    assert_eq!(got, (StatusCode::OK, json!({ "deleted": "sbx-1" })));
    assert_error(get_sandbox(&app, "sbx-1").await, StatusCode::NOT_FOUND, "sbx-1");
}

#[tokio::test]
async fn deleting_a_terminating_sandbox_whose_node_was_deleted_removes_it_at_once() {
    let app = app();
    create_node(&app, "node-a").await;
    create_sandbox(&app, minimal_sandbox("sbx-1")).await;
    bind(&app, "sbx-1", "node-a").await;
    call(&app, "DELETE", "/api/v1/sandboxes/sbx-1", None).await;
    assert_eq!(call(&app, "DELETE", "/api/v1/nodes/node-a", None).await.0, StatusCode::OK);
    let got = call(&app, "DELETE", "/api/v1/sandboxes/sbx-1", None).await;
    assert_eq!(got, (StatusCode::OK, json!({ "deleted": "sbx-1" })));
    assert_error(get_sandbox(&app, "sbx-1").await, StatusCode::NOT_FOUND, "sbx-1");
}

#[tokio::test]
async fn deleting_an_unknown_sandbox_is_404() {
    let got = call(&app(), "DELETE", "/api/v1/sandboxes/sbx-x", None).await;
    assert_error(got, StatusCode::NOT_FOUND, "sbx-x");
}

// === sandboxes: POST /api/v1/sandboxes/{id}/finalize ===

async fn finalize(app: &Router, id: &str, rv: &str) -> (StatusCode, Value) {
    call(app, "POST", &format!("/api/v1/sandboxes/{id}/finalize"), Some(json!({ "resource_version": rv }))).await
}

#[tokio::test]
async fn finalize_removes_a_terminating_sandbox_at_its_current_version_only() {
    let app = app();
    create_node(&app, "node-a").await;
    create_sandbox(&app, minimal_sandbox("sbx-1")).await;
    let bound = bind(&app, "sbx-1", "node-a").await;
    call(&app, "DELETE", "/api/v1/sandboxes/sbx-1", None).await;
    let terminating = get_sandbox(&app, "sbx-1").await.1["sandbox"].clone();
    assert_eq!(terminating["status"]["phase"], "Terminating");

    let stale = bound["resource_version"].as_str().unwrap();
    assert_error(finalize(&app, "sbx-1", stale).await, StatusCode::CONFLICT, "");
    assert_eq!(get_sandbox(&app, "sbx-1").await.0, StatusCode::OK, "a stale finalize removes nothing");

    let current = terminating["resource_version"].as_str().unwrap();
    assert_eq!(finalize(&app, "sbx-1", current).await, (StatusCode::OK, json!({ "deleted": "sbx-1" })));
    assert_error(get_sandbox(&app, "sbx-1").await, StatusCode::NOT_FOUND, "sbx-1");
}

#[tokio::test]
async fn finalize_refuses_a_sandbox_still_running_on_a_node() {
    let app = app();
    create_node(&app, "node-a").await;
    create_sandbox(&app, minimal_sandbox("sbx-1")).await;
    let bound = bind(&app, "sbx-1", "node-a").await;
    let rv = bound["resource_version"].as_str().unwrap();
    let message = assert_error(finalize(&app, "sbx-1", rv).await, StatusCode::CONFLICT, "only Terminating or unbound");
    assert!(message.contains("Scheduled"), "{message}");
    assert_eq!(get_sandbox(&app, "sbx-1").await.0, StatusCode::OK);
}

#[tokio::test]
async fn finalize_removes_an_unbound_sandbox_and_checks_its_input() {
    let app = app();
    let created = create_sandbox(&app, minimal_sandbox("sbx-1")).await;
    assert_error(finalize(&app, "sbx-x", "1").await, StatusCode::NOT_FOUND, "sbx-x");
    assert_invalid(finalize(&app, "sbx-1", "one").await, "resource_version", "not a revision");
    let rv = created["resource_version"].as_str().unwrap();
    assert_eq!(finalize(&app, "sbx-1", rv).await.0, StatusCode::OK);
    assert_error(get_sandbox(&app, "sbx-1").await, StatusCode::NOT_FOUND, "sbx-1");
}

// === sandboxes: PUT /api/v1/sandboxes/{id}/status ===

#[tokio::test]
async fn put_sandbox_status_writes_the_status() {
    let app = app();
    create_sandbox(&app, minimal_sandbox("sbx-1")).await;
    let update = json!({ "status": {
        "phase": "Scheduled", "node_name": "node-a", "external": "203.0.113.10",
        "assigned_ports": [{ "host_port": 10000, "container_port": 80, "protocol": "tcp" }]
    } });
    let (status, body) = call(&app, "PUT", "/api/v1/sandboxes/sbx-1/status", Some(update)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, got) = get_sandbox(&app, "sbx-1").await;
    assert_eq!(got["sandbox"], body["sandbox"]);
    let status = &got["sandbox"]["status"];
    assert_eq!(
        (&status["phase"], &status["node_name"], &status["external"]),
        (&json!("Scheduled"), &json!("node-a"), &json!("203.0.113.10"))
    );
    assert_eq!(status["assigned_ports"][0]["host_port"], 10000);
}

#[tokio::test]
async fn put_sandbox_status_with_a_stale_resource_version_is_409() {
    let app = app();
    let created = create_sandbox(&app, minimal_sandbox("sbx-1")).await;
    let update = json!({ "resource_version": created["resource_version"], "status": { "phase": "Scheduled", "node_name": "node-a" } });
    assert_eq!(call(&app, "PUT", "/api/v1/sandboxes/sbx-1/status", Some(update.clone())).await.0, StatusCode::OK);
    let got = call(&app, "PUT", "/api/v1/sandboxes/sbx-1/status", Some(update)).await;
    assert_error(got, StatusCode::CONFLICT, "resource_version");
}

#[tokio::test]
async fn sandbox_phase_never_moves_backwards() {
    let app = app();
    create_sandbox(&app, minimal_sandbox("sbx-1")).await;
    let running = json!({ "status": { "phase": "Running", "node_name": "node-a" } });
    assert_eq!(call(&app, "PUT", "/api/v1/sandboxes/sbx-1/status", Some(running)).await.0, StatusCode::OK);
    let back = json!({ "status": { "phase": "Creating", "node_name": "node-a" } });
    let got = call(&app, "PUT", "/api/v1/sandboxes/sbx-1/status", Some(back)).await;
    assert_invalid(got, "status.phase", "Creating");
    assert_eq!(get_sandbox(&app, "sbx-1").await.1["sandbox"]["status"]["phase"], "Running");
}

#[tokio::test]
async fn a_bound_sandbox_cannot_change_node() {
    let app = app();
    create_sandbox(&app, minimal_sandbox("sbx-1")).await;
    bind(&app, "sbx-1", "node-a").await;
    let moved = json!({ "status": { "phase": "Creating", "node_name": "node-b" } });
    let got = call(&app, "PUT", "/api/v1/sandboxes/sbx-1/status", Some(moved)).await;
    assert_invalid(got, "status.node_name", "node-b");
    assert_eq!(get_sandbox(&app, "sbx-1").await.1["sandbox"]["status"]["node_name"], "node-a");
}

#[tokio::test]
async fn put_status_of_an_unknown_sandbox_is_404() {
    let update = json!({ "status": { "phase": "Scheduled" } });
    let got = call(&app(), "PUT", "/api/v1/sandboxes/sbx-x/status", Some(update)).await;
    assert_error(got, StatusCode::NOT_FOUND, "sbx-x");
}

#[tokio::test]
async fn the_server_owns_last_transition_at_and_keeps_it_while_the_phase_holds() {
    let app = app();
    let created = create_sandbox(&app, minimal_sandbox("sbx-1")).await;
    let sandbox = bind(&app, "sbx-1", "node-a").await;
    let at = timestamp(&sandbox["status"]["last_transition_at"]);
    assert!(at >= timestamp(&created["created_at"]) && at <= timestamp(&sandbox["updated_at"]), "{sandbox}");

    // A status write in the same phase that forges the field: the server keeps its own stamp.
    let mut status = sandbox["status"].clone();
    status["last_transition_at"] = json!("2000-01-01T00:00:00Z");
    status["message"] = json!("still scheduled");
    let (code, body) = call(&app, "PUT", "/api/v1/sandboxes/sbx-1/status", Some(json!({ "status": status }))).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["sandbox"]["status"]["message"], "still scheduled", "{body}");
    assert_eq!(timestamp(&body["sandbox"]["status"]["last_transition_at"]), at, "{body}");
}

/// A wall clock the test moves by hand.
struct SteppedClock(std::sync::atomic::AtomicI64);

impl sandboxd_contracts::clock::Clock for SteppedClock {
    fn unix_now(&self) -> i64 {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[tokio::test]
async fn a_phase_change_sets_last_transition_at_even_when_the_old_status_is_echoed() {
    let clock = Arc::new(SteppedClock(std::sync::atomic::AtomicI64::new(1_780_000_000)));
    let store: Arc<dyn Store> = Arc::new(memory::open(StoreOptions::default()));
    let state = ApiState::new(store, &Config::default()).with_clock(clock.clone());
    let app = router(state, Config::default().max_body_bytes);
    let created = create_sandbox(&app, minimal_sandbox("sbx-1")).await;
    assert_eq!(timestamp(&created["status"]["last_transition_at"]), 1_780_000_000);

    clock.0.store(1_780_000_042, std::sync::atomic::Ordering::SeqCst);
    let mut status = created["status"].clone();
    status["phase"] = json!("Scheduled");
    status["node_name"] = json!("node-a");
    let (code, body) = call(&app, "PUT", "/api/v1/sandboxes/sbx-1/status", Some(json!({ "status": status }))).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(timestamp(&body["sandbox"]["status"]["last_transition_at"]), 1_780_000_042, "{body}");
}

#[tokio::test]
async fn a_status_write_keeps_expire_at() {
    let app = app();
    let created = create_sandbox(&app, sandbox_body("sbx-1")).await;
    bind(&app, "sbx-1", "node-a").await;
    let (_, got) = get_sandbox(&app, "sbx-1").await;
    assert_eq!(got["sandbox"]["status"]["expire_at"], created["status"]["expire_at"], "{got}");
}

// === sandboxes: watch ===

#[tokio::test]
async fn watch_streams_added_modified_deleted_in_revision_order() {
    let app = app();
    let mut watch = Watch::open(&app, "/api/v1/sandboxes?watch=true&resource_version=0").await;
    create_sandbox(&app, sandbox_body("sbx-1")).await;
    let mut spec = sandbox_body("sbx-1")["spec"].clone();
    spec["ttl_seconds"] = json!(60);
    assert_eq!(call(&app, "PUT", "/api/v1/sandboxes/sbx-1", Some(json!({ "spec": spec }))).await.0, StatusCode::OK);
    assert_eq!(call(&app, "DELETE", "/api/v1/sandboxes/sbx-1", None).await.0, StatusCode::OK);
    let mut seen = Vec::new();
    for _ in 0..3 {
        let (kind, object) = watch.event().await;
        assert_eq!(object["id"], "sbx-1");
        seen.push((kind, revision(&object["resource_version"])));
    }
    assert_eq!(seen, [("ADDED".into(), 1), ("MODIFIED".into(), 2), ("DELETED".into(), 3)]);
}

#[tokio::test]
async fn watch_from_a_revision_skips_older_events() {
    let app = app();
    create_sandbox(&app, minimal_sandbox("sbx-1")).await;
    create_sandbox(&app, minimal_sandbox("sbx-2")).await;
    let mut watch = Watch::open(&app, "/api/v1/sandboxes?watch=true&resource_version=1").await;
    let (kind, object) = watch.event().await;
    assert_eq!((kind.as_str(), &object["id"]), ("ADDED", &json!("sbx-2")));
}

#[tokio::test]
async fn watch_from_a_compacted_revision_yields_one_410_error_then_ends() {
    let app = app_with(short_history(), None, 1 << 20);
    for i in 0..10 {
        create_sandbox(&app, minimal_sandbox(&format!("sbx-{i}"))).await;
    }
    let mut watch = Watch::open(&app, "/api/v1/sandboxes?watch=true&resource_version=0").await;
    let event = watch.next().await.expect("an ERROR event");
    assert_eq!(event["type"], "ERROR", "{event}");
    assert_eq!(event["object"]["code"], 410, "{event}");
    assert!(event["object"]["error"].is_string(), "{event}");
    assert_eq!(watch.next().await, None, "the stream ends after the error");
}

#[tokio::test]
async fn watch_without_resource_version_first_adds_every_existing_object() {
    let app = app();
    create_sandbox(&app, minimal_sandbox("sbx-b")).await;
    create_sandbox(&app, minimal_sandbox("sbx-a")).await;
    let mut watch = Watch::open(&app, "/api/v1/sandboxes?watch=true").await;
    let mut initial = [watch.event().await, watch.event().await];
    initial.sort_by(|a, b| a.1["id"].as_str().cmp(&b.1["id"].as_str()));
    let initial: Vec<(&str, &Value)> = initial.iter().map(|(k, o)| (k.as_str(), &o["id"])).collect();
    assert_eq!(initial, [("ADDED", &json!("sbx-a")), ("ADDED", &json!("sbx-b"))]);
    create_sandbox(&app, minimal_sandbox("sbx-c")).await;
    let (kind, object) = watch.event().await;
    assert_eq!((kind.as_str(), &object["id"], revision(&object["resource_version"])), ("ADDED", &json!("sbx-c"), 3));
}

#[tokio::test]
async fn watch_with_a_bad_resource_version_is_400() {
    let got = call(&app(), "GET", "/api/v1/sandboxes?watch=true&resource_version=-3", None).await;
    assert_invalid(got, "resource_version", "-3");
}

// === auth ===

/// One call per route (both method and path), each valid when authorised.
fn every_api_call() -> Vec<(&'static str, &'static str, Option<Value>)> {
    let node_status = json!({ "status": { "state": "Ready", "success_streak": 2 } });
    let mut spec = sandbox_body("sbx-1")["spec"].clone();
    spec["ttl_seconds"] = json!(60);
    let sandbox_status = json!({ "status": { "phase": "Scheduled", "node_name": "node-a" } });
    vec![
        ("POST", "/api/v1/nodes", Some(node_body("node-a", "192.168.0.3", 8080))),
        ("GET", "/api/v1/nodes", None),
        ("GET", "/api/v1/nodes/node-a", None),
        ("PUT", "/api/v1/nodes/node-a/status", Some(node_status)),
        ("POST", "/api/v1/sandboxes", Some(sandbox_body("sbx-1"))),
        ("GET", "/api/v1/sandboxes", None),
        ("GET", "/api/v1/sandboxes/sbx-1", None),
        ("PUT", "/api/v1/sandboxes/sbx-1", Some(json!({ "spec": spec }))),
        ("PUT", "/api/v1/sandboxes/sbx-1/status", Some(sandbox_status)),
        ("DELETE", "/api/v1/sandboxes/sbx-1", None),
        ("DELETE", "/api/v1/nodes/node-a", None),
        ("GET", "/openapi.json", None),
    ]
}

#[tokio::test]
async fn with_a_token_every_route_but_healthz_needs_it() {
    let app = app_with(StoreOptions::default(), Some(TOKEN), 1 << 20);
    for (method, uri, body) in every_api_call() {
        for token in [None, Some("wrong-token")] {
            let got = send(&app, request(method, uri, token, body.as_ref())).await;
            assert_error(got, StatusCode::UNAUTHORIZED, "token");
        }
    }
    assert_eq!(call(&app, "GET", "/healthz", None).await, (StatusCode::OK, json!({ "ok": true })));
    assert_eq!(list_len_with_token(&app).await, 0, "no unauthorised call wrote anything");
}

#[tokio::test]
async fn with_a_token_every_route_works_when_it_is_presented() {
    let app = app_with(StoreOptions::default(), Some(TOKEN), 1 << 20);
    let want = [201, 200, 200, 200, 201, 200, 200, 200, 200, 200, 200, 200];
    for ((method, uri, body), want) in every_api_call().into_iter().zip(want) {
        let (status, body) = send(&app, request(method, uri, Some(TOKEN), body.as_ref())).await;
        assert_eq!(status.as_u16(), want, "{method} {uri}: {body}");
    }
}

#[tokio::test]
async fn a_token_must_use_the_bearer_scheme() {
    let app = app_with(StoreOptions::default(), Some(TOKEN), 1 << 20);
    let request = Request::get("/api/v1/nodes").header(AUTHORIZATION, TOKEN).body(Body::empty()).unwrap();
    assert_error(send(&app, request).await, StatusCode::UNAUTHORIZED, "token");
}

async fn list_len_with_token(app: &Router) -> usize {
    let (status, body) = send(app, request("GET", "/api/v1/sandboxes", Some(TOKEN), None)).await;
    assert_eq!(status, StatusCode::OK);
    let (_, nodes) = send(app, request("GET", "/api/v1/nodes", Some(TOKEN), None)).await;
    body["items"].as_array().unwrap().len() + nodes["items"].as_array().unwrap().len()
}

// === node proxy input checks ===

#[tokio::test]
async fn proxy_refuses_ids_that_would_escape_the_agent_path() {
    let app = app();
    create_node(&app, "node-a").await;
    for uri in [
        "/api/v1/nodes/node-a/sandboxes/..%2Fstatus",
        "/api/v1/nodes/node-a/sandboxes/a%3Fb/logs",
        "/api/v1/nodes/node-a/sandboxes/x/containers/..%2F..%2Fstatus/logs",
        "/api/v1/nodes/node-a/sandboxes?cursor=a%26limit%3D5",
    ] {
        let (status, body) = call(&app, "GET", uri, None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}: {body}");
    }
}

// === leases ===

fn lease_body(holder: &str, rv: Option<&str>) -> Value {
    let mut body = json!({ "name": "sandboxd-controller-scheduler", "holder": holder, "lease_duration_seconds": 15 });
    if let Some(rv) = rv {
        body["resource_version"] = json!(rv);
    }
    body
}

#[tokio::test]
async fn leases_are_created_once_and_written_only_with_a_current_resource_version() {
    let app = app();
    let (status, created) = call(&app, "POST", "/api/v1/leases", Some(lease_body("a", None))).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let rv = created["lease"]["resource_version"].as_str().unwrap().to_string();
    let (status, _) = call(&app, "POST", "/api/v1/leases", Some(lease_body("b", None))).await;
    assert_eq!(status, StatusCode::CONFLICT, "a second create loses");

    let path = "/api/v1/leases/sandboxd-controller-scheduler";
    let (status, body) = call(&app, "PUT", path, Some(lease_body("b", None))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "an unconditional lease write is refused: {body}");
    let (status, renewed) = call(&app, "PUT", path, Some(lease_body("a", Some(&rv)))).await;
    assert_eq!(status, StatusCode::OK, "{renewed}");
    let (status, _) = call(&app, "PUT", path, Some(lease_body("b", Some(&rv)))).await;
    assert_eq!(status, StatusCode::CONFLICT, "a deposed writer's stale write fails");

    let (status, got) = call(&app, "GET", path, None).await;
    assert_eq!((status, got["lease"]["holder"].as_str()), (StatusCode::OK, Some("a")));
    let (status, _) = call(&app, "DELETE", &format!("{path}?resource_version={rv}"), None).await;
    assert_eq!(status, StatusCode::CONFLICT, "delete is a CAS too");
    let (status, _) = call(&app, "DELETE", path, None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = call(&app, "GET", path, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

// === hostile input (issue 16): every error is small JSON, pinned ports stay in range ===

#[tokio::test]
async fn rejections_axum_answers_itself_are_json_too() {
    let app = app();
    // A path segment that is not UTF-8 fails axum's own `Path` extraction.
    let got = send(&app, request("GET", "/api/v1/sandboxes/%FF%FE", None, None)).await;
    assert_eq!(got.0, StatusCode::BAD_REQUEST);
    assert!(!error_of(&got.1).is_empty());
}

#[tokio::test]
async fn a_huge_invalid_body_gets_a_small_error() {
    let app = app_with(StoreOptions::default(), None, 2 << 20);
    let labels: serde_json::Map<String, Value> =
        (0..20_000).map(|i| (format!("bad key {i}"), Value::String("x".into()))).collect();
    let mut body = minimal_sandbox("big-error");
    body["spec"]["labels"] = Value::Object(labels);
    let raw = body.to_string();
    let response = app.clone().oneshot(request("POST", "/api/v1/sandboxes", None, Some(&body))).await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
    assert!(bytes.len() <= 4096, "a {} byte body got a {} byte error", raw.len(), bytes.len());
}

#[tokio::test]
async fn pinned_host_ports_must_lie_in_the_configured_range() {
    let mut body = minimal_sandbox("pinned");
    body["spec"]["ports"] = json!([{"container_port": 80, "host_port": 22}]);
    assert_invalid(post_invalid_sandbox(body).await, "spec.ports[0].host_port", "22 is not in 10000-19999");
}

#[tokio::test]
async fn terminal_escapes_and_oversized_specs_are_refused() {
    let mut escape = minimal_sandbox("escape");
    escape["spec"]["containers"][0]["image"] = json!("busy\u{1b}[2Jbox");
    assert_invalid(post_invalid_sandbox(escape).await, "spec.containers[0].image", "path components");
    let mut label = minimal_sandbox("label");
    label["spec"]["labels"] = json!({"tier": "x".repeat(900_000)});
    let app = app_with(StoreOptions::default(), None, 2 << 20);
    let got = call(&app, "POST", "/api/v1/sandboxes", Some(label)).await;
    assert_error(got, StatusCode::BAD_REQUEST, "more than 262144");
    let mut many = minimal_sandbox("many");
    let containers: Vec<Value> = (0..40)
        .map(|i| json!({"name": format!("c{i}"), "image": "busybox", "resource": {"cpu": "1m", "memory": "1Mi"}}))
        .collect();
    many["spec"]["containers"] = json!(containers);
    assert_invalid(post_invalid_sandbox(many).await, "spec.containers", "40 containers is more than 32");
}

#[tokio::test]
async fn events_merge_list_by_object_in_order_and_page() {
    let app = app();
    let event = |object: &str, reason: &str, at: &str| {
        let (kind, name) = object.split_once('/').unwrap();
        json!({ "involved_object": { "kind": kind, "name": name }, "type": "Normal", "reason": reason,
                "message": format!("{reason} happened"), "source": "test", "first_seen": at, "last_seen": at })
    };
    let batch = json!({ "events": [
        event("sandbox/s", "Started", "2026-12-02T10:00:03.000001Z"),
        event("sandbox/s", "Scheduled", "2026-12-02T10:00:01.5+00:00"),
        event("sandbox/other", "Scheduled", "2026-12-02T10:00:00Z"),
        event("sandbox/s", "Created", "2026-12-02T10:00:02Z"),
        event("sandbox/s", "Scheduled", "2026-12-02T10:00:01.5Z"),
    ]});
    let (status, body) = call(&app, "POST", "/api/v1/events", Some(batch)).await;
    assert_eq!((status, &body["recorded"]), (StatusCode::OK, &json!(5)));

    let (_, listed) = call(&app, "GET", "/api/v1/events?object=sandbox/s", None).await;
    let reasons: Vec<&str> =
        listed["items"].as_array().unwrap().iter().map(|e| e["reason"].as_str().unwrap()).collect();
    assert_eq!(reasons, ["Scheduled", "Created", "Started"], "in the order they first happened");
    assert_eq!(listed["items"][0]["count"], 2, "the repeat merged");
    assert_eq!(listed["items"][0]["first_seen"], "2026-12-02T10:00:01.500000Z", "times made canonical");

    let (_, first) = call(&app, "GET", "/api/v1/events?object=sandbox/s&limit=2", None).await;
    assert_eq!(first["items"].as_array().unwrap().len(), 2);
    let cursor = first["next_cursor"].as_str().unwrap().to_string();
    let (_, rest) = call(&app, "GET", &format!("/api/v1/events?object=sandbox/s&limit=2&cursor={cursor}"), None).await;
    assert_eq!(rest["items"][0]["reason"], "Started");
    assert_eq!(rest["next_cursor"], "", "the last page");

    let (status, body) = call(&app, "GET", "/api/v1/events?object=pod/s", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let bad = json!({ "events": [event("sandbox/s", "Not a word", "2026-12-02T10:00:00Z")] });
    let (status, body) = call(&app, "POST", "/api/v1/events", Some(bad)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["error"].as_str().unwrap().starts_with("events[0].reason"), "{body}");
}
