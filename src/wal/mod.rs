//! The write-ahead log: preallocated, mmap'd, segmented, append-only.
//!
//! The rest of the crate sees one narrow surface, [`Wal`]: open a state
//! directory (lock, recover, replay into a [`Replay`] sink), append marks
//! and forgets, wait for durability, read the recovery point, purge
//! expired segments, look a fingerprint up for audit. Everything about
//! bytes stays in here:
//!
//! * `format`   — constants and the byte codec (no I/O)
//! * `storage`  — the I/O seam: real mapped files, or a simulated disk in tests
//! * `reader`   — scanning a segment: records, the valid end, damage
//! * `recovery` — what happens on open, in named steps
//! * `inspect`  — read-only examination (`seen inspect` / `verify`)
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

#[cfg(feature = "postgres")]
pub(crate) mod changes;
pub(crate) mod format;
pub mod inspect;
pub(crate) mod reader;
mod recovery;
#[cfg(any(test, fuzzing))]
pub(crate) mod sim;
pub(crate) mod storage;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::Arc;

use crossbeam_epoch::{Atomic, Guard, Owned};
use parking_lot::{Condvar, Mutex};

use crate::error::{Error, Result};
use crate::fingerprint::Fingerprint;
use crate::fingerprint::Secret;
use crate::stats::Histogram;
use crate::sync::backoff;
use format::{encode_record, record_seed, Record, SegmentHeader, FORMAT_VERSION, MARK_RECORD_LEN};
pub use recovery::RecoveryReport;
pub(crate) use recovery::{LaneKey, Replay, WalOptions};
pub(crate) use storage::WriteMode;
use storage::{DirLock, DirStorage, SegmentFile, Storage};

/// Whether `dir` holds a store (its header file exists).
#[cfg(feature = "postgres")]
pub(crate) fn has_store(dir: &Path) -> bool {
    dir.join(format::STORE_FILE).exists()
}

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

impl From<Position> for u64 {
    fn from(p: Position) -> u64 {
        p.0
    }
}

impl Position {
    fn new(seq: u64, offset: usize) -> Position {
        Position(seq << 32 | offset as u64)
    }

    /// A position stored earlier as a number (see `LogPosition::as_u64`).
    #[cfg(feature = "postgres")]
    pub(crate) fn from_u64(p: u64) -> Position {
        Position(p)
    }

    /// (segment sequence, byte offset).
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    fn split(self) -> (u64, usize) {
        (self.0 >> 32, (self.0 & u32::MAX as u64) as usize)
    }
}

/// Largest segment the 32-bit offset of a [`Position`] can address.
pub const MAX_SEGMENT_SIZE: usize = u32::MAX as usize;
/// Smallest useful segment: a header and a few records.
pub const MIN_SEGMENT_SIZE: usize = 4096;
/// Size of a new store's first segment (or the segment size, if smaller);
/// each next segment doubles, up to the segment size.
pub const FIRST_SEGMENT_SIZE: usize = 1 << 20;
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
    /// The segment after this one is being prepared (see `prepare_next`).
    next_requested: AtomicBool,
    /// Where the bytes handed to the kernel's writeback end (see
    /// `Wal::write_back`).
    written_back: AtomicU64,
    /// Log2 of the pieces handed to writeback: about a sixteenth of the
    /// segment, at least 64 KiB (a shift, so the check on every append
    /// costs no division).
    writeback_shift: u32,
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
            next_requested: AtomicBool::new(false),
            written_back: AtomicU64::new(end as u64),
            writeback_shift: (capacity as u64 / 16).max(WRITEBACK_CHUNK_MIN).ilog2(),
        }
    }
}

/// The smallest piece of a segment handed to the kernel's writeback.
const WRITEBACK_CHUNK_MIN: u64 = 64 * 1024;

/// A sealed segment: fully durable, kept until all its records expire.
#[derive(Clone, Debug)]
pub(crate) struct Sealed {
    pub name: String,
    pub bytes: u64,
    pub max_expiry: u64,
}

