//! A dedup consumer loop over rdkafka's `StreamConsumer`:
//!
//! ```text
//! recv ─► id ─► claim ─┬─ duplicate ─────────────────────► offset ready
//!                      └─ new ─► handler ─► mark (log) ──► offset ready
//!   every commit interval, on revoke and on shutdown:
//!   make the engine's marks durable (engine.sync) ─► store the ready
//!   offsets (one per partition) ─► commit them
//! ```
//!
//! Offsets are committed only after every message up to them was handled
//! (or was a duplicate) *and* its mark is on disk: auto-commit and the
//! automatic offset store are off. A crash before a commit redelivers the
//! messages after the last commit; those whose marks reached the disk are
//! skipped, the others are handled again (at-least-once, never lost).
//!
//! Partitions are handled concurrently on the caller's task, each strictly
//! in order (one handler running per partition). Messages received but not
//! yet handled are bounded by `max_in_flight`: at that many, the loop stops
//! fetching until handlers catch up. A topic that does not exist, or that
//! the group may not read, stops the loop with an error instead of being
//! retried forever.
//!
//! The per-message path is kept short because it runs once per event at
//! broker speed: a duplicate is decided from the borrowed message (no
//! copy; a new id gets one lean [`Received`] copy), a handler that
//! completes without waiting finishes inline (in the box the last such run
//! used), the next message is peeked at so its set slot is prefetched
//! while the current one is handled, partitions are found by index, and
//! offsets are handed to librdkafka once per partition per commit rather
//! than once per message.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, MessageStream, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Header, Message, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::ClientContext;

use super::ids::{IdSource, IdStrategy};
use super::partitions::{Event, Partition, PartitionStats, Partitions};
use super::producer::EventProducer;
use super::received::Received;
use super::scope::{Scope, Stores};
use crate::guard::{ClaimHandle, Claimed, IdempotencyGuard, Outcome};
use crate::stage::id::InvalidId;
use crate::stats::Histogram;

/// What to do with a message whose id cannot be read. (To try another
/// strategy first, use [`IdStrategy::Fallback`].)
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum InvalidMessages {
    /// Skip it (counted in [`ConsumerStats::invalid`]); its offset moves on.
    #[default]
    Skip,
    /// Send it to the dead-letter topic with the reason in a header, wait
    /// for the broker's confirmation, then move on.
    DeadLetter,
    /// Stop the loop with [`ConsumeError::Invalid`]; its offset does not move.
    Fail,
}

/// What to do when the handler still fails after its retries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum AfterRetries {
    /// Stop the loop with [`ConsumeError::Handler`]; the offset does not move.
    #[default]
    Stop,
    /// Send the message to the dead-letter topic and move on (the id stays
    /// unmarked, so a replayed copy is tried again).
    DeadLetter,
}

/// Headers a dead-lettered message carries besides its own.
pub const DEAD_LETTER_REASON_HEADER: &str = "seen-dead-letter-reason";
/// Where the dead-lettered message came from: `topic/partition@offset`.
pub const DEAD_LETTER_ORIGIN_HEADER: &str = "seen-dead-letter-origin";

/// A dead letter's headers: the message's own, the reason, the origin.
pub(crate) fn dead_letter_headers(msg: &impl IdSource, why: &str) -> OwnedHeaders {
    let headers = super::ids::copy_headers(msg, None);
    let origin = format!("{}/{}@{}", msg.topic(), msg.partition(), msg.offset());
    headers
        .insert(Header {
            key: DEAD_LETTER_REASON_HEADER,
            value: Some(why.as_bytes()),
        })
        .insert(Header {
            key: DEAD_LETTER_ORIGIN_HEADER,
            value: Some(origin.as_bytes()),
        })
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
    /// A handler that fails on every attempt.
    pub after_retries: AfterRetries,
    /// The dead-letter topic, for [`InvalidMessages::DeadLetter`] and
    /// [`AfterRetries::DeadLetter`].
    pub dead_letter_topic: Option<String>,
    /// How often stored offsets are committed (after an engine sync).
    /// Zero commits as often as the runtime's timer fires (about every
    /// millisecond while there is something to commit).
    pub commit_interval: Duration,
    /// Messages received but not yet handled, across partitions; fetching
    /// pauses at this many (backpressure). At least 1 (0 is taken as 1: it
    /// would never fetch at all).
    pub max_in_flight: usize,
    /// Attempts after a handler's first failure, with exponential backoff.
    pub retries: u32,
    /// Backoff before the first retry (doubled each time, with jitter).
    pub retry_backoff: Duration,
    /// How long to wait for the brokers at start before failing.
    pub connect_timeout: Duration,
    /// Any other librdkafka property (`session.timeout.ms`, …).
    pub properties: Vec<(String, String)>,
    /// In partition scope, checkpoint each partition's store to PostgreSQL
    /// and restore it on assign (feature `postgres`).
    #[cfg(feature = "postgres")]
    pub checkpoint: Option<super::scope::PartitionCheckpoint>,
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
            after_retries: AfterRetries::default(),
            dead_letter_topic: None,
            commit_interval: Duration::from_secs(1),
            max_in_flight: 1024,
            retries: 3,
            retry_backoff: Duration::from_millis(100),
            connect_timeout: Duration::from_secs(10),
            properties: Vec::new(),
            #[cfg(feature = "postgres")]
            checkpoint: None,
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
    /// A partition's store could not be opened (partition scope).
    #[error("partition store: {0}")]
    Store(String),
    /// A dead-letter policy without a dead-letter topic.
    #[error("a dead-letter policy needs DedupConsumerConfig::dead_letter_topic")]
    NoDeadLetterTopic,
}

