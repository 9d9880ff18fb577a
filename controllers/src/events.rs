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
/// An event written this recently is held and counted, not written again, until this has passed
/// (Kubernetes' recorder throttles repeats the same way): a failing probe every second is one
/// write every ten seconds.
pub const REPEAT_EVERY: Duration = Duration::from_secs(10);
/// Bytes of records sent in one batch, well under the API's default 1 MiB body limit.
const MAX_BATCH_BYTES: usize = 512 << 10;

/// Merges and writes the events of one controller process.
pub struct Recorder {
    objects: Arc<dyn ObjectClient>,
    /// Pending records by event name.
    pending: Mutex<HashMap<String, EventRecord>>,
    /// When each event was last written, for those written within `REPEAT_EVERY`.
    written_at: Mutex<HashMap<String, std::time::Instant>>,
    dropped: AtomicU64,
    written: AtomicU64,
}

impl Recorder {
    pub fn new(objects: Arc<dyn ObjectClient>) -> Arc<Recorder> {
        Arc::new(Recorder {
            objects,
            pending: Mutex::new(HashMap::new()),
            written_at: Mutex::new(HashMap::new()),
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
            held.last_seen = held.last_seen.clone().max(record.last_seen);
            return;
        }
        if pending.len() >= MAX_PENDING {
            drop(pending);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            METRICS.events_dropped.inc();
            return;
        }
        pending.insert(name, record);
    }

    /// Writes what is pending now, in batches; a failed batch is dropped (events are best effort).
    /// Repeats of an event written less than `REPEAT_EVERY` ago stay pending (and keep counting).
    pub async fn flush(&self) {
        let batch = self.due_now(std::time::Instant::now());
        for chunk in chunks(batch) {
            match self.objects.record_events(&chunk).await {
                Ok(()) => {
                    self.written.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    METRICS.events_written.inc_by(chunk.len() as u64);
                }
                Err(e) => {
                    self.dropped.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    METRICS.events_dropped.inc_by(chunk.len() as u64);
                    tracing::debug!(error = %e, events = chunk.len(), "events not recorded");
                }
            }
        }
    }

    /// Takes the pending records that are due, oldest first, and notes them as written now.
    fn due_now(&self, now: std::time::Instant) -> Vec<EventRecord> {
        let mut written_at = self.written_at.lock();
        written_at.retain(|_, at| now.duration_since(*at) < REPEAT_EVERY);
        let mut pending = self.pending.lock();
        let due: Vec<String> = pending.keys().filter(|name| !written_at.contains_key(*name)).cloned().collect();
        let mut batch: Vec<EventRecord> = Vec::with_capacity(due.len());
        for name in due {
            if let Some(record) = pending.remove(&name) {
                written_at.insert(name, now);
                batch.push(record);
            }
        }
        batch.sort_by(|a, b| a.first_seen.cmp(&b.first_seen));
        batch
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

    pub fn warning_at(&self, at: String, object: ObjectReference, reason: &str, message: impl Into<String>) {
        self.emit(object, EventType::Warning, reason, message.into(), at);
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

/// Batches of at most `MAX_EVENTS_PER_BATCH` records and about `MAX_BATCH_BYTES`.
fn chunks(records: Vec<EventRecord>) -> Vec<Vec<EventRecord>> {
    let mut chunks: Vec<Vec<EventRecord>> = Vec::new();
    let (mut current, mut bytes) = (Vec::new(), 0);
    for record in records {
        // The fixed fields and the JSON around them stay under 300 bytes.
        let size = record.message.len() + record.involved_object.name.len() + 300;
        if !current.is_empty() && (current.len() == MAX_EVENTS_PER_BATCH || bytes + size > MAX_BATCH_BYTES) {
            chunks.push(std::mem::take(&mut current));
            bytes = 0;
        }
        bytes += size;
        current.push(record);
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    chunks
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
        recorder.flush().await;

        // A repeat of an event just written waits, counting, for REPEAT_EVERY.
        events.warning(ObjectReference::sandbox("s"), "FailedScheduling", "0/1 nodes available: 1 insufficient cpu");
        let before = recorder.written();
        recorder.flush().await;
        assert_eq!(recorder.written(), before, "held: written less than REPEAT_EVERY ago");
        let later = std::time::Instant::now() + REPEAT_EVERY;
        assert_eq!(recorder.due_now(later).len(), 1, "due once REPEAT_EVERY has passed");
        Events::default().normal(ObjectReference::node("n"), "NodeReady", "not recorded anywhere");
    }

    #[test]
    fn batches_stay_under_the_count_and_the_body_limit() {
        let record = |message: String| EventRecord {
            involved_object: ObjectReference::sandbox("s"),
            event_type: EventType::Normal,
            reason: "R".into(),
            message,
            source: "t".into(),
            count: 1,
            first_seen: String::new(),
            last_seen: String::new(),
        };
        let small: Vec<EventRecord> = (0..2500).map(|i| record(format!("m{i}"))).collect();
        assert_eq!(chunks(small).iter().map(Vec::len).collect::<Vec<_>>(), [1000, 1000, 500]);
        let big: Vec<EventRecord> = (0..1000).map(|_| record("x".repeat(MAX_MESSAGE_CHARS))).collect();
        assert!(chunks(big)
            .iter()
            .all(|c| c.len() * (MAX_MESSAGE_CHARS + 300) <= MAX_BATCH_BYTES + MAX_MESSAGE_CHARS + 300));
    }

    #[test]
    fn messages_are_one_printable_line_of_bounded_length() {
        assert_eq!(printable("a\nb\u{1b}[2J"), "a b[2J");
        assert_eq!(printable(&"x".repeat(5000)).len(), MAX_MESSAGE_CHARS);
    }
}
