//! The fingerprint function is part of the disk format: these vectors must
//! never change within a format version. They are checked three ways:
//! against pinned hex, against an independent reference implementation
//! of SipHash-c-d-128 written out below, and (for that reference) against
//! the SipHash authors' published SipHash-2-4-128 vector.

use seen::{Engine, Fingerprinter, Secret};

/// Straight from the SipHash paper, 128-bit output mode.
fn siphash128_reference(c: usize, d: usize, key: [u8; 16], msg: &[u8]) -> u128 {
    let k0 = u64::from_le_bytes(key[..8].try_into().unwrap());
    let k1 = u64::from_le_bytes(key[8..].try_into().unwrap());
    let mut v = [
        k0 ^ 0x736f6d6570736575,
        k1 ^ 0x646f72616e646f6d ^ 0xee,
        k0 ^ 0x6c7967656e657261,
        k1 ^ 0x7465646279746573,
    ];
    fn round(v: &mut [u64; 4]) {
        v[0] = v[0].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(13);
        v[1] ^= v[0];
        v[0] = v[0].rotate_left(32);
        v[2] = v[2].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(16);
        v[3] ^= v[2];
        v[0] = v[0].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(21);
        v[3] ^= v[0];
        v[2] = v[2].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(17);
        v[1] ^= v[2];
        v[2] = v[2].rotate_left(32);
    }
    let mut blocks = msg.chunks_exact(8);
    for b in blocks.by_ref() {
        let m = u64::from_le_bytes(b.try_into().unwrap());
        v[3] ^= m;
        for _ in 0..c {
            round(&mut v);
        }
        v[0] ^= m;
    }
    let mut last = [0u8; 8];
    let rest = blocks.remainder();
    last[..rest.len()].copy_from_slice(rest);
    last[7] = msg.len() as u8;
    let m = u64::from_le_bytes(last);
    v[3] ^= m;
    for _ in 0..c {
        round(&mut v);
    }
    v[0] ^= m;
    v[2] ^= 0xee;
    for _ in 0..d {
        round(&mut v);
    }
    let h1 = v[0] ^ v[1] ^ v[2] ^ v[3];
    v[1] ^= 0xdd;
    for _ in 0..d {
        round(&mut v);
    }
    let h2 = v[0] ^ v[1] ^ v[2] ^ v[3];
    h1 as u128 | (h2 as u128) << 64
}

const KEY: [u8; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];

#[test]
fn reference_matches_the_published_siphash24_128_vector() {
    // vectors_sip128[0] of the SipHash reference code: key 00..0f, empty input.
    let expected: [u8; 16] = [
        0xa3, 0x81, 0x7f, 0x04, 0xba, 0x25, 0xa8, 0xe6, 0x6d, 0xf6, 0x72, 0x14, 0xc7, 0x55, 0x02,
        0x93,
    ];
    assert_eq!(siphash128_reference(2, 4, KEY, b"").to_le_bytes(), expected);
}

/// (secret, id, fingerprint as 32 hex digits of the little-endian u128)
const GOLDEN: &[(&[u8; 16], &[u8], &str)] = &[
    (&KEY, b"a", "678aae375dd72f49a84f7c63de373c08"),
    (&KEY, b"order-42", "082185ce3f27632e52f4f3178cdf07cd"),
    (
        &KEY,
        b"8c1f7a52-3b7e-4d0e-9a55-2f6c1d9e0b34",
        "de3844c23b4f7fe0adef4fbebcee7002",
    ),
    (
        &KEY,
        b"orders-7-1234567",
        "61dbe859972cc22152bb8827c407b770",
    ),
    (
        &[0xff; 16],
        b"\x00\x01\x02\xff non-utf8 id bytes",
        "fd37901bdbe71fc86bcd3c9d7e946fd4",
    ),
];

#[test]
fn golden_vectors() {
    for (i, (secret, id, hex)) in GOLDEN.iter().enumerate() {
        let fp = Fingerprinter::new(&Secret::from_bytes(**secret)).fingerprint(id);
        let reference = siphash128_reference(1, 3, **secret, id);
        assert_eq!(
            fp.0, reference,
            "vector {i}: siphasher disagrees with the reference"
        );
        assert_eq!(format!("{:032x}", fp.0), *hex, "vector {i} changed");
    }
}

#[test]
fn engine_uses_the_specified_fingerprint() {
    let engine = Engine::builder()
        .secret(Secret::from_bytes(KEY))
        .background_sweep(false)
        .build()
        .unwrap();
    assert_eq!(
        engine.fingerprint("order-42").unwrap().0,
        siphash128_reference(1, 3, KEY, b"order-42")
    );
}
