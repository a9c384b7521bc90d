//! Bytes of table per live key at every size, the way issue 11 asks for
//! them: an in-memory engine grown from empty to N distinct ids, measured
//! every 250k ids on the way, and engines pre-sized (`capacity(n)`) and
//! filled to n.
//!
//! ```sh
//! cargo run --release --example memory_curve -- grown 50000000
//! cargo run --release --example memory_curve -- presized 1000000,2000000,5000000,10000000,20000000,50000000
//! ```
//!
//! The figure is `Engine::memory_bytes() / live keys`: the tables and the
//! shards' headers, exactly, without the allocator's or the process's
//! noise (an RSS delta agrees with it to within 1 %; see
//! `crates/seen-bench-compare/examples/memory.rs`).

use seen::{Engine, Fingerprint};

const STEP: u64 = 250_000;

/// Distinct, uniformly spread fingerprints: the engine's own hash of a
/// counter would do as well, this is cheaper.
fn fingerprint(k: u64) -> Fingerprint {
    let mut x = k.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    let lo = x ^ (x >> 31);
    let hi = lo.wrapping_mul(0xff51_afd7_ed55_8ccd) ^ k;
    Fingerprint((hi as u128) << 64 | lo as u128)
}

fn fill(engine: &Engine, from: u64, to: u64) {
    let mut out = Vec::new();
    let fps: Vec<Fingerprint> = (from..to).map(fingerprint).collect();
    for chunk in fps.chunks(4096) {
        out.clear();
        engine
            .check_and_insert_fingerprints(chunk, &mut out)
            .expect("in-memory inserts do not fail");
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map_or("grown", String::as_str);
    match mode {
        "grown" => {
            let n: u64 = args
                .get(2)
                .and_then(|s| s.parse().ok())
                .unwrap_or(50_000_000);
            let engine = Engine::builder().background_sweep(false).build().unwrap();
            let (mut lo, mut hi) = ((f64::MAX, 0), (0.0f64, 0));
            let mut at = 0;
            println!("keys,bytes_per_key");
            while at < n {
                fill(&engine, at, at + STEP);
                at += STEP;
                let per_key = engine.memory_bytes() as f64 / at as f64;
                println!("{at},{per_key:.2}");
                if at >= 1_000_000 {
                    if per_key < lo.0 {
                        lo = (per_key, at);
                    }
                    if per_key > hi.0 {
                        hi = (per_key, at);
                    }
                }
            }
            eprintln!(
                "grown, 1M..{n}: {:.2}..{:.2} bytes per key (lowest at {}, highest at {})",
                lo.0, hi.0, lo.1, hi.1
            );
        }
        _ => {
            let sizes: Vec<u64> = args
                .get(2)
                .map(|s| s.split(',').filter_map(|x| x.parse().ok()).collect())
                .unwrap_or_else(|| vec![1_000_000, 10_000_000]);
            for n in sizes {
                let engine = Engine::builder()
                    .background_sweep(false)
                    .capacity(n as usize)
                    .build()
                    .unwrap();
                fill(&engine, 0, n);
                println!(
                    "presized {n}: {:.2} bytes per key",
                    engine.memory_bytes() as f64 / n as f64
                );
            }
        }
    }
}