/// Counts of a consumer, read at any time.
#[derive(Debug, Default)]
pub struct ConsumerStats {
    /// Messages received.
    pub received: AtomicU64,
    /// Messages finished: handled, skipped as duplicates or invalid, or
    /// dead-lettered, with their offsets stored for the next commit.
    pub done: AtomicU64,
    /// Messages whose handler ran and succeeded.
    pub handled: AtomicU64,
    /// Duplicates: the handler was skipped, the offset moved on.
    pub duplicates: AtomicU64,
    /// Messages without a readable id.
    pub invalid: AtomicU64,
    /// Handler failures (each attempt).
    pub failed: AtomicU64,
    /// Messages sent to the dead-letter topic.
    pub dead_lettered: AtomicU64,
    /// Offset commits.
    pub commits: AtomicU64,
    /// Commits the group deferred (a rebalance in progress, …), retried later.
    pub commit_retries: AtomicU64,
    /// Rebalances seen (assign and revoke).
    pub rebalances: AtomicU64,
}

/// Commits what the loop finished when partitions are revoked, after
/// making the marks durable, so the next owner starts after them.
struct SeenContext {
    stores: Arc<Stores>,
    stats: Arc<ConsumerStats>,
    partitions: Arc<Partitions>,
}

impl ClientContext for SeenContext {
    /// librdkafka's periodic statistics: keep each partition's lag.
    fn stats(&self, statistics: rdkafka::Statistics) {
        for (topic, t) in &statistics.topics {
            for (&partition, p) in &t.partitions {
                if partition >= 0 && p.consumer_lag >= 0 {
                    self.partitions.set_lag(topic, partition, p.consumer_lag);
                }
            }
        }
    }
}

impl ConsumerContext for SeenContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        self.stats.rebalances.fetch_add(1, Relaxed);
        if let Rebalance::Assign(tpl) = rebalance {
            // Partition scope: load each new partition's marks before any
            // of its messages can be handled.
            for e in tpl.elements() {
                self.stores.assign(e.topic(), e.partition());
            }
        }
        if let Rebalance::Revoke(tpl) = rebalance {
            // Everything finished so far: sync, store, commit. (Handlers
            // still running finish after this; their partitions' next
            // owner reads those messages again.)
            match self.stores.sync() {
                Ok(()) => {
                    store_ready(consumer, &self.partitions);
                    if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
                        tracing::warn!(error = %e, "seen: offset commit on revoke failed");
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "seen: marks not durable on revoke; offsets not committed")
                }
            }
            // Work of these partitions that finishes later stores nothing.
            for e in tpl.elements() {
                if let Some(p) = self.partitions.get(e.topic(), e.partition()) {
                    p.revoke();
                }
            }
            // Partition scope: the revoked partitions' stores close, so
            // their next owner can open them.
            for e in tpl.elements() {
                self.stores.revoke(e.topic(), e.partition());
            }
        }
    }
}

/// A consumer that runs a handler at most once per event id (within the
/// engine's TTL) and commits offsets only behind durable marks.
pub struct DedupConsumer {
    consumer: StreamConsumer<SeenContext>,
    dead_letters: Option<(EventProducer, String)>,
    stores: Arc<Stores>,
    config: DedupConsumerConfig,
    stats: Arc<ConsumerStats>,
    partitions: Arc<Partitions>,
    commit_seconds: Histogram,
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
    /// Connect and subscribe, in global scope: every mark in `guard`'s
    /// engine. Fails within `connect_timeout` when the brokers cannot be
    /// reached.
    pub fn new(
        config: DedupConsumerConfig,
        guard: Arc<IdempotencyGuard>,
    ) -> Result<Self, ConsumeError> {
        Self::with_scope(config, Scope::Global(guard))
    }

