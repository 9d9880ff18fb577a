//! `exec` in a running container (runc or gVisor's runsc): a process in the container's namespaces
//! and cgroup, with piped streams or a pseudo-terminal, signals delivered to it (not to the runtime),
//! and a kill that cannot miss.
//!
//! runc forwards the signals it receives, but SIGKILL cannot be forwarded: killing runc would leave
//! the process running in the container. So runc writes the process's host pid (`--pid-file`), and
//! signals and kills go to that pid. A process under gVisor has no host pid: runsc writes its pid
//! inside the sandbox (`--internal-pid-file`), and signals and kills go through `runsc kill --pid`.
//!
//! Under a tty, the runtime stays in the foreground (so that it reports the exit code) with a
//! terminal of ours as its stdio: runc only hands a terminal over a console socket when it detaches,
//! and a detached process's exit code is lost. The runtime copies between that terminal and the
//! container's own, and on SIGWINCH it gives the container's terminal the size of ours; a resize
//! sets ours and sends the runtime SIGWINCH. runsc takes the process (tty, env, cwd) as a
//! `process.json` rather than as flags.

use super::container::{Bundle, OciRuntime};
use crate::error::RuntimeError;
use crate::exec::{ExecControl, ExecProcess, KILLED};
use rustix::process::{kill_process, Pid, Signal};
use sandboxd_api::dataplane::ExecRequest;
use sandboxd_api::RuntimeClass;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

/// Longest a `runsc kill` (a signal to a process under gVisor) may take.
const GVISOR_SIGNAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts `request` in the container of `bundle`.
pub(crate) async fn spawn(
    runtime: &OciRuntime,
    bundle: &Bundle,
    request: &ExecRequest,
) -> Result<ExecProcess, RuntimeError> {
    let scratch = Scratch::create()?;
    let mut args: Vec<String> = runtime.prefix().split_off(1);
    args.push("exec".into());
    args.extend(["--pid-file".into(), scratch.pid_file().display().to_string()]);
    match runtime.class {
        RuntimeClass::Runc => {
            if let Some(dir) = &request.work_dir {
                args.extend(["--cwd".into(), dir.clone()]);
            }
            for var in &request.env {
                args.extend(["--env".into(), format!("{}={}", var.name, var.value)]);
            }
            if request.tty {
                args.push("--tty".into());
            }
            args.push(bundle.id.clone());
            args.extend(request.command.iter().cloned());
        }
        RuntimeClass::Gvisor => {
            let process = gvisor_process(&bundle.dir, request)?;
            let process_file = scratch.dir.join("process.json");
            std::fs::write(&process_file, serde_json::to_vec(&process).expect("processes serialize"))
                .map_err(|e| RuntimeError::Failed(format!("exec process file: {e}")))?;
            args.extend(["--process".into(), process_file.display().to_string()]);
            args.extend(["--internal-pid-file".into(), scratch.internal_pid_file().display().to_string()]);
            args.push(bundle.id.clone());
        }
    }
    let terminal = if request.tty { Some(Terminal::open()?) } else { None };

    let mut command = tokio::process::Command::new(&runtime.program);
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
        command.spawn().map_err(|e| RuntimeError::Failed(format!("starting {} exec: {e}", runtime.program)))?;
    drop(command);
    let target = match runtime.class {
        RuntimeClass::Runc => Target::HostPid(scratch.pid_file()),
        RuntimeClass::Gvisor => Target::Gvisor {
            runtime: runtime.clone(),
            container: bundle.id.clone(),
            pid_file: scratch.internal_pid_file(),
        },
    };
    wait_for_pid(target.pid_file(), &mut child).await;
    let control = Arc::new(RuncExecControl { target, runc_pid: child.id(), terminal: parking_lot::Mutex::new(None) });
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

/// The `process.json` of an exec under runsc: the container's own process settings (user, env,
/// capabilities, limits) with the request's command, working directory, environment and terminal.
fn gvisor_process(bundle_dir: &Path, request: &ExecRequest) -> Result<serde_json::Value, RuntimeError> {
    let config: serde_json::Value = std::fs::read(bundle_dir.join("config.json"))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .ok_or_else(|| RuntimeError::Failed(format!("the container's config.json in {}", bundle_dir.display())))?;
    let mut process = config["process"].clone();
    process["args"] = serde_json::json!(request.command);
    process["terminal"] = serde_json::json!(request.tty);
    if let Some(dir) = &request.work_dir {
        process["cwd"] = serde_json::json!(dir);
    }
    let mut env: Vec<String> = serde_json::from_value(process["env"].clone()).unwrap_or_default();
    for var in &request.env {
        let prefix = format!("{}=", var.name);
        env.retain(|e| !e.starts_with(&prefix));
        env.push(format!("{}={}", var.name, var.value));
    }
    process["env"] = serde_json::json!(env);
    Ok(process)
}

/// Waits (boundedly) until runc wrote the process's pid, so that a signal or a kill sent right after
/// the start reaches the process; a runc that ended first (a bad command) ends the wait too.
async fn wait_for_pid(pid_file: &Path, child: &mut tokio::process::Child) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    // runc writes the pid after ~20 ms; checking every millisecond costs one stat each.
    let mut pause = std::time::Duration::from_micros(500);
    while read_pid(pid_file).is_none() && matches!(child.try_wait(), Ok(None)) && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(std::time::Duration::from_millis(1));
    }
}

