//! Where a consumer's marks live: one engine for everything it reads
//! (global scope), or one store per assigned topic-partition (partition
//! scope), opened and replayed on assign, synced and closed on revoke, so a
//! partition's state can move with the partition. With a
//! [`PartitionCheckpoint`] (feature `postgres`) it moves between hosts too:
//! each partition store is checkpointed to PostgreSQL in the background,
//! restored on assign when its local state is empty or behind, and
//! checkpointed once more on revoke, before the next owner restores it.

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

/// Partition stores checkpointed to PostgreSQL (feature `postgres`): the
/// store of `topic`/`partition` is named `{postgres.store}/{topic}/{partition}`.
#[cfg(feature = "postgres")]
#[derive(Clone, Debug)]
pub struct PartitionCheckpoint {
    /// The database, and the prefix of the store names.
    pub postgres: crate::checkpoint::PgOptions,
    /// Time between background checkpoints of each store.
    pub every: Duration,
}

/// One open partition store.
struct Open {
    guard: Arc<IdempotencyGuard>,
    /// Its checkpointer and lease, when partition stores go to PostgreSQL.
    #[cfg(feature = "postgres")]
    shared: Option<(crate::checkpoint::Checkpointer, crate::checkpoint::Lease)>,
}

/// How long a new owner waits for the previous one to release a
/// partition store (its handlers finish, then its last checkpoint).
#[cfg(feature = "postgres")]
const LEASE_WAIT: Duration = Duration::from_secs(60);

/// The open stores, by topic and partition.
pub(crate) struct Stores {
    scope: Scope,
    open: Mutex<HashMap<String, Vec<Option<Open>>>>,
    /// Why a store could not be opened on assign; the loop stops with it.
    failure: Mutex<Option<String>>,
    #[cfg(feature = "postgres")]
    hand_off: Option<HandOff>,
}

/// PostgreSQL for partition stores: the settings and a runtime of its own
/// (assign and revoke run inside the consumer's rebalance callback).
#[cfg(feature = "postgres")]
struct HandOff {
    config: PartitionCheckpoint,
    /// Always `Some` until dropped.
    runtime: Option<tokio::runtime::Runtime>,
}

