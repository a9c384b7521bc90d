//! A CDC consumer that applies each change event to a sink exactly once per
//! id: here the sink is a file, one line per applied event.
//!
//! ```sh
//! cargo run --release --features kafka --example cdc_consumer -- \
//!     --brokers 127.0.0.1:9092 --topic dbserver1.inventory.customers \
//!     --group cdc-sink --state ./cdc-state --out ./applied.tsv --id debezium
//! ```
//!
//! Marks go to `--state` with `Durability::None`: the loop syncs them
//! before every offset commit, which is what the guarantee needs. SIGINT or
//! SIGTERM stop it cleanly (marks durable, offsets committed). Killed with
//! SIGKILL, it redelivers from the last commit on restart, and applies only
//! the events whose marks did not reach the disk.

use std::io::Write;
use std::sync::{Arc, Mutex};

use rdkafka::message::Message;
use seen::guard::IdempotencyGuard;
use seen::kafka::{DedupConsumer, DedupConsumerConfig};
use seen::{Durability, Engine};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let need = |name: &str| arg(&args, name).ok_or_else(|| format!("missing {name}"));
    let (brokers, topic, group) = (need("--brokers")?, need("--topic")?, need("--group")?);
    let (state, out) = (need("--state")?, need("--out")?);

    let engine = Engine::builder()
        .durability(Durability::None)
        .open(&state)?;
    let mut config = DedupConsumerConfig::new(brokers, group, &[&topic]);
    if let Some(ids) = arg(&args, "--id") {
        config.ids = ids.parse()?;
    }
    config.properties = vec![("session.timeout.ms".into(), "6000".into())];
    let consumer = DedupConsumer::new(config, Arc::new(IdempotencyGuard::new(Arc::new(engine))))?;

    let sink = Arc::new(Mutex::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&out)?,
    ));
    consumer
        .run(
            |msg| {
                let sink = Arc::clone(&sink);
                async move {
                    // "Apply" the change: one line per event, written before
                    // the handler returns (and so before its mark).
                    let payload =
                        String::from_utf8_lossy(msg.payload().unwrap_or_default()).into_owned();
                    let line = format!(
                        "{}\t{}\t{}\n",
                        payload.replace(['\t', '\n'], " "),
                        msg.partition(),
                        msg.offset()
                    );
                    sink.lock()
                        .map_err(|_| std::io::Error::other("sink lock poisoned"))?
                        .write_all(line.as_bytes())
                }
            },
            seen::kafka::shutdown_signal(),
        )
        .await?;
    let s = consumer.stats();
    eprintln!(
        "cdc_consumer: handled {}, duplicates {}, invalid {}",
        s.handled.load(std::sync::atomic::Ordering::Relaxed),
        s.duplicates.load(std::sync::atomic::Ordering::Relaxed),
        s.invalid.load(std::sync::atomic::Ordering::Relaxed)
    );
    Ok(())
}
