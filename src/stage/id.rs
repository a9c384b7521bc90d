//! Event ids: which bytes of an event are fingerprinted.
//!
//! The encodings here decide which fingerprints land on disk, so they are
//! part of the stable format: a single JSON pointer yields the value's own
//! bytes, several are a length-prefixed composite ([`compose`]), and a
//! Debezium id is a tagged composite ([`debezium_id`]). Changing any of
//! them would make every stored mark unreachable.

use std::borrow::Cow;

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

    let mut id = Vec::with_capacity(128);
    push_part(&mut id, DEBEZIUM_TAG);
    let field = |name: &str| source.get(name).filter(|v| !v.is_null()).map(value_bytes);
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
        push_part(&mut id, b"source");
        push_part(&mut id, &value_bytes(source));
    }
    for name in ["db", "schema", "table"] {
        push_part(&mut id, &field(name).unwrap_or_default());
    }
    push_part(&mut id, op.as_bytes());
    match record_key {
        Some(key) => push_part(&mut id, key),
        None if op == "r" => {
            let row = event
                .get("after")
                .filter(|v| !v.is_null())
                .ok_or(InvalidId::NotDebezium(
                    "snapshot row without an after image",
                ))?;
            push_part(&mut id, &value_bytes(row));
        }
        None => push_part(&mut id, b""),
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

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
