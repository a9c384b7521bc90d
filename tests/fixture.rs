//! Checked-in state directories of every format version must keep opening
//! with the same contents. `state-v1` was written by the v1 build and is
//! never regenerated; regenerate the current version's fixture (only when
//! the format version changes) with
//! `SEEN_REGENERATE_FIXTURE=1 cargo test --test fixture`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use seen::{Engine, ManualClock, RecoveryMode, Verdict};

/// The fixture was written at this instant, with a 40-year TTL.
const WRITTEN_AT: u64 = 1_800_000_000;

fn fixture_dir(version: u32) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/state-v{version}"))
}

/// The v2 fixture: 200 marks (every tenth with metadata), one forget.
fn regenerate_v2() {
    let dir = fixture_dir(2);
    let _ = std::fs::remove_dir_all(&dir);
    let e = Engine::builder()
        .ttl(Duration::from_secs(40 * 365 * 24 * 3600))
        .segment_size(4096)
        .clock(Arc::new(ManualClock::new(WRITTEN_AT)))
        .background_sweep(false)
        .open(&dir)
        .unwrap();
    for i in 0..200 {
        let id = format!("fixture-{i}");
        let verdict = if i % 10 == 0 {
            let meta = format!(r#"{{"n":{i}}}"#);
            e.check_and_insert_with_metadata(&id, meta.as_bytes())
        } else {
            e.check_and_insert(&id)
        };
        assert!(verdict.unwrap().is_new());
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
fn format_v1_fixture_opens_with_its_contents_and_is_upgraded() {
    let tmp = open_fixture_checks(1);
    // The store header now says v2 (an older build refuses it instead of
    // misreading kind-3 records); the v1 segments are read as they are.
    let info = seen::inspect::inspect(tmp.path(), WRITTEN_AT, &|_, _| {}).unwrap();
    assert_eq!(info.version, 2);
    assert_eq!(info.segments[0].version, 1);
}

#[test]
fn format_v2_fixture_opens_with_its_contents_and_metadata() {
    if std::env::var_os("SEEN_REGENERATE_FIXTURE").is_some() {
        regenerate_v2();
    }
    let tmp = open_fixture_checks(2);
    let e = Engine::builder()
        .clock(Arc::new(ManualClock::new(WRITTEN_AT + 3600)))
        .background_sweep(false)
        .open(tmp.path())
        .unwrap();
    let m = e.stored_mark("fixture-30").unwrap().unwrap();
    assert_eq!(m.metadata.as_deref(), Some(br#"{"n":30}"#.as_slice()));
    assert!(m.is_live(WRITTEN_AT + 3600));
    assert_eq!(e.stored_mark("fixture-31").unwrap().unwrap().metadata, None);
    drop(e);
    let found = seen::inspect::find(tmp.path(), b"fixture-190")
        .unwrap()
        .unwrap();
    assert_eq!(found.metadata.as_deref(), Some(br#"{"n":190}"#.as_slice()));
    // Read-only, so the checked-in fixture itself can be looked at.
    let forgotten = seen::inspect::find(&fixture_dir(2), b"fixture-7")
        .unwrap()
        .unwrap();
    assert!(forgotten.forgotten);
    // The copy was marked again after the forget by the checks above.
    let again = seen::inspect::find(tmp.path(), b"fixture-7")
        .unwrap()
        .unwrap();
    assert!(!again.forgotten);
}

/// Open a copy of the fixture of `version` (opening writes LOCK, and
/// possibly a new segment) and check what every version's fixture holds.
fn open_fixture_checks(version: u32) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixture_dir(version), tmp.path());
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
    let upgraded = if version < 2 { Some(version) } else { None };
    assert_eq!(r.upgraded_from, upgraded, "{r:?}");
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
    drop(e);
    tmp
}
