//! `seen kafka`'s stage against a plain consume → produce pass-through,
//! same broker, same input, identical producer settings, in one run; then
//! how long a restart after a kill takes on a 10M-id state.
//!
//! ```sh
//! target/tools/tansu broker --listener-url tcp://127.0.0.1:19092 \
//!     --advertised-listener-url tcp://127.0.0.1:19092 --storage-engine memory://tansu/ &
//! cargo run --release --features kafka --example stage_bench -- 127.0.0.1:19092 1000000 3
//! ```
//!
//! Produces N messages (25 % duplicate ids, half adjacent, half far apart)
//! over 8 partitions, then copies them to a fresh output topic with each
//! pass in turn (plain, stage, plain, stage, …), a fresh group each time.
//! Both passes use the same `KafkaSink` settings (idempotent, acks=all,
//! 5 ms linger, partition kept) and the same consumer settings, and both
//! flush and commit offsets every 1000 messages; the stage also decides
//! and logs each id, and every `record_positions_every` makes the marks durable and
//! records the output positions. Throughput counts input messages per second from the
//! first message read to the last (the group join is left out).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use seen::kafka::sink::{KafkaSink, Record, SinkConfig};
use seen::kafka::stage::{self, StageConfig, StageStats};
use seen::stage::Summary;
use seen::Engine;

const PARTITIONS: i32 = 8;
const BATCH: usize = 1000;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() -> Result<()> {
    if std::env::var_os("SEEN_BENCH_FILL").is_some() {
        return fill_state();
    }
    let args: Vec<String> = std::env::args().collect();
    let brokers = args.get(1).cloned().unwrap_or("127.0.0.1:19092".into());
    let n: usize = args
        .get(2)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let rounds: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(3);
    let tag = std::process::id();
    let input = format!("stage-bench-in-{tag}");
    let mut topics = vec![input.clone()];
    for r in 0..rounds {
        topics.push(format!("stage-bench-plain-{tag}-{r}"));
        topics.push(format!("stage-bench-seen-{tag}-{r}"));
    }
    create_topics(&brokers, &topics)?;
    produce(&brokers, &input, n)?;
    println!("{n} messages (25 % duplicate ids) on {PARTITIONS} partitions");

    let (mut plain, mut seen) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        let rate = pass_through(&brokers, &input, &format!("stage-bench-plain-{tag}-{r}"), n)?;
        println!("round {r}: plain pass-through {:.0} msg/s", rate);
        plain.push(rate);
        let rate = dedup_stage(&brokers, &input, &format!("stage-bench-seen-{tag}-{r}"), n)?;
        println!("round {r}: seen kafka stage   {:.0} msg/s", rate);
        seen.push(rate);
    }
    let (p, s) = (median(&mut plain), median(&mut seen));
    println!(
        "median: plain {:.0} msg/s, stage {:.0} msg/s, stage/plain {:.2}",
        p,
        s,
        s / p
    );
    // The worst case for a restart: killed just before the stage recorded
    // its output positions, so a whole interval of output at the measured
    // rate is read back.
    let every = StageConfig::new(&brokers, "g", &["i"], "o").record_positions_every;
    let output = format!("stage-bench-restart-{tag}");
    create_topics(&brokers, std::slice::from_ref(&output))?;
    produce(&brokers, &output, (s * every.as_secs_f64()) as usize)?;
    let mut restarts = Vec::new();
    for _ in 0..rounds {
        restarts.push(restart_after_kill(&brokers, &output)?);
    }
    println!("median restart: {:.2} s", median(&mut restarts));
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn create_topics(brokers: &str, topics: &[String]) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|t| NewTopic::new(t, PARTITIONS, TopicReplication::Fixed(1)))
        .collect();
    for r in rt.block_on(admin.create_topics(
        &new,
        &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
    ))? {
        r.map_err(|(t, e)| format!("creating {t}: {e}"))?;
    }
    Ok(())
}

fn produce(brokers: &str, topic: &str, n: usize) -> Result<()> {
    let p: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "20")
        .create()?;
    let distinct = n * 4 / 5;
    let payload = [b'x'; 100];
    for i in 0..n {
        // Every fifth message repeats an id: adjacent or ~half the input back.
        let id = if i % 5 == 4 {
            let k = i / 5;
            if k % 2 == 0 {
                k * 4 + 3
            } else {
                (k * 7919) % distinct
            }
        } else {
            i / 5 * 4 + i % 5
        };
        let id = format!("id-{id}");
        let mut rec = BaseRecord::<str, [u8]>::to(topic)
            .partition((i % PARTITIONS as usize) as i32)
            .key(&id)
            .payload(&payload[..])
            .headers(OwnedHeaders::new().insert(Header {
                key: "idempotency_key",
                value: Some(id.as_bytes()),
            }));
        loop {
            match p.send(rec) {
                Ok(()) => break,
                Err((_, back)) => {
                    p.poll(Duration::from_millis(5));
                    rec = back;
                }
            }
        }
        p.poll(Duration::ZERO);
    }
    p.flush(Duration::from_secs(60))?;
    Ok(())
}

fn consumer_config(brokers: &str, group: &str) -> ClientConfig {
    // The same settings the stage's source uses.
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.queue.backoff.ms", "20")
        .set("session.timeout.ms", "6000");
    c
}

