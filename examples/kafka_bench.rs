//! The dedup consumer loop against a plain rdkafka consume-and-commit loop,
//! same broker, same topic, same consumer settings, in one run:
//!
//! ```sh
//! target/tools/tansu broker --listener-url tcp://127.0.0.1:19092 \
//!     --advertised-listener-url tcp://127.0.0.1:19092 --storage-engine memory://tansu/ &
//! cargo run --release --features kafka --example kafka_bench -- 127.0.0.1:19092 1000000
//! ```
//!
//! Produces N messages (25 % duplicate ids: half of them adjacent, half far
//! apart) over 8 partitions, then consumes them all with each loop in turn
//! (plain, dedup, plain, dedup, …), a fresh group each time. The dedup loop
//! runs a no-op handler on an engine with `Durability::None` in a scratch
//! state directory; both commit every second.
//!
//! Each message carries its id both in the `idempotency_key` header (what
//! the dedup loop reads by default) and as its key: `SEEN_BENCH_IDS=key`
//! (any `IdStrategy` string) makes the dedup loop read the key instead.
//! `SEEN_BENCH_READ_ID=1` adds a third loop to each round, the plain loop
//! that also reads each message's id the same way and does nothing with
//! it: the cost of reading the id alone, which no dedup can avoid.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use seen::guard::IdempotencyGuard;
use seen::kafka::{DedupConsumer, DedupConsumerConfig, IdStrategy};
use seen::{Durability, Engine};

const PARTITIONS: i32 = 8;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let brokers = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "127.0.0.1:19092".into());
    let n: u64 = args
        .get(2)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let rounds: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(2);
    let topic = format!("bench-{}", std::process::id());

    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()?;
    let created = admin
        .create_topics(
            &[NewTopic::new(
                &topic,
                PARTITIONS,
                TopicReplication::Fixed(1),
            )],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await?;
    for r in created {
        r.map_err(|(t, e)| format!("creating {t}: {e}"))?;
    }
    let started = Instant::now();
    produce(&brokers, &topic, n).await?;
    eprintln!(
        "produced {n} messages in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let (mut plain, mut dedup) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let only_dedup = std::env::var_os("SEEN_BENCH_ONLY_DEDUP").is_some();
        let p = if only_dedup {
            1.0
        } else {
            plain_loop(&brokers, &topic, n, &format!("plain-{round}")).await?
        };
        let d = if std::env::var_os("SEEN_BENCH_ONLY_PLAIN").is_some() {
            1.0
        } else {
            dedup_loop(&brokers, &topic, n, &format!("dedup-{round}")).await?
        };
        if let Some(ids) = read_id() {
            // The plain loop that also reads each id the dedup loop reads
            // (and nothing else): what reading the id alone costs.
            let group = format!("plain-id-{round}");
            let r = plain_loop_reading(&brokers, &topic, n, &group, Some(&ids)).await?;
            eprintln!("round {round}: plain reading the id {r:.0} msg/s");
        }
        if std::env::var_os("SEEN_BENCH_SKELETON").is_some() {
            let s = skeleton_loop(&brokers, &topic, n, &format!("skel-{round}")).await?;
            eprintln!("round {round}: skeleton {s:.0} msg/s");
        }
        eprintln!("round {round}: plain {:.0} msg/s, dedup {:.0} msg/s", p, d);
        plain.push(p);
        dedup.push(d);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let (p, d) = (median(&mut plain), median(&mut dedup));
    println!(
        "kafka loop, {n} messages, {PARTITIONS} partitions, 25 % duplicates: plain {p:.0} msg/s, dedup {d:.0} msg/s, dedup/plain {:.2} (medians of {rounds})",
        d / p
    );
    Ok(())
}

async fn produce(brokers: &str, topic: &str, n: u64) -> Result<(), Box<dyn std::error::Error>> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    let payload = vec![b'x'; 100];
    let mut pending = Vec::with_capacity(10_000);
    for k in 0..n {
        // Every 4th message repeats an earlier id: adjacent or far back.
        let id = if k % 4 == 3 {
            if k % 8 == 3 {
                k - 1
            } else {
                (k * 7919) % (k - k / 4).max(1)
            }
        } else {
            k
        };
        let id = format!("evt-{id}");
        let record = FutureRecord::<str, [u8]>::to(topic)
            .payload(&payload)
            .key(id.as_str())
            .partition((k % PARTITIONS as u64) as i32)
            .headers(OwnedHeaders::new().insert(Header {
                key: "idempotency_key",
                value: Some(id.as_bytes()),
            }));
        pending.push(producer.send_result(record).map_err(|(e, _)| e)?);
        if pending.len() == 10_000 {
            for f in pending.drain(..) {
                f.await?.map_err(|(e, _)| e)?;
            }
        }
    }
    for f in pending {
        f.await?.map_err(|(e, _)| e)?;
    }
    Ok(())
}

fn consumer_config(brokers: &str, group: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        // What DedupConsumer sets too: same fetch behaviour in both loops.
        .set("fetch.queue.backoff.ms", "20");
    for (k, v) in extra_properties() {
        c.set(k, v);
    }
    c
}

