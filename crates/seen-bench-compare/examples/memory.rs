//! Resident bytes per key at 10M keys, one structure per process:
//!
//!     cargo run --release -p seen-bench-compare --example memory -- seen
//!
//! Structures: seen, seen-presized, dashmap, scc, papaya, moka-ttl,
//! rwlock-hashbrown, dashmap-u64, scc-u64, papaya-u64, rwlock-hashbrown-u64.

#[path = "../benches/common/mod.rs"]
mod common;

use common::*;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// Tables replaced by the last growths are freed once every thread has
/// moved past them (epoch-based reclamation): a few more operations on
/// the engine let that happen before resident memory is read, as it
/// would in any running process.
fn settle(e: &seen::Engine) {
    for i in 0..10_000u32 {
        let _ = e.contains(i.to_le_bytes());
    }
}

fn main() {
    let which = std::env::args().nth(1).unwrap_or_else(|| "seen".into());
    let before = rss_bytes();
    let hold: Box<dyn std::any::Any> = match which.as_str() {
        "seen" => {
            let e = seen_engine();
            fill(&e);
            settle(&e);
            eprintln!(
                "seen memory_bytes(): {:.1} B/key",
                e.memory_bytes() as f64 / RESIDENT as f64
            );
            Box::new(e)
        }
        "seen-presized" => {
            let e = seen::Engine::builder()
                .capacity(RESIDENT as usize)
                .build()
                .unwrap();
            fill(&e);
            eprintln!(
                "seen memory_bytes(): {:.1} B/key",
                e.memory_bytes() as f64 / RESIDENT as f64
            );
            Box::new(e)
        }
        "dashmap" => {
            let s = DashString(Default::default());
            fill(&s);
            Box::new(s)
        }
        "scc" => {
            let s = SccString(Default::default());
            fill(&s);
            Box::new(s)
        }
        "papaya" => {
            let s = PapayaString(Default::default());
            fill(&s);
            Box::new(s)
        }
        "moka-ttl" => {
            let s = Moka::new();
            fill(&s);
            s.0.run_pending_tasks();
            Box::new(s)
        }
        "rwlock-hashbrown" => {
            let s = ShardedRwLock::<String>::new();
            fill(&s);
            Box::new(s)
        }
        "dashmap-u64" => {
            let s = DashU64(Default::default());
            fill_hashed(&s);
            Box::new(s)
        }
        "scc-u64" => {
            let s = SccU64(Default::default());
            fill_hashed(&s);
            Box::new(s)
        }
        "papaya-u64" => {
            let s = PapayaU64(Default::default());
            fill_hashed(&s);
            Box::new(s)
        }
        "rwlock-hashbrown-u64" => {
            let s = ShardedRwLock::<u64>::new();
            fill_hashed(&s);
            Box::new(s)
        }
        other => {
            eprintln!("unknown structure {other}");
            std::process::exit(2);
        }
    };
    let after = rss_bytes();
    println!(
        "{which}: {:.1} resident bytes per key at {} keys",
        (after - before) as f64 / RESIDENT as f64,
        RESIDENT
    );
    if let Ok(r) = std::fs::read_to_string("/proc/self/smaps_rollup") {
        if let Some(l) = r.lines().find(|l| l.starts_with("AnonHugePages")) {
            eprintln!("{l}");
        }
    }
    drop(hold);
}
