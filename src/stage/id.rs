//! Event ids: which bytes of an event are fingerprinted.
//!
//! The encodings here decide which fingerprints land on disk, so they are
//! part of the stable format: a single JSON pointer yields the value's own
//! bytes, several are a length-prefixed composite ([`compose`]), and a
//! Debezium id is a tagged composite ([`debezium_id`]). Changing any of
//! them would make every stored mark unreachable.

use std::borrow::Cow;

use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::Value;

/// How to read the id of an event.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum IdSpec {
    /// The whole payload is the id (for a line: without its line ending).
    Whole,
    /// One or more JSON pointers into the payload (`/source/lsn`). Several
    /// pointers make a composite id.
    Json(Vec<String>),
    /// A Debezium change event's identity; see [`debezium_id`].
    Debezium(Tombstones),
}

/// What a Debezium tombstone (a `null` value after a delete) is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Tombstones {
    /// Its own id: the record key, tagged as a tombstone. Needs a record
    /// key; without one the tombstone is invalid.
    #[default]
    Id,
    /// Not an event to deduplicate: reported as [`InvalidId::Tombstone`],
    /// so the invalid-input policy decides (skip, pass, dead-letter, fail).
    Skip,
}

impl IdSpec {
    /// Parse a `--id` spelling: `line` (or `whole`), `json:/a[,/b…]`,
    /// `debezium`.
    pub fn parse(s: &str) -> Result<IdSpec, String> {
        match s.trim() {
            "line" | "whole" => Ok(IdSpec::Whole),
            "debezium" => Ok(IdSpec::Debezium(Tombstones::Id)),
            other => match other.strip_prefix("json:") {
                Some(ptrs) => {
                    let ptrs: Vec<String> = ptrs.split(',').map(|p| p.trim().to_owned()).collect();
                    check_pointers(&ptrs)?;
                    Ok(IdSpec::Json(ptrs))
                }
                None => Err(format!(
                    "unknown id strategy {other:?}: expected line, json:/pointer[,/pointer…] or debezium"
                )),
            },
        }
    }

    /// The id of `payload`. `record_key` is the message key where there is
    /// one (Kafka); Debezium ids use it to tell rows apart.
    pub fn id_of<'a>(
        &self,
        payload: &'a [u8],
        record_key: Option<&[u8]>,
    ) -> Result<Cow<'a, [u8]>, InvalidId> {
        match self {
            IdSpec::Whole => Ok(Cow::Borrowed(payload)),
            IdSpec::Json(pointers) => {
                let doc = parse_json(payload)?;
                json_id(&doc, pointers).map(Cow::Owned)
            }
            IdSpec::Debezium(tombstones) => {
                debezium_id(payload, record_key, *tombstones).map(Cow::Owned)
            }
        }
    }
}

/// Every pointer must be empty (the whole document) or start with `/`.
pub fn check_pointers(pointers: &[String]) -> Result<(), String> {
    if pointers.is_empty() {
        return Err("at least one JSON pointer is needed".into());
    }
    for p in pointers {
        if !(p.is_empty() || p.starts_with('/')) {
            return Err(format!(
                "{p:?} is not a JSON pointer (it must start with '/')"
            ));
        }
    }
    Ok(())
}

