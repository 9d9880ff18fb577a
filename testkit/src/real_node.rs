//! `sbxlet --runtime runc` in a process of its own, with a bridge, address pool, cgroup parent and
//! state directory of its own; on drop it is killed and `sbxlet purge` removes everything it made,
//! so a test that fails still leaves nothing behind.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A real node agent for tests and benchmarks (needs root).
pub struct RealNode {
    child: Option<Child>,
    binary: PathBuf,
    pub addr: SocketAddr,
    pub bridge: String,
    pub cgroup_parent: String,
    pub ip_pool: String,
    /// Flags of this test's own (`--runsc …`), given at every start.
    extra_args: Vec<String>,
    state: tempfile::TempDir,
}

impl RealNode {
    /// Starts `binary` (an sbxlet) as a real node; `slot` (0–9) keeps bridges and pools of several
    /// nodes in one process apart.
    pub fn start(binary: &Path, slot: u32) -> std::io::Result<RealNode> {
        RealNode::start_with(binary, slot, &[])
    }

    /// Like `start`, with more sbxlet flags.
    pub fn start_with(binary: &Path, slot: u32, extra_args: &[&str]) -> std::io::Result<RealNode> {
        let state = tempfile::Builder::new().prefix("sbxlet-state-").tempdir()?;
        let n = std::process::id() % 1000 * 10 + slot;
        let mut node = RealNode {
            child: None,
            binary: binary.to_path_buf(),
            addr: crate::exclusive_addr(8080),
            bridge: format!("sbxe{n}"),
            cgroup_parent: format!("sandboxd-e2e-{n}"),
            ip_pool: format!("10.{}.{}.0/24", 200 + n / 250 % 50, n % 250),
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            state,
        };
        node.restart()?;
        Ok(node)
    }

    pub fn state_dir(&self) -> &Path {
        self.state.path()
    }

    /// The flags that select this node's bridge, cgroups and state (shared by run and purge).
    fn node_flags(&self) -> Vec<String> {
        let state = self.state_dir().display().to_string();
        ["--state-dir", &state, "--bridge", &self.bridge, "--cgroup-parent", &self.cgroup_parent]
            .map(String::from)
            .to_vec()
    }

    /// Starts the agent and waits until it answers.
    pub fn restart(&mut self) -> std::io::Result<()> {
        let log_path = self.state_dir().join("sbxlet.log");
        let log = std::fs::File::options().create(true).append(true).open(&log_path)?;
        let child = Command::new(&self.binary)
            .args(["--runtime", "runc", "--listen", &self.addr.to_string(), "--ip-pool", &self.ip_pool])
            .args(self.node_flags())
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        // Answering, not only accepting: the listener is bound before the runtime classes are probed.
        while !answers_healthz(self.addr) {
            let exited = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > deadline {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                return Err(std::io::Error::other(format!("sbxlet did not start ({exited:?}); its log:\n{log}")));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// SIGKILL, as a crash would; the sandboxes keep running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The agent's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// What the agent logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.state_dir().join("sbxlet.log")).unwrap_or_default()
    }

    /// `sbxlet image import` of an OCI archive into this node's store; returns the references.
    pub fn import(&self, archive: &Path) -> std::io::Result<String> {
        let out = Command::new(&self.binary)
            .args(["image", "import", &archive.display().to_string(), "--state-dir"])
            .arg(self.state_dir())
            .output()?;
        if !out.status.success() {
            return Err(std::io::Error::other(String::from_utf8_lossy(&out.stderr).into_owned()));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

/// Whether `GET /healthz` at `addr` answers 200 within a second.
fn answers_healthz(addr: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    if stream.write_all(b"GET /healthz HTTP/1.0\r\nHost: sbxlet\r\n\r\n").is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.") && &head[9..12] == b"200"
}

impl Drop for RealNode {
    fn drop(&mut self) {
        self.kill();
        let purged = Command::new(&self.binary).arg("purge").args(self.node_flags()).status();
        if !purged.is_ok_and(|s| s.success()) {
            eprintln!("`sbxlet purge` of the test node failed; check `ip netns`, `iptables -S` and mounts");
        }
    }
}
