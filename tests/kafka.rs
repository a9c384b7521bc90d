//! The dedup consumer loop against librdkafka's in-process mock cluster:
//! a real client speaking the Kafka protocol to real (mock) brokers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use seen::guard::IdempotencyGuard;
use seen::kafka::{ConsumeError, DedupConsumer, DedupConsumerConfig, InvalidMessages};
use seen::{Durability, Engine};

const TOPIC: &str = "events";

async fn produce(brokers: &str, messages: &[(Option<&str>, &str)]) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("message.timeout.ms", "10000")
        .create()
        .unwrap();
    for (i, (id, payload)) in messages.iter().enumerate() {
        let mut record = FutureRecord::<str, str>::to(TOPIC)
            .payload(payload)
            .partition((i % 2) as i32);
        if let Some(id) = id {
            record = record.headers(OwnedHeaders::new().insert(Header {
                key: "idempotency_key",
                value: Some(id.as_bytes()),
            }));
        }
        producer
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
}

fn config(brokers: &str, group: &str) -> DedupConsumerConfig {
    let mut c = DedupConsumerConfig::new(brokers, group, &[TOPIC]);
    c.commit_interval = Duration::from_millis(100);
    c.retry_backoff = Duration::from_millis(5);
    c.properties = vec![("session.timeout.ms".into(), "6000".into())];
    c
}

/// Committed offsets of `group` on both partitions, as plain numbers (a
/// TopicPartitionList still alive when its consumer drops hangs the drop).
fn committed(brokers: &str, group: &str) -> Vec<i64> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(TOPIC, 0);
    tpl.add_partition(TOPIC, 1);
    let got = c.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    let offsets = got
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => o,
            _ => -1,
        })
        .collect();
    drop(got);
    offsets
}

type Seen = Arc<Mutex<HashMap<String, u32>>>;

