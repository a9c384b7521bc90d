//! The message a [`DedupConsumer`](super::DedupConsumer) handler gets.

use std::borrow::Cow;
use std::sync::Arc;

use rdkafka::message::{
    BorrowedHeaders, BorrowedMessage, Header, Headers, Message, OwnedHeaders, OwnedMessage,
    Timestamp,
};

use super::ids::IdSource;

/// A message the loop received, copied once for its handler. It reads like
/// any rdkafka message: it implements [`Message`] (`payload()`, `key()`,
/// `headers()`, `topic()`, …).
///
/// The copy is made for a new id only (a duplicate is decided without
/// one), and is lean: key and payload in one buffer, the headers in
/// another, the topic's name shared by every message of the topic.
/// rdkafka's `detach` into an `OwnedMessage` took six allocations (topic,
/// key, payload, librdkafka's copy of the header list and of each header,
/// and the `Arc` around it); this takes three (the `Arc`, the key and
/// payload, the headers), two without headers.
#[derive(Clone, Debug)]
pub struct Received {
    topic: Arc<str>,
    partition: i32,
    offset: i64,
    timestamp: Timestamp,
    /// The key, then the payload.
    bytes: Box<[u8]>,
    /// The key's length; `None` when the message has no key.
    key: Option<usize>,
    /// Whether the message has a payload (the rest of `bytes`): a null
    /// value (a tombstone) is told apart from an empty one.
    payload: bool,
    headers: Option<ReceivedHeaders>,
}

impl Received {
    /// A copy of `msg`, whose topic is `topic` (shared, not copied).
    pub(crate) fn copy_of(msg: &BorrowedMessage<'_>, topic: Arc<str>) -> Received {
        Self::copy_with(msg, topic, |f| each_consumed_header(msg, f))
    }

    /// A copy of `msg`, its headers as `headers` hands them out (name
    /// bytes, value). A name that is not UTF-8 is kept with its bad bytes
    /// replaced by U+FFFD, so every name this type hands out is a `&str`.
    fn copy_with<'m>(
        msg: &'m impl Message,
        topic: Arc<str>,
        headers: impl FnOnce(&mut dyn FnMut(&'m [u8], Option<&'m [u8]>)) -> bool,
    ) -> Received {
        let (key, payload) = (msg.key(), msg.payload());
        let len = key.map_or(0, <[u8]>::len) + payload.map_or(0, <[u8]>::len);
        let mut bytes = Vec::with_capacity(len);
        bytes.extend_from_slice(key.unwrap_or_default());
        bytes.extend_from_slice(payload.unwrap_or_default());
        Received {
            topic,
            partition: msg.partition(),
            offset: msg.offset(),
            timestamp: msg.timestamp(),
            bytes: bytes.into_boxed_slice(),
            key: key.map(<[u8]>::len),
            payload: payload.is_some(),
            headers: ReceivedHeaders::copy_of(headers),
        }
    }
}

/// Call `f` with each header of the native list `headers`, in order: its
/// name's bytes and its value.
///
/// Read through librdkafka directly: rdkafka's `Headers::try_get` panics
/// on a header name that is not UTF-8, and any producer can send one. A
/// consumer that read headers that way would stop on such a message, and
/// again on it after every restart.
///
/// # Safety
///
/// `headers` is a live librdkafka header list that outlives `'m` and does
/// not change during it.
#[allow(unsafe_code)]
unsafe fn each_native_header<'m>(
    headers: *const rdkafka::bindings::rd_kafka_headers_t,
    f: &mut dyn FnMut(&'m [u8], Option<&'m [u8]>),
) {
    use rdkafka::bindings as rd;
    for idx in 0.. {
        let (mut name, mut value, mut size) = (std::ptr::null(), std::ptr::null(), 0usize);
        // SAFETY: `headers` is live (the caller's promise); the three out
        // pointers are locals. An index past the last header is an error,
        // which ends the loop.
        let got =
            unsafe { rd::rd_kafka_header_get_all(headers, idx, &mut name, &mut value, &mut size) };
        if got != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
            break;
        }
        // SAFETY: librdkafka stores a header's name NUL-terminated and its
        // value as `size` bytes (or a null pointer for a null value), both
        // inside `headers`, which stays alive and unchanged for `'m`.
        let (name, value) = unsafe {
            (
                std::ffi::CStr::from_ptr(name).to_bytes(),
                (!value.is_null()).then(|| std::slice::from_raw_parts(value.cast::<u8>(), size)),
            )
        };
        f(name, value);
    }
}

