//! One shard's open-addressing table: folklore linear probing over 16-byte
//! slots, four to a cache line, with insert-if-absent by compare-and-swap.
//!
//! # Slot protocol
//!
//! A slot is two words:
//!
//! ```text
//! tag  : u64   0 = EMPTY, 1 = FROZEN (empty, table is migrating), else the
//!              fingerprint's low 64 bits (0 and 1 remapped to 2 and 3)
//! word : u64   bits 63..30  check: the low 34 bits of the fingerprint's
//!                           high word
//!              bit  29      MOVED: the table is migrating, word is final
//!              bits 28..0   expiry stamp (1 = forgotten); 0 = PENDING
//! ```
//!
//! * **Claim**: CAS `tag` EMPTY → tag, then store `word`. Between the two a
//!   reader that matches the tag sees PENDING and waits (a few instructions
//!   of another thread; lookups do not wait, they treat PENDING as absent,
//!   which linearises them before the insert).
//! * **Match**: `tag` equal and `check` equal. Live iff expiry > now.
//! * **Revive / forget**: CAS on `word` only, so a slot, once claimed, keeps
//!   its key until the table is replaced: probe sequences never break and
//!   racing inserts of one id meet at the same slot. Exactly one CAS wins,
//!   so exactly one caller is told "new".
//! * **In flight** (the guard's claims): a claim whose work still runs is
//!   stored live with one of two expiries above every real instant,
//!   `IN_FLIGHT` or `IN_FLIGHT_WAITED` (someone waits for its verdict). A
//!   racing insert of the key meets it as [`Insert::InFlight`]; the
//!   claimant settles it with a CAS on `word` to its real expiry (work
//!   done) or to forgotten (work failed), and learns whether anyone waits.
//! * **Freeze** (migration): EMPTY slots become FROZEN, claimed slots get
//!   MOVED; every later CAS by a writer then fails, the writer sees the mark
//!   and retries on the new table. Readers keep reading: frozen contents are
//!   still correct.
//!
//! In memory a key is compared on 64 + 34 bits plus the shard-index bits:
//! 104 bits with the default 64 shards, 106 with 256. With 10^9 live keys a
//! new id is mistaken for a duplicate with probability about 5·10^-23 per
//! event; the full 128 bits are kept in the log. This is what buys 16-byte
//! slots, and why an expiry is kept in 29 bits (see [`Stamp`]).

use crossbeam_utils::CachePadded;

use crate::fingerprint::Fingerprint;
use crate::sync::atomic::{AtomicU64, AtomicUsize, Ordering::*};
use crate::sync::backoff;
use crate::ttl::Tick;

const EMPTY: u64 = 0;
const FROZEN: u64 = 1;
const PENDING: u64 = 0;
const STAMP_BITS: u32 = 29;
const MOVED: u64 = 1 << STAMP_BITS;
const EXPIRY_MASK: u64 = MOVED - 1;
const CHECK_SHIFT: u32 = STAMP_BITS + 1;
/// Bits of the fingerprint's high word a slot keeps.
const CHECK_BITS: u32 = 64 - CHECK_SHIFT;

/// An instant as a slot holds it: seconds since the set's [`Stamps`] base,
/// in 29 bits. 0 and 1 mean what they mean for a [`Tick`] (reserved, and
/// forgotten); the two stamps above [`Stamp::MAX`] are the in-flight ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Stamp(pub u32);

impl Stamp {
    /// Marks a forgotten entry; earlier than every real instant.
    pub(crate) const DEAD: Stamp = Stamp(1);
    /// Earliest real instant.
    pub(crate) const MIN_LIVE: Stamp = Stamp(2);
    /// Latest real instant: about 17 years after the base.
    pub(crate) const MAX: Stamp = Stamp((1 << STAMP_BITS) - 3);
}

/// Maps a set's [`Tick`]s to the [`Stamp`]s its slots hold and back.
///
/// Ticks count from 2020 in 31 bits; a slot has 29 bits for an expiry, so
/// stamps count from a base four years before the set was made. That
/// leaves four years for the wall clock to step back and about thirteen
/// ahead: an expiry later than that is held as [`Stamp::MAX`] (in memory
/// only: the log keeps the tick) and read back as [`Tick::MAX`]; a clock
/// stepped back further reads as the base. Both are far outside any TTL a dedup window uses.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Stamps {
    base: u32,
}

impl Stamps {
    const BACK: u32 = 1 << 27;

    pub(crate) fn starting_at(now: Tick) -> Stamps {
        Stamps {
            base: now.0.saturating_sub(Self::BACK),
        }
    }

    #[inline]
    pub(crate) fn stamp(self, t: Tick) -> Stamp {
        if t > Tick::MAX {
            Stamp(t.0 - Tick::MAX.0 + Stamp::MAX.0) // in flight
        } else if t < Tick::MIN_LIVE {
            Stamp(t.0)
        } else {
            let s = t.0.saturating_sub(self.base);
            Stamp(s.clamp(Stamp::MIN_LIVE.0, Stamp::MAX.0))
        }
    }

    /// The tick of a stamp. [`Stamp::MAX`] may stand for any later
    /// instant, so it reads as the latest tick: a forget logged for such a
    /// mark is kept as long as the mark may live.
    #[inline]
    pub(crate) fn tick(self, s: Stamp) -> Tick {
        if s > Stamp::MAX {
            Tick(s.0 - Stamp::MAX.0 + Tick::MAX.0)
        } else if s == Stamp::MAX {
            Tick::MAX
        } else if s < Stamp::MIN_LIVE {
            Tick(s.0)
        } else {
            Tick((s.0 + self.base).min(Tick::MAX.0))
        }
    }
}
/// The expiry of a claim whose work is running; see the slot protocol.
#[cfg_attr(not(feature = "guard"), allow(dead_code))]
pub(crate) const IN_FLIGHT: Stamp = Stamp(Stamp::MAX.0 + 1);
/// [`IN_FLIGHT`], and someone waits to hear how it ends.
pub(crate) const IN_FLIGHT_WAITED: Stamp = Stamp(Stamp::MAX.0 + 2);
const _: () = assert!(IN_FLIGHT_WAITED.0 as u64 == EXPIRY_MASK);

