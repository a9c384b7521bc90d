//! The dedup consumer loop against librdkafka's in-process mock cluster:
//! a real client speaking the Kafka protocol to real (mock) brokers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, FutureProducer, FutureRecord};
use seen::guard::IdempotencyGuard;
use seen::kafka::{
    ConsumeError, DedupConsumer, DedupConsumerConfig, IdSource, IdStrategy, InvalidMessages,
};
use seen::{Durability, Engine};

mod common;

const TOPIC: &str = "events";

/// Send `(idempotency_key header, payload)` pairs, alternating partitions.
async fn produce<A: AsRef<str>, B: AsRef<str>>(brokers: &str, messages: &[(Option<A>, B)]) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("message.timeout.ms", "10000")
        .create()
        .unwrap();
    for (i, (id, payload)) in messages.iter().enumerate() {
        let mut record = FutureRecord::<str, str>::to(TOPIC)
            .payload(payload.as_ref())
            .partition((i % 2) as i32);
        if let Some(id) = id {
            record = record.headers(OwnedHeaders::new().insert(Header {
                key: "idempotency_key",
                value: Some(id.as_ref().as_bytes()),
            }));
        }
        producer
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
}

/// A one-broker mock cluster with `TOPIC` in `partitions` partitions, and
/// its bootstrap servers.
fn mock_cluster(partitions: i32) -> (MockCluster<'static, DefaultProducerContext>, String) {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic(TOPIC, partitions, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    (cluster, brokers)
}

fn config(brokers: &str, group: &str) -> DedupConsumerConfig {
    let mut c = DedupConsumerConfig::new(brokers, group, &[TOPIC]);
    c.commit_interval = Duration::from_millis(100);
    c.retry_backoff = Duration::from_millis(5);
    c.properties = vec![("session.timeout.ms".into(), "6000".into())];
    c
}

fn committed(brokers: &str, group: &str) -> Vec<i64> {
    common::committed(brokers, group, TOPIC, 2)
}

type Seen = Arc<Mutex<HashMap<String, u32>>>;

/// Run the loop until `expect` messages were finished (or 30 s passed).
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
            if stats.done.load(std::sync::atomic::Ordering::Relaxed) >= expect {
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
    let (_cluster, brokers) = mock_cluster(2);
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
    produce(&brokers, &msgs).await;

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
    let (_cluster, brokers) = mock_cluster(2);
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
    let ConsumeError::Handler {
        partition, offset, ..
    } = err
    else {
        unreachable!()
    };
    drop(consumer);
    // The committed position of that partition is not past the failed
    // message (a skipped invalid message on the other one may be).
    let at = committed(&brokers, "broken")[partition as usize];
    assert!(
        at <= offset,
        "committed {at} past the failed offset {offset}"
    );
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

/// Read every message of `topic` (all partitions) from the start.
fn read_all(
    brokers: &str,
    topic: &str,
    partitions: i32,
    expect: usize,
) -> Vec<rdkafka::message::OwnedMessage> {
    let c = common::reader_from_start(brokers, topic, partitions);
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while out.len() < expect && std::time::Instant::now() < deadline {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            out.push(m.detach());
        }
    }
    out
}

