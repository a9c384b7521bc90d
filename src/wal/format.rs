//! The on-disk format: constants, header and record codec. No I/O here.
//! `docs/format.md` draws the same bytes.
//!
//! Everything is little-endian. Decoding never panics: every slice access
//! is checked and a failure says why.
#![deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]
// Each item is described byte by byte in docs/format.md.

/// Current format version, written in the store header and every new
/// segment header. Version 2 added record kind 3 (a mark with metadata).
pub const FORMAT_VERSION: u32 = 2;
/// Oldest version this build reads. A v1 store is upgraded on open (its
/// header rewritten as v2); its v1 segments are read as they are.
pub const MIN_FORMAT_VERSION: u32 = 1;

/// Store header file name.
pub const STORE_FILE: &str = "STORE";
/// Lock file name (held with flock while a store is open).
pub const LOCK_FILE: &str = "LOCK";
pub const STORE_MAGIC: [u8; 8] = *b"SEENSTOR";
pub const STORE_HEADER_LEN: usize = 64;

pub const SEGMENT_MAGIC: [u8; 8] = *b"SEENWAL\0";
pub const SEGMENT_HEADER_LEN: usize = 64;
/// Records are 8-byte aligned.
pub const RECORD_ALIGN: usize = 8;
pub const RECORD_HEADER_LEN: usize = 8;

/// A mark: fingerprint (16) + expiry in Unix seconds (8).
pub const KIND_MARK: u8 = 1;
/// A forget: fingerprint (16) + expiry of the mark it cancels (8).
pub const KIND_FORGET: u8 = 2;
/// A mark with JSON metadata: fingerprint (16) + expiry (8) + metadata.
pub const KIND_MARK_META: u8 = 3;
pub const MARK_PAYLOAD_LEN: usize = 24;
/// Largest metadata a record may carry.
pub const MAX_RECORD_METADATA: usize = 4096;
/// Kinds 1 and 2 are 32 bytes on disk.
pub const MARK_RECORD_LEN: usize = RECORD_HEADER_LEN + MARK_PAYLOAD_LEN;

/// `wal-{seq:016x}.seg`
pub fn segment_file_name(seq: u64) -> String {
    format!("wal-{seq:016x}.seg")
}

/// The sequence number of a segment file name, if it is one.
pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    let hex = name.strip_prefix("wal-")?.strip_suffix(".seg")?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// The store header (file `STORE`):
///
/// ```text
/// 0   8  magic "SEENSTOR"
/// 8   4  format version
/// 12  4  header length (64)
/// 16  16 store id (random)
/// 32  16 fingerprint secret
/// 48  8  created, Unix seconds
/// 56  4  reserved, zero
/// 60  4  CRC32C of bytes 0..60
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreHeader {
    pub version: u32,
    pub store_id: u128,
    pub secret: [u8; 16],
    pub created_unix_secs: u64,
}

/// The segment header (first 64 bytes of every segment file):
///
/// ```text
/// 0   8  magic "SEENWAL\0"
/// 8   4  format version
/// 12  4  header length (64)
/// 16  8  segment sequence number
/// 24  16 store id
/// 40  8  segment file size
/// 48  8  created, Unix seconds
/// 56  4  reserved, zero
/// 60  4  CRC32C of bytes 0..60
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    pub version: u32,
    pub seq: u64,
    pub store_id: u128,
    pub size: u64,
    pub created_unix_secs: u64,
}

/// Why bytes did not decode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeError {
    Truncated,
    BadMagic,
    /// A version this build cannot read (newer, or zero).
    UnsupportedVersion(u32),
    BadChecksum,
    BadLength(u32),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Truncated => f.write_str("truncated header"),
            DecodeError::BadMagic => f.write_str("bad magic (not a seen file)"),
            DecodeError::UnsupportedVersion(v) => write!(
                f,
                "format version {v} is not supported by this build (which reads versions {MIN_FORMAT_VERSION} to {FORMAT_VERSION})"
            ),
            DecodeError::BadChecksum => f.write_str("header checksum mismatch"),
            DecodeError::BadLength(l) => write!(f, "unexpected header length {l}"),
        }
    }
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}
fn u128_at(b: &[u8], at: usize) -> Option<u128> {
    Some(u128::from_le_bytes(b.get(at..at + 16)?.try_into().ok()?))
}

