//! The `memory://` backend: the in-process store without a durable layer, for tests and demos.

use super::writer::{LocalStore, NoPersist};
use super::StoreOptions;

/// Starts an empty in-memory store at revision 0. With no fsync to share, no commit waits.
pub fn open(options: StoreOptions) -> LocalStore {
    LocalStore::start(Vec::new(), 0, NoPersist, StoreOptions { commit_delay: std::time::Duration::ZERO, ..options })
}
