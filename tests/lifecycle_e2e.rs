//! Sandbox side end to end: phases, readiness, scheduling, host ports, TTL and failure detection against sim agents.

mod common;

use common::*;
use futures::StreamExt;
use reqwest::Method;
use sandboxd_api::watch::{EventType, WatchEvent};
use sandboxd_api::{AssignedPort, NodeState, Phase, Protocol, Sandbox, SandboxSpec};
use sandboxd_client::Client;
use sandboxd_o::server::Running;
use sbxlet::{AgentHandle, Faults, SimConfig};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

// === lifecycle ===

#[tokio::test]
async fn sandbox_runs_on_its_node_then_delete_removes_it_everywhere() {
    let c = Cluster::start(1, &[]).await;
    let created = c.client.create_sandbox("life-1", &web("200m")).await.unwrap();
    assert_eq!((created.status, created.object.status.phase), (201, Phase::Pending));

    let s = wait_phase(&c.client, "life-1", Phase::Running).await.status;
    assert_eq!(s.node_name.as_deref(), Some("node-a"));
    assert_eq!(s.assigned_ports, [AssignedPort { host_port: 10000, container_port: 80, protocol: Protocol::Tcp }]);
    assert_eq!(s.external.as_deref(), Some("203.0.113.10"), "copied from the node");
    assert!(s.private_ip.as_deref().is_some_and(|ip| ip.starts_with("10.88.")), "{:?}", s.private_ip);
    assert!(s.ready && s.last_transition_at.is_some(), "{s:?}");

    let held = agent_sandbox(c.agents[0].addr(), "life-1").await.expect("the agent holds it");
    assert_eq!(held.labels.get("sandboxd.io/managed").map(String::as_str), Some("true"));
    assert_eq!(Some(held.private_ip.as_str()), s.private_ip.as_deref());
    assert_eq!(held.ports.iter().map(|p| p.host_port).collect::<Vec<_>>(), [10000]);

    let mut events = SandboxEvents::open(&c.client, "life-1", None).await;
    c.client.delete_sandbox("life-1").await.unwrap();
    let phases: Vec<(EventType, Phase)> = events.until_deleted().await.into_iter().map(|(t, p, _)| (t, p)).collect();
    assert_eq!(phases, [(EventType::Modified, Phase::Terminating), (EventType::Deleted, Phase::Terminating)]);
    assert!(c.client.get_sandbox("life-1").await.unwrap_err().is_not_found());
    assert!(!c.agents[0].sandbox_ids().contains(&"life-1".to_string()), "gone from the agent");
    c.stop().await;
}

#[tokio::test]
async fn watch_sees_scheduled_creating_running_in_order() {
    // An agent that takes a moment to start it: it still reports creating when first read.
    let slow_start = SimConfig { create_delay: Duration::from_millis(300), ..isolated_sim_config() };
    let c = Cluster::start_with(&[slow_start], &[]).await;
    let from = c.client.list_sandboxes().await.unwrap().resource_version;
    let mut events = SandboxEvents::open(&c.client, "watched", Some(from)).await;
    c.client.create_sandbox("watched", &web("100m")).await.unwrap();

    let seen = events.until(|_, s| s.status.phase == Phase::Running).await;
    let mut phases: Vec<(EventType, Phase)> = seen.iter().map(|(t, s)| (*t, s.status.phase)).collect();
    phases.dedup_by_key(|(_, phase)| *phase);
    let expected = [
        (EventType::Added, Phase::Pending),
        (EventType::Modified, Phase::Scheduled),
        (EventType::Modified, Phase::Creating),
        (EventType::Modified, Phase::Running),
    ];
    assert_eq!(phases, expected);
    c.stop().await;
}

#[tokio::test]
async fn a_sandbox_running_when_first_read_goes_from_scheduled_straight_to_running() {
    // The sim starts it within the create call: read back at once, it already runs.
    let c = Cluster::start(1, &[]).await;
    let from = c.client.list_sandboxes().await.unwrap().resource_version;
    let mut events = SandboxEvents::open(&c.client, "quick", Some(from)).await;
    c.client.create_sandbox("quick", &web("100m")).await.unwrap();

    let seen = events.until(|_, s| s.status.phase == Phase::Running).await;
    let phases: Vec<(EventType, Phase)> = seen.iter().map(|(t, s)| (*t, s.status.phase)).collect();
    let expected = [
        (EventType::Added, Phase::Pending),
        (EventType::Modified, Phase::Scheduled),
        (EventType::Modified, Phase::Running),
    ];
    assert_eq!(phases, expected, "one write from Scheduled to Running, no Creating between");
    let running = &seen.last().unwrap().1;
    assert!(running.status.ready && running.status.private_ip.is_some(), "{:?}", running.status);
    // The agent's acceptance is still on record, before the start.
    let reasons = eventually(20, "Created and Started events", || async {
        let events = c.client.list_events(Some("sandbox/quick")).await.ok()?.items;
        let reasons: Vec<String> = events.iter().map(|e| e.reason.clone()).collect();
        reasons.contains(&"Started".to_string()).then_some(reasons)
    })
    .await;
    let at = |reason: &str| reasons.iter().position(|r| r == reason);
    assert!(at("Created").is_some() && at("Created") < at("Started"), "{reasons:?}");
    c.stop().await;
}

// === readiness ===

#[tokio::test]
async fn readiness_probe_gates_running_and_later_failures_only_clear_ready() {
    let c = Cluster::start_with(&[SimConfig { faults: probe_503(), ..isolated_sim_config() }], &[]).await;
    c.client.create_sandbox("probed", &with_http_probe(web("100m"))).await.unwrap();

    let s = wait_status(&c.client, "probed", "probe error recorded", |s| last_probe_error(s).contains("503")).await;
    assert_eq!((s.status.phase, s.status.ready), (Phase::Creating, false));
    let probes = probes_answered_after(&c.agents[0], 3);
    assert_holds_until(&c.client, "probed", "Creating and not ready", probes, |s| {
        s.status.phase == Phase::Creating && !s.status.ready
    })
    .await;

    c.agents[0].set_faults(Faults::default());
    wait_status(&c.client, "probed", "Running and ready", |s| s.status.phase == Phase::Running && s.status.ready).await;

    c.agents[0].set_faults(probe_503());
    let s = wait_status(&c.client, "probed", "not ready again", |s| !s.status.ready).await;
    assert_eq!(s.status.phase, Phase::Running, "a Running sandbox stays Running");
    assert!(last_probe_error(&s).contains("503"), "{:?}", s.status.readiness);
    let probes = probes_answered_after(&c.agents[0], 2);
    assert_holds_until(&c.client, "probed", "Running and not ready", probes, |s| {
        s.status.phase == Phase::Running && !s.status.ready
    })
    .await;
    c.stop().await;
}

// === scheduling ===

#[tokio::test]
async fn unschedulable_sandbox_waits_pending_and_lands_on_a_bigger_node_when_one_joins() {
    let mut c = Cluster::start(1, &[]).await;
    c.client.create_sandbox("huge", &sandbox_spec("8")).await.unwrap();
    let s =
        wait_status(&c.client, "huge", "Unschedulable", |s| s.status.reason.as_deref() == Some("Unschedulable")).await;
    assert_eq!(s.status.phase, Phase::Pending);
    assert_eq!(s.status.message.as_deref(), Some("0/1 nodes available: 1 insufficient cpu"));
    assert_eq!(s.status.node_name, None);

    c.add_node("node-big", SimConfig { capacity_cpu_milli: 64_000, ..isolated_sim_config() }).await;
    let s = wait_phase(&c.client, "huge", Phase::Running).await;
    assert_eq!(s.status.node_name.as_deref(), Some("node-big"));
    c.stop().await;
}

