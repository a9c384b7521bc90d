//! Event ids of Kafka messages.

use std::borrow::Cow;
use std::str::FromStr;

use rdkafka::message::Message;

use crate::stage::id::{debezium_id, json_id, InvalidId, Tombstones};

/// The default header that carries an event's id.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency_key";

/// Where a message's id comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum IdStrategy {
    /// A header's value (default name [`IDEMPOTENCY_KEY_HEADER`]).
    Header(String),
    /// `topic-partition-offset`: the message's place in the log. Catches
    /// redeliveries of one message, not a producer that sent it twice.
    TopicPartitionOffset,
    /// The message key.
    Key,
    /// JSON pointers into the payload (the same composite encoding as
    /// `seen filter --id json:…`).
    Json(Vec<String>),
    /// The payload itself: the engine fingerprints it with its keyed
    /// SipHash-1-3-128, which is the content hash (keyed per store, so no
    /// one can craft payloads that collide). Payloads longer than the
    /// engine's `max_id_len` (up to 1 MiB) are invalid ids.
    ContentHash,
    /// A Debezium change event's identity, from the payload and the record
    /// key (see [`debezium_id`]).
    Debezium(Tombstones),
    /// The first strategy; where it cannot read an id, the second.
    Fallback(Box<IdStrategy>, Box<IdStrategy>),
}

impl Default for IdStrategy {
    fn default() -> Self {
        IdStrategy::Header(IDEMPOTENCY_KEY_HEADER.into())
    }
}

impl FromStr for IdStrategy {
    type Err = String;

    /// `header` or `header:NAME`, `tpo`, `key`, `json:/a[,/b…]`, `hash`,
    /// `debezium` (or `debezium:skip-tombstones`); `A|B` falls back from A to B.
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some((first, rest)) = s.split_once('|') {
            return Ok(IdStrategy::Fallback(
                Box::new(first.parse()?),
                Box::new(rest.parse()?),
            ));
        }
        let s = s.trim();
        Ok(match s {
            "header" => IdStrategy::default(),
            "tpo" => IdStrategy::TopicPartitionOffset,
            "key" => IdStrategy::Key,
            "hash" => IdStrategy::ContentHash,
            "debezium" => IdStrategy::Debezium(Tombstones::Id),
            "debezium:skip-tombstones" => IdStrategy::Debezium(Tombstones::Skip),
            _ => {
                if let Some(name) = s.strip_prefix("header:") {
                    if name.is_empty() {
                        return Err("header: needs a header name".into());
                    }
                    IdStrategy::Header(name.to_owned())
                } else if let Some(ptrs) = s.strip_prefix("json:") {
                    let ptrs: Vec<String> = ptrs.split(',').map(|p| p.trim().to_owned()).collect();
                    crate::stage::id::check_pointers(&ptrs)?;
                    IdStrategy::Json(ptrs)
                } else {
                    return Err(format!(
                        "unknown id strategy {s:?}: expected header[:NAME], tpo, key, json:/ptr[,/ptr…], hash or debezium (A|B falls back)"
                    ));
                }
            }
        })
    }
}

impl IdStrategy {
    /// The id of `msg`. Its headers are read as bytes (see [`IdSource`]):
    /// a header name that is not UTF-8 is just another name.
    pub fn id_of<'m>(&self, msg: &'m impl IdSource) -> Result<Cow<'m, [u8]>, InvalidId> {
        match self {
            IdStrategy::Header(name) => header(msg, name)
                .map(Cow::Borrowed)
                .ok_or_else(|| InvalidId::MissingHeader(name.clone())),
            IdStrategy::TopicPartitionOffset => Ok(Cow::Owned(
                format!("{}-{}-{}", msg.topic(), msg.partition(), msg.offset()).into_bytes(),
            )),
            IdStrategy::Key => msg.key().map(Cow::Borrowed).ok_or(InvalidId::NoKey),
            IdStrategy::Json(pointers) => {
                let payload = msg.payload().ok_or(InvalidId::NoPayload)?;
                let doc: serde_json::Value =
                    serde_json::from_slice(payload).map_err(|e| InvalidId::Json(e.to_string()))?;
                json_id(&doc, pointers).map(Cow::Owned)
            }
            IdStrategy::ContentHash => msg.payload().map(Cow::Borrowed).ok_or(InvalidId::NoPayload),
            IdStrategy::Debezium(tombstones) => {
                debezium_id(msg.payload().unwrap_or_default(), msg.key(), *tombstones)
                    .map(Cow::Owned)
            }
            IdStrategy::Fallback(first, second) => first.id_of(msg).or_else(|_| second.id_of(msg)),
        }
    }
}

/// The value of the last header called `name` (Kafka allows repeats; the
/// last one wins, as in most clients).
pub fn header<'m>(msg: &'m impl IdSource, name: &str) -> Option<&'m [u8]> {
    let mut last = None;
    msg.each_header(&mut |n, v| {
        if n == name.as_bytes() && v.is_some() {
            last = v;
        }
    });
    last
}

