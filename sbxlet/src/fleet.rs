//! A fleet of simulated agents on consecutive loopback addresses, and their registration with a server.

use crate::agent::{start, AgentHandle};
use crate::config::SimConfig;
use sandboxd_api::node::{NodeCreateRequest, NodeSpec};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// Registrations in flight at once.
const REGISTER_CONCURRENCY: usize = 64;
/// Deadline of one registration call.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(5);
/// Tries per node before its registration counts as failed.
const REGISTER_ATTEMPTS: u32 = 4;
/// Pause before the first retry; doubled for each further one.
const REGISTER_BACKOFF: Duration = Duration::from_millis(200);

/// Why a fleet could not be laid out or registered.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("fleet address {0} is outside 127.0.0.0/8")]
    NotLoopback(Ipv4Addr),
    #[error("a fleet of {nodes} nodes from {base} runs past 127.255.255.255")]
    PastLoopback { base: Ipv4Addr, nodes: usize },
    #[error("server {0:?} is not an http url on a loopback address")]
    ServerNotLoopback(String),
    #[error("http client: {0}")]
    Client(#[from] reqwest::Error),
    #[error("{failed} of {total} nodes failed to register; first: {first}")]
    Registration { failed: usize, total: usize, first: String },
}

/// How many agents to run, where, and with which settings.
#[derive(Clone, Debug, PartialEq)]
pub struct FleetConfig {
    pub nodes: usize,
    /// Address of the first agent; agent `i` listens on `base_ip + i`.
    pub base_ip: Ipv4Addr,
    /// Port every agent listens on (0: each picks a free one).
    pub port: u16,
    /// Settings of every agent; its `listen` is replaced.
    pub template: SimConfig,
    /// Node names are `{name_prefix}-{i+1}`.
    pub name_prefix: String,
    /// Agent `i` asks for `tokens[i]` (each node's own credential); past the list, the template's.
    pub tokens: Vec<String>,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            nodes: 1,
            base_ip: Ipv4Addr::new(127, 1, 0, 1),
            port: 8080,
            template: SimConfig::default(),
            name_prefix: "sim".into(),
            tokens: Vec::new(),
        }
    }
}

/// Running agents of a fleet; dropping it stops them all.
#[derive(Debug)]
pub struct Fleet {
    agents: Vec<AgentHandle>,
    name_prefix: String,
}

/// The address of each of `nodes` agents from `base`, all of them inside 127.0.0.0/8.
pub fn fleet_addresses(base: Ipv4Addr, nodes: usize) -> Result<Vec<Ipv4Addr>, FleetError> {
    if base.octets()[0] != 127 {
        return Err(FleetError::NotLoopback(base));
    }
    let last_loopback = u32::from(Ipv4Addr::new(127, 255, 255, 255));
    let first = u32::from(base);
    let span = u32::try_from(nodes.saturating_sub(1)).map_err(|_| FleetError::PastLoopback { base, nodes })?;
    match first.checked_add(span) {
        Some(last) if last <= last_loopback => Ok((0..nodes as u32).map(|i| Ipv4Addr::from(first + i)).collect()),
        _ => Err(FleetError::PastLoopback { base, nodes }),
    }
}

/// Starts `config.nodes` agents on consecutive loopback addresses; stops them all if any fails to bind.
pub async fn start_fleet(config: FleetConfig) -> io::Result<Fleet> {
    let addresses =
        fleet_addresses(config.base_ip, config.nodes).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut agents = Vec::with_capacity(addresses.len());
    for (i, ip) in addresses.into_iter().enumerate() {
        let listen = SocketAddr::new(IpAddr::V4(ip), config.port);
        let token = config.tokens.get(i).cloned().or_else(|| config.template.token.clone());
        let agent = start(SimConfig { listen, token, ..config.template.clone() })
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("agent on {listen}: {e}")))?;
        agents.push(agent);
    }
    Ok(Fleet { agents, name_prefix: config.name_prefix })
}

// === impl Fleet ===

impl Fleet {
    /// The agents, in address order.
    pub fn agents(&self) -> &[AgentHandle] {
        &self.agents
    }

    /// The node name of agent `i`: `{prefix}-{i+1}`.
    pub fn node_name(&self, i: usize) -> String {
        format!("{}-{}", self.name_prefix, i + 1)
    }

