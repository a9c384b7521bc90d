//! Building an engine: settings, opening a state directory (lock, replay),
//! and the background threads.

use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::durable::{Durability, Durable};
use super::replay::SetReplay;
use super::{Engine, Inner, DEFAULT_MAX_ID_LEN, DEFAULT_SHARDS, DEFAULT_TTL, MAX_ID_LEN_LIMIT};
use crate::error::{Error, Result};
use crate::fingerprint::{Fingerprinter, Secret};
use crate::set::{MemoryPolicy, SetConfig, ShardedSet};
use crate::stats::{Counters, Histograms};
use crate::ttl::clock::{Clock, SystemClock};
use crate::ttl::{SweepSchedule, Tick};
use crate::wal::{
    Opened, RecoveryMode, Wal, WalOptions, WriteMode, DEFAULT_SEGMENT_SIZE, MAX_SEGMENT_SIZE,
    MIN_SEGMENT_SIZE,
};

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
    /// Size of each preallocated log segment (default 64 MiB, at least
    /// 4 KiB). Each segment takes its full size on disk from the moment it
    /// is created; a small store can save space with a smaller size.
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
            start: Tick::from_unix_secs(self.clock.now_unix_secs()),
        })
    }

    /// Build an in-memory engine (nothing survives the process).
    pub fn build(self) -> Result<Engine> {
        self.validate()?;
        let secret = match self.secret {
            Some(s) => s,
            None => Secret::random().map_err(|source| Error::System {
                what: "a fingerprint secret",
                source,
            })?,
        };
        let set = self.set();
        self.finish(set, secret, None, Default::default())
    }

    /// Open (or create) a durable engine in the state directory `dir`:
    /// take its lock, replay its log, and log every new mark from now on.
    pub fn open(self, dir: impl AsRef<Path>) -> Result<Engine> {
        let dir = dir.as_ref();
        self.open_with(|opts, now, sink, progress| Wal::open(dir, opts, now, sink, progress))
    }

    /// Open on a simulated disk (power-loss tests and fuzzing).
    #[cfg(any(test, fuzzing))]
    pub(crate) fn open_storage(
        self,
        storage: std::sync::Arc<dyn crate::wal::storage::Storage>,
    ) -> Result<Engine> {
        self.open_with(|opts, now, sink, progress| {
            Wal::open_storage(storage, None, opts, now, sink, progress)
        })
    }

    fn open_with(
        self,
        open_wal: impl FnOnce(
            &WalOptions,
            u64,
            &dyn crate::wal::Replay,
            &dyn Fn(usize, usize),
        ) -> Result<Opened>,
    ) -> Result<Engine> {
        self.validate()?;
        let set = self.set();
        let now = Tick::from_unix_secs(self.clock.now_unix_secs());
        let no_progress = |_: usize, _: usize| {};
        let progress: &dyn Fn(usize, usize) = match &self.replay_progress {
            Some(f) => f.as_ref(),
            None => &no_progress,
        };
        let opened = open_wal(
            &WalOptions {
                mode: self.recovery_mode,
                segment_size: self.segment_size,
                secret: self.secret,
                write_mode: write_mode(self.durability),
            },
            now.to_unix_secs(),
            &SetReplay { set: &set, now },
            progress,
        )?;
        let histograms = Histograms::default();
        histograms.replay_seconds.observe(opened.report.duration);
        opened
            .wal
            .set_sync_histogram(Arc::clone(&histograms.sync_seconds));
        let durable = Durable {
            wal: opened.wal,
            durability: self.durability,
            report: opened.report,
        };
        self.finish(set, opened.secret, Some(durable), histograms)
    }

    fn finish(
        self,
        set: ShardedSet,
        secret: Secret,
        durable: Option<Durable>,
        histograms: Histograms,
    ) -> Result<Engine> {
        let schedule = SweepSchedule::for_ttl(self.ttl);
        let flush_every = match durable.as_ref().map(|d| d.durability) {
            Some(Durability::Periodic(every)) => Some(every),
            _ => None,
        };
        let inner = Arc::new(Inner {
            set,
            fingerprinter: Fingerprinter::new(&secret),
            secret,
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
                sweeper.sweep(every, false);
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

/// How appends reach the log (measured in `docs/design.md`, "The write
/// path"): staged in memory, then `pwrite` + `fdatasync` by the group
/// commit, when every call waits for a sync; otherwise in the page cache
/// before the call returns (an acknowledged mark survives `kill -9`):
/// `pwrite` per append under `Periodic`, whose background `fdatasync` then
/// costs what the disk charges, and a copy into the mapping under `None`,
/// which never syncs and saves the system call.
fn write_mode(durability: Durability) -> WriteMode {
    match durability {
        Durability::Sync => WriteMode::Staged,
        Durability::Periodic(_) => WriteMode::Written,
        Durability::None => WriteMode::Mapped,
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
            .map_err(|source| Error::System {
                what: "a background thread",
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
