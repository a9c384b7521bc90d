//! Building an engine: settings, opening a state directory (lock, replay),
//! and the background threads.

use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_epoch as epoch;

use super::{
    Durable, Engine, Inner, MemoryPolicy, Verdict, BATCH_WINDOW, DEFAULT_MAX_ID_LEN,
    DEFAULT_SHARDS, DEFAULT_TTL, MAX_ID_LEN_LIMIT,
};
use crate::fingerprint::{Fingerprint, Fingerprinter, Secret};
use crate::set::{SetConfig, ShardedSet};
use crate::stats::Counters;
use crate::ttl::clock::{Clock, SystemClock};
use crate::ttl::{SweepSchedule, Tick};
use crate::wal::format::{Record, LOCK_FILE};
use crate::wal::recovery;
use crate::wal::storage::{DirLock, DirStorage, Storage};
use crate::wal::{
    Durability, RecoveryMode, DEFAULT_SEGMENT_SIZE, MAX_SEGMENT_SIZE, MIN_SEGMENT_SIZE,
};
use crate::{Error, Result};

/// Configures an [`Engine`]. Start with [`Engine::builder`].
pub struct EngineBuilder {
    durability: Durability,
    recovery_mode: RecoveryMode,
    segment_size: usize,
    replay_progress: Option<Box<dyn Fn(usize, usize)>>,
    ttl: Duration,
    shards: usize,
    capacity: usize,
    memory_limit: Option<(usize, MemoryPolicy)>,
    max_id_len: usize,
    secret: Option<Secret>,
    clock: Arc<dyn Clock>,
    background_sweep: bool,
}

impl std::fmt::Debug for EngineBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineBuilder")
            .field("ttl", &self.ttl)
            .field("durability", &self.durability)
            .field("recovery_mode", &self.recovery_mode)
            .field("shards", &self.shards)
            .finish_non_exhaustive()
    }
}

impl Default for EngineBuilder {
    fn default() -> Self {
        EngineBuilder {
            durability: Durability::default(),
            recovery_mode: RecoveryMode::default(),
            segment_size: DEFAULT_SEGMENT_SIZE,
            replay_progress: None,
            ttl: DEFAULT_TTL,
            shards: DEFAULT_SHARDS,
            capacity: 0,
            memory_limit: None,
            max_id_len: DEFAULT_MAX_ID_LEN,
            secret: None,
            clock: Arc::new(SystemClock),
            background_sweep: true,
        }
    }
}

impl EngineBuilder {
    /// How long a mark lasts (whole seconds; default one hour).
    /// `Duration::ZERO` disables deduplication: every valid id is `New` and
    /// nothing is stored.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }
    /// Number of shards (a power of two, 1..=65536; default 64).
    pub fn shards(mut self, shards: usize) -> Self {
        self.shards = shards;
        self
    }
    /// Expected number of live keys: sizes tables up front so they need not
    /// grow (rate × TTL is a good estimate).
    pub fn capacity(mut self, keys: usize) -> Self {
        self.capacity = keys;
        self
    }
    /// A ceiling on the set's memory, and what happens when it is reached.
    pub fn memory_limit(mut self, bytes: usize, policy: MemoryPolicy) -> Self {
        self.memory_limit = Some((bytes, policy));
        self
    }
    /// Longest accepted id in bytes (default 1024, at most 1 MiB).
    pub fn max_id_len(mut self, bytes: usize) -> Self {
        self.max_id_len = bytes;
        self
    }
    /// Use this fingerprint secret instead of a random one.
    pub fn secret(mut self, secret: Secret) -> Self {
        self.secret = Some(secret);
        self
    }
    /// Read time from `clock` (tests use [`ManualClock`](crate::ManualClock)).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }
    /// Sweep expired entries from a background thread (default on). When
    /// off, memory is reclaimed by [`Engine::expire_now`] and by growth.
    pub fn background_sweep(mut self, on: bool) -> Self {
        self.background_sweep = on;
        self
    }

