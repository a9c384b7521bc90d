//! The producer side of a Kafka stage, also usable on its own: an
//! idempotent producer that confirms every delivery before it says a batch
//! is out, retries what the brokers failed with exponential backoff and
//! jitter, and stops hammering brokers that keep failing (a circuit
//! breaker).
//!
//! ```text
//! send ─► (breaker open? fail fast) ─► librdkafka queue ─► delivery report
//! flush: wait for every report ─► failed and retriable? back off, resend
//!        ─► all delivered: the positions they reached, per partition
//! ```
//!
//! librdkafka already retries inside `message.timeout.ms`; what this adds
//! is the layer above it: a message librdkafka gave up on (a broker down
//! longer than that) is sent again instead of failing the batch, up to
//! [`Retry::give_up_after`].

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;

use super::producer::{SerializeError, Serializer};
use crate::stats::Histogram;

/// Payload compression (`compression.type`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Compression {
    /// None (the default: the stage is usually on a fast local network).
    #[default]
    None,
    /// gzip.
    Gzip,
    /// Snappy.
    Snappy,
    /// LZ4.
    Lz4,
    /// Zstandard.
    Zstd,
}

impl Compression {
    fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Snappy => "snappy",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }
}

impl FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s.trim() {
            "none" => Compression::None,
            "gzip" => Compression::Gzip,
            "snappy" => Compression::Snappy,
            "lz4" => Compression::Lz4,
            "zstd" => Compression::Zstd,
            other => {
                return Err(format!(
                    "{other:?}: expected none, gzip, snappy, lz4 or zstd"
                ))
            }
        })
    }
}

/// A user's partitioner: (key, the input message's partition, the output
/// topic's partition count) → partition.
pub type PartitionFn = Arc<dyn Fn(Option<&[u8]>, Option<i32>, i32) -> i32 + Send + Sync>;

/// Which output partition a message goes to.
#[derive(Clone, Default)]
pub enum Partitioning {
    /// The partition it was read from (the default: per-key order and
    /// co-partitioning carry over). The output needs at least as many
    /// partitions as the input.
    #[default]
    Input,
    /// A murmur2 hash of the key, as the Java client does (no key: random).
    KeyHash,
    /// One partition after another.
    RoundRobin,
    /// Always this partition.
    Fixed(i32),
    /// The user's function.
    Custom(PartitionFn),
}

impl std::fmt::Debug for Partitioning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Partitioning::Input => f.write_str("Input"),
            Partitioning::KeyHash => f.write_str("KeyHash"),
            Partitioning::RoundRobin => f.write_str("RoundRobin"),
            Partitioning::Fixed(p) => write!(f, "Fixed({p})"),
            Partitioning::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

impl FromStr for Partitioning {
    type Err = String;
    /// `input`, `key`, `round-robin` or `fixed:N`.
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s.trim() {
            "input" => Partitioning::Input,
            "key" => Partitioning::KeyHash,
            "round-robin" => Partitioning::RoundRobin,
            other => match other.strip_prefix("fixed:").map(str::parse::<i32>) {
                Some(Ok(p)) if p >= 0 => Partitioning::Fixed(p),
                _ => {
                    return Err(format!(
                        "{other:?}: expected input, key, round-robin or fixed:N"
                    ))
                }
            },
        })
    }
}

/// Resending what the brokers failed.
#[derive(Clone, Copy, Debug)]
pub struct Retry {
    /// The first wait before a resend; doubled per attempt, with jitter.
    pub first: Duration,
    /// The longest wait between attempts.
    pub max: Duration,
    /// Stop retrying (and fail the flush) this long after the first
    /// failure of a batch: a bounded wait, never a hang.
    pub give_up_after: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            first: Duration::from_millis(100),
            max: Duration::from_secs(5),
            give_up_after: Duration::from_secs(300),
        }
    }
}

/// The circuit breaker's settings.
#[derive(Clone, Copy, Debug)]
pub struct BreakerConfig {
    /// Consecutive failed deliveries that open it.
    pub failures: u32,
    /// How long it stays open (sends fail fast) before one probe batch is
    /// let through (half-open).
    pub open_for: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failures: 5,
            open_for: Duration::from_secs(5),
        }
    }
}

