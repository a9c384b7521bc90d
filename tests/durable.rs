//! The durable engine: state directory, reopen, lock, recovery modes, bad files.

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use seen::{Durability, Engine, Error, ManualClock, RecoveryMode, Verdict};

const START: u64 = 1_800_000_000;
const SEG: usize = 4096;

fn open_with(dir: &Path, clock: &Arc<ManualClock>, mode: RecoveryMode) -> seen::Result<Engine> {
    Engine::builder()
        .ttl(Duration::from_secs(100))
        .segment_size(SEG)
        .durability(Durability::Sync)
        .recovery_mode(mode)
        .clock(clock.clone())
        .background_sweep(false)
        .open(dir)
}

fn open(dir: &Path, clock: &Arc<ManualClock>) -> Engine {
    open_with(dir, clock, RecoveryMode::TolerateTornTail).unwrap()
}

fn segments(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v
}

#[test]
fn marks_survive_reopen_across_many_segments() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(START));
    {
        let e = open(dir.path(), &clock);
        assert!(e.recovery_report().unwrap().created);
        for i in 0..1000u32 {
            assert_eq!(e.check_and_insert(i.to_le_bytes()).unwrap(), Verdict::New);
        }
        assert!(e.forget(7u32.to_le_bytes()).unwrap());
        let batch: Vec<[u8; 4]> = (1000..1500u32).map(|i| i.to_le_bytes()).collect();
        assert!(e
            .check_and_insert_batch(&batch)
            .unwrap()
            .iter()
            .all(|v| v.is_new()));
    }
    assert!(segments(dir.path()).len() > 5, "small segments roll over");
    for _ in 0..3 {
        // Reopening is idempotent.
        let e = open(dir.path(), &clock);
        let r = e.recovery_report().unwrap().clone();
        assert!(!r.created);
        assert_eq!(r.replayed, 1500);
        assert_eq!(r.forgotten, 1);
        assert_eq!(r.truncated_bytes, 0);
        assert_eq!(e.len(), 1499);
        assert!(!e.contains(7u32.to_le_bytes()).unwrap());
        for i in (0..1500u32).filter(|&i| i != 7) {
            assert!(e.contains(i.to_le_bytes()).unwrap(), "{i}");
        }
        assert_eq!(
            e.check_and_insert(3u32.to_le_bytes()).unwrap(),
            Verdict::Duplicate
        );
    }
}

#[test]
fn second_open_is_refused_while_the_first_lives() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(START));
    let e = open(dir.path(), &clock);
    match open_with(dir.path(), &clock, RecoveryMode::TolerateTornTail) {
        Err(Error::Locked { path }) => assert_eq!(path, dir.path()),
        other => panic!("expected Locked, got {other:?}"),
    }
    drop(e);
    open(dir.path(), &clock);
}

#[test]
fn files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let clock = Arc::new(ManualClock::new(START));
    let e = open(&state, &clock);
    assert!(e.check_and_insert("x").unwrap().is_new());
    assert_eq!(
        fs::metadata(&state).unwrap().permissions().mode() & 0o777,
        0o700
    );
    for f in fs::read_dir(&state).unwrap() {
        let f = f.unwrap();
        assert_eq!(
            f.metadata().unwrap().permissions().mode() & 0o777,
            0o600,
            "{:?}",
            f.path()
        );
    }
}

#[test]
fn expired_marks_are_not_replayed_and_their_segments_are_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(START));
    {
        let e = open(dir.path(), &clock);
        for i in 0..500u32 {
            assert!(e.check_and_insert(i.to_le_bytes()).unwrap().is_new());
        }
        clock.advance(Duration::from_secs(50));
        for i in 500..600u32 {
            assert!(e.check_and_insert(i.to_le_bytes()).unwrap().is_new());
        }
    }
    let before = segments(dir.path()).len();
    clock.advance(Duration::from_secs(60)); // the first 500 expired
    let e = open(dir.path(), &clock);
    let r = e.recovery_report().unwrap();
    assert_eq!(r.replayed, 100);
    assert_eq!(r.expired, 500);
    assert!(r.deleted_segments > 0);
    assert!(segments(dir.path()).len() < before);
    assert_eq!(e.len(), 100);
    assert!(!e.contains(1u32.to_le_bytes()).unwrap());
    assert!(e.contains(550u32.to_le_bytes()).unwrap());
}

