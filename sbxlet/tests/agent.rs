//! End-to-end tests of one simulated agent over real sockets: API, published ports, faults and admin endpoints.

use reqwest::StatusCode;
use sbxlet::{start, AgentHandle, Faults, SimConfig};
use serde_json::{json, Value};
use std::io::ErrorKind;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// === fixtures ===

struct TestAgent {
    handle: AgentHandle,
    http: reqwest::Client,
    base: String,
}

/// An agent on a loopback address of its own, so the host ports a test picks are free there.
async fn agent() -> TestAgent {
    let listen = std::net::SocketAddr::from((sandboxd_testkit::unique_loopback_ip(), 0));
    agent_with(SimConfig { listen, external: "203.0.113.10".into(), ..SimConfig::default() }).await
}

async fn agent_with(config: SimConfig) -> TestAgent {
    // These tests drive the simulator through its /sim routes.
    let handle = start(SimConfig { fault_injection: true, ..config }).await.expect("agent starts");
    let base = format!("http://{}", handle.addr());
    let http = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(5)).build().unwrap();
    TestAgent { handle, http, base }
}

impl TestAgent {
    /// The address the agent and its published ports listen on.
    fn ip(&self) -> std::net::IpAddr {
        self.handle.addr().ip()
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<&Value>) -> (StatusCode, Value) {
        let (status, text) = self.call_text(method, path, body).await;
        let value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: body {text:?} is not JSON: {e}"));
        (status, value)
    }