/// Why an event has no usable id.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidId {
    /// The payload is not JSON (or is truncated).
    #[error("malformed JSON: {0}")]
    Json(String),
    /// A pointer found nothing.
    #[error("missing key {0}")]
    MissingKey(String),
    /// A pointer found `null`.
    #[error("key {0} is null")]
    NullKey(String),
    /// Not a Debezium change event (no `source` block, no `op`, …).
    #[error("not a Debezium change event: {0}")]
    NotDebezium(&'static str),
    /// A Debezium tombstone under [`Tombstones::Skip`], or one without a
    /// record key.
    #[error("tombstone (null value){0}")]
    Tombstone(&'static str),
    /// The header that should carry the id is missing.
    #[error("missing header {0}")]
    MissingHeader(String),
    /// The message has no key.
    #[error("message has no key")]
    NoKey,
    /// The message has no payload.
    #[error("message has no payload")]
    NoPayload,
    /// The id itself was refused (empty, or over the length limit).
    #[error("{0}")]
    Refused(String),
}

fn parse_json(payload: &[u8]) -> Result<Value, InvalidId> {
    serde_json::from_slice(payload).map_err(|e| InvalidId::Json(e.to_string()))
}

/// The id from JSON `pointers` into `doc`: one pointer gives the value's
/// bytes, several a [`compose`]d id.
pub fn json_id(doc: &Value, pointers: &[String]) -> Result<Vec<u8>, InvalidId> {
    if let [pointer] = pointers {
        return part(doc, pointer);
    }
    let mut id = Vec::with_capacity(64);
    for pointer in pointers {
        push_part(&mut id, &part(doc, pointer)?);
    }
    Ok(id)
}

/// A string's own bytes; any other JSON value as compact JSON text (object
/// keys sorted, so the same value always gives the same bytes).
fn part(doc: &Value, pointer: &str) -> Result<Vec<u8>, InvalidId> {
    match doc.pointer(pointer) {
        None => Err(InvalidId::MissingKey(pointer.to_owned())),
        Some(Value::Null) => Err(InvalidId::NullKey(pointer.to_owned())),
        Some(v) => Ok(value_bytes(v)),
    }
}

fn value_bytes(v: &Value) -> Vec<u8> {
    match v {
        Value::String(s) => s.as_bytes().to_vec(),
        v => v.to_string().into_bytes(),
    }
}

/// A composite id: each part as a `u32` little-endian length, then its
/// bytes, so `("ab", "c")` and `("a", "bc")` stay different ids.
pub fn compose<'p>(parts: impl IntoIterator<Item = &'p [u8]>) -> Vec<u8> {
    let mut id = Vec::with_capacity(64);
    for p in parts {
        push_part(&mut id, p);
    }
    id
}

fn push_part(id: &mut Vec<u8>, part: &[u8]) {
    id.extend_from_slice(&(part.len() as u32).to_le_bytes());
    id.extend_from_slice(part);
}

/// Tags the first part of a Debezium id, so it can never equal a plain
/// composite of the same values.
const DEBEZIUM_TAG: &[u8] = b"seen:debezium:1";

/// The identity of a Debezium change event, from its JSON value (the
/// envelope with `schema`/`payload`, or the bare payload):
///
/// 1. the **source position**: `source.lsn` and `source.txId` for
///    PostgreSQL connectors; `source.file`, `source.pos` and `source.row`
///    for MySQL; otherwise the whole `source` block;
/// 2. the **table**: `source.db`, `source.schema`, `source.table`
///    (whichever are present);
/// 3. the **operation** `op` (`c`, `u`, `d`, `r`, `t`, `m`);
/// 4. the **row key**: the record key when there is one (Kafka). Without
///    one, snapshot rows (`op = "r"`, which all share one position) use
///    their row image (`after`); streaming events need no more than their
///    position.
///
/// A redelivered event (a connector restart, a consumer rebalance) has the
/// same four parts, whatever its envelope `ts_ms` says. A tombstone (a
/// `null` value) is keyed on the record key alone, or refused, by
/// `tombstones`.
pub fn debezium_id(
    payload: &[u8],
    record_key: Option<&[u8]>,
    tombstones: Tombstones,
) -> Result<Vec<u8>, InvalidId> {
    let trimmed = payload.trim_ascii();
    if trimmed.is_empty() || trimmed == b"null" {
        return match (tombstones, record_key) {
            (Tombstones::Skip, _) => Err(InvalidId::Tombstone("")),
            (Tombstones::Id, None) => Err(InvalidId::Tombstone(" without a record key")),
            (Tombstones::Id, Some(key)) => {
                Ok(compose([DEBEZIUM_TAG, b"tombstone".as_slice(), key]))
            }
        };
    }
    if let Some(id) = streamed_debezium_id(trimmed, record_key, tombstones) {
        return Ok(id);
    }
    debezium_id_of_value(trimmed, record_key, tombstones)
}

