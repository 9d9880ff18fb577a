//! Typed async HTTP client for the sandboxd-o API, used by sbxctl, remote controllers, tests and benchmarks.
#![forbid(unsafe_code)]

pub mod dataplane;
pub mod objects;

use futures::stream::{BoxStream, StreamExt};
use reqwest::{Method, StatusCode};
use sandboxd_api::node::{NodeCreateRequest, NodeSpec, NodeStatus, NodeStatusUpdate};
use sandboxd_api::sandbox::{SandboxCreateRequest, SandboxStatusUpdate, SandboxUpdateRequest};
use sandboxd_api::watch::{TaggedWatchEvent, WatchEvent, WatchManyRequest};
use sandboxd_api::{Lease, Node, Sandbox, SandboxSpec, SandboxStatus};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// What `sbxctl` and remote controllers read to reach a server, as `sandboxd-o serve` writes it
/// to `<data_dir>/client.json`: like a kubeconfig with one context.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientConfig {
    pub server: String,
    /// PEM of the CA that signed the server's certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

impl ClientConfig {
    pub fn load(path: &std::path::Path) -> std::result::Result<ClientConfig, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// A rustls client configuration that trusts the certificates of `ca_pem` and nothing else.
fn tls_trusting(ca_pem: &str) -> std::result::Result<rustls::ClientConfig, String> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| format!("ca_pem: {e}"))?;
        roots.add(cert).map_err(|e| format!("ca_pem: {e}"))?;
    }
    if roots.is_empty() {
        return Err("ca_pem: no certificate".into());
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

/// What went wrong talking to the server.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error status and `{"error": ...}`.
    #[error("{status}: {message}")]
    Api { status: u16, message: String },
    /// The server could not be reached.
    #[error("cannot reach {server}: {message}")]
    Connect { server: String, message: String },
    /// The request failed in flight or timed out.
    #[error("request to {server} failed: {message}")]
    Transport { server: String, message: String },
    /// A streamed exec could not start or broke (the error frame's message).
    #[error("exec session on {server}: {message}")]
    Session { server: String, message: String },
    /// The answer was not the JSON expected.
    #[error("unexpected answer from {server}: {message}")]
    Decode { server: String, message: String },
}

impl ClientError {
    /// The HTTP status of an API error.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }

    pub fn is_conflict(&self) -> bool {
        self.status() == Some(409)
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// A list answer: items plus the revision it was taken at.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct List<T> {
    pub items: Vec<T>,
    pub resource_version: String,
    #[serde(default)]
    pub next_cursor: Option<String>,
}

/// An object together with the status code of the call that wrote it.
#[derive(Debug, Clone)]
pub struct Written<T> {
    pub status: u16,
    pub object: T,
}

#[derive(Deserialize)]
struct NodeEnvelope {
    node: Node,
}

#[derive(Deserialize)]
struct SandboxEnvelope {
    sandbox: Sandbox,
}

#[derive(Deserialize)]
struct LeaseEnvelope {
    lease: Lease,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: String,
}

/// A typed client for one sandboxd-o server.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
    /// TLS trusting only the configured CA, shared with the exec WebSocket; `None` for `http://`
    /// or when no CA is configured (then reqwest's own roots).
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

impl Client {
    /// A client for `base` (e.g. `http://127.0.0.1:8082`), with a per-request timeout.
    pub fn new(base: &str, token: Option<String>) -> Result<Client> {
        Client::with_ca(base, token, None)
    }

    /// A client that trusts only the CA in `ca_pem` for `https://` servers.
    pub fn with_ca(base: &str, token: Option<String>, ca_pem: Option<&str>) -> Result<Client> {
        let invalid = |message: String| ClientError::Transport { server: base.to_string(), message };
        let tls = ca_pem.map(|pem| tls_trusting(pem).map(std::sync::Arc::new)).transpose().map_err(invalid)?;
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(5))
            .pool_max_idle_per_host(64);
        if let Some(tls) = &tls {
            builder = builder.use_preconfigured_tls((**tls).clone());
        }
        let http = builder.build().map_err(|e| invalid(e.to_string()))?;
        Ok(Client { http, base: base.trim_end_matches('/').to_string(), token, tls })
    }

