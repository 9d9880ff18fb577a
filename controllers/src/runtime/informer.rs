//! Informer: list, then watch from the list's revision into a local cache, telling subscribers what changed.

use crate::objects::{ObjectClient, ObjectError, ObjectKind, RawEvent, RawWatch};
use crate::runtime::backoff::{Backoff, BackoffConfig};
use futures::StreamExt;
use parking_lot::RwLock;
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// An API object an informer can cache.
pub trait Object: DeserializeOwned + Send + Sync + 'static {
    const KIND: ObjectKind;
    /// The object's name (its queue key within its kind).
    fn key(&self) -> &str;
    fn resource_version(&self) -> &str;
}

impl Object for sandboxd_api::Node {
    const KIND: ObjectKind = ObjectKind::Nodes;
    fn key(&self) -> &str {
        &self.name
    }
    fn resource_version(&self) -> &str {
        &self.resource_version
    }
}

impl Object for sandboxd_api::Sandbox {
    const KIND: ObjectKind = ObjectKind::Sandboxes;
    fn key(&self) -> &str {
        &self.id
    }
    fn resource_version(&self) -> &str {
        &self.resource_version
    }
}

/// What a subscriber is told; it must only enqueue keys, never block.
pub enum Change<'a, T> {
    Upsert { old: Option<&'a Arc<T>>, new: &'a Arc<T> },
    Delete(&'a Arc<T>),
}

