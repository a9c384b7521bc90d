//! Read-only examination of a state directory: what `seen inspect` and
//! `seen verify` print. Takes no lock and changes nothing; it copies files
//! instead of mapping them, so a store that is open elsewhere is safe to
//! look at. It walks the directory and scans segments with the same code
//! recovery uses.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::format::{self, Record};
use super::reader::scan_segment;
pub use super::reader::Damage;
use super::recovery::{read_header, scan_dir};
use super::storage::{DirStorage, Storage};
use super::LoggedMark;
use crate::error::{Error, Result};
use crate::fingerprint::{Fingerprinter, Secret};

/// One segment as found on disk.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SegmentInfo {
    /// The file.
    pub path: PathBuf,
    /// Its sequence number.
    pub seq: u64,
    /// Its format version (0 if unreadable).
    pub version: u32,
    /// File size.
    pub file_bytes: u64,
    /// Bytes up to the end of the last valid record.
    pub used_bytes: u64,
    /// Mark records (with or without metadata).
    pub marks: u64,
    /// Of which carry metadata.
    pub marks_with_metadata: u64,
    /// Forget records.
    pub forgets: u64,
    /// Oldest expiry among its records (Unix seconds; 0 if none).
    pub min_expiry: u64,
    /// Newest expiry among its records (Unix seconds; 0 if none).
    pub max_expiry: u64,
    /// Damage found by the scan.
    pub damage: Option<Damage>,
    /// The segment could not be read at all (and why).
    pub unreadable: Option<String>,
}

/// A state directory as found on disk.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct StoreInfo {
    /// The store's random id.
    pub store_id: u128,
    /// Format version of the store header.
    pub version: u32,
    /// When the store was created (Unix seconds).
    pub created_unix_secs: u64,
    /// Segments in sequence order.
    pub segments: Vec<SegmentInfo>,
    /// Marks that are live at the time given to [`inspect`].
    pub live_keys: u64,
    /// Oldest expiry of a live mark (Unix seconds; 0 if none).
    pub live_min_expiry: u64,
    /// Newest expiry of a live mark (Unix seconds; 0 if none).
    pub live_max_expiry: u64,
    /// Files that are not part of a store (left alone).
    pub stray_files: Vec<String>,
}

/// What [`StoreInfo::problems`] lists.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProblemKind {
    /// Damage at the end of the last segment with nothing valid after it:
    /// a write a crash interrupted. Opening the store cuts it; nothing
    /// acknowledged is lost.
    TornTail,
    /// Damage anywhere else, or with valid records after it.
    Corruption,
    /// A segment whose header cannot be read.
    Unreadable,
}

/// One problem in a store, with where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Problem {
    /// The file.
    pub path: PathBuf,
    /// Byte offset of the damage.
    pub offset: u64,
    /// What kind of problem.
    pub kind: ProblemKind,
    /// Why the bytes do not validate.
    pub reason: String,
    /// Bytes affected.
    pub bytes: u64,
    /// Valid records found after the damage.
    pub valid_after: u64,
}

impl StoreInfo {
    /// Any damage or unreadable segment.
    pub fn is_damaged(&self) -> bool {
        !self.problems().is_empty()
    }

    /// Every problem, in file order: what `seen verify` reports.
    pub fn problems(&self) -> Vec<Problem> {
        let last = self.segments.last().map(|s| s.seq);
        let mut out = Vec::new();
        for s in &self.segments {
            if let Some(e) = &s.unreadable {
                out.push(Problem {
                    path: s.path.clone(),
                    offset: 0,
                    kind: ProblemKind::Unreadable,
                    reason: e.clone(),
                    bytes: s.file_bytes,
                    valid_after: 0,
                });
            }
            if let Some(d) = &s.damage {
                let kind = if Some(s.seq) == last && d.valid_after == 0 {
                    ProblemKind::TornTail
                } else {
                    ProblemKind::Corruption
                };
                out.push(Problem {
                    path: s.path.clone(),
                    offset: d.offset as u64,
                    kind,
                    reason: d.reason.to_owned(),
                    bytes: d.nonzero_end.saturating_sub(d.offset) as u64,
                    valid_after: d.valid_after,
                });
            }
        }
        out
    }

    /// Records of every kind, in all segments.
    pub fn records(&self) -> u64 {
        self.segments.iter().map(|s| s.marks + s.forgets).sum()
    }
}

fn open_dir(dir: &Path) -> Result<DirStorage> {
    DirStorage::unlocked(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })
}

