//! Host ports: a userspace proxy from `node_ip:host_port` to `sandbox_ip:container_port`.
//!
//! A proxy, rather than iptables DNAT, because it also serves connections the node makes to itself
//! (the orchestrator's readiness probe on a loopback node address), which DNAT to a bridge address
//! cannot without `route_localnet` and extra masquerading, and because nothing is left in the host's
//! tables if the agent dies. The cost is one copy through the agent per byte.

use crate::error::RuntimeError;
use crate::ports::PortUnavailable;
use sandboxd_api::agent::AgentPort;
use sandboxd_api::Protocol;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;

/// How long a connection to the sandbox may take before the client's connection is dropped.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A UDP client silent this long loses its session.
const UDP_IDLE: Duration = Duration::from_secs(60);
/// UDP clients relayed at once per port; more are dropped until sessions expire.
const MAX_UDP_SESSIONS: usize = 1024;

/// The listeners of one sandbox's host ports; dropping it (or `stop`) closes them and their connections.
#[derive(Debug)]
pub(crate) struct Proxies {
    stop: CancellationToken,
}

impl Drop for Proxies {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Binds every port or none, then relays each to `target_ip`.
pub(crate) fn publish(node_ip: IpAddr, target_ip: IpAddr, ports: &[AgentPort]) -> Result<Proxies, RuntimeError> {
    let stop = CancellationToken::new();
    let mut tcp = Vec::new();
    let mut udp = Vec::new();
    for port in ports {
        let addr = SocketAddr::new(node_ip, port.host_port);
        let unavailable = |source| RuntimeError::PortUnavailable(PortUnavailable { port: port.host_port, source });
        let target = SocketAddr::new(target_ip, port.container_port);
        match port.protocol {
            Protocol::Tcp => tcp.push((bind_tcp(addr).map_err(unavailable)?, target)),
            Protocol::Udp => udp.push((bind_udp(addr).map_err(unavailable)?, target)),
        }
    }
    for (listener, target) in tcp {
        tokio::spawn(relay_tcp(listener, target, stop.clone()));
    }
    for (socket, target) in udp {
        tokio::spawn(relay_udp(Arc::new(socket), target, stop.clone()));
    }
    Ok(Proxies { stop })
}

fn bind_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}

fn bind_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = std::net::UdpSocket::bind(addr)?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
}

async fn relay_tcp(listener: TcpListener, target: SocketAddr, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((client, _)) => {
                tokio::spawn(splice(client, target, stop.clone()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "host port accept failed");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        }
    }
}

async fn splice(mut client: TcpStream, target: SocketAddr, stop: CancellationToken) {
    let Ok(Ok(mut upstream)) = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await else {
        return; // dropping the client's connection tells it the sandbox did not answer
    };
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
    }
}

/// Relays datagrams: each client gets its own socket toward the sandbox, so replies find their way back.
async fn relay_udp(socket: Arc<UdpSocket>, target: SocketAddr, stop: CancellationToken) {
    let mut sessions: HashMap<SocketAddr, (Arc<UdpSocket>, CancellationToken)> = HashMap::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        let (len, client) = tokio::select! {
            _ = stop.cancelled() => return,
            received = socket.recv_from(&mut buf) => match received {
                Ok(r) => r,
                Err(_) => continue,
            },
        };
        sessions.retain(|_, (_, ended)| !ended.is_cancelled());
        if !sessions.contains_key(&client) && sessions.len() >= MAX_UDP_SESSIONS {
            continue;
        }
        let upstream = match sessions.get(&client) {
            Some((upstream, _)) => upstream.clone(),
            None => {
                let Ok(upstream) = open_upstream(target).await else { continue };
                let ended = stop.child_token();
                tokio::spawn(return_replies(upstream.clone(), socket.clone(), client, ended.clone()));
                sessions.insert(client, (upstream.clone(), ended));
                upstream
            }
        };
        let _ = upstream.send(&buf[..len]).await;
    }
}

async fn open_upstream(target: SocketAddr) -> std::io::Result<Arc<UdpSocket>> {
    let bind: SocketAddr = if target.is_ipv4() { "0.0.0.0:0".parse().unwrap() } else { "[::]:0".parse().unwrap() };
    let upstream = UdpSocket::bind(bind).await?;
    upstream.connect(target).await?;
    Ok(Arc::new(upstream))
}

async fn return_replies(
    upstream: Arc<UdpSocket>,
    socket: Arc<UdpSocket>,
    client: SocketAddr,
    ended: CancellationToken,
) {
    let mut buf = vec![0u8; 65_536];
    loop {
        tokio::select! {
            _ = ended.cancelled() => return,
            _ = tokio::time::sleep(UDP_IDLE) => { ended.cancel(); return; }
            received = upstream.recv(&mut buf) => match received {
                Ok(len) => { let _ = socket.send_to(&buf[..len], client).await; }
                Err(_) => { ended.cancel(); return; }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn port(host_port: u16, container_port: u16, protocol: Protocol) -> AgentPort {
        AgentPort { host_port, container_port, protocol }
    }

    #[tokio::test]
    async fn tcp_and_udp_are_relayed_and_closed_on_drop() {
        let ip: IpAddr = sandboxd_testkit::unique_loopback_ip().into();
        let backend = TcpListener::bind((ip, 0)).await.unwrap();
        let backend_port = backend.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut conn, _) = backend.accept().await.unwrap();
            conn.write_all(b"hello").await.unwrap();
        });
        let echo = UdpSocket::bind((ip, 0)).await.unwrap();
        let echo_port = echo.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut buf = [0u8; 16];
            let (n, from) = echo.recv_from(&mut buf).await.unwrap();
            echo.send_to(&buf[..n], from).await.unwrap();
        });

        let proxies =
            publish(ip, ip, &[port(10_001, backend_port, Protocol::Tcp), port(10_001, echo_port, Protocol::Udp)])
                .unwrap();
        let mut conn = TcpStream::connect((ip, 10_001)).await.unwrap();
        let mut got = String::new();
        conn.read_to_string(&mut got).await.unwrap();
        assert_eq!(got, "hello");

        let client = UdpSocket::bind((ip, 0)).await.unwrap();
        client.send_to(b"ping", (ip, 10_001)).await.unwrap();
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buf)).await.unwrap().unwrap();
        assert_eq!(&buf[..n], b"ping");

        drop(proxies);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(TcpStream::connect((ip, 10_001)).await.is_err(), "closed with the sandbox");
    }

    #[test]
    fn a_taken_port_fails_the_whole_publish() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let ip: IpAddr = sandboxd_testkit::unique_loopback_ip().into();
            let _squatter = std::net::TcpListener::bind((ip, 10_002)).unwrap();
            let err = publish(ip, ip, &[port(10_003, 80, Protocol::Tcp), port(10_002, 80, Protocol::Tcp)]).unwrap_err();
            assert!(err.to_string().contains("10002/tcp is in use"), "{err}");
            assert!(std::net::TcpListener::bind((ip, 10_003)).is_ok(), "nothing kept bound");
        });
    }
}
