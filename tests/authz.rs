//! Every route × every role: 401 without a credential, 403 with the wrong role, through with the
//! right one; and the attacks of issue 15 (forged status, rogue node, lease hijack) refused.

use axum::body::Body;
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::{Request, StatusCode};
use axum::Router;
use sandboxd_o::apiserver::auth::{Authenticator, Identity};
use sandboxd_o::apiserver::{router, ApiState};
use sandboxd_o::config::Config;
use sandboxd_o::store::{memory, Store, StoreOptions};
use serde_json::{json, Value};
use std::sync::Arc;
use tower::ServiceExt;

const ADMIN_TOKEN: &str = "bootstrap-admin-token-for-tests";

/// Who may call each route, written out independently of the server's own table:
/// A admin, U user, C controller, N the node named in the path (`n1`), * anyone authenticated.
const MATRIX: &[(&str, &str, &str)] = &[
    ("GET", "/openapi.json", "*"),
    ("GET", "/api/v1/whoami", "*"),
    ("GET", "/metrics", "AC"),
    ("POST", "/api/v1/nodes", "A"),
    ("GET", "/api/v1/nodes", "AUC"),
    ("GET", "/api/v1/nodes/n1", "AUCN"),
    ("DELETE", "/api/v1/nodes/n1", "A"),
    ("PUT", "/api/v1/nodes/n1/status", "ACN"),
    ("POST", "/api/v1/nodes/n1/heartbeat", "ACN"),
    ("POST", "/api/v1/nodes/n1/drain", "A"),
    ("POST", "/api/v1/nodes/n1/reconcile", "AC"),
    ("GET", "/api/v1/nodes/n1/sandboxes", "AC"),
    ("POST", "/api/v1/nodes/n1/sandboxes", "A"),
    ("GET", "/api/v1/nodes/n1/sandboxes/s1", "AC"),
    ("DELETE", "/api/v1/nodes/n1/sandboxes/s1", "A"),
    ("GET", "/api/v1/nodes/n1/sandboxes/s1/logs", "AC"),
    ("GET", "/api/v1/nodes/n1/sandboxes/s1/containers/c/logs", "AC"),
    ("POST", "/api/v1/sandboxes", "AU"),
    ("GET", "/api/v1/sandboxes", "AUC"),
    ("GET", "/api/v1/sandboxes/s1", "AUC"),
    ("PUT", "/api/v1/sandboxes/s1", "AU"),
    ("DELETE", "/api/v1/sandboxes/s1", "AU"),
    ("PUT", "/api/v1/sandboxes/s1/status", "AC"),
    ("POST", "/api/v1/sandboxes/s1/finalize", "AC"),
    ("POST", "/api/v1/sandboxes/s1/exec", "AU"),
    ("GET", "/api/v1/sandboxes/s1/exec/stream", "AU"),
    ("GET", "/api/v1/sandboxes/s1/files?path=/", "AU"),
    ("PUT", "/api/v1/sandboxes/s1/files?path=/x", "AU"),
    ("DELETE", "/api/v1/sandboxes/s1/files?path=/x", "AU"),
    ("GET", "/api/v1/sandboxes/s1/files/archive?path=/", "AU"),
    ("PUT", "/api/v1/sandboxes/s1/files/archive?path=/", "AU"),
    ("GET", "/api/v1/sandboxes/s1/logs", "AU"),
    ("POST", "/api/v1/events", "AC"),
    ("GET", "/api/v1/events", "AUC"),
    ("POST", "/api/v1/watch", "AUC"),
    ("POST", "/api/v1/leases", "AC"),
    ("GET", "/api/v1/leases", "AC"),
    ("GET", "/api/v1/leases/l1", "AC"),
    ("PUT", "/api/v1/leases/l1", "AC"),
    ("DELETE", "/api/v1/leases/l1", "AC"),
    ("POST", "/api/v1/tokens", "A"),
    ("GET", "/api/v1/tokens", "A"),
    ("DELETE", "/api/v1/tokens/t1", "A"),
];

