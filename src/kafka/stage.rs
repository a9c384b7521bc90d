//! A Kafka → Kafka dedup stage over the library's loop (`seen::stage`):
//! read the input topics, drop redeliveries, produce the first occurrence
//! of every id to the output topic with the id stamped as its
//! `idempotency_key` header.
//!
//! ```text
//! per batch:  poll ─► id ─► decide ─► produce
//!             then:   flush (every delivery confirmed) ─► commit marks (durable)
//!                     ─► (about once a second) record the output positions
//!                         now covered by durable marks
//!                     ─► commit the input offsets
//! on start:   read the output from the recorded positions to its end and
//!             mark every idempotency_key found, then consume
//! ```
//!
//! A kill -9 between "produced" and "marked" leaves ids in the output that
//! the marks do not know; the read-back on restart marks them before any
//! input is consumed, so their redelivered inputs are dropped as
//! duplicates. The output then holds each id once, without broker
//! transactions, as long as no other writer stamps ids into the output
//! topic. What a restart costs: reading the output written since the last
//! recorded position, about [`StageConfig::record_positions_every`] of
//! output plus one batch.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Message};
use rdkafka::{ClientContext, Offset, Statistics, TopicPartitionList};

use super::ids::{IdStrategy, IDEMPOTENCY_KEY_HEADER};
use super::partitions::Partitions;
use super::received::Received;
use super::sink::{KafkaSink, Record, SinkConfig, SinkStats};
use crate::stage::{BoxError, Event, IdSpec, InvalidId, Next, OnInvalid, Sink, Source};
use crate::Engine;

/// Settings of a stage.
#[derive(Clone, Debug)]
pub struct StageConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// The consumer group of the input.
    pub group: String,
    /// Input topics.
    pub inputs: Vec<String>,
    /// Where ids come from.
    pub ids: IdStrategy,
    /// Extra librdkafka properties of the consumer (`-X`).
    pub consumer_properties: Vec<(String, String)>,
    /// The producer: output topic (`producer.topic`), batching, linger,
    /// compression, partitioning, retries, breaker, `-P` properties.
    pub producer: SinkConfig,
    /// What to do with a message whose id cannot be read.
    pub on_invalid: OnInvalid,
    /// Where invalid messages go under [`OnInvalid::DeadLetter`].
    pub dead_letter_topic: Option<String>,
    /// Messages decided per batch (one flush, one offset commit each).
    pub batch: usize,
    /// How often the output positions covered by durable marks are
    /// recorded (one file write and fsync each): the read-back after a
    /// crash covers at most what was produced since, plus one batch.
    pub record_positions_every: Duration,
    /// Bounded waits for brokers (metadata, the read-back).
    pub timeout: Duration,
}

impl StageConfig {
    /// Defaults for everything but where to read and write.
    pub fn new(brokers: &str, group: &str, inputs: &[&str], output: &str) -> Self {
        StageConfig {
            brokers: brokers.into(),
            group: group.into(),
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            ids: IdStrategy::default(),
            consumer_properties: Vec::new(),
            producer: SinkConfig::new(brokers, output),
            on_invalid: OnInvalid::Skip,
            dead_letter_topic: None,
            batch: 1000,
            record_positions_every: Duration::from_secs(1),
            timeout: Duration::from_secs(30),
        }
    }

    /// The output topic.
    pub fn output(&self) -> &str {
        &self.producer.topic
    }
}

/// Counters of a running stage, read at scrape time
/// (`seen::metrics::register_stage`).
#[derive(Debug, Default)]
pub struct StageStats {
    /// Input messages read.
    pub read: AtomicU64,
    /// First occurrences produced to the output.
    pub produced: AtomicU64,
    /// Messages without a readable id.
    pub invalid: AtomicU64,
    /// Invalid messages sent to the dead-letter topic.
    pub dead_lettered: AtomicU64,
    /// Output messages read back on start.
    pub read_back: AtomicU64,
    /// Batches committed (flushed, marked, positions recorded, offsets
    /// committed).
    pub batches: AtomicU64,
    /// The producer's counters.
    pub sink: Arc<SinkStats>,
    /// Consumer lag per input partition (librdkafka statistics).
    pub(crate) lag: Partitions,
}