/// Checks magic, version, length and checksum of a 64-byte header;
/// returns the version.
fn check_header(b: &[u8], magic: &[u8; 8]) -> Result<u32, DecodeError> {
    let b = b.get(..64).ok_or(DecodeError::Truncated)?;
    if b.get(..8) != Some(magic.as_slice()) {
        return Err(DecodeError::BadMagic);
    }
    let crc = u32_at(b, 60).ok_or(DecodeError::Truncated)?;
    if crc32c::crc32c(b.get(..60).ok_or(DecodeError::Truncated)?) != crc {
        return Err(DecodeError::BadChecksum);
    }
    let version = u32_at(b, 8).ok_or(DecodeError::Truncated)?;
    if !(MIN_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
        return Err(DecodeError::UnsupportedVersion(version));
    }
    let len = u32_at(b, 12).ok_or(DecodeError::Truncated)?;
    if len != 64 {
        return Err(DecodeError::BadLength(len));
    }
    Ok(version)
}

fn seal_header(mut b: [u8; 64]) -> [u8; 64] {
    let crc = crc32c::crc32c(&b[..60]);
    b[60..].copy_from_slice(&crc.to_le_bytes());
    b
}

impl StoreHeader {
    #[allow(clippy::indexing_slicing)] // fixed offsets into a fixed array
    pub fn encode(&self) -> [u8; STORE_HEADER_LEN] {
        let mut b = [0u8; 64];
        b[..8].copy_from_slice(&STORE_MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&64u32.to_le_bytes());
        b[16..32].copy_from_slice(&self.store_id.to_le_bytes());
        b[32..48].copy_from_slice(&self.secret);
        b[48..56].copy_from_slice(&self.created_unix_secs.to_le_bytes());
        seal_header(b)
    }

    pub fn decode(b: &[u8]) -> Result<StoreHeader, DecodeError> {
        let version = check_header(b, &STORE_MAGIC)?;
        let t = DecodeError::Truncated;
        Ok(StoreHeader {
            version,
            store_id: u128_at(b, 16).ok_or(t.clone())?,
            secret: b
                .get(32..48)
                .and_then(|s| s.try_into().ok())
                .ok_or(t.clone())?,
            created_unix_secs: u64_at(b, 48).ok_or(t)?,
        })
    }
}

impl SegmentHeader {
    #[allow(clippy::indexing_slicing)] // fixed offsets into a fixed array
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_LEN] {
        let mut b = [0u8; 64];
        b[..8].copy_from_slice(&SEGMENT_MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&64u32.to_le_bytes());
        b[16..24].copy_from_slice(&self.seq.to_le_bytes());
        b[24..40].copy_from_slice(&self.store_id.to_le_bytes());
        b[40..48].copy_from_slice(&self.size.to_le_bytes());
        b[48..56].copy_from_slice(&self.created_unix_secs.to_le_bytes());
        seal_header(b)
    }

    pub fn decode(b: &[u8]) -> Result<SegmentHeader, DecodeError> {
        let version = check_header(b, &SEGMENT_MAGIC)?;
        let t = DecodeError::Truncated;
        Ok(SegmentHeader {
            version,
            seq: u64_at(b, 16).ok_or(t.clone())?,
            store_id: u128_at(b, 24).ok_or(t.clone())?,
            size: u64_at(b, 40).ok_or(t.clone())?,
            created_unix_secs: u64_at(b, 48).ok_or(t)?,
        })
    }
}