/// The circuit breaker's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    /// Sending normally.
    Closed,
    /// Failing fast until the instant given.
    Open(Instant),
    /// Letting a probe through; its outcome closes or reopens it.
    HalfOpen,
}

/// Settings of a [`KafkaSink`].
#[derive(Clone, Debug)]
pub struct SinkConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// The topic messages go to (dead letters name their own).
    pub topic: String,
    /// `compression.type`.
    pub compression: Compression,
    /// `linger.ms`: how long librdkafka waits to fill a batch.
    pub linger: Duration,
    /// `batch.size`: the largest produce batch, in bytes.
    pub batch_bytes: usize,
    /// `batch.num.messages`: the largest produce batch, in messages.
    pub batch_messages: usize,
    /// Which partition each message goes to.
    pub partitioning: Partitioning,
    /// Resending failed deliveries.
    pub retry: Retry,
    /// The circuit breaker.
    pub breaker: BreakerConfig,
    /// `message.timeout.ms`: how long librdkafka itself keeps trying one
    /// message before reporting it failed (then [`Retry`] takes over).
    pub message_timeout: Duration,
    /// Produce inside Kafka transactions with this `transactional.id`
    /// (see [`KafkaSink::commit_transaction`]); `None`: idempotent only.
    pub transactional_id: Option<String>,
    /// Any other librdkafka producer property, applied last.
    pub properties: Vec<(String, String)>,
}

impl SinkConfig {
    /// Defaults: idempotent, `acks=all`, 5 ms linger, no compression,
    /// partitions kept from the input.
    pub fn new(brokers: &str, topic: &str) -> Self {
        SinkConfig {
            brokers: brokers.into(),
            topic: topic.into(),
            compression: Compression::None,
            linger: Duration::from_millis(5),
            batch_bytes: 1_000_000,
            batch_messages: 10_000,
            partitioning: Partitioning::Input,
            retry: Retry::default(),
            breaker: BreakerConfig::default(),
            message_timeout: Duration::from_secs(30),
            transactional_id: None,
            properties: Vec::new(),
        }
    }

    /// The librdkafka configuration these settings make.
    pub fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("compression.type", self.compression.name())
            .set("linger.ms", self.linger.as_millis().to_string())
            .set("batch.size", self.batch_bytes.to_string())
            .set("batch.num.messages", self.batch_messages.to_string())
            .set(
                "message.timeout.ms",
                self.message_timeout.as_millis().max(1).to_string(),
            )
            // The Java client's key hash, so keyed output lines up with
            // other producers of the same topic.
            .set("partitioner", "murmur2_random")
            // A missing topic is an error to report, not one to create
            // with the broker's default partition count.
            .set("allow.auto.create.topics", "false");
        if let Some(id) = &self.transactional_id {
            c.set("transactional.id", id);
        }
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        c
    }
}

/// One message to send.
#[derive(Debug, Default)]
pub struct Record<'a> {
    /// The topic, if not the sink's (dead letters).
    pub topic: Option<&'a str>,
    /// Message key.
    pub key: Option<&'a [u8]>,
    /// Message value.
    pub payload: Option<&'a [u8]>,
    /// Headers.
    pub headers: Option<OwnedHeaders>,
    /// Timestamp, milliseconds since the epoch (default: now).
    pub timestamp: Option<i64>,
    /// The partition it was read from ([`Partitioning::Input`]).
    pub source_partition: Option<i32>,
}

