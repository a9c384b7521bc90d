//! The steady state a long-running consumer sees, side by side (issue 11):
//! about 10M ids resident, new ids replacing expiring ones, no growth
//! from empty. One structure per process:
//!
//!     cargo run --release -p seen-bench-compare --example churn -- <structure> [resident] [events] [steady|grow|presized|lookup]
//!
//! `grow` instead measures the set growing from empty: no warm-up, no
//! expiry, no window; `events` timed from the first insert. `presized`
//! runs the same stream into structures sized up front for its distinct
//! ids (three quarters of `events`): what every structure does with its
//! growth taken away, the ceiling no change to growth can pass. `lookup`
//! warms up as `steady` does, then times `events` lookups, half of ids
//! resident (inserted recently, still live) and half of ids never seen:
//! `contains` (`contains_batch` of 1024 for `seen-batch`) against the
//! peers' `contains` of the id's ahash.
//!
//! Structures: `seen` (single `check_and_insert` calls), `seen-batch`
//! (`check_and_insert_batch` of 1024), `dashmap-u64`, `scc-u64` (the
//! id's ahash as the key, the way a performance-minded user hand-rolls a
//! dedup set), `harness` (ids made and hashed with ahash, nothing
//! stored: the cost every structure's figure includes) and `seen-hash`
//! (ids made and given `seen`'s keyed 128-bit fingerprint, nothing
//! stored: the part of `seen`'s figure that is not its table). 2
//! threads; a quarter of the events repeat one of the thread's last 75k
//! new ids.
//!
//! Churn: seen expires by TTL (10 s, on a simulated clock that moves one
//! second per tenth of the resident ids), as it would in production. The
//! peers have no TTL, so each thread keeps a ring of the keys it inserted
//! and removes the oldest once it holds its share of the resident ids: the
//! same window, at the price of a remove per new id (and the ring's memory,
//! not counted against them). A warm-up of as many events as resident ids
//! fills each structure first; then `events` are timed.

#[path = "../benches/common/mod.rs"]
mod common;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{mix64, uuid};
use seen::{Engine, ManualClock};

const THREADS: u64 = 2;
const TTL_SECS: u64 = 10;

/// Thread `t`'s k-th id: every 4th repeats one of its last 75k new ids.
fn id_number(t: u64, k: u64) -> u64 {
    let fresh = k - k / 4;
    let n = if k % 4 == 3 && k > 100_000 {
        fresh - 1 - mix64(k) % 75_000
    } else {
        fresh
    };
    n << 8 | t
}

trait Churning: Sync {
    /// Decide `ids` (thread `t`); returns how many were new.
    fn decide(&self, t: usize, ids: &[[u8; 36]]) -> usize;
    /// Look `ids` up without marking them; returns how many are present.
    fn lookup(&self, ids: &[[u8; 36]]) -> usize;
}

struct Seen {
    engine: Engine,
    clock: Arc<ManualClock>,
    every: u64,
    done: AtomicU64,
    next: AtomicU64,
    batch: bool,
}

impl Seen {
    fn tick(&self, n: u64) {
        let done = self.done.fetch_add(n, Relaxed) + n;
        loop {
            let next = self.next.load(Relaxed);
            if done < next {
                return;
            }
            if self
                .next
                .compare_exchange(next, next + self.every, Relaxed, Relaxed)
                .is_ok()
            {
                self.clock.advance(Duration::from_secs(1));
            }
        }
    }
}

impl Churning for Seen {
    fn decide(&self, _t: usize, ids: &[[u8; 36]]) -> usize {
        let new = if self.batch {
            let v = self.engine.check_and_insert_batch(ids).unwrap();
            v.iter().filter(|v| v.is_new()).count()
        } else {
            ids.iter()
                .filter(|id| self.engine.check_and_insert(id).unwrap().is_new())
                .count()
        };
        self.tick(ids.len() as u64);
        new
    }

    fn lookup(&self, ids: &[[u8; 36]]) -> usize {
        if self.batch {
            let found = self.engine.contains_batch(ids).unwrap();
            found.iter().filter(|&&f| f).count()
        } else {
            ids.iter()
                .filter(|id| self.engine.contains(id).unwrap())
                .count()
        }
    }
}

