//! High contention: many threads race on the same ids while tables grow.
//! Exactly one `New` per distinct id, whatever the interleaving.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use seen::{Engine, Verdict};

fn race(engine: Arc<Engine>, threads: usize, ids: u32, rounds: u32, batch: bool) -> usize {
    let new = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (engine, new, barrier) = (engine.clone(), new.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                for r in 0..rounds {
                    // Each thread walks a different permutation of the ids
                    // (7919 is prime and coprime to the id counts used).
                    let order: Vec<u32> = (0..ids)
                        .map(|i| {
                            ((i as u64 * 7919 + t as u64 * 104_729 + r as u64) % ids as u64) as u32
                        })
                        .collect();
                    if batch {
                        for chunk in order.chunks(64) {
                            let keys: Vec<[u8; 4]> =
                                chunk.iter().map(|i| i.to_le_bytes()).collect();
                            let v = engine.check_and_insert_batch(&keys).unwrap();
                            new.fetch_add(
                                v.iter().filter(|v| v.is_new()).count(),
                                Ordering::Relaxed,
                            );
                        }
                    } else {
                        for i in order {
                            if engine.check_and_insert(i.to_le_bytes()).unwrap() == Verdict::New {
                                new.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    new.load(Ordering::Relaxed)
}

fn growing_engine() -> Arc<Engine> {
    // One shard, smallest table: the race runs through many migrations.
    Arc::new(Engine::builder().shards(1).build().unwrap())
}

#[test]
fn racing_inserts_through_migrations_give_exactly_one_new_per_id() {
    let threads = 4;
    let ids = 200_000;
    let engine = growing_engine();
    assert_eq!(race(engine.clone(), threads, ids, 2, false), ids as usize);
    assert_eq!(engine.len(), ids as usize);
    let s = engine.stats();
    assert_eq!(s.new, ids as u64);
    assert_eq!(s.duplicate, (threads as u64 * 2 - 1) * ids as u64);
}

#[test]
fn racing_batches_give_exactly_one_new_per_id() {
    let engine = Arc::new(Engine::builder().shards(4).build().unwrap());
    assert_eq!(race(engine.clone(), 3, 100_000, 2, true), 100_000);
}

#[test]
fn racing_batches_with_repeats_decide_each_id_in_batch_order() {
    // Each batch holds its ids twice, while tables grow under three
    // threads: a batch may decide a migrating shard's ids last, but the
    // second copy of an id is never the new one.
    let engine = Arc::new(Engine::builder().shards(4).build().unwrap());
    let new = Arc::new(AtomicUsize::new(0));
    let ids = 60_000u32;
    let handles: Vec<_> = (0..3u64)
        .map(|t| {
            let (engine, new) = (engine.clone(), new.clone());
            std::thread::spawn(move || {
                let order: Vec<u32> = (0..ids)
                    .map(|i| ((i as u64 * 7919 + t * 104_729) % ids as u64) as u32)
                    .collect();
                for chunk in order.chunks(100) {
                    let keys: Vec<[u8; 4]> = chunk
                        .iter()
                        .chain(chunk.iter().rev())
                        .map(|i| i.to_le_bytes())
                        .collect();
                    let v = engine.check_and_insert_batch(&keys).unwrap();
                    let (first, second) = v.split_at(chunk.len());
                    assert!(second.iter().all(|v| *v == Verdict::Duplicate), "{v:?}");
                    new.fetch_add(
                        first.iter().filter(|v| v.is_new()).count(),
                        Ordering::Relaxed,
                    );
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(new.load(Ordering::Relaxed), ids as usize);
    assert_eq!(engine.len(), ids as usize);
}

#[test]
fn hot_single_id_is_new_exactly_once() {
    let engine = growing_engine();
    let new = race(engine, 8, 1, 2000, false);
    assert_eq!(new, 1);
}

#[test]
fn forget_and_reinsert_race_stays_consistent() {
    // Threads alternately forget and insert a small set of ids. Every
    // successful forget must be followed by exactly one New for that id
    // (by someone), so: New count == ids + successful forgets.
    let engine = Arc::new(
        Engine::builder()
            .shards(1)
            .ttl(Duration::from_secs(3600))
            .build()
            .unwrap(),
    );
    let forgets = Arc::new(AtomicUsize::new(0));
    let news = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..4)
        .map(|t| {
            let (engine, forgets, news) = (engine.clone(), forgets.clone(), news.clone());
            std::thread::spawn(move || {
                for n in 0..20_000u32 {
                    let id = (n % 16).to_le_bytes();
                    if (n + t) % 3 == 0 {
                        if engine.forget(id).unwrap() {
                            forgets.fetch_add(1, Ordering::Relaxed);
                        }
                    } else if engine.check_and_insert(id).unwrap().is_new() {
                        news.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let live = (0..16u32)
        .filter(|i| engine.contains(i.to_le_bytes()).unwrap())
        .count();
    // Each id: News - Forgets == 1 if live at the end, else 0.
    assert_eq!(
        news.load(Ordering::Relaxed) - forgets.load(Ordering::Relaxed),
        live
    );
    assert_eq!(engine.len(), live);
}
