//! A format-v1 state directory, checked in, must keep opening with the same
//! contents. Regenerate (only when the format version changes) with
//! `SEEN_REGENERATE_FIXTURE=1 cargo test --test fixture`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use seen::{Engine, ManualClock, RecoveryMode, Verdict};

/// The fixture was written at this instant, with a 40-year TTL.
const WRITTEN_AT: u64 = 1_800_000_000;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/state-v1")
}

fn regenerate() {
    let dir = fixture_dir();
    let _ = std::fs::remove_dir_all(&dir);
    let e = Engine::builder()
        .ttl(Duration::from_secs(40 * 365 * 24 * 3600))
        .segment_size(4096)
        .clock(Arc::new(ManualClock::new(WRITTEN_AT)))
        .background_sweep(false)
        .open(&dir)
        .unwrap();
    for i in 0..200 {
        assert!(e.check_and_insert(format!("fixture-{i}")).unwrap().is_new());
    }
    assert!(e.forget("fixture-7").unwrap());
    drop(e);
    std::fs::remove_file(dir.join("LOCK")).unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in std::fs::read_dir(from).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), to.join(f.file_name())).unwrap();
    }
}

#[test]
fn format_v1_fixture_opens_with_its_contents() {
    if std::env::var_os("SEEN_REGENERATE_FIXTURE").is_some() {
        regenerate();
    }
    // Open a copy: opening writes (LOCK, and possibly a new segment).
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixture_dir(), tmp.path());
    let clock = Arc::new(ManualClock::new(WRITTEN_AT + 3600));
    let e = Engine::builder()
        .clock(clock)
        .recovery_mode(RecoveryMode::AbsoluteConsistency)
        .background_sweep(false)
        .open(tmp.path())
        .unwrap();
    let r = e.recovery_report().unwrap().clone();
    assert!(
        matches!(
            (r.created, r.replayed, r.forgotten, r.truncated_bytes),
            (false, 200, 1, 0)
        ),
        "{r:?}"
    );
    assert!(r.segments >= 2, "the fixture spans segments: {r:?}");
    assert_eq!(e.len(), 199);
    assert!(e.contains("fixture-0").unwrap());
    assert!(e.contains("fixture-199").unwrap());
    assert!(!e.contains("fixture-7").unwrap());
    assert!(!e.contains("fixture-200").unwrap());
    // The secret came from the fixture's header: fingerprints are stable.
    assert_eq!(
        e.check_and_insert("fixture-42").unwrap(),
        Verdict::Duplicate
    );
    assert_eq!(e.check_and_insert("fixture-7").unwrap(), Verdict::New);
}