/// A consumed message's headers (see [`each_native_header`]). Returns
/// whether the message has headers at all.
fn each_consumed_header<'m>(
    msg: &'m BorrowedMessage<'_>,
    f: &mut dyn FnMut(&'m [u8], Option<&'m [u8]>),
) -> bool {
    use rdkafka::bindings as rd;
    let mut headers: *mut rd::rd_kafka_headers_t = std::ptr::null_mut();
    // SAFETY: `msg.ptr()` is the live message `msg` borrows. librdkafka
    // parses its headers once, keeps them in the message (freed with it),
    // and sets `headers` only on success.
    #[allow(unsafe_code)]
    let found = unsafe { rd::rd_kafka_message_headers(msg.ptr(), &mut headers) };
    if found != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || headers.is_null() {
        return false;
    }
    // SAFETY: the list lives in the message, read-only, while `msg` is
    // borrowed (above).
    #[allow(unsafe_code)]
    unsafe {
        each_native_header(headers, f)
    };
    true
}

/// A consumed message's topic name as bytes: what rdkafka's `topic()`
/// returns without its UTF-8 check, which the loop would pay per message.
pub(crate) fn topic_bytes<'m>(msg: &'m BorrowedMessage<'_>) -> &'m [u8] {
    let topic = msg.topic_ptr();
    if topic.is_null() {
        return &[]; // never for a message (only for some errors)
    }
    // SAFETY: a consumed message holds a reference on its topic handle
    // while it lives, and librdkafka keeps the handle's name in it,
    // NUL-terminated and unchanged (rdkafka's `topic()` reads the same).
    #[allow(unsafe_code)]
    unsafe {
        std::ffi::CStr::from_ptr(rdkafka::bindings::rd_kafka_topic_name(topic)).to_bytes()
    }
}

impl super::ids::sealed::Sealed for BorrowedMessage<'_> {}

impl IdSource for BorrowedMessage<'_> {
    fn each_header<'m>(&'m self, f: &mut dyn FnMut(&'m [u8], Option<&'m [u8]>)) {
        each_consumed_header(self, f);
    }
}

impl super::ids::sealed::Sealed for OwnedMessage {}

impl IdSource for OwnedMessage {
    fn each_header<'m>(&'m self, f: &mut dyn FnMut(&'m [u8], Option<&'m [u8]>)) {
        let Some(headers) = self.headers() else {
            return;
        };
        // rdkafka's `BorrowedHeaders` is a zero-sized stand-in whose
        // address is the native list (rdkafka reads it back the same way).
        let native: *const BorrowedHeaders = headers.as_borrowed();
        // SAFETY: the list is owned by `self` and only changed through
        // `&mut self`, so it is alive and unchanged while `self` is
        // borrowed. `the_public_id_reader_takes_header_names_that_are_not_utf8`
        // (tests/kafka.rs) reads a detached message's list through it.
        #[allow(unsafe_code)]
        unsafe {
            each_native_header(native.cast(), f)
        };
    }
}

impl super::ids::sealed::Sealed for Received {}

impl IdSource for Received {
    fn each_header<'m>(&'m self, f: &mut dyn FnMut(&'m [u8], Option<&'m [u8]>)) {
        for h in self.headers.iter().flat_map(ReceivedHeaders::iter) {
            f(h.key.as_bytes(), h.value);
        }
    }
}

impl Received {
    /// This message as an rdkafka `OwnedMessage` (a copy), for code that
    /// wants that type: to keep it, forward it, or change it.
    pub fn to_owned_message(&self) -> OwnedMessage {
        let headers = self.headers.as_ref().map(|h| {
            h.iter()
                .fold(OwnedHeaders::new_with_capacity(h.count()), |all, h| {
                    all.insert(Header {
                        key: h.key,
                        value: h.value,
                    })
                })
        });
        OwnedMessage::new(
            self.payload().map(<[u8]>::to_vec),
            self.key().map(<[u8]>::to_vec),
            self.topic.to_string(),
            self.timestamp,
            self.partition,
            self.offset,
            headers,
        )
    }
}

impl Message for Received {
    type Headers = ReceivedHeaders;

    fn key(&self) -> Option<&[u8]> {
        self.key.map(|k| &self.bytes[..k])
    }

    fn payload(&self) -> Option<&[u8]> {
        self.payload.then(|| &self.bytes[self.key.unwrap_or(0)..])
    }

    // Declared unsafe by the trait for librdkafka's buffers; this one is
    // our own, so there is nothing to uphold.
    #[allow(unsafe_code)]
    unsafe fn payload_mut(&mut self) -> Option<&mut [u8]> {
        let start = self.key.unwrap_or(0);
        self.payload.then(|| &mut self.bytes[start..])
    }

    fn topic(&self) -> &str {
        &self.topic
    }

    fn partition(&self) -> i32 {
        self.partition
    }

    fn offset(&self) -> i64 {
        self.offset
    }

