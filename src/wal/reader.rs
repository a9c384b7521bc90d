//! Scanning a segment image: records in order, where the valid log ends,
//! and what lies beyond (a torn tail, or corruption). Shared by recovery,
//! `seen verify` and `seen inspect`. Never panics on any bytes.
#![deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]

use super::format::{
    decode_record, record_seed, DecodeError, Decoded, Record, SegmentHeader, RECORD_ALIGN,
    SEGMENT_HEADER_LEN,
};

/// Bytes past the end of the valid records that are not zero.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    /// Offset of the first byte that is not a valid record.
    pub offset: usize,
    /// Why the bytes there do not validate.
    pub reason: &'static str,
    /// End of the last non-zero byte (rounded up to a record boundary).
    pub nonzero_end: usize,
    /// Valid records found after `offset` (aligned scan). Under salvage
    /// they were applied; otherwise they are dropped with the tail.
    pub valid_after: u64,
    /// Byte ranges skipped under salvage.
    pub skipped: Vec<(usize, usize)>,
}

#[derive(Clone, Debug)]
pub struct SegmentScan {
    pub header: SegmentHeader,
    /// Records applied.
    pub records: u64,
    /// Where the next record goes: just past the last applied record.
    pub end: usize,
    pub damage: Option<Damage>,
    /// Largest and smallest expiry among applied records (0 if none).
    pub max_expiry: u64,
    pub min_expiry: u64,
}

/// Why a segment could not be scanned at all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScanError {
    Header(DecodeError),
    ForeignStore,
    WrongSequence { in_header: u64 },
}

impl std::fmt::Display for ScanError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ScanError::Header(e) => write!(f, "segment header: {e}"),
            ScanError::ForeignStore => f.write_str("segment belongs to another store"),
            ScanError::WrongSequence { in_header } => write!(
                f,
                "segment header says sequence {in_header}, which does not match its file name"
            ),
        }
    }
}