    /// A client as a client config file says (`server`, `ca_pem`, `token`).
    pub fn from_config(config: &ClientConfig) -> Result<Client> {
        Client::with_ca(&config.server, config.token.clone(), config.ca_pem.as_deref())
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let mut builder = self.http.request(method, format!("{}{}", self.base, path));
        if let Some(token) = &self.token {
            builder = builder.bearer_auth(token);
        }
        builder
    }

    fn transport_error(&self, e: reqwest::Error) -> ClientError {
        let message = error_chain(&e);
        if e.is_connect() {
            ClientError::Connect { server: self.base.clone(), message }
        } else {
            ClientError::Transport { server: self.base.clone(), message }
        }
    }

    /// Sends a request and decodes a JSON answer, mapping error statuses to `ClientError::Api`.
    /// A 429 (the server shedding load) is retried after its `Retry-After`, up to three times.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(u16, T)> {
        let encoded = body.map(|b| serde_json::to_vec(b).expect("JSON values serialize"));
        self.call_encoded(method, path, encoded).await
    }

    /// `call` with a body already encoded as JSON (no intermediate `Value`).
    async fn call_encoded<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(u16, T)> {
        let mut attempt = 0;
        loop {
            let mut builder = self.request(method.clone(), path).timeout(Duration::from_secs(30));
            if let Some(body) = &body {
                builder = builder.header(reqwest::header::CONTENT_TYPE, "application/json").body(body.clone());
            }
            let response = builder.send().await.map_err(|e| self.transport_error(e))?;
            let status = response.status();
            let retry_after = retry_after(&response);
            let bytes = response.bytes().await.map_err(|e| self.transport_error(e))?;
            if status == StatusCode::TOO_MANY_REQUESTS && attempt < MAX_SHED_RETRIES {
                attempt += 1;
                tokio::time::sleep(retry_after).await;
                continue;
            }
            if !status.is_success() {
                return Err(api_error(status, &bytes));
            }
            let value = serde_json::from_slice(&bytes)
                .map_err(|e| ClientError::Decode { server: self.base.clone(), message: e.to_string() })?;
            return Ok((status.as_u16(), value));
        }
    }

    pub async fn healthz(&self) -> Result<()> {
        self.call::<serde_json::Value>(Method::GET, "/healthz", None).await.map(|_| ())
    }

    // === nodes ===

    /// Creates (201) or updates (200) a node.
    pub async fn apply_node(&self, id: &str, spec: &NodeSpec) -> Result<Written<Node>> {
        let body = to_json(&NodeCreateRequest { id: id.to_string(), spec: spec.clone() });
        let (status, env): (u16, NodeEnvelope) = self.call(Method::POST, "/api/v1/nodes", Some(&body)).await?;
        Ok(Written { status, object: env.node })
    }

    /// Cordons (`true`) or uncordons (`false`) a node: its spec is posted back with `unschedulable`.
    pub async fn set_unschedulable(&self, name: &str, unschedulable: bool) -> Result<Node> {
        let node = self.get_node(name).await?;
        let spec = NodeSpec { unschedulable: Some(unschedulable), ..node.spec() };
        Ok(self.apply_node(name, &spec).await?.object)
    }

    /// Drains a node: cordons it and evicts its sandboxes (`POST /api/v1/nodes/{name}/drain`).
    pub async fn drain_node(
        &self,
        name: &str,
        request: &sandboxd_api::node::DrainRequest,
    ) -> Result<sandboxd_api::node::DrainResponse> {
        let body = to_json(request);
        self.call(Method::POST, &format!("/api/v1/nodes/{name}/drain"), Some(&body)).await.map(|(_, d)| d)
    }

    pub async fn get_node(&self, name: &str) -> Result<Node> {
        let (_, env): (u16, NodeEnvelope) = self.call(Method::GET, &format!("/api/v1/nodes/{name}"), None).await?;
        Ok(env.node)
    }

    pub async fn list_nodes(&self) -> Result<List<Node>> {
        self.call(Method::GET, "/api/v1/nodes", None).await.map(|(_, l)| l)
    }

    pub async fn delete_node(&self, name: &str) -> Result<()> {
        self.call::<serde_json::Value>(Method::DELETE, &format!("/api/v1/nodes/{name}"), None).await.map(|_| ())
    }

    /// Writes a node's status, guarded by `resource_version` when given.
    pub async fn put_node_status(
        &self,
        name: &str,
        status: &NodeStatus,
        resource_version: Option<&str>,
    ) -> Result<Node> {
        let body =
            to_json(&NodeStatusUpdate { resource_version: resource_version.map(String::from), status: status.clone() });
        let (_, env): (u16, NodeEnvelope) =
            self.call(Method::PUT, &format!("/api/v1/nodes/{name}/status"), Some(&body)).await?;
        Ok(env.node)
    }

    // === sandboxes ===

    /// Creates a sandbox (201), or returns the identical existing one (200).
    pub async fn create_sandbox(&self, id: &str, spec: &SandboxSpec) -> Result<Written<Sandbox>> {
        let request = SandboxCreateRequest { id: id.to_string(), spec: spec.clone() };
        let body = serde_json::to_vec(&request).expect("request types serialize");
        let (status, env): (u16, SandboxEnvelope) =
            self.call_encoded(Method::POST, "/api/v1/sandboxes", Some(body)).await?;
        Ok(Written { status, object: env.sandbox })
    }

    pub async fn get_sandbox(&self, id: &str) -> Result<Sandbox> {
        let (_, env): (u16, SandboxEnvelope) = self.call(Method::GET, &format!("/api/v1/sandboxes/{id}"), None).await?;
        Ok(env.sandbox)
    }

    pub async fn list_sandboxes(&self) -> Result<List<Sandbox>> {
        self.call(Method::GET, "/api/v1/sandboxes", None).await.map(|(_, l)| l)
    }

    /// One page of sandboxes after `cursor`.
    pub async fn list_sandboxes_page(&self, cursor: &str, limit: usize) -> Result<List<Sandbox>> {
        let path = format!("/api/v1/sandboxes?limit={limit}&cursor={cursor}");
        self.call(Method::GET, &path, None).await.map(|(_, l)| l)
    }

    /// Replaces the mutable parts of a sandbox's spec.
    pub async fn update_sandbox(
        &self,
        id: &str,
        spec: &SandboxSpec,
        resource_version: Option<&str>,
    ) -> Result<Sandbox> {
        let body =
            to_json(&SandboxUpdateRequest { resource_version: resource_version.map(String::from), spec: spec.clone() });
        let (_, env): (u16, SandboxEnvelope) =
            self.call(Method::PUT, &format!("/api/v1/sandboxes/{id}"), Some(&body)).await?;
        Ok(env.sandbox)
    }

    pub async fn delete_sandbox(&self, id: &str) -> Result<()> {
        self.call::<serde_json::Value>(Method::DELETE, &format!("/api/v1/sandboxes/{id}"), None).await.map(|_| ())
    }

    /// Writes a sandbox's status, guarded by `resource_version` when given.
    pub async fn put_sandbox_status(
        &self,
        id: &str,
        status: &SandboxStatus,
        resource_version: Option<&str>,
    ) -> Result<Sandbox> {
        let body = to_json(&SandboxStatusUpdate {
            resource_version: resource_version.map(String::from),
            status: status.clone(),
        });
        let (_, env): (u16, SandboxEnvelope) =
            self.call(Method::PUT, &format!("/api/v1/sandboxes/{id}/status"), Some(&body)).await?;
        Ok(env.sandbox)
    }

    // === leases ===

    pub async fn get_lease(&self, name: &str) -> Result<Lease> {
        let (_, env): (u16, LeaseEnvelope) = self.call(Method::GET, &format!("/api/v1/leases/{name}"), None).await?;
        Ok(env.lease)
    }

    /// Every event, or those of one object (`sandbox/ID` or `node/NAME`), oldest first for one object.
    pub async fn list_events(&self, object: Option<&str>) -> Result<List<sandboxd_api::event::Event>> {
        let path = match object {
            Some(object) => format!("/api/v1/events?object={object}"),
            None => "/api/v1/events".to_string(),
        };
        self.call(Method::GET, &path, None).await.map(|(_, l)| l)
    }

    pub async fn list_leases(&self) -> Result<List<Lease>> {
        self.call(Method::GET, "/api/v1/leases", None).await.map(|(_, l)| l)
    }

    pub async fn delete_lease(&self, name: &str) -> Result<()> {
        self.call::<serde_json::Value>(Method::DELETE, &format!("/api/v1/leases/{name}"), None).await.map(|_| ())
    }

    // === watch ===

    /// Streams watch events of `kind` ("nodes", "sandboxes" or "leases") after `resource_version`
    /// (from the current state when `None`). The stream ends when the server closes it.
    pub async fn watch(
        &self,
        kind: &str,
        resource_version: Option<&str>,
    ) -> Result<BoxStream<'static, Result<WatchEvent<serde_json::Value>>>> {
        self.watch_matching(kind, None, resource_version).await
    }

    /// Like `watch`, with a filter the route takes (`object=sandbox/ID` for events).
    pub async fn watch_matching(
        &self,
        kind: &str,
        filter: Option<&str>,
        resource_version: Option<&str>,
    ) -> Result<BoxStream<'static, Result<WatchEvent<serde_json::Value>>>> {
        let mut path = format!("/api/v1/{kind}?watch=true");
        if let Some(filter) = filter {
            path.push('&');
            path.push_str(filter);
        }
        if let Some(rv) = resource_version {
            path.push_str(&format!("&resource_version={rv}"));
        }
        self.stream_lines(self.request(Method::GET, &path)).await
    }

    /// Many watches of one kind over one connection (`POST /api/v1/watch`): each line names the
    /// watch it belongs to; BOOKMARK and ERROR lines name none and speak for every watch.
    pub async fn watch_many(
        &self,
        request: &WatchManyRequest,
    ) -> Result<BoxStream<'static, Result<TaggedWatchEvent<serde_json::Value>>>> {
        self.stream_lines(self.request(Method::POST, "/api/v1/watch").json(request)).await
    }

    /// Sends `request` and streams its NDJSON answer line by line; a refusal is its API error.
    async fn stream_lines<T: DeserializeOwned + Send + 'static>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<BoxStream<'static, Result<T>>> {
        let response = request.send().await.map_err(|e| self.transport_error(e))?;
        let status = response.status();
        if !status.is_success() {
            let bytes = response.bytes().await.map_err(|e| self.transport_error(e))?;
            return Err(api_error(status, &bytes));
        }
        let server = self.base.clone();
        Ok(ndjson_lines(response.bytes_stream(), server))
    }
}