/// A segment file being made ahead of the rollover that needs it.
struct NextSegment {
    seq: u64,
    size: usize,
    ready: std::thread::JoinHandle<std::io::Result<()>>,
}

struct SyncState {
    syncing: bool,
    poisoned: Option<String>,
}

pub(crate) struct Wal {
    storage: Arc<dyn Storage>,
    store_id: u128,
    segment_size: usize,
    write_mode: WriteMode,
    active: Atomic<Segment>,
    rotation: Mutex<()>,
    sealed: Mutex<Vec<Sealed>>,
    /// Everything before this position is on disk.
    durable: AtomicU64,
    /// Calls under way that will wait for a sync once their records are
    /// appended (see [`Wal::open_call`]): a sync leader waits a little for
    /// them, so one sync carries every writer's records.
    open_calls: AtomicUsize,
    sync_state: Mutex<SyncState>,
    synced_cv: Condvar,
    /// Syncs finished (or failed) so far: a spinning waiter watches it to
    /// learn that the sync it waited on is over.
    syncs_ended: AtomicU64,
    /// A waiter is spinning (see [`Wal::spin_while_syncing`]).
    spinner: AtomicBool,
    /// How long the last sync took, in microseconds.
    last_sync_micros: AtomicU64,
    poisoned: AtomicBool,
    sync_seconds: std::sync::OnceLock<Arc<Histogram>>,
    /// The next segment, being prepared on a thread of its own.
    next: Mutex<Option<NextSegment>>,
    /// Tests simulating power loss drop the log without its final sync.
    pub(crate) skip_final_sync: AtomicBool,
    /// Held while the log is open: no second process appends here.
    _lock: Option<DirLock>,
}

/// A log just opened: ready for appends, with what recovery found.
pub(crate) struct Opened {
    pub wal: Wal,
    pub secret: Secret,
    pub report: RecoveryReport,
}

/// The latest mark of a fingerprint in the log, for audit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct LoggedMark {
    pub expiry_unix_secs: u64,
    pub metadata: Option<Vec<u8>>,
    pub forgotten: bool,
}

impl LoggedMark {
    /// Fold record `r` of the fingerprint looked for (at `offset` of
    /// `segment`) into the latest mark found so far, in log order: a mark
    /// replaces it, a forget cancels it.
    pub(crate) fn fold(found: &mut Option<LoggedMark>, segment: &[u8], offset: usize, r: Record) {
        match r {
            Record::Mark {
                expiry_unix_secs, ..
            } => {
                *found = Some(LoggedMark {
                    expiry_unix_secs,
                    metadata: format::metadata_at(segment, offset).map(<[u8]>::to_vec),
                    forgotten: false,
                })
            }
            Record::Forget { .. } => {
                if let Some(f) = found.as_mut() {
                    f.forgotten = true;
                }
            }
        }
    }
}

impl Wal {
    /// Open (or create) the log in the state directory `dir`: take its
    /// lock, recover, and feed every live record to `sink`.
    pub(crate) fn open(
        dir: &Path,
        opts: &WalOptions,
        now_unix: u64,
        sink: &dyn Replay,
        progress: &dyn Fn(usize, usize),
    ) -> Result<Opened> {
        let io = |source| Error::Io {
            path: dir.to_path_buf(),
            source,
        };
        let storage = DirStorage::open(dir).map_err(io)?;
        let lock_path = dir.join(format::LOCK_FILE);
        let lock = DirLock::try_lock(&lock_path)
            .map_err(|source| Error::Io {
                path: lock_path.clone(),
                source,
            })?
            .ok_or_else(|| Error::Locked {
                path: dir.to_path_buf(),
            })?;
        Self::open_storage(
            Arc::new(storage),
            Some(lock),
            opts,
            now_unix,
            sink,
            progress,
        )
    }

