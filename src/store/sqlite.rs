//! The `sqlite://PATH` backend: the in-process store made durable by SQLite in WAL mode.

use super::writer::{LocalStore, Mutation, Persist};
use super::{Kind, Result, Revision, StoreError, StoreOptions, Versioned};
use bytes::Bytes;
use rusqlite::{params, Connection, OptionalExtension};
use std::path::Path;
use std::sync::Arc;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS objects (
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    revision INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (kind, name)
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
";

/// Free bytes under which a failed open is blamed on a full disk.
const NEARLY_FULL: u64 = 1 << 20;

/// "the disk holding DIR is full (N bytes free)" when the store's filesystem has (almost) no room:
/// SQLite reports that as a bare "disk I/O error" while it creates its journal.
fn disk_full(path: &Path) -> Option<String> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let stats = rustix::fs::statvfs(dir).ok()?;
    let free = stats.f_bavail.saturating_mul(stats.f_frsize);
    (free < NEARLY_FULL).then(|| format!("the disk holding {} is full ({free} bytes free)", dir.display()))
}

/// Opens (creating if needed) the database at `path` and loads every object into memory.
pub async fn open(path: &Path, options: StoreOptions) -> Result<LocalStore> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || open_blocking(&path, options))
        .await
        .map_err(|e| StoreError::Unavailable(format!("opening sqlite store: {e}")))?
}

fn open_blocking(path: &Path, options: StoreOptions) -> Result<LocalStore> {
    let unavailable = |e: rusqlite::Error| {
        if let Some(full) = disk_full(path) {
            return StoreError::Unavailable(format!("sqlite {}: {full} ({e})", path.display()));
        }
        let held = if e.to_string().contains("locked") { " (in use by another process?)" } else { "" };
        StoreError::Unavailable(format!("sqlite {}: {e}{held}", path.display()))
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Unavailable(format!("creating {}: {e}", dir.display())))?;
    }
    let lock = lock_store(path)?;
    let conn = Connection::open(path).map_err(unavailable)?;
    conn.busy_timeout(std::time::Duration::from_millis(500)).map_err(unavailable)?;
    // FULL makes each commit durable across power loss too; batching amortizes the fsync.
    conn.pragma_update(None, "journal_mode", "WAL").map_err(unavailable)?;
    conn.pragma_update(None, "synchronous", "FULL").map_err(unavailable)?;
    // Normal locking mode, so that the checkpointer's connection can checkpoint beside the writer
    // (`lock_store` keeps any second process out). SQLite's automatic checkpoint runs inside the
    // commit that crosses its threshold and held every write queued behind it while it copied the
    // whole WAL (commits of 25-100 ms in watch-fanout). The checkpointer now copies as the WAL
    // grows, so the writer's own checkpoint finds little left to copy. It stays: only a checkpoint
    // that completes between two of the writer's transactions lets the WAL start over, which under
    // continuous writes only the writer can guarantee.
    conn.pragma_update(None, "wal_autocheckpoint", WRITER_CHECKPOINT_PAGES).map_err(unavailable)?;
    conn.execute_batch(SCHEMA).map_err(unavailable)?;
    let (objects, max_row_revision) = load_objects(&conn).map_err(unavailable)?;
    let stored_revision: Option<i64> = conn
        .query_row("SELECT value FROM meta WHERE key = 'revision'", [], |r| r.get(0))
        .optional()
        .map_err(unavailable)?;
    let revision = (stored_revision.unwrap_or(0) as Revision).max(max_row_revision);
    tracing::info!(path = %path.display(), objects = objects.len(), revision, "sqlite store loaded");
    let checkpointer = Checkpointer::start(path, unavailable)?;
    Ok(LocalStore::start(objects, revision, SqlitePersist { conn, _checkpointer: checkpointer, _lock: lock }, options))
}

/// WAL pages (4 KiB each) after which the writer checkpoints what is left and the WAL starts over
/// (SQLite's default).
const WRITER_CHECKPOINT_PAGES: i64 = 1_000;

