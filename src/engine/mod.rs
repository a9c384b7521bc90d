//! The engine: ids in, verdicts out. Ties the fingerprint function, the set
//! and the TTL machinery together behind a small API.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_epoch as epoch;

use crate::fingerprint::{Fingerprint, Fingerprinter};
use crate::set::ShardedSet;
use crate::stats::Counters;
use crate::ttl::clock::Clock;
use crate::ttl::Tick;
use crate::wal::format::Record;
use crate::wal::recovery::RecoveryReport;
use crate::wal::storage::DirLock;
use crate::wal::{Durability, Wal};
use crate::{Error, Result};

mod builder;
use builder::Background;
pub use builder::EngineBuilder;

/// Default retention of a mark.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
/// Default maximum id length in bytes.
pub const DEFAULT_MAX_ID_LEN: usize = 1024;
/// Largest configurable id length.
pub const MAX_ID_LEN_LIMIT: usize = 1 << 20;
/// Few enough that tables reach huge-page size early, many more than cores.
const DEFAULT_SHARDS: usize = 64;
/// Ids hashed and prefetched together by the batch path.
const BATCH_WINDOW: usize = 16;

/// The answer to "have I seen this id?".
#[must_use]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// First sighting (within the TTL): process the event. The id is now marked.
    New,
    /// Already marked and not expired: skip the event.
    Duplicate,
}

impl Verdict {
    /// `true` for [`Verdict::New`].
    pub fn is_new(self) -> bool {
        self == Verdict::New
    }
}

/// What to do when the memory ceiling is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MemoryPolicy {
    /// Drop the entries closest to expiry (the oldest, under one TTL) in a
    /// batch, and count them in [`Stats::evicted`]. An evicted id is
    /// reported `New` if it comes back.
    EvictOldest,
    /// Keep every entry; refuse new ids with [`Error::CapacityExceeded`]
    /// (counted in [`Stats::rejected`]) until expiry frees room.
    #[default]
    Reject,
}

/// A snapshot of the engine's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Entries resident and not forgotten. Entries past their TTL count until
    /// swept; call [`Engine::expire_now`] first for an exact live count.
    pub live_keys: usize,
    /// Bytes held by the set's tables.
    pub memory_bytes: usize,
    /// Checks answered [`Verdict::New`].
    pub new: u64,
    /// Checks answered [`Verdict::Duplicate`].
    pub duplicate: u64,
    /// Ids rejected as empty or too long.
    pub invalid: u64,
    /// Ids refused at the memory ceiling.
    pub rejected: u64,
    /// Expired entries reclaimed from memory.
    pub expired: u64,
    /// Live entries evicted at the memory ceiling.
    pub evicted: u64,
    /// Entries removed by [`Engine::forget`].
    pub forgotten: u64,
    /// Log segment files (durable engines).
    pub log_segments: usize,
    /// Log bytes in use (durable engines).
    pub log_bytes: u64,
    /// Log bytes written but not yet durable: the durability lag.
    pub unsynced_bytes: u64,
    /// Guard calls that met their id already in flight.
    pub inflight_collisions: u64,
    /// Guarded work that returned an error.
    pub failed: u64,
    /// Claims released (work failed, panicked or was cancelled).
    pub released: u64,
}

/// Verdict counts, added to the shared counters when dropped.
struct Tally<'a> {
    counters: &'a Counters,
    new: u64,
    duplicate: u64,
    rejected: u64,
}

impl<'a> Tally<'a> {
    fn new(engine: &'a Engine) -> Self {
        Tally {
            counters: &engine.inner.counters,
            new: 0,
            duplicate: 0,
            rejected: 0,
        }
    }
}

impl Drop for Tally<'_> {
    fn drop(&mut self) {
        let stripe = self.counters.stripe();
        for (count, counter) in [
            (self.new, &stripe.new),
            (self.duplicate, &stripe.duplicate),
            (self.rejected, &stripe.rejected),
        ] {
            if count > 0 {
                counter.fetch_add(count, Relaxed);
            }
        }
    }
}