/// A Kafka message `seen` reads ids and headers from: rdkafka's
/// `BorrowedMessage` (straight from a consumer) and `OwnedMessage`, and
/// the loop's [`Received`](super::Received).
///
/// Its headers are read as bytes, never through rdkafka's
/// `Headers::try_get`, which panics on a header name that is not UTF-8
/// (Kafka carries names as bytes, and any producer can send one). Sealed:
/// the list of types is `seen`'s to extend.
pub trait IdSource: Message + sealed::Sealed {
    /// Calls `f` with each header's name, as bytes, and value, in order.
    fn each_header<'m>(&'m self, f: &mut dyn FnMut(&'m [u8], Option<&'m [u8]>));
}

pub(crate) mod sealed {
    pub trait Sealed {}
}

/// A message's headers as an owned list for a new message, leaving out
/// `except` (the stage replaces the id header; a dead letter keeps all).
/// A name that is not UTF-8 is copied with its bad bytes replaced by U+FFFD
/// (rdkafka writes names from a `&str`).
pub(crate) fn copy_headers(
    msg: &impl IdSource,
    except: Option<&str>,
) -> rdkafka::message::OwnedHeaders {
    // In an `Option` so each insert can take the list by value (as
    // rdkafka's builder wants) without making an empty one to leave behind.
    let mut out = Some(rdkafka::message::OwnedHeaders::new());
    msg.each_header(&mut |name, value| {
        let name = String::from_utf8_lossy(name);
        if Some(&*name) != except {
            let header = rdkafka::message::Header { key: &name, value };
            out = out.take().map(|h| h.insert(header));
        }
    });
    out.unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::{Header, OwnedHeaders, OwnedMessage, Timestamp};

    fn msg(key: Option<&[u8]>, payload: Option<&[u8]>, headers: &[(&str, &[u8])]) -> OwnedMessage {
        let mut h = OwnedHeaders::new();
        for (k, v) in headers {
            h = h.insert(Header {
                key: k,
                value: Some(*v),
            });
        }
        OwnedMessage::new(
            payload.map(<[u8]>::to_vec),
            key.map(<[u8]>::to_vec),
            "orders".into(),
            Timestamp::NotAvailable,
            3,
            42,
            Some(h),
        )
    }

    fn id(s: &str, m: &OwnedMessage) -> Result<Vec<u8>, InvalidId> {
        s.parse::<IdStrategy>()
            .unwrap()
            .id_of(m)
            .map(Cow::into_owned)
    }

    #[test]
    fn strategies_read_their_part_of_the_message() {
        let m = msg(
            Some(b"k1"),
            Some(br#"{"a":"x","b":2}"#),
            &[("idempotency_key", b"evt-1"), ("trace", b"t")],
        );
        assert_eq!(id("header", &m).unwrap(), b"evt-1");
        assert_eq!(id("header:trace", &m).unwrap(), b"t");
        assert_eq!(id("tpo", &m).unwrap(), b"orders-3-42");
        assert_eq!(id("key", &m).unwrap(), b"k1");
        assert_eq!(id("json:/b", &m).unwrap(), b"2");
        assert_eq!(id("hash", &m).unwrap(), br#"{"a":"x","b":2}"#);
        assert_eq!(id("json:/a,/b", &m).unwrap(), b"\x01\0\0\0x\x01\0\0\x002");
    }

    #[test]
    fn missing_parts_are_invalid_and_fallback_tries_the_next() {
        let bare = msg(None, Some(b"not json"), &[]);
        assert_eq!(
            id("header", &bare),
            Err(InvalidId::MissingHeader("idempotency_key".into()))
        );
        assert_eq!(id("key", &bare), Err(InvalidId::NoKey));
        assert!(matches!(id("json:/a", &bare), Err(InvalidId::Json(_))));
        assert!(matches!(id("debezium", &bare), Err(InvalidId::Json(_))));
        assert_eq!(id("header|tpo", &bare).unwrap(), b"orders-3-42");
        let empty = msg(None, None, &[]);
        assert_eq!(id("hash", &empty), Err(InvalidId::NoPayload));
        assert!(matches!(
            id("debezium", &empty),
            Err(InvalidId::Tombstone(_))
        ));
        assert!("header:".parse::<IdStrategy>().is_err());
        assert!("json:a".parse::<IdStrategy>().is_err());
        assert!("nope".parse::<IdStrategy>().is_err());
    }

    #[test]
    fn debezium_uses_the_record_key_and_keys_tombstones() {
        let ev = br#"{"schema":{},"payload":{"source":{"table":"t","lsn":9,"txId":1},"op":"r","after":{"id":1}}}"#;
        let a = msg(Some(br#"{"id":1}"#), Some(ev), &[]);
        let b = msg(Some(br#"{"id":2}"#), Some(ev), &[]);
        assert_ne!(id("debezium", &a).unwrap(), id("debezium", &b).unwrap());
        let tomb = msg(Some(br#"{"id":1}"#), None, &[]);
        assert!(id("debezium", &tomb).is_ok());
        assert!(matches!(
            id("debezium:skip-tombstones", &tomb),
            Err(InvalidId::Tombstone(_))
        ));
    }
}