/// The plain loop in the dedup loop's shape (select on a shutdown future,
/// a timeout per recv, a detached copy): what the shape alone costs.
async fn skeleton_loop(
    brokers: &str,
    topic: &str,
    n: u64,
    group: &str,
) -> Result<f64, Box<dyn std::error::Error>> {
    let guard = match std::env::var_os("SEEN_BENCH_SKELETON_GUARD") {
        Some(_) => {
            let dir = tempfile_dir(group)?;
            let engine = Engine::builder()
                .durability(Durability::None)
                .capacity(n as usize)
                .open(&dir)?;
            Some(IdempotencyGuard::new(Arc::new(engine)))
        }
        None => None,
    };
    let consumer: StreamConsumer = consumer_config(brokers, group).create()?;
    consumer.subscribe(&[topic])?;
    let first = consumer.recv().await?;
    let started = Instant::now();
    drop(first);
    let shutdown = std::future::pending::<()>();
    tokio::pin!(shutdown);
    let mut got = 1;
    while got < n {
        let r = tokio::select! {
            _ = &mut shutdown => break,
            r = tokio::time::timeout(Duration::from_secs(1), consumer.recv()) => r,
        };
        if let Ok(Ok(m)) = r {
            let owned = m.detach();
            drop(m);
            if let Some(g) = &guard {
                let id = seen::kafka::header(&owned, "idempotency_key").unwrap_or_default();
                let _ = g.process_if_new(id, async { Ok::<_, ()>(()) }).await?;
            }
            consumer.store_offset(owned.topic(), owned.partition(), owned.offset())?;
            got += 1;
        }
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// recv → store the offset → commit every second: what the dedup loop
/// does, minus the dedup.
async fn plain_loop(
    brokers: &str,
    topic: &str,
    n: u64,
    group: &str,
) -> Result<f64, Box<dyn std::error::Error>> {
    plain_loop_reading(brokers, topic, n, group, None).await
}

/// The id strategy the dedup loop uses (`SEEN_BENCH_IDS`, default the
/// `idempotency_key` header), when `SEEN_BENCH_READ_ID` asks for the
/// plain loop that reads it too.
fn read_id() -> Option<IdStrategy> {
    std::env::var_os("SEEN_BENCH_READ_ID")?;
    Some(match std::env::var("SEEN_BENCH_IDS") {
        Ok(ids) => ids.parse().ok()?,
        Err(_) => IdStrategy::default(),
    })
}

/// [`plain_loop`], reading each message's id with `ids` if given.
async fn plain_loop_reading(
    brokers: &str,
    topic: &str,
    n: u64,
    group: &str,
    ids: Option<&IdStrategy>,
) -> Result<f64, Box<dyn std::error::Error>> {
    let consumer: StreamConsumer = consumer_config(brokers, group).create()?;
    consumer.subscribe(&[topic])?;
    let first = consumer.recv().await?;
    let started = Instant::now();
    consumer.store_offset(first.topic(), first.partition(), first.offset())?;
    drop(first);
    let mut last_commit = Instant::now();
    for _ in 1..n {
        let m = consumer.recv().await?;
        if let Some(ids) = ids {
            std::hint::black_box(ids.id_of(&m).ok());
        }
        consumer.store_offset(m.topic(), m.partition(), m.offset())?;
        if last_commit.elapsed() >= Duration::from_secs(1) {
            let _ = consumer.commit_consumer_state(CommitMode::Sync);
            last_commit = Instant::now();
        }
    }
    let _ = consumer.commit_consumer_state(CommitMode::Sync);
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

async fn dedup_loop(
    brokers: &str,
    topic: &str,
    n: u64,
    group: &str,
) -> Result<f64, Box<dyn std::error::Error>> {
    let dir = tempfile_dir(group)?;
    let engine = Engine::builder()
        .durability(Durability::None)
        .capacity(n as usize)
        .open(&dir)?;
    let mut config = DedupConsumerConfig::new(brokers, group, &[topic]);
    config.properties = vec![("session.timeout.ms".into(), "6000".into())];
    config.properties.extend(extra_properties());
    // `SEEN_BENCH_IDS=key` reads each id from the message key instead of
    // the `idempotency_key` header (the producer sets both).
    if let Ok(ids) = std::env::var("SEEN_BENCH_IDS") {
        config.ids = ids.parse()?;
    }
    let consumer = DedupConsumer::new(config, Arc::new(IdempotencyGuard::new(Arc::new(engine))))?;
    let stats = consumer.stats();
    // Time from the first message handled to the last one done, like the
    // plain loop. The end is polled every 2 ms (at most 0.3 % of a pass,
    // against the dedup loop); polling more often costs the loop itself a
    // wake-up each time.
    let first = std::sync::OnceLock::new();
    let finished = async {
        while stats.done.load(Relaxed) < n {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Instant::now()
    };
    let ended = std::sync::OnceLock::new();
    consumer
        .run(
            |_msg| {
                first.get_or_init(Instant::now);
                async { Ok::<_, std::io::Error>(()) }
            },
            async {
                let _ = ended.set(finished.await);
            },
        )
        .await?;
    let handled = stats.handled.load(Relaxed);
    let dups = stats.duplicates.load(Relaxed);
    assert_eq!(handled + dups, n, "every message handled or skipped");
    let _ = std::fs::remove_dir_all(&dir);
    let secs = match (first.get(), ended.get()) {
        (Some(a), Some(b)) => b.duration_since(*a).as_secs_f64(),
        _ => return Err("the dedup pass did not finish".into()),
    };
    Ok((n - 1) as f64 / secs)
}

fn tempfile_dir(group: &str) -> std::io::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("seen-kafka-bench-{}-{group}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Extra consumer properties for both loops, from `SEEN_BENCH_X` as
/// `key=value,key=value` (the same for both, so the comparison stays fair).
fn extra_properties() -> Vec<(String, String)> {
    std::env::var("SEEN_BENCH_X")
        .unwrap_or_default()
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}
