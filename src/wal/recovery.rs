//! Opening a log, in named steps (after raft-engine's `pipe_builder`):
//!
//! 1. [`scan_dir`]: sort the directory into store header, segments, stray
//!    and temporary files;
//! 2. [`load_header`]: read (or create) the store header, upgrading a v1
//!    store to the current format version;
//! 3. [`map_segments`]: map every segment and estimate the record count, so
//!    the replay sink is sized once;
//! 4. [`replay`]: feed live records to the sink (in parallel lanes when the
//!    log is large) and apply the [`RecoveryMode`] to any damage;
//! 5. [`finish`]: cut a torn tail, pick or create the active segment, purge
//!    expired segments, report.
//!
//! Recovery is idempotent: it only ever zeroes a torn tail (then syncs) and
//! rewrites the store header atomically, so opening N times — or crashing
//! while opening — ends in the same state.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::format::{
    self, DecodeError, Record, StoreHeader, FORMAT_VERSION, MARK_RECORD_LEN, STORE_FILE,
};
use super::reader::{scan_segment, ScanError};
use super::storage::{Bytes, Storage, WriteMode};
use super::{Opened, RecoveryMode, Sealed, Segment, Wal};
use crate::error::{Error, Result};
use crate::fingerprint::Secret;

/// What opening a store found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecoveryReport {
    /// `true` if the store was created by this open.
    pub created: bool,
    /// Segment files read.
    pub segments: usize,
    /// Log bytes scanned.
    pub bytes_scanned: u64,
    /// Records read.
    pub records: u64,
    /// Marks loaded into memory.
    pub replayed: u64,
    /// Records skipped because they had expired.
    pub expired: u64,
    /// Forget records applied.
    pub forgotten: u64,
    /// Bytes cut from a torn tail (zeroed and synced).
    pub truncated_bytes: u64,
    /// Valid-looking records found beyond a torn tail, and dropped with it.
    /// They were never acknowledged as durable (a sync covers only a
    /// contiguous prefix).
    pub dropped_records: u64,
    /// Damaged byte ranges skipped under [`RecoveryMode::Salvage`]:
    /// (file, offset, length).
    pub salvaged: Vec<(PathBuf, u64, u64)>,
    /// Segments skipped whole under salvage (unreadable header).
    pub skipped_segments: Vec<PathBuf>,
    /// Sealed segments deleted because every record in them had expired.
    pub deleted_segments: usize,
    /// Files in the directory that are not part of a store (left alone).
    pub stray_files: Vec<String>,
    /// The format version the store had, if this open upgraded it.
    pub upgraded_from: Option<u32>,
    /// Time spent.
    pub duration: Duration,
}

/// The last segment, which recovery may continue appending to.
struct LastSegment {
    seq: u64,
    name: String,
    /// Just past the last valid record.
    end: usize,
    max_expiry: u64,
    /// A torn tail to zero: `from..to`.
    cut: Option<(usize, usize)>,
    /// Full, or damaged under salvage: append to a fresh segment instead.
    seal: bool,
}

/// How to open a log.
pub(crate) struct WalOptions {
    pub mode: RecoveryMode,
    /// Size of segments created from now on.
    pub segment_size: usize,
    /// The fingerprint secret for a new store; an existing store's must match.
    pub secret: Option<Secret>,
    /// How appends reach the segment files.
    pub write_mode: WriteMode,
}

fn corruption(storage: &dyn Storage, name: &str, offset: u64, reason: impl Into<String>) -> Error {
    Error::Corruption {
        file: storage.path(name),
        offset,
        reason: reason.into(),
    }
}

fn io(storage: &dyn Storage, name: &str) -> impl Fn(std::io::Error) -> Error {
    let path = storage.path(name);
    move |source| Error::Io {
        path: path.clone(),
        source,
    }
}

