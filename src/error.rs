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
    /// Metadata given to `mark_processed` is larger than allowed.
    #[error("metadata is {len} bytes of JSON, over the limit of {max} bytes")]
    MetadataTooLarge {
        /// Its size as compact JSON.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A builder or environment setting is out of range.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Another process (or another open in this process) holds the state
    /// directory.
    #[error("state directory {path} is in use by another process (lock held on its LOCK file)")]
    Locked {
        /// The state directory.
        path: PathBuf,
    },
    /// Bytes on disk are not what `seen` wrote. Nothing was changed.
    #[error("corruption in {file} at offset {offset}: {reason}")]
    Corruption {
        /// The damaged file.
        file: PathBuf,
        /// Byte offset of the damage.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A file from a newer (or unknown) format version.
    #[error("{file} has format version {version}, which this build of seen cannot read")]
    UnsupportedVersion {
        /// The file.
        file: PathBuf,
        /// Its format version.
        version: u32,
    },
    /// An earlier write or sync of the log failed. The engine refuses all
    /// further marks: after a failed fsync the state of the page cache is
    /// unknown, and retrying as if nothing happened can lose data. Reopen
    /// the store to recover from what is on disk.
    #[error("the log is poisoned by an earlier failure ({reason}); reopen the store")]
    Poisoned {
        /// The original failure.
        reason: String,
    },
    /// The operating system refused a resource that is not a file: random
    /// bytes for a new store's id and secret, or a background thread.
    #[error("could not get {what} from the operating system: {source}")]
    System {
        /// What was asked for.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
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
