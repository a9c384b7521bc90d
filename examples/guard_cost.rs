//! The guard's cost over the raw engine, two ways:
//!
//! * instruction counts, repeatable on a noisy machine:
//!
//!       cargo build --release --example guard_cost
//!       valgrind --tool=callgrind target/release/examples/guard_cost engine 200000
//!       valgrind --tool=callgrind target/release/examples/guard_cost guard 200000
//!
//!   (difference of the totals) / events = instructions the guard adds per event;
//!
//! * time, engine and guard rounds alternating in one process (so both
//!   see the same machine), medians over the rounds:
//!
//!       target/release/examples/guard_cost time 200000 [STATE_DIR]
//!
//! A state directory as the last argument makes the engine durable
//! (`Durability::None`): the log's append path is then counted too.

use std::sync::Arc;
use std::time::Instant;

use seen::guard::IdempotencyGuard;
use seen::Engine;

/// The k-th id of a round starting at `base`: a quarter repeat an earlier one.
fn id(base: u64, k: u64) -> [u8; 8] {
    let k = if k % 4 == 3 { k / 2 } else { k };
    (base + k).to_le_bytes()
}

async fn round(which: &str, engine: &Engine, guard: &IdempotencyGuard, base: u64, n: u64) {
    for k in 0..n {
        if which == "guard" {
            let out = guard.process_if_new(id(base, k), async { Ok::<_, ()>(()) });
            let _ = out.await.unwrap();
        } else {
            let _ = engine.check_and_insert(id(base, k)).unwrap();
        }
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let which = args.next().unwrap_or_else(|| "engine".into());
    let n: u64 = args.next().and_then(|n| n.parse().ok()).unwrap_or(200_000);
    let rounds = if which == "time" { 15 } else { 1 };
    let builder = Engine::builder()
        .capacity((n * rounds * 2) as usize)
        .background_sweep(false)
        .durability(seen::Durability::None);
    let engine = Arc::new(match args.next() {
        Some(dir) => builder.open(dir).unwrap(),
        None => builder.build().unwrap(),
    });
    let guard = IdempotencyGuard::new(engine.clone());
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    if which != "time" {
        rt.block_on(round(&which, &engine, &guard, 0, n));
        eprintln!("{which}: {} new", engine.stats().new);
        return;
    }
    let (mut plain, mut guarded) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        for (which, times) in [("engine", &mut plain), ("guard", &mut guarded)] {
            let base = (r * 2 + (which == "guard") as u64) * n;
            let started = Instant::now();
            rt.block_on(round(which, &engine, &guard, base, n));
            times.push(started.elapsed().as_nanos() as f64 / n as f64);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (e, g) = (median(&mut plain), median(&mut guarded));
    println!(
        "{rounds} rounds of {n} events, medians: engine.check_and_insert {e:.0} ns, guard.process_if_new {g:.0} ns, the guard adds {:.0} ns per event",
        g - e
    );
}
