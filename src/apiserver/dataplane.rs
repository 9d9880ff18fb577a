//! Data-plane routes addressed by sandbox id: exec (buffered and streamed), files, archives and
//! followed logs. Each resolves the sandbox's node and relays to its agent without buffering.
//!
//! Errors: 404 unknown sandbox, 409 not Running (or, for logs, not yet placed), 502 when the agent
//! fails or cannot be reached; the agent's own 4xx (no such path, 413, …) pass through.

use super::error::{ApiError, ApiResult};
use super::extract::ApiJson;
use super::ApiState;
use crate::agent_client::HttpAgentClient;
use crate::store::Kind;
use axum::body::Body;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method};
use axum::response::Response;
use futures::{SinkExt, StreamExt};
use sandboxd_api::dataplane::{ExecFrame, ExecRequest, DEFAULT_EXEC_TIMEOUT_SECONDS};
use sandboxd_api::{Node, Phase, Sandbox};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_tungstenite::tungstenite;

/// Largest frame relayed in either direction of a streamed exec.
const MAX_FRAME: usize = 1 << 20;

/// Where a sandbox runs: its node's agent URL and the client to reach it.
struct Placement {
    node: String,
    base_url: String,
    agents: HttpAgentClient,
}

/// What a route needs of the sandbox's phase.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Need {
    /// Exec and files: the sandbox is Running.
    Running,
    /// Logs: the sandbox was placed on a node (any phase after Scheduled).
    Placed,
}

async fn placement(state: &ApiState, id: &str, need: Need) -> ApiResult<Placement> {
    if let Some(problem) = sandboxd_api::names::name_problem(id) {
        return Err(ApiError::BadRequest(format!("id: {problem}")));
    }
    let sandbox: Sandbox = state
        .store
        .get(Kind::Sandboxes, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("sandbox {id:?} not found")))?
        .decode()?;
    let phase = sandbox.status.phase;
    if need == Need::Running && phase != Phase::Running {
        return Err(ApiError::Conflict(format!("sandbox {id:?} is {}, not Running", phase.as_str())));
    }
    let node = sandbox
        .status
        .node_name
        .ok_or_else(|| ApiError::Conflict(format!("sandbox {id:?} is {} and not on a node yet", phase.as_str())))?;
    let agents = state
        .data_plane
        .clone()
        .ok_or_else(|| ApiError::Unavailable("this server is not configured to call node agents".into()))?;
    let node_object: Node = state
        .store
        .get(Kind::Nodes, &node)
        .await?
        .ok_or_else(|| ApiError::BadGateway(format!("node {node} of sandbox {id:?} is gone")))?
        .decode()?;
    Ok(Placement { node, base_url: node_object.sbxlet_base_url, agents })
}

impl Placement {
    fn url(&self, id: &str, tail: &str, query: Option<&str>) -> String {
        let mut url = format!("{}/api/v1/sandboxes/{id}{tail}", self.base_url);
        if let Some(query) = query.filter(|q| !q.is_empty()) {
            url.push('?');
            url.push_str(query);
        }
        url
    }

