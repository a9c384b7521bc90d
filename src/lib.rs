#![doc = include_str!("../README.md")]
#![deny(unsafe_code)]
#![warn(missing_docs)]

mod config;
mod engine;
mod error;
mod fingerprint;
pub mod guard;
pub mod metrics;
mod prefetch;
mod set;
mod stats;
mod sync;
pub mod ttl;
pub mod wal;

/// Entry points for the fuzz targets in `fuzz/` (built with `--cfg fuzzing`).
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzzing;

pub use config::Config;
pub use engine::{
    Deferred, Engine, EngineBuilder, MemoryPolicy, PendingMark, Stats, Verdict, DEFAULT_MAX_ID_LEN,
    DEFAULT_TTL, MAX_ID_LEN_LIMIT,
};
pub use error::{Error, Result};
pub use fingerprint::{Fingerprint, Fingerprinter, Secret};
pub use ttl::clock::{Clock, ManualClock, SystemClock};
pub use wal::recovery::RecoveryReport;
pub use wal::{Durability, RecoveryMode};
