//! Per-partition state of a consumer: its counts, its lag as librdkafka
//! reports it, and the offset its loop may commit next.
//!
//! Each partition's state is an `Arc` of atomics that the loop looks up
//! once, when it first meets the partition, and then updates with plain
//! atomic stores: no lock and no map lookup per message. Scrapes and the
//! rebalance callback read the same atomics.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use parking_lot::Mutex;

/// Counts of one topic-partition.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PartitionStats {
    /// Messages whose handler ran and succeeded.
    pub handled: u64,
    /// Duplicates skipped.
    pub duplicates: u64,
    /// Messages without a readable id.
    pub invalid: u64,
    /// Handler attempts that failed.
    pub failed: u64,
    /// Messages sent to the dead-letter topic.
    pub dead_lettered: u64,
    /// Messages behind the partition's end, from librdkafka's statistics
    /// (`-1` until the first report; see `statistics.interval.ms`).
    pub lag: i64,
}

/// What happened to one message, for its partition's counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Event {
    Handled,
    Duplicate,
    Invalid,
    Failed,
    DeadLettered,
}

/// No offset waiting to be stored.
const NOTHING: i64 = -1;

/// One topic-partition's live state.
#[derive(Debug)]
pub(crate) struct Partition {
    pub(crate) topic: String,
    pub(crate) partition: i32,
    handled: AtomicU64,
    duplicates: AtomicU64,
    invalid: AtomicU64,
    failed: AtomicU64,
    dead_lettered: AtomicU64,
    lag: AtomicI64,
    /// The offset to commit next (one past the last message done, with
    /// every message before it done), not yet handed to librdkafka.
    ready: AtomicI64,
    /// Bumped when the partition is revoked: work started before it may
    /// not store an offset after it.
    generation: AtomicU64,
}

impl Partition {
    fn new(topic: &str, partition: i32) -> Self {
        Partition {
            topic: topic.to_owned(),
            partition,
            handled: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            invalid: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            lag: AtomicI64::new(-1),
            ready: AtomicI64::new(NOTHING),
            generation: AtomicU64::new(0),
        }
    }

    pub(crate) fn count(&self, event: Event) {
        let counter = match event {
            Event::Handled => &self.handled,
            Event::Duplicate => &self.duplicates,
            Event::Invalid => &self.invalid,
            Event::Failed => &self.failed,
            Event::DeadLettered => &self.dead_lettered,
        };
        counter.fetch_add(1, Relaxed);
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Relaxed)
    }

    /// The message at `offset` is done (and every one before it): its
    /// successor is the next offset to commit, unless the partition was
    /// revoked since the work started (`generation`).
    pub(crate) fn done(&self, offset: i64, generation: u64) {
        if self.generation.load(Relaxed) == generation {
            self.ready.store(offset + 1, Relaxed);
        }
    }

    /// The offset waiting to be stored, if any, taken.
    pub(crate) fn take_ready(&self) -> Option<i64> {
        let o = self.ready.swap(NOTHING, Relaxed);
        (o != NOTHING).then_some(o)
    }

    /// Revoked: forget what waits to be stored and refuse what finishes later.
    pub(crate) fn revoke(&self) {
        self.generation.fetch_add(1, Relaxed);
        self.ready.store(NOTHING, Relaxed);
    }

    fn stats(&self) -> PartitionStats {
        PartitionStats {
            handled: self.handled.load(Relaxed),
            duplicates: self.duplicates.load(Relaxed),
            invalid: self.invalid.load(Relaxed),
            failed: self.failed.load(Relaxed),
            dead_lettered: self.dead_lettered.load(Relaxed),
            lag: self.lag.load(Relaxed),
        }
    }
}

/// Every partition this consumer has met: topic → state by partition. The
/// lock is taken when a partition is first met, on rebalances, at commits
/// and at scrapes; never per message.
#[derive(Debug, Default)]
pub(crate) struct Partitions(Mutex<BTreeMap<String, Vec<Option<Arc<Partition>>>>>);

impl Partitions {
    /// The state of `topic`/`partition`, made on first use (`None` for a
    /// negative partition, which no message carries).
    pub(crate) fn get(&self, topic: &str, partition: i32) -> Option<Arc<Partition>> {
        let p = usize::try_from(partition).ok()?;
        let mut map = self.0.lock();
        // Found by `&str`: no allocation for a topic already seen.
        let parts = match map.get_mut(topic) {
            Some(v) => v,
            None => map.entry(topic.to_owned()).or_default(),
        };
        if parts.len() <= p {
            parts.resize(p + 1, None);
        }
        let slot = &mut parts[p];
        Some(Arc::clone(slot.get_or_insert_with(|| {
            Arc::new(Partition::new(topic, partition))
        })))
    }

    pub(crate) fn set_lag(&self, topic: &str, partition: i32, lag: i64) {
        if let Some(p) = self.get(topic, partition) {
            p.lag.store(lag, Relaxed);
        }
    }

    /// Every partition met so far.
    pub(crate) fn all(&self) -> Vec<Arc<Partition>> {
        self.0
            .lock()
            .values()
            .flat_map(|parts| parts.iter().flatten().cloned())
            .collect()
    }

    /// Partitions that saw a message or a lag report.
    pub(crate) fn snapshot(&self) -> Vec<(String, i32, PartitionStats)> {
        let unseen = PartitionStats {
            lag: -1,
            ..PartitionStats::default()
        };
        self.all()
            .iter()
            .map(|p| (p.topic.clone(), p.partition, p.stats()))
            .filter(|(_, _, s)| *s != unseen)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_offset_is_ready_once_and_never_after_its_partition_was_revoked() {
        let parts = Partitions::default();
        let p = parts.get("t", 3).unwrap();
        assert!(
            Arc::ptr_eq(&p, &parts.get("t", 3).unwrap()),
            "one state per partition"
        );
        assert!(parts.get("t", -1).is_none());
        assert_eq!(p.take_ready(), None);

        let g = p.generation();
        p.done(41, g);
        p.done(42, g);
        assert_eq!(p.take_ready(), Some(43), "the next offset to read");
        assert_eq!(p.take_ready(), None, "taken once");

        // Finished before the revoke, not yet stored: dropped by it.
        p.done(50, g);
        p.revoke();
        assert_eq!(p.take_ready(), None);
        // Work started before the revoke finishes after it: refused.
        p.done(60, g);
        assert_eq!(p.take_ready(), None);
        // Work of the new generation counts again.
        p.done(70, p.generation());
        assert_eq!(p.take_ready(), Some(71));

        p.count(Event::Duplicate);
        parts.set_lag("t", 3, 9);
        let snap = parts.snapshot();
        assert_eq!(snap.len(), 1);
        assert_eq!(snap[0].2.duplicates, 1);
        assert_eq!(snap[0].2.lag, 9);
    }
}
