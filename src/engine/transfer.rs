//! Marks in and out of a durable engine, for checkpoints kept elsewhere
//! (`seen::checkpoint`): the log read forward from a position, and marks
//! loaded from a checkpoint or another system, with their own expiries.

use crossbeam_epoch as epoch;

use super::durable::PendingMark;
use super::Engine;
use crate::error::{Error, Result};
use crate::fingerprint::{Fingerprint, Secret};
use crate::set::Verdict;
use crate::ttl::Tick;
use crate::wal::changes::ChangeReader;
use crate::wal::Position;

impl Engine {
    /// The fingerprint secret: whoever holds it can test ids against marks,
    /// so it travels only to where the marks themselves go.
    pub(crate) fn secret(&self) -> Secret {
        self.inner.secret
    }

    /// The random id of this engine's log (`None` in memory): log
    /// positions compare only within one log.
    pub(crate) fn log_id(&self) -> Option<u128> {
        self.inner.durable.as_ref().map(|d| d.wal.store_id())
    }

    /// The durable records after `from` (a [`LogPosition::as_u64`] of this
    /// log; 0 for its start); an error for an in-memory engine.
    pub(crate) fn changes_since(&self, from: u64) -> Result<ChangeReader<'_>> {
        match &self.inner.durable {
            Some(d) => Ok(d.wal.changes_since(Position::from_u64(from))),
            None => Err(not_durable()),
        }
    }

    /// Load marks `(fingerprint, expiry in Unix seconds)` made elsewhere: each
    /// live one not already marked is marked (in memory and in the log)
    /// with its own expiry; expired ones are skipped. Returns how many were
    /// new. Made durable before it returns, whatever the durability.
    pub(crate) fn load_marks(&self, marks: &[(Fingerprint, u64)]) -> Result<usize> {
        if !self.remembers() {
            return Ok(0);
        }
        let guard = &epoch::pin();
        let now = self.inner.now();
        let mut fresh = Vec::with_capacity(marks.len());
        for &(fp, expiry_unix) in marks {
            let expiry = Tick::from_unix_secs(expiry_unix);
            if expiry <= now {
                continue;
            }
            match self.inner.set.insert(fp, now, expiry, guard) {
                Ok(Verdict::New) => fresh.push(PendingMark {
                    fingerprint: fp,
                    expiry,
                }),
                Ok(Verdict::Duplicate) => {}
                Err(e) => {
                    for m in &fresh {
                        self.inner.set.forget(m.fingerprint, now, guard);
                    }
                    return Err(e);
                }
            }
        }
        if let Some(d) = &self.inner.durable {
            let pos = d.append(&self.inner.set, &fresh, now, guard)?;
            d.wal.wait_durable(pos)?;
        }
        Ok(fresh.len())
    }

    /// Forget fingerprints (a checkpoint's forgets, on restore); how many
    /// were marked. Durable when it returns.
    pub(crate) fn forget_fingerprints(&self, fps: &[Fingerprint]) -> Result<usize> {
        let guard = &epoch::pin();
        let now = self.inner.now();
        let mut forgotten = 0;
        let mut last = None;
        for &fp in fps {
            if let Some(expiry) = self.inner.set.forget(fp, now, guard) {
                forgotten += 1;
                if let Some(d) = &self.inner.durable {
                    last = Some(d.append_forget(fp, expiry, guard)?);
                }
            }
        }
        if let (Some(d), Some(pos)) = (&self.inner.durable, last) {
            d.wal.wait_durable(pos)?;
        }
        Ok(forgotten)
    }

    /// A durable engine's log, or the error a checkpoint reports without one.
    pub(crate) fn require_log(&self) -> Result<u128> {
        self.log_id().ok_or_else(not_durable)
    }
}

fn not_durable() -> Error {
    Error::Config("checkpoints need a durable engine (EngineBuilder::open)".into())
}