/// Where replayed records go.
///
/// Replay runs in lanes on several threads when the log is large: a
/// record's lane follows from its fingerprint ([`Replay::lanes_by`]), and
/// each lane is applied by one thread, in log order, never two lanes in
/// one `apply`.
pub(crate) trait Replay: Sync {
    /// Room for this many records (called once, before any `apply`), made
    /// with up to `threads` threads.
    fn reserve(&self, records: u64, threads: u64);
    /// How records are split into lanes. The sink chooses, so that lanes
    /// can own disjoint parts of it.
    fn lanes_by(&self) -> LaneKey;
    /// Apply live records in log order; returns (marks loaded, forgets applied).
    fn apply(&self, records: &[Record]) -> (u64, u64);
}

/// A record's lane: the top `top_bits` bits of its fingerprint, modulo
/// the number of lanes. (A plain value, not a call into the sink: replay
/// asks it for every record.)
#[derive(Clone, Copy, Debug)]
pub(crate) struct LaneKey {
    pub top_bits: u32,
}

impl LaneKey {
    #[inline]
    fn lane(self, fingerprint: u128, lanes: u64) -> u64 {
        let top = fingerprint
            .checked_shr(128 - self.top_bits.min(64))
            .unwrap_or(0);
        (top as u64) % lanes
    }
}

/// Length up to the last non-zero byte, read a word at a time from the end.
fn used_len(bytes: &[u8]) -> usize {
    let words = bytes.len() / 8;
    let mut end = words;
    while end > 0 {
        let at = (end - 1) * 8;
        let word = bytes
            .get(at..at + 8)
            .and_then(|w| w.try_into().ok())
            .map(u64::from_ne_bytes)
            .unwrap_or(0);
        if word != 0 {
            break;
        }
        end -= 1;
    }
    if bytes
        .get(words * 8..)
        .is_some_and(|tail| tail.iter().any(|&b| b != 0))
    {
        return bytes.len();
    }
    end * 8
}

/// Logs smaller than this replay on the calling thread alone.
const PARALLEL_REPLAY_MIN_RECORDS: u64 = 200_000;

/// Threads (lanes) for replaying about `expected` records.
fn replay_lanes(expected: u64) -> u64 {
    if expected >= PARALLEL_REPLAY_MIN_RECORDS {
        std::thread::available_parallelism()
            .map(|n| n.get() as u64)
            .unwrap_or(1)
            .clamp(1, 4)
    } else {
        1
    }
}

/// Replay one lane of every segment (a helper thread's share).
fn replay_lane(
    segments: &[(u64, String)],
    files: &[Bytes],
    store_id: u128,
    salvage: bool,
    now_unix: u64,
    (lane, lanes): (u64, u64),
    sink: &dyn Replay,
) -> (u64, u64) {
    let by = sink.lanes_by();
    let (mut marks, mut forgets) = (0, 0);
    let mut chunk: Vec<Record> = Vec::with_capacity(REPLAY_CHUNK);
    let mut flush = |chunk: &mut Vec<Record>| {
        let (m, f) = sink.apply(chunk);
        marks += m;
        forgets += f;
        chunk.clear();
    };
    for ((seq, _), bytes) in segments.iter().zip(files) {
        // Damage handling is the main thread's business; a helper applies
        // exactly the records the main thread's scan also accepts.
        let _ = scan_segment(bytes, store_id, *seq, salvage, |_, r| {
            if r.expiry_unix_secs() > now_unix && by.lane(r.fingerprint(), lanes) == lane {
                chunk.push(r);
                if chunk.len() == REPLAY_CHUNK {
                    flush(&mut chunk);
                }
            }
        });
    }
    flush(&mut chunk);
    (marks, forgets)
}

/// Records handed to [`Replay::apply`] at a time.
const REPLAY_CHUNK: usize = 256;