struct Cluster {
    app: Router,
    tokens: Vec<(char, String)>,
}

fn app() -> Router {
    let store: Arc<dyn Store> = Arc::new(memory::open(StoreOptions::default()));
    let auth = Authenticator::required(store.clone(), vec![(ADMIN_TOKEN.into(), Identity::bootstrap_admin())]);
    router(ApiState::new(store, &Config::default()).with_auth(auth), 1 << 20)
}

async fn send(app: &Router, method: &str, uri: &str, token: Option<&str>, body: Option<&Value>) -> (StatusCode, Value) {
    let mut builder = Request::builder().method(method).uri(uri);
    if let Some(token) = token {
        builder = builder.header(AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = match body {
        Some(body) => builder.header(CONTENT_TYPE, "application/json").body(Body::from(body.to_string())),
        None => builder.body(Body::empty()),
    };
    let response = app.clone().oneshot(request.unwrap()).await.unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

async fn issue(app: &Router, identity: &str, role: &str) -> String {
    let body = json!({ "identity": identity, "role": role });
    let (status, answer) = send(app, "POST", "/api/v1/tokens", Some(ADMIN_TOKEN), Some(&body)).await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    answer["token"].as_str().expect("token").to_string()
}

async fn cluster() -> Cluster {
    let app = app();
    let tokens = vec![
        ('A', ADMIN_TOKEN.to_string()),
        ('U', issue(&app, "alice", "user").await),
        ('C', issue(&app, "ctrl", "controller").await),
        ('N', issue(&app, "n1", "node:n1").await),
        // Another node: on routes of n1 it has no more rights than a stranger.
        ('n', issue(&app, "n2", "node:n2").await),
    ];
    Cluster { app, tokens }
}

fn allowed(who: char, rule: &str) -> bool {
    rule == "*" || rule.contains(who)
}

#[tokio::test]
async fn every_route_refuses_the_anonymous_and_the_wrong_role_and_admits_the_right_one() {
    let cluster = cluster().await;
    let mut failures = Vec::new();
    for (method, uri, rule) in MATRIX {
        let (status, _) = send(&cluster.app, method, uri, None, None).await;
        if status != StatusCode::UNAUTHORIZED {
            failures.push(format!("{method} {uri} without a token: {status}"));
        }
        let (status, _) = send(&cluster.app, method, uri, Some("sbx_0000_wrong"), None).await;
        if status != StatusCode::UNAUTHORIZED {
            failures.push(format!("{method} {uri} with a wrong token: {status}"));
        }
        for (who, token) in &cluster.tokens {
            let (status, body) = send(&cluster.app, method, uri, Some(token), None).await;
            let denied = status == StatusCode::FORBIDDEN || status == StatusCode::UNAUTHORIZED;
            if allowed(*who, rule) == denied {
                failures.push(format!("{method} {uri} as {who}: {status} {body}"));
            }
        }
    }
    assert!(failures.is_empty(), "{} wrong answers:\n{}", failures.len(), failures.join("\n"));
}

#[tokio::test]
async fn the_matrix_covers_every_documented_route() {
    let cluster = cluster().await;
    let (_, doc) = send(&cluster.app, "GET", "/openapi.json", Some(ADMIN_TOKEN), None).await;
    let template = |uri: &str| {
        let path = uri.split('?').next().unwrap();
        path.replace("/n1", "/{name}")
            .replace("/s1", "/{id}")
            .replace("/l1", "/{name}")
            .replace("/t1", "/{id}")
            .replace("/c/", "/{container}/")
    };
    let covered: Vec<(String, String)> = MATRIX.iter().map(|(m, u, _)| (m.to_lowercase(), template(u))).collect();
    for (path, operations) in doc["paths"].as_object().unwrap() {
        for method in operations.as_object().unwrap().keys() {
            if path == "/healthz" {
                continue;
            }
            assert!(covered.contains(&(method.clone(), path.clone())), "{method} {path} is not in the matrix");
        }
    }
}

#[tokio::test]
async fn healthz_needs_no_credential() {
    let (status, _) = send(&app(), "GET", "/healthz", None, None).await;
    assert_eq!(status, StatusCode::OK);
}

async fn seed_node_and_sandbox(app: &Router) {
    let node = json!({ "id": "n1", "spec": { "ip": "127.0.1.1", "port": 8080 } });
    let (status, body) = send(app, "POST", "/api/v1/nodes", Some(ADMIN_TOKEN), Some(&node)).await;
    assert!(status.is_success(), "{status} {body}");
    let sandbox = json!({ "id": "s1", "spec": { "containers": [{ "name": "c", "image": "busybox" }] } });
    let (status, body) = send(app, "POST", "/api/v1/sandboxes", Some(ADMIN_TOKEN), Some(&sandbox)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

#[tokio::test]
async fn a_user_cannot_forge_statuses_or_register_a_rogue_node() {
    let cluster = cluster().await;
    seed_node_and_sandbox(&cluster.app).await;
    let user = &cluster.tokens[1].1;
    let forged = json!({ "status": { "phase": "Failed", "reason": "Forged" } });
    let (status, _) = send(&cluster.app, "PUT", "/api/v1/sandboxes/s1/status", Some(user), Some(&forged)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let rogue = json!({ "id": "rogue", "spec": { "ip": "127.0.1.9", "port": 8080 } });
    let (status, _) = send(&cluster.app, "POST", "/api/v1/nodes", Some(user), Some(&rogue)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let controller = &cluster.tokens[2].1;
    let (status, _) = send(&cluster.app, "POST", "/api/v1/nodes", Some(controller), Some(&rogue)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "a controller does not register nodes either");
}

#[tokio::test]
async fn a_node_reports_only_its_own_machine_and_cannot_change_its_state() {
    let cluster = cluster().await;
    seed_node_and_sandbox(&cluster.app).await;
    let (_, node) = send(&cluster.app, "GET", "/api/v1/nodes/n1", Some(ADMIN_TOKEN), None).await;
    let state_before = node["node"]["state"].clone();
    let mut resources = node["node"]["resources"].clone();
    resources["capacity_cpu_milli"] = json!(4000);
    let status = json!({
        "state": if state_before == "Ready" { "NotReady" } else { "Ready" },
        "last_error": "", "success_streak": 9, "failure_streak": 0, "resources": resources,
        "node_info": { "hostname": "h1", "arch": "x86_64", "runtime": "sim" },
    });
    let update = json!({ "status": status });
    let other_node = &cluster.tokens[4].1;
    let (code, _) = send(&cluster.app, "PUT", "/api/v1/nodes/n1/status", Some(other_node), Some(&update)).await;
    assert_eq!(code, StatusCode::FORBIDDEN, "node n2 may not write n1's status");
    let own = &cluster.tokens[3].1;
    let (code, body) = send(&cluster.app, "PUT", "/api/v1/nodes/n1/status", Some(own), Some(&update)).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["node"]["state"], state_before, "the state stays the node controller's");
    assert_eq!(body["node"]["success_streak"], 0);
    assert_ne!(body["node"]["resources"]["capacity_cpu_milli"], 4000, "capacity comes from heartbeats: {body}");
    assert_eq!(body["node"]["node_info"]["hostname"], "h1");
}

#[tokio::test]
async fn a_controller_cannot_hijack_a_lease() {
    let cluster = cluster().await;
    let controller = &cluster.tokens[2].1;
    let now = sandboxd_api::time::rfc3339_now();
    let foreign = json!({ "name": "scheduler", "holder": "other", "lease_duration_seconds": 15, "renewed_at": now });
    let (code, body) = send(&cluster.app, "POST", "/api/v1/leases", Some(controller), Some(&foreign)).await;
    assert_eq!(code, StatusCode::FORBIDDEN, "{body}");
    let huge = json!({ "name": "scheduler", "holder": "ctrl", "lease_duration_seconds": u64::MAX });
    let (code, _) = send(&cluster.app, "POST", "/api/v1/leases", Some(controller), Some(&huge)).await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    // The admin's lease, held and fresh: the controller may not take it over or release it.
    let (code, held) = send(&cluster.app, "POST", "/api/v1/leases", Some(ADMIN_TOKEN), Some(&foreign)).await;
    assert_eq!(code, StatusCode::CREATED);
    let version = held["lease"]["resource_version"].clone();
    let mine =
        json!({ "holder": "ctrl", "lease_duration_seconds": 15, "renewed_at": now, "resource_version": version });
    let (code, body) = send(&cluster.app, "PUT", "/api/v1/leases/scheduler", Some(controller), Some(&mine)).await;
    assert_eq!(code, StatusCode::CONFLICT, "{body}");
    let (code, _) = send(&cluster.app, "DELETE", "/api/v1/leases/scheduler", Some(controller), None).await;
    assert_eq!(code, StatusCode::CONFLICT);
    let mine = json!({ "name": "own", "holder": "ctrl/replica-1", "lease_duration_seconds": 15, "renewed_at": now });
    let (code, body) = send(&cluster.app, "POST", "/api/v1/leases", Some(controller), Some(&mine)).await;
    assert_eq!(code, StatusCode::CREATED, "{body}");
}

#[tokio::test]
async fn tokens_are_listed_without_secrets_and_stop_working_when_revoked() {
    let cluster = cluster().await;
    let user = cluster.tokens[1].1.clone();
    let (code, me) = send(&cluster.app, "GET", "/api/v1/whoami", Some(&user), None).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!((me["identity"].as_str(), me["role"].as_str()), (Some("alice"), Some("user")));
    let (_, listed) = send(&cluster.app, "GET", "/api/v1/tokens", Some(ADMIN_TOKEN), None).await;
    let text = listed.to_string();
    assert!(!text.contains(&user), "a listed token never carries its secret");
    let id = user.strip_prefix("sbx_").unwrap().split('_').next().unwrap();
    assert!(text.contains(id));
    let (code, _) = send(&cluster.app, "DELETE", &format!("/api/v1/tokens/{id}"), Some(ADMIN_TOKEN), None).await;
    assert_eq!(code, StatusCode::OK);
    let (code, _) = send(&cluster.app, "GET", "/api/v1/whoami", Some(&user), None).await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    // The secret part must match, not only the id.
    let controller = &cluster.tokens[2].1;
    let last = if controller.ends_with('0') { '1' } else { '0' };
    let tampered = format!("{}{last}", &controller[..controller.len() - 1]);
    let (code, _) = send(&cluster.app, "GET", "/api/v1/whoami", Some(&tampered), None).await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn issuing_a_token_validates_role_identity_and_lifetime() {
    let app = app();
    for body in [
        json!({ "identity": "x", "role": "root" }),
        json!({ "identity": "Bad Name", "role": "user" }),
        json!({ "identity": "x", "role": "user", "ttl_seconds": 0 }),
        json!({ "identity": "x", "role": "node:" }),
        json!({ "identity": "x", "role": "user", "extra": 1 }),
    ] {
        let (code, answer) = send(&app, "POST", "/api/v1/tokens", Some(ADMIN_TOKEN), Some(&body)).await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{body}: {answer}");
    }
}

#[tokio::test]
async fn every_mutating_request_is_audited_with_who_what_and_the_result() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let store: Arc<dyn Store> = Arc::new(memory::open(StoreOptions::default()));
    let auth = Authenticator::required(store.clone(), vec![(ADMIN_TOKEN.into(), Identity::bootstrap_admin())]);
    let audit = sandboxd_o::apiserver::audit::AuditLog::start(path.clone(), 1 << 20).unwrap();
    let app = router(ApiState::new(store, &Config::default()).with_auth(auth).with_audit(audit), 1 << 20);
    let user = issue(&app, "alice", "user").await;
    let sandbox = json!({ "id": "s1", "spec": { "containers": [{ "name": "c", "image": "busybox" }] } });
    assert_eq!(send(&app, "POST", "/api/v1/sandboxes", Some(&user), Some(&sandbox)).await.0, StatusCode::CREATED);
    assert_eq!(send(&app, "GET", "/api/v1/sandboxes/s1", Some(&user), None).await.0, StatusCode::OK);
    assert_eq!(send(&app, "DELETE", "/api/v1/nodes/n1", Some(&user), None).await.0, StatusCode::FORBIDDEN);
    assert_eq!(send(&app, "DELETE", "/api/v1/nodes/n1", None, None).await.0, StatusCode::UNAUTHORIZED);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let lines: Vec<Value> = loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        if lines.len() >= 4 || std::time::Instant::now() > deadline {
            break lines;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(lines.len(), 4, "token issue, create, two refused deletes; the GET is not audited: {lines:?}");
    assert_eq!((lines[0]["identity"].as_str(), lines[0]["route"].as_str()), (Some("admin"), Some("/api/v1/tokens")));
    let created = &lines[1];
    assert_eq!(created["identity"], "alice");
    assert_eq!(created["role"], "user");
    assert_eq!(created["verb"], "POST");
    assert_eq!(created["code"], 201);
    let refused = &lines[2];
    assert_eq!((refused["object"].as_str(), refused["code"].as_u64()), (Some("node/n1"), Some(403)));
    assert!(!refused["request_id"].as_str().unwrap().is_empty());
    assert_eq!((lines[3]["identity"].as_str(), lines[3]["code"].as_u64()), (Some("unauthenticated"), Some(401)));
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
}

fn app_with(flags: &[(&str, &str)]) -> Router {
    let flags = flags.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let config = Config::load(None, &Default::default(), &flags).unwrap();
    let store: Arc<dyn Store> = Arc::new(memory::open(StoreOptions::default()));
    let auth = Authenticator::required(store.clone(), vec![(ADMIN_TOKEN.into(), Identity::bootstrap_admin())]);
    router(ApiState::new(store, &config).with_auth(auth), 1 << 20)
}

/// Opens a watch and keeps its response (and so its slot) alive; returns its status.
async fn open_watch(app: &Router, token: &str, held: &mut Vec<axum::response::Response>) -> StatusCode {
    let request = Request::builder()
        .uri("/api/v1/sandboxes?watch=true")
        .header(AUTHORIZATION, format!("Bearer {token}"))
        .body(Body::empty())
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    held.push(response);
    status
}

#[tokio::test]
async fn one_identity_cannot_take_a_whole_class_or_every_watch() {
    let app = app_with(&[("max_inflight_long_running", "4"), ("max_inflight_share", "50")]);
    let (alice, bob) = (issue(&app, "alice", "user").await, issue(&app, "bob", "user").await);
    let mut held = Vec::new();
    assert_eq!(open_watch(&app, &alice, &mut held).await, StatusCode::OK);
    assert_eq!(open_watch(&app, &alice, &mut held).await, StatusCode::OK);
    let third = open_watch(&app, &alice, &mut held).await;
    assert_eq!(third, StatusCode::TOO_MANY_REQUESTS, "alice holds half the long-running class");
    assert_eq!(open_watch(&app, &bob, &mut held).await, StatusCode::OK, "bob still gets in");
    held.clear();
    assert_eq!(open_watch(&app, &alice, &mut held).await, StatusCode::OK, "slots come back with the streams");

    let app = app_with(&[("max_watches_per_identity", "1")]);
    let (alice, bob) = (issue(&app, "alice", "user").await, issue(&app, "bob", "user").await);
    let mut held = Vec::new();
    assert_eq!(open_watch(&app, &alice, &mut held).await, StatusCode::OK);
    assert_eq!(open_watch(&app, &alice, &mut held).await, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(open_watch(&app, &bob, &mut held).await, StatusCode::OK);
}

#[tokio::test]
async fn refused_callers_take_no_slot() {
    let app = app_with(&[("max_inflight_long_running", "1")]);
    let mut held = Vec::new();
    for _ in 0..5 {
        assert_eq!(open_watch(&app, "sbx_0123456789abcdef_nope", &mut held).await, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(open_watch(&app, ADMIN_TOKEN, &mut held).await, StatusCode::OK, "401s held nothing");
}