/// Scan every segment of `st` (salvage-style: past damage, so every valid
/// record is seen), calling `on_record(bytes, offset, record)`.
fn scan_all(
    st: &dyn Storage,
    store_id: u128,
    segments: &[(u64, String)],
    progress: &dyn Fn(usize, usize),
    mut on_record: impl FnMut(&[u8], usize, Record),
) -> Result<Vec<SegmentInfo>> {
    let mut infos = Vec::with_capacity(segments.len());
    for (i, (seq, name)) in segments.iter().enumerate() {
        progress(i, segments.len());
        let bytes = st.read(name).map_err(|source| Error::Io {
            path: st.path(name),
            source,
        })?;
        let (mut marks, mut with_meta, mut forgets) = (0, 0, 0);
        let scan = scan_segment(&bytes, store_id, *seq, true, |off, r| {
            match r {
                Record::Mark { .. } => {
                    marks += 1;
                    if format::metadata_at(&bytes, off).is_some() {
                        with_meta += 1;
                    }
                }
                Record::Forget { .. } => forgets += 1,
            }
            on_record(&bytes, off, r);
        });
        let mut info = SegmentInfo {
            path: st.path(name),
            seq: *seq,
            version: 0,
            file_bytes: bytes.len() as u64,
            used_bytes: 0,
            marks,
            marks_with_metadata: with_meta,
            forgets,
            min_expiry: 0,
            max_expiry: 0,
            damage: None,
            unreadable: None,
        };
        match scan {
            Ok(s) => {
                info.version = s.header.version;
                info.used_bytes = s.end as u64;
                info.min_expiry = s.min_expiry;
                info.max_expiry = s.max_expiry;
                info.damage = s.damage;
            }
            Err(e) => info.unreadable = Some(e.to_string()),
        }
        infos.push(info);
    }
    progress(segments.len(), segments.len());
    Ok(infos)
}

/// Scan every record of the store in `dir`, checking every checksum, and
/// count what is live at `now_unix`. `progress(done, total)` is called
/// per segment.
pub fn inspect(dir: &Path, now_unix: u64, progress: &dyn Fn(usize, usize)) -> Result<StoreInfo> {
    let st = open_dir(dir)?;
    let header = read_header(&st)?;
    let walk = scan_dir(&st)?;
    // Live state: replay as recovery would (fingerprint → expiry).
    let mut live: HashMap<u128, u64> = HashMap::new();
    let segments = scan_all(
        &st,
        header.store_id,
        &walk.segments,
        progress,
        |_, _, r| match r {
            Record::Mark {
                fingerprint,
                expiry_unix_secs,
            } if expiry_unix_secs > now_unix => {
                live.insert(fingerprint, expiry_unix_secs);
            }
            Record::Mark { .. } => {}
            Record::Forget { fingerprint, .. } => {
                live.remove(&fingerprint);
            }
        },
    )?;
    let mut stray_files = walk.stray;
    stray_files.extend(walk.temporaries);
    Ok(StoreInfo {
        store_id: header.store_id,
        version: header.version,
        created_unix_secs: header.created_unix_secs,
        segments,
        live_keys: live.len() as u64,
        live_min_expiry: live.values().copied().min().unwrap_or(0),
        live_max_expiry: live.values().copied().max().unwrap_or(0),
        stray_files,
    })
}

/// The stored mark of one id, as [`find`] and
/// [`Engine::stored_mark`](crate::Engine::stored_mark) return it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoredMark {
    /// When the mark expires (Unix seconds).
    pub expiry_unix_secs: u64,
    /// The JSON metadata stored with it (`mark_processed(id, Some(..))`).
    pub metadata: Option<Vec<u8>>,
    /// A later forget cancelled it.
    pub forgotten: bool,
}

impl StoredMark {
    /// Marked, not forgotten and not expired at `now_unix`.
    pub fn is_live(&self, now_unix: u64) -> bool {
        !self.forgotten && self.expiry_unix_secs > now_unix
    }
}

impl From<LoggedMark> for StoredMark {
    fn from(m: LoggedMark) -> Self {
        StoredMark {
            expiry_unix_secs: m.expiry_unix_secs,
            metadata: m.metadata,
            forgotten: m.forgotten,
        }
    }
}

/// The latest mark of `id` in the store in `dir` (expired or not), with
/// its metadata; `None` if the log holds none. Fingerprints `id` with the
/// store's secret, then scans the whole log: one pass, for audit.
pub fn find(dir: &Path, id: &[u8]) -> Result<Option<StoredMark>> {
    let st = open_dir(dir)?;
    let header = read_header(&st)?;
    let fp = Fingerprinter::new(&Secret::from_bytes(header.secret)).fingerprint(id);
    let walk = scan_dir(&st)?;
    let mut found: Option<LoggedMark> = None;
    scan_all(
        &st,
        header.store_id,
        &walk.segments,
        &|_, _| {},
        |bytes, off, r| {
            if r.fingerprint() == fp.0 {
                LoggedMark::fold(&mut found, bytes, off, r);
            }
        },
    )?;
    Ok(found.map(Into::into))
}
