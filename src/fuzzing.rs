//! Fuzzing seams: an in-memory disk that can crash, and engines on it.

use std::sync::Arc;
use std::time::Duration;

pub use crate::wal::sim::Fate;
use crate::wal::sim::SimDisk;
use crate::wal::storage::Storage;
use crate::{Durability, Engine, ManualClock, PendingMark, RecoveryMode, Result};

/// A simulated disk.
#[derive(Clone)]
pub struct Disk(Arc<SimDisk>);

impl Default for Disk {
    fn default() -> Self {
        Disk(SimDisk::new())
    }
}

impl Disk {
    /// The disk a power loss leaves behind.
    pub fn crash(&self, fate: impl FnMut() -> Fate) -> Disk {
        Disk(self.0.crash(fate))
    }
    /// File names.
    pub fn files(&self) -> Vec<String> {
        self.0.list().unwrap_or_default()
    }
    /// A file's bytes.
    pub fn read(&self, name: &str) -> Vec<u8> {
        self.0.read(name).map(|b| b.to_vec()).unwrap_or_default()
    }
    /// Replace a file's bytes (both images).
    pub fn write(&self, name: &str, bytes: &[u8]) {
        let _ = self.0.write_atomic(name, bytes);
    }
    /// Open an engine on this disk (4 KiB segments, manual clock).
    pub fn open(&self, durability: Durability, mode: RecoveryMode) -> Result<Engine> {
        Engine::builder()
            .ttl(Duration::from_secs(3600))
            .segment_size(4096)
            .durability(durability)
            .recovery_mode(mode)
            .clock(Arc::new(ManualClock::new(1_800_000_000)))
            .background_sweep(false)
            .open_storage(self.0.clone())
    }
}

/// Drop `engine` the way a power loss would: no final sync.
pub fn power_loss(engine: Engine) {
    engine.abandon();
}

/// Log pending marks without waiting for them to be durable.
pub fn commit_without_waiting(engine: &Engine, marks: &[PendingMark]) {
    engine.commit_without_waiting(marks);
}

/// The reference reading of a Debezium id (the whole event parsed into a
/// `Value`), to check `seen::stage::id::debezium_id`'s streamed reading
/// against.
pub fn debezium_id_of_value(
    payload: &[u8],
    record_key: Option<&[u8]>,
    tombstones: crate::stage::id::Tombstones,
) -> std::result::Result<Vec<u8>, crate::stage::id::InvalidId> {
    crate::stage::id::debezium_id_of_value(payload.trim_ascii(), record_key, tombstones)
}
