//! `get` and `describe`: tables, wide tables, JSON and YAML, and the watch stream as rows.

use crate::{Output, Resource};
use futures::StreamExt;
use sandboxd_api::time::parse_rfc3339;
use sandboxd_api::watch::WatchEvent;
use sandboxd_api::{EventType, Lease, Node, Sandbox};
use sandboxd_client::Client;
use sandboxd_contracts::clock::unix_now;
use serde::Serialize;

/// The singular noun of a resource, as in `sandbox/NAME`.
pub fn noun(resource: Resource) -> &'static str {
    match resource {
        Resource::Nodes => "node",
        Resource::Sandboxes => "sandbox",
        Resource::Leases => "lease",
    }
}

/// The plural of a resource, as in `/api/v1/leases`.
fn plural(resource: Resource) -> &'static str {
    match resource {
        Resource::Nodes => "nodes",
        Resource::Sandboxes => "sandboxes",
        Resource::Leases => "leases",
    }
}

/// `45s`, `12m`, `3h`, `2d` since an RFC 3339 time.
pub fn age(since: &str) -> String {
    let Some(t) = parse_rfc3339(since) else { return "-".into() };
    let secs = (unix_now() - t).max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

fn ports(sandbox: &Sandbox) -> String {
    if !sandbox.status.assigned_ports.is_empty() {
        let parts: Vec<String> = sandbox
            .status
            .assigned_ports
            .iter()
            .map(|p| format!("{}->{}/{}", p.host_port, p.container_port, p.protocol.as_str()))
            .collect();
        return parts.join(",");
    }
    let parts: Vec<String> =
        sandbox.spec.ports.iter().map(|p| format!("{}/{}", p.container_port, p.protocol.as_str())).collect();
    if parts.is_empty() {
        "<none>".into()
    } else {
        parts.join(",")
    }
}

fn dash(s: Option<&str>) -> String {
    s.filter(|s| !s.is_empty()).unwrap_or("-").to_string()
}

fn sandbox_row(s: &Sandbox, wide: bool) -> Vec<String> {
    // As `get nodes` shows a cordon: an eviction under way beside the phase.
    let phase = match s.status.eviction {
        Some(_) => format!("{},Evicting", s.status.phase.as_str()),
        None => s.status.phase.as_str().to_string(),
    };
    let mut row = vec![
        s.id.clone(),
        phase,
        dash(s.status.node_name.as_deref()),
        s.status.ready.to_string(),
        ports(s),
        age(&s.created_at),
    ];
    if wide {
        row.push(dash(s.status.external.as_deref()));
        row.push(dash(s.status.private_ip.as_deref()));
        let reason = match (&s.status.reason, &s.status.message) {
            (Some(r), Some(m)) => format!("{r}: {m}"),
            (Some(r), None) => r.clone(),
            _ => "-".into(),
        };
        row.push(reason);
    }
    row
}

fn node_row(n: &Node, wide: bool) -> Vec<String> {
    let r = &n.status.resources;
    let mut row = vec![
        n.name.clone(),
        // kubectl's way of showing a cordon: in the status column.
        if n.unschedulable {
            format!("{:?},SchedulingDisabled", n.status.state)
        } else {
            format!("{:?}", n.status.state)
        },
        format!("{:?}", n.source).to_lowercase(),
        format!("{}:{}", n.ip, n.port),
        format!("{}m/{}m", r.available_cpu_milli, r.allocatable_cpu_milli),
        format!("{}Mi/{}Mi", r.available_memory_bytes >> 20, r.allocatable_memory_bytes >> 20),
        age(&n.created_at),
    ];
    if wide {
        row.push(dash(Some(n.effective_external())));
        row.push(n.status.last_heartbeat.as_deref().map(age).unwrap_or_else(|| "-".into()));
        row.push(dash(Some(&n.status.last_error)));
    }
    row
}

/// A lease's holder, or `<released>` when nobody holds it.
fn holder(l: &Lease) -> String {
    if l.holder.is_empty() {
        "<released>".into()
    } else {
        l.holder.clone()
    }
}

fn lease_row(l: &Lease, wide: bool) -> Vec<String> {
    let since = |t: &Option<String>| t.as_deref().map(age).unwrap_or_else(|| "-".into());
    let mut row =
        vec![l.name.clone(), holder(l), l.transitions.to_string(), since(&l.acquired_at), since(&l.renewed_at)];
    if wide {
        row.push(format!("{}s", l.lease_duration_seconds));
    }
    row
}

fn headers(resource: Resource, wide: bool) -> Vec<&'static str> {
    let (base, extra): (&[&str], &[&str]) = match resource {
        Resource::Sandboxes => {
            (&["NAME", "PHASE", "NODE", "READY", "PORTS", "AGE"], &["EXTERNAL", "PRIVATE-IP", "REASON"])
        }
        Resource::Nodes => (
            &["NAME", "STATE", "SOURCE", "ADDRESS", "CPU(AVAIL)", "MEMORY(AVAIL)", "AGE"],
            &["EXTERNAL", "HEARTBEAT", "LAST-ERROR"],
        ),
        Resource::Leases => (&["NAME", "HOLDER", "TRANSITIONS", "ACQUIRED", "RENEWED"], &["DURATION"]),
    };
    let mut h = base.to_vec();
    if wide {
        h.extend_from_slice(extra);
    }
    h
}