    /// Sends one call to the agent and relays its answer: status, type, length and a streamed body.
    async fn relay(
        &self,
        method: Method,
        url: String,
        body: Option<reqwest::Body>,
        headers: &[(header::HeaderName, HeaderValue)],
        timeout: Option<Duration>,
    ) -> ApiResult<Response> {
        let client = self.agents.data_plane_http(&self.base_url).map_err(|e| self.bad_gateway(e))?;
        let mut request = client.request(method, url);
        if let Some(token) = self.agents.token_for(&self.node) {
            request = request.bearer_auth(token);
        }
        for (name, value) in headers {
            request = request.header(name, value);
        }
        if let Some(body) = body {
            request = request.body(body);
        }
        if let Some(timeout) = timeout {
            request = request.timeout(timeout);
        }
        let answer = request.send().await.map_err(|e| self.bad_gateway(crate::agent_client::describe_send_error(e)))?;
        let status = answer.status();
        // 501: the node's runtime does not offer the operation (the simulator has no files); that
        // is the node's answer, not a failure of it.
        if status.is_server_error() && status != reqwest::StatusCode::NOT_IMPLEMENTED {
            let capped = crate::agent_client::read_capped(answer, crate::agent_client::MAX_ERROR_BYTES).await;
            let message = match capped {
                Ok(Some(bytes)) => crate::agent_client::error_reason(&bytes),
                Ok(None) => format!("a body over {} bytes", crate::agent_client::MAX_ERROR_BYTES),
                Err(e) => e.to_string(),
            };
            return Err(ApiError::BadGateway(format!(
                "node {}: agent answered {}: {message}",
                self.node,
                status.as_u16()
            )));
        }
        let mut response = Response::builder().status(status.as_u16());
        for name in [header::CONTENT_TYPE, header::CONTENT_LENGTH] {
            if let Some(value) = answer.headers().get(&name) {
                response = response.header(name, value.as_bytes());
            }
        }
        response
            .body(Body::from_stream(answer.bytes_stream()))
            .map_err(|e| ApiError::Internal(format!("relaying the agent's answer: {e}")))
    }

    fn bad_gateway(&self, error: sandboxd_contracts::agent::AgentError) -> ApiError {
        ApiError::BadGateway(format!("node {}: {error}", self.node))
    }
}

#[utoipa::path(post, path = "/api/v1/sandboxes/{id}/exec", params(("id" = String, Path)),
    request_body = sandboxd_api::dataplane::ExecRequest,
    responses((status = 200, description = "The command ran to completion (or was killed at its timeout)", body = sandboxd_api::dataplane::ExecResult),
              (status = 400, description = "Invalid request"), (status = 404, description = "Unknown sandbox or container"),
              (status = 409, description = "The sandbox is not Running"), (status = 502, description = "The agent failed")))]
pub async fn exec(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    ApiJson(request): ApiJson<ExecRequest>,
) -> ApiResult<Response> {
    if let Some(problem) = request.problem() {
        return Err(ApiError::BadRequest(problem));
    }
    let placement = placement(&state, &id, Need::Running).await?;
    let command_timeout = request.timeout_seconds.unwrap_or(DEFAULT_EXEC_TIMEOUT_SECONDS);
    // The agent kills at the command's timeout; the call may take that long plus the usual bound.
    let timeout = Duration::from_secs(command_timeout) + placement.agents.call_timeout();
    let body = serde_json::to_vec(&request).map_err(|e| ApiError::Internal(e.to_string()))?;
    let json = [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))];
    placement.relay(Method::POST, placement.url(&id, "/exec", None), Some(body.into()), &json, Some(timeout)).await
}

#[utoipa::path(get, path = "/api/v1/sandboxes/{id}/exec/stream", params(("id" = String, Path)),
    responses((status = 101, description = "WebSocket: the first client frame is the exec request; see docs/semantics.md"),
              (status = 404, description = "Unknown sandbox"), (status = 409, description = "The sandbox is not Running")))]
pub async fn exec_stream(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    admission: Option<axum::Extension<super::shedding::AdmissionCell>>,
    upgrade: WebSocketUpgrade,
) -> ApiResult<Response> {
    let placement = placement(&state, &id, Need::Running).await?;
    let url = placement.url(&id, "/exec/stream", None).replacen("http://", "ws://", 1);
    let shutdown = state.shutdown.clone();
    // The session holds its long-running slot until it ends, not just until the 101 answer.
    let held = admission.and_then(|cell| cell.take());
    Ok(upgrade.max_message_size(MAX_FRAME).on_upgrade(move |client| async move {
        let _held = held;
        tokio::select! {
            _ = relay_session(client, placement, url) => {}
            _ = shutdown.cancelled() => {}
        }
    }))
}