#[test]
fn secret_lives_in_the_store_header() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(START));
    let fp = open(dir.path(), &clock).fingerprint("a").unwrap();
    assert_eq!(open(dir.path(), &clock).fingerprint("a").unwrap(), fp);
    let other = tempfile::tempdir().unwrap();
    assert_ne!(open(other.path(), &clock).fingerprint("a").unwrap(), fp);
    let wrong = Engine::builder()
        .secret(seen::Secret::from_bytes([1; 16]))
        .open(dir.path());
    assert!(matches!(wrong, Err(Error::Config(_))), "{wrong:?}");
}

fn last_segment_with_marks(dir: &Path, clock: &Arc<ManualClock>, n: u32) -> std::path::PathBuf {
    let e = open(dir, clock);
    for i in 0..n {
        assert!(e.check_and_insert(i.to_le_bytes()).unwrap().is_new());
    }
    drop(e);
    segments(dir).pop().unwrap()
}

#[test]
fn torn_tail_is_cut_by_default_and_refused_under_absolute_consistency() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(START));
    let seg = last_segment_with_marks(dir.path(), &clock, 20);
    // Tear the last record of the last segment.
    let mut b = fs::read(&seg).unwrap();
    let last = 64 + 19 * 32;
    b[last + 12] ^= 0xff;
    fs::write(&seg, &b).unwrap();

    let err = open_with(dir.path(), &clock, RecoveryMode::AbsoluteConsistency).unwrap_err();
    match err {
        Error::Corruption { file, offset, .. } => {
            assert_eq!(file, seg);
            assert_eq!(offset, last as u64);
        }
        other => panic!("{other:?}"),
    }
    let e = open(dir.path(), &clock);
    let r = e.recovery_report().unwrap();
    assert_eq!(r.replayed, 19);
    assert_eq!(r.truncated_bytes, 32);
    assert!(!e.contains(19u32.to_le_bytes()).unwrap());
    assert!(e.contains(18u32.to_le_bytes()).unwrap());
    // Appends go where the cut was, and survive.
    for i in 1000..1010u32 {
        assert!(e.check_and_insert(i.to_le_bytes()).unwrap().is_new());
    }
    drop(e);
    // The cut was made durable: now the log is clean even for the strict mode.
    let e = open_with(dir.path(), &clock, RecoveryMode::AbsoluteConsistency).unwrap();
    assert_eq!(e.len(), 29);
    assert!(e.contains(1009u32.to_le_bytes()).unwrap());
}

#[test]
fn garbage_in_a_sealed_segment_is_an_error_unless_salvaging() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(START));
    last_segment_with_marks(dir.path(), &clock, 500);
    let first = segments(dir.path()).remove(0);
    let mut b = fs::read(&first).unwrap();
    b[64 + 5 * 32 + 3] ^= 0x55;
    fs::write(&first, &b).unwrap();
    let err = open_with(dir.path(), &clock, RecoveryMode::TolerateTornTail).unwrap_err();
    assert!(
        matches!(&err, Error::Corruption { file, offset, .. } if *file == first && *offset == 64 + 5 * 32),
        "{err:?}"
    );
    let e = open_with(dir.path(), &clock, RecoveryMode::Salvage).unwrap();
    let r = e.recovery_report().unwrap();
    assert_eq!(r.salvaged, vec![(first.clone(), 64 + 5 * 32, 32)]);
    assert_eq!(r.replayed, 499);
    assert_eq!(e.len(), 499);
}

