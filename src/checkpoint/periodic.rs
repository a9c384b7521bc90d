//! Checkpoints in the background: every interval, or sooner once enough
//! new marks have accumulated, on a thread of its own (with its own small
//! runtime, so sync and async callers alike can use it). Failures are
//! counted and logged once per change of state; the next attempt sends
//! everything the failed ones did not.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{CheckpointReport, PgError, Postgres};
use crate::Engine;

/// A snapshot of the background checkpointer.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct CheckpointStatus {
    /// New marks made since the last successful checkpoint began.
    pub marks_behind: u64,
    /// Seconds since the last successful checkpoint, while marks are behind.
    pub seconds_behind: f64,
    /// Successful checkpoints.
    pub checkpoints: u64,
    /// Failed checkpoints.
    pub failures: u64,
    /// Rows written by all checkpoints.
    pub rows: u64,
    /// Rows per second of the last checkpoint that wrote any.
    pub rows_per_second: f64,
    /// Whether the circuit breaker is failing calls fast.
    pub breaker_open: bool,
    /// Connections checked out now.
    pub connections_in_use: u64,
}

#[derive(Default)]
struct Shared {
    marks_behind: AtomicU64,
    behind_since_ms: AtomicU64,
    checkpoints: AtomicU64,
    failures: AtomicU64,
    rows: AtomicU64,
    rows_per_second_bits: AtomicU64,
    failing: AtomicBool,
}

/// The background checkpointer of one engine. Dropping it (or
/// [`Checkpointer::stop`]) runs a last checkpoint.
pub struct Checkpointer {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<Option<PgError>>>,
    watch: CheckpointWatch,
}

/// Reads a [`Checkpointer`]'s status from elsewhere (a metrics endpoint)
/// without keeping it running.
#[derive(Clone)]
pub struct CheckpointWatch {
    shared: Arc<Shared>,
    pg: Arc<Postgres>,
    started: Instant,
}

impl std::fmt::Debug for CheckpointWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointWatch")
            .field("status", &self.status())
            .finish()
    }
}

impl std::fmt::Debug for Checkpointer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpointer")
            .field("status", &self.status())
            .finish()
    }
}

/// A checkpoint interval must be above zero: a zero one would checkpoint
/// back to back. (Checked by [`Checkpointer::start`], and up front by a
/// Kafka consumer whose partition stores are checkpointed.)
pub(crate) fn require_interval(every: Duration) -> crate::Result<()> {
    if every.is_zero() {
        return Err(crate::Error::Config(
            "the checkpoint interval must be above zero".into(),
        ));
    }
    Ok(())
}

impl Checkpointer {
    /// Checkpoint `engine` to `pg` every `every`, and also whenever
    /// `every_marks` new marks have accumulated (checked ten times a second).
    /// A zero `every` is refused ([`crate::Error::Config`]), as the CLI
    /// refuses `--checkpoint-every 0`: it would checkpoint back to back,
    /// a round trip to the database after another with no pause.
    pub fn start(
        pg: Arc<Postgres>,
        engine: Arc<Engine>,
        every: Duration,
        every_marks: Option<u64>,
    ) -> crate::Result<Checkpointer> {
        require_interval(every)?;
        engine.require_log()?;
        let shared = Arc::new(Shared::default());
        let started = Instant::now();
        let (stop, stopped) = mpsc::channel::<()>();
        // One worker that always runs: connections this runtime opens go
        // back to the shared pool, and their I/O must keep being driven
        // when another runtime uses them.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("seen-checkpoint-io")
            .enable_all()
            .build()
            .map_err(|source| crate::Error::System {
                what: "the checkpoint runtime",
                source,
            })?;
        let thread = {
            let (shared, pg) = (Arc::clone(&shared), Arc::clone(&pg));
            std::thread::Builder::new()
                .name("seen-checkpoint".into())
                .spawn(move || {
                    let poll = every.min(Duration::from_millis(100));
                    let mut last_attempt = Instant::now();
                    let mut new_at_last = 0;
                    let checkpoint = |new_at_last: &mut u64| {
                        let before = engine.stats().new;
                        let result = runtime.block_on(pg.checkpoint(&engine));
                        note(&shared, started, &result);
                        if result.is_ok() {
                            *new_at_last = before;
                        }
                        result.err()
                    };
                    loop {
                        match stopped.recv_timeout(poll) {
                            Err(mpsc::RecvTimeoutError::Timeout) => {}
                            // Stopped or dropped: one last checkpoint.
                            _ => return checkpoint(&mut new_at_last),
                        }
                        let behind = engine.stats().new.saturating_sub(new_at_last);
                        shared.marks_behind.store(behind, Relaxed);
                        let due = last_attempt.elapsed() >= every
                            || every_marks.is_some_and(|n| behind >= n);
                        if due {
                            last_attempt = Instant::now();
                            checkpoint(&mut new_at_last);
                            let behind = engine.stats().new.saturating_sub(new_at_last);
                            shared.marks_behind.store(behind, Relaxed);
                        }
                    }
                })
                .map_err(|source| crate::Error::System {
                    what: "the checkpoint thread",
                    source,
                })?
        };
        Ok(Checkpointer {
            stop: Some(stop),
            thread: Some(thread),
            watch: CheckpointWatch {
                shared,
                pg,
                started,
            },
        })
    }