impl StageStats {
    /// Input partitions and their lag (messages behind the end).
    pub fn lag(&self) -> Vec<(String, i32, i64)> {
        self.lag
            .snapshot()
            .into_iter()
            .map(|(t, p, s)| (t, p, s.lag))
            .collect()
    }
}

/// One input message and its id, read once by the source.
#[derive(Debug)]
pub struct StageItem {
    msg: Received,
    id: Result<Vec<u8>, InvalidId>,
}

impl Event for StageItem {
    fn id_of(&self, _spec: &IdSpec) -> Result<Cow<'_, [u8]>, InvalidId> {
        match &self.id {
            Ok(id) => Ok(Cow::Borrowed(id)),
            Err(e) => Err(e.clone()),
        }
    }
}

/// Output positions covered by durable marks: partition → next offset.
type Positions = HashMap<i32, i64>;

/// The file that records output positions covered by durable marks.
pub fn checkpoint_path(state: &Path) -> PathBuf {
    state.join("output-positions.json")
}

fn read_checkpoint(path: &Path) -> Result<Positions, BoxError> {
    match std::fs::read(path) {
        Ok(b) => {
            let v: HashMap<String, i64> = serde_json::from_slice(&b)
                .map_err(|e| format!("{}: not a positions file: {e}", path.display()))?;
            v.into_iter()
                .map(|(k, o)| {
                    Ok((
                        k.parse::<i32>()
                            .map_err(|e| format!("{}: {e}", path.display()))?,
                        o,
                    ))
                })
                .collect()
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Positions::new()),
        Err(e) => Err(format!("{}: {e}", path.display()).into()),
    }
}