#[test]
fn bad_store_files_are_clear_errors() {
    let clock = Arc::new(ManualClock::new(START));
    // Truncated store header.
    let dir = tempfile::tempdir().unwrap();
    last_segment_with_marks(dir.path(), &clock, 3);
    let store = dir.path().join("STORE");
    let b = fs::read(&store).unwrap();
    fs::write(&store, &b[..20]).unwrap();
    assert!(matches!(
        open_with(dir.path(), &clock, RecoveryMode::default()),
        Err(Error::Corruption { .. })
    ));
    // Wrong magic.
    let mut w = b.clone();
    w[0] = b'X';
    fs::write(&store, &w).unwrap();
    let err = open_with(dir.path(), &clock, RecoveryMode::default()).unwrap_err();
    assert!(err.to_string().contains("magic"), "{err}");
    // A future format version (with a valid checksum).
    let mut f = b.clone();
    f[8..12].copy_from_slice(&3u32.to_le_bytes());
    let crc = crc32c_of(&f[..60]);
    f[60..64].copy_from_slice(&crc.to_le_bytes());
    fs::write(&store, &f).unwrap();
    assert!(matches!(
        open_with(dir.path(), &clock, RecoveryMode::Salvage),
        Err(Error::UnsupportedVersion { version: 3, .. })
    ));
    // Missing store header with segments present.
    fs::remove_file(&store).unwrap();
    let err = open_with(dir.path(), &clock, RecoveryMode::default()).unwrap_err();
    assert!(err.to_string().contains("STORE"), "{err}");
}

fn crc32c_of(b: &[u8]) -> u32 {
    // Bitwise CRC32C (Castagnoli), independent of the crate under test.
    let mut crc = !0u32;
    for &byte in b {
        crc ^= byte as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn zero_filled_tail_and_stray_files_are_fine() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(START));
    last_segment_with_marks(dir.path(), &clock, 5);
    fs::write(dir.path().join("notes.txt"), b"hello").unwrap();
    fs::write(dir.path().join("wal-0000000000000099.seg.tmp"), b"half").unwrap();
    let e = open(dir.path(), &clock);
    let r = e.recovery_report().unwrap();
    assert_eq!(r.replayed, 5);
    assert_eq!(r.stray_files, vec!["notes.txt".to_owned()]);
    assert!(!dir.path().join("wal-0000000000000099.seg.tmp").exists());
    assert!(dir.path().join("notes.txt").exists());
}

#[test]
fn garbage_segment_from_another_store_is_refused() {
    let clock = Arc::new(ManualClock::new(START));
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let seg = last_segment_with_marks(a.path(), &clock, 3);
    last_segment_with_marks(b.path(), &clock, 3);
    fs::copy(&seg, b.path().join("wal-0000000000000005.seg")).unwrap();
    let err = open_with(b.path(), &clock, RecoveryMode::default()).unwrap_err();
    assert!(err.to_string().contains("another store"), "{err}");
}

#[test]
fn durability_modes_all_persist_on_clean_shutdown() {
    for d in [
        Durability::None,
        Durability::Periodic(Duration::from_millis(5)),
        Durability::Sync,
    ] {
        let dir = tempfile::tempdir().unwrap();
        {
            let e = Engine::builder()
                .durability(d)
                .segment_size(SEG)
                .open(dir.path())
                .unwrap();
            for i in 0..300u32 {
                assert!(e.check_and_insert(i.to_le_bytes()).unwrap().is_new());
            }
            assert_eq!(e.durability(), Some(d));
        }
        let e = Engine::builder().open(dir.path()).unwrap();
        assert_eq!(e.len(), 300, "{d:?}");
    }
}

