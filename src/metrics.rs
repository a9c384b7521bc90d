//! Prometheus metrics (prometheus-client).
//!
//! Everything is read at scrape time by collectors: counters and gauges
//! from [`Engine::stats`] (the hot path already keeps striped counters),
//! histograms from the engine's own (observed once per sync and once per
//! open, never per event), and the guard's counters from
//! [`IdempotencyGuard::stats`](crate::guard::IdempotencyGuard::stats). The
//! engine itself knows nothing of Prometheus.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::encoding::{MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::stats::HistogramSnapshot;
use crate::Engine;

/// Register `engine`'s metrics (names prefixed `seen_`) in `registry`.
///
/// ```
/// let engine = std::sync::Arc::new(seen::Engine::builder().build()?);
/// let mut registry = prometheus_client::registry::Registry::default();
/// seen::metrics::register(&mut registry, &engine);
/// let _ = engine.check_and_insert("a")?;
/// let mut text = String::new();
/// prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
/// assert!(text.contains("seen_new_total 1"));
/// # Ok::<(), seen::Error>(())
/// ```
pub fn register(registry: &mut Registry, engine: &Arc<Engine>) {
    registry.register_collector(Box::new(EngineCollector(Arc::clone(engine))));
}

/// Register a guard's counters (`seen_inflight_collisions_total`,
/// `seen_failed_total`, `seen_released_total`) in `registry`.
#[cfg(feature = "guard")]
pub fn register_guard(registry: &mut Registry, guard: &Arc<crate::guard::IdempotencyGuard>) {
    registry.register_collector(Box::new(GuardCollector(Arc::clone(guard))));
}

#[cfg(feature = "guard")]
#[derive(Debug)]
struct GuardCollector(Arc<crate::guard::IdempotencyGuard>);

#[cfg(feature = "guard")]
impl Collector for GuardCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.0.stats();
        for (name, help, value) in [
            (
                "seen_inflight_collisions",
                "Guard calls that met their id in flight",
                s.inflight_collisions,
            ),
            (
                "seen_failed",
                "Guarded work that returned an error",
                s.failed,
            ),
            (
                "seen_released",
                "Claims released after failure, panic or cancellation",
                s.released,
            ),
        ] {
            let c = ConstCounter::new(value);
            c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        Ok(())
    }
}

/// A histogram read at scrape time.
#[derive(Debug)]
struct ConstHistogram(HistogramSnapshot);

impl EncodeMetric for ConstHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let (sum, count, buckets) = &self.0;
        encoder.encode_histogram::<NoLabelSet>(*sum, *count, buckets, None)
    }
    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[derive(Debug)]
struct EngineCollector(Arc<Engine>);

impl Collector for EngineCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.0.stats();
        let counters: [(&str, &str, u64); 7] = [
            ("seen_new", "Checks answered new", s.new),
            ("seen_duplicate", "Checks answered duplicate", s.duplicate),
            (
                "seen_expired",
                "Expired marks reclaimed from memory",
                s.expired,
            ),
            (
                "seen_evicted",
                "Live marks evicted at the memory ceiling",
                s.evicted,
            ),
            (
                "seen_invalid",
                "Ids rejected as empty or too long",
                s.invalid,
            ),
            (
                "seen_rejected",
                "Ids refused at the memory ceiling",
                s.rejected,
            ),
            (
                "seen_table_rebuilds",
                "Shard tables rebuilt (grown, shrunk, swept or evicted from)",
                s.table_rebuilds,
            ),
        ];
        for (name, help, value) in counters {
            let c = ConstCounter::new(value);
            c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        let gauges: [(&str, &str, u64); 4] = [
            (
                "seen_live_keys",
                "Marks resident in memory",
                s.live_keys as u64,
            ),
            (
                "seen_memory_bytes",
                "Bytes held by the set's tables",
                s.memory_bytes as u64,
            ),
            ("seen_log_bytes", "Bytes of log in use", s.log_bytes),
            (
                "seen_durability_lag_bytes",
                "Log bytes written but not yet durable",
                s.unsynced_bytes,
            ),
        ];
        for (name, help, value) in gauges {
            let g = ConstGauge::new(value as i64);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        let h = self.0.histograms();
        for (name, help, snapshot) in [
            (
                "seen_sync_seconds",
                "Duration of log syncs, one per group commit",
                h.sync_seconds.snapshot(),
            ),
            (
                "seen_replay_seconds",
                "Duration of log replay when the store was opened",
                h.replay_seconds.snapshot(),
            ),
        ] {
            let m = ConstHistogram(snapshot);
            m.encode(encoder.encode_descriptor(name, help, None, m.metric_type())?)?;
        }
        Ok(())
    }
}