#[tokio::test]
async fn node_selectors_place_by_labels_and_wait_for_a_matching_node() {
    let c = Cluster::start(2, &[]).await;
    let label = |node: &str, pairs: &[(&str, &str)]| {
        let labels = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let client = c.client.clone();
        let node = node.to_string();
        async move {
            let spec =
                sandboxd_api::node::NodeSpec { labels: Some(labels), ..client.get_node(&node).await.unwrap().spec() };
            client.apply_node(&node, &spec).await.unwrap().object
        }
    };
    assert_eq!(label("node-b", &[("zone", "eu")]).await.labels.get("zone").map(String::as_str), Some("eu"));

    let mut eu = sandbox_spec("100m");
    eu.node_selector = [("zone".to_string(), "eu".to_string())].into();
    for i in 0..4 {
        c.client.create_sandbox(&format!("eu-{i}"), &eu).await.unwrap();
    }
    for i in 0..4 {
        let s = wait_phase(&c.client, &format!("eu-{i}"), Phase::Running).await;
        assert_eq!(s.status.node_name.as_deref(), Some("node-b"), "only node-b is in zone eu");
    }

    let mut us = sandbox_spec("100m");
    us.node_selector = [("zone".to_string(), "us".to_string())].into();
    c.client.create_sandbox("us-1", &us).await.unwrap();
    let s =
        wait_status(&c.client, "us-1", "Unschedulable", |s| s.status.reason.as_deref() == Some("Unschedulable")).await;
    assert_eq!(s.status.message.as_deref(), Some("0/2 nodes available: 2 node selector mismatch"));
    label("node-a", &[("zone", "us")]).await;
    let s = wait_phase(&c.client, "us-1", Phase::Running).await;
    assert_eq!(s.status.node_name.as_deref(), Some("node-a"), "placed when a node gains the label");

    // Well-known labels come from the agents: both run the simulator, neither runc.
    let runtime_is = |runtime: &str| {
        let mut spec = sandbox_spec("100m");
        spec.affinity = Some(sandboxd_api::affinity::Affinity {
            required: vec![sandboxd_api::affinity::Expression {
                key: "sandboxd.io/runtime".into(),
                operator: sandboxd_api::affinity::Operator::In,
                values: vec![runtime.into()],
            }],
            preferred: vec![],
        });
        spec
    };
    c.client.create_sandbox("on-sim", &runtime_is("sim")).await.unwrap();
    wait_phase(&c.client, "on-sim", Phase::Running).await;
    c.client.create_sandbox("on-runc", &runtime_is("runc")).await.unwrap();
    let s = wait_status(&c.client, "on-runc", "Unschedulable", |s| s.status.reason.as_deref() == Some("Unschedulable"))
        .await;
    assert_eq!(s.status.message.as_deref(), Some("0/2 nodes available: 2 affinity mismatch"));
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn taints_keep_sandboxes_off_and_no_execute_evicts_after_the_toleration() {
    use sandboxd_api::taints::{Taint, TaintEffect, Toleration, TolerationOperator};
    let c = Cluster::start(2, &[]).await;
    let taint = |node: &str, taints: Vec<Taint>| {
        let client = c.client.clone();
        let node = node.to_string();
        async move {
            let spec =
                sandboxd_api::node::NodeSpec { taints: Some(taints), ..client.get_node(&node).await.unwrap().spec() };
            client.apply_node(&node, &spec).await.unwrap().object
        }
    };
    let new_taint =
        |key: &str, value: &str, effect| Taint { key: key.into(), value: value.into(), effect, added_at: None };
    let tolerating = |key: &str, seconds: Option<i64>| {
        let toleration = Toleration {
            key: key.into(),
            operator: TolerationOperator::Exists,
            value: String::new(),
            effect: None,
            toleration_seconds: seconds,
        };
        SandboxSpec { tolerations: vec![toleration], ..sandbox_spec("100m") }
    };

    // NoSchedule on both nodes: only a sandbox that tolerates it is placed.
    for node in ["node-a", "node-b"] {
        let tainted = taint(node, vec![new_taint("dedicated", "gpu", TaintEffect::NoSchedule)]).await;
        assert!(tainted.taints[0].added_at.is_some(), "the server stamps when a taint appeared");
    }
    c.client.create_sandbox("plain", &sandbox_spec("100m")).await.unwrap();
    let s =
        wait_status(&c.client, "plain", "Unschedulable", |s| s.status.reason.as_deref() == Some("Unschedulable")).await;
    assert_eq!(s.status.message.as_deref(), Some("0/2 nodes available: 2 untolerated taint"));
    c.client.create_sandbox("gpu-user", &tolerating("dedicated", None)).await.unwrap();
    wait_phase(&c.client, "gpu-user", Phase::Running).await;
    // Taints removed from node-b: the waiting sandbox lands there.
    let labelled = sandboxd_api::node::NodeSpec {
        taints: Some(vec![]),
        labels: Some([("pool".to_string(), "b".to_string())].into()),
        ..c.client.get_node("node-b").await.unwrap().spec()
    };
    c.client.apply_node("node-b", &labelled).await.unwrap();
    let s = wait_phase(&c.client, "plain", Phase::Running).await;
    assert_eq!(s.status.node_name.as_deref(), Some("node-b"));

    // NoExecute on node-b: evicted at once without a toleration, after it with one, never with one
    // without a limit. The running NoSchedule-tolerating sandbox on node-a is left alone.
    for (id, seconds) in [("patient", Some(2)), ("steady", None)] {
        let spec = SandboxSpec {
            node_selector: [("pool".to_string(), "b".to_string())].into(),
            ..tolerating("maintenance", seconds)
        };
        c.client.create_sandbox(id, &spec).await.unwrap();
        let s = wait_phase(&c.client, id, Phase::Running).await;
        assert_eq!(s.status.node_name.as_deref(), Some("node-b"));
    }
    let tainted_at = std::time::Instant::now();
    taint("node-b", vec![new_taint("maintenance", "", TaintEffect::NoExecute)]).await;
    let plain = wait_status(&c.client, "plain", "Evicted", |s| s.status.reason.as_deref() == Some("Evicted")).await;
    assert_eq!(plain.status.phase, Phase::Failed);
    assert_eq!(
        plain.status.message.as_deref(),
        Some("node node-b has the taint maintenance:NoExecute, which the sandbox does not tolerate")
    );
    for id in ["patient", "steady"] {
        let s = c.client.get_sandbox(id).await.unwrap();
        assert_eq!(s.status.phase, Phase::Running, "{id} tolerates the taint for now");
    }
    wait_status(&c.client, "patient", "Evicted", |s| s.status.reason.as_deref() == Some("Evicted")).await;
    assert!(tainted_at.elapsed() >= Duration::from_secs(1), "not before its toleration ran out");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(c.client.get_sandbox("steady").await.unwrap().status.phase, Phase::Running, "tolerated for ever");
    // gpu-user tolerates only `dedicated`: evicted if it landed on node-b, left alone on node-a.
    let gpu_user = c.client.get_sandbox("gpu-user").await.unwrap();
    let expected = match gpu_user.status.node_name.as_deref() {
        Some("node-b") => (Phase::Failed, Some("Evicted")),
        _ => (Phase::Running, None),
    };
    assert_eq!((gpu_user.status.phase, gpu_user.status.reason.as_deref()), expected, "{:?}", gpu_user.status);
    c.stop().await;
}

#[tokio::test]
async fn a_cordoned_node_keeps_its_sandboxes_takes_no_new_ones_and_survives_re_registration() {
    let c = Cluster::start(1, &[]).await;
    c.client.create_sandbox("before", &sandbox_spec("100m")).await.unwrap();
    wait_phase(&c.client, "before", Phase::Running).await;

    let cordoned = c.client.set_unschedulable("node-a", true).await.unwrap();
    assert!(cordoned.unschedulable);
    // Registering the node again without the field (a restart of a config node does this) keeps the cordon.
    let spec = sandboxd_api::node::NodeSpec { unschedulable: None, ..cordoned.spec() };
    assert!(c.client.apply_node("node-a", &spec).await.unwrap().object.unschedulable);

    c.client.create_sandbox("during", &sandbox_spec("100m")).await.unwrap();
    let s = wait_status(&c.client, "during", "Unschedulable", |s| s.status.reason.as_deref() == Some("Unschedulable"))
        .await;
    assert_eq!(s.status.message.as_deref(), Some("0/1 nodes available: 1 unschedulable (cordoned)"));
    assert_eq!(c.client.get_sandbox("before").await.unwrap().status.phase, Phase::Running, "running ones stay");

    c.client.set_unschedulable("node-a", false).await.unwrap();
    let s = wait_phase(&c.client, "during", Phase::Running).await;
    assert_eq!(s.status.node_name.as_deref(), Some("node-a"), "placed once uncordoned, without a new create");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_a_node_of_50_sandboxes_moves_the_reschedule_ones_under_their_ids_and_evicts_the_rest() {
    use sandboxd_api::node::DrainRequest;
    use sandboxd_api::sandbox::RestartPolicy;
    let c = Cluster::start(3, &[]).await;
    // Everything lands on node-a first.
    for node in ["node-b", "node-c"] {
        c.client.set_unschedulable(node, true).await.unwrap();
    }
    let ids: Vec<String> = (0..50).map(|i| format!("drain-{i:02}")).collect();
    let moves = |id: &str| id.ends_with(['0', '2', '4', '6', '8']);
    create_concurrently(&c.client, &ids, |id| SandboxSpec {
        restart_policy: if moves(id) { RestartPolicy::Reschedule } else { RestartPolicy::Never },
        ..web("50m")
    })
    .await;
    for id in &ids {
        assert_eq!(wait_phase(&c.client, id, Phase::Running).await.status.node_name.as_deref(), Some("node-a"));
    }
    for node in ["node-b", "node-c"] {
        c.client.set_unschedulable(node, false).await.unwrap();
    }
    let mut watched = SandboxEvents::open(&c.client, "drain-00", None).await;

    let request = DrainRequest { grace_seconds: Some(1), deadline_seconds: Some(60) };
    let drained = c.client.drain_node("node-a", &request).await.unwrap();
    assert!(drained.node.unschedulable, "a drain cordons first");
    let (mut evicted, mut rescheduled) = (drained.evicted.clone(), drained.rescheduled.clone());
    evicted.sort();
    rescheduled.sort();
    let expected_moves: Vec<String> = ids.iter().filter(|id| moves(id)).cloned().collect();
    let expected_evictions: Vec<String> = ids.iter().filter(|id| !moves(id)).cloned().collect();
    assert_eq!((evicted, rescheduled), (expected_evictions.clone(), expected_moves.clone()));
    // Repeated at once: it reports those still under way (some may have left already), nothing new.
    let again = c.client.drain_node("node-a", &request).await.unwrap();
    assert!(again.evicted.iter().all(|id| expected_evictions.contains(id)), "{again:?}");
    assert!(again.rescheduled.iter().all(|id| expected_moves.contains(id)), "{again:?}");

    for id in &expected_evictions {
        let s = wait_status_within(&c.client, id, 20, "Evicted and released", |s| {
            s.status.phase == Phase::Failed && s.status.released
        })
        .await;
        assert_eq!(
            (s.status.reason.as_deref(), s.status.message.as_deref()),
            (Some("Evicted"), Some("node node-a is drained"))
        );
    }
    for id in &expected_moves {
        let s = wait_status_within(&c.client, id, 20, "Running on another node", |s| {
            s.status.phase == Phase::Running && s.status.node_name.as_deref() != Some("node-a")
        })
        .await;
        assert_eq!((s.status.reschedules, s.status.eviction.is_none()), (1, true), "{id}");
        assert!(matches!(s.status.node_name.as_deref(), Some("node-b" | "node-c")), "{id}");
    }

    // What a watcher saw of one of them: evicting on node-a, Pending again, then bound elsewhere
    // (the sim runs it within the create call, so no Creating between Scheduled and Running).
    let seen = watched.until(|_, s| s.status.phase == Phase::Running && s.status.reschedules == 1).await;
    let mut steps: Vec<(Phase, bool, Option<String>)> = Vec::new();
    for (_, s) in &seen {
        let step = (s.status.phase, s.status.eviction.is_some(), s.status.node_name.clone());
        if steps.last() != Some(&step) {
            steps.push(step);
        }
    }
    let new_node = seen.last().unwrap().1.status.node_name.clone();
    let expected = vec![
        (Phase::Running, true, Some("node-a".to_string())),
        (Phase::Pending, false, None),
        (Phase::Scheduled, false, new_node.clone()),
        (Phase::Running, false, new_node),
    ];
    assert_eq!(steps, expected);
    let pending = seen.iter().find(|(_, s)| s.status.phase == Phase::Pending).unwrap();
    assert_eq!(pending.1.status.reason.as_deref(), Some("Rescheduled"));

    // No host port is handed out twice on any node, and the agents hold exactly what the store binds.
    let all = c.client.list_sandboxes().await.unwrap().items;
    for node in ["node-a", "node-b", "node-c"] {
        let holding: Vec<Sandbox> = all.iter().filter(|s| s.status.holds_node_resources()).cloned().collect();
        let bound = host_ports_bound_to(&holding, node);
        let ports: Vec<u16> = bound.values().flatten().copied().collect();
        let unique: BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(ports.len(), unique.len(), "{node}: a host port twice: {bound:?}");
        assert_eq!(host_ports_on_agent(c.agent_of(node)).await, bound, "{node}");
    }
    assert!(c.agent_of("node-a").sandbox_ids().is_empty(), "nothing is left on the drained node");
    assert!(c.client.get_node("node-a").await.unwrap().unschedulable, "the node stays cordoned");
    c.stop().await;
}

#[tokio::test]
async fn a_sandbox_bound_to_a_draining_node_after_the_drain_is_evicted_too() {
    use sandboxd_api::node::DrainRequest;
    use sandboxd_api::sandbox::RestartPolicy;
    let c = Cluster::start(2, &[]).await;
    c.client.set_unschedulable("node-b", true).await.unwrap();
    let drained = c.client.drain_node("node-a", &DrainRequest::default()).await.unwrap();
    assert!(drained.evicted.is_empty() && drained.rescheduled.is_empty());
    assert!(drained.node.draining.is_some(), "the node records the drain");
    // A scheduler that had not seen the cordon yet binds a sandbox there, as it would in a race.
    let spec = SandboxSpec { restart_policy: RestartPolicy::Reschedule, ..web("100m") };
    let created = c.client.create_sandbox("late", &spec).await.unwrap().object;
    let late = wait_status(&c.client, "late", "Unschedulable", |s| s.status.reason.is_some()).await;
    let bound = sandboxd_api::SandboxStatus {
        phase: Phase::Scheduled,
        node_name: Some("node-a".into()),
        assigned_ports: vec![AssignedPort { host_port: 10_500, container_port: 80, protocol: Protocol::Tcp }],
        reason: None,
        message: None,
        ..late.status.clone()
    };
    c.client.put_sandbox_status("late", &bound, Some(&late.resource_version)).await.unwrap();
    c.client.set_unschedulable("node-b", false).await.unwrap();
    let moved = wait_status(&c.client, "late", "Running on node-b", |s| {
        s.status.phase == Phase::Running && s.status.node_name.as_deref() == Some("node-b")
    })
    .await;
    assert_eq!(moved.status.reschedules, 1);
    assert!(c.agent_of("node-a").sandbox_ids().is_empty());
    assert_eq!(created.status.reschedules, 0);
    // An uncordon ends the drain.
    let uncordoned = c.client.set_unschedulable("node-a", false).await.unwrap();
    assert_eq!((uncordoned.unschedulable, uncordoned.draining), (false, None));
    c.stop().await;
}

#[tokio::test]
async fn a_drain_refuses_bad_bounds_and_unknown_nodes() {
    use sandboxd_api::node::DrainRequest;
    let c = Cluster::start(1, &[]).await;
    let bad = DrainRequest { grace_seconds: Some(-1), deadline_seconds: None };
    let err = c.client.drain_node("node-a", &bad).await.unwrap_err().to_string();
    assert!(err.contains("grace_seconds: -1 is outside 0..3600"), "{err}");
    assert!(!c.client.get_node("node-a").await.unwrap().unschedulable, "a refused drain cordons nothing");
    let err = c.client.drain_node("nope", &DrainRequest::default()).await.unwrap_err().to_string();
    assert!(err.contains("not found"), "{err}");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_fill_allocatable_cpu_exactly() {
    // 4000m at 90 % is 3600m allocatable: room for 18 sandboxes of 200m, not 19.
    let c = Cluster::start(1, &[]).await;
    let ids: Vec<String> = (0..19).map(|i| format!("fill-{i:02}")).collect();
    create_concurrently(&c.client, &ids, |_| sandbox_spec("200m")).await;

    let expected = BTreeMap::from([(("Pending", Some("Unschedulable".to_string())), 1), (("Running", None), 18)]);
    let settled = wait_phase_counts(&c.client, &expected).await;
    let pending = settled.iter().find(|s| s.status.phase == Phase::Pending).unwrap();
    assert_eq!(pending.status.message.as_deref(), Some("0/1 nodes available: 1 insufficient cpu"));
    // Heartbeats refresh the node's resources, and each refresh may retry the waiting sandbox.
    wait_heartbeats(&c.client, "node-a", 5).await;
    assert_eq!(phase_counts(&c.client.list_sandboxes().await.unwrap().items), expected, "and it stays that way");
    assert_eq!(c.agents[0].sandbox_ids().len(), 18);

    // Freeing room retries the waiting one.
    let running = settled.iter().find(|s| s.status.phase == Phase::Running).unwrap();
    c.client.delete_sandbox(&running.id).await.unwrap();
    wait_phase(&c.client, &pending.id, Phase::Running).await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_high_priority_sandbox_preempts_the_fewest_lowest_priority_sandboxes_and_never_an_equal_one() {
    // 3600m allocatable, filled: six of 400m at priority 0 and two of 600m at priority 1.
    let c = Cluster::start(1, &[]).await;
    let with_priority = |cpu: &str, priority: i32| SandboxSpec { priority, ..sandbox_spec(cpu) };
    let low: Vec<String> = (0..6).map(|i| format!("low-{i}")).collect();
    create_concurrently(&c.client, &low, |_| with_priority("400m", 0)).await;
    for id in ["mid-0", "mid-1"] {
        c.client.create_sandbox(id, &with_priority("600m", 1)).await.unwrap();
    }
    for id in low.iter().map(String::as_str).chain(["mid-0", "mid-1"]) {
        wait_phase(&c.client, id, Phase::Running).await;
    }

    // An equal priority preempts nothing: it waits.
    c.client.create_sandbox("peer", &with_priority("400m", 0)).await.unwrap();
    let peer =
        wait_status(&c.client, "peer", "Unschedulable", |s| s.status.reason.as_deref() == Some("Unschedulable")).await;
    assert_eq!(peer.status.message.as_deref(), Some("0/1 nodes available: 1 insufficient cpu"));
    c.client.delete_sandbox("peer").await.unwrap();

    // 700m at priority 10: two of the priority-0 ones make room; the priority-1 ones stay.
    c.client.create_sandbox("vip", &with_priority("700m", 10)).await.unwrap();
    let vip = wait_phase(&c.client, "vip", Phase::Running).await;
    assert_eq!(vip.status.node_name.as_deref(), Some("node-a"));
    let all = c.client.list_sandboxes().await.unwrap().items;
    let preempted: Vec<&Sandbox> = all.iter().filter(|s| s.status.reason.as_deref() == Some("Preempted")).collect();
    assert_eq!(preempted.len(), 2, "the fewest victims: {:?}", preempted.iter().map(|s| &s.id).collect::<Vec<_>>());
    for victim in &preempted {
        assert!(victim.id.starts_with("low-") && victim.status.phase == Phase::Failed, "{victim:?}");
        let message = victim.status.message.as_deref().unwrap_or_default();
        assert_eq!(message, "preempted by sandbox vip (priority 10 over 0)");
    }
    for id in ["mid-0", "mid-1"] {
        assert_eq!(c.client.get_sandbox(id).await.unwrap().status.phase, Phase::Running, "{id} outranks the victims");
    }
    eventually(20, "the victims gone from the agent", || async {
        let held = c.agents[0].sandbox_ids();
        preempted.iter().all(|v| !held.contains(&v.id)).then_some(())
    })
    .await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_ports_are_unique_per_node_under_concurrent_creates() {
    let c = Cluster::start(5, &[]).await;
    let ids: Vec<String> = (0..200).map(|i| format!("port-{i:03}")).collect();
    create_concurrently(&c.client, &ids, |_| web("10m")).await;

    let all = eventually(30, "200 sandboxes Running", || async {
        let all = c.client.list_sandboxes().await.ok()?.items;
        (all.len() == 200 && all.iter().all(|s| s.status.phase == Phase::Running)).then_some(all)
    })
    .await;
    let mut handed_out = BTreeSet::new();
    for s in &all {
        let (node, port) = (s.status.node_name.clone().unwrap(), host_port(s));
        assert!((10000..=19999).contains(&port), "{port} outside the range");
        assert!(handed_out.insert((node.clone(), port)), "host port {port} handed out twice on {node}");
    }
    for (i, agent) in c.agents.iter().enumerate() {
        let (node, held) = (node_name(i), host_ports_on_agent(agent).await);
        assert!(!held.is_empty(), "spread used {node}");
        assert_eq!(held, host_ports_bound_to(&all, &node), "agent of {node} agrees with the store");
    }
    c.stop().await;
}

// === ttl ===

#[tokio::test]
async fn expired_sandbox_is_removed_from_store_and_agent() {
    let c = Cluster::start(1, &[]).await;
    c.client.create_sandbox("short", &with_ttl(web("100m"), 2)).await.unwrap();
    wait_phase(&c.client, "short", Phase::Running).await;
    assert!(c.agents[0].sandbox_ids().contains(&"short".to_string()));

    let mut events = SandboxEvents::open(&c.client, "short", None).await;
    let expired = (Phase::Terminating, Some("Expired".to_string()));
    assert_eq!(events.until_deleted().await, [modified(&expired), deleted(&expired)]);
    assert!(c.client.get_sandbox("short").await.unwrap_err().is_not_found());
    assert!(c.agents[0].sandbox_ids().is_empty(), "gone from the agent: {:?}", c.agents[0].sandbox_ids());
    c.stop().await;
}

#[tokio::test]
async fn raising_ttl_before_expiry_moves_expire_at_and_keeps_the_sandbox() {
    let c = Cluster::start(1, &[]).await;
    let created = c.client.create_sandbox("extended", &with_ttl(web("100m"), 3)).await.unwrap().object;
    let created_at = unix(&created.created_at);
    assert_eq!(created.status.expire_at.as_deref().map(unix), Some(created_at + 3));
    wait_phase(&c.client, "extended", Phase::Running).await;

    let updated = c.client.update_sandbox("extended", &with_ttl(web("100m"), 60), None).await.unwrap();
    assert_eq!(updated.status.expire_at.as_deref().map(unix), Some(created_at + 60));
    sleep_until_unix(created_at + 5).await;
    let s = c.client.get_sandbox("extended").await.expect("still there past the original expiry");
    assert_eq!(s.status.phase, Phase::Running);
    assert_eq!(c.agents[0].sandbox_ids(), ["extended"]);
    c.stop().await;
}

// === events ===

#[tokio::test]
async fn events_tell_a_sandbox_from_failed_scheduling_to_expiry_and_a_node_from_not_ready_to_lost() {
    let c = Cluster::start(1, &[("node_lost_grace", "1s")]).await;
    let spec = SandboxSpec {
        node_selector: [("pool".to_string(), "gpu".to_string())].into(),
        ttl_seconds: Some(4),
        ..web("100m")
    };
    c.client.create_sandbox("story", &spec).await.unwrap();
    wait_status(&c.client, "story", "Unschedulable", |s| s.status.reason.as_deref() == Some("Unschedulable")).await;
    let labelled = sandboxd_api::node::NodeSpec {
        labels: Some([("pool".to_string(), "gpu".to_string())].into()),
        ..c.client.get_node("node-a").await.unwrap().spec()
    };
    c.client.apply_node("node-a", &labelled).await.unwrap();
    wait_phase(&c.client, "story", Phase::Running).await;

    // The object goes at its TTL; its events stay, in the order they happened.
    let reasons = eventually(20, "the sandbox's events up to Expired", || async {
        let events = c.client.list_events(Some("sandbox/story")).await.ok()?.items;
        let reasons: Vec<String> = events.iter().map(|e| e.reason.clone()).collect();
        reasons.contains(&"Expired".to_string()).then_some(events)
    })
    .await;
    let order: Vec<&str> = reasons.iter().map(|e| e.reason.as_str()).collect();
    let wanted = ["FailedScheduling", "Scheduled", "Created", "Started", "Expired"];
    let positions: Vec<Option<usize>> = wanted.iter().map(|w| order.iter().position(|r| r == w)).collect();
    assert!(positions.iter().all(Option::is_some), "every step has its event: {order:?}");
    assert!(positions.windows(2).all(|p| p[0] < p[1]), "in order: {order:?}");
    let failed = &reasons[positions[0].unwrap()];
    assert_eq!(failed.event_type, sandboxd_api::event::EventType::Warning);
    assert_eq!(failed.message, "0/1 nodes available: 1 node selector mismatch");
    let scheduled = &reasons[positions[1].unwrap()];
    assert!(scheduled.message.starts_with("placed on node node-a (host ports 10000->80/tcp"), "{}", scheduled.message);
    assert_eq!(scheduled.source, "scheduler");

    c.agent_of("node-a").set_faults(health_failing());
    let node_events = eventually(20, "node-a's NodeLost event", || async {
        let events = c.client.list_events(Some("node/node-a")).await.ok()?.items;
        events.iter().any(|e| e.reason == "NodeLost").then_some(events)
    })
    .await;
    let order: Vec<&str> = node_events.iter().map(|e| e.reason.as_str()).collect();
    let not_ready = order.iter().position(|r| *r == "NodeNotReady").expect("NodeNotReady");
    assert!(not_ready < order.iter().position(|r| *r == "NodeLost").unwrap(), "{order:?}");
    assert_eq!(order.first(), Some(&"NodeReady"), "{order:?}");
    let all = c.client.list_events(None).await.unwrap().items;
    assert!(all.len() >= reasons.len() + node_events.len());
    c.stop().await;
}

// === node loss ===

#[tokio::test]
async fn sandbox_on_a_node_not_ready_past_the_grace_fails_with_node_lost() {
    let c = Cluster::start(2, &[("node_lost_grace", "1s")]).await;
    c.client.create_sandbox("lost", &web("100m")).await.unwrap();
    let node = wait_phase(&c.client, "lost", Phase::Running).await.status.node_name.unwrap();

    c.agent_of(&node).set_faults(health_failing());
    wait_node_state(&c.client, &node, NodeState::NotReady).await;
    let s = wait_phase(&c.client, "lost", Phase::Failed).await;
    assert_eq!(s.status.reason.as_deref(), Some("NodeLost"));
    assert_eq!(s.status.node_name.as_deref(), Some(node.as_str()), "keeps its node");
    assert!(!s.status.ready);
    c.stop().await;
}

#[tokio::test]
async fn a_not_ready_node_is_tainted_and_a_sandbox_that_tolerates_it_longer_outlives_the_grace() {
    use sandboxd_api::taints::{TaintEffect, Toleration, TolerationOperator, NOT_READY_TAINT};
    let c = Cluster::start(2, &[("node_lost_grace", "1s")]).await;
    c.client.set_unschedulable("node-b", true).await.unwrap();
    let patient = SandboxSpec {
        tolerations: vec![Toleration {
            key: NOT_READY_TAINT.into(),
            operator: TolerationOperator::Exists,
            value: String::new(),
            effect: Some(TaintEffect::NoExecute),
            toleration_seconds: Some(600),
        }],
        ..web("100m")
    };
    c.client.create_sandbox("patient", &patient).await.unwrap();
    c.client.create_sandbox("default", &web("100m")).await.unwrap();
    for id in ["patient", "default"] {
        assert_eq!(wait_phase(&c.client, id, Phase::Running).await.status.node_name.as_deref(), Some("node-a"));
    }

    c.agent_of("node-a").set_faults(health_failing());
    let down = wait_node_state(&c.client, "node-a", NodeState::NotReady).await;
    let taint = down.taints.iter().find(|t| t.key == NOT_READY_TAINT).expect("the system taints a NotReady node");
    assert_eq!(taint.effect, TaintEffect::NoExecute);
    assert_eq!(taint.added_at, down.status.last_transition_at, "added when the node became NotReady");

    let s = wait_phase(&c.client, "default", Phase::Failed).await;
    assert_eq!(s.status.reason.as_deref(), Some("NodeLost"), "the default toleration is node_lost_grace");
    let since = unix(down.status.last_transition_at.as_deref().unwrap());
    let past_grace = || async move { unix_now() >= since + 1 + 3 };
    assert_holds_until(&c.client, "patient", "Running", past_grace, |s| s.status.phase == Phase::Running).await;

    c.agent_of("node-a").set_faults(Faults::default());
    let up = wait_node_state(&c.client, "node-a", NodeState::Ready).await;
    assert!(up.taints.iter().all(|t| t.key != NOT_READY_TAINT), "Ready again: the taint is gone: {:?}", up.taints);
    // A user's taints never replace the system's, and a post of the system's key is ignored.
    c.agent_of("node-a").set_faults(health_failing());
    wait_node_state(&c.client, "node-a", NodeState::NotReady).await;
    let mut spec = c.client.get_node("node-a").await.unwrap().spec();
    spec.taints = Some(vec![]);
    let kept = c.client.apply_node("node-a", &spec).await.unwrap().object;
    assert_eq!(kept.taints.iter().map(|t| t.key.as_str()).collect::<Vec<_>>(), [NOT_READY_TAINT]);
    assert_eq!(c.client.get_sandbox("patient").await.unwrap().status.phase, Phase::Running);
    c.stop().await;
}

#[tokio::test]
async fn deleting_a_node_fails_its_sandboxes_at_once() {
    // The default grace of 60 s shows the failure does not wait for it.
    let c = Cluster::start(2, &[]).await;
    let ids: Vec<String> = (0..4).map(|i| format!("del-{i}")).collect();
    create_concurrently(&c.client, &ids, |_| web("100m")).await;
    let mut on_node_a = Vec::new();
    for id in &ids {
        let s = wait_phase(&c.client, id, Phase::Running).await;
        if s.status.node_name.as_deref() == Some("node-a") {
            on_node_a.push(id.clone());
        }
    }
    assert!(!on_node_a.is_empty() && on_node_a.len() < ids.len(), "spread over both nodes: {on_node_a:?}");

    c.client.delete_node("node-a").await.unwrap();
    for id in &on_node_a {
        let s = wait_status_within(&c.client, id, 5, "Failed and released", |s| {
            s.status.phase == Phase::Failed && s.status.released
        })
        .await;
        assert_eq!((s.status.reason.as_deref(), s.status.node_name.as_deref()), (Some("NodeLost"), Some("node-a")));
    }
    for id in ids.iter().filter(|id| !on_node_a.contains(id)) {
        assert_eq!(c.client.get_sandbox(id).await.unwrap().status.phase, Phase::Running, "{id} on node-b");
    }
    c.stop().await;
}

#[tokio::test]
async fn nothing_fails_while_every_node_is_not_ready() {
    let c = Cluster::start(1, &[("node_lost_grace", "1s")]).await;
    c.client.create_sandbox("cut-off", &web("100m")).await.unwrap();
    wait_phase(&c.client, "cut-off", Phase::Running).await;

    c.agents[0].set_faults(health_failing());
    let down = wait_node_state(&c.client, "node-a", NodeState::NotReady).await;
    // Until well past the 1 s grace, by the server's clock: then a lone node's sandbox would have failed.
    let since = unix(down.status.last_transition_at.as_deref().unwrap());
    let past_grace = || async move { unix_now() >= since + 1 + 3 };
    assert_holds_until(&c.client, "cut-off", "still Running", past_grace, |s| s.status.phase == Phase::Running).await;
    assert_eq!(c.client.get_node("node-a").await.unwrap().status.state, NodeState::NotReady, "for the whole time");
    c.stop().await;
}

// === agent side failures ===

#[tokio::test]
async fn sandbox_forgotten_by_a_restarted_agent_fails_as_vanished() {
    let c = Cluster::start(1, &[]).await;
    c.client.create_sandbox("forgotten", &web("100m")).await.unwrap();
    wait_phase(&c.client, "forgotten", Phase::Running).await;

    c.agents[0].restart();
    // Within a couple of sync periods (1 s each).
    let s = wait_status_within(&c.client, "forgotten", 4, "Failed", |s| s.status.phase == Phase::Failed).await;
    assert_eq!(s.status.reason.as_deref(), Some("Vanished"));
    assert_eq!(s.status.node_name.as_deref(), Some("node-a"));
    c.stop().await;
}

#[tokio::test]
async fn sandbox_the_agent_reports_failed_fails_as_agent_failed() {
    let c = Cluster::start(1, &[]).await;
    c.client.create_sandbox("oom", &web("100m")).await.unwrap();
    wait_phase(&c.client, "oom", Phase::Running).await;

    assert!(c.agents[0].fail_sandbox("oom", "oom killed"));
    let s = wait_phase(&c.client, "oom", Phase::Failed).await;
    assert_eq!(s.status.reason.as_deref(), Some("AgentFailed"));
    assert_eq!(s.status.message.as_deref(), Some("oom killed"));
    c.stop().await;
}

#[tokio::test]
async fn managed_orphans_are_collected_and_unmanaged_ones_left_alone() {
    let c = Cluster::start(1, &[]).await;
    let unmanaged = direct_sandbox("stray", 10500, None);
    let managed = direct_sandbox("orphan", 10501, Some(json!({"sandboxd.io/managed": "true"})));
    for body in [unmanaged, managed] {
        let (status, answer) = call(&c.client, Method::POST, "/api/v1/nodes/node-a/sandboxes", Some(body)).await;
        assert_eq!(status, 201, "{answer}");
    }
    assert_eq!(c.agents[0].sandbox_ids(), ["orphan", "stray"]);

    eventually(4, "managed orphan collected", || async { (c.agents[0].sandbox_ids() == ["stray"]).then_some(()) })
        .await;
    // A second managed orphan is collected by a later sweep, which must again leave the unmanaged one.
    let later = direct_sandbox("orphan-2", 10502, Some(json!({"sandboxd.io/managed": "true"})));
    assert_eq!(call(&c.client, Method::POST, "/api/v1/nodes/node-a/sandboxes", Some(later)).await.0, 201);
    eventually(4, "second orphan collected", || async { (c.agents[0].sandbox_ids() == ["stray"]).then_some(()) }).await;
    assert_eq!(c.agents[0].sandbox_ids(), ["stray"], "the unmanaged one survives later sweeps");
    c.stop().await;
}

#[tokio::test]
async fn a_sandbox_whose_agent_never_finishes_creating_fails_with_create_timeout_and_is_removed() {
    let slow = SimConfig { create_delay: Duration::from_secs(3600), ..isolated_sim_config() };
    let c = Cluster::start_with(&[slow], &[("creating_timeout", "2s")]).await;
    c.client.create_sandbox("stuck", &sandbox_spec("100m")).await.unwrap();
    let s = wait_status(&c.client, "stuck", "CreateTimeout", |s| s.status.phase == Phase::Failed).await;
    assert_eq!(s.status.reason.as_deref(), Some("CreateTimeout"), "{:?}", s.status);
    let message = s.status.message.unwrap_or_default();
    assert!(message.contains("still creating on node node-a") && message.contains("creating_timeout 2s"), "{message}");
    eventually(10, "the agent's copy is removed", || async {
        (!c.agents[0].sandbox_ids().contains(&"stuck".to_string())).then_some(())
    })
    .await;
    c.stop().await;
}

// === failed leftovers ===

#[tokio::test]
async fn vanished_sandbox_releases_its_host_port_for_reuse_on_that_node() {
    let c = Cluster::start(1, &[]).await;
    c.client.create_sandbox("first", &web("100m")).await.unwrap();
    let port = host_port(&wait_phase(&c.client, "first", Phase::Running).await);

    c.agents[0].restart();
    let s = wait_status(&c.client, "first", "Failed and released", |s| s.status.released).await;
    assert_eq!((s.status.phase, s.status.reason.as_deref()), (Phase::Failed, Some("Vanished")));

    c.client.create_sandbox("second", &pinned(web("100m"), port)).await.unwrap();
    let second = wait_phase(&c.client, "second", Phase::Running).await;
    assert_eq!((second.status.node_name.as_deref(), host_port(&second)), (Some("node-a"), port));
    assert_eq!(c.agents[0].sandbox_ids(), ["second"]);
    c.stop().await;
}

#[tokio::test]
async fn node_lost_sandbox_is_released_once_its_recovered_agent_removes_it() {
    let c = Cluster::start(2, &[("node_lost_grace", "1s")]).await;
    c.client.create_sandbox("stranded", &web("100m")).await.unwrap();
    let running = wait_phase(&c.client, "stranded", Phase::Running).await;
    let (node, port) = (running.status.node_name.clone().unwrap(), host_port(&running));

    c.agent_of(&node).set_faults(health_failing());
    let s = wait_phase(&c.client, "stranded", Phase::Failed).await;
    assert_eq!((s.status.reason.as_deref(), s.status.released), (Some("NodeLost"), false));
    assert_eq!(c.agent_of(&node).sandbox_ids(), ["stranded"], "the unreachable agent still holds it");

    c.agent_of(&node).set_faults(Faults::default());
    wait_status(&c.client, "stranded", "released", |s| s.status.released).await;
    assert!(c.agent_of(&node).sandbox_ids().is_empty(), "leftovers removed from the agent");

    // Two sandboxes pinned to the same host port need both nodes: the port is free again on the recovered one.
    for id in ["pin-1", "pin-2"] {
        c.client.create_sandbox(id, &pinned(web("100m"), port)).await.unwrap();
    }
    let mut nodes = BTreeSet::new();
    for id in ["pin-1", "pin-2"] {
        nodes.insert(wait_phase(&c.client, id, Phase::Running).await.status.node_name.unwrap());
    }
    assert_eq!(nodes, BTreeSet::from(["node-a".to_string(), "node-b".to_string()]));
    c.stop().await;
}

// === rules of release, delete and probes ===

#[tokio::test]
async fn a_port_held_by_an_unreleased_failed_sandbox_is_never_handed_out_again() {
    // Both nodes hold the same host port: the one on node-b is Running, the one on node-a is lost.
    let c = Cluster::start(2, &[("node_lost_grace", "1s")]).await;
    let port = 15_000;
    for id in ["held", "other"] {
        c.client.create_sandbox(id, &pinned(web("100m"), port)).await.unwrap();
    }
    let node = wait_phase(&c.client, "held", Phase::Running).await.status.node_name.unwrap();
    wait_phase(&c.client, "other", Phase::Running).await;
    c.agent_of(&node).set_faults(health_failing());
    assert_eq!(wait_phase(&c.client, "held", Phase::Failed).await.status.reason.as_deref(), Some("NodeLost"));

    // The node answers again but refuses every sandbox call: its leftovers cannot be removed yet.
    c.agent_of(&node).set_faults(Faults { error_rate: 1.0, ..Faults::default() });
    wait_node_state(&c.client, &node, NodeState::Ready).await;
    c.client.create_sandbox("wants-port", &pinned(web("100m"), port)).await.unwrap();
    let waiting = wait_status(&c.client, "wants-port", "judged unschedulable", |s| {
        s.status.reason.as_deref() == Some("Unschedulable")
    })
    .await;
    assert_eq!((waiting.status.phase, waiting.status.node_name), (Phase::Pending, None));
    assert!(!c.client.get_sandbox("held").await.unwrap().status.released, "the agent never confirmed the port free");
    assert_eq!(c.agent_of(&node).sandbox_ids(), ["held"]);

    // Once the agent removes the leftovers the port is released and the waiting sandbox gets it there.
    c.agent_of(&node).set_faults(Faults::default());
    let placed = wait_phase(&c.client, "wants-port", Phase::Running).await;
    assert_eq!((placed.status.node_name.as_deref(), host_port(&placed)), (Some(node.as_str()), port));
    assert!(c.client.get_sandbox("held").await.unwrap().status.released);
    c.stop().await;
}

#[tokio::test]
async fn deleting_a_failed_sandbox_removes_it_from_store_and_agent() {
    let c = Cluster::start(1, &[]).await;
    c.client.create_sandbox("broken", &web("100m")).await.unwrap();
    wait_phase(&c.client, "broken", Phase::Running).await;
    assert!(c.agents[0].fail_sandbox("broken", "exit 1"));
    let failed = wait_phase(&c.client, "broken", Phase::Failed).await;
    assert_eq!(failed.status.reason.as_deref(), Some("AgentFailed"));

    c.client.delete_sandbox("broken").await.unwrap();
    eventually(10, "broken gone from the store", || async {
        c.client.get_sandbox("broken").await.err().filter(|e| e.is_not_found()).map(|_| ())
    })
    .await;
    assert!(c.agents[0].sandbox_ids().is_empty(), "and from its agent");
    c.stop().await;
}

#[tokio::test]
async fn deleting_a_sandbox_on_an_unreachable_node_waits_for_the_node_then_removes_it() {
    let c = Cluster::start(2, &[]).await;
    c.client.create_sandbox("stuck", &web("100m")).await.unwrap();
    let node = wait_phase(&c.client, "stuck", Phase::Running).await.status.node_name.unwrap();
    let down = Faults { health_failing: true, error_rate: 1.0, ..Faults::default() };
    c.agent_of(&node).set_faults(down);
    wait_node_state(&c.client, &node, NodeState::NotReady).await;

    c.client.delete_sandbox("stuck").await.unwrap();
    let s = c.client.get_sandbox("stuck").await.unwrap();
    assert_eq!((s.status.phase, s.status.node_name.as_deref()), (Phase::Terminating, Some(node.as_str())));
    assert_eq!(c.agent_of(&node).sandbox_ids(), ["stuck"], "nothing removed it from the unreachable agent");

    c.agent_of(&node).set_faults(Faults::default());
    eventually(15, "stuck removed once its node answers", || async {
        c.client.get_sandbox("stuck").await.err().filter(|e| e.is_not_found()).map(|_| ())
    })
    .await;
    assert!(c.agent_of(&node).sandbox_ids().is_empty());
    c.stop().await;
}

#[tokio::test]
async fn a_tcp_readiness_probe_gates_running() {
    let c = Cluster::start(1, &[]).await;
    let mut spec = with_http_probe(web("100m"));
    if let Some(probe) = spec.readiness_probe.as_mut() {
        probe.protocol = sandboxd_api::ProbeProtocol::Tcp;
    }
    c.client.create_sandbox("tcp-probed", &spec).await.unwrap();
    let s = wait_phase(&c.client, "tcp-probed", Phase::Running).await;
    let readiness = s.status.readiness.clone().expect("the probe result is published");
    assert!(s.status.ready && readiness.success_streak >= 1, "{:?}", s.status);
    c.stop().await;
}

#[tokio::test]
async fn the_same_host_port_is_handed_out_once_per_protocol() {
    let c = Cluster::start(1, &[]).await;
    let tcp = web("100m");
    let mut udp = web("100m");
    udp.ports[0].protocol = Protocol::Udp;
    c.client.create_sandbox("tcp-1", &tcp).await.unwrap();
    let tcp_port = host_port(&wait_phase(&c.client, "tcp-1", Phase::Running).await);
    c.client.create_sandbox("udp-1", &pinned(udp.clone(), tcp_port)).await.unwrap();
    let udp_1 = wait_phase(&c.client, "udp-1", Phase::Running).await;
    assert_eq!(udp_1.status.assigned_ports[0].protocol, Protocol::Udp);
    assert_eq!(host_port(&udp_1), tcp_port, "udp and tcp ports are counted apart");

    c.client.create_sandbox("udp-2", &pinned(udp, tcp_port)).await.unwrap();
    let clash = wait_status(&c.client, "udp-2", "judged unschedulable", |s| {
        s.status.reason.as_deref() == Some("Unschedulable")
    })
    .await;
    assert!(clash.status.message.as_deref().unwrap_or("").contains("port"), "{:?}", clash.status.message);
    c.stop().await;
}

// === fixtures ===

/// A server and its nodes `node-a`, `node-b`, ... on sim agents of their own, all Ready.
struct Cluster {
    server: Running,
    client: Client,
    agents: Vec<AgentHandle>,
    names: Vec<String>,
}

impl Cluster {
    async fn start(nodes: usize, config: &[(&str, &str)]) -> Cluster {
        let agents: Vec<SimConfig> = (0..nodes).map(|_| isolated_sim_config()).collect();
        Cluster::start_with(&agents, config).await
    }

    async fn start_with(agents: &[SimConfig], config: &[(&str, &str)]) -> Cluster {
        let (server, client) = start_server(test_config(config)).await;
        let mut cluster = Cluster { server, client, agents: Vec::new(), names: Vec::new() };
        for (i, agent) in agents.iter().enumerate() {
            cluster.add_node(&node_name(i), agent.clone()).await;
        }
        cluster
    }

    async fn add_node(&mut self, name: &str, config: SimConfig) {
        let agent = start_isolated_agent(config).await;
        register(&self.client, name, agent.addr()).await;
        wait_node_state(&self.client, name, NodeState::Ready).await;
        self.agents.push(agent);
        self.names.push(name.to_string());
    }

    fn agent_of(&self, node: &str) -> &AgentHandle {
        let i = self.names.iter().position(|n| n == node).unwrap_or_else(|| panic!("no node {node}"));
        &self.agents[i]
    }

    async fn stop(self) {
        self.server.stop().await.unwrap();
    }
}

/// The watch events of one sandbox.
struct SandboxEvents {
    id: String,
    stream: futures::stream::BoxStream<'static, Result<WatchEvent<Value>, sandboxd_client::ClientError>>,
}

impl SandboxEvents {
    /// Watches sandbox `id` after revision `from`, or from its current version when `None`.
    async fn open(client: &Client, id: &str, from: Option<String>) -> SandboxEvents {
        let from = match from {
            Some(rv) => rv,
            None => client.get_sandbox(id).await.unwrap().resource_version,
        };
        SandboxEvents { id: id.to_string(), stream: client.watch("sandboxes", Some(&from)).await.unwrap() }
    }

    /// Events of this sandbox up to and including the first one `last` accepts.
    async fn until(&mut self, last: impl Fn(EventType, &Sandbox) -> bool) -> Vec<(EventType, Sandbox)> {
        let mut seen = Vec::new();
        loop {
            let next = tokio::time::timeout(Duration::from_secs(10), self.stream.next()).await;
            let event = next.expect("a watch event within 10 s").expect("the watch stays open").unwrap();
            let Ok(sandbox) = serde_json::from_value::<Sandbox>(event.object) else { continue };
            if sandbox.id != self.id {
                continue;
            }
            let done = last(event.event_type, &sandbox);
            seen.push((event.event_type, sandbox));
            if done {
                return seen;
            }
        }
    }

    async fn until_deleted(&mut self) -> Vec<(EventType, Phase, Option<String>)> {
        let events = self.until(|t, _| t == EventType::Deleted).await;
        events.into_iter().map(|(t, s)| (t, s.status.phase, s.status.reason)).collect()
    }
}

fn node_name(i: usize) -> String {
    format!("node-{}", (b'a' + i as u8) as char)
}

/// A sandbox with one tcp port 80.
fn web(cpu: &str) -> SandboxSpec {
    with_port(sandbox_spec(cpu), 80)
}

fn with_ttl(mut spec: SandboxSpec, ttl_seconds: i64) -> SandboxSpec {
    spec.ttl_seconds = Some(ttl_seconds);
    spec
}

fn pinned(mut spec: SandboxSpec, host_port: u16) -> SandboxSpec {
    spec.ports[0].host_port = Some(i64::from(host_port));
    spec
}

fn modified((phase, reason): &(Phase, Option<String>)) -> (EventType, Phase, Option<String>) {
    (EventType::Modified, *phase, reason.clone())
}

fn deleted((phase, reason): &(Phase, Option<String>)) -> (EventType, Phase, Option<String>) {
    (EventType::Deleted, *phase, reason.clone())
}

fn probe_503() -> Faults {
    Faults { probe_503: true, ..Faults::default() }
}

fn health_failing() -> Faults {
    Faults { health_failing: true, ..Faults::default() }
}

fn last_probe_error(s: &Sandbox) -> &str {
    s.status.readiness.as_ref().map_or("", |r| r.last_error.as_str())
}

fn host_port(s: &Sandbox) -> u16 {
    s.status.assigned_ports[0].host_port
}

/// A raw agent create body, optionally with labels.
fn direct_sandbox(id: &str, host_port: u16, labels: Option<Value>) -> Value {
    let mut body = json!({
        "id": id,
        "ports": [{"host_port": host_port, "container_port": 80, "protocol": "tcp"}],
        "containers": [{"name": "web", "image": "nginx:latest", "resource": {"cpu": "100m", "memory": "64Mi"}}]
    });
    if let Some(labels) = labels {
        body["labels"] = labels;
    }
    body
}

/// Creates every id at once, one task per create.
async fn create_concurrently(client: &Client, ids: &[String], spec: impl Fn(&str) -> SandboxSpec) {
    let tasks: Vec<_> = ids
        .iter()
        .map(|id| {
            let (client, id, spec) = (client.clone(), id.clone(), spec(id));
            tokio::spawn(async move { client.create_sandbox(&id, &spec).await.map(|w| w.status) })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap(), 201);
    }
}

/// Sandbox id → host ports, as an agent holds them.
async fn host_ports_on_agent(agent: &AgentHandle) -> BTreeMap<String, Vec<u16>> {
    let held = agent_sandboxes(agent.addr()).await;
    held.into_iter().map(|a| (a.id, a.ports.iter().map(|p| p.host_port).collect())).collect()
}

/// Sandbox id → assigned host ports, of the sandboxes the store binds to `node`.
fn host_ports_bound_to(all: &[Sandbox], node: &str) -> BTreeMap<String, Vec<u16>> {
    all.iter()
        .filter(|s| s.status.node_name.as_deref() == Some(node))
        .map(|s| (s.id.clone(), s.status.assigned_ports.iter().map(|p| p.host_port).collect()))
        .collect()
}

type PhaseCounts = BTreeMap<(&'static str, Option<String>), usize>;

/// How many sandboxes are in each (phase, reason).
fn phase_counts(all: &[Sandbox]) -> PhaseCounts {
    let mut counts = BTreeMap::new();
    for s in all {
        *counts.entry((s.status.phase.as_str(), s.status.reason.clone())).or_default() += 1;
    }
    counts
}

/// Waits until the sandboxes' (phase, reason) counts are `expected`; returns the sandboxes.
async fn wait_phase_counts(client: &Client, expected: &PhaseCounts) -> Vec<Sandbox> {
    let mut last = PhaseCounts::new();
    for _ in 0..600 {
        let all = client.list_sandboxes().await.unwrap().items;
        last = phase_counts(&all);
        if &last == expected {
            return all;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("phase counts never became {expected:?}; last {last:?}");
}

async fn wait_phase(client: &Client, id: &str, phase: Phase) -> Sandbox {
    wait_status(client, id, phase.as_str(), |s| s.status.phase == phase).await
}

async fn wait_status(client: &Client, id: &str, what: &str, check: impl Fn(&Sandbox) -> bool) -> Sandbox {
    wait_status_within(client, id, 10, what, check).await
}

async fn wait_status_within(
    client: &Client,
    id: &str,
    secs: u64,
    what: &str,
    check: impl Fn(&Sandbox) -> bool,
) -> Sandbox {
    let mut last = None;
    let found = tokio::time::timeout(Duration::from_secs(secs), async {
        loop {
            if let Ok(s) = client.get_sandbox(id).await {
                if check(&s) {
                    return s;
                }
                last = Some(s);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    })
    .await;
    found.unwrap_or_else(|_| panic!("{id}: not {what} within {secs}s; last seen {:?}", last.map(|s| s.status)))
}

/// Asserts `check` holds on every read of the sandbox until `witness` says enough has happened for a
/// change to show (probes answered, a grace run out), and once more after that.
async fn assert_holds_until<W, Fut>(
    client: &Client,
    id: &str,
    what: &str,
    mut witness: W,
    check: impl Fn(&Sandbox) -> bool,
) where
    W: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let seen = witness().await;
        let s = client.get_sandbox(id).await.unwrap();
        assert!(check(&s), "{id} should stay {what}: {:?}", s.status);
        if seen {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{id}: the witness of {what} never came");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A witness that `agent` answered `n` more requests on its published ports (probes) than now.
fn probes_answered_after(agent: &AgentHandle, n: u64) -> impl FnMut() -> std::future::Ready<bool> + '_ {
    let start = agent.port_requests_answered();
    move || std::future::ready(agent.port_requests_answered() >= start + n)
}

fn unix_now() -> i64 {
    sandboxd_api::time::unix_now()
}

fn unix(rfc3339: &str) -> i64 {
    sandboxd_api::time::parse_rfc3339(rfc3339).expect("an RFC 3339 time")
}
