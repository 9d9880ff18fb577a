//! Host commands (`ip`, `iptables`, `mount`, `runc`), each bounded in time, failing with what the
//! command said.

use crate::error::RuntimeError;
use std::process::Stdio;
use std::time::Duration;

/// Longest any host command may take; a hung `runc` or `iptables` must not hang a request.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `program args…` and returns its stdout; a failure names the command and carries its stderr.
pub(crate) async fn run(program: &str, args: &[&str]) -> Result<String, RuntimeError> {
    run_within(COMMAND_TIMEOUT, program, args).await
}

/// Like `run`, with a time limit of the caller's.
pub(crate) async fn run_within(limit: Duration, program: &str, args: &[&str]) -> Result<String, RuntimeError> {
    let describe = || format!("{program} {}", args.join(" "));
    let mut command = tokio::process::Command::new(program);
    command.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    let output = tokio::time::timeout(limit, command.output())
        .await
        .map_err(|_| RuntimeError::Failed(format!("{} timed out after {limit:?}", describe())))?
        .map_err(|e| RuntimeError::Failed(format!("{}: {e}", describe())))?;
    if output.status.success() {
        return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    Err(RuntimeError::Failed(format!("{} failed ({}): {}", describe(), output.status, stderr.trim())))
}

/// Like `run`, for teardown: a failure is logged, not returned, so one missing piece does not stop
/// the removal of the others.
pub(crate) async fn run_quietly(program: &str, args: &[&str]) {
    if let Err(e) = run(program, args).await {
        tracing::debug!(error = %e, "teardown step skipped");
    }
}