/// Write the positions atomically and durably (temp file, fsync, rename,
/// directory fsync): a crash leaves the old file or the new one.
fn write_checkpoint(path: &Path, positions: &Positions) -> Result<(), BoxError> {
    use std::io::Write;
    let map: HashMap<String, i64> = positions.iter().map(|(p, o)| (p.to_string(), *o)).collect();
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec(&map)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Read the output from the recorded positions to its end and mark every
/// `idempotency_key` found. Returns how many messages were read back.
///
/// The marks are logged with the engine's durability and not synced here:
/// the stage syncs before it records output positions, and until then a
/// crash reads the same messages back again. (A sync here would also wait
/// for the killed process's unwritten log pages: 0.3 s of a restart.)
///
/// The end of a partition is where librdkafka reports `PartitionEOF` (an
/// empty fetch at the high watermark), not a watermark asked for up front:
/// a broker that answers `ListOffsets` with a stale end (Tansu 0.1.2
/// reports the base offset of the last batch) would otherwise end the
/// read-back early and let the crash window through. Gives up with an
/// error after `config.timeout` without progress.
pub fn read_back(config: &StageConfig, engine: &Engine, state: &Path) -> Result<u64, BoxError> {
    ReadBack::start(config, state)?.finish(engine)
}

/// A [`read_back`] under way. [`ReadBack::start`] needs no engine: it
/// positions a consumer at the recorded output positions, and librdkafka
/// fetches in the background from then on, so a stage that starts it
/// before opening its engine overlaps the broker round trips with the
/// replay. [`ReadBack::finish`] marks what was fetched.
pub struct ReadBack {
    consumer: BaseConsumer,
    /// Partitions not yet read to their end.
    open: std::collections::HashSet<i32>,
    output: String,
    timeout: Duration,
}

impl ReadBack {
    /// Connect and position the read-back consumer.
    pub fn start(config: &StageConfig, state: &Path) -> Result<ReadBack, BoxError> {
        let recorded = read_checkpoint(&checkpoint_path(state))?;
        // Never commits: the group only lets it `assign` partitions.
        let mut client =
            super::manual_commit_consumer(&config.brokers, &format!("{}-readback", config.group));
        client
            .set("allow.auto.create.topics", "false")
            .set("enable.partition.eof", "true")
            // An empty partition answers at once instead of after 500 ms.
            .set("fetch.wait.max.ms", "10")
            // A second of output in one fetch per partition, not 1 MiB ones.
            .set("max.partition.fetch.bytes", "16777216")
            // Transactional mode: what an aborted transaction wrote is not output.
            .set("isolation.level", "read_committed");
        let consumer: BaseConsumer = client.create()?;
        let partitions = output_partitions(&consumer, config)?;
        let open = partitions.iter().copied().collect();
        let mut tpl = TopicPartitionList::new();
        for p in partitions {
            let from = recorded
                .get(&p)
                .map_or(Offset::Beginning, |&o| Offset::Offset(o));
            tpl.add_partition_offset(config.output(), p, from)?;
        }
        consumer.assign(&tpl)?;
        Ok(ReadBack {
            consumer,
            open,
            output: config.output().to_owned(),
            timeout: config.timeout,
        })
    }

    /// Read every partition to its end, marking each `idempotency_key`;
    /// returns how many messages were read back.
    pub fn finish(mut self, engine: &Engine) -> Result<u64, BoxError> {
        let mut progress = Instant::now();
        let (mut read, mut refused) = (0, 0u64);
        let mut ids = IdChunk::default();
        while !self.open.is_empty() {
            if progress.elapsed() > self.timeout {
                return Err(format!(
                    "reading back {}: no progress for {:?} ({} partitions not at their end)",
                    self.output,
                    self.timeout,
                    self.open.len()
                )
                .into());
            }
            match self.consumer.poll(Duration::from_millis(100)) {
                None => {}
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    self.open.remove(&p);
                    progress = Instant::now();
                }
                Some(Err(e)) if super::consumer::fatal_to_consumers(&e) => {
                    return Err(format!("reading back {}: {e}", self.output).into())
                }
                Some(Err(e)) => {
                    // Brokers down or reconnecting (the read-back after a
                    // failed delivery runs while they may still be): wait,
                    // up to the no-progress bound above.
                    tracing::debug!(error = %e, "seen kafka: read-back waiting for the brokers");
                }
                Some(Ok(m)) => {
                    read += 1;
                    progress = Instant::now();
                    if let Some(id) = super::ids::header(&m, IDEMPOTENCY_KEY_HEADER) {
                        // An id the engine refuses (empty, or longer than a
                        // `max_id_len` lowered since) is no id the stage
                        // lets through, so there is nothing to mark; the
                        // engine counts it as invalid. Kept in, it would
                        // fail the whole chunk, and every restart after.
                        if engine.validate(id).is_err() {
                            refused += 1;
                            continue;
                        }
                        // Already marked or not: either way it is in the output.
                        ids.push(id);
                        if ids.len() == READ_BACK_CHUNK {
                            ids.mark(engine)?;
                        }
                    }
                }
            }
        }
        ids.mark(engine)?;
        if refused > 0 {
            tracing::warn!(
                refused,
                output = %self.output,
                "seen kafka: read-back passed over ids the engine refuses (empty or over max_id_len)"
            );
        }
        close_in_background(self.consumer);
        Ok(read)
    }
}

/// Closing a consumer takes librdkafka about 100 ms (half of a restart's
/// read-back on loopback); nothing need wait for it.
fn close_in_background(consumer: BaseConsumer) {
    if let Err(e) = std::thread::Builder::new()
        .name("seen-readback-close".into())
        .spawn(move || drop(consumer))
    {
        tracing::debug!(error = %e, "seen kafka: closed the read-back consumer inline");
    }
}

/// Ids the read-back marks at a time.
const READ_BACK_CHUNK: usize = 4096;

/// Read-back ids gathered for one batch call (which overlaps the table
/// misses and logs the chunk in one go: a third of the per-id cost), kept
/// in one buffer.
#[derive(Default)]
struct IdChunk {
    bytes: Vec<u8>,
    ends: Vec<usize>,
    verdicts: Vec<crate::Verdict>,
}

impl IdChunk {
    fn push(&mut self, id: &[u8]) {
        self.bytes.extend_from_slice(id);
        self.ends.push(self.bytes.len());
    }

    fn len(&self) -> usize {
        self.ends.len()
    }

    fn mark(&mut self, engine: &Engine) -> crate::Result<()> {
        let mut start = 0;
        let ids: Vec<&[u8]> = self
            .ends
            .iter()
            .map(|&end| {
                let id = &self.bytes[start..end];
                start = end;
                id
            })
            .collect();
        self.verdicts.clear();
        let marked = engine.check_and_insert_batch_into(&ids, &mut self.verdicts);
        self.bytes.clear();
        self.ends.clear();
        marked
    }
}

