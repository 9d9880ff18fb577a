//! One container under an OCI runtime (runc, or runsc for gVisor): its bundle, started detached
//! from the agent so it outlives an agent restart, its exit code, its log file (rotated at a size
//! cap), and its removal.
//!
//! `<runtime> run` (not `-d`) is started in a session of its own by `setsid`, through a shell that
//! writes the runtime's exit status to `exit_code` when the container ends. The runtime stays in the
//! foreground until the container ends, so the status is the container's; stdout and stderr go to
//! `output.log`, opened for appending so that rotation by copy-and-truncate keeps working while the
//! container writes. runc and runsc share this command line (`run`, `state`, `kill`, `delete`).

use super::host::{run, run_quietly};
use crate::error::RuntimeError;
use sandboxd_api::RuntimeClass;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The files of one container under its sandbox's directory.
#[derive(Debug, Clone)]
pub(crate) struct Bundle {
    /// The runc container id (unique on the node).
    pub id: String,
    pub dir: PathBuf,
}

/// What runc and the exit file say about a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ContainerState {
    Running,
    Exited(i32),
    /// Neither running under runc nor ended with a recorded status (the node rebooted, or it was killed
    /// together with its shim).
    Vanished,
}

/// The shim: runs the runtime (its program and global flags are the shell's arguments) in the
/// foreground and records its exit status atomically. The runtime writes the pid file once the
/// container (runc) or its sandbox (runsc) exists, which is how `start` knows it runs.
/// Its arguments: bundle, container id, exit file, then the runtime's program and global flags.
const SHIM: &str = r#"b="$1"; i="$2"; x="$3"; shift 3; "$@" run --bundle "$b" --pid-file "$b/pid" "$i"; echo $? > "$x.partial" && mv "$x.partial" "$x""#;

/// One OCI runtime binary of a runtime class, with the state root of this agent's containers (kept
/// apart from other users of the binary) and the global flags every call gets.
#[derive(Debug, Clone)]
pub(crate) struct OciRuntime {
    pub class: RuntimeClass,
    pub program: String,
    pub root: String,
    pub global_args: Vec<String>,
}

impl OciRuntime {
    /// The program and the arguments that come before a subcommand.
    pub fn prefix(&self) -> Vec<String> {
        let mut all = vec![self.program.clone(), "--root".into(), self.root.clone()];
        all.extend(self.global_args.iter().cloned());
        all
    }

    pub async fn run(&self, args: &[&str]) -> Result<String, RuntimeError> {
        let prefix = self.prefix();
        let mut all: Vec<&str> = prefix[1..].iter().map(String::as_str).collect();
        all.extend_from_slice(args);
        run(&self.program, &all).await
    }
}