/// Why the sink could not deliver.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SinkError {
    /// The breaker is open: the brokers kept failing; retry after `until`.
    #[error("kafka sink: circuit breaker open after repeated broker failures (retry in {:?})", .until.saturating_duration_since(Instant::now()))]
    BreakerOpen {
        /// When it half-opens.
        until: Instant,
    },
    /// Deliveries still failed after retrying for [`Retry::give_up_after`].
    #[error("kafka sink: {failed} messages undelivered after retrying for {waited:?}; last error: {last}")]
    GaveUp {
        /// Messages not delivered.
        failed: usize,
        /// How long it retried.
        waited: Duration,
        /// The last broker error.
        last: String,
    },
    /// Deliveries failed after their requests may have reached a broker:
    /// resending could write them twice, so the sink does not. A Kafka
    /// stage answers this by reading the output back (as after a crash)
    /// before it goes on.
    #[error("kafka sink: {0} deliveries failed after they may have been written")]
    Uncertain(u64),
    /// A failure that retrying cannot fix (a message too large, no
    /// authorization, an unknown topic or partition).
    #[error("kafka sink: {0}")]
    Fatal(String),
    /// The output topic does not exist, or is too small for the
    /// partitioning.
    #[error("kafka sink: {0}")]
    Topic(String),
    /// A transaction did not commit; it was aborted (or the producer was
    /// fenced): none of its messages or offsets count.
    #[error("kafka sink: transaction aborted: {0}")]
    Aborted(String),
    /// A librdkafka call failed.
    #[error("kafka sink: {0}")]
    Kafka(#[from] KafkaError),
    /// The payload could not be encoded.
    #[error(transparent)]
    Serialize(#[from] SerializeError),
}

/// What a flush delivered.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Flushed {
    /// Messages delivered since the last flush (dead letters included).
    pub delivered: u64,
    /// Per partition of the sink's topic: the highest delivered offset + 1.
    pub positions: HashMap<i32, i64>,
}

/// Counters of a sink, read at scrape time (`seen::metrics::register_sink`).
#[derive(Debug)]
pub struct SinkStats {
    /// Messages the brokers confirmed.
    pub sent: AtomicU64,
    /// Delivery failures reported (each resend that fails counts again).
    pub failed: AtomicU64,
    /// Messages sent again after a failure.
    pub retried: AtomicU64,
    /// Times the breaker opened.
    pub breaker_trips: AtomicU64,
    /// The breaker now: 0 closed, 1 open, 2 half-open.
    pub breaker_state: AtomicU64,
    /// Messages per flushed batch.
    pub(crate) batch_messages: Histogram,
    /// From a batch's first send to its last confirmation.
    pub(crate) produce_seconds: Histogram,
}

impl Default for SinkStats {
    fn default() -> Self {
        SinkStats {
            sent: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            breaker_trips: AtomicU64::new(0),
            breaker_state: AtomicU64::new(0),
            batch_messages: Histogram::exponential(1.0, 4.0, 9),
            produce_seconds: Histogram::exponential(0.000_25, 2.0, 16),
        }
    }
}

/// State the delivery-report thread and the sender share.
#[derive(Debug)]
struct Shared {
    topic: String,
    breaker: BreakerConfig,
    stats: Arc<SinkStats>,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    breaker: BreakerState,
    consecutive_failures: u32,
    delivered: u64,
    positions: HashMap<i32, i64>,
    /// Failed, retriable, and never written: sent again by the next flush
    /// round, in order.
    retry: Vec<OwnedMessage>,
    /// Failed after they may have been written (the connection dropped
    /// with the request in flight): sending them again could write them
    /// twice, so the flush reports them instead.
    uncertain: u64,
    last_error: Option<String>,
    fatal: Option<String>,
}

impl Shared {
    fn on_delivery(&self, result: &DeliveryResult<'_>) {
        let mut s = self.state.lock();
        match result {
            Ok(m) => {
                self.stats.sent.fetch_add(1, Relaxed);
                s.delivered += 1;
                s.consecutive_failures = 0;
                if s.breaker == BreakerState::HalfOpen {
                    set_breaker(&self.stats, &mut s, BreakerState::Closed);
                }
                if m.topic() == self.topic {
                    let e = s.positions.entry(m.partition()).or_insert(0);
                    *e = (*e).max(m.offset() + 1);
                }
            }
            Err((e, m)) => {
                self.stats.failed.fetch_add(1, Relaxed);
                s.last_error = Some(e.to_string());
                if !retriable(e) {
                    s.fatal.get_or_insert_with(|| e.to_string());
                    return;
                }
                if possibly_written(m) {
                    s.uncertain += 1;
                } else {
                    s.retry.push(m.detach());
                }
                s.consecutive_failures += 1;
                let trip = match s.breaker {
                    BreakerState::HalfOpen => true,
                    BreakerState::Closed => s.consecutive_failures >= self.breaker.failures,
                    BreakerState::Open(_) => false,
                };
                if trip {
                    let until = Instant::now() + self.breaker.open_for;
                    set_breaker(&self.stats, &mut s, BreakerState::Open(until));
                    self.stats.breaker_trips.fetch_add(1, Relaxed);
                    tracing::warn!(error = %e, "kafka sink: circuit breaker open");
                }
            }
        }
    }
}