/// [`debezium_id`] from the whole event parsed into a `Value`: the
/// reference reading, used for what [`streamed_debezium_id`] leaves (every
/// error, with its exact reason).
pub(crate) fn debezium_id_of_value(
    trimmed: &[u8],
    record_key: Option<&[u8]>,
    tombstones: Tombstones,
) -> Result<Vec<u8>, InvalidId> {
    let doc = parse_json(trimmed)?;
    let event = match doc.get("payload") {
        // The JSON converter's envelope: {"schema": …, "payload": …}.
        Some(p) if doc.get("schema").is_some() => p,
        _ => &doc,
    };
    if event.is_null() {
        return debezium_id(b"null", record_key, tombstones);
    }
    let source = event
        .get("source")
        .filter(|s| s.is_object())
        .ok_or(InvalidId::NotDebezium("no source block"))?;
    let op = event
        .get("op")
        .and_then(Value::as_str)
        .ok_or(InvalidId::NotDebezium("no op"))?;
    let field = |name: &str| source.get(name).filter(|v| !v.is_null()).map(value_bytes);
    let whole = || Some(value_bytes(source));
    let after = || Ok(event.get("after").filter(|v| !v.is_null()).cloned());
    debezium_parts(&field, &whole, op, record_key, after)?
        .ok_or(InvalidId::NotDebezium("no source block"))
}

/// The id from the parts [`debezium_id`] reads: `field` gives a `source`
/// member's bytes (absent or null: `None`), `whole_source` the whole block
/// (`None` when the reader did not keep it: then `Ok(None)`), and `after`
/// the row image (when present and not null), asked for only when needed.
fn debezium_parts(
    field: &dyn Fn(&str) -> Option<Vec<u8>>,
    whole_source: &dyn Fn() -> Option<Vec<u8>>,
    op: &str,
    record_key: Option<&[u8]>,
    after: impl FnOnce() -> Result<Option<Value>, InvalidId>,
) -> Result<Option<Vec<u8>>, InvalidId> {
    let mut id = Vec::with_capacity(128);
    push_part(&mut id, DEBEZIUM_TAG);
    if let Some(lsn) = field("lsn") {
        push_part(&mut id, b"pg");
        push_part(&mut id, &lsn);
        push_part(&mut id, &field("txId").unwrap_or_default());
    } else if let (Some(file), Some(pos)) = (field("file"), field("pos")) {
        push_part(&mut id, b"mysql");
        push_part(&mut id, &file);
        push_part(&mut id, &pos);
        push_part(&mut id, &field("row").unwrap_or_default());
    } else {
        let Some(whole) = whole_source() else {
            return Ok(None);
        };
        push_part(&mut id, b"source");
        push_part(&mut id, &whole);
    }
    for name in ["db", "schema", "table"] {
        push_part(&mut id, &field(name).unwrap_or_default());
    }
    push_part(&mut id, op.as_bytes());
    match record_key {
        Some(key) => push_part(&mut id, key),
        None if op == "r" => {
            let row = after()?.ok_or(InvalidId::NotDebezium(
                "snapshot row without an after image",
            ))?;
            push_part(&mut id, &value_bytes(&row));
        }
        None => push_part(&mut id, b""),
    }
    Ok(Some(id))
}