#[inline]
fn in_flight(expiry: Stamp) -> bool {
    expiry > Stamp::MAX
}

/// Slots per 64-byte cache line.
pub(crate) const SLOTS_PER_LINE: usize = 4;
/// Bytes of table per slot.
pub(crate) const SLOT_BYTES: usize = 16;

/// A fingerprint as the table stores it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Key {
    tag: u64,
    check: u64,
}

impl Key {
    #[inline]
    pub(crate) fn new(fp: Fingerprint) -> Key {
        let lo = fp.lo();
        Key {
            // 0 and 1 are reserved markers.
            tag: if lo < 2 { lo + 2 } else { lo },
            check: fp.hi() & ((1 << CHECK_BITS) - 1),
        }
    }
}

#[repr(C, align(16))]
struct Slot {
    tag: AtomicU64,
    word: AtomicU64,
}

#[repr(C, align(64))]
struct Line([Slot; SLOTS_PER_LINE]);

/// Who may write a table while an insert runs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Writers {
    /// Any thread: claims and revivals are compare-and-swaps.
    Many,
    /// Only the calling thread, and nobody reads (a replay lane that owns
    /// the shard): plain stores, no locked instruction per insert.
    One,
}

/// What [`Table::insert`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Insert {
    /// Took an empty slot: a new key.
    Claimed,
    /// The key was there but dead (expired, or forgotten if `was_forgotten`),
    /// and is live again.
    Revived { was_forgotten: bool },
    /// The key is live.
    Duplicate,
    /// The key is a claim whose work is still running.
    InFlight,
    /// The table is being migrated: retry on its successor.
    Frozen,
    /// No slot may be claimed (probe exhausted, or the shard is at its
    /// memory ceiling).
    Full,
}

/// What [`Table::settle`] did.
#[cfg_attr(not(feature = "guard"), allow(dead_code))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Settle {
    /// The claim was in flight and now holds the new expiry; `waited` if
    /// someone had asked to hear how it ends.
    Settled {
        waited: bool,
    },
    /// The key is not an in-flight claim (it was forgotten meanwhile).
    NotInFlight,
    Frozen,
}

/// What [`Table::freeze`] counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Frozen {
    /// Entries live at the freeze's `now`.
    pub live: usize,
    /// Entries dead by time (forgotten ones not counted).
    pub expired: usize,
    /// The latest real expiry among the live entries (`now` if none).
    pub latest: Stamp,
}

/// What [`Table::forget`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Forget {
    /// Was live until the given expiry.
    Forgotten(Stamp),
    Absent,
    Frozen,
}

pub(crate) struct Table {
    #[cfg(not(seen_loom))]
    lines: Lines,
    #[cfg(seen_loom)]
    lines: Box<[Line]>,
    slots: usize,
    /// Claimed slots before this table asks to be migrated.
    pub(crate) max_occupied: usize,
    /// The shard may not grow past this table: refuse claims when full.
    pub(crate) at_limit: bool,
    /// Claimed slots (live, expired and forgotten).
    pub(crate) occupied: CachePadded<AtomicUsize>,
    /// Slots holding a forgotten key.
    pub(crate) forgotten: AtomicUsize,
}

impl Table {
    /// Have the kernel back the whole table with written pages now, in one
    /// call, when the caller is about to fill it (a replay). Otherwise each
    /// page is first read (a probe maps the shared zero page) and then
    /// written, and that copy-on-write fault flushes the other CPUs' TLBs
    /// (an IPI per 4 KiB page when huge pages are not to be had): a quarter
    /// of a 10M-mark replay. Best effort: without `MADV_POPULATE_WRITE`
    /// (Linux < 5.14) the pages fault in as before.
    pub(crate) fn prefault(&self) {
        #[cfg(all(target_os = "linux", not(seen_loom)))]
        if let Backing::Mapped(..) = self.lines.backing {
            const MADV_POPULATE_WRITE: libc::c_int = 23;
            let bytes = self.lines.len * std::mem::size_of::<Line>();
            #[allow(unsafe_code)]
            // SAFETY: the range is exactly this table's lines, inside its
            // mapping; populating only allocates zeroed pages, which read
            // as the EMPTY slots they already were.
            unsafe {
                libc::madvise(self.lines.ptr.as_ptr().cast(), bytes, MADV_POPULATE_WRITE);
            }
        }
    }

    /// The slots a table asked for `slots` gets: whole cache lines, and
    /// whole 4 KiB pages from [`CUT_MIN`] up (such tables are cut from
    /// shared mappings, see `cut_lines`).
    pub(crate) fn rounded(slots: usize) -> usize {
        let lines = slots.div_ceil(SLOTS_PER_LINE).max(1) * SLOTS_PER_LINE;
        if lines.saturating_mul(SLOT_BYTES) >= CUT_MIN {
            lines.div_ceil(PAGE / SLOT_BYTES) * (PAGE / SLOT_BYTES)
        } else {
            lines
        }
    }

    /// A table of at least `slots` slots (see [`Table::rounded`]).
    pub(crate) fn new(slots: usize, max_load: f64, at_limit: bool) -> Table {
        let lines = Self::rounded(slots) / SLOTS_PER_LINE;
        Self::on(zeroed_lines(lines), slots, max_load, at_limit)
    }

