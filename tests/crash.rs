//! SIGKILL of a `sandboxd-o serve` on SQLite loses no acknowledged create, and revisions stay monotonic.

mod common;

use common::{exclusive_addr, sandbox_spec};
use sandboxd_client::Client;
use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn spawn_server(db: &std::path::Path, addr: std::net::SocketAddr) -> Child {
    Command::new(env!("CARGO_BIN_EXE_sandboxd-o"))
        .args(["serve", "--insecure-listen", &addr.to_string()])
        .arg("--store")
        .arg(format!("sqlite://{}", db.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn sandboxd-o")
}

async fn wait_healthy(client: &Client) {
    for _ in 0..200 {
        if client.healthz().await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("server did not become healthy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_no_acknowledged_create() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("store.db");
    let addr = exclusive_addr(8080);
    let mut child = spawn_server(&db, addr);
    let client = Client::new(&format!("http://{addr}"), None).unwrap();
    wait_healthy(&client).await;

    let acknowledged = Arc::new(Mutex::new(Vec::<(String, u64)>::new()));
    let mut writers = Vec::new();
    for w in 0..8 {
        let client = client.clone();
        let acknowledged = acknowledged.clone();
        writers.push(tokio::spawn(async move {
            for n in 0..100_000 {
                let id = format!("c{w}-{n}");
                match client.create_sandbox(&id, &sandbox_spec("100m")).await {
                    Ok(written) => {
                        let rv = written.object.resource_version.parse().unwrap();
                        acknowledged.lock().unwrap().push((id, rv));
                    }
                    Err(_) => return,
                }
            }
        }));
    }
    // Kill the server mid-flight, once the writers are well under way.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while acknowledged.lock().unwrap().len() <= 200 {
        assert!(tokio::time::Instant::now() < deadline, "writers made no progress");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    for w in writers {
        w.await.unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(acknowledged.len() > 50, "writers made progress before the kill ({})", acknowledged.len());
    let max_acknowledged_rv = acknowledged.iter().map(|(_, rv)| *rv).max().unwrap();

    let mut child = spawn_server(&db, addr);
    wait_healthy(&client).await;
    let stored: BTreeSet<String> = client.list_sandboxes().await.unwrap().items.into_iter().map(|s| s.id).collect();
    let missing: Vec<&String> = acknowledged.iter().map(|(id, _)| id).filter(|id| !stored.contains(*id)).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged creates lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );

    let after = client.create_sandbox("after-restart", &sandbox_spec("100m")).await.unwrap().object;
    let after_rv: u64 = after.resource_version.parse().unwrap();
    assert!(after_rv > max_acknowledged_rv, "revision {after_rv} after restart must exceed {max_acknowledged_rv}");
    child.kill().unwrap();
    child.wait().unwrap();
}
