//! `runc exec`: a process in a running container's namespaces and cgroup, with piped streams or a
//! pseudo-terminal, signals delivered to it (not to runc), and a kill that cannot miss.
//!
//! runc forwards the signals it receives, but SIGKILL cannot be forwarded: killing runc would leave
//! the process running in the container. So runc writes the process's host pid (`--pid-file`), and
//! signals and kills go to that pid.
//!
//! Under a tty, runc stays in the foreground (so that it reports the exit code) with a terminal of
//! ours as its stdio: runc only hands a terminal over a console socket when it detaches, and a
//! detached process's exit code is lost. runc copies between that terminal and the container's own,
//! and on SIGWINCH it gives the container's terminal the size of ours; a resize sets ours and sends
//! runc SIGWINCH.

use super::container::{Bundle, Runc};
use crate::error::RuntimeError;
use crate::exec::{ExecControl, ExecProcess, KILLED};
use rustix::process::{kill_process, Pid, Signal};
use sandboxd_api::dataplane::ExecRequest;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

/// Starts `request` in the container of `bundle`.
pub(crate) async fn spawn(runc: &Runc, bundle: &Bundle, request: &ExecRequest) -> Result<ExecProcess, RuntimeError> {
    let scratch = Scratch::create()?;
    let mut args: Vec<String> = vec!["--root".into(), runc.root.clone(), "exec".into()];
    args.extend(["--pid-file".into(), scratch.pid_file().display().to_string()]);
    if let Some(dir) = &request.work_dir {
        args.extend(["--cwd".into(), dir.clone()]);
    }
    for var in &request.env {
        args.extend(["--env".into(), format!("{}={}", var.name, var.value)]);
    }
    let terminal = if request.tty {
        args.push("--tty".into());
        Some(Terminal::open()?)
    } else {
        None
    };
    args.push(bundle.id.clone());
    args.extend(request.command.iter().cloned());

    let mut command = tokio::process::Command::new(&runc.program);
    command.args(&args).kill_on_drop(true);
    match &terminal {
        Some(terminal) => {
            command.stdin(terminal.slave()?).stdout(terminal.slave()?).stderr(terminal.slave()?);
        }
        None => {
            command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        }
    }
    let mut child =
        command.spawn().map_err(|e| RuntimeError::Failed(format!("starting {} exec: {e}", runc.program)))?;
    drop(command);
    wait_for_pid(&scratch.pid_file(), &mut child).await;
    let control = Arc::new(RuncExecControl {
        pid_file: scratch.pid_file(),
        runc_pid: child.id(),
        terminal: parking_lot::Mutex::new(None),
    });
    let (stdin, stdout, stderr): (Option<crate::exec::Writer>, crate::exec::Reader, Option<crate::exec::Reader>) =
        match terminal {
            Some(terminal) => {
                // Only runc may hold the terminal's other side now: its end is our end of file.
                let master = terminal.into_master();
                let (reader, writer) = terminal_streams(&master)?;
                *control.terminal.lock() = Some(master);
                (Some(Box::new(writer)), Box::new(reader), None)
            }
            None => {
                let stdin = child.stdin.take().expect("piped");
                let stdout = child.stdout.take().expect("piped");
                let stderr = child.stderr.take().expect("piped");
                (Some(Box::new(stdin)), Box::new(stdout), Some(Box::new(stderr)))
            }
        };
    let guard = KillUnlessEnded { control: control.clone(), ended: false };
    let exit = async move {
        let mut guard = guard;
        let code = match child.wait().await {
            Ok(status) => status
                .code()
                .unwrap_or_else(|| std::os::unix::process::ExitStatusExt::signal(&status).map_or(KILLED, |s| 128 + s)),
            Err(_) => KILLED,
        };
        guard.ended = true;
        drop(scratch);
        code
    };
    Ok(ExecProcess { stdin, stdout, stderr, control, exit: Box::pin(exit) })
}

/// Waits (boundedly) until runc wrote the process's pid, so that a signal or a kill sent right after
/// the start reaches the process; a runc that ended first (a bad command) ends the wait too.
async fn wait_for_pid(pid_file: &Path, child: &mut tokio::process::Child) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    // runc writes the pid after ~20 ms; checking every millisecond costs one stat each.
    let mut pause = std::time::Duration::from_micros(500);
    while !pid_file.exists() && matches!(child.try_wait(), Ok(None)) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(std::time::Duration::from_millis(1));
    }
}

/// A private directory for runc's pid file and console socket, removed when the process ends.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn create() -> Result<Scratch, RuntimeError> {
        let dir = std::env::temp_dir().join(format!("sbxlet-exec-{:016x}", fastrand::u64(..)));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| RuntimeError::Failed(format!("exec scratch directory {}: {e}", dir.display())))?;
        Ok(Scratch { dir })
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.join("pid")
    }
}

use std::os::unix::fs::DirBuilderExt;

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A pseudo-terminal pair: runc gets the slave side as its stdio, the agent keeps the master.
struct Terminal {
    master: OwnedFd,
    slave: std::fs::File,
}