    /// A table over zeroed `lines`, asked for `asked` slots. It asks to be
    /// migrated at `max_load` of what was asked, not of the slots a round-up
    /// added: growth then lands on the next rung of the shard's ladder
    /// (see `Shard::rung`) instead of skipping one.
    fn on(
        #[cfg(not(seen_loom))] lines: Lines,
        #[cfg(seen_loom)] lines: Box<[Line]>,
        asked: usize,
        max_load: f64,
        at_limit: bool,
    ) -> Table {
        let slots = lines.len() * SLOTS_PER_LINE;
        let max_occupied = ((asked.min(slots) as f64 * max_load) as usize).clamp(1, slots - 1);
        Table {
            lines,
            slots,
            max_occupied,
            at_limit,
            occupied: CachePadded::new(AtomicUsize::new(0)),
            forgotten: AtomicUsize::new(0),
        }
    }

    /// Tables of at least `slots[i]` slots each, made together (the shards
    /// of a pre-sized set): in one mapping on huge pages when they add up
    /// to at least one. Each table is then rounded up to whole 4 KiB pages
    /// and still owns, and unmaps, its own range. A shard's table of a
    /// 1M-key set is ~400 KiB: alone it lives on small pages, and a probe
    /// into it pays a page walk (several more misses under virtualisation)
    /// besides its cache miss; together the 64 of them fill whole huge
    /// pages.
    pub(crate) fn group(slots: &[usize], max_load: f64) -> Vec<Table> {
        #[cfg(all(target_os = "linux", not(seen_loom)))]
        {
            let lines: Vec<usize> = slots
                .iter()
                .map(|&s| (Self::rounded(s) * SLOT_BYTES).next_multiple_of(PAGE) / LINE_BYTES)
                .collect();
            if lines.iter().sum::<usize>().saturating_mul(LINE_BYTES) >= HUGE_PAGE {
                if let Some(shared) = shared_lines(&lines) {
                    return shared
                        .into_iter()
                        .zip(slots)
                        .map(|(l, &asked)| Self::on(l, asked, max_load, false))
                        .collect();
                }
            }
        }
        slots
            .iter()
            .map(|&s| Self::new(s, max_load, false))
            .collect()
    }

    pub(crate) fn slots(&self) -> usize {
        self.slots
    }

    pub(crate) fn memory_bytes(&self) -> usize {
        self.lines.len() * std::mem::size_of::<Line>() + std::mem::size_of::<Table>()
    }

    /// Entries that are not forgotten (expired ones count until swept).
    pub(crate) fn len(&self) -> usize {
        self.occupied
            .load(Relaxed)
            .saturating_sub(self.forgotten.load(Relaxed))
    }

    #[inline]
    fn home(&self, tag: u64) -> usize {
        // Lemire's multiply-shift range reduction: any table size, no modulo.
        ((tag as u128 * self.slots as u128) >> 64) as usize
    }

    #[inline]
    fn slot(&self, i: usize) -> &Slot {
        let line = &self.lines[i / SLOTS_PER_LINE];
        &line.0[i % SLOTS_PER_LINE]
    }

    /// Address of the cache line where a probe for `key` starts, for
    /// prefetching, and whether the probe starts in the second half of it
    /// (and so is likely to go on into the next line: at the loads a table
    /// runs at, a miss or a new key scans several slots).
    #[inline]
    pub(crate) fn home_lines(&self, key: Key) -> (*const u8, bool) {
        let home = self.home(key.tag);
        let line: &Line = &self.lines[home / SLOTS_PER_LINE];
        (
            (line as *const Line).cast(),
            home % SLOTS_PER_LINE >= SLOTS_PER_LINE / 2,
        )
    }

    /// Wait out the claim → publish window of another thread.
    #[inline]
    fn published_word(slot: &Slot) -> u64 {
        let mut spins = 0;
        loop {
            let w = slot.word.load(Acquire);
            if w != PENDING {
                return w;
            }
            backoff(&mut spins);
        }
    }

    /// Insert-if-absent. `expiry` must be > `now`.
    #[inline]
    pub(crate) fn insert(&self, key: Key, now: Stamp, expiry: Stamp, writers: Writers) -> Insert {
        let mut i = self.home(key.tag);
        for _ in 0..self.slots {
            let slot = self.slot(i);
            let mut tag = slot.tag.load(Acquire);
            if tag == EMPTY {
                if self.at_limit && self.occupied.load(Relaxed) >= self.max_occupied {
                    return Insert::Full;
                }
                if writers == Writers::One {
                    slot.tag.store(key.tag, Relaxed);
                    slot.word.store(pack(key.check, expiry), Relaxed);
                    return Insert::Claimed;
                }
                match slot.tag.compare_exchange(EMPTY, key.tag, AcqRel, Acquire) {
                    Ok(_) => {
                        slot.word.store(pack(key.check, expiry), Release);
                        return Insert::Claimed;
                    }
                    Err(actual) => tag = actual,
                }
            }
            if tag == FROZEN {
                return Insert::Frozen;
            }
            if tag == key.tag {
                let mut word = Self::published_word(slot);
                while word_check(word) == key.check {
                    let old = word_expiry(word);
                    if old > now {
                        return if in_flight(old) {
                            Insert::InFlight
                        } else {
                            Insert::Duplicate
                        };
                    }
                    if word & MOVED != 0 {
                        return Insert::Frozen;
                    }
                    if writers == Writers::One {
                        slot.word.store(pack(key.check, expiry), Relaxed);
                        return Insert::Revived {
                            was_forgotten: old == Stamp::DEAD,
                        };
                    }
                    match slot
                        .word
                        .compare_exchange(word, pack(key.check, expiry), AcqRel, Acquire)
                    {
                        Ok(_) => {
                            return Insert::Revived {
                                was_forgotten: old == Stamp::DEAD,
                            }
                        }
                        Err(actual) => word = actual,
                    }
                }
            }
            i = self.next(i);
        }
        Insert::Full
    }