/// The output topic's partitions; a clear error when it does not exist.
fn output_partitions(consumer: &BaseConsumer, config: &StageConfig) -> Result<Vec<i32>, BoxError> {
    let meta = consumer.fetch_metadata(Some(config.output()), config.timeout)?;
    let topic = meta.topics().first();
    let missing = || format!("output topic {:?} does not exist", config.output());
    let topic = topic.ok_or_else(missing)?;
    if topic.error().is_some() || topic.partitions().is_empty() {
        return Err(missing().into());
    }
    Ok(topic.partitions().iter().map(|p| p.id()).collect())
}

/// Keeps librdkafka's per-partition consumer lag for the metrics.
struct LagContext(Arc<StageStats>);

impl ClientContext for LagContext {
    fn stats(&self, statistics: Statistics) {
        for (topic, t) in &statistics.topics {
            for (&partition, p) in &t.partitions {
                if partition >= 0 && p.consumer_lag >= 0 {
                    self.0.lag.set_lag(topic, partition, p.consumer_lag);
                }
            }
        }
    }
}

impl ConsumerContext for LagContext {}

/// Output positions a flush reached, handed from the sink to the source.
type Delivered = Arc<Mutex<Positions>>;

/// Input offsets to commit: (input topic's index, partition) → next offset.
type Pending = Arc<Mutex<HashMap<(usize, i32), i64>>>;

/// The input offsets as librdkafka wants them.
fn offsets_to_commit(
    inputs: &[Arc<str>],
    pending: HashMap<(usize, i32), i64>,
) -> Result<TopicPartitionList, KafkaError> {
    let mut tpl = TopicPartitionList::new();
    for ((t, p), o) in pending {
        if let Some(topic) = inputs.get(t) {
            tpl.add_partition_offset(topic, p, Offset::Offset(o))?;
        }
    }
    Ok(tpl)
}

/// The input side of the stage.
pub struct KafkaSource {
    consumer: Arc<BaseConsumer<LagContext>>,
    ids: IdStrategy,
    item: Option<StageItem>,
    /// The input topics, in subscription order (shared by the copies of
    /// their messages).
    inputs: Vec<Arc<str>>,
    /// Next offset to commit, per (input topic's index, partition), since
    /// the last ack: no allocation per message. Shared with the sink,
    /// which commits them inside its transaction in transactional mode.
    pending: Pending,
    transactional: bool,
    delivered: Delivered,
    covered: Positions,
    /// `covered` has moved since it was last written.
    unrecorded: bool,
    recorded_at: Instant,
    record_every: Duration,
    checkpoint: PathBuf,
    stop: Arc<AtomicBool>,
    stats: Arc<StageStats>,
    /// When a transient consumer error was last logged.
    warned: Option<Instant>,
}

impl KafkaSource {
    fn new(
        config: &StageConfig,
        state: &Path,
        delivered: Delivered,
        stop: Arc<AtomicBool>,
        stats: Arc<StageStats>,
    ) -> Result<Self, BoxError> {
        let mut client = super::manual_commit_consumer(&config.brokers, &config.group);
        client.set("statistics.interval.ms", "5000");
        for (k, v) in &config.consumer_properties {
            client.set(k, v);
        }
        let consumer: Arc<BaseConsumer<LagContext>> =
            Arc::new(client.create_with_context(LagContext(Arc::clone(&stats)))?);
        let meta = consumer.fetch_metadata(None, config.timeout)?;
        for input in &config.inputs {
            let found = meta
                .topics()
                .iter()
                .any(|t| t.name() == input && t.error().is_none() && !t.partitions().is_empty());
            if !found {
                return Err(format!("input topic {input:?} does not exist").into());
            }
        }
        drop(meta);
        let inputs: Vec<&str> = config.inputs.iter().map(String::as_str).collect();
        consumer.subscribe(&inputs)?;
        let checkpoint = checkpoint_path(state);
        Ok(KafkaSource {
            consumer,
            ids: config.ids.clone(),
            inputs: config
                .inputs
                .iter()
                .map(|t| Arc::from(t.as_str()))
                .collect(),
            item: None,
            pending: Pending::default(),
            transactional: config.producer.transactional_id.is_some(),
            delivered,
            covered: read_checkpoint(&checkpoint)?,
            unrecorded: false,
            recorded_at: Instant::now(),
            record_every: config.record_positions_every,
            checkpoint,
            stop,
            stats,
            warned: None,
        })
    }
}

