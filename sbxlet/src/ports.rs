//! Published host ports: real TCP listeners that answer any HTTP request with 200 (or 503 under fault).

use crate::faults::FaultSwitch;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Longest a prober may take to send its request head before the connection is dropped.
const REQUEST_HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Request heads beyond this are not read; the answer is sent anyway.
const MAX_REQUEST_HEAD: usize = 8 * 1024;

const ANSWER_200: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n";
const ANSWER_503: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 12\r\nConnection: close\r\n\r\nunavailable\n";

/// One listening host port of a sandbox.
#[derive(Debug)]
pub struct PublishedPort {
    port: u16,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl PublishedPort {
    /// The host port number.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether the listener is still accepting connections.
    pub fn is_answering(&self) -> bool {
        !self.task.is_finished()
    }
}

#[cfg(test)]
impl PublishedPort {
    /// A published port whose listener has already stopped, as if it had crashed.
    pub(crate) async fn stopped(port: u16) -> PublishedPort {
        let mut task = tokio::spawn(async {});
        let _ = (&mut task).await;
        PublishedPort { port, stop: CancellationToken::new(), task }
    }
}

/// Why a host port could not be published.
#[derive(Debug, thiserror::Error)]
#[error("host port {port}/tcp is in use on the host: {source}")]
pub struct PortUnavailable {
    pub port: u16,
    #[source]
    pub source: io::Error,
}

/// The host ports of one agent: binds them on the agent's IP and releases them again.
#[derive(Debug)]
pub(crate) struct HostPorts {
    ip: IpAddr,
    faults: Arc<FaultSwitch>,
    agent_stop: CancellationToken,
    /// Listeners told to stop whose tasks may not have dropped their socket yet.
    draining: Mutex<HashMap<u16, Vec<JoinHandle<()>>>>,
    /// Requests answered on any published port, so tests can wait for probes instead of sleeping.
    answered: Arc<AtomicU64>,
}

impl HostPorts {
    pub(crate) fn new(ip: IpAddr, faults: Arc<FaultSwitch>, agent_stop: CancellationToken) -> Self {
        HostPorts { ip, faults, agent_stop, draining: Mutex::new(HashMap::new()), answered: Default::default() }
    }

    /// Requests answered on published ports since the agent started.
    pub(crate) fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }

    /// Binds every port or none: on the first failure the already bound sockets are closed.
    ///
    /// Must run inside a tokio runtime; binding itself is synchronous so callers may hold a lock.
    pub(crate) fn publish(&self, ports: &[u16]) -> Result<Vec<PublishedPort>, PortUnavailable> {
        let mut listeners = Vec::with_capacity(ports.len());
        for &port in ports {
            let listener =
                bind_port(SocketAddr::new(self.ip, port)).map_err(|source| PortUnavailable { port, source })?;
            listeners.push((port, listener));
        }
        Ok(listeners.into_iter().map(|(port, listener)| self.answer_on(port, listener)).collect())
    }

    fn answer_on(&self, port: u16, listener: TcpListener) -> PublishedPort {
        let stop = self.agent_stop.child_token();
        let answered = self.answered.clone();
        let task = tokio::spawn(answer_probes(listener, self.faults.clone(), answered, stop.clone()));
        PublishedPort { port, stop, task }
    }

    /// Stops the listeners and waits until their sockets are closed.
    pub(crate) async fn release(&self, ports: Vec<PublishedPort>) {
        for p in &ports {
            p.stop.cancel();
        }
        for p in ports {
            let _ = p.task.await;
        }
    }

    /// Stops the listeners without waiting; a later publish of the same port waits for them.
    pub(crate) fn release_later(&self, ports: Vec<PublishedPort>) {
        let mut draining = self.draining.lock();
        draining.retain(|_, tasks| {
            tasks.retain(|t| !t.is_finished());
            !tasks.is_empty()
        });
        for p in ports {
            p.stop.cancel();
            draining.entry(p.port).or_default().push(p.task);
        }
    }

    /// Waits until listeners released earlier on any of `ports` have closed their sockets.
    pub(crate) async fn wait_released(&self, ports: &[u16]) {
        let tasks: Vec<JoinHandle<()>> = {
            let mut draining = self.draining.lock();
            if draining.is_empty() {
                return;
            }
            ports.iter().filter_map(|p| draining.remove(p)).flatten().collect()
        };
        for task in tasks {
            let _ = task.await;
        }
    }

    /// Waits until every listener released earlier has closed its socket.
    pub(crate) async fn wait_all_released(&self) {
        let tasks: Vec<JoinHandle<()>> = self.draining.lock().drain().flat_map(|(_, t)| t).collect();
        for task in tasks {
            let _ = task.await;
        }
    }
}

fn bind_port(addr: SocketAddr) -> io::Result<TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}

/// Accepts connections until told to stop; each gets one answer and is closed.
async fn answer_probes(
    listener: TcpListener,
    faults: Arc<FaultSwitch>,
    answered: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                tokio::spawn(answer_probe(stream, faults.clone(), answered.clone()));
            }
            Err(e) => {
                // Typically out of file descriptors: back off instead of spinning.
                tracing::warn!(error = %e, "published port accept failed");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        }
    }
}

async fn answer_probe(mut stream: TcpStream, faults: Arc<FaultSwitch>, answered: Arc<AtomicU64>) {
    if tokio::time::timeout(REQUEST_HEAD_TIMEOUT, read_request_head(&mut stream)).await.is_err() {
        return;
    }
    let answer = if faults.probe_503() { ANSWER_503 } else { ANSWER_200 };
    let _ = stream.write_all(answer).await;
    let _ = stream.shutdown().await;
    answered.fetch_add(1, Ordering::Relaxed);
}

/// Reads until the blank line that ends an HTTP request head, the peer closes, or the cap is hit.
async fn read_request_head(stream: &mut TcpStream) {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while head.len() < MAX_REQUEST_HEAD {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.windows(4).any(|w| w == b"\r\n\r\n") {
            return;
        }
    }
}
