//! The agent's data-plane routes over any backend: buffered and streamed exec, files and archives,
//! and followed logs. Frames of the streamed exec are described in `docs/sbxlet-api.md`.

use crate::backend::{Backend, DataPlaneLimits};
use crate::error::RuntimeError;
use crate::exec::{parse_signal, run_buffered, ExecProcess, Reader, KILLED};
use crate::files::{ContainerRoot, ReadTarget};
use crate::server::{ApiError, ApiJson, ApiPath, ApiQuery};
use axum::body::{Body, Bytes};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::{SinkExt, StreamExt};
use sandboxd_api::agent::AgentPhase;
use sandboxd_api::dataplane::{
    channel, parse_mode, ExecFrame, ExecRequest, ExecResult, FileWritten, DEFAULT_EXEC_TIMEOUT_SECONDS,
};
use serde::Deserialize;
use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// What the data-plane routes share: the backend, its caps, and the permits of long sessions.
pub(crate) struct DataPlane {
    backend: Arc<dyn Backend>,
    limits: DataPlaneLimits,
    sessions: Arc<Semaphore>,
}

type PlaneState = State<Arc<DataPlane>>;

/// How long a streamed exec waits for its first frame (the request).
const FIRST_FRAME_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest frame a client may send (stdin chunks, control frames).
const MAX_CLIENT_FRAME: usize = 1 << 20;
/// Chunks in flight between a reader and a slow client; a full channel stops reading (backpressure).
const CHUNKS_IN_FLIGHT: usize = 16;
/// How often a followed log is checked for new lines.
const FOLLOW_POLL: Duration = Duration::from_millis(100);
/// Longest log line held while waiting for its newline.
const MAX_LINE: usize = 64 * 1024;
/// How long output may still arrive after a streamed process ended.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(1);

pub(crate) fn routes(backend: Arc<dyn Backend>) -> Router {
    let limits = backend.limits();
    let plane = Arc::new(DataPlane { backend, limits, sessions: Arc::new(Semaphore::new(limits.max_sessions)) });
    Router::new()
        .route("/api/v1/sandboxes/{id}/exec", post(exec))
        .route("/api/v1/sandboxes/{id}/exec/stream", get(exec_stream))
        .route("/api/v1/sandboxes/{id}/files", get(read_file).put(write_file).delete(delete_file))
        .route("/api/v1/sandboxes/{id}/files/archive", get(read_archive).put(write_archive))
        .route("/api/v1/sandboxes/{id}/logs", get(sandbox_logs))
        .route("/api/v1/sandboxes/{id}/containers/{container}/logs", get(container_logs))
        .with_state(plane)
}

impl DataPlane {
    fn session_permit(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        self.sessions.clone().try_acquire_owned().map_err(|_| {
            ApiError::TooMany(format!(
                "{} streaming sessions are open on this node; try again later",
                self.limits.max_sessions
            ))
        })
    }
}

// === exec ===

async fn exec(
    State(plane): PlaneState,
    ApiPath(id): ApiPath<String>,
    ApiJson(request): ApiJson<ExecRequest>,
) -> Result<Json<ExecResult>, ApiError> {
    check_request(&request)?;
    if request.tty {
        return Err(ApiError::BadRequest("tty: a terminal needs the streamed exec (…/exec/stream)".into()));
    }
    let timeout = Duration::from_secs(request.timeout_seconds.unwrap_or(DEFAULT_EXEC_TIMEOUT_SECONDS));
    let started = Instant::now();
    let process = plane.backend.exec(&id, &request).await?;
    let cap = plane.limits.max_exec_output_bytes;
    Ok(Json(run_buffered(process, request.stdin.clone(), started, timeout, cap).await))
}

fn check_request(request: &ExecRequest) -> Result<(), ApiError> {
    match request.problem() {
        Some(problem) => Err(ApiError::BadRequest(problem)),
        None => Ok(()),
    }
}

