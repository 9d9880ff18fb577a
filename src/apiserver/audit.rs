//! The audit log: one JSON line per mutating request (who, what, on which object, with what
//! result), written off the request path to a size-rotated file.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;

/// Lines queued for the writer; past it lines are dropped and counted, never waited for.
const QUEUE: usize = 16_384;
/// Rotated files kept besides the live one: `audit.log.1` … `audit.log.3`.
const KEPT: usize = 3;

/// One audited request.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Record {
    pub time: String,
    pub request_id: String,
    pub identity: String,
    pub role: String,
    pub verb: String,
    /// The route template, e.g. `/api/v1/sandboxes/{id}`.
    pub route: String,
    /// The object the route names: `sandbox/ID`, `node/NAME`, …; empty for collections.
    pub object: String,
    pub code: u16,
    pub duration_ms: u64,
}

/// Where audit lines go; cheap to clone. `None` inside: auditing is off.
#[derive(Clone, Default)]
pub struct AuditLog {
    sender: Option<mpsc::Sender<Record>>,
    dropped: Arc<AtomicU64>,
}

impl AuditLog {
    /// Starts the writer for `path`, rotating past `max_bytes`.
    pub fn start(path: PathBuf, max_bytes: u64) -> std::io::Result<AuditLog> {
        let file = open_append(&path)?;
        let (sender, receiver) = mpsc::channel(QUEUE);
        let written = file.metadata().map(|m| m.len()).unwrap_or(0);
        tokio::spawn(write_lines(receiver, Rotating { path, file, written, max_bytes }));
        Ok(AuditLog { sender: Some(sender), dropped: Arc::default() })
    }

    pub fn is_on(&self) -> bool {
        self.sender.is_some()
    }

    /// Queues a record; when the writer is behind by `QUEUE` lines it is dropped and counted.
    pub fn record(&self, record: Record) {
        let Some(sender) = &self.sender else { return };
        if sender.try_send(record).is_err() {
            let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if dropped.is_power_of_two() {
                tracing::warn!(dropped, "audit log is behind; records dropped");
            }
        }
    }

    /// Records dropped because the writer was behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Whether a request is audited: every method that changes something, and exec sessions.
pub fn audited(method: &axum::http::Method, route: &str) -> bool {
    // POST /api/v1/watch only reads: a watch is not audited, whichever route opens it.
    (!matches!(method.as_str(), "GET" | "HEAD" | "OPTIONS") && route != "/api/v1/watch")
        || route.ends_with("/exec/stream")
}

/// `sandbox/ID`, `node/NAME`, `lease/NAME` or `token/ID` of a route with a name in it.
pub fn object_of(route: &str, params: &[(&str, &str)]) -> String {
    let kind = route.strip_prefix("/api/v1/").and_then(|r| r.split('/').next()).unwrap_or_default();
    let singular = kind.strip_suffix("es").filter(|k| k.ends_with('x')).or_else(|| kind.strip_suffix('s'));
    let name = params.iter().find(|(k, _)| matches!(*k, "id" | "name")).map(|(_, v)| *v);
    match (singular, name) {
        (Some(kind), Some(name)) => format!("{kind}/{name}"),
        _ => String::new(),
    }
}

struct Rotating {
    path: PathBuf,
    file: std::fs::File,
    written: u64,
    max_bytes: u64,
}

impl Rotating {
    fn write(&mut self, line: &[u8]) -> std::io::Result<()> {
        if self.written > 0 && self.written + line.len() as u64 > self.max_bytes {
            match self.rotate() {
                Ok(()) => {}
                // The live file was moved or removed under us: start it again rather than lose
                // every later line.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    tracing::warn!(path = %self.path.display(), "audit log vanished before rotation; reopening");
                    self.file = open_append(&self.path)?;
                    self.written = self.file.metadata().map(|m| m.len()).unwrap_or(0);
                }
                Err(e) => return Err(e),
            }
        }
        self.file.write_all(line)?;
        self.written += line.len() as u64;
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        for i in (1..KEPT).rev() {
            let _ = std::fs::rename(numbered(&self.path, i), numbered(&self.path, i + 1));
        }
        std::fs::rename(&self.path, numbered(&self.path, 1))?;
        self.file = open_append(&self.path)?;
        self.written = 0;
        Ok(())
    }
}