impl KafkaSource {
    fn record_due(&self) -> bool {
        self.stop.load(Relaxed) || self.recorded_at.elapsed() >= self.record_every
    }

    /// The next ack records output positions (the marks must be durable
    /// first).
    fn positions_due(&self) -> bool {
        (self.unrecorded || !self.delivered.lock().is_empty()) && self.record_due()
    }
}

impl Source for KafkaSource {
    type Item = StageItem;

    fn next(&mut self, may_block: bool) -> Result<Next<'_, StageItem>, BoxError> {
        loop {
            if self.stop.load(Relaxed) {
                return Ok(Next::End);
            }
            let wait = if may_block {
                Duration::from_millis(100)
            } else {
                Duration::ZERO
            };
            match self.consumer.poll(wait) {
                None if may_block => continue,
                None => return Ok(Next::Idle),
                Some(Err(e)) if super::consumer::fatal_to_consumers(&e) => return Err(e.into()),
                Some(Err(e)) => {
                    // Brokers down, a timeout: librdkafka reconnects by
                    // itself; the stage waits (and says so, now and then).
                    if self
                        .warned
                        .map_or(true, |t| t.elapsed() > Duration::from_secs(5))
                    {
                        tracing::warn!(error = %e, "seen kafka: consumer error; waiting for the brokers");
                        self.warned = Some(Instant::now());
                    }
                    if !may_block {
                        return Ok(Next::Idle);
                    }
                }
                Some(Ok(m)) => {
                    self.stats.read.fetch_add(1, Relaxed);
                    let id = self.ids.id_of(&m).map(Cow::into_owned);
                    // Compared as bytes: rdkafka's `topic()` checks UTF-8
                    // on every call.
                    let name = super::received::topic_bytes(&m);
                    let input = self.inputs.iter().position(|t| t.as_bytes() == name);
                    let topic = match input {
                        Some(t) => Arc::clone(&self.inputs[t]),
                        None => String::from_utf8_lossy(name).into(),
                    };
                    let msg = Received::copy_of(&m, topic);
                    drop(m);
                    if let Some(t) = input {
                        self.pending
                            .lock()
                            .insert((t, msg.partition()), msg.offset() + 1);
                    }
                    self.item = Some(StageItem { msg, id });
                    return Ok(self.item.as_ref().map_or(Next::Idle, Next::Item));
                }
            }
        }
    }

    /// The batch's outputs are delivered and its marks durable: record the
    /// output positions they cover, then commit the input offsets.
    fn ack(&mut self) -> Result<(), BoxError> {
        let delivered = std::mem::take(&mut *self.delivered.lock());
        for (p, o) in delivered {
            let e = self.covered.entry(p).or_insert(o);
            *e = (*e).max(o);
            self.unrecorded = true;
        }
        // Recording less often only widens the read-back after a crash
        // (to what was produced since): it never lets it skip an output.
        if self.unrecorded && self.record_due() {
            write_checkpoint(&self.checkpoint, &self.covered)?;
            self.unrecorded = false;
            self.recorded_at = Instant::now();
        }
        self.stats.batches.fetch_add(1, Relaxed);
        let pending = std::mem::take(&mut *self.pending.lock());
        if self.transactional || pending.is_empty() {
            // Transactional: committed with the batch's transaction.
            return Ok(());
        }
        let tpl = offsets_to_commit(&self.inputs, pending)?;
        let r = self.consumer.commit(&tpl, CommitMode::Sync);
        drop(tpl);
        if let Err(e) = r {
            // Not fatal: the input is redelivered and dropped as duplicates.
            tracing::warn!(error = %e, "seen kafka: input offset commit deferred");
        }
        Ok(())
    }
}