/// Open (or create) the log in `storage`, feeding every live record to `sink`.
pub(crate) fn open(
    storage: Arc<dyn Storage>,
    opts: &WalOptions,
    now_unix: u64,
    sink: &dyn Replay,
    progress: &dyn Fn(usize, usize),
) -> Result<Opened> {
    let started = Instant::now();
    let st = &*storage;
    let mut report = RecoveryReport::default();
    let dir = scan_dir(st)?;
    for tmp in &dir.temporaries {
        // A file whose creation a crash interrupted: never renamed into
        // place, so never part of the store.
        st.remove(tmp).map_err(io(st, tmp))?;
    }
    report.stray_files = dir.stray;
    let header = load_header(
        st,
        dir.has_store,
        &dir.segments,
        opts,
        now_unix,
        &mut report,
    )?;
    let (files, expected) = map_segments(st, &dir.segments)?;
    let lanes = replay_lanes(expected);
    sink.reserve(expected, lanes);
    let (sealed, last) = replay(
        st,
        &dir.segments,
        &files,
        header.store_id,
        opts.mode,
        now_unix,
        lanes,
        sink,
        progress,
        &mut report,
    )?;
    drop(files);
    let wal = finish(storage, &header, opts, sealed, last, now_unix, &mut report)?;
    report.duration = started.elapsed();
    log_report(&report);
    Ok(Opened {
        wal,
        secret: Secret::from_bytes(header.secret),
        report,
    })
}

/// A state directory sorted by what each file is.
pub(crate) struct DirScan {
    pub has_store: bool,
    /// (sequence, file name), in sequence order.
    pub segments: Vec<(u64, String)>,
    /// Files no part of a store (left alone, reported).
    pub stray: Vec<String>,
    /// `*.tmp` files: creations a crash interrupted.
    pub temporaries: Vec<String>,
}

/// Step 1: sort the directory's files.
pub(crate) fn scan_dir(st: &dyn Storage) -> Result<DirScan> {
    let mut scan = DirScan {
        has_store: false,
        segments: Vec::new(),
        stray: Vec::new(),
        temporaries: Vec::new(),
    };
    for name in st.list().map_err(io(st, "."))? {
        if name == STORE_FILE {
            scan.has_store = true;
        } else if name == format::LOCK_FILE {
        } else if let Some(seq) = format::parse_segment_file_name(&name) {
            scan.segments.push((seq, name));
        } else if name.ends_with(".tmp") {
            scan.temporaries.push(name);
        } else {
            scan.stray.push(name);
        }
    }
    scan.segments.sort();
    Ok(scan)
}

/// Read and check the store header (`STORE`).
pub(crate) fn read_header(st: &dyn Storage) -> Result<StoreHeader> {
    let bytes = st.read(STORE_FILE).map_err(io(st, STORE_FILE))?;
    StoreHeader::decode(&bytes).map_err(|e| super::header_error(st.path(STORE_FILE), e))
}

/// Step 2: the store header: read it (upgrading an older version in
/// place), or create it for a new store.
fn load_header(
    st: &dyn Storage,
    has_store: bool,
    segments: &[(u64, String)],
    opts: &WalOptions,
    now_unix: u64,
    report: &mut RecoveryReport,
) -> Result<StoreHeader> {
    let header = if has_store {
        let mut h = read_header(st)?;
        if h.version < FORMAT_VERSION {
            // Everything older builds wrote is readable here. Record the new
            // version first, so an older build refuses the store instead of
            // cutting records it does not know as damage.
            report.upgraded_from = Some(h.version);
            h.version = FORMAT_VERSION;
            st.write_atomic(STORE_FILE, &h.encode())
                .map_err(io(st, STORE_FILE))?;
            tracing::info!(
                from = report.upgraded_from,
                to = FORMAT_VERSION,
                "seen: store format upgraded"
            );
        }
        h
    } else if let Some((_, first)) = segments.first() {
        return Err(corruption(
            st,
            first,
            0,
            "log segments exist but the store header (STORE) is missing",
        ));
    } else {
        let random = |what: &'static str| {
            let mut b = [0u8; 16];
            getrandom::getrandom(&mut b)
                .map(|()| b)
                .map_err(|e| Error::System {
                    what,
                    source: std::io::Error::other(e),
                })
        };
        let store_id = u128::from_le_bytes(random("a store id")?);
        let secret = match opts.secret {
            Some(s) => *s.as_bytes(),
            None => random("a fingerprint secret")?,
        };
        let h = StoreHeader {
            version: FORMAT_VERSION,
            store_id,
            secret,
            created_unix_secs: now_unix,
        };
        st.write_atomic(STORE_FILE, &h.encode())
            .map_err(io(st, STORE_FILE))?;
        report.created = true;
        h
    };
    if let Some(given) = opts.secret {
        if given != Secret::from_bytes(header.secret) {
            return Err(Error::Config(
                "the given fingerprint secret differs from the one in the store header".into(),
            ));
        }
    }
    Ok(header)
}

