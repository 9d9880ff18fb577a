//! Raw SQLite: the floor durable creates through the API are measured against (issue 19). The same
//! schema, pragmas and statements as the server's store, with no server, HTTP or JSON in the way.

use std::path::Path;
use std::time::Instant;

/// The server store's table and the statement it commits each write with (`src/store/sqlite.rs`).
const SCHEMA: &str = "
CREATE TABLE objects (kind TEXT NOT NULL, name TEXT NOT NULL, revision INTEGER NOT NULL, data BLOB NOT NULL,
                      PRIMARY KEY (kind, name));
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
";
const UPSERT: &str = "INSERT INTO objects (kind, name, revision, data) VALUES (?1, ?2, ?3, ?4)
     ON CONFLICT (kind, name) DO UPDATE SET revision = excluded.revision, data = excluded.data";
const SET_REVISION: &str =
    "INSERT INTO meta (key, value) VALUES ('revision', ?1) ON CONFLICT (key) DO UPDATE SET value = excluded.value";

/// Rows per second that one thread commits into a fresh database in `dir`: `rows` rows of
/// `row_bytes` each, `batch` per transaction, WAL with `synchronous=FULL` as the server runs it.
pub fn raw_sqlite_rows_per_s(dir: &Path, rows: usize, batch: usize, row_bytes: usize) -> anyhow::Result<f64> {
    let conn = rusqlite::Connection::open(dir.join("floor.db"))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "locking_mode", "EXCLUSIVE")?;
    conn.execute_batch(SCHEMA)?;
    let payload = vec![b'x'; row_bytes];
    let mut conn = conn;
    let started = Instant::now();
    let mut revision = 0i64;
    for first in (0..rows).step_by(batch.max(1)) {
        let tx = conn.transaction()?;
        {
            let mut upsert = tx.prepare_cached(UPSERT)?;
            for i in first..(first + batch).min(rows) {
                revision += 1;
                upsert.execute(rusqlite::params!["sandboxes", format!("floor-{i}"), revision, &payload[..]])?;
            }
            tx.execute(SET_REVISION, rusqlite::params![revision])?;
        }
        tx.commit()?;
    }
    Ok(rows as f64 / started.elapsed().as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_commits_every_row() {
        let dir = tempfile::tempdir().unwrap();
        let rate = raw_sqlite_rows_per_s(dir.path(), 100, 16, 1024).unwrap();
        assert!(rate > 0.0);
        let conn = rusqlite::Connection::open(dir.path().join("floor.db")).unwrap();
        let stored: i64 = conn.query_row("SELECT count(*) FROM objects", [], |r| r.get(0)).unwrap();
        let revision: i64 = conn.query_row("SELECT value FROM meta", [], |r| r.get(0)).unwrap();
        assert_eq!((stored, revision), (100, 100));
    }
}
