//! kill -9 of `sandboxd-o serve` halfway through 500 creates: after a restart on the same store, agents and store agree.

mod common;

use common::world::*;
use common::*;
use sandboxd_api::{NodeState, Phase, Sandbox, SandboxSpec};
use sandboxd_client::{Client, ClientError};
use sbxlet::{AgentHandle, Faults};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::OpenOptions;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const AGENTS: usize = 5;
const SANDBOXES: usize = 500;
const CLIENTS: usize = 16;
/// Pause of each client between creates, so the kill lands while creates are still coming in.
const PACE: Duration = Duration::from_millis(100);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_halfway_through_creates_converges_to_agents_matching_the_store() {
    let agents = start_agents(AGENTS).await;
    let mut server = Orchestrator::spawn(&agents, &[]);
    let client = server.client();
    server.wait_nodes_ready(&client).await;

    let creates = Creates::start(&client);
    let phases = wait_halfway_with_some_running(&client, &creates).await;
    let durable = creates.acknowledged();
    eprintln!("killing sandboxd-o after {} answered creates; phases just before: {phases:?}", durable.len());
    server.kill();
    server.restart();
    server.wait_healthy(&client).await;
    assert_all_stored(&client, &durable).await;
    creates.finish().await;

    let world = converge(&client, &agents, SANDBOXES).await;
    assert_eq!(world.store.len(), SANDBOXES);
    let not_running: Vec<&Sandbox> = world.store.iter().filter(|s| s.status.phase != Phase::Running).collect();
    assert!(not_running.is_empty(), "not Running: {:?}", not_running.iter().map(|s| &s.id).collect::<Vec<_>>());
    assert_no_host_port_twice(&world.store);
    for (node, held) in &world.agents {
        assert_eq!(held, &bound_to(&world.store, node), "agent of {node} holds exactly what the store binds to it");
    }
    server.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn restarted_orchestrator_reports_nodes_unknown_until_heartbeats_decide() {
    let agents = start_agents(1).await;
    let mut server = Orchestrator::spawn(&agents, &[]);
    let client = server.client();
    server.wait_nodes_ready(&client).await;

    server.kill();
    agents[0].set_faults(health_failing());
    server.restart();
    server.wait_healthy(&client).await;
    let states = node_states_until(&client, "node-1", NodeState::NotReady).await;
    assert_eq!(states.first(), Some(&NodeState::Unknown), "state right after the restart; all seen: {states:?}");
    assert!(!states.contains(&NodeState::Ready), "a dead agent's node was reported Ready: {states:?}");
    server.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn node_not_ready_at_a_crash_is_not_judged_lost_on_its_stale_state_after_restart() {
    let agents = start_agents(2).await;
    let mut server = Orchestrator::spawn(&agents, &["--node-lost-grace", "3s"]);
    let client = server.client();
    server.wait_nodes_ready(&client).await;
    client.create_sandbox("survivor", &spec()).await.unwrap();
    let node = wait_running(&client, "survivor").await.status.node_name.unwrap();
    let agent = &agents[if node == node_name(0) { 0 } else { 1 }];

    // The node goes NotReady, the orchestrator dies within the grace, the node heals while it is down.
    agent.set_faults(health_failing());
    let down = wait_node_state(&client, &node, NodeState::NotReady).await;
    server.kill();
    agent.set_faults(Faults::default());
    // The grace runs out while the orchestrator is down: a judge of the stale state would call it lost.
    let since = down.status.last_transition_at.as_deref().and_then(sandboxd_api::time::parse_rfc3339).unwrap();
    sleep_until_unix(since + 3 + 1).await;

    server.restart();
    server.wait_healthy(&client).await;
    wait_node_state(&client, &node, NodeState::Ready).await;
    let s = client.get_sandbox("survivor").await.unwrap();
    assert_eq!((s.status.phase, s.status.reason), (Phase::Running, None), "the node was never observed lost");
    assert_eq!(agent.sandbox_ids(), ["survivor"]);
    server.kill();
}

// === fixtures ===

fn health_failing() -> Faults {
    Faults { health_failing: true, ..Faults::default() }
}

/// Every distinct state a node shows, polled from now until it reaches `last`.
async fn node_states_until(client: &Client, node: &str, last: NodeState) -> Vec<NodeState> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut states: Vec<NodeState> = Vec::new();
    while states.last() != Some(&last) {
        assert!(tokio::time::Instant::now() < deadline, "{node} not {last:?} within 10 s: {states:?}");
        let state = client.get_node(node).await.unwrap().status.state;
        if states.last() != Some(&state) {
            states.push(state);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    states
}

async fn wait_running(client: &Client, id: &str) -> Sandbox {
    eventually(10, &format!("{id} Running"), || async {
        client.get_sandbox(id).await.ok().filter(|s| s.status.phase == Phase::Running)
    })
    .await
}

fn spec() -> SandboxSpec {
    with_port(sandbox_spec("100m"), 80)
}

/// The `sandboxd-o serve` child process, on a fixed port and a SQLite store in a temp dir.
struct Orchestrator {
    dir: tempfile::TempDir,
    addr: std::net::SocketAddr,
    nodes: String,
    flags: Vec<String>,
    child: Option<Child>,
}

impl Orchestrator {
    fn spawn(agents: &[AgentHandle], flags: &[&str]) -> Orchestrator {
        let mut server = Orchestrator {
            dir: tempfile::tempdir().unwrap(),
            addr: exclusive_addr(8080),
            nodes: nodes_json(agents),
            flags: flags.iter().map(|f| f.to_string()).collect(),
            child: None,
        };
        server.restart();
        server
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("sandboxd-o.log")
    }

    /// Starts the server (again) on the same store and port; its output is appended to the log file.
    fn restart(&mut self) {
        let log = OpenOptions::new().create(true).append(true).open(self.log_path()).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_sandboxd-o"))
            .args(["serve", "--insecure-listen", &self.addr.to_string()])
            .arg("--store")
            .arg(format!("sqlite://{}", self.dir.path().join("store.db").display()))
            .args(["--nodes", &self.nodes])
            .args(["--heartbeat-interval", "200ms", "--heartbeat-timeout", "200ms", "--sync-period", "1s"])
            .args(&self.flags)
            .env("SANDBOXD_LOOPBACK_ONLY", "1")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn sandboxd-o");
        self.child = Some(child);
    }

    /// SIGKILL, then reap.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    fn node_count(&self) -> usize {
        serde_json::from_str::<Vec<serde_json::Value>>(&self.nodes).unwrap().len()
    }

    fn client(&self) -> Client {
        Client::new(&format!("http://{}", self.addr), None).unwrap()
    }

    async fn wait_healthy(&self, client: &Client) {
        eventually(20, "sandboxd-o healthy", || async { client.healthz().await.ok() }).await;
    }

    async fn wait_nodes_ready(&self, client: &Client) {
        self.wait_healthy(client).await;
        for i in 0..self.node_count() {
            wait_node_state(client, &node_name(i), NodeState::Ready).await;
        }
    }
}

impl Drop for Orchestrator {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!("--- last lines of sandboxd-o output ---");
            for line in &lines[lines.len().saturating_sub(150)..] {
                eprintln!("{line}");
            }
        }
    }
}