/// The log side of a durable engine.
struct Durable {
    wal: Wal,
    durability: Durability,
    report: RecoveryReport,
    _lock: Option<DirLock>,
}

struct Inner {
    set: ShardedSet,
    fingerprinter: Fingerprinter,
    clock: Arc<dyn Clock>,
    ttl: Duration,
    max_id_len: usize,
    counters: Counters,
    sweep_interval: Duration,
    durable: Option<Durable>,
    histograms: crate::metrics::Histograms,
}

impl Inner {
    #[inline]
    fn now(&self) -> Tick {
        Tick::from_unix_secs(self.clock.now_unix_secs())
    }

    fn sweep(&self, min_interval: Duration) -> u64 {
        let now = self.now();
        let swept = self.set.sweep(now, min_interval.as_secs() as u32);
        if let Some(d) = &self.durable {
            d.wal.delete_expired(now.to_unix_secs());
        }
        swept
    }
}

/// A mark decided in memory but not yet logged: see
/// [`Engine::check_and_insert_deferred`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use = "a pending mark is only durable once committed"]
pub struct PendingMark {
    fingerprint: Fingerprint,
    expiry: Tick,
}

/// The answer of [`Engine::check_and_insert_deferred`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deferred {
    /// New: marked in memory; pass the mark to [`Engine::commit`] to log it.
    New(PendingMark),
    /// Already marked.
    Duplicate,
}

/// Answers "have I already processed this event?" for many threads at once.
///
/// ```
/// use seen::{Engine, Verdict};
/// let engine = Engine::builder().build()?;
/// assert_eq!(engine.check_and_insert("order-42")?, Verdict::New);
/// assert_eq!(engine.check_and_insert("order-42")?, Verdict::Duplicate);
/// # Ok::<(), seen::Error>(())
/// ```
pub struct Engine {
    inner: Arc<Inner>,
    _background: Vec<Background>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("ttl", &self.inner.ttl)
            .field("live_keys", &self.inner.set.len())
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Start configuring an engine.
    pub fn builder() -> EngineBuilder {
        EngineBuilder::default()
    }

    /// The fingerprint of a valid id.
    #[inline]
    pub fn fingerprint(&self, id: impl AsRef<[u8]>) -> Result<Fingerprint> {
        let id = id.as_ref();
        self.validate(id)?;
        Ok(self.inner.fingerprinter.fingerprint(id))
    }

    #[inline]
    fn validate(&self, id: &[u8]) -> Result<()> {
        if id.is_empty() || id.len() > self.inner.max_id_len {
            self.inner.counters.stripe().invalid.fetch_add(1, Relaxed);
            return Err(if id.is_empty() {
                Error::EmptyId
            } else {
                Error::IdTooLong {
                    len: id.len(),
                    max: self.inner.max_id_len,
                }
            });
        }
        Ok(())
    }

    /// Mark `id` and say whether it was new. Linearizable: of any number of
    /// threads racing on one id, exactly one is told [`Verdict::New`].
    #[inline]
    pub fn check_and_insert(&self, id: impl AsRef<[u8]>) -> Result<Verdict> {
        let fp = self.fingerprint(id)?;
        self.insert_fingerprint(fp, self.inner.ttl, &epoch::pin())
    }

    /// [`Engine::check_and_insert`] with a TTL for this mark only.
    pub fn check_and_insert_with_ttl(
        &self,
        id: impl AsRef<[u8]>,
        ttl: Duration,
    ) -> Result<Verdict> {
        let fp = self.fingerprint(id)?;
        self.insert_fingerprint(fp, ttl, &epoch::pin())
    }

    /// [`Engine::check_and_insert`] for a fingerprint computed earlier
    /// (with [`Engine::fingerprint`]).
    #[inline]
    pub fn check_and_insert_fingerprint(&self, fp: Fingerprint) -> Result<Verdict> {
        self.insert_fingerprint(fp, self.inner.ttl, &epoch::pin())
    }

