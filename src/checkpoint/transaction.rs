//! Marking inside the caller's PostgreSQL transaction (the outbox
//! pattern): the mark row commits or rolls back with the caller's own
//! writes, and the in-memory set and local log learn it only after the
//! commit.
//!
//! PostgreSQL is the arbiter for ids marked this way: two transactions
//! racing on one id serialise on its row, and the loser sees `Duplicate`
//! once the winner commits. A crash between the commit and
//! [`TxMark::applied`] leaves the mark in the database only; the next
//! attempt at that id still finds its row.

use std::sync::atomic::Ordering::*;

use sqlx::PgConnection;

use super::{PgError, Postgres};
use crate::fingerprint::Fingerprint;
use crate::{Engine, Verdict};

/// A mark recorded in an open transaction. After the transaction commits,
/// hand it to [`TxMark::applied`]; after a rollback, drop it.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "apply the mark to the engine once the transaction commits"]
pub struct TxMark {
    fingerprint: Fingerprint,
    expiry_unix_secs: u64,
    verdict: Verdict,
}

impl TxMark {
    /// `New`: the id was not marked and is now marked in the transaction.
    /// `Duplicate`: it was already marked; nothing was written.
    pub fn verdict(&self) -> Verdict {
        self.verdict
    }

    /// Teach the engine (memory and log) a mark whose transaction
    /// committed. Durable when it returns, whatever the durability.
    pub fn applied(self, engine: &Engine) -> crate::Result<()> {
        if self.verdict == Verdict::New {
            engine.load_marks(&[(self.fingerprint, self.expiry_unix_secs)])?;
        }
        Ok(())
    }
}

impl Postgres {
    /// Mark `id` inside the caller's transaction `tx` (from `sqlx`:
    /// `&mut *transaction`). Nothing changes outside the transaction until
    /// it commits and the mark is [applied](TxMark::applied).
    pub async fn mark_in_transaction(
        &self,
        tx: &mut PgConnection,
        engine: &Engine,
        id: impl AsRef<[u8]>,
    ) -> Result<TxMark, PgError> {
        let fingerprint = engine.fingerprint(id)?;
        let now = crate::ttl::clock::Clock::now_unix_secs(&crate::ttl::clock::SystemClock);
        let expiry_unix_secs = now + engine.ttl().as_secs();
        let mark = |verdict| TxMark {
            fingerprint,
            expiry_unix_secs,
            verdict,
        };
        if engine.contains_fingerprint(fingerprint) {
            return Ok(mark(Verdict::Duplicate));
        }
        let mut store_id = self.store_id.load(Acquire);
        if store_id == 0 {
            // Outside the caller's transaction: registering takes the
            // store row's lock, which must not be held until their commit.
            let secret = engine.secret();
            store_id = self
                .hosts
                .run("register the store", |pool| async move {
                    let mut conn = pool.acquire().await?;
                    self.ensure_store(&mut conn, secret).await
                })
                .await?;
            self.store_id.store(store_id, Release);
        }
        let inserted = sqlx::query(
            "INSERT INTO seen_tx_marks (store_id, fingerprint, expires_at) VALUES ($1, $2, $3)
             ON CONFLICT (store_id, fingerprint) DO UPDATE SET expires_at = EXCLUDED.expires_at
             WHERE seen_tx_marks.expires_at <= $4
             RETURNING 1",
        )
        .bind(store_id)
        .bind(uuid::Uuid::from_bytes(fingerprint.to_le_bytes()))
        .bind(expiry_unix_secs as i64)
        .bind(now as i64)
        .fetch_optional(&mut *tx)
        .await?;
        Ok(mark(match inserted {
            Some(_) => Verdict::New,
            None => Verdict::Duplicate,
        }))
    }
}