    fn timestamp(&self) -> Timestamp {
        self.timestamp
    }

    fn headers(&self) -> Option<&ReceivedHeaders> {
        self.headers.as_ref()
    }
}

/// A [`Received`] message's headers, in their order, in one buffer.
#[derive(Clone, Debug)]
pub struct ReceivedHeaders {
    count: usize,
    /// First an index, per header where its name ends and where its value
    /// ends (`NULL` for a null value), 8 bytes each, little endian; then
    /// the names and values back to back, each starting where the one
    /// before it ended. One allocation for all of it.
    bytes: Box<[u8]>,
}

/// A null value's end in [`ReceivedHeaders`]' index.
const NULL: u64 = u64::MAX;
/// Bytes of the index per header.
const INDEX: usize = 16;

impl ReceivedHeaders {
    /// The headers `headers` hands out (name bytes, value), read in one
    /// pass (each is a call into librdkafka); `None` when it says the
    /// message has none. See [`Received::copy_with`] for names that are
    /// not UTF-8.
    fn copy_of<'m>(
        headers: impl FnOnce(&mut dyn FnMut(&'m [u8], Option<&'m [u8]>)) -> bool,
    ) -> Option<ReceivedHeaders> {
        // The first few are kept on the stack; more go to a vector.
        const KEPT: usize = 8;
        type Kept<'m> = (Cow<'m, [u8]>, Option<&'m [u8]>);
        let mut kept: [Kept<'m>; KEPT] = std::array::from_fn(|_| (Cow::Borrowed(&[][..]), None));
        let mut more = Vec::new();
        let (mut count, mut data) = (0, 0);
        let any = headers(&mut |name, value| {
            // As it is when it is UTF-8 (always, from a well-behaved
            // producer), else with each bad sequence replaced by U+FFFD.
            // ASCII, by far the common case, is told by a word-wide scan.
            let name = if name.is_ascii() {
                Cow::Borrowed(name)
            } else {
                Cow::Owned(String::from_utf8_lossy(name).into_owned().into_bytes())
            };
            data += name.len() + value.map_or(0, <[u8]>::len);
            match kept.get_mut(count) {
                Some(slot) => *slot = (name, value),
                None => more.push((name, value)),
            }
            count += 1;
        });
        if !any {
            return None;
        }
        let mut bytes = Vec::with_capacity(count * INDEX + data);
        bytes.resize(count * INDEX, 0);
        let all = kept.iter().take(count).chain(more.iter());
        for (i, (name, value)) in all.enumerate() {
            bytes.extend_from_slice(name);
            let name_end = bytes.len() as u64;
            let value_end = value.map_or(NULL, |v| {
                bytes.extend_from_slice(v);
                bytes.len() as u64
            });
            bytes[i * INDEX..i * INDEX + 8].copy_from_slice(&name_end.to_le_bytes());
            bytes[i * INDEX + 8..(i + 1) * INDEX].copy_from_slice(&value_end.to_le_bytes());
        }
        Some(ReceivedHeaders {
            count,
            bytes: bytes.into_boxed_slice(),
        })
    }

    /// Where header `i`'s name and value end (its index entry).
    fn ends(&self, i: usize) -> Option<(usize, Option<usize>)> {
        let at = i.checked_mul(INDEX)?;
        let word = |at: usize| -> Option<u64> {
            Some(u64::from_le_bytes(
                self.bytes.get(at..at + 8)?.try_into().ok()?,
            ))
        };
        let name_end = usize::try_from(word(at)?).ok()?;
        let value_end = match word(at + 8)? {
            NULL => None,
            end => Some(usize::try_from(end).ok()?),
        };
        Some((name_end, value_end))
    }
}

impl Headers for ReceivedHeaders {
    fn count(&self) -> usize {
        self.count
    }