/// Answers 404/409 before the upgrade, so a client learns them as HTTP statuses.
async fn exec_stream(
    State(plane): PlaneState,
    ApiPath(id): ApiPath<String>,
    upgrade: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let sandbox = plane.backend.get(&id).await?;
    if sandbox.phase != AgentPhase::Running {
        return Err(
            RuntimeError::NotRunning(format!("sandbox {id:?} is {}, not running", sandbox.phase.as_str())).into()
        );
    }
    let permit = plane.session_permit()?;
    Ok(upgrade.max_message_size(MAX_CLIENT_FRAME).on_upgrade(move |socket| async move {
        session(socket, plane, id).await;
        drop(permit);
    }))
}

async fn session(mut socket: WebSocket, plane: Arc<DataPlane>, id: String) {
    let request = match first_frame(&mut socket).await {
        Ok(request) => request,
        Err(error) => return finish(socket, ExecFrame::Error { error }).await,
    };
    let process = match plane.backend.exec(&id, &request).await {
        Ok(process) => process,
        Err(e) => return finish(socket, ExecFrame::Error { error: e.to_string() }).await,
    };
    if send_frame(&mut socket, &ExecFrame::Started).await.is_err() {
        process.control.kill();
        return;
    }
    let timeout = request.timeout_seconds.map(Duration::from_secs);
    relay(socket, process, timeout).await;
}

async fn first_frame(socket: &mut WebSocket) -> Result<ExecRequest, String> {
    let frame = match tokio::time::timeout(FIRST_FRAME_TIMEOUT, socket.recv()).await {
        Ok(Some(Ok(Message::Text(text)))) => text,
        Ok(Some(Ok(_))) => return Err("the first frame must be a text frame holding the exec request".into()),
        Ok(_) => return Err("the connection closed before the exec request".into()),
        Err(_) => return Err(format!("no exec request within {FIRST_FRAME_TIMEOUT:?}")),
    };
    let request: ExecRequest = serde_json::from_str(&frame).map_err(|e| format!("malformed exec request: {e}"))?;
    if let Some(problem) = request.problem() {
        return Err(problem);
    }
    if request.stdin.is_some() {
        return Err("stdin: a streamed exec sends its input as stdin frames".into());
    }
    Ok(request)
}