    #[inline]
    fn insert_fingerprint(
        &self,
        fp: Fingerprint,
        ttl: Duration,
        guard: &epoch::Guard,
    ) -> Result<Verdict> {
        let now = self.inner.now();
        self.insert_at(fp, now, ttl, None, guard)
    }

    /// Mark in memory and count; no logging.
    #[inline]
    fn mark_in_memory(
        &self,
        fp: Fingerprint,
        now: Tick,
        expiry: Tick,
        guard: &epoch::Guard,
        tally: &mut Tally<'_>,
    ) -> Result<Verdict> {
        if self.inner.ttl.is_zero() {
            tally.new += 1;
            return Ok(Verdict::New);
        }
        let verdict = self.inner.set.insert(fp, now, expiry, guard);
        match verdict {
            Ok(Verdict::New) => tally.new += 1,
            Ok(Verdict::Duplicate) => tally.duplicate += 1,
            Err(_) => tally.rejected += 1,
        };
        verdict
    }

    /// The single-id path: mark, log, and wait as the durability says.
    #[inline]
    /// `metadata` rides along in the log record (the guard's `mark_processed`).
    fn insert_at(
        &self,
        fp: Fingerprint,
        now: Tick,
        ttl: Duration,
        metadata: Option<&[u8]>,
        guard: &epoch::Guard,
    ) -> Result<Verdict> {
        if ttl.is_zero() || self.inner.ttl.is_zero() {
            // Dedup disabled (or a per-call TTL of zero): nothing to remember.
            self.inner.counters.stripe().new.fetch_add(1, Relaxed);
            return Ok(Verdict::New);
        }
        let expiry = now.plus(ttl);
        let verdict = self.mark_in_memory(fp, now, expiry, guard, &mut Tally::new(self))?;
        if let Some(d) = &self.inner.durable {
            let sync = d.durability == Durability::Sync;
            match verdict {
                Verdict::New => {
                    let pos = match metadata {
                        None => self.log(d, &[(fp, expiry)], now, guard)?,
                        Some(meta) => self.log_with_metadata(d, fp, expiry, meta, now, guard)?,
                    };
                    if sync {
                        d.wal.wait_durable(pos)?;
                    }
                }
                // Under Sync, "duplicate" promises the earlier mark is on
                // disk: the caller will drop the event on our word.
                Verdict::Duplicate => self.wait_if_sync(guard)?,
            }
        }
        Ok(verdict)
    }

    /// Append marks for keys just marked in memory; if the log refuses,
    /// take the in-memory marks back so a retry can succeed.
    fn log(
        &self,
        d: &Durable,
        marks: &[(Fingerprint, Tick)],
        now: Tick,
        guard: &epoch::Guard,
    ) -> Result<crate::wal::Position> {
        if let [(fp, expiry)] = *marks {
            // The single-id path: no window to fill.
            let record = Record::Mark {
                fingerprint: fp.0,
                expiry_unix_secs: expiry.to_unix_secs(),
            };
            return d.wal.append(&record, guard).inspect_err(|_| {
                self.inner.set.forget(fp, now, guard);
            });
        }
        let mut records = [Record::Mark {
            fingerprint: 0,
            expiry_unix_secs: 0,
        }; BATCH_WINDOW];
        let mut last = None;
        for chunk in marks.chunks(BATCH_WINDOW) {
            for (r, &(fp, expiry)) in records.iter_mut().zip(chunk) {
                *r = Record::Mark {
                    fingerprint: fp.0,
                    expiry_unix_secs: expiry.to_unix_secs(),
                };
            }
            match d.wal.append_all(&records[..chunk.len()], guard) {
                Ok(pos) => last = Some(pos),
                Err(e) => {
                    for &(fp, _) in chunk {
                        self.inner.set.forget(fp, now, guard);
                    }
                    return Err(e);
                }
            }
        }
        Ok(last.unwrap_or_else(|| d.wal.published(guard)))
    }

