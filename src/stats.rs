//! Per-event counters, striped across cache lines so that threads counting
//! at once do not bounce one line between cores.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

use crossbeam_utils::CachePadded;

#[derive(Default)]
pub(crate) struct Stripe {
    pub new: AtomicU64,
    pub duplicate: AtomicU64,
    pub invalid: AtomicU64,
    pub rejected: AtomicU64,
    pub forgotten: AtomicU64,
    pub inflight_collisions: AtomicU64,
    pub failed: AtomicU64,
    pub released: AtomicU64,
}

pub(crate) struct Counters {
    stripes: Box<[CachePadded<Stripe>]>,
}

/// Totals of all stripes.
#[derive(Default, Debug, Clone, Copy)]
pub(crate) struct Totals {
    pub new: u64,
    pub duplicate: u64,
    pub invalid: u64,
    pub rejected: u64,
    pub forgotten: u64,
    pub inflight_collisions: u64,
    pub failed: u64,
    pub released: u64,
}

impl Counters {
    pub(crate) fn new() -> Counters {
        let n = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(4)
            .saturating_mul(2)
            .next_power_of_two();
        Counters {
            stripes: (0..n)
                .map(|_| CachePadded::new(Stripe::default()))
                .collect(),
        }
    }

    /// This thread's stripe (threads are spread round-robin).
    #[inline]
    pub(crate) fn stripe(&self) -> &Stripe {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        thread_local! {
            static INDEX: usize = NEXT.fetch_add(1, Relaxed);
        }
        let i = INDEX.with(|i| *i) & (self.stripes.len() - 1);
        &self.stripes[i]
    }

    pub(crate) fn totals(&self) -> Totals {
        let mut t = Totals::default();
        for s in self.stripes.iter() {
            t.new += s.new.load(Relaxed);
            t.duplicate += s.duplicate.load(Relaxed);
            t.invalid += s.invalid.load(Relaxed);
            t.rejected += s.rejected.load(Relaxed);
            t.forgotten += s.forgotten.load(Relaxed);
            t.inflight_collisions += s.inflight_collisions.load(Relaxed);
            t.failed += s.failed.load(Relaxed);
            t.released += s.released.load(Relaxed);
        }
        t
    }
}