    #[cfg(all(test, not(seen_loom)))]
    fn insert_many(&self, key: Key, now: Stamp, expiry: Stamp) -> Insert {
        self.insert(key, now, expiry, Writers::Many)
    }

    #[inline]
    fn next(&self, i: usize) -> usize {
        if i + 1 == self.slots {
            0
        } else {
            i + 1
        }
    }

    /// Is `key` live at `now`? Never waits.
    #[inline]
    pub(crate) fn contains(&self, key: Key, now: Stamp) -> bool {
        let mut i = self.home(key.tag);
        for _ in 0..self.slots {
            let slot = self.slot(i);
            let tag = slot.tag.load(Acquire);
            if tag == EMPTY || tag == FROZEN {
                return false;
            }
            if tag == key.tag {
                let word = slot.word.load(Acquire);
                if word != PENDING && word_check(word) == key.check {
                    return word_expiry(word) > now;
                }
            }
            i = self.next(i);
        }
        false
    }

    /// Probe for `key`: `at` gets each slot holding its tag, with the
    /// slot's published word, and decides (`Some`) or, for another key
    /// that shares the tag, lets the probe go on (`None`).
    #[inline]
    fn probe<R>(
        &self,
        key: Key,
        absent: R,
        frozen: R,
        mut at: impl FnMut(&Slot, u64) -> Option<R>,
    ) -> R {
        let mut i = self.home(key.tag);
        for _ in 0..self.slots {
            let slot = self.slot(i);
            let tag = slot.tag.load(Acquire);
            if tag == EMPTY {
                return absent;
            }
            if tag == FROZEN {
                return frozen;
            }
            if tag == key.tag {
                if let Some(decided) = at(slot, Self::published_word(slot)) {
                    return decided;
                }
            }
            i = self.next(i);
        }
        absent
    }

    /// Mark `key` dead if it is live.
    pub(crate) fn forget(&self, key: Key, now: Stamp) -> Forget {
        self.probe(key, Forget::Absent, Forget::Frozen, |slot, mut word| {
            while word_check(word) == key.check {
                if word_expiry(word) <= now {
                    return Some(Forget::Absent);
                }
                if word & MOVED != 0 {
                    return Some(Forget::Frozen);
                }
                let dead = pack(key.check, Stamp::DEAD);
                match slot.word.compare_exchange(word, dead, AcqRel, Acquire) {
                    Ok(_) => return Some(Forget::Forgotten(word_expiry(word))),
                    Err(actual) => word = actual,
                }
            }
            None
        })
    }

    /// Move an in-flight claim of `key` to `to`: its real expiry, or
    /// [`Stamp::DEAD`] to release it, or [`IN_FLIGHT_WAITED`] to ask to be
    /// told how it ends (which leaves an already waited claim as it is).
    #[cfg_attr(not(feature = "guard"), allow(dead_code))]
    pub(crate) fn settle(&self, key: Key, to: Stamp) -> Settle {
        self.probe(
            key,
            Settle::NotInFlight,
            Settle::Frozen,
            |slot, mut word| {
                while word_check(word) == key.check {
                    let expiry = word_expiry(word);
                    if !in_flight(expiry) {
                        return Some(Settle::NotInFlight);
                    }
                    if word & MOVED != 0 {
                        return Some(Settle::Frozen);
                    }
                    let waited = expiry == IN_FLIGHT_WAITED;
                    if waited && to == IN_FLIGHT_WAITED {
                        return Some(Settle::Settled { waited });
                    }
                    let settled = pack(key.check, to);
                    match slot.word.compare_exchange(word, settled, AcqRel, Acquire) {
                        Ok(_) => return Some(Settle::Settled { waited }),
                        Err(actual) => word = actual,
                    }
                }
                None
            },
        )
    }

    /// Freeze every slot so no writer can change this table again, and
    /// count what it holds at `now`. [`Table::frozen_live`] then hands
    /// out the live entries.
    pub(crate) fn freeze(&self, now: Stamp) -> Frozen {
        let mut frozen = Frozen {
            live: 0,
            expired: 0,
            latest: now,
        };
        for i in 0..self.slots {
            let slot = self.slot(i);
            let tag = match slot.tag.compare_exchange(EMPTY, FROZEN, AcqRel, Acquire) {
                Ok(_) => continue,
                Err(tag) => tag,
            };
            if tag == FROZEN {
                continue;
            }
            // Claimed: wait for its word, then mark it final.
            Self::published_word(slot);
            let expiry = word_expiry(slot.word.fetch_or(MOVED, AcqRel));
            if expiry > now {
                frozen.live += 1;
                if !in_flight(expiry) {
                    frozen.latest = frozen.latest.max(expiry);
                }
            } else if expiry != Stamp::DEAD {
                frozen.expired += 1;
            }
        }
        frozen
    }

    /// Hand each entry live at `now` to `keep`, from a table that
    /// [`Table::freeze`] froze (so nothing in it changes): plain loads, no
    /// read-modify-writes. With the same `now` it yields exactly the
    /// entries the freeze counted as live.
    pub(crate) fn frozen_live(&self, now: Stamp, mut keep: impl FnMut(Key, Stamp)) {
        for i in 0..self.slots {
            let slot = self.slot(i);
            let tag = slot.tag.load(Acquire);
            if tag == EMPTY || tag == FROZEN {
                continue;
            }
            let word = slot.word.load(Acquire);
            debug_assert!(
                word & MOVED != 0,
                "a claimed slot of a frozen table is final"
            );
            let expiry = word_expiry(word);
            if expiry > now {
                let check = word_check(word);
                keep(Key { tag, check }, expiry);
            }
        }
    }

