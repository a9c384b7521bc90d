//! The sharded concurrent set of fingerprints with per-entry expiry.
//!
//! The top bits of a fingerprint pick a shard; each shard owns one
//! [`table::Table`] behind an epoch-protected pointer. Lookups and inserts
//! are lock-free on the table (see `table.rs` for the slot protocol). A
//! shard's table is replaced — to grow, to shrink, to drop expired entries,
//! or to evict at the memory ceiling — by *migration*: freeze the old table
//! slot by slot, copy what is live into a new one, publish it, and retire the
//! old one through the epoch collector. Only migrators take the shard's
//! mutex; a writer that meets a frozen slot waits on that mutex for the
//! (short, per-shard) migration to end (a batch sees the mutex held and
//! decides that shard's ids last instead: `engine/batch.rs`). Readers
//! never wait.

// Unsafe here: dereferencing and retiring epoch-protected table pointers.
#![allow(unsafe_code)]

pub(crate) mod table;

#[cfg(all(test, seen_loom))]
mod loom_tests;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::*};

use crossbeam_epoch::{self as epoch, Atomic, Guard, Owned, Shared};
use crossbeam_utils::CachePadded;
use parking_lot::{Mutex, MutexGuard};

#[cfg(feature = "guard")]
pub(crate) use table::Settle;
use table::{Forget, Frozen, Insert, Key, Stamp, Stamps, Table, Writers};

use crate::error::{Error, Result};
use crate::fingerprint::Fingerprint;
use crate::ttl::Tick;

/// The expiry that asks [`ShardedSet::settle`] to have the claim's end
/// reported (see `table.rs`).
#[cfg(feature = "guard")]
pub(crate) const IN_FLIGHT_WAITED: Tick = Tick(Tick::MAX.0 + 2);

/// Migrate when this fraction of a table's slots is claimed.
const MAX_LOAD: f64 = 0.85;
/// After growing, this fraction of the new table is claimed (×1.55 growth).
/// With the shards' growth staggered (see [`phase`]) a set grown from empty
/// then holds 23.4–23.7 bytes per key at any size from 1M to 50M keys
/// (16 / load, the load log-uniform between 0.55 and 0.85). Measured
/// alternatives: 0.8 / 0.5 unstaggered (the old default) swung between 20
/// and 32 bytes with the growth cycle; 0.8 / 0.6 staggered held 23.2 but
/// grew 25–30 % slower (a third more migrations); 0.8 / 0.5 staggered held
/// 25.5. See `docs/benchmarks.md`, "Memory at every size".
const GROW_TO_LOAD: f64 = 0.55;
/// A rebuild keeps the table size while the live load stays in this band
/// (a sweep's below [`FIT_BELOW_LOAD`] shrinks to fit instead).
const KEEP_SIZE_LOAD: (f64, f64) = (0.2, 0.7);
/// A sweep's rebuild shrinks a table whose live entries fill less than
/// this fraction of it to [`FIT_LOAD`]: under steady traffic expired
/// entries take up to a third more slots again before the next sweep
/// (see [`ShardedSet::sweep`]), so 0.6 peaks at 0.8, short of MAX_LOAD.
/// Otherwise a table grown at one point of the traffic keeps its size for
/// good: 32 bytes per resident id in the steady state of `seen bench
/// --steady`, where 0.6 gives 26.7.
const FIT_BELOW_LOAD: f64 = 0.5;
const FIT_LOAD: f64 = 0.6;

/// How [`ShardedSet::migrate_to`] sizes the new table.
#[derive(Clone, Copy, Debug)]
enum Sizing {
    /// Room to grow (a table that filled up, or ran out of probe room).
    Grow,
    /// A sweep: as [`Sizing::Grow`], but shrink a mostly empty table to fit.
    Fit,
    /// At least this many slots (reserving room before a replay).
    AtLeast(usize),
}

/// At the ceiling with `EvictOldest`, evict down to this fraction of the
/// ceiling's capacity, so eviction runs in batches and not on every insert.
const EVICT_TO_LOAD: f64 = 0.7;
/// Smallest table per shard (16 cache lines).
const MIN_SLOTS: usize = 64;

/// Shard `i`'s place in the growth cycle, as a size factor: spread evenly,
/// on a log scale, over one growth step (×MAX_LOAD / GROW_TO_LOAD). Keys
/// spread evenly over shards, so shards of equal size would all grow at
/// the same key count and the set's bytes per key would swing with the
/// growth cycle (20 to 32 bytes). Each shard instead grows along its own
/// ladder of sizes, `MIN_SLOTS × phase × growth^k`: 1/64 of the shards
/// grows at a time and the set stays near its average load at any size.
/// The ladder is real-valued, so rounding a table to whole cache lines
/// never drifts a shard off its rung, and a set pre-sized to equal shards
/// spreads out again at its first growth.
fn phase(i: usize, shards: usize) -> f64 {
    (MAX_LOAD / GROW_TO_LOAD).powf(i as f64 / shards.max(1) as f64)
}

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

/// What an insert found: a [`Verdict`], with claims still in flight told
/// apart from settled marks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Inserted {
    New,
    Duplicate,
    /// A claim whose work is still running ([`ShardedSet::claim`]).
    InFlight,
}