    /// Where the checkpointer stands.
    pub fn status(&self) -> CheckpointStatus {
        self.watch.status()
    }

    /// A handle that reads [`Checkpointer::status`].
    pub fn watch(&self) -> CheckpointWatch {
        self.watch.clone()
    }

    /// Stop, after a last checkpoint; its error, if it failed.
    pub fn stop(mut self) -> Option<PgError> {
        self.finish()
    }

    fn finish(&mut self) -> Option<PgError> {
        drop(self.stop.take());
        self.thread.take().and_then(|t| t.join().ok().flatten())
    }
}

impl CheckpointWatch {
    /// Where the checkpointer stands.
    pub fn status(&self) -> CheckpointStatus {
        let s = &self.shared;
        let marks_behind = s.marks_behind.load(Relaxed);
        let since = s.behind_since_ms.load(Relaxed);
        let now_ms = self.started.elapsed().as_millis() as u64;
        CheckpointStatus {
            marks_behind,
            seconds_behind: if marks_behind > 0 {
                now_ms.saturating_sub(since) as f64 / 1000.0
            } else {
                0.0
            },
            checkpoints: s.checkpoints.load(Relaxed),
            failures: s.failures.load(Relaxed),
            rows: s.rows.load(Relaxed),
            rows_per_second: f64::from_bits(s.rows_per_second_bits.load(Relaxed)),
            breaker_open: self.pg.breaker_open(),
            connections_in_use: self.pg.connections_in_use() as u64,
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        if let Some(e) = self.finish() {
            tracing::error!(error = %e, "seen: the last checkpoint failed");
        }
    }
}

/// Count one attempt; log when checkpoints start or stop failing.
fn note(shared: &Shared, started: Instant, result: &Result<CheckpointReport, PgError>) {
    match result {
        Ok(r) => {
            shared.checkpoints.fetch_add(1, Relaxed);
            shared.rows.fetch_add(r.written + r.forgotten, Relaxed);
            // Seconds behind count from the start of this checkpoint.
            let at = started.elapsed().saturating_sub(r.duration);
            shared.behind_since_ms.store(at.as_millis() as u64, Relaxed);
            if r.written > 0 && !r.duration.is_zero() {
                let rate = r.written as f64 / r.duration.as_secs_f64();
                shared.rows_per_second_bits.store(rate.to_bits(), Relaxed);
            }
            if shared.failing.swap(false, Relaxed) {
                tracing::warn!("seen: checkpoints to PostgreSQL succeed again");
            }
        }
        Err(e) => {
            shared.failures.fetch_add(1, Relaxed);
            if !shared.failing.swap(true, Relaxed) {
                tracing::warn!(error = %e, "seen: checkpoint to PostgreSQL failed; marks stay in the local log and the next checkpoint catches up");
            }
        }
    }
}
