//! sbxctl as a subprocess against a real server with sim agents: apply, get, wait, logs, delete --wait, leases.

mod common;

use common::*;
use sandboxd_api::NodeState;
use sbxlet::Faults;
use std::path::PathBuf;
use std::process::{Command, Output};

/// The sbxctl binary next to this test's target dir, built on demand when only this package was built.
fn sbxctl_path() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let path = dir.join("sbxctl");
    if !path.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", "sandboxd-client", "--bin", "sbxctl"])
            .status()
            .expect("cargo build sbxctl");
        assert!(status.success());
    }
    path
}

struct Ctl {
    server: String,
}

impl Ctl {
    fn run(&self, args: &[&str]) -> Output {
        Command::new(sbxctl_path()).env("SANDBOXD_SERVER", &self.server).args(args).output().expect("sbxctl runs")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "sbxctl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }
}

fn write_manifest(dir: &std::path::Path, name: &str, body: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, body).unwrap();
    path.display().to_string()
}

const SANDBOX: &str = "kind: Sandbox\nid: cli-1\nspec:\n  ttl_seconds: 600\n  labels: {team: a}\n  ports: [{container_port: 80}]\n  containers:\n    - name: web\n      image: nginx:latest\n      resource: {cpu: 200m, memory: 64Mi}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sbxctl_drives_a_real_server() {
    let agent = start_agent(Faults::default()).await;
    let (server, client) = start_server(test_config(&[])).await;
    register(&client, "node-a", agent.addr()).await;
    wait_node_state(&client, "node-a", NodeState::Ready).await;
    let ctl = Ctl { server: format!("http://{}", server.addr) };
    let dir = tempfile::tempdir().unwrap();
    let file = write_manifest(dir.path(), "s.yaml", SANDBOX);

    let ctl_ref = &ctl;
    let (first, second, third) = tokio::task::spawn_blocking({
        let file = file.clone();
        let changed = write_manifest(dir.path(), "changed.yaml", &SANDBOX.replace("team: a", "team: b"));
        let ctl = Ctl { server: ctl_ref.server.clone() };
        move || (ctl.ok(&["apply", "-f", &file]), ctl.ok(&["apply", "-f", &file]), ctl.ok(&["apply", "-f", &changed]))
    })
    .await
    .unwrap();
    assert_eq!(first.trim(), "sandbox/cli-1 created");
    assert_eq!(second.trim(), "sandbox/cli-1 unchanged");
    assert_eq!(third.trim(), "sandbox/cli-1 configured");

    let server_url = ctl.server.clone();
    tokio::task::spawn_blocking(move || {
        let ctl = Ctl { server: server_url };
        let waited = ctl.ok(&["wait", "sandbox/cli-1", "--for", "phase=Running", "--timeout", "20s"]);
        assert!(waited.contains("condition met"), "{waited}");

        // Events are written every half second, after the phases they tell of.
        let mut described = String::new();
        for _ in 0..50 {
            described = ctl.ok(&["describe", "sandbox", "cli-1"]);
            if described.contains("Started") {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let events = described.split("Events:").nth(1).unwrap_or_else(|| panic!("no Events block: {described}"));
        assert!(events.contains("Type") && events.contains("From"), "{events}");
        assert!(events.lines().any(|l| l.contains("Scheduled") && l.contains("scheduler")), "{events}");
        let listed = ctl.ok(&["get", "events", "sandbox/cli-1"]);
        assert!(listed.starts_with("LAST SEEN") && listed.contains("Started"), "{listed}");

        let table = ctl.ok(&["get", "sandboxes"]);
        let header = table.lines().next().unwrap();
        assert!(header.starts_with("NAME") && header.contains("PHASE") && header.contains("NODE"), "{table}");
        let row = table.lines().find(|l| l.starts_with("cli-1")).expect("row for cli-1");
        assert!(row.contains("Running") && row.contains("node-a") && row.contains("10000->80/tcp"), "{row}");

        let json: serde_json::Value =
            serde_json::from_str(&ctl.ok(&["get", "sandbox", "cli-1", "-o", "json"])).unwrap();
        assert_eq!(json["status"]["phase"], "Running");
        assert_eq!(json["spec"]["labels"]["team"], "b");

        let nodes = ctl.ok(&["get", "nodes"]);
        assert!(nodes.lines().any(|l| l.starts_with("node-a") && l.contains("Ready")), "{nodes}");

        let logs = ctl.ok(&["logs", "cli-1", "--tail", "2"]);
        assert_eq!(logs.lines().count(), 2, "{logs}");
        assert!(logs.lines().all(|l| l.starts_with("[web] ")), "{logs}");

        let timeout = ctl.run(&["wait", "sandbox/cli-1", "--for", "phase=Failed", "--timeout", "1s"]);
        assert_eq!(timeout.status.code(), Some(1), "wait times out with exit 1");
        assert!(String::from_utf8_lossy(&timeout.stderr).contains("timed out"));

        let deleted = ctl.ok(&["delete", "sandbox", "cli-1", "--wait", "--timeout", "20s"]);
        assert_eq!(deleted.trim(), "sandbox/cli-1 deleted");
        let gone = ctl.run(&["get", "sandbox", "cli-1"]);
        assert_eq!(gone.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&gone.stderr).contains("not found"));
    })
    .await
    .unwrap();
    assert!(agent.sandbox_ids().is_empty(), "delete --wait returns once the agent no longer holds it");
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sbxctl_gets_describes_and_deletes_leases() {
    let (server, client) = start_server(test_config(&[])).await;
    let at = sandboxd_api::time::format_unix(sandboxd_contracts::clock::unix_now() - 5);
    for (name, holder) in [("cli-held", "ctl-1"), ("cli-free", "")] {
        let body = serde_json::json!({
            "name": name, "holder": holder, "lease_duration_seconds": 15,
            "acquired_at": at, "renewed_at": at, "transitions": 2,
        });
        let (status, _): (u16, serde_json::Value) =
            client.call(reqwest::Method::POST, "/api/v1/leases", Some(&body)).await.unwrap();
        assert_eq!(status, 201);
    }
    let ctl = Ctl { server: format!("http://{}", server.addr) };
    tokio::task::spawn_blocking(move || {
        let table = ctl.ok(&["get", "leases"]);
        let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
        assert_eq!(header, ["NAME", "HOLDER", "TRANSITIONS", "ACQUIRED", "RENEWED"], "{table}");
        let columns = |name: &str| -> Vec<String> {
            let row = table.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("row for {name}: {table}"));
            row.split_whitespace().map(String::from).collect()
        };
        let held = columns("cli-held");
        assert_eq!(held[..3], ["cli-held", "ctl-1", "2"], "{table}");
        assert!(held[3..].iter().all(|age| age.ends_with('s')), "{table}");
        assert_eq!(columns("cli-free")[1], "<released>", "{table}");

        let wide = ctl.ok(&["get", "lease", "cli-held", "-o", "wide"]);
        assert!(wide.lines().next().unwrap().ends_with("DURATION") && wide.trim_end().ends_with("15s"), "{wide}");

        let json: serde_json::Value =
            serde_json::from_str(&ctl.ok(&["get", "lease", "cli-held", "-o", "json"])).unwrap();
        assert_eq!(json["holder"], "ctl-1");
        assert_eq!(json["transitions"], 2);

        let described = ctl.ok(&["describe", "lease", "cli-free"]);
        assert!(described.lines().any(|l| l.starts_with("Holder:") && l.ends_with("<released>")), "{described}");

        assert_eq!(ctl.ok(&["delete", "lease", "cli-held", "--wait"]).trim(), "lease/cli-held deleted");
        let gone = ctl.run(&["get", "lease", "cli-held"]);
        assert_eq!(gone.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&gone.stderr).contains("not found"));
    })
    .await
    .unwrap();
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sbxctl_wait_fails_fast_on_failed_with_the_reason() {
    let agent = start_agent(Faults::default()).await;
    let (server, client) = start_server(test_config(&[])).await;
    register(&client, "node-a", agent.addr()).await;
    wait_node_state(&client, "node-a", NodeState::Ready).await;
    client.create_sandbox("doomed", &sandbox_spec("100m")).await.unwrap();
    eventually(10, "doomed on the agent", || async {
        agent.sandbox_ids().contains(&"doomed".to_string()).then_some(())
    })
    .await;
    assert!(agent.fail_sandbox("doomed", "oom killed"), "the agent holds doomed");
    eventually(10, "doomed Failed in the store", || {
        let client = client.clone();
        async move {
            let s = client.get_sandbox("doomed").await.ok()?;
            (s.status.phase == sandboxd_api::Phase::Failed).then_some(())
        }
    })
    .await;
    let server_url = format!("http://{}", server.addr);
    let started = std::time::Instant::now();
    let out = tokio::task::spawn_blocking(move || {
        Ctl { server: server_url }.run(&["wait", "sandbox/doomed", "--for", "phase=Running", "--timeout", "30s"])
    })
    .await
    .unwrap();
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "waiting for Running on a Failed sandbox must fail: {stderr}");
    assert!(stderr.contains("Failed") && stderr.contains("oom killed"), "{stderr}");
    assert!(took < std::time::Duration::from_secs(10), "wait took {took:?}: it must not sit out its 30 s timeout");
    server.stop().await.unwrap();
}

#[test]
fn sbxctl_says_which_address_is_unreachable_and_how_to_start_the_server() {
    let ctl = Ctl { server: format!("http://{}", exclusive_addr(8080)) };
    let out = ctl.run(&["get", "nodes"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "one readable line: {stderr}");
    assert!(stderr.contains(&ctl.server) && stderr.contains("sandboxd-o serve"), "{stderr}");
}

#[test]
fn sbxctl_prints_completions() {
    let ctl = Ctl { server: "http://127.0.0.1:1".into() };
    let out = ctl.ok(&["completion", "bash"]);
    assert!(out.contains("sbxctl") && out.contains("complete"), "bash completion script");
}