impl Inserted {
    #[inline]
    fn verdict(self) -> Verdict {
        match self {
            Inserted::New => Verdict::New,
            Inserted::Duplicate | Inserted::InFlight => Verdict::Duplicate,
        }
    }
}

/// What to do when the memory ceiling is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MemoryPolicy {
    /// Drop the entries closest to expiry (the oldest, under one TTL) in a
    /// batch, and count them in [`Stats::evicted`](crate::Stats::evicted). An evicted id is
    /// reported `New` if it comes back.
    EvictOldest,
    /// Keep every entry; refuse new ids with [`Error::CapacityExceeded`](crate::Error::CapacityExceeded)
    /// (counted in [`Stats::rejected`](crate::Stats::rejected)) until expiry frees room.
    #[default]
    Reject,
}

/// Sizing and ceiling settings of a [`ShardedSet`].
#[derive(Clone, Debug)]
pub(crate) struct SetConfig {
    /// Number of shards, a power of two.
    pub shards: usize,
    /// Expected number of live keys, to size tables up front.
    pub capacity_hint: usize,
    /// Memory ceiling for all tables together.
    pub memory_limit: Option<usize>,
    pub policy: MemoryPolicy,
    /// When the set is made: where its slots' [`Stamp`]s count from.
    pub start: Tick,
}

struct Shard {
    table: Atomic<Table>,
    /// Lower bound on the earliest expiry in the current table.
    next_expiry: AtomicU32,
    /// When this shard was last swept.
    last_sweep: AtomicU32,
    /// Held by whoever replaces the table; guards what the last
    /// replacement copied.
    migration: Mutex<Copied>,
    /// The sizes this shard takes when the set sizes it: its rungs of the
    /// growth ladder (see [`phase`]), `MIN_SLOTS × phase × growth^k`.
    ladder_base: f64,
}

impl Shard {
    /// The smallest rung of this shard's ladder with about `slots` slots
    /// or more. A rung up to 1.5 % short counts: a growth asks for
    /// `live / GROW_TO_LOAD` with `live` one past the trigger, a hair above
    /// the next rung, and must land on it rather than skip one. (Callers
    /// keep their own floor for room.)
    fn rung(&self, slots: f64) -> usize {
        let growth = MAX_LOAD / GROW_TO_LOAD;
        let k = ((slots / self.ladder_base).log(growth) - 0.05)
            .ceil()
            .max(0.0);
        (self.ladder_base * growth.powf(k)).ceil() as usize
    }
}

/// The entries the last migration of a shard copied, counted by expiry:
/// enough for a sweep to tell, without scanning the table, how much of
/// it has expired since.
#[derive(Default)]
struct Copied {
    /// Bucket `i` counts expiries in `[first + i·width, first + (i+1)·width)`.
    first: u32,
    width: u32,
    counts: [u32; EXPIRY_BUCKETS],
}

/// Resolution of [`Copied`]: a sweep's estimate of what expired is low by
/// at most one bucket, an eighth of the copied entries' lifetimes.
const EXPIRY_BUCKETS: usize = 8;

impl Copied {
    /// Count the live entries a migration at `now` is about to copy.
    fn start(now: Stamp, latest: Stamp) -> Copied {
        let first = now.0 + 1;
        let span = latest.0.saturating_sub(now.0);
        Copied {
            first,
            width: span.div_ceil(EXPIRY_BUCKETS as u32).max(1),
            counts: [0; EXPIRY_BUCKETS],
        }
    }

    #[inline]
    fn add(&mut self, expiry: Stamp) {
        if expiry > Stamp::MAX {
            return; // a guard's claim in flight: its expiry is not known yet
        }
        let i = (expiry.0.saturating_sub(self.first) / self.width) as usize;
        self.counts[i.min(EXPIRY_BUCKETS - 1)] += 1;
    }

    /// Copied entries certainly expired at `now` (whole buckets only), and
    /// whether that is all of them.
    fn expired(&self, now: Stamp) -> (usize, bool) {
        let mut due = 0;
        for (i, &n) in self.counts.iter().enumerate() {
            let end = self.first as u64 + (i as u64 + 1) * self.width as u64;
            if end > now.0 as u64 + 1 {
                return (due, self.counts[i..].iter().all(|&n| n == 0));
            }
            due += n as usize;
        }
        (due, true)
    }
}

/// Counters only migrations touch (so plain shared atomics are fine).
#[derive(Default)]
pub(crate) struct Reclaimed {
    pub expired: AtomicU64,
    pub evicted: AtomicU64,
    /// Tables replaced (grown, swept, shrunk or evicted from).
    pub rebuilds: AtomicU64,
}

pub(crate) struct ShardedSet {
    shards: Box<[CachePadded<Shard>]>,
    shard_shift: u32,
    slot_limit: Option<usize>,
    stamps: Stamps,
    config: SetConfig,
    pub(crate) reclaimed: Reclaimed,
}

