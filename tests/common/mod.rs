//! Helpers shared by the Kafka test binaries.
// Each test binary compiles this module and uses a subset of it.
#![allow(dead_code)]

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

/// Send `id` as the payload of a message to `topic`/`partition`, with `id`
/// in its `idempotency_key` header too, and wait for the broker.
pub async fn send_with_id(producer: &FutureProducer, topic: &str, partition: i32, id: &str) {
    let record = FutureRecord::<str, str>::to(topic)
        .payload(id)
        .partition(partition)
        .headers(OwnedHeaders::new().insert(Header {
            key: "idempotency_key",
            value: Some(id.as_bytes()),
        }));
    producer
        .send(record, Duration::from_secs(10))
        .await
        .map_err(|(e, _)| e)
        .unwrap();
}

/// Committed offsets of `group` on `topic`'s first `partitions`, as plain
/// numbers (-1 where none). Converted at once: a TopicPartitionList still
/// alive when its consumer drops hangs the drop.
pub fn committed(brokers: &str, group: &str, topic: &str, partitions: i32) -> Vec<i64> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let got = c.committed_offsets(tpl, Duration::from_secs(20)).unwrap();
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

/// A consumer outside any group's commits, assigned to `topic`'s first
/// `partitions` from their beginnings: an independent reader.
pub fn reader_from_start(brokers: &str, topic: &str, partitions: i32) -> BaseConsumer {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "reader")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    drop(tpl);
    c
}

/// A Tansu broker process on a free loopback port, with in-memory storage;
/// killed (with anything else pushed into `children`) when dropped, however
/// the test ends. The binary comes from `SEEN_TANSU`, or
/// `target/tools/tansu` where `.ci/run` puts it.
pub struct Tansu {
    /// `127.0.0.1:PORT`, for `bootstrap.servers`.
    pub brokers: String,
    url: String,
    /// Processes the test started (consumers, stages), killed on drop.
    pub children: Vec<std::process::Child>,
}

impl Tansu {
    pub fn start() -> Tansu {
        use std::process::{Command, Stdio};
        let port = free_port();
        let brokers = format!("127.0.0.1:{port}");
        let url = format!("tcp://127.0.0.1:{port}");
        let broker = Command::new(tansu_binary())
            .args(["broker", "--listener-url", &url])
            .args(["--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/", "--silent"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tansu");
        let tansu = Tansu {
            brokers,
            url,
            children: vec![broker],
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&tansu.brokers).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "tansu did not start listening"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        tansu
    }

    /// Create `topic` with `partitions` partitions.
    pub fn create_topic(&self, topic: &str, partitions: i32) {
        let created = std::process::Command::new(tansu_binary())
            .args(["topic", "create", topic, "--partitions"])
            .arg(partitions.to_string())
            .args(["--broker", &self.url])
            .output()
            .unwrap();
        assert!(created.status.success(), "{created:?}");
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        // Children first, the broker (pushed first) last.
        for c in self.children.iter_mut().rev() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn tansu_binary() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("SEEN_TANSU") {
        return p.into();
    }
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools/tansu");
    assert!(
        p.exists(),
        "the Tansu broker is missing: run `bash .ci/run` (it installs it to {}) or set SEEN_TANSU",
        p.display()
    );
    p
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Produce a message to `topic` with `id` as payload and `idempotency_key` header,
/// plus a header named `name`: any bytes but NUL. (rdkafka's own API takes
/// only `&str` names; librdkafka, and other clients, take what they get.)
#[allow(unsafe_code)]
pub fn produce_with_raw_header_name(
    brokers: &str,
    topic: &str,
    partition: i32,
    id: &str,
    name: &[u8],
) {
    use rdkafka::bindings as rd;
    use rdkafka::producer::{BaseProducer, Producer};
    use std::ffi::{c_int, c_void, CString};
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let topic = CString::new(topic).unwrap();
    let id_header = CString::new("idempotency_key").unwrap();
    let name = CString::new(name).unwrap();
    let vtype = |t: rd::rd_kafka_vtype_t| t as c_int;
    // SAFETY: the arguments follow librdkafka's RD_KAFKA_V_* layout
    // (TOPIC: char*, PARTITION: int32, MSGFLAGS: int, VALUE: void*,
    // size_t, HEADER: char*, void*, ssize_t, END), every pointer is alive
    // for the call, and MSG_F_COPY has librdkafka copy the payload.
    let err = unsafe {
        rd::rd_kafka_producev(
            producer.client().native_ptr(),
            vtype(rd::rd_kafka_vtype_t::RD_KAFKA_VTYPE_TOPIC),
            topic.as_ptr(),
            vtype(rd::rd_kafka_vtype_t::RD_KAFKA_VTYPE_PARTITION),
            partition,
            vtype(rd::rd_kafka_vtype_t::RD_KAFKA_VTYPE_MSGFLAGS),
            rd::RD_KAFKA_MSG_F_COPY as c_int,
            vtype(rd::rd_kafka_vtype_t::RD_KAFKA_VTYPE_VALUE),
            id.as_ptr() as *mut c_void,
            id.len(),
            vtype(rd::rd_kafka_vtype_t::RD_KAFKA_VTYPE_HEADER),
            name.as_ptr(),
            b"x".as_ptr() as *const c_void,
            1isize,
            vtype(rd::rd_kafka_vtype_t::RD_KAFKA_VTYPE_HEADER),
            id_header.as_ptr(),
            id.as_ptr() as *const c_void,
            id.len() as isize,
            vtype(rd::rd_kafka_vtype_t::RD_KAFKA_VTYPE_END),
        )
    };
    assert_eq!(err, rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR);
    producer.flush(Duration::from_secs(10)).unwrap();
}
