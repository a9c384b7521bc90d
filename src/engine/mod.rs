//! The engine: ids in, verdicts out. Ties the fingerprint function, the set
//! and the TTL machinery together behind a small API. Dedup semantics live
//! here; how a mark becomes durable lives in `durable.rs`, and how the log
//! refills the set on open in `replay.rs`.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_epoch as epoch;

use crate::error::{Error, Result};
use crate::fingerprint::{Fingerprint, Fingerprinter};
#[cfg(feature = "guard")]
use crate::set::{Inserted, Settle};
use crate::set::{ShardedSet, Verdict};
use crate::stats::{Counters, Histograms};
use crate::ttl::clock::Clock;
use crate::ttl::Tick;
use crate::wal::RecoveryReport;

mod batch;
use batch::Hashed;
mod builder;
mod durable;
mod replay;
#[cfg(feature = "postgres")]
mod transfer;

use builder::Background;
pub use builder::EngineBuilder;
pub use durable::{Durability, PendingMark};
use durable::{Durable, FORGOTTEN_AT_ONCE};

/// Default retention of a mark.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
/// Default maximum id length in bytes.
pub const DEFAULT_MAX_ID_LEN: usize = 1024;
/// Largest configurable id length.
pub const MAX_ID_LEN_LIMIT: usize = 1 << 20;
/// Few enough that tables reach huge-page size early, many more than cores.
const DEFAULT_SHARDS: usize = 64;
/// Largest metadata stored beside a mark.
pub const MAX_METADATA_LEN: usize = 4096;
const _: () = assert!(MAX_METADATA_LEN <= crate::wal::format::MAX_RECORD_METADATA);
/// Ids hashed and prefetched together by the batch path.
const BATCH_WINDOW: usize = 16;

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
    /// Shard tables rebuilt (to grow, shrink, drop expired entries or
    /// evict): each copies its shard's live entries.
    pub table_rebuilds: u64,
    /// Entries removed by [`Engine::forget`].
    pub forgotten: u64,
    /// Log segment files (durable engines).
    pub log_segments: usize,
    /// Log bytes in use (durable engines).
    pub log_bytes: u64,
    /// Log bytes written but not yet durable: the durability lag.
    pub unsynced_bytes: u64,
    /// Log syncs run (each a group commit for every caller waiting).
    pub log_syncs: u64,
    /// Time spent in them, in nanoseconds.
    pub log_sync_nanos: u64,
}

/// Verdict counts, added to the shared counters when dropped: a batch
/// pays one atomic add per counter, not one per id.
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

struct Inner {
    set: ShardedSet,
    fingerprinter: Fingerprinter,
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    secret: crate::fingerprint::Secret,
    clock: Arc<dyn Clock>,
    ttl: Duration,
    max_id_len: usize,
    counters: Counters,
    sweep_interval: Duration,
    durable: Option<Durable>,
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    histograms: Histograms,
}

impl Inner {
    #[inline]
    fn now(&self) -> Tick {
        Tick::from_unix_secs(self.clock.now_unix_secs())
    }

    /// Reclaim expired entries: what is worth it at most once per
    /// `min_interval` per shard (the background sweep), or with `force`
    /// everything now.
    fn sweep(&self, min_interval: Duration, force: bool) -> u64 {
        let now = self.now();
        let swept = self.set.sweep(now, min_interval.as_secs() as u32, force);
        if let Some(d) = &self.durable {
            d.wal.purge_expired(now.to_unix_secs());
        }
        swept
    }
}

/// A point in an engine's log (see [`Engine::durable_position`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LogPosition(u64);

impl LogPosition {
    /// The position as one number (segment sequence in the high 32 bits,
    /// byte offset in the low 32), for storing beside a checkpoint.
    pub fn as_u64(self) -> u64 {
        self.0
    }
}

/// The answer of [`Engine::check_and_insert_deferred`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deferred {
    /// New: marked in memory; pass the mark to [`Engine::commit`] to log it.
    New(PendingMark),
    /// Already marked.
    Duplicate,
}