    /// Add an entry to a table nobody else can see yet (migration target):
    /// plain stores, no read-modify-writes. The caller publishes the table
    /// with a release store, which orders these writes before any reader.
    /// Returns false if the table has no free slot.
    pub(crate) fn insert_unshared(&self, key: Key, expiry: Stamp) -> bool {
        let mut i = self.home(key.tag);
        for _ in 0..self.slots {
            let slot = self.slot(i);
            if slot.tag.load(Relaxed) == EMPTY {
                slot.tag.store(key.tag, Relaxed);
                slot.word.store(pack(key.check, expiry), Relaxed);
                let n = self.occupied.load(Relaxed);
                self.occupied.store(n + 1, Relaxed);
                return true;
            }
            i = self.next(i);
        }
        false
    }
}

#[inline]
fn pack(check: u64, expiry: Stamp) -> u64 {
    (check << CHECK_SHIFT) | expiry.0 as u64
}

#[inline]
fn word_check(word: u64) -> u64 {
    word >> CHECK_SHIFT
}

#[inline]
fn word_expiry(word: u64) -> Stamp {
    Stamp((word & EXPIRY_MASK) as u32)
}

/// Tables this large are 2 MiB-aligned and asked to live on huge pages:
/// a random probe then costs one cache miss instead of a miss plus a page
/// walk (which, under virtualisation, is several more misses).
#[cfg(not(seen_loom))]
const HUGE_PAGE: usize = 2 << 20;

/// The small page: the unit a table in a shared mapping is rounded to.
const PAGE: usize = 4 << 10;

/// Tables from this size up to [`CUT_MAX`] are cut, back to back, from
/// shared mappings of [`CHUNK`] bytes on huge pages (`cut_lines`). Alone,
/// a table of a few hundred KiB lives on 4 KiB pages, and one of 2–4 MiB
/// has its tail on them: a probe there pays a page walk (under
/// virtualisation, several more cache misses) besides its own miss.
/// Mapping each table to whole huge pages instead would hold up to 2 MiB
/// of untouched memory per table. (From 256 KiB, rounding a table up to
/// whole 4 KiB pages costs at most 1.6 % of its memory.)
const CUT_MIN: usize = 256 << 10;
#[cfg(not(seen_loom))]
const CUT_MAX: usize = 16 << 20;
#[cfg(not(seen_loom))]
const CHUNK: usize = 64 << 20;

const LINE_BYTES: usize = SLOTS_PER_LINE * SLOT_BYTES;
const _: () = assert!(std::mem::size_of::<Line>() == LINE_BYTES);

/// A table's zero-initialised cache lines, owned.
#[cfg(not(seen_loom))]
struct Lines {
    ptr: std::ptr::NonNull<Line>,
    len: usize,
    backing: Backing,
}

#[cfg(not(seen_loom))]
enum Backing {
    Heap(std::alloc::Layout),
    /// An anonymous mapping (base, length) of the table's own: a 2 MiB-aligned
    /// table (`huge_lines`), or a table's range of a mapping made for
    /// several (`shared_lines`, `cut_lines`).
    #[cfg(target_os = "linux")]
    Mapped(*mut libc::c_void, usize),
}

// SAFETY: `Lines` owns its allocation exclusively, like a Box<[Line]>, and
// `Line` is only atomics, which are Send + Sync.
#[cfg(not(seen_loom))]
#[allow(unsafe_code)]
unsafe impl Send for Lines {}
// SAFETY: as above; shared access only hands out `&Line`.
#[cfg(not(seen_loom))]
#[allow(unsafe_code)]
unsafe impl Sync for Lines {}

#[cfg(all(target_os = "linux", not(seen_loom)))]
impl Lines {
    /// `lines` lines at `ptr`, the start of a mapped range of `bytes` that
    /// is this table's alone (and unmapped when it is dropped).
    fn mapped(ptr: *mut u8, lines: usize, bytes: usize) -> Option<Lines> {
        Some(Lines {
            ptr: std::ptr::NonNull::new(ptr.cast())?,
            len: lines,
            backing: Backing::Mapped(ptr.cast(), bytes),
        })
    }
}

