//! Where a consumer's marks live: one engine for everything it reads
//! (global scope), or one store per assigned topic-partition (partition
//! scope), opened and replayed on assign, synced and closed on revoke, so a
//! partition's state can move with the partition.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::guard::IdempotencyGuard;
use crate::{Config, Error};

/// Dedup scope of a [`DedupConsumer`](super::DedupConsumer).
// Made once per consumer: the size of the settings does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
#[non_exhaustive]
pub enum Scope {
    /// One engine for everything the consumer reads: a duplicate is caught
    /// whichever partition it arrives on.
    Global(Arc<IdempotencyGuard>),
    /// One store per assigned topic-partition, in `dir/<topic>/<partition>/`,
    /// each opened with `engine` (its `state_dir` is replaced). Duplicates
    /// are caught within a partition; the store moves with the partition
    /// (on one host through the shared directory, between hosts through
    /// the PostgreSQL checkpoint).
    Partition {
        /// The directory that holds one store per partition.
        dir: PathBuf,
        /// Settings of each store.
        engine: Config,
    },
}

/// The open stores, by topic and partition.
pub(crate) struct Stores {
    scope: Scope,
    open: Mutex<HashMap<String, Vec<Option<Arc<IdempotencyGuard>>>>>,
    /// Why a store could not be opened on assign; the loop stops with it.
    failure: Mutex<Option<String>>,
}

/// Attempts to open a partition's store while its previous owner (another
/// process on this host) may still be closing it.
const OPEN_ATTEMPTS: u32 = 50;

impl Stores {
    pub(crate) fn new(scope: Scope) -> Stores {
        Stores {
            scope,
            open: Mutex::new(HashMap::new()),
            failure: Mutex::new(None),
        }
    }

    /// The guard for messages of `topic`/`partition`, if its store is open.
    pub(crate) fn guard(&self, topic: &str, partition: i32) -> Option<Arc<IdempotencyGuard>> {
        match &self.scope {
            Scope::Global(g) => Some(Arc::clone(g)),
            Scope::Partition { .. } => {
                let open = self.open.lock();
                let p = usize::try_from(partition).ok()?;
                open.get(topic)?.get(p)?.as_ref().map(Arc::clone)
            }
        }
    }

    /// Open (and replay) the store of a newly assigned partition. Called
    /// before the assignment takes effect, so no message of it is handled
    /// before its marks are loaded.
    pub(crate) fn assign(&self, topic: &str, partition: i32) {
        let Scope::Partition { dir, engine } = &self.scope else {
            return;
        };
        let Ok(p) = usize::try_from(partition) else {
            return;
        };
        if self.guard(topic, partition).is_some() {
            return;
        }
        let path = dir.join(topic).join(partition.to_string());
        let mut attempt = 0;
        let opened = loop {
            attempt += 1;
            match engine.builder().open(&path) {
                // Its previous owner on this host is still closing it.
                Err(Error::Locked { .. }) if attempt < OPEN_ATTEMPTS => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                other => break other,
            }
        };
        match opened {
            Ok(e) => {
                let report = e.recovery_report().map(|r| r.replayed).unwrap_or(0);
                tracing::info!(
                    topic,
                    partition,
                    replayed = report,
                    "seen: partition store opened"
                );
                let mut open = self.open.lock();
                let slots = match open.get_mut(topic) {
                    Some(v) => v,
                    None => open.entry(topic.to_owned()).or_default(),
                };
                if slots.len() <= p {
                    slots.resize(p + 1, None);
                }
                if let Some(slot) = slots.get_mut(p) {
                    *slot = Some(Arc::new(IdempotencyGuard::new(Arc::new(e))));
                }
            }
            Err(e) => {
                let why = format!(
                    "opening the store of {topic}/{partition} in {}: {e}",
                    path.display()
                );
                tracing::error!(%why, "seen: partition store unavailable");
                self.failure.lock().get_or_insert(why);
            }
        }
    }

    /// Close the store of a revoked partition (after its marks were synced
    /// and its offsets committed). Handlers still running keep it alive
    /// until they finish; then its directory lock is released.
    pub(crate) fn revoke(&self, topic: &str, partition: i32) {
        if let (Scope::Partition { .. }, Ok(p)) = (&self.scope, usize::try_from(partition)) {
            let closed = self
                .open
                .lock()
                .get_mut(topic)
                .and_then(|v| v.get_mut(p))
                .and_then(Option::take);
            if let Some(g) = closed {
                if let Err(e) = g.engine().sync() {
                    tracing::error!(topic, partition, error = %e, "seen: closing a partition store");
                }
            }
        }
    }

    /// Make every open store's marks durable.
    pub(crate) fn sync(&self) -> Result<(), Error> {
        match &self.scope {
            Scope::Global(g) => g.engine().sync(),
            Scope::Partition { .. } => {
                let guards: Vec<Arc<IdempotencyGuard>> = self
                    .open
                    .lock()
                    .values()
                    .flatten()
                    .flatten()
                    .cloned()
                    .collect();
                guards.iter().try_for_each(|g| g.engine().sync())
            }
        }
    }

    /// Why a store could not be opened, if one could not.
    pub(crate) fn failure(&self) -> Option<String> {
        self.failure.lock().clone()
    }
}
