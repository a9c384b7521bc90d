//! Injected I/O failures: each gives an error or a poisoned engine, never a
//! silent loss. Built only with `--features failpoints`.

use std::path::Path;
use std::time::Duration;

use fail::FailScenario;
use seen::{Durability, Engine, Error, Verdict};

fn open(dir: &Path) -> seen::Result<Engine> {
    Engine::builder()
        .durability(Durability::Sync)
        .segment_size(4096)
        .ttl(Duration::from_secs(3600))
        .background_sweep(false)
        .open(dir)
}

fn fill_until_error(e: &Engine, acked: &mut Vec<u32>) -> Error {
    for i in 0..10_000u32 {
        match e.check_and_insert(i.to_le_bytes()) {
            Ok(Verdict::New) => acked.push(i),
            Ok(Verdict::Duplicate) => panic!("{i} duplicate"),
            Err(err) => return err,
        }
    }
    panic!("no error was injected");
}

fn reopen_has_all(dir: &Path, acked: &[u32]) {
    let e = open(dir).unwrap();
    for i in acked {
        assert!(
            e.contains(i.to_le_bytes()).unwrap(),
            "acknowledged {i} lost"
        );
    }
}

#[test]
fn full_disk_at_store_creation_is_a_clear_error() {
    let _s = FailScenario::setup();
    fail::cfg("wal::preallocate", "return").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let err = open(dir.path()).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("No space left"), "{err}");
    fail::remove("wal::preallocate");
    open(dir.path()).unwrap();
}

#[test]
fn full_disk_at_segment_rollover_poisons_and_loses_nothing_acknowledged() {
    let _s = FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let mut acked = Vec::new();
    {
        let e = open(dir.path()).unwrap();
        fail::cfg("wal::preallocate", "return").unwrap();
        let err = fill_until_error(&e, &mut acked);
        assert!(
            matches!(err, Error::Poisoned { ref reason } if reason.contains("No space left")),
            "{err:?}"
        );
        // Sticky: the next call fails too, and the refused id was not kept.
        let refused = acked.len() as u32;
        assert!(matches!(
            e.check_and_insert(999_999u32.to_le_bytes()),
            Err(Error::Poisoned { .. })
        ));
        assert!(!e.contains(refused.to_le_bytes()).unwrap());
        fail::remove("wal::preallocate");
        assert!(matches!(
            e.check_and_insert(999_998u32.to_le_bytes()),
            Err(Error::Poisoned { .. })
        ));
    }
    assert!(acked.len() > 50);
    reopen_has_all(dir.path(), &acked);
}

#[test]
fn failed_msync_poisons_for_good() {
    let _s = FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let mut acked = Vec::new();
    {
        let e = open(dir.path()).unwrap();
        for i in 0..10u32 {
            assert!(e.check_and_insert(i.to_le_bytes()).unwrap().is_new());
            acked.push(i);
        }
        fail::cfg("wal::msync", "return").unwrap();
        let err = e.check_and_insert(10u32.to_le_bytes()).unwrap_err();
        assert!(matches!(err, Error::Poisoned { .. }), "{err:?}");
        fail::remove("wal::msync");
        // Never retried as if nothing happened: the sync would now succeed,
        // but the engine stays poisoned, and answers nothing it cannot back.
        assert!(matches!(
            e.check_and_insert(11u32.to_le_bytes()),
            Err(Error::Poisoned { .. })
        ));
        assert!(matches!(
            e.check_and_insert(10u32.to_le_bytes()),
            Err(Error::Poisoned { .. })
        ));
        assert!(matches!(e.sync(), Err(Error::Poisoned { .. })));
    }
    reopen_has_all(dir.path(), &acked);
}

#[test]
fn failed_pwrite_poisons_and_keeps_no_phantom() {
    let _s = FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let mut acked = Vec::new();
    {
        // `Sync` stages appends and writes them with pwrite at the group
        // commit: a failed write poisons the log, and the id is not
        // acknowledged.
        let e = open(dir.path()).unwrap();
        for i in 0..10u32 {
            assert!(e.check_and_insert(i.to_le_bytes()).unwrap().is_new());
            acked.push(i);
        }
        fail::cfg("wal::pwrite", "return").unwrap();
        let err = e.check_and_insert(10u32.to_le_bytes()).unwrap_err();
        assert!(
            matches!(err, Error::Poisoned { ref reason } if reason.contains("pwrite")),
            "{err:?}"
        );
        fail::remove("wal::pwrite");
        assert!(matches!(
            e.check_and_insert(11u32.to_le_bytes()),
            Err(Error::Poisoned { .. })
        ));
    }
    reopen_has_all(dir.path(), &acked);
    let e = open(dir.path()).unwrap();
    assert!(!e.contains(10u32.to_le_bytes()).unwrap(), "no phantom");
}

#[test]
fn failed_rename_write_or_dir_sync_at_rollover_poisons() {
    for point in ["wal::rename", "wal::sync_dir", "wal::write"] {
        let _s = FailScenario::setup();
        let dir = tempfile::tempdir().unwrap();
        let mut acked = Vec::new();
        {
            let e = open(dir.path()).unwrap();
            fail::cfg(point, "return").unwrap();
            let err = fill_until_error(&e, &mut acked);
            assert!(
                matches!(err, Error::Poisoned { ref reason } if reason.contains("failpoint")),
                "{point}: {err:?}"
            );
            fail::remove(point);
        }
        reopen_has_all(dir.path(), &acked);
        // No half-made segment is left to confuse the next open.
        assert!(std::fs::read_dir(dir.path()).unwrap().all(|f| !f
            .unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with(".tmp")));
    }
}

#[test]
fn failed_store_header_write_is_an_error_and_retryable() {
    let _s = FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    fail::cfg("wal::rename", "return").unwrap();
    let err = open(dir.path()).unwrap_err();
    assert!(err.to_string().contains("STORE"), "{err}");
    fail::remove("wal::rename");
    let e = open(dir.path()).unwrap();
    assert!(e.recovery_report().unwrap().created);
}

/// A filesystem that refuses the log's `O_DIRECT` writes (alignment, or no
/// direct I/O): the sync goes through the page cache instead, no error,
/// nothing lost.
#[test]
fn a_refused_direct_write_falls_back_to_the_page_cache() {
    let _s = FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let open_64k = || {
        Engine::builder()
            .durability(Durability::Sync)
            .segment_size(64 << 10)
            .ttl(Duration::from_secs(3600))
            .background_sweep(false)
            .open(dir.path())
            .unwrap()
    };
    let acked: Vec<u32> = (0..3000).collect();
    {
        let e = open_64k();
        fail::cfg("wal::odirect", "return").unwrap();
        // Each call its own sync; past the first page of each segment the
        // syncs are whole pages, tried direct first.
        for i in &acked {
            assert_eq!(e.check_and_insert(i.to_le_bytes()).unwrap(), Verdict::New);
        }
        fail::remove("wal::odirect");
    }
    let e = open_64k();
    assert_eq!(e.len(), acked.len());
    for i in &acked {
        assert!(
            e.contains(i.to_le_bytes()).unwrap(),
            "acknowledged {i} lost"
        );
    }
}
