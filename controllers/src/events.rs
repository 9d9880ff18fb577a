//! The event recorder: controllers report what happened without waiting; repeats are merged in
//! memory and a flusher writes them in batches every half second, off the hot path. What does not
//! fit the bounded buffer is dropped and counted, as Kubernetes' recorder drops under pressure.

use crate::objects::ObjectClient;
use crate::runtime::metrics::METRICS;
use parking_lot::Mutex;
use sandboxd_api::event::{EventRecord, EventType, ObjectReference, MAX_EVENTS_PER_BATCH, MAX_MESSAGE_CHARS};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Distinct events held between two flushes; more are dropped until the next flush.
pub const MAX_PENDING: usize = 1024;
/// How often pending events are written.
pub const FLUSH_EVERY: Duration = Duration::from_millis(500);

/// Merges and writes the events of one controller process.
pub struct Recorder {
    objects: Arc<dyn ObjectClient>,
    /// Pending records by event name, in first-seen order within a flush.
    pending: Mutex<HashMap<String, EventRecord>>,
    dropped: AtomicU64,
    written: AtomicU64,
}

impl Recorder {
    pub fn new(objects: Arc<dyn ObjectClient>) -> Arc<Recorder> {
        Arc::new(Recorder {
            objects,
            pending: Mutex::new(HashMap::new()),
            dropped: AtomicU64::new(0),
            written: AtomicU64::new(0),
        })
    }

    /// Events dropped so far (buffer full, or a failed write).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Events written so far (each merged record counts once).
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    fn record(&self, record: EventRecord) {
        let name = record.event_name();
        let mut pending = self.pending.lock();
        if let Some(held) = pending.get_mut(&name) {
            held.count += 1;
            held.last_seen = record.last_seen;
            return;
        }
        if pending.len() >= MAX_PENDING {
            drop(pending);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            METRICS.events_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        pending.insert(name, record);
    }

    /// Writes what is pending now, in batches; a failed batch is dropped (events are best effort).
    pub async fn flush(&self) {
        let mut batch: Vec<EventRecord> = std::mem::take(&mut *self.pending.lock()).into_values().collect();
        batch.sort_by(|a, b| a.first_seen.cmp(&b.first_seen));
        for chunk in batch.chunks(MAX_EVENTS_PER_BATCH) {
            match self.objects.record_events(chunk).await {
                Ok(()) => {
                    self.written.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    METRICS.events_written.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    self.dropped.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    METRICS.events_dropped.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    tracing::debug!(error = %e, events = chunk.len(), "events not recorded");
                }
            }
        }
    }

    /// Flushes every `FLUSH_EVERY` until `shutdown`, then once more.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(FLUSH_EVERY) => self.flush().await,
            }
        }
        self.flush().await;
    }
}

/// A controller's handle on the recorder, naming the controller as the events' source. The default
/// records nothing (controllers built for a test that does not look at events).
#[derive(Clone, Default)]
pub struct Events {
    recorder: Option<Arc<Recorder>>,
    source: &'static str,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events").field("source", &self.source).field("recording", &self.recorder.is_some()).finish()
    }
}

impl Events {
    pub fn new(recorder: &Arc<Recorder>, source: &'static str) -> Events {
        Events { recorder: Some(recorder.clone()), source }
    }

    pub fn normal(&self, object: ObjectReference, reason: &str, message: impl Into<String>) {
        self.emit(object, EventType::Normal, reason, message.into(), sandboxd_api::time::rfc3339_micros_now());
    }

    /// The time to give an event that is reported only once its write succeeded (`normal_at`), so
    /// it sorts before what other controllers did in reaction to that write.
    pub fn stamp() -> String {
        sandboxd_api::time::rfc3339_micros_now()
    }

    pub fn normal_at(&self, at: String, object: ObjectReference, reason: &str, message: impl Into<String>) {
        self.emit(object, EventType::Normal, reason, message.into(), at);
    }

    pub fn warning(&self, object: ObjectReference, reason: &str, message: impl Into<String>) {
        self.emit(object, EventType::Warning, reason, message.into(), sandboxd_api::time::rfc3339_micros_now());
    }

    fn emit(
        &self,
        involved_object: ObjectReference,
        event_type: EventType,
        reason: &str,
        message: String,
        now: String,
    ) {
        let Some(recorder) = &self.recorder else { return };
        recorder.record(EventRecord {
            involved_object,
            event_type,
            reason: reason.to_string(),
            message: printable(&message),
            source: self.source.to_string(),
            count: 1,
            first_seen: now.clone(),
            last_seen: now,
        });
    }
}

/// `text` on one line, without control characters, cut to the longest message an event holds.
fn printable(text: &str) -> String {
    let clean: String =
        text.chars().map(|c| if c == '\n' || c == '\t' { ' ' } else { c }).filter(|c| !c.is_control()).collect();
    match clean.char_indices().nth(MAX_MESSAGE_CHARS) {
        Some((cut, _)) => clean[..cut].to_string(),
        None => clean,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::FakeObjects;

    #[tokio::test]
    async fn repeats_merge_before_the_write_and_the_buffer_is_bounded() {
        let objects = Arc::new(FakeObjects::new(vec![], vec![]));
        let recorder = Recorder::new(objects.clone());
        let events = Events::new(&recorder, "scheduler");
        for _ in 0..3 {
            events.warning(
                ObjectReference::sandbox("s"),
                "FailedScheduling",
                "0/1 nodes available: 1 insufficient cpu",
            );
        }
        events.normal(ObjectReference::sandbox("s"), "Scheduled", "placed on node n");
        recorder.flush().await;
        let mut reasons = objects.event_reasons();
        reasons.sort();
        assert_eq!(
            reasons,
            [("sandbox/s".to_string(), "FailedScheduling".to_string()), ("sandbox/s".into(), "Scheduled".into())]
        );
        assert_eq!(recorder.written(), 2, "three repeats are one write with count 3");

        for i in 0..MAX_PENDING + 10 {
            events.normal(ObjectReference::sandbox(&format!("s{i}")), "Scheduled", "placed");
        }
        assert_eq!(recorder.dropped(), 10, "the buffer holds at most MAX_PENDING distinct events");
        Events::default().normal(ObjectReference::node("n"), "NodeReady", "not recorded anywhere");
    }

    #[test]
    fn messages_are_one_printable_line_of_bounded_length() {
        assert_eq!(printable("a\nb\u{1b}[2J"), "a b[2J");
        assert_eq!(printable(&"x".repeat(5000)).len(), MAX_MESSAGE_CHARS);
    }
}