#[cfg(not(seen_loom))]
impl std::ops::Deref for Lines {
    type Target = [Line];
    #[allow(unsafe_code)]
    fn deref(&self) -> &[Line] {
        // SAFETY: `ptr` points to `len` initialised Lines (see zeroed_lines)
        // that live as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

#[cfg(not(seen_loom))]
impl Drop for Lines {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        match self.backing {
            // SAFETY: allocated in zeroed_lines with exactly this layout.
            Backing::Heap(layout) => unsafe {
                std::alloc::dealloc(self.ptr.as_ptr().cast(), layout)
            },
            // SAFETY: exactly the range huge_lines, shared_lines or
            // cut_lines gave this table, which no other table uses; nothing
            // borrows it any more (we are in Drop).
            #[cfg(target_os = "linux")]
            Backing::Mapped(base, len) => unsafe {
                libc::munmap(base, len);
            },
        }
    }
}

#[cfg(not(seen_loom))]
#[allow(unsafe_code)]
fn zeroed_lines(lines: usize) -> Lines {
    use std::alloc::{alloc_zeroed, handle_alloc_error, Layout};
    let bytes = lines
        .checked_mul(std::mem::size_of::<Line>())
        .expect("table size overflows usize");
    #[cfg(target_os = "linux")]
    {
        // `Table::rounded` made a table this large whole pages.
        if (CUT_MIN..=CUT_MAX).contains(&bytes) && bytes % PAGE == 0 {
            if let Some(cut) = cut_lines(lines, bytes) {
                return cut;
            }
        }
        if bytes >= HUGE_PAGE {
            if let Some(mapped) = huge_lines(lines, bytes) {
                return mapped;
            }
        }
    }
    let layout = Layout::array::<Line>(lines).expect("table size overflows usize");
    // SAFETY: `layout` has non-zero size (lines >= 1). A `Line` is only
    // `AtomicU64`s, for which all-zero bytes are a valid value (EMPTY slots),
    // so the zeroed allocation is `lines` initialised `Line`s; `Lines` frees
    // it with the same layout.
    let ptr = unsafe { alloc_zeroed(layout) as *mut Line };
    let Some(ptr) = std::ptr::NonNull::new(ptr) else {
        handle_alloc_error(layout)
    };
    Lines {
        ptr,
        len: lines,
        backing: Backing::Heap(layout),
    }
}

/// A table of its own on huge pages: `bytes` rounded up to whole pages,
/// from a 2 MiB boundary (see `map_aligned`).
#[cfg(all(target_os = "linux", not(seen_loom)))]
fn huge_lines(lines: usize, bytes: usize) -> Option<Lines> {
    let mapped = bytes.checked_next_multiple_of(PAGE)?;
    Lines::mapped(map_aligned(mapped)?, lines, mapped)
}

/// Map exactly `bytes` (whole pages) of fresh zero pages from a 2 MiB
/// boundary, asked to live on huge pages. The slack mapped to align the
/// start is unmapped again, so every byte of the result belongs to whoever
/// it is handed to, and each table unmaps exactly its own range.
#[cfg(all(target_os = "linux", not(seen_loom)))]
#[allow(unsafe_code)]
fn map_aligned(bytes: usize) -> Option<*mut u8> {
    let len = bytes.checked_add(HUGE_PAGE)?;
    // SAFETY: a fresh private anonymous mapping; no existing memory is
    // affected. Anonymous pages read as zero, a valid (EMPTY) `Line`.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return None;
    }
    // Page-aligned `base` and `bytes`, so `offset` and the tail are whole
    // pages.
    let offset = (HUGE_PAGE - (base as usize % HUGE_PAGE)) % HUGE_PAGE;
    let tail = len - offset - bytes;
    // SAFETY: `offset + bytes + tail == len`: the three ranges split the
    // mapping just made, and nothing uses the head or the tail. MADV_HUGEPAGE
    // only changes how the kernel backs the range (if THP is off it fails
    // harmlessly).
    unsafe {
        let start = (base as *mut u8).add(offset);
        if offset > 0 {
            libc::munmap(base, offset);
        }
        if tail > 0 {
            libc::munmap(start.add(bytes).cast(), tail);
        }
        libc::madvise(start.cast(), bytes, libc::MADV_HUGEPAGE);
        Some(start)
    }
}

/// Fresh zero pages for tables of `lines[i]` lines each (whole pages
/// apiece), back to back in one mapping on huge pages (see
/// `Table::group`).
#[cfg(all(target_os = "linux", not(seen_loom)))]
#[allow(unsafe_code)]
fn shared_lines(lines: &[usize]) -> Option<Vec<Lines>> {
    let bytes = lines.iter().try_fold(0usize, |sum, &l| {
        sum.checked_add(l.checked_mul(LINE_BYTES)?)
    })?;
    let start = map_aligned(bytes)?;
    let mut at = 0;
    let mut tables = Vec::with_capacity(lines.len());
    for &len in lines {
        // SAFETY: `at + len * LINE_BYTES <= bytes`: inside the mapping, a
        // range no other table is given.
        let ptr = unsafe { start.add(at) };
        tables.push(Lines::mapped(ptr, len, len * LINE_BYTES)?);
        at += len * LINE_BYTES;
    }
    Some(tables)
}

/// Where the next table is cut from: the unused rest of the latest chunk
/// (address, end).
#[cfg(all(target_os = "linux", not(seen_loom)))]
static FRONTIER: parking_lot::Mutex<(usize, usize)> = parking_lot::const_mutex((0, 0));

/// A table of `lines` lines (`bytes`, whole pages) cut from the latest
/// chunk, a fresh one when it has no room left. Tables are only made when
/// a shard grows or is swept, so one lock for all is no contention. Every
/// byte of a chunk ends up unmapped: a table's range when it is dropped,
/// the rest of a chunk when the next one replaces it. At most the huge
/// page at the frontier is resident and not yet any table's.
#[cfg(all(target_os = "linux", not(seen_loom)))]
#[allow(unsafe_code)]
fn cut_lines(lines: usize, bytes: usize) -> Option<Lines> {
    let mut frontier = FRONTIER.lock();
    let (mut next, mut end) = *frontier;
    if end - next < bytes {
        let start = map_aligned(CHUNK)? as usize;
        if end > next {
            // SAFETY: the old chunk's rest, which no table was given and
            // none will be (the frontier moves to the new chunk below).
            unsafe { libc::munmap(next as *mut libc::c_void, end - next) };
        }
        (next, end) = (start, start + CHUNK);
    }
    *frontier = (next + bytes, end);
    drop(frontier);
    Lines::mapped(next as *mut u8, lines, bytes)
}

#[cfg(seen_loom)]
fn zeroed_lines(lines: usize) -> Box<[Line]> {
    (0..lines)
        .map(|_| {
            Line(std::array::from_fn(|_| Slot {
                tag: AtomicU64::new(EMPTY),
                word: AtomicU64::new(PENDING),
            }))
        })
        .collect()
}

#[cfg(all(test, not(seen_loom)))]
mod tests {
    use super::*;

