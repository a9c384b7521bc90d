//! The one durable path. Every mark the engine makes — single ids,
//! batches, deferred commits, metadata marks, forgets — reaches the log
//! through here, in one order:
//!
//! ```text
//! mark in memory (the caller) → append to the log → on failure, take the
//! marks the log refused back out of memory → wait as the durability says
//! ```
//!
//! so changing what durability means is an edit in this file only.

use std::time::Duration;

use crossbeam_epoch::Guard;

use crate::error::Result;
use crate::fingerprint::Fingerprint;
use crate::set::ShardedSet;
use crate::ttl::Tick;
use crate::wal::{Position, RecoveryReport, Wal};

/// When an acknowledged mark is on disk. Each mode is described by what it
/// does *not* promise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Durability {
    /// The record is in the page cache when the call returns: it survives
    /// the process being killed, **not** the machine losing power.
    None,
    /// A background thread makes everything durable every `interval`: a
    /// power loss can lose about the last interval of acknowledged marks.
    Periodic(Duration),
    /// The call returns only after its record is on disk. Concurrent
    /// callers share one sync (group commit). Nothing acknowledged is lost
    /// to a crash or a power loss; the price is a sync per call (or batch).
    #[default]
    Sync,
}

/// A mark decided in memory but not yet logged: see
/// [`Engine::check_and_insert_deferred`](crate::Engine::check_and_insert_deferred).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use = "a pending mark is only durable once committed"]
pub struct PendingMark {
    pub(super) fingerprint: Fingerprint,
    /// [`FORGOTTEN_AT_ONCE`] when there is nothing to remember.
    pub(super) expiry: Tick,
}

/// The expiry of a mark that dedup-disabled engines (or a zero per-call
/// TTL) hand out: never stored, never logged. Tick 0 is no real instant.
pub(super) const FORGOTTEN_AT_ONCE: Tick = Tick(0);

impl PendingMark {
    pub(super) fn is_remembered(&self) -> bool {
        self.expiry != FORGOTTEN_AT_ONCE
    }
}

/// The log side of a durable engine.
pub(super) struct Durable {
    pub(super) wal: Wal,
    pub(super) durability: Durability,
    pub(super) report: RecoveryReport,
}

/// Marks handed to the log at a time (a stack buffer, no allocation): the
/// log reserves and writes each chunk at once.
pub(super) const LOG_CHUNK: usize = crate::wal::APPEND_CHUNK;
/// What a single id or one window of the batch path hands over.
const SMALL_LOG_CHUNK: usize = super::BATCH_WINDOW;

impl Durable {
    /// Log `marks` (already in `set`); take back every mark the log did not
    /// take, so a retry can succeed. Does not wait.
    pub(super) fn append(
        &self,
        set: &ShardedSet,
        marks: &[PendingMark],
        now: Tick,
        guard: &Guard,
    ) -> Result<Position> {
        // A single id (or a window) converts through a small stack buffer;
        // only large batches pay for a whole chunk's.
        if marks.len() <= SMALL_LOG_CHUNK {
            self.append_in::<SMALL_LOG_CHUNK>(set, marks, now, guard)
        } else {
            self.append_in::<LOG_CHUNK>(set, marks, now, guard)
        }
    }

    fn append_in<const N: usize>(
        &self,
        set: &ShardedSet,
        marks: &[PendingMark],
        now: Tick,
        guard: &Guard,
    ) -> Result<Position> {
        let mut pos = None;
        let mut buf = [(Fingerprint(0), 0u64); N];
        let mut at = 0;
        while at < marks.len() {
            let mut n = 0;
            while n < N && at < marks.len() {
                let m = marks[at];
                at += 1;
                if m.is_remembered() {
                    buf[n] = (m.fingerprint, m.expiry.to_unix_secs());
                    n += 1;
                }
            }
            if n == 0 {
                continue;
            }
            match self.wal.append_marks(&buf[..n], guard) {
                Ok(p) => pos = Some(p),
                Err((logged, e)) => {
                    let refused = buf[logged..n].iter().map(|&(fp, _)| fp);
                    let later = marks[at..].iter().filter(|m| m.is_remembered());
                    for fp in refused.chain(later.map(|m| m.fingerprint)) {
                        set.forget(fp, now, guard);
                    }
                    return Err(e);
                }
            }
        }
        Ok(pos.unwrap_or_else(|| self.wal.published(guard)))
    }

    /// [`Durable::append`] for one mark carrying metadata.
    pub(super) fn append_with_metadata(
        &self,
        set: &ShardedSet,
        mark: PendingMark,
        metadata: &[u8],
        now: Tick,
        guard: &Guard,
    ) -> Result<Position> {
        self.wal
            .append_mark_with_metadata(
                mark.fingerprint,
                mark.expiry.to_unix_secs(),
                metadata,
                guard,
            )
            .inspect_err(|_| {
                set.forget(mark.fingerprint, now, guard);
            })
    }

    /// Log a forget of a mark that expired at `expiry` (the forget lives as
    /// long as the mark it cancels).
    pub(super) fn append_forget(
        &self,
        fp: Fingerprint,
        expiry: Tick,
        guard: &Guard,
    ) -> Result<Position> {
        self.wal.append_forget(fp, expiry.to_unix_secs(), guard)
    }

    /// Under `Sync`, a call that will wait for its records starts: a sync
    /// leader gathers for it until the guard is dropped (just before the
    /// call's own wait). Nothing to track otherwise.
    pub(super) fn open_call(&self) -> Option<crate::wal::OpenCall<'_>> {
        matches!(self.durability, Durability::Sync).then(|| self.wal.open_call())
    }

    /// Keep the durability's promise for everything up to `pos`: under
    /// `Sync`, wait until it is on disk; otherwise return at once.
    pub(super) fn settle(&self, pos: Position) -> Result<()> {
        match self.durability {
            Durability::Sync => self.wal.wait_durable(pos),
            Durability::None | Durability::Periodic(_) => Ok(()),
        }
    }

    /// [`Durable::settle`] for everything published so far: a `Duplicate`
    /// under `Sync` promises the earlier mark is on disk, since the caller
    /// drops the event on our word.
    pub(super) fn settle_published(&self, guard: &Guard) -> Result<()> {
        match self.durability {
            Durability::Sync => self.wal.wait_durable(self.wal.published(guard)),
            Durability::None | Durability::Periodic(_) => Ok(()),
        }
    }
}