    async fn call_text(&self, method: reqwest::Method, path: &str, body: Option<&Value>) -> (StatusCode, String) {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.unwrap_or_else(|e| panic!("{path}: {e}"));
        (response.status(), response.text().await.unwrap())
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(reqwest::Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    async fn put(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        self.call(reqwest::Method::PUT, path, Some(body)).await
    }

    async fn delete(&self, path: &str) -> (StatusCode, Value) {
        self.call(reqwest::Method::DELETE, path, None).await
    }

    /// Creates a sandbox a test needs as setup; the test stops here if the agent refuses it.
    async fn create_ok(&self, sandbox: &Sandbox) -> Value {
        let (code, body) = self.create(sandbox).await;
        assert_eq!(code, StatusCode::CREATED, "setup create failed: {body}");
        body
    }

    async fn create(&self, sandbox: &Sandbox) -> (StatusCode, Value) {
        self.post("/api/v1/sandboxes", &sandbox.0).await
    }

    async fn status(&self) -> Value {
        let (code, body) = self.get("/api/v1/status").await;
        assert_eq!(code, StatusCode::OK, "{body}");
        body
    }
}

/// A create request, built up field by field.
#[derive(Clone)]
struct Sandbox(Value);

fn sandbox(id: &str) -> Sandbox {
    Sandbox(json!({
        "id": id,
        "egress": false,
        "labels": {"sandboxd.io/managed": "true"},
        "ports": [],
        "containers": [{"name": "web", "image": "nginx:latest"}],
    }))
}

impl Sandbox {
    fn cpu(mut self, q: &str) -> Self {
        self.0["containers"][0]["resource"]["cpu"] = json!(q);
        self
    }

    fn memory(mut self, q: &str) -> Self {
        self.0["containers"][0]["resource"]["memory"] = json!(q);
        self
    }

    fn port(self, host_port: u16) -> Self {
        self.port_with(host_port, "tcp")
    }

    fn port_with(mut self, host_port: u16, protocol: &str) -> Self {
        let container_port = 80 + self.0["ports"].as_array().unwrap().len();
        self.0["ports"].as_array_mut().unwrap().push(json!({
            "host_port": host_port, "container_port": container_port, "protocol": protocol,
        }));
        self
    }

    fn container(mut self, name: &str, image: &str) -> Self {
        self.0["containers"].as_array_mut().unwrap().push(json!({"name": name, "image": image}));
        self
    }
}

/// The HTTP status a published port answers with, or the connect error.
async fn probe(ip: std::net::IpAddr, port: u16) -> std::io::Result<u16> {
    let mut stream = TcpStream::connect((ip, port)).await?;
    stream.write_all(b"GET / HTTP/1.1\r\nHost: probe\r\n\r\n").await?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await?;
    let code = answer.split(' ').nth(1).and_then(|c| c.parse().ok());
    Ok(code.unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}")))
}

async fn assert_port_closed(ip: std::net::IpAddr, port: u16) {
    match TcpStream::connect((ip, port)).await {
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionRefused),
        Ok(_) => panic!("port {port} still accepts connections"),
    }
}

fn error_of(body: &Value) -> &str {
    body["error"].as_str().unwrap_or_else(|| panic!("no error message in {body}"))
}

// === health and status ===

#[tokio::test]
async fn healthz_and_status_of_an_empty_agent() {
    let a = agent().await;
    assert_eq!(a.get("/healthz").await, (StatusCode::OK, json!({"ok": true})));
    let mut status = a.status().await;
    let hostname = status.as_object_mut().unwrap().remove("hostname");
    assert!(hostname.is_some_and(|h| h.is_string()), "the machine's host name is reported");
    assert_eq!(
        status,
        json!({
            "capacity_cpu_milli": 4000,
            "capacity_memory_bytes": 16u64 << 30,
            "used_cpu_milli": 0,
            "used_memory_bytes": 0,
            "external": "203.0.113.10",
            "sandboxes": 0,
            "arch": std::env::consts::ARCH,
            "runtime": "sim",
            "runtime_classes": ["runc", "gvisor"],
        })
    );
}

// === sandbox lifecycle ===

#[tokio::test]
async fn sandbox_is_created_read_counted_and_deleted() {
    let a = agent().await;
    let (code, created) = a.create(&sandbox("sbx-1").cpu("250m").container("db", "postgres:16")).await;
    assert_eq!(code, StatusCode::CREATED, "{created}");
    assert_eq!(created["sandbox"]["phase"], "creating");
    assert_eq!(created["sandbox"]["private_ip"], "10.88.0.2");

    let (code, got) = a.get("/api/v1/sandboxes/sbx-1").await;
    assert_eq!(code, StatusCode::OK);
    let s = &got["sandbox"];
    assert_eq!(s["phase"], "running", "zero create delay runs at once: {s}");
    assert_eq!(s["labels"], json!({"sandboxd.io/managed": "true"}));
    assert_eq!(s["containers"][1], json!({"name": "db", "state": "running", "restart_count": 0, "exit_code": null}));
    assert!(s["created_at"].as_str().unwrap().ends_with('Z'), "{s}");

    let status = a.status().await;
    assert_eq!((status["used_cpu_milli"].as_u64(), status["sandboxes"].as_u64()), (Some(350), Some(1)));
    assert_eq!(status["used_memory_bytes"], 256u64 << 20);

    assert_eq!(a.delete("/api/v1/sandboxes/sbx-1").await, (StatusCode::OK, json!({"id": "sbx-1", "phase": "deleted"})));
    assert_eq!(a.get("/api/v1/sandboxes/sbx-1").await.0, StatusCode::NOT_FOUND);
    let (code, body) = a.delete("/api/v1/sandboxes/sbx-1").await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert!(error_of(&body).contains("sbx-1"));
    assert_eq!(a.status().await["used_cpu_milli"], 0);

    let (_, again) = a.create(&sandbox("sbx-2")).await;
    assert_eq!(again["sandbox"]["private_ip"], "10.88.0.2", "the address is released on delete");
}

/// Creates `n` sandboxes with one published port each and deletes them again.
async fn churn(a: &TestAgent, n: usize) {
    for i in 0..n {
        let (code, body) = a.create(&sandbox(&format!("churn-{i}")).port(10_000 + i as u16)).await;
        assert_eq!(code, StatusCode::CREATED, "{body}");
    }
    for i in 0..n {
        let (code, body) = a.delete(&format!("/api/v1/sandboxes/churn-{i}")).await;
        assert_eq!(code, StatusCode::OK, "{body}");
    }
}

#[tokio::test]
async fn deleted_sandboxes_leave_nothing_behind() {
    let a = agent().await;
    churn(&a, 40).await;
    assert_eq!(a.handle.sandbox_count(), 0);
    assert!(a.handle.admissions().is_empty(), "an agent that runs for months keeps no record per deleted id");
    let status = a.status().await;
    assert_eq!(status["sandboxes"], 0, "{status}");
    assert_eq!(status["used_cpu_milli"], 0, "{status}");
    // The IP pool handed every address back: the next sandbox gets the first address again.
    let (_, created) = a.create(&sandbox("after")).await;
    assert_eq!(created["sandbox"]["private_ip"], "10.88.0.2");
}

#[tokio::test]
async fn admissions_are_recorded_only_when_asked() {
    let a = agent_with(SimConfig { record_admissions: true, ..SimConfig::default() }).await;
    churn(&a, 3).await;
    assert_eq!(a.handle.admissions().len(), 3);
    assert!(a.handle.admissions().values().all(|n| *n == 1));
}

#[tokio::test]
async fn sandbox_stays_creating_until_the_create_delay() {
    let a = agent_with(SimConfig { create_delay: Duration::from_secs(600), ..SimConfig::default() }).await;
    a.create_ok(&sandbox("slow")).await;
    let (_, got) = a.get("/api/v1/sandboxes/slow").await;
    assert_eq!(got["sandbox"]["phase"], "creating");
    assert_eq!(got["sandbox"]["containers"][0]["state"], "waiting");
}

#[tokio::test]
async fn same_spec_again_is_200_and_a_different_spec_is_409() {
    let a = agent().await;
    assert_eq!(a.create(&sandbox("s")).await.0, StatusCode::CREATED);
    let (code, again) = a.create(&sandbox("s")).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(again["sandbox"]["phase"], "running");
    let (code, body) = a.create(&sandbox("s").cpu("2")).await;
    assert_eq!(code, StatusCode::CONFLICT);
    assert!(error_of(&body).contains("different spec"), "{body}");
    assert_eq!(a.status().await["sandboxes"], 1);
}

#[tokio::test]
async fn host_port_of_another_sandbox_is_409_per_protocol() {
    let a = agent().await;
    let port = 10_001;
    assert_eq!(a.create(&sandbox("a").port(port)).await.0, StatusCode::CREATED);
    let (code, body) = a.create(&sandbox("b").port(port)).await;
    assert_eq!(code, StatusCode::CONFLICT);
    assert!(error_of(&body).contains("already used by sandbox \"a\""), "{body}");
    assert_eq!(a.create(&sandbox("c").port_with(port, "udp")).await.0, StatusCode::CREATED);
}

#[tokio::test]
async fn capacity_exceeded_is_409_naming_the_resource() {
    let a = agent_with(SimConfig { capacity_cpu_milli: 1000, capacity_memory_bytes: 1 << 30, ..SimConfig::default() })
        .await;
    assert_eq!(a.create(&sandbox("a").cpu("800m")).await.0, StatusCode::CREATED);
    let (code, body) = a.create(&sandbox("b").cpu("300m")).await;
    assert_eq!(code, StatusCode::CONFLICT);
    assert!(error_of(&body).contains("insufficient cpu"), "{body}");
    let (code, body) = a.create(&sandbox("c").cpu("100m").memory("2Gi")).await;
    assert_eq!(code, StatusCode::CONFLICT);
    assert!(error_of(&body).contains("insufficient memory"), "{body}");
    assert_eq!(a.create(&sandbox("d").cpu("200m")).await.0, StatusCode::CREATED, "exactly full is allowed");
}

#[tokio::test]
async fn malformed_and_invalid_creates_are_400() {
    let a = agent().await;
    let (code, text) = a.call_text(reqwest::Method::POST, "/api/v1/sandboxes", None).await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert!(serde_json::from_str::<Value>(&text).unwrap()["error"].is_string());

    let response = a.http.post(format!("{}/api/v1/sandboxes", a.base)).body("{not json").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);