/// The WebSocket handshake to the agent, with its token.
fn agent_handshake(url: &str, token: Option<&str>) -> Result<tungstenite::handshake::client::Request, String> {
    use tungstenite::client::IntoClientRequest;
    let mut request = url.into_client_request().map_err(|e| e.to_string())?;
    if let Some(token) = token {
        let value =
            format!("Bearer {token}").parse().map_err(|_| "the agent token is not a header value".to_string())?;
        request.headers_mut().insert(header::AUTHORIZATION, value);
    }
    Ok(request)
}

async fn relay_session(client: WebSocket, placement: Placement, url: String) {
    if let Err(e) = placement.agents.data_plane_http(&placement.base_url) {
        return refuse(client, placement.bad_gateway(e).to_string()).await;
    }
    let config = tungstenite::protocol::WebSocketConfig::default().max_message_size(Some(MAX_FRAME));
    let handshake = match agent_handshake(&url, placement.agents.token_for(&placement.node).as_deref()) {
        Ok(handshake) => handshake,
        Err(e) => return refuse(client, format!("node {}: {e}", placement.node)).await,
    };
    // The TCP connection comes from the agent client, so a host name is resolved and checked
    // against the address policy as for every other agent call.
    let connect = async {
        let stream = placement.agents.connect_tcp(&placement.base_url).await.map_err(|e| e.to_string())?;
        tokio_tungstenite::client_async_with_config(handshake, stream, Some(config)).await.map_err(describe_ws_error)
    };
    let agent = match tokio::time::timeout(Duration::from_secs(10), connect).await {
        Ok(Ok((agent, _))) => agent,
        Ok(Err(e)) => return refuse(client, format!("node {}: {e}", placement.node)).await,
        Err(_) => return refuse(client, format!("node {}: the agent did not answer in time", placement.node)).await,
    };
    let (mut agent_tx, mut agent_rx) = agent.split();
    let (mut client_tx, mut client_rx) = client.split();
    let upstream = async {
        while let Some(Ok(message)) = client_rx.next().await {
            let Some(message) = to_agent(message) else { continue };
            if agent_tx.send(message).await.is_err() {
                break;
            }
        }
    };
    let downstream = async {
        while let Some(Ok(message)) = agent_rx.next().await {
            let Some(message) = to_client(message) else { continue };
            if client_tx.send(message).await.is_err() {
                break;
            }
        }
        let _ = client_tx.send(Message::Close(None)).await;
    };
    // Either side ending ends the session: the agent kills a process whose client left.
    tokio::select! {
        _ = upstream => {}
        _ = downstream => {}
    }
}

fn describe_ws_error(error: tungstenite::Error) -> String {
    match error {
        tungstenite::Error::Http(response) => {
            let message = crate::agent_client::error_reason(response.body().as_deref().unwrap_or_default());
            format!("agent answered {}: {message}", response.status().as_u16())
        }
        other => format!("unreachable: {other}"),
    }
}

async fn refuse(mut client: WebSocket, error: String) {
    let frame = serde_json::to_string(&ExecFrame::Error { error }).expect("frames serialize");
    let _ = client.send(Message::Text(frame.into())).await;
    let _ = client.send(Message::Close(None)).await;
}

fn to_agent(message: Message) -> Option<tungstenite::Message> {
    Some(match message {
        Message::Text(text) => tungstenite::Message::Text(text.as_str().into()),
        Message::Binary(data) => tungstenite::Message::Binary(data),
        Message::Close(_) => tungstenite::Message::Close(None),
        Message::Ping(_) | Message::Pong(_) => return None,
    })
}

fn to_client(message: tungstenite::Message) -> Option<Message> {
    Some(match message {
        tungstenite::Message::Text(text) => Message::Text(text.as_str().into()),
        tungstenite::Message::Binary(data) => Message::Binary(data),
        tungstenite::Message::Close(_) => Message::Close(None),
        _ => return None,
    })
}