/// Register a Kafka consumer's metrics in `registry`: totals
/// (`seen_kafka_received_total`, `_handled_total`, `_duplicates_total`,
/// `_invalid_total`, `_failed_total`, `_dead_lettered_total`,
/// `_commits_total`, `_commit_retries_total`, `_rebalances_total`), the
/// same counts per `topic`/`partition` (`seen_kafka_partition_*_total`),
/// consumer lag per partition (`seen_kafka_consumer_lag`, from librdkafka's
/// statistics every 5 s), and `seen_kafka_commit_seconds` (sync + commit).
#[cfg(feature = "kafka")]
pub fn register_kafka(registry: &mut Registry, consumer: &Arc<crate::kafka::DedupConsumer>) {
    registry.register_collector(Box::new(KafkaCollector(Arc::clone(consumer))));
}

#[cfg(feature = "kafka")]
#[derive(Debug)]
struct KafkaCollector(Arc<crate::kafka::DedupConsumer>);

#[cfg(feature = "kafka")]
impl Collector for KafkaCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use std::sync::atomic::Ordering::Relaxed;
        let s = self.0.stats();
        for (name, help, value) in [
            ("seen_kafka_received", "Messages received", &s.received),
            (
                "seen_kafka_handled",
                "Messages whose handler succeeded",
                &s.handled,
            ),
            ("seen_kafka_duplicates", "Duplicates skipped", &s.duplicates),
            (
                "seen_kafka_invalid",
                "Messages without a readable id",
                &s.invalid,
            ),
            (
                "seen_kafka_failed",
                "Handler attempts that failed",
                &s.failed,
            ),
            (
                "seen_kafka_dead_lettered",
                "Messages sent to the dead-letter topic",
                &s.dead_lettered,
            ),
            (
                "seen_kafka_commits",
                "Offset commits (each after an engine sync)",
                &s.commits,
            ),
            (
                "seen_kafka_commit_retries",
                "Commits the group deferred",
                &s.commit_retries,
            ),
            (
                "seen_kafka_rebalances",
                "Rebalance events (assign and revoke)",
                &s.rebalances,
            ),
        ] {
            let c = ConstCounter::new(value.load(Relaxed));
            c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        let parts = self.0.partition_stats();
        let labels: Vec<[(&str, String); 2]> = parts
            .iter()
            .map(|(t, p, _)| [("topic", t.clone()), ("partition", p.to_string())])
            .collect();
        type Pick = fn(&crate::kafka::PartitionStats) -> u64;
        let per: [(&str, &str, Pick); 5] = [
            (
                "seen_kafka_partition_handled",
                "Handled, per partition",
                |p| p.handled,
            ),
            (
                "seen_kafka_partition_duplicates",
                "Duplicates, per partition",
                |p| p.duplicates,
            ),
            (
                "seen_kafka_partition_failed",
                "Failed handler attempts, per partition",
                |p| p.failed,
            ),
            (
                "seen_kafka_partition_invalid",
                "Invalid ids, per partition",
                |p| p.invalid,
            ),
            (
                "seen_kafka_partition_dead_lettered",
                "Dead-lettered, per partition",
                |p| p.dead_lettered,
            ),
        ];
        for (name, help, pick) in per {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for ((_, _, stats), label) in parts.iter().zip(&labels) {
                ConstCounter::new(pick(stats)).encode(family.encode_family(label)?)?;
            }
        }
        let mut lag = encoder.encode_descriptor(
            "seen_kafka_consumer_lag",
            "Messages behind the end of the partition (librdkafka statistics)",
            None,
            MetricType::Gauge,
        )?;
        for ((_, _, stats), label) in parts.iter().zip(&labels) {
            if stats.lag >= 0 {
                ConstGauge::new(stats.lag).encode(lag.encode_family(label)?)?;
            }
        }
        let m = ConstHistogram(self.0.commit_seconds().snapshot());
        m.encode(encoder.encode_descriptor(
            "seen_kafka_commit_seconds",
            "Duration of an offset commit, engine sync included",
            None,
            m.metric_type(),
        )?)?;
        Ok(())
    }
}

/// Register a Kafka stage's counters: `seen_stage_read_total`,
/// `seen_stage_produced_total`, `seen_stage_duplicates_total`,
/// `seen_stage_invalid_total`, `seen_stage_dead_lettered_total`,
/// `seen_stage_batches_total`, `seen_stage_read_back` and
/// `seen_stage_consumer_lag{topic,partition}`; and its producer's:
/// `seen_sink_sent_total`, `seen_sink_failed_total`,
/// `seen_sink_retried_total`, `seen_sink_breaker_trips_total`,
/// `seen_sink_breaker_state` (0 closed, 1 open, 2 half-open),
/// `seen_sink_batch_messages` and `seen_sink_produce_seconds`.
#[cfg(feature = "kafka")]
pub fn register_stage(registry: &mut Registry, stats: Arc<crate::kafka::stage::StageStats>) {
    registry.register_collector(Box::new(StageCollector(stats)));
}

#[cfg(feature = "kafka")]
#[derive(Debug)]
struct StageCollector(Arc<crate::kafka::stage::StageStats>);