    /// [`Wal::open`] on any storage (tests use a simulated disk).
    pub(crate) fn open_storage(
        storage: Arc<dyn Storage>,
        lock: Option<DirLock>,
        opts: &WalOptions,
        now_unix: u64,
        sink: &dyn Replay,
        progress: &dyn Fn(usize, usize),
    ) -> Result<Opened> {
        let mut opened = recovery::open(storage, opts, now_unix, sink, progress)?;
        opened.wal._lock = lock;
        Ok(opened)
    }

    fn new(
        storage: Arc<dyn Storage>,
        store_id: u128,
        segment_size: usize,
        write_mode: WriteMode,
        active: Segment,
        sealed: Vec<Sealed>,
    ) -> Wal {
        let durable = Position::new(active.seq, active.published.load(Relaxed) as usize);
        Wal {
            storage,
            store_id,
            segment_size,
            write_mode,
            active: Atomic::new(active),
            rotation: Mutex::new(()),
            sealed: Mutex::new(sealed),
            durable: AtomicU64::new(durable.0),
            open_calls: AtomicUsize::new(0),
            sync_state: Mutex::new(SyncState {
                syncing: false,
                poisoned: None,
            }),
            synced_cv: Condvar::new(),
            syncs_ended: AtomicU64::new(0),
            spinner: AtomicBool::new(false),
            last_sync_micros: AtomicU64::new(0),
            poisoned: AtomicBool::new(false),
            skip_final_sync: AtomicBool::new(false),
            sync_seconds: std::sync::OnceLock::new(),
            next: Mutex::new(None),
            _lock: None,
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
        self.poison_locked(&mut self.sync_state.lock(), what, e)
    }

    /// [`Wal::poison`] under the sync state's lock. A failed sync poisons
    /// before it releases the lock: released first, a caller arriving in
    /// between saw no sync running and no poison, and led a new sync, which
    /// could report as durable what the failed one lost.
    fn poison_locked(&self, st: &mut SyncState, what: &str, e: &std::io::Error) -> Error {
        let reason = format!("{what}: {e}");
        tracing::error!(%reason, "seen: log poisoned; all further marks fail until reopened");
        if st.poisoned.is_none() {
            st.poisoned = Some(reason.clone());
        }
        self.poisoned.store(true, Release);
        self.synced_cv.notify_all();
        Error::Poisoned { reason }
    }

    /// Append marks `(fingerprint, expiry in Unix seconds)`; returns the
    /// position just past the last. Chunks of [`APPEND_CHUNK`] marks share
    /// one reservation and one write, so writers on other threads contend
    /// (and a positional log makes a system call) once per chunk.
    ///
    /// On failure, `Err((logged, e))`: the first `logged` marks are in the
    /// log (not necessarily durable), the rest are not.
    pub(crate) fn append_marks(
        &self,
        marks: &[(Fingerprint, u64)],
        guard: &Guard,
    ) -> Result<Position, (usize, Error)> {
        // A single id or a window stages its records in a small stack
        // buffer; only large batches pay for a whole chunk's.
        if marks.len() <= SMALL_CHUNK {
            self.append_marks_in::<SMALL_CHUNK>(marks, guard)
        } else {
            self.append_marks_in::<APPEND_CHUNK>(marks, guard)
        }
    }

    fn append_marks_in<const N: usize>(
        &self,
        marks: &[(Fingerprint, u64)],
        guard: &Guard,
    ) -> Result<Position, (usize, Error)> {
        // A chunk must fit in a segment with its header.
        let chunk = N
            .min((self.segment_size - format::SEGMENT_HEADER_LEN) / MARK_RECORD_LEN)
            .max(1);
        let mut last = None;
        for (i, window) in marks.chunks(chunk).enumerate() {
            let max_expiry = window.iter().map(|&(_, e)| e).max().unwrap_or(0);
            let appended = self.append_encoded::<N>(window.len(), max_expiry, guard, |j| {
                let (fp, expiry) = window[j];
                Record::Mark {
                    fingerprint: fp.0,
                    expiry_unix_secs: expiry,
                }
            });
            match appended {
                Ok(pos) => last = Some(pos),
                Err(e) => return Err((i * chunk, e)),
            }
        }
        Ok(last.unwrap_or_else(|| self.published(guard)))
    }

    /// Append a forget: it cancels the mark of `fp`, and lives as long as
    /// that mark (`expiry`) would have.
    pub(crate) fn append_forget(
        &self,
        fp: Fingerprint,
        expiry: u64,
        guard: &Guard,
    ) -> Result<Position> {
        self.append_encoded::<1>(1, expiry, guard, |_| Record::Forget {
            fingerprint: fp.0,
            expiry_unix_secs: expiry,
        })
    }

    /// Append a mark carrying metadata (at most
    /// [`format::MAX_RECORD_METADATA`] bytes; a variable-length record).
    pub(crate) fn append_mark_with_metadata(
        &self,
        fp: Fingerprint,
        expiry: u64,
        metadata: &[u8],
        guard: &Guard,
    ) -> Result<Position> {
        if metadata.len() > format::MAX_RECORD_METADATA {
            return Err(Error::MetadataTooLarge {
                len: metadata.len(),
                max: format::MAX_RECORD_METADATA,
            });
        }
        let len = format::record_len(format::MARK_PAYLOAD_LEN + metadata.len());
        if len + format::SEGMENT_HEADER_LEN > self.segment_size {
            return Err(Error::Config(format!(
                "a {len}-byte record does not fit in {}-byte segments",
                self.segment_size
            )));
        }
        self.append_with(len, expiry, guard, |seg, off| {
            let record = format::encode_mark_with_metadata(seg.seed, fp.0, expiry, metadata);
            seg.file.write_at(off, &record)
        })
    }

    /// Append `n` (at most `N`) fixed-size records, `record(i)`, with one
    /// reservation and one write (one system call when staged); they must
    /// fit in a segment.
    fn append_encoded<const N: usize>(
        &self,
        n: usize,
        max_expiry: u64,
        guard: &Guard,
        record: impl Fn(usize) -> Record,
    ) -> Result<Position> {
        debug_assert!(n <= N);
        let len = n * MARK_RECORD_LEN;
        debug_assert!(len + format::SEGMENT_HEADER_LEN <= self.segment_size);
        self.append_with(len, max_expiry, guard, |seg, off| {
            let mut buf = [[0u8; MARK_RECORD_LEN]; N];
            for (i, slot) in buf.iter_mut().take(n).enumerate() {
                *slot = encode_record(seg.seed, &record(i));
            }
            seg.file.write_at(off, buf[..n].as_flattened())
        })
    }

    /// Reserve `len` bytes in the active segment, `write` them, publish in
    /// reservation order. Rolls the segment over when it is full.
    fn append_with(
        &self,
        len: usize,
        max_expiry: u64,
        guard: &Guard,
        write: impl Fn(&Segment, usize) -> std::io::Result<()>,
    ) -> Result<Position> {
        self.check_poison()?;
        let len = len as u64;
        loop {
            let seg = self.active(guard);
            let off = seg.cursor.fetch_add(len, AcqRel);
            let end = off + len;
            if end <= seg.capacity as u64 {
                let written = write(seg, off as usize);
                if max_expiry > seg.max_expiry.load(Relaxed) {
                    seg.max_expiry.fetch_max(max_expiry, Relaxed);
                }
                let mut spins = 0;
                while seg.published.load(Acquire) != off {
                    backoff(&mut spins);
                }
                if let Err(e) = written {
                    // Nothing past this hole may become durable: poison
                    // first, then publish so later writers do not wait.
                    let err = self.poison("writing a record", &e);
                    seg.published.store(end, Release);
                    return Err(err);
                }
                seg.published.store(end, Release);
                if end * 2 > seg.capacity as u64 && !seg.next_requested.load(Relaxed) {
                    self.prepare_next(seg);
                }
                let shift = seg.writeback_shift;
                if off >> shift != end >> shift {
                    Self::write_back(seg, end >> shift << shift);
                }
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

    /// Have the kernel start writing the segment out up to `upto` (all of
    /// it published), unless a sync already made it durable. Without
    /// this, a log nobody syncs (`Durability::None`) reached its rollover
    /// with the whole segment dirty, and the seal's sync of 64 MiB kept
    /// every append waiting 35-45 ms; now at most a chunk or two are left
    /// to it. A hint: it changes no durability promise, and its errors
    /// are the seal's to report.
    #[cold]
    fn write_back(seg: &Segment, upto: u64) {
        let from = seg
            .synced
            .load(Acquire)
            .max(seg.written_back.fetch_max(upto, AcqRel));
        if upto > from {
            seg.file
                .start_writeback(from as usize, (upto - from) as usize);
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
        let next = match self.next_segment(seg) {
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

    /// Size of the segment after `seg`: segments grow from a small first
    /// one to the configured size, so a small store does not take a full
    /// segment of disk.
    fn size_after(&self, seg: &Segment) -> usize {
        (seg.capacity * 2).min(self.segment_size)
    }

    /// Start making the segment after `seg` on a thread of its own, once
    /// `seg` is half full: preallocating (for `Sync`, zero-filling) up to
    /// 64 MiB took the append that rolled over 130-300 ms, while every
    /// other append waited for it.
    #[cold]
    fn prepare_next(&self, seg: &Segment) {
        if seg.next_requested.swap(true, AcqRel) {
            return;
        }
        let (seq, size) = (seg.seq + 1, self.size_after(seg));
        let storage = Arc::clone(&self.storage);
        let (store_id, mode) = (self.store_id, self.write_mode);
        // Held until the handle is stored: a rollover racing this one
        // waits for it rather than making the same file alongside it.
        let mut next = self.next.lock();
        let spawned = std::thread::Builder::new()
            .name("seen-segment".into())
            .spawn(move || {
                let header = segment_header(store_id, size, seq);
                storage.prepare_segment(&format::segment_file_name(seq), size, &header, mode)
            });
        match spawned {
            Ok(ready) => *next = Some(NextSegment { seq, size, ready }),
            // The rollover makes it then, as it would without this.
            Err(e) => tracing::debug!(error = %e, "seen: cannot prepare the next segment ahead"),
        }
    }

    /// The segment after `seg`: the prepared one if it was made, otherwise
    /// made now (a preparation that failed, say for want of disk, is tried
    /// once more here, and that attempt's error is the rollover's).
    fn next_segment(&self, seg: &Segment) -> std::io::Result<Segment> {
        let seq = seg.seq + 1;
        let size = self.size_after(seg);
        if let Some(next) = self.next.lock().take() {
            let prepared = next.ready.join().unwrap_or_else(|_| {
                Err(std::io::Error::other(
                    "the thread preparing a segment panicked",
                ))
            });
            if next.seq == seq && next.size == size && prepared.is_ok() {
                let file = self
                    .storage
                    .install_segment(&format::segment_file_name(seq), self.write_mode)?;
                return Ok(Segment::new(
                    seq,
                    file,
                    self.store_id,
                    format::SEGMENT_HEADER_LEN,
                    0,
                ));
            }
            if prepared.is_ok() {
                self.storage
                    .discard_prepared(&format::segment_file_name(next.seq));
            }
        }
        self.create_segment(seq, size)
    }

    fn create_segment(&self, seq: u64, size: usize) -> std::io::Result<Segment> {
        create_segment(&*self.storage, self.store_id, size, seq, self.write_mode)
    }

    /// Observe sync durations into `h`.
    pub(crate) fn set_sync_histogram(&self, h: Arc<Histogram>) {
        let _ = self.sync_seconds.set(h);
    }

    /// Everything before this position is durable: what a crash now keeps.
    pub(crate) fn recovery_point(&self) -> Position {
        Position(self.durable.load(Acquire))
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
                let ended = self.syncs_ended.load(Acquire);
                let fast = self.last_sync_micros.load(Relaxed) <= SPIN_FOR.as_micros() as u64;
                if fast && !self.spinner.swap(true, Acquire) {
                    drop(st);
                    self.spin_while_syncing(ended);
                    self.spinner.store(false, Release);
                    st = self.sync_state.lock();
                } else {
                    self.synced_cv.wait(&mut st);
                }
                continue;
            }
            st.syncing = true;
            drop(st);
            // Let callers still appending publish before the sync snapshots
            // what it covers: while another call is under way (between
            // `open_call` and its own wait) or appends keep arriving, wait,
            // up to GATHER_FOR. Two batch writers then share one sync per
            // round instead of queueing a sync each behind the other's, and
            // many single-id callers become one group commit.
            {
                let guard = &crossbeam_epoch::pin();
                let deadline = std::time::Instant::now() + GATHER_FOR;
                let mut last = self.published(guard);
                loop {
                    std::thread::yield_now();
                    let now = self.published(guard);
                    let quiet = now == last && self.open_calls.load(Acquire) == 0;
                    if quiet || std::time::Instant::now() >= deadline {
                        break;
                    }
                    last = now;
                }
            }
            let started = std::time::Instant::now();
            let result = self.sync_published();
            let took = started.elapsed();
            self.last_sync_micros
                .store(took.as_micros() as u64, Relaxed);
            if let Some(h) = self.sync_seconds.get() {
                h.observe(took);
            }
            st = self.sync_state.lock();
            st.syncing = false;
            self.syncs_ended.fetch_add(1, Release);
            match result {
                Ok(pos) => {
                    self.durable.fetch_max(pos.0, AcqRel);
                    self.synced_cv.notify_all();
                }
                Err(e) => return Err(self.poison_locked(&mut st, "syncing the log", &e)),
            }
        }
    }

    /// Wait for the sync under way (the one after the `ended`-th) to end
    /// by yielding in a loop rather than sleeping, for up to SPIN_FOR.
    ///
    /// A waiter asleep on the condition variable is woken only after the
    /// leader's own wake-up by the disk's interrupt, and on a virtual
    /// machine each wake-up of an idle CPU costs tens of microseconds:
    /// on the 2-vCPU guest `seen bench --durability sync` made 5-8 % more
    /// acks/s with one waiter spinning (64 single-id callers: 8-11 %).
    /// Only one waiter spins at a time (`spinner`), it yields, so runnable
    /// threads keep the CPU, and only while syncs take less than SPIN_FOR:
    /// on a slow disk spinning would only burn the CPU. The rest sleep.
    /// RocksDB's write thread waits in the same spin-yield-sleep way.
    fn spin_while_syncing(&self, ended: u64) {
        let deadline = std::time::Instant::now() + SPIN_FOR;
        while self.syncs_ended.load(Acquire) == ended && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
    }

    /// A call that will append records and then wait for them to be
    /// durable starts: until the returned guard is dropped (just before
    /// the wait), a sync leader gathers for it.
    pub(crate) fn open_call(&self) -> OpenCall<'_> {
        self.open_calls.fetch_add(1, AcqRel);
        OpenCall(&self.open_calls)
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
    pub(crate) fn purge_expired(&self, now_unix: u64) -> usize {
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

    /// The latest mark of `fp` in the live log, with its metadata and
    /// whether a later forget cancelled it. An audit call: it scans every
    /// segment (sealed ones through their mappings, the active one up to
    /// its published end), so it costs one pass over the log, about
    /// 32 bytes per mark logged within the TTL.
    pub(crate) fn lookup(&self, fp: Fingerprint) -> Result<Option<LoggedMark>> {
        let (active_name, active_seq, published) = {
            let guard = &crossbeam_epoch::pin();
            let seg = self.active(guard);
            (
                seg.name.clone(),
                seg.seq,
                seg.published.load(Acquire) as usize,
            )
        };
        let mut names: Vec<(u64, String)> = self
            .sealed
            .lock()
            .iter()
            .filter_map(|s| Some((format::parse_segment_file_name(&s.name)?, s.name.clone())))
            .collect();
        names.push((active_seq, active_name.clone()));
        let mut found: Option<LoggedMark> = None;
        for (seq, name) in names {
            let bytes = if name == active_name {
                storage::Bytes::Owned(self.storage.read_prefix(&name, published).map_err(
                    |source| Error::Io {
                        path: self.storage.path(&name),
                        source,
                    },
                )?)
            } else {
                match self.storage.read(&name) {
                    Ok(b) => b,
                    // Purged (expired) since we listed it.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(source) => {
                        return Err(Error::Io {
                            path: self.storage.path(&name),
                            source,
                        })
                    }
                }
            };
            let _ = reader::scan_segment(&bytes, self.store_id, seq, true, |off, r| {
                if r.fingerprint() == fp.0 {
                    LoggedMark::fold(&mut found, &bytes, off, r);
                }
            });
        }
        Ok(found)
    }

    /// The random id this log was created with: positions compare only
    /// within one log.
    #[cfg(feature = "postgres")]
    pub(crate) fn store_id(&self) -> u128 {
        self.store_id
    }

    /// The durable records after `from`, in log order.
    #[cfg(feature = "postgres")]
    pub(crate) fn changes_since(&self, from: Position) -> changes::ChangeReader<'_> {
        changes::ChangeReader::new(self, from)
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

/// At most this many yields before a group commit while appends keep
/// arriving (measured: 64 single-id callers went from 7 to 24 marks per
/// sync, `docs/benchmarks.md`).
/// A call under way (see [`Wal::open_call`]).
pub(crate) struct OpenCall<'w>(&'w AtomicUsize);

impl Drop for OpenCall<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, AcqRel);
    }
}

const GATHER_FOR: std::time::Duration = std::time::Duration::from_micros(200);
/// How long a waiter spins for a sync before it sleeps.
const SPIN_FOR: std::time::Duration = std::time::Duration::from_millis(1);

/// Records a single id or a window appends with (a 512-byte buffer).
const SMALL_CHUNK: usize = 16;

/// Records appended with one reservation and one write (8 KiB).
pub(crate) const APPEND_CHUNK: usize = 256;

/// Create segment `seq`, durably, and open it for appending.
pub(crate) fn create_segment(
    storage: &dyn Storage,
    store_id: u128,
    segment_size: usize,
    seq: u64,
    mode: WriteMode,
) -> std::io::Result<Segment> {
    let header = segment_header(store_id, segment_size, seq);
    let file =
        storage.create_segment(&format::segment_file_name(seq), segment_size, &header, mode)?;
    Ok(Segment::new(seq, file, store_id, header.len(), 0))
}

fn segment_header(
    store_id: u128,
    segment_size: usize,
    seq: u64,
) -> [u8; format::SEGMENT_HEADER_LEN] {
    SegmentHeader {
        version: FORMAT_VERSION,
        seq,
        store_id,
        size: segment_size as u64,
        created_unix_secs: crate::ttl::clock::Clock::now_unix_secs(&crate::ttl::clock::SystemClock),
    }
    .encode()
}

impl Drop for Wal {
    fn drop(&mut self) {
        // A segment prepared for a rollover that never came: not part of
        // the store; remove it while the directory is still ours.
        if let Some(next) = self.next.lock().take() {
            if let Ok(Ok(())) = next.ready.join() {
                self.storage
                    .discard_prepared(&format::segment_file_name(next.seq));
            }
        }
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