    /// Connect and subscribe with an explicit [`Scope`].
    pub fn with_scope(mut config: DedupConsumerConfig, scope: Scope) -> Result<Self, ConsumeError> {
        config.max_in_flight = config.max_in_flight.max(1);
        let stores = Stores::new(scope);
        #[cfg(feature = "postgres")]
        let stores = match config.checkpoint.clone() {
            Some(c) => stores.with_checkpoints(c)?,
            None => stores,
        };
        let stores = Arc::new(stores);
        let wants_dlq = config.on_invalid == InvalidMessages::DeadLetter
            || config.after_retries == AfterRetries::DeadLetter;
        let dead_letters = match (&config.dead_letter_topic, wants_dlq) {
            (Some(topic), true) => Some((
                EventProducer::new(&config.brokers, &config.properties)?,
                topic.clone(),
            )),
            (None, true) => return Err(ConsumeError::NoDeadLetterTopic),
            (_, false) => None,
        };
        let stats = Arc::new(ConsumerStats::default());
        let mut client = super::manual_commit_consumer(&config.brokers, &config.group);
        // Lag per partition for the metrics (a small JSON report).
        client.set("statistics.interval.ms", "5000");
        for (k, v) in &config.properties {
            client.set(k, v);
        }
        let partitions = Arc::new(Partitions::default());
        let consumer: StreamConsumer<SeenContext> = client.create_with_context(SeenContext {
            stores: Arc::clone(&stores),
            stats: Arc::clone(&stats),
            partitions: Arc::clone(&partitions),
        })?;
        // A bounded wait for the brokers, instead of a silent retry loop.
        consumer.fetch_metadata(None, config.connect_timeout)?;
        let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        Ok(DedupConsumer {
            consumer,
            dead_letters,
            stores,
            config,
            stats,
            partitions,
            // 100 µs .. ~50 s
            commit_seconds: Histogram::exponential(1e-4, 2.0, 20),
        })
    }

    /// Counts and lag of every partition this consumer has handled.
    pub fn partition_stats(&self) -> Vec<(String, i32, PartitionStats)> {
        self.partitions.snapshot()
    }

    #[cfg(feature = "metrics")]
    pub(crate) fn commit_seconds(&self) -> &Histogram {
        &self.commit_seconds
    }

    /// The consumer's counts.
    pub fn stats(&self) -> &ConsumerStats {
        &self.stats
    }

