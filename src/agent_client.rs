//! The reqwest `AgentClient`: pooled connections, per-call timeouts, no redirects, agent addresses
//! held to the `AddressPolicy`, answers checked against the wire types.

use crate::address_policy::AddressPolicy;
use async_trait::async_trait;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::{Method, StatusCode};
use sandboxd_api::agent::{
    AgentCreateRequest, AgentDeleted, AgentLogs, AgentSandbox, AgentSandboxEnvelope, AgentSandboxList, AgentStatus,
    Health,
};
use sandboxd_api::Node;
use sandboxd_contracts::agent::{AgentAddr, AgentClient, AgentError, AgentResult, ProbeTarget};
use serde::de::DeserializeOwned;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;

/// The most characters of an agent's `{"error": ...}` message passed on.
const MAX_REASON_CHARS: usize = 200;

/// Talks HTTP to sbxlet agents.
#[derive(Clone)]
pub struct HttpAgentClient {
    http: reqwest::Client,
    /// Bound of create, delete, list, get, logs and reconcile calls.
    call_timeout: Duration,
    /// Which agent addresses may be called: literal ones are checked before each call, and `http`
    /// checks what each host name resolves to when it connects.
    policy: AddressPolicy,
    /// The secret each node's agent token is derived from (`crate::tls::agent_token`); sent as
    /// `Authorization: Bearer` on every call to an agent, never to a sandbox's probe port.
    secret: Option<Arc<str>>,
    /// The secret before the last rotation: a call refused (401) with the current token is tried
    /// once more with the previous one, so agents can be given their new tokens one by one.
    previous: Option<Arc<str>>,
}

impl HttpAgentClient {
    /// A client under the default policy (every address but the always-refused ones).
    pub fn new(call_timeout: Duration) -> HttpAgentClient {
        HttpAgentClient::with(call_timeout, AddressPolicy::default())
    }

    /// The same client, calling only addresses `policy` allows.
    pub fn with_policy(self, policy: AddressPolicy) -> HttpAgentClient {
        HttpAgentClient {
            secret: self.secret,
            previous: self.previous,
            ..HttpAgentClient::with(self.call_timeout, policy)
        }
    }

    /// The same client, calling only loopback addresses (tests and demos on a closed network).
    pub fn loopback_only(self) -> HttpAgentClient {
        self.with_policy(AddressPolicy::loopback_only())
    }

    /// The same client, presenting to each node's agent the token derived from `secret` and the
    /// node's name: an agent holding another node's token refuses it.
    /// `secrets` is the agent secret file's text: the current secret on its first line and,
    /// while agents are being moved to new tokens, the previous one on the second.
    pub fn with_agent_secret(mut self, secrets: &str) -> HttpAgentClient {
        let mut lines = secrets.lines().map(str::trim).filter(|l| !l.is_empty());
        self.secret = lines.next().map(Arc::from);
        self.previous = lines.next().map(Arc::from);
        self
    }

    /// The token for `node`'s agent, for calls built outside this client (data plane, exec).
    pub fn token_for(&self, node: &str) -> Option<String> {
        self.secret.as_deref().map(|secret| crate::tls::agent_token(secret, node))
    }

