//! Per-partition counts of a consumer, and its lag as librdkafka reports it.
//!
//! The loop handles one message at a time, so these are written by one task
//! and read at scrape time: an uncontended lock per message.

use std::collections::BTreeMap;

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

/// Every partition this consumer has seen: topic → stats by partition.
#[derive(Debug, Default)]
pub(crate) struct Partitions(Mutex<BTreeMap<String, Vec<PartitionStats>>>);

const UNSEEN: PartitionStats = PartitionStats {
    handled: 0,
    duplicates: 0,
    invalid: 0,
    failed: 0,
    dead_lettered: 0,
    lag: -1,
};

impl Partitions {
    fn with(&self, topic: &str, partition: i32, f: impl FnOnce(&mut PartitionStats)) {
        let Ok(p) = usize::try_from(partition) else {
            return;
        };
        let mut map = self.0.lock();
        // Found by `&str`: no allocation for a topic already seen.
        let parts = match map.get_mut(topic) {
            Some(v) => v,
            None => map.entry(topic.to_owned()).or_default(),
        };
        if parts.len() <= p {
            parts.resize(p + 1, UNSEEN);
        }
        if let Some(s) = parts.get_mut(p) {
            f(s);
        }
    }

    pub(crate) fn count(&self, topic: &str, partition: i32, event: Event) {
        self.with(topic, partition, |s| match event {
            Event::Handled => s.handled += 1,
            Event::Duplicate => s.duplicates += 1,
            Event::Invalid => s.invalid += 1,
            Event::Failed => s.failed += 1,
            Event::DeadLettered => s.dead_lettered += 1,
        })
    }

    pub(crate) fn set_lag(&self, topic: &str, partition: i32, lag: i64) {
        self.with(topic, partition, |s| s.lag = lag)
    }

    /// Partitions that saw a message or a lag report.
    pub(crate) fn snapshot(&self) -> Vec<(String, i32, PartitionStats)> {
        let map = self.0.lock();
        let mut out = Vec::new();
        for (topic, parts) in map.iter() {
            for (p, s) in parts.iter().enumerate() {
                if *s != UNSEEN {
                    out.push((topic.clone(), p as i32, *s));
                }
            }
        }
        out
    }
}
