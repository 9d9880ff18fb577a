//! Entry counts of the per-key structures the controllers keep, so `/metrics` and leak tests can see
//! that deleting objects gives their entries back.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};

/// A part that keeps entries per object (a cache, a queue, an index).
pub trait Footprint: Send + Sync {
    /// `(structure, entries)` for each per-key structure this part keeps.
    fn footprint(&self) -> Vec<(&'static str, usize)>;
}

/// Parts by owner; weak, so a controller that is dropped (a lost lease) drops out of the report.
static PARTS: Mutex<Vec<(&'static str, Weak<dyn Footprint>)>> = Mutex::new(Vec::new());

/// Reports `part`'s structures under `owner` (e.g. "scheduler") for as long as it lives.
pub fn register<T: Footprint + 'static>(owner: &'static str, part: &Arc<T>) {
    let weak: Weak<dyn Footprint> = Arc::downgrade(part) as Weak<dyn Footprint>;
    let mut parts = PARTS.lock().unwrap_or_else(|e| e.into_inner());
    parts.retain(|(_, p)| p.strong_count() > 0);
    parts.push((owner, weak));
}

/// Entries per `(owner, structure)`, summed over every live part of this process.
pub fn snapshot() -> BTreeMap<(&'static str, &'static str), usize> {
    let live: Vec<(&'static str, Arc<dyn Footprint>)> = {
        let mut parts = PARTS.lock().unwrap_or_else(|e| e.into_inner());
        parts.retain(|(_, p)| p.strong_count() > 0);
        parts.iter().filter_map(|(owner, p)| Some((*owner, p.upgrade()?))).collect()
    };
    let mut totals = BTreeMap::new();
    for (owner, part) in live {
        for (structure, entries) in part.footprint() {
            *totals.entry((owner, structure)).or_insert(0) += entries;
        }
    }
    totals
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(usize);
    impl Footprint for Fixed {
        fn footprint(&self) -> Vec<(&'static str, usize)> {
            vec![("things", self.0)]
        }
    }

    #[test]
    fn parts_are_summed_per_owner_and_dropped_parts_leave_the_report() {
        let a = Arc::new(Fixed(2));
        let b = Arc::new(Fixed(3));
        register("footprint-test", &a);
        register("footprint-test", &b);
        assert_eq!(snapshot().get(&("footprint-test", "things")), Some(&5));
        drop(b);
        assert_eq!(snapshot().get(&("footprint-test", "things")), Some(&2));
        drop(a);
        assert_eq!(snapshot().get(&("footprint-test", "things")), None);
    }
}
