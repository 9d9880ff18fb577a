//! `/metrics` of both binaries: the series an operator reads move with real traffic, `promtool check
//! metrics` finds nothing to complain about, and the observability manifests load and name only
//! series that exist.
//!
//! Its own test binary, because the metric families are process-wide.

mod common;

use common::*;
use sandboxd_api::{NodeState, Phase};
use std::io::Write;
use std::process::{Command, Stdio};

/// The value of the sample `name` whose labels include every pair of `labels`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|line| !line.starts_with('#')).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (metric, label_text) = match series.split_once('{') {
            Some((metric, rest)) => (metric, rest.strip_suffix('}')?),
            None => (series, ""),
        };
        let matches = metric == name
            && labels.iter().all(|(key, want)| label_text.split(',').any(|pair| pair == format!("{key}=\"{want}\"")));
        matches.then(|| value.parse().ok()).flatten()
    })
}

/// Whether promtool runs here; says so loudly when it does not (hack/deps.sh installs it).
fn promtool_available(test: &str) -> bool {
    let runs = Command::new("promtool").arg("--version").output().is_ok_and(|o| o.status.success());
    if !runs {
        eprintln!("SKIPPED {test}: promtool (Debian package prometheus) is missing; run hack/deps.sh");
    }
    runs
}

/// `promtool check metrics` on `text`: its complaints, empty when clean.
fn promtool_complaints(text: &str) -> String {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool starts");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let complaints = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() && complaints.trim().is_empty() {
        String::new()
    } else {
        format!("exit {:?}: {complaints}", out.status.code())
    }
}

async fn scrape(url: &str) -> String {
    let response = reqwest::get(url).await.unwrap();
    assert_eq!(response.status(), 200, "{url}");
    let content_type = response.headers()["content-type"].to_str().unwrap().to_string();
    assert!(content_type.starts_with("text/plain; version=0.0.4"), "{url}: {content_type}");
    response.text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_binaries_export_lint_clean_series_that_follow_the_traffic() {
    let (server, client) = start_server(test_config(&[])).await;
    let base = format!("http://{}", server.addr);
    let agent = start_isolated_agent(isolated_sim_config()).await;
    register(&client, "mx-1", agent.addr()).await;
    wait_node_state(&client, "mx-1", NodeState::Ready).await;
    client.create_sandbox("mx-a", &sandbox_spec("100m")).await.unwrap();
    eventually(20, "mx-a Running", || {
        let client = client.clone();
        async move { (client.get_sandbox("mx-a").await.ok()?.status.phase == Phase::Running).then_some(()) }
    })
    .await;
    let _ = reqwest::get(format!("{base}/no/such/route")).await.unwrap();

    let text = eventually(10, "the Running sandbox counted", || {
        let base = base.clone();
        async move {
            let text = scrape(&format!("{base}/metrics")).await;
            sample(&text, "sandboxd_sandboxes", &[("phase", "Running")]).is_some_and(|n| n >= 1.0).then_some(text)
        }
    })
    .await;
    let at_least_one = [
        ("sandboxd_sandbox_startup_duration_seconds_count", vec![]),
        ("sandboxd_nodes", vec![("state", "Ready")]),
        ("sandboxd_binds_total", vec![]),
        ("sandboxd_heartbeats_total", vec![]),
        ("sandboxd_heartbeat_lag_seconds_count", vec![]),
        (
            "sandboxd_apiserver_request_duration_seconds_count",
            vec![("route", "/api/v1/sandboxes"), ("verb", "POST"), ("code", "201")],
        ),
        ("sandboxd_apiserver_request_duration_seconds_count", vec![("route", "unmatched"), ("code", "404")]),
        ("sandboxd_workqueue_adds_total", vec![("name", "scheduler")]),
        ("sandboxd_workqueue_queue_duration_seconds_count", vec![("name", "sandbox")]),
        ("sandboxd_workqueue_work_duration_seconds_count", vec![("name", "node")]),
        ("sandboxd_controller_reconcile_total", vec![("controller", "sandbox"), ("result", "success")]),
        ("sandboxd_controller_reconcile_time_seconds_count", vec![("controller", "scheduler")]),
        ("sandboxd_agent_request_duration_seconds_count", vec![("operation", "create_sandbox"), ("result", "success")]),
        ("sandboxd_agent_request_duration_seconds_count", vec![("operation", "status"), ("result", "success")]),
        ("sandboxd_store_commits_total", vec![]),
        ("sandboxd_store_commit_duration_seconds_count", vec![]),
        ("sandboxd_store_commit_batch_size_count", vec![]),
        ("sandboxd_apiserver_current_inflight_requests", vec![("class", "system")]),
        ("process_resident_memory_bytes", vec![]),
        ("process_open_fds", vec![]),
    ];
    for (name, labels) in &at_least_one {
        let value = sample(&text, name, labels);
        assert!(value.is_some_and(|v| v >= 1.0), "{name}{labels:?} should be at least 1, is {value:?}");
    }
    assert!(sample(&text, "sandboxd_workqueue_depth", &[("name", "ttl")]).is_some(), "queue depth per controller");
    assert!(!text.contains("mx-a"), "object names never become label values");

    let agent_text = scrape(&format!("http://{}/metrics", agent.addr())).await;
    assert_eq!(sample(&agent_text, "sbxlet_sandboxes", &[("state", "running")]), Some(1.0), "{agent_text}");
    let creates = sample(
        &agent_text,
        "sbxlet_runtime_operation_duration_seconds_count",
        &[("operation", "create"), ("result", "success")],
    );
    assert!(creates.is_some_and(|n| n >= 1.0), "{agent_text}");
    assert!(!agent_text.contains("process_"), "an agent sharing its process leaves process_* to the process");
    let alone = start_isolated_agent(sbxlet::SimConfig { process_metrics: true, ..isolated_sim_config() }).await;
    let alone_text = scrape(&format!("http://{}/metrics", alone.addr())).await;
    assert!(sample(&alone_text, "process_resident_memory_bytes", &[]).is_some_and(|v| v > 0.0), "{alone_text}");
    assert_eq!(
        sample(&alone_text, "sbxlet_sandboxes", &[("state", "running")]),
        Some(0.0),
        "each agent counts its own"
    );

    if promtool_available("promtool check metrics") {
        assert_eq!(promtool_complaints(&text), "", "sandboxd-o's /metrics");
        assert_eq!(promtool_complaints(&agent_text), "", "sbxlet's /metrics");
        assert_eq!(promtool_complaints(&alone_text), "", "a standalone sbxlet's /metrics");
        let complaint = promtool_complaints("# TYPE sandboxd_bad counter\nsandboxd_bad 1\n");
        assert!(complaint.contains("no help text"), "promtool itself catches a bad family: {complaint}");
    }
}

/// Families that exist only in some modes: leader status only where controllers run elected
/// (tests/ha_etcd.rs scrapes it from `controllers --metrics-listen`).
const ONLY_IN_OTHER_MODES: &[&str] = &["sandboxd_leader_election_master_status"];

/// The metric names `manifests/observability/grafana-dashboard.json` queries, without the
/// `_bucket`, `_count` and `_sum` of histogram series.
fn dashboard_families() -> std::collections::BTreeSet<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/manifests/observability/grafana-dashboard.json");
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() >= 10, "the dashboard has its panels: {}", exprs.len());
    let mut names = std::collections::BTreeSet::new();
    for expr in exprs {
        for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if ["sandboxd_", "sbxlet_", "process_"].iter().any(|p| word.starts_with(p)) {
                let family = ["_bucket", "_count", "_sum"].iter().find_map(|s| word.strip_suffix(s)).unwrap_or(word);
                names.insert(family.to_string());
            }
        }
    }
    names
}

