//! Node side end to end: heartbeats and states against sim agents, the on-demand heartbeat, and the node proxy.

mod common;

use common::*;
use reqwest::Method;
use sandboxd_api::NodeState;
use sbxlet::Faults;
use serde_json::{json, Value};

fn direct_sandbox(id: &str, host_port: u16) -> Value {
    json!({
        "id": id,
        "egress": true,
        "ports": [{"host_port": host_port, "container_port": 80, "protocol": "tcp"}],
        "containers": [{"name": "web", "image": "nginx:latest", "resource": {"cpu": "200m", "memory": "256Mi"}}]
    })
}

// === heartbeats and states ===

#[tokio::test]
async fn node_becomes_ready_after_threshold_heartbeats_with_resources() {
    let agent = start_agent(Faults::default()).await;
    let (server, client) = start_server(test_config(&[("node_ready_threshold", "3")])).await;
    let created = register(&client, "node-a", agent.addr()).await;
    assert_eq!(created.status.state, NodeState::Unknown);
    assert_eq!(created.status.success_streak, 0, "the create-time status call is not a heartbeat");
    assert_eq!(created.status.resources.capacity_cpu_milli, 4000, "create answer carries resources");

    let ready = wait_node_state(&client, "node-a", NodeState::Ready).await;
    assert!(
        ready.status.success_streak >= 3,
        "Ready only at the configured threshold: {}",
        ready.status.success_streak
    );
    assert_eq!(ready.status.resources.allocatable_cpu_milli, 3600);
    assert_eq!(ready.status.resources.external, "203.0.113.10");
    let labels = ready.effective_labels();
    assert_eq!(labels.get("sandboxd.io/runtime").map(String::as_str), Some("sim"), "{labels:?}");
    assert_eq!(labels.get("sandboxd.io/arch").map(String::as_str), Some(std::env::consts::ARCH));
    assert!(labels.contains_key("sandboxd.io/hostname"), "{labels:?}");
    assert!(ready.status.last_heartbeat.is_some());
    assert_eq!(ready.status.last_error, "");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn failing_health_makes_node_not_ready_then_recovery_makes_it_ready() {
    let agent = start_agent(Faults::default()).await;
    let (server, client) = start_server(test_config(&[])).await;
    register(&client, "node-a", agent.addr()).await;
    wait_node_state(&client, "node-a", NodeState::Ready).await;

    agent.set_faults(Faults { health_failing: true, ..Faults::default() });
    let down = wait_node_state(&client, "node-a", NodeState::NotReady).await;
    assert!(down.status.failure_streak >= 3);
    assert!(down.status.last_error.starts_with("unhealthy: "), "reported unhealthy: {}", down.status.last_error);

    agent.set_faults(Faults::default());
    let up = wait_node_state(&client, "node-a", NodeState::Ready).await;
    assert_eq!(up.status.failure_streak, 0);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn dead_agent_is_reported_unreachable() {
    let (server, client) = start_server(test_config(&[])).await;
    let closed = exclusive_addr(9);
    register(&client, "node-dead", closed).await;
    let down = wait_node_state(&client, "node-dead", NodeState::NotReady).await;
    assert!(down.status.last_error.starts_with("unreachable: "), "{}", down.status.last_error);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn deleted_node_is_not_resurrected_by_heartbeats() {
    let agent = start_agent(Faults::default()).await;
    let (server, client) = start_server(test_config(&[])).await;
    register(&client, "node-a", agent.addr()).await;
    register(&client, "node-b", agent.addr()).await;
    wait_node_state(&client, "node-a", NodeState::Ready).await;
    client.delete_node("node-a").await.unwrap();
    // node-b's heartbeats witness rounds of the node controller after the delete.
    wait_heartbeats(&client, "node-b", 4).await;
    assert!(client.get_node("node-a").await.unwrap_err().is_not_found());
    server.stop().await.unwrap();
}

// === on-demand heartbeat ===

#[tokio::test]
async fn on_demand_heartbeat_reports_ok_degraded_and_failed() {
    let agent = start_agent(Faults::default()).await;
    // A long interval keeps periodic heartbeats out of the way of the streak assertions.
    let (server, client) =
        start_server(test_config(&[("heartbeat_interval", "1h"), ("heartbeat_timeout", "300ms")])).await;
    register(&client, "node-a", agent.addr()).await;

    let (status, ok) = call(&client, Method::POST, "/api/v1/nodes/node-a/heartbeat", None).await;
    assert_eq!(status, 200);
    assert_eq!(ok["heartbeat"], "ok");
    assert_eq!(ok["resources"]["capacity_cpu_milli"], 4000);
    assert_eq!((ok["heartbeat_error"].as_str(), ok["status_error"].as_str()), (Some(""), Some("")));

    agent.set_faults(Faults { status_failing: true, ..Faults::default() });
    let (_, degraded) = call(&client, Method::POST, "/api/v1/nodes/node-a/heartbeat", None).await;
    assert_eq!(degraded["heartbeat"], "degraded");
    assert_ne!(degraded["status_error"], "");
    assert_eq!(degraded["node"]["state"], "Ready", "degraded counts as a success: two in a row reach Ready");
    assert_eq!(degraded["resources"]["capacity_cpu_milli"], 4000, "resources keep their last values");

    agent.set_faults(Faults { health_failing: true, ..Faults::default() });
    let (status, failed) = call(&client, Method::POST, "/api/v1/nodes/node-a/heartbeat", None).await;
    assert_eq!(status, 200, "the outcome is in the body");
    assert_eq!(failed["heartbeat"], "failed");
    assert_eq!(failed["status_error"], "", "a failed health check skips the status call");
    assert_eq!(failed["node"]["failure_streak"], 1);
    assert_eq!(failed["node"]["state"], "Ready", "one failure does not flap a Ready node");

    let (status, _) = call(&client, Method::POST, "/api/v1/nodes/nope/heartbeat", None).await;
    assert_eq!(status, 404);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn config_nodes_are_registered_with_source_config() {
    let agent = start_agent(Faults::default()).await;
    let nodes = format!(r#"[{{"id": "static-1", "ip": "127.0.0.1", "port": {}}}]"#, agent.addr().port());
    let (server, client) = start_server(test_config(&[("nodes", &nodes)])).await;
    let node = client.get_node("static-1").await.unwrap();
    assert_eq!(node.source, sandboxd_api::NodeSource::Config);
    // Posting it through the API keeps its source.
    register(&client, "static-1", agent.addr()).await;
    assert_eq!(client.get_node("static-1").await.unwrap().source, sandboxd_api::NodeSource::Config);
    server.stop().await.unwrap();
}

// === node proxy ===

#[tokio::test]
async fn proxy_endpoints_pass_through_to_a_healthy_agent() {
    let agent = start_agent(Faults::default()).await;
    let (server, client) = start_server(test_config(&[])).await;
    register(&client, "node-a", agent.addr()).await;
    let host_port = 10_001;

    let (status, created) =
        call(&client, Method::POST, "/api/v1/nodes/node-a/sandboxes", Some(direct_sandbox("sbx-direct-1", host_port)))
            .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["sandbox"]["id"], "sbx-direct-1");

    let (status, list) = call(&client, Method::GET, "/api/v1/nodes/node-a/sandboxes?limit=10", None).await;
    assert_eq!(status, 200);
    assert_eq!(list["items"][0]["id"], "sbx-direct-1");
    assert_eq!(list["external"], "203.0.113.10");
    assert_eq!(list["next_cursor"], "");

    let (status, one) = call(&client, Method::GET, "/api/v1/nodes/node-a/sandboxes/sbx-direct-1", None).await;
    assert_eq!(status, 200);
    assert_eq!(one["sandbox"]["phase"], "running");
    assert_eq!(one["external"], "203.0.113.10");

    let (status, logs) =
        call(&client, Method::GET, "/api/v1/nodes/node-a/sandboxes/sbx-direct-1/logs?tail=2", None).await;
    assert_eq!(status, 200);
    assert_eq!(logs["sandbox_id"], "sbx-direct-1");
    let lines = logs["logs"]["lines"].as_array().unwrap();
    assert_eq!(lines.len(), 2);
    assert!(lines[0].as_str().unwrap().starts_with("[web] "));

    let (status, c_logs) =
        call(&client, Method::GET, "/api/v1/nodes/node-a/sandboxes/sbx-direct-1/containers/web/logs", None).await;
    assert_eq!(status, 200);
    assert_eq!(c_logs["container"], "web");

    let (status, ok) = call(&client, Method::POST, "/api/v1/nodes/node-a/reconcile", None).await;
    assert_eq!((status, ok), (200, json!({"ok": true})));

    let (status, deleted) = call(&client, Method::DELETE, "/api/v1/nodes/node-a/sandboxes/sbx-direct-1", None).await;
    assert_eq!((status, deleted), (200, json!({"id": "sbx-direct-1", "phase": "deleted"})));
    server.stop().await.unwrap();
}

#[tokio::test]
async fn proxy_passes_agent_404_and_409_through() {
    let agent = start_agent(Faults::default()).await;
    let (server, client) = start_server(test_config(&[])).await;
    register(&client, "node-a", agent.addr()).await;
    let (status, body) = call(&client, Method::GET, "/api/v1/nodes/node-a/sandboxes/missing", None).await;
    assert_eq!(status, 404, "{body}");

    let host_port = 10_001;
    call(&client, Method::POST, "/api/v1/nodes/node-a/sandboxes", Some(direct_sandbox("one", host_port))).await;
    let (status, body) =
        call(&client, Method::POST, "/api/v1/nodes/node-a/sandboxes", Some(direct_sandbox("two", host_port))).await;
    assert_eq!(status, 409, "host port clash passes through: {body}");
    assert!(!body["error"].as_str().unwrap().is_empty());
    server.stop().await.unwrap();
}

#[tokio::test]
async fn proxy_unknown_node_is_404() {
    let (server, client) = start_server(test_config(&[])).await;
    for (method, path) in [
        (Method::GET, "/api/v1/nodes/ghost/sandboxes"),
        (Method::GET, "/api/v1/nodes/ghost/sandboxes/x"),
        (Method::DELETE, "/api/v1/nodes/ghost/sandboxes/x"),
        (Method::GET, "/api/v1/nodes/ghost/sandboxes/x/logs"),
        (Method::GET, "/api/v1/nodes/ghost/sandboxes/x/containers/web/logs"),
        (Method::POST, "/api/v1/nodes/ghost/reconcile"),
    ] {
        let (status, body) = call(&client, method.clone(), path, None).await;
        assert_eq!(status, 404, "{method} {path}: {body}");
    }
    server.stop().await.unwrap();
}

async fn assert_proxy_502(client: &sandboxd_client::Client, node: &str) {
    let (status, body) = call(client, Method::GET, &format!("/api/v1/nodes/{node}/sandboxes"), None).await;
    assert_eq!(status, 502, "{body}");
    let message = body["error"].as_str().unwrap();
    assert!(message.starts_with(&format!("node {node}: ")), "{message}");
}

#[tokio::test]
async fn every_proxied_route_of_a_dead_agent_is_502_naming_the_node() {
    let (server, client) = start_server(test_config(&[("agent_timeout", "300ms")])).await;
    register(&client, "dead", exclusive_addr(9)).await;
    for (method, path, body) in [
        (Method::GET, "/api/v1/nodes/dead/sandboxes", None),
        (Method::POST, "/api/v1/nodes/dead/sandboxes", Some(direct_sandbox("x", 10_001))),
        (Method::GET, "/api/v1/nodes/dead/sandboxes/x", None),
        (Method::DELETE, "/api/v1/nodes/dead/sandboxes/x", None),
        (Method::GET, "/api/v1/nodes/dead/sandboxes/x/logs", None),
        (Method::GET, "/api/v1/nodes/dead/sandboxes/x/containers/web/logs", None),
        (Method::POST, "/api/v1/nodes/dead/reconcile", None),
    ] {
        let (status, answer) = call(&client, method.clone(), path, body).await;
        assert_eq!(status, 502, "{method} {path}: {answer}");
        let message = answer["error"].as_str().unwrap_or_default();
        assert!(message.starts_with("node dead: "), "{method} {path}: {message}");
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn an_agent_refusal_reaches_the_caller_with_its_status_and_message() {
    let agent = start_agent(Faults::default()).await;
    let (server, client) = start_server(test_config(&[])).await;
    register(&client, "node-a", agent.addr()).await;
    let host_port = 10_001;
    let direct = |id: &str| direct_sandbox(id, host_port);
    let (status, _) = call(&client, Method::POST, "/api/v1/nodes/node-a/sandboxes", Some(direct("one"))).await;
    assert_eq!(status, 201);

    // What the agent itself answers to the clashing create, asked directly.
    let agent_answer = reqwest::Client::new()
        .post(format!("http://{}/api/v1/sandboxes", agent.addr()))
        .json(&direct("two"))
        .send()
        .await
        .unwrap();
    let agent_status = agent_answer.status().as_u16();
    let agent_body: Value = agent_answer.json().await.unwrap();
    assert_eq!(agent_status, 409, "{agent_body}");

    let (status, body) = call(&client, Method::POST, "/api/v1/nodes/node-a/sandboxes", Some(direct("two"))).await;
    assert_eq!((status, &body["error"]), (agent_status, &agent_body["error"]), "passed through verbatim");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn proxy_dead_garbage_and_slow_agents_are_502() {
    let garbage = start_agent(Faults { garbage: true, ..Faults::default() }).await;
    let slow = start_agent(Faults { latency_ms: 3000, ..Faults::default() }).await;
    let failing = start_agent(Faults { error_rate: 1.0, ..Faults::default() }).await;
    let (server, client) = start_server(test_config(&[("agent_timeout", "300ms")])).await;
    register(&client, "dead", exclusive_addr(9)).await;
    register(&client, "garbage", garbage.addr()).await;
    register(&client, "slow", slow.addr()).await;
    register(&client, "failing", failing.addr()).await;
    for node in ["dead", "garbage", "slow", "failing"] {
        assert_proxy_502(&client, node).await;
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn agent_errors_on_create_show_in_the_sandbox_status() {
    let agent = start_agent(Faults::default()).await;
    let (server, client) = start_server(test_config(&[])).await;
    register(&client, "node-a", agent.addr()).await;
    wait_node_state(&client, "node-a", NodeState::Ready).await;
    agent.set_faults(Faults { error_rate: 1.0, ..Faults::default() });
    client.create_sandbox("stuck", &sandbox_spec("100m")).await.unwrap();
    let waiting = eventually(10, "AgentError reason", || async {
        client.get_sandbox("stuck").await.ok().filter(|s| s.status.reason.as_deref() == Some("AgentError"))
    })
    .await;
    assert!(waiting.status.message.unwrap().contains("agent answered 500"));
    agent.set_faults(Faults::default());
    let running = eventually(15, "Running after the agent recovers", || async {
        client.get_sandbox("stuck").await.ok().filter(|s| s.status.phase == sandboxd_api::Phase::Running)
    })
    .await;
    assert_eq!(running.status.reason, None, "the transient reason is cleared");
    server.stop().await.unwrap();
}
