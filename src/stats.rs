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
        }
        t
    }
}

/// A histogram of durations with exponential bucket bounds, filled with
/// plain atomics (observed once per sync or per open, never per event) and
/// read by the metrics exporter at scrape time. Kept here, not in
/// `metrics`, so the engine needs no Prometheus client.
#[derive(Debug)]
pub(crate) struct Histogram {
    /// Upper bounds in seconds; an implicit +Inf bucket follows.
    bounds: Box<[f64]>,
    /// Per-bucket (not cumulative) counts; one more than `bounds`.
    counts: Box<[AtomicU64]>,
    sum_nanos: AtomicU64,
}

/// A histogram's contents: (sum in seconds, count, per-bucket counts
/// with their upper bounds, +Inf last).
#[cfg(feature = "metrics")]
pub(crate) type HistogramSnapshot = (f64, u64, Vec<(f64, u64)>);

impl Histogram {
    /// `n` buckets: `start`, `start × factor`, …
    pub(crate) fn exponential(start: f64, factor: f64, n: usize) -> Histogram {
        let bounds: Box<[f64]> = (0..n).map(|i| start * factor.powi(i as i32)).collect();
        Histogram {
            counts: (0..=n).map(|_| AtomicU64::new(0)).collect(),
            bounds,
            sum_nanos: AtomicU64::new(0),
        }
    }

    pub(crate) fn observe(&self, d: std::time::Duration) {
        self.observe_in_bucket(d.as_secs_f64(), d.as_nanos().min(u64::MAX as u128) as u64);
    }

    /// A plain value (a batch size): kept in the sum as value × 10⁹, so
    /// [`Histogram::snapshot`] reports it unscaled.
    #[cfg(feature = "kafka")]
    pub(crate) fn observe_value(&self, v: f64) {
        self.observe_in_bucket(v, (v * 1e9) as u64);
    }

    fn observe_in_bucket(&self, secs: f64, nanos: u64) {
        let i = self
            .bounds
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(self.bounds.len());
        if let Some(c) = self.counts.get(i) {
            c.fetch_add(1, Relaxed);
        }
        self.sum_nanos.fetch_add(nanos, Relaxed);
    }

    /// Observations so far, and their total in nanoseconds.
    pub(crate) fn count_and_sum_nanos(&self) -> (u64, u64) {
        let count = self.counts.iter().map(|c| c.load(Relaxed)).sum();
        (count, self.sum_nanos.load(Relaxed))
    }

    #[cfg(feature = "metrics")]
    pub(crate) fn snapshot(&self) -> HistogramSnapshot {
        let mut buckets = Vec::with_capacity(self.counts.len());
        let mut count = 0;
        for (i, c) in self.counts.iter().enumerate() {
            let n = c.load(Relaxed);
            count += n;
            buckets.push((self.bounds.get(i).copied().unwrap_or(f64::INFINITY), n));
        }
        (self.sum_nanos.load(Relaxed) as f64 / 1e9, count, buckets)
    }
}

/// The engine's histograms.
#[derive(Debug)]
pub(crate) struct Histograms {
    /// Duration of each log sync, one per group commit.
    pub sync_seconds: std::sync::Arc<Histogram>,
    /// Duration of replay on open.
    pub replay_seconds: Histogram,
}

impl Default for Histograms {
    fn default() -> Self {
        Histograms {
            // 10 µs .. ~5 s
            sync_seconds: std::sync::Arc::new(Histogram::exponential(1e-5, 2.0, 20)),
            // 1 ms .. ~65 s
            replay_seconds: Histogram::exponential(1e-3, 2.0, 17),
        }
    }
}