/// Step 3: map every segment, and estimate the records from where each
/// segment's zero tail starts, so the sink is sized once instead of
/// growing through replay. Reading is mapping: no extra I/O.
fn map_segments(st: &dyn Storage, segments: &[(u64, String)]) -> Result<(Vec<Bytes>, u64)> {
    let mut files = Vec::with_capacity(segments.len());
    let mut expected = 0u64;
    for (_, name) in segments {
        let bytes = st.read(name).map_err(io(st, name))?;
        let used = used_len(&bytes).saturating_sub(format::SEGMENT_HEADER_LEN);
        expected += (used / MARK_RECORD_LEN) as u64;
        files.push(bytes);
    }
    Ok((files, expected))
}

/// Step 4: replay every segment into `sink` and decide about damage.
/// Returns the sealed segments and the last one.
#[allow(clippy::too_many_arguments)]
fn replay(
    st: &dyn Storage,
    segments: &[(u64, String)],
    files: &[Bytes],
    store_id: u128,
    mode: RecoveryMode,
    now_unix: u64,
    lanes: u64,
    sink: &dyn Replay,
    progress: &dyn Fn(usize, usize),
    report: &mut RecoveryReport,
) -> Result<(Vec<Sealed>, Option<LastSegment>)> {
    let salvage = mode == RecoveryMode::Salvage;
    let by = sink.lanes_by();
    let mut sealed = Vec::new();
    let mut last: Option<LastSegment> = None;
    let total = segments.len();
    std::thread::scope(|scope| -> Result<()> {
        // Lanes 1.. on helper threads; lane 0, and every decision about
        // damage, on this one.
        let helpers: Vec<_> = (1..lanes)
            .map(|lane| {
                scope.spawn(move || {
                    replay_lane(
                        segments,
                        files,
                        store_id,
                        salvage,
                        now_unix,
                        (lane, lanes),
                        sink,
                    )
                })
            })
            .collect();
        let mut main = || -> Result<()> {
            let mut chunk: Vec<Record> = Vec::with_capacity(REPLAY_CHUNK);
            for (i, ((seq, name), bytes)) in segments.iter().zip(files).enumerate() {
                progress(i, total);
                let is_last = i + 1 == total;
                report.segments += 1;
                report.bytes_scanned += bytes.len() as u64;
                let flush = |chunk: &mut Vec<Record>, report: &mut RecoveryReport| {
                    let (marks, forgets) = sink.apply(chunk);
                    report.replayed += marks;
                    report.forgotten += forgets;
                    chunk.clear();
                };
                let scan = scan_segment(bytes, store_id, *seq, salvage, |_, r| {
                    report.records += 1;
                    if r.expiry_unix_secs() <= now_unix {
                        report.expired += 1;
                    } else if by.lane(r.fingerprint(), lanes) == 0 {
                        chunk.push(r);
                        if chunk.len() == REPLAY_CHUNK {
                            flush(&mut chunk, report);
                        }
                    }
                });
                flush(&mut chunk, report);
                let scan = match scan {
                    Ok(scan) => scan,
                    Err(ScanError::Header(e @ DecodeError::UnsupportedVersion(_))) => {
                        return Err(super::header_error(st.path(name), e))
                    }
                    Err(_) if salvage => {
                        report.skipped_segments.push(st.path(name));
                        continue;
                    }
                    Err(e) => return Err(corruption(st, name, 0, e.to_string())),
                };
                let mut cut = None;
                let mut damaged = false;
                if let Some(d) = &scan.damage {
                    match mode {
                        RecoveryMode::Salvage => {
                            damaged = true;
                            for &(off, len) in &d.skipped {
                                report
                                    .salvaged
                                    .push((st.path(name), off as u64, len as u64));
                            }
                        }
                        RecoveryMode::TolerateTornTail if is_last => {
                            cut = Some((d.offset, d.nonzero_end));
                            report.truncated_bytes += (d.nonzero_end - d.offset) as u64;
                            report.dropped_records += d.valid_after;
                        }
                        _ => {
                            let where_ = if is_last {
                                "log tail"
                            } else {
                                "sealed segment"
                            };
                            return Err(corruption(
                                st,
                                name,
                                d.offset as u64,
                                format!("{} in {where_}", d.reason),
                            ));
                        }
                    }
                }
                if is_last {
                    last = Some(LastSegment {
                        seq: *seq,
                        name: name.clone(),
                        end: scan.end,
                        max_expiry: scan.max_expiry,
                        cut,
                        seal: damaged || bytes.len() < scan.end + MARK_RECORD_LEN,
                    });
                } else {
                    sealed.push(Sealed {
                        name: name.clone(),
                        bytes: scan.end as u64,
                        max_expiry: scan.max_expiry,
                    });
                }
            }
            Ok(())
        };
        let result = main();
        for h in helpers {
            // A helper only applies records; a panic there is a bug to surface.
            let (marks, forgets) = h.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
            report.replayed += marks;
            report.forgotten += forgets;
        }
        result
    })?;
    progress(total, total);
    Ok((sealed, last))
}