/// The CRC seed of a segment: its identity (store id, sequence number).
/// Mixing it into every record's checksum means bytes left over from
/// another store or another segment (a reused or preallocated file) never
/// validate here.
pub fn record_seed(store_id: u128, seq: u64) -> u32 {
    let mut id = [0u8; 24];
    id[..16].copy_from_slice(&store_id.to_le_bytes());
    id[16..].copy_from_slice(&seq.to_le_bytes());
    crc32c::crc32c(&id)
}

/// One decoded record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Record {
    Mark {
        fingerprint: u128,
        expiry_unix_secs: u64,
    },
    Forget {
        fingerprint: u128,
        expiry_unix_secs: u64,
    },
}

impl Record {
    /// The fingerprint the record is about.
    pub fn fingerprint(&self) -> u128 {
        match *self {
            Record::Mark { fingerprint, .. } | Record::Forget { fingerprint, .. } => fingerprint,
        }
    }

    /// Until when the record matters (Unix seconds).
    pub fn expiry_unix_secs(&self) -> u64 {
        match *self {
            Record::Mark {
                expiry_unix_secs, ..
            }
            | Record::Forget {
                expiry_unix_secs, ..
            } => expiry_unix_secs,
        }
    }
}

/// Record layout (8-byte aligned, 32 bytes for both v1 kinds):
///
/// ```text
/// 0  4  CRC32C, seeded with record_seed(), of bytes 4..8+len
/// 4  1  kind (1 mark, 2 forget; 0 never written)
/// 5  1  flags, zero
/// 6  2  payload length
/// 8  .. payload, then zero padding to a multiple of 8
/// ```
pub fn encode_record(seed: u32, record: &Record) -> [u8; MARK_RECORD_LEN] {
    let (kind, fp, expiry) = match *record {
        Record::Mark {
            fingerprint,
            expiry_unix_secs,
        } => (KIND_MARK, fingerprint, expiry_unix_secs),
        Record::Forget {
            fingerprint,
            expiry_unix_secs,
        } => (KIND_FORGET, fingerprint, expiry_unix_secs),
    };
    let mut b = [0u8; MARK_RECORD_LEN];
    let (head, payload) = b.split_at_mut(RECORD_HEADER_LEN);
    let (fp_bytes, exp_bytes) = payload.split_at_mut(16);
    fp_bytes.copy_from_slice(&fp.to_le_bytes());
    exp_bytes.copy_from_slice(&expiry.to_le_bytes());
    let (_crc, meta) = head.split_at_mut(4);
    meta.copy_from_slice(&[kind, 0, MARK_PAYLOAD_LEN as u8, 0]);
    // One call over everything after the CRC field (the kind, the length
    // and the payload are contiguous): for a record this short the
    // crate's setup costs more than the bytes. Two calls were 38 % of
    // appending a mark's instructions, one is 29 %.
    let crc = crc32c::crc32c_append(seed, &b[4..]);
    b[..4].copy_from_slice(&crc.to_le_bytes());
    b
}

/// What sits at an offset of a segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decoded {
    /// A valid record and its length on disk.
    Record(Record, usize),
    /// Eight zero bytes: nothing was ever written here.
    Unwritten,
    /// Bytes that are not a valid record of this segment.
    Invalid(&'static str),
}