#[cfg(feature = "kafka")]
impl Collector for StageCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use std::sync::atomic::Ordering::Relaxed;
        let s = &self.0;
        let k = &s.sink;
        let read = s.read.load(Relaxed);
        let produced = s.produced.load(Relaxed);
        let invalid = s.invalid.load(Relaxed);
        // Read, not yet decided, counts as neither until its batch closes.
        let duplicates = read.saturating_sub(produced + invalid);
        for (name, help, value) in [
            ("seen_stage_read", "Input messages read", read),
            (
                "seen_stage_produced",
                "First occurrences produced",
                produced,
            ),
            ("seen_stage_duplicates", "Duplicates dropped", duplicates),
            (
                "seen_stage_invalid",
                "Messages without a readable id",
                invalid,
            ),
            (
                "seen_stage_dead_lettered",
                "Invalid messages sent to the dead-letter topic",
                s.dead_lettered.load(Relaxed),
            ),
            (
                "seen_stage_batches",
                "Batches committed (delivered, marked, offsets committed)",
                s.batches.load(Relaxed),
            ),
            (
                "seen_sink_sent",
                "Messages the brokers confirmed",
                k.sent.load(Relaxed),
            ),
            (
                "seen_sink_failed",
                "Delivery failures (each failed resend counts again)",
                k.failed.load(Relaxed),
            ),
            (
                "seen_sink_retried",
                "Messages sent again",
                k.retried.load(Relaxed),
            ),
            (
                "seen_sink_breaker_trips",
                "Times the circuit breaker opened",
                k.breaker_trips.load(Relaxed),
            ),
        ] {
            let c = ConstCounter::new(value);
            c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        for (name, help, value) in [
            (
                "seen_stage_read_back",
                "Output messages read back on start",
                s.read_back.load(Relaxed) as i64,
            ),
            (
                "seen_sink_breaker_state",
                "Circuit breaker: 0 closed, 1 open, 2 half-open",
                k.breaker_state.load(Relaxed) as i64,
            ),
        ] {
            let g = ConstGauge::new(value);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        let mut lag = encoder.encode_descriptor(
            "seen_stage_consumer_lag",
            "Messages behind the end of the input partition (librdkafka statistics)",
            None,
            MetricType::Gauge,
        )?;
        for (topic, partition, l) in s.lag() {
            if l >= 0 {
                ConstGauge::new(l).encode(
                    lag.encode_family(&[("topic", topic), ("partition", partition.to_string())])?,
                )?;
            }
        }
        for (name, help, h) in [
            (
                "seen_sink_batch_messages",
                "Messages per flushed batch",
                &k.batch_messages,
            ),
            (
                "seen_sink_produce_seconds",
                "From a batch's first send to its last delivery confirmation",
                &k.produce_seconds,
            ),
        ] {
            let m = ConstHistogram(h.snapshot());
            m.encode(encoder.encode_descriptor(name, help, None, m.metric_type())?)?;
        }
        Ok(())
    }
}

/// Register a background checkpointer's status:
/// `seen_checkpoint_total`, `seen_checkpoint_failures_total`,
/// `seen_checkpoint_rows_total`, `seen_checkpoint_rows_per_second`,
/// `seen_checkpoint_lag_marks`, `seen_checkpoint_lag_seconds`,
/// `seen_checkpoint_breaker_open` and `seen_checkpoint_pool_in_use`.
#[cfg(feature = "postgres")]
pub fn register_checkpoint(registry: &mut Registry, watch: crate::checkpoint::CheckpointWatch) {
    registry.register_collector(Box::new(CheckpointCollector(watch)));
}

#[cfg(feature = "postgres")]
#[derive(Debug)]
struct CheckpointCollector(crate::checkpoint::CheckpointWatch);

#[cfg(feature = "postgres")]
impl Collector for CheckpointCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.0.status();
        for (name, help, value) in [
            ("seen_checkpoint", "Successful checkpoints", s.checkpoints),
            ("seen_checkpoint_failures", "Failed checkpoints", s.failures),
            (
                "seen_checkpoint_rows",
                "Rows written by checkpoints",
                s.rows,
            ),
        ] {
            let c = ConstCounter::new(value);
            c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        for (name, help, value) in [
            (
                "seen_checkpoint_rows_per_second",
                "Rows per second of the last checkpoint that wrote any",
                s.rows_per_second,
            ),
            (
                "seen_checkpoint_lag_marks",
                "New marks not yet checkpointed",
                s.marks_behind as f64,
            ),
            (
                "seen_checkpoint_lag_seconds",
                "Seconds since the last successful checkpoint, while marks wait",
                s.seconds_behind,
            ),
            (
                "seen_checkpoint_breaker_open",
                "1 while the PostgreSQL circuit breaker fails calls fast",
                f64::from(u8::from(s.breaker_open)),
            ),
            (
                "seen_checkpoint_pool_in_use",
                "PostgreSQL connections checked out",
                s.connections_in_use as f64,
            ),
        ] {
            let g = ConstGauge::new(value);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        Ok(())
    }
}