impl Terminal {
    fn open() -> Result<Terminal, RuntimeError> {
        use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
        use rustix::termios::{tcgetattr, tcsetattr, tcsetwinsize, OptionalActions, Winsize};
        let failed = |what: &str, e: rustix::io::Errno| RuntimeError::Failed(format!("terminal ({what}): {e}"));
        let master =
            openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC).map_err(|e| failed("openpt", e))?;
        grantpt(&master).map_err(|e| failed("grantpt", e))?;
        unlockpt(&master).map_err(|e| failed("unlockpt", e))?;
        let name = ptsname(&master, Vec::new()).map_err(|e| failed("ptsname", e))?;
        let slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(rustix::fs::OFlags::NOCTTY.bits() as i32)
            .open(std::ffi::OsStr::from_bytes(name.as_bytes()))
            .map_err(|e| RuntimeError::Failed(format!("terminal: {e}")))?;
        // Raw: runc passes bytes through both ways; line editing and echo belong to the container's
        // own terminal.
        let mut mode = tcgetattr(&slave).map_err(|e| failed("tcgetattr", e))?;
        mode.make_raw();
        tcsetattr(&slave, OptionalActions::Now, &mode).map_err(|e| failed("tcsetattr", e))?;
        let size = Winsize { ws_row: 24, ws_col: 80, ws_xpixel: 0, ws_ypixel: 0 };
        tcsetwinsize(&master, size).map_err(|e| failed("size", e))?;
        Ok(Terminal { master, slave })
    }

    fn slave(&self) -> Result<std::fs::File, RuntimeError> {
        self.slave.try_clone().map_err(|e| RuntimeError::Failed(format!("terminal: {e}")))
    }

    fn into_master(self) -> OwnedFd {
        self.master
    }
}

/// The terminal master as an async reader and writer (two descriptors of it, non-blocking).
fn terminal_streams(
    master: &OwnedFd,
) -> Result<(tokio::net::unix::pipe::Receiver, tokio::net::unix::pipe::Sender), RuntimeError> {
    let failed = |e: std::io::Error| RuntimeError::Failed(format!("terminal: {e}"));
    let reader = master.try_clone().map_err(failed)?;
    let writer = master.try_clone().map_err(failed)?;
    // The descriptors share one open file description: non-blocking once is non-blocking for both.
    rustix::io::ioctl_fionbio(&reader, true).map_err(|e| failed(e.into()))?;
    let reader = tokio::net::unix::pipe::Receiver::from_owned_fd_unchecked(reader).map_err(failed)?;
    let writer = tokio::net::unix::pipe::Sender::from_owned_fd_unchecked(writer).map_err(failed)?;
    Ok((reader, writer))
}

struct RuncExecControl {
    pid_file: PathBuf,
    runc_pid: Option<u32>,
    terminal: parking_lot::Mutex<Option<OwnedFd>>,
}

impl RuncExecControl {
    /// The process's host pid, once runc has written it.
    fn process(&self) -> Option<Pid> {
        let pid: i32 = std::fs::read_to_string(&self.pid_file).ok()?.trim().parse().ok()?;
        Pid::from_raw(pid)
    }
}

impl ExecControl for RuncExecControl {
    fn signal(&self, signal: i32) -> Result<(), String> {
        let signal = Signal::from_named_raw(signal).ok_or_else(|| format!("signal {signal} is not valid"))?;
        let pid = self.process().ok_or("the process has not started or has ended")?;
        kill_process(pid, signal).map_err(|e| format!("signal: {e}"))
    }

    fn resize(&self, cols: u16, rows: u16) -> Result<(), String> {
        let terminal = self.terminal.lock();
        let master = terminal.as_ref().ok_or("the session has no terminal")?;
        let size = rustix::termios::Winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
        rustix::termios::tcsetwinsize(master, size).map_err(|e| format!("resize: {e}"))?;
        // runc copies the new size to the container's terminal when it gets SIGWINCH.
        let runc = self.runc_pid.and_then(|p| Pid::from_raw(p as i32)).ok_or("runc has ended")?;
        kill_process(runc, Signal::WINCH).map_err(|e| format!("resize: {e}"))
    }

    fn kill(&self) {
        if let Some(pid) = self.process() {
            let _ = kill_process(pid, Signal::KILL);
            return;
        }
        // Not started yet (or runc is slow to say so): stopping runc stops a start that is still in
        // setup, and a process that appears anyway is killed when its pid is written.
        if let Some(runc) = self.runc_pid.and_then(|p| Pid::from_raw(p as i32)) {
            let _ = kill_process(runc, Signal::KILL);
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let pid_file = self.pid_file.clone();
            runtime.spawn(async move {
                for _ in 0..100 {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    let pid = std::fs::read_to_string(&pid_file).ok().and_then(|p| p.trim().parse::<i32>().ok());
                    if let Some(pid) = pid.and_then(Pid::from_raw) {
                        let _ = kill_process(pid, Signal::KILL);
                        return;
                    }
                }
            });
        }
    }
}

/// Kills the process if its exec ends without having waited for it (the caller went away).
struct KillUnlessEnded {
    control: Arc<RuncExecControl>,
    ended: bool,
}

impl Drop for KillUnlessEnded {
    fn drop(&mut self) {
        if !self.ended {
            self.control.kill();
        }
    }
}

/// The pid file of a running container's first process (for its root directory).
pub(crate) fn container_pid(bundle_dir: &Path) -> Option<u32> {
    std::fs::read_to_string(bundle_dir.join("pid")).ok()?.trim().parse().ok()
}