impl ShardedSet {
    pub(crate) fn new(config: SetConfig) -> ShardedSet {
        debug_assert!(config.shards.is_power_of_two());
        let slot_limit = config
            .memory_limit
            .map(|bytes| (bytes / table::SLOT_BYTES / config.shards).max(MIN_SLOTS));
        // Keys spread binomially over shards: leave four standard
        // deviations of slack so a pre-sized shard does not grow anyway.
        let mean = config.capacity_hint.div_ceil(config.shards);
        let per_shard = mean + 4 * (mean as f64).sqrt() as usize;
        let sized = ((per_shard as f64 / MAX_LOAD) as usize + 1).max(MIN_SLOTS);
        // Pre-sized tables are all the size asked for; from empty they
        // start staggered, so that they grow staggered.
        let ladder_base = |i| MIN_SLOTS as f64 * phase(i, config.shards);
        let sizes: Vec<(usize, bool)> = (0..config.shards)
            .map(|i| {
                let slots = if config.capacity_hint == 0 {
                    ladder_base(i).ceil() as usize
                } else {
                    sized
                };
                match slot_limit {
                    Some(limit) if slots >= limit => (limit, true),
                    _ => (slots, false),
                }
            })
            .collect();
        let tables: Vec<Table> = if config.capacity_hint != 0 && sizes.iter().all(|&(_, l)| !l) {
            // Sized for the ids to come: in one mapping (see Table::group),
            // and its pages written now (see Table::prefault), not faulted
            // in one by one, each fault a TLB shootdown, by the first
            // inserts.
            let slots: Vec<usize> = sizes.iter().map(|&(s, _)| s).collect();
            let tables = Table::group(&slots, MAX_LOAD);
            tables.iter().for_each(Table::prefault);
            tables
        } else {
            sizes
                .iter()
                .map(|&(slots, at_limit)| {
                    let table = Table::new(slots, MAX_LOAD, at_limit);
                    if config.capacity_hint != 0 {
                        table.prefault();
                    }
                    table
                })
                .collect()
        };
        let shards = tables
            .into_iter()
            .enumerate()
            .map(|(i, table)| {
                CachePadded::new(Shard {
                    table: Atomic::new(table),
                    next_expiry: AtomicU32::new(Stamp::MAX.0),
                    last_sweep: AtomicU32::new(0),
                    migration: Mutex::new(Copied::default()),
                    ladder_base: ladder_base(i),
                })
            })
            .collect();
        ShardedSet {
            shards,
            shard_shift: 64 - config.shards.trailing_zeros(),
            slot_limit,
            stamps: Stamps::starting_at(config.start),
            config,
            reclaimed: Reclaimed::default(),
        }
    }

    /// A fingerprint's shard is its top this many bits.
    pub(crate) fn shard_bits(&self) -> u32 {
        self.shards.len().trailing_zeros()
    }

    #[inline]
    fn shard(&self, fp: Fingerprint) -> &Shard {
        &self.shards[self.shard_index(fp)]
    }

    /// The index of `fp`'s shard.
    #[inline]
    pub(crate) fn shard_index(&self, fp: Fingerprint) -> usize {
        // `checked_shr` because one shard means a shift by 64.
        fp.hi().checked_shr(self.shard_shift).unwrap_or(0) as usize
    }

    /// Is shard `i`'s table being replaced (grown, swept) right now? An
    /// insert there waits for the new table.
    #[inline]
    pub(crate) fn migrating(&self, i: usize) -> bool {
        self.shards[i].migration.is_locked()
    }

    /// Has the set a memory ceiling (so an insert may be refused)?
    pub(crate) fn has_ceiling(&self) -> bool {
        self.slot_limit.is_some()
    }

