//! Shared by the criterion bench and the memory example: the id stream and
//! the structures compared side by side.
#![allow(dead_code)]

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hash};
use std::sync::RwLock;
use std::time::Duration;

use seen::{Engine, Fingerprint, Verdict};

/// Keys resident before measuring.
pub const RESIDENT: u64 = 10_000_000;

#[inline]
pub fn mix64(mut x: u64) -> u64 {
    // splitmix64 finalizer
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The n-th id as a 36-byte UUID string (formatted on the fly: same cost for
/// every structure, no giant id array in memory).
#[inline]
pub fn uuid(n: u64, out: &mut [u8; 36]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bits = (mix64(n) as u128) << 64 | mix64(n ^ 0x5555_5555_5555_5555) as u128;
    let mut j = 0;
    for (i, o) in out.iter_mut().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) {
            *o = b'-';
        } else {
            *o = HEX[((bits >> (124 - 4 * j)) & 0xf) as usize];
            j += 1;
        }
    }
}

/// The id used by the k-th operation of a stream: every 4th op repeats a
/// resident id (a duplicate); the others take fresh ids from `fresh`.
#[inline]
pub fn stream_id(k: u64, fresh_base: u64) -> u64 {
    if k % 4 == 3 {
        mix64(k ^ 0xabcdef) % RESIDENT
    } else {
        fresh_base + k
    }
}

/// A deduplicating set under test.
pub trait Dedup: Sync {
    /// Insert if absent; true when new.
    fn insert(&self, id: &[u8]) -> bool;
    fn contains(&self, id: &[u8]) -> bool;
}

/// Same, for pre-hashed keys (u64 for peers, 128-bit fingerprint for seen).
pub trait DedupHashed: Sync {
    fn insert_hashed(&self, n: u64) -> bool;
    fn contains_hashed(&self, n: u64) -> bool;
}

pub fn seen_engine() -> Engine {
    let builder = Engine::builder().ttl(Duration::from_secs(24 * 3600));
    // SEEN_BENCH_PRESIZE=1: size for the whole run up front (what a user
    // who sets `capacity` gets); default: grow from empty like the peers.
    match std::env::var("SEEN_BENCH_PRESIZE") {
        Ok(_) => builder.capacity(4 * RESIDENT as usize).build().unwrap(),
        Err(_) => builder.build().unwrap(),
    }
}

impl Dedup for Engine {
    #[inline]
    fn insert(&self, id: &[u8]) -> bool {
        self.check_and_insert(id).unwrap() == Verdict::New
    }
    #[inline]
    fn contains(&self, id: &[u8]) -> bool {
        Engine::contains(self, id).unwrap()
    }
}

/// Pre-made fingerprints: the n-th key's fingerprint is 128 mixed bits.
#[inline]
pub fn fp(n: u64) -> Fingerprint {
    Fingerprint((mix64(n) as u128) << 64 | mix64(n ^ 0x1234) as u128)
}

impl DedupHashed for Engine {
    #[inline]
    fn insert_hashed(&self, n: u64) -> bool {
        self.check_and_insert_fingerprint(fp(n)).unwrap() == Verdict::New
    }
    #[inline]
    fn contains_hashed(&self, n: u64) -> bool {
        self.contains_fingerprint(fp(n))
    }
}

/// `DashMap<String, Instant>`-style: what services ship today.
pub struct DashString(pub dashmap::DashSet<String>);
impl Dedup for DashString {
    fn insert(&self, id: &[u8]) -> bool {
        self.0.insert(String::from_utf8_lossy(id).into_owned())
    }
    fn contains(&self, id: &[u8]) -> bool {
        self.0.contains(std::str::from_utf8(id).unwrap())
    }
}
pub struct DashU64(pub dashmap::DashSet<u64>);
impl DedupHashed for DashU64 {
    fn insert_hashed(&self, n: u64) -> bool {
        self.0.insert(mix64(n))
    }
    fn contains_hashed(&self, n: u64) -> bool {
        self.0.contains(&mix64(n))
    }
}