#[test]
fn concurrent_appends_across_rollovers_all_replay() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(START));
    let threads = 4u32;
    let per_thread = 3000u32;
    {
        let e = Arc::new(open(dir.path(), &clock));
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let e = e.clone();
                std::thread::spawn(move || {
                    for i in 0..per_thread {
                        let id = (t * 1_000_000 + i).to_le_bytes();
                        if i % 3 == 0 {
                            let batch: Vec<[u8; 4]> = (0..7)
                                .map(|j| (t * 1_000_000 + 500_000 + i * 7 + j).to_le_bytes())
                                .collect();
                            assert!(e
                                .check_and_insert_batch(&batch)
                                .unwrap()
                                .iter()
                                .all(|v| v.is_new()));
                        }
                        assert!(e.check_and_insert(id).unwrap().is_new());
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    }
    assert!(
        segments(dir.path()).len() > 20,
        "tiny segments rolled over many times"
    );
    let e = open_with(dir.path(), &clock, RecoveryMode::AbsoluteConsistency).unwrap();
    let expected = threads as u64 * (per_thread as u64 + 1000 * 7);
    assert_eq!(e.recovery_report().unwrap().replayed, expected);
    for t in 0..threads {
        for i in (0..per_thread).step_by(37) {
            assert!(e.contains((t * 1_000_000 + i).to_le_bytes()).unwrap());
        }
    }
}

#[test]
fn large_logs_replay_in_parallel_lanes_with_per_id_order_kept() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(START));
    let n = 300_000u32; // above the parallel-replay threshold
    {
        let e = Engine::builder()
            .ttl(Duration::from_secs(100))
            .segment_size(1 << 20)
            .durability(Durability::None)
            .clock(clock.clone())
            .background_sweep(false)
            .open(dir.path())
            .unwrap();
        let ids: Vec<[u8; 4]> = (0..n).map(|i| i.to_le_bytes()).collect();
        for chunk in ids.chunks(1000) {
            assert!(e
                .check_and_insert_batch(chunk)
                .unwrap()
                .iter()
                .all(|v| v.is_new()));
        }
        // Forget every 10th id; re-mark every 20th after forgetting it:
        // the log holds mark, forget, mark for those.
        for i in (0..n).step_by(10) {
            assert!(e.forget(i.to_le_bytes()).unwrap());
        }
        for i in (0..n).step_by(20) {
            assert!(e.check_and_insert(i.to_le_bytes()).unwrap().is_new());
        }
    }
    let e = open_with(dir.path(), &clock, RecoveryMode::AbsoluteConsistency).unwrap();
    let r = e.recovery_report().unwrap();
    assert_eq!(r.replayed, n as u64 + n as u64 / 20);
    assert_eq!(r.forgotten, n as u64 / 10);
    assert_eq!(e.len() as u32, n - n / 10 + n / 20);
    for i in (0..n).step_by(5) {
        let expect = i % 10 != 0 || i % 20 == 0;
        assert_eq!(e.contains(i.to_le_bytes()).unwrap(), expect, "id {i}");
    }
}

/// A new store starts with a 1 MiB segment and doubles up to the segment
/// size, so a small store does not take 64 MiB of disk.
#[test]
fn segments_grow_from_small_to_the_configured_size() {
    let dir = tempfile::tempdir().unwrap();
    let e = Engine::builder()
        .segment_size(4 << 20)
        .durability(Durability::None)
        .background_sweep(false)
        .open(dir.path())
        .unwrap();
    let len = |seq: u64| {
        fs::metadata(dir.path().join(format!("wal-{seq:016x}.seg")))
            .map(|m| m.len())
            .unwrap_or(0)
    };
    assert_eq!(len(1), 1 << 20);
    // 32-byte marks: ~7 MiB of them fill 1 + 2 + 4 MiB segments.
    let ids: Vec<String> = (0..230_000).map(|i| format!("grow-{i}")).collect();
    for chunk in ids.chunks(1000) {
        e.check_and_insert_batch(chunk).unwrap();
    }
    assert_eq!((len(2), len(3), len(4)), (2 << 20, 4 << 20, 4 << 20));
    drop(e);
    let e = Engine::builder().open(dir.path()).unwrap();
    assert_eq!(e.recovery_report().unwrap().replayed, 230_000);
    assert!(e.contains("grow-0").unwrap() && e.contains("grow-229999").unwrap());
}