    /// Hold shard `i` as a migration does, for tests of callers that
    /// avoid waiting for one.
    #[cfg(test)]
    pub(crate) fn hold_migration(&self, i: usize) -> impl Drop + '_ {
        self.shards[i].migration.lock()
    }

    #[inline]
    fn current<'g>(shard: &Shard, guard: &'g Guard) -> (Shared<'g, Table>, &'g Table) {
        let ptr = shard.table.load(Acquire, guard);
        // SAFETY: a shard's table pointer is set to a valid table at
        // construction and only ever swapped for another valid table; the
        // old one is destroyed through `defer_destroy`, i.e. not before every
        // guard pinned when it was reachable (like `guard`) is dropped.
        let table = unsafe { ptr.deref() };
        (ptr, table)
    }

    /// Prefetch the cache line where a probe for `fp` will start.
    #[inline]
    pub(crate) fn prefetch(&self, fp: Fingerprint, guard: &Guard) {
        let (_, table) = Self::current(self.shard(fp), guard);
        let (line, both) = table.home_lines(Key::new(fp));
        crate::prefetch::prefetch_read(line);
        if both {
            // Past the table's end this is a hint about memory nobody
            // reads: harmless (a prefetch never faults).
            crate::prefetch::prefetch_read(line.wrapping_add(64));
        }
    }

    /// `fps` in order, each one's first table line requested `W` ids
    /// before it is yielded: a caller that probes each id as it comes has
    /// a window's worth of probes to hide every miss behind. (Prefetching
    /// a whole window and then probing it stalled on its first lines.)
    #[inline]
    pub(crate) fn prefetched<'a, const W: usize, I: Iterator<Item = Fingerprint>>(
        &'a self,
        mut fps: I,
        guard: &'a Guard,
    ) -> Prefetched<'a, W, I> {
        let mut window = [Fingerprint(0); W];
        let mut queued = 0;
        for (slot, fp) in window.iter_mut().zip(fps.by_ref()) {
            *slot = fp;
            self.prefetch(fp, guard);
            queued += 1;
        }
        Prefetched {
            set: self,
            guard,
            fps,
            window,
            oldest: 0,
            queued,
        }
    }

    /// Insert-if-absent, linearizable.
    #[inline]
    pub(crate) fn insert(
        &self,
        fp: Fingerprint,
        now: Tick,
        expiry: Tick,
        guard: &Guard,
    ) -> Result<Verdict> {
        let (now, expiry) = (self.stamps.stamp(now), self.stamps.stamp(expiry));
        self.insert_as(fp, now, expiry, guard, Writers::Many)
            .map(Inserted::verdict)
    }

    /// Insert-if-absent as a claim whose work has yet to run: the entry is
    /// live (and [`Inserted::InFlight`] to a racing claim) until
    /// [`ShardedSet::settle`] gives it its real expiry or forgets it.
    #[cfg(feature = "guard")]
    pub(crate) fn claim(&self, fp: Fingerprint, now: Tick, guard: &Guard) -> Result<Inserted> {
        let now = self.stamps.stamp(now);
        self.insert_as(fp, now, table::IN_FLIGHT, guard, Writers::Many)
    }

    /// Settle an in-flight claim of `fp` (see [`Table::settle`]).
    #[cfg(feature = "guard")]
    pub(crate) fn settle(&self, fp: Fingerprint, to: Tick, guard: &Guard) -> Settle {
        let key = Key::new(fp);
        let shard = self.shard(fp);
        let to = self.stamps.stamp(to);
        loop {
            let (_, table) = Self::current(shard, guard);
            match table.settle(key, to) {
                Settle::Frozen => drop(shard.migration.lock()),
                settled @ Settle::Settled { .. } => {
                    if to == Stamp::DEAD {
                        table.forgotten.fetch_add(1, Relaxed);
                    } else if to != table::IN_FLIGHT_WAITED {
                        Self::note_expiry(shard, to);
                    }
                    return settled;
                }
                Settle::NotInFlight => return Settle::NotInFlight,
            }
        }
    }

    /// Insert-if-absent without a locked instruction, for a replay lane.
    /// The caller must be the only thread touching `fp`'s shard (lanes own
    /// whole shards, see [`ShardedSet::shard_bits`]) and nobody may read
    /// the set until the lanes are joined. Broken, that contract loses
    /// inserts; it cannot cause undefined behaviour (the slots are atomics).
    #[inline]
    pub(crate) fn insert_exclusive(
        &self,
        fp: Fingerprint,
        now: Tick,
        expiry: Tick,
        guard: &Guard,
    ) -> Result<Verdict> {
        let (now, expiry) = (self.stamps.stamp(now), self.stamps.stamp(expiry));
        self.insert_as(fp, now, expiry, guard, Writers::One)
            .map(Inserted::verdict)
    }

    #[inline(always)]
    fn insert_as(
        &self,
        fp: Fingerprint,
        now: Stamp,
        expiry: Stamp,
        guard: &Guard,
        writers: Writers,
    ) -> Result<Inserted> {
        let key = Key::new(fp);
        let shard = self.shard(fp);
        loop {
            let (ptr, table) = Self::current(shard, guard);
            match table.insert(key, now, expiry, writers) {
                Insert::Duplicate => return Ok(Inserted::Duplicate),
                Insert::InFlight => return Ok(Inserted::InFlight),
                Insert::Claimed => {
                    Self::note_expiry(shard, expiry);
                    let occupied = match writers {
                        Writers::Many => table.occupied.fetch_add(1, Relaxed) + 1,
                        Writers::One => {
                            let n = table.occupied.load(Relaxed) + 1;
                            table.occupied.store(n, Relaxed);
                            n
                        }
                    };
                    if occupied > table.max_occupied && !table.at_limit {
                        self.migrate_unless_under_way(shard, ptr, now, guard);
                    }
                    return Ok(Inserted::New);
                }
                Insert::Revived { was_forgotten } => {
                    if was_forgotten {
                        table.forgotten.fetch_sub(1, Relaxed);
                    }
                    Self::note_expiry(shard, expiry);
                    return Ok(Inserted::New);
                }
                Insert::Frozen => drop(shard.migration.lock()),
                Insert::Full => {
                    if table.at_limit
                        && self.config.policy == MemoryPolicy::Reject
                        && shard.next_expiry.load(Relaxed) > now.0
                    {
                        // Nothing to reclaim: refuse rather than forget.
                        return Err(Error::CapacityExceeded {
                            limit_bytes: self.config.memory_limit.unwrap_or(0),
                        });
                    }
                    self.migrate(shard, ptr, now, guard);
                }
            }
        }
    }

    #[inline]
    fn note_expiry(shard: &Shard, expiry: Stamp) {
        // With one TTL, expiries only grow: usually a load and no write.
        if expiry.0 < shard.next_expiry.load(Relaxed) {
            shard.next_expiry.fetch_min(expiry.0, Relaxed);
        }
    }

    #[inline]
    pub(crate) fn contains(&self, fp: Fingerprint, now: Tick, guard: &Guard) -> bool {
        let (_, table) = Self::current(self.shard(fp), guard);
        table.contains(Key::new(fp), self.stamps.stamp(now))
    }

    /// Forget a live entry; returns the expiry it had.
    pub(crate) fn forget(&self, fp: Fingerprint, now: Tick, guard: &Guard) -> Option<Tick> {
        let key = Key::new(fp);
        let shard = self.shard(fp);
        let now = self.stamps.stamp(now);
        loop {
            let (_, table) = Self::current(shard, guard);
            match table.forget(key, now) {
                Forget::Forgotten(expiry) => {
                    table.forgotten.fetch_add(1, Relaxed);
                    return Some(self.stamps.tick(expiry));
                }
                Forget::Absent => return None,
                Forget::Frozen => drop(shard.migration.lock()),
            }
        }
    }

    /// Rebuild the shards worth rebuilding for their expired entries, at
    /// most once per `min_interval` ticks each. Returns entries dropped.
    ///
    /// A shard is worth it when a quarter of its claimed slots are
    /// reclaimable (forgotten, or expired by the count its last rebuild
    /// kept of what it copied), or when everything that rebuild copied
    /// has expired (which also covers a shard that filled from empty).
    /// So each rebuild frees at least a fraction of what it copies, and a
    /// key is copied a bounded number of times in its life however long
    /// the TTL. (Rebuilding every shard with anything expired on each
    /// interval copied a key TTL / interval times: 60 times with the
    /// default 1 h TTL, 1 440 with a day's.) `force` rebuilds every shard
    /// with anything expired, for [`crate::Engine::expire_now`].
    pub(crate) fn sweep(&self, now: Tick, min_interval: u32, force: bool) -> u64 {
        let before = self.reclaimed.expired.load(Relaxed);
        let now = self.stamps.stamp(now);
        for shard in self.shards.iter() {
            if shard.next_expiry.load(Relaxed) > now.0 {
                continue;
            }
            let last = shard.last_sweep.load(Relaxed);
            if now.0.saturating_sub(last) < min_interval {
                continue;
            }
            let guard = &epoch::pin();
            let (ptr, table) = Self::current(shard, guard);
            if !force {
                let (expired, all) = shard.migration.lock().expired(now);
                let reclaimable = expired + table.forgotten.load(Relaxed);
                if !all && reclaimable * 4 < table.occupied.load(Relaxed) {
                    continue;
                }
            }
            self.migrate_to(shard, ptr, now, Sizing::Fit, guard);
        }
        self.reclaimed.expired.load(Relaxed) - before
    }

    /// Replace `expected` (if it is still the shard's table) with a new table
    /// holding its live entries.
    #[cold]
    fn migrate(&self, shard: &Shard, expected: Shared<'_, Table>, now: Stamp, guard: &Guard) {
        self.migrate_to(shard, expected, now, Sizing::Grow, guard)
    }

    /// [`ShardedSet::migrate`], unless the shard's table is being replaced
    /// already: then an insert that filled it past its load has its slot
    /// and need not wait. (Every insert past the load used to queue on the
    /// migration's lock until the copy was done.)
    #[cold]
    fn migrate_unless_under_way(
        &self,
        shard: &Shard,
        expected: Shared<'_, Table>,
        now: Stamp,
        guard: &Guard,
    ) {
        if let Some(copied) = shard.migration.try_lock() {
            self.replace(shard, copied, expected, now, Sizing::Grow, None, guard);
        }
    }

    /// Make room for `keys` live keys in total, in one step per shard (used
    /// before replaying a log, so replay never migrates). The new tables are
    /// allocated and pre-faulted on up to `threads` threads: for a large log
    /// the kernel zeroing their pages is a tenth of the replay.
    pub(crate) fn reserve(&self, keys: usize, now: Tick, threads: usize) {
        let now = self.stamps.stamp(now);
        let n = self.shards.len();
        let mean = keys.div_ceil(n);
        let per_shard = mean + 4 * (mean as f64).sqrt() as usize;
        // Each shard between MAX_LOAD and GROW_TO_LOAD full after the
        // replay, staggered (see `phase`): a few shards grow at a time as
        // new ids arrive. (All at 0.8, the first new ids after a restart
        // rehashed every shard, half a second at 10M keys.)
        let room = (per_shard as f64 / MAX_LOAD) as usize + 1;
        // The shards that must grow, each with its size and, without a
        // memory ceiling that may cap it, its new table: all of them in
        // one mapping (see Table::group).
        let mut jobs: Vec<(&Shard, usize, Option<Table>)> = {
            let guard = &epoch::pin();
            self.shards
                .iter()
                .filter_map(|shard| {
                    let slots = shard.rung(room as f64).max(room);
                    (Self::current(shard, guard).1.slots() < slots)
                        .then_some((&**shard, slots, None))
                })
                .collect()
        };
        if self.slot_limit.is_none() {
            let sizes: Vec<usize> = jobs.iter().map(|&(_, slots, _)| slots).collect();
            for (job, table) in jobs.iter_mut().zip(Table::group(&sizes, MAX_LOAD)) {
                job.2 = Some(table);
            }
        }
        let grow = |jobs: &mut [(&Shard, usize, Option<Table>)]| {
            let guard = &epoch::pin();
            for (shard, slots, table) in jobs {
                let table = table.take();
                if let Some(t) = &table {
                    t.prefault();
                }
                let (ptr, _) = Self::current(shard, guard);
                let sizing = Sizing::AtLeast(*slots);
                self.replace(
                    shard,
                    shard.migration.lock(),
                    ptr,
                    now,
                    sizing,
                    table,
                    guard,
                );
            }
        };
        let per_thread = jobs.len().div_ceil(threads.max(1)).max(1);
        std::thread::scope(|scope| {
            let mut parts = jobs.chunks_mut(per_thread);
            let mine = parts.next();
            for part in parts {
                scope.spawn(move || grow(part));
            }
            if let Some(part) = mine {
                grow(part);
            }
        });
    }

    fn migrate_to(
        &self,
        shard: &Shard,
        expected: Shared<'_, Table>,
        now: Stamp,
        sizing: Sizing,
        guard: &Guard,
    ) {
        self.replace(
            shard,
            shard.migration.lock(),
            expected,
            now,
            sizing,
            None,
            guard,
        );
    }

    /// [`ShardedSet::migrate_to`] with the shard's migration lock held;
    /// into `made` (its pages written) if it has the room.
    #[allow(clippy::too_many_arguments)]
    fn replace(
        &self,
        shard: &Shard,
        mut copied: MutexGuard<'_, Copied>,
        expected: Shared<'_, Table>,
        now: Stamp,
        sizing: Sizing,
        made: Option<Table>,
        guard: &Guard,
    ) {
        let (ptr, old) = Self::current(shard, guard);
        if ptr != expected {
            return; // someone else already replaced it
        }
        // The successor, made before the freeze: the one `reserve` made,
        // or for a table that filled up (no ceiling) one sized from what
        // it holds, less what the last rebuild's count says has expired,
        // with its pages written now. The kernel zeroing them (about as
        // long as the copy) then overlaps writers still using the old
        // table instead of keeping them waiting for the new one.
        let early = made.or_else(|| {
            (matches!(sizing, Sizing::Grow) && self.slot_limit.is_none()).then(|| {
                let estimate = old.len().saturating_sub(copied.expired(now).0);
                let slots = Self::slots_for(shard, old, estimate, sizing);
                let table = Table::new(slots.max(room_for(estimate)), MAX_LOAD, false);
                table.prefault();
                table
            })
        });
        // Freeze and count first, then copy straight from the frozen table
        // (whose contents no longer change) into the new one: no staging
        // vector of every live entry, which cost a copy and, once freed,
        // stayed in the allocator's heap (0.5 bytes per key of resident
        // memory at 10M keys).
        let Frozen {
            mut live,
            expired,
            latest,
        } = old.freeze(now);
        self.reclaimed.expired.fetch_add(expired as u64, Relaxed);
        self.reclaimed.rebuilds.fetch_add(1, Relaxed);

        let mut slots = Self::slots_for(shard, old, live, sizing);
        let mut at_limit = false;
        // At the ceiling with `EvictOldest`: the entries to keep, the
        // latest-expiring ones (the only case that needs them in hand).
        let mut kept: Option<Vec<(Key, Stamp)>> = None;
        if let Some(limit) = self.slot_limit {
            if slots >= limit {
                slots = limit;
                at_limit = true;
                let keep = (limit as f64 * MAX_LOAD * EVICT_TO_LOAD) as usize;
                if self.config.policy == MemoryPolicy::EvictOldest && live > keep {
                    let mut entries = Vec::with_capacity(live);
                    old.frozen_live(now, |k, e| entries.push((k, e)));
                    let evict = entries.len() - keep;
                    entries.select_nth_unstable_by_key(evict, |&(_, e)| e);
                    entries.drain(..evict);
                    self.reclaimed.evicted.fetch_add(evict as u64, Relaxed);
                    live = entries.len();
                    kept = Some(entries);
                }
            }
        }
        // Never drop a live entry for want of room (Reject may sit just
        // above the ceiling's load): the table always has a free slot.
        slots = slots.max(room_for(live));
        // A growth's estimate is usually right: the sizes are rungs ×1.55
        // apart. It must be the very size (memory); a reservation may be
        // larger.
        let fits = |t: &Table| {
            !at_limit
                && match sizing {
                    Sizing::AtLeast(_) => t.slots() >= Table::rounded(slots),
                    _ => t.slots() == Table::rounded(slots),
                }
        };
        #[cfg(all(test, not(seen_loom)))]
        if let (Sizing::Grow, Some(t)) = (sizing, &early) {
            let right = fits(t);
            tests::EARLY.with(|e| {
                let (r, w) = e.get();
                e.set((r + right as usize, w + !right as usize));
            });
        }
        // A wrong one is dropped before its replacement takes memory too.
        let new = match early.filter(|t| fits(t)) {
            Some(table) => table,
            None => {
                let table = Table::new(slots, MAX_LOAD, at_limit);
                // The migration and the inserts after it touch every page
                // of the new table; have them written in one call (see
                // Table::prefault).
                table.prefault();
                table
            }
        };
        let mut earliest = Stamp::MAX;
        *copied = Copied::start(now, latest);
        let mut put = |key: Key, expiry: Stamp| {
            let inserted = new.insert_unshared(key, expiry);
            debug_assert!(inserted, "migration target has room by construction");
            earliest = earliest.min(expiry);
            copied.add(expiry);
        };
        match kept {
            Some(entries) => entries.into_iter().for_each(|(k, e)| put(k, e)),
            None => old.frozen_live(now, put),
        }
        shard.next_expiry.store(earliest.0, Relaxed);
        shard.last_sweep.store(now.0, Relaxed);
        shard.table.store(Owned::new(new), Release);
        // SAFETY: `ptr` was just unlinked (the store above replaced it) and
        // is never handed out again; readers that still hold it are pinned.
        unsafe { guard.defer_destroy(ptr) };
        guard.flush();
    }

    /// The size of the table to replace `old` with, for `live` entries
    /// (before a memory ceiling and the room floor).
    fn slots_for(shard: &Shard, old: &Table, live: usize, sizing: Sizing) -> usize {
        let old_slots = old.slots() as f64;
        let live_f = live as f64;
        let slots = match sizing {
            Sizing::Fit if live_f < FIT_BELOW_LOAD * old_slots => {
                ((live_f / FIT_LOAD) as usize).max(MIN_SLOTS)
            }
            _ if live_f > KEEP_SIZE_LOAD.0 * old_slots && live_f < KEEP_SIZE_LOAD.1 * old_slots => {
                old.slots()
            }
            _ => shard.rung(live_f / GROW_TO_LOAD).max(MIN_SLOTS),
        };
        match sizing {
            Sizing::AtLeast(min) => slots.max(min),
            _ => slots,
        }
    }

    /// Entries not forgotten (expired ones count until swept).
    pub(crate) fn len(&self) -> usize {
        let guard = &epoch::pin();
        self.shards
            .iter()
            .map(|s| Self::current(s, guard).1.len())
            .sum()
    }

    pub(crate) fn memory_bytes(&self) -> usize {
        let guard = &epoch::pin();
        let tables: usize = self
            .shards
            .iter()
            .map(|s| Self::current(s, guard).1.memory_bytes())
            .sum();
        tables + self.shards.len() * std::mem::size_of::<CachePadded<Shard>>()
    }
}