fn header_of(m: &rdkafka::message::OwnedMessage, name: &str) -> Option<String> {
    seen::kafka::header(m, name).map(|v| String::from_utf8_lossy(v).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_producer_stamps_ids_that_the_consumer_dedups() {
    use seen::kafka::{Event, EventProducer, MessagePack};
    let (_cluster, brokers) = mock_cluster(2);
    let producer = EventProducer::new(&brokers, &[]).unwrap();
    let first = producer
        .send(&Event {
            topic: TOPIC,
            payload: b"charge 7",
            event_type: Some("payment.requested"),
            correlation_id: Some("req-1"),
            partition: Some(0),
            ..Default::default()
        })
        .await
        .unwrap();
    // A UUIDv7: 36 characters, version nibble 7.
    assert_eq!(first.idempotency_key.len(), 36);
    assert_eq!(first.idempotency_key.as_bytes()[14], b'7');
    // The same event sent again (a producer retry) carries the same id.
    let again = producer
        .send(&Event {
            topic: TOPIC,
            payload: b"charge 7",
            idempotency_key: Some(&first.idempotency_key),
            partition: Some(1),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(again.idempotency_key, first.idempotency_key);
    #[derive(serde::Serialize)]
    struct Refund {
        order: u32,
    }
    producer
        .send_value(
            &Event {
                topic: TOPIC,
                idempotency_key: Some("refund-3"),
                partition: Some(0),
                ..Default::default()
            },
            &Refund { order: 3 },
            &MessagePack,
        )
        .await
        .unwrap();
    let got = read_all(&brokers, TOPIC, 2, 3);
    assert_eq!(got.len(), 3);
    let stamped = got
        .iter()
        .find(|m| m.partition() == 0 && m.offset() == 0)
        .unwrap();
    assert_eq!(
        header_of(stamped, "event_type").as_deref(),
        Some("payment.requested")
    );
    assert_eq!(
        header_of(stamped, "correlation_id").as_deref(),
        Some("req-1")
    );
    let dir = tempfile::tempdir().unwrap();
    let seen: Seen = Arc::default();
    let consumer = DedupConsumer::new(config(&brokers, "stamped"), engine(dir.path())).unwrap();
    run_until(&consumer, &seen, 3, 0).await.unwrap();
    let s = consumer.stats();
    assert_eq!(s.handled.load(std::sync::atomic::Ordering::Relaxed), 2);
    assert_eq!(s.duplicates.load(std::sync::atomic::Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_carry_the_message_and_the_reason() {
    use seen::kafka::AfterRetries;
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic(TOPIC, 2, 1).unwrap();
    cluster.create_topic("dlq", 1, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    produce(
        &brokers,
        &[
            (Some("ok"), "ok"),
            (None, "no header"),
            (Some("poison"), "poison"),
        ],
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(&brokers, "dl");
    c.on_invalid = InvalidMessages::DeadLetter;
    c.after_retries = AfterRetries::DeadLetter;
    c.retries = 1;
    c.dead_letter_topic = Some("dlq".into());
    let guard = engine(dir.path());
    let consumer = DedupConsumer::new(c, Arc::clone(&guard)).unwrap();
    let handled: Seen = Arc::default();
    let h = Arc::clone(&handled);
    let stats = consumer.stats();
    let stop = async {
        while stats.done.load(std::sync::atomic::Ordering::Relaxed) < 3 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    consumer
        .run(
            move |msg| {
                let h = Arc::clone(&h);
                async move {
                    let p = String::from_utf8_lossy(msg.payload().unwrap_or_default()).into_owned();
                    if p == "poison" {
                        return Err("cannot apply poison");
                    }
                    *h.lock().unwrap().entry(p).or_default() += 1;
                    Ok(())
                }
            },
            stop,
        )
        .await
        .unwrap();
    assert_eq!(
        consumer
            .stats()
            .dead_lettered
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    drop(consumer);
    // Every offset moved on; the poison id stays unmarked.
    assert_eq!(committed(&brokers, "dl").iter().sum::<i64>(), 3);
    assert!(!guard.is_processed("poison").unwrap());
    let dead = read_all(&brokers, "dlq", 1, 2);
    assert_eq!(dead.len(), 2);
    let reasons: Vec<String> = dead
        .iter()
        .map(|m| header_of(m, seen::kafka::DEAD_LETTER_REASON_HEADER).unwrap())
        .collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("missing header idempotency_key")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("handler failed 2 times: cannot apply poison")),
        "{reasons:?}"
    );
    let poison = dead
        .iter()
        .find(|m| m.payload() == Some(b"poison".as_slice()))
        .unwrap();
    assert_eq!(
        header_of(poison, "idempotency_key").as_deref(),
        Some("poison")
    );
    assert!(header_of(poison, seen::kafka::DEAD_LETTER_ORIGIN_HEADER)
        .unwrap()
        .starts_with("events/"));
    // A dead-letter policy without a topic is refused up front.
    let mut c = config(&brokers, "nodlq");
    c.on_invalid = InvalidMessages::DeadLetter;
    assert!(matches!(
        DedupConsumer::new(c, guard),
        Err(ConsumeError::NoDeadLetterTopic)
    ));
}

/// Two consumers in one group share one engine (global scope). The second
/// joins while the first is mid-stream with duplicates still to come: the
/// rebalance revokes partitions from the first (which commits behind a
/// sync) and assigns them to the second. No id is handled twice, none is
/// skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_rebalance_neither_doubles_nor_drops() {
    let (_cluster, brokers) = mock_cluster(2);
    let mut msgs: Vec<(Option<String>, String)> = Vec::new();
    for i in 0..300 {
        msgs.push((Some(format!("r-{i}")), format!("r-{i}")));
        if i % 3 == 0 {
            // Duplicates on the other partition, after the rebalance.
            msgs.push((Some(format!("r-{}", i / 2)), format!("r-{}", i / 2)));
        }
    }
    produce(&brokers, &msgs).await;
    let dir = tempfile::tempdir().unwrap();
    let guard = engine(dir.path());
    let seen: Seen = Arc::default();
    let total = msgs.len() as u64;
    // Slow enough that the first consumer cannot finish all 400 messages
    // (2 partitions: ~8 s) before the second has joined (the mock's group
    // join takes ~3 s after the first 40): at 20 ms the margin was ~0.6 s,
    // and a loaded machine sometimes saw no rebalance at all.
    let slow = |seen: Seen| {
        move |msg: Arc<seen::kafka::Received>| {
            let seen = Arc::clone(&seen);
            async move {
                tokio::time::sleep(Duration::from_millis(40)).await;
                let p = String::from_utf8_lossy(msg.payload().unwrap_or_default()).into_owned();
                *seen.lock().unwrap().entry(p).or_default() += 1;
                Ok::<_, std::io::Error>(())
            }
        }
    };
    let a = DedupConsumer::new(config(&brokers, "pair"), Arc::clone(&guard)).unwrap();
    let b_guard = Arc::clone(&guard);
    let brokers_b = brokers.clone();
    let (done_tx, done_rx) = tokio::sync::watch::channel(false);
    let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let rb = Arc::clone(&received);
    let seen_b = Arc::clone(&seen);
    let started = Arc::clone(&seen);
    let b_task = tokio::spawn(async move {
        // Join once the first is under way.
        while started.lock().unwrap().len() < 40 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let b = DedupConsumer::new(config(&brokers_b, "pair"), b_guard).unwrap();
        let mut done = done_rx.clone();
        let stop = async move {
            let _ = done.wait_for(|d| *d).await;
        };
        let r = b.run(slow(seen_b), stop).await;
        rb.fetch_add(
            b.stats()
                .received
                .load(std::sync::atomic::Ordering::Relaxed),
            std::sync::atomic::Ordering::Relaxed,
        );
        (
            r,
            b.stats()
                .rebalances
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    });
    let seen_a = Arc::clone(&seen);
    let stop_a = {
        let seen = Arc::clone(&seen);
        let done_tx = done_tx.clone();
        async move {
            // Until every distinct id was handled by one of the two.
            for _ in 0..3000 {
                if seen.lock().unwrap().len() == 300 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            let _ = done_tx.send(true);
        }
    };
    a.run(slow(seen_a), stop_a).await.unwrap();
    let rebalances_a = a
        .stats()
        .rebalances
        .load(std::sync::atomic::Ordering::Relaxed);
    let (rb_result, rebalances_b) = b_task.await.unwrap();
    rb_result.unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 300, "none skipped");
    assert!(
        seen.values().all(|&n| n == 1),
        "none handled twice: {seen:?}"
    );
    assert!(
        rebalances_a >= 2 && rebalances_b >= 1,
        "a rebalance happened ({rebalances_a}, {rebalances_b})"
    );
    let got_b = received.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        got_b > 0 && got_b < total,
        "both consumed: the second got {got_b} of {total}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_per_partition_and_report_lag() {
    let (_cluster, brokers) = mock_cluster(2);
    let msgs: Vec<(Option<String>, String)> = (0..12)
        .map(|i| (Some(format!("m-{}", i % 9)), format!("m-{i}")))
        .collect();
    produce(&brokers, &msgs).await;
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(&brokers, "metrics");
    c.properties
        .push(("statistics.interval.ms".into(), "100".into()));
    let consumer = Arc::new(DedupConsumer::new(c, engine(dir.path())).unwrap());
    let mut registry = prometheus_client::registry::Registry::default();
    seen::metrics::register_kafka(&mut registry, &consumer);
    let stats = consumer.stats();
    let stop = async {
        while stats.done.load(std::sync::atomic::Ordering::Relaxed) < 12 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Keep polling a little: statistics arrive through the poll loop.
        tokio::time::sleep(Duration::from_millis(600)).await;
    };
    consumer
        .run(|_| async { Ok::<_, std::io::Error>(()) }, stop)
        .await
        .unwrap();
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let value = |line_start: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(line_start))
            .and_then(|l| l.rsplit_once(' '))
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or_else(|| panic!("{line_start} not in\n{text}"))
    };
    assert_eq!(value("seen_kafka_received_total "), 12.0);
    assert_eq!(value("seen_kafka_handled_total "), 9.0);
    assert_eq!(value("seen_kafka_duplicates_total "), 3.0);
    let per_partition: f64 = (0..2)
        .map(|p| {
            value(&format!(
                "seen_kafka_partition_handled_total{{topic=\"events\",partition=\"{p}\"}}"
            ))
        })
        .sum();
    assert_eq!(per_partition, 9.0);
    assert!(value("seen_kafka_commit_seconds_count ") >= 1.0, "{text}");
    for p in 0..2 {
        assert_eq!(
            value(&format!(
                "seen_kafka_consumer_lag{{topic=\"events\",partition=\"{p}\"}}"
            )),
            0.0,
            "{text}"
        );
    }
}

/// Partitions are handled concurrently, each in order, and what is
/// received but not handled is bounded by `max_in_flight`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_run_concurrently_each_in_order() {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    let (_cluster, brokers) = mock_cluster(2);
    let msgs: Vec<(Option<String>, String)> = (0..40)
        .map(|i| (Some(format!("c-{i}")), format!("c-{i}")))
        .collect();
    produce(&brokers, &msgs).await;
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(&brokers, "concurrent");
    c.max_in_flight = 8;
    let consumer = DedupConsumer::new(c, engine(dir.path())).unwrap();
    let now = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let order: Arc<Mutex<HashMap<i32, Vec<i64>>>> = Arc::default();
    let stats = consumer.stats();
    let stop = async {
        while stats.done.load(std::sync::atomic::Ordering::Relaxed) < 40 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    consumer
        .run(
            |msg| {
                let (now, most, order) = (Arc::clone(&now), Arc::clone(&most), Arc::clone(&order));
                async move {
                    let running = now.fetch_add(1, SeqCst) + 1;
                    most.fetch_max(running, SeqCst);
                    order
                        .lock()
                        .unwrap()
                        .entry(msg.partition())
                        .or_default()
                        .push(msg.offset());
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    now.fetch_sub(1, SeqCst);
                    Ok::<_, std::io::Error>(())
                }
            },
            stop,
        )
        .await
        .unwrap();
    assert_eq!(
        most.load(SeqCst),
        2,
        "one handler per partition at a time, both partitions at once"
    );
    let order = order.lock().unwrap();
    for (p, offsets) in order.iter() {
        assert!(
            offsets.windows(2).all(|w| w[0] < w[1]),
            "partition {p} out of order: {offsets:?}"
        );
    }
    assert_eq!(order.values().map(Vec::len).sum::<usize>(), 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_that_does_not_exist_is_a_clear_error() {
    let (_cluster, brokers) = mock_cluster(1);
    let dir = tempfile::tempdir().unwrap();
    let c = DedupConsumerConfig::new(&brokers, "lost", &["no-such-topic"]);
    let consumer = DedupConsumer::new(c, engine(dir.path())).unwrap();
    let run = consumer.run(
        |_| async { Ok::<_, std::io::Error>(()) },
        std::future::pending(),
    );
    let err = tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("a bounded wait, not a hang")
        .unwrap_err();
    assert!(err.to_string().contains("Unknown topic"), "{err}");
}

/// Broker trouble: an id over the engine's length limit is an invalid
/// message (not a fatal error); commits the coordinator refuses (errors
/// injected through the mock's API) are retried; a broker that goes down
/// and comes back mid-stream loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_ids_refused_commits_and_a_broker_outage_lose_nothing() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let (cluster, brokers) = mock_cluster(2);
    let huge = "x".repeat(5000);
    let mut first: Vec<(Option<String>, String)> = (0..10)
        .map(|i| (Some(format!("o-{i}")), format!("o-{i}")))
        .collect();
    first.push((Some(huge.clone()), "huge".into()));
    produce(&brokers, &first).await;
    // The coordinator refuses the first commits.
    cluster.request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS; 2],
    );
    let dir = tempfile::tempdir().unwrap();
    let consumer = DedupConsumer::new(config(&brokers, "outage"), engine(dir.path())).unwrap();
    let seen: Seen = Arc::default();
    let stats = consumer.stats();
    let brokers2 = brokers.clone();
    let cluster = &cluster;
    let script_seen = Arc::clone(&seen);
    let script = async {
        let wait_done = |n: u64| async move {
            for _ in 0..3000 {
                if stats.done.load(std::sync::atomic::Ordering::Relaxed) >= n {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("stuck below {n} done");
        };
        wait_done(11).await;
        cluster.broker_down(1).unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        cluster.broker_up(1).unwrap();
        let second: Vec<(Option<String>, String)> = (10..20)
            .map(|i| (Some(format!("o-{i}")), format!("o-{i}")))
            .collect();
        produce(&brokers2, &second).await;
        // Every id handled: not a count of finished messages, which
        // redeliveries of the first batch after the outage also raise.
        for _ in 0..3000 {
            if script_seen.lock().unwrap().len() >= 20 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        wait_done(21).await;
    };
    let handler_seen = Arc::clone(&seen);
    consumer
        .run(
            move |msg| {
                let seen = Arc::clone(&handler_seen);
                async move {
                    let p = String::from_utf8_lossy(msg.payload().unwrap_or_default()).into_owned();
                    *seen.lock().unwrap().entry(p).or_default() += 1;
                    Ok::<_, std::io::Error>(())
                }
            },
            script,
        )
        .await
        .unwrap();
    let s = consumer.stats();
    // The oversized id, once or again after the outage redelivered it
    // (an invalid message has no mark to make its redelivery a duplicate).
    assert!(s.invalid.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    assert!(
        s.commit_retries.load(std::sync::atomic::Ordering::Relaxed) >= 1,
        "refused commits retried"
    );
    drop(consumer);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 20);
    assert!(seen.values().all(|&n| n == 1), "{seen:?}");
    assert!(!seen.contains_key("huge"));
    assert_eq!(committed(&brokers, "outage").iter().sum::<i64>(), 21);
}

/// Partition scope: one store per partition under STATE/<topic>/<p>/,
/// opened (replayed) on assign and closed on revoke. Two consumers of one
/// group on one host: the second joins mid-stream, a partition moves to it
/// with its store, and no id is handled twice within its partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_stores_move_with_their_partition() {
    use seen::kafka::Scope;
    let (_cluster, brokers) = mock_cluster(2);
    // Message i goes to partition i % 2 (see `produce`); every third id
    // comes again 40 messages later, on its own partition.
    let mut msgs: Vec<(Option<String>, String)> = Vec::new();
    for i in 0..600usize {
        let n = if i >= 40 && i % 3 == 0 { i - 40 } else { i };
        msgs.push((Some(format!("s-{n}")), format!("s-{n}")));
    }
    let distinct: std::collections::HashSet<&str> = msgs.iter().map(|(_, p)| p.as_str()).collect();
    produce(&brokers, &msgs).await;
    let state = tempfile::tempdir().unwrap();
    let scope = || Scope::Partition {
        dir: state.path().to_path_buf(),
        engine: seen::Config::from_vars([("SEEN_DURABILITY", "none")]).unwrap(),
    };
    let seen: Seen = Arc::default();
    // Slow enough that the first consumer cannot finish all 400 messages
    // (2 partitions: ~8 s) before the second has joined (the mock's group
    // join takes ~3 s after the first 40): at 20 ms the margin was ~0.6 s,
    // and a loaded machine sometimes saw no rebalance at all.
    let slow = |seen: Seen| {
        move |msg: Arc<seen::kafka::Received>| {
            let seen = Arc::clone(&seen);
            async move {
                tokio::time::sleep(Duration::from_millis(40)).await;
                let p = String::from_utf8_lossy(msg.payload().unwrap_or_default()).into_owned();
                *seen.lock().unwrap().entry(p).or_default() += 1;
                Ok::<_, std::io::Error>(())
            }
        }
    };
    let a = DedupConsumer::with_scope(config(&brokers, "scoped"), scope()).unwrap();
    let (done_tx, done_rx) = tokio::sync::watch::channel(false);
    let b_started = Arc::clone(&seen);
    let b_seen = Arc::clone(&seen);
    let b_brokers = brokers.clone();
    let b_dir = state.path().to_path_buf();
    let b_task = tokio::spawn(async move {
        while b_started.lock().unwrap().len() < 40 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let scope = Scope::Partition {
            dir: b_dir,
            engine: seen::Config::from_vars([("SEEN_DURABILITY", "none")]).unwrap(),
        };
        let b = DedupConsumer::with_scope(config(&b_brokers, "scoped"), scope).unwrap();
        let mut done = done_rx.clone();
        let r = b
            .run(slow(b_seen), async move {
                let _ = done.wait_for(|d| *d).await;
            })
            .await;
        (
            r,
            b.stats()
                .received
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    });
    let stop_a = {
        let seen = Arc::clone(&seen);
        let want = distinct.len();
        async move {
            for _ in 0..3000 {
                if seen.lock().unwrap().len() == want {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            let _ = done_tx.send(true);
        }
    };
    a.run(slow(Arc::clone(&seen)), stop_a).await.unwrap();
    drop(a);
    let (b_result, b_received) = b_task.await.unwrap();
    b_result.unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), distinct.len(), "none skipped");
    assert!(
        seen.values().all(|&n| n == 1),
        "none handled twice: {seen:?}"
    );
    assert!(b_received > 0, "the second consumer took a partition over");
    for p in 0..2 {
        assert!(state
            .path()
            .join(TOPIC)
            .join(p.to_string())
            .join("STORE")
            .exists());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pattern_subscription_keeps_each_topics_partitions_apart() {
    // Two topics matched by one pattern, each with a partition 0: their
    // messages, offsets and commits must not be mistaken for each other.
    let cluster = MockCluster::new(1).unwrap();
    let topics = ["orders-eu", "orders-us"];
    for t in topics {
        cluster.create_topic(t, 1, 1).unwrap();
    }
    let brokers = cluster.bootstrap_servers();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("message.timeout.ms", "10000")
        .create()
        .unwrap();
    // 5 messages on one topic, 9 on the other; ids distinct across both.
    let counts = [5usize, 9];
    for (t, &n) in topics.iter().zip(&counts) {
        for i in 0..n {
            common::send_with_id(&producer, t, 0, &format!("{t}-{i}")).await;
        }
    }
    let mut c = DedupConsumerConfig::new(&brokers, "pattern", &["^orders-.*"]);
    c.commit_interval = Duration::from_millis(100);
    c.properties = vec![
        ("session.timeout.ms".into(), "6000".into()),
        ("topic.metadata.refresh.interval.ms".into(), "500".into()),
    ];
    let dir = tempfile::tempdir().unwrap();
    let consumer = DedupConsumer::new(c, engine(dir.path())).unwrap();
    let seen: Seen = Arc::default();
    let total: usize = counts.iter().sum();
    run_until(&consumer, &seen, total as u64, 0).await.unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), total, "{seen:?}");
    assert!(seen.values().all(|&n| n == 1), "{seen:?}");
    drop(consumer);
    // Each topic's partition committed to its own end.
    for (t, &n) in topics.iter().zip(&counts) {
        assert_eq!(
            common::committed(&brokers, "pattern", t, 1),
            vec![n as i64],
            "{t}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_name_that_is_not_utf8_is_read_not_a_panic() {
    // rdkafka's `Headers` unwraps each name as UTF-8: reading headers that
    // way stopped the loop on such a message, and again after a restart.
    let (_cluster, brokers) = mock_cluster(2);
    produce(&brokers, &[(Some("a"), "a")]).await;
    common::produce_with_raw_header_name(&brokers, TOPIC, 1, "b", b"bad-\xff\xfe-name");
    common::produce_with_raw_header_name(&brokers, TOPIC, 0, "b", b"\xc3(");
    produce(&brokers, &[(Some("c"), "c")]).await;

    // Ids from the header (read by name), and from topic-partition-offset
    // (the headers only copied for the handler).
    for (group, ids, handled, duplicates) in [("raw-h", "header", 3, 1), ("raw-t", "tpo", 4, 0)] {
        let mut c = config(&brokers, group);
        c.ids = ids.parse().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let consumer = DedupConsumer::new(c, engine(dir.path())).unwrap();
        let names = Arc::new(Mutex::new(Vec::<String>::new()));
        let stats = consumer.stats();
        let shutdown = async {
            for _ in 0..3000 {
                if stats.done.load(std::sync::atomic::Ordering::Relaxed) >= 4 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        let seen = Arc::clone(&names);
        consumer
            .run(
                move |msg: Arc<seen::kafka::Received>| {
                    let seen = Arc::clone(&seen);
                    async move {
                        use rdkafka::message::Headers;
                        let mut seen = seen.lock().unwrap();
                        for h in msg.headers().into_iter().flat_map(|h| h.iter()) {
                            seen.push(h.key.to_owned());
                        }
                        Ok::<_, std::io::Error>(())
                    }
                },
                shutdown,
            )
            .await
            .unwrap();
        let s = consumer.stats();
        // By header: a, b once (its second copy is a duplicate), c.
        let count = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(count(&s.handled), handled, "{ids}");
        assert_eq!(count(&s.duplicates), duplicates, "{ids}");
        let names = names.lock().unwrap();
        assert!(
            names
                .iter()
                .any(|n| n == "bad-\u{fffd}\u{fffd}-name" || n == "\u{fffd}("),
            "the bad name reaches the handler, repaired: {names:?}"
        );
        drop(consumer);
        assert_eq!(committed(&brokers, group).iter().sum::<i64>(), 4, "{ids}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_public_id_reader_takes_header_names_that_are_not_utf8() {
    // `IdStrategy::id_of` and `kafka::header` for code with its own loop:
    // on a message straight from a consumer and on its owned copy (whose
    // header list librdkafka copied, bad name and all).
    let (_cluster, brokers) = mock_cluster(1);
    common::produce_with_raw_header_name(&brokers, TOPIC, 0, "evt-7", b"bad-\xff-name");
    let ids = IdStrategy::default();
    let fallback: IdStrategy = "header:nope|header".parse().unwrap();
    let reader = common::reader_from_start(&brokers, TOPIC, 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let owned = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "the message never came"
        );
        if let Some(Ok(m)) = reader.poll(Duration::from_millis(100)) {
            assert_eq!(&*ids.id_of(&m).unwrap(), b"evt-7");
            assert_eq!(&*fallback.id_of(&m).unwrap(), b"evt-7");
            assert_eq!(seen::kafka::header(&m, "bad-\u{fffd}-name"), None);
            break m.detach();
        }
    };
    drop(reader);
    assert_eq!(&*ids.id_of(&owned).unwrap(), b"evt-7");
    let mut names = Vec::new();
    owned.each_header(&mut |name, _| names.push(name.to_vec()));
    assert_eq!(
        names,
        [b"bad-\xff-name".to_vec(), b"idempotency_key".to_vec()]
    );
    assert_eq!(
        seen::kafka::header(&owned, "idempotency_key"),
        Some(&b"evt-7"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_in_flight_bound_still_consumes() {
    // `max_in_flight = 0` read literally never fetches: the loop would
    // wait for its shutdown with its partitions unread, saying nothing.
    let (_cluster, brokers) = mock_cluster(2);
    produce(
        &brokers,
        &[(Some("a"), "a"), (Some("b"), "b"), (Some("a"), "a")],
    )
    .await;
    let mut c = config(&brokers, "zero-in-flight");
    c.max_in_flight = 0;
    let dir = tempfile::tempdir().unwrap();
    let consumer = DedupConsumer::new(c, engine(dir.path())).unwrap();
    let seen = Seen::default();
    run_until(&consumer, &seen, 3, 0).await.unwrap();
    let s = consumer.stats();
    assert_eq!(s.done.load(std::sync::atomic::Ordering::Relaxed), 3);
    assert_eq!(seen.lock().unwrap().len(), 2, "a and b, each once");
}

/// CPU time this thread has used, from `/proc/thread-self/stat`.
fn thread_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
    // Fields after the command name in parentheses; utime and stime are
    // the 14th and 15th of the line, in clock ticks (USER_HZ, 100).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let ticks: u64 = rest
        .split(' ')
        .skip(11)
        .take(2)
        .map(|f| f.parse::<u64>().unwrap())
        .sum();
    Duration::from_millis(ticks * 10)
}

#[test]
fn a_zero_commit_interval_does_not_spin_an_idle_loop() {
    // A zero interval commits as often as the timer fires; the loop must
    // not turn without pause while the stream is idle. The loop runs here
    // on a thread of its own (a current-thread runtime), so that thread's
    // CPU time is the loop's.
    let (_cluster, brokers) = mock_cluster(2);
    let (spent, done, commits) = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            produce(&brokers, &[(Some("a"), "a")]).await;
            let mut c = config(&brokers, "zero-commit-interval");
            c.commit_interval = Duration::ZERO;
            let dir = tempfile::tempdir().unwrap();
            let consumer = DedupConsumer::new(c, engine(dir.path())).unwrap();
            let stats = consumer.stats();
            let idle_spent = std::cell::Cell::new(None);
            // Once the message is handled the stream is idle: the CPU the
            // loop's thread takes over the next 2 s is what idling costs.
            let shutdown = async {
                for _ in 0..3000 {
                    if stats.done.load(std::sync::atomic::Ordering::Relaxed) >= 1 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                let before = thread_cpu();
                tokio::time::sleep(Duration::from_secs(2)).await;
                idle_spent.set(Some(thread_cpu() - before));
            };
            consumer
                .run(|_| async { Ok::<(), String>(()) }, shutdown)
                .await
                .unwrap();
            (
                idle_spent.get().unwrap(),
                stats.done.load(std::sync::atomic::Ordering::Relaxed),
                committed(&brokers, "zero-commit-interval"),
            )
        })
    })
    .join()
    .unwrap();
    assert_eq!(done, 1);
    assert!(
        commits.contains(&1),
        "committed past the message: {commits:?}"
    );
    // A spinning loop spends about all of the 2 s; tokio's timer fires at
    // most once a millisecond, which measured 80 ms.
    assert!(
        spent < Duration::from_millis(1000),
        "{spent:?} of CPU in 2 s idle"
    );
}
