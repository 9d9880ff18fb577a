//! Controllers in their own "process" over HTTP, leader-elected: a standby takes over when the leader dies.

mod common;

use common::*;
use sandboxd_api::{NodeState, Phase};
use sandboxd_client::objects::HttpObjects;
use sandboxd_controllers::runtime::lease::{LeaseClient, LeaseSettings};
use sandboxd_o::agent_client::HttpAgentClient;
use sandboxd_o::controllers::{run_elected, Candidacy, ControllersError, CONTROLLERS};
use sbxlet::Faults;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

fn fast_leases() -> LeaseSettings {
    LeaseSettings {
        duration: Duration::from_secs(3),
        renew_deadline: Duration::from_secs(2),
        retry: Duration::from_millis(200),
    }
}

/// One controllers replica against `server`, as `sandboxd-o controllers` runs it.
fn start_replica(
    server: &str,
    identity: &str,
) -> (CancellationToken, tokio::task::JoinHandle<Result<(), ControllersError>>) {
    start_replica_with(server, identity, None)
}

fn start_replica_with(
    server: &str,
    identity: &str,
    token: Option<String>,
) -> (CancellationToken, tokio::task::JoinHandle<Result<(), ControllersError>>) {
    start_replica_of(server, identity, token, &CONTROLLERS)
}

/// A replica campaigning for the controllers in `only`.
fn start_replica_of(
    server: &str,
    identity: &str,
    token: Option<String>,
    only: &[&str],
) -> (CancellationToken, tokio::task::JoinHandle<Result<(), ControllersError>>) {
    let client = sandboxd_client::Client::new(server, token).unwrap();
    let objects = Arc::new(HttpObjects::new(client));
    let agents = Arc::new(HttpAgentClient::new(Duration::from_secs(1)).loopback_only());
    let config = test_config(&[]);
    let candidacy = Candidacy {
        identity: identity.to_string(),
        only: only.iter().map(|s| s.to_string()).collect(),
        lease: fast_leases(),
    };
    let stop = CancellationToken::new();
    let token = stop.clone();
    let task =
        tokio::spawn(async move { run_elected(objects.clone(), objects, agents, &config, &candidacy, token).await });
    (stop, task)
}

/// Waits until `identity` holds every controller's lease.
async fn wait_leading(client: &sandboxd_client::Client, identity: &str) {
    let leases = HttpObjects::new(client.clone());
    eventually(10, &format!("{identity} holds every lease"), || {
        let leases = &leases;
        async move {
            for name in ["node", "scheduler", "sandbox", "ttl"] {
                let lease = leases.get_lease(&format!("sandboxd-controller-{name}")).await.ok()??;
                if lease.holder != identity {
                    return None;
                }
            }
            Some(())
        }
    })
    .await;
}