/// Step 5: cut a torn tail, pick (or create) the segment to append to,
/// build the log, delete fully expired segments.
fn finish(
    storage: Arc<dyn Storage>,
    header: &StoreHeader,
    opts: &WalOptions,
    mut sealed: Vec<Sealed>,
    last: Option<LastSegment>,
    now_unix: u64,
    report: &mut RecoveryReport,
) -> Result<Wal> {
    let st = &*storage;
    let (active, next_seq) = match last {
        Some(LastSegment {
            seq,
            name,
            end,
            max_expiry,
            cut,
            seal: full_or_damaged,
        }) => {
            let file = st
                .open_segment(&name, opts.write_mode)
                .map_err(io(st, &name))?;
            if let Some((from, to)) = cut {
                let to = to.min(file.len());
                if to > from {
                    file.zero_range(from, to - from).map_err(io(st, &name))?;
                }
            }
            if full_or_damaged {
                // Keep it sealed as it is; append to a fresh segment.
                sealed.push(Sealed {
                    name,
                    bytes: end as u64,
                    max_expiry,
                });
                (None, seq + 1)
            } else {
                (
                    Some(Segment::new(seq, file, header.store_id, end, max_expiry)),
                    seq + 1,
                )
            }
        }
        // A new store starts small (segments double from there).
        None => (None, 1),
    };
    let size = if next_seq == 1 {
        opts.segment_size.min(super::FIRST_SEGMENT_SIZE)
    } else {
        opts.segment_size
    };
    let active = match active {
        Some(seg) => seg,
        None => super::create_segment(st, header.store_id, size, next_seq, opts.write_mode)
            .map_err(io(st, &format::segment_file_name(next_seq)))?,
    };
    let wal = Wal::new(
        Arc::clone(&storage),
        header.store_id,
        opts.segment_size,
        opts.write_mode,
        active,
        sealed,
    );
    report.deleted_segments = wal.purge_expired(now_unix);
    Ok(wal)
}

fn log_report(report: &RecoveryReport) {
    tracing::info!(
        segments = report.segments,
        replayed = report.replayed,
        expired = report.expired,
        forgotten = report.forgotten,
        seconds = report.duration.as_secs_f64(),
        "seen: log replayed"
    );
    if report.truncated_bytes > 0 {
        tracing::warn!(
            bytes = report.truncated_bytes,
            dropped_records = report.dropped_records,
            "seen: cut a torn tail from the last log segment"
        );
    }
    if !report.salvaged.is_empty() || !report.skipped_segments.is_empty() {
        tracing::warn!(
            ranges = report.salvaged.len(),
            segments = report.skipped_segments.len(),
            "seen: salvage skipped damaged log data"
        );
    }
    if !report.stray_files.is_empty() {
        tracing::warn!(files = ?report.stray_files, "seen: stray files in the state directory");
    }
}
