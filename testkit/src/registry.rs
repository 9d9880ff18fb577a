//! A throwaway OCI distribution registry (Debian's `docker-registry`) on a loopback address of the
//! test's own, storing into a temp dir.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `docker-registry`; killed and its storage removed on drop.
pub struct LocalRegistry {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl LocalRegistry {
    /// Starts the registry and waits until `GET /v2/` answers.
    pub fn start() -> std::io::Result<LocalRegistry> {
        let dir = tempfile::Builder::new().prefix("sandboxd-registry-").tempdir()?;
        let addr = crate::exclusive_addr(5000);
        let config = dir.path().join("config.yml");
        let storage = dir.path().join("storage");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
                storage.display()
            ),
        )?;
        let log = std::fs::File::create(dir.path().join("registry.log"))?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let mut registry = LocalRegistry { child, addr, _dir: dir };
        registry.wait_until_serving(Duration::from_secs(20))?;
        Ok(registry)
    }

    /// How many times a blob was served (`GET /v2/{repository}/blobs/{digest}` answered).
    pub fn blob_downloads(&self, repository: &str, digest: &str) -> usize {
        let log = std::fs::read_to_string(self._dir.path().join("registry.log")).unwrap_or_default();
        let uri = format!("http.request.uri=\"/v2/{repository}/blobs/{digest}\"");
        log.lines().filter(|l| l.contains("response completed") && l.contains(&uri) && l.contains("GET")).count()
    }

    /// `host:port` of the registry, as image references name it.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn wait_until_serving(&mut self, limit: Duration) -> std::io::Result<()> {
        let started = Instant::now();
        while started.elapsed() < limit {
            if let Some(status) = self.child.try_wait()? {
                return Err(std::io::Error::other(format!("docker-registry exited with {status}")));
            }
            if let Ok(mut stream) = std::net::TcpStream::connect(self.addr) {
                use std::io::{Read, Write};
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                let request = format!("GET /v2/ HTTP/1.0\r\nHost: {}\r\n\r\n", self.addr);
                let mut answer = String::new();
                let answered =
                    stream.write_all(request.as_bytes()).is_ok() && stream.read_to_string(&mut answer).is_ok();
                if answered && (answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200")) {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(std::io::Error::other(format!("docker-registry did not answer on {} within {limit:?}", self.addr)))
    }
}

impl Drop for LocalRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