/// What [`Engine::claim`] found.
#[cfg(feature = "guard")]
pub(crate) enum Claim {
    /// New: the caller runs the work, then commits or releases the claim.
    New(PendingMark),
    /// Marked before.
    Processed,
    /// Claimed by someone whose work is still running.
    InFlight,
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
    pub(crate) fn validate(&self, id: &[u8]) -> Result<()> {
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

    // ---- the core: every public method below is a composition of these ----

    /// When a mark made now with `ttl` expires, or `None` when there is
    /// nothing to remember (dedup disabled by a zero TTL, engine-wide or
    /// for this call). The one place that decides it.
    #[inline]
    fn expiry(&self, now: Tick, ttl: Duration) -> Option<Tick> {
        if ttl.is_zero() || !self.remembers() {
            None
        } else {
            Some(now.plus(ttl))
        }
    }

    /// Validate a batch before any of it is touched.
    fn validate_all<I: AsRef<[u8]>>(&self, ids: &[I]) -> Result<()> {
        ids.iter().try_for_each(|id| self.validate(id.as_ref()))
    }

    /// Does this engine remember marks at all (its TTL is not zero)?
    #[inline]
    fn remembers(&self) -> bool {
        !self.inner.ttl.is_zero()
    }

    /// The memory half of a mark: insert-if-absent, counted.
    #[inline]
    fn mark_in_memory(
        &self,
        fp: Fingerprint,
        now: Tick,
        expiry: Option<Tick>,
        guard: &epoch::Guard,
        tally: &mut Tally<'_>,
    ) -> Result<Deferred> {
        let Some(expiry) = expiry else {
            tally.new += 1;
            return Ok(Deferred::New(PendingMark {
                fingerprint: fp,
                expiry: FORGOTTEN_AT_ONCE,
            }));
        };
        match self.inner.set.insert(fp, now, expiry, guard) {
            Ok(Verdict::New) => {
                tally.new += 1;
                Ok(Deferred::New(PendingMark {
                    fingerprint: fp,
                    expiry,
                }))
            }
            Ok(Verdict::Duplicate) => {
                tally.duplicate += 1;
                Ok(Deferred::Duplicate)
            }
            Err(e) => {
                tally.rejected += 1;
                Err(e)
            }
        }
    }

    /// The log half: make `marks` (already in memory) durable per the
    /// engine's durability. A no-op for in-memory engines.
    fn persist(&self, marks: &[PendingMark], now: Tick, guard: &epoch::Guard) -> Result<()> {
        match &self.inner.durable {
            Some(d) => d.settle(d.append(&self.inner.set, marks, now, guard)?),
            None => Ok(()),
        }
    }

    /// What a `Duplicate` verdict must wait for (see [`Durable::settle_published`]).
    fn settle_duplicate(&self, guard: &epoch::Guard) -> Result<()> {
        match &self.inner.durable {
            Some(d) => d.settle_published(guard),
            None => Ok(()),
        }
    }

    /// The single-id path: mark, log, wait.
    #[inline]
    fn insert_one(
        &self,
        fp: Fingerprint,
        ttl: Duration,
        metadata: Option<&[u8]>,
    ) -> Result<Verdict> {
        let guard = &epoch::pin();
        let call = self.inner.durable.as_ref().and_then(|d| d.open_call());
        let now = self.inner.now();
        let expiry = self.expiry(now, ttl);
        match self.mark_in_memory(fp, now, expiry, guard, &mut Tally::new(self))? {
            Deferred::New(mark) => {
                match (metadata, &self.inner.durable) {
                    (Some(meta), Some(d)) if mark.is_remembered() => {
                        let pos =
                            d.append_with_metadata(&self.inner.set, mark, meta, now, guard)?;
                        drop(call);
                        d.settle(pos)?;
                    }
                    (_, Some(d)) => {
                        let pos = d.append(&self.inner.set, &[mark], now, guard)?;
                        drop(call);
                        d.settle(pos)?;
                    }
                    (_, None) => {}
                }
                Ok(Verdict::New)
            }
            Deferred::Duplicate => {
                drop(call);
                self.settle_duplicate(guard)?;
                Ok(Verdict::Duplicate)
            }
        }
    }

    // ---- the public API ----

    /// Mark `id` and say whether it was new. Linearizable: of any number of
    /// threads racing on one id, exactly one is told [`Verdict::New`].
    #[inline]
    pub fn check_and_insert(&self, id: impl AsRef<[u8]>) -> Result<Verdict> {
        let fp = self.fingerprint(id)?;
        self.insert_one(fp, self.inner.ttl, None)
    }

    /// [`Engine::check_and_insert`] with a TTL for this mark only.
    pub fn check_and_insert_with_ttl(
        &self,
        id: impl AsRef<[u8]>,
        ttl: Duration,
    ) -> Result<Verdict> {
        let fp = self.fingerprint(id)?;
        self.insert_one(fp, ttl, None)
    }

    /// [`Engine::check_and_insert`] for a fingerprint computed earlier
    /// (with [`Engine::fingerprint`]).
    #[inline]
    pub fn check_and_insert_fingerprint(&self, fp: Fingerprint) -> Result<Verdict> {
        self.insert_one(fp, self.inner.ttl, None)
    }

    /// [`Engine::check_and_insert`] storing `metadata` (at most 4 KiB,
    /// typically JSON) beside a new mark in the log, for audit: read it
    /// back with [`Engine::stored_mark`] or `seen inspect --id`. Memory
    /// holds only the mark. In-memory engines drop the metadata; a
    /// duplicate leaves the earlier mark's metadata as it was.
    pub fn check_and_insert_with_metadata(
        &self,
        id: impl AsRef<[u8]>,
        metadata: &[u8],
    ) -> Result<Verdict> {
        let fp = self.fingerprint(id)?;
        if metadata.len() > MAX_METADATA_LEN {
            return Err(Error::MetadataTooLarge {
                len: metadata.len(),
                max: MAX_METADATA_LEN,
            });
        }
        self.insert_one(fp, self.inner.ttl, Some(metadata))
    }

    /// Check and mark many ids; verdicts come back in order. All ids are
    /// validated first: if one is invalid, nothing is marked.
    pub fn check_and_insert_batch<I: AsRef<[u8]>>(&self, ids: &[I]) -> Result<Vec<Verdict>> {
        let mut out = Vec::with_capacity(ids.len());
        self.check_and_insert_batch_into(ids, &mut out)?;
        Ok(out)
    }

    /// [`Engine::check_and_insert_batch`] appending to a caller's buffer
    /// (no allocation once `out` has grown). Ids are hashed 32 at a time
    /// and their table lines prefetched 16 ids ahead, so the cache misses
    /// overlap instead of queueing.
    ///
    /// On [`Error::CapacityExceeded`] the verdicts of the ids before the
    /// refused one are in `out`; the rest were not marked. On any other
    /// error `out` holds the verdicts of a prefix of `ids`.
    ///
    /// An id whose shard is being migrated (grown, swept) when its turn
    /// comes is decided at the end of the batch, after the ids of other
    /// shards, rather than waited for; the ids of one shard are always
    /// decided in order, so the verdicts are those of deciding the batch
    /// in order.
    pub fn check_and_insert_batch_into<I: AsRef<[u8]>>(
        &self,
        ids: &[I],
        out: &mut Vec<Verdict>,
    ) -> Result<()> {
        self.validate_all(ids)?;
        let fps = Hashed::new(ids, &self.inner.fingerprinter);
        self.insert_batch(fps, ids.len(), out)
    }

    /// The batch path for fingerprints computed earlier.
    pub fn check_and_insert_fingerprints(
        &self,
        fps: &[Fingerprint],
        out: &mut Vec<Verdict>,
    ) -> Result<()> {
        self.insert_batch(fps.iter().copied(), fps.len(), out)
    }

    /// Check and mark `id` in memory only, without logging it yet. For
    /// callers that must order the log write after their own output (the
    /// dedup loop emits and flushes its items, then logs their marks, so a
    /// crash can repeat an item but never lose it). An uncommitted mark
    /// lives until the process ends and is forgotten by a restart.
    pub fn check_and_insert_deferred(&self, id: impl AsRef<[u8]>) -> Result<Deferred> {
        let fp = self.fingerprint(id)?;
        self.claim_fingerprint(fp)
    }

    /// [`Engine::check_and_insert_deferred`] for a fingerprint.
    pub(crate) fn claim_fingerprint(&self, fp: Fingerprint) -> Result<Deferred> {
        let now = self.inner.now();
        let expiry = self.expiry(now, self.inner.ttl);
        self.mark_in_memory(fp, now, expiry, &epoch::pin(), &mut Tally::new(self))
    }

    /// Claim `fp` for work about to run (the guard's first step): the
    /// claim is live, and told apart from a settled mark, until
    /// [`Engine::commit_claim`] or [`Engine::release_claim`].
    #[cfg(feature = "guard")]
    pub(crate) fn claim(&self, fp: Fingerprint) -> Result<Claim> {
        let now = self.inner.now();
        let mut tally = Tally::new(self);
        let Some(expiry) = self.expiry(now, self.inner.ttl) else {
            // Nothing is remembered (a zero TTL): every claim is new.
            tally.new += 1;
            return Ok(Claim::New(PendingMark {
                fingerprint: fp,
                expiry: FORGOTTEN_AT_ONCE,
            }));
        };
        match self.inner.set.claim(fp, now, &epoch::pin()) {
            Ok(Inserted::New) => {
                tally.new += 1;
                Ok(Claim::New(PendingMark {
                    fingerprint: fp,
                    expiry,
                }))
            }
            Ok(Inserted::Duplicate) => {
                tally.duplicate += 1;
                Ok(Claim::Processed)
            }
            Ok(Inserted::InFlight) => Ok(Claim::InFlight),
            Err(e) => {
                tally.rejected += 1;
                Err(e)
            }
        }
    }

    /// The claim's work succeeded: log its mark (waiting per the
    /// durability), then give it its real expiry. Returns whether someone
    /// asked to hear how it ended (or, when the claim is no longer in
    /// flight, that they may have).
    #[cfg(feature = "guard")]
    pub(crate) fn commit_claim(&self, mark: PendingMark) -> Result<Settle> {
        if !mark.is_remembered() {
            return Ok(Settle::Settled { waited: false });
        }
        let guard = &epoch::pin();
        if let Some(d) = &self.inner.durable {
            // No clock read: `now` only decides, if the log refuses the
            // mark, whether the claim is still live to be taken back, and
            // a claim in flight is live at any instant.
            let pos = d.append(&self.inner.set, &[mark], Tick::MIN_LIVE, guard)?;
            d.settle(pos)?;
        }
        let settled = self.inner.set.settle(mark.fingerprint, mark.expiry, guard);
        if let (Settle::NotInFlight, Some(d)) = (settled, &self.inner.durable) {
            // Someone forgot the id while the work ran (the only way a
            // claim stops being in flight but by its claimant). The forget
            // was logged then, before the mark just logged, so a replay
            // would bring the id back: log it again, after the mark,
            // unless someone has marked the id anew since.
            let fp = mark.fingerprint;
            if !self.inner.set.contains(fp, self.inner.now(), guard) {
                d.settle(d.append_forget(fp, mark.expiry, guard)?)?;
            }
        }
        Ok(settled)
    }

    /// The claim's work failed: forget it, so a retry can claim it again.
    #[cfg(feature = "guard")]
    pub(crate) fn release_claim(&self, mark: PendingMark) -> Settle {
        if !mark.is_remembered() {
            return Settle::Settled { waited: false };
        }
        self.inner
            .set
            .settle(mark.fingerprint, Tick::DEAD, &epoch::pin())
    }

    /// Ask to be told how the in-flight claim of `fp` ends; false if it
    /// already has.
    #[cfg(feature = "guard")]
    pub(crate) fn wait_on_claim(&self, fp: Fingerprint) -> bool {
        let waited = crate::set::IN_FLIGHT_WAITED;
        let settled = self.inner.set.settle(fp, waited, &epoch::pin());
        matches!(settled, Settle::Settled { .. })
    }

    /// Log pending marks, then wait per the engine's durability (one group
    /// commit for all of them under `Sync`). A no-op for in-memory engines.
    pub fn commit(&self, marks: &[PendingMark]) -> Result<()> {
        if self.inner.durable.is_none() {
            return Ok(()); // no pin, no clock read: the guard commits every new id
        }
        self.persist(marks, self.inner.now(), &epoch::pin())
    }

    /// Take back a pending mark that will not be committed (the work it
    /// guarded failed): the id is new again.
    pub fn release(&self, mark: PendingMark) {
        if mark.is_remembered() {
            self.inner
                .set
                .forget(mark.fingerprint, self.inner.now(), &epoch::pin());
        }
    }

    /// Under `Sync`, wait until everything logged so far is durable.
    #[cfg(feature = "guard")]
    pub(crate) fn wait_durable_if_sync(&self) -> Result<()> {
        self.settle_duplicate(&epoch::pin())
    }

    #[cfg(feature = "metrics")]
    pub(crate) fn histograms(&self) -> &Histograms {
        &self.inner.histograms
    }

    /// Append pending marks without waiting for durability: what a crash in
    /// the middle of [`Engine::commit`] leaves behind.
    #[cfg(any(test, fuzzing))]
    pub(crate) fn commit_without_waiting(&self, marks: &[PendingMark]) {
        if let Some(d) = &self.inner.durable {
            let _ = d.append(&self.inner.set, marks, self.inner.now(), &epoch::pin());
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

    /// The log's recovery point (durable engines only): every mark logged
    /// before it is on disk and survives a crash. Positions compare in log
    /// order; a checkpoint records one to know where to resume.
    pub fn durable_position(&self) -> Option<LogPosition> {
        self.inner
            .durable
            .as_ref()
            .map(|d| LogPosition(d.wal.recovery_point().into()))
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

    /// [`Engine::contains`] for many ids; answers come back in order. All
    /// ids are validated first.
    pub fn contains_batch<I: AsRef<[u8]>>(&self, ids: &[I]) -> Result<Vec<bool>> {
        let mut out = Vec::with_capacity(ids.len());
        self.contains_batch_into(ids, &mut out)?;
        Ok(out)
    }

    /// [`Engine::contains_batch`] appending to a caller's buffer. Like the
    /// insert batch path it hashes ids 32 at a time and requests each
    /// one's table line 16 ids ahead, so the lookups' cache misses overlap:
    /// one epoch pin and one clock read for the whole batch.
    pub fn contains_batch_into<I: AsRef<[u8]>>(
        &self,
        ids: &[I],
        out: &mut Vec<bool>,
    ) -> Result<()> {
        self.validate_all(ids)?;
        out.reserve(ids.len());
        if !self.remembers() {
            out.extend(ids.iter().map(|_| false));
            return Ok(());
        }
        let guard = &epoch::pin();
        let now = self.inner.now();
        let set = &self.inner.set;
        let fps = Hashed::new(ids, &self.inner.fingerprinter);
        out.extend(
            set.prefetched::<BATCH_WINDOW, _>(fps, guard)
                .map(|fp| set.contains(fp, now, guard)),
        );
        Ok(())
    }

    /// Start loading the memory a check of `fp` will touch first, so that
    /// a check issued a little later (after other work) does not wait for
    /// it: the Kafka loop prefetches the next message's id while it
    /// handles the current one.
    #[cfg(feature = "kafka")]
    #[inline]
    pub(crate) fn prefetch(&self, fp: Fingerprint) {
        if self.remembers() {
            self.inner.set.prefetch(fp, &epoch::pin());
        }
    }

    /// [`Engine::contains`] for a fingerprint computed earlier.
    #[inline]
    pub fn contains_fingerprint(&self, fp: Fingerprint) -> bool {
        self.remembers() && self.inner.set.contains(fp, self.inner.now(), &epoch::pin())
    }

    /// The latest mark of `id` in the log, with the metadata stored beside
    /// it, for audit (durable engines; `None` in memory or if the log has
    /// no mark of it). It scans the live log: one pass over about 32 bytes
    /// per mark made within the TTL, so call it for an audit, not per event.
    pub fn stored_mark(
        &self,
        id: impl AsRef<[u8]>,
    ) -> Result<Option<crate::wal::inspect::StoredMark>> {
        let fp = self.fingerprint(id)?;
        match &self.inner.durable {
            Some(d) => Ok(d.wal.lookup(fp)?.map(Into::into)),
            None => Ok(None),
        }
    }

    /// Remove the mark of `id`, so its next check is `New`. Returns whether
    /// a live mark was removed.
    pub fn forget(&self, id: impl AsRef<[u8]>) -> Result<bool> {
        let fp = self.fingerprint(id)?;
        let guard = &epoch::pin();
        let now = self.inner.now();
        let Some(mut expiry) = self.inner.set.forget(fp, now, guard) else {
            return Ok(false);
        };
        if expiry > Tick::MAX {
            // A guard's claim still in flight: the mark it would have had.
            expiry = now.plus(self.inner.ttl);
        }
        if let Some(d) = &self.inner.durable {
            d.settle(d.append_forget(fp, expiry, guard)?)?;
        }
        self.inner.counters.stripe().forgotten.fetch_add(1, Relaxed);
        Ok(true)
    }

    /// Reclaim every expired entry now. Returns how many were reclaimed.
    /// (Expired entries are already answered as absent; this frees memory.)
    pub fn expire_now(&self) -> usize {
        self.inner.sweep(Duration::ZERO, true) as usize
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
            table_rebuilds: self.inner.set.reclaimed.rebuilds.load(Relaxed),
            evicted: self.inner.set.reclaimed.evicted.load(Relaxed),
            forgotten: t.forgotten,
            log_segments: 0,
            log_bytes: 0,
            unsynced_bytes: 0,
            log_syncs: 0,
            log_sync_nanos: 0,
        };
        if let Some(d) = &self.inner.durable {
            (stats.log_segments, stats.log_bytes) = d.wal.layout();
            stats.unsynced_bytes = d.wal.unsynced_bytes();
            (stats.log_syncs, stats.log_sync_nanos) =
                self.inner.histograms.sync_seconds.count_and_sum_nanos();
        }
        stats
    }
}
