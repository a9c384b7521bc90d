//! The one public error type.

use std::path::PathBuf;

/// Everything that can go wrong in `seen`.
///
/// Invalid ids are rejected before they are hashed, so an error never leaves
/// a partial mark behind.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The event id has no bytes.
    #[error("event id is empty")]
    EmptyId,
    /// The event id is longer than the configured limit.
    #[error("event id is {len} bytes, over the limit of {max} bytes")]
    IdTooLong {
        /// Length of the rejected id.
        len: usize,
        /// The configured limit (`EngineBuilder::max_id_len`).
        max: usize,
    },
    /// The memory ceiling was reached and the policy is [`MemoryPolicy::Reject`](crate::MemoryPolicy::Reject).
    /// The id was *not* recorded.
    #[error("memory ceiling of {limit_bytes} bytes reached; id not recorded (policy: reject)")]
    CapacityExceeded {
        /// The configured ceiling.
        limit_bytes: usize,
    },
    /// A builder or environment setting is out of range.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// An I/O error from the operating system.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
