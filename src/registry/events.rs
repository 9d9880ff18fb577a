//! Event write rules: a record is merged into the stored event of the same name (count added up),
//! and the sweep drops events past `event_ttl` and the oldest beyond `event_max`.

use super::{encode, Registry, RegistryError, RegistryResult};
use crate::store::{Kind, StoreError};
use futures::StreamExt;
use sandboxd_api::event::{Event, EventRecord, MAX_EVENTS_PER_BATCH};
use sandboxd_api::time::parse_rfc3339_micros;

/// What one sweep removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    pub expired: usize,
    pub over_max: usize,
}

impl Registry {
    /// Records a batch; every record is checked before any is written.
    pub async fn record_events(&self, records: &[EventRecord]) -> RegistryResult<()> {
        if records.len() > MAX_EVENTS_PER_BATCH {
            return Err(RegistryError::Invalid(format!(
                "events: {} is more than {MAX_EVENTS_PER_BATCH} in one batch",
                records.len()
            )));
        }
        for (i, record) in records.iter().enumerate() {
            if let Some(problem) = record.problem() {
                return Err(RegistryError::Invalid(format!("events[{i}].{problem}")));
            }
        }
        let now = self.clock.unix_now().saturating_mul(1_000_000).saturating_add(999_999);
        for record in records {
            self.record_event(&record.canonical(now)).await?;
        }
        Ok(())
    }

    async fn record_event(&self, record: &EventRecord) -> RegistryResult<()> {
        let name = record.event_name();
        loop {
            let result = match self.store.get(Kind::Events, &name).await? {
                Some(current) => {
                    let mut event: Event = current.decode()?;
                    event.merge(record);
                    self.store.update_encoded(Kind::Events, &name, encode(&event)?, Some(current.revision)).await
                }
                None => {
                    let json = serde_json::to_value(Event::from_record(record))
                        .map_err(|e| RegistryError::Internal(e.to_string()))?;
                    self.store.create(Kind::Events, &name, json).await
                }
            };
            match result {
                Ok(_) => return Ok(()),
                // Another reporter wrote the same event between our read and write: merge again.
                Err(StoreError::Conflict { .. } | StoreError::AlreadyExists { .. } | StoreError::NotFound { .. }) => {
                    continue
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Deletes events last seen more than `ttl_seconds` ago, then the oldest beyond `max`. Each
    /// delete is conditional on the revision listed: an event merged again meanwhile stays.
    pub async fn sweep_events(&self, ttl_seconds: i64, max: usize) -> RegistryResult<Swept> {
        let (items, _) = self.store.list(Kind::Events).await?;
        let cutoff = self.clock.unix_now().saturating_sub(ttl_seconds).saturating_mul(1_000_000);
        let mut expired: Vec<Listed> = Vec::new();
        let mut kept: Vec<(i64, String, u64)> = Vec::new();
        for stored in items {
            let event: Event = stored.decode()?;
            let last = parse_rfc3339_micros(&event.last_seen).unwrap_or(i64::MIN);
            if last < cutoff {
                expired.push((event.name, stored.revision));
            } else {
                kept.push((last, event.name, stored.revision));
            }
        }
        let mut over: Vec<Listed> = Vec::new();
        if kept.len() > max {
            kept.sort();
            let excess = kept.len() - max;
            over = kept.into_iter().take(excess).map(|(_, name, revision)| (name, revision)).collect();
        }
        Ok(Swept { expired: self.delete_events(expired).await?, over_max: self.delete_events(over).await? })
    }

    /// Deletes events at their listed revisions, a few at once; returns how many went.
    async fn delete_events(&self, events: Vec<Listed>) -> RegistryResult<usize> {
        let deletes = futures::stream::iter(events).map(|(name, revision)| async move {
            match self.store.delete(Kind::Events, &name, Some(revision)).await {
                Ok(_) => Ok(1),
                Err(StoreError::NotFound { .. } | StoreError::Conflict { .. }) => Ok(0),
                Err(e) => Err(RegistryError::from(e)),
            }
        });
        let mut deleted = 0;
        let mut results = deletes.buffer_unordered(SWEEP_CONCURRENCY);
        while let Some(result) = results.next().await {
            deleted += result?;
        }
        Ok(deleted)
    }
}

/// An event's name and the revision the sweep listed it at.
type Listed = (String, u64);

/// Deletes a sweep keeps in flight, so a long sweep uses the store's group commits.
const SWEEP_CONCURRENCY: usize = 32;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::store::{memory, Store, StoreOptions};
    use sandboxd_api::event::{EventType, ObjectReference};
    use sandboxd_contracts::clock::TokioClock;
    use std::sync::Arc;

    const T0: i64 = 1_800_000_000;

    fn record(object: &str, reason: &str, seen_secs_ago: i64) -> EventRecord {
        let at = sandboxd_api::time::format_unix_micros((T0 - seen_secs_ago) * 1_000_000);
        EventRecord {
            involved_object: ObjectReference::sandbox(object),
            event_type: EventType::Normal,
            reason: reason.into(),
            message: format!("{reason} happened"),
            source: "test".into(),
            count: 1,
            first_seen: at.clone(),
            last_seen: at,
        }
    }

    async fn stored(store: &Arc<dyn Store>) -> Vec<Event> {
        store.list(Kind::Events).await.unwrap().0.iter().map(|v| v.decode().unwrap()).collect()
    }

    #[tokio::test]
    async fn repeats_merge_into_one_event_and_the_sweep_drops_old_and_surplus_ones() {
        let store: Arc<dyn Store> = Arc::new(memory::open(StoreOptions::default()));
        let registry =
            Registry::new(store.clone(), &Config::default()).with_clock(Arc::new(TokioClock::starting_at(T0)));
        registry.record_events(&[record("a", "Scheduled", 10), record("a", "Scheduled", 5)]).await.unwrap();
        let merged = stored(&store).await;
        assert_eq!(merged.len(), 1);
        assert_eq!(merged[0].count, 2);
        assert_eq!(parse_rfc3339_micros(&merged[0].last_seen), Some((T0 - 5) * 1_000_000));

        let bad = EventRecord { reason: "not a word".into(), ..record("b", "X", 0) };
        let err = registry.record_events(&[record("b", "Started", 0), bad]).await.unwrap_err();
        assert!(err.to_string().starts_with("events[1].reason"), "{err}");
        assert_eq!(stored(&store).await.len(), 1, "a refused batch writes nothing");

        let batch: Vec<EventRecord> = (0..5)
            .map(|i| record(&format!("s{i}"), "Started", 100 - i))
            .chain([record("old", "Expired", 7200)])
            .collect();
        registry.record_events(&batch).await.unwrap();
        let swept = registry.sweep_events(3600, 3).await.unwrap();
        assert_eq!(swept, Swept { expired: 1, over_max: 3 });
        let mut left: Vec<String> = stored(&store).await.into_iter().map(|e| e.involved_object.name).collect();
        left.sort();
        assert_eq!(left, ["a", "s3", "s4"], "the ones last seen most recently stay");
    }
}
