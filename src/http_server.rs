//! The HTTP listener: a bound on open connections (inside the process's file-descriptor budget), a
//! timeout for request headers that also closes idle keep-alive connections, and graceful shutdown.
//!
//! axum's own `serve` keeps every connection for as long as the client likes: 20,000 idle
//! connections used up the descriptors and `/healthz` stopped answering. Here a connection over
//! the bound is answered at once (503 with `Retry-After`, or 200 for `GET /healthz`) and closed.

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Descriptors kept back from connections: the store, agent calls, watches' internals, logs.
pub const FD_RESERVE: u64 = 1024;
/// Connections `system_listen` holds at once: controllers, nodes registering, scrapers and health
/// checkers are few, and these come out of the descriptors kept back (`FD_RESERVE`).
pub const SYSTEM_MAX_CONNECTIONS: usize = 256;
/// Refusals answered at once; past it, an excess connection is closed without an answer.
const MAX_REFUSALS: usize = 256;
/// Longest TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a refused connection may take to send its request line.
const REFUSAL_READ: Duration = Duration::from_secs(1);

/// Connection limits from configuration.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Request headers must arrive within this; an idle keep-alive connection is closed after it.
    pub header_read_timeout: Duration,
    pub max_connections: usize,
    /// Serve HTTPS with this configuration; `None`: plain HTTP (`insecure_listen`).
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// Raises the soft descriptor limit to the hard one and returns how many connections fit with
/// `FD_RESERVE` kept back: `wanted`, or fewer when the budget is smaller.
pub fn connection_budget(wanted: usize) -> usize {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        if setrlimit(Resource::Nofile, limit).is_err() {
            limit = getrlimit(Resource::Nofile);
        }
    }
    let Some(soft) = limit.current else { return wanted };
    let budget = soft.saturating_sub(FD_RESERVE).max(16) as usize;
    if budget < wanted {
        tracing::warn!(wanted, budget, soft_fd_limit = soft, "max_connections lowered to fit the descriptor limit");
    }
    wanted.min(budget)
}

/// Serves `router` on `listener` until `shutdown`; then stops accepting, asks every connection to
/// finish its current request, and returns once all are closed.
pub async fn serve(listener: TcpListener, router: Router, limits: Limits, shutdown: CancellationToken) {
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors (EMFILE) or a connection reset before accept: wait a
                    // moment rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            // Over TLS a refusal would need a handshake first: the connection is just closed.
            if limits.tls.is_some() {
                continue;
            }
            if let Ok(refusal) = refusals.clone().try_acquire_owned() {
                tokio::spawn(async move {
                    refuse(stream).await;
                    drop(refusal);
                });
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let http = http.clone();
        let shutdown = shutdown.clone();
        let acceptor = limits.tls.clone().map(tokio_rustls::TlsAcceptor::from);
        // A TLS handshake is a few round trips: a client that stalls in it holds a connection slot
        // for at most this, however long header_read_timeout is.
        let handshake_timeout = limits.header_read_timeout.min(TLS_HANDSHAKE_TIMEOUT);
        tokio::spawn(async move {
            match acceptor {
                None => serve_connection(&http, stream, service, &shutdown).await,
                // The handshake is bounded like the headers: a client that stalls in it is closed.
                Some(acceptor) => match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => serve_connection(&http, tls, service, &shutdown).await,
                    Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!("TLS handshake timed out"),
                },
            }
            drop(permit);
        });
    }
    drop(listener);
    // Every permit back means every connection closed.
    let _ = connections.acquire_many(limits.max_connections as u32).await;
}

/// Serves one connection until it closes, or finishes its current request once `shutdown` comes.
async fn serve_connection<S>(
    http: &hyper::server::conn::http1::Builder,
    stream: S,
    service: TowerToHyperService<Router>,
    shutdown: &CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let connection = http.serve_connection(TokioIo::new(stream), service).with_upgrades();
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => {}
        _ = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
}

/// Answers a connection over the bound: 200 to `GET /healthz` (a liveness check must not fail
/// because users hold every connection), 503 with `Retry-After` to anything else.
async fn refuse(mut stream: TcpStream) {
    let mut start = [0u8; 16];
    let read = tokio::time::timeout(REFUSAL_READ, stream.read(&mut start)).await;
    let healthz = matches!(read, Ok(Ok(n)) if start[..n].starts_with(b"GET /healthz"));
    let (status, body) = if healthz {
        ("200 OK", r#"{"ok":true}"#)
    } else {
        ("503 Service Unavailable", r#"{"error":"the server has no free connection; retry later"}"#)
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\nretry-after: 1\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(REFUSAL_READ, stream.write_all(response.as_bytes())).await;
}