    /// Check and mark many ids; verdicts come back in order. All ids are
    /// validated first: if one is invalid, nothing is marked.
    pub fn check_and_insert_batch<I: AsRef<[u8]>>(&self, ids: &[I]) -> Result<Vec<Verdict>> {
        let mut out = Vec::with_capacity(ids.len());
        self.check_and_insert_batch_into(ids, &mut out)?;
        Ok(out)
    }

    /// [`Engine::check_and_insert_batch`] appending to a caller's buffer
    /// (no allocation once `out` has grown). Ids are hashed and their
    /// table lines prefetched in windows of 16, so the cache misses of a
    /// window overlap instead of queueing.
    ///
    /// On [`Error::CapacityExceeded`] the verdicts of the ids before the
    /// refused one are in `out`; the rest were not marked.
    pub fn check_and_insert_batch_into<I: AsRef<[u8]>>(
        &self,
        ids: &[I],
        out: &mut Vec<Verdict>,
    ) -> Result<()> {
        for id in ids {
            self.validate(id.as_ref())?;
        }
        let fps = ids
            .iter()
            .map(|id| self.inner.fingerprinter.fingerprint(id.as_ref()));
        self.insert_fingerprints(fps, ids.len(), out)
    }

    /// The batch path for fingerprints computed earlier.
    pub fn check_and_insert_fingerprints(
        &self,
        fps: &[Fingerprint],
        out: &mut Vec<Verdict>,
    ) -> Result<()> {
        self.insert_fingerprints(fps.iter().copied(), fps.len(), out)
    }

    fn insert_fingerprints(
        &self,
        mut fps: impl Iterator<Item = Fingerprint>,
        len: usize,
        out: &mut Vec<Verdict>,
    ) -> Result<()> {
        out.reserve(len);
        let guard = &epoch::pin();
        let now = self.inner.now();
        let ttl = self.inner.ttl;
        let mut window = [Fingerprint(0); BATCH_WINDOW];
        // Counted once per batch, not per id: one atomic add instead of many.
        let mut tally = Tally::new(self);
        loop {
            let mut n = 0;
            for (slot, fp) in window.iter_mut().zip(fps.by_ref()) {
                *slot = fp;
                self.inner.set.prefetch(fp, guard);
                n += 1;
            }
            if n == 0 {
                break;
            }
            let mut new = [(Fingerprint(0), Tick(0)); BATCH_WINDOW];
            let mut fresh = 0;
            let expiry = now.plus(ttl);
            for &fp in &window[..n] {
                let verdict = self.mark_in_memory(fp, now, expiry, guard, &mut tally)?;
                if verdict.is_new() {
                    new[fresh] = (fp, expiry);
                    fresh += 1;
                }
                out.push(verdict);
            }
            if let (Some(d), false, true) = (&self.inner.durable, ttl.is_zero(), fresh > 0) {
                self.log(d, &new[..fresh], now, guard)?;
            }
        }
        // One group commit for the whole batch.
        self.wait_if_sync(guard)
    }

    fn wait_if_sync(&self, guard: &epoch::Guard) -> Result<()> {
        match &self.inner.durable {
            Some(d) if d.durability == Durability::Sync => {
                d.wal.wait_durable(d.wal.published(guard))
            }
            _ => Ok(()),
        }
    }

    /// Check and mark `id` in memory only, without logging it yet. For
    /// callers that must order the log write after their own output (the
    /// CLI writes a line, then logs its mark, so a crash can repeat the
    /// line but never lose it). An uncommitted mark lives until the process
    /// ends and is forgotten by a restart.
    pub fn check_and_insert_deferred(&self, id: impl AsRef<[u8]>) -> Result<Deferred> {
        let fp = self.fingerprint(id)?;
        self.claim_fingerprint(fp)
    }

    /// [`Engine::check_and_insert_deferred`] for a fingerprint.
    pub(crate) fn claim_fingerprint(&self, fp: Fingerprint) -> Result<Deferred> {
        let now = self.inner.now();
        let expiry = now.plus(self.inner.ttl);
        let mark = PendingMark {
            fingerprint: fp,
            expiry,
        };
        match self.mark_in_memory(fp, now, expiry, &epoch::pin(), &mut Tally::new(self))? {
            Verdict::New => Ok(Deferred::New(mark)),
            Verdict::Duplicate => Ok(Deferred::Duplicate),
        }
    }

