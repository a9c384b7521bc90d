//! The idempotency guard: run a piece of work at most once per id.
//!
//! ```text
//! process_if_new(id, work):
//!   claim id in memory ──► someone has it in flight? ── yes ──► InFlight, or wait for them
//!        │ new                                                  (their success → AlreadyProcessed,
//!        ▼                                                       their failure → we take the claim)
//!   run work ── Ok ──► log the mark (durable per the engine) ──► Success
//!        └───── Err / panic / cancelled ──► release the claim ──► Failed (a retry can run)
//! ```
//!
//! The mark becomes durable only *after* the work succeeded, so a crash
//! between the two leaves the id unmarked and the work runs again on
//! redelivery: at-least-once, the documented window. It never leaves an id
//! marked whose work did not finish.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::watch;

use crate::engine::{self, PendingMark};
use crate::set::Settle;
use crate::{Engine, Error, Fingerprint, Result};

/// What to do when a second call for an id arrives while the first is
/// still running its work.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum InFlightPolicy {
    /// Return [`Outcome::InFlight`] at once (the caller can requeue).
    ReturnInFlight,
    /// Wait for the first call: [`Outcome::AlreadyProcessed`] if it
    /// succeeded; if it failed, take the claim over and run the work.
    #[default]
    Wait,
}

/// The result of [`IdempotencyGuard::process_if_new`].
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome<T, E> {
    /// The work ran, succeeded, and the id is marked.
    Success(T),
    /// The id was already processed; the work did not run.
    AlreadyProcessed,
    /// Another call is running the work for this id right now
    /// ([`InFlightPolicy::ReturnInFlight`] only); the work did not run.
    InFlight,
    /// The work ran and failed; the claim was released so a retry can run.
    Failed(E),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ClaimState {
    Running,
    Succeeded,
    Released,
}

/// Whether an id is in flight is in the engine's set: a claim is stored
/// with an "in flight" expiry until its work ends (see `set/table.rs`), so
/// an uncontended call takes no lock of the guard's own and allocates
/// nothing. Only a call that meets a claim in flight comes here: it
/// leaves a channel to hear the verdict on, and flags the claim "waited"
/// so its claimant knows to look. Sharded by fingerprint so no lock is
/// global.
const WAITER_SHARDS: usize = 64;
type Waiters = Mutex<HashMap<u128, watch::Sender<ClaimState>, FingerprintHash>>;

/// Fingerprints are already uniformly random: hash by taking 64 of their bits.
#[derive(Default, Clone, Copy)]
struct FingerprintHash;

impl std::hash::BuildHasher for FingerprintHash {
    type Hasher = FingerprintHasher;
    fn build_hasher(&self) -> FingerprintHasher {
        FingerprintHasher(0)
    }
}

#[derive(Default)]
struct FingerprintHasher(u64);

impl std::hash::Hasher for FingerprintHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only used for u128 keys (write_u128); fold anything else in.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ b as u64;
        }
    }
    fn write_u128(&mut self, n: u128) {
        self.0 = n as u64;
    }
}

/// Wraps an [`Engine`] to run work at most once per id.
///
/// ```
/// # tokio_test_block_on(async {
/// use std::sync::Arc;
/// use seen::{Engine, guard::{IdempotencyGuard, Outcome}};
///
/// let guard = IdempotencyGuard::new(Arc::new(Engine::builder().build()?));
/// let first = guard.process_if_new("order-7", async { Ok::<_, std::io::Error>("charged") }).await?;
/// assert!(matches!(first, Outcome::Success("charged")));
/// let again = guard.process_if_new("order-7", async { Ok::<_, std::io::Error>("charged twice!") }).await?;
/// assert!(matches!(again, Outcome::AlreadyProcessed));
/// # Ok::<(), seen::Error>(()) });
/// # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
/// #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
/// # }
/// ```
pub struct IdempotencyGuard {
    engine: Arc<Engine>,
    policy: InFlightPolicy,
    waiters: Box<[Waiters]>,
    counters: GuardCounters,
}

/// The guard's own counts (the engine counts checks; these count work).
/// Touched only on collisions and failures, never on the uncontended path.
#[derive(Debug, Default)]
struct GuardCounters {
    inflight_collisions: AtomicU64,
    failed: AtomicU64,
    released: AtomicU64,
}

/// A snapshot of [`IdempotencyGuard`]'s counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct GuardStats {
    /// Calls that met their id already in flight.
    pub inflight_collisions: u64,
    /// Work that returned an error.
    pub failed: u64,
    /// Claims released (work failed, panicked or was cancelled).
    pub released: u64,
}

impl std::fmt::Debug for IdempotencyGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyGuard")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

enum Claim {
    Ours(PendingMark),
    Done,
    Busy(watch::Receiver<ClaimState>),
}

impl IdempotencyGuard {
    /// A guard that waits for in-flight duplicates ([`InFlightPolicy::Wait`]).
    pub fn new(engine: Arc<Engine>) -> Self {
        Self::with_policy(engine, InFlightPolicy::default())
    }

