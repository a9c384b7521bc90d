//! Reading the log forward from a position: what an incremental
//! checkpoint sends. Only durable records are read (a checkpoint never
//! holds a mark the local log could still lose), in log order, in chunks,
//! so a checkpoint of millions of marks never holds them all at once.

use super::format::{self, decode_record, Decoded, Record, SegmentHeader, SEGMENT_HEADER_LEN};
use super::{Position, Wal};
use crate::error::{Error, Result};

/// A cursor over the durable records after a position.
pub(crate) struct ChangeReader<'w> {
    wal: &'w Wal,
    /// Segments still to read, oldest first: (sequence, file name).
    segments: std::collections::VecDeque<(u64, String)>,
    /// The segment being read: its bytes from `base` on, and the cursor.
    current: Option<Current>,
    from: Position,
    end: Position,
}

struct Current {
    seq: u64,
    seed: u32,
    bytes: Vec<u8>,
    base: usize,
    at: usize,
}

impl<'w> ChangeReader<'w> {
    pub(super) fn new(wal: &'w Wal, from: Position) -> ChangeReader<'w> {
        // Everything before the recovery point is durable; read up to it.
        let end = wal.recovery_point();
        let (from_seq, _) = from.split();
        let (end_seq, _) = end.split();
        let mut segments: Vec<(u64, String)> = wal
            .sealed
            .lock()
            .iter()
            .filter_map(|s| Some((format::parse_segment_file_name(&s.name)?, s.name.clone())))
            .filter(|&(seq, _)| seq >= from_seq && seq <= end_seq)
            .collect();
        if !segments.iter().any(|&(seq, _)| seq == end_seq) && end_seq >= from_seq {
            segments.push((end_seq, format::segment_file_name(end_seq)));
        }
        segments.sort();
        ChangeReader {
            wal,
            segments: segments.into(),
            current: None,
            from,
            end,
        }
    }

    /// The position the reader stops at: pass it to the next reader once
    /// everything read has been stored.
    pub(crate) fn end(&self) -> Position {
        self.end
    }

    /// Append up to `max` records to `out`; `false` once there are none left.
    pub(crate) fn next_chunk(&mut self, max: usize, out: &mut Vec<Record>) -> Result<bool> {
        let mut taken = 0;
        while taken < max {
            if self.current.is_none() && !self.open_next()? {
                break;
            }
            let Some(cur) = self.current.as_mut() else {
                break;
            };
            let rest = cur.bytes.get(cur.at..).unwrap_or(&[]);
            if rest.is_empty() {
                self.current = None;
                continue;
            }
            match decode_record(cur.seed, rest) {
                Decoded::Record(r, n) => {
                    out.push(r);
                    cur.at += n;
                    taken += 1;
                }
                Decoded::Unwritten => self.current = None,
                Decoded::Invalid(reason) => {
                    // Recovery already cut or skipped damage; only a
                    // salvaged store can still hold some. Stop at it, as
                    // replay does.
                    tracing::warn!(
                        segment = cur.seq,
                        offset = cur.base + cur.at,
                        reason,
                        "seen: damaged record ends the checkpoint's read of this segment"
                    );
                    self.current = None;
                }
            }
        }
        Ok(taken > 0 || self.current.is_some() || !self.segments.is_empty())
    }

    fn open_next(&mut self) -> Result<bool> {
        let storage = &self.wal.storage;
        let io = |name: &str, source| Error::Io {
            path: storage.path(name),
            source,
        };
        while let Some((seq, name)) = self.segments.pop_front() {
            let (from_seq, from_off) = self.from.split();
            let (end_seq, end_off) = self.end.split();
            let start = if seq == from_seq {
                from_off.max(SEGMENT_HEADER_LEN)
            } else {
                SEGMENT_HEADER_LEN
            };
            // The active segment is still being written past the durable
            // end: copy only the durable bytes.
            let stop = if seq == end_seq { Some(end_off) } else { None };
            let head = match storage.read_prefix(&name, SEGMENT_HEADER_LEN) {
                Ok(b) => b,
                // Purged since listed: every record in it has expired.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io(&name, e)),
            };
            let header = SegmentHeader::decode(&head)
                .map_err(|e| super::header_error(storage.path(&name), e))?;
            if header.store_id != self.wal.store_id || header.seq != seq {
                return Err(Error::Corruption {
                    file: storage.path(&name),
                    offset: 0,
                    reason: "segment header does not match the open log".into(),
                });
            }
            let bytes = match stop {
                Some(stop) if stop <= start => continue,
                Some(stop) => storage.read_range(&name, start, stop - start),
                None => storage.read_range(&name, start, usize::MAX),
            };
            let bytes = match bytes {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io(&name, e)),
            };
            self.current = Some(Current {
                seq,
                seed: format::record_seed(self.wal.store_id, seq),
                bytes,
                base: start,
                at: 0,
            });
            return Ok(true);
        }
        Ok(false)
    }
}
