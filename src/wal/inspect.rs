#![allow(missing_docs)]
//! Read-only examination of a state directory, for `seen inspect` and
//! `seen verify`. Takes no lock and changes nothing: it reads files, not
//! mappings, so a store that is open elsewhere is safe to look at.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use super::format::{self, Record, StoreHeader, STORE_FILE};
use super::reader::{scan_segment, Damage};
use crate::{Error, Result};

/// One segment as found on disk.
#[derive(Clone, Debug)]
pub struct SegmentInfo {
    pub path: PathBuf,
    pub seq: u64,
    pub file_bytes: u64,
    /// Bytes up to the end of the last valid record.
    pub used_bytes: u64,
    pub marks: u64,
    pub forgets: u64,
    /// Expiry range of the records (Unix seconds; 0 if none).
    pub min_expiry: u64,
    pub max_expiry: u64,
    pub damage: Option<Damage>,
    /// The segment could not be read at all.
    pub unreadable: Option<String>,
}

/// A state directory as found on disk.
#[derive(Clone, Debug)]
pub struct StoreInfo {
    pub store_id: u128,
    pub created_unix_secs: u64,
    pub segments: Vec<SegmentInfo>,
    /// Marks that would be live at `now`: (count, oldest expiry, newest expiry).
    pub live_keys: u64,
    pub live_min_expiry: u64,
    pub live_max_expiry: u64,
    pub stray_files: Vec<String>,
}

impl StoreInfo {
    /// Any damage or unreadable segment.
    pub fn is_damaged(&self) -> bool {
        self.segments
            .iter()
            .any(|s| s.damage.is_some() || s.unreadable.is_some())
    }
}

/// Scan every record of the store in `dir` (checking every checksum).
/// `progress(done, total)` is called per segment.
pub fn inspect(dir: &Path, now_unix: u64, progress: &dyn Fn(usize, usize)) -> Result<StoreInfo> {
    let io = |path: PathBuf| move |source| Error::Io { path, source };
    let store_path = dir.join(STORE_FILE);
    let bytes = fs::read(&store_path).map_err(io(store_path.clone()))?;
    let header = StoreHeader::decode(&bytes).map_err(|e| super::header_error(store_path, e))?;
    let mut names = Vec::new();
    let mut stray_files = Vec::new();
    for entry in fs::read_dir(dir).map_err(io(dir.to_path_buf()))? {
        let entry = entry.map_err(io(dir.to_path_buf()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        match format::parse_segment_file_name(&name) {
            Some(seq) => names.push((seq, name)),
            None if name == STORE_FILE || name == format::LOCK_FILE => {}
            None => stray_files.push(name),
        }
    }
    names.sort();
    // Live state: replay like recovery would (fingerprint → expiry).
    let mut live: HashMap<u128, u64> = HashMap::new();
    let mut segments = Vec::new();
    for (i, (seq, name)) in names.iter().enumerate() {
        progress(i, names.len());
        let path = dir.join(name);
        let bytes = fs::read(&path).map_err(io(path.clone()))?;
        let (mut marks, mut forgets) = (0, 0);
        let scan = scan_segment(&bytes, header.store_id, *seq, true, |_, r| match r {
            Record::Mark {
                fingerprint,
                expiry_unix_secs,
            } => {
                marks += 1;
                if expiry_unix_secs > now_unix {
                    live.insert(fingerprint, expiry_unix_secs);
                }
            }
            Record::Forget { fingerprint, .. } => {
                forgets += 1;
                live.remove(&fingerprint);
            }
        });
        let mut info = SegmentInfo {
            path,
            seq: *seq,
            file_bytes: bytes.len() as u64,
            used_bytes: 0,
            marks,
            forgets,
            min_expiry: 0,
            max_expiry: 0,
            damage: None,
            unreadable: None,
        };
        match scan {
            Ok(s) => {
                info.used_bytes = s.end as u64;
                info.min_expiry = s.min_expiry;
                info.max_expiry = s.max_expiry;
                info.damage = s.damage;
            }
            Err(e) => info.unreadable = Some(e.to_string()),
        }
        segments.push(info);
    }
    progress(names.len(), names.len());
    let live_min_expiry = live.values().copied().min().unwrap_or(0);
    let live_max_expiry = live.values().copied().max().unwrap_or(0);
    Ok(StoreInfo {
        store_id: header.store_id,
        created_unix_secs: header.created_unix_secs,
        segments,
        live_keys: live.len() as u64,
        live_min_expiry,
        live_max_expiry,
        stray_files,
    })
}
