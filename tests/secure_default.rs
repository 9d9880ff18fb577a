//! The README's first command with no flags (`sandboxd-o serve --demo-agents 3`) serves HTTPS
//! with tokens: sbxctl works with the client config it writes and no other set-up, a client
//! without the token gets 401, a direct call to a demo agent without the agent token gets 401,
//! and the credentials and the store are the owner's alone.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The README's defaults: the API on 8082, demo agents on 127.0.2.x:8080.
const API: &str = "https://127.0.0.1:8082";
const AGENT: &str = "http://127.0.2.1:8080";

fn bin(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_sandboxd-o")).with_file_name(name);
    if !path.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", "sandboxd-client", "--bin", "sbxctl"])
            .status()
            .expect("cargo build sbxctl");
        assert!(status.success());
    }
    path
}

/// A command that sees none of the caller's sandboxd settings: the defaults are under test.
fn clean(program: &Path, dir: &Path) -> Command {
    let mut command = Command::new(program);
    command.current_dir(dir).env("HOME", dir);
    for (key, _) in std::env::vars() {
        if key.starts_with("SANDBOXD_") {
            command.env_remove(key);
        }
    }
    command
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sbxctl(dir: &Path, args: &[&str]) -> Output {
    clean(&bin("sbxctl"), dir).args(args).output().expect("sbxctl runs")
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread")]
async fn the_first_readme_command_serves_https_with_tokens_and_authenticated_agents() {
    if std::net::TcpListener::bind("0.0.0.0:8082").is_err() || std::net::TcpListener::bind("127.0.2.1:8080").is_err() {
        panic!("port 8082 or 127.0.2.1:8080 is taken: this test runs the README's defaults and needs both free");
    }
    let dir = tempfile::tempdir().unwrap();
    let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
    let _server = Server(
        clean(Path::new(env!("CARGO_BIN_EXE_sandboxd-o")), dir.path())
            .args(["serve", "--demo-agents", "3"])
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("sandboxd-o starts"),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let nodes = loop {
        let out = sbxctl(dir.path(), &["get", "nodes"]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if out.status.success() && text.matches(" Ready ").count() == 3 {
            break text;
        }
        let server_log = std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default();
        assert!(
            Instant::now() < deadline,
            "no 3 Ready nodes: {text} {}\n{server_log}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(nodes.contains("demo-1"), "{nodes}");

    let data = dir.path().join("sandboxd-data");
    let whoami = sbxctl(dir.path(), &["auth", "whoami"]);
    assert!(String::from_utf8_lossy(&whoami.stdout).contains("admin (role admin"), "{whoami:?}");

    // The client config carries the CA: a client that trusts it but has no token gets 401.
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("client.json")).unwrap()).unwrap();
    assert_eq!(config["server"], API);
    let anonymous = sandboxd_client::Client::with_ca(API, None, config["ca_pem"].as_str()).unwrap();
    let err = anonymous.list_nodes().await.unwrap_err();
    assert_eq!(err.status(), Some(401), "{err}");
    // Plain HTTP is not served at all.
    let plain = reqwest::get("http://127.0.0.1:8082/healthz").await;
    assert!(!plain.is_ok_and(|r| r.status().is_success()), "plain HTTP answered");

    // The agents: 401 without the agent token, through with it, /healthz open.
    let agent = reqwest::Client::new();
    let bare = agent.get(format!("{AGENT}/api/v1/sandboxes")).send().await.unwrap();
    assert_eq!(bare.status(), 401);
    let faults = agent.get(format!("{AGENT}/sim/faults")).send().await.unwrap();
    assert!(faults.status() == 401 || faults.status() == 404, "fault routes are closed: {}", faults.status());
    let token_of = |node: &str| {
        let out = clean(Path::new(env!("CARGO_BIN_EXE_sandboxd-o")), dir.path()).args(["agent-token", node]).output();
        let out = out.expect("sandboxd-o agent-token runs");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let token = token_of("demo-1");
    let other_nodes = agent.get(format!("{AGENT}/api/v1/sandboxes")).bearer_auth(token_of("demo-2")).send();
    assert_eq!(other_nodes.await.unwrap().status(), 401, "demo-2's token does not open demo-1's agent");
    let authed = agent.get(format!("{AGENT}/api/v1/sandboxes")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(authed.status(), 200);
    // A registration that points at demo-1's address under another name cannot act as it: the
    // orchestrator presents the impostor's token there, which demo-1 refuses.
    let impostor = dir.path().join("impostor.json");
    let node = serde_json::json!({ "kind": "Node", "id": "impostor", "spec": { "ip": "127.0.2.1", "port": 8080 } });
    std::fs::write(&impostor, node.to_string()).unwrap();
    assert!(sbxctl(dir.path(), &["apply", "-f", impostor.to_str().unwrap()]).status.success());
    let beat = sbxctl(dir.path(), &["heartbeat", "node/impostor"]);
    let text = String::from_utf8_lossy(&beat.stdout).to_string();
    assert!(
        !beat.status.success() && text.contains("heartbeat failed"),
        "{text} {}",
        String::from_utf8_lossy(&beat.stderr)
    );
    assert!(text.contains("401"), "{text}");
    let faults = agent.get(format!("{AGENT}/sim/faults")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(faults.status(), 404, "no fault injection without --enable-fault-injection");
    assert_eq!(agent.get(format!("{AGENT}/healthz")).send().await.unwrap().status(), 200);

    // A sandbox runs end to end: the controllers reach the agents with the token.
    let manifest = dir.path().join("web.json");
    let spec = serde_json::json!({ "kind": "Sandbox", "id": "web-1",
        "spec": { "containers": [{ "name": "web", "image": "nginx:latest" }] } });
    std::fs::write(&manifest, spec.to_string()).unwrap();
    let applied = sbxctl(dir.path(), &["apply", "-f", manifest.to_str().unwrap()]);
    assert!(applied.status.success(), "{applied:?}");
    let waited = sbxctl(dir.path(), &["wait", "sandbox/web-1", "--for", "phase=Running", "--timeout", "30s"]);
    assert!(waited.status.success(), "{waited:?}");

    assert_eq!(mode(&data), 0o700);
    for file in ["admin.token", "agent.secret", "client.json", "pki/ca.key", "pki/server.key", "store.db"] {
        assert_eq!(mode(&data.join(file)), 0o600, "{file}");
    }
}