/// [`debezium_id`] in one pass over the JSON that builds only what an id
/// reads: the `source` block and `op` as values, the envelope's `payload`
/// and the `after` image kept as text (parsed only for a snapshot row
/// without a record key), and everything else (`before`, `after`, the
/// envelope's `schema`, …: most of an event's bytes) skipped: `seen
/// filter --id debezium` ran 1.8 times as fast as with the whole event
/// parsed into a `Value` (`docs/benchmarks.md`). `None` for anything it does not settle with an
/// id, which the `Value` reading then decides, errors included: so an id
/// read here is always the one the `Value` reading gives (the
/// `event_ids` fuzz target checks that).
fn streamed_debezium_id(
    trimmed: &[u8],
    record_key: Option<&[u8]>,
    tombstones: Tombstones,
) -> Option<Vec<u8>> {
    let doc: EventFields<'_> = serde_json::from_slice(trimmed).ok()?;
    let inner;
    let event = match doc.payload {
        Some(payload) if doc.schema => {
            if payload.get().trim() == "null" {
                return debezium_id(b"null", record_key, tombstones).ok();
            }
            inner = serde_json::from_str::<EventFields<'_>>(payload.get()).ok()?;
            &inner
        }
        _ => &doc,
    };
    let source = event.source.as_ref()?;
    let op = event.op.as_ref().and_then(Value::as_str)?;
    let field = |name: &str| source.get(name).map(value_bytes);
    let after = || match event.after {
        Some(raw) if raw.get().trim() != "null" => serde_json::from_str(raw.get())
            .map(Some)
            .map_err(|e| InvalidId::Json(e.to_string())),
        _ => Ok(None),
    };
    // A source block without a position the reader knows is taken whole:
    // the `Value` reading has it.
    debezium_parts(&field, &|| None, op, record_key, after).ok()?
}

/// The members of a JSON object [`streamed_debezium_id`] reads. A member
/// that repeats keeps its last value, as in a parsed `Value`.
#[derive(Default)]
struct EventFields<'a> {
    /// A `schema` member is there (whatever its value).
    schema: bool,
    payload: Option<&'a RawValue>,
    source: Option<SourceFields>,
    op: Option<Value>,
    after: Option<&'a RawValue>,
}

/// The members of a `source` block an id reads (a JSON object; anything
/// else fails, and the `Value` reading takes the event). Last value wins.
#[derive(Default)]
struct SourceFields {
    lsn: Option<Value>,
    tx_id: Option<Value>,
    file: Option<Value>,
    pos: Option<Value>,
    row: Option<Value>,
    db: Option<Value>,
    schema: Option<Value>,
    table: Option<Value>,
}

impl SourceFields {
    /// The member called `name`, unless absent or null.
    fn get(&self, name: &str) -> Option<&Value> {
        let v = match name {
            "lsn" => &self.lsn,
            "txId" => &self.tx_id,
            "file" => &self.file,
            "pos" => &self.pos,
            "row" => &self.row,
            "db" => &self.db,
            "schema" => &self.schema,
            "table" => &self.table,
            _ => &None,
        };
        v.as_ref().filter(|v| !v.is_null())
    }
}

impl<'de> Deserialize<'de> for SourceFields {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Members;
        impl<'de> Visitor<'de> for Members {
            type Value = SourceFields;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a source block")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut s = SourceFields::default();
                while let Some(key) = map.next_key::<&'de str>()? {
                    let slot = match key {
                        "lsn" => &mut s.lsn,
                        "txId" => &mut s.tx_id,
                        "file" => &mut s.file,
                        "pos" => &mut s.pos,
                        "row" => &mut s.row,
                        "db" => &mut s.db,
                        "schema" => &mut s.schema,
                        "table" => &mut s.table,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                            continue;
                        }
                    };
                    *slot = Some(map.next_value()?);
                }
                Ok(s)
            }
        }
        d.deserialize_map(Members)
    }
}

