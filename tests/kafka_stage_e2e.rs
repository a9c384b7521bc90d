//! `seen kafka` end to end against a real broker process (Tansu, on
//! loopback): the stage is SIGKILLed at random moments several times and
//! restarted; afterwards an independent consumer reads the output topic and
//! finds every distinct input id exactly once, and no other message.
//!
//! Two inputs: events with an `idempotency_key` header (duplicates right
//! after the original, hundreds of thousands of messages later, and on
//! another partition), and Debezium change events (`--id debezium`; a
//! snapshot whose rows share one source position, then streamed changes;
//! half in the `schema`/`payload` envelope, half bare).
//!
//! `SEEN_STAGE_E2E_EVENTS` sets the distinct ids of the header run
//! (default 800 000, so 1M messages with the duplicates).

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

const PARTITIONS: i32 = 4;
const KILLS: usize = 4;

fn main() {
    let tansu = common::Tansu::start();
    let distinct: usize = std::env::var("SEEN_STAGE_E2E_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(800_000);
    header_ids(tansu, distinct);
    let tansu = common::Tansu::start();
    debezium_ids(tansu, 200_000);
    println!("2 passed, 0 failed");
}

/// One input message.
struct In {
    partition: i32,
    key: String,
    payload: String,
    id: Option<String>,
    timestamp: i64,
}

/// One output message, as an independent consumer reads it.
#[derive(Debug)]
struct Out {
    id: String,
    key: String,
    payload: String,
    origin: Option<String>,
    timestamp: Option<i64>,
}

fn header_ids(mut tansu: common::Tansu, distinct: usize) {
    let started = Instant::now();
    tansu.create_topic("raw", PARTITIONS);
    tansu.create_topic("clean", PARTITIONS);
    // Every id once, in order, on partition n % 4; a quarter again: a
    // third right after the original, a third `distinct / 2` messages
    // later (hundreds of thousands at the default size), a third a
    // thousand messages later on the next partition.
    let mut order: Vec<(u64, usize, i32)> = (0..distinct)
        .map(|n| (4 * n as u64, n, (n % PARTITIONS as usize) as i32))
        .collect();
    for k in 0..distinct / 4 {
        let n = (k * 7919) % distinct;
        let (at, partition) = match k % 3 {
            0 => (n, n % 4),
            1 => (n + distinct / 2, n % 4),
            _ => (n + 1000, (n + 1) % 4),
        };
        order.push((4 * at as u64 + 1, n, partition as i32));
    }
    order.sort_unstable();
    let input: Vec<In> = order
        .iter()
        .map(|&(_, n, partition)| In {
            partition,
            key: format!("k-{n}"),
            payload: format!("payload of e-{n}"),
            id: Some(format!("e-{n}")),
            timestamp: 1_700_000_000_000 + n as i64,
        })
        .collect();
    produce(&tansu.brokers, "raw", &input);
    let produced = started.elapsed();

    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    run_with_kills(&mut tansu, &state, "raw", "clean", "header", distinct);

    let out = read_all(&tansu.brokers, "clean");
    let mut seen = HashSet::new();
    for m in &out {
        let n: usize =
            m.id.strip_prefix("e-")
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("an output message with an id never sent: {m:?}"));
        assert!(n < distinct, "{m:?}");
        assert!(seen.insert(n), "{} appears twice in the output", m.id);
        // Key, value, headers and timestamp kept.
        assert_eq!(m.key, format!("k-{n}"));
        assert_eq!(m.payload, format!("payload of e-{n}"));
        assert_eq!(m.origin.as_deref(), Some("test"), "{m:?}");
        assert_eq!(m.timestamp, Some(1_700_000_000_000 + n as i64));
    }
    assert_eq!(seen.len(), distinct, "every distinct id in the output");
    println!(
        "header ids: {} messages ({distinct} distinct) produced in {:.1} s; {KILLS} SIGKILLs; output holds each id once; {:.1} s",
        input.len(),
        produced.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

fn debezium_ids(mut tansu: common::Tansu, changes: usize) {
    let started = Instant::now();
    tansu.create_topic("cdc", PARTITIONS);
    tansu.create_topic("cdc-clean", PARTITIONS);
    // A snapshot of 2 000 rows over two tables, all at one source position,
    // then streamed changes, one transaction per 4 changes.
    let snapshot = 2000;
    let mut changes_in: Vec<(String, String, i32)> = Vec::with_capacity(changes);
    for i in 0..changes {
        let table = ["orders", "customers"][i % 2];
        let row = i / 2;
        let (op, lsn, tx) = if i < snapshot {
            ("r", 24_000_000, 5000)
        } else {
            ("u", 24_000_000 + 64 * i, 5000 + i / 4)
        };
        let key = format!(r#"{{"id":{row}}}"#);
        let bare = format!(
            r#"{{"before":null,"after":{{"id":{row},"n":{i}}},"source":{{"connector":"postgresql","db":"shop","schema":"public","table":"{table}","txId":{tx},"lsn":{lsn}}},"op":"{op}","ts_ms":{}}}"#,
            1_732_000_000_000u64 + i as u64
        );
        let payload = if i % 2 == 0 {
            format!(r#"{{"schema":{{"type":"struct","optional":false}},"payload":{bare}}}"#)
        } else {
            bare
        };
        // Rows of one table keep their partition, as Debezium keys them.
        let partition = (row % PARTITIONS as usize) as i32;
        changes_in.push((key, payload, partition));
    }
    let mut order: Vec<(u64, usize)> = (0..changes).map(|i| (4 * i as u64, i)).collect();
    for k in 0..changes / 4 {
        let i = (k * 7919) % changes;
        let at = if k % 2 == 0 { i } else { i + changes / 2 };
        order.push((4 * at as u64 + 1, i));
    }
    order.sort_unstable();
    let input: Vec<In> = order
        .iter()
        .map(|&(_, i)| In {
            partition: changes_in[i].2,
            key: changes_in[i].0.clone(),
            payload: changes_in[i].1.clone(),
            id: None,
            timestamp: 1_732_000_000_000 + i as i64,
        })
        .collect();
    produce(&tansu.brokers, "cdc", &input);

    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    run_with_kills(&mut tansu, &state, "cdc", "cdc-clean", "debezium", changes);

    let out = read_all(&tansu.brokers, "cdc-clean");
    let by_payload: HashMap<&str, usize> = changes_in
        .iter()
        .enumerate()
        .map(|(i, c)| (c.1.as_str(), i))
        .collect();
    let mut seen = HashSet::new();
    for m in &out {
        let i = *by_payload
            .get(m.payload.as_str())
            .unwrap_or_else(|| panic!("an output message never sent: {m:?}"));
        assert!(seen.insert(i), "change {i} appears twice in the output");
        assert_eq!(m.key, changes_in[i].0);
        assert!(!m.id.is_empty(), "the id is stamped: {m:?}");
    }
    assert_eq!(seen.len(), changes, "every distinct change in the output");
    println!(
        "debezium ids: {} messages ({changes} distinct changes, a {snapshot}-row snapshot at one position); {KILLS} SIGKILLs; output holds each change once; {:.1} s",
        input.len(),
        started.elapsed().as_secs_f64()
    );
}

fn produce(brokers: &str, topic: &str, input: &[In]) {
    let p: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "20")
        .set("message.timeout.ms", "60000")
        .create()
        .unwrap();
    for m in input {
        let mut headers = OwnedHeaders::new().insert(Header {
            key: "origin",
            value: Some("test"),
        });
        if let Some(id) = &m.id {
            headers = headers.insert(Header {
                key: "idempotency_key",
                value: Some(id.as_bytes()),
            });
        }
        let mut rec = BaseRecord::<str, str>::to(topic)
            .partition(m.partition)
            .key(&m.key)
            .payload(&m.payload)
            .timestamp(m.timestamp)
            .headers(headers);
        loop {
            match p.send(rec) {
                Ok(()) => break,
                Err((_, r)) => {
                    p.poll(Duration::from_millis(10));
                    rec = r;
                }
            }
        }
        p.poll(Duration::ZERO);
    }
    p.flush(Duration::from_secs(60)).unwrap();
}

fn stage(brokers: &str, state: &Path, input: &str, output: &str, id: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_seen"))
        .args(["kafka", "--brokers", brokers, "--group", "stage"])
        .args(["--input", input, "--output", output, "--id", id])
        .arg("--state")
        .arg(state)
        // A killed member leaves the group after its session times out.
        .args(["-X", "session.timeout.ms=6000"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// Run the stage, SIGKILL it `KILLS` times at random moments once it has
/// made progress, then run it until the output holds `expect` messages and
/// a quiet period follows, and stop it with SIGTERM (it must exit 0).
fn run_with_kills(
    tansu: &mut common::Tansu,
    state: &Path,
    input: &str,
    output: &str,
    id: &str,
    expect: usize,
) {
    let count = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicUsize::new(0));
    let counter = {
        let (count, stop) = (Arc::clone(&count), Arc::clone(&stop));
        let (brokers, output) = (tansu.brokers.clone(), output.to_owned());
        std::thread::spawn(move || {
            let c = reader(&brokers, &output, false);
            while stop.load(Relaxed) == 0 {
                if let Some(Ok(_)) = c.poll(Duration::from_millis(100)) {
                    count.fetch_add(1, Relaxed);
                }
            }
        })
    };
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    for round in 0..KILLS {
        tansu
            .children
            .push(stage(&tansu.brokers, state, input, output, id));
        // Progress first (some output, or all of it), then a random moment.
        let target = (count.load(Relaxed) + 2000).min(expect);
        let deadline = Instant::now() + Duration::from_secs(90);
        while count.load(Relaxed) < target {
            assert!(
                Instant::now() < deadline,
                "round {round}: the stage made no progress"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        if round == 0 {
            // A second stage on the same state directory is refused at once.
            let second = Command::new(env!("CARGO_BIN_EXE_seen"))
                .args(["kafka", "--brokers", &tansu.brokers, "--group", "stage"])
                .args(["--input", input, "--output", output, "--id", id])
                .arg("--state")
                .arg(state)
                .output()
                .unwrap();
            assert!(!second.status.success());
            let err = String::from_utf8_lossy(&second.stderr);
            assert!(
                err.contains("in use by another process"),
                "a clear error: {err}"
            );
        }
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_millis(rng % 800));
        let mut child = tansu.children.pop().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }
    tansu
        .children
        .push(stage(&tansu.brokers, state, input, output, id));
    let deadline = Instant::now() + Duration::from_secs(300);
    let (mut last, mut since) = (0, Instant::now());
    loop {
        let now = count.load(Relaxed);
        if now != last {
            (last, since) = (now, Instant::now());
        } else if now >= expect && since.elapsed() > Duration::from_secs(3) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the last stage run stalled at {now} of {expect} output messages"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let child = tansu.children.last_mut().unwrap();
    // SAFETY: signalling a child process this test started and still owns.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "SIGTERM did not stop the stage");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "the stage exits 0 on SIGTERM: {status:?}");
    tansu.children.pop();
    stop.store(1, Relaxed);
    counter.join().unwrap();
}

/// A consumer outside any group, assigned to every partition of `topic`
/// from its beginning.
fn reader(brokers: &str, topic: &str, eof: bool) -> BaseConsumer {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "independent-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", if eof { "true" } else { "false" })
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    drop(tpl);
    c
}

/// Every message of `topic`, read to the end of each partition.
fn read_all(brokers: &str, topic: &str) -> Vec<Out> {
    let c = reader(brokers, topic, true);
    let text = |b: Option<&[u8]>| String::from_utf8_lossy(b.unwrap_or_default()).into_owned();
    let mut open: HashSet<i32> = (0..PARTITIONS).collect();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !open.is_empty() {
        assert!(Instant::now() < deadline, "reading {topic} timed out");
        match c.poll(Duration::from_millis(100)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(p))) => {
                open.remove(&p);
            }
            Some(Err(e)) => panic!("reading {topic}: {e}"),
            Some(Ok(m)) => {
                let header = |name: &str| {
                    m.headers()
                        .and_then(|h| h.iter().find(|h| h.key == name).map(|h| text(h.value)))
                };
                out.push(Out {
                    id: header("idempotency_key").unwrap_or_default(),
                    origin: header("origin"),
                    key: text(m.key()),
                    payload: text(m.payload()),
                    timestamp: m.timestamp().to_millis(),
                });
            }
        }
    }
    out
}