    /// Mark `id` with optional metadata stored beside the mark in the log
    /// (used by the guard's `mark_processed`).
    pub(crate) fn check_and_insert_with_metadata(
        &self,
        id: impl AsRef<[u8]>,
        metadata: Option<&[u8]>,
    ) -> Result<Verdict> {
        let fp = self.fingerprint(id)?;
        let now = self.inner.now();
        self.insert_at(fp, now, self.inner.ttl, metadata, &epoch::pin())
    }

    /// [`Engine::log`] for one mark carrying metadata (a variable-length record).
    fn log_with_metadata(
        &self,
        d: &Durable,
        fp: Fingerprint,
        expiry: Tick,
        meta: &[u8],
        now: Tick,
        guard: &epoch::Guard,
    ) -> Result<crate::wal::Position> {
        use crate::wal::format::{encode_mark_with_metadata, record_len, MARK_PAYLOAD_LEN};
        let expiry_unix = expiry.to_unix_secs();
        d.wal
            .append_encoded(
                record_len(MARK_PAYLOAD_LEN + meta.len()),
                expiry_unix,
                |seed| encode_mark_with_metadata(seed, fp.0, expiry_unix, meta),
                guard,
            )
            .inspect_err(|_| {
                self.inner.set.forget(fp, now, guard);
            })
    }

    /// Take back a pending mark that will not be committed (the work it
    /// guarded failed): the id is new again.
    pub fn release(&self, mark: PendingMark) {
        if !self.inner.ttl.is_zero() {
            self.inner
                .set
                .forget(mark.fingerprint, self.inner.now(), &epoch::pin());
        }
    }

    /// Under `Sync`, wait until everything logged so far is durable.
    pub(crate) fn wait_durable_if_sync(&self) -> Result<()> {
        self.wait_if_sync(&epoch::pin())
    }

    pub(crate) fn histograms(&self) -> &crate::metrics::Histograms {
        &self.inner.histograms
    }

    pub(crate) fn counters(&self) -> &Counters {
        &self.inner.counters
    }

    /// Log pending marks, then wait per the engine's durability (one group
    /// commit for all of them under `Sync`). A no-op for in-memory engines.
    pub fn commit(&self, marks: &[PendingMark]) -> Result<()> {
        let Some(d) = &self.inner.durable else {
            return Ok(());
        };
        if self.inner.ttl.is_zero() {
            return Ok(());
        }
        let guard = &epoch::pin();
        let now = self.inner.now();
        for chunk in marks.chunks(BATCH_WINDOW) {
            let mut pairs = [(Fingerprint(0), Tick(0)); BATCH_WINDOW];
            for (p, m) in pairs.iter_mut().zip(chunk) {
                *p = (m.fingerprint, m.expiry);
            }
            self.log(d, &pairs[..chunk.len()], now, guard)?;
        }
        self.wait_if_sync(guard)
    }

    /// Append pending marks without waiting for durability: what a crash in
    /// the middle of [`Engine::commit`] leaves behind.
    #[cfg(any(test, fuzzing))]
    pub(crate) fn commit_without_waiting(&self, marks: &[PendingMark]) {
        if let Some(d) = &self.inner.durable {
            let guard = &epoch::pin();
            for m in marks {
                let _ = self.log(d, &[(m.fingerprint, m.expiry)], self.inner.now(), guard);
            }
        }
    }

    /// Drop the engine the way a power loss would: no final sync.
    #[cfg(any(test, fuzzing))]
    pub(crate) fn abandon(self) {
        if let Some(d) = &self.inner.durable {
            d.wal.skip_final_sync.store(true, Relaxed);
        }
    }

    /// Make every mark logged so far durable, whatever the durability mode.
    pub fn sync(&self) -> Result<()> {
        match &self.inner.durable {
            Some(d) => d.wal.sync(),
            None => Ok(()),
        }
    }

