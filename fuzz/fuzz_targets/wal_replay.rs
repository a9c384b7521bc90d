//! Arbitrary damage to real segment files: recovery never panics, and what
//! it recovers was written (at most the marks written, never a phantom).
#![no_main]

use libfuzzer_sys::fuzz_target;
use seen::fuzzing::Disk;
use seen::{Durability, RecoveryMode};

fuzz_target!(|data: &[u8]| {
    let Some((&n, edits)) = data.split_first() else {
        return;
    };
    let written = n as u32 * 2;
    let disk = Disk::default();
    {
        let e = disk
            .open(Durability::None, RecoveryMode::default())
            .unwrap();
        for i in 0..written {
            let _ = e.check_and_insert(i.to_le_bytes()).unwrap();
        }
    }
    // Edits: (file selector, offset lo, offset hi, byte) → overwrite; a
    // selector with the top bit set truncates the file at the offset, or
    // (for STORE) replaces it wholesale with the remaining input.
    let files = disk.files();
    for edit in edits.chunks_exact(4) {
        let name = &files[edit[0] as usize % files.len()];
        let mut bytes = disk.read(name);
        if bytes.is_empty() {
            continue;
        }
        let off = u16::from_le_bytes([edit[1], edit[2]]) as usize % bytes.len();
        if edit[0] & 0x80 != 0 {
            bytes.truncate(off);
        } else {
            bytes[off] = edit[3];
        }
        disk.write(name, &bytes);
    }
    for mode in [
        RecoveryMode::TolerateTornTail,
        RecoveryMode::AbsoluteConsistency,
        RecoveryMode::Salvage,
    ] {
        if let Ok(e) = disk.open(Durability::None, mode) {
            assert!(e.len() as u32 <= written, "{} > {written}", e.len());
            for i in written..written + 64 {
                assert!(!e.contains(i.to_le_bytes()).unwrap(), "phantom {i}");
            }
        }
    }
});