#[utoipa::path(get, path = "/api/v1/sandboxes/{id}/files", params(("id" = String, Path),
    ("path" = String, Query, description = "Absolute path inside the container"), ("container" = Option<String>, Query)),
    responses((status = 200, description = "The file's bytes (application/octet-stream), or a directory listing as JSON", body = sandboxd_api::dataplane::DirListing),
              (status = 400, description = "Path refused ('..', a kernel filesystem, not a file)"),
              (status = 404, description = "Unknown sandbox or path"), (status = 409, description = "The sandbox is not Running"),
              (status = 413, description = "The file is over the agent's cap"), (status = 502, description = "The agent failed")))]
pub async fn read_file(State(state): State<ApiState>, Path(id): Path<String>, request: Request) -> ApiResult<Response> {
    forward_files(state, id, "/files", request).await
}

#[utoipa::path(put, path = "/api/v1/sandboxes/{id}/files", params(("id" = String, Path),
    ("path" = String, Query), ("mode" = Option<String>, Query, description = "Octal permission bits, default 0644"),
    ("container" = Option<String>, Query)),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 201, description = "Written (atomically; parent directories created)", body = sandboxd_api::dataplane::FileWritten),
              (status = 400, description = "Path refused"), (status = 404, description = "Unknown sandbox"),
              (status = 409, description = "The sandbox is not Running"), (status = 413, description = "Over max_file_bytes"),
              (status = 502, description = "The agent failed")))]
pub async fn write_file(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    request: Request,
) -> ApiResult<Response> {
    forward_files(state, id, "/files", request).await
}

#[utoipa::path(delete, path = "/api/v1/sandboxes/{id}/files", params(("id" = String, Path),
    ("path" = String, Query), ("recursive" = Option<bool>, Query), ("container" = Option<String>, Query)),
    responses((status = 200, description = "Removed"), (status = 404, description = "Unknown sandbox or path"),
              (status = 409, description = "Not Running, or a non-empty directory without recursive=true"),
              (status = 502, description = "The agent failed")))]
pub async fn delete_file(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    request: Request,
) -> ApiResult<Response> {
    forward_files(state, id, "/files", request).await
}

#[utoipa::path(get, path = "/api/v1/sandboxes/{id}/files/archive", params(("id" = String, Path),
    ("path" = String, Query), ("container" = Option<String>, Query)),
    responses((status = 200, description = "A tar stream of the path, entries named from its last component"),
              (status = 404, description = "Unknown sandbox or path"), (status = 409, description = "The sandbox is not Running"),
              (status = 502, description = "The agent failed")))]
pub async fn read_archive(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    request: Request,
) -> ApiResult<Response> {
    forward_files(state, id, "/files/archive", request).await
}

#[utoipa::path(put, path = "/api/v1/sandboxes/{id}/files/archive", params(("id" = String, Path),
    ("path" = String, Query, description = "Directory to extract into (created if missing)"), ("container" = Option<String>, Query)),
    request_body(content = Vec<u8>, content_type = "application/x-tar"),
    responses((status = 201, description = "Extracted", body = sandboxd_api::dataplane::FileWritten),
              (status = 400, description = "An entry climbs out or is of an unsupported type"),
              (status = 409, description = "The sandbox is not Running"), (status = 413, description = "Over max_file_bytes"),
              (status = 502, description = "The agent failed")))]
pub async fn write_archive(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    request: Request,
) -> ApiResult<Response> {
    forward_files(state, id, "/files/archive", request).await
}

