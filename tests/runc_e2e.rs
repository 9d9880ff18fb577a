//! The real runtime end to end: the orchestrator, one `sbxlet --runtime runc` and a throwaway
//! `docker-registry`, as root. Without root, runc, iptables, docker-registry or busybox-static the
//! tests print why and skip; CI installs all of them (hack/deps.sh).

mod common;

use common::*;
use futures::StreamExt;
use reqwest::Method;
use sandboxd_api::dataplane::ExecRequest;
use sandboxd_api::{
    Container, ContainerResource, NodeState, Phase, PortSpec, Probe, ProbeProtocol, Protocol, RuntimeClass,
};
use sandboxd_api::{Sandbox, SandboxSpec};
use sandboxd_client::dataplane::ExecOutput;
use sandboxd_client::Client;
use sandboxd_testkit::image::{busybox_available, busybox_image, INDEX_HTML};
use sandboxd_testkit::{LocalRegistry, RealNode};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

// === the orchestrator with a real node ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_sandbox_is_probed_served_logged_survives_an_agent_kill_and_leaves_nothing() {
    if skip_without_prerequisites("a_real_sandbox_is_probed_served_logged_survives_an_agent_kill_and_leaves_nothing") {
        return;
    }
    real_sandbox_lifecycle(RuntimeClass::Runc, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_gvisor_a_real_sandbox_is_probed_served_logged_survives_an_agent_kill_and_leaves_nothing() {
    if skip_without_gvisor(
        "under_gvisor_a_real_sandbox_is_probed_served_logged_survives_an_agent_kill_and_leaves_nothing",
    ) {
        return;
    }
    real_sandbox_lifecycle(RuntimeClass::Gvisor, 5).await;
}

/// One sandbox of `class` through its whole life on a real node (`slot`): probe, host port, logs,
/// a sidecar over localhost, an OOM kill, an agent SIGKILL and re-adoption, and a clean delete.
async fn real_sandbox_lifecycle(class: RuntimeClass, slot: u32) {
    let registry = LocalRegistry::start().expect("docker-registry starts");
    let image = format!("{}/busybox:e2e", registry.addr());
    busybox_image().unwrap().push(&registry.addr().to_string(), "busybox", "e2e").await.unwrap();
    let mut node = RealNode::start(&sbxlet_binary(), slot).expect("sbxlet starts");
    let ids: Vec<String> = ["web", "hog"].map(String::from).to_vec();
    let baseline = leftovers(&node, &ids);
    let (server, client) = start_server(test_config(&[("sync_period", "1s"), ("agent_timeout", "5s")])).await;
    register(&client, "real", node.addr).await;
    wait_node_state(&client, "real", NodeState::Ready).await;
    let classes = reported_classes(&client, "real").await;
    assert!(classes.contains(&class.to_string()), "the node offers {class}: {classes:?}");

    // gVisor's own kernel counts against a container's memory limit.
    let memory = match class {
        RuntimeClass::Runc => "32Mi",
        RuntimeClass::Gvisor => "96Mi",
    };
    // A web server with an HTTP readiness probe, and a sidecar that fetches its page over localhost.
    // nc, not wget: under gVisor's host networking (runsc 20221219), busybox wget's reads fail with
    // EAGAIN (see docs/security.md).
    let fetch = r#"printf 'GET / HTTP/1.0\r\n\r\n' | nc localhost 80"#;
    let sidecar = format!(
        "until page=$({fetch}) && echo \"$page\" | grep -q busybox; do sleep 0.2; done; \
         echo \"$page\" | tail -1; echo side done; sleep 100000"
    );
    let spec = SandboxSpec {
        containers: vec![
            container("web", &image, &["httpd", "-f", "-p", "80", "-h", "/www"], "100m", memory),
            container("side", &image, &["sh", "-c", &sidecar], "100m", memory),
        ],
        ports: vec![PortSpec { container_port: 80, protocol: Protocol::Tcp, host_port: None }],
        readiness_probe: Some(http_probe()),
        runtime_class: class,
        ..SandboxSpec::default()
    };
    client.create_sandbox("web", &spec).await.unwrap();
    let running = wait_running_seeing_every_state(&client, "web").await;
    let host_port = running.status.assigned_ports[0].host_port;
    assert_kernel(&client, "web", class).await;

    serves_the_page(&format!("http://{}:{host_port}/", node.addr.ip())).await;
    let logs = eventually(60, "the sidecar's output in the logs", || async {
        let (_, body) = call(&client, Method::GET, "/api/v1/nodes/real/sandboxes/web/logs", None).await;
        let lines: Vec<String> = serde_json::from_value(body["logs"]["lines"].clone()).ok()?;
        lines.contains(&"[side] side done".to_string()).then_some(lines)
    })
    .await;
    assert!(
        logs.contains(&format!("[side] {}", INDEX_HTML.trim())),
        "the sidecar reached the server over localhost: {logs:?}"
    );

    // A container that allocates past its memory limit. It says so, and waits, first: its logs are
    // read while it runs, so that a container killed while starting (gVisor's kernel over the
    // limit) does not pass for one killed by its own allocation. (Once Failed, the sandbox is soon
    // removed from its agent, and its logs with it.)
    let (limit, allocation) = match class {
        RuntimeClass::Runc => ("16Mi", "bs=64M"),
        RuntimeClass::Gvisor => ("96Mi", "bs=256M"),
    };
    let allocate = format!("echo allocating; sleep 3; dd if=/dev/zero of=/dev/null {allocation} count=1");
    let hog = SandboxSpec {
        containers: vec![container("hog", &image, &["sh", "-c", &allocate], "1", limit)],
        runtime_class: class,
        ..SandboxSpec::default()
    };
    client.create_sandbox("hog", &hog).await.unwrap();
    eventually(20, "the hog saying it allocates", || async {
        let (_, body) = call(&client, Method::GET, "/api/v1/nodes/real/sandboxes/hog/logs", None).await;
        let lines = body["logs"]["lines"].as_array().cloned().unwrap_or_default();
        lines.contains(&json!("[hog] allocating")).then_some(())
    })
    .await;
    let failed = wait_status(&client, "hog", "Failed", |s| s.status.phase == Phase::Failed).await;
    let message = failed.status.message.clone().unwrap_or_default();
    assert!(message.contains("OOMKilled"), "reported as OOM-killed: {message:?}");

    // SIGKILL the agent and start it again: the sandbox is re-adopted and keeps running.
    node.kill();
    node.restart().expect("sbxlet starts again");
    wait_node_state(&client, "real", NodeState::Ready).await;
    wait_heartbeats(&client, "real", 3).await;
    let after = client.get_sandbox("web").await.unwrap();
    assert_eq!((after.status.phase, after.status.reason.as_deref()), (Phase::Running, None), "{:?}", after.status);
    let (_, agent_view) = call(&client, Method::GET, "/api/v1/nodes/real/sandboxes/web", None).await;
    assert_eq!(agent_view["sandbox"]["phase"], "running", "re-adopted: {agent_view}");
    serves_the_page(&format!("http://{}:{host_port}/", node.addr.ip())).await;

    for id in ["web", "hog"] {
        client.delete_sandbox(id).await.unwrap();
    }
    for id in ["web", "hog"] {
        eventually(30, &format!("{id} removed"), || async {
            client.get_sandbox(id).await.err().filter(|e| e.is_not_found()).map(|_| ())
        })
        .await;
    }
    assert_eq!(settled_leftovers(&node, &ids, &baseline).await, baseline, "delete leaves nothing behind");
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gvisor_sandbox_stays_pending_on_a_node_without_runsc() {
    if skip_without_prerequisites("a_gvisor_sandbox_stays_pending_on_a_node_without_runsc") {
        return;
    }
    let node = RealNode::start_with(&sbxlet_binary(), 8, &["--runsc", "/nonexistent/runsc"]).expect("sbxlet starts");
    let (server, client) = start_server(test_config(&[("sync_period", "1s")])).await;
    register(&client, "plain", node.addr).await;
    wait_node_state(&client, "plain", NodeState::Ready).await;
    let classes = reported_classes(&client, "plain").await;
    assert_eq!(classes, ["runc"], "without runsc the node offers runc only");

    let spec = SandboxSpec { runtime_class: RuntimeClass::Gvisor, ..common::sandbox_spec("100m") };
    client.create_sandbox("isolated", &spec).await.unwrap();
    let pending =
        wait_status(&client, "isolated", "Unschedulable", |s| s.status.reason.as_deref() == Some("Unschedulable"))
            .await;
    assert_eq!(pending.status.phase, Phase::Pending);
    let message = pending.status.message.unwrap_or_default();
    assert_eq!(message, "0/1 nodes available: 1 without the runtime class gvisor");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(client.get_sandbox("isolated").await.unwrap().status.phase, Phase::Pending, "it stays Pending");

    // The agent itself refuses the class too, should anything ask it directly.
    let agent = AgentApi::new(node.addr);
    let body = json!({"id": "direct", "runtime_class": "gvisor", "containers": [{"name": "main", "image": "busybox"}]});
    let (status, answer) = agent.send(Method::POST, "/api/v1/sandboxes", Some(body)).await;
    assert_eq!(status, 400, "{answer}");
    assert!(answer["error"].as_str().unwrap_or_default().contains("runtime class gvisor is not offered"), "{answer}");
    client.delete_sandbox("isolated").await.unwrap();
    server.stop().await.unwrap();
}

// === the agent alone ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_create_delete_cycles_and_failed_creates_leave_nothing_behind() {
    if skip_without_prerequisites("a_hundred_create_delete_cycles_and_failed_creates_leave_nothing_behind") {
        return;
    }
    let node = node_with_image(1, "example.test/busybox:cycles");
    let mut ids: Vec<String> = (0..100).map(|i| format!("cycle-{i:03}")).collect();
    ids.extend(["no-image", "no-binary"].map(String::from));
    let baseline = leftovers(&node, &ids);
    let agent = AgentApi::new(node.addr);

    for i in 0..100 {
        let id = format!("cycle-{i:03}");
        let body = agent_sandbox(&id, "example.test/busybox:cycles", &["sleep", "1000"], &[(20_000 + i, 80)]);
        let (code, answer) = agent.send(Method::POST, "/api/v1/sandboxes", Some(body)).await;
        assert_eq!(code, 201, "{answer}");
        let (code, answer) = agent.send(Method::DELETE, &format!("/api/v1/sandboxes/{id}"), None).await;
        assert_eq!(code, 200, "{answer}");
    }
    assert_eq!(
        settled_leftovers(&node, &ids, &baseline).await,
        baseline,
        "100 create/delete cycles leave nothing behind"
    );

    // Creates that fail halfway: an image no registry has, and an entrypoint the image lacks.
    let missing_image = agent_sandbox("no-image", "127.0.0.1:1/nothing:here", &["true"], &[]);
    let bad_entrypoint =
        agent_sandbox("no-binary", "example.test/busybox:cycles", &["/no/such/binary"], &[(20_500, 80)]);
    for body in [missing_image, bad_entrypoint] {
        let id = body["id"].as_str().unwrap().to_string();
        assert_eq!(agent.send(Method::POST, "/api/v1/sandboxes", Some(body)).await.0, 201);
        let failed = agent.wait_phase(&id, "failed").await;
        assert!(!failed["sandbox"]["message"].as_str().unwrap_or("").is_empty(), "says why: {failed}");
        assert_eq!(agent.send(Method::DELETE, &format!("/api/v1/sandboxes/{id}"), None).await.0, 200);
    }
    assert_eq!(settled_leftovers(&node, &ids, &baseline).await, baseline, "failed creates are cleaned up the same way");
    let (_, status) = agent.send(Method::GET, "/api/v1/status", None).await;
    assert_eq!((status["used_cpu_milli"].as_u64(), status["sandboxes"].as_u64()), (Some(0), Some(0)), "{status}");
    let body = agent_sandbox("after", "example.test/busybox:cycles", &["sleep", "1"], &[]);
    let (_, created) = agent.send(Method::POST, "/api/v1/sandboxes", Some(body)).await;
    assert_eq!(
        created["sandbox"]["private_ip"].as_str().map(|ip| ip.ends_with(".2")),
        Some(true),
        "leases returned: {created}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_off_reaches_nothing_outside_and_egress_on_does() {
    if skip_without_prerequisites("egress_off_reaches_nothing_outside_and_egress_on_does") {
        return;
    }
    let node = node_with_image(2, "example.test/busybox:egress");
    // A server on this machine, on the bridge's own address: outside every sandbox.
    let gateway = node.ip_pool.replace(".0/24", ".1");
    let outside = tokio::net::TcpListener::bind((gateway.as_str(), 0)).await.unwrap();
    let port = outside.local_addr().unwrap().port();
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        while let Ok((mut conn, _)) = outside.accept().await {
            let _ = conn.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 8\r\n\r\noutside\n").await;
        }
    });
    let agent = AgentApi::new(node.addr);
    // busybox's `wget -T` crashes in Debian's static build; `nc -w` bounds the connect as well.
    let probe = format!("nc -w 2 {gateway} {port} </dev/null && echo REACHED || echo BLOCKED; sleep 1000");
    for (id, egress) in [("egress-off", false), ("egress-on", true)] {
        let mut body = agent_sandbox(id, "example.test/busybox:egress", &["sh", "-c", &probe], &[]);
        body["egress"] = json!(egress);
        assert_eq!(agent.send(Method::POST, "/api/v1/sandboxes", Some(body)).await.0, 201);
    }
    for (id, want) in [("egress-off", "BLOCKED"), ("egress-on", "REACHED")] {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let lines = loop {
            let (_, body) = agent.send(Method::GET, &format!("/api/v1/sandboxes/{id}/logs"), None).await;
            let lines: Vec<String> = serde_json::from_value(body["logs"]["lines"].clone()).unwrap_or_default();
            if lines.iter().any(|l| l.contains("REACHED") || l.contains("BLOCKED")) {
                break lines;
            }
            if tokio::time::Instant::now() > deadline {
                let (_, sandbox) = agent.send(Method::GET, &format!("/api/v1/sandboxes/{id}"), None).await;
                panic!("{id} never tried: logs {lines:?}, sandbox {sandbox}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(lines.iter().any(|l| l.ends_with(want)), "{id}: {lines:?}");
        assert_eq!(agent.send(Method::DELETE, &format!("/api/v1/sandboxes/{id}"), None).await.0, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandboxes_created_together_pull_their_image_once() {
    if skip_without_prerequisites("sandboxes_created_together_pull_their_image_once") {
        return;
    }
    let registry = LocalRegistry::start().expect("docker-registry starts");
    let image = sandboxd_testkit::image::busybox_image_with_padding(1 << 20).unwrap();
    image.push(&registry.addr().to_string(), "padded", "once").await.unwrap();
    let reference = format!("{}/padded:once", registry.addr());
    let node = RealNode::start(&sbxlet_binary(), 3).expect("sbxlet starts");
    let agent = AgentApi::new(node.addr);
    let ids: Vec<String> = (0..3).map(|i| format!("together-{i}")).collect();
    let creates = ids.iter().map(|id| {
        let body = agent_sandbox(id, &reference, &["sleep", "1000"], &[]);
        agent.send(Method::POST, "/api/v1/sandboxes", Some(body))
    });
    for (code, answer) in futures::future::join_all(creates).await {
        assert_eq!(code, 201, "{answer}");
    }
    for id in &ids {
        agent.wait_phase(id, "running").await;
    }
    assert_eq!(registry.blob_downloads("padded", &image.layer_digest()), 1, "one pull for three sandboxes");
    for id in &ids {
        assert_eq!(agent.send(Method::DELETE, &format!("/api/v1/sandboxes/{id}"), None).await.0, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_that_vanishes_without_an_exit_fails_its_sandbox_as_vanished() {
    if skip_without_prerequisites("a_container_that_vanishes_without_an_exit_fails_its_sandbox_as_vanished") {
        return;
    }
    let node = node_with_image(4, "example.test/busybox:vanish");
    let agent = AgentApi::new(node.addr);
    let body = agent_sandbox("ghost", "example.test/busybox:vanish", &["sleep", "1000"], &[]);
    assert_eq!(agent.send(Method::POST, "/api/v1/sandboxes", Some(body)).await.0, 201);
    agent.wait_phase("ghost", "running").await;

    // Kill the shim first, so nothing records an exit, then the container: it is simply gone.
    let bundle = node.state_dir().join("sandboxes/ghost/containers/main").display().to_string();
    let shims: Vec<String> = host(&["ps", "-eo", "pid,args"])
        .lines()
        .filter(|l| l.contains("sbxlet-shim") && l.contains(&bundle))
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .collect();
    assert_eq!(shims.len(), 1, "one shim per container");
    host(&["kill", "-9", &shims[0]]);
    let runc_root = node.state_dir().join("runc").display().to_string();
    host(&["runc", "--root", &runc_root, "kill", "ghost_main", "KILL"]);

    let (_, _) = agent.send(Method::POST, "/api/v1/reconcile", None).await;
    let failed = agent.wait_phase("ghost", "failed").await;
    assert_eq!(failed["sandbox"]["message"], "container main vanished", "{failed}");
    assert_eq!(agent.send(Method::DELETE, "/api/v1/sandboxes/ghost", None).await.0, 200);
    // The killed container's processes may still be exiting when the delete answers (seen once in a
    // loaded CI run: one leftover); everything must be gone within a few seconds all the same.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut left = leftovers(&node, &["ghost".to_string()]);
    while left.iter().any(|(_, n)| *n > 0) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        left = leftovers(&node, &["ghost".to_string()]);
    }
    assert!(left.iter().all(|(_, n)| *n == 0), "left behind: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_with_a_grace_sends_sigterm_and_kills_only_after_the_grace() {
    if skip_without_prerequisites("a_delete_with_a_grace_sends_sigterm_and_kills_only_after_the_grace") {
        return;
    }
    let node = node_with_image(9, "example.test/busybox:grace");
    let agent = AgentApi::new(node.addr);
    let ids = ["polite".to_string(), "stubborn".to_string()];
    let baseline = leftovers(&node, &ids);
    let on_term = |action: &str| format!("trap '{action}' TERM; while true; do sleep 0.1; done");
    for (id, action) in [("polite", "exit 0"), ("stubborn", "")] {
        let script = on_term(action);
        let body = agent_sandbox(id, "example.test/busybox:grace", &["sh", "-c", &script], &[]);
        assert_eq!(agent.send(Method::POST, "/api/v1/sandboxes", Some(body)).await.0, 201);
        agent.wait_phase(id, "running").await;
    }
    let (code, answer) = agent.send(Method::DELETE, "/api/v1/sandboxes/polite?grace_seconds=3601", None).await;
    assert_eq!(code, 400, "{answer}");

    // One that exits on SIGTERM is gone long before its grace; one that ignores it takes the grace.
    let started = std::time::Instant::now();
    assert_eq!(agent.send(Method::DELETE, "/api/v1/sandboxes/polite?grace_seconds=10", None).await.0, 200);
    let polite = started.elapsed();
    let started = std::time::Instant::now();
    assert_eq!(agent.send(Method::DELETE, "/api/v1/sandboxes/stubborn?grace_seconds=2", None).await.0, 200);
    let stubborn = started.elapsed();
    assert!(polite < Duration::from_secs(5), "SIGTERM reached the container: {polite:?}");
    assert!(stubborn >= Duration::from_secs(2), "the kill waited for the grace: {stubborn:?}");
    assert!(stubborn < Duration::from_secs(10), "and not much longer: {stubborn:?}");
    assert_eq!(settled_leftovers(&node, &ids, &baseline).await, baseline, "both are removed completely");
}

// === fixtures ===

/// Says why the real-runtime tests cannot run here, loudly, and whether to skip.
fn skip_without_prerequisites(test: &str) -> bool {
    let mut missing = sbxlet::runc::missing_prerequisites();
    if Command::new("docker-registry").arg("--version").output().is_err() {
        missing.push("docker-registry (Debian package docker-registry)".into());
    }
    if !busybox_available() {
        missing.push("a static /bin/busybox (Debian package busybox-static)".into());
    }
    if missing.is_empty() {
        return false;
    }
    eprintln!("SKIPPED {test}: the real runtime needs {}; run hack/deps.sh as root", missing.join(", "));
    true
}

/// The runtime classes node `name` reports, once it has reported them (20 s at most).
async fn reported_classes(client: &Client, name: &str) -> Vec<String> {
    eventually(20, &format!("node {name}'s runtime classes"), || async {
        let node = client.get_node(name).await.ok()?;
        Some(node.status.node_info.runtime_classes).filter(|c| !c.is_empty())
    })
    .await
}

/// Waits (20 s at most) until `url` answers the test image's page. Retried: busybox httpd under
/// gVisor's host networking (runsc 20221219) sometimes drops a request with EAGAIN
/// (docs/security.md); it must still serve.
async fn serves_the_page(url: &str) {
    eventually(20, &format!("{url} serving the container's file"), || async {
        let page = reqwest::get(url).await.ok()?.text().await.ok()?;
        (page == INDEX_HTML).then_some(())
    })
    .await;
}

/// Like `skip_without_prerequisites`, and a runsc that boots a sandbox here (Debian package runsc),
/// as sbxlet's own probe asks.
fn skip_without_gvisor(test: &str) -> bool {
    if skip_without_prerequisites(test) {
        return true;
    }
    let root = tempfile::tempdir().unwrap();
    let boots = Command::new("runsc")
        .args(["--root", &root.path().display().to_string(), "--network=none", "do", "true"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !boots {
        eprintln!("SKIPPED {test}: the gvisor runtime class needs a runsc that boots (Debian package runsc)");
    }
    !boots
}

/// Proves which kernel the sandbox's first container runs on: the node's own under runc, gVisor's
/// (another release, and its own `/proc/version`) under gvisor.
async fn assert_kernel(client: &Client, id: &str, class: RuntimeClass) {
    let inside = client.exec(id, &exec_request(&["uname", "-r"])).await.unwrap();
    assert_eq!(inside.exit_code, 0, "{inside:?}");
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    match class {
        RuntimeClass::Runc => assert_eq!(inside.stdout.trim(), host.trim(), "runc shares the node's kernel"),
        RuntimeClass::Gvisor => {
            assert_ne!(inside.stdout.trim(), host.trim(), "gVisor's kernel answers, not the node's");
            let version = client.exec(id, &exec_request(&["cat", "/proc/version"])).await.unwrap();
            let host_version = std::fs::read_to_string("/proc/version").unwrap();
            assert_ne!(version.stdout.trim(), host_version.trim(), "{version:?}");
        }
    }
}

/// `leftovers` once they are back to `baseline`, or as they stand after 10 s: a killed container's
/// processes (gVisor's shim most of all) may still be exiting when its delete has been answered.
async fn settled_leftovers(
    node: &RealNode,
    ids: &[String],
    baseline: &[(&'static str, usize)],
) -> Vec<(&'static str, usize)> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut left = leftovers(node, ids);
    while left != baseline && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        left = leftovers(node, ids);
    }
    left
}

/// What sandboxes `ids` of `node` hold on the host: namespaces, veths, iptables rules, mounts,
/// cgroups, sandbox directories, runc containers and shim processes.
fn leftovers(node: &RealNode, ids: &[String]) -> Vec<(&'static str, usize)> {
    let state = node.state_dir().display().to_string();
    let names: Vec<(String, String)> = ids.iter().map(|id| sbxlet::runc::host_names_of(&node.bridge, id)).collect();
    let namespaces = host(&["ip", "netns", "list"]);
    let netns = names.iter().filter(|(ns, _)| namespaces.lines().any(|l| l.split(' ').next() == Some(ns))).count();
    let links = host(&["ip", "-o", "link", "show"]);
    let veths = names.iter().filter(|(_, veth)| links.contains(&format!(": {veth}@"))).count();
    let sandbox_rules = format!("sbxlet:{}:", node.bridge);
    let node_rules = format!("sbxlet:{}:-", node.bridge);
    let rules = [host(&["iptables", "-w", "-S"]), host(&["iptables", "-w", "-t", "nat", "-S"])]
        .concat()
        .lines()
        .filter(|l| l.contains(&sandbox_rules) && !l.contains(&node_rules))
        .count();
    let mounts =
        std::fs::read_to_string("/proc/self/mountinfo").unwrap().lines().filter(|l| l.contains(&state)).count();
    let cgroups = cgroup_dirs_under(&node.cgroup_parent);
    let sandboxes = std::fs::read_dir(node.state_dir().join("sandboxes")).map(|d| d.count()).unwrap_or(0);
    let runc_root = format!("{state}/runc");
    let runsc_root = format!("{state}/runsc");
    let containers = host(&["runc", "--root", &runc_root, "list", "-q"]).lines().count()
        + host(&["runsc", "--root", &runsc_root, "list", "-q"]).lines().count();
    let shims =
        host(&["ps", "-eo", "args"]).lines().filter(|l| l.contains(&state) && !l.contains("sbxlet --runtime")).count();
    vec![
        ("netns", netns),
        ("veths", veths),
        ("iptables rules", rules),
        ("mounts", mounts),
        ("cgroup dirs", cgroups),
        ("sandbox dirs", sandboxes),
        ("runc containers", containers),
        ("shim processes", shims),
    ]
}

/// The sbxlet binary `cargo test --workspace` built next to sandboxd-o (built now if it is missing).
fn sbxlet_binary() -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_sandboxd-o")).with_file_name("sbxlet");
    if !path.is_file() {
        let status =
            Command::new(env!("CARGO")).args(["build", "-q", "-p", "sbxlet", "--bin", "sbxlet"]).status().unwrap();
        assert!(status.success(), "building sbxlet failed");
    }
    path
}

fn host(args: &[&str]) -> String {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Cgroup directories below `parent` in every hierarchy (the parent itself not counted).
fn cgroup_dirs_under(parent: &str) -> usize {
    fn count(dir: &Path) -> usize {
        std::fs::read_dir(dir)
            .map(|d| d.flatten().filter(|e| e.path().is_dir()).map(|e| 1 + count(&e.path())).sum())
            .unwrap_or(0)
    }
    let roots: Vec<PathBuf> = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        vec![PathBuf::from("/sys/fs/cgroup")]
    } else {
        std::fs::read_dir("/sys/fs/cgroup").map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default()
    };
    roots.iter().map(|root| count(&root.join(parent))).sum()
}

fn container(name: &str, image: &str, args: &[&str], cpu: &str, memory: &str) -> Container {
    Container {
        name: name.into(),
        image: image.into(),
        args: args.iter().map(|a| a.to_string()).collect(),
        env: vec![],
        work_dir: String::new(),
        resource: Some(ContainerResource {
            cpu: Some(cpu.into()),
            memory: Some(memory.into()),
            ephemeral_storage: None,
        }),
    }
}

fn http_probe() -> Probe {
    Probe {
        protocol: ProbeProtocol::Http,
        port: 80,
        path: Some("/".into()),
        initial_delay_seconds: 0,
        period_seconds: 1,
        timeout_seconds: 1,
        success_threshold: 1,
        failure_threshold: 3,
    }
}

/// Waits for Running, checking every state seen on the way: Running only ever with the probe passed.
async fn wait_running_seeing_every_state(client: &Client, id: &str) -> Sandbox {
    eventually(60, &format!("{id} Running"), || async {
        let s = client.get_sandbox(id).await.ok()?;
        if s.status.phase == Phase::Running {
            let passed = s.status.readiness.as_ref().is_some_and(|r| r.success_streak >= 1);
            assert!(s.status.ready && passed, "Running before the probe passed: {:?}", s.status);
        }
        assert_ne!(s.status.phase, Phase::Failed, "{:?}", s.status);
        (s.status.phase == Phase::Running).then_some(s)
    })
    .await
}

async fn wait_status(client: &Client, id: &str, what: &str, check: impl Fn(&Sandbox) -> bool) -> Sandbox {
    eventually(60, &format!("{id} {what}"), || async { client.get_sandbox(id).await.ok().filter(|s| check(s)) }).await
}

/// The agent's own API, for the tests that drive it without an orchestrator.
struct AgentApi {
    http: reqwest::Client,
    base: String,
}

impl AgentApi {
    fn new(addr: SocketAddr) -> AgentApi {
        AgentApi { http: reqwest::Client::new(), base: format!("http://{addr}") }
    }

    /// Waits (60 s at most) until the agent shows sandbox `id` in `phase`; returns its answer. Failing
    /// on the way ends the wait at once unless `phase` is "failed".
    async fn wait_phase(&self, id: &str, phase: &str) -> Value {
        eventually(60, &format!("{id} {phase}"), || async {
            let (_, body) = self.send(Method::GET, &format!("/api/v1/sandboxes/{id}"), None).await;
            if phase != "failed" {
                assert_ne!(body["sandbox"]["phase"], "failed", "{body}");
            }
            (body["sandbox"]["phase"] == phase).then_some(body)
        })
        .await
    }

    async fn send(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = self.http.request(method, format!("{}{path}", self.base)).timeout(Duration::from_secs(60));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }
}

/// A real node (`slot` keeps nodes of one test process apart) with the busybox image imported as
/// `reference`.
fn node_with_image(slot: u32, reference: &str) -> RealNode {
    let node = RealNode::start(&sbxlet_binary(), slot).expect("sbxlet starts");
    let archive = node.state_dir().join("busybox.tar");
    busybox_image().unwrap().write_oci_archive(&archive, reference).unwrap();
    assert_eq!(node.import(&archive).unwrap(), reference);
    node
}

fn agent_sandbox(id: &str, image: &str, args: &[&str], ports: &[(u16, u16)]) -> Value {
    json!({
        "id": id,
        "ports": ports.iter().map(|(host, container)| json!({"host_port": host, "container_port": container, "protocol": "tcp"})).collect::<Vec<_>>(),
        "containers": [{"name": "main", "image": image, "args": args, "resource": {"cpu": "50m", "memory": "16Mi"}}]
    })
}

// === the data plane: exec, files and logs through the orchestrator ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_files_and_followed_logs_reach_a_real_container_and_never_the_host() {
    if skip_without_prerequisites("exec_files_and_followed_logs_reach_a_real_container_and_never_the_host") {
        return;
    }
    data_plane_end_to_end(RuntimeClass::Runc, 6).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_gvisor_exec_files_and_followed_logs_reach_a_real_container_and_never_the_host() {
    if skip_without_gvisor("under_gvisor_exec_files_and_followed_logs_reach_a_real_container_and_never_the_host") {
        return;
    }
    data_plane_end_to_end(RuntimeClass::Gvisor, 7).await;
}

/// Exec (buffered, streamed, signals, timeouts, a terminal), files and followed logs of a `class`
/// sandbox on a real node (`slot`).
async fn data_plane_end_to_end(class: RuntimeClass, slot: u32) {
    let reference = "example.test/busybox:dataplane";
    let node = node_with_image(slot, reference);
    let ids: Vec<String> = vec!["dp".into()];
    let baseline = leftovers(&node, &ids);
    let (server, client) = start_server(test_config(&[("max_file_bytes", "11MiB")])).await;
    register(&client, "real", node.addr).await;
    wait_node_state(&client, "real", NodeState::Ready).await;

    // A sandbox that cannot be placed stays Pending: exec is a 409, an unknown id a 404.
    client.create_sandbox("waiting", &common::sandbox_spec("1000")).await.unwrap();
    let pending = client.exec("waiting", &exec_request(&["true"])).await.unwrap_err();
    assert_eq!(pending.status(), Some(409), "{pending}");
    assert_eq!(client.exec("nobody", &exec_request(&["true"])).await.unwrap_err().status(), Some(404));

    let spec = SandboxSpec {
        containers: vec![container("main", reference, &["sh", "-c", "echo started; sleep 100000"], "200m", "64Mi")],
        runtime_class: class,
        ..SandboxSpec::default()
    };
    client.create_sandbox("dp", &spec).await.unwrap();
    wait_status(&client, "dp", "Running", |s| s.status.phase == Phase::Running).await;
    assert_kernel(&client, "dp", class).await;

    // Buffered exec: both streams and the exit code.
    let result = client.exec("dp", &exec_request(&["sh", "-c", "echo out; echo err >&2; exit 3"])).await.unwrap();
    assert_eq!((result.exit_code, result.stdout.as_str(), result.stderr.as_str()), (3, "out\n", "err\n"));
    let missing = client.exec("dp", &ExecRequest { container: Some("nope".into()), ..exec_request(&["true"]) }).await;
    assert_eq!(missing.unwrap_err().status(), Some(404));

    // A timeout kills the process inside the container.
    let mut slow = exec_request(&["sleep", "77"]);
    slow.timeout_seconds = Some(1);
    let result = client.exec("dp", &slow).await.unwrap();
    assert!(result.timed_out && result.exit_code == 137, "{result:?}");
    assert!(result.duration_ms < 5_000, "killed at its timeout: {result:?}");
    let ps = client.exec("dp", &exec_request(&["ps", "-o", "args"])).await.unwrap();
    assert!(ps.exit_code == 0 && ps.stdout.contains("sleep 100000"), "ps lists the container's processes: {ps:?}");
    assert!(!ps.stdout.contains("sleep 77"), "the timed-out process is gone: {}", ps.stdout);

    // A streamed exec fed over stdin answers while it runs.
    let (mut input, mut outputs) = client
        .exec_stream("dp", &exec_request(&["sh", "-c", "read line; echo got $line; read; exit 4"]))
        .await
        .unwrap();
    input.stdin(b"hello\n").await.unwrap();
    let answer = outputs.next().await.unwrap().unwrap();
    assert_eq!(answer, ExecOutput::Stdout("got hello\n".into()));
    input.close_stdin().await.unwrap();
    let exit = outputs.next().await.unwrap().unwrap();
    assert!(matches!(exit, ExecOutput::Exit { exit_code: 4, timed_out: false, .. }), "{exit:?}");

    // A signal frame reaches the process (not runc): TERM ends `sleep` with 128+15.
    let (mut input, mut outputs) = client.exec_stream("dp", &exec_request(&["sleep", "60"])).await.unwrap();
    input.signal("TERM").await.unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(10), outputs.next()).await.unwrap().unwrap().unwrap();
    assert!(matches!(exit, ExecOutput::Exit { exit_code: 143, .. }), "{exit:?}");

    // A client that leaves mid-run gets its process killed.
    let session = client.exec_stream("dp", &exec_request(&["sleep", "301"])).await.unwrap();
    drop(session);
    eventually(10, "the abandoned process killed", || async {
        let ps = client.exec("dp", &exec_request(&["ps", "-o", "args"])).await.ok()?;
        (ps.exit_code == 0 && !ps.stdout.contains("sleep 301")).then_some(())
    })
    .await;

    // An interactive shell through `sbxctl exec -it`, driven from a pseudo-terminal.
    let code = interactive_shell(client.base()).await;
    assert_eq!(code, 5, "sbxctl exits with the shell's code");

    // A 10 MiB file round trip, into the container's own /tmp (a tmpfs the host cannot see).
    let big: Vec<u8> = (0..10u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let written = client.upload("dp", &[("path", "/tmp/up/big.bin")], false, big.clone().into()).await.unwrap();
    assert_eq!(written.size, big.len() as u64);
    assert_eq!(download(&client, "/tmp/up/big.bin").await, big, "the file comes back byte for byte");
    let sum = client.exec("dp", &exec_request(&["sh", "-c", "wc -c < /tmp/up/big.bin"])).await.unwrap();
    assert_eq!(sum.stdout.trim(), big.len().to_string(), "the container sees the file it was given: {sum:?}");
    let over = client.upload("dp", &[("path", "/tmp/over")], false, vec![0u8; 12 << 20].into()).await.unwrap_err();
    assert_eq!(over.status(), Some(413), "{over}");

    // A directory tree both ways with `sbxctl cp`.
    let local = tempfile::tempdir().unwrap();
    let tree = local.path().join("tree");
    std::fs::create_dir_all(tree.join("sub/deeper")).unwrap();
    std::fs::write(tree.join("a.txt"), "alpha\n").unwrap();
    std::fs::write(tree.join("sub/deeper/b.bin"), &big[..4096]).unwrap();
    std::os::unix::fs::symlink("a.txt", tree.join("link")).unwrap();
    let server_url = client.base().to_string();
    let sbxctl = |args: &[&str]| {
        let out = Command::new(sbxctl_binary()).args(["--server", &server_url]).args(args).output().unwrap();
        assert!(out.status.success(), "sbxctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    sbxctl(&["cp", tree.to_str().unwrap(), "dp:/tmp/tree"]);
    let listed = client.exec("dp", &exec_request(&["cat", "/tmp/tree/a.txt", "/tmp/tree/link"])).await.unwrap();
    assert_eq!(listed.stdout, "alpha\nalpha\n");
    let back = local.path().join("back");
    sbxctl(&["cp", "dp:/tmp/tree", back.to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(back.join("a.txt")).unwrap(), "alpha\n");
    assert_eq!(std::fs::read(back.join("sub/deeper/b.bin")).unwrap(), &big[..4096]);
    assert_eq!(std::fs::read_link(back.join("link")).unwrap(), Path::new("a.txt"));

    // Escapes: `..` is refused, and a symlink to a host path resolves inside the container.
    let secret = std::env::temp_dir().join(format!("sbx-host-secret-{}", std::process::id()));
    std::fs::write(&secret, "host only").unwrap();
    let dotdot = client.download("dp", &[("path", "/tmp/../../etc/hostname")], false).await.err().unwrap();
    assert_eq!(dotdot.status(), Some(400), "{dotdot}");
    let link = format!("ln -s /../../../..{} /tmp/escape", secret.display());
    assert_eq!(client.exec("dp", &exec_request(&["sh", "-c", &link])).await.unwrap().exit_code, 0);
    let through = client.download("dp", &[("path", "/tmp/escape")], false).await.err().unwrap();
    assert_eq!(through.status(), Some(404), "the link resolves in the container, where nothing is: {through}");
    let _ = client.upload("dp", &[("path", "/tmp/escape")], false, "overwritten".into()).await;
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "host only", "the host file is untouched");
    std::fs::remove_file(&secret).unwrap();
    let proc_write = client.upload("dp", &[("path", "/proc/sys/kernel/core_pattern")], false, "x".into()).await;
    assert_eq!(proc_write.unwrap_err().status(), Some(400), "kernel filesystems are refused");

    // `logs -f` sees a line written after it started.
    let mut follow = client.follow_logs("dp", None, Some(1)).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), follow.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(String::from_utf8_lossy(&first), "started\n", "the tail comes first");
    client.exec("dp", &exec_request(&["sh", "-c", "echo late line > /proc/1/fd/1"])).await.unwrap();
    let late = tokio::time::timeout(Duration::from_secs(10), follow.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(String::from_utf8_lossy(&late), "late line\n");
    drop(follow);

    for id in ["dp", "waiting"] {
        client.delete_sandbox(id).await.unwrap();
    }
    eventually(30, "dp removed", || async { client.get_sandbox("dp").await.err().filter(|e| e.is_not_found()) }).await;
    assert_eq!(settled_leftovers(&node, &ids, &baseline).await, baseline, "exec and file access leave nothing behind");
    server.stop().await.unwrap();
}

fn exec_request(command: &[&str]) -> ExecRequest {
    ExecRequest { command: command.iter().map(|s| s.to_string()).collect(), ..ExecRequest::default() }
}

async fn download(client: &Client, path: &str) -> Vec<u8> {
    let mut stream = client.download("dp", &[("path", path)], false).await.unwrap();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        bytes.extend_from_slice(&chunk.unwrap());
    }
    bytes
}

/// Runs `sbxctl exec -it dp -- sh` on a pseudo-terminal, types a calculation and `exit 5`, and
/// returns sbxctl's exit code.
async fn interactive_shell(server: &str) -> i32 {
    use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).unwrap();
    grantpt(&master).unwrap();
    unlockpt(&master).unwrap();
    let slave_path = ptsname(&master, Vec::new()).unwrap();
    let slave = std::fs::OpenOptions::new().read(true).write(true).open(slave_path.to_str().unwrap()).unwrap();
    let mut child = Command::new(sbxctl_binary())
        .args(["--server", server, "exec", "-it", "dp", "--", "sh"])
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave)
        .spawn()
        .unwrap();
    let mut terminal = std::fs::File::from(master);
    let screen = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut reader = terminal.try_clone().unwrap();
        let reading = std::thread::spawn(move || {
            let mut seen = Vec::new();
            let mut buffer = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buffer) {
                if n == 0 {
                    break;
                }
                seen.extend_from_slice(&buffer[..n]);
                if String::from_utf8_lossy(&seen).contains("answer=42") {
                    break;
                }
            }
            seen
        });
        std::thread::sleep(Duration::from_millis(500));
        terminal.write_all(b"echo answer=$((6*7)); tty\r").unwrap();
        let seen = reading.join().unwrap();
        terminal.write_all(b"exit 5\r").unwrap();
        (seen, terminal)
    });
    let (seen, _terminal) =
        tokio::time::timeout(Duration::from_secs(20), screen).await.expect("the shell answers").unwrap();
    let code = tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
    assert!(String::from_utf8_lossy(&seen).contains("answer=42"), "{}", String::from_utf8_lossy(&seen));
    code.code().unwrap_or(-1)
}

fn sbxctl_binary() -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_sandboxd-o")).with_file_name("sbxctl");
    if !path.is_file() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-q", "-p", "sandboxd-client", "--bin", "sbxctl"])
            .status()
            .unwrap();
        assert!(status.success(), "building sbxctl failed");
    }
    path
}
