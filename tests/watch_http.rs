//! A watch client over real HTTP sees every change in order and resumes without gaps.

mod common;

use common::{sandbox_spec, start_api_server, start_server, test_config};
use futures::StreamExt;
use sandboxd_api::watch::WatchEvent;
use sandboxd_api::EventType;
use std::time::Duration;

async fn next(
    stream: &mut futures::stream::BoxStream<'static, sandboxd_client::Result<WatchEvent<serde_json::Value>>>,
) -> WatchEvent<serde_json::Value> {
    loop {
        let event = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("event within 5s")
            .expect("stream open")
            .expect("valid event");
        if event.event_type != EventType::Bookmark {
            return event;
        }
    }
}

fn revision(event: &WatchEvent<serde_json::Value>) -> u64 {
    event.object["resource_version"].as_str().unwrap().parse().unwrap()
}

#[tokio::test]
async fn watch_sees_create_update_delete_in_order_and_resumes_without_gaps() {
    let (server, client) = start_api_server(test_config(&[])).await;
    let start = client.list_sandboxes().await.unwrap().resource_version;
    let mut stream = client.watch("sandboxes", Some(&start)).await.unwrap();

    let created = client.create_sandbox("w1", &sandbox_spec("100m")).await.unwrap().object;
    let mut spec = created.spec.clone();
    spec.ttl_seconds = Some(60);
    client.update_sandbox("w1", &spec, None).await.unwrap();
    client.delete_sandbox("w1").await.unwrap();

    let events = [next(&mut stream).await, next(&mut stream).await, next(&mut stream).await];
    let types: Vec<EventType> = events.iter().map(|e| e.event_type).collect();
    assert_eq!(types, [EventType::Added, EventType::Modified, EventType::Deleted]);
    assert!(events.windows(2).all(|w| revision(&w[0]) < revision(&w[1])));
    assert_eq!(events[1].object["spec"]["ttl_seconds"], 60);

    // Disconnect, miss two creates, then resume from the last revision seen.
    let last = revision(&events[2]);
    drop(stream);
    client.create_sandbox("w2", &sandbox_spec("100m")).await.unwrap();
    client.create_sandbox("w3", &sandbox_spec("100m")).await.unwrap();
    let mut resumed = client.watch("sandboxes", Some(&last.to_string())).await.unwrap();
    let ids =
        [next(&mut resumed).await, next(&mut resumed).await].map(|e| e.object["id"].as_str().unwrap().to_string());
    assert_eq!(ids, ["w2", "w3"]);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn graceful_stop_ends_open_watches() {
    let (server, client) = start_server(test_config(&[])).await;
    let mut stream = client.watch("nodes", None).await.unwrap();
    server.stop().await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), stream.next()).await.expect("stream ends on shutdown");
    assert!(end.is_none() || end.unwrap().is_err());
}