    fn with(call_timeout: Duration, policy: AddressPolicy) -> HttpAgentClient {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            // Only host names reach the resolver; `check_address` covers literal addresses.
            .dns_resolver(Arc::new(PolicyResolver { policy: policy.clone() }))
            // An HTTP_PROXY from the environment would resolve agent names itself, past the policy.
            .no_proxy()
            .connect_timeout(call_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(32)
            .tcp_nodelay(true)
            .build()
            .expect("reqwest client with static settings");
        HttpAgentClient { http, call_timeout, policy, secret: None, previous: None }
    }

    /// The address policy this client calls agents under.
    pub fn policy(&self) -> &AddressPolicy {
        &self.policy
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

    /// A TCP connection to the agent at `base_url`, at an address the policy allows (a host name is
    /// resolved and checked now): for what reqwest does not carry, such as TCP probes and WebSockets.
    pub async fn connect_tcp(&self, base_url: &str) -> AgentResult<TcpStream> {
        self.check_address(base_url)?;
        let url = reqwest::Url::parse(base_url).map_err(|e| AgentError::Unreachable(format!("{base_url:?}: {e}")))?;
        let host = url.host_str().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
        let port = url.port_or_known_default().unwrap_or(80);
        let addrs = self.policy.resolve(host, port).await.map_err(|e| AgentError::Unreachable(e.to_string()))?;
        TcpStream::connect(&addrs[..]).await.map_err(|e| AgentError::Unreachable(format!("tcp connect: {e}")))
    }

    /// Refuses a literal agent address outside the policy before anything is sent.
    fn check_address(&self, base_url: &str) -> AgentResult<()> {
        self.policy.check_url(base_url).map_err(|refusal| AgentError::Unreachable(refusal.to_string()))
    }

    /// One timed call: `operation` names it in `sandboxd_agent_request_duration_seconds`.
    async fn call<T: DeserializeOwned>(
        &self,
        operation: &'static str,
        method: Method,
        url: String,
        body: Option<&AgentCreateRequest>,
        timeout: Duration,
        agent: AgentAddr<'_>,
    ) -> AgentResult<(StatusCode, T)> {
        let family = &sandboxd_controllers::runtime::metrics::METRICS.agent_request_duration;
        sandboxd_controllers::runtime::metrics::timed(family, operation, result_label, async {
            self.call_untimed(method, url, body, timeout, agent).await
        })
        .await
    }

    async fn call_untimed<T: DeserializeOwned>(
        &self,
        method: Method,
        url: String,
        body: Option<&AgentCreateRequest>,
        timeout: Duration,
        agent: AgentAddr<'_>,
    ) -> AgentResult<(StatusCode, T)> {
        // Parsed once: the policy checks the very URL reqwest sends (a call used to parse it twice).
        let url =
            self.policy.parse_and_check_url(&url).map_err(|refusal| AgentError::Unreachable(refusal.to_string()))?;
        let send = |token: Option<String>| {
            let mut request = self.http.request(method.clone(), url.clone()).timeout(timeout);
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            if let Some(body) = body {
                request = request.json(body);
            }
            request.send()
        };
        let mut response = send(self.token_for(agent.node)).await.map_err(describe_send_error)?;
        if response.status() == StatusCode::UNAUTHORIZED {
            if let Some(previous) = &self.previous {
                response =
                    send(Some(crate::tls::agent_token(previous, agent.node))).await.map_err(describe_send_error)?;
            }
        }
        let status = response.status();
        if !status.is_success() {
            let message = match read_capped(response, MAX_ERROR_BYTES).await? {
                Some(bytes) => error_reason(&bytes),
                None => format!("a body over {MAX_ERROR_BYTES} bytes"),
            };
            return Err(AgentError::Status { status: status.as_u16(), message });
        }
        let bytes = read_capped(response, MAX_ANSWER_BYTES)
            .await?
            .ok_or_else(|| AgentError::Invalid(format!("an answer over {MAX_ANSWER_BYTES} bytes")))?;
        let value = serde_json::from_slice(&bytes).map_err(|e| AgentError::Invalid(undecodable(status, &bytes, &e)))?;
        Ok((status, value))
    }
}

/// An agent call's outcome as the `result` label: success, or the kind of failure.
fn result_label<T>(outcome: &AgentResult<T>) -> &'static str {
    match outcome {
        Ok(_) => "success",
        Err(AgentError::Unreachable(_)) => "unreachable",
        Err(AgentError::Status { .. }) => "status",
        Err(AgentError::Invalid(_)) => "invalid",
    }
}

/// Largest answer read from an agent's control API (a page of 1,000 sandboxes, a log tail): a
/// rogue agent streaming gigabytes must not fill the orchestrator's memory.
pub const MAX_ANSWER_BYTES: usize = 16 << 20;
/// Largest error body read; only a short reason of it is kept anyway.
pub const MAX_ERROR_BYTES: usize = 64 << 10;

/// The body of `response` if it is at most `cap` bytes; `None` (and the rest unread) past it.
pub async fn read_capped(mut response: reqwest::Response, cap: usize) -> AgentResult<Option<Vec<u8>>> {
    if response.content_length().is_some_and(|length| length > cap as u64) {
        return Ok(None);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(describe_send_error)? {
        if body.len() + chunk.len() > cap {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

/// Resolves agent host names when a connection is made, keeping only the addresses the policy allows.
struct PolicyResolver {
    policy: AddressPolicy,
}

impl Resolve for PolicyResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            // Port 0: reqwest puts in the URL's port.
            let addrs = policy.resolve(name.as_str(), 0).await?;
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
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

/// What an agent's error answer says, echoing none of its other bytes: the `error` of a JSON body,
/// without control characters and cut to 200 characters, or else only what kind of body it was.
pub fn error_reason(body: &[u8]) -> String {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(value) => match value.get("error").and_then(serde_json::Value::as_str) {
            Some(error) => sanitise(error),
            None => format!("a JSON body without an error message ({} bytes)", body.len()),
        },
        Err(_) if body.is_empty() => "an empty body".into(),
        Err(_) => format!("a body that is not JSON ({} bytes)", body.len()),
    }
}

/// Why a success answer did not decode, without the agent's bytes: serde's "invalid type: string
/// \"…\"" would quote them, so only a missing field (a name of our own types) is named.
fn undecodable(status: StatusCode, body: &[u8], error: &serde_json::Error) -> String {
    let (status, size) = (status.as_u16(), body.len());
    if !error.is_data() {
        return format!("agent answered {status} with a body that is not JSON ({size} bytes)");
    }
    let message = error.to_string();
    let mismatch = match message.strip_prefix("missing field ") {
        Some(rest) => format!("missing field {}", rest.split(" at line ").next().unwrap_or(rest)),
        None => format!("unexpected value at line {} column {}", error.line(), error.column()),
    };
    format!("agent answered {status} with JSON of another shape ({mismatch}; {size} bytes)")
}

/// `text` with control and bidirectional-formatting characters dropped (line breaks and tabs become
/// spaces), cut to `MAX_REASON_CHARS`.
fn sanitise(text: &str) -> String {
    let clean: String = text
        .chars()
        .filter_map(|c| match c {
            '\n' | '\r' | '\t' => Some(' '),
            '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' => None,
            c if c.is_control() => None,
            c => Some(c),
        })
        .collect();
    if clean.chars().count() <= MAX_REASON_CHARS {
        return clean;
    }
    let mut cut: String = clean.chars().take(MAX_REASON_CHARS - 1).collect();
    cut.push('…');
    cut
}

#[async_trait]
impl AgentClient for HttpAgentClient {
    async fn health(&self, agent: AgentAddr<'_>, timeout: Duration) -> AgentResult<()> {
        let (_, health): (_, Health) =
            self.call("health", Method::GET, format!("{}/healthz", agent.base_url), None, timeout, agent).await?;
        if health.ok {
            Ok(())
        } else {
            Err(AgentError::Status { status: 200, message: "agent reports ok: false".into() })
        }
    }

    async fn status(&self, agent: AgentAddr<'_>, timeout: Duration) -> AgentResult<AgentStatus> {
        let url = format!("{}/api/v1/status", agent.base_url);
        self.call("status", Method::GET, url, None, timeout, agent).await.map(|(_, s)| s)
    }

    async fn create_sandbox(&self, agent: AgentAddr<'_>, request: &AgentCreateRequest) -> AgentResult<AgentSandbox> {
        let url = format!("{}/api/v1/sandboxes", agent.base_url);
        let (_, envelope): (_, AgentSandboxEnvelope) =
            self.call("create_sandbox", Method::POST, url, Some(request), self.call_timeout, agent).await?;
        Ok(envelope.sandbox)
    }

    async fn get_sandbox(&self, agent: AgentAddr<'_>, id: &str) -> AgentResult<AgentSandbox> {
        let url = format!("{}/api/v1/sandboxes/{id}", agent.base_url);
        let (_, envelope): (_, AgentSandboxEnvelope) =
            self.call("get_sandbox", Method::GET, url, None, self.call_timeout, agent).await?;
        Ok(envelope.sandbox)
    }

    async fn list_sandboxes(&self, agent: AgentAddr<'_>, cursor: &str, limit: usize) -> AgentResult<AgentSandboxList> {
        let url = format!("{}/api/v1/sandboxes?cursor={cursor}&limit={limit}", agent.base_url);
        self.call("list_sandboxes", Method::GET, url, None, self.call_timeout, agent).await.map(|(_, l)| l)
    }

    async fn delete_sandbox(&self, agent: AgentAddr<'_>, id: &str) -> AgentResult<()> {
        let url = format!("{}/api/v1/sandboxes/{id}", agent.base_url);
        let _: (_, AgentDeleted) =
            self.call("delete_sandbox", Method::DELETE, url, None, self.call_timeout, agent).await?;
        Ok(())
    }

    async fn stop_sandbox(&self, agent: AgentAddr<'_>, id: &str, grace: Duration) -> AgentResult<()> {
        let url = format!("{}/api/v1/sandboxes/{id}?grace_seconds={}", agent.base_url, grace.as_secs());
        let timeout = self.call_timeout + grace;
        let _: (_, AgentDeleted) = self.call("stop_sandbox", Method::DELETE, url, None, timeout, agent).await?;
        Ok(())
    }

    async fn logs(
        &self,
        agent: AgentAddr<'_>,
        id: &str,
        container: Option<&str>,
        tail: Option<usize>,
    ) -> AgentResult<AgentLogs> {
        let mut url = match container {
            Some(c) => format!("{}/api/v1/sandboxes/{id}/containers/{c}/logs", agent.base_url),
            None => format!("{}/api/v1/sandboxes/{id}/logs", agent.base_url),
        };
        if let Some(tail) = tail {
            url.push_str(&format!("?tail={tail}"));
        }
        self.call("logs", Method::GET, url, None, self.call_timeout, agent).await.map(|(_, l)| l)
    }

    async fn reconcile(&self, agent: AgentAddr<'_>) -> AgentResult<()> {
        let url = format!("{}/api/v1/reconcile", agent.base_url);
        let (_, ok): (_, Health) = self.call("reconcile", Method::POST, url, None, self.call_timeout, agent).await?;
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
        self.policy.check_url(&base).map_err(|refusal| refusal.to_string())?;
        match &target.http_path {
            None => match tokio::time::timeout(target.timeout, self.connect_tcp(&base)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(AgentError::Unreachable(why))) => Err(why),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("tcp connect timed out".into()),
            },
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

    fn at(base_url: &str) -> AgentAddr<'_> {
        AgentAddr { node: "n1", base_url }
    }
    use crate::address_policy::{AddressPolicy, Cidr};
    use std::net::SocketAddr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn allowing(network: &str) -> AddressPolicy {
        AddressPolicy::allowing(vec![network.parse::<Cidr>().unwrap()])
    }

    /// A listener on 127.0.0.1 that is never accepted from: `assert_never_reached` checks its backlog.
    fn untouched_listener() -> (std::net::TcpListener, u16) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        (listener, port)
    }

    fn assert_never_reached(listener: &std::net::TcpListener) {
        match listener.accept() {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!("the refused address was connected to: {other:?}"),
        }
    }

    /// An agent on 127.0.0.1 answering every request with `status` and `body`.
    async fn agent_answering(status: &'static str, body: Vec<u8>) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut request = vec![0u8; 8192];
                let _ = stream.read(&mut request).await;
                let head = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(&body).await;
            }
        });
        addr
    }