/// A private directory for the runtime's pid files and process file, removed when the process ends.
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

    fn internal_pid_file(&self) -> PathBuf {
        self.dir.join("internal-pid")
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

/// Where an exec'd process's pid is written, and how it is signalled.
#[derive(Clone)]
enum Target {
    /// runc: the process's host pid, signalled directly.
    HostPid(PathBuf),
    /// gVisor: the pid inside the sandbox of `container`, signalled through `runsc kill --pid`.
    Gvisor { runtime: OciRuntime, container: String, pid_file: PathBuf },
}

impl Target {
    fn pid_file(&self) -> &Path {
        match self {
            Target::HostPid(file) | Target::Gvisor { pid_file: file, .. } => file,
        }
    }

    /// The process's pid (host or sandbox), once the runtime has written it.
    fn pid(&self) -> Option<i32> {
        read_pid(self.pid_file())
    }

    fn signal(&self, pid: i32, signal: Signal) -> Result<(), String> {
        match self {
            Target::HostPid(_) => {
                let pid = Pid::from_raw(pid).ok_or("the process has not started or has ended")?;
                kill_process(pid, signal).map_err(|e| format!("signal: {e}"))
            }
            Target::Gvisor { runtime, container, .. } => {
                let mut command = std::process::Command::new(&runtime.program);
                command.args(runtime.prefix().split_off(1));
                command.args(["kill", "--pid", &pid.to_string(), container, &signal.as_raw().to_string()]);
                run_bounded(command, GVISOR_SIGNAL_TIMEOUT)
            }
        }
    }
}

fn read_pid(file: &Path) -> Option<i32> {
    std::fs::read_to_string(file).ok()?.trim().parse().ok()
}

/// Runs a short command to its end, killed past `limit`; fails with what it said.
fn run_bounded(mut command: std::process::Command, limit: Duration) -> Result<(), String> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("signal: {e}"))?;
    let deadline = std::time::Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => {
                let mut said = String::new();
                if let Some(mut stderr) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut stderr, &mut said);
                }
                return Err(format!("signal: {status}: {}", said.trim()));
            }
            Ok(None) if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("signal: no answer within {limit:?}"));
            }
        }
    }
}

struct RuncExecControl {
    target: Target,
    /// The runtime's own `exec` process.
    runc_pid: Option<u32>,
    terminal: parking_lot::Mutex<Option<OwnedFd>>,
}

/// SIGKILL to a host pid (runc's processes).
fn kill_host_pid(pid: i32) {
    if let Some(pid) = Pid::from_raw(pid) {
        let _ = kill_process(pid, Signal::KILL);
    }
}

impl ExecControl for RuncExecControl {
    fn signal(&self, signal: i32) -> Result<(), String> {
        let signal = Signal::from_named_raw(signal).ok_or_else(|| format!("signal {signal} is not valid"))?;
        let pid = self.target.pid().ok_or("the process has not started or has ended")?;
        self.target.signal(pid, signal)
    }

    fn resize(&self, cols: u16, rows: u16) -> Result<(), String> {
        let terminal = self.terminal.lock();
        let master = terminal.as_ref().ok_or("the session has no terminal")?;
        let size = rustix::termios::Winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
        rustix::termios::tcsetwinsize(master, size).map_err(|e| format!("resize: {e}"))?;
        // The runtime copies the new size to the container's terminal when it gets SIGWINCH.
        let runc = self.runc_pid.and_then(|p| Pid::from_raw(p as i32)).ok_or("the runtime has ended")?;
        kill_process(runc, Signal::WINCH).map_err(|e| format!("resize: {e}"))
    }

    fn kill(&self) {
        if let Target::Gvisor { .. } = self.target {
            self.kill_in_gvisor();
            return;
        }
        if let Some(pid) = self.target.pid() {
            kill_host_pid(pid);
            return;
        }
        // Not started yet (or runc is slow to say so): stopping runc stops a start that is still in
        // setup, and a process that appears anyway is killed when its pid is written.
        if let Some(runc) = self.runc_pid.and_then(|p| Pid::from_raw(p as i32)) {
            let _ = kill_process(runc, Signal::KILL);
        }
        let pid_file = self.target.pid_file().to_path_buf();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                for _ in 0..100 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if let Some(pid) = read_pid(&pid_file) {
                        kill_host_pid(pid);
                        return;
                    }
                }
            });
        }
    }
}

impl RuncExecControl {
    /// Under gVisor only `runsc exec` writes the process's pid, so it is left alive until the pid is
    /// known and `runsc kill` has reached the process. When that fails, `runsc exec` is killed all the
    /// same, so that the exec ends (its process may then outlive it: logged).
    fn kill_in_gvisor(&self) {
        let (target, client) = (self.target.clone(), self.runc_pid);
        std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + GVISOR_SIGNAL_TIMEOUT;
            let mut outcome = Err("its pid was never written".to_string());
            while std::time::Instant::now() < deadline {
                if let Some(pid) = target.pid() {
                    outcome = target.signal(pid, Signal::KILL);
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            if let Err(e) = outcome {
                tracing::warn!(error = %e, "an exec under gVisor was not killed; ending its runsc exec");
                if let Some(client) = client.and_then(|p| Pid::from_raw(p as i32)) {
                    let _ = kill_process(client, Signal::KILL);
                }
            }
        });
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
