//! The set as the log's replay sink: records carry fingerprints, so
//! nothing is hashed; a window of table lines is prefetched ahead of the
//! inserts.

use crossbeam_epoch as epoch;

use super::BATCH_WINDOW;
use crate::fingerprint::Fingerprint;
use crate::set::{ShardedSet, Verdict};
use crate::ttl::Tick;
use crate::wal::format::Record;
use crate::wal::Replay;

pub(super) struct SetReplay<'a> {
    pub set: &'a ShardedSet,
    pub now: Tick,
}

impl Replay for SetReplay<'_> {
    fn reserve(&self, records: u64) {
        self.set.reserve(records as usize, self.now);
        self.set.prefault();
    }

    fn apply(&self, records: &[Record]) -> (u64, u64) {
        let guard = &epoch::pin();
        let (mut marks, mut forgets) = (0, 0);
        for window in records.chunks(BATCH_WINDOW) {
            for r in window {
                self.set.prefetch(Fingerprint(r.fingerprint()), guard);
            }
            for r in window {
                match *r {
                    Record::Mark {
                        fingerprint,
                        expiry_unix_secs,
                    } => {
                        let expiry = Tick::from_unix_secs(expiry_unix_secs);
                        let fp = Fingerprint(fingerprint);
                        if let Ok(Verdict::New) = self.set.insert(fp, self.now, expiry, guard) {
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
        }
        (marks, forgets)
    }
}
