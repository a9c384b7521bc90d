//! A dedup consumer loop over rdkafka's `StreamConsumer`:
//!
//! ```text
//! recv ─► id ─► guard.process_if_new(id, handler) ─► store offset
//!   every commit interval, on revoke and on shutdown:
//!   make the engine's marks durable (engine.sync) ─► commit stored offsets
//! ```
//!
//! Offsets are committed only after every message up to them was handled
//! (or was a duplicate) *and* its mark is on disk: auto-commit and the
//! automatic offset store are off. A crash before a commit redelivers the
//! messages after the last commit; those whose marks reached the disk are
//! skipped, the others are handled again (at-least-once, never lost).
//! Messages are handled one at a time, in order, so backpressure is
//! natural: nothing is fetched faster than the handler runs (librdkafka's
//! own prefetch queue is bounded by `queued.max.messages.kbytes`).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::ClientContext;

use super::ids::IdStrategy;
use crate::guard::{IdempotencyGuard, Outcome};
use crate::stage::id::InvalidId;
use crate::Engine;

/// What to do with a message whose id cannot be read. (To try another
/// strategy first, use [`IdStrategy::Fallback`].)
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum InvalidMessages {
    /// Skip it (counted in [`ConsumerStats::invalid`]); its offset moves on.
    #[default]
    Skip,
    /// Stop the loop with [`ConsumeError::Invalid`]; its offset does not move.
    Fail,
}

/// Settings of a [`DedupConsumer`].
#[derive(Clone, Debug)]
pub struct DedupConsumerConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// `group.id`.
    pub group: String,
    /// Topics to subscribe to.
    pub topics: Vec<String>,
    /// Where ids come from.
    pub ids: IdStrategy,
    /// Messages without a readable id.
    pub on_invalid: InvalidMessages,
    /// How often stored offsets are committed (after an engine sync).
    pub commit_interval: Duration,
    /// Attempts after a handler's first failure, with exponential backoff.
    pub retries: u32,
    /// Backoff before the first retry (doubled each time, with jitter).
    pub retry_backoff: Duration,
    /// How long to wait for the brokers at start before failing.
    pub connect_timeout: Duration,
    /// Any other librdkafka property (`session.timeout.ms`, …).
    pub properties: Vec<(String, String)>,
}

impl DedupConsumerConfig {
    /// Defaults for everything but where to connect and what to read.
    pub fn new(brokers: impl Into<String>, group: impl Into<String>, topics: &[&str]) -> Self {
        DedupConsumerConfig {
            brokers: brokers.into(),
            group: group.into(),
            topics: topics.iter().map(|t| t.to_string()).collect(),
            ids: IdStrategy::default(),
            on_invalid: InvalidMessages::default(),
            commit_interval: Duration::from_secs(1),
            retries: 3,
            retry_backoff: Duration::from_millis(100),
            connect_timeout: Duration::from_secs(10),
            properties: Vec::new(),
        }
    }
}

/// Why the loop stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConsumeError {
    /// The client or the brokers failed (including: unreachable within
    /// `connect_timeout`).
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// A message without a readable id under [`InvalidMessages::Fail`].
    #[error("{topic}/{partition}@{offset}: {why}")]
    Invalid {
        /// Where the message is.
        topic: String,
        /// Its partition.
        partition: i32,
        /// Its offset.
        offset: i64,
        /// Why it has no id.
        why: InvalidId,
    },
    /// The handler failed on every attempt; the message's offset did not move.
    #[error("{topic}/{partition}@{offset}: handler failed after {attempts} attempts: {error}")]
    Handler {
        /// Where the message is.
        topic: String,
        /// Its partition.
        partition: i32,
        /// Its offset.
        offset: i64,
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        error: String,
    },
    /// The engine refused (a poisoned log, a memory ceiling, …).
    #[error(transparent)]
    Engine(#[from] crate::Error),
}

/// Counts of a consumer, read at any time.
#[derive(Debug, Default)]
pub struct ConsumerStats {
    /// Messages received.
    pub received: AtomicU64,
    /// Messages whose handler ran and succeeded.
    pub handled: AtomicU64,
    /// Duplicates: the handler was skipped, the offset moved on.
    pub duplicates: AtomicU64,
    /// Messages without a readable id.
    pub invalid: AtomicU64,
    /// Handler failures (each attempt).
    pub failed: AtomicU64,
    /// Offset commits.
    pub commits: AtomicU64,
    /// Rebalances seen (assign and revoke).
    pub rebalances: AtomicU64,
}

/// Commits what the loop stored when partitions are revoked, after making
/// the marks durable, so the next owner starts after them.
struct SeenContext {
    engine: Arc<Engine>,
    stats: Arc<ConsumerStats>,
}

impl ClientContext for SeenContext {}

impl ConsumerContext for SeenContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        self.stats.rebalances.fetch_add(1, Relaxed);
        if let Rebalance::Revoke(_) = rebalance {
            // The loop handles messages between polls, so everything
            // handled so far has its offset stored: sync, then commit.
            match self.engine.sync() {
                Ok(()) => {
                    if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
                        tracing::warn!(error = %e, "seen: offset commit on revoke failed");
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "seen: marks not durable on revoke; offsets not committed")
                }
            }
        }
    }
}

/// A consumer that runs a handler at most once per event id (within the
/// engine's TTL) and commits offsets only behind durable marks.
pub struct DedupConsumer {
    consumer: StreamConsumer<SeenContext>,
    guard: Arc<IdempotencyGuard>,
    config: DedupConsumerConfig,
    stats: Arc<ConsumerStats>,
}