/// Consume, produce each message as is (headers, key, value, timestamp,
/// partition), flush and commit every `BATCH` messages.
fn pass_through(brokers: &str, input: &str, output: &str, n: usize) -> Result<f64> {
    let consumer: BaseConsumer = consumer_config(brokers, &format!("plain-{output}")).create()?;
    consumer.subscribe(&[input])?;
    let mut sink = KafkaSink::new(&SinkConfig::new(brokers, output))?;
    let mut pending: HashMap<i32, i64> = HashMap::new();
    let (mut read, mut in_batch) = (0usize, 0usize);
    let mut first = None;
    while read < n {
        let m = match consumer.poll(Duration::from_millis(if in_batch == 0 { 100 } else { 0 })) {
            Some(m) => m?,
            None if in_batch == 0 => continue,
            None => {
                close_batch(&consumer, &mut sink, input, &mut pending)?;
                in_batch = 0;
                continue;
            }
        };
        first.get_or_insert_with(Instant::now);
        read += 1;
        in_batch += 1;
        pending.insert(m.partition(), m.offset() + 1);
        let mut headers = OwnedHeaders::new();
        if let Some(h) = m.headers() {
            for header in h.iter() {
                headers = headers.insert(Header {
                    key: header.key,
                    value: header.value,
                });
            }
        }
        sink.send(Record {
            topic: None,
            key: m.key(),
            payload: m.payload(),
            headers: Some(headers),
            timestamp: m.timestamp().to_millis(),
            source_partition: Some(m.partition()),
        })?;
        if in_batch == BATCH {
            close_batch(&consumer, &mut sink, input, &mut pending)?;
            in_batch = 0;
        }
    }
    close_batch(&consumer, &mut sink, input, &mut pending)?;
    Ok(n as f64 / first.map_or(1e-9, |t| t.elapsed().as_secs_f64()))
}

fn close_batch(
    consumer: &BaseConsumer,
    sink: &mut KafkaSink,
    input: &str,
    pending: &mut HashMap<i32, i64>,
) -> Result<()> {
    sink.flush()?;
    if pending.is_empty() {
        return Ok(());
    }
    let mut tpl = TopicPartitionList::new();
    for (p, o) in pending.drain() {
        tpl.add_partition_offset(input, p, Offset::Offset(o))?;
    }
    consumer.commit(&tpl, CommitMode::Sync)?;
    Ok(())
}

fn dedup_stage(brokers: &str, input: &str, output: &str, n: usize) -> Result<f64> {
    let dir = tempfile::tempdir_in(".")?;
    // As `seen kafka` opens it: the stage syncs the marks itself before
    // it records output positions.
    let engine = Engine::builder()
        .capacity(n)
        .durability(seen::Durability::None)
        .open(dir.path().join("marks"))?;
    let mut config = StageConfig::new(brokers, &format!("seen-{output}"), &[input], output);
    config.consumer_properties = vec![("session.timeout.ms".into(), "6000".into())];
    config.batch = BATCH;
    let stats = Arc::new(StageStats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let watch = {
        let (stats, stop) = (Arc::clone(&stats), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut first = None;
            loop {
                let read = stats.read.load(Relaxed) as usize;
                if read > 0 {
                    first.get_or_insert_with(Instant::now);
                }
                // Every message read, and its batch committed.
                if read >= n && stats.batches.load(Relaxed) * BATCH as u64 >= n as u64 {
                    stop.store(true, Relaxed);
                    return first.map_or(1e-9, |t: Instant| t.elapsed().as_secs_f64());
                }
                std::thread::sleep(Duration::from_micros(500));
            }
        })
    };
    stage::run(
        &config,
        &engine,
        dir.path(),
        stop,
        &stats,
        &mut Summary::default(),
    )?;
    let secs = watch.join().map_err(|_| "watcher panicked")?;
    Ok(n as f64 / secs)
}

/// A child process marks 10M ids (durably) and is SIGKILLed; then time
/// what a restarted stage does before it consumes: open the state
/// (replay) and read back `output` (no position recorded: all of it, none
/// of it marked yet). Returns the seconds taken.
fn restart_after_kill(brokers: &str, output: &str) -> Result<f64> {
    let dir = tempfile::tempdir_in(".")?;
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .env("SEEN_BENCH_FILL", dir.path().join("marks"))
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().ok_or("no stdout")?),
        &mut line,
    )?;
    child.kill()?;
    child.wait()?;
    let started = Instant::now();
    let config = StageConfig::new(brokers, "restart", &["unused"], output);
    // As `seen kafka` does it: the read-back connects and fetches while
    // the engine opens (with the durability the stage gives it).
    let (engine, read_back) = std::thread::scope(|scope| {
        let read_back = scope.spawn(|| stage::ReadBack::start(&config, dir.path()));
        let engine = Engine::builder()
            .durability(seen::Durability::None)
            .open(dir.path().join("marks"));
        (engine, read_back.join())
    });
    let engine = engine?;
    let opened = started.elapsed();
    let read_back = read_back
        .map_err(|_| "read-back thread panicked")?
        .map_err(|e| e.to_string())?;
    let read = read_back.finish(&engine).map_err(|e| e.to_string())?;
    println!(
        "restart after SIGKILL with {} ids: open (replay) {:.2} s, then read-back {:.2} s ({read} messages), total {:.2} s",
        engine.len(),
        opened.as_secs_f64(),
        (started.elapsed() - opened).as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    Ok(started.elapsed().as_secs_f64())
}

fn fill_state() -> Result<()> {
    let dir = std::env::var("SEEN_BENCH_FILL")?;
    let engine = Engine::builder().capacity(10_000_000).open(dir)?;
    let mut ids = Vec::with_capacity(10_000);
    for chunk in 0..1000 {
        ids.clear();
        ids.extend((0..10_000).map(|i| format!("id-{chunk}-{i}")));
        engine.check_and_insert_batch(&ids)?;
    }
    println!("ready");
    // Killed here, without a clean close.
    std::thread::sleep(Duration::from_secs(600));
    Ok(())
}
