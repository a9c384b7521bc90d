//! A simulated disk for power-loss tests: every file has a *live* image
//! (what the page cache holds) and a *durable* image (what survives power
//! loss). `sync` copies live → durable for a range. `crash` builds the disk
//! a reboot would see: durable bytes, plus — for each page (4 KiB) of each
//! unsynced write, independently, since the kernel writes dirty pages back
//! in any order whether they were dirtied by `pwrite` or through a mapping —
//! either nothing, the page's part of the write, a torn prefix of it, or
//! garbage.

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::Mutex;

use super::storage::{Bytes, SegmentFile, Storage, WriteMode};

#[derive(Default, Clone)]
struct SimFile {
    live: Vec<u8>,
    durable: Vec<u8>,
    /// Unsynced writes, in order: (offset, len).
    pending: Vec<(usize, usize)>,
    /// Ranges handed to writeback, in order (a hint: no effect on a crash,
    /// which already lets any unsynced page reach the disk or not).
    #[cfg_attr(not(test), allow(dead_code))]
    written_back: Vec<(usize, usize)>,
}

#[derive(Default)]
pub struct SimDisk {
    files: Mutex<BTreeMap<String, Arc<Mutex<SimFile>>>>,
    /// Segments prepared ahead of time, not yet installed (lost in a crash).
    prepared: Mutex<BTreeMap<String, Vec<u8>>>,
}

/// The unit the kernel writes back.
const PAGE: usize = 4096;

/// What happens to each page of an unsynced write at a crash.
#[derive(Clone, Copy, Debug)]
pub enum Fate {
    /// The write never reached the disk.
    Lost,
    /// It did.
    Kept,
    /// Only a prefix of this many bytes did.
    Torn(usize),
    /// Garbage reached the disk instead.
    Garbled,
}

impl SimDisk {
    pub(crate) fn new() -> Arc<SimDisk> {
        Arc::new(SimDisk::default())
    }

    /// The ranges of file `name` handed to writeback, in order.
    #[cfg(test)]
    pub(crate) fn written_back(&self, name: &str) -> Vec<(usize, usize)> {
        self.files
            .lock()
            .get(name)
            .map(|f| f.lock().written_back.clone())
            .unwrap_or_default()
    }

    /// The disk after a power loss; `fate` decides each unsynced write.
    pub(crate) fn crash(&self, mut fate: impl FnMut() -> Fate) -> Arc<SimDisk> {
        let after = SimDisk::default();
        for (name, f) in self.files.lock().iter() {
            let f = f.lock();
            let mut image = f.durable.clone();
            let pieces = f.pending.iter().flat_map(|&(off, len)| {
                let end = off + len;
                let mut at = off;
                std::iter::from_fn(move || {
                    (at < end).then(|| {
                        let piece_end = ((at / PAGE + 1) * PAGE).min(end);
                        let piece = (at, piece_end - at);
                        at = piece_end;
                        piece
                    })
                })
            });
            for (off, len) in pieces {
                let Some(dst) = image.get_mut(off..off + len) else {
                    continue;
                };
                let Some(src) = f.live.get(off..off + len) else {
                    continue;
                };
                match fate() {
                    Fate::Lost => {}
                    Fate::Kept => dst.copy_from_slice(src),
                    Fate::Torn(n) => {
                        let n = n % (len + 1);
                        dst[..n].copy_from_slice(&src[..n]);
                    }
                    Fate::Garbled => {
                        for (i, b) in dst.iter_mut().enumerate() {
                            *b = src[i] ^ 0xa5 ^ (i as u8);
                        }
                    }
                }
            }
            after.files.lock().insert(
                name.clone(),
                Arc::new(Mutex::new(SimFile {
                    live: image.clone(),
                    durable: image,
                    pending: Vec::new(),
                    written_back: Vec::new(),
                })),
            );
        }
        Arc::new(after)
    }
}

struct SimSegment(Arc<Mutex<SimFile>>);

impl SegmentFile for SimSegment {
    fn len(&self) -> usize {
        self.0.lock().live.len()
    }
    fn write_at(&self, offset: usize, bytes: &[u8]) -> io::Result<()> {
        let mut f = self.0.lock();
        let dst = f
            .live
            .get_mut(offset..offset + bytes.len())
            .ok_or_else(|| io::Error::other("write past the end of a segment"))?;
        dst.copy_from_slice(bytes);
        f.pending.push((offset, bytes.len()));
        Ok(())
    }
    fn sync(&self, offset: usize, len: usize) -> io::Result<()> {
        let mut f = self.0.lock();
        let end = offset + len;
        let f = &mut *f;
        f.durable[offset..end].copy_from_slice(&f.live[offset..end]);
        // A write is durable once the synced range covers it.
        f.pending.retain(|&(o, l)| !(o >= offset && o + l <= end));
        Ok(())
    }
    fn start_writeback(&self, offset: usize, len: usize) {
        self.0.lock().written_back.push((offset, len));
    }
}

