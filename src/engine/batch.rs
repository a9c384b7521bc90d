//! The batch insert path.
//!
//! Ids are hashed a run at a time ([`Hashed`]) and their table lines
//! prefetched a window ahead (see [`ShardedSet::prefetched`]); new marks
//! are logged a chunk at a time; and an id whose shard is being migrated
//! is decided at the end of the batch instead of waited for, so the
//! thread keeps inserting into the other shards meanwhile. (Growing from
//! empty, a thread that met a migration waited for it, a millisecond per
//! shard at 10M keys: the two threads of `batch_probe` were busy ~150 %
//! of 200.)

use crossbeam_epoch::{self as epoch, Guard};

use super::durable::{self, FORGOTTEN_AT_ONCE};
use super::{Deferred, Engine, PendingMark, Tally, BATCH_WINDOW};
use crate::error::Result;
use crate::fingerprint::{Fingerprint, Fingerprinter};
use crate::set::{ShardedSet, Verdict};
use crate::ttl::Tick;

impl Engine {
    pub(super) fn insert_batch(
        &self,
        fps: impl Iterator<Item = Fingerprint>,
        len: usize,
        out: &mut Vec<Verdict>,
    ) -> Result<()> {
        // Small batches collect their new marks in a small stack buffer.
        if len <= BATCH_WINDOW {
            self.insert_batch_in::<BATCH_WINDOW>(fps, len, out)
        } else {
            self.insert_batch_in::<{ durable::LOG_CHUNK }>(fps, len, out)
        }
    }

    fn insert_batch_in<const N: usize>(
        &self,
        fps: impl Iterator<Item = Fingerprint>,
        len: usize,
        out: &mut Vec<Verdict>,
    ) -> Result<()> {
        out.reserve(len);
        let guard = &epoch::pin();
        let now = self.inner.now();
        let call = self.inner.durable.as_ref().and_then(|d| d.open_call());
        let mut marks = Marks::<N> {
            engine: self,
            now,
            expiry: self.expiry(now, self.inner.ttl),
            guard,
            tally: Tally::new(self),
            fresh: [PendingMark {
                fingerprint: Fingerprint(0),
                expiry: FORGOTTEN_AT_ONCE,
            }; N],
            len: 0,
        };
        let set = &self.inner.set;
        // At a memory ceiling an id may be refused, and the ids after it
        // must then be left unmarked: decide in order there.
        let mut waiting = Waiting::new(!set.has_ceiling());
        let decide_all = || -> Result<()> {
            // The table line of the id BATCH_WINDOW ahead is requested
            // while this one is inserted, so every miss has a window's
            // worth of inserts to land.
            for fp in set.prefetched::<BATCH_WINDOW, _>(fps, guard) {
                let shard = set.shard_index(fp);
                if waiting.must_wait(set, shard) {
                    if waiting.is_full() {
                        waiting.decide(&mut marks, out)?;
                    }
                    waiting.push(out.len(), fp, shard);
                    out.push(Verdict::Duplicate); // a placeholder until decided
                    continue;
                }
                out.push(marks.decide(fp)?);
            }
            waiting.decide(&mut marks, out)?;
            marks.flush()
        };
        if let Err(e) = decide_all() {
            // Only the verdicts of the ids before the first undecided one.
            if let Some(at) = waiting.first_undecided() {
                out.truncate(at);
            }
            return Err(e);
        }
        drop(call);
        // One group commit for the whole batch, covering its duplicates too.
        self.settle_duplicate(guard)
    }
}

/// Ids' fingerprints, computed `HASHED` at a time: a run of hashes is
/// arithmetic alone, which keeps the core busy while the table lines
/// requested before it are on their way.
pub(super) struct Hashed<'a, I> {
    ids: std::slice::Iter<'a, I>,
    fingerprinter: &'a Fingerprinter,
    buf: [Fingerprint; HASHED],
    at: usize,
    len: usize,
}

const HASHED: usize = 32;