fn numbered(path: &Path, n: usize) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

fn open_append(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(path)
}

async fn write_lines(mut receiver: mpsc::Receiver<Record>, mut out: Rotating) {
    let mut batch = Vec::new();
    while receiver.recv_many(&mut batch, 256).await > 0 {
        // File writes block; a batch at a time keeps them off the runtime's other tasks.
        let lines: Vec<Vec<u8>> = batch
            .drain(..)
            .map(|r| {
                let mut line = serde_json::to_vec(&r).expect("records serialize");
                line.push(b'\n');
                line
            })
            .collect();
        out = match tokio::task::spawn_blocking(move || {
            for line in &lines {
                if let Err(e) = out.write(line) {
                    tracing::warn!(error = %e, path = %out.path.display(), "audit log write failed");
                }
            }
            out
        })
        .await
        {
            Ok(out) => out,
            Err(_) => return,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(verb: &str) -> Record {
        Record {
            time: "2026-12-02T00:00:00Z".into(),
            request_id: "r1".into(),
            identity: "alice".into(),
            role: "user".into(),
            verb: verb.into(),
            route: "/api/v1/sandboxes/{id}".into(),
            object: "sandbox/s1".into(),
            code: 200,
            duration_ms: 1,
        }
    }

    #[test]
    fn objects_are_named_by_kind_and_name() {
        assert_eq!(object_of("/api/v1/sandboxes/{id}/exec", &[("id", "s1")]), "sandbox/s1");
        assert_eq!(object_of("/api/v1/nodes/{name}/status", &[("name", "n1")]), "node/n1");
        assert_eq!(object_of("/api/v1/leases/{name}", &[("name", "l")]), "lease/l");
        assert_eq!(object_of("/api/v1/tokens/{id}", &[("id", "t")]), "token/t");
        assert_eq!(object_of("/api/v1/sandboxes", &[]), "");
    }

    #[test]
    fn reads_are_not_audited_but_exec_sessions_are() {
        use axum::http::Method;
        assert!(audited(&Method::POST, "/api/v1/sandboxes"));
        assert!(audited(&Method::DELETE, "/api/v1/sandboxes/{id}"));
        assert!(!audited(&Method::GET, "/api/v1/sandboxes"));
        assert!(!audited(&Method::POST, "/api/v1/watch"), "a watch opened by POST only reads");
        assert!(audited(&Method::GET, "/api/v1/sandboxes/{id}/exec/stream"));
    }

    #[tokio::test]
    async fn lines_are_json_and_the_file_rotates_past_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::start(path.clone(), 600).unwrap();
        for verb in ["POST", "PUT", "DELETE", "POST", "PUT", "DELETE", "POST", "PUT"] {
            log.record(record(verb));
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !numbered(&path, 1).exists() && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        // Oldest first: .3, .2, .1, then the live file; each within the size.
        let files = [numbered(&path, 3), numbered(&path, 2), numbered(&path, 1), path.clone()];
        let mut lines = Vec::new();
        for file in files.iter().filter(|f| f.exists()) {
            let text = std::fs::read_to_string(file).unwrap();
            assert!(text.len() <= 600, "{}: {} bytes", file.display(), text.len());
            lines.extend(text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()));
        }
        assert_eq!(lines.len(), 8, "nothing lost across the rotations");
        let verbs: Vec<&str> = lines.iter().map(|l| l["verb"].as_str().unwrap()).collect();
        assert_eq!(verbs, ["POST", "PUT", "DELETE", "POST", "PUT", "DELETE", "POST", "PUT"], "in order");
        assert_eq!(log.dropped(), 0);
    }
}