    /// When a mark is on disk (default [`Durability::Sync`]). Only matters
    /// for engines made with [`EngineBuilder::open`].
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }
    /// What to do with damage found on open (default
    /// [`RecoveryMode::TolerateTornTail`]).
    pub fn recovery_mode(mut self, mode: RecoveryMode) -> Self {
        self.recovery_mode = mode;
        self
    }
    /// Size of each preallocated log segment (default 64 MiB).
    pub fn segment_size(mut self, bytes: usize) -> Self {
        self.segment_size = bytes;
        self
    }
    /// Called as `(segments done, segments total)` while the log replays.
    pub fn replay_progress(mut self, f: impl Fn(usize, usize) + 'static) -> Self {
        self.replay_progress = Some(Box::new(f));
        self
    }

    fn validate(&self) -> Result<()> {
        if !self.shards.is_power_of_two() || self.shards > 65536 {
            return Err(Error::Config(format!(
                "shards must be a power of two in 1..=65536, got {}",
                self.shards
            )));
        }
        if self.max_id_len == 0 || self.max_id_len > MAX_ID_LEN_LIMIT {
            return Err(Error::Config(format!(
                "max_id_len must be in 1..={MAX_ID_LEN_LIMIT}, got {}",
                self.max_id_len
            )));
        }
        if self.ttl != Duration::ZERO && self.ttl < Duration::from_secs(1) {
            return Err(Error::Config(format!(
                "ttl has one-second resolution; {:?} is below it (use 0 to disable)",
                self.ttl
            )));
        }
        if !(MIN_SEGMENT_SIZE..=MAX_SEGMENT_SIZE).contains(&self.segment_size) {
            return Err(Error::Config(format!(
                "segment_size must be in {MIN_SEGMENT_SIZE}..={MAX_SEGMENT_SIZE}, got {}",
                self.segment_size
            )));
        }
        if let Durability::Periodic(d) = self.durability {
            if d.is_zero() {
                return Err(Error::Config(
                    "periodic durability needs an interval above zero".into(),
                ));
            }
        }
        Ok(())
    }

    fn set(&self) -> ShardedSet {
        let (memory_limit, policy) = match self.memory_limit {
            Some((bytes, policy)) => (Some(bytes), policy),
            None => (None, MemoryPolicy::default()),
        };
        ShardedSet::new(SetConfig {
            shards: self.shards,
            capacity_hint: self.capacity,
            memory_limit,
            policy,
        })
    }

    /// Build an in-memory engine (nothing survives the process).
    pub fn build(self) -> Result<Engine> {
        self.validate()?;
        let secret = match self.secret {
            Some(s) => s,
            None => Secret::random().map_err(|source| Error::Io {
                path: "getrandom".into(),
                source,
            })?,
        };
        let set = self.set();
        self.finish(set, secret, None, Default::default())
    }

    /// Open (or create) a durable engine in the state directory `dir`:
    /// take its lock, replay its log, and log every new mark from now on.
    pub fn open(self, dir: impl AsRef<Path>) -> Result<Engine> {
        self.validate()?;
        let dir = dir.as_ref();
        let storage = DirStorage::open(dir).map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = DirLock::try_lock(&lock_path)
            .map_err(|source| Error::Io {
                path: lock_path.clone(),
                source,
            })?
            .ok_or_else(|| Error::Locked {
                path: dir.to_path_buf(),
            })?;
        self.open_storage(Arc::new(storage), Some(lock))
    }

    pub(crate) fn open_storage(
        self,
        storage: Arc<dyn Storage>,
        lock: Option<DirLock>,
    ) -> Result<Engine> {
        self.validate()?;
        let set = self.set();
        let now = Tick::from_unix_secs(self.clock.now_unix_secs());
        let no_progress = |_: usize, _: usize| {};
        let progress: &dyn Fn(usize, usize) = match &self.replay_progress {
            Some(f) => f.as_ref(),
            None => &no_progress,
        };
        let replay = SetReplay { set: &set, now };
        let opened = recovery::open(
            storage,
            &recovery::OpenOptions {
                mode: self.recovery_mode,
                segment_size: self.segment_size,
                secret: self.secret,
            },
            now.to_unix_secs(),
            &replay,
            progress,
        )?;
        let histograms = crate::metrics::Histograms::default();
        histograms
            .replay_seconds
            .observe(opened.report.duration.as_secs_f64());
        opened
            .wal
            .set_sync_histogram(histograms.sync_seconds.clone());
        let durable = Durable {
            wal: opened.wal,
            durability: self.durability,
            report: opened.report,
            _lock: lock,
        };
        self.finish(set, opened.secret, Some(durable), histograms)
    }

    fn finish(
        self,
        set: ShardedSet,
        secret: Secret,
        durable: Option<Durable>,
        histograms: crate::metrics::Histograms,
    ) -> Result<Engine> {
        let schedule = SweepSchedule::for_ttl(self.ttl);
        let flush_every = match durable.as_ref().map(|d| d.durability) {
            Some(Durability::Periodic(every)) => Some(every),
            _ => None,
        };
        let inner = Arc::new(Inner {
            set,
            fingerprinter: Fingerprinter::new(&secret),
            clock: self.clock,
            ttl: self.ttl,
            max_id_len: self.max_id_len,
            counters: Counters::new(),
            sweep_interval: schedule.interval,
            durable,
            histograms,
        });
        let mut background = Vec::new();
        if self.background_sweep && self.ttl != Duration::ZERO {
            let sweeper = Arc::clone(&inner);
            let every = inner.sweep_interval;
            background.push(Background::start("seen-sweeper", every, move || {
                sweeper.sweep(every);
            })?);
        }
        if let Some(every) = flush_every {
            let flusher = Arc::clone(&inner);
            background.push(Background::start("seen-flusher", every, move || {
                if let Some(d) = &flusher.durable {
                    // A failure poisons the log; callers see it on their next mark.
                    let _ = d.wal.sync();
                }
            })?);
        }
        Ok(Engine {
            inner,
            _background: background,
        })
    }
}