/// Prints a header and rows in aligned columns; returns the column widths for rows printed later.
pub(crate) fn print_table(header: &[&str], rows: &[Vec<String>]) -> Vec<usize> {
    print_table_indented(header, rows, "")
}

/// `print_table` with every line after `indent` (the Events block of `describe`).
pub(crate) fn print_table_indented(header: &[&str], rows: &[Vec<String>], indent: &str) -> Vec<usize> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let header: Vec<String> = header.iter().map(|s| s.to_string()).collect();
    say!("{indent}{}", aligned(&header, &widths));
    for row in rows {
        say!("{indent}{}", aligned(row, &widths));
    }
    widths
}

fn aligned(cells: &[String], widths: &[usize]) -> String {
    let padded: Vec<String> =
        cells.iter().enumerate().map(|(i, c)| format!("{c:<w$}", w = widths.get(i).copied().unwrap_or(0))).collect();
    padded.join("   ").trim_end().to_string()
}

fn print_structured<T: Serialize>(value: &T, output: Output) -> anyhow::Result<()> {
    match output {
        Output::Yaml => say!("{}", serde_norway::to_string(value)?.trim_end()),
        _ => say!("{}", serde_json::to_string_pretty(value)?),
    }
    Ok(())
}

/// `get`: one object or a list, as a table, JSON or YAML; with `watch`, rows keep coming.
pub async fn get(
    client: &Client,
    resource: Resource,
    name: Option<&str>,
    output: Option<Output>,
    watch: bool,
) -> anyhow::Result<()> {
    let wide = output == Some(Output::Wide);
    let structured = matches!(output, Some(Output::Json | Output::Yaml));
    let (rows, values, revision) = match (resource, name) {
        (Resource::Sandboxes, Some(n)) => {
            let s = client.get_sandbox(n).await?;
            (vec![sandbox_row(&s, wide)], serde_json::to_value(&s)?, s.resource_version.clone())
        }
        (Resource::Nodes, Some(n)) => {
            let node = client.get_node(n).await?;
            (vec![node_row(&node, wide)], serde_json::to_value(&node)?, node.resource_version.clone())
        }
        (Resource::Sandboxes, None) => {
            let list = client.list_sandboxes().await?;
            let rows = list.items.iter().map(|s| sandbox_row(s, wide)).collect();
            (rows, serde_json::json!({ "items": list.items }), list.resource_version)
        }
        (Resource::Nodes, None) => {
            let list = client.list_nodes().await?;
            let rows = list.items.iter().map(|n| node_row(n, wide)).collect();
            (rows, serde_json::json!({ "items": list.items }), list.resource_version)
        }
        (Resource::Leases, Some(n)) => {
            let lease = client.get_lease(n).await?;
            (vec![lease_row(&lease, wide)], serde_json::to_value(&lease)?, lease.resource_version.clone())
        }
        (Resource::Leases, None) => {
            let list = client.list_leases().await?;
            let rows = list.items.iter().map(|l| lease_row(l, wide)).collect();
            (rows, serde_json::json!({ "items": list.items }), list.resource_version)
        }
    };
    if structured {
        print_structured(&values, output.expect("structured output"))?;
        if watch {
            stream_rows(client, resource, name, wide, &revision, &[], &[]).await?;
        }
    } else if rows.is_empty() && !watch {
        eprintln!("No {} found.", plural(resource));
    } else {
        let widths = print_table(&headers(resource, wide), &rows);
        if watch {
            stream_rows(client, resource, name, wide, &revision, &widths, &rows).await?;
        }
    }
    Ok(())
}

/// The columns that tick with the clock (AGE; a lease's ACQUIRED and RENEWED), left out when comparing rows.
fn clock_columns(resource: Resource) -> &'static [usize] {
    match resource {
        Resource::Nodes => &[6],
        Resource::Sandboxes => &[5],
        Resource::Leases => &[3, 4],
    }
}

