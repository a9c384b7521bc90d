//! Guard overhead per event over the raw engine: tokio multi-thread
//! runtime, Periodic(10 ms) durability, 25 % duplicates. See docs/benchmarks.md.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use seen::guard::IdempotencyGuard;
use seen::{Durability, Engine};

fn id(k: u64, base: u64) -> [u8; 16] {
    let n = if k % 4 == 3 { base + k / 2 } else { base + k };
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&n.to_le_bytes());
    b[8..].copy_from_slice(&(n ^ 0x5bd1_e995).to_le_bytes());
    b
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(
        Engine::builder()
            .durability(Durability::Periodic(Duration::from_millis(10)))
            .capacity(20_000_000)
            .open(dir.path())
            .unwrap(),
    );
    let guard = Arc::new(IdempotencyGuard::new(engine.clone()));
    let mut base = 0u64;
    let mut g = c.benchmark_group("guard-overhead");
    g.throughput(Throughput::Elements(1))
        .sample_size(20)
        .measurement_time(Duration::from_secs(3));
    g.bench_function("engine.check_and_insert", |b| {
        b.iter_custom(|iters| {
            base += iters * 2;
            let (engine, start_base) = (engine.clone(), base);
            rt.block_on(async move {
                let t = Instant::now();
                for k in 0..iters {
                    let _ = black_box(engine.check_and_insert(id(k, start_base)).unwrap());
                }
                t.elapsed()
            })
        })
    });
    g.bench_function("guard.process_if_new", |b| {
        b.iter_custom(|iters| {
            base += iters * 2;
            let (guard, start_base) = (guard.clone(), base);
            rt.block_on(async move {
                let t = Instant::now();
                for k in 0..iters {
                    let out = guard
                        .process_if_new(id(k, start_base), async { Ok::<_, ()>(()) })
                        .await
                        .unwrap();
                    black_box(out);
                }
                t.elapsed()
            })
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