/// Replays log records into the set: hashes nothing (records carry
/// fingerprints), prefetches a window of table lines ahead of the inserts.
struct SetReplay<'a> {
    set: &'a ShardedSet,
    now: Tick,
}

impl recovery::Replay for SetReplay<'_> {
    fn reserve(&self, records: u64) {
        self.set.reserve(records as usize, self.now);
    }

    fn apply(&self, records: &[Record]) -> (u64, u64) {
        let guard = &epoch::pin();
        let (mut marks, mut forgets) = (0, 0);
        for window in records.chunks(BATCH_WINDOW) {
            for r in window {
                self.set.prefetch(Fingerprint(r.fingerprint()), guard);
            }
            for r in window {
                match *r {
                    Record::Mark {
                        fingerprint,
                        expiry_unix_secs,
                    } => {
                        let expiry = Tick::from_unix_secs(expiry_unix_secs);
                        let fp = Fingerprint(fingerprint);
                        if let Ok(Verdict::New) = self.set.insert(fp, self.now, expiry, guard) {
                            marks += 1;
                        }
                    }
                    Record::Forget { fingerprint, .. } => {
                        let fp = Fingerprint(fingerprint);
                        if self.set.forget(fp, self.now, guard).is_some() {
                            forgets += 1;
                        }
                    }
                }
            }
        }
        (marks, forgets)
    }
}

/// A background thread running `tick` every `every` until the engine is
/// dropped (the channel disconnects).
pub(super) struct Background {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Background {
    fn start(name: &str, every: Duration, tick: impl Fn() + Send + 'static) -> Result<Background> {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                    tick();
                }
            })
            .map_err(|source| Error::Io {
                path: name.into(),
                source,
            })?;
        Ok(Background {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