    /// A guard with an explicit in-flight policy.
    pub fn with_policy(engine: Arc<Engine>, policy: InFlightPolicy) -> Self {
        IdempotencyGuard {
            engine,
            policy,
            waiters: (0..WAITER_SHARDS)
                .map(|_| Mutex::new(HashMap::with_hasher(FingerprintHash)))
                .collect(),
            counters: GuardCounters::default(),
        }
    }

    /// A snapshot of the guard's counters.
    pub fn stats(&self) -> GuardStats {
        GuardStats {
            inflight_collisions: self.counters.inflight_collisions.load(Relaxed),
            failed: self.counters.failed.load(Relaxed),
            released: self.counters.released.load(Relaxed),
        }
    }

    /// The engine underneath.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    fn waiters(&self, fp: Fingerprint) -> &Waiters {
        &self.waiters[(fp.hi() >> 58) as usize % WAITER_SHARDS]
    }

    fn try_claim(&self, fp: Fingerprint) -> Result<Claim> {
        loop {
            match self.engine.claim(fp)? {
                engine::Claim::New(mark) => return Ok(Claim::Ours(mark)),
                engine::Claim::Processed => return Ok(Claim::Done),
                engine::Claim::InFlight => {
                    if let Some(verdict) = self.listen(fp) {
                        return Ok(Claim::Busy(verdict));
                    }
                    // It ended before we could listen: claim again.
                }
            }
        }
    }

    /// Listen for the verdict on the claim of `fp` in flight; `None` if it
    /// has ended already. The channel goes in first and the claim is
    /// flagged under the same lock its claimant takes to announce the
    /// verdict ([`ClaimHandle::announce`]), so the claimant either sees
    /// the flag and finds the channel, or ended before the flag was set
    /// (and then the flag is refused).
    fn listen(&self, fp: Fingerprint) -> Option<watch::Receiver<ClaimState>> {
        use std::collections::hash_map::Entry;
        let mut map = self.waiters(fp).lock();
        let (rx, made) = match map.entry(fp.0) {
            Entry::Occupied(tx) => (tx.get().subscribe(), false),
            Entry::Vacant(slot) => {
                let rx = slot
                    .insert(watch::channel(ClaimState::Running).0)
                    .subscribe();
                (rx, true)
            }
        };
        if self.engine.wait_on_claim(fp) {
            Some(rx)
        } else {
            if made {
                map.remove(&fp.0);
            }
            None
        }
    }

    /// Claim `fp` without waiting: the synchronous first step of
    /// [`IdempotencyGuard::process_fingerprint_if_new`], for a caller that
    /// decides duplicates before it prepares the work (the Kafka loop skips
    /// a duplicate without copying its message).
    #[cfg(feature = "kafka")]
    /// It takes the caller's `Arc`, which a new claim keeps.
    pub(crate) fn claim(self: Arc<Self>, fp: Fingerprint) -> Result<Claimed> {
        match self.engine.claim(fp)? {
            engine::Claim::New(mark) => Ok(Claimed::New(ClaimHandle {
                guard: self,
                fp,
                mark: Some(mark),
            })),
            engine::Claim::Processed => {
                self.engine.wait_durable_if_sync()?;
                Ok(Claimed::Processed)
            }
            // No listening here: the caller's full path listens (and
            // claims again if the claim has ended by then).
            engine::Claim::InFlight => Ok(Claimed::Busy),
        }
    }

    /// Run `work` if `id` was not processed before; see [`Outcome`].
    ///
    /// Errors (`Err`) are about the id or storage, never about the work:
    /// an invalid id, a memory ceiling under `Reject`, or a log failure
    /// while marking (then the claim is released and the work's result is
    /// dropped; the work may run again on retry).
    pub async fn process_if_new<T, E, F>(
        &self,
        id: impl AsRef<[u8]>,
        work: F,
    ) -> Result<Outcome<T, E>>
    where
        F: Future<Output = Result<T, E>>,
    {
        let fp = self.engine.fingerprint(id)?;
        self.process_fingerprint_if_new(fp, work).await
    }

    /// [`IdempotencyGuard::process_if_new`] for a fingerprint computed
    /// earlier with [`Engine::fingerprint`] (which also validates the id),
    /// so a caller that already checked the id does not hash it twice.
    pub async fn process_fingerprint_if_new<T, E, F>(
        &self,
        fp: Fingerprint,
        work: F,
    ) -> Result<Outcome<T, E>>
    where
        F: Future<Output = Result<T, E>>,
    {
        let mark = loop {
            match self.try_claim(fp)? {
                Claim::Ours(mark) => break mark,
                Claim::Done => {
                    self.engine.wait_durable_if_sync()?;
                    return Ok(Outcome::AlreadyProcessed);
                }
                Claim::Busy(mut rx) => {
                    self.counters.inflight_collisions.fetch_add(1, Relaxed);
                    if self.policy == InFlightPolicy::ReturnInFlight {
                        return Ok(Outcome::InFlight);
                    }
                    let state = rx
                        .wait_for(|s| *s != ClaimState::Running)
                        .await
                        .map(|s| *s)
                        // The claimant vanished without a verdict: released.
                        .unwrap_or(ClaimState::Released);
                    if state == ClaimState::Succeeded {
                        return Ok(Outcome::AlreadyProcessed);
                    }
                    // Released: loop and try to take the claim over.
                }
            }
        };
        let mut claim = ClaimHandle {
            guard: self,
            fp,
            mark: Some(mark),
        };
        match work.await {
            Ok(value) => {
                claim.commit()?;
                Ok(Outcome::Success(value))
            }
            Err(e) => {
                self.counters.failed.fetch_add(1, Relaxed);
                claim.release();
                Ok(Outcome::Failed(e))
            }
        }
    }

    /// Compatibility: has `id` been processed (marked and not expired)?
    pub fn is_processed(&self, id: impl AsRef<[u8]>) -> Result<bool> {
        self.engine.contains(id)
    }

    /// Compatibility: mark `id` processed without running anything, with
    /// optional JSON metadata stored beside the mark in the log (at most
    /// [`MAX_METADATA_LEN`] bytes as compact JSON). Returns `true` if the
    /// id was newly marked.
    pub fn mark_processed(
        &self,
        id: impl AsRef<[u8]>,
        metadata: Option<&serde_json::Value>,
    ) -> Result<bool> {
        let verdict = match metadata {
            Some(v) => {
                let bytes = serde_json::to_vec(v).map_err(|e| Error::Config(e.to_string()))?;
                self.engine.check_and_insert_with_metadata(id, &bytes)?
            }
            None => self.engine.check_and_insert(id)?,
        };
        Ok(verdict.is_new())
    }

    /// Compatibility: reclaim expired marks now; returns how many.
    pub fn cleanup_old_events(&self) -> usize {
        self.engine.expire_now()
    }
}