async fn stream_rows(
    client: &Client,
    resource: Resource,
    name: Option<&str>,
    wide: bool,
    from: &str,
    widths: &[usize],
    initial: &[Vec<String>],
) -> anyhow::Result<()> {
    let mut revision = from.to_string();
    // Rows already shown, without their clock columns: a change nobody can see in the table prints nothing.
    let clock = clock_columns(resource);
    let without_clock = |row: &[String]| -> Vec<String> {
        row.iter().enumerate().filter(|(i, _)| !clock.contains(i)).map(|(_, cell)| cell.clone()).collect()
    };
    let mut shown: std::collections::HashMap<String, Vec<String>> =
        initial.iter().map(|row| (row[0].clone(), without_clock(row))).collect();
    loop {
        let mut stream = client.watch(plural(resource), Some(&revision)).await?;
        while let Some(event) = stream.next().await {
            let event: WatchEvent<serde_json::Value> = event?;
            match event.event_type {
                EventType::Bookmark => {
                    if let Some(rv) = event.object["resource_version"].as_str() {
                        revision = rv.to_string();
                    }
                    continue;
                }
                EventType::Error => anyhow::bail!("watch ended: {}", event.object["error"]),
                _ => {}
            }
            if let Some(rv) = event.object["resource_version"].as_str() {
                revision = rv.to_string();
            }
            let key = if resource == Resource::Sandboxes { "id" } else { "name" };
            let object_name = event.object.get(key).and_then(|v| v.as_str());
            if name.is_some() && object_name != name {
                continue;
            }
            let mut row = match resource {
                Resource::Sandboxes => sandbox_row(&serde_json::from_value(event.object)?, wide),
                Resource::Nodes => node_row(&serde_json::from_value(event.object)?, wide),
                Resource::Leases => lease_row(&serde_json::from_value(event.object)?, wide),
            };
            if event.event_type == EventType::Deleted {
                row[1] = "<deleted>".into();
            }
            let visible = without_clock(&row);
            if shown.get(&row[0]) == Some(&visible) {
                continue;
            }
            shown.insert(row[0].clone(), visible);
            say!("{}", aligned(&row, widths));
        }
    }
}

/// `describe`: everything about one object, in a readable block.
pub async fn describe(client: &Client, resource: Resource, name: &str) -> anyhow::Result<()> {
    match resource {
        Resource::Sandboxes => {
            describe_sandbox(&client.get_sandbox(name).await?);
            crate::events::describe_block(client, &format!("sandbox/{name}")).await?;
        }
        Resource::Nodes => {
            let node = client.get_node(name).await?;
            let bound: Vec<String> = client
                .list_sandboxes()
                .await?
                .items
                .into_iter()
                .filter(|s| s.status.node_name.as_deref() == Some(name))
                .map(|s| format!("{} ({})", s.id, s.status.phase.as_str()))
                .collect();
            describe_node(&node, &bound);
            crate::events::describe_block(client, &format!("node/{name}")).await?;
        }
        Resource::Leases => describe_lease(&client.get_lease(name).await?),
    }
    Ok(())
}

fn field(label: &str, value: impl std::fmt::Display) {
    say!("{:<16}{value}", format!("{label}:"));
}

fn describe_sandbox(s: &Sandbox) {
    let st = &s.status;
    field("Name", &s.id);
    let since = st.last_transition_at.as_deref().map(|t| format!(" (since {t}, {} ago)", age(t))).unwrap_or_default();
    field("Phase", format!("{}{since}", st.phase.as_str()));
    field("Reason", dash(st.reason.as_deref()));
    field("Message", dash(st.message.as_deref()));
    field("Node", dash(st.node_name.as_deref()));
    if let Some(e) = &st.eviction {
        field("Evicting", format!("{} (grace {}s, deadline {})", e.message, e.grace_seconds, e.deadline_at));
    }
    if st.reschedules > 0 {
        field("Reschedules", st.reschedules);
    }
    field("External", dash(st.external.as_deref()));
    field("Private IP", dash(st.private_ip.as_deref()));
    field("Ports", ports(s));
    field("Ready", st.ready);
    if let Some(r) = &st.readiness {
        field(
            "Readiness",
            format!(
                "success_streak={} failure_streak={} last_probe_at={} last_error={}",
                r.success_streak,
                r.failure_streak,
                dash(r.last_probe_at.as_deref()),
                dash(Some(&r.last_error))
            ),
        );
    }
    field("Agent phase", dash(st.agent_phase.as_deref()));
    let expires = st.expire_at.as_deref().map(|e| e.to_string()).unwrap_or_else(|| "never".into());
    field("Expires", expires);
    field("Created", format!("{} ({} ago)", s.created_at, age(&s.created_at)));
    field("Egress", s.spec.egress);
    field("Runtime class", s.spec.runtime_class);
    field("Priority", s.spec.priority);
    field("Restart policy", format!("{:?}", s.spec.restart_policy));
    if !s.spec.tolerations.is_empty() {
        let tolerations: Vec<String> = s.spec.tolerations.iter().map(describe_toleration).collect();
        field("Tolerations", tolerations.join(", "));
    }
    say!("Containers:");
    for c in &s.spec.containers {
        let r = c.resource.clone().unwrap_or_default();
        say!(
            "  {:<12}{:<24}cpu={} memory={}",
            c.name,
            c.image,
            r.cpu.as_deref().unwrap_or("default"),
            r.memory.as_deref().unwrap_or("default")
        );
    }
    if let Some(p) = &s.spec.readiness_probe {
        field(
            "Probe",
            format!(
                "{:?} :{}{} delay={}s period={}s timeout={}s success={} failure={}",
                p.protocol,
                p.port,
                p.path.as_deref().unwrap_or(""),
                p.initial_delay_seconds,
                p.period_seconds,
                p.timeout_seconds,
                p.success_threshold,
                p.failure_threshold
            )
            .to_lowercase(),
        );
    }
    field("Labels", joined_labels(&s.spec.labels));
    if !s.spec.node_selector.is_empty() {
        field("Node selector", joined_labels(&s.spec.node_selector));
    }
    if let Some(affinity) = &s.spec.affinity {
        let shown =
            |e: &sandboxd_api::affinity::Expression| format!("{} {:?} [{}]", e.key, e.operator, e.values.join(","));
        for e in &affinity.required {
            field("Requires", shown(e));
        }
        for p in &affinity.preferred {
            field("Prefers", format!("{} (weight {})", shown(&p.expression), p.weight));
        }
    }
}