    let mut no_containers = sandbox("x");
    no_containers.0["containers"] = json!([]);
    let (code, body) = a.create(&no_containers).await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert!(error_of(&body).contains("containers: at least one container is required"), "{body}");

    let (code, body) = a.create(&sandbox("Not_A_Name")).await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(a.status().await["sandboxes"], 0);
}

#[tokio::test]
async fn list_pages_by_id_with_cursor_and_limit() {
    let a = agent().await;
    for id in ["s3", "s1", "s5", "s2", "s4"] {
        assert_eq!(a.create(&sandbox(id)).await.0, StatusCode::CREATED);
    }
    let ids = |page: &Value| -> Vec<String> {
        page["items"].as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap().to_string()).collect()
    };
    let (_, page) = a.get("/api/v1/sandboxes?limit=2").await;
    assert_eq!((ids(&page), page["next_cursor"].as_str()), (vec!["s1".into(), "s2".into()], Some("s2")));
    let (_, page) = a.get("/api/v1/sandboxes?limit=2&cursor=s2").await;
    assert_eq!((ids(&page), page["next_cursor"].as_str()), (vec!["s3".into(), "s4".into()], Some("s4")));
    let (_, page) = a.get("/api/v1/sandboxes?limit=2&cursor=s4").await;
    assert_eq!((ids(&page), page["next_cursor"].as_str()), (vec!["s5".into()], Some("")));
    let (_, all) = a.get("/api/v1/sandboxes").await;
    assert_eq!((ids(&all).len(), all["next_cursor"].as_str()), (5, Some("")));
    let (_, exact) = a.get("/api/v1/sandboxes?limit=5").await;
    assert_eq!(exact["next_cursor"], "", "nothing remains after an exactly full page");

    for bad in ["limit=0", "limit=1001", "limit=abc"] {
        let (code, body) = a.get(&format!("/api/v1/sandboxes?{bad}")).await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{bad}: {body}");
        error_of(&body);
    }
}