    fn client(policy: AddressPolicy) -> HttpAgentClient {
        HttpAgentClient::new(Duration::from_secs(2)).with_policy(policy)
    }

    #[test]
    fn literal_agent_addresses_are_checked_as_reqwest_reads_them() {
        let default = client(AddressPolicy::default());
        for refused in [
            "http://169.254.169.254:80",
            "http://[::ffff:169.254.169.254]:80",
            "http://0xa9fea9fe:80",
            "http://0.0.0.0:8080",
            "http://[::]:8080",
            "http://255.255.255.255:8080",
            "http://224.0.0.1:8080",
            "http://[fe80::1]:8080",
        ] {
            let err = default.check_address(refused).expect_err(refused);
            assert!(err.to_string().ends_with("agent addresses must not be"), "{refused}: {err}");
        }
        for allowed in
            ["http://127.0.2.1:8080", "http://10.0.0.1:8080", "http://[::1]:8080", "http://worker-1.example:1"]
        {
            assert!(default.check_address(allowed).is_ok(), "{allowed}");
        }

        let loopback = HttpAgentClient::new(Duration::from_secs(1)).loopback_only();
        assert!(loopback.check_address("http://127.0.1.5:8080").is_ok());
        assert!(loopback.check_address("http://[::1]:8080").is_ok());
        assert!(loopback.check_address("http://localhost:8080").is_ok(), "names are checked when resolved");
        let err = loopback.check_address("http://192.168.0.3:8080").unwrap_err();
        assert_eq!(
            err.to_string(),
            "unreachable: 192.168.0.3 is outside agent_allowed_networks (127.0.0.0/8, ::1/128)"
        );
    }