const SLOTS_PER_LINE_MIN: usize = table::SLOTS_PER_LINE;

/// The fewest slots a table holding `live` entries may have.
fn room_for(live: usize) -> usize {
    live + live / 8 + SLOTS_PER_LINE_MIN
}

/// See [`ShardedSet::prefetched`]: a ring of the next `W` fingerprints,
/// whose lines are already on their way.
pub(crate) struct Prefetched<'a, const W: usize, I> {
    set: &'a ShardedSet,
    guard: &'a Guard,
    fps: I,
    window: [Fingerprint; W],
    oldest: usize,
    queued: usize,
}

impl<const W: usize, I: Iterator<Item = Fingerprint>> Iterator for Prefetched<'_, W, I> {
    type Item = Fingerprint;

    #[inline]
    fn next(&mut self) -> Option<Fingerprint> {
        if self.queued == 0 {
            return None;
        }
        let fp = self.window[self.oldest];
        match self.fps.next() {
            Some(ahead) => {
                self.set.prefetch(ahead, self.guard);
                self.window[self.oldest] = ahead;
            }
            None => self.queued -= 1,
        }
        self.oldest = (self.oldest + 1) % W;
        Some(fp)
    }
}

impl Drop for ShardedSet {
    fn drop(&mut self) {
        for shard in self.shards.iter() {
            // SAFETY: `&mut self` means no other thread can reach the set, so
            // no guard can hold the table; take it out and free it now.
            unsafe {
                let guard = epoch::unprotected();
                let ptr = shard.table.swap(Shared::null(), Relaxed, guard);
                if !ptr.is_null() {
                    drop(ptr.into_owned());
                }
            }
        }
    }
}