impl<'a, I: AsRef<[u8]>> Hashed<'a, I> {
    pub(super) fn new(ids: &'a [I], fingerprinter: &'a Fingerprinter) -> Self {
        Hashed {
            ids: ids.iter(),
            fingerprinter,
            buf: [Fingerprint(0); HASHED],
            at: 0,
            len: 0,
        }
    }
}

impl<I: AsRef<[u8]>> Iterator for Hashed<'_, I> {
    type Item = Fingerprint;

    #[inline]
    fn next(&mut self) -> Option<Fingerprint> {
        if self.at == self.len {
            self.at = 0;
            self.len = 0;
            for (slot, id) in self.buf.iter_mut().zip(self.ids.by_ref()) {
                *slot = self.fingerprinter.fingerprint(id.as_ref());
                self.len += 1;
            }
            if self.len == 0 {
                return None;
            }
        }
        let fp = self.buf[self.at];
        self.at += 1;
        Some(fp)
    }
}

/// A batch's new marks, logged a chunk of `N` at a time: one reservation
/// and one write per chunk (a system call each under `Sync`).
struct Marks<'a, const N: usize> {
    engine: &'a Engine,
    now: Tick,
    expiry: Option<Tick>,
    guard: &'a Guard,
    tally: Tally<'a>,
    fresh: [PendingMark; N],
    len: usize,
}

impl<const N: usize> Marks<'_, N> {
    /// Check and mark `fp` in memory; a new mark joins the chunk to log.
    #[inline]
    fn decide(&mut self, fp: Fingerprint) -> Result<Verdict> {
        if self.len == N {
            self.flush()?;
        }
        let e = self.engine;
        match e.mark_in_memory(fp, self.now, self.expiry, self.guard, &mut self.tally) {
            Ok(Deferred::New(mark)) => {
                self.fresh[self.len] = mark;
                self.len += 1;
                Ok(Verdict::New)
            }
            Ok(Deferred::Duplicate) => Ok(Verdict::Duplicate),
            Err(e) => {
                // The verdicts already given stand: log their marks.
                self.flush()?;
                Err(e)
            }
        }
    }

    fn flush(&mut self) -> Result<()> {
        let n = std::mem::take(&mut self.len);
        match &self.engine.inner.durable {
            Some(d) if self.expiry.is_some() && n > 0 => d
                .append(
                    &self.engine.inner.set,
                    &self.fresh[..n],
                    self.now,
                    self.guard,
                )
                .map(|_| ()),
            _ => Ok(()),
        }
    }
}

/// At most this many ids of a batch wait for their shards' migrations;
/// then they are decided (waiting for the migrations) before more wait.
const WAITING: usize = 64;

/// The ids of a batch whose shard's table was being replaced when their
/// turn came, each with its place among the verdicts.
struct Waiting {
    enabled: bool,
    ids: [(usize, Fingerprint); WAITING],
    /// `ids[decided..len]` are still to be decided.
    decided: usize,
    len: usize,
    /// Bit `shard % 64` of every shard with an id waiting: that shard's
    /// later ids wait too, so the ids of one shard (and so two copies of
    /// one id) are decided in the batch's order.
    shards: u64,
}

impl Waiting {
    fn new(enabled: bool) -> Waiting {
        Waiting {
            enabled,
            ids: [(0, Fingerprint(0)); WAITING],
            decided: 0,
            len: 0,
            shards: 0,
        }
    }

    #[inline]
    fn must_wait(&self, set: &ShardedSet, shard: usize) -> bool {
        self.enabled && (self.shards & 1 << (shard % 64) != 0 || set.migrating(shard))
    }

    fn is_full(&self) -> bool {
        self.len == WAITING
    }

    fn push(&mut self, at: usize, fp: Fingerprint, shard: usize) {
        self.ids[self.len] = (at, fp);
        self.len += 1;
        self.shards |= 1 << (shard % 64);
        #[cfg(test)]
        tests::WAITED.with(|w| w.set(w.get() + 1));
    }

