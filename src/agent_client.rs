//! The reqwest `AgentClient`: pooled connections, per-call timeouts, no redirects, answers checked against the wire types.

use async_trait::async_trait;
use reqwest::{Method, StatusCode};
use sandboxd_api::agent::{
    AgentCreateRequest, AgentDeleted, AgentLogs, AgentSandbox, AgentSandboxEnvelope, AgentSandboxList, AgentStatus,
    ErrorBody, Health,
};
use sandboxd_api::Node;
use sandboxd_contracts::agent::{AgentClient, AgentError, AgentResult, ProbeTarget};
use serde::de::DeserializeOwned;
use std::net::IpAddr;
use std::time::Duration;

/// Talks HTTP to sbxlet agents.
#[derive(Clone)]
pub struct HttpAgentClient {
    http: reqwest::Client,
    /// Bound of create, delete, list, get, logs and reconcile calls.
    call_timeout: Duration,
    /// Refuse any agent address outside 127.0.0.0/8 and ::1 (tests and demos on a closed network).
    loopback_only: bool,
}

impl HttpAgentClient {
    pub fn new(call_timeout: Duration) -> HttpAgentClient {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(call_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(32)
            .tcp_nodelay(true)
            .build()
            .expect("reqwest client with static settings");
        HttpAgentClient { http, call_timeout, loopback_only: false }
    }

    /// Refuses every agent address that is not loopback.
    pub fn loopback_only(mut self) -> HttpAgentClient {
        self.loopback_only = true;
        self
    }

    /// The bound of ordinary agent calls.
    pub fn call_timeout(&self) -> Duration {
        self.call_timeout
    }

    /// The pooled HTTP client for data-plane calls to the agent at `base_url` (no redirects, the
    /// connect timeout of every call; each call sets its own total bound, streams have none).
    pub fn data_plane_http(&self, base_url: &str) -> AgentResult<&reqwest::Client> {
        self.check_address(base_url)?;
        Ok(&self.http)
    }

    fn check_address(&self, base_url: &str) -> AgentResult<()> {
        if !self.loopback_only {
            return Ok(());
        }
        let host = base_url
            .trim_start_matches("http://")
            .rsplit_once(':')
            .map(|(h, _)| h.trim_matches(['[', ']']))
            .unwrap_or("");
        let loopback = host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
        if loopback {
            Ok(())
        } else {
            Err(AgentError::Unreachable(format!("{host} is not a loopback address and this client is loopback-only")))
        }
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        url: String,
        body: Option<&AgentCreateRequest>,
        timeout: Duration,
        base_url: &str,
    ) -> AgentResult<(StatusCode, T)> {
        self.check_address(base_url)?;
        let mut request = self.http.request(method, url).timeout(timeout);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(describe_send_error)?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(describe_send_error)?;
        if !status.is_success() {
            return Err(status_error(status, &bytes));
        }
        let value =
            serde_json::from_slice(&bytes).map_err(|e| AgentError::Invalid(format!("{e} in {}", snippet(&bytes))))?;
        Ok((status, value))
    }
}

/// An agent call's failure: unreachable (connect, timeout) or an invalid answer, with every cause.
pub fn describe_send_error(e: reqwest::Error) -> AgentError {
    if e.is_timeout() {
        return AgentError::Unreachable("timed out".into());
    }
    let mut message = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(inner) = source {
        message = format!("{message}: {inner}");
        source = inner.source();
    }
    if e.is_connect() || e.is_request() {
        AgentError::Unreachable(message)
    } else {
        AgentError::Invalid(message)
    }
}

fn status_error(status: StatusCode, body: &[u8]) -> AgentError {
    let message = match serde_json::from_slice::<ErrorBody>(body) {
        Ok(e) => e.error,
        Err(_) if status.is_client_error() => snippet(body),
        Err(_) => format!("{} (not JSON)", snippet(body)),
    };
    AgentError::Status { status: status.as_u16(), message }
}

fn snippet(body: &[u8]) -> String {
    let text: String = String::from_utf8_lossy(body).chars().take(120).collect();
    format!("{text:?}")
}

#[async_trait]
impl AgentClient for HttpAgentClient {
    async fn health(&self, base_url: &str, timeout: Duration) -> AgentResult<()> {
        let (_, health): (_, Health) =
            self.call(Method::GET, format!("{base_url}/healthz"), None, timeout, base_url).await?;
        if health.ok {
            Ok(())
        } else {
            Err(AgentError::Status { status: 200, message: "agent reports ok: false".into() })
        }
    }

