//! The write-ahead log: preallocated, mmap'd, segmented, append-only.
//!
//! * `format`   — constants and the byte codec (no I/O)
//! * `storage`  — the I/O seam: real mapped files, or a simulated disk in tests
//! * `reader`   — scanning a segment: records, the valid end, damage
//! * `recovery` — what happens on open
//!
//! # Appending without a global lock
//!
//! A writer reserves its bytes with one `fetch_add` on the active segment's
//! cursor, copies the record in, then *publishes* it: it waits until every
//! earlier reservation is published (a few nanoseconds of another writer's
//! memcpy) and moves `published` past itself. So `published` is always the
//! end of a contiguous, fully written prefix, and a sync of
//! `synced..published` makes exactly those records durable. Syncs are group
//! commits: one caller runs the msync while the others wait for it, and every
//! record published before it started is covered.
//!
//! The writer whose reservation crosses the end of the segment seals it
//! (waits for the prefix, syncs it whole) and creates the next one; writers
//! past it wait for the new segment. Sealed segments are therefore always
//! fully durable, and only the last segment can have a torn tail.

pub mod format;
pub mod inspect;
pub mod reader;
pub(crate) mod recovery;
#[cfg(any(test, fuzzing))]
pub(crate) mod sim;
pub(crate) mod storage;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_epoch::{Atomic, Guard, Owned};
use parking_lot::{Condvar, Mutex};

use crate::sync::backoff;
use crate::{Error, Result};
use format::{encode_record, record_seed, Record, SegmentHeader, FORMAT_VERSION, MARK_RECORD_LEN};
use storage::{SegmentFile, Storage};

/// The public error for bytes of `file` that did not decode as a header.
pub(crate) fn header_error(file: std::path::PathBuf, e: format::DecodeError) -> Error {
    match e {
        format::DecodeError::UnsupportedVersion(version) => {
            Error::UnsupportedVersion { file, version }
        }
        e => Error::Corruption {
            file,
            offset: 0,
            reason: e.to_string(),
        },
    }
}

/// When an acknowledged mark is on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Durability {
    /// The record is in the page cache when the call returns: it survives
    /// the process being killed, not the machine losing power.
    None,
    /// A background thread makes everything durable every `interval`: a
    /// power loss loses at most about one interval of acknowledged marks.
    Periodic(Duration),
    /// The call returns only after its record is on disk (msync). Concurrent
    /// callers share one sync (group commit).
    #[default]
    Sync,
}

/// What to do with damage found when the log is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RecoveryMode {
    /// Damage at the end of the last segment is a torn write from a crash:
    /// cut it (zero it and sync), report it, continue. Damage anywhere else
    /// is [`Error::Corruption`]. The default.
    #[default]
    TolerateTornTail,
    /// Any damage, even a torn tail, is [`Error::Corruption`].
    AbsoluteConsistency,
    /// Skip damaged bytes anywhere, keep every record that still validates,
    /// and report what was skipped. Unreadable segments are skipped whole.
    Salvage,
}

/// A point in the log: (segment sequence, byte offset), packed so it can be
/// compared with one atomic load.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Position(u64);

impl Position {
    fn new(seq: u64, offset: usize) -> Position {
        Position(seq << 32 | offset as u64)
    }
}

/// Largest segment the 32-bit offset of a [`Position`] can address.
pub const MAX_SEGMENT_SIZE: usize = u32::MAX as usize;
/// Smallest useful segment: a header and a few records.
pub const MIN_SEGMENT_SIZE: usize = 4096;
/// Default segment size: 64 MiB, about 2M marks.
pub const DEFAULT_SEGMENT_SIZE: usize = 64 << 20;

pub(crate) struct Segment {
    seq: u64,
    name: String,
    file: Box<dyn SegmentFile>,
    seed: u32,
    capacity: usize,
    cursor: AtomicU64,
    published: AtomicU64,
    synced: AtomicU64,
    max_expiry: AtomicU64,
}