/// `k=v,k2=v2`, or `-` when there are none.
fn joined_labels(labels: &std::collections::BTreeMap<String, String>) -> String {
    let pairs: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    if pairs.is_empty() {
        "-".into()
    } else {
        pairs.join(",")
    }
}

/// `key=value:Effect for 60s`, `key:*` (any value), `*` (everything), as kubectl shows them.
fn describe_toleration(t: &sandboxd_api::taints::Toleration) -> String {
    use sandboxd_api::taints::TolerationOperator;
    let mut text = match (t.operator, t.key.is_empty()) {
        (TolerationOperator::Exists, true) => "*".to_string(),
        (TolerationOperator::Exists, false) => format!("{}:*", t.key),
        (TolerationOperator::Equal, _) => format!("{}={}", t.key, t.value),
    };
    if let Some(effect) = t.effect {
        text.push_str(&format!(":{}", effect.as_str()));
    }
    if let Some(seconds) = t.toleration_seconds {
        text.push_str(&format!(" for {seconds}s"));
    }
    text
}

fn describe_node(n: &Node, bound: &[String]) {
    let st = &n.status;
    let r = &st.resources;
    field("Name", &n.name);
    let since = st.last_transition_at.as_deref().map(|t| format!(" (since {t})")).unwrap_or_default();
    field("State", format!("{:?}{since}", st.state));
    field("Source", format!("{:?}", n.source).to_lowercase());
    field("Labels", joined_labels(&n.effective_labels()));
    if n.unschedulable {
        field("Scheduling", "disabled (cordoned)");
    }
    field("Classes", st.node_info.runtime_classes().names().join(", "));
    let taints: Vec<String> = n.taints.iter().map(|t| t.to_string()).collect();
    field("Taints", if taints.is_empty() { "-".into() } else { taints.join(", ") });
    field("Agent", &n.sbxlet_base_url);
    field("External", dash(Some(n.effective_external())));
    field("Last heartbeat", dash(st.last_heartbeat.as_deref()));
    field("Streaks", format!("success={} failure={}", st.success_streak, st.failure_streak));
    field("Last error", dash(Some(&st.last_error)));
    say!("Resources:        cpu (milli)      memory (bytes)");
    for (label, cpu, mem) in [
        ("capacity", r.capacity_cpu_milli, r.capacity_memory_bytes),
        ("allocatable", r.allocatable_cpu_milli, r.allocatable_memory_bytes),
        ("used", r.used_cpu_milli, r.used_memory_bytes),
        ("available", r.available_cpu_milli, r.available_memory_bytes),
    ] {
        say!("  {label:<15} {cpu:<16} {mem}");
    }
    field("Max alloc", format!("{}%", r.max_alloc_percent));
    field("Sandboxes", if bound.is_empty() { "-".into() } else { bound.join(", ") });
}

fn describe_lease(l: &Lease) {
    let at = |t: &Option<String>| t.as_deref().map(|t| format!("{t} ({} ago)", age(t))).unwrap_or_else(|| "-".into());
    field("Name", &l.name);
    field("Holder", holder(l));
    field("Duration", format!("{}s", l.lease_duration_seconds));
    field("Acquired", at(&l.acquired_at));
    field("Renewed", at(&l.renewed_at));
    field("Transitions", l.transitions);
    field("Revision", &l.resource_version);
}