/// The output side of the stage: the producer sink, the dead-letter topic.
pub struct StageSink {
    sink: KafkaSink,
    dead_letter_topic: Option<String>,
    delivered: Delivered,
    stats: Arc<StageStats>,
    /// Transactional mode: the input side whose offsets go in each
    /// transaction.
    transaction: Option<TransactionInput>,
}

struct TransactionInput {
    consumer: Arc<BaseConsumer<LagContext>>,
    pending: Pending,
    inputs: Vec<Arc<str>>,
}

impl Sink<StageItem> for StageSink {
    fn emit(&mut self, item: &StageItem, id: Option<&[u8]>) -> Result<(), BoxError> {
        let m = &item.msg;
        // The input's id header is replaced by the id the stage decided on.
        let mut headers = super::ids::copy_headers(m, Some(IDEMPOTENCY_KEY_HEADER));
        if let Some(id) = id {
            headers = headers.insert(Header {
                key: IDEMPOTENCY_KEY_HEADER,
                value: Some(id),
            });
        }
        self.sink.send(Record {
            topic: None,
            key: m.key(),
            payload: m.payload(),
            headers: Some(headers),
            timestamp: m.timestamp().to_millis(),
            source_partition: Some(m.partition()),
        })?;
        self.stats.produced.fetch_add(1, Relaxed);
        Ok(())
    }

    /// Every output delivered; in transactional mode, also the input
    /// offsets added to the transaction and the transaction committed
    /// (before the loop logs any mark of it: an aborted batch leaves none).
    fn flush(&mut self) -> Result<(), BoxError> {
        let flushed = match &self.transaction {
            None => self.sink.flush()?,
            Some(t) => {
                let pending = std::mem::take(&mut *t.pending.lock());
                let tpl = offsets_to_commit(&t.inputs, pending)?;
                let group = t
                    .consumer
                    .group_metadata()
                    .ok_or("transactional mode: the consumer has no group metadata")?;
                let r = self.sink.commit_transaction(&tpl, &group);
                drop((tpl, group));
                r?
            }
        };
        if !flushed.positions.is_empty() {
            let mut d = self.delivered.lock();
            for (p, o) in flushed.positions {
                let e = d.entry(p).or_insert(o);
                *e = (*e).max(o);
            }
        }
        Ok(())
    }

    fn dead_letter(&mut self, item: &StageItem, why: &InvalidId) -> Result<(), BoxError> {
        let Some(topic) = &self.dead_letter_topic else {
            return Err(format!("no dead-letter topic for an invalid message ({why})").into());
        };
        let m = &item.msg;
        self.sink.send(Record {
            topic: Some(topic),
            key: m.key(),
            payload: m.payload(),
            headers: Some(super::consumer::dead_letter_headers(m, &why.to_string())),
            timestamp: m.timestamp().to_millis(),
            source_partition: None,
        })?;
        self.stats.dead_lettered.fetch_add(1, Relaxed);
        Ok(())
    }

    fn invalid(&mut self, _seq: u64, why: &InvalidId, _action: OnInvalid) {
        self.stats.invalid.fetch_add(1, Relaxed);
        tracing::debug!(reason = %why, "seen kafka: message without a readable id");
    }
}

/// The stage's source and sink, sharing the output positions delivered.
pub fn source_and_sink(
    config: &StageConfig,
    state: &Path,
    stop: Arc<AtomicBool>,
    stats: &Arc<StageStats>,
) -> Result<(KafkaSource, StageSink), BoxError> {
    let delivered = Delivered::default();
    // Producer first: a missing output topic is reported before the group
    // join.
    let producer = KafkaSink::with_stats(&config.producer, Arc::clone(&stats.sink))?;
    let source = KafkaSource::new(
        config,
        state,
        Arc::clone(&delivered),
        stop,
        Arc::clone(stats),
    )?;
    let transaction = producer.is_transactional().then(|| TransactionInput {
        consumer: Arc::clone(&source.consumer),
        pending: Arc::clone(&source.pending),
        inputs: source.inputs.clone(),
    });
    let sink = StageSink {
        sink: producer,
        dead_letter_topic: config.dead_letter_topic.clone(),
        delivered,
        stats: Arc::clone(stats),
        transaction,
    };
    Ok((source, sink))
}