impl Segment {
    pub(crate) fn new(
        seq: u64,
        file: Box<dyn SegmentFile>,
        store_id: u128,
        end: usize,
        max_expiry: u64,
    ) -> Segment {
        let capacity = file.len();
        Segment {
            seq,
            name: format::segment_file_name(seq),
            file,
            seed: record_seed(store_id, seq),
            capacity,
            cursor: AtomicU64::new(end as u64),
            published: AtomicU64::new(end as u64),
            synced: AtomicU64::new(end as u64),
            max_expiry: AtomicU64::new(max_expiry),
        }
    }
}

/// A sealed segment: fully durable, kept until all its records expire.
#[derive(Clone, Debug)]
pub(crate) struct Sealed {
    pub name: String,
    pub bytes: u64,
    pub max_expiry: u64,
}

struct SyncState {
    syncing: bool,
    poisoned: Option<String>,
}

pub(crate) struct Wal {
    storage: Arc<dyn Storage>,
    store_id: u128,
    segment_size: usize,
    active: Atomic<Segment>,
    rotation: Mutex<()>,
    sealed: Mutex<Vec<Sealed>>,
    /// Everything before this position is on disk.
    durable: AtomicU64,
    sync_state: Mutex<SyncState>,
    synced_cv: Condvar,
    poisoned: AtomicBool,
    sync_seconds: std::sync::OnceLock<prometheus_client::metrics::histogram::Histogram>,
    /// Tests simulating power loss drop the log without its final sync.
    pub(crate) skip_final_sync: AtomicBool,
}

impl Wal {
    pub(crate) fn new(
        storage: Arc<dyn Storage>,
        store_id: u128,
        segment_size: usize,
        active: Segment,
        sealed: Vec<Sealed>,
    ) -> Wal {
        let durable = Position::new(active.seq, active.published.load(Relaxed) as usize);
        Wal {
            storage,
            store_id,
            segment_size,
            active: Atomic::new(active),
            rotation: Mutex::new(()),
            sealed: Mutex::new(sealed),
            durable: AtomicU64::new(durable.0),
            sync_state: Mutex::new(SyncState {
                syncing: false,
                poisoned: None,
            }),
            synced_cv: Condvar::new(),
            poisoned: AtomicBool::new(false),
            skip_final_sync: AtomicBool::new(false),
            sync_seconds: std::sync::OnceLock::new(),
        }
    }