#[cfg(all(test, not(seen_loom)))]
mod tests {
    use super::*;

    fn one_shard() -> ShardedSet {
        ShardedSet::new(SetConfig {
            shards: 1,
            capacity_hint: 0,
            memory_limit: None,
            policy: MemoryPolicy::Reject,
            start: Tick(100),
        })
    }

    fn fp(n: u64) -> Fingerprint {
        Fingerprint((n as u128).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835) | 1 << 100)
    }

    fn rebuilds(set: &ShardedSet) -> u64 {
        set.reclaimed.rebuilds.load(Relaxed)
    }

    thread_local! {
        /// Tables made before the freeze of a growth on this thread:
        /// (sized right and used, sized wrong and dropped).
        pub(super) static EARLY: std::cell::Cell<(usize, usize)> =
            const { std::cell::Cell::new((0, 0)) };
    }

    #[test]
    fn a_growing_set_sizes_its_next_table_before_the_freeze() {
        let set = one_shard();
        let guard = &epoch::pin();
        let before = EARLY.with(|e| e.get());
        for i in 0..100_000 {
            let verdict = set.insert(fp(i), Tick(100), Tick(1000), guard).unwrap();
            assert_eq!(verdict, Verdict::New);
        }
        let (right, wrong) = EARLY.with(|e| e.get());
        let grown = rebuilds(&set);
        assert!(grown >= 10, "{grown}");
        assert_eq!((right - before.0, wrong - before.1), (grown as usize, 0));
        for i in 0..100_000 {
            assert!(set.contains(fp(i), Tick(100), guard), "{i}");
        }
        // Keys that expire uncounted by any rebuild (inserted after the
        // last one): the estimate is too high, the table made early is the
        // wrong size and dropped, and nothing is lost.
        for i in 100_000..130_000 {
            let verdict = set.insert(fp(i), Tick(100), Tick(1000), guard).unwrap();
            assert_eq!(verdict, Verdict::New);
        }
        for i in 130_000..200_000 {
            let verdict = set.insert(fp(i), Tick(2000), Tick(3000), guard).unwrap();
            assert_eq!(verdict, Verdict::New);
        }
        let (_, wrong) = EARLY.with(|e| e.get());
        assert!(wrong > before.1, "no estimate was wrong");
        for i in 0..200_000 {
            assert_eq!(set.contains(fp(i), Tick(2000), guard), i >= 130_000, "{i}");
        }
    }

    #[test]
    fn an_insert_past_the_load_does_not_wait_for_a_migration_under_way() {
        let set = one_shard();
        let guard = &epoch::pin();
        let (slots, max) = {
            let (_, table) = ShardedSet::current(&set.shards[0], guard);
            (table.slots(), table.max_occupied)
        };
        // This thread holds the migration lock, as a migration under way
        // does: inserts past the load go on (waiting would deadlock here).
        let held = set.hold_migration(0);
        for i in 0..(max + (slots - max) / 2) as u64 {
            assert_eq!(
                set.insert(fp(i), Tick(100), Tick(1000), guard).unwrap(),
                Verdict::New
            );
        }
        assert_eq!(rebuilds(&set), 0);
        drop(held);
        let next = (slots as u64) * 2;
        assert_eq!(
            set.insert(fp(next), Tick(100), Tick(1000), guard).unwrap(),
            Verdict::New
        );
        assert_eq!(rebuilds(&set), 1);
    }

    #[test]
    fn a_sweep_rebuilds_a_shard_once_a_quarter_of_it_is_reclaimable() {
        let set = one_shard();
        let guard = &epoch::pin();
        // 1000 entries expiring one per tick, 101..=1100.
        for i in 0..1000 {
            let verdict = set.insert(fp(i), Tick(100), Tick(101 + i as u32), guard);
            assert_eq!(verdict.unwrap(), Verdict::New);
        }
        // A forced sweep rebuilds whatever has expired at all (one entry),
        // and counts what it copied by expiry.
        assert_eq!(set.sweep(Tick(101), 0, true), 1);
        let after_first = rebuilds(&set);
        // 49 more expired (5 %): not worth copying 950 entries for.
        assert_eq!(set.sweep(Tick(150), 0, false), 0);
        assert_eq!(rebuilds(&set), after_first);
        assert_eq!(set.len(), 999, "expired entries stay until a rebuild");
        // 379 expired (38 %): worth it, and the rebuild drops them all.
        assert_eq!(set.sweep(Tick(480), 0, false), 379);
        assert_eq!(rebuilds(&set), after_first + 1);
        assert_eq!(set.len(), 620);
        for i in 0..1000 {
            let live = 101 + i as u32 > 480;
            assert_eq!(set.contains(fp(i), Tick(480), guard), live, "entry {i}");
        }
    }

    #[test]
    fn a_sweep_shrinks_a_mostly_expired_table_to_fit() {
        let set = one_shard();
        let guard = &epoch::pin();
        for i in 0..12_000 {
            let expiry = Tick(if i < 10_000 { 200 } else { 1000 });
            assert_eq!(
                set.insert(fp(i), Tick(100), expiry, guard).unwrap(),
                Verdict::New
            );
        }
        let grown = set.memory_bytes();
        assert_eq!(set.sweep(Tick(300), 0, false), 10_000);
        let load = 2000.0 * table::SLOT_BYTES as f64 / set.memory_bytes() as f64;
        assert!(
            (0.55..=FIT_LOAD).contains(&load),
            "2000 live keys in {} bytes (load {load:.2}; {grown} bytes before)",
            set.memory_bytes()
        );
    }

    #[test]
    fn a_sweep_rebuilds_a_shard_whose_copied_entries_all_expired() {
        // Never rebuilt (it filled from empty): nothing was counted, so
        // everything counted has expired and the sweep goes ahead.
        let set = one_shard();
        let guard = &epoch::pin();
        for i in 0..10 {
            let verdict = set.insert(fp(i), Tick(100), Tick(105), guard);
            assert_eq!(verdict.unwrap(), Verdict::New);
        }
        assert_eq!(set.sweep(Tick(106), 0, false), 10);
        assert_eq!(set.len(), 0);
    }

    #[test]
    fn steady_traffic_copies_a_key_a_few_times_whatever_the_ttl() {
        // An hour's TTL, a sweep a minute (the defaults), 1000 new keys a
        // minute for five hours: 60k resident once warm. Rebuilding every
        // shard with anything expired on each sweep would rebuild every
        // minute after the first hour (240 times).
        let set = one_shard();
        let guard = &epoch::pin();
        let (ttl, interval) = (3600, 60);
        let mut n = 0;
        let mut growth_and_sweeps = 0;
        for minute in 0..300u32 {
            let now = Tick(1000 + minute * interval);
            for _ in 0..1000 {
                let verdict = set.insert(fp(n), now, Tick(now.0 + ttl), guard);
                assert_eq!(verdict.unwrap(), Verdict::New);
                n += 1;
            }
            let before = rebuilds(&set);
            set.sweep(now, interval, false);
            growth_and_sweeps += rebuilds(&set) - before;
        }
        // Sweeps after the first hour: one per ~20 minutes.
        assert!(
            (8..=20).contains(&growth_and_sweeps),
            "{growth_and_sweeps} sweep rebuilds in 300 minutes"
        );
        // And expired entries never pile up: at most about a third more
        // than the live ones.
        let live = 60_000;
        assert!(set.len() < live * 3 / 2, "{} resident", set.len());
    }
}
