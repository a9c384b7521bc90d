//! The set as the log's replay sink: records carry fingerprints, so
//! nothing is hashed; a window of table lines is prefetched ahead of the
//! inserts.

use crossbeam_epoch as epoch;

use crate::fingerprint::Fingerprint;
use crate::set::{ShardedSet, Verdict};
use crate::ttl::Tick;
use crate::wal::format::Record;
use crate::wal::{LaneKey, Replay};

pub(super) struct SetReplay<'a> {
    pub set: &'a ShardedSet,
    pub now: Tick,
}

impl Replay for SetReplay<'_> {
    fn reserve(&self, records: u64, threads: u64) {
        self.set
            .reserve(records as usize, self.now, threads as usize);
    }

    /// Whole shards per lane: a lane's inserts then never touch a cache
    /// line (a table's occupancy counter, its slots) that another lane
    /// writes, and need no locked instruction (`insert_exclusive`). Split
    /// by other fingerprint bits, every insert found its shard's counter
    /// last written by the other core: a fifth of a 10M replay went to that
    /// one `fetch_add`.
    fn lanes_by(&self) -> LaneKey {
        LaneKey {
            top_bits: self.set.shard_bits(),
        }
    }

    fn apply(&self, records: &[Record]) -> (u64, u64) {
        let guard = &epoch::pin();
        let prefetch = |r: &Record| self.set.prefetch(Fingerprint(r.fingerprint()), guard);
        // A rolling window: the line for record i + AHEAD is requested while
        // record i is inserted, so each miss has AHEAD inserts' time to land
        // (a prefetch-then-insert window stalls on its first lines).
        records.iter().take(PREFETCH_AHEAD).for_each(prefetch);
        let (mut marks, mut forgets) = (0, 0);
        for (i, r) in records.iter().enumerate() {
            if let Some(ahead) = records.get(i + PREFETCH_AHEAD) {
                prefetch(ahead);
            }
            match *r {
                Record::Mark {
                    fingerprint,
                    expiry_unix_secs,
                } => {
                    let expiry = Tick::from_unix_secs(expiry_unix_secs);
                    let fp = Fingerprint(fingerprint);
                    // This thread owns the shard (see `lane`); nothing reads yet.
                    if let Ok(Verdict::New) = self.set.insert_exclusive(fp, self.now, expiry, guard)
                    {
                        marks += 1;
                    }
                }
                Record::Forget { fingerprint, .. } => {
                    let fp = Fingerprint(fingerprint);
                    if self.set.forget(fp, self.now, guard).is_some() {
                        forgets += 1;
                    }
                }
            }
        }
        (marks, forgets)
    }
}

/// How many records ahead of the insert replay prefetches.
const PREFETCH_AHEAD: usize = 16;