    /// Consume until `shutdown` completes or something fails. `handler`
    /// gets each new message (shared with its retries); duplicates skip it.
    /// On shutdown the handlers already running finish, messages still
    /// waiting are left for the next run, and the marks are made durable
    /// and the offsets of everything handled committed before returning.
    pub async fn run<H, Fut, E>(
        &self,
        handler: H,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ConsumeError>
    where
        H: Fn(Arc<Received>) -> Fut,
        Fut: Future<Output = Result<(), E>>,
        E: std::fmt::Display,
    {
        tokio::pin!(shutdown);
        // One timer for the commit interval, not one per message: an idle
        // stream still commits what it handled.
        let tick = tokio::time::sleep(self.config.commit_interval);
        tokio::pin!(tick);
        // Something finished since the last commit.
        let mut dirty = false;
        // Partitions run concurrently, each strictly in order: at most one
        // message of a partition is being handled (in `running`); the rest
        // wait in its lane. `in_flight` counts both, and bounds what is
        // fetched.
        let mut lanes = Lanes::default();
        let mut running = FuturesUnordered::new();
        let mut in_flight = 0usize;
        let handler = &handler;
        // A message's run through the handler. All runs are one type, so
        // the box of a run that finished inline takes the next one (one
        // allocation less per message).
        let start = |key, msg: Arc<Received>, generation, claim| async move {
            let offset = msg.offset();
            let result = self.handle(&msg, claim, handler).await;
            Finished {
                key,
                offset,
                generation,
                result,
            }
        };
        let mut spare = None;
        // One stream for the whole run: its waker slot is registered once,
        // not once per message.
        let mut messages = self.consumer.stream();
        // The next message, taken while the current one is handled so the
        // memory its check touches is already on its way (see `peek`).
        let mut lookahead: Option<Step<'_>> = None;
        // Look-ahead steps taken in a row without a `select!`: bounded, so
        // ticks, finished handlers and shutdown get their turn.
        let mut burst = 0u32;
        let result = 'consume: loop {
            let event = match lookahead.take() {
                Some(step) if burst < 64 => {
                    burst += 1;
                    step
                }
                ahead => {
                    burst = 0;
                    lookahead = ahead;
                    let has_ahead = lookahead.is_some();
                    tokio::select! {
                        _ = &mut shutdown => break Ok(()),
                        _ = &mut tick => {
                            tick.as_mut().reset(tokio::time::Instant::now() + self.config.commit_interval);
                            Step::Tick
                        }
                        // Never polled while a message waits in `lookahead`:
                        // messages are taken in order.
                        r = messages.next(), if !has_ahead && in_flight < self.config.max_in_flight => match r {
                            Some(Ok(msg)) => Step::Message(msg, None),
                            Some(Err(e)) => Step::Error(e),
                            // librdkafka's stream does not end while the consumer lives.
                            None => break Ok(()),
                        },
                        _ = std::future::ready(()), if has_ahead => match lookahead.take() {
                            Some(step) => step,
                            None => continue,
                        },
                        Some(f) = running.next(), if !running.is_empty() => Step::Finished(f),
                    }
                }
            };
            // A message whose lane is free to start it.
            let mut next = match event {
                Step::Tick if dirty => match self.commit() {
                    Ok(committed) => {
                        dirty = !committed;
                        None
                    }
                    Err(e) => break Err(e),
                },
                Step::Tick => None,
                Step::Error(e) => {
                    if let Some(fatal) = fatal(&e) {
                        break Err(fatal);
                    }
                    // librdkafka retries broker trouble itself; report and go on.
                    tracing::warn!(error = %e, "seen: kafka consumer error");
                    None
                }
                Step::Message(msg, known) => {
                    self.stats.received.fetch_add(1, Relaxed);
                    let topic = super::received::topic_bytes(&msg);
                    let Some(key) = lanes.key(topic, msg.partition()) else {
                        // A negative partition: no broker sends one.
                        continue;
                    };
                    let lane = lanes.get_or_insert_with(key, |topic| {
                        let partition = self.partitions.get(topic, msg.partition())?;
                        Some(Lane::new(partition, topic))
                    });
                    let Some(lane) = lane else {
                        continue;
                    };
                    let generation = lane.partition.generation();
                    if lookahead.is_none() && in_flight < self.config.max_in_flight {
                        lookahead = self.peek(&mut messages).await;
                        if lane.partition.generation() != generation {
                            // Revoked during the peek: the next owner's now.
                            continue;
                        }
                    }
                    if lane.busy {
                        // Its partition is busy: one copy waits behind it.
                        let copy = Received::copy_of(&msg, Arc::clone(&lane.topic));
                        lane.waiting.push_back((Arc::new(copy), generation));
                        in_flight += 1;
                        None
                    } else {
                        // Decided here if possible: a duplicate is skipped
                        // without copying the message.
                        match self.begin(&msg, &lane.partition, known) {
                            Ok(Begin::Finished(h)) => {
                                dirty |= self.finish(&lane.partition, msg.offset(), generation, h);
                                None
                            }
                            Ok(Begin::Start(claim)) => {
                                // One copy, shared with every attempt of the handler.
                                let owned =
                                    Arc::new(Received::copy_of(&msg, Arc::clone(&lane.topic)));
                                Some((key, owned, generation, claim))
                            }
                            Err(e) => break Err(e),
                        }
                    }
                }
                Step::Finished(f) => {
                    in_flight -= 1;
                    let Some(lane) = lanes.get_mut(f.key) else {
                        continue;
                    };
                    match f.result {
                        Ok(h) => dirty |= self.finish(&lane.partition, f.offset, f.generation, h),
                        Err(e) => break Err(e),
                    }
                    match self.next_waiting(f.key, lane, &mut in_flight, &mut dirty) {
                        Ok(next) => next,
                        Err(e) => break Err(e),
                    }
                }
            };
            // Run the lane's messages, each polled once right away: a
            // handler that does not wait finishes here, without a trip
            // through `running`. The first that waits parks its lane.
            while let Some((key, msg, generation, claim)) = next.take() {
                let Some(lane) = lanes.get_mut(key) else {
                    break;
                };
                let mut work = reuse(&mut spare, start(key, msg, generation, claim));
                match poll_once(&mut work).await {
                    Poll::Pending => {
                        lane.busy = true;
                        in_flight += 1;
                        running.push(work);
                    }
                    Poll::Ready(f) => {
                        spare = Some(work);
                        match f.result {
                            Ok(h) => {
                                dirty |= self.finish(&lane.partition, f.offset, f.generation, h)
                            }
                            Err(e) => break 'consume Err(e),
                        }
                        match self.next_waiting(key, lane, &mut in_flight, &mut dirty) {
                            Ok(n) => next = n,
                            Err(e) => break 'consume Err(e),
                        }
                    }
                }
            }
        };
        drop(messages);
        // Stop: finish the handlers already running (start nothing new),
        // then make what was handled durable and commit it (a commit the
        // group defers here is redelivered to the next owner, whose dedup
        // skips what is marked).
        let mut result = result;
        while let Some(f) = running.next().await {
            match (f.result, lanes.get(f.key)) {
                (Ok(h), Some(lane)) => {
                    dirty |= self.finish(&lane.partition, f.offset, f.generation, h)
                }
                (Ok(_), None) => {}
                (Err(e), _) => {
                    if result.is_ok() {
                        result = Err(e);
                    }
                }
            }
        }
        let committed = if dirty {
            self.final_commit().await
        } else {
            Ok(())
        };
        result.and(committed)
    }

    /// The lane's next waiting message to start, deciding on the way the
    /// ones that need no handler; `None` (and the lane idle) when nothing
    /// waits. Messages received before their partition was revoked are
    /// dropped unhandled: they are the next owner's.
    fn next_waiting(
        &self,
        key: PartitionKey,
        lane: &mut Lane,
        in_flight: &mut usize,
        dirty: &mut bool,
    ) -> Result<Option<Ready>, ConsumeError> {
        while let Some((msg, generation)) = lane.waiting.pop_front() {
            *in_flight -= 1;
            if generation != lane.partition.generation() {
                continue;
            }
            match self.begin(&*msg, &lane.partition, None)? {
                Begin::Finished(h) => {
                    *dirty |= self.finish(&lane.partition, msg.offset(), generation, h);
                }
                Begin::Start(claim) => {
                    lane.busy = true;
                    return Ok(Some((key, msg, generation, claim)));
                }
            }
        }
        lane.busy = false;
        Ok(None)
    }