/// Largest metadata accepted by [`IdempotencyGuard::mark_processed`].
pub const MAX_METADATA_LEN: usize = crate::MAX_METADATA_LEN;

/// A claim being worked on. Dropped without `commit` — the work failed,
/// panicked, or its future was cancelled — it releases the id. `G` is how
/// it holds the guard: borrowed inside `process_fingerprint_if_new`, an
/// `Arc` when the claim outlives the call that took it ([`Claimed::New`]).
pub(crate) struct ClaimHandle<G: std::ops::Deref<Target = IdempotencyGuard>> {
    guard: G,
    fp: Fingerprint,
    mark: Option<PendingMark>,
}

/// What [`IdempotencyGuard::claim`] found, without waiting for anything.
#[cfg(feature = "kafka")]
pub(crate) enum Claimed {
    /// New: the caller runs the work, then commits or releases the claim.
    New(ClaimHandle<Arc<IdempotencyGuard>>),
    /// Marked before (and durable, under `Sync`).
    Processed,
    /// Another call has it in flight; wait through
    /// [`IdempotencyGuard::process_fingerprint_if_new`].
    Busy,
}

#[cfg(feature = "kafka")]
impl ClaimHandle<Arc<IdempotencyGuard>> {
    pub(crate) fn guard(&self) -> &Arc<IdempotencyGuard> {
        &self.guard
    }

    pub(crate) fn fingerprint(&self) -> Fingerprint {
        self.fp
    }

    /// The work failed: count it and release the id for a retry.
    pub(crate) fn fail(&mut self) {
        self.guard.counters.failed.fetch_add(1, Relaxed);
        self.release();
    }
}

impl<G: std::ops::Deref<Target = IdempotencyGuard>> ClaimHandle<G> {
    /// Tell anyone listening how the claim ended. `settled` is what
    /// settling the claim in the engine found: unless it was in flight and
    /// nobody had flagged it, there may be listeners.
    fn announce(&self, settled: Settle, state: ClaimState) {
        if settled == (Settle::Settled { waited: false }) {
            return;
        }
        let mut map = self.guard.waiters(self.fp).lock();
        if let Some(tx) = map.remove(&self.fp.0) {
            tx.send_replace(state);
        }
    }

    pub(crate) fn commit(&mut self) -> Result<()> {
        let Some(mark) = self.mark.take() else {
            return Ok(());
        };
        match self.guard.engine.commit_claim(mark) {
            Ok(settled) => {
                self.announce(settled, ClaimState::Succeeded);
                Ok(())
            }
            Err(e) => {
                self.mark = Some(mark);
                self.release();
                Err(e)
            }
        }
    }

    pub(crate) fn release(&mut self) {
        if let Some(mark) = self.mark.take() {
            let settled = self.guard.engine.release_claim(mark);
            self.guard.counters.released.fetch_add(1, Relaxed);
            self.announce(settled, ClaimState::Released);
        }
    }
}

impl<G: std::ops::Deref<Target = IdempotencyGuard>> Drop for ClaimHandle<G> {
    fn drop(&mut self) {
        self.release();
    }
}
