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
        let counters: [(&str, &str, u64); 6] = [
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
