//! `get events` and the Events table `describe` ends with, as kubectl prints them.

use crate::render::{age, print_table, print_table_indented};
use crate::Output;
use futures::StreamExt;
use sandboxd_api::event::Event;
use sandboxd_api::watch::WatchEvent;
use sandboxd_api::EventType as WatchEventType;
use sandboxd_client::Client;

/// `get events [OBJECT] [-w]`: every event, or one object's (`sandbox/ID`, `node/NAME`), oldest
/// first; with `watch`, new and repeated events as they come.
pub async fn get(client: &Client, object: Option<&str>, output: Option<Output>, watch: bool) -> anyhow::Result<()> {
    let mut list = client.list_events(object).await?;
    list.items.sort_by(|a, b| a.last_seen.cmp(&b.last_seen));
    let json = matches!(output, Some(Output::Json | Output::Yaml));
    if output == Some(Output::Yaml) {
        say!("{}", serde_norway::to_string(&serde_json::json!({ "items": list.items }))?.trim_end());
    } else if json {
        say!("{}", serde_json::to_string_pretty(&serde_json::json!({ "items": list.items }))?);
    } else if list.items.is_empty() && !watch {
        eprintln!("No events found.");
    } else {
        let rows: Vec<Vec<String>> = list.items.iter().map(row).collect();
        print_table(&["LAST SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"], &rows);
    }
    if !watch {
        return Ok(());
    }
    let filter = object.map(|o| format!("object={o}"));
    let mut stream = client.watch_matching("events", filter.as_deref(), Some(&list.resource_version)).await?;
    while let Some(event) = stream.next().await {
        let event: WatchEvent<serde_json::Value> = event?;
        match event.event_type {
            WatchEventType::Added | WatchEventType::Modified => {
                let event: Event = serde_json::from_value(event.object)?;
                if json {
                    say!("{}", serde_json::to_string(&event)?);
                } else {
                    say!("{}", row(&event).join("   "));
                }
            }
            WatchEventType::Error => anyhow::bail!("watch ended: {}", event.object["error"]),
            WatchEventType::Deleted | WatchEventType::Bookmark => {}
        }
    }
    Ok(())
}

fn row(event: &Event) -> Vec<String> {
    vec![
        age(&event.last_seen),
        event.event_type.as_str().to_string(),
        event.reason.clone(),
        event.involved_object.to_string(),
        with_count(event),
    ]
}

/// The message, with `(x3 over 2m)` when it happened more than once.
fn with_count(event: &Event) -> String {
    match event.count {
        1 => event.message.clone(),
        n => format!("{} (x{n} over {})", event.message, age(&event.first_seen)),
    }
}

/// The `Events:` block `describe` ends with: the object's events, oldest first.
pub async fn describe_block(client: &Client, object: &str) -> anyhow::Result<()> {
    let events = client.list_events(Some(object)).await?.items;
    if events.is_empty() {
        say!("Events:         <none>");
        return Ok(());
    }
    say!("Events:");
    let rows: Vec<Vec<String>> = events
        .iter()
        .map(|e| {
            vec![
                e.event_type.as_str().to_string(),
                e.reason.clone(),
                age(&e.last_seen),
                e.source.clone(),
                with_count(e),
            ]
        })
        .collect();
    print_table_indented(&["Type", "Reason", "Age", "From", "Message"], &rows, "  ");
    Ok(())
}