impl Bundle {
    pub fn new(id: String, dir: PathBuf) -> Bundle {
        Bundle { id, dir }
    }

    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("output.log")
    }

    fn exit_path(&self) -> PathBuf {
        self.dir.join("exit_code")
    }

    /// Mounts the image layers with a writable layer of this container's own as its rootfs.
    pub async fn mount_rootfs(&self, lower_dirs: &[PathBuf]) -> Result<(), RuntimeError> {
        let (upper, work, rootfs) = (self.dir.join("upper"), self.dir.join("work"), self.rootfs());
        for dir in [&upper, &work, &rootfs] {
            std::fs::create_dir_all(dir).map_err(|e| RuntimeError::Failed(format!("{}: {e}", dir.display())))?;
        }
        let lower: Vec<String> = lower_dirs.iter().map(|d| d.display().to_string()).collect();
        let options = format!("lowerdir={},upperdir={},workdir={}", lower.join(":"), upper.display(), work.display());
        run("mount", &["-t", "overlay", "overlay", "-o", &options, &rootfs.display().to_string()]).await.map(|_| ())
    }

    /// Makes the rootfs's `/tmp` world-writable and sticky (creating it when the image has none), for the gVisor
    /// bind of `/tmp` (see `spec::runtime_config`). The bind's source is a host path, so an image
    /// whose `/tmp` is a symlink (say to `/`) is refused rather than followed on the host.
    pub fn ensure_tmp(&self) -> Result<(), RuntimeError> {
        use std::os::unix::fs::PermissionsExt;
        let tmp = self.rootfs().join("tmp");
        let failed = |e: std::io::Error| RuntimeError::Failed(format!("{}: {e}", tmp.display()));
        match std::fs::symlink_metadata(&tmp) {
            // World-writable as runc's tmpfs is, whatever the image says.
            Ok(meta) if meta.is_dir() => {
                return std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777)).map_err(failed)
            }
            Ok(_) => {
                return Err(RuntimeError::Failed(
                    "the image's /tmp is not a directory; the gvisor runtime class needs one".into(),
                ))
            }
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(failed(e)),
            Err(_) => {}
        }
        std::fs::create_dir(&tmp).map_err(failed)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777)).map_err(failed)
    }

    /// Writes `config.json` and starts the container; returns once it runs (or already ended).
    /// The CPU quota is set afterwards (`Cgroups::limit_cpu`): runc's own init runs in the container's
    /// cgroup, and at a 10m quota (1 ms per 100 ms) it alone took half a second.
    pub async fn start(&self, runtime: &OciRuntime, config: &serde_json::Value) -> Result<(), RuntimeError> {
        let failed =
            |what: &str, e: std::io::Error| RuntimeError::Failed(format!("{what} of container {}: {e}", self.id));
        let config = serde_json::to_vec_pretty(config).expect("configs serialize");
        std::fs::write(self.dir.join("config.json"), config).map_err(|e| failed("config", e))?;
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| failed("log file", e))?;
        let log_err = log.try_clone().map_err(|e| failed("log file", e))?;
        let bundle = self.dir.display().to_string();
        let exit = self.exit_path().display().to_string();
        let status = tokio::process::Command::new("setsid")
            .args(["-f", "sh", "-c", SHIM, "sbxlet-shim", &bundle, &self.id, &exit])
            .args(runtime.prefix())
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .status()
            .await
            .map_err(|e| failed("setsid", e))?;
        if !status.success() {
            return Err(RuntimeError::Failed(format!("starting container {}: setsid {status}", self.id)));
        }
        self.wait_started().await
    }

    /// Waits until runc wrote the container's pid file (it runs) or the shim recorded an end (a bad
    /// entrypoint exits at once). Files, not `runc state`: each runc call costs milliseconds of CPU.
    async fn wait_started(&self) -> Result<(), RuntimeError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut pause = Duration::from_millis(1);
        let pid_file = self.dir.join("pid");
        while !pid_file.exists() && self.exit_code().is_none() {
            if tokio::time::Instant::now() > deadline {
                return Err(RuntimeError::Failed(format!("container {} did not start within 30s", self.id)));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(5));
        }
        Ok(())
    }

    /// The container's state: the recorded exit status first, then the runtime's view.
    pub async fn state(&self, runtime: &OciRuntime) -> ContainerState {
        if let Some(code) = self.exit_code() {
            return ContainerState::Exited(code);
        }
        match runtime.run(&["state", &self.id]).await {
            Ok(out) if out.contains("\"status\": \"running\"") || out.contains("\"status\": \"created\"") => {
                ContainerState::Running
            }
            // Stopped but the shim has not written the status yet: check the file once more.
            Ok(_) => self.exit_code().map_or(ContainerState::Running, ContainerState::Exited),
            Err(_) => self.exit_code().map_or(ContainerState::Vanished, ContainerState::Exited),
        }
    }

    /// The first of `runtimes` that knows this container (the first one when none does).
    pub async fn owner<'a>(&self, runtimes: &[&'a OciRuntime]) -> &'a OciRuntime {
        for runtime in runtimes {
            if runtime.run(&["state", &self.id]).await.is_ok() {
                return runtime;
            }
        }
        runtimes[0]
    }

    fn exit_code(&self) -> Option<i32> {
        std::fs::read_to_string(self.exit_path()).ok()?.trim().parse().ok()
    }

    /// Asks the container to stop (SIGTERM to its first process) and waits up to `grace` for it to
    /// end, as a graceful stop does before the kill. A container that ignores the signal (a shell as
    /// pid 1 without a trap) takes the whole grace.
    pub async fn stop(&self, runtime: &OciRuntime, grace: Duration) {
        if self.exit_code().is_some() || runtime.run(&["kill", &self.id, "TERM"]).await.is_err() {
            return;
        }
        let deadline = tokio::time::Instant::now() + grace;
        let mut pause = Duration::from_millis(5);
        while self.exit_code().is_none() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    /// Kills the container, waits (boundedly) for its shim to record the end, and removes runc's
    /// record, the rootfs mount and the bundle directory.
    pub async fn remove(&self, runtime: &OciRuntime) {
        let _ = runtime.run(&["kill", &self.id, "KILL"]).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self.exit_code().is_none() && runtime.run(&["state", &self.id]).await.is_ok() {
            if tokio::time::Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = runtime.run(&["delete", "--force", &self.id]).await;
        let rootfs = self.rootfs();
        if is_mount_point(&rootfs) {
            run_quietly("umount", &[&rootfs.display().to_string()]).await;
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(dir = %self.dir.display(), error = %e, "container directory not removed");
            }
        }
    }

    /// Moves the log aside once it passes `cap` bytes: the last half is kept in `output.log.1`, and the
    /// live file is truncated (the container appends, so it writes on at the new end).
    pub fn rotate_log(&self, cap: u64) {
        let path = self.log_path();
        let Ok(meta) = std::fs::metadata(&path) else { return };
        if meta.len() <= cap {
            return;
        }
        if let Ok(bytes) = std::fs::read(&path) {
            let keep = &bytes[bytes.len().saturating_sub((cap / 2) as usize)..];
            let _ = std::fs::write(self.dir.join("output.log.1"), keep);
            let _ = std::fs::File::options().write(true).open(&path).and_then(|f| f.set_len(0));
        }
    }

    /// The container's output lines, the rotated part first.
    pub fn log_lines(&self) -> Vec<String> {
        let mut text = std::fs::read_to_string(self.dir.join("output.log.1")).unwrap_or_default();
        text.push_str(&std::fs::read_to_string(self.log_path()).unwrap_or_default());
        text.lines().map(str::to_string).collect()
    }
}