async fn forward_files(state: ApiState, id: String, tail: &str, request: Request) -> ApiResult<Response> {
    let method = request.method().clone();
    let query = request.uri().query().map(str::to_string);
    if !query.as_deref().is_some_and(|q| q.split('&').any(|p| p.starts_with("path="))) {
        return Err(ApiError::BadRequest("path: the query must name an absolute path (?path=/…)".into()));
    }
    let with_body = method == Method::PUT;
    if with_body {
        if let Err(too_large) = check_length(request.headers(), state.max_file_bytes) {
            drain(request.into_body()).await;
            return Err(too_large);
        }
    }
    let placement = placement(&state, &id, Need::Running).await?;
    let url = placement.url(&id, tail, query.as_deref());
    let mut headers = Vec::new();
    if let Some(length) = request.headers().get(header::CONTENT_LENGTH) {
        headers.push((header::CONTENT_LENGTH, length.clone()));
    }
    let over_cap = Arc::new(AtomicBool::new(false));
    let body = with_body
        .then(|| reqwest::Body::wrap_stream(capped(request.into_body(), state.max_file_bytes, over_cap.clone())));
    let answer = placement.relay(method, url, body, &headers, None).await;
    if over_cap.load(Ordering::Relaxed) {
        return Err(ApiError::PayloadTooLarge(format!("the body is over max_file_bytes ({})", state.max_file_bytes)));
    }
    answer
}

/// Reads and drops a refused body (boundedly), so that a client still sending it reads the answer
/// instead of failing on a closed connection.
async fn drain(body: Body) {
    let mut stream = body.into_data_stream();
    let mut left: u64 = 1 << 30;
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(chunk)) = stream.next().await {
            left = left.saturating_sub(chunk.len() as u64);
            if left == 0 {
                return;
            }
        }
    })
    .await;
}

fn check_length(headers: &HeaderMap, max: u64) -> ApiResult<()> {
    let length = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    match length {
        Some(length) if length > max => {
            Err(ApiError::PayloadTooLarge(format!("the body is {length} bytes, over max_file_bytes ({max})")))
        }
        _ => Ok(()),
    }
}

/// The body, failing once more than `max` bytes went through (a body without a length) and
/// setting `over` so that the caller answers 413 rather than the agent's broken upload.
fn capped(
    body: Body,
    max: u64,
    over: Arc<AtomicBool>,
) -> impl futures::Stream<Item = Result<axum::body::Bytes, std::io::Error>> {
    let mut seen = 0u64;
    body.into_data_stream().map(move |chunk| {
        let chunk = chunk.map_err(std::io::Error::other)?;
        seen += chunk.len() as u64;
        if seen > max {
            over.store(true, Ordering::Relaxed);
            return Err(std::io::Error::new(std::io::ErrorKind::FileTooLarge, "over max_file_bytes"));
        }
        Ok(chunk)
    })
}

#[utoipa::path(get, path = "/api/v1/sandboxes/{id}/logs", params(("id" = String, Path),
    ("follow" = Option<bool>, Query, description = "Stream new lines as text until the sandbox ends or the client leaves"),
    ("container" = Option<String>, Query), ("tail" = Option<usize>, Query)),
    responses((status = 200, description = "Log lines as JSON, or (follow=true) a text stream"),
              (status = 404, description = "Unknown sandbox or container"), (status = 409, description = "Not on a node yet"),
              (status = 502, description = "The agent failed")))]
pub async fn logs(State(state): State<ApiState>, Path(id): Path<String>, request: Request) -> ApiResult<Response> {
    let query = request.uri().query().map(str::to_string);
    let follow = query.as_deref().is_some_and(|q| q.split('&').any(|p| p == "follow=true"));
    let placement = placement(&state, &id, Need::Placed).await?;
    let url = placement.url(&id, "/logs", query.as_deref());
    let timeout = (!follow).then_some(Duration::from_secs(30));
    let answer = placement.relay(Method::GET, url, None, &[], timeout).await?;
    if !follow {
        return Ok(answer);
    }
    // A followed log has no end of its own: it ends with the server too.
    let (parts, body) = answer.into_parts();
    let until_shutdown = body.into_data_stream().take_until(state.shutdown.clone().cancelled_owned());
    Ok(Response::from_parts(parts, Body::from_stream(until_shutdown)))
}