    async fn status(&self, base_url: &str, timeout: Duration) -> AgentResult<AgentStatus> {
        let url = format!("{base_url}/api/v1/status");
        self.call(Method::GET, url, None, timeout, base_url).await.map(|(_, s)| s)
    }

    async fn create_sandbox(&self, base_url: &str, request: &AgentCreateRequest) -> AgentResult<AgentSandbox> {
        let url = format!("{base_url}/api/v1/sandboxes");
        let (_, envelope): (_, AgentSandboxEnvelope) =
            self.call(Method::POST, url, Some(request), self.call_timeout, base_url).await?;
        Ok(envelope.sandbox)
    }

    async fn get_sandbox(&self, base_url: &str, id: &str) -> AgentResult<AgentSandbox> {
        let url = format!("{base_url}/api/v1/sandboxes/{id}");
        let (_, envelope): (_, AgentSandboxEnvelope) =
            self.call(Method::GET, url, None, self.call_timeout, base_url).await?;
        Ok(envelope.sandbox)
    }

    async fn list_sandboxes(&self, base_url: &str, cursor: &str, limit: usize) -> AgentResult<AgentSandboxList> {
        let url = format!("{base_url}/api/v1/sandboxes?cursor={cursor}&limit={limit}");
        self.call(Method::GET, url, None, self.call_timeout, base_url).await.map(|(_, l)| l)
    }

    async fn delete_sandbox(&self, base_url: &str, id: &str) -> AgentResult<()> {
        let url = format!("{base_url}/api/v1/sandboxes/{id}");
        let _: (_, AgentDeleted) = self.call(Method::DELETE, url, None, self.call_timeout, base_url).await?;
        Ok(())
    }

    async fn logs(
        &self,
        base_url: &str,
        id: &str,
        container: Option<&str>,
        tail: Option<usize>,
    ) -> AgentResult<AgentLogs> {
        let mut url = match container {
            Some(c) => format!("{base_url}/api/v1/sandboxes/{id}/containers/{c}/logs"),
            None => format!("{base_url}/api/v1/sandboxes/{id}/logs"),
        };
        if let Some(tail) = tail {
            url.push_str(&format!("?tail={tail}"));
        }
        self.call(Method::GET, url, None, self.call_timeout, base_url).await.map(|(_, l)| l)
    }

    async fn reconcile(&self, base_url: &str) -> AgentResult<()> {
        let url = format!("{base_url}/api/v1/reconcile");
        let (_, ok): (_, Health) = self.call(Method::POST, url, None, self.call_timeout, base_url).await?;
        if ok.ok {
            Ok(())
        } else {
            Err(AgentError::Invalid("reconcile answered ok: false".into()))
        }
    }

    async fn probe(&self, target: &ProbeTarget) -> Result<(), String> {
        self.probe_target(target).await
    }
}

impl HttpAgentClient {
    async fn probe_target(&self, target: &ProbeTarget) -> Result<(), String> {
        let base = Node::base_url(&target.host, target.port);
        self.check_address(&base).map_err(|e| e.to_string())?;
        match &target.http_path {
            None => {
                let connect = tokio::net::TcpStream::connect((target.host.as_str(), target.port));
                match tokio::time::timeout(target.timeout, connect).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(format!("tcp connect: {e}")),
                    Err(_) => Err("tcp connect timed out".into()),
                }
            }
            Some(path) => {
                let response = self.http.get(format!("{base}{path}")).timeout(target.timeout).send().await;
                match response {
                    // Redirects are not followed, so a 3xx is the answer itself: a success.
                    Ok(r) if (200..400).contains(&r.status().as_u16()) => Ok(()),
                    Ok(r) => Err(format!("http probe answered {}", r.status().as_u16())),
                    Err(e) if e.is_timeout() => Err("http probe timed out".into()),
                    Err(e) => Err(format!("http probe: {}", describe_send_error(e))),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_only_refuses_other_addresses() {
        let client = HttpAgentClient::new(Duration::from_secs(1)).loopback_only();
        assert!(client.check_address("http://127.0.1.5:8080").is_ok());
        assert!(client.check_address("http://[::1]:8080").is_ok());
        assert!(client.check_address("http://localhost:8080").is_ok());
        assert!(client.check_address("http://192.168.0.3:8080").is_err());
        assert!(client.check_address("http://example.com:8080").is_err());
    }
}