/// A peer keyed by the id's ahash, with a per-thread ring as its window.
struct Peer<S> {
    set: S,
    hasher: ahash::RandomState,
    window: u64,
    rings: Vec<std::sync::Mutex<VecDeque<u64>>>,
    insert: fn(&S, u64) -> bool,
    remove: fn(&S, u64),
    contains: fn(&S, u64) -> bool,
}

impl<S: Sync> Churning for Peer<S> {
    fn decide(&self, t: usize, ids: &[[u8; 36]]) -> usize {
        // Only thread `t` touches its ring: the lock is never contended.
        let mut ring = self.rings[t].lock().unwrap();
        let mut new = 0;
        for id in ids {
            let h = self.hasher.hash_one(id);
            if (self.insert)(&self.set, h) {
                new += 1;
                ring.push_back(h);
                if ring.len() as u64 > self.window {
                    if let Some(old) = ring.pop_front() {
                        (self.remove)(&self.set, old);
                    }
                }
            }
        }
        new
    }

    fn lookup(&self, ids: &[[u8; 36]]) -> usize {
        ids.iter()
            .filter(|id| (self.contains)(&self.set, self.hasher.hash_one(id)))
            .count()
    }
}

/// No structure: ids hashed and dropped, which is what the harness and
/// the peers' hashing cost per event (or, with an engine, what `seen`'s
/// fingerprints cost).
struct Harness(ahash::RandomState, Option<Engine>);

impl Churning for Harness {
    fn decide(&self, _t: usize, ids: &[[u8; 36]]) -> usize {
        let odd = ids.iter().filter(|id| match &self.1 {
            Some(engine) => engine.fingerprint(id).unwrap().0 & 1 == 1,
            None => self.0.hash_one(id) & 1 == 1,
        });
        std::hint::black_box(odd.count())
    }

    fn lookup(&self, ids: &[[u8; 36]]) -> usize {
        self.decide(0, ids)
    }
}

fn run(set: &dyn Churning, from: u64, to: u64, batch: usize) -> Duration {
    let started = Instant::now();
    std::thread::scope(|s| {
        for t in 0..THREADS {
            s.spawn(move || {
                let mut ids = vec![[0u8; 36]; batch];
                let mut k = from;
                while k < to {
                    let n = (batch as u64).min(to - k) as usize;
                    for (j, id) in ids[..n].iter_mut().enumerate() {
                        uuid(id_number(t, k + j as u64), id);
                    }
                    set.decide(t as usize, &ids[..n]);
                    k += n as u64;
                }
            });
        }
    });
    started.elapsed()
}

