//! Shared fixtures for end-to-end tests: servers on free loopback ports and small object builders.
#![allow(dead_code)]

pub mod daemon;
pub mod world;

use sandboxd_api::{Container, ContainerResource, PortSpec, Protocol, SandboxSpec};
use sandboxd_o::config::Config;
use sandboxd_o::server::{self, Mode, Running};
use std::collections::HashMap;

/// A config for tests: memory store, a free port on 127.0.0.1, fast timers.
pub fn test_config(overrides: &[(&str, &str)]) -> Config {
    let mut flags: HashMap<String, String> = [
        ("insecure_listen", "127.0.0.1:0"),
        ("store", "memory://"),
        ("heartbeat_interval", "200ms"),
        ("heartbeat_timeout", "200ms"),
        ("sync_period", "1s"),
        ("agent_timeout", "1s"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for (k, v) in overrides {
        flags.insert(k.to_string(), v.to_string());
    }
    let mut config = Config::load(None, &HashMap::new(), &flags).expect("valid test config");
    config.agent_policy = sandboxd_o::address_policy::AddressPolicy::loopback_only();
    config
}

/// Starts an all-in-one server and returns it with a client.
pub async fn start_server(config: Config) -> (Running, sandboxd_client::Client) {
    let running = server::start(config, Mode::AllInOne(sandboxd_o::controllers::CONTROLLERS.to_vec()))
        .await
        .expect("server starts");
    let client = sandboxd_client::Client::new(&format!("http://{}", running.addr), None).unwrap();
    (running, client)
}

/// A one-container sandbox spec requesting `cpu`.
pub fn sandbox_spec(cpu: &str) -> SandboxSpec {
    SandboxSpec {
        containers: vec![Container {
            name: "web".into(),
            image: "nginx:latest".into(),
            args: vec![],
            env: vec![],
            work_dir: String::new(),
            resource: Some(ContainerResource {
                cpu: Some(cpu.into()),
                memory: Some("64Mi".into()),
                ephemeral_storage: None,
            }),
        }],
        ..SandboxSpec::default()
    }
}

/// Adds a tcp port to a spec.
pub fn with_port(mut spec: SandboxSpec, container_port: i64) -> SandboxSpec {
    spec.ports.push(PortSpec { container_port, protocol: Protocol::Tcp, host_port: None });
    spec
}

/// An http readiness probe on port 80 that flips `ready` after a single result, every second.
pub fn with_http_probe(mut spec: SandboxSpec) -> SandboxSpec {
    spec.readiness_probe = Some(sandboxd_api::Probe {
        protocol: sandboxd_api::ProbeProtocol::Http,
        port: 80,
        path: None,
        initial_delay_seconds: 0,
        period_seconds: 1,
        timeout_seconds: 1,
        success_threshold: 1,
        failure_threshold: 1,
    });
    spec
}

/// Starts a simulated agent on an address of its own (port 0), so host ports it publishes never clash.
pub async fn start_agent(faults: sbxlet::Faults) -> sbxlet::AgentHandle {
    let config = sbxlet::SimConfig { faults, ..isolated_sim_config() };
    sbxlet::start(config).await.expect("agent starts")
}

/// Registers a node pointing at `addr`.
pub async fn register(client: &sandboxd_client::Client, name: &str, addr: std::net::SocketAddr) -> sandboxd_api::Node {
    let spec =
        sandboxd_api::node::NodeSpec { ip: addr.ip().to_string(), port: i64::from(addr.port()), ..Default::default() };
    client.apply_node(name, &spec).await.expect("node registers").object
}

/// Polls `check` every 25 ms until it returns `Some`, for at most `secs` seconds.
pub async fn eventually<T, F, Fut>(secs: u64, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {secs}s waiting for {what}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
}

/// Waits until node `name` is in `state`.
pub async fn wait_node_state(
    client: &sandboxd_client::Client,
    name: &str,
    state: sandboxd_api::NodeState,
) -> sandboxd_api::Node {
    eventually(10, &format!("node {name} {state:?}"), || async {
        client.get_node(name).await.ok().filter(|n| n.status.state == state)
    })
    .await
}

// === agents on loopback addresses of their own ===

#[allow(unused_imports)] // each test binary uses a different subset
pub use sandboxd_testkit::{exclusive_addr, unique_loopback_ip};

/// A sim agent config on an address of its own, reporting external 203.0.113.10.
pub fn isolated_sim_config() -> sbxlet::SimConfig {
    sbxlet::SimConfig {
        listen: std::net::SocketAddr::from((unique_loopback_ip(), 0)),
        external: "203.0.113.10".into(),
        ..sbxlet::SimConfig::default()
    }
}

/// Starts a simulated agent on an address of its own.
pub async fn start_isolated_agent(config: sbxlet::SimConfig) -> sbxlet::AgentHandle {
    sbxlet::start(config).await.expect("agent starts")
}

/// Every sandbox an agent holds, read from its own API (all pages).
pub async fn agent_sandboxes(addr: std::net::SocketAddr) -> Vec<sandboxd_api::agent::AgentSandbox> {
    let http = reqwest::Client::new();
    let mut all = Vec::new();
    let mut cursor = String::new();
    loop {
        let url = format!("http://{addr}/api/v1/sandboxes?limit=1000&cursor={cursor}");
        let page: sandboxd_api::agent::AgentSandboxList =
            http.get(url).send().await.expect("agent answers").json().await.expect("agent list decodes");
        all.extend(page.items);
        if page.next_cursor.is_empty() {
            return all;
        }
        cursor = page.next_cursor;
    }
}

/// One sandbox as its agent reports it, `None` when the agent does not hold it.
pub async fn agent_sandbox(addr: std::net::SocketAddr, id: &str) -> Option<sandboxd_api::agent::AgentSandbox> {
    let response = reqwest::get(format!("http://{addr}/api/v1/sandboxes/{id}")).await.expect("agent answers");
    if response.status() == reqwest::StatusCode::NOT_FOUND {
        return None;
    }
    let envelope: sandboxd_api::agent::AgentSandboxEnvelope = response.json().await.expect("agent sandbox decodes");
    Some(envelope.sandbox)
}

/// Starts the API alone (no controllers), so nothing but the test writes objects.
pub async fn start_api_server(config: Config) -> (Running, sandboxd_client::Client) {
    let running = server::start(config, Mode::ApiOnly).await.expect("server starts");
    let client = sandboxd_client::Client::new(&format!("http://{}", running.addr), None).unwrap();
    (running, client)
}

/// Waits until the wall clock reaches `at` (Unix seconds): for rules another process judges by its
/// own wall clock, where no clock can be injected.
pub async fn sleep_until_unix(at: i64) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    let target = std::time::Duration::from_secs(at as u64);
    if let Some(left) = target.checked_sub(now) {
        tokio::time::sleep(left).await;
    }
}

/// Waits until `node` has had `n` more successful heartbeats than now: a witness that the
/// controllers ran a few more rounds, for checks that something did not happen meanwhile.
pub async fn wait_heartbeats(client: &sandboxd_client::Client, node: &str, n: u32) {
    let start = client.get_node(node).await.unwrap().status.success_streak;
    eventually(10, &format!("{n} more heartbeats of {node}"), || async {
        let streak = client.get_node(node).await.ok()?.status.success_streak;
        (streak >= start + n).then_some(())
    })
    .await;
}

/// Calls the API with an optional JSON body; an API error comes back as its status and `{"error"}`.
pub async fn call(
    client: &sandboxd_client::Client,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    match client.call::<serde_json::Value>(method, path, body.as_ref()).await {
        Ok((status, value)) => (status, value),
        Err(sandboxd_client::ClientError::Api { status, message }) => (status, serde_json::json!({ "error": message })),
        Err(e) => panic!("{e}"),
    }
}
