//! A throwaway single-member etcd on free loopback ports in a temp dir, for tests, benchmarks and demos.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `etcd` child process; killed and its data removed on drop.
pub struct LocalEtcd {
    child: Child,
    client_addr: SocketAddr,
    peer_addr: SocketAddr,
    dir: tempfile::TempDir,
}

/// Why a local etcd could not be started.
#[derive(Debug, thiserror::Error)]
pub enum LocalEtcdError {
    #[error("the etcd binary was not found on PATH (install it: apt-get install etcd-server, or run hack/deps.sh)")]
    NotInstalled,
    #[error("local etcd: {0}")]
    Io(#[from] std::io::Error),
    #[error("local etcd did not accept connections within {0:?}; its log: {1}")]
    NotReady(Duration, String),
}

impl LocalEtcd {
    /// Starts etcd listening on 127.0.0.1 and waits until it accepts client connections.
    pub fn start() -> Result<LocalEtcd, LocalEtcdError> {
        let mut last = None;
        // Free ports are found by binding and releasing them, so another process can take one in between.
        for _ in 0..3 {
            match Self::start_once() {
                Ok(etcd) => return Ok(etcd),
                Err(LocalEtcdError::NotInstalled) => return Err(LocalEtcdError::NotInstalled),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("at least one attempt"))
    }

    fn start_once() -> Result<LocalEtcd, LocalEtcdError> {
        let dir = tempfile::Builder::new().prefix("sandboxd-etcd-").tempdir()?;
        let (client_addr, peer_addr) = (free_loopback_addr()?, free_loopback_addr()?);
        let child = spawn(dir.path(), client_addr, peer_addr)?;
        let mut etcd = LocalEtcd { child, client_addr, peer_addr, dir };
        etcd.wait_until_serving(Duration::from_secs(20))?;
        Ok(etcd)
    }

    /// Starts etcd again on the same data and ports after `kill`, as a member coming back.
    pub fn restart(&mut self) -> Result<(), LocalEtcdError> {
        self.kill();
        std::fs::write(self.log_path(), "")?;
        self.child = spawn(self.dir.path(), self.client_addr, self.peer_addr)?;
        self.wait_until_serving(Duration::from_secs(20))
    }

    /// `host:port` of the client listener.
    pub fn addr(&self) -> SocketAddr {
        self.client_addr
    }

    /// The store URL naming this etcd: `etcd://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("etcd://{}", self.client_addr)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    fn wait_until_serving(&mut self, limit: Duration) -> Result<(), LocalEtcdError> {
        let started = Instant::now();
        while started.elapsed() < limit {
            if let Some(status) = self.child.try_wait()? {
                return Err(LocalEtcdError::NotReady(limit, format!("exited with {status}: {}", self.log_tail())));
            }
            // "ready to serve client requests" is printed once the member has elected itself.
            if std::fs::read_to_string(self.log_path()).is_ok_and(|log| log.contains("ready to serve client requests"))
                && std::net::TcpStream::connect_timeout(&self.client_addr, Duration::from_millis(200)).is_ok()
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(LocalEtcdError::NotReady(limit, self.log_tail()))
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().rev().take(5).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }

    /// Kills etcd at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for LocalEtcd {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn(dir: &std::path::Path, client_addr: SocketAddr, peer_addr: SocketAddr) -> Result<Child, LocalEtcdError> {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("etcd.log"))?;
    let client_url = format!("http://{client_addr}");
    let peer_url = format!("http://{peer_addr}");
    Command::new("etcd")
        .args(["--name", "local", "--data-dir"])
        .arg(dir.join("data"))
        .args(["--listen-client-urls", &client_url, "--advertise-client-urls", &client_url])
        .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("local={peer_url}")])
        // One member on loopback: elect at once.
        .args(["--heartbeat-interval", "10", "--election-timeout", "100"])
        .args(["--quota-backend-bytes", &(2u64 << 30).to_string()])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => LocalEtcdError::NotInstalled,
            _ => LocalEtcdError::Io(e),
        })
}

fn free_loopback_addr() -> std::io::Result<SocketAddr> {
    std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()
}