    #[tokio::test]
    async fn unspecified_address_is_refused_before_connecting() {
        // Connecting to 0.0.0.0 reaches this host: the refusal must come first.
        let (listener, port) = untouched_listener();
        let agents = client(AddressPolicy::default());
        let err = agents.health(at(&format!("http://0.0.0.0:{port}")), Duration::from_secs(1)).await.unwrap_err();
        assert_eq!(err.to_string(), "unreachable: 0.0.0.0 is unspecified; agent addresses must not be");
        let probe = ProbeTarget { host: "0.0.0.0".into(), port, http_path: None, timeout: Duration::from_secs(1) };
        assert_eq!(agents.probe(&probe).await.unwrap_err(), "0.0.0.0 is unspecified; agent addresses must not be");
        assert_never_reached(&listener);
    }

    #[tokio::test]
    async fn host_name_resolving_outside_agent_allowed_networks_is_never_connected() {
        let (listener, port) = untouched_listener();
        let agents = client(allowing("10.0.0.0/8"));
        let base = format!("http://localhost:{port}");
        let want = "is outside agent_allowed_networks (10.0.0.0/8)";

        let err = agents.health(at(&base), Duration::from_secs(1)).await.unwrap_err();
        assert!(matches!(err, AgentError::Unreachable(_)), "{err}");
        assert!(err.to_string().contains("localhost resolves to no allowed address: "), "{err}");
        assert!(err.to_string().contains(want), "{err}");
        let err = agents.list_sandboxes(at(&base), "", 10).await.unwrap_err();
        assert!(err.to_string().contains(want), "{err}");
        let err = agents.connect_tcp(&base).await.unwrap_err();
        assert!(err.to_string().contains(want), "{err}");
        for http_path in [None, Some("/".to_string())] {
            let probe = ProbeTarget { host: "localhost".into(), port, http_path, timeout: Duration::from_secs(1) };
            let err = agents.probe(&probe).await.unwrap_err();
            assert!(err.contains(want), "{err}");
        }
        assert_never_reached(&listener);
    }

