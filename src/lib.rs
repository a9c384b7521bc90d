#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(unsafe_code)]
#![warn(missing_docs)]

#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub mod checkpoint;
pub mod config;
mod engine;
mod error;
mod fingerprint;
#[cfg(feature = "guard")]
#[cfg_attr(docsrs, doc(cfg(feature = "guard")))]
pub mod guard;
#[cfg(feature = "kafka")]
#[cfg_attr(docsrs, doc(cfg(feature = "kafka")))]
pub mod kafka;
#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub mod metrics;
mod prefetch;
mod set;
pub mod stage;
mod stats;
mod sync;
pub mod ttl;
mod wal;

/// Read-only looks at a state directory: `seen inspect` and `seen verify`
/// as library calls.
pub use wal::inspect;

/// Entry points for the fuzz targets in `fuzz/` (built with `--cfg fuzzing`).
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzzing;

pub use config::Config;
pub use engine::{
    Deferred, Durability, Engine, EngineBuilder, LogPosition, PendingMark, Stats,
    DEFAULT_MAX_ID_LEN, DEFAULT_TTL, MAX_ID_LEN_LIMIT, MAX_METADATA_LEN,
};
pub use error::{Error, Result};
pub use fingerprint::{Fingerprint, Fingerprinter, Secret};
pub use set::{MemoryPolicy, Verdict};
pub use ttl::clock::{Clock, ManualClock, SystemClock};
pub use wal::{RecoveryMode, RecoveryReport};
