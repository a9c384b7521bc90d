//! seen against its peers, same ids, same run. See docs/benchmarks.md.
//!
//! Every structure first holds RESIDENT (10M) keys; the measured stream is
//! 75 % fresh ids and 25 % resident ones (duplicates), on 1 and 2 threads.
//! Series "ids": 36-byte UUID strings. Series "hashed": pre-made keys
//! (128-bit fingerprints for seen, u64 for the peers).
//!
//! `SEEN_BENCH_PEERS=seen` limits the run to seen (quick local checks).

mod common;

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use seen::{Engine, Verdict};

/// Fresh ids start here and are never reused across measurements.
static FRESH: AtomicU64 = AtomicU64::new(RESIDENT);

fn peers_enabled(name: &str) -> bool {
    match std::env::var("SEEN_BENCH_PEERS") {
        Ok(list) => list.split(',').any(|p| name.starts_with(p.trim())),
        Err(_) => true,
    }
}

/// Run `op(k, fresh_base)` `iters` times on each of `threads` threads; wall time.
fn timed(threads: usize, iters: u64, op: &(dyn Fn(u64, u64) + Sync)) -> Duration {
    let bases: Vec<u64> = (0..threads)
        .map(|_| FRESH.fetch_add(iters, Ordering::Relaxed))
        .collect();
    let start = Instant::now();
    std::thread::scope(|s| {
        for &base in &bases {
            s.spawn(move || {
                for k in 0..iters {
                    op(k, base);
                }
            });
        }
    });
    start.elapsed()
}

type MakeIds = fn() -> Box<dyn Dedup>;
type MakeHashed = fn() -> Box<dyn DedupHashed>;
type Group<'a> = BenchmarkGroup<'a, criterion::measurement::WallTime>;

fn bench_ids(g: &mut Group<'_>, name: &str, set: &dyn Dedup) {
    for threads in [1usize, 2] {
        g.throughput(Throughput::Elements(threads as u64));
        g.bench_function(format!("check_and_insert/ids/{name}/{threads}t"), |b| {
            b.iter_custom(|iters| {
                timed(threads, iters, &|k, base| {
                    let mut buf = [0u8; 36];
                    uuid(stream_id(k, base), &mut buf);
                    black_box(set.insert(&buf));
                })
            })
        });
        g.bench_function(format!("contains/ids/{name}/{threads}t"), |b| {
            b.iter_custom(|iters| {
                timed(threads, iters, &|k, _| {
                    // Half hits (resident), half misses.
                    let n = if k % 2 == 0 {
                        mix64(k) % RESIDENT
                    } else {
                        u64::MAX - k
                    };
                    let mut buf = [0u8; 36];
                    uuid(n, &mut buf);
                    black_box(set.contains(&buf));
                })
            })
        });
    }
}

fn bench_hashed(g: &mut Group<'_>, name: &str, set: &dyn DedupHashed) {
    for threads in [1usize, 2] {
        g.throughput(Throughput::Elements(threads as u64));
        g.bench_function(format!("check_and_insert/hashed/{name}/{threads}t"), |b| {
            b.iter_custom(|iters| {
                timed(threads, iters, &|k, base| {
                    black_box(set.insert_hashed(stream_id(k, base)));
                })
            })
        });
        g.bench_function(format!("contains/hashed/{name}/{threads}t"), |b| {
            b.iter_custom(|iters| {
                timed(threads, iters, &|k, _| {
                    let n = if k % 2 == 0 {
                        mix64(k) % RESIDENT
                    } else {
                        u64::MAX - k
                    };
                    black_box(set.contains_hashed(n));
                })
            })
        });
    }
}

/// seen's batch path: 256 ids per call.
fn bench_seen_batch(g: &mut Group<'_>, engine: &Engine) {
    const B: u64 = 256;
    for threads in [1usize, 2] {
        g.throughput(Throughput::Elements(threads as u64 * B));
        g.bench_function(
            format!("check_and_insert/ids/seen-batch256/{threads}t"),
            |b| {
                b.iter_custom(|iters| {
                    let bases: Vec<u64> = (0..threads)
                        .map(|_| FRESH.fetch_add(iters * B, Ordering::Relaxed))
                        .collect();
                    let start = Instant::now();
                    std::thread::scope(|s| {
                        for &base in &bases {
                            s.spawn(move || {
                                let mut ids = vec![[0u8; 36]; B as usize];
                                let mut out: Vec<Verdict> = Vec::with_capacity(B as usize);
                                for i in 0..iters {
                                    for (j, id) in ids.iter_mut().enumerate() {
                                        uuid(stream_id(i * B + j as u64, base), id);
                                    }
                                    out.clear();
                                    engine.check_and_insert_batch_into(&ids, &mut out).unwrap();
                                    black_box(&out);
                                }
                            });
                        }
                    });
                    start.elapsed()
                })
            },
        );
    }
}

fn all(c: &mut Criterion) {
    let mut g = c.benchmark_group("10M-resident-25pct-dup");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));

    if peers_enabled("seen") {
        let engine = seen_engine();
        fill(&engine);
        bench_ids(&mut g, "seen", &engine);
        bench_seen_batch(&mut g, &engine);
        drop(engine);
        let engine = seen_engine();
        fill_hashed(&engine);
        bench_hashed(&mut g, "seen-fingerprint", &engine);
    }
    let string_peers: Vec<(&str, MakeIds)> = vec![
        ("dashmap", || Box::new(DashString(Default::default()))),
        ("scc", || Box::new(SccString(Default::default()))),
        ("papaya", || Box::new(PapayaString(Default::default()))),
        ("moka-ttl", || Box::new(Moka::new())),
        ("rwlock-hashbrown", || {
            Box::new(ShardedRwLock::<String>::new())
        }),
    ];
    for (name, make) in string_peers {
        if peers_enabled(name) {
            let set = make();
            fill(&*set);
            bench_ids(&mut g, name, &*set);
        }
    }
    let hashed_peers: Vec<(&str, MakeHashed)> = vec![
        ("dashmap-u64", || Box::new(DashU64(Default::default()))),
        ("scc-u64", || Box::new(SccU64(Default::default()))),
        ("papaya-u64", || Box::new(PapayaU64(Default::default()))),
        ("rwlock-hashbrown-u64", || {
            Box::new(ShardedRwLock::<u64>::new())
        }),
    ];
    for (name, make) in hashed_peers {
        if peers_enabled(name) {
            let set = make();
            fill_hashed(&*set);
            bench_hashed(&mut g, name, &*set);
        }
    }
    g.finish();
}

criterion_group!(benches, all);
criterion_main!(benches);