    /// Decide every waiting id, in order (waiting for migrations now).
    fn decide<const N: usize>(
        &mut self,
        marks: &mut Marks<'_, N>,
        out: &mut [Verdict],
    ) -> Result<()> {
        while self.decided < self.len {
            let (at, fp) = self.ids[self.decided];
            out[at] = marks.decide(fp)?;
            self.decided += 1;
        }
        self.decided = 0;
        self.len = 0;
        self.shards = 0;
        Ok(())
    }

    fn first_undecided(&self) -> Option<usize> {
        (self.decided < self.len).then(|| self.ids[self.decided].0)
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::collections::HashSet;

    use super::*;
    use crate::fingerprint::Secret;

    thread_local! {
        /// Ids this thread has put in a `Waiting`.
        pub(super) static WAITED: Cell<usize> = const { Cell::new(0) };
    }

    /// A batch of `n` ids drawn from `0..pool`, repeats included.
    fn ids(n: u64, pool: u64) -> Vec<String> {
        (0..n)
            .map(|i| format!("id-{}", i.wrapping_mul(0x9e37_79b9_7f4a_7c15) % pool))
            .collect()
    }

    fn verdicts_of(ids: &[String], seen: &mut HashSet<String>) -> Vec<Verdict> {
        ids.iter()
            .map(|id| match seen.insert(id.clone()) {
                true => Verdict::New,
                false => Verdict::Duplicate,
            })
            .collect()
    }

    #[test]
    fn ids_of_a_migrating_shard_are_decided_last_and_in_order() {
        let engine = Engine::builder()
            .shards(4)
            .capacity(10_000)
            .secret(Secret::from_bytes([7; 16]))
            .build()
            .unwrap();
        let set = &engine.inner.set;
        let mut model = HashSet::new();
        let before = ids(300, 200);
        assert_eq!(
            engine.check_and_insert_batch(&before).unwrap(),
            verdicts_of(&before, &mut model)
        );
        // Shard 2 looks migrated while the batch runs: its ids, about a
        // quarter of 1 000, wait (more than fit at once), and a repeat of
        // an id decides after its first copy all the same.
        let held = set.hold_migration(2);
        let batch = ids(1000, 600);
        let in_shard_2 = batch
            .iter()
            .filter(|id| set.shard_index(engine.fingerprint(id).unwrap()) == 2)
            .count();
        assert!(in_shard_2 > WAITING, "{in_shard_2}");
        let waited = WAITED.with(Cell::get);
        let got = engine.check_and_insert_batch(&batch).unwrap();
        assert_eq!(WAITED.with(Cell::get) - waited, in_shard_2);
        drop(held);
        assert_eq!(got, verdicts_of(&batch, &mut model));
        for id in &batch {
            assert!(engine.contains(id).unwrap(), "{id}");
        }
    }

    #[test]
    fn once_an_id_of_a_shard_waits_the_shards_later_ids_wait_too() {
        let engine = Engine::builder().shards(128).build().unwrap();
        let set = &engine.inner.set;
        let mut waiting = Waiting::new(true);
        assert!(!waiting.must_wait(set, 5));
        waiting.push(0, Fingerprint(1), 5);
        // No migration runs, yet shard 5 (and its alias 69) must wait.
        assert!(waiting.must_wait(set, 5) && waiting.must_wait(set, 69));
        assert!(!waiting.must_wait(set, 6));
        let held = set.hold_migration(6);
        assert!(waiting.must_wait(set, 6));
        assert!(!Waiting::new(false).must_wait(set, 6));
        drop(held);
    }

    #[test]
    fn at_a_memory_ceiling_no_id_waits() {
        let engine = Engine::builder()
            .shards(4)
            .memory_limit(1 << 20, crate::MemoryPolicy::Reject)
            .build()
            .unwrap();
        let held = engine.inner.set.hold_migration(1);
        let waited = WAITED.with(Cell::get);
        let batch = ids(100, 100);
        let got = engine.check_and_insert_batch(&batch).unwrap();
        drop(held);
        assert_eq!(WAITED.with(Cell::get), waited);
        assert_eq!(got, verdicts_of(&batch, &mut HashSet::new()));
    }
}
