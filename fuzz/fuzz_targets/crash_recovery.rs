//! An operation sequence, then a power loss with fuzz-chosen fates for the
//! unsynced writes, checked against a model: every acknowledged (Sync) mark
//! survives, every acknowledged forget stays forgotten, and ids never
//! written are absent.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use seen::fuzzing::{Disk, Fate};
use seen::{Durability, RecoveryMode, Verdict};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Model {
    Marked,
    Forgotten,
}

fuzz_target!(|data: &[u8]| {
    let mut disk = Disk::default();
    let mut model: HashMap<u8, Model> = HashMap::new();
    let mut bytes = data.iter().copied();
    let mut rounds = 0;
    while rounds < 4 {
        rounds += 1;
        let e = match disk.open(Durability::Sync, RecoveryMode::TolerateTornTail) {
            Ok(e) => e,
            Err(err) => panic!("recovery failed after a crash: {err}"),
        };
        for (&id, &state) in &model {
            let present = e.contains([id, 0xAA]).unwrap();
            match state {
                Model::Marked => assert!(present, "acknowledged mark {id} lost"),
                Model::Forgotten => assert!(!present, "acknowledged forget {id} undone"),
            }
        }
        // Ops until a crash byte (0xFF) or the end of input.
        loop {
            let Some(op) = bytes.next() else { break };
            if op == 0xFF {
                break;
            }
            let id = op & 0x3F;
            match op >> 6 {
                0 | 1 => {
                    let v = e.check_and_insert([id, 0xAA]).unwrap();
                    let was = model.insert(id, Model::Marked);
                    assert_eq!(v == Verdict::New, was != Some(Model::Marked), "id {id}");
                }
                2 => {
                    let removed = e.forget([id, 0xAA]).unwrap();
                    assert_eq!(removed, model.get(&id) == Some(&Model::Marked));
                    if removed {
                        model.insert(id, Model::Forgotten);
                    }
                }
                _ => {
                    // Unacknowledged: logged, crash before it is synced.
                    if let Ok(seen::Deferred::New(m)) = e.check_and_insert_deferred([id, 0x55]) {
                        seen::fuzzing::commit_without_waiting(&e, &[m]);
                    }
                }
            }
        }
        seen::fuzzing::power_loss(e);
        let mut fates = bytes.clone();
        disk = disk.crash(|| match fates.next().unwrap_or(0) % 4 {
            0 => Fate::Lost,
            1 => Fate::Kept,
            2 => Fate::Torn(fates.next().unwrap_or(0) as usize),
            _ => Fate::Garbled,
        });
    }
    let e = disk
        .open(Durability::Sync, RecoveryMode::TolerateTornTail)
        .unwrap();
    for id in 0..64u8 {
        if !model.contains_key(&id) {
            assert!(
                !e.contains([id, 0xAA]).unwrap(),
                "never-written {id} present"
            );
        }
    }
});