impl Storage for SimDisk {
    fn list(&self) -> io::Result<Vec<String>> {
        Ok(self.files.lock().keys().cloned().collect())
    }
    fn read(&self, name: &str) -> io::Result<Bytes> {
        let files = self.files.lock();
        let f = files.get(name).ok_or(io::ErrorKind::NotFound)?;
        let live = f.lock().live.clone();
        Ok(Bytes::Owned(live))
    }
    fn write_atomic(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        self.files.lock().insert(
            name.to_owned(),
            Arc::new(Mutex::new(SimFile {
                live: bytes.to_vec(),
                durable: bytes.to_vec(),
                pending: Vec::new(),
                written_back: Vec::new(),
            })),
        );
        Ok(())
    }
    fn prepare_segment(
        &self,
        name: &str,
        size: usize,
        header: &[u8],
        _mode: WriteMode,
    ) -> io::Result<()> {
        // Prepared segments are not files of the store: a crash forgets them.
        let mut image = vec![0u8; size];
        image[..header.len()].copy_from_slice(header);
        self.prepared.lock().insert(name.to_owned(), image);
        Ok(())
    }
    fn install_segment(&self, name: &str, _mode: WriteMode) -> io::Result<Box<dyn SegmentFile>> {
        let image = self
            .prepared
            .lock()
            .remove(name)
            .ok_or(io::ErrorKind::NotFound)?;
        let f = Arc::new(Mutex::new(SimFile {
            live: image.clone(),
            durable: image,
            pending: Vec::new(),
            written_back: Vec::new(),
        }));
        self.files.lock().insert(name.to_owned(), f.clone());
        Ok(Box::new(SimSegment(f)))
    }
    fn discard_prepared(&self, name: &str) {
        self.prepared.lock().remove(name);
    }
    fn open_segment(&self, name: &str, _mode: WriteMode) -> io::Result<Box<dyn SegmentFile>> {
        let f = self
            .files
            .lock()
            .get(name)
            .cloned()
            .ok_or(io::ErrorKind::NotFound)?;
        Ok(Box::new(SimSegment(f)))
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        self.files.lock().remove(name);
        Ok(())
    }
    fn path(&self, name: &str) -> PathBuf {
        PathBuf::from("sim").join(name)
    }
}

#[cfg(test)]
mod power_loss {
    use std::collections::HashSet;
    use std::time::Duration;

    use super::*;
    use crate::{Durability, Engine, ManualClock, RecoveryMode};

    fn engine(disk: &Arc<SimDisk>, clock: &Arc<ManualClock>, d: Durability) -> Engine {
        Engine::builder()
            .ttl(Duration::from_secs(3600))
            .segment_size(4096)
            .durability(d)
            .clock(clock.clone())
            .background_sweep(false)
            .open_storage(disk.clone())
            .unwrap()
    }

