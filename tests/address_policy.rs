//! The agent address policy end to end: refused node addresses get 400 at registration, and a host
//! name resolving outside the policy fails every call with the reason, without being connected to.
//! Everything stays on loopback: refusals happen before any connection, which is the point.

mod common;

use common::*;
use reqwest::Method;
use sandboxd_api::NodeState;
use sandboxd_o::address_policy::AddressPolicy;
use sandboxd_o::config::{Config, StaticNode};
use serde_json::json;

fn with_policy(mut config: Config, allowed: &str) -> Config {
    config.agent_policy = AddressPolicy::allowing(AddressPolicy::parse_networks(allowed).unwrap());
    config
}

/// A listener on 127.0.0.1 that nothing accepts from, so a connection would stay in its backlog.
fn untouched_listener() -> (std::net::TcpListener, u16) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    (listener, port)
}

fn assert_never_reached(listener: &std::net::TcpListener) {
    match listener.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the refused agent was connected to: {other:?}"),
    }
}

#[tokio::test]
async fn registering_a_refused_literal_address_is_a_400_with_the_reason() {
    let (server, client) = start_api_server(with_policy(test_config(&[]), "")).await;
    let cases = [
        ("169.254.169.254", "169.254.169.254 is link-local (cloud metadata lives there); agent addresses must not be"),
        ("::ffff:169.254.169.254", "::ffff:169.254.169.254 embeds 169.254.169.254, which is link-local"),
        ("::ffff:a9fe:a9fe", "::ffff:169.254.169.254 embeds 169.254.169.254, which is link-local"),
        ("0xa9fea9fe", "169.254.169.254 is link-local"),
        ("0.0.0.0", "0.0.0.0 is unspecified"),
        ("::", ":: is unspecified"),
        ("255.255.255.255", "255.255.255.255 is the broadcast address"),
        ("224.0.0.1", "224.0.0.1 is multicast"),
        ("ff02::1", "ff02::1 is multicast"),
        ("fe80::1", "fe80::1 is link-local"),
        ("100.100.100.200", "100.100.100.200 is a cloud metadata address"),
    ];
    for (ip, reason) in cases {
        let body = json!({ "id": "rogue", "spec": { "ip": ip, "port": 80 } });
        let (status, answer) = call(&client, Method::POST, "/api/v1/nodes", Some(body)).await;
        assert_eq!(status, 400, "{ip}: {answer}");
        let message = answer["error"].as_str().unwrap();
        assert!(message.starts_with("spec.ip: "), "{ip}: {message}");
        assert!(message.contains(reason), "{ip}: {message:?} should say {reason:?}");
    }
    let (status, _) = call(&client, Method::GET, "/api/v1/nodes/rogue", None).await;
    assert_eq!(status, 404, "no refused node was stored");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn agent_allowed_networks_refuse_registration_outside_them_and_updates_too() {
    let (server, client) = start_api_server(with_policy(test_config(&[]), "127.0.0.0/8")).await;
    let (status, answer) = call(
        &client,
        Method::POST,
        "/api/v1/nodes",
        Some(json!({ "id": "node-a", "spec": { "ip": "10.0.0.1", "port": 8080 } })),
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"], "spec.ip: 10.0.0.1 is outside agent_allowed_networks (127.0.0.0/8)");

    let (listener, port) = untouched_listener();
    let created = register(&client, "node-a", std::net::SocketAddr::from(([127, 0, 0, 1], port))).await;
    let body = json!({ "id": "node-a", "spec": { "ip": "169.254.169.254", "port": 80 } });
    let (status, answer) = call(&client, Method::POST, "/api/v1/nodes", Some(body)).await;
    assert_eq!(status, 400, "{answer}");
    let node = client.get_node("node-a").await.unwrap();
    assert_eq!((node.ip.as_str(), node.port), ("127.0.0.1", port), "the refused update changed nothing");
    assert_eq!(node.resource_version, created.resource_version);
    drop(listener);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_host_name_resolving_outside_the_policy_is_registered_but_never_called() {
    let (listener, port) = untouched_listener();
    let config = with_policy(test_config(&[]), "10.0.0.0/8");
    let (server, client) = start_server(config).await;
    let spec = sandboxd_api::node::NodeSpec { ip: "localhost".into(), port: i64::from(port), ..Default::default() };
    client.apply_node("named", &spec).await.expect("a host name is accepted at registration");

    let down = wait_node_state(&client, "named", NodeState::NotReady).await;
    let why = &down.status.last_error;
    assert!(why.starts_with("unreachable: "), "{why}");
    assert!(why.contains("localhost resolves to no allowed address: "), "{why}");
    assert!(why.contains("is outside agent_allowed_networks (10.0.0.0/8)"), "{why}");

    let (status, answer) = call(&client, Method::GET, "/api/v1/nodes/named/sandboxes", None).await;
    assert_eq!(status, 502, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("is outside agent_allowed_networks (10.0.0.0/8)"), "{answer}");
    assert_never_reached(&listener);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_config_node_at_a_refused_address_stops_the_start() {
    let mut config = with_policy(test_config(&[]), "");
    // Set past `Config::load`, which refuses it too, to reach the registry's own check.
    config.nodes.push(StaticNode {
        id: "metadata".into(),
        ip: "169.254.169.254".into(),
        port: 80,
        external: None,
        max_alloc_percent: None,
        labels: None,
        taints: None,
    });
    let err = match sandboxd_o::server::start(config, sandboxd_o::server::Mode::ApiOnly).await {
        Ok(_) => panic!("a server started with a config node at 169.254.169.254"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("metadata"), "{err}");
    assert!(err.contains("169.254.169.254 is link-local (cloud metadata lives there)"), "{err}");
}
