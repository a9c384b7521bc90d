//! Durable dedup, same stream, same run: seen (Sync group commit and
//! Periodic) against redb, an embedded store a user might pick instead
//! (insert-if-absent in one write transaction per batch, durability
//! Immediate = fsync per commit). Batches of 1000 events, 25 % duplicates,
//! 2 writer threads. See docs/benchmarks.md.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use redb::{Database, ReadableTable, TableDefinition};
use seen::{Durability, Engine};

const BATCH: u64 = 1000;
const TABLE: TableDefinition<&[u8], u64> = TableDefinition::new("processed");
static FRESH: AtomicU64 = AtomicU64::new(0);

fn id(n: u64) -> [u8; 36] {
    let mut b = [b'0'; 36];
    let s = format!("{:016x}-{:019x}", n.wrapping_mul(0x9e37_79b9_7f4a_7c15), n);
    b[..s.len().min(36)].copy_from_slice(&s.as_bytes()[..s.len().min(36)]);
    b
}

/// The batch starting at `base`: every 4th id repeats one of the batch.
fn batch(base: u64) -> Vec<[u8; 36]> {
    (0..BATCH)
        .map(|k| {
            if k % 4 == 3 {
                id(base + k / 2)
            } else {
                id(base + k)
            }
        })
        .collect()
}

fn run_threads(iters: u64, f: impl Fn(Vec<[u8; 36]>) + Sync) -> Duration {
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                for _ in 0..iters {
                    f(batch(FRESH.fetch_add(BATCH, Ordering::Relaxed)));
                }
            });
        }
    });
    start.elapsed()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("durable-25pct-dup-batch1000-2t");
    g.throughput(Throughput::Elements(2 * BATCH))
        .sample_size(10)
        .measurement_time(Duration::from_secs(4));
    for (name, durability) in [
        ("seen-sync", Durability::Sync),
        (
            "seen-periodic-10ms",
            Durability::Periodic(Duration::from_millis(10)),
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let engine = Arc::new(
            Engine::builder()
                .durability(durability)
                .open(dir.path())
                .unwrap(),
        );
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                run_threads(iters, |ids| {
                    engine.check_and_insert_batch(&ids).unwrap();
                })
            })
        });
    }
    let dir = tempfile::tempdir().unwrap();
    let db = Database::create(dir.path().join("dedup.redb")).unwrap();
    g.bench_function("redb-immediate", |b| {
        b.iter_custom(|iters| {
            run_threads(iters, |ids| {
                let tx = db.begin_write().unwrap();
                {
                    let mut t = tx.open_table(TABLE).unwrap();
                    for id in &ids {
                        if t.get(id.as_slice()).unwrap().is_none() {
                            t.insert(id.as_slice(), 0).unwrap();
                        }
                    }
                }
                tx.commit().unwrap();
            })
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
