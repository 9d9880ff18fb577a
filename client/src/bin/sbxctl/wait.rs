//! `wait sandbox/NAME --for phase=Running`: follows the watch API until the phase, Failed, or the timeout.

use crate::{parse_duration, split_target};
use anyhow::{anyhow, bail};
use futures::StreamExt;
use sandboxd_api::{EventType, Phase, Sandbox};
use sandboxd_client::Client;
use std::io::IsTerminal;

fn parse_phase(condition: &str) -> anyhow::Result<Phase> {
    let wanted = condition
        .strip_prefix("phase=")
        .ok_or_else(|| anyhow!("--for {condition:?}: expected phase=PHASE, e.g. phase=Running"))?;
    serde_json::from_value(serde_json::Value::String(wanted.to_string()))
        .map_err(|_| anyhow!("--for {condition:?}: unknown phase {wanted:?}"))
}

/// What waiting has learned from one observation of the sandbox.
enum Progress {
    Met,
    Failed(String),
    Waiting,
}

fn judge(sandbox: &Sandbox, wanted: Phase) -> Progress {
    if sandbox.status.phase == wanted {
        return Progress::Met;
    }
    if sandbox.status.phase == Phase::Failed {
        let reason = sandbox.status.reason.as_deref().unwrap_or("Failed");
        let message = sandbox.status.message.as_deref().unwrap_or("");
        return Progress::Failed(format!("{reason}: {message}"));
    }
    Progress::Waiting
}

/// Exits 0 once the phase is reached; an error (exit 1) on Failed or timeout, with the reason.
pub async fn wait(client: &Client, target: &str, condition: &str, timeout: &str) -> anyhow::Result<i32> {
    let name = split_target(target, "sandbox")?;
    let wanted = parse_phase(condition)?;
    let timeout = parse_duration(timeout)?;
    let progress = std::io::stderr().is_terminal();
    let mut last = client.get_sandbox(name).await?;
    let follow = async {
        let mut shown = None;
        loop {
            if progress && shown != Some(last.status.phase) {
                eprintln!("sandbox/{name}: {}", last.status.phase.as_str());
                shown = Some(last.status.phase);
            }
            match judge(&last, wanted) {
                Progress::Met => return Ok(()),
                Progress::Failed(why) => bail!("sandbox/{name} is Failed ({why})"),
                Progress::Waiting => {}
            }
            let mut stream = client.watch("sandboxes", Some(&last.resource_version)).await?;
            while let Some(event) = stream.next().await {
                let event = event?;
                if event.event_type == EventType::Deleted && event.object["id"] == name {
                    bail!("sandbox/{name} was deleted");
                }
                if matches!(event.event_type, EventType::Added | EventType::Modified) && event.object["id"] == name {
                    last = serde_json::from_value(event.object)?;
                    break;
                }
                if event.event_type == EventType::Error {
                    // Too old a revision: read the current state and watch again.
                    last = client.get_sandbox(name).await?;
                    break;
                }
            }
        }
    };
    match tokio::time::timeout(timeout, follow).await {
        Ok(Ok(())) => {
            say!("sandbox/{name} condition met ({})", condition);
            Ok(0)
        }
        Ok(Err(e)) => Err(e),
        Err(_) => {
            let now = client.get_sandbox(name).await?;
            let why = match (&now.status.reason, &now.status.message) {
                (Some(r), Some(m)) => format!(": {r}: {m}"),
                _ => String::new(),
            };
            bail!(
                "timed out after {timeout:?} waiting for sandbox/{name} {condition} (now {}{why})",
                now.status.phase.as_str()
            )
        }
    }
}
