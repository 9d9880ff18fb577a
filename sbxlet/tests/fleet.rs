//! End-to-end tests of a fleet of agents on consecutive loopback addresses and its registration.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use parking_lot::Mutex;
use sbxlet::{start_fleet, Fleet, FleetConfig, FleetError, SimConfig};
use serde_json::Value;
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

fn http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(5)).build().unwrap()
}

/// A port free on `ip` a moment ago.
fn free_port_on(ip: Ipv4Addr) -> u16 {
    std::net::TcpListener::bind((ip, 0)).unwrap().local_addr().unwrap().port()
}

async fn fleet_of(nodes: usize, base_ip: Ipv4Addr) -> Fleet {
    let config = FleetConfig {
        nodes,
        base_ip,
        port: free_port_on(base_ip),
        template: SimConfig { external: "203.0.113.10".into(), ..SimConfig::default() },
        name_prefix: "sim".into(),
        tokens: Vec::new(),
    };
    start_fleet(config).await.expect("fleet starts")
}

/// What a fake orchestrator saw: node bodies by name, and how many posts each name got.
#[derive(Default)]
struct Registry {
    nodes: HashMap<String, Value>,
    posts: HashMap<String, u32>,
}

/// Serves `POST /api/v1/nodes`, failing the first post of `sim-3` with 503 and every post of `bad-*` with 400.
async fn fake_server() -> (String, Arc<Mutex<Registry>>) {
    async fn register_node(State(seen): State<Arc<Mutex<Registry>>>, Json(body): Json<Value>) -> StatusCode {
        let name = body["id"].as_str().unwrap_or_default().to_string();
        let mut seen = seen.lock();
        let posts = seen.posts.entry(name.clone()).or_default();
        *posts += 1;
        if name.starts_with("bad-") || (name == "sim-3" && *posts == 1) {
            return if name.starts_with("bad-") { StatusCode::BAD_REQUEST } else { StatusCode::SERVICE_UNAVAILABLE };
        }
        seen.nodes.insert(name, body);
        StatusCode::CREATED
    }
    let seen = Arc::new(Mutex::new(Registry::default()));
    let app = Router::new().route("/api/v1/nodes", post(register_node)).with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, seen)
}

#[tokio::test]
async fn twenty_agents_listen_on_consecutive_addresses_and_answer_healthz() {
    let fleet = fleet_of(20, Ipv4Addr::new(127, 2, 0, 1)).await;
    assert_eq!(fleet.agents().len(), 20);
    let port = fleet.agents()[0].addr().port();
    let client = http();
    for (i, agent) in fleet.agents().iter().enumerate() {
        assert_eq!(agent.addr(), SocketAddr::from((Ipv4Addr::new(127, 2, 0, 1 + i as u8), port)));
        let health: Value =
            client.get(format!("http://{}/healthz", agent.addr())).send().await.unwrap().json().await.unwrap();
        assert_eq!(health, serde_json::json!({"ok": true}), "agent {i}");
    }
    assert_eq!(fleet.node_name(0), "sim-1");
    assert_eq!(fleet.node_name(19), "sim-20");

    let last = fleet.agents()[19].addr();
    fleet.shutdown().await;
    assert!(tokio::net::TcpStream::connect(last).await.is_err(), "agent still listening after shutdown");
}

#[tokio::test]
async fn agents_of_a_fleet_are_independent() {
    let fleet = fleet_of(2, Ipv4Addr::new(127, 2, 1, 1)).await;
    fleet.agents()[0].set_faults(sbxlet::Faults { health_failing: true, ..Default::default() });
    let client = http();
    let code = |i: usize| {
        let url = format!("http://{}/healthz", fleet.agents()[i].addr());
        let client = client.clone();
        async move { client.get(url).send().await.unwrap().status() }
    };
    assert_eq!(code(0).await, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(code(1).await, StatusCode::OK);
}

#[tokio::test]
async fn register_posts_every_node_and_retries_failures() {
    let (server, seen) = fake_server().await;
    let fleet = fleet_of(5, Ipv4Addr::new(127, 2, 2, 1)).await;
    fleet.register(&server).await.expect("registration succeeds");
    let seen = seen.lock();
    assert_eq!(seen.nodes.len(), 5);
    for (i, agent) in fleet.agents().iter().enumerate() {
        let body = &seen.nodes[&fleet.node_name(i)];
        assert_eq!(body["spec"]["ip"], agent.addr().ip().to_string());
        assert_eq!(body["spec"]["port"], agent.addr().port());
    }
    assert_eq!(seen.posts["sim-3"], 2, "the 503 was retried once");
    assert_eq!(seen.posts["sim-1"], 1);
}

#[tokio::test]
async fn register_reports_nodes_the_server_refuses() {
    let (server, seen) = fake_server().await;
    let config = FleetConfig {
        nodes: 2,
        base_ip: Ipv4Addr::new(127, 2, 3, 1),
        port: 0,
        template: SimConfig::default(),
        name_prefix: "bad".into(),
        tokens: Vec::new(),
    };
    let fleet = start_fleet(config).await.unwrap();
    match fleet.register(&server).await {
        Err(FleetError::Registration { failed: 2, total: 2, first }) => assert!(first.contains("400"), "{first}"),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(seen.lock().posts["bad-1"], 1, "a 400 is not retried");
}

#[tokio::test]
async fn non_loopback_addresses_are_refused() {
    let outside = FleetConfig { nodes: 1, base_ip: Ipv4Addr::new(10, 0, 0, 1), port: 0, ..FleetConfig::default() };
    assert_eq!(start_fleet(outside).await.unwrap_err().kind(), std::io::ErrorKind::InvalidInput);
    let overflow =
        FleetConfig { nodes: 10, base_ip: Ipv4Addr::new(127, 255, 255, 250), port: 0, ..FleetConfig::default() };
    assert_eq!(start_fleet(overflow).await.unwrap_err().kind(), std::io::ErrorKind::InvalidInput);

    let fleet = fleet_of(1, Ipv4Addr::new(127, 2, 4, 1)).await;
    assert!(matches!(fleet.register("http://192.0.2.1:8082").await, Err(FleetError::ServerNotLoopback(_))));
}
