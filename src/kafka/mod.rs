//! Kafka (feature `kafka`, on rdkafka): event ids read from messages, and a
//! dedup consumer loop that commits offsets only behind durable marks.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use seen::guard::IdempotencyGuard;
//! use seen::kafka::{DedupConsumer, DedupConsumerConfig, IdStrategy};
//!
//! let engine = Arc::new(seen::Engine::builder()
//!     .durability(seen::Durability::None) // the loop syncs before each offset commit
//!     .open("./seen-state")?);
//! let mut config = DedupConsumerConfig::new("127.0.0.1:9092", "billing", &["orders"]);
//! config.ids = "header:idempotency_key|debezium".parse::<IdStrategy>()?;
//! let consumer = DedupConsumer::new(config, Arc::new(IdempotencyGuard::new(engine)))?;
//! consumer
//!     .run(
//!         |msg| async move {
//!             // charge, write, call … once per id
//!             let _ = msg;
//!             Ok::<_, std::io::Error>(())
//!         },
//!         seen::kafka::shutdown_signal(), // SIGINT or SIGTERM
//!     )
//!     .await?;
//! # Ok(()) }
//! ```

mod consumer;
mod ids;
mod partitions;
mod producer;
mod received;
mod scope;
pub mod sink;
pub mod stage;

pub use consumer::{
    AfterRetries, ConsumeError, ConsumerStats, DedupConsumer, DedupConsumerConfig, InvalidMessages,
    DEAD_LETTER_ORIGIN_HEADER, DEAD_LETTER_REASON_HEADER,
};
pub use ids::{header, IdSource, IdStrategy, IDEMPOTENCY_KEY_HEADER};
pub use partitions::PartitionStats;
pub use producer::{
    Delivered, Event, EventProducer, Json, MessagePack, SendError, SerializeError, Serializer,
    CORRELATION_ID_HEADER, EVENT_TYPE_HEADER,
};
pub use received::{Received, ReceivedHeaders};
#[cfg(feature = "postgres")]
pub use scope::PartitionCheckpoint;
pub use scope::Scope;

/// A consumer configuration whose offsets move only when the caller says:
/// no auto-commit, no automatic offset store, reading from the start of a
/// partition the group has never committed.
pub(crate) fn manual_commit_consumer(brokers: &str, group: &str) -> rdkafka::config::ClientConfig {
    let mut client = rdkafka::config::ClientConfig::new();
    client
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        // librdkafka pauses a partition's fetching for this long once its
        // local queue is full (default 1 s): a consumer a little slower
        // than the network, or one whose fetched messages wait (the
        // stage's read-back while the engine opens), would then starve for
        // a second at a time. Resume quickly instead.
        .set("fetch.queue.backoff.ms", "20");
    client
}

/// Completes on SIGINT or SIGTERM: pass it to [`DedupConsumer::run`] for
/// a graceful stop (marks made durable, offsets committed, then return).
/// If the signal handlers cannot be installed it completes at once, so a
/// misconfigured process stops instead of running without a way out.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "seen: cannot install SIGINT/SIGTERM handlers; stopping");
        }
    }
}