impl std::fmt::Debug for DedupConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DedupConsumer")
            .field("group", &self.config.group)
            .field("topics", &self.config.topics)
            .finish_non_exhaustive()
    }
}

impl DedupConsumer {
    /// Connect and subscribe. Fails within `connect_timeout` when the
    /// brokers cannot be reached.
    pub fn new(
        config: DedupConsumerConfig,
        guard: Arc<IdempotencyGuard>,
    ) -> Result<Self, ConsumeError> {
        let stats = Arc::new(ConsumerStats::default());
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", &config.brokers)
            .set("group.id", &config.group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest");
        for (k, v) in &config.properties {
            client.set(k, v);
        }
        let consumer: StreamConsumer<SeenContext> = client.create_with_context(SeenContext {
            engine: Arc::clone(guard.engine()),
            stats: Arc::clone(&stats),
        })?;
        // A bounded wait for the brokers, instead of a silent retry loop.
        consumer.fetch_metadata(None, config.connect_timeout)?;
        let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        Ok(DedupConsumer {
            consumer,
            guard,
            config,
            stats,
        })
    }

    /// The consumer's counts.
    pub fn stats(&self) -> &ConsumerStats {
        &self.stats
    }

    /// Consume until `shutdown` completes or something fails. `handler`
    /// gets each new message (a copy it owns); duplicates skip it. On
    /// shutdown and on error the marks are made durable and the offsets of
    /// everything handled are committed before returning.
    pub async fn run<H, Fut, E>(
        &self,
        mut handler: H,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ConsumeError>
    where
        H: FnMut(OwnedMessage) -> Fut,
        Fut: Future<Output = Result<(), E>>,
        E: std::fmt::Display,
    {
        tokio::pin!(shutdown);
        let mut stored = false;
        let mut last_commit = Instant::now();
        let result = loop {
            let received = tokio::select! {
                _ = &mut shutdown => break Ok(()),
                r = tokio::time::timeout(self.config.commit_interval, self.consumer.recv()) => r,
            };
            match received {
                Err(_idle) => {}
                Ok(Err(e)) => {
                    // librdkafka retries broker trouble itself; report and go on.
                    tracing::warn!(error = %e, "seen: kafka consumer error");
                }
                Ok(Ok(msg)) => {
                    self.stats.received.fetch_add(1, Relaxed);
                    let owned = msg.detach();
                    drop(msg);
                    if let Err(e) = self.handle(&owned, &mut handler).await {
                        break Err(e);
                    }
                    if let Err(e) =
                        self.consumer
                            .store_offset(owned.topic(), owned.partition(), owned.offset())
                    {
                        break Err(e.into());
                    }
                    stored = true;
                }
            }
            if stored && last_commit.elapsed() >= self.config.commit_interval {
                if let Err(e) = self.commit() {
                    break Err(e);
                }
                stored = false;
                last_commit = Instant::now();
            }
        };
        // Whatever happened, what was handled is made durable and committed.
        let committed = if stored { self.commit() } else { Ok(()) };
        result.and(committed)
    }

    async fn handle<H, Fut, E>(
        &self,
        msg: &OwnedMessage,
        handler: &mut H,
    ) -> Result<(), ConsumeError>
    where
        H: FnMut(OwnedMessage) -> Fut,
        Fut: Future<Output = Result<(), E>>,
        E: std::fmt::Display,
    {
        let id = match self.config.ids.id_of(msg) {
            Ok(id) => id,
            Err(why) => {
                self.stats.invalid.fetch_add(1, Relaxed);
                tracing::warn!(topic = msg.topic(), partition = msg.partition(), offset = msg.offset(), %why, "seen: message without a readable id");
                return match self.config.on_invalid {
                    InvalidMessages::Skip => Ok(()),
                    InvalidMessages::Fail => Err(ConsumeError::Invalid {
                        topic: msg.topic().to_owned(),
                        partition: msg.partition(),
                        offset: msg.offset(),
                        why,
                    }),
                };
            }
        };
        let mut backoff = self.config.retry_backoff;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.guard.process_if_new(&id, handler(msg.clone())).await? {
                Outcome::Success(()) => {
                    self.stats.handled.fetch_add(1, Relaxed);
                    return Ok(());
                }
                Outcome::AlreadyProcessed | Outcome::InFlight => {
                    self.stats.duplicates.fetch_add(1, Relaxed);
                    return Ok(());
                }
                Outcome::Failed(e) => {
                    self.stats.failed.fetch_add(1, Relaxed);
                    if attempt > self.config.retries {
                        return Err(ConsumeError::Handler {
                            topic: msg.topic().to_owned(),
                            partition: msg.partition(),
                            offset: msg.offset(),
                            attempts: attempt,
                            error: e.to_string(),
                        });
                    }
                    tracing::debug!(attempt, error = %e, "seen: handler failed; retrying");
                    tokio::time::sleep(jitter(backoff)).await;
                    backoff = backoff.saturating_mul(2);
                }
            }
        }
    }

    /// Marks durable first, then the offsets that they cover.
    fn commit(&self) -> Result<(), ConsumeError> {
        self.guard.engine().sync()?;
        match self.consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) => {}
            // Nothing stored since the last commit (e.g. after a revoke).
            Err(KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => return Err(e.into()),
        }
        self.stats.commits.fetch_add(1, Relaxed);
        Ok(())
    }
}

/// `d` scaled by a factor in 0.5..1.5, so retries of many consumers spread.
fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    d.mul_f64(0.5 + (nanos % 1000) as f64 / 1000.0)
}