/// Time `per_thread` lookups on each thread of the ids `number(t, k)`;
/// returns the wall time and how many were found.
fn look_up(
    set: &dyn Churning,
    per_thread: u64,
    batch: usize,
    number: impl Fn(u64, u64) -> u64 + Sync,
) -> (Duration, usize) {
    let found = AtomicU64::new(0);
    let started = Instant::now();
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (found, number) = (&found, &number);
            s.spawn(move || {
                let mut ids = vec![[0u8; 36]; batch];
                let mut k = 0;
                while k < per_thread {
                    let n = (batch as u64).min(per_thread - k) as usize;
                    for (j, id) in ids[..n].iter_mut().enumerate() {
                        uuid(number(t, k + j as u64), id);
                    }
                    found.fetch_add(set.lookup(&ids[..n]) as u64, Relaxed);
                    k += n as u64;
                }
            });
        }
    });
    (started.elapsed(), found.load(Relaxed) as usize)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let which = args.get(1).map_or("seen", String::as_str);
    let resident: u64 = args
        .get(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000_000);
    let events: u64 = args
        .get(3)
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000_000);
    let presized = args.get(4).is_some_and(|m| m == "presized");
    let grow = presized || args.get(4).is_some_and(|m| m == "grow");
    let lookup = args.get(4).is_some_and(|m| m == "lookup");
    let window = if grow { u64::MAX } else { resident / THREADS };
    let rings = || (0..THREADS).map(|_| Default::default()).collect();
    // Growing, the set starts empty; pre-sized, it has room for every
    // distinct id of the stream; under churn, for the resident ids.
    let capacity = match (grow, presized) {
        (true, false) => 0,
        (true, true) => (events - events / 4) as usize,
        (false, _) => resident as usize,
    };
    let set: Box<dyn Churning> = match which {
        "seen" | "seen-batch" => {
            let clock = Arc::new(ManualClock::new(1_700_000_000));
            let builder = Engine::builder()
                .ttl(Duration::from_secs(TTL_SECS))
                .clock(Arc::clone(&clock) as Arc<dyn seen::Clock>);
            let engine = if capacity == 0 {
                builder.build().unwrap()
            } else {
                builder.capacity(capacity).build().unwrap()
            };
            // Growing, the clock never moves: nothing expires.
            let every = if grow {
                u64::MAX
            } else {
                resident * 4 / 3 / TTL_SECS
            };
            Box::new(Seen {
                engine,
                clock,
                every,
                done: AtomicU64::new(0),
                next: AtomicU64::new(every),
                batch: which == "seen-batch",
            })
        }
        "dashmap-u64" => Box::new(Peer {
            set: dashmap::DashSet::<u64>::with_capacity(capacity),
            hasher: ahash::RandomState::new(),
            window,
            rings: rings(),
            insert: |s, h| s.insert(h),
            remove: |s, h| {
                s.remove(&h);
            },
            contains: |s, h| s.contains(&h),
        }),
        "scc-u64" => Box::new(Peer {
            set: scc::HashSet::<u64>::with_capacity(capacity),
            hasher: ahash::RandomState::new(),
            window,
            rings: rings(),
            insert: |s, h| s.insert(h).is_ok(),
            remove: |s, h| {
                s.remove(&h);
            },
            contains: |s, h| s.contains(&h),
        }),
        "harness" => Box::new(Harness(ahash::RandomState::new(), None)),
        "seen-hash" => Box::new(Harness(
            ahash::RandomState::new(),
            Some(Engine::builder().build().unwrap()),
        )),
        other => {
            eprintln!("unknown structure {other}");
            std::process::exit(2);
        }
    };
    let batch = if which == "seen-batch" { 1024 } else { 256 };
    let warm_up = if grow { 0 } else { resident * 4 / 3 / THREADS };
    run(&*set, 0, warm_up, batch);
    let per_thread = events / THREADS;
    if lookup {
        // Hits among each thread's last resident/4 new ids (live under the
        // TTL and inside the peers' windows), misses from ids never used.
        let fresh = warm_up - warm_up / 4;
        let recent = (resident / 4).min(fresh).max(1);
        let (took, found) = look_up(&*set, per_thread, batch, |t, k| {
            if k % 2 == 0 {
                (fresh - 1 - common::mix64(k) % recent) << 8 | t
            } else {
                (1 << 55 | k) << 8 | t
            }
        });
        let rate = (per_thread * THREADS) as f64 / took.as_secs_f64() / 1e6;
        let hit = found as f64 / (per_thread * THREADS) as f64;
        assert!(
            (0.45..0.55).contains(&hit),
            "hit rate {hit}, expected about half"
        );
        println!(
            "{which} lookup {rate:.2} M lookups/s ({} lookups, {:.1} % found, ~{resident} resident, {THREADS} threads)",
            per_thread * THREADS,
            hit * 100.0
        );
        return;
    }
    let took = run(&*set, warm_up, warm_up + per_thread, batch);
    let rate = (per_thread * THREADS) as f64 / took.as_secs_f64() / 1e6;
    if grow {
        let mode = if presized { "presized" } else { "grow" };
        println!(
            "{which} {mode} {rate:.2} M events/s ({} events from empty, {THREADS} threads)",
            per_thread * THREADS
        );
    } else {
        println!(
            "{which} steady {rate:.2} M events/s (~{resident} resident under churn, {} events, {THREADS} threads)",
            per_thread * THREADS
        );
    }
}