/// Whether `path` is a mount point (listed in /proc/self/mountinfo).
pub(crate) fn is_mount_point(path: &Path) -> bool {
    let target = path.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|info| info.lines().any(|line| line.split(' ').nth(4) == Some(target.as_str())))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tmp_is_made_sticky_kept_when_present_and_never_followed_as_a_link() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let bundle = Bundle::new("c".into(), dir.path().to_path_buf());
        std::fs::create_dir(bundle.rootfs()).unwrap();
        bundle.ensure_tmp().unwrap();
        let mode = std::fs::metadata(bundle.rootfs().join("tmp")).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o1777);
        bundle.ensure_tmp().unwrap();
        std::fs::remove_dir(bundle.rootfs().join("tmp")).unwrap();
        std::os::unix::fs::symlink("/", bundle.rootfs().join("tmp")).unwrap();
        let err = bundle.ensure_tmp().unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err}");
    }

    #[test]
    fn rotation_keeps_the_tail_and_empties_the_live_file() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = Bundle::new("c".into(), dir.path().to_path_buf());
        let lines: String = (0..100).map(|i| format!("line {i:03}\n")).collect();
        std::fs::write(bundle.log_path(), &lines).unwrap();
        bundle.rotate_log(400);
        assert_eq!(std::fs::metadata(bundle.log_path()).unwrap().len(), 0);
        std::fs::write(bundle.log_path(), "line 100\n").unwrap();
        let kept = bundle.log_lines();
        assert_eq!(kept.last().map(String::as_str), Some("line 100"));
        assert!(kept.len() < 30 && kept.contains(&"line 099".to_string()), "{kept:?}");
    }
}