/// `CLIENTS` tasks creating `sandbox-000..499`, each retrying its create until the server answers it.
struct Creates {
    acknowledged: Arc<Mutex<BTreeSet<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Creates {
    fn start(client: &Client) -> Creates {
        let next = Arc::new(AtomicUsize::new(0));
        let acknowledged = Arc::new(Mutex::new(BTreeSet::new()));
        let tasks = (0..CLIENTS)
            .map(|_| {
                let (client, next, acknowledged) = (client.clone(), next.clone(), acknowledged.clone());
                tokio::spawn(async move {
                    loop {
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        if n >= SANDBOXES {
                            return;
                        }
                        let id = format!("sandbox-{n:03}");
                        create_until_answered(&client, &id).await;
                        acknowledged.lock().unwrap().insert(id);
                        tokio::time::sleep(PACE).await;
                    }
                })
            })
            .collect();
        Creates { acknowledged, tasks }
    }

    fn acknowledged(&self) -> BTreeSet<String> {
        self.acknowledged.lock().unwrap().clone()
    }

    async fn finish(self) {
        for task in self.tasks {
            task.await.expect("a create client failed");
        }
        assert_eq!(self.acknowledged.lock().unwrap().len(), SANDBOXES);
    }
}

/// Posts one create until it is answered; an id created before a kill comes back as an idempotent 200.
async fn create_until_answered(client: &Client, id: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match client.create_sandbox(id, &spec()).await {
            Ok(written) => {
                assert!(matches!(written.status, 200 | 201), "{id}: status {}", written.status);
                return;
            }
            Err(ClientError::Api { status, message }) if status < 500 => panic!("create {id}: {status} {message}"),
            Err(e) if tokio::time::Instant::now() > deadline => panic!("create {id} kept failing: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Waits until half the creates are answered and some sandbox runs; returns the phase counts seen then.
async fn wait_halfway_with_some_running(client: &Client, creates: &Creates) -> BTreeMap<&'static str, usize> {
    eventually(30, "half the creates answered and some Running", || async {
        if creates.acknowledged.lock().unwrap().len() < SANDBOXES / 2 {
            return None;
        }
        let phases = phase_counts(&client.list_sandboxes().await.ok()?.items);
        phases.contains_key("Running").then_some(phases)
    })
    .await
}

async fn assert_all_stored(client: &Client, durable: &BTreeSet<String>) {
    let stored: BTreeSet<String> = client.list_sandboxes().await.unwrap().items.into_iter().map(|s| s.id).collect();
    let lost: Vec<&String> = durable.difference(&stored).collect();
    assert!(lost.is_empty(), "{} creates answered before the kill were lost: {lost:?}", lost.len());
}
