//! The engine's single-call path against its batch path, the way issue 11
//! measures them: an in-memory engine growing from empty, 2 threads, 10M
//! UUID-like string ids, 25 % of them repeating an id from the last 100k.
//!
//! ```sh
//! cargo run --release --example batch_probe -- single 10000000 2
//! cargo run --release --example batch_probe -- batch 10000000 2 1024
//! cargo run --release --example batch_probe -- batch 10000000 2 1024 presized
//! ```
//!
//! Prints ids decided per second (one process per measurement: each grows
//! its own table from empty).

use std::time::Instant;

use seen::Engine;

/// The id at stream position `k` of thread `t`: every fourth repeats one
/// of the last 100k of that thread.
fn id(t: u64, k: u64, out: &mut [u8; 36]) {
    let n = if k % 4 == 3 && k > 100_000 {
        k - 1 - (k.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40) % 100_000
    } else {
        k
    };
    let v = (t << 48 | n).wrapping_mul(0xff51_afd7_ed55_8ccd) ^ n;
    let hex = b"0123456789abcdef";
    for (i, b) in out.iter_mut().enumerate() {
        *b = if matches!(i, 8 | 13 | 18 | 23) {
            b'-'
        } else {
            hex[((v >> ((i * 4) % 64)) & 15) as usize]
        };
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map_or("single", String::as_str).to_owned();
    let n: u64 = args
        .get(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000_000);
    let threads: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(2);
    let batch: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(1024);
    // `presized` as the fifth argument: room for every id up front, so no
    // growth (the inserts alone).
    let mut builder = Engine::builder().background_sweep(false);
    if args.get(5).is_some_and(|a| a == "presized") {
        builder = builder.capacity(n as usize);
    }
    let engine = builder.build().expect("engine");
    let per_thread = n / threads;
    let started = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let engine = &engine;
            let mode = mode.as_str();
            s.spawn(move || {
                let mut buf = [0u8; 36];
                if mode == "batch" {
                    let mut ids = vec![[0u8; 36]; batch];
                    let mut out = Vec::with_capacity(batch);
                    let mut k = 0;
                    while k < per_thread {
                        let m = batch.min((per_thread - k) as usize);
                        for (j, slot) in ids[..m].iter_mut().enumerate() {
                            id(t, k + j as u64, slot);
                        }
                        out.clear();
                        engine
                            .check_and_insert_batch_into(&ids[..m], &mut out)
                            .expect("batch");
                        k += m as u64;
                    }
                } else {
                    for k in 0..per_thread {
                        id(t, k, &mut buf);
                        let _ = engine.check_and_insert(buf).expect("insert");
                    }
                }
            });
        }
    });
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{mode}: {:.2} M ids/s ({} ids, {threads} threads, {} live keys)",
        (per_thread * threads) as f64 / secs / 1e6,
        per_thread * threads,
        engine.len()
    );
}