/// Run the loop until `expect` messages were received (or 30 s passed).
async fn run_until(
    consumer: &DedupConsumer,
    seen: &Seen,
    expect: u64,
    fail_first: u32,
) -> Result<(), ConsumeError> {
    let stats = consumer.stats();
    let failures = Arc::new(Mutex::new(HashMap::<String, u32>::new()));
    let shutdown = async {
        for _ in 0..3000 {
            if stats.received.load(std::sync::atomic::Ordering::Relaxed) >= expect {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    consumer
        .run(
            |msg| {
                let seen = Arc::clone(seen);
                let failures = Arc::clone(&failures);
                async move {
                    let payload =
                        String::from_utf8_lossy(msg.payload().unwrap_or_default()).into_owned();
                    let mut f = failures.lock().unwrap();
                    let n = f.entry(payload.clone()).or_default();
                    if *n < fail_first {
                        *n += 1;
                        return Err(format!("transient failure {n} of {payload}"));
                    }
                    *seen.lock().unwrap().entry(payload).or_default() += 1;
                    Ok(())
                }
            },
            shutdown,
        )
        .await
}

fn engine(dir: &std::path::Path) -> Arc<IdempotencyGuard> {
    let e = Engine::builder()
        .durability(Durability::None)
        .open(dir)
        .unwrap();
    Arc::new(IdempotencyGuard::new(Arc::new(e)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_id_is_handled_once_and_a_restart_resumes_after_the_commit() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic(TOPIC, 2, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    // 40 distinct ids; duplicates adjacent, far apart and on the other partition.
    let mut msgs: Vec<(Option<String>, String)> = Vec::new();
    for i in 0..40 {
        msgs.push((Some(format!("id-{i}")), format!("id-{i}")));
        if i % 4 == 0 {
            msgs.push((Some(format!("id-{i}")), format!("id-{i}")));
        }
    }
    for i in 0..10 {
        msgs.push((Some(format!("id-{i}")), format!("id-{i}")));
    }
    let refs: Vec<(Option<&str>, &str)> = msgs
        .iter()
        .map(|(a, b)| (a.as_deref(), b.as_str()))
        .collect();
    produce(&brokers, &refs).await;

    let dir = tempfile::tempdir().unwrap();
    let seen: Seen = Arc::default();
    {
        let consumer = DedupConsumer::new(config(&brokers, "g1"), engine(dir.path())).unwrap();
        run_until(&consumer, &seen, msgs.len() as u64, 1)
            .await
            .unwrap();
        let s = consumer.stats();
        assert_eq!(s.handled.load(std::sync::atomic::Ordering::Relaxed), 40);
        assert_eq!(
            s.duplicates.load(std::sync::atomic::Ordering::Relaxed),
            msgs.len() as u64 - 40
        );
        // Every message failed once and was retried.
        assert_eq!(s.failed.load(std::sync::atomic::Ordering::Relaxed), 40);
    }
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 40);
        assert!(seen.values().all(|&n| n == 1), "{seen:?}");
    }
    // Offsets committed up to the end of both partitions.
    let c = committed(&brokers, "g1");
    assert_eq!(c.iter().sum::<i64>(), msgs.len() as i64, "{c:?}");

    // New messages, some repeating old ids; a restart handles only the new ids.
    produce(
        &brokers,
        &[
            (Some("id-3"), "id-3"),
            (Some("id-40"), "id-40"),
            (Some("id-41"), "id-41"),
        ],
    )
    .await;
    let consumer = DedupConsumer::new(config(&brokers, "g1"), engine(dir.path())).unwrap();
    run_until(&consumer, &seen, 3, 0).await.unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 42);
    assert!(seen.values().all(|&n| n == 1), "{seen:?}");
    assert_eq!(
        consumer
            .stats()
            .received
            .load(std::sync::atomic::Ordering::Relaxed),
        3,
        "resumed at the committed offsets"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_messages_and_failing_handlers_follow_their_policies() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic(TOPIC, 2, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    produce(
        &brokers,
        &[(Some("a"), "a"), (None, "no header"), (Some("b"), "b")],
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    // Skip: counted, offset moves on.
    let seen: Seen = Arc::default();
    let consumer = DedupConsumer::new(config(&brokers, "skip"), engine(dir.path())).unwrap();
    run_until(&consumer, &seen, 3, 0).await.unwrap();
    assert_eq!(
        consumer
            .stats()
            .invalid
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(seen.lock().unwrap().len(), 2);
    drop(consumer);
    assert_eq!(committed(&brokers, "skip").iter().sum::<i64>(), 3);
    // Fail: the loop stops with the message's position.
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(&brokers, "fail");
    c.on_invalid = InvalidMessages::Fail;
    let consumer = DedupConsumer::new(c, engine(dir.path())).unwrap();
    let err = run_until(&consumer, &Arc::default(), 3, 0)
        .await
        .unwrap_err();
    assert!(matches!(err, ConsumeError::Invalid { .. }), "{err}");
    assert!(
        err.to_string().contains("missing header idempotency_key"),
        "{err}"
    );
    drop(consumer);
    // A handler that always fails stops the loop after its retries, and
    // the failed message's offset is not committed.
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(&brokers, "broken");
    c.retries = 2;
    let consumer = DedupConsumer::new(c, engine(dir.path())).unwrap();
    let err = run_until(&consumer, &Arc::default(), 3, u32::MAX)
        .await
        .unwrap_err();
    assert!(
        matches!(err, ConsumeError::Handler { attempts: 3, .. }),
        "{err}"
    );
    drop(consumer);
    assert!(committed(&brokers, "broken").iter().all(|&o| o <= 0));
}

#[tokio::test]
async fn unreachable_brokers_fail_within_the_connect_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config("127.0.0.1:1", "nobody");
    c.connect_timeout = Duration::from_secs(2);
    let started = std::time::Instant::now();
    let err = DedupConsumer::new(c, engine(dir.path())).unwrap_err();
    assert!(matches!(err, ConsumeError::Kafka(_)), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
}