type Handler<T> = Box<dyn Fn(&Change<'_, T>) + Send + Sync>;

struct Inner<T> {
    cache: RwLock<HashMap<String, Arc<T>>>,
    handlers: RwLock<Vec<Handler<T>>>,
    synced: tokio::sync::watch::Sender<bool>,
}

/// A cache of one kind kept current by list + watch. Cheap to clone.
pub struct Informer<T> {
    inner: Arc<Inner<T>>,
}

impl<T> Clone for Informer<T> {
    fn clone(&self) -> Self {
        Informer { inner: self.inner.clone() }
    }
}

impl<T: Object> Default for Informer<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Object> crate::runtime::footprint::Footprint for Inner<T> {
    fn footprint(&self) -> Vec<(&'static str, usize)> {
        vec![(T::KIND.as_str(), self.cache.read().len())]
    }
}

/// Where the list/watch loop stands.
enum State {
    /// Nothing trustworthy: take a full list and swap the cache.
    Listing,
    /// The cache is current up to `revision`: open a watch from there.
    Opening { revision: u64 },
    /// Applying events as they come.
    Watching { revision: u64, stream: RawWatch },
}

impl<T: Object> Informer<T> {
    pub fn new() -> Self {
        let (synced, _) = tokio::sync::watch::channel(false);
        let inner = Arc::new(Inner { cache: RwLock::new(HashMap::new()), handlers: RwLock::new(Vec::new()), synced });
        crate::runtime::footprint::register("informer", &inner);
        Informer { inner }
    }

    /// Registers a handler called for every change, in order, on the informer's task.
    pub fn subscribe(&self, handler: impl Fn(&Change<'_, T>) + Send + Sync + 'static) {
        self.inner.handlers.write().push(Box::new(handler));
    }

    pub fn get(&self, key: &str) -> Option<Arc<T>> {
        self.inner.cache.read().get(key).cloned()
    }

    pub fn list(&self) -> Vec<Arc<T>> {
        self.inner.cache.read().values().cloned().collect()
    }

    /// How many cached objects `label_of` gives each label (nodes by state, sandboxes by phase).
    pub fn count_by(&self, label_of: impl Fn(&T) -> &'static str) -> HashMap<&'static str, usize> {
        let mut counts = HashMap::new();
        for object in self.inner.cache.read().values() {
            *counts.entry(label_of(object)).or_insert(0) += 1;
        }
        counts
    }

    pub fn keys(&self) -> Vec<String> {
        self.inner.cache.read().keys().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.inner.cache.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the first full list has been applied.
    pub fn has_synced(&self) -> bool {
        *self.inner.synced.borrow()
    }

    /// Waits until the first full list has been applied.
    pub async fn wait_synced(&self) {
        let mut rx = self.inner.synced.subscribe();
        let _ = rx.wait_for(|synced| *synced).await;
    }

    /// Keeps the cache current until `shutdown`.
    pub async fn run(self, client: Arc<dyn ObjectClient>, shutdown: CancellationToken) {
        let mut state = State::Listing;
        let mut backoff = Backoff::new(BackoffConfig::default());
        let mut healthy_since = tokio::time::Instant::now();
        loop {
            let step = self.step(state, client.as_ref(), &mut backoff, &mut healthy_since);
            state = tokio::select! {
                _ = shutdown.cancelled() => return,
                next = step => next,
            };
        }
    }

    async fn step(
        &self,
        state: State,
        client: &dyn ObjectClient,
        backoff: &mut Backoff,
        healthy_since: &mut tokio::time::Instant,
    ) -> State {
        match state {
            State::Listing => match client.list(T::KIND).await {
                Ok((items, revision)) => {
                    self.replace_all(&items);
                    State::Opening { revision }
                }
                Err(e) => {
                    self.wait_after_error(backoff, &e, "list").await;
                    State::Listing
                }
            },
            State::Opening { revision } => match client.watch(T::KIND, revision).await {
                Ok(stream) => {
                    *healthy_since = tokio::time::Instant::now();
                    State::Watching { revision, stream }
                }
                Err(ObjectError::Gone(_)) => State::Listing,
                Err(e) => {
                    self.wait_after_error(backoff, &e, "watch").await;
                    State::Opening { revision }
                }
            },
            State::Watching { revision, mut stream } => match stream.next().await {
                Some(Ok(event)) => {
                    backoff.reset_if_healthy_since(*healthy_since);
                    let revision = self.apply(event).unwrap_or(revision).max(revision);
                    State::Watching { revision, stream }
                }
                Some(Err(ObjectError::Gone(_))) => State::Listing,
                Some(Err(e)) => {
                    self.wait_after_error(backoff, &e, "watch stream").await;
                    State::Opening { revision }
                }
                // The server ended the stream (timeout, cut off as slow, restart): resume.
                None => State::Opening { revision },
            },
        }
    }

    async fn wait_after_error(&self, backoff: &mut Backoff, error: &ObjectError, what: &str) {
        let delay = backoff.next_delay();
        tracing::debug!(kind = T::KIND.as_str(), %error, ?delay, "informer {what} failed");
        tokio::time::sleep(delay).await;
    }

    /// Swaps in a full list, telling subscribers about every object and every disappearance.
    fn replace_all(&self, items: &[Vec<u8>]) {
        let mut fresh: HashMap<String, Arc<T>> = HashMap::with_capacity(items.len());
        for raw in items {
            match serde_json::from_slice::<T>(raw) {
                Ok(object) => {
                    fresh.insert(object.key().to_string(), Arc::new(object));
                }
                Err(e) => tracing::warn!(kind = T::KIND.as_str(), error = %e, "skipping undecodable object"),
            }
        }
        let old = std::mem::replace(&mut *self.inner.cache.write(), fresh.clone());
        let handlers = self.inner.handlers.read();
        for (key, new) in &fresh {
            let change = Change::Upsert { old: old.get(key), new };
            handlers.iter().for_each(|h| h(&change));
        }
        for (key, gone) in &old {
            if !fresh.contains_key(key) {
                handlers.iter().for_each(|h| h(&Change::Delete(gone)));
            }
        }
        self.inner.synced.send_replace(true);
    }

    /// Applies one event; returns the revision it carries.
    fn apply(&self, event: RawEvent) -> Option<u64> {
        let (raw, deleted) = match event {
            RawEvent::Bookmark(revision) => return Some(revision),
            RawEvent::Added(raw) | RawEvent::Modified(raw) => (raw, false),
            RawEvent::Deleted(raw) => (raw, true),
        };
        let object = match serde_json::from_slice::<T>(&raw) {
            Ok(object) => Arc::new(object),
            Err(e) => {
                tracing::warn!(kind = T::KIND.as_str(), error = %e, "skipping undecodable event");
                return None;
            }
        };
        let revision = object.resource_version().parse().ok();
        let key = object.key().to_string();
        let handlers = self.inner.handlers.read();
        if deleted {
            let removed = self.inner.cache.write().remove(&key);
            let last = removed.unwrap_or(object);
            handlers.iter().for_each(|h| h(&Change::Delete(&last)));
        } else {
            let old = self.inner.cache.write().insert(key, object.clone());
            let change = Change::Upsert { old: old.as_ref(), new: &object };
            handlers.iter().for_each(|h| h(&change));
        }
        revision
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::FakeObjects;
    use sandboxd_api::Sandbox;

    fn sandbox(id: &str, rv: u64) -> Sandbox {
        serde_json::from_value(serde_json::json!({
            "id": id, "created_at": "", "updated_at": "", "resource_version": rv.to_string(),
            "spec": {"containers": []}
        }))
        .unwrap()
    }

    fn raw(s: &Sandbox) -> Vec<u8> {
        serde_json::to_vec(s).unwrap()
    }

    async fn settle() {
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
    }

    /// Runs an informer over `objects`, recording every change its handlers see as `+id` or `-id`.
    fn start(
        objects: &Arc<FakeObjects>,
    ) -> (Informer<Sandbox>, Arc<parking_lot::Mutex<Vec<String>>>, CancellationToken) {
        let informer: Informer<Sandbox> = Informer::new();
        let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let record = seen.clone();
        informer.subscribe(move |change| match change {
            Change::Upsert { new, .. } => record.lock().push(format!("+{}", new.id)),
            Change::Delete(gone) => record.lock().push(format!("-{}", gone.id)),
        });
        let stop = CancellationToken::new();
        tokio::spawn(informer.clone().run(objects.clone(), stop.clone()));
        (informer, seen, stop)
    }

    #[tokio::test(start_paused = true)]
    async fn a_410_lists_again_and_the_relist_emits_deletes_for_what_vanished() {
        let objects = Arc::new(FakeObjects::new(vec![], vec![]));
        objects.queue_list(vec![sandbox("a", 1), sandbox("b", 1)], 5);
        // b was deleted while the watch from 5 was too old to resume: only a relist can tell.
        objects.script_watch(Err(ObjectError::Gone("too old".into())));
        objects.queue_list(vec![sandbox("a", 1)], 7);
        let (informer, seen, stop) = start(&objects);
        settle().await;
        assert_eq!(objects.lists(), 2, "a 410 lists again");
        assert_eq!(objects.watched_from(), [5, 7], "and watches from the new list's revision");
        assert!(seen.lock().contains(&"-b".to_string()), "the relist emits a delete for b: {:?}", seen.lock());
        assert!(informer.get("b").is_none() && informer.get("a").is_some());
        stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn bookmarks_move_the_revision_a_watch_resumes_from() {
        let objects = Arc::new(FakeObjects::new(vec![], vec![sandbox("a", 3)]));
        objects.set_sandboxes(vec![sandbox("a", 3)], 3);
        let c = sandbox("c", 9);
        objects.script_watch(Ok(vec![Ok(RawEvent::Added(raw(&c))), Ok(RawEvent::Bookmark(40))]));
        let (informer, seen, stop) = start(&objects);
        settle().await;
        assert_eq!(objects.watched_from(), [3, 40], "resumed from the bookmark, not from the last event (9)");
        assert_eq!(objects.lists(), 1, "an ended stream resumes without listing");
        assert!(informer.get("c").is_some());
        assert_eq!(*seen.lock(), ["+a", "+c"]);
        stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_delete_event_removes_the_object_and_reaches_handlers() {
        let objects = Arc::new(FakeObjects::new(vec![], vec![sandbox("a", 2)]));
        objects.set_sandboxes(vec![sandbox("a", 2)], 2);
        objects.script_watch(Ok(vec![Ok(RawEvent::Deleted(raw(&sandbox("a", 4))))]));
        let (informer, seen, stop) = start(&objects);
        settle().await;
        assert!(informer.is_empty());
        assert_eq!(*seen.lock(), ["+a", "-a"]);
        assert_eq!(objects.watched_from(), [2, 4], "the delete's revision counts too");
        stop.cancel();
    }
}
