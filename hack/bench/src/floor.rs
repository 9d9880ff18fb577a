//! The floors durable creates through the API are measured against (issue 19): raw SQLite with the
//! server store's schema, pragmas and statements, and etcd's own `txn` with the etcd store's create,
//! each with no server, HTTP or JSON in the way.

use anyhow::ensure;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
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

/// Transactions per second that `clients` concurrent callers commit to the etcd at `endpoint`
/// (`host:port`) over `connections` gRPC connections: `rows` of the etcd store's create, a put of
/// `row_bytes` under `prefix` guarded by "this key never existed", with a read of it otherwise. The
/// server's store holds one connection; more show what that one costs.
pub async fn etcd_create_txns_per_s(
    endpoint: &str,
    prefix: &str,
    rows: usize,
    clients: usize,
    connections: usize,
    row_bytes: usize,
) -> anyhow::Result<f64> {
    let mut kvs = Vec::with_capacity(connections.max(1));
    for _ in 0..connections.max(1) {
        kvs.push(etcd_client::Client::connect([endpoint], None).await?.kv_client());
    }
    let payload: Arc<[u8]> = vec![b'x'; row_bytes].into();
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut callers = tokio::task::JoinSet::new();
    for caller in 0..clients.max(1) {
        let (mut kv, payload, next) = (kvs[caller % kvs.len()].clone(), payload.clone(), next.clone());
        let prefix = prefix.to_string();
        callers.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= rows {
                    return anyhow::Ok(());
                }
                let key = format!("{prefix}sandboxes/floor-{i}");
                let txn = etcd_client::Txn::new()
                    .when([etcd_client::Compare::create_revision(key.as_str(), etcd_client::CompareOp::Equal, 0)])
                    .and_then([etcd_client::TxnOp::put(key.as_str(), payload.to_vec(), None)])
                    .or_else([etcd_client::TxnOp::get(key.as_str(), None)]);
                ensure!(kv.txn(txn).await?.succeeded(), "{key} already existed");
            }
        });
    }
    while let Some(joined) = callers.join_next().await {
        joined??;
    }
    let rate = rows as f64 / started.elapsed().as_secs_f64();
    let options = etcd_client::GetOptions::new().with_prefix().with_count_only();
    let stored = kvs[0].get(format!("{prefix}sandboxes/floor-"), Some(options)).await?.count();
    ensure!(stored as usize == rows, "the etcd floor stored {stored} keys, expected {rows}");
    Ok(rate)
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

    #[tokio::test]
    async fn the_etcd_floor_creates_every_key_once() {
        let etcd = sandboxd_testkit::LocalEtcd::start().expect("local etcd starts (apt-get install etcd-server)");
        let endpoint = etcd.url().trim_start_matches("etcd://").to_string();
        let rate = etcd_create_txns_per_s(&endpoint, "/floor/", 100, 8, 2, 320).await.unwrap();
        assert!(rate > 0.0);
        // The guard is the store's create: the same keys again are refused, not overwritten.
        let again = etcd_create_txns_per_s(&endpoint, "/floor/", 1, 1, 1, 320).await;
        assert!(again.unwrap_err().to_string().contains("already existed"));
    }
}