    /// A message is done: its offset may be committed (unless its
    /// partition was revoked meanwhile). Returns whether an offset moved.
    fn finish(&self, partition: &Partition, offset: i64, generation: u64, h: Handled) -> bool {
        match h {
            Handled::LeftForNextOwner => false,
            Handled::Ran | Handled::Done => {
                if h == Handled::Ran {
                    self.stats.handled.fetch_add(1, Relaxed);
                    partition.count(Event::Handled);
                }
                partition.done(offset, generation);
                self.stats.done.fetch_add(1, Relaxed);
                true
            }
        }
    }

    /// The last commit, retried while the group defers it (a rebalance, a
    /// broker coming back), for up to `connect_timeout`. If it still does
    /// not go through, the marks are durable anyway: the next owner of
    /// those partitions reads the messages again and skips them.
    async fn final_commit(&self) -> Result<(), ConsumeError> {
        let deadline = tokio::time::Instant::now() + self.config.connect_timeout;
        loop {
            if self.commit()? {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    "seen: last offset commit deferred past the deadline; marks are durable"
                );
                return Ok(());
            }
            // Let the client serve the rebalance or reconnection it waits for.
            let _ = tokio::time::timeout(Duration::from_millis(200), self.consumer.recv()).await;
        }
    }

    /// The message after the current one, if librdkafka has it already,
    /// with its id's fingerprint and a prefetch of where the engine will
    /// look it up: that memory load (a cache and TLB miss on a large set)
    /// then overlaps the current message's work instead of stalling the
    /// next one's check.
    async fn peek<'c>(&'c self, messages: &mut MessageStream<'c, SeenContext>) -> Option<Step<'c>> {
        match std::future::poll_fn(|cx| Poll::Ready(messages.poll_next_unpin(cx))).await {
            Poll::Ready(Some(Ok(msg))) => {
                let known = self.locate(&msg);
                Some(Step::Message(msg, known))
            }
            Poll::Ready(Some(Err(e))) => Some(Step::Error(e)),
            Poll::Ready(None) | Poll::Pending => None,
        }
    }

    /// `msg`'s guard and fingerprint, its slot prefetched; `None` when the
    /// id is unreadable (decided again, with the reason, by `begin`).
    fn locate(&self, msg: &BorrowedMessage<'_>) -> Option<Located> {
        let guard = self.stores.guard_of(msg)?;
        let id = self.config.ids.id_of(msg).ok()?;
        let fp = guard.engine().fingerprint(&id).ok()?;
        guard.engine().prefetch(fp);
        Some((guard, fp))
    }

    /// What can be decided about `msg` without waiting: a duplicate (or a
    /// partition gone) is finished here; a new id comes back claimed; an
    /// unreadable id or an id in flight elsewhere takes the full path.
    /// `known` is what `locate` found earlier, used if the partition's
    /// guard is still the same (a fingerprint is keyed per engine).
    fn begin(
        &self,
        msg: &impl IdSource,
        partition: &Partition,
        known: Option<Located>,
    ) -> Result<Begin, ConsumeError> {
        let Some(guard) = self.stores.guard_of(msg) else {
            return match self.stores.failure() {
                Some(why) => Err(ConsumeError::Store(why)),
                // Revoked (partition scope) while this message waited: it
                // is its next owner's now. Leave it unhandled and unstored.
                None => Ok(Begin::Finished(Handled::LeftForNextOwner)),
            };
        };
        let fp = match known {
            Some((g, fp)) if Arc::ptr_eq(&g, &guard) => fp,
            _ => {
                let Ok(id) = self.config.ids.id_of(msg) else {
                    return Ok(Begin::Start(None));
                };
                let Ok(fp) = guard.engine().fingerprint(&id) else {
                    return Ok(Begin::Start(None));
                };
                fp
            }
        };
        Ok(match guard.claim(fp)? {
            Claimed::New(claim) => Begin::Start(Some(claim)),
            Claimed::Processed => {
                self.stats.duplicates.fetch_add(1, Relaxed);
                partition.count(Event::Duplicate);
                Begin::Finished(Handled::Done)
            }
            Claimed::Busy => Begin::Start(None),
        })
    }

    /// Run the handler for `msg`, with retries, per the policies. `claim`
    /// is the id's claim when [`DedupConsumer::begin`] took it; without
    /// one the message goes through the guard (which waits for a claim in
    /// flight elsewhere) and the invalid-id policy.
    async fn handle<H, Fut, E>(
        &self,
        msg: &Arc<Received>,
        claim: Option<ClaimHandle<Arc<IdempotencyGuard>>>,
        handler: &H,
    ) -> Result<Handled, ConsumeError>
    where
        H: Fn(Arc<Received>) -> Fut,
        Fut: Future<Output = Result<(), E>>,
        E: std::fmt::Display,
    {
        let mut next = match claim {
            Some(claim) => Attempt::Claimed(claim),
            None => {
                let Some(guard) = self.stores.guard_of(&**msg) else {
                    return match self.stores.failure() {
                        Some(why) => Err(ConsumeError::Store(why)),
                        None => Ok(Handled::LeftForNextOwner),
                    };
                };
                // An id the engine would refuse (empty, over `max_id_len`)
                // is an invalid message too, decided before any handler runs.
                let fp = match self.config.ids.id_of(&**msg) {
                    Ok(id) => match guard.engine().fingerprint(&id) {
                        Ok(fp) => fp,
                        Err(e) => {
                            let why = InvalidId::Refused(e.to_string());
                            return self.invalid(msg, why).await.map(|()| Handled::Done);
                        }
                    },
                    Err(why) => return self.invalid(msg, why).await.map(|()| Handled::Done),
                };
                Attempt::Unclaimed(guard, fp)
            }
        };
        let mut backoff = self.config.retry_backoff;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let outcome = match next {
                // The first attempt under the claim `begin` took. Counted
                // by `finish`, which holds the partition's state.
                Attempt::Claimed(mut claim) => match handler(Arc::clone(msg)).await {
                    Ok(()) => {
                        claim.commit()?;
                        return Ok(Handled::Ran);
                    }
                    Err(e) => {
                        // Retries go through the guard (the guard is only
                        // cloned here, off the path of a handler that succeeds).
                        next = Attempt::Unclaimed(Arc::clone(claim.guard()), claim.fingerprint());
                        claim.fail();
                        Outcome::Failed(e)
                    }
                },
                Attempt::Unclaimed(ref guard, fp) => {
                    guard
                        .process_fingerprint_if_new(fp, handler(Arc::clone(msg)))
                        .await?
                }
            };
            match outcome {
                // Counted by `finish`, which holds the partition's state.
                Outcome::Success(()) => return Ok(Handled::Ran),
                Outcome::AlreadyProcessed | Outcome::InFlight => {
                    self.stats.duplicates.fetch_add(1, Relaxed);
                    self.count(msg, Event::Duplicate);
                    return Ok(Handled::Done);
                }
                Outcome::Failed(e) => {
                    self.stats.failed.fetch_add(1, Relaxed);
                    self.count(msg, Event::Failed);
                    if attempt > self.config.retries {
                        if self.config.after_retries == AfterRetries::DeadLetter {
                            let why = format!("handler failed {attempt} times: {e}");
                            return self.dead_letter(msg, &why).await.map(|()| Handled::Done);
                        }
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

    /// A message without a usable id, per the configured policy.
    async fn invalid(&self, msg: &Received, why: InvalidId) -> Result<(), ConsumeError> {
        self.stats.invalid.fetch_add(1, Relaxed);
        self.count(msg, Event::Invalid);
        tracing::warn!(
            topic = msg.topic(),
            partition = msg.partition(),
            offset = msg.offset(),
            %why,
            "seen: message without a usable id"
        );
        match self.config.on_invalid {
            InvalidMessages::Skip => Ok(()),
            InvalidMessages::DeadLetter => self.dead_letter(msg, &why.to_string()).await,
            InvalidMessages::Fail => Err(ConsumeError::Invalid {
                topic: msg.topic().to_owned(),
                partition: msg.partition(),
                offset: msg.offset(),
                why,
            }),
        }
    }

    /// Send `msg` (key, payload, headers) to the dead-letter topic with the
    /// reason and its origin in headers, and wait for the broker.
    async fn dead_letter(&self, msg: &Received, why: &str) -> Result<(), ConsumeError> {
        let Some((producer, topic)) = &self.dead_letters else {
            return Err(ConsumeError::NoDeadLetterTopic);
        };
        let headers = dead_letter_headers(msg, why);
        let mut record = FutureRecord::<[u8], [u8]>::to(topic).headers(headers);
        if let Some(p) = msg.payload() {
            record = record.payload(p);
        }
        if let Some(k) = msg.key() {
            record = record.key(k);
        }
        producer
            .inner()
            .send(record, Duration::from_secs(5))
            .await
            .map_err(|(e, _)| ConsumeError::Kafka(e))?;
        self.stats.dead_lettered.fetch_add(1, Relaxed);
        self.count(msg, Event::DeadLettered);
        Ok(())
    }

    /// Count an event off the hot path (failures, invalid ids, dead
    /// letters, duplicates met while waiting).
    fn count(&self, msg: &Received, event: Event) {
        if let Some(p) = self.partitions.get(msg.topic(), msg.partition()) {
            p.count(event);
        }
    }

    /// Marks durable first, then the offsets that they cover.
    /// Returns whether the stored offsets are now committed: a commit the
    /// group refuses for the moment (a rebalance in progress, a coordinator
    /// moving, brokers down or unreachable) is retried at the next
    /// interval; the offsets stay stored, and the marks are durable either
    /// way.
    fn commit(&self) -> Result<bool, ConsumeError> {
        use rdkafka::types::RDKafkaErrorCode as Code;
        let started = std::time::Instant::now();
        self.stores.sync()?;
        store_ready(&self.consumer, &self.partitions);
        match self.consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) => {}
            // Nothing stored since the last commit (e.g. after a revoke).
            Err(KafkaError::ConsumerCommit(Code::NoOffset)) => {}
            // Not allowed to commit at all: no retry mends that.
            Err(KafkaError::ConsumerCommit(
                code @ (Code::GroupAuthorizationFailed | Code::TopicAuthorizationFailed),
            )) => return Err(KafkaError::ConsumerCommit(code).into()),
            // Everything else (a rebalance in progress, a coordinator
            // moving, brokers down, an assignment lost to a session
            // timeout) only delays the commit: retry at the next interval.
            // Correctness does not depend on it: what is not committed is
            // redelivered, and the marks make the redelivery a duplicate.
            Err(KafkaError::ConsumerCommit(code)) => {
                self.stats.commit_retries.fetch_add(1, Relaxed);
                tracing::warn!(?code, "seen: offset commit deferred; retrying");
                return Ok(false);
            }
            Err(e) => return Err(e.into()),
        }
        self.stats.commits.fetch_add(1, Relaxed);
        self.commit_seconds.observe(started.elapsed());
        Ok(true)
    }
}

/// What became of one message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Handled {
    /// The handler ran and succeeded; the id is marked.
    Ran,
    /// Skipped as a duplicate or as invalid, or dead-lettered (counted
    /// where that was decided): its offset may move on.
    Done,
    /// Its partition was revoked (partition scope) while it waited: it is
    /// the next owner's now; neither handled nor stored.
    LeftForNextOwner,
}

