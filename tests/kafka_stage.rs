//! The Kafka → Kafka dedup stage against librdkafka's mock cluster: the
//! output holds each id once, and the read-back on restart closes the
//! "produced but not yet marked" window a kill -9 leaves.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use seen::kafka::stage::{self, StageConfig};
use seen::stage::{OnInvalid, Summary};
use seen::{Durability, Engine};

fn produce(brokers: &str, topic: &str, ids: &[String]) {
    let p: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    for (i, id) in ids.iter().enumerate() {
        let payload = format!("payload of {id}");
        let rec = BaseRecord::<str, str>::to(topic)
            .key(id)
            .payload(&payload)
            .partition((i % 2) as i32)
            .headers(OwnedHeaders::new().insert(Header {
                key: "idempotency_key",
                value: Some(id.as_bytes()),
            }));
        p.send(rec).map_err(|(e, _)| e).unwrap();
    }
    p.flush(Duration::from_secs(10)).unwrap();
}

/// Every message of `topic`: (idempotency_key header, payload).
fn read_topic(brokers: &str, topic: &str, expect: usize) -> Vec<(String, String)> {
    let c = common::reader_from_start(brokers, topic, 2);
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    // Read until `expect` and then a quiet second (nothing more comes).
    let mut quiet_since = Instant::now();
    while Instant::now() < deadline {
        match c.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let id = seen::kafka::header(&m, "idempotency_key")
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default();
                let payload = String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned();
                out.push((id, payload));
                quiet_since = Instant::now();
            }
            _ if out.len() >= expect && quiet_since.elapsed() > Duration::from_secs(1) => break,
            _ => {}
        }
    }
    out
}

/// Run the stage until the output holds `until` messages, then stop it.
fn run_stage(brokers: &str, state: &Path, until: usize) -> (Summary, u64) {
    let engine = Engine::builder()
        .durability(Durability::Sync)
        .open(state.join("marks"))
        .unwrap();
    let mut config = StageConfig::new(brokers, "stage", &["in"], "out");
    config.consumer_properties = vec![("session.timeout.ms".into(), "6000".into())];
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (stop, brokers) = (Arc::clone(&stop), brokers.to_owned());
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline && high_water(&brokers, "out") < until as i64 {
                std::thread::sleep(Duration::from_millis(50));
            }
            std::thread::sleep(Duration::from_millis(300));
            stop.store(true, Relaxed);
        })
    };
    let mut summary = Summary::default();
    let read = stage::run(
        &config,
        &engine,
        state,
        OnInvalid::Skip,
        64,
        stop,
        &mut summary,
    )
    .unwrap();
    watcher.join().unwrap();
    (summary, read)
}

fn high_water(brokers: &str, topic: &str) -> i64 {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    (0..2)
        .map(|p| {
            c.fetch_watermarks(topic, p, Duration::from_secs(5))
                .map(|w| w.1)
                .unwrap_or(0)
        })
        .sum()
}

#[test]
fn the_output_holds_each_id_once_across_a_crash_window() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("in", 2, 1).unwrap();
    cluster.create_topic("out", 2, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    // 160 ids, 40 of them again (adjacent and far apart, both partitions).
    let mut ids: Vec<String> = (0..160).map(|i| format!("e-{i}")).collect();
    for i in 0..40 {
        ids.insert((i * 4 + 1).min(ids.len()), format!("e-{}", i * 3));
    }
    produce(&brokers, "in", &ids);
    let state = tempfile::tempdir().unwrap();
    let (summary, read) = run_stage(&brokers, state.path(), 160);
    assert_eq!(read, 0, "nothing to read back on a fresh state");
    assert_eq!(
        (summary.read, summary.new, summary.duplicate),
        (200, 160, 40)
    );
    let out = read_topic(&brokers, "out", 160);
    let mut count: HashMap<&str, u32> = HashMap::new();
    for (id, payload) in &out {
        *count.entry(id.as_str()).or_default() += 1;
        assert_eq!(payload, &format!("payload of {id}"), "payload kept");
    }
    assert_eq!(count.len(), 160);
    assert!(count.values().all(|&n| n == 1), "each id once");

    // A crash after producing x-0..4 but before marking them: they are in
    // the output, the marks do not know them, and their inputs come again.
    let crashed: Vec<String> = (0..5).map(|i| format!("x-{i}")).collect();
    produce(&brokers, "out", &crashed);
    let again: Vec<String> = (0..10).map(|i| format!("x-{i}")).collect();
    produce(&brokers, "in", &again);
    let (summary, read) = run_stage(&brokers, state.path(), 170);
    assert!(read >= 5, "the unrecorded output was read back ({read})");
    assert_eq!((summary.new, summary.duplicate), (5, 5));
    let out = read_topic(&brokers, "out", 170);
    let mut count: HashMap<&str, u32> = HashMap::new();
    for (id, _) in &out {
        *count.entry(id.as_str()).or_default() += 1;
    }
    assert_eq!(count.len(), 170);
    assert!(count.values().all(|&n| n == 1), "each id once: {count:?}");
}
