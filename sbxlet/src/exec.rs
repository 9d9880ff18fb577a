//! A process started in a container, whatever the runtime: its streams, its control (signals,
//! terminal size, kill) and its end; plus the buffered run with output caps and a timeout, and the
//! simulator's tiny built-in command set.

use futures::future::BoxFuture;
use sandboxd_api::dataplane::ExecResult;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub type Reader = Box<dyn AsyncRead + Send + Unpin>;
pub type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// Exit code reported for a process killed by SIGKILL (a timeout, a client that left).
pub const KILLED: i32 = 128 + 9;

/// Signals, resizes and kills one running process.
pub trait ExecControl: Send + Sync {
    fn signal(&self, signal: i32) -> Result<(), String>;
    fn resize(&self, cols: u16, rows: u16) -> Result<(), String>;
    /// Kills the process (SIGKILL); its end then arrives through `ExecProcess::exit`.
    fn kill(&self);
}

/// A started process. Dropping it before its end kills it.
pub struct ExecProcess {
    pub stdin: Option<Writer>,
    pub stdout: Reader,
    /// `None` under a tty, where both streams are one.
    pub stderr: Option<Reader>,
    pub control: std::sync::Arc<dyn ExecControl>,
    /// Resolves to the exit code (128+N for a signal N).
    pub exit: BoxFuture<'static, i32>,
}

/// How long output may still arrive after the process ended (a background child can hold the pipe).
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(1);

/// Runs to completion: feeds `stdin` and closes it, keeps at most `cap` bytes of each stream, and
/// kills the process at `timeout` (counted from `started`, when the exec was asked for, so that
/// `duration_ms` includes the runtime's own start).
pub async fn run_buffered(
    process: ExecProcess,
    stdin: Option<String>,
    started: Instant,
    timeout: Duration,
    cap: usize,
) -> ExecResult {
    let ExecProcess { stdin: input, stdout, stderr, control, exit } = process;
    let feeder = tokio::spawn(async move {
        if let Some(mut input) = input {
            if let Some(text) = stdin {
                let _ = input.write_all(text.as_bytes()).await;
            }
            let _ = input.shutdown().await;
        }
    });
    let out = Captured::default();
    let err = Captured::default();
    let mut readers = tokio::task::JoinSet::new();
    readers.spawn(read_capped(stdout, cap, out.clone()));
    if let Some(stderr) = stderr {
        readers.spawn(read_capped(stderr, cap, err.clone()));
    }
    let mut exit = exit;
    let deadline = tokio::time::Instant::from_std(started) + timeout;
    let (exit_code, timed_out) = match tokio::time::timeout_at(deadline, &mut exit).await {
        Ok(code) => (code, false),
        Err(_) => {
            control.kill();
            (exit.await, true)
        }
    };
    feeder.abort();
    // A background child can hold a pipe open past the end: what arrived by then is the output.
    let all_read = tokio::time::timeout(DRAIN_AFTER_EXIT, async { while readers.join_next().await.is_some() {} });
    let incomplete = all_read.await.is_err();
    readers.abort_all();
    let (stdout, out_truncated) = out.take();
    let (stderr, err_truncated) = err.take();
    ExecResult {
        exit_code,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        duration_ms: started.elapsed().as_millis() as u64,
        truncated: out_truncated || err_truncated || incomplete,
        timed_out,
    }
}

/// Output kept so far, and whether some was dropped; shared with its reader task.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<parking_lot::Mutex<(Vec<u8>, bool)>>);

impl Captured {
    fn take(&self) -> (Vec<u8>, bool) {
        std::mem::take(&mut *self.0.lock())
    }
}

/// Reads to the end, keeping the first `cap` bytes and discarding the rest (so the writer never
/// blocks on a full pipe), and noting that something was discarded.
async fn read_capped(mut reader: Reader, cap: usize, into: Captured) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        match reader.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let mut kept = into.0.lock();
                let room = cap.saturating_sub(kept.0.len());
                kept.0.extend_from_slice(&buffer[..n.min(room)]);
                kept.1 |= n > room;
            }
        }
    }
}

/// Parses a signal given by name (`INT`, `SIGTERM`) or number.
pub fn parse_signal(text: &str) -> Result<i32, String> {
    if let Ok(number) = text.parse::<i32>() {
        return if (1..=64).contains(&number) { Ok(number) } else { Err(format!("signal {number} is out of range")) };
    }
    let name = text.trim_start_matches("SIG");
    let number = match name {
        "HUP" => 1,
        "INT" => 2,
        "QUIT" => 3,
        "KILL" => 9,
        "USR1" => 10,
        "USR2" => 12,
        "TERM" => 15,
        "CONT" => 18,
        "STOP" => 19,
        "WINCH" => 28,
        _ => return Err(format!("unknown signal {text:?}")),
    };
    Ok(number)
}

