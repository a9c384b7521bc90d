//! Instruction counts of the guard over the raw engine, for a repeatable
//! comparison on a noisy machine:
//!
//!     cargo build --release --example guard_cost
//!     valgrind --tool=callgrind target/release/examples/guard_cost engine 200000
//!     valgrind --tool=callgrind target/release/examples/guard_cost guard 200000
//!
//! (difference of the totals) / events = instructions the guard adds per event.

use std::sync::Arc;

use seen::guard::IdempotencyGuard;
use seen::Engine;

fn main() {
    let mut args = std::env::args().skip(1);
    let which = args.next().unwrap_or_else(|| "engine".into());
    let n: u64 = args.next().and_then(|n| n.parse().ok()).unwrap_or(200_000);
    // A third argument, a state directory, makes the engine durable
    // (Durability::None): the log's append path is then counted too.
    let builder = Engine::builder()
        .capacity(n as usize)
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
    rt.block_on(async {
        for k in 0..n {
            // 25 % duplicates
            let id = if k % 4 == 3 { k / 2 } else { k };
            let id = id.to_le_bytes();
            if which == "guard" {
                let _ = guard
                    .process_if_new(id, async { Ok::<_, ()>(()) })
                    .await
                    .unwrap();
            } else {
                let _ = engine.check_and_insert(id).unwrap();
            }
        }
    });
    eprintln!("{which}: {} new", engine.stats().new);
}