fn set_breaker(stats: &SinkStats, s: &mut State, to: BreakerState) {
    s.breaker = to;
    let code = match to {
        BreakerState::Closed => 0,
        BreakerState::Open(_) => 1,
        BreakerState::HalfOpen => 2,
    };
    stats.breaker_state.store(code, Relaxed);
}

/// Whether a failed message may nevertheless be in the log: librdkafka
/// knows whether the request left before the failure.
fn possibly_written(m: &rdkafka::message::BorrowedMessage<'_>) -> bool {
    use rdkafka::bindings::rd_kafka_msg_status_t as Status;
    #[allow(unsafe_code)]
    // SAFETY: `m` is a live delivery-report message; librdkafka's status
    // accessor only reads it.
    let status = unsafe { rdkafka::bindings::rd_kafka_message_status(m.ptr()) };
    status != Status::RD_KAFKA_MSG_STATUS_NOT_PERSISTED
}

/// Failures another attempt can fix: brokers down, slow or moving
/// leadership. Everything else (too large, not authorized, corrupt) fails
/// the flush at once.
fn retriable(e: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    match e.rdkafka_error_code() {
        Some(code) => matches!(
            code,
            C::MessageTimedOut
                | C::AllBrokersDown
                | C::BrokerTransportFailure
                | C::OperationTimedOut
                | C::TimedOutQueue
                | C::RequestTimedOut
                | C::NetworkException
                | C::BrokerNotAvailable
                | C::LeaderNotAvailable
                | C::NotLeaderForPartition
                | C::NotEnoughReplicas
                | C::NotEnoughReplicasAfterAppend
                | C::PurgeQueue
                | C::PurgeInflight
                | C::Retry
                | C::NotCoordinator
                | C::CoordinatorNotAvailable
                | C::KafkaStorageError
                | C::OutOfOrderSequenceNumber
                | C::UnknownProducerId
                | C::InvalidProducerEpoch
        ),
        None => false,
    }
}

/// Hands delivery reports to [`Shared`].
struct SinkContext(Arc<Shared>);

impl ClientContext for SinkContext {}

impl ProducerContext for SinkContext {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        self.0.on_delivery(result);
    }
}

/// An idempotent producer that confirms, retries and breaks the circuit.
pub struct KafkaSink {
    producer: ThreadedProducer<SinkContext>,
    shared: Arc<Shared>,
    partitioning: Partitioning,
    partitions: i32,
    retry: Retry,
    next_round_robin: i32,
    /// Messages sent since the last flush, and when the first went out.
    batch: (u64, Option<Instant>),
    /// The longest a flush waits for librdkafka to report (its own
    /// message timeout plus the retry budget).
    report_within: Duration,
    /// Bound of one transactional call (send offsets, commit, abort).
    call_within: Duration,
    /// Transactional: a transaction is open.
    transactional: bool,
    in_transaction: bool,
}

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink")
            .field("topic", &self.shared.topic)
            .field("partitions", &self.partitions)
            .finish_non_exhaustive()
    }
}

impl KafkaSink {
    /// Connect and look the topic up (within `message_timeout`): a topic
    /// that does not exist is a clear error here, not at the first send.
    pub fn new(config: &SinkConfig) -> Result<Self, SinkError> {
        Self::with_stats(config, Arc::default())
    }