/// Decode the record at the start of `b`. Inlined into the scan: returned
/// through memory, the record was reread with a stalled store forward
/// (half of the scan loop's time in a replay).
#[inline(always)]
pub fn decode_record(seed: u32, b: &[u8]) -> Decoded {
    let Some(head) = b.get(..RECORD_HEADER_LEN) else {
        return Decoded::Invalid("record header runs past the end of the segment");
    };
    if head.iter().all(|&x| x == 0) {
        return Decoded::Unwritten;
    }
    let (Some(crc), Some(&kind), Some(len)) = (
        u32_at(head, 0),
        head.get(4),
        head.get(6..8)
            .and_then(|l| l.try_into().ok())
            .map(u16::from_le_bytes),
    ) else {
        return Decoded::Invalid("record header unreadable");
    };
    let len = len as usize;
    let len_ok = match kind {
        KIND_MARK | KIND_FORGET => len == MARK_PAYLOAD_LEN,
        KIND_MARK_META => {
            (MARK_PAYLOAD_LEN..=MARK_PAYLOAD_LEN + MAX_RECORD_METADATA).contains(&len)
        }
        _ => return Decoded::Invalid("unknown record kind"),
    };
    if !len_ok {
        return Decoded::Invalid("bad payload length for record kind");
    }
    let Some(body) = b.get(4..RECORD_HEADER_LEN + len) else {
        return Decoded::Invalid("record runs past the end of the segment");
    };
    if crc32c::crc32c_append(seed, body) != crc {
        return Decoded::Invalid("record checksum mismatch");
    }
    let (Some(fingerprint), Some(expiry_unix_secs)) = (
        u128_at(b, RECORD_HEADER_LEN),
        u64_at(b, RECORD_HEADER_LEN + 16),
    ) else {
        return Decoded::Invalid("record payload unreadable");
    };
    let record = if kind == KIND_FORGET {
        Record::Forget {
            fingerprint,
            expiry_unix_secs,
        }
    } else {
        // Replay needs only the mark; audit reads the metadata with
        // `metadata_at`.
        Record::Mark {
            fingerprint,
            expiry_unix_secs,
        }
    };
    Decoded::Record(record, record_len(len))
}

/// The metadata of the kind-3 record that starts at `offset` of a segment
/// image (`None` for other kinds or unreadable bytes; call it only for
/// records the scan validated).
pub fn metadata_at(segment: &[u8], offset: usize) -> Option<&[u8]> {
    let head = segment.get(offset..offset + RECORD_HEADER_LEN)?;
    if head.get(4) != Some(&KIND_MARK_META) {
        return None;
    }
    let len = u16::from_le_bytes(head.get(6..8)?.try_into().ok()?) as usize;
    let start = offset + RECORD_HEADER_LEN + MARK_PAYLOAD_LEN;
    segment.get(start..offset + RECORD_HEADER_LEN + len)
}

/// Bytes a record with a `payload`-byte payload takes on disk.
pub fn record_len(payload: usize) -> usize {
    (RECORD_HEADER_LEN + payload).div_ceil(RECORD_ALIGN) * RECORD_ALIGN
}

