//! Prometheus metrics (prometheus-client).
//!
//! Counters and gauges are read from [`Engine::stats`] at scrape time by a
//! collector, so the hot path pays nothing for them: it already keeps
//! striped counters. The two histograms are observed once per sync and once
//! per open, never per event.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::Engine;

/// Histograms the engine observes into.
#[derive(Clone, Debug)]
pub(crate) struct Histograms {
    /// Duration of each log sync (msync), seconds.
    pub sync_seconds: Histogram,
    /// Duration of replay on open, seconds.
    pub replay_seconds: Histogram,
}

impl Default for Histograms {
    fn default() -> Self {
        Histograms {
            // 10 µs .. ~5 s
            sync_seconds: Histogram::new(exponential_buckets(1e-5, 2.0, 20)),
            // 1 ms .. ~65 s
            replay_seconds: Histogram::new(exponential_buckets(1e-3, 2.0, 17)),
        }
    }
}

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
    let h = engine.histograms();
    registry.register(
        "seen_sync_seconds",
        "Duration of log syncs (msync), one per group commit",
        h.sync_seconds.clone(),
    );
    registry.register(
        "seen_replay_seconds",
        "Duration of log replay when the store was opened",
        h.replay_seconds.clone(),
    );
    registry.register_collector(Box::new(EngineCollector(Arc::clone(engine))));
}

#[derive(Debug)]
struct EngineCollector(Arc<Engine>);

impl Collector for EngineCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.0.stats();
        let counters: [(&str, &str, u64); 9] = [
            ("seen_new", "Checks answered new", s.new),
            ("seen_duplicate", "Checks answered duplicate", s.duplicate),
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
        Ok(())
    }
}