/// Scan one segment image. `salvage` skips over damage and keeps going;
/// otherwise the scan stops at the first damaged record.
pub fn scan_segment(
    bytes: &[u8],
    store_id: u128,
    seq: u64,
    salvage: bool,
    mut on_record: impl FnMut(usize, Record),
) -> Result<SegmentScan, ScanError> {
    let header = SegmentHeader::decode(bytes).map_err(ScanError::Header)?;
    if header.store_id != store_id {
        return Err(ScanError::ForeignStore);
    }
    if header.seq != seq {
        return Err(ScanError::WrongSequence {
            in_header: header.seq,
        });
    }
    let seed = record_seed(store_id, seq);
    let mut scan = SegmentScan {
        header,
        records: 0,
        end: SEGMENT_HEADER_LEN,
        damage: None,
        max_expiry: 0,
        min_expiry: 0,
    };
    let mut note = |scan: &mut SegmentScan, off: usize, r: Record| {
        let e = r.expiry_unix_secs();
        scan.max_expiry = scan.max_expiry.max(e);
        scan.min_expiry = if scan.records == 0 {
            e
        } else {
            scan.min_expiry.min(e)
        };
        scan.records += 1;
        on_record(off, r);
    };
    let mut off = SEGMENT_HEADER_LEN;
    while let Some(rest) = bytes.get(off..) {
        if rest.len() < RECORD_ALIGN {
            break;
        }
        let reason = match decode_record(seed, rest) {
            Decoded::Record(r, n) => {
                note(&mut scan, off, r);
                off += n;
                scan.end = off;
                continue;
            }
            Decoded::Unwritten => {
                if rest.iter().all(|&b| b == 0) {
                    break; // the clean end of the log
                }
                "unwritten gap before later data"
            }
            Decoded::Invalid(reason) => reason,
        };
        let nonzero_end = bytes
            .iter()
            .rposition(|&b| b != 0)
            .map(|i| (i + 1).div_ceil(RECORD_ALIGN) * RECORD_ALIGN)
            .unwrap_or(off)
            .max(off);
        let mut damage = Damage {
            offset: off,
            reason,
            nonzero_end,
            valid_after: 0,
            skipped: Vec::new(),
        };
        // Look for valid records beyond the damage, at record alignment.
        let mut probe = off + RECORD_ALIGN;
        let mut resume = None;
        while probe < nonzero_end {
            if let Some(Decoded::Record(..)) = bytes.get(probe..).map(|b| decode_record(seed, b)) {
                if resume.is_none() {
                    resume = Some(probe);
                }
                damage.valid_after += 1;
            }
            probe += RECORD_ALIGN;
        }
        if !salvage {
            scan.damage = Some(damage);
            return Ok(scan);
        }
        let skip_to = resume.unwrap_or(nonzero_end);
        damage.skipped.push((off, skip_to - off));
        match scan.damage.as_mut() {
            Some(d) => d.skipped.push((off, skip_to - off)),
            None => scan.damage = Some(damage),
        }
        match resume {
            Some(next) => off = next,
            None => break,
        }
    }
    Ok(scan)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::super::format::{encode_record, FORMAT_VERSION};
    use super::*;

    fn segment(records: usize, size: usize) -> Vec<u8> {
        let mut b = vec![0u8; size];
        let h = SegmentHeader {
            version: FORMAT_VERSION,
            seq: 1,
            store_id: 5,
            size: size as u64,
            created_unix_secs: 0,
        };
        b[..64].copy_from_slice(&h.encode());
        let seed = record_seed(5, 1);
        for i in 0..records {
            let r = encode_record(
                seed,
                &Record::Mark {
                    fingerprint: i as u128 + 1,
                    expiry_unix_secs: 100 + i as u64,
                },
            );
            b[64 + i * 32..96 + i * 32].copy_from_slice(&r);
        }
        b
    }

    #[test]
    fn clean_segment() {
        let b = segment(10, 4096);
        let s = scan_segment(&b, 5, 1, false, |_, _| {}).unwrap();
        assert_eq!((s.records, s.end, s.damage), (10, 64 + 320, None));
        assert_eq!((s.min_expiry, s.max_expiry), (100, 109));
    }

    #[test]
    fn torn_tail_stops_the_scan() {
        let mut b = segment(10, 4096);
        b[64 + 9 * 32 + 20] ^= 0xff; // last record torn
        let s = scan_segment(&b, 5, 1, false, |_, _| {}).unwrap();
        assert_eq!(s.records, 9);
        let d = s.damage.unwrap();
        assert_eq!(
            (d.offset, d.valid_after, d.nonzero_end),
            (64 + 9 * 32, 0, 64 + 320)
        );
    }

    #[test]
    fn salvage_skips_damage_and_continues() {
        let mut b = segment(10, 4096);
        b[64 + 3 * 32 + 9] ^= 0xff;
        let mut seen = Vec::new();
        let s = scan_segment(&b, 5, 1, true, |_, r| seen.push(r)).unwrap();
        assert_eq!(s.records, 9);
        assert_eq!(s.end, 64 + 320);
        assert_eq!(s.damage.unwrap().skipped, vec![(64 + 96, 32)]);
        let without = scan_segment(&b, 5, 1, false, |_, _| {}).unwrap();
        assert_eq!(without.records, 3);
        assert_eq!(without.damage.unwrap().valid_after, 6);
    }

    #[test]
    fn foreign_and_misnamed_segments() {
        let b = segment(1, 4096);
        assert_eq!(
            scan_segment(&b, 6, 1, false, |_, _| {}).unwrap_err(),
            ScanError::ForeignStore
        );
        assert_eq!(
            scan_segment(&b, 5, 2, false, |_, _| {}).unwrap_err(),
            ScanError::WrongSequence { in_header: 1 }
        );
        assert!(matches!(
            scan_segment(&b[..30], 5, 1, false, |_, _| {}),
            Err(ScanError::Header(DecodeError::Truncated))
        ));
    }

    #[test]
    fn any_bytes_never_panic() {
        let mut x = 1u64;
        for len in [0usize, 7, 64, 65, 100, 200, 1000] {
            let mut b = segment(3, 1024);
            b.truncate(len.max(64));
            for _ in 0..200 {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let i = (x >> 33) as usize % b.len();
                b[i] = (x >> 20) as u8;
                let _ = scan_segment(&b, 5, 1, x % 2 == 0, |_, _| {});
            }
        }
    }
}