#[cfg(feature = "postgres")]
impl Drop for HandOff {
    fn drop(&mut self) {
        // The consumer may be dropped inside an async context, where a
        // runtime must not block on its shutdown.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
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
            #[cfg(feature = "postgres")]
            hand_off: None,
        }
    }

    /// Checkpoint partition stores to PostgreSQL and restore them on assign.
    #[cfg(feature = "postgres")]
    pub(crate) fn with_checkpoints(mut self, config: PartitionCheckpoint) -> Result<Stores, Error> {
        // Refused here, before any partition is assigned, rather than by
        // the first store's checkpointer.
        crate::checkpoint::require_interval(config.every)?;
        // One worker that always runs: the pools it opens are shared with
        // the checkpointers' own runtimes.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("seen-partition-pg")
            .enable_all()
            .build()
            .map_err(|source| Error::System {
                what: "the partition checkpoint runtime",
                source,
            })?;
        self.hand_off = Some(HandOff {
            config,
            runtime: Some(runtime),
        });
        Ok(self)
    }

    /// The guard for `msg`, if its partition's store is open. (Its topic,
    /// which rdkafka checks as UTF-8 on every call, is read only in
    /// partition scope.)
    pub(crate) fn guard_of(&self, msg: &impl rdkafka::Message) -> Option<Arc<IdempotencyGuard>> {
        match &self.scope {
            Scope::Global(g) => Some(Arc::clone(g)),
            Scope::Partition { .. } => self.guard(msg.topic(), msg.partition()),
        }
    }

    /// The guard for messages of `topic`/`partition`, if its store is open.
    pub(crate) fn guard(&self, topic: &str, partition: i32) -> Option<Arc<IdempotencyGuard>> {
        match &self.scope {
            Scope::Global(g) => Some(Arc::clone(g)),
            Scope::Partition { .. } => {
                let open = self.open.lock();
                let p = usize::try_from(partition).ok()?;
                open.get(topic)?
                    .get(p)?
                    .as_ref()
                    .map(|o| Arc::clone(&o.guard))
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
        match self.open_store(engine, topic, partition, &path) {
            Ok(store) => {
                let replayed = store
                    .guard
                    .engine()
                    .recovery_report()
                    .map(|r| r.replayed)
                    .unwrap_or(0);
                tracing::info!(topic, partition, replayed, "seen: partition store opened");
                let mut open = self.open.lock();
                let slots = match open.get_mut(topic) {
                    Some(v) => v,
                    None => open.entry(topic.to_owned()).or_default(),
                };
                if slots.len() <= p {
                    slots.resize_with(p + 1, || None);
                }
                if let Some(slot) = slots.get_mut(p) {
                    *slot = Some(store);
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

    /// Open (replay) a partition's store, retrying while its previous
    /// owner on this host is still closing it; through PostgreSQL when
    /// partition stores are checkpointed.
    fn open_store(
        &self,
        engine: &Config,
        topic: &str,
        partition: i32,
        path: &std::path::Path,
    ) -> Result<Open, String> {
        #[cfg(feature = "postgres")]
        if let Some(h) = &self.hand_off {
            return self.open_with_postgres(h, engine, topic, partition, path);
        }
        let _ = (topic, partition);
        let mut attempt = 0;
        loop {
            attempt += 1;
            match engine.builder().open(path) {
                // Its previous owner on this host is still closing it.
                Err(Error::Locked { .. }) if attempt < OPEN_ATTEMPTS => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Err(e) => return Err(e.to_string()),
                Ok(e) => {
                    return Ok(Open {
                        guard: Arc::new(IdempotencyGuard::new(Arc::new(e))),
                        #[cfg(feature = "postgres")]
                        shared: None,
                    })
                }
            }
        }
    }

    /// Open through PostgreSQL: take the store's lease (so the previous
    /// owner has made its last checkpoint), restore if the local state is
    /// empty or behind, then checkpoint in the background. PostgreSQL
    /// unreachable means the store is not opened (the loop stops): opening
    /// it from local state alone could let duplicates of another host's
    /// marks in.
    #[cfg(feature = "postgres")]
    fn open_with_postgres(
        &self,
        h: &HandOff,
        engine: &Config,
        topic: &str,
        partition: i32,
        path: &std::path::Path,
    ) -> Result<Open, String> {
        use crate::checkpoint::{Checkpointer, PgError, Postgres};
        let mut options = h.config.postgres.clone();
        options.store = format!("{}/{topic}/{partition}", options.store);
        options.partition = Some((topic.to_owned(), partition));
        let pg = Arc::new(Postgres::new(options).map_err(|e| e.to_string())?);
        let runtime = h.runtime.as_ref().ok_or("the consumer is closing")?;
        let lease = on_side_thread(|| runtime.block_on(pg.lease(LEASE_WAIT)))?
            .map_err(|e| e.to_string())?;
        let mut attempt = 0;
        let (engine, report) = loop {
            attempt += 1;
            let opened =
                on_side_thread(|| runtime.block_on(pg.open(engine.builder(), path, |_, _| {})))?;
            match opened {
                Err(PgError::Engine(Error::Locked { .. })) if attempt < OPEN_ATTEMPTS => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Err(e) => return Err(e.to_string()),
                Ok(opened) => break opened,
            }
        };
        if report.restored {
            tracing::info!(
                topic,
                partition,
                rows = report.rows,
                loaded = report.loaded,
                "seen: partition store restored from PostgreSQL"
            );
        }
        let engine = Arc::new(engine);
        let checkpointer = Checkpointer::start(pg, Arc::clone(&engine), h.config.every, None)
            .map_err(|e| e.to_string())?;
        Ok(Open {
            guard: Arc::new(IdempotencyGuard::new(engine)),
            shared: Some((checkpointer, lease)),
        })
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
            if let Some(store) = closed {
                if let Err(e) = store.guard.engine().sync() {
                    tracing::error!(topic, partition, error = %e, "seen: closing a partition store");
                }
                #[cfg(feature = "postgres")]
                if let Some(shared) = store.shared {
                    release_when_idle(topic, partition, store.guard, shared);
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
                    .map(|o| Arc::clone(&o.guard))
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

/// Run `f` on a thread of its own: assign runs inside the consumer's
/// rebalance callback, possibly on a runtime's worker, where blocking on
/// another runtime is not allowed.
#[cfg(feature = "postgres")]
fn on_side_thread<T: Send>(f: impl FnOnce() -> T + Send) -> Result<T, String> {
    std::thread::scope(|s| s.spawn(f).join()).map_err(|_| "a PostgreSQL call panicked".to_string())
}

/// Hand a revoked partition's store over: once the handlers still running
/// on it have finished (they may still mark), sync, checkpoint a last time
/// and release the lease, so the next owner restores every mark. In the
/// background: the rebalance callback must not wait for handlers that the
/// loop polls only after it returns. Bounded by [`LEASE_WAIT`].
#[cfg(feature = "postgres")]
fn release_when_idle(
    topic: &str,
    partition: i32,
    guard: Arc<IdempotencyGuard>,
    (checkpointer, lease): (crate::checkpoint::Checkpointer, crate::checkpoint::Lease),
) {
    let what = format!("{topic}/{partition}");
    let spawned = std::thread::Builder::new()
        .name("seen-hand-off".into())
        .spawn(move || {
            let deadline = std::time::Instant::now() + LEASE_WAIT;
            while Arc::strong_count(&guard) > 1 && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if let Err(e) = guard.engine().sync() {
                tracing::error!(partition = %what, error = %e, "seen: closing a partition store");
            }
            if let Some(e) = checkpointer.stop() {
                tracing::error!(partition = %what, error = %e, "seen: the last checkpoint of a revoked partition failed; its next owner may repeat handlers");
            }
            drop(guard);
            drop(lease);
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "seen: could not start the hand-off thread; checkpointing now");
    }
}