    fn active<'g>(&self, guard: &'g Guard) -> &'g Segment {
        // SAFETY: `active` always holds a valid segment (set in `new`, only
        // replaced in `rotate`, which retires the old one with
        // `defer_destroy`); `guard` keeps it alive while borrowed.
        #[allow(unsafe_code)]
        unsafe {
            self.active.load(Acquire, guard).deref()
        }
    }

    fn check_poison(&self) -> Result<()> {
        if self.poisoned.load(Acquire) {
            let reason = self.sync_state.lock().poisoned.clone().unwrap_or_default();
            return Err(Error::Poisoned { reason });
        }
        Ok(())
    }

    fn poison(&self, what: &str, e: &std::io::Error) -> Error {
        let reason = format!("{what}: {e}");
        tracing::error!(%reason, "seen: log poisoned; all further marks fail until reopened");
        let mut st = self.sync_state.lock();
        if st.poisoned.is_none() {
            st.poisoned = Some(reason.clone());
        }
        self.poisoned.store(true, Release);
        self.synced_cv.notify_all();
        Error::Poisoned { reason }
    }

    /// Append one record; returns the position just past it.
    pub(crate) fn append(&self, record: &Record, guard: &Guard) -> Result<Position> {
        self.append_all(std::slice::from_ref(record), guard)
    }

    /// Append one record of `len` bytes, produced by `encode(seed)` once
    /// the segment (and so its seed) is known.
    pub(crate) fn append_encoded(
        &self,
        len: usize,
        expiry: u64,
        encode: impl Fn(u32) -> Vec<u8>,
        guard: &Guard,
    ) -> Result<Position> {
        if len + format::SEGMENT_HEADER_LEN > self.segment_size {
            return Err(Error::Config(format!(
                "a {len}-byte record does not fit in {}-byte segments",
                self.segment_size
            )));
        }
        self.append_with(len, expiry, guard, |seg, off| {
            seg.file.write_at(off, &encode(seg.seed));
        })
    }

    /// Append records with one reservation (so writers on other threads
    /// contend once per call, not once per record); returns the position
    /// just past the last. `records` must fit in a segment.
    pub(crate) fn append_all(&self, records: &[Record], guard: &Guard) -> Result<Position> {
        let len = records.len() * MARK_RECORD_LEN;
        debug_assert!(len + format::SEGMENT_HEADER_LEN <= self.segment_size);
        let max_expiry = records
            .iter()
            .map(Record::expiry_unix_secs)
            .max()
            .unwrap_or(0);
        self.append_with(len, max_expiry, guard, |seg, off| {
            for (i, record) in records.iter().enumerate() {
                let at = off + i * MARK_RECORD_LEN;
                seg.file.write_at(at, &encode_record(seg.seed, record));
            }
        })
    }

    /// Reserve `len` bytes in the active segment, `write` them, publish in
    /// reservation order. Rolls the segment over when it is full.
    fn append_with(
        &self,
        len: usize,
        max_expiry: u64,
        guard: &Guard,
        write: impl Fn(&Segment, usize),
    ) -> Result<Position> {
        self.check_poison()?;
        let len = len as u64;
        loop {
            let seg = self.active(guard);
            let off = seg.cursor.fetch_add(len, AcqRel);
            let end = off + len;
            if end <= seg.capacity as u64 {
                write(seg, off as usize);
                if max_expiry > seg.max_expiry.load(Relaxed) {
                    seg.max_expiry.fetch_max(max_expiry, Relaxed);
                }
                let mut spins = 0;
                while seg.published.load(Acquire) != off {
                    backoff(&mut spins);
                }
                seg.published.store(end, Release);
                return Ok(Position::new(seg.seq, end as usize));
            }
            if off <= seg.capacity as u64 {
                // Ours is the reservation that crossed the end: seal and roll.
                self.rotate(seg, off as usize, guard)?;
            } else {
                // Someone else is rolling this segment over: wait for it.
                drop(self.rotation.lock());
                self.check_poison()?;
                if std::ptr::eq(self.active(guard), seg) {
                    std::thread::yield_now();
                }
            }
        }
    }

    #[cold]
    fn rotate(&self, seg: &Segment, end: usize, guard: &Guard) -> Result<()> {
        let _rolling = self.rotation.lock();
        let mut spins = 0;
        while seg.published.load(Acquire) != end as u64 {
            backoff(&mut spins);
        }
        // Seal: the whole segment becomes durable before the next exists, so
        // only the last segment can ever hold a torn write.
        let synced = seg.synced.load(Acquire) as usize;
        if end > synced {
            if let Err(e) = seg.file.sync(synced, end - synced) {
                return Err(self.poison("syncing a sealed segment", &e));
            }
        }
        let next = match self.create_segment(seg.seq + 1) {
            Ok(s) => s,
            Err(e) => return Err(self.poison("creating the next segment", &e)),
        };
        self.sealed.lock().push(Sealed {
            name: seg.name.clone(),
            bytes: end as u64,
            max_expiry: seg.max_expiry.load(Relaxed),
        });
        tracing::debug!(
            sealed = seg.seq,
            next = next.seq,
            "seen: log segment rolled over"
        );
        let next_start = Position::new(next.seq, next.published.load(Relaxed) as usize);
        let old = self.active.swap(Owned::new(next), AcqRel, guard);
        self.durable.fetch_max(next_start.0, AcqRel);
        // SAFETY: `old` is no longer reachable from `active`; readers that
        // loaded it are pinned, so destruction waits for them.
        #[allow(unsafe_code)]
        unsafe {
            guard.defer_destroy(old)
        };
        Ok(())
    }

    pub(crate) fn create_segment(&self, seq: u64) -> std::io::Result<Segment> {
        create_segment(&*self.storage, self.store_id, self.segment_size, seq)
    }

    /// Observe sync durations into `h`.
    pub(crate) fn set_sync_histogram(&self, h: prometheus_client::metrics::histogram::Histogram) {
        let _ = self.sync_seconds.set(h);
    }

    /// The position just past every record published so far.
    pub(crate) fn published(&self, guard: &Guard) -> Position {
        let seg = self.active(guard);
        Position::new(seg.seq, seg.published.load(Acquire) as usize)
    }

    /// Return once everything before `target` is durable, running the sync
    /// (for everyone waiting) if nobody else is.
    pub(crate) fn wait_durable(&self, target: Position) -> Result<()> {
        if self.durable.load(Acquire) >= target.0 {
            return Ok(());
        }
        let mut st = self.sync_state.lock();
        loop {
            if let Some(reason) = &st.poisoned {
                return Err(Error::Poisoned {
                    reason: reason.clone(),
                });
            }
            if self.durable.load(Acquire) >= target.0 {
                return Ok(());
            }
            if st.syncing {
                self.synced_cv.wait(&mut st);
                continue;
            }
            st.syncing = true;
            drop(st);
            let started = std::time::Instant::now();
            let result = self.sync_published();
            if let Some(h) = self.sync_seconds.get() {
                h.observe(started.elapsed().as_secs_f64());
            }
            st = self.sync_state.lock();
            st.syncing = false;
            match result {
                Ok(pos) => {
                    self.durable.fetch_max(pos.0, AcqRel);
                    self.synced_cv.notify_all();
                }
                Err(e) => {
                    drop(st);
                    return Err(self.poison("syncing the log", &e));
                }
            }
        }
    }

    /// Make everything published so far durable.
    pub(crate) fn sync(&self) -> Result<()> {
        self.check_poison()?;
        let target = self.published(&crossbeam_epoch::pin());
        self.wait_durable(target)
    }

    fn sync_published(&self) -> std::io::Result<Position> {
        let guard = &crossbeam_epoch::pin();
        let seg = self.active(guard);
        let upto = seg.published.load(Acquire) as usize;
        let from = seg.synced.load(Acquire) as usize;
        if upto > from {
            seg.file.sync(from, upto - from)?;
            seg.synced.fetch_max(upto as u64, AcqRel);
        }
        Ok(Position::new(seg.seq, upto))
    }

    /// Bytes published but not yet durable: the durability lag.
    pub(crate) fn unsynced_bytes(&self) -> u64 {
        let guard = &crossbeam_epoch::pin();
        let seg = self.active(guard);
        seg.published
            .load(Acquire)
            .saturating_sub(seg.synced.load(Acquire))
    }

    /// Delete sealed segments whose records have all expired.
    pub(crate) fn delete_expired(&self, now_unix: u64) -> usize {
        let mut sealed = self.sealed.lock();
        let mut deleted = 0;
        sealed.retain(|s| {
            if s.max_expiry <= now_unix && self.storage.remove(&s.name).is_ok() {
                tracing::debug!(segment = %s.name, "seen: deleted an expired log segment");
                deleted += 1;
                false
            } else {
                true
            }
        });
        deleted
    }

    /// (segment files, log bytes used in total).
    pub(crate) fn layout(&self) -> (usize, u64) {
        let guard = &crossbeam_epoch::pin();
        let seg = self.active(guard);
        let sealed = self.sealed.lock();
        let bytes = sealed.iter().map(|s| s.bytes).sum::<u64>() + seg.published.load(Acquire);
        (sealed.len() + 1, bytes)
    }
}