/// The simulator's commands: `true`, `false`, `echo ARGS…`, `cat` (stdin to stdout) and
/// `sleep SECONDS`. Nothing runs on the host; anything else exits 127.
pub fn builtin(command: &[String]) -> ExecProcess {
    let (stdin_ours, mut stdin_theirs) = tokio::io::duplex(64 * 1024);
    let (mut out_theirs, out_ours) = tokio::io::duplex(64 * 1024);
    let (mut err_theirs, err_ours) = tokio::io::duplex(64 * 1024);
    let (kill_tx, kill_rx) = tokio::sync::oneshot::channel::<()>();
    let command = command.to_vec();
    let run = async move {
        let args = &command[1..];
        match command[0].as_str() {
            "true" => 0,
            "false" => 1,
            "echo" => {
                let _ = out_theirs.write_all(format!("{}\n", args.join(" ")).as_bytes()).await;
                0
            }
            "cat" => {
                let _ = tokio::io::copy(&mut stdin_theirs, &mut out_theirs).await;
                0
            }
            "sleep" => match args.first().and_then(|s| s.parse::<f64>().ok()).filter(|s| s.is_finite() && *s >= 0.0) {
                Some(seconds) => {
                    tokio::time::sleep(Duration::from_secs_f64(seconds.min(86_400.0))).await;
                    0
                }
                None => {
                    let _ = err_theirs.write_all(b"sleep: invalid time\n").await;
                    1
                }
            },
            other => {
                let _ =
                    err_theirs.write_all(format!("{other}: not a command of the simulated runtime\n").as_bytes()).await;
                127
            }
        }
    };
    let exit = async move {
        tokio::select! {
            code = run => code,
            _ = kill_rx => KILLED,
        }
    };
    ExecProcess {
        stdin: Some(Box::new(stdin_ours)),
        stdout: Box::new(out_ours),
        stderr: Some(Box::new(err_ours)),
        control: std::sync::Arc::new(BuiltinControl { kill: parking_lot::Mutex::new(Some(kill_tx)) }),
        exit: Box::pin(exit),
    }
}

struct BuiltinControl {
    kill: parking_lot::Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
}

impl ExecControl for BuiltinControl {
    fn signal(&self, signal: i32) -> Result<(), String> {
        if matches!(signal, 2 | 9 | 15) {
            self.kill();
        }
        Ok(())
    }

    fn resize(&self, _cols: u16, _rows: u16) -> Result<(), String> {
        Ok(())
    }

    fn kill(&self) {
        if let Some(kill) = self.kill.lock().take() {
            let _ = kill.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(words: &[&str]) -> Vec<String> {
        words.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test]
    async fn buffered_runs_collect_output_and_exit_codes() {
        let result = run_buffered(
            builtin(&command(&["echo", "hi", "there"])),
            None,
            Instant::now(),
            Duration::from_secs(5),
            100,
        )
        .await;
        assert_eq!((result.exit_code, result.stdout.as_str(), result.truncated), (0, "hi there\n", false));
        let result =
            run_buffered(builtin(&command(&["cat"])), Some("fed".into()), Instant::now(), Duration::from_secs(5), 100)
                .await;
        assert_eq!(result.stdout, "fed");
        let result =
            run_buffered(builtin(&command(&["nope"])), None, Instant::now(), Duration::from_secs(5), 100).await;
        assert_eq!(result.exit_code, 127);
        assert!(result.stderr.contains("not a command"));
    }

    #[tokio::test]
    async fn output_over_the_cap_is_cut_and_flagged() {
        let long = "x".repeat(1000);
        let result =
            run_buffered(builtin(&command(&["echo", &long])), None, Instant::now(), Duration::from_secs(5), 10).await;
        assert_eq!((result.stdout.len(), result.truncated), (10, true));
    }

    #[tokio::test(start_paused = true)]
    async fn a_timeout_kills_and_says_so() {
        let result =
            run_buffered(builtin(&command(&["sleep", "100"])), None, Instant::now(), Duration::from_secs(2), 10).await;
        assert_eq!((result.exit_code, result.timed_out), (KILLED, true));
        assert!(result.duration_ms < 5_000, "{}", result.duration_ms);
    }

    #[test]
    fn signals_parse_by_name_or_number() {
        assert_eq!(parse_signal("INT"), Ok(2));
        assert_eq!(parse_signal("SIGTERM"), Ok(15));
        assert_eq!(parse_signal("9"), Ok(9));
        assert!(parse_signal("0").is_err());
        assert!(parse_signal("BOGUS").is_err());
    }
}