    #[tokio::test]
    async fn host_name_resolving_inside_the_policy_is_called() {
        let addr = agent_answering("200 OK", br#"{"ok": true}"#.to_vec()).await;
        let agents = HttpAgentClient::new(Duration::from_secs(2)).loopback_only();
        agents.health(at(&format!("http://localhost:{}", addr.port())), Duration::from_secs(2)).await.unwrap();
        let probe = ProbeTarget {
            host: "localhost".into(),
            port: addr.port(),
            http_path: None,
            timeout: Duration::from_secs(2),
        };
        agents.probe(&probe).await.unwrap();
    }

    #[tokio::test]
    async fn oversized_answers_are_not_read_into_memory() {
        let agents = client(AddressPolicy::default());
        let addr = agent_answering("500 Internal Server Error", vec![b'x'; MAX_ERROR_BYTES + 1]).await;
        let err = agents.health(at(&format!("http://{addr}")), Duration::from_secs(2)).await.unwrap_err();
        assert_eq!(err.to_string(), format!("agent answered 500: a body over {MAX_ERROR_BYTES} bytes"));
        let addr = agent_answering("200 OK", vec![b' '; MAX_ANSWER_BYTES + 1]).await;
        let err = agents.status(at(&format!("http://{addr}")), Duration::from_secs(5)).await.unwrap_err();
        assert_eq!(err, AgentError::Invalid(format!("an answer over {MAX_ANSWER_BYTES} bytes")));
    }

    #[tokio::test]
    async fn each_node_is_sent_its_own_token() {
        let agents = client(AddressPolicy::default()).with_agent_secret("fleet-secret\nold-secret\n");
        assert_eq!(agents.previous.as_deref(), Some("old-secret"), "the second line is the previous secret");
        assert_eq!(agents.token_for("n1"), Some(crate::tls::agent_token("fleet-secret", "n1")));
        assert_ne!(agents.token_for("n1"), agents.token_for("n2"));
        assert_eq!(client(AddressPolicy::default()).token_for("n1"), None, "no secret, no token");
    }

    #[tokio::test]
    async fn error_answers_carry_no_agent_bytes_beyond_a_sanitised_reason() {
        let agents = client(AddressPolicy::default());
        let secret = b"<html>aws_secret_access_key=wJalrXUtnFEMI</html>".to_vec();
        let addr = agent_answering("500 Internal Server Error", secret.clone()).await;
        let err = agents.health(at(&format!("http://{addr}")), Duration::from_secs(2)).await.unwrap_err();
        let want = format!("agent answered 500: a body that is not JSON ({} bytes)", secret.len());
        assert_eq!(err.to_string(), want);

        let addr = agent_answering("404 Not Found", secret.clone()).await;
        let err = agents.get_sandbox(at(&format!("http://{addr}")), "s1").await.unwrap_err();
        assert_eq!(err.to_string(), format!("agent answered 404: a body that is not JSON ({} bytes)", secret.len()));

        // A success answer of the wrong shape: serde would quote the value, the reason must not.
        let addr = agent_answering("200 OK", br#""aws_secret_access_key=wJalrXUtnFEMI""#.to_vec()).await;
        let err = agents.health(at(&format!("http://{addr}")), Duration::from_secs(2)).await.unwrap_err();
        assert!(matches!(err, AgentError::Invalid(_)), "{err}");
        assert!(!err.to_string().contains("wJalr"), "{err}");
        assert!(err.to_string().contains("agent answered 200 with JSON of another shape (unexpected value"), "{err}");

        let addr = agent_answering("200 OK", b"{}".to_vec()).await;
        let err = agents.health(at(&format!("http://{addr}")), Duration::from_secs(2)).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid answer: agent answered 200 with JSON of another shape (missing field `ok`; 2 bytes)"
        );

        let addr = agent_answering("200 OK", secret.clone()).await;
        let err = agents.status(at(&format!("http://{addr}")), Duration::from_secs(2)).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("invalid answer: agent answered 200 with a body that is not JSON ({} bytes)", secret.len())
        );
    }

    #[test]
    fn json_error_messages_are_kept_clean_and_short() {
        assert_eq!(error_reason(br#"{"error": "sandbox \"s1\" not found"}"#), "sandbox \"s1\" not found");
        assert_eq!(
            error_reason(br#"{"error": "line one\nline two\u001b[31m red\u202e"}"#),
            "line one line two[31m red"
        );
        let long = format!(r#"{{"error": "{}"}}"#, "x".repeat(1000));
        let reason = error_reason(long.as_bytes());
        assert_eq!(reason.chars().count(), MAX_REASON_CHARS);
        assert!(reason.ends_with('…'));
        assert_eq!(error_reason(br#"{"message": "secret"}"#), "a JSON body without an error message (21 bytes)");
        assert_eq!(error_reason(b""), "an empty body");
        assert_eq!(error_reason(b"\x1b]0;owned\x07"), "a body that is not JSON (10 bytes)");
    }
}