impl<'de> Deserialize<'de> for EventFields<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Members;
        impl<'de> Visitor<'de> for Members {
            type Value = EventFields<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut fields = EventFields::default();
                // Keys borrowed from the input: one with an escape in it
                // fails here, and the `Value` reading takes the event.
                while let Some(key) = map.next_key::<&'de str>()? {
                    match key {
                        "schema" => {
                            map.next_value::<IgnoredAny>()?;
                            fields.schema = true;
                        }
                        "payload" => fields.payload = Some(map.next_value()?),
                        "source" => fields.source = Some(map.next_value()?),
                        "op" => fields.op = Some(map.next_value()?),
                        "after" => fields.after = Some(map.next_value()?),
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(fields)
            }
        }
        d.deserialize_map(Members)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The streamed reading gives the `Value` reading's id for every event
    /// of the sample (a PostgreSQL snapshot and stream, in the bare form),
    /// the same events in the JSON converter's envelope, with and without
    /// a record key, and a few shapes it must leave to the `Value` reading.
    #[test]
    fn the_streamed_debezium_reading_matches_the_value_reading() {
        let sample = include_str!("../../examples/debezium-sample.ndjson");
        let mut streamed = 0;
        let check = |doc: &str, key: Option<&[u8]>| {
            let reference = debezium_id_of_value(doc.trim().as_bytes(), key, Tombstones::Id);
            let fast = streamed_debezium_id(doc.trim().as_bytes(), key, Tombstones::Id);
            if let Some(fast) = &fast {
                assert_eq!(Ok(fast), reference.as_ref(), "{doc}");
            }
            assert_eq!(
                debezium_id(doc.as_bytes(), key, Tombstones::Id),
                reference,
                "{doc}"
            );
            fast.is_some()
        };
        for line in sample.lines().take(2000) {
            let envelope = format!(r#"{{"schema":{{"type":"struct"}},"payload":{line}}}"#);
            for doc in [line, envelope.as_str()] {
                for key in [None, Some(&br#"{"id":1}"#[..])] {
                    streamed += check(doc, key) as usize;
                }
            }
        }
        assert_eq!(
            streamed,
            2000 * 4,
            "every sample event is read the fast way"
        );
        for doc in [
            r#"{"op":"c","op":"r","source":{"lsn":1},"after":{"b":1,"a":2}}"#,
            r#"{"schema":null,"payload":null}"#,
            r#"{"schema":1,"payload":{"source":{"file":"f","pos":3},"op":"u"}}"#,
            r#"{"source":{"table":"t","x":[1,2]},"op":"d"}"#,
            r#"{"source":{"lsn":null,"txId":7},"op":"r","after":null}"#,
            r#"{"source":"s","op":"c"}"#,
            r#"{"\u0073ource":{"lsn":1},"op":"c"}"#,
            r#"[1,2]"#,
            r#"{"source":{"lsn":1},"op":"c","before":{"a":[[[{"b":"\u00e9"}]]]}}"#,
            r#"{"source":{"lsn":1e3},"op":"c"} "#,
        ] {
            for key in [None, Some(&b"k"[..])] {
                check(doc, key);
            }
        }
    }

    fn json(keys: &[&str], doc: &str) -> Result<Vec<u8>, InvalidId> {
        let spec = IdSpec::Json(keys.iter().map(|k| k.to_string()).collect());
        spec.id_of(doc.as_bytes(), None).map(Cow::into_owned)
    }

    #[test]
    fn composite_ids_are_unambiguous_and_stable() {
        let x = json(&["/a", "/b"], r#"{"a":"ab","b":"c"}"#).unwrap();
        let y = json(&["/a", "/b"], r#"{"a":"a","b":"bc"}"#).unwrap();
        assert_ne!(x, y);
        // The encoding is on disk (as fingerprints): pin it.
        assert_eq!(x, b"\x02\0\0\0ab\x01\0\0\0c");
        assert_eq!(json(&["/n"], r#"{"n":42}"#).unwrap(), b"42");
        assert_eq!(
            json(&["/o"], r#"{"o":{"b":1,"a":2}}"#).unwrap(),
            br#"{"a":2,"b":1}"#
        );
    }

    #[test]
    fn json_errors_name_the_problem() {
        assert_eq!(
            json(&["/n"], r#"{"m":1}"#),
            Err(InvalidId::MissingKey("/n".into()))
        );
        assert_eq!(
            json(&["/n"], r#"{"n":null}"#),
            Err(InvalidId::NullKey("/n".into()))
        );
        assert!(matches!(json(&["/n"], "{nope"), Err(InvalidId::Json(_))));
        assert!(IdSpec::parse("json:id").is_err());
        assert_eq!(
            IdSpec::parse("json:/a,/b").unwrap(),
            IdSpec::Json(vec!["/a".into(), "/b".into()])
        );
        assert!(IdSpec::parse("nope").is_err());
    }

    fn dbz(doc: &str) -> Vec<u8> {
        debezium_id(doc.as_bytes(), None, Tombstones::Id).unwrap()
    }

    #[test]
    fn debezium_snapshot_rows_sharing_a_position_differ() {
        let a = r#"{"before":null,"after":{"id":1},"source":{"table":"t","lsn":5,"txId":9,"snapshot":"true"},"op":"r","ts_ms":1}"#;
        let b = r#"{"before":null,"after":{"id":2},"source":{"table":"t","lsn":5,"txId":9,"snapshot":"true"},"op":"r","ts_ms":1}"#;
        assert_ne!(dbz(a), dbz(b));
        // A redelivery differs only in the envelope's ts_ms.
        assert_eq!(dbz(a), dbz(&a.replace(r#""ts_ms":1"#, r#""ts_ms":2"#)));
    }

    #[test]
    fn debezium_envelope_and_bare_payload_agree() {
        let bare = r#"{"after":{"id":1},"source":{"table":"t","lsn":7,"txId":3},"op":"c"}"#;
        let wrapped = format!(r#"{{"schema":{{"type":"struct"}},"payload":{bare}}}"#);
        assert_eq!(dbz(bare), dbz(&wrapped));
    }

    #[test]
    fn debezium_positions_tables_ops_and_keys() {
        let pg = |lsn: u64, table: &str, op: &str| {
            dbz(&format!(
                r#"{{"source":{{"schema":"public","table":"{table}","lsn":{lsn},"txId":1}},"op":"{op}"}}"#
            ))
        };
        assert_ne!(pg(1, "a", "c"), pg(2, "a", "c"));
        assert_ne!(pg(1, "a", "c"), pg(1, "b", "c"));
        assert_ne!(pg(1, "a", "d"), pg(1, "a", "c"));
        let mysql = |row: u64| {
            dbz(&format!(
                r#"{{"source":{{"db":"shop","table":"t","file":"binlog.000003","pos":154,"row":{row}}},"op":"c"}}"#
            ))
        };
        assert_ne!(mysql(0), mysql(1));
        let doc = br#"{"source":{"table":"t","lsn":1},"op":"c"}"#;
        let k1 = debezium_id(doc, Some(br#"{"id":1}"#), Tombstones::Id).unwrap();
        let k2 = debezium_id(doc, Some(br#"{"id":2}"#), Tombstones::Id).unwrap();
        assert_ne!(k1, k2);
    }

    #[test]
    fn debezium_bad_input_and_tombstones() {
        let bad = |doc: &str| debezium_id(doc.as_bytes(), None, Tombstones::Id).unwrap_err();
        assert!(matches!(bad(r#"{"op":"c"}"#), InvalidId::NotDebezium(_)));
        assert!(matches!(
            bad(r#"{"source":1,"op":"c"}"#),
            InvalidId::NotDebezium(_)
        ));
        assert!(matches!(bad(r#"{"source":{}}"#), InvalidId::NotDebezium(_)));
        assert!(matches!(bad(r#"{"source":{"lsn":1"#), InvalidId::Json(_)));
        assert!(matches!(bad("null"), InvalidId::Tombstone(_)));
        let t = debezium_id(b"", Some(b"k"), Tombstones::Id).unwrap();
        assert_ne!(t, debezium_id(b"", Some(b"j"), Tombstones::Id).unwrap());
        assert!(debezium_id(b"", Some(b"k"), Tombstones::Skip).is_err());
        let envelope_tombstone = br#"{"schema":null,"payload":null}"#;
        assert_eq!(
            debezium_id(envelope_tombstone, Some(b"k"), Tombstones::Id).unwrap(),
            t
        );
    }
}