    /// [`KafkaSink::new`], counting into `stats` (registered for metrics
    /// before the sink exists).
    pub fn with_stats(config: &SinkConfig, stats: Arc<SinkStats>) -> Result<Self, SinkError> {
        let shared = Arc::new(Shared {
            topic: config.topic.clone(),
            breaker: config.breaker,
            stats,
            state: Mutex::new(State {
                breaker: BreakerState::Closed,
                consecutive_failures: 0,
                delivered: 0,
                positions: HashMap::new(),
                retry: Vec::new(),
                uncertain: 0,
                last_error: None,
                fatal: None,
            }),
        });
        let producer: ThreadedProducer<SinkContext> = config
            .client_config()
            .create_with_context(SinkContext(Arc::clone(&shared)))?;
        let partitions = {
            let meta = producer
                .client()
                .fetch_metadata(Some(&config.topic), config.message_timeout)?;
            let topic = meta.topics().first();
            match topic {
                Some(t) if t.error().is_none() && !t.partitions().is_empty() => {
                    t.partitions().len() as i32
                }
                _ => {
                    return Err(SinkError::Topic(format!(
                        "topic {:?} does not exist",
                        config.topic
                    )))
                }
            }
        };
        if let Partitioning::Fixed(p) = config.partitioning {
            if p >= partitions {
                return Err(SinkError::Topic(format!(
                    "partition {p} does not exist: {:?} has {partitions}",
                    config.topic
                )));
            }
        }
        KafkaSink {
            producer,
            shared,
            partitioning: config.partitioning.clone(),
            partitions,
            retry: config.retry,
            next_round_robin: 0,
            batch: (0, None),
            // librdkafka reports every message eventually: a queued one
            // within `message.timeout.ms`, one in a request on a dead
            // connection only when that request times out. Wait for that
            // as long as the retry budget, still a bounded wait.
            report_within: config.message_timeout + config.retry.give_up_after,
            call_within: config.message_timeout + Duration::from_secs(5),
            transactional: false,
            in_transaction: false,
        }
        .transactions(config)
    }

    /// With a `transactional_id`: register it with the coordinator (which
    /// fences an older producer of the same id and aborts what it left
    /// open), within `message_timeout`.
    fn transactions(mut self, config: &SinkConfig) -> Result<Self, SinkError> {
        if config.transactional_id.is_some() {
            self.producer.init_transactions(config.message_timeout)?;
            self.transactional = true;
        }
        Ok(self)
    }

    /// Whether this sink produces inside transactions.
    pub fn is_transactional(&self) -> bool {
        self.transactional
    }

    fn begin_if_needed(&mut self) -> Result<(), SinkError> {
        if self.transactional && !self.in_transaction {
            self.producer.begin_transaction()?;
            self.in_transaction = true;
        }
        Ok(())
    }

    /// Transactional mode: wait for every delivery of the open transaction,
    /// add the consumer's `offsets` to it, and commit it, so the output and
    /// the input offsets count together or not at all. Any failure aborts
    /// the transaction and is returned ([`SinkError::Aborted`]): nothing of
    /// it is visible to `read_committed` readers, and the caller must not
    /// mark its ids.
    pub fn commit_transaction(
        &mut self,
        offsets: &rdkafka::TopicPartitionList,
        group: &rdkafka::consumer::ConsumerGroupMetadata,
    ) -> Result<Flushed, SinkError> {
        if !self.transactional {
            return Err(SinkError::Fatal(
                "commit_transaction on a sink without a transactional id".into(),
            ));
        }
        let outcome = self.flush().and_then(|flushed| {
            self.begin_if_needed()?;
            self.producer
                .send_offsets_to_transaction(offsets, group, self.call_within)?;
            self.producer.commit_transaction(self.call_within)?;
            Ok(flushed)
        });
        self.in_transaction = false;
        outcome.map_err(|e| {
            let why = e.to_string();
            if let Err(a) = self.producer.abort_transaction(self.call_within) {
                tracing::warn!(error = %a, "kafka sink: aborting the transaction failed");
            }
            self.shared.state.lock().positions.clear();
            SinkError::Aborted(why)
        })
    }

    /// Partitions of the sink's topic.
    pub fn partitions(&self) -> i32 {
        self.partitions
    }

    /// Counters for metrics.
    pub fn stats(&self) -> &Arc<SinkStats> {
        &self.shared.stats
    }

    /// The breaker's state now.
    pub fn breaker(&self) -> BreakerState {
        self.shared.state.lock().breaker
    }

    /// Queue one message. Fails fast while the breaker is open; waits (the
    /// producer's queue is full) rather than buffering without bound.
    pub fn send(&mut self, record: Record<'_>) -> Result<(), SinkError> {
        self.check_breaker()?;
        self.begin_if_needed()?;
        let partition = match record.topic {
            Some(_) => None,
            None => self.partition_for(&record)?,
        };
        let topic = record.topic.unwrap_or(&self.shared.topic);
        let mut r = BaseRecord::<[u8], [u8]>::to(topic);
        if let Some(k) = record.key {
            r = r.key(k);
        }
        if let Some(p) = record.payload {
            r = r.payload(p);
        }
        if let Some(h) = record.headers {
            r = r.headers(h);
        }
        if let Some(ts) = record.timestamp {
            r = r.timestamp(ts);
        }
        if let Some(p) = partition {
            r = r.partition(p);
        }
        Self::enqueue(&self.producer, &mut self.batch, r)
    }

