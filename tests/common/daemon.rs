//! `sandboxd-o` child processes for tests that kill them: output in a log file, tail printed on failure.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// One `sandboxd-o` child; SIGKILLed on drop, its last log lines printed if the test is failing.
pub struct Daemon {
    pub name: String,
    child: Option<Child>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts `sandboxd-o ARGS` with agent traffic held to loopback.
    pub fn spawn(name: &str, args: &[String]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join(format!("{name}.log"));
        let out = File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_sandboxd-o"))
            .args(args)
            .env("SANDBOXD_LOOPBACK_ONLY", "1")
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .expect("spawn sandboxd-o");
        Daemon { name: name.to_string(), child: Some(child), log, _dir: dir }
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether the process has exited, without waiting.
    pub fn exited(&mut self) -> bool {
        self.child.as_mut().is_none_or(|c| c.try_wait().ok().flatten().is_some())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!("--- last lines of {} ---", self.name);
            for line in &lines[lines.len().saturating_sub(60)..] {
                eprintln!("{line}");
            }
        }
    }
}