    /// Registers every agent as a node with the server at `server` (a loopback http URL).
    pub async fn register(&self, server: &str) -> Result<(), FleetError> {
        let base = loopback_server(server)?;
        let client = reqwest::Client::builder().timeout(REGISTER_TIMEOUT).no_proxy().build()?;
        let url = Arc::new(format!("{base}/api/v1/nodes"));
        let permits = Arc::new(Semaphore::new(REGISTER_CONCURRENCY));
        let mut calls = JoinSet::new();
        for (i, agent) in self.agents.iter().enumerate() {
            let node = NodeCreateRequest {
                id: self.node_name(i),
                spec: NodeSpec {
                    ip: agent.addr().ip().to_string(),
                    port: i64::from(agent.addr().port()),
                    ..NodeSpec::default()
                },
            };
            let (client, url, permits) = (client.clone(), url.clone(), permits.clone());
            calls.spawn(async move {
                let _permit = permits.acquire_owned().await;
                register_node(&client, &url, &node).await
            });
        }
        let total = self.agents.len();
        let mut failures = Vec::new();
        while let Some(joined) = calls.join_next().await {
            match joined {
                Ok(Ok(())) => {}
                Ok(Err(reason)) => failures.push(reason),
                Err(e) => failures.push(format!("registration task: {e}")),
            }
        }
        match failures.first() {
            None => Ok(()),
            Some(first) => Err(FleetError::Registration { failed: failures.len(), total, first: first.clone() }),
        }
    }

    /// Stops every agent and waits until their ports are closed.
    pub async fn shutdown(self) {
        for agent in &self.agents {
            agent.begin_shutdown();
        }
        for agent in self.agents {
            agent.shutdown().await;
        }
    }
}

/// Posts one node, retrying with backoff; 200 and 201 count as registered.
async fn register_node(client: &reqwest::Client, url: &str, node: &NodeCreateRequest) -> Result<(), String> {
    let mut last = String::new();
    for attempt in 0..REGISTER_ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(REGISTER_BACKOFF * 2u32.pow(attempt - 1)).await;
        }
        match client.post(url).json(node).send().await {
            Ok(r) if matches!(r.status().as_u16(), 200 | 201) => return Ok(()),
            Ok(r) => {
                let status = r.status();
                let body = r.text().await.unwrap_or_default();
                last = format!("node {}: {status}: {}", node.id, body.trim());
                if status.is_client_error() && status.as_u16() != 429 {
                    break; // the server will not change its mind
                }
            }
            Err(e) => last = format!("node {}: {e}", node.id),
        }
    }
    Err(last)
}

/// The server URL without a trailing slash, if it is plain http on a loopback host.
fn loopback_server(server: &str) -> Result<String, FleetError> {
    let refused = || FleetError::ServerNotLoopback(server.to_string());
    let url = reqwest::Url::parse(server).map_err(|_| refused())?;
    let host = url.host_str().ok_or_else(refused)?;
    let loopback = host == "localhost"
        || host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if url.scheme() != "http" || !loopback {
        return Err(refused());
    }
    Ok(server.trim_end_matches('/').to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_consecutive_across_octets() {
        let got = fleet_addresses(Ipv4Addr::new(127, 1, 0, 254), 4).unwrap();
        let want = [[127, 1, 0, 254], [127, 1, 0, 255], [127, 1, 1, 0], [127, 1, 1, 1]].map(Ipv4Addr::from);
        assert_eq!(got, want);
    }

    #[test]
    fn addresses_outside_loopback_are_refused() {
        assert!(matches!(fleet_addresses(Ipv4Addr::new(10, 0, 0, 1), 1), Err(FleetError::NotLoopback(_))));
        assert!(matches!(fleet_addresses(Ipv4Addr::new(127, 255, 255, 250), 7), Err(FleetError::PastLoopback { .. })));
        assert_eq!(fleet_addresses(Ipv4Addr::new(127, 255, 255, 250), 6).unwrap().len(), 6);
        assert!(fleet_addresses(Ipv4Addr::new(127, 0, 0, 1), 0).unwrap().is_empty());
    }

    #[test]
    fn only_loopback_http_servers_are_registered_with() {
        for ok in ["http://127.0.0.1:8082", "http://localhost:8082/", "http://[::1]:8082", "http://127.9.9.9"] {
            assert!(loopback_server(ok).is_ok(), "{ok}");
        }
        assert_eq!(loopback_server("http://127.0.0.1:8082/").unwrap(), "http://127.0.0.1:8082");
        for bad in ["http://10.0.0.1:8082", "https://127.0.0.1", "http://example.com", "127.0.0.1:8082"] {
            assert!(loopback_server(bad).is_err(), "{bad}");
        }
    }
}