    fn try_get(&self, idx: usize) -> Option<Header<'_, &[u8]>> {
        if idx >= self.count {
            return None;
        }
        let (name_end, value_end) = self.ends(idx)?;
        // Where this header starts: where the one before it ended.
        let start = match idx.checked_sub(1) {
            Some(before) => {
                let (name_end, value_end) = self.ends(before)?;
                value_end.unwrap_or(name_end)
            }
            None => self.count * INDEX,
        };
        Some(Header {
            // Copied from a `&str`, so always UTF-8.
            key: std::str::from_utf8(self.bytes.get(start..name_end)?).ok()?,
            value: match value_end {
                Some(end) => Some(self.bytes.get(name_end..end)?),
                None => None,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy(key: Option<&[u8]>, payload: Option<&[u8]>, headers: Option<OwnedHeaders>) -> Received {
        let msg = OwnedMessage::new(
            payload.map(<[u8]>::to_vec),
            key.map(<[u8]>::to_vec),
            "orders".into(),
            Timestamp::CreateTime(1_700_000_000_000),
            3,
            42,
            headers,
        );
        Received::copy_with(&msg, "orders".into(), |f| match msg.headers() {
            Some(h) => {
                h.iter().for_each(|h| f(h.key.as_bytes(), h.value));
                true
            }
            None => false,
        })
    }

    #[test]
    fn a_copy_reads_like_the_message() {
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "idempotency_key",
                value: Some("id-1"),
            })
            .insert(Header {
                key: "tombstone",
                value: None::<&[u8]>,
            })
            .insert(Header {
                key: "",
                value: Some(""),
            })
            .insert(Header {
                key: "event_type",
                value: Some("created"),
            });
        let m = copy(Some(b"k"), Some(b"{\"a\":1}"), Some(headers));
        assert_eq!(m.key(), Some(&b"k"[..]));
        assert_eq!(m.payload(), Some(&b"{\"a\":1}"[..]));
        assert_eq!((m.topic(), m.partition(), m.offset()), ("orders", 3, 42));
        assert_eq!(m.timestamp(), Timestamp::CreateTime(1_700_000_000_000));
        let h = m.headers().expect("headers");
        let all: Vec<(&str, Option<&[u8]>)> = h.iter().map(|h| (h.key, h.value)).collect();
        assert_eq!(
            all,
            vec![
                ("idempotency_key", Some(&b"id-1"[..])),
                ("tombstone", None),
                ("", Some(&b""[..])),
                ("event_type", Some(&b"created"[..])),
            ]
        );
        assert!(h.try_get(4).is_none());
        // And back to rdkafka's own type, unchanged.
        let owned = m.to_owned_message();
        assert_eq!((owned.key(), owned.payload()), (m.key(), m.payload()));
        assert_eq!(
            (owned.topic(), owned.partition(), owned.offset()),
            ("orders", 3, 42)
        );
        let back: Vec<(&str, Option<&[u8]>)> = owned
            .headers()
            .expect("headers")
            .iter()
            .map(|h| (h.key, h.value))
            .collect();
        assert_eq!(back, all);
    }

    #[test]
    fn names_that_are_not_ascii_are_kept_and_bad_bytes_repaired() {
        let msg = OwnedMessage::new(None, None, "t".into(), Timestamp::NotAvailable, 0, 0, None);
        let names: [&[u8]; 3] = [b"na\xc3\xafve", b"bad-\xff-name", b"plain"];
        let m = Received::copy_with(&msg, "t".into(), |f| {
            names.iter().for_each(|n| f(n, Some(b"v")));
            true
        });
        let got: Vec<&str> = m
            .headers()
            .expect("headers")
            .iter()
            .map(|h| h.key)
            .collect();
        assert_eq!(got, ["na\u{ef}ve", "bad-\u{fffd}-name", "plain"]);
        let mut raw = Vec::new();
        m.each_header(&mut |n, _| raw.push(n.to_vec()));
        assert_eq!(raw[1], "bad-\u{fffd}-name".as_bytes());
    }

    #[test]
    fn many_headers_copy_in_order() {
        // More than the copy keeps from its first pass over them.
        let headers = (0..20).fold(OwnedHeaders::new(), |all, i| {
            let value = (i % 3 != 0).then(|| format!("value-{i}"));
            all.insert(Header {
                key: &format!("h{i}"),
                value: value.as_deref(),
            })
        });
        let m = copy(None, Some(b"p"), Some(headers));
        let h = m.headers().expect("headers");
        assert_eq!(h.count(), 20);
        for (i, got) in h.iter().enumerate() {
            assert_eq!(got.key, format!("h{i}"));
            let want = (i % 3 != 0).then(|| format!("value-{i}"));
            assert_eq!(got.value, want.as_deref().map(str::as_bytes));
        }
    }

    #[test]
    fn no_key_no_payload_and_empty_ones_stay_apart() {
        let m = copy(None, None, None);
        assert_eq!((m.key(), m.payload()), (None, None));
        assert!(m.headers().is_none());
        let m = copy(Some(b""), Some(b""), Some(OwnedHeaders::new()));
        assert_eq!((m.key(), m.payload()), (Some(&b""[..]), Some(&b""[..])));
        assert_eq!(m.headers().map(Headers::count), Some(0));
        let mut m = copy(None, Some(b"abc"), None);
        assert_eq!(m.key(), None);
        // SAFETY (test): our own buffer, see `payload_mut`.
        #[allow(unsafe_code)]
        let p = unsafe { m.payload_mut() }.expect("payload");
        p[0] = b'x';
        assert_eq!(m.payload(), Some(&b"xbc"[..]));
    }
}