#[test]
fn the_next_segment_is_prepared_ahead_and_never_left_behind() {
    let tmp_files = |dir: &Path| -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect()
    };
    for durability in [
        Durability::Sync,
        Durability::None,
        Durability::Periodic(Duration::from_millis(5)),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let open = || {
            Engine::builder()
                .segment_size(4 << 20)
                .durability(durability)
                .background_sweep(false)
                .open(dir.path())
                .unwrap()
        };
        let e = open();
        // Past half of the first (1 MiB) segment: the second is prepared
        // as a temporary file, not yet a segment of the store.
        let ids: Vec<String> = (0..20_000).map(|i| format!("{durability:?}-{i}")).collect();
        e.check_and_insert_batch(&ids).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while tmp_files(dir.path()).is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(
            tmp_files(dir.path()),
            ["wal-0000000000000002.seg.tmp"],
            "{durability:?}"
        );
        assert_eq!(segments(dir.path()).len(), 1, "{durability:?}");
        // Dropped before its rollover: the prepared file goes with it.
        drop(e);
        assert!(tmp_files(dir.path()).is_empty(), "{durability:?}");
        // Filled past the end: the prepared file becomes segment 2, with
        // the size a rollover gives it, and everything replays.
        let e = open();
        let more: Vec<String> = (0..40_000)
            .map(|i| format!("{durability:?}-more-{i}"))
            .collect();
        e.check_and_insert_batch(&more).unwrap();
        drop(e);
        let names = segments(dir.path());
        assert_eq!(names.len(), 2, "{durability:?}: {names:?}");
        assert_eq!(fs::metadata(&names[1]).unwrap().len(), 2 << 20);
        assert!(tmp_files(dir.path()).is_empty(), "{durability:?}");
        let e = Engine::builder().open(dir.path()).unwrap();
        assert_eq!(
            e.recovery_report().unwrap().replayed,
            60_000,
            "{durability:?}"
        );
    }
}

/// [`open`] with the default segment sizes (1 MiB first, doubling).
fn open_default_segments(dir: &Path, clock: &Arc<ManualClock>) -> Engine {
    Engine::builder()
        .ttl(Duration::from_secs(100))
        .durability(Durability::Sync)
        .clock(clock.clone())
        .background_sweep(false)
        .open(dir)
        .unwrap()
}

/// A `Sync` store reopened with its last record ending inside a page, then
/// appended to by several syncs: the syncs write whole pages of the
/// staging buffer, which must never cover the records the earlier process
/// wrote (the new process never staged them) nor the segment header.
#[test]
fn reopened_sync_store_keeps_the_records_before_its_first_new_sync() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(START));
    let open_big = || open_default_segments(dir.path(), &clock);
    let mut expected = Vec::new();
    for round in 0..4u32 {
        let e = open_big();
        for id in &expected {
            assert_eq!(
                e.check_and_insert(id).unwrap(),
                Verdict::Duplicate,
                "round {round}: {id} lost"
            );
        }
        // 3 new marks per round, each its own sync: 96 bytes, so every
        // round starts and ends inside a 4 KiB page.
        for i in 0..3 {
            let id = format!("r{round}-{i}");
            assert_eq!(e.check_and_insert(&id).unwrap(), Verdict::New);
            expected.push(id);
        }
    }
    let e = open_big();
    assert_eq!(e.len(), expected.len());
}

/// One `Sync` call whose records span more than the sync's 1 MiB copy
/// buffer (40k marks, 1.3 MB, in the store's second segment, of 2 MiB):
/// written in several pieces, all replayed.
#[test]
fn a_sync_larger_than_the_copy_buffer_is_written_whole() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(START));
    let open_big = || open_default_segments(dir.path(), &clock);
    // 33k marks fill the first segment (1 MiB) and roll over.
    let fill: Vec<String> = (0..33_000).map(|i| format!("fill-{i}")).collect();
    let ids: Vec<String> = (0..40_000).map(|i| format!("big-{i}")).collect();
    {
        let e = open_big();
        assert!(e
            .check_and_insert_batch(&fill)
            .unwrap()
            .iter()
            .all(|v| *v == Verdict::New));
        let verdicts = e.check_and_insert_batch(&ids).unwrap();
        assert!(verdicts.iter().all(|v| *v == Verdict::New));
        assert_eq!(
            segments(dir.path()).len(),
            2,
            "all 40k in the second segment"
        );
    }
    let e = open_big();
    assert_eq!(e.len(), fill.len() + ids.len());
    assert!(e.contains_batch(&ids).unwrap().iter().all(|&f| f));
}
