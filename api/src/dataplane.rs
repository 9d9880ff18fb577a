//! Wire types of the data plane: exec (buffered and streamed), files and log streams.
//!
//! The same shapes serve the orchestrator (`/api/v1/sandboxes/{id}/…`) and the agent, which the
//! orchestrator proxies to. The streamed exec protocol is described in `docs/semantics.md`.

use crate::sandbox::EnvVar;
use serde::{Deserialize, Serialize};

/// Longest timeout an exec may ask for.
pub const MAX_EXEC_TIMEOUT_SECONDS: u64 = 24 * 3600;
/// Timeout of a buffered exec that names none.
pub const DEFAULT_EXEC_TIMEOUT_SECONDS: u64 = 60;
/// Longest command line (all arguments together), in bytes.
pub const MAX_COMMAND_BYTES: usize = 128 * 1024;

/// `POST /api/v1/sandboxes/{id}/exec` (buffered) and the first frame of a streamed exec.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// The container to run in; the sandbox's first container when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// The program and its arguments, run without a shell.
    pub command: Vec<String>,
    /// Added to the container's own environment.
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "crate::objects_only::list")]
    pub env: Vec<EnvVar>,
    /// Absolute working directory; the container's own when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work_dir: Option<String>,
    /// Fed to the process's standard input, which is then closed (buffered exec only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    /// The process is killed after this many seconds (default 60 for a buffered exec, none for a
    /// streamed one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u64>,
    /// Streamed exec only: run under a pseudo-terminal (stdout and stderr are then one stream).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tty: bool,
}

impl ExecRequest {
    /// What is wrong with the request, if anything, before anything runs.
    pub fn problem(&self) -> Option<String> {
        if self.command.is_empty() || self.command[0].is_empty() {
            return Some("command: must name a program".into());
        }
        let bytes: usize = self.command.iter().map(|a| a.len() + 1).sum();
        if bytes > MAX_COMMAND_BYTES {
            return Some(format!("command: {bytes} bytes is more than {MAX_COMMAND_BYTES}"));
        }
        if self.command.iter().any(|a| a.contains('\0')) {
            return Some("command: must not contain NUL".into());
        }
        if let Some(bad) = self.env.iter().find(|e| !crate::syntax::is_env_name(&e.name)) {
            return Some(format!("env: {} is not a valid variable name", crate::syntax::shown(&bad.name)));
        }
        // The same rule as a container's env in a sandbox spec, which shares the schema.
        if self.env.iter().any(|e| !crate::syntax::is_printable(&e.value, true)) {
            return Some("env: values must not contain control characters other than tab and newline".into());
        }
        if let Some(dir) = &self.work_dir {
            if !dir.starts_with('/') || dir.contains('\0') {
                return Some(format!("work_dir: {dir:?} must be an absolute path"));
            }
        }
        match self.timeout_seconds {
            Some(0) => Some("timeout_seconds: must be at least 1".into()),
            Some(t) if t > MAX_EXEC_TIMEOUT_SECONDS => {
                Some(format!("timeout_seconds: {t} is more than {MAX_EXEC_TIMEOUT_SECONDS}"))
            }
            _ => None,
        }
    }
}

/// The answer of a buffered exec.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ExecResult {
    /// The process's exit code; 128+N when a signal N ended it (137 after a timeout).
    pub exit_code: i32,
    /// Standard output, UTF-8 (invalid sequences replaced), at most the output cap.
    pub stdout: String,
    pub stderr: String,
    pub duration_ms: u64,
    /// Some output was dropped because it passed the cap.
    pub truncated: bool,
    /// The process was killed because it passed `timeout_seconds`.
    #[serde(default)]
    pub timed_out: bool,
}

/// Channel byte that starts every binary frame of a streamed exec (Kubernetes' channel numbering).
pub mod channel {
    pub const STDIN: u8 = 0;
    pub const STDOUT: u8 = 1;
    pub const STDERR: u8 = 2;
}