    /// xorshift: deterministic per seed.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn fate(&mut self) -> Fate {
            match self.next() % 4 {
                0 => Fate::Lost,
                1 => Fate::Kept,
                2 => Fate::Torn(self.next() as usize % 32),
                _ => Fate::Garbled,
            }
        }
    }

    /// Acknowledged `Sync` marks survive any power loss; nothing that was
    /// never written appears; and recovery of the crashed disk is idempotent.
    #[test]
    fn acknowledged_marks_survive_power_loss() {
        let clock = Arc::new(ManualClock::new(1_800_000_000));
        let mut torn_tails_seen = 0;
        for seed in 1..=60u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut disk = SimDisk::new();
            let mut acked: HashSet<u32> = HashSet::new();
            let mut next = 0u32;
            for _round in 0..4 {
                let e = engine(&disk, &clock, Durability::Sync);
                if e.recovery_report().unwrap().truncated_bytes > 0 {
                    torn_tails_seen += 1;
                }
                for &id in &acked {
                    assert!(
                        e.contains(id.to_le_bytes()).unwrap(),
                        "seed {seed}: lost acked {id}"
                    );
                }
                // Never-written ids are absent.
                for id in next..next + 50 {
                    assert!(
                        !e.contains(id.to_le_bytes()).unwrap(),
                        "seed {seed}: phantom {id}"
                    );
                }
                // Some acknowledged single marks, some batches, then
                // unacknowledged writes in flight at the crash.
                for _ in 0..(rng.next() % 150) {
                    assert!(e.check_and_insert(next.to_le_bytes()).unwrap().is_new());
                    acked.insert(next);
                    next += 1;
                }
                let batch: Vec<[u8; 4]> = (next..next + 40).map(|i| i.to_le_bytes()).collect();
                e.check_and_insert_batch(&batch).unwrap();
                acked.extend(next..next + 40);
                next += 40;
                // In flight: written but not acknowledged as durable.
                let pending: Vec<_> = (next..next + 30)
                    .map(|i| e.check_and_insert_deferred(i.to_le_bytes()).unwrap())
                    .filter_map(|d| match d {
                        crate::Deferred::New(m) => Some(m),
                        crate::Deferred::Duplicate => None,
                    })
                    .collect();
                e.commit_without_waiting(&pending);
                next += 30;
                e.abandon(); // power loss: no clean shutdown
                disk = disk.crash(|| rng.fate());
            }
            // Reopening the same crashed disk twice gives the same state.
            let a = engine(&disk, &clock, Durability::Sync);
            let la = a.len();
            drop(a);
            let b = engine(&disk, &clock, Durability::Sync);
            assert_eq!(b.len(), la, "seed {seed}: recovery not idempotent");
        }
        // The crashes really did leave torn tails for recovery to cut.
        assert!(torn_tails_seen > 10, "{torn_tails_seen}");
    }

    /// A log nobody syncs hands each filled piece of its segment to the
    /// kernel's writeback, so the seal at rollover has little left to
    /// wait for; and never a piece a sync already made durable.
    #[test]
    fn an_unsynced_segment_goes_to_writeback_a_chunk_at_a_time() {
        use crate::wal::format::SEGMENT_HEADER_LEN;
        const CHUNK: usize = 64 * 1024; // a 1 MiB segment's
        const MARK: usize = 32; // a mark's record
        let clock = Arc::new(ManualClock::new(1_800_000_000));
        let disk = SimDisk::new();
        let e = Engine::builder()
            .segment_size(1 << 20)
            .durability(Durability::None)
            .clock(clock.clone())
            .background_sweep(false)
            .open_storage(disk.clone())
            .unwrap();
        let segment = disk
            .list()
            .unwrap()
            .into_iter()
            .find(|n| n.ends_with(".seg"))
            .unwrap();
        let mark = |from: u32, n: u32| {
            for start in (from..from + n).step_by(1000) {
                let ids: Vec<[u8; 4]> = (start..start + 1000).map(|i| i.to_le_bytes()).collect();
                assert!(e
                    .check_and_insert_batch(&ids)
                    .unwrap()
                    .iter()
                    .all(|v| v.is_new()));
            }
        };
        mark(0, 20_000);
        let published = SEGMENT_HEADER_LEN + 20_000 * MARK;
        let hints = disk.written_back(&segment);
        // Contiguous from the first record to the last whole chunk.
        assert_eq!(hints.first().map(|h| h.0), Some(SEGMENT_HEADER_LEN));
        for pair in hints.windows(2) {
            assert_eq!(pair[0].0 + pair[0].1, pair[1].0, "{hints:?}");
        }
        let (last, len) = *hints.last().unwrap();
        assert_eq!(last + len, published / CHUNK * CHUNK, "{hints:?}");
        // After a sync, only what it did not cover.
        e.sync().unwrap();
        mark(20_000, 3_000);
        let after = &disk.written_back(&segment)[hints.len()..];
        assert_eq!(
            after,
            [(published, 10 * CHUNK - published), (10 * CHUNK, CHUNK)],
            "{after:?}"
        );
    }

    /// Under None durability nothing is promised across power loss, but
    /// recovery must still succeed and never invent ids.
    #[test]
    fn unsynced_logs_recover_without_phantoms() {
        let clock = Arc::new(ManualClock::new(1_800_000_000));
        for seed in 1..=40u64 {
            let mut rng = Rng(seed.wrapping_mul(0x2545_f491_4f6c_dd1d));
            let disk = SimDisk::new();
            let e = engine(&disk, &clock, Durability::None);
            for i in 0..(rng.next() % 400) as u32 {
                assert!(e.check_and_insert(i.to_le_bytes()).unwrap().is_new());
            }
            e.abandon();
            let crashed = disk.crash(|| rng.fate());
            let e = Engine::builder()
                .segment_size(4096)
                .clock(clock.clone())
                .background_sweep(false)
                .recovery_mode(RecoveryMode::TolerateTornTail)
                .open_storage(crashed)
                .unwrap();
            for i in 400..600u32 {
                assert!(!e.contains(i.to_le_bytes()).unwrap());
            }
        }
    }
}