/// What [`DedupConsumer::begin`] decided.
enum Begin {
    /// Nothing to run.
    Finished(Handled),
    /// Run the handler: under the id's claim when `begin` took it (a new
    /// id), else through the full path (an unreadable id, or one in flight
    /// elsewhere).
    Start(Option<ClaimHandle<Arc<IdempotencyGuard>>>),
}

/// A message ready to start on its idle lane, with its partition's
/// generation at receipt and its claim if taken.
type Ready = (
    PartitionKey,
    Arc<Received>,
    u64,
    Option<ClaimHandle<Arc<IdempotencyGuard>>>,
);

/// One partition's place in the loop.
struct Lane {
    partition: Arc<Partition>,
    /// Its topic's name, shared by the copies made for the handler.
    topic: Arc<str>,
    /// Received while a message of the partition was being handled, with
    /// the partition's generation then.
    waiting: VecDeque<(Arc<Received>, u64)>,
    /// A message of the partition is in `running`.
    busy: bool,
}

impl Lane {
    fn new(partition: Arc<Partition>, topic: &Arc<str>) -> Self {
        Lane {
            partition,
            topic: Arc::clone(topic),
            waiting: VecDeque::new(),
            busy: false,
        }
    }
}

/// How the next attempt of a handler runs.
enum Attempt {
    /// Under the claim `begin` took (the first attempt of a new id).
    Claimed(ClaimHandle<Arc<IdempotencyGuard>>),
    /// Through the guard, which claims (or waits for a claim in flight).
    Unclaimed(Arc<IdempotencyGuard>, crate::Fingerprint),
}

