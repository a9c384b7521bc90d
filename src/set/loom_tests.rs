//! Loom models of the slot protocol in `table.rs`. Run with
//! `RUSTFLAGS="--cfg seen_loom" cargo test --lib --release loom_`.

use loom::sync::Arc;
use loom::thread;

use super::table::{Insert, Key, Table, Writers};
use crate::fingerprint::Fingerprint;
use crate::ttl::Tick;

const NOW: Tick = Tick(10);
const LATER: Tick = Tick(20);

fn key(lo: u64, check: u64) -> Key {
    Key::new(Fingerprint(lo as u128 | (check as u128) << 64))
}

fn is_new(i: Insert) -> bool {
    matches!(i, Insert::Claimed | Insert::Revived { .. })
}

#[test]
fn loom_racing_inserts_of_one_key_give_one_new() {
    loom::model(|| {
        let t = Arc::new(Table::new(4, 1.0, false));
        let k = key(7, 1);
        let t2 = t.clone();
        let h = thread::spawn(move || t2.insert(k, NOW, LATER, Writers::Many));
        let mine = t.insert(k, NOW, LATER, Writers::Many);
        let theirs = h.join().unwrap();
        assert_eq!(
            is_new(mine) as u8 + is_new(theirs) as u8,
            1,
            "{mine:?} {theirs:?}"
        );
        assert!(t.contains(k, NOW));
    });
}

#[test]
fn loom_colliding_tags_are_both_kept() {
    loom::model(|| {
        let t = Arc::new(Table::new(4, 1.0, false));
        let (a, b) = (key(7, 1), key(7, 2));
        let t2 = t.clone();
        let h = thread::spawn(move || t2.insert(b, NOW, LATER, Writers::Many));
        assert_eq!(t.insert(a, NOW, LATER, Writers::Many), Insert::Claimed);
        assert_eq!(h.join().unwrap(), Insert::Claimed);
        assert!(t.contains(a, NOW) && t.contains(b, NOW));
    });
}

#[test]
fn loom_racing_revivals_give_one_new() {
    loom::model(|| {
        let t = Arc::new(Table::new(4, 1.0, false));
        let k = key(9, 3);
        assert_eq!(
            t.insert(k, Tick(2), Tick(5), Writers::Many),
            Insert::Claimed
        );
        let t2 = t.clone();
        let h = thread::spawn(move || t2.insert(k, NOW, LATER, Writers::Many));
        let mine = t.insert(k, NOW, LATER, Writers::Many);
        let theirs = h.join().unwrap();
        assert_eq!(
            is_new(mine) as u8 + is_new(theirs) as u8,
            1,
            "{mine:?} {theirs:?}"
        );
    });
}

#[test]
fn loom_insert_during_freeze_is_either_drained_or_told_to_retry() {
    loom::model(|| {
        let t = Arc::new(Table::new(4, 1.0, false));
        let k = key(11, 5);
        let t2 = t.clone();
        let h = thread::spawn(move || t2.insert(k, NOW, LATER, Writers::Many));
        let mut drained = Vec::new();
        let live = t.freeze(NOW).live;
        t.frozen_live(NOW, |key, _| drained.push(key));
        assert_eq!(live, drained.len(), "the count and the copy agree");
        let outcome = h.join().unwrap();
        match outcome {
            Insert::Claimed => assert_eq!(drained, vec![k], "a claimed key must be migrated"),
            Insert::Frozen => assert!(drained.is_empty()),
            other => panic!("unexpected {other:?}"),
        }
    });
}