    /// Serialize `value` and send it with `key` to the sink's topic.
    pub fn send_value<T: ?Sized, S: Serializer<T>>(
        &mut self,
        key: Option<&[u8]>,
        value: &T,
        serializer: &S,
        headers: Option<OwnedHeaders>,
    ) -> Result<(), SinkError> {
        let mut payload = Vec::with_capacity(256);
        serializer.serialize(value, &mut payload)?;
        self.send(Record {
            key,
            payload: Some(&payload),
            headers,
            ..Record::default()
        })
    }

    fn check_breaker(&self) -> Result<(), SinkError> {
        let mut s = self.shared.state.lock();
        if let BreakerState::Open(until) = s.breaker {
            if Instant::now() < until {
                return Err(SinkError::BreakerOpen { until });
            }
            set_breaker(&self.shared.stats, &mut s, BreakerState::HalfOpen);
        }
        Ok(())
    }

    fn partition_for(&mut self, record: &Record<'_>) -> Result<Option<i32>, SinkError> {
        let n = self.partitions;
        Ok(match &self.partitioning {
            Partitioning::KeyHash => None,
            Partitioning::Fixed(p) => Some(*p),
            Partitioning::RoundRobin => {
                self.next_round_robin = (self.next_round_robin + 1) % n;
                Some(self.next_round_robin)
            }
            Partitioning::Input => match record.source_partition {
                Some(p) if p < n => Some(p),
                Some(p) => {
                    return Err(SinkError::Topic(format!(
                        "input partition {p} has no counterpart: {:?} has {n} partitions (choose another partitioning)",
                        self.shared.topic
                    )))
                }
                None => None,
            },
            Partitioning::Custom(f) => {
                let p = f(record.key, record.source_partition, n);
                if !(0..n).contains(&p) {
                    return Err(SinkError::Topic(format!(
                        "the partitioner chose {p}; {:?} has {n} partitions",
                        self.shared.topic
                    )));
                }
                Some(p)
            }
        })
    }