pub struct SccString(pub scc::HashSet<String>);
impl Dedup for SccString {
    fn insert(&self, id: &[u8]) -> bool {
        self.0
            .insert(String::from_utf8_lossy(id).into_owned())
            .is_ok()
    }
    fn contains(&self, id: &[u8]) -> bool {
        self.0.contains(std::str::from_utf8(id).unwrap())
    }
}
pub struct SccU64(pub scc::HashSet<u64>);
impl DedupHashed for SccU64 {
    fn insert_hashed(&self, n: u64) -> bool {
        self.0.insert(mix64(n)).is_ok()
    }
    fn contains_hashed(&self, n: u64) -> bool {
        self.0.contains(&mix64(n))
    }
}

pub struct PapayaString(pub papaya::HashSet<String>);
impl Dedup for PapayaString {
    fn insert(&self, id: &[u8]) -> bool {
        self.0
            .pin()
            .insert(String::from_utf8_lossy(id).into_owned())
    }
    fn contains(&self, id: &[u8]) -> bool {
        self.0.pin().contains(std::str::from_utf8(id).unwrap())
    }
}
pub struct PapayaU64(pub papaya::HashSet<u64>);
impl DedupHashed for PapayaU64 {
    fn insert_hashed(&self, n: u64) -> bool {
        self.0.pin().insert(mix64(n))
    }
    fn contains_hashed(&self, n: u64) -> bool {
        self.0.pin().contains(&mix64(n))
    }
}

/// moka with a TTL: the "cache with expiry" people reach for.
pub struct Moka(pub moka::sync::Cache<String, ()>);
impl Moka {
    pub fn new() -> Self {
        Moka(
            moka::sync::Cache::builder()
                .time_to_live(Duration::from_secs(24 * 3600))
                .build(),
        )
    }
}
impl Dedup for Moka {
    fn insert(&self, id: &[u8]) -> bool {
        self.0
            .entry(String::from_utf8_lossy(id).into_owned())
            .or_insert(())
            .is_fresh()
    }
    fn contains(&self, id: &[u8]) -> bool {
        self.0.contains_key(std::str::from_utf8(id).unwrap())
    }
}

/// The hand-rolled baseline: 64 shards of `RwLock<hashbrown::HashSet>`.
pub struct ShardedRwLock<K> {
    shards: Vec<RwLock<hashbrown::HashSet<K>>>,
    hasher: RandomState,
}
impl<K: Hash + Eq> ShardedRwLock<K> {
    pub fn new() -> Self {
        ShardedRwLock {
            shards: (0..64).map(|_| RwLock::default()).collect(),
            hasher: RandomState::new(),
        }
    }
    fn shard<Q: Hash + ?Sized>(&self, k: &Q) -> &RwLock<hashbrown::HashSet<K>> {
        &self.shards[(self.hasher.hash_one(k) >> 58) as usize]
    }
}
impl Dedup for ShardedRwLock<String> {
    fn insert(&self, id: &[u8]) -> bool {
        let s = std::str::from_utf8(id).unwrap();
        let shard = self.shard(s);
        if shard.read().unwrap().contains(s) {
            return false;
        }
        shard.write().unwrap().insert(s.to_owned())
    }
    fn contains(&self, id: &[u8]) -> bool {
        let s = std::str::from_utf8(id).unwrap();
        self.shard(s).read().unwrap().contains(s)
    }
}
impl DedupHashed for ShardedRwLock<u64> {
    fn insert_hashed(&self, n: u64) -> bool {
        let k = mix64(n);
        let shard = self.shard(&k);
        if shard.read().unwrap().contains(&k) {
            return false;
        }
        shard.write().unwrap().insert(k)
    }
    fn contains_hashed(&self, n: u64) -> bool {
        let k = mix64(n);
        self.shard(&k).read().unwrap().contains(&k)
    }
}

/// Fill with ids 0..RESIDENT using 2 threads.
pub fn fill(set: &dyn Dedup) {
    std::thread::scope(|s| {
        for t in 0..2u64 {
            s.spawn(move || {
                let mut buf = [0u8; 36];
                for n in (t..RESIDENT).step_by(2) {
                    uuid(n, &mut buf);
                    set.insert(&buf);
                }
            });
        }
    });
}

pub fn fill_hashed(set: &dyn DedupHashed) {
    std::thread::scope(|s| {
        for t in 0..2u64 {
            s.spawn(move || {
                for n in (t..RESIDENT).step_by(2) {
                    set.insert_hashed(n);
                }
            });
        }
    });
}
