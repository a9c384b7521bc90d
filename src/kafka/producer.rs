//! A producer that stamps the headers a dedup consumer reads:
//! `idempotency_key` (a UUIDv7 unless given), `event_type` and
//! `correlation_id`, sends with delivery confirmation, and serializes typed
//! payloads (JSON by default, MessagePack as the compact binary format, or
//! a user's own [`Serializer`]).

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::ids::IDEMPOTENCY_KEY_HEADER;

/// Header naming the kind of event.
pub const EVENT_TYPE_HEADER: &str = "event_type";
/// Header tying events of one request or workflow together.
pub const CORRELATION_ID_HEADER: &str = "correlation_id";

/// Turns a typed value into payload bytes.
pub trait Serializer<T: ?Sized> {
    /// Append the encoding of `value` to `out`.
    fn serialize(&self, value: &T, out: &mut Vec<u8>) -> Result<(), SerializeError>;
}

/// A value that could not be encoded.
#[derive(Debug, thiserror::Error)]
#[error("cannot serialize the payload: {0}")]
pub struct SerializeError(pub String);

/// JSON (serde_json), the default.
#[derive(Clone, Copy, Debug, Default)]
pub struct Json;

impl<T: serde::Serialize + ?Sized> Serializer<T> for Json {
    fn serialize(&self, value: &T, out: &mut Vec<u8>) -> Result<(), SerializeError> {
        serde_json::to_writer(out, value).map_err(|e| SerializeError(e.to_string()))
    }
}

/// MessagePack (rmp-serde, struct fields by name): compact, binary, and
/// readable from every language Kafka users write consumers in.
#[derive(Clone, Copy, Debug, Default)]
pub struct MessagePack;

impl<T: serde::Serialize + ?Sized> Serializer<T> for MessagePack {
    fn serialize(&self, value: &T, out: &mut Vec<u8>) -> Result<(), SerializeError> {
        value
            .serialize(&mut rmp_serde::Serializer::new(out).with_struct_map())
            .map_err(|e| SerializeError(e.to_string()))
    }
}

/// One event to send.
#[derive(Clone, Debug, Default)]
pub struct Event<'a> {
    /// Destination topic.
    pub topic: &'a str,
    /// Message key (partitioning, compaction).
    pub key: Option<&'a [u8]>,
    /// The payload.
    pub payload: &'a [u8],
    /// The id; a fresh UUIDv7 (time-ordered) when `None`.
    pub idempotency_key: Option<&'a str>,
    /// `event_type` header.
    pub event_type: Option<&'a str>,
    /// `correlation_id` header.
    pub correlation_id: Option<&'a str>,
    /// A fixed partition (default: librdkafka's partitioner on the key).
    pub partition: Option<i32>,
}

/// Where an event landed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivered {
    /// The id stamped on it.
    pub idempotency_key: String,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
}

/// Why a send failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The broker did not confirm delivery (after librdkafka's retries,
    /// within `message.timeout.ms`).
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// The payload could not be encoded.
    #[error(transparent)]
    Serialize(#[from] SerializeError),
}

/// A producer for events that dedup consumers downstream can recognise.
pub struct EventProducer {
    producer: FutureProducer,
    queue_timeout: Duration,
}

impl std::fmt::Debug for EventProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventProducer").finish_non_exhaustive()
    }
}

impl EventProducer {
    /// An idempotent producer (`enable.idempotence=true`, `acks=all`) on
    /// `brokers`, with any other librdkafka `properties` over it.
    pub fn new(brokers: &str, properties: &[(String, String)]) -> Result<Self, KafkaError> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", "30000");
        for (k, v) in properties {
            config.set(k, v);
        }
        Ok(EventProducer {
            producer: config.create()?,
            queue_timeout: Duration::from_secs(5),
        })
    }

    /// Send `event` and wait for the broker's confirmation.
    pub async fn send(&self, event: &Event<'_>) -> Result<Delivered, SendError> {
        let id = match event.idempotency_key {
            Some(id) => id.to_owned(),
            None => uuid::Uuid::now_v7().to_string(),
        };
        let mut headers = OwnedHeaders::new().insert(Header {
            key: IDEMPOTENCY_KEY_HEADER,
            value: Some(id.as_bytes()),
        });
        for (name, value) in [
            (EVENT_TYPE_HEADER, event.event_type),
            (CORRELATION_ID_HEADER, event.correlation_id),
        ] {
            if let Some(v) = value {
                headers = headers.insert(Header {
                    key: name,
                    value: Some(v.as_bytes()),
                });
            }
        }
        let mut record = FutureRecord::<[u8], [u8]>::to(event.topic)
            .payload(event.payload)
            .headers(headers);
        if let Some(key) = event.key {
            record = record.key(key);
        }
        if let Some(p) = event.partition {
            record = record.partition(p);
        }
        let delivery = self
            .producer
            .send(record, self.queue_timeout)
            .await
            .map_err(|(e, _)| e)?;
        Ok(Delivered {
            idempotency_key: id,
            partition: delivery.partition,
            offset: delivery.offset,
        })
    }

    /// Serialize `value` with `serializer` and send it as `event`'s payload.
    pub async fn send_value<T: ?Sized, S: Serializer<T>>(
        &self,
        event: &Event<'_>,
        value: &T,
        serializer: &S,
    ) -> Result<Delivered, SendError> {
        let mut payload = Vec::with_capacity(256);
        serializer.serialize(value, &mut payload)?;
        self.send(&Event {
            payload: &payload,
            ..event.clone()
        })
        .await
    }

    /// The underlying producer (dead-lettering in the consumer loop).
    pub(crate) fn inner(&self) -> &FutureProducer {
        &self.producer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Serialize)]
    struct Order {
        id: u32,
        sku: &'static str,
    }

    #[test]
    fn serializers_encode_typed_payloads() {
        let o = Order { id: 7, sku: "a-1" };
        let mut json = Vec::new();
        Json.serialize(&o, &mut json).unwrap();
        assert_eq!(json, br#"{"id":7,"sku":"a-1"}"#);
        let mut mp = Vec::new();
        MessagePack.serialize(&o, &mut mp).unwrap();
        // fixmap of 2: "id" → 7, "sku" → "a-1"
        assert_eq!(mp, b"\x82\xa2id\x07\xa3sku\xa3a-1");
        assert!(mp.len() < json.len());
    }
}