/// Read back the output, then run the dedup loop until `stop` is set (or
/// the input fails). `engine` holds the marks (open it in a directory of
/// its own, e.g. `state/marks`); `state` holds the output positions.
/// Returns how many output messages the read-back found.
pub fn run(
    config: &StageConfig,
    engine: &Engine,
    state: &Path,
    stop: Arc<AtomicBool>,
    stats: &Arc<StageStats>,
    summary: &mut crate::stage::Summary,
) -> Result<u64, crate::stage::StageError> {
    check(config, engine)?;
    let read_back = ReadBack::start(config, state).map_err(crate::stage::StageError::Source)?;
    run_after(read_back, config, engine, state, stop, stats, summary)
}

/// What the stage refuses before it connects to anything.
fn check(config: &StageConfig, engine: &Engine) -> Result<(), crate::stage::StageError> {
    if engine.durability().is_none() {
        return Err(crate::Error::Config(
            "the Kafka stage needs a durable engine (EngineBuilder::open): its read-back after a crash starts from marks on disk".into(),
        )
        .into());
    }
    if config.on_invalid == OnInvalid::DeadLetter && config.dead_letter_topic.is_none() {
        return Err(crate::Error::Config(
            "the dead-letter policy needs a dead-letter topic".into(),
        )
        .into());
    }
    Ok(())
}

/// [`run`] with its read-back already started ([`ReadBack::start`], e.g.
/// while the engine was opening).
pub fn run_after(
    read_back: ReadBack,
    config: &StageConfig,
    engine: &Engine,
    state: &Path,
    stop: Arc<AtomicBool>,
    stats: &Arc<StageStats>,
    summary: &mut crate::stage::Summary,
) -> Result<u64, crate::stage::StageError> {
    use crate::stage::StageError;
    check(config, engine)?;
    let mut read_total = 0;
    let mut started = Some(read_back);
    loop {
        let (source, mut sink) =
            source_and_sink(config, state, Arc::clone(&stop), stats).map_err(StageError::Source)?;
        let read_back = match started.take() {
            Some(r) => r,
            None => ReadBack::start(config, state).map_err(StageError::Source)?,
        };
        let read = read_back.finish(engine).map_err(StageError::Source)?;
        read_total += read;
        stats.read_back.fetch_add(read, Relaxed);
        let mut source = DurableAcks { source, engine };
        let options = crate::stage::StageOptions {
            id: IdSpec::Whole,
            batch: config.batch.max(1),
            on_invalid: config.on_invalid,
        };
        match crate::stage::run(engine, &mut source, &mut sink, &options, summary) {
            Err(StageError::Sink(e))
                if matches!(
                    e.downcast_ref::<super::sink::SinkError>(),
                    Some(super::sink::SinkError::Uncertain(_))
                ) =>
            {
                // Some outputs of the abandoned batch may be in the topic:
                // start over as after a crash (new consumer from the
                // committed offsets, read-back first). The batch's marks
                // were released, so nothing it held is lost.
                tracing::warn!(error = %e, "seen kafka: delivery outcome unknown; reading the output back before going on");
                drop((source, sink));
                std::thread::sleep(Duration::from_millis(500));
            }
            other => return other.map(|()| read_total),
        }
    }
}

/// Makes the marks durable before the source records output positions,
/// whatever the engine's durability: recorded positions never run ahead of
/// durable marks, which is all the read-back needs. Batches in between are
/// not synced one by one (with `Durability::None` the marks still survive
/// a kill -9 in the page cache; what a power loss takes, the read-back
/// from the last recorded positions restores). Committing input offsets
/// ahead of durable marks is safe for the same reason: their outputs lie
/// after the recorded positions.
struct DurableAcks<'a> {
    source: KafkaSource,
    engine: &'a Engine,
}

impl Source for DurableAcks<'_> {
    type Item = StageItem;

    fn next(&mut self, may_block: bool) -> Result<Next<'_, StageItem>, BoxError> {
        self.source.next(may_block)
    }

    fn ack(&mut self) -> Result<(), BoxError> {
        if self.source.positions_due() && self.engine.durability() != Some(crate::Durability::Sync)
        {
            self.engine.sync()?;
        }
        self.source.ack()
    }
}
