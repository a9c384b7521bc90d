//! Event ids → 128-bit fingerprints.
//!
//! The fingerprint is **SipHash-1-3 with 128-bit output** (Aumasson and
//! Bernstein's construction with c = 1 compression and d = 3 finalization
//! rounds, in its 128-bit output mode) of the raw id bytes, keyed by the
//! store's 128-bit [`Secret`]. The key's first eight bytes, read as a
//! little-endian `u64`, are `k0`, the last eight `k1`; the output is the
//! little-endian `u128` `h1 | h2 << 64`. The function is fixed by golden test
//! vectors (see `tests/fingerprint_vectors.rs`) and never changes within a
//! disk-format version: fingerprints are persisted.
//!
//! Why keyed: ids come from outside. With a public hash anyone could craft
//! two ids with one fingerprint, and the second would be silently dropped as
//! a "duplicate". The secret is random per store.

use std::hash::Hasher;

use siphasher::sip128::{Hasher128, SipHasher13};

/// A 128-bit fingerprint of an event id.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub u128);

impl Fingerprint {
    /// Low 64 bits: they pick the slot inside a shard.
    #[inline]
    pub fn lo(self) -> u64 {
        self.0 as u64
    }
    /// High 64 bits: their top bits pick the shard.
    #[inline]
    pub fn hi(self) -> u64 {
        (self.0 >> 64) as u64
    }
    /// The fingerprint as 16 little-endian bytes (its on-disk form).
    pub fn to_le_bytes(self) -> [u8; 16] {
        self.0.to_le_bytes()
    }
    /// Inverse of [`Fingerprint::to_le_bytes`].
    pub fn from_le_bytes(bytes: [u8; 16]) -> Self {
        Fingerprint(u128::from_le_bytes(bytes))
    }
}

impl std::fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fingerprint({:032x})", self.0)
    }
}

/// The 128-bit key of the fingerprint function.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Secret([u8; 16]);

impl Secret {
    /// A secret from explicit bytes (for tests, or to share fingerprints
    /// between stores on purpose).
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        Secret(bytes)
    }
    /// A fresh secret from the operating system's random source.
    pub fn random() -> std::io::Result<Self> {
        let mut bytes = [0u8; 16];
        getrandom::getrandom(&mut bytes).map_err(std::io::Error::other)?;
        Ok(Secret(bytes))
    }
    /// The raw key bytes (persisted in the store header).
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key itself.
        f.write_str("Secret(..)")
    }
}

/// Computes fingerprints with one secret. Cheap to copy.
#[derive(Clone, Copy, Debug)]
pub struct Fingerprinter {
    k0: u64,
    k1: u64,
}

impl Fingerprinter {
    /// A fingerprinter keyed by `secret`.
    pub fn new(secret: &Secret) -> Self {
        let (a, b) = secret.0.split_at(8);
        let mut k0 = [0u8; 8];
        let mut k1 = [0u8; 8];
        k0.copy_from_slice(a);
        k1.copy_from_slice(b);
        Fingerprinter {
            k0: u64::from_le_bytes(k0),
            k1: u64::from_le_bytes(k1),
        }
    }

    /// The fingerprint of `id`. Does not validate the id's length; the engine
    /// does that first.
    #[inline]
    pub fn fingerprint(&self, id: &[u8]) -> Fingerprint {
        let mut h = SipHasher13::new_with_keys(self.k0, self.k1);
        h.write(id);
        Fingerprint(h.finish128().as_u128())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn different_secrets_give_different_fingerprints() {
        let a = Fingerprinter::new(&Secret::from_bytes([1; 16]));
        let b = Fingerprinter::new(&Secret::from_bytes([2; 16]));
        assert_ne!(a.fingerprint(b"order-1"), b.fingerprint(b"order-1"));
        assert_eq!(a.fingerprint(b"order-1"), a.fingerprint(b"order-1"));
        assert_ne!(a.fingerprint(b"order-1"), a.fingerprint(b"order-2"));
    }

    #[test]
    fn random_secrets_differ() {
        assert_ne!(Secret::random().unwrap(), Secret::random().unwrap());
    }

    #[test]
    fn bytes_roundtrip() {
        let f = Fingerprint(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210);
        assert_eq!(Fingerprint::from_le_bytes(f.to_le_bytes()), f);
        assert_eq!(f.lo(), 0xfedc_ba98_7654_3210);
        assert_eq!(f.hi(), 0x0123_4567_89ab_cdef);
    }
}