    fn key(n: u128) -> Key {
        Key::new(Fingerprint(
            n.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835),
        ))
    }

    #[test]
    fn insert_then_duplicate_then_expire_then_revive() {
        let t = Table::new(64, 0.8, false);
        let k = key(1);
        assert_eq!(t.insert_many(k, Stamp(10), Stamp(20)), Insert::Claimed);
        assert_eq!(t.insert_many(k, Stamp(10), Stamp(20)), Insert::Duplicate);
        assert!(t.contains(k, Stamp(19)));
        assert!(!t.contains(k, Stamp(20)));
        assert_eq!(
            t.insert_many(k, Stamp(20), Stamp(30)),
            Insert::Revived {
                was_forgotten: false
            }
        );
        assert!(t.contains(k, Stamp(29)));
    }

    #[test]
    fn one_writer_decides_like_many() {
        // The replay's plain-store insert against the CAS insert, over the
        // same mix of new, duplicate, expired, forgotten and revived keys,
        // until the table is full.
        let (many, one) = (Table::new(256, 0.8, true), Table::new(256, 0.8, true));
        let mut x = 0x2545_f491_4f6c_dd1d_u64;
        for step in 0..2000u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let k = key((x % 300) as u128);
            let now = Stamp(10 + step / 50);
            if x % 11 == 0 {
                assert_eq!(many.forget(k, now), one.forget(k, now), "step {step}");
                continue;
            }
            let expiry = Stamp(now.0 + 1 + (x % 7) as u32);
            assert_eq!(
                many.insert(k, now, expiry, Writers::Many),
                one.insert(k, now, expiry, Writers::One),
                "step {step}"
            );
            assert_eq!(many.contains(k, now), one.contains(k, now));
        }
    }

    #[test]
    fn forget_then_revive() {
        let t = Table::new(64, 0.8, false);
        let k = key(7);
        assert_eq!(t.forget(k, Stamp(10)), Forget::Absent);
        t.insert_many(k, Stamp(10), Stamp(20));
        assert_eq!(t.forget(k, Stamp(10)), Forget::Forgotten(Stamp(20)));
        assert_eq!(t.forget(k, Stamp(10)), Forget::Absent);
        assert!(!t.contains(k, Stamp(10)));
        assert_eq!(
            t.insert_many(k, Stamp(10), Stamp(20)),
            Insert::Revived {
                was_forgotten: true
            }
        );
    }

    #[test]
    fn same_tag_different_check_are_different_keys() {
        let t = Table::new(64, 0.8, false);
        let a = Key { tag: 99, check: 1 };
        let b = Key { tag: 99, check: 2 };
        assert_eq!(t.insert_many(a, Stamp(5), Stamp(9)), Insert::Claimed);
        assert!(!t.contains(b, Stamp(5)));
        assert_eq!(t.insert_many(b, Stamp(5), Stamp(9)), Insert::Claimed);
        assert!(t.contains(a, Stamp(5)) && t.contains(b, Stamp(5)));
    }

    #[test]
    fn a_slot_checks_34_bits_of_the_high_word() {
        // Fingerprints equal in the low 64 bits and in the high word's low
        // 33 bits: only the 34th check bit tells them apart.
        let t = Table::new(64, 0.8, false);
        let a = Key::new(Fingerprint(99 | 5 << 64));
        let b = Key::new(Fingerprint(99 | (5 | 1 << 33) << 64));
        assert_eq!(t.insert_many(a, Stamp(5), Stamp::MAX), Insert::Claimed);
        assert!(!t.contains(b, Stamp(5)));
        assert_eq!(t.insert_many(b, Stamp(5), Stamp::MAX), Insert::Claimed);
        assert!(t.contains(a, Stamp(5)) && t.contains(b, Stamp(5)));
        // The largest stamp leaves the check intact.
        assert_eq!(t.forget(b, Stamp(6)), Forget::Forgotten(Stamp::MAX));
        assert!(t.contains(a, Stamp(6)) && !t.contains(b, Stamp(6)));
    }

    #[test]
    fn stamps_map_ticks_both_ways_and_clamp_outside_their_range() {
        let now = Tick(200_000_000); // 2026
        let stamps = Stamps::starting_at(now);
        for t in [now, Tick(now.0 + 3600), Tick(now.0 - 86_400 * 365)] {
            assert_eq!(stamps.tick(stamps.stamp(t)), t);
        }
        // Reserved and in-flight ticks keep their meaning.
        for t in [
            Tick(0),
            Tick::DEAD,
            Tick(Tick::MAX.0 + 1),
            Tick(Tick::MAX.0 + 2),
        ] {
            assert_eq!(stamps.tick(stamps.stamp(t)), t);
        }
        assert_eq!(stamps.stamp(Tick(Tick::MAX.0 + 1)), IN_FLIGHT);
        assert_eq!(stamps.stamp(Tick(Tick::MAX.0 + 2)), IN_FLIGHT_WAITED);
        // Beyond the range: the latest stamp (read back as the latest
        // tick), and the earliest live one.
        assert_eq!(stamps.stamp(Tick::MAX), Stamp::MAX);
        let far = Tick(now.0 + 20 * 365 * 86_400);
        assert_eq!(stamps.tick(stamps.stamp(far)), Tick::MAX);
        assert_eq!(stamps.stamp(Tick::MIN_LIVE), Stamp::MIN_LIVE);
        // Order is kept, so "expiry > now" reads the same on stamps.
        let (a, b) = (Tick(now.0 + 10), Tick(now.0 + 11));
        assert!(stamps.stamp(a) < stamps.stamp(b));
        // Near the 2020 epoch the base is 0 and stamps are ticks.
        assert_eq!(Stamps::starting_at(Tick(100)).stamp(Tick(150)), Stamp(150));
    }

    #[test]
    fn reserved_tags_are_remapped() {
        assert_eq!(Key::new(Fingerprint(0)).tag, 2);
        assert_eq!(Key::new(Fingerprint(1)).tag, 3);
    }

    #[test]
    fn full_table_reports_full_not_new() {
        let t = Table::new(4, 1.0, false);
        for n in 0..4 {
            assert_eq!(t.insert_many(key(n), Stamp(5), Stamp(9)), Insert::Claimed);
        }
        assert_eq!(t.insert_many(key(100), Stamp(5), Stamp(9)), Insert::Full);
        assert_eq!(t.insert_many(key(2), Stamp(5), Stamp(9)), Insert::Duplicate);
    }

    #[test]
    fn freeze_drains_live_and_blocks_writers() {
        let t = Table::new(64, 0.8, false);
        for n in 0..10 {
            t.insert_many(key(n), Stamp(5), Stamp(if n < 4 { 6 } else { 50 }));
        }
        t.forget(key(9), Stamp(5));
        let frozen = t.freeze(Stamp(10));
        let mut kept = Vec::new();
        t.frozen_live(Stamp(10), |k, e| kept.push((k, e)));
        assert_eq!((frozen.live, kept.len()), (5, 5));
        assert_eq!(frozen.expired, 4);
        assert_eq!(frozen.latest, Stamp(50));
        assert_eq!(
            t.insert_many(key(1000), Stamp(10), Stamp(50)),
            Insert::Frozen
        );
        // An expired key cannot be revived in a frozen table either.
        assert_eq!(t.insert_many(key(0), Stamp(10), Stamp(50)), Insert::Frozen);
        // Live keys still answer.
        assert_eq!(
            t.insert_many(key(5), Stamp(10), Stamp(50)),
            Insert::Duplicate
        );
        assert!(t.contains(key(5), Stamp(10)));
        assert_eq!(t.forget(key(5), Stamp(10)), Forget::Frozen);
    }

    /// Give each table its own keys, drop the tables at `gone`, and check
    /// that the others still hold theirs: a table's memory is its own even
    /// when it shares a mapping (and its huge pages) with its neighbours.
    fn fill_drop_and_check(tables: &mut [Option<Table>], gone: &[usize]) {
        let keys = |i: usize| (0..1000).map(move |n| key((i as u128) << 64 | n));
        for (i, table) in tables.iter().enumerate() {
            let table = table.as_ref().expect("all tables present at first");
            for k in keys(i) {
                assert_eq!(table.insert_many(k, Stamp(1), Stamp(9)), Insert::Claimed);
            }
        }
        for &i in gone {
            tables[i] = None;
        }
        for (i, table) in tables.iter().enumerate() {
            let Some(table) = table else { continue };
            for k in keys(i) {
                assert_eq!(table.insert_many(k, Stamp(1), Stamp(9)), Insert::Duplicate);
            }
        }
    }

    #[test]
    fn mid_sized_tables_are_cut_from_shared_chunks_and_each_frees_its_own() {
        // Whole pages from CUT_MIN up; whole lines below.
        assert_eq!(
            Table::rounded(CUT_MIN / SLOT_BYTES + 1) * SLOT_BYTES % PAGE,
            0
        );
        assert_eq!(Table::rounded(5), 8);
        let mut tables: Vec<Option<Table>> = (0..6)
            .map(|i| Some(Table::new(30_000 + i * 1000, 0.8, false)))
            .collect();
        let range = |t: &Table| {
            let start = t.lines.as_ptr() as usize;
            (start, start + t.lines.len() * LINE_BYTES)
        };
        #[cfg(target_os = "linux")]
        for t in tables.iter().flatten() {
            assert!(matches!(t.lines.backing, Backing::Mapped(..)));
            let (start, end) = range(t);
            assert_eq!((start % PAGE, end % PAGE), (0, 0), "whole pages");
        }
        let mut ranges: Vec<(usize, usize)> = tables.iter().flatten().map(range).collect();
        ranges.sort();
        for pair in ranges.windows(2) {
            assert!(pair[0].1 <= pair[1].0, "disjoint");
        }
        fill_drop_and_check(&mut tables, &[1, 4]);
    }

    #[test]
    fn a_large_table_gets_a_huge_page_aligned_mapping_of_its_own() {
        let slots = CUT_MAX / SLOT_BYTES + 1000;
        let t = Table::new(slots, 0.8, false);
        assert!(t.slots() >= slots);
        #[cfg(target_os = "linux")]
        {
            assert_eq!(t.lines.as_ptr() as usize % HUGE_PAGE, 0);
            let Backing::Mapped(base, len) = t.lines.backing else {
                panic!("a table this large is mapped");
            };
            assert_eq!(base as usize, t.lines.as_ptr() as usize, "no slack kept");
            assert_eq!(len, t.lines.len() * LINE_BYTES);
        }
        for n in 0..1000 {
            assert_eq!(t.insert_many(key(n), Stamp(1), Stamp(9)), Insert::Claimed);
        }
        assert!(t.contains(key(999), Stamp(2)));
    }

    #[test]
    fn tables_made_together_share_one_mapping_and_each_frees_its_own() {
        // 8 tables of ~470 KiB: too small for a huge page each, 3.7 MiB
        // together.
        let asked = [
            30_000, 30_001, 29_999, 30_000, 30_000, 30_000, 30_000, 30_000,
        ];
        let mut tables: Vec<Option<Table>> =
            Table::group(&asked, 0.8).into_iter().map(Some).collect();
        let start = |t: &Table| t.lines.as_ptr() as usize;
        let end = |t: &Table| start(t) + t.lines.len() * LINE_BYTES;
        let t: Vec<&Table> = tables.iter().flatten().collect();
        #[cfg(target_os = "linux")]
        {
            assert_eq!(
                start(t[0]) % HUGE_PAGE,
                0,
                "the group starts on a huge page"
            );
            for pair in t.windows(2) {
                assert_eq!(end(pair[0]), start(pair[1]), "back to back");
            }
        }
        for (table, &slots) in t.iter().zip(&asked) {
            assert!(table.slots() >= slots);
            assert_eq!((table.slots() * SLOT_BYTES) % PAGE, 0, "whole pages each");
        }
        // Every table works on its own, and keeps working when its
        // neighbours (and the huge pages it shared with them) are gone.
        fill_drop_and_check(&mut tables, &[0, 2, 3, 7]);
        // Too small together for a huge page: ordinary tables.
        let small = Table::group(&[100, 200], 0.8);
        assert_eq!(
            small.iter().map(Table::slots).collect::<Vec<_>>(),
            vec![100, 200]
        );
    }
}