/// Text frames of a streamed exec after the first (which is an `ExecRequest`), in both directions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ExecFrame {
    /// Client: no more standard input (the process sees end of file).
    CloseStdin,
    /// Client: the terminal's new size (tty sessions).
    Resize { cols: u16, rows: u16 },
    /// Client: send a signal to the process, by name (`INT`, `SIGTERM`) or number.
    Signal { signal: String },
    /// Server: the process started.
    Started,
    /// Server, last frame: how the process ended.
    Exit { exit_code: i32, duration_ms: u64, timed_out: bool },
    /// Server, last frame: the session failed (before or while running).
    Error { error: String },
}

/// Kind of a directory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum FileType {
    File,
    Dir,
    Symlink,
    Other,
}

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FileEntry {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: FileType,
    pub size: u64,
    /// Permission bits in octal, e.g. `"0644"`.
    pub mode: String,
    /// Last modification, RFC 3339 UTC.
    pub mtime: String,
    /// Where a symlink points (never followed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// `GET …/files?path=DIR` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DirListing {
    pub path: String,
    pub entries: Vec<FileEntry>,
}

/// `PUT …/files` and `PUT …/files/archive` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FileWritten {
    pub path: String,
    /// Bytes written (a file) or entries extracted (an archive).
    pub size: u64,
}

/// Parses a file mode given in octal (`644`, `0755`); only permission bits are allowed.
pub fn parse_mode(text: &str) -> Result<u32, String> {
    let mode = u32::from_str_radix(text, 8).map_err(|_| format!("mode: {text:?} is not an octal number"))?;
    if mode > 0o7777 {
        return Err(format!("mode: {text:?} has bits beyond 07777"));
    }
    Ok(mode)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(command: &[&str]) -> ExecRequest {
        ExecRequest { command: command.iter().map(|s| s.to_string()).collect(), ..ExecRequest::default() }
    }

    #[test]
    fn an_exec_needs_a_program_and_sane_limits() {
        assert!(request(&[]).problem().is_some());
        assert!(request(&[""]).problem().is_some());
        assert!(request(&["true"]).problem().is_none());
        let mut r = request(&["true"]);
        r.timeout_seconds = Some(0);
        assert!(r.problem().unwrap().contains("timeout_seconds"));
        r.timeout_seconds = Some(MAX_EXEC_TIMEOUT_SECONDS + 1);
        assert!(r.problem().is_some());
        r.timeout_seconds = Some(5);
        r.work_dir = Some("relative".into());
        assert!(r.problem().unwrap().contains("work_dir"));
        r.work_dir = None;
        r.env = vec![EnvVar { name: "1BAD".into(), value: String::new() }];
        assert!(r.problem().unwrap().contains("env"));
        r.env = vec![EnvVar { name: "GOOD_1".into(), value: "x".into() }];
        assert!(r.problem().is_none());
        assert!(request(&["echo", "a\0b"]).problem().is_some());
    }

    #[test]
    fn frames_are_tagged_by_type() {
        let frame: ExecFrame = serde_json::from_str(r#"{"type":"resize","cols":80,"rows":24}"#).unwrap();
        assert_eq!(frame, ExecFrame::Resize { cols: 80, rows: 24 });
        let exit = serde_json::to_value(ExecFrame::Exit { exit_code: 3, duration_ms: 5, timed_out: false }).unwrap();
        assert_eq!(exit["type"], "exit");
        assert!(serde_json::from_str::<ExecFrame>(r#"{"type":"nope"}"#).is_err());
    }

    #[test]
    fn modes_are_octal_permission_bits() {
        assert_eq!(parse_mode("644"), Ok(0o644));
        assert_eq!(parse_mode("0755"), Ok(0o755));
        assert!(parse_mode("9").is_err());
        assert!(parse_mode("17777").is_err());
    }
}
