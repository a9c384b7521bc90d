//! End to end against a real broker process (Tansu, on loopback): a dedup
//! consumer process is SIGKILLed mid-stream several times and restarted.
//! Afterwards every distinct id was handled at least once, and no id was
//! handled again after its offset had been committed.
//!
//! The test binary is both the parent and (re-executed with
//! `SEEN_E2E_CHILD` set) the consumer it kills. The broker binary comes
//! from `SEEN_TANSU`, or `target/tools/tansu` where `.ci/run` puts it.

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use seen::guard::IdempotencyGuard;
use seen::kafka::{DedupConsumer, DedupConsumerConfig};
use seen::{Durability, Engine};

mod common;

const TOPIC: &str = "e2e";
const PARTITIONS: i32 = 4;
const GROUP: &str = "e2e-group";
const DISTINCT: u64 = 6000;

fn main() {
    if std::env::var_os("SEEN_E2E_CHILD").is_some() {
        child();
        return;
    }
    parent();
    println!("1 passed, 0 failed");
}

fn parent() {
    let started = Instant::now();
    let mut tansu = common::Tansu::start();
    tansu.create_topic(TOPIC, PARTITIONS);
    let brokers = tansu.brokers.clone();
    let sent = produce(&brokers);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let out = dir.path().join("applied.tsv");
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    // (lines of output before the kill, committed offsets after it)
    let mut kills: Vec<(usize, Vec<i64>)> = Vec::new();
    for round in 0..3 {
        tansu
            .children
            .push(spawn_child(&brokers, &state, &out, false));
        // Wait for it to make progress (a restart first waits for the
        // group to drop the killed member), then kill it at a random moment.
        let before = lines(&out).len();
        let deadline = Instant::now() + Duration::from_secs(60);
        while lines(&out).len() < before + 100 {
            assert!(
                Instant::now() < deadline,
                "round {round}: the consumer made no progress"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_millis(rng % 700));
        let mut child = tansu.children.pop().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        kills.push((lines(&out).len(), committed(&brokers)));
    }
    // The last run goes to the end of the input and stops when idle.
    tansu
        .children
        .push(spawn_child(&brokers, &state, &out, true));
    let deadline = Instant::now() + Duration::from_secs(120);
    let last = tansu.children.last_mut().unwrap();
    while last.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the final consumer did not finish"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(last.wait().unwrap().success());

    let applied = lines(&out);
    let ids: HashSet<&str> = applied.iter().map(|l| l.0.as_str()).collect();
    assert_eq!(
        ids.len() as u64,
        DISTINCT,
        "every distinct id handled at least once"
    );
    assert!(
        ids.iter().all(|id| sent.contains(*id)),
        "no id that was never sent"
    );
    // An id handled at a committed position is never handled again later.
    for (at, committed) in &kills {
        let done: HashSet<&str> = applied[..*at]
            .iter()
            .filter(|(_, p, o)| *o < committed[*p as usize])
            .map(|(id, _, _)| id.as_str())
            .collect();
        for (id, p, o) in &applied[*at..] {
            assert!(
                !done.contains(id.as_str()),
                "{id} handled again at {p}/{o} after its first handling was committed"
            );
        }
    }
    let repeats = applied.len() - ids.len();
    println!(
        "kafka e2e: {} messages, {DISTINCT} distinct ids, 3 SIGKILLs, {repeats} re-handled inside uncommitted windows, none after a commit; {:.1} s",
        sent_total(),
        started.elapsed().as_secs_f64()
    );
}

/// Messages produced: every id once, a quarter again (adjacent, far apart,
/// on another partition).
fn sent_total() -> u64 {
    DISTINCT + DISTINCT / 4
}

fn produce(brokers: &str) -> HashSet<String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("message.timeout.ms", "20000")
            .set("linger.ms", "5")
            .create()
            .unwrap();
        let mut order: Vec<u64> = (0..DISTINCT).collect();
        for k in 0..DISTINCT / 4 {
            // Duplicates: some right after, some thousands of messages later.
            let at = if k % 2 == 0 {
                k as usize * 5
            } else {
                order.len()
            };
            order.insert(at.min(order.len()), (k * 7919) % DISTINCT);
        }
        let mut sent = HashSet::new();
        let mut pending = Vec::new();
        for (i, n) in order.iter().enumerate() {
            let id = format!("e-{n}");
            let record = FutureRecord::<str, str>::to(TOPIC)
                .payload(&id)
                .partition((i as i32 * 7) % PARTITIONS)
                .headers(OwnedHeaders::new().insert(Header {
                    key: "idempotency_key",
                    value: Some(id.as_bytes()),
                }));
            pending.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
            sent.insert(id);
            if pending.len() >= 500 {
                for f in pending.drain(..) {
                    f.await.unwrap().map_err(|(e, _)| e).unwrap();
                }
            }
        }
        for f in pending {
            f.await.unwrap().map_err(|(e, _)| e).unwrap();
        }
        sent
    })
}