/// Create segment `seq`, durably, and open it for appending.
pub(crate) fn create_segment(
    storage: &dyn Storage,
    store_id: u128,
    segment_size: usize,
    seq: u64,
) -> std::io::Result<Segment> {
    let header = SegmentHeader {
        version: FORMAT_VERSION,
        seq,
        store_id,
        size: segment_size as u64,
        created_unix_secs: crate::ttl::clock::Clock::now_unix_secs(&crate::SystemClock),
    }
    .encode();
    let file = storage.create_segment(&format::segment_file_name(seq), segment_size, &header)?;
    Ok(Segment::new(seq, file, store_id, header.len(), 0))
}

impl Drop for Wal {
    fn drop(&mut self) {
        // Best effort: a clean shutdown leaves nothing unsynced.
        if !self.poisoned.load(Acquire) && !self.skip_final_sync.load(Acquire) {
            let _ = self.sync_published();
        }
        // SAFETY: `&mut self`: no other thread can reach the active segment.
        #[allow(unsafe_code)]
        unsafe {
            let guard = crossbeam_epoch::unprotected();
            let ptr = self
                .active
                .swap(crossbeam_epoch::Shared::null(), Relaxed, guard);
            if !ptr.is_null() {
                drop(ptr.into_owned());
            }
        }
    }
}