    /// What opening the state directory found (durable engines only).
    pub fn recovery_report(&self) -> Option<&RecoveryReport> {
        self.inner.durable.as_ref().map(|d| &d.report)
    }

    /// The engine's durability, or `None` for an in-memory engine.
    pub fn durability(&self) -> Option<Durability> {
        self.inner.durable.as_ref().map(|d| d.durability)
    }

    /// Is `id` marked and not expired? Never blocks and never marks.
    #[inline]
    pub fn contains(&self, id: impl AsRef<[u8]>) -> Result<bool> {
        let fp = self.fingerprint(id)?;
        Ok(self.contains_fingerprint(fp))
    }

    /// [`Engine::contains`] for a fingerprint computed earlier.
    #[inline]
    pub fn contains_fingerprint(&self, fp: Fingerprint) -> bool {
        if self.inner.ttl.is_zero() {
            return false;
        }
        self.inner.set.contains(fp, self.inner.now(), &epoch::pin())
    }

    /// Remove the mark of `id`, so its next check is `New`. Returns whether
    /// a live mark was removed.
    pub fn forget(&self, id: impl AsRef<[u8]>) -> Result<bool> {
        let fp = self.fingerprint(id)?;
        let guard = &epoch::pin();
        let Some(expiry) = self.inner.set.forget(fp, self.inner.now(), guard) else {
            return Ok(false);
        };
        if let Some(d) = &self.inner.durable {
            // The forget record lives as long as the mark it cancels.
            let record = Record::Forget {
                fingerprint: fp.0,
                expiry_unix_secs: expiry.to_unix_secs(),
            };
            let pos = d.wal.append(&record, guard)?;
            if d.durability == Durability::Sync {
                d.wal.wait_durable(pos)?;
            }
        }
        self.inner.counters.stripe().forgotten.fetch_add(1, Relaxed);
        Ok(true)
    }

    /// Reclaim every expired entry now. Returns how many were reclaimed.
    /// (Expired entries are already answered as absent; this frees memory.)
    pub fn expire_now(&self) -> usize {
        self.inner.sweep(Duration::ZERO) as usize
    }

    /// Compatibility shape: `true` when the event should be processed —
    /// the id is new (and now marked), **or it could not be checked** (an
    /// invalid id, or the memory ceiling under `Reject`; counted in
    /// [`Stats`]). Failing open keeps delivery at-least-once.
    pub fn process_or_skip(&self, id: impl AsRef<[u8]>) -> bool {
        !matches!(self.check_and_insert(id), Ok(Verdict::Duplicate))
    }

    /// Compatibility shape: same as [`Engine::expire_now`].
    pub fn cleanup_expired(&self) -> usize {
        self.expire_now()
    }

    /// Entries resident and not forgotten (see [`Stats::live_keys`]).
    pub fn len(&self) -> usize {
        self.inner.set.len()
    }

    /// `true` if no entry is resident.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held by the set's tables.
    pub fn memory_bytes(&self) -> usize {
        self.inner.set.memory_bytes()
    }

    /// The default TTL of a mark.
    pub fn ttl(&self) -> Duration {
        self.inner.ttl
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        let t = self.inner.counters.totals();
        let mut stats = Stats {
            live_keys: self.len(),
            memory_bytes: self.memory_bytes(),
            new: t.new,
            duplicate: t.duplicate,
            invalid: t.invalid,
            rejected: t.rejected,
            expired: self.inner.set.reclaimed.expired.load(Relaxed),
            evicted: self.inner.set.reclaimed.evicted.load(Relaxed),
            forgotten: t.forgotten,
            log_segments: 0,
            log_bytes: 0,
            unsynced_bytes: 0,
            inflight_collisions: t.inflight_collisions,
            failed: t.failed,
            released: t.released,
        };
        if let Some(d) = &self.inner.durable {
            (stats.log_segments, stats.log_bytes) = d.wal.layout();
            stats.unsynced_bytes = d.wal.unsynced_bytes();
        }
        stats
    }
}
