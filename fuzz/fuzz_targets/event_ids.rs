//! Arbitrary events, record keys and `--id` spellings: reading an id never
//! panics, reads the same id twice, a Debezium id that reads is tagged as
//! one (so it can never equal a plain JSON or whole-payload id of the same
//! store by accident of layout), and is the id the reference reading (the
//! whole event parsed into a `Value`) gives.
#![no_main]

use libfuzzer_sys::fuzz_target;
use seen::stage::id::{IdSpec, Tombstones};

/// `len` then that many bytes (as many as there are).
fn take(data: &[u8]) -> (&[u8], &[u8]) {
    match data.split_first() {
        Some((&len, rest)) => rest.split_at((len as usize).min(rest.len())),
        None => (&[], &[]),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let (spelling, rest) = take(rest);
    let (key, payload) = take(rest);
    let key = (flags & 1 == 1).then_some(key);
    let mut specs = vec![
        IdSpec::Whole,
        IdSpec::Debezium(Tombstones::Id),
        IdSpec::Debezium(Tombstones::Skip),
    ];
    // Any spelling parses or is refused with a message; never a panic.
    if let Ok(spelling) = std::str::from_utf8(spelling) {
        match IdSpec::parse(spelling) {
            Ok(spec) => specs.push(spec),
            Err(why) => assert!(!why.is_empty()),
        }
    }
    for spec in &specs {
        let first = spec.id_of(payload, key).map(|id| id.into_owned());
        let again = spec.id_of(payload, key).map(|id| id.into_owned());
        assert_eq!(first, again, "{spec:?} reads one id");
        if let (IdSpec::Debezium(_), Ok(id)) = (spec, &first) {
            // The composite's first part is the tag, length-prefixed.
            let tag = b"seen:debezium:1";
            assert!(id.len() > 4 + tag.len(), "{id:?}");
            assert_eq!(&id[4..4 + tag.len()], tag, "{id:?}");
        }
        if let Err(why) = &first {
            assert!(!why.to_string().is_empty());
        }
        // The streamed Debezium reading never gives an id the reference
        // reading (the whole event as a `Value`) would not: stored marks
        // stay reachable.
        if let IdSpec::Debezium(tombstones) = spec {
            if let Ok(reference) = seen::fuzzing::debezium_id_of_value(payload, key, *tombstones) {
                assert_eq!(first.as_ref(), Ok(&reference), "{spec:?}");
            }
        }
    }
});