async fn wait_all_running(client: &sandboxd_client::Client, ids: &[String]) {
    eventually(30, "every sandbox Running", || async {
        let items = client.list_sandboxes().await.ok()?.items;
        let running = items.iter().filter(|s| ids.contains(&s.id) && s.status.phase == Phase::Running).count();
        (running == ids.len()).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_replica_takes_over_when_the_leader_dies() {
    let agent = start_agent(Faults::default()).await;
    let (server, client) = start_api_server(test_config(&[])).await;
    let url = format!("http://{}", server.addr);
    register(&client, "node-a", agent.addr()).await;
    let (stop_a, task_a) = start_replica(&url, "replica-a");
    wait_leading(&client, "replica-a").await;
    let (stop_b, task_b) = start_replica(&url, "replica-b");
    wait_node_state(&client, "node-a", NodeState::Ready).await;

    let first: Vec<String> = (0..20).map(|i| format!("r1-{i}")).collect();
    for id in &first {
        client.create_sandbox(id, &with_port(sandbox_spec("10m"), 80)).await.unwrap();
    }
    wait_all_running(&client, &first).await;
    // Usually replica-a; on a machine loaded enough to miss a renewal, replica-b already took over.
    let leases = HttpObjects::new(client.clone());
    let before = leases.get_lease("sandboxd-controller-scheduler").await.unwrap().unwrap();
    let ((_, leader), (stop_standby, standby), standby_name) = if before.holder == "replica-a" {
        ((stop_a, task_a), (stop_b, task_b), "replica-b")
    } else {
        ((stop_b, task_b), (stop_a, task_a), "replica-a")
    };

    // SIGKILL-like: the leader vanishes without releasing its leases.
    leader.abort();
    let killed_at = tokio::time::Instant::now();
    let second: Vec<String> = (0..20).map(|i| format!("r2-{i}")).collect();
    for id in &second {
        client.create_sandbox(id, &with_port(sandbox_spec("10m"), 80)).await.unwrap();
    }
    wait_all_running(&client, &second).await;
    let took = killed_at.elapsed();
    let after = leases.get_lease("sandboxd-controller-scheduler").await.unwrap().unwrap();
    assert_eq!(after.holder, standby_name);
    assert_eq!(after.transitions, before.transitions + 1);
    assert!(took < Duration::from_secs(10), "failover and convergence took {took:?}");

    let items = client.list_sandboxes().await.unwrap().items;
    let ports: HashSet<u16> = items.iter().flat_map(|s| s.status.assigned_ports.iter().map(|p| p.host_port)).collect();
    assert_eq!(ports.len(), 40, "no host port handed out twice on the one node");
    assert_eq!(agent.sandbox_ids().len(), 40, "the agent holds each sandbox once");

    stop_standby.cancel();
    standby.await.unwrap().expect("the standby stops without error");
    let released = leases.get_lease("sandboxd-controller-scheduler").await.unwrap().unwrap();
    assert_eq!(released.holder, "", "graceful shutdown releases the lease");
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_handover_keeps_nodes_ready_instead_of_starting_them_over() {
    let agent = start_agent(Faults::default()).await;
    let (server, client) = start_api_server(test_config(&[])).await;
    let url = format!("http://{}", server.addr);
    register(&client, "node-a", agent.addr()).await;
    let (stop_a, task_a) = start_replica(&url, "replica-a");
    wait_node_state(&client, "node-a", NodeState::Ready).await;
    // replica-b campaigns from the moment it starts; it takes the released leases whenever it asks next.
    let (stop_b, task_b) = start_replica(&url, "replica-b");

    // A graceful stop releases the leases: the standby takes over while the last heartbeat is fresh.
    stop_a.cancel();
    task_a.await.unwrap().expect("replica-a stops without error");
    let leases = HttpObjects::new(client.clone());
    let mut states = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let node = client.get_node("node-a").await.unwrap();
        states.push(node.status.state);
        let lease = leases.get_lease("sandboxd-controller-node").await.unwrap().unwrap();
        if lease.holder == "replica-b" && node.status.success_streak >= 4 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "replica-b did not take over and heartbeat");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(states.iter().all(|s| *s == NodeState::Ready), "the node left Ready during the handover: {states:?}");
    stop_b.cancel();
    task_b.await.unwrap().expect("replica-b stops without error");
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_token_leads_only_under_its_own_name() {
    let dir = tempfile::tempdir().unwrap();
    let admin_token = dir.path().join("admin.token");
    std::fs::write(&admin_token, "bootstrap-admin\n").unwrap();
    let config = test_config(&[("auth_token_file", admin_token.to_str().unwrap())]);
    let (server, _) = start_api_server(config).await;
    let url = format!("http://{}", server.addr);
    let admin = sandboxd_client::Client::new(&url, Some("bootstrap-admin".into())).unwrap();
    let body = serde_json::json!({ "identity": "ctrl", "role": "controller" });
    let (_, issued): (u16, serde_json::Value) =
        admin.call(reqwest::Method::POST, "/api/v1/tokens", Some(&body)).await.unwrap();
    let token = issued["token"].as_str().unwrap().to_string();

    // A replica that names another holder is refused every lease write (403) and never leads.
    let (impostor, _) = start_replica_with(&url, "someone-else", Some(token.clone()));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let leases = HttpObjects::new(admin.clone());
    assert!(leases.get_lease("sandboxd-controller-scheduler").await.unwrap().is_none());
    impostor.cancel();

    let (stop, task) = start_replica_with(&url, "ctrl/replica-1", Some(token));
    wait_leading(&admin, "ctrl/replica-1").await;
    stop.cancel();
    let _ = task.await;
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_some_controllers_leaves_the_others_to_a_replica() {
    let agent = start_agent(Faults::default()).await;
    let config = test_config(&[]);
    let running = sandboxd_o::server::start(config, sandboxd_o::server::Mode::AllInOne(vec!["node", "scheduler"]))
        .await
        .expect("server starts");
    let url = format!("http://{}", running.addr);
    let client = sandboxd_client::Client::new(&url, None).unwrap();
    register(&client, "node-a", agent.addr()).await;
    wait_node_state(&client, "node-a", NodeState::Ready).await;
    client.create_sandbox("split-1", &with_port(sandbox_spec("10m"), 80)).await.unwrap();
    eventually(10, "split-1 Scheduled", || async {
        let s = client.get_sandbox("split-1").await.ok()?;
        (s.status.phase == Phase::Scheduled).then_some(())
    })
    .await;
    // Nobody in the server starts it: it stays Scheduled, and the agent never hears of it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(client.get_sandbox("split-1").await.unwrap().status.phase, Phase::Scheduled);
    assert!(agent.sandbox_ids().is_empty(), "the agent was asked to create {:?}", agent.sandbox_ids());

    let (stop, task) = start_replica_of(&url, "sandbox-only", None, &["sandbox"]);
    wait_all_running(&client, &["split-1".to_string()]).await;
    let leases = HttpObjects::new(client.clone());
    assert!(
        leases.get_lease("sandboxd-controller-scheduler").await.unwrap().is_none(),
        "the replica ran the scheduler"
    );
    stop.cancel();
    task.await.unwrap().expect("the replica stops without error");
    running.stop().await.unwrap();
}

#[test]
fn controllers_are_chosen_by_name_in_start_order_and_an_unknown_name_is_refused() {
    let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(sandboxd_o::controllers::choose(&names(&["scheduler", "node"])).unwrap(), vec!["node", "scheduler"]);
    assert!(sandboxd_o::controllers::choose(&names(&[])).unwrap().is_empty());
    let err = sandboxd_o::controllers::choose(&names(&["node", "kubelet"])).unwrap_err();
    assert!(err.to_string().contains("\"kubelet\""), "{err}");
}