/// How often the checkpointer copies the WAL into the database.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// Copies the WAL into the database from a connection of its own, off the writer's thread, so a
/// commit never waits for a checkpoint; after a complete one the writer starts the WAL over, which
/// is what bounds the file. Stopped and joined on drop.
struct Checkpointer {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checkpointer {
    fn start(path: &Path, unavailable: impl Fn(rusqlite::Error) -> StoreError) -> Result<Checkpointer> {
        let conn = Connection::open(path).map_err(&unavailable)?;
        conn.busy_timeout(std::time::Duration::from_millis(100)).map_err(&unavailable)?;
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("store-checkpoint".into())
            .spawn(move || {
                let mut last_error = String::new();
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(CHECKPOINT_EVERY) {
                    // PASSIVE never waits for the writer; what it cannot copy now, the next round does.
                    match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                        Ok(()) => last_error.clear(),
                        Err(e) if e.to_string() != last_error => {
                            last_error = e.to_string();
                            tracing::warn!(error = %e, "wal checkpoint failed; the writer checkpoints every {WRITER_CHECKPOINT_PAGES} pages");
                        }
                        Err(_) => {}
                    }
                }
            })
            .map_err(|e| StoreError::Unavailable(format!("starting the sqlite checkpointer: {e}")))?;
        Ok(Checkpointer { stop: Some(stop), thread: Some(thread) })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Takes an exclusive lock on `PATH.lock` for as long as the store is open: this process keeps every
/// object in memory and is the file's only writer, so a second process on it would fork the history.
fn lock_store(path: &Path) -> Result<std::fs::File> {
    let lock_path = path.with_extension("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| StoreError::Unavailable(format!("opening {}: {e}", lock_path.display())))?;
    file.try_lock().map_err(|_| {
        StoreError::Unavailable(format!(
            "sqlite {} is in use by another process (lock {} is held)",
            path.display(),
            lock_path.display()
        ))
    })?;
    Ok(file)
}

fn load_objects(conn: &Connection) -> rusqlite::Result<(Vec<(Kind, Versioned)>, Revision)> {
    let mut stmt = conn.prepare("SELECT kind, name, revision, data FROM objects")?;
    let mut rows = stmt.query([])?;
    let mut objects = Vec::new();
    let mut max_revision = 0;
    while let Some(row) = rows.next()? {
        let kind: String = row.get(0)?;
        let Some(kind) = Kind::parse(&kind) else {
            tracing::warn!(kind, "skipping stored object of unknown kind");
            continue;
        };
        let name: String = row.get(1)?;
        let revision = row.get::<_, i64>(2)? as Revision;
        let data: Vec<u8> = row.get(3)?;
        max_revision = max_revision.max(revision);
        objects.push((kind, Versioned { name: Arc::from(name), revision, data: Bytes::from(data) }));
    }
    Ok((objects, max_revision))
}

struct SqlitePersist {
    conn: Connection,
    /// Dropped after the writer's connection and before the lock.
    _checkpointer: Checkpointer,
    /// Held for the store's lifetime.
    _lock: std::fs::File,
}

impl SqlitePersist {
    fn commit_batch(&mut self, batch: &[Mutation], revision: Revision) -> rusqlite::Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut upsert = tx.prepare_cached(
                "INSERT INTO objects (kind, name, revision, data) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (kind, name) DO UPDATE SET revision = excluded.revision, data = excluded.data",
            )?;
            let mut remove = tx.prepare_cached("DELETE FROM objects WHERE kind = ?1 AND name = ?2")?;
            for m in batch {
                match &m.data {
                    Some(data) => {
                        upsert.execute(params![m.kind.as_str(), &*m.name, m.revision as i64, &data[..]])?;
                    }
                    None => {
                        remove.execute(params![m.kind.as_str(), &*m.name])?;
                    }
                }
            }
            tx.prepare_cached(
                "INSERT INTO meta (key, value) VALUES ('revision', ?1)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )?
            .execute(params![revision as i64])?;
        }
        tx.commit()
    }
}

impl Persist for SqlitePersist {
    fn commit(&mut self, batch: &[Mutation], revision: Revision) -> std::result::Result<(), String> {
        self.commit_batch(batch, revision).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    /// A tiny tmpfs, unmounted on drop even when the test fails.
    struct TinyDisk(tempfile::TempDir);

    impl TinyDisk {
        fn mount() -> Option<TinyDisk> {
            let dir = tempfile::tempdir().ok()?;
            let mounted = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
                .arg(dir.path())
                .status()
                .is_ok_and(|s| s.success());
            mounted.then_some(TinyDisk(dir))
        }
    }

    impl Drop for TinyDisk {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0.path()).status();
        }
    }

    /// A server writes for months: the WAL must be checkpointed and restarted as it goes, not grow
    /// with every write (a checkpoint from another connection alone does not restart it under
    /// continuous writes: it grew to 67 MB here with the writer's own checkpoint off).
    #[tokio::test]
    async fn the_wal_file_stays_bounded_under_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let store = open(&path, StoreOptions::default()).await.unwrap();
        let padding = "x".repeat(4096);
        // About 16 MiB of rows, four times the automatic checkpoint's 1,000 pages.
        for i in 0..4_000 {
            store.create(Kind::Sandboxes, &format!("s{i}"), serde_json::json!({ "pad": padding })).await.unwrap();
        }
        let wal = std::fs::metadata(path.with_extension("db-wal")).unwrap().len();
        assert!(wal < 8 << 20, "the WAL grew to {wal} bytes");
    }

    #[tokio::test]
    async fn a_full_disk_at_start_is_named_as_such() {
        let Some(disk) = TinyDisk::mount() else {
            eprintln!("SKIPPED a_full_disk_at_start_is_named_as_such: mounting a tmpfs needs root");
            return;
        };
        let filler = vec![7u8; 256 << 10];
        let _ = std::fs::write(disk.0.path().join("filler"), &filler);
        let error = open(&disk.0.path().join("store.db"), StoreOptions::default()).await.err().expect("open fails");
        assert!(error.to_string().contains("the disk holding"), "{error}");
    }
}