    fn enqueue(
        producer: &ThreadedProducer<SinkContext>,
        batch: &mut (u64, Option<Instant>),
        mut r: BaseRecord<'_, [u8], [u8]>,
    ) -> Result<(), SinkError> {
        loop {
            match producer.send(r) {
                Ok(()) => {
                    batch.0 += 1;
                    batch.1.get_or_insert_with(Instant::now);
                    return Ok(());
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    // Backpressure: the producer's thread drains the queue.
                    std::thread::sleep(Duration::from_millis(1));
                    r = back;
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
    }

    /// Wait until every message sent so far is delivered, resending what
    /// failed (backoff with jitter, the breaker respected) for up to
    /// [`Retry::give_up_after`]. Returns what was delivered and the output
    /// positions reached.
    pub fn flush(&mut self) -> Result<Flushed, SinkError> {
        let mut first_failure: Option<Instant> = None;
        let mut attempt = 0u32;
        loop {
            self.wait_for_reports()?;
            let (retry, fatal, uncertain, last) = {
                let mut s = self.shared.state.lock();
                (
                    std::mem::take(&mut s.retry),
                    s.fatal.take(),
                    std::mem::take(&mut s.uncertain),
                    s.last_error.clone(),
                )
            };
            if let Some(e) = fatal {
                return Err(SinkError::Fatal(e));
            }
            if uncertain > 0 {
                // Never-written failures of this round are dropped with the
                // batch: the caller redoes it.
                return Err(SinkError::Uncertain(uncertain));
            }
            if retry.is_empty() {
                break;
            }
            if self.transactional {
                // A transaction with a failed message cannot commit.
                self.shared.state.lock().retry.clear();
                return Err(SinkError::Fatal(format!(
                    "{} deliveries failed inside a transaction: {}",
                    retry.len(),
                    last.unwrap_or_default()
                )));
            }
            let since = *first_failure.get_or_insert_with(Instant::now);
            if since.elapsed() >= self.retry.give_up_after {
                return Err(SinkError::GaveUp {
                    failed: retry.len(),
                    waited: since.elapsed(),
                    last: last.unwrap_or_default(),
                });
            }
            attempt += 1;
            let mut wait = backoff(&self.retry, attempt);
            if let BreakerState::Open(until) = self.breaker() {
                wait = wait.max(until.saturating_duration_since(Instant::now()));
            }
            let left = self.retry.give_up_after.saturating_sub(since.elapsed());
            tracing::warn!(
                messages = retry.len(),
                attempt,
                error = last.as_deref().unwrap_or(""),
                "kafka sink: deliveries failed; resending"
            );
            std::thread::sleep(wait.min(left));
            self.shared
                .stats
                .retried
                .fetch_add(retry.len() as u64, Relaxed);
            {
                let mut s = self.shared.state.lock();
                if let BreakerState::Open(until) = s.breaker {
                    if Instant::now() >= until {
                        set_breaker(&self.shared.stats, &mut s, BreakerState::HalfOpen);
                    }
                }
            }
            for m in &retry {
                let mut r = BaseRecord::<[u8], [u8]>::to(m.topic()).partition(m.partition());
                if let Some(k) = m.key() {
                    r = r.key(k);
                }
                if let Some(p) = m.payload() {
                    r = r.payload(p);
                }
                if let Some(h) = m.headers() {
                    r = r.headers(h.clone());
                }
                if let Some(ts) = m.timestamp().to_millis() {
                    r = r.timestamp(ts);
                }
                Self::enqueue(&self.producer, &mut self.batch, r)?;
            }
        }
        let (n, started) = std::mem::take(&mut self.batch);
        if n > 0 {
            let stats = &self.shared.stats;
            stats.batch_messages.observe_value(n as f64);
            if let Some(t) = started {
                stats.produce_seconds.observe(t.elapsed());
            }
        }
        let mut s = self.shared.state.lock();
        Ok(Flushed {
            delivered: std::mem::take(&mut s.delivered),
            positions: std::mem::take(&mut s.positions),
        })
    }

    /// Every queued message reported (delivered or failed).
    fn wait_for_reports(&self) -> Result<(), SinkError> {
        // Not `Producer::flush`: rdkafka 0.39's flush polls in 100 ms
        // steps that always run to their end, so every batch would cost
        // 100 ms. The producer's own thread serves the reports.
        let deadline = Instant::now() + self.report_within;
        while self.producer.in_flight_count() > 0 {
            if Instant::now() > deadline {
                return Err(SinkError::GaveUp {
                    failed: self.producer.in_flight_count().max(0) as usize,
                    waited: self.report_within,
                    last: "librdkafka reported no outcome in time".into(),
                });
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(())
    }
}

/// `first × 2^(attempt-1)`, capped at `max`, then scaled by a random
/// factor in [0.5, 1.0) so that many stages do not retry in step.
fn backoff(retry: &Retry, attempt: u32) -> Duration {
    let exp = retry
        .first
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
        .min(retry.max);
    let mut r = [0u8; 2];
    let _ = getrandom::getrandom(&mut r);
    let jitter = 0.5 + f64::from(u16::from_le_bytes(r)) / (2.0 * 65536.0);
    exp.mul_f64(jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_parse() {
        assert_eq!("zstd".parse::<Compression>(), Ok(Compression::Zstd));
        assert!("brotli".parse::<Compression>().is_err());
        assert!(matches!(
            "fixed:3".parse::<Partitioning>(),
            Ok(Partitioning::Fixed(3))
        ));
        assert!(matches!(
            "round-robin".parse::<Partitioning>(),
            Ok(Partitioning::RoundRobin)
        ));
        assert!("fixed:-1".parse::<Partitioning>().is_err());
        assert!("hash".parse::<Partitioning>().is_err());
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter() {
        let r = Retry {
            first: Duration::from_millis(100),
            max: Duration::from_secs(1),
            give_up_after: Duration::from_secs(10),
        };
        for attempt in 1..30 {
            let full = Duration::from_millis(100 * (1u64 << (attempt - 1).min(20)))
                .min(Duration::from_secs(1));
            let b = backoff(&r, attempt);
            assert!(b >= full / 2 && b <= full, "attempt {attempt}: {b:?}");
        }
    }
}