/// A mark carrying JSON metadata (kind 3), padded to 8 bytes. `metadata`
/// must be at most [`MAX_RECORD_METADATA`] bytes.
pub fn encode_mark_with_metadata(
    seed: u32,
    fingerprint: u128,
    expiry_unix_secs: u64,
    metadata: &[u8],
) -> Vec<u8> {
    let payload = MARK_PAYLOAD_LEN + metadata.len();
    let mut b = vec![0u8; record_len(payload)];
    b.get_mut(4..8).into_iter().for_each(|m| {
        m.copy_from_slice(&[
            KIND_MARK_META,
            0,
            (payload & 0xff) as u8,
            (payload >> 8) as u8,
        ])
    });
    if let Some(p) = b.get_mut(8..24) {
        p.copy_from_slice(&fingerprint.to_le_bytes());
    }
    if let Some(p) = b.get_mut(24..32) {
        p.copy_from_slice(&expiry_unix_secs.to_le_bytes());
    }
    if let Some(p) = b.get_mut(32..32 + metadata.len()) {
        p.copy_from_slice(metadata);
    }
    let crc = crc32c::crc32c_append(
        seed,
        b.get(4..RECORD_HEADER_LEN + payload).unwrap_or_default(),
    );
    if let Some(p) = b.get_mut(0..4) {
        p.copy_from_slice(&crc.to_le_bytes());
    }
    b
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn headers_roundtrip_and_reject_damage() {
        let h = SegmentHeader {
            version: FORMAT_VERSION,
            seq: 7,
            store_id: 42,
            size: 1 << 20,
            created_unix_secs: 1_700_000_000,
        };
        let mut b = h.encode();
        assert_eq!(SegmentHeader::decode(&b).unwrap(), h);
        assert_eq!(SegmentHeader::decode(&b[..10]), Err(DecodeError::Truncated));
        b[20] ^= 1;
        assert_eq!(SegmentHeader::decode(&b), Err(DecodeError::BadChecksum));
        assert_eq!(StoreHeader::decode(&h.encode()), Err(DecodeError::BadMagic));
        let s = StoreHeader {
            version: FORMAT_VERSION,
            store_id: 9,
            secret: [3; 16],
            created_unix_secs: 5,
        };
        assert_eq!(StoreHeader::decode(&s.encode()).unwrap(), s);
    }

    #[test]
    fn future_version_is_named() {
        let mut b = [0u8; 64];
        b[..8].copy_from_slice(&SEGMENT_MAGIC);
        b[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        b[12..16].copy_from_slice(&64u32.to_le_bytes());
        let b = seal_header(b);
        assert_eq!(
            SegmentHeader::decode(&b),
            Err(DecodeError::UnsupportedVersion(FORMAT_VERSION + 1))
        );
        let mut zero = b;
        zero[8..12].copy_from_slice(&0u32.to_le_bytes());
        assert_eq!(
            SegmentHeader::decode(&seal_header(zero)),
            Err(DecodeError::UnsupportedVersion(0))
        );
    }

    #[test]
    fn records_roundtrip_and_only_validate_in_their_segment() {
        let seed = record_seed(1, 2);
        let r = Record::Mark {
            fingerprint: 0xdead_beef,
            expiry_unix_secs: 99,
        };
        let b = encode_record(seed, &r);
        assert_eq!(decode_record(seed, &b), Decoded::Record(r, 32));
        assert!(matches!(
            decode_record(record_seed(1, 3), &b),
            Decoded::Invalid(_)
        ));
        assert_eq!(decode_record(seed, &[0u8; 32]), Decoded::Unwritten);
        assert!(matches!(decode_record(seed, &b[..20]), Decoded::Invalid(_)));
        for i in 0..32 {
            let mut bad = b;
            bad[i] ^= 0x10;
            assert!(
                matches!(decode_record(seed, &bad), Decoded::Invalid(_)),
                "byte {i}"
            );
        }
    }

    #[test]
    fn metadata_records_roundtrip() {
        let seed = record_seed(3, 4);
        let meta = br#"{"order":42,"by":"billing"}"#;
        let b = encode_mark_with_metadata(seed, 7, 99, meta);
        assert_eq!(b.len() % 8, 0);
        assert_eq!(
            decode_record(seed, &b),
            Decoded::Record(
                Record::Mark {
                    fingerprint: 7,
                    expiry_unix_secs: 99
                },
                b.len()
            )
        );
        assert_eq!(metadata_at(&b, 0), Some(meta.as_slice()));
        assert_eq!(
            metadata_at(
                &encode_record(
                    seed,
                    &Record::Mark {
                        fingerprint: 1,
                        expiry_unix_secs: 2
                    }
                ),
                0
            ),
            None
        );
        let mut bad = b.clone();
        bad[40] ^= 1;
        assert!(matches!(decode_record(seed, &bad), Decoded::Invalid(_)));
    }

    #[test]
    fn segment_names() {
        assert_eq!(segment_file_name(255), "wal-00000000000000ff.seg");
        assert_eq!(
            parse_segment_file_name("wal-00000000000000ff.seg"),
            Some(255)
        );
        assert_eq!(parse_segment_file_name("wal-ff.seg"), None);
        assert_eq!(parse_segment_file_name("STORE"), None);
    }
}