/// A handler's run, finished.
struct Finished {
    key: PartitionKey,
    offset: i64,
    generation: u64,
    result: Result<Handled, ConsumeError>,
}

/// `run` in the `spare` box if there is one, else in a new box.
fn reuse<F>(spare: &mut Option<Pin<Box<F>>>, run: F) -> Pin<Box<F>> {
    match spare.take() {
        Some(mut work) => {
            work.as_mut().set(run);
            work
        }
        None => Box::pin(run),
    }
}

/// Poll `work` once in the caller's task: a future that is ready at once
/// never needs a place in the `FuturesUnordered`.
async fn poll_once<F: Future + ?Sized>(work: &mut Pin<Box<F>>) -> Poll<F::Output> {
    std::future::poll_fn(|cx| Poll::Ready(work.as_mut().poll(cx))).await
}

/// A partition the loop has received from: (its topic's place in
/// [`Lanes`], partition).
type PartitionKey = (usize, usize);

/// The loop's lanes, found by index: a message's lane is looked up when it
/// arrives and again when its handler finishes (hashing the key each time
/// was 4 % of the loop's instructions).
#[derive(Default)]
struct Lanes {
    /// The topics received from, in the order first seen: a pattern
    /// subscription may bring any number, each told apart.
    topics: Vec<Arc<str>>,
    /// Each topic's place in `topics`.
    places: HashMap<Arc<str>, usize>,
    /// The place of the topic of the last message: messages come in runs
    /// of one topic, and a comparison is cheaper than hashing the name.
    last: usize,
    /// `rows[topic][partition]`.
    rows: Vec<Vec<Option<Lane>>>,
}

impl Lanes {
    /// The key of `topic`/`partition` (`None` for a negative partition).
    /// The topic comes as bytes: comparing them with the last message's
    /// topic skips the UTF-8 check a `&str` from rdkafka costs each time.
    fn key(&mut self, topic: &[u8], partition: i32) -> Option<PartitionKey> {
        let partition = usize::try_from(partition).ok()?;
        if self
            .topics
            .get(self.last)
            .is_some_and(|t| t.as_bytes() == topic)
        {
            return Some((self.last, partition));
        }
        // Kafka topic names are ASCII; anything else is kept, repaired.
        let topic = String::from_utf8_lossy(topic);
        let place = match self.places.get(&*topic) {
            Some(&place) => place,
            None => {
                let name: Arc<str> = (*topic).into();
                self.topics.push(Arc::clone(&name));
                self.places.insert(name, self.topics.len() - 1);
                self.rows.push(Vec::new());
                self.topics.len() - 1
            }
        };
        self.last = place;
        Some((place, partition))
    }

