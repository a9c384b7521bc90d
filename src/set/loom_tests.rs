//! Loom models of the slot protocol in `table.rs`. Run with
//! `RUSTFLAGS="--cfg seen_loom" cargo test --lib --release loom_`.

use loom::sync::Arc;
use loom::thread;

use super::table::Stamp;
use super::table::{Insert, Key, Settle, Table, Writers, IN_FLIGHT, IN_FLIGHT_WAITED};
use crate::fingerprint::Fingerprint;

const NOW: Stamp = Stamp(10);
const LATER: Stamp = Stamp(20);

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
            t.insert(k, Stamp(2), Stamp(5), Writers::Many),
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

/// A claim in flight settles while the same key is inserted: the insert
/// sees the claim (in flight) or the mark (duplicate), never a new key.
#[test]
fn loom_settling_a_claim_never_lets_a_racing_insert_in() {
    loom::model(|| {
        let t = Arc::new(Table::new(4, 1.0, false));
        let k = key(13, 3);
        assert_eq!(t.insert(k, NOW, IN_FLIGHT, Writers::Many), Insert::Claimed);
        let t2 = t.clone();
        let h = thread::spawn(move || t2.insert(k, NOW, LATER, Writers::Many));
        let settled = t.settle(k, LATER);
        let racing = h.join().unwrap();
        assert_eq!(settled, Settle::Settled { waited: false });
        assert!(
            matches!(racing, Insert::InFlight | Insert::Duplicate),
            "{racing:?}"
        );
        assert!(t.contains(k, NOW));
    });
}

/// A waiter flags the claim while its claimant settles it: the claimant
/// hears of the waiter exactly when the flag was set.
#[test]
fn loom_a_waiter_is_seen_exactly_when_its_flag_took() {
    loom::model(|| {
        let t = Arc::new(Table::new(4, 1.0, false));
        let k = key(17, 4);
        assert_eq!(t.insert(k, NOW, IN_FLIGHT, Writers::Many), Insert::Claimed);
        let t2 = t.clone();
        let h = thread::spawn(move || t2.settle(k, IN_FLIGHT_WAITED));
        let settled = t.settle(k, Stamp::DEAD);
        let flagged = h.join().unwrap();
        match flagged {
            Settle::Settled { .. } => assert_eq!(settled, Settle::Settled { waited: true }),
            Settle::NotInFlight => assert_eq!(settled, Settle::Settled { waited: false }),
            Settle::Frozen => panic!("no freeze here"),
        }
        assert!(!t.contains(k, NOW), "released");
    });
}

/// A released claim is claimed again by a racing insert, or the insert
/// saw it in flight: one or the other, and the key ends up as it says.
#[test]
fn loom_a_released_claim_can_be_taken_again() {
    loom::model(|| {
        let t = Arc::new(Table::new(4, 1.0, false));
        let k = key(19, 5);
        assert_eq!(t.insert(k, NOW, IN_FLIGHT, Writers::Many), Insert::Claimed);
        let t2 = t.clone();
        let h = thread::spawn(move || t2.insert(k, NOW, LATER, Writers::Many));
        t.settle(k, Stamp::DEAD);
        match h.join().unwrap() {
            Insert::Revived { was_forgotten } => {
                assert!(was_forgotten);
                assert!(t.contains(k, NOW));
            }
            Insert::InFlight => assert!(!t.contains(k, NOW)),
            other => panic!("unexpected {other:?}"),
        }
    });
}

/// Settling while the table freezes: the claim is settled before the
/// freeze (and migrated with its real expiry) or told to retry.
#[test]
fn loom_settle_during_freeze_is_either_migrated_or_told_to_retry() {
    loom::model(|| {
        let t = Arc::new(Table::new(4, 1.0, false));
        let k = key(23, 6);
        assert_eq!(t.insert(k, NOW, IN_FLIGHT, Writers::Many), Insert::Claimed);
        let t2 = t.clone();
        let h = thread::spawn(move || t2.settle(k, LATER));
        let mut drained = Vec::new();
        t.freeze(NOW);
        t.frozen_live(NOW, |key, expiry| drained.push((key, expiry)));
        match h.join().unwrap() {
            Settle::Settled { waited } => {
                assert!(!waited);
                assert_eq!(drained, vec![(k, LATER)]);
            }
            Settle::Frozen => assert_eq!(drained, vec![(k, IN_FLIGHT)]),
            Settle::NotInFlight => panic!("the claim was in flight"),
        }
    });
}