#[tokio::test]
async fn logs_of_a_sandbox_and_of_one_container() {
    let a = agent().await;
    a.create_ok(&sandbox("s").container("db", "postgres:16")).await;
    let (code, logs) = a.get("/api/v1/sandboxes/s/logs").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(logs["sandbox_id"], "s");
    let lines: Vec<&str> = logs["logs"]["lines"].as_array().unwrap().iter().map(|l| l.as_str().unwrap()).collect();
    assert!(lines.contains(&"[web] pulled image nginx:latest"), "{lines:?}");
    assert!(lines.contains(&"[db] started"), "{lines:?}");
    assert!(lines.iter().all(|l| l.starts_with("[web] ") || l.starts_with("[db] ")), "{lines:?}");

    let (_, tail) = a.get("/api/v1/sandboxes/s/logs?tail=2").await;
    assert_eq!(tail["logs"]["lines"], json!(["[db] created container db", "[db] started"]));

    let (code, one) = a.get("/api/v1/sandboxes/s/containers/db/logs?tail=1").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(one, json!({"sandbox_id": "s", "container": "db", "logs": {"lines": ["started"]}}));

    assert_eq!(a.get("/api/v1/sandboxes/s/containers/nope/logs").await.0, StatusCode::NOT_FOUND);
    assert_eq!(a.get("/api/v1/sandboxes/nope/logs").await.0, StatusCode::NOT_FOUND);
    assert_eq!(a.get("/api/v1/sandboxes/s/logs?tail=x").await.0, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn reconcile_answers_ok() {
    let a = agent().await;
    a.create_ok(&sandbox("s")).await;
    assert_eq!(a.post("/api/v1/reconcile", &json!({})).await, (StatusCode::OK, json!({"ok": true})));
    assert_eq!(a.get("/api/v1/sandboxes/s").await.1["sandbox"]["phase"], "running");
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_json_errors() {
    let a = agent().await;
    let (code, body) = a.get("/api/v1/nope").await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    error_of(&body);
    let (code, body) = a.delete("/api/v1/status").await;
    assert_eq!(code, StatusCode::METHOD_NOT_ALLOWED);
    error_of(&body);
}

// === published ports ===

#[tokio::test]
async fn published_port_answers_200_then_503_under_fault_and_closes_on_delete() {
    let a = agent().await;
    let port = 10_001;
    assert_eq!(a.create(&sandbox("web").port(port)).await.0, StatusCode::CREATED);
    assert_eq!(probe(a.ip(), port).await.unwrap(), 200);

    let (code, _) = a.put("/sim/faults", &json!({"probe_503": true})).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(probe(a.ip(), port).await.unwrap(), 503);
    a.handle.set_faults(Faults::default());
    assert_eq!(probe(a.ip(), port).await.unwrap(), 200);

    assert_eq!(a.delete("/api/v1/sandboxes/web").await.0, StatusCode::OK);
    assert_port_closed(a.ip(), port).await;
}

#[tokio::test]
async fn udp_ports_are_not_bound() {
    let a = agent().await;
    let port = 10_001;
    assert_eq!(a.create(&sandbox("dns").port_with(port, "udp")).await.0, StatusCode::CREATED);
    assert_port_closed(a.ip(), port).await;
}

#[tokio::test]
async fn port_in_use_on_the_host_is_409_and_nothing_is_kept() {
    let a = agent().await;
    let free = 10_001;
    let squatter = std::net::TcpListener::bind((a.ip(), 0)).unwrap();
    let taken = squatter.local_addr().unwrap().port();
    let (code, body) = a.create(&sandbox("s").port(free).port(taken)).await;
    assert_eq!(code, StatusCode::CONFLICT);
    assert!(error_of(&body).contains("in use on the host"), "{body}");
    assert_eq!(a.status().await["sandboxes"], 0);
    assert_eq!(a.get("/api/v1/sandboxes/s").await.0, StatusCode::NOT_FOUND);
    assert_port_closed(a.ip(), free).await;

    drop(squatter);
    let (code, created) = a.create(&sandbox("s").port(free).port(taken)).await;
    assert_eq!(code, StatusCode::CREATED, "{created}");
    assert_eq!(created["sandbox"]["private_ip"], "10.88.0.2", "the failed create kept no address");
}

// === faults ===

#[tokio::test]
async fn health_and_status_faults_answer_500() {
    let a =
        agent_with(SimConfig { faults: Faults { health_failing: true, ..Faults::default() }, ..SimConfig::default() })
            .await;
    let (code, body) = a.get("/healthz").await;
    assert_eq!(code, StatusCode::INTERNAL_SERVER_ERROR);
    error_of(&body);
    assert_eq!(a.get("/api/v1/status").await.0, StatusCode::OK);

    a.handle.set_faults(Faults { status_failing: true, ..Faults::default() });
    assert_eq!(a.get("/healthz").await.0, StatusCode::OK);
    let (code, body) = a.get("/api/v1/status").await;
    assert_eq!(code, StatusCode::INTERNAL_SERVER_ERROR);
    error_of(&body);
}

#[tokio::test]
async fn latency_delays_every_answer() {
    let a = agent().await;
    a.handle.set_faults(Faults { latency_ms: 150, ..Faults::default() });
    let started = Instant::now();
    assert_eq!(a.get("/healthz").await.0, StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(150), "{:?}", started.elapsed());
}

#[tokio::test]
async fn error_rate_one_fails_sandbox_calls_without_acting() {
    let a = agent().await;
    a.put("/sim/faults", &json!({"error_rate": 1.0})).await;
    let (code, body) = a.create(&sandbox("s")).await;
    assert_eq!(code, StatusCode::INTERNAL_SERVER_ERROR);
    error_of(&body);
    assert_eq!(a.get("/api/v1/sandboxes").await.0, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(a.get("/healthz").await.0, StatusCode::OK);
    assert_eq!(a.status().await["sandboxes"], 0, "a failed call does nothing");
    assert!(a.handle.sandbox_ids().is_empty());
}

#[tokio::test]
async fn garbage_answers_200_with_a_non_json_body() {
    let a = agent().await;
    a.handle.set_faults(Faults { garbage: true, ..Faults::default() });
    for path in ["/healthz", "/api/v1/status", "/api/v1/sandboxes"] {
        let (code, text) = a.call_text(reqwest::Method::GET, path, None).await;
        assert_eq!(code, StatusCode::OK, "{path}");
        assert!(serde_json::from_str::<Value>(&text).is_err(), "{path}: {text:?}");
    }
    let (code, faults) = a.get("/sim/faults").await;
    assert_eq!(code, StatusCode::OK, "admin endpoints stay truthful");
    assert_eq!(faults["garbage"], true);
}

#[tokio::test]
async fn faults_are_read_and_replaced_over_http_and_by_handle() {
    let a = agent().await;
    assert_eq!(
        a.get("/sim/faults").await.1,
        json!({"health_failing": false, "status_failing": false, "latency_ms": 0, "error_rate": 0.0, "garbage": false, "probe_503": false})
    );
    let (code, body) = a.put("/sim/faults", &json!({"latency_ms": 5, "error_rate": 0.5})).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(a.handle.faults(), Faults { latency_ms: 5, error_rate: 0.5, ..Faults::default() });

    let (code, body) = a.put("/sim/faults", &json!({"error_rate": 2.0})).await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    error_of(&body);
    assert_eq!(a.handle.faults().error_rate, 0.5, "a rejected replacement changes nothing");

    a.handle.set_faults(Faults { probe_503: true, ..Faults::default() });
    assert_eq!(a.get("/sim/faults").await.1["probe_503"], true);
}

// === admin: restart and fail ===

#[tokio::test]
async fn restart_over_http_forgets_sandboxes_and_ports() {
    let a = agent().await;
    let port = 10_001;
    a.create_ok(&sandbox("s").port(port).cpu("1")).await;
    assert_eq!(a.post("/sim/restart", &json!({})).await, (StatusCode::OK, json!({"ok": true})));
    assert_eq!(a.get("/api/v1/sandboxes/s").await.0, StatusCode::NOT_FOUND);
    assert_eq!(a.get("/api/v1/sandboxes").await.1["items"], json!([]));
    assert_eq!(a.status().await["used_cpu_milli"], 0);
    assert_port_closed(a.ip(), port).await;
}

#[tokio::test]
async fn restart_by_handle_lets_the_same_port_be_published_again() {
    let a = agent().await;
    let port = 10_001;
    a.create_ok(&sandbox("s").port(port)).await;
    a.handle.restart();
    assert!(a.handle.sandbox_ids().is_empty());
    let (code, body) = a.create(&sandbox("s").port(port)).await;
    assert_eq!(code, StatusCode::CREATED, "{body}");
    assert_eq!(probe(a.ip(), port).await.unwrap(), 200);
}

#[tokio::test]
async fn failing_a_sandbox_shows_failed_with_the_message() {
    let a = agent().await;
    a.create_ok(&sandbox("s")).await;
    let (code, body) = a.post("/sim/sandboxes/s/fail", &json!({"message": "oom killed"})).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let (_, got) = a.get("/api/v1/sandboxes/s").await;
    assert_eq!(
        (got["sandbox"]["phase"].as_str(), got["sandbox"]["message"].as_str()),
        (Some("failed"), Some("oom killed"))
    );
    assert_eq!(got["sandbox"]["containers"][0]["state"], "terminated");
    assert_eq!(a.post("/sim/sandboxes/nope/fail", &json!({"message": "x"})).await.0, StatusCode::NOT_FOUND);

    a.create_ok(&sandbox("t")).await;
    assert!(a.handle.fail_sandbox("t", "crashed"));
    assert!(!a.handle.fail_sandbox("nope", "crashed"));
    assert_eq!(a.get("/api/v1/sandboxes/t").await.1["sandbox"]["message"], "crashed");
    assert_eq!(a.handle.sandbox_ids(), vec!["s".to_string(), "t".to_string()]);
}

// === lifecycle of the agent ===

#[tokio::test]
async fn shutdown_closes_the_api_and_published_ports() {
    let a = agent().await;
    let port = 10_001;
    a.create_ok(&sandbox("s").port(port)).await;
    let api = a.handle.addr();
    a.handle.shutdown().await;
    assert!(TcpStream::connect(api).await.is_err(), "api still listening");
    assert_port_closed(api.ip(), port).await;
}

#[tokio::test]
async fn dropping_the_handle_stops_the_agent() {
    let a = agent().await;
    let api = a.handle.addr();
    drop(a.handle);
    let deadline = Instant::now() + Duration::from_secs(2);
    while TcpStream::connect(api).await.is_ok() {
        assert!(Instant::now() < deadline, "agent still listening after drop");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn invalid_configuration_is_refused_at_start() {
    let bad_pool = start(SimConfig { ip_pool: "10.88.0.0".into(), ..SimConfig::default() }).await;
    assert_eq!(bad_pool.unwrap_err().kind(), ErrorKind::InvalidInput);
    let bad_rate =
        start(SimConfig { faults: Faults { error_rate: 3.0, ..Faults::default() }, ..SimConfig::default() }).await;
    assert_eq!(bad_rate.unwrap_err().kind(), ErrorKind::InvalidInput);
}