/// Pumps client frames into the process and its output out until it ends, then sends the exit
/// frame. A client that leaves (its stream ends, or a send to it fails) gets the process killed.
/// Sending runs on a task of its own, so a client that stops reading never hides the timeout or
/// its own departure from this loop.
async fn relay(socket: WebSocket, process: ExecProcess, timeout: Option<Duration>) {
    let started = Instant::now();
    let ExecProcess { stdin, stdout, stderr, control, mut exit } = process;
    let (sink, stream) = socket.split();
    let left = CancellationToken::new();
    let (output, outgoing) = mpsc::channel::<Message>(CHUNKS_IN_FLIGHT);
    let writer = tokio::spawn(write_frames(sink, outgoing, left.clone()));
    let mut pumps = JoinSet::new();
    pumps.spawn(pump(stdout, channel::STDOUT, output.clone()));
    if let Some(stderr) = stderr {
        pumps.spawn(pump(stderr, channel::STDERR, output.clone()));
    }
    let input = tokio::spawn(feed_input(stream, stdin, control.clone(), left.clone()));
    let deadline = async {
        match timeout {
            Some(t) => tokio::time::sleep(t).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let mut timed_out = false;
    let mut killed_for_leaving = false;
    let code = loop {
        tokio::select! {
            code = &mut exit => break code,
            _ = &mut deadline, if !timed_out => {
                timed_out = true;
                control.kill();
            }
            _ = left.cancelled(), if !killed_for_leaving => {
                killed_for_leaving = true;
                control.kill();
            }
        }
    };
    input.abort();
    // Output written just before the end is still in the pipes: give it a moment to arrive.
    let _ = tokio::time::timeout(DRAIN_AFTER_EXIT, async { while pumps.join_next().await.is_some() {} }).await;
    pumps.abort_all();
    if !left.is_cancelled() {
        let exit_code = if timed_out { KILLED } else { code };
        let frame = ExecFrame::Exit { exit_code, duration_ms: started.elapsed().as_millis() as u64, timed_out };
        let _ = output.send(text_frame(&frame)).await;
    }
    drop(output);
    // The exit frame and the close reach a reading client; one that stopped reading is dropped.
    if tokio::time::timeout(DRAIN_AFTER_EXIT, writer).await.is_err() {
        left.cancel();
    }
}

/// Sends queued frames to the client, then closes; a failed send means the client left.
async fn write_frames(
    mut sink: futures::stream::SplitSink<WebSocket, Message>,
    mut outgoing: mpsc::Receiver<Message>,
    left: CancellationToken,
) {
    loop {
        let message = tokio::select! {
            message = outgoing.recv() => message,
            _ = left.cancelled() => return,
        };
        let Some(message) = message else { break };
        let sent = tokio::select! {
            sent = sink.send(message) => sent.is_ok(),
            _ = left.cancelled() => return,
        };
        if !sent {
            left.cancel();
            return;
        }
    }
    let _ = sink.send(Message::Close(None)).await;
    let _ = sink.close().await;
}

fn text_frame(frame: &ExecFrame) -> Message {
    Message::Text(serde_json::to_string(frame).expect("frames serialize").into())
}

/// Reads one output stream into binary frames tagged with its channel.
async fn pump(mut reader: Reader, channel: u8, output: mpsc::Sender<Message>) {
    let mut buffer = vec![0u8; 32 * 1024];
    loop {
        buffer[0] = channel;
        match reader.read(&mut buffer[1..]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if output.send(Message::Binary(Bytes::copy_from_slice(&buffer[..=n]))).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Most stdin bytes held for a process that does not read them; past it, the client is not read
/// until the process catches up (backpressure).
const MAX_PENDING_STDIN: usize = 4 << 20;

/// Signals queued for delivery, in order, by one task per session: under gVisor a signal is a
/// `runsc kill`, which takes tens of milliseconds and must not hold up the reader, so each delivery
/// borrows a blocking thread for its duration. The task ends when the session drops the sender.
const QUEUED_SIGNALS: usize = 16;

fn signal_worker(control: Arc<dyn crate::exec::ExecControl>) -> tokio::sync::mpsc::Sender<i32> {
    let (sender, mut receiver) = tokio::sync::mpsc::channel::<i32>(QUEUED_SIGNALS);
    tokio::spawn(async move {
        while let Some(number) = receiver.recv().await {
            let control = control.clone();
            if let Ok(Err(e)) = tokio::task::spawn_blocking(move || control.signal(number)).await {
                tracing::debug!(error = %e, "exec signal not delivered");
            }
        }
    });
    sender
}

/// Applies the client's frames: stdin bytes (written by a task of their own, so that a process
/// that does not read its stdin never blocks signals, resizes or noticing that the client left),
/// end of input, resizes and signals. Cancels `left` when the client goes away.
async fn feed_input(
    mut stream: futures::stream::SplitStream<WebSocket>,
    stdin: Option<crate::exec::Writer>,
    control: Arc<dyn crate::exec::ExecControl>,
    left: CancellationToken,
) {
    let pending = Arc::new(tokio::sync::Mutex::new(PendingStdin::default()));
    let wake = Arc::new(tokio::sync::Notify::new());
    let writer = stdin.map(|input| tokio::spawn(write_stdin(input, pending.clone(), wake.clone())));
    let signals = signal_worker(control.clone());
    loop {
        let backlog = pending.lock().await.bytes.len();
        if backlog >= MAX_PENDING_STDIN {
            tokio::select! {
                _ = wake.notified() => continue,
                _ = tokio::time::sleep(Duration::from_millis(50)) => continue,
            }
        }
        let Some(Ok(message)) = stream.next().await else { break };
        match message {
            Message::Binary(data) if data.first() == Some(&channel::STDIN) => {
                pending.lock().await.bytes.extend_from_slice(&data[1..]);
                wake.notify_one();
            }
            Message::Text(text) => match serde_json::from_str::<ExecFrame>(&text) {
                Ok(ExecFrame::CloseStdin) => {
                    pending.lock().await.closed = true;
                    wake.notify_one();
                }
                Ok(ExecFrame::Resize { cols, rows }) => {
                    let _ = control.resize(cols, rows);
                }
                Ok(ExecFrame::Signal { signal }) => {
                    if let Ok(number) = parse_signal(&signal) {
                        // A flood of signals beyond the queue is dropped, as a terminal drops keys.
                        let _ = signals.try_send(number);
                    }
                }
                _ => {}
            },
            Message::Close(_) => break,
            _ => {}
        }
    }
    if let Some(writer) = writer {
        writer.abort();
    }
    left.cancel();
}

#[derive(Default)]
struct PendingStdin {
    bytes: Vec<u8>,
    closed: bool,
}

async fn write_stdin(
    mut input: crate::exec::Writer,
    pending: Arc<tokio::sync::Mutex<PendingStdin>>,
    wake: Arc<tokio::sync::Notify>,
) {
    loop {
        let (chunk, closed) = {
            let mut pending = pending.lock().await;
            (std::mem::take(&mut pending.bytes), pending.closed)
        };
        if !chunk.is_empty() {
            if input.write_all(&chunk).await.is_err() {
                return;
            }
            wake.notify_one();
            continue;
        }
        if closed {
            let _ = input.shutdown().await;
            return;
        }
        // The wake is shared with the reader's backlog wait: never sleep on it alone.
        let _ = tokio::time::timeout(Duration::from_millis(50), wake.notified()).await;
    }
}

async fn send_frame(socket: &mut WebSocket, frame: &ExecFrame) -> Result<(), axum::Error> {
    let text = serde_json::to_string(frame).expect("frames serialize");
    socket.send(Message::Text(text.into())).await
}

async fn finish<S>(mut sink: S, frame: ExecFrame)
where
    S: futures::Sink<Message> + Unpin,
{
    let text = serde_json::to_string(&frame).expect("frames serialize");
    let _ = sink.send(Message::Text(text.into())).await;
    let _ = sink.send(Message::Close(None)).await;
    let _ = sink.close().await;
}

// === files ===

#[derive(Debug, Deserialize)]
struct FileParams {
    path: String,
    container: Option<String>,
    mode: Option<String>,
    #[serde(default)]
    recursive: bool,
}

async fn root_of(plane: &DataPlane, id: &str, params: &FileParams) -> Result<ContainerRoot, ApiError> {
    Ok(plane.backend.container_root(id, params.container.as_deref()).await?)
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, RuntimeError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::Runtime(RuntimeError::Failed(format!("file task stopped: {e}"))))?
        .map_err(ApiError::from)
}

async fn read_file(
    State(plane): PlaneState,
    ApiPath(id): ApiPath<String>,
    ApiQuery(params): ApiQuery<FileParams>,
) -> Result<Response, ApiError> {
    let root = root_of(&plane, &id, &params).await?;
    let path = params.path.clone();
    match blocking(move || root.read(&path)).await? {
        ReadTarget::Dir(listing) => Ok(Json(listing).into_response()),
        ReadTarget::File { file, size } => {
            let stream =
                tokio_util::io::ReaderStream::with_capacity(tokio::fs::File::from_std(file).take(size), 256 << 10);
            let headers = [
                (header::CONTENT_TYPE, "application/octet-stream".to_string()),
                (header::CONTENT_LENGTH, size.to_string()),
            ];
            Ok((headers, Body::from_stream(stream)).into_response())
        }
    }
}

async fn write_file(
    State(plane): PlaneState,
    ApiPath(id): ApiPath<String>,
    ApiQuery(params): ApiQuery<FileParams>,
    request: Request,
) -> Result<(StatusCode, Json<FileWritten>), ApiError> {
    let mode = params.mode.as_deref().map(parse_mode).transpose().map_err(ApiError::BadRequest)?.unwrap_or(0o644);
    let request = refuse_long_bodies(request, plane.limits.max_file_bytes).await?;
    let root = root_of(&plane, &id, &params).await?;
    let mut body = body_reader(request.into_body());
    let path = params.path.clone();
    let size = blocking(move || root.write(&path, mode, &mut body)).await?;
    Ok((StatusCode::CREATED, Json(FileWritten { path: params.path, size })))
}

async fn delete_file(
    State(plane): PlaneState,
    ApiPath(id): ApiPath<String>,
    ApiQuery(params): ApiQuery<FileParams>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let root = root_of(&plane, &id, &params).await?;
    let (path, recursive) = (params.path.clone(), params.recursive);
    blocking(move || root.remove(&path, recursive)).await?;
    Ok(Json(serde_json::json!({ "path": params.path, "deleted": true })))
}

async fn read_archive(
    State(plane): PlaneState,
    ApiPath(id): ApiPath<String>,
    ApiQuery(params): ApiQuery<FileParams>,
) -> Result<Response, ApiError> {
    let root = root_of(&plane, &id, &params).await?;
    let (chunks, mut received) = mpsc::channel::<Result<Bytes, std::io::Error>>(CHUNKS_IN_FLIGHT);
    let path = params.path.clone();
    let mut writer = ChannelWriter { chunks: chunks.clone() };
    let task = tokio::task::spawn_blocking(move || match root.archive(&path, &mut writer) {
        Ok(()) => Ok(()),
        Err(e) => {
            // After the first chunk only an error chunk can tell the client: it aborts the body,
            // so that a partial archive is never taken for a whole one.
            let _ = writer.chunks.blocking_send(Err(std::io::Error::other(e.to_string())));
            Err(e)
        }
    });
    // Errors found before the first chunk (no such path, a kernel filesystem) become a status; one
    // found later (the size cap, mid-tree) can only cut the stream short.
    let first = tokio::select! {
        chunk = received.recv() => chunk,
        done = task => {
            done.map_err(|e| ApiError::Runtime(RuntimeError::Failed(e.to_string())))??;
            received.recv().await
        }
    };
    drop(chunks);
    let head = futures::stream::iter(first);
    let rest = futures::stream::unfold(received, |mut r| async move { r.recv().await.map(|c| (c, r)) });
    Ok(([(header::CONTENT_TYPE, "application/x-tar")], Body::from_stream(head.chain(rest))).into_response())
}

async fn write_archive(
    State(plane): PlaneState,
    ApiPath(id): ApiPath<String>,
    ApiQuery(params): ApiQuery<FileParams>,
    request: Request,
) -> Result<(StatusCode, Json<FileWritten>), ApiError> {
    let request = refuse_long_bodies(request, plane.limits.max_file_bytes).await?;
    let root = root_of(&plane, &id, &params).await?;
    let mut body = body_reader(request.into_body());
    let path = params.path.clone();
    let size = blocking(move || root.extract(&path, &mut body)).await?;
    Ok((StatusCode::CREATED, Json(FileWritten { path: params.path, size })))
}

/// A body whose declared length is over the cap is read and dropped, then refused with 413: a
/// client still sending it would otherwise fail on a closed connection instead of reading the 413.
async fn refuse_long_bodies(request: Request, max: u64) -> Result<Request, ApiError> {
    if let Err(too_large) = check_length(request.headers(), max) {
        discard(request.into_body().into_data_stream()).await;
        return Err(too_large);
    }
    Ok(request)
}

/// Reads and drops what is left of a body, for at most 5 s and 1 GiB.
async fn discard(mut stream: axum::body::BodyDataStream) {
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

fn check_length(headers: &HeaderMap, max: u64) -> Result<(), ApiError> {
    let length = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    match length {
        Some(length) if length > max => {
            Err(RuntimeError::TooLarge(format!("the body is {length} bytes, over the cap of {max} bytes")).into())
        }
        _ => Ok(()),
    }
}

/// A request body as a blocking reader, fed by a task (file writes run on the blocking pool).
fn body_reader(body: Body) -> ChannelReader {
    let (chunks, received) = mpsc::channel(CHUNKS_IN_FLIGHT);
    tokio::spawn(async move {
        let mut stream = body.into_data_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(std::io::Error::other);
            let failed = chunk.is_err();
            if failed {
                let _ = chunks.send(chunk).await;
                return;
            }
            if chunks.send(chunk).await.is_err() {
                // The writer stopped (over the cap, a bad path): read the rest so that the sender
                // gets the answer rather than a broken connection.
                discard(stream).await;
                return;
            }
        }
    });
    ChannelReader { received, current: Bytes::new() }
}

struct ChannelReader {
    received: mpsc::Receiver<Result<Bytes, std::io::Error>>,
    current: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.received.blocking_recv() {
                Some(chunk) => self.current = chunk?,
                None => return Ok(0),
            }
        }
        let n = buffer.len().min(self.current.len());
        buffer[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

struct ChannelWriter {
    chunks: mpsc::Sender<Result<Bytes, std::io::Error>>,
}

impl std::io::Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.chunks
            .blocking_send(Ok(Bytes::copy_from_slice(data)))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client left"))?;
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// === logs, and followed logs ===

#[derive(Debug, Deserialize)]
struct LogParams {
    tail: Option<usize>,
    container: Option<String>,
    #[serde(default)]
    follow: bool,
    /// Refused: container log lines carry no timestamps to filter on.
    since: Option<String>,
}

/// All containers' lines (or one container's with `container=`); `follow=true` streams them as text.
async fn sandbox_logs(
    State(plane): PlaneState,
    ApiPath(id): ApiPath<String>,
    ApiQuery(params): ApiQuery<LogParams>,
) -> Result<Response, ApiError> {
    refuse_since(&params)?;
    if params.follow {
        return follow_logs(&plane, id, params.container, params.tail).await;
    }
    Ok(Json(plane.backend.logs(&id, params.container.as_deref(), params.tail).await?).into_response())
}

async fn container_logs(
    State(plane): PlaneState,
    ApiPath((id, container)): ApiPath<(String, String)>,
    ApiQuery(params): ApiQuery<LogParams>,
) -> Result<Response, ApiError> {
    refuse_since(&params)?;
    if params.follow {
        return follow_logs(&plane, id, Some(container), params.tail).await;
    }
    Ok(Json(plane.backend.logs(&id, Some(&container), params.tail).await?).into_response())
}

fn refuse_since(params: &LogParams) -> Result<(), ApiError> {
    match params.since {
        Some(_) => Err(ApiError::BadRequest(
            "since: not supported, container log lines carry no timestamps; use tail=N".into(),
        )),
        None => Ok(()),
    }
}

/// Streams a sandbox's log lines (`[container] ` prefixed when several are shown) as they are
/// written, starting with the last `tail`, until the sandbox ends or the client leaves. Each
/// follow holds a session permit.
async fn follow_logs(
    plane: &DataPlane,
    id: String,
    container: Option<String>,
    tail: Option<usize>,
) -> Result<Response, ApiError> {
    let backend = plane.backend.clone();
    let files = backend.log_files(&id, container.as_deref()).await?;
    if files.is_none() {
        backend.logs(&id, container.as_deref(), tail).await?;
    }
    let permit = plane.session_permit()?;
    let (lines, received) = mpsc::channel::<Result<Bytes, std::io::Error>>(CHUNKS_IN_FLIGHT);
    tokio::spawn(async move {
        match files {
            Some(files) => follow_files(backend, id, files, tail, lines).await,
            None => follow_polled(backend, id, container, tail, lines).await,
        }
        drop(permit);
    });
    let stream = futures::stream::unfold(received, |mut r| async move { r.recv().await.map(|c| (c, r)) });
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], Body::from_stream(stream)).into_response())
}

/// Whether a sandbox may still write logs.
async fn still_running(backend: &dyn Backend, id: &str) -> bool {
    matches!(backend.get(id).await, Ok(s) if matches!(s.phase, AgentPhase::Creating | AgentPhase::Running))
}

struct Followed {
    prefix: String,
    path: std::path::PathBuf,
    offset: u64,
    partial: Vec<u8>,
}

impl Followed {
    /// New complete lines since the last read (a file that shrank was rotated: read it from the start).
    async fn read_new(&mut self) -> Vec<u8> {
        let Ok(mut file) = tokio::fs::File::open(&self.path).await else { return Vec::new() };
        let length = file.metadata().await.map(|m| m.len()).unwrap_or(0);
        if length < self.offset {
            self.offset = 0;
            self.partial.clear();
        }
        let mut fresh = Vec::new();
        if tokio::io::AsyncSeekExt::seek(&mut file, std::io::SeekFrom::Start(self.offset)).await.is_ok() {
            let _ = (&mut file).take(1 << 20).read_to_end(&mut fresh).await;
        }
        self.offset += fresh.len() as u64;
        self.partial.extend_from_slice(&fresh);
        if self.partial.len() > MAX_LINE && !self.partial.contains(&b'\n') {
            // A line this long is shown in pieces rather than held without bound.
            self.partial.push(b'\n');
        }
        let Some(end) = self.partial.iter().rposition(|b| *b == b'\n') else { return Vec::new() };
        let complete: Vec<u8> = self.partial.drain(..=end).collect();
        prefixed(&self.prefix, &complete)
    }
}

fn prefixed(prefix: &str, lines: &[u8]) -> Vec<u8> {
    if prefix.is_empty() {
        return lines.to_vec();
    }
    let mut out = Vec::with_capacity(lines.len() + 16);
    for line in lines.split_inclusive(|b| *b == b'\n') {
        out.extend_from_slice(prefix.as_bytes());
        out.extend_from_slice(line);
    }
    out
}

async fn follow_files(
    backend: Arc<dyn Backend>,
    id: String,
    files: Vec<(String, std::path::PathBuf)>,
    tail: Option<usize>,
    lines: mpsc::Sender<Result<Bytes, std::io::Error>>,
) {
    let several = files.len() > 1;
    let mut followed = Vec::new();
    for (name, path) in files {
        let prefix = if several { format!("[{name}] ") } else { String::new() };
        let offset = match tail {
            Some(tail) => {
                tail_offset(&path, tokio::fs::metadata(&path).await.map(|m| m.len()).unwrap_or(0), tail).await
            }
            None => 0,
        };
        followed.push(Followed { prefix, path, offset, partial: Vec::new() });
    }
    loop {
        let running = still_running(backend.as_ref(), &id).await;
        for entry in followed.iter_mut() {
            let fresh = entry.read_new().await;
            if !fresh.is_empty() && lines.send(Ok(Bytes::from(fresh))).await.is_err() {
                return;
            }
        }
        if !running || lines.is_closed() {
            return;
        }
        tokio::time::sleep(FOLLOW_POLL).await;
    }
}

/// Where the last `tail` lines of a file start.
async fn tail_offset(path: &std::path::Path, length: u64, tail: usize) -> u64 {
    let window = 1 << 20;
    let start = length.saturating_sub(window);
    let Ok(mut file) = tokio::fs::File::open(path).await else { return length };
    let mut bytes = Vec::new();
    if tokio::io::AsyncSeekExt::seek(&mut file, std::io::SeekFrom::Start(start)).await.is_err()
        || file.read_to_end(&mut bytes).await.is_err()
    {
        return length;
    }
    let body = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
    let mut seen = 0;
    for (i, b) in body.iter().enumerate().rev() {
        if *b == b'\n' {
            seen += 1;
            if seen == tail {
                return start + i as u64 + 1;
            }
        }
    }
    if tail == 0 {
        return length;
    }
    start
}

/// The simulator's follow: its log lines, polled; lines past the count already sent are new.
async fn follow_polled(
    backend: Arc<dyn Backend>,
    id: String,
    container: Option<String>,
    tail: Option<usize>,
    lines: mpsc::Sender<Result<Bytes, std::io::Error>>,
) {
    let mut sent = match backend.logs(&id, container.as_deref(), None).await {
        Ok(all) => all.logs.lines.len().saturating_sub(tail.unwrap_or(usize::MAX)),
        Err(_) => return,
    };
    loop {
        let running = still_running(backend.as_ref(), &id).await;
        let Ok(all) = backend.logs(&id, container.as_deref(), None).await else { return };
        let fresh: String = all.logs.lines.iter().skip(sent).map(|l| format!("{l}\n")).collect();
        sent = sent.max(all.logs.lines.len());
        if !fresh.is_empty() && lines.send(Ok(Bytes::from(fresh))).await.is_err() {
            return;
        }
        if !running || lines.is_closed() {
            return;
        }
        tokio::time::sleep(FOLLOW_POLL * 10).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_go_on_every_line() {
        assert_eq!(prefixed("[a] ", b"x\ny\n"), b"[a] x\n[a] y\n".to_vec());
        assert_eq!(prefixed("", b"x\n"), b"x\n".to_vec());
    }

    #[tokio::test]
    async fn tails_start_at_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        std::fs::write(&path, "one\ntwo\nthree\n").unwrap();
        assert_eq!(tail_offset(&path, 14, 2).await, 4);
        assert_eq!(tail_offset(&path, 14, 0).await, 14);
        assert_eq!(tail_offset(&path, 14, 10).await, 0);
    }
}