/// Splits a byte stream into newline-delimited JSON watch events.
fn ndjson_lines<T: DeserializeOwned + Send + 'static>(
    bytes: impl futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send + 'static,
    server: String,
) -> BoxStream<'static, Result<T>> {
    let state = (Box::pin(bytes), Vec::<u8>::new(), server);
    futures::stream::unfold(state, |(mut bytes, mut buffer, server)| async move {
        loop {
            if let Some(pos) = buffer.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buffer.drain(..=pos).collect();
                let event = serde_json::from_slice(&line[..line.len() - 1])
                    .map_err(|e| ClientError::Decode { server: server.clone(), message: e.to_string() });
                return Some((event, (bytes, buffer, server)));
            }
            match bytes.next().await {
                Some(Ok(chunk)) => buffer.extend_from_slice(&chunk),
                Some(Err(e)) => {
                    let err = ClientError::Transport { server: server.clone(), message: e.to_string() };
                    return Some((Err(err), (bytes, Vec::new(), server)));
                }
                None => return None,
            }
        }
    })
    .boxed()
}

/// Retries of a request the server shed (429) before the 429 is returned.
const MAX_SHED_RETRIES: u32 = 3;

/// The delay a 429 asks for (`Retry-After` in seconds), at most 5 s; 1 s when absent.
fn retry_after(response: &reqwest::Response) -> Duration {
    let seconds = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(1);
    Duration::from_secs(seconds.min(5))
}

pub(crate) fn api_error(status: StatusCode, body: &[u8]) -> ClientError {
    let message = serde_json::from_slice::<ErrorBody>(body)
        .map(|e| e.error)
        .unwrap_or_else(|_| String::from_utf8_lossy(body).chars().take(200).collect());
    ClientError::Api { status: status.as_u16(), message }
}

pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        message.push_str(": ");
        message.push_str(&inner.to_string());
        source = inner.source();
    }
    message
}

fn to_json<T: Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).expect("request types serialize")
}