fn committed(brokers: &str) -> Vec<i64> {
    common::committed(brokers, GROUP, TOPIC, PARTITIONS)
}

/// The applied lines: (id, partition, offset). A line torn by the kill
/// (no newline yet) is not counted: the handler had not returned.
fn lines(out: &Path) -> Vec<(String, i32, i64)> {
    let text = std::fs::read_to_string(out).unwrap_or_default();
    text.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .filter_map(|l| {
            let mut f = l.trim_end().split('\t');
            Some((
                f.next()?.to_owned(),
                f.next()?.parse().ok()?,
                f.next()?.parse().ok()?,
            ))
        })
        .collect()
}

fn spawn_child(brokers: &str, state: &Path, out: &Path, until_idle: bool) -> Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.env("SEEN_E2E_CHILD", "1")
        .env("SEEN_E2E_BROKERS", brokers)
        .env("SEEN_E2E_STATE", state)
        .env("SEEN_E2E_OUT", out)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if until_idle {
        cmd.env("SEEN_E2E_UNTIL_IDLE", "1");
    }
    cmd.spawn().unwrap()
}

/// The consumer under test: the `cdc_consumer` example's loop, applying
/// each message as a line `id\tpartition\toffset`.
fn child() {
    let var = |k: &str| std::env::var(k).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let engine = Engine::builder()
            .durability(Durability::None)
            .open(var("SEEN_E2E_STATE"))
            .unwrap();
        let mut config = DedupConsumerConfig::new(var("SEEN_E2E_BROKERS"), GROUP, &[TOPIC]);
        config.commit_interval = Duration::from_millis(200);
        config.properties = vec![("session.timeout.ms".into(), "6000".into())];
        let consumer =
            DedupConsumer::new(config, Arc::new(IdempotencyGuard::new(Arc::new(engine)))).unwrap();
        let sink = Arc::new(Mutex::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(var("SEEN_E2E_OUT"))
                .unwrap(),
        ));
        let until_idle = std::env::var_os("SEEN_E2E_UNTIL_IDLE").is_some();
        let stats = consumer.stats();
        let stop = async {
            if !until_idle {
                return std::future::pending::<()>().await;
            }
            // Stop after 4 s without a new message, once something came.
            let (mut last, mut since) = (0, Instant::now());
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let now = stats.done.load(std::sync::atomic::Ordering::Relaxed);
                if now != last {
                    (last, since) = (now, Instant::now());
                } else if since.elapsed() > Duration::from_secs(4)
                    && (last > 0 || since.elapsed() > Duration::from_secs(30))
                {
                    return;
                }
            }
        };
        consumer
            .run(
                |msg| {
                    let sink = Arc::clone(&sink);
                    async move {
                        // Some work per event, so the kills land mid-stream.
                        tokio::time::sleep(Duration::from_micros(500)).await;
                        let id =
                            String::from_utf8_lossy(msg.payload().unwrap_or_default()).into_owned();
                        let line = format!("{id}\t{}\t{}\n", msg.partition(), msg.offset());
                        let mut f = sink.lock().unwrap();
                        f.write_all(line.as_bytes())
                    }
                },
                stop,
            )
            .await
            .unwrap();
    });
}
