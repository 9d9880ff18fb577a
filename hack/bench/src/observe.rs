//! Follows the sandbox watch stream and records when each sandbox was first seen Scheduled and Running.

use futures::StreamExt;
use parking_lot::Mutex;
use sandboxd_api::EventType;
use sandboxd_client::Client;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// First-seen times per sandbox, and the ports they were bound to.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    pub scheduled: Option<Instant>,
    pub running: Option<Instant>,
    pub node: Option<String>,
    pub host_ports: Vec<u16>,
}

/// A watch follower shared with the scenario.
#[derive(Clone, Default)]
pub struct Observer {
    seen: Arc<Mutex<HashMap<String, Seen>>>,
}

impl Observer {
    /// Starts following sandboxes from the current revision.
    pub async fn start(client: &Client) -> anyhow::Result<Observer> {
        let observer = Observer::default();
        let revision = client.list_sandboxes_page("", 1).await?.resource_version;
        let (client, me) = (client.clone(), observer.clone());
        tokio::spawn(async move { me.follow(client, revision).await });
        Ok(observer)
    }

    async fn follow(&self, client: Client, mut revision: String) {
        loop {
            let Ok(mut stream) = client.watch("sandboxes", Some(&revision)).await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            while let Some(Ok(event)) = stream.next().await {
                let now = Instant::now();
                if let Some(rv) = event.object["resource_version"].as_str() {
                    revision = rv.to_string();
                }
                if !matches!(event.event_type, EventType::Added | EventType::Modified) {
                    continue;
                }
                let Some(id) = event.object["id"].as_str() else { continue };
                let status = &event.object["status"];
                let phase = status["phase"].as_str().unwrap_or("");
                let mut seen = self.seen.lock();
                let entry = seen.entry(id.to_string()).or_default();
                if matches!(phase, "Scheduled" | "Creating" | "Running") && entry.scheduled.is_none() {
                    entry.scheduled = Some(now);
                    entry.node = status["node_name"].as_str().map(String::from);
                    entry.host_ports = status["assigned_ports"]
                        .as_array()
                        .map(|a| a.iter().filter_map(|p| p["host_port"].as_u64().map(|h| h as u16)).collect())
                        .unwrap_or_default();
                }
                if phase == "Running" && entry.running.is_none() {
                    entry.running = Some(now);
                }
            }
        }
    }

    pub fn snapshot(&self) -> HashMap<String, Seen> {
        self.seen.lock().clone()
    }

    /// Waits until `ids` all satisfy `done`, or the limit passes; returns how many did.
    pub async fn wait_for(&self, ids: &[String], limit: Duration, done: impl Fn(&Seen) -> bool) -> usize {
        let start = Instant::now();
        loop {
            let count = {
                let seen = self.seen.lock();
                ids.iter().filter(|id| seen.get(*id).is_some_and(&done)).count()
            };
            if count == ids.len() || start.elapsed() > limit {
                return count;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