fn collect_exprs(value: &serde_json::Value, into: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                match v {
                    serde_json::Value::String(expr) if key == "expr" => into.push(expr.clone()),
                    _ => collect_exprs(v, into),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, into)),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_queries_only_exported_families_and_the_scrape_config_loads() {
    let (server, client) = start_server(test_config(&[])).await;
    let agent = start_isolated_agent(isolated_sim_config()).await;
    register(&client, "mx-dash", agent.addr()).await;
    wait_node_state(&client, "mx-dash", NodeState::Ready).await;
    let exported = format!(
        "{}{}",
        scrape(&format!("http://{}/metrics", server.addr)).await,
        scrape(&format!("http://{}/metrics", agent.addr())).await
    );
    for family in dashboard_families() {
        if ONLY_IN_OTHER_MODES.contains(&family.as_str()) {
            continue;
        }
        assert!(
            exported.contains(&format!("# TYPE {family} ")),
            "the dashboard queries {family}, which no binary exports"
        );
    }

    if !promtool_available("promtool check config") {
        return;
    }
    // The config reads the server's CA and admin token and one token per agent, relative to itself:
    // a copy with stand-ins for them must load.
    let dir = tempfile::tempdir().unwrap();
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/manifests/observability/prometheus.yml");
    std::fs::copy(config, dir.path().join("prometheus.yml")).unwrap();
    std::fs::create_dir_all(dir.path().join("sandboxd-data/pki")).unwrap();
    std::fs::create_dir_all(dir.path().join("sbxlet-tokens")).unwrap();
    for file in ["sandboxd-data/pki/ca.crt", "sandboxd-data/admin.token"]
        .into_iter()
        .map(String::from)
        .chain((1..=3).map(|n| format!("sbxlet-tokens/demo-{n}.token")))
    {
        std::fs::write(dir.path().join(file), "stand-in\n").unwrap();
    }
    let out =
        Command::new("promtool").args(["check", "config"]).arg(dir.path().join("prometheus.yml")).output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool check config: {said}");
    assert!(said.contains("SUCCESS"), "{said}");
}
