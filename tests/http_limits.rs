//! The listener's limits over real sockets: slow headers and idle keep-alive connections are
//! closed at `header_read_timeout`, streams outlive it, and connections over `max_connections` get
//! a 503 with `Retry-After` at once while `GET /healthz` still answers 200.

mod common;

use common::*;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the peer closes (or `limit` passes); returns what arrived and when the close came.
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> (String, Option<Duration>) {
    let started = Instant::now();
    let mut seen = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match tokio::time::timeout(limit.saturating_sub(started.elapsed()), stream.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&seen).into_owned(), Some(started.elapsed())),
            Ok(Ok(n)) => seen.extend_from_slice(&buffer[..n]),
            Err(_) => return (String::from_utf8_lossy(&seen).into_owned(), None),
        }
    }
}

async fn connect(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).await.expect("connects")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_and_idle_connections_are_closed_but_streams_are_not() {
    let (server, _client) = start_server(test_config(&[("header_read_timeout", "1s")])).await;

    // Half a request line, then nothing: closed after about a second, not held.
    let mut slow = connect(server.addr).await;
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let (_, closed) = read_until_closed(&mut slow, Duration::from_secs(5)).await;
    let closed = closed.expect("a connection with unfinished headers is closed");
    assert!(closed >= Duration::from_millis(800) && closed < Duration::from_secs(3), "{closed:?}");

    // A finished keep-alive request, then silence: closed after about a second too.
    let mut idle = connect(server.addr).await;
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let (answer, closed) = read_until_closed(&mut idle, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(closed.is_some(), "an idle keep-alive connection is closed");

    // A watch streams for longer than the header timeout: only headers are timed.
    let mut watch = connect(server.addr).await;
    watch.write_all(b"GET /api/v1/sandboxes?watch=true HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let (head, closed) = read_until_closed(&mut watch, Duration::from_millis(2500)).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(closed.is_none(), "the watch was cut after {closed:?}");
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_bound_get_503_and_healthz_still_answers() {
    let (server, client) = start_server(test_config(&[("max_connections", "16")])).await;
    let mut held = Vec::new();
    for _ in 0..16 {
        let mut stream = connect(server.addr).await;
        stream.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
        held.push(stream);
    }
    // Let the server accept all sixteen before the next one.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut over = connect(server.addr).await;
    over.write_all(b"POST /api/v1/sandboxes HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let (answer, closed) = read_until_closed(&mut over, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("retry-after: 1"), "{answer}");
    assert!(answer.contains(r#"{"error":"#), "the body is JSON: {answer}");
    assert!(closed.is_some(), "and the connection is closed");

    let mut health = connect(server.addr).await;
    health.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let (answer, _) = read_until_closed(&mut health, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 200") && answer.contains(r#"{"ok":true}"#), "{answer}");

    // Freed connections are served normally again.
    drop(held);
    let served =
        eventually(5, "a request served after connections were freed", || async { client.list_sandboxes().await.ok() })
            .await;
    assert!(served.items.is_empty());
    server.stop().await.unwrap();
}

/// Status line and headers of a raw request's answer.
async fn answer_of(addr: SocketAddr, request: &str) -> String {
    let mut stream = connect(addr).await;
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    let mut buffer = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer)).await {
            Ok(Ok(n)) if n > 0 => seen.extend_from_slice(&buffer[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&seen).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_class_gets_429_with_retry_after_while_the_others_are_served() {
    let config = test_config(&[("max_inflight_workload", "1"), ("max_inflight_long_running", "2")]);
    let (server, _client) = start_server(config).await;

    // Two watches fill the long-running class; a third is shed at once.
    let mut watches = Vec::new();
    for _ in 0..2 {
        let mut watch = connect(server.addr).await;
        watch.write_all(b"GET /api/v1/sandboxes?watch=true HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut head = [0u8; 12];
        watch.read_exact(&mut head).await.unwrap();
        assert_eq!(&head, b"HTTP/1.1 200");
        watches.push(watch);
    }
    let third = answer_of(server.addr, "GET /api/v1/nodes?watch=true HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(third.starts_with("HTTP/1.1 429"), "{third}");
    assert!(third.to_ascii_lowercase().contains("retry-after: 1"), "{third}");

    // A user request whose body never finishes holds the one workload slot.
    let mut slow = connect(server.addr).await;
    slow.write_all(
        b"POST /api/v1/sandboxes HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{",
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let user = answer_of(server.addr, "GET /api/v1/sandboxes HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(user.starts_with("HTTP/1.1 429"), "{user}");

    // Controllers' class and the liveness check are untouched by the user flood.
    let system = answer_of(server.addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(system.starts_with("HTTP/1.1 200"), "{system}");
    let health = answer_of(server.addr, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");

    // The slot comes back when the slow request ends.
    drop(slow);
    let freed = eventually(5, "a user request served again", || async {
        let answer = answer_of(server.addr, "GET /api/v1/sandboxes HTTP/1.1\r\nHost: x\r\n\r\n").await;
        answer.starts_with("HTTP/1.1 200").then_some(())
    })
    .await;
    let () = freed;
    drop(watches);
    server.stop().await.unwrap();
}