    fn get(&self, (topic, partition): PartitionKey) -> Option<&Lane> {
        self.rows.get(topic)?.get(partition)?.as_ref()
    }

    fn get_mut(&mut self, (topic, partition): PartitionKey) -> Option<&mut Lane> {
        self.rows.get_mut(topic)?.get_mut(partition)?.as_mut()
    }

    /// The lane of `key` (from [`Lanes::key`]), made by `make` from the
    /// topic's name if it has none yet.
    fn get_or_insert_with(
        &mut self,
        (topic, partition): PartitionKey,
        make: impl FnOnce(&Arc<str>) -> Option<Lane>,
    ) -> Option<&mut Lane> {
        let row = self.rows.get_mut(topic)?;
        if row.len() <= partition {
            row.resize_with(partition + 1, || None);
        }
        let lane = &mut row[partition];
        if lane.is_none() {
            *lane = Some(make(&self.topics[topic])?);
        }
        lane.as_mut()
    }
}

/// What woke the loop.
enum Step<'a> {
    Tick,
    /// A message, with what `locate` found if it was peeked at.
    Message(BorrowedMessage<'a>, Option<Located>),
    Error(KafkaError),
    Finished(Finished),
}

/// A message's guard and its id's fingerprint under that guard's engine.
type Located = (Arc<IdempotencyGuard>, crate::Fingerprint);

/// Hand librdkafka the offsets finished since the last commit, one call
/// per partition (per commit, not per message). A partition revoked
/// meanwhile refuses its offset: its next owner reads those messages again
/// (and skips them where the marks are shared or already durable).
fn store_ready<C: Consumer<X>, X: ConsumerContext>(consumer: &C, partitions: &Partitions) {
    for p in partitions.all() {
        let Some(next) = p.take_ready() else {
            continue;
        };
        // `store_offset` stores its argument + 1: the next offset to read.
        if let Err(e) = consumer.store_offset(&p.topic, p.partition, next - 1) {
            tracing::debug!(topic = %p.topic, partition = p.partition, error = %e,
                "seen: offset not stored (partition revoked?)");
        }
    }
}

/// Errors from `recv` that no retry will mend: the loop stops with them
/// instead of logging them forever.
fn fatal(e: &KafkaError) -> Option<ConsumeError> {
    match e {
        KafkaError::MessageConsumption(code) if fatal_to_consumers(e) => {
            Some(ConsumeError::Kafka(KafkaError::MessageConsumption(*code)))
        }
        _ => None,
    }
}

/// A consumer error that waiting will not mend (a missing topic, no
/// authorization); anything else (brokers down, timeouts, a rebalance)
/// librdkafka recovers from by itself.
pub(crate) fn fatal_to_consumers(e: &KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as Code;
    matches!(
        e,
        KafkaError::MessageConsumption(
            Code::UnknownTopicOrPartition
                | Code::UnknownTopic
                | Code::TopicAuthorizationFailed
                | Code::GroupAuthorizationFailed
        )
    )
}

/// `d` scaled by a factor in 0.5..1.5, so retries of many consumers spread.
fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    d.mul_f64(0.5 + (nanos % 1000) as f64 / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_tell_topics_and_partitions_apart() {
        let mut lanes = Lanes::default();
        let a0 = lanes.key(b"orders-eu", 0).unwrap();
        let b0 = lanes.key(b"orders-us", 0).unwrap();
        let a3 = lanes.key(b"orders-eu", 3).unwrap();
        assert_ne!(a0, b0, "same partition, different topics");
        assert_eq!(a3, (a0.0, 3));
        // Found again, whether or not it was the last topic seen.
        assert_eq!(lanes.key(b"orders-eu", 0), Some(a0));
        assert_eq!(lanes.key(b"orders-eu", 0), Some(a0));
        assert_eq!(lanes.key(b"orders-us", 0), Some(b0));
        assert_eq!(lanes.key(b"orders-eu", -1), None, "no negative partitions");
        assert_eq!(lanes.topics.len(), 2);

        let partitions = Partitions::default();
        let made = |topic: &Arc<str>, p: i32| Some(Lane::new(partitions.get(topic, p)?, topic));
        assert!(lanes.get(a3).is_none());
        let lane = lanes.get_or_insert_with(a3, |t| made(t, 3)).unwrap();
        assert_eq!(&*lane.topic, "orders-eu");
        lane.busy = true;
        // Made once: the second call finds the first lane.
        let again = lanes
            .get_or_insert_with(a3, |_| panic!("made twice"))
            .unwrap();
        assert!(again.busy);
        assert!(lanes.get(a0).is_none(), "partition 0 has no lane yet");
        assert!(lanes.get_or_insert_with(b0, |_| None).is_none());
        assert!(lanes.get(b0).is_none());
        assert!(lanes.get_mut((7, 0)).is_none(), "unknown topic place");
    }
}
