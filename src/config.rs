//! Service configuration from environment variables (see [`Config`]).

use std::path::PathBuf;
use std::time::Duration;

use crate::{
    Durability, Engine, EngineBuilder, Error, MemoryPolicy, RecoveryMode, Result, DEFAULT_TTL,
};

/// Service configuration from environment variables.
///
/// | variable | meaning | default |
/// |---|---|---|
/// | `SEEN_TTL_SECONDS` (alias `KAFKA_DEDUP_TTL_SECONDS`) | mark lifetime in seconds; `0` disables dedup (every event is new) | 3600 |
/// | `SEEN_STATE_DIR` | state directory; unset = in memory only | unset |
/// | `SEEN_DURABILITY` | `sync`, `none`, `periodic` or `periodic:<duration>` (e.g. `periodic:10ms`) | `sync` |
/// | `SEEN_MAX_ID_LEN` | longest id in bytes | 1024 |
/// | `SEEN_CAPACITY` | expected live ids (pre-sizes memory) | 0 |
/// | `SEEN_MEMORY_LIMIT_BYTES` | memory ceiling for the set | unset |
/// | `SEEN_MEMORY_POLICY` | `reject` or `evict-oldest` at the ceiling | `reject` |
/// | `SEEN_RECOVERY_MODE` | `tolerate-torn-tail`, `absolute-consistency` or `salvage` | `tolerate-torn-tail` |
/// | `SEEN_SHARDS` | shards, a power of two | 64 |
///
/// A bad value is an [`Error::Config`] that names the variable.
///
/// Turn the settings into an engine with [`Config::open`], or adjust
/// [`Config::builder`].
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Config {
    /// Mark lifetime (zero disables dedup).
    pub ttl: Duration,
    /// State directory, if durable.
    pub state_dir: Option<PathBuf>,
    /// Durability of marks.
    pub durability: Durability,
    /// Longest id.
    pub max_id_len: Option<usize>,
    /// Expected live ids.
    pub capacity: Option<usize>,
    /// Memory ceiling and policy.
    pub memory_limit: Option<(usize, MemoryPolicy)>,
    /// Recovery mode.
    pub recovery_mode: RecoveryMode,
    /// Shard count.
    pub shards: Option<usize>,
}

fn bad(var: &str, value: &str, why: impl std::fmt::Display) -> Error {
    Error::Config(format!("{var}={value:?}: {why}"))
}

fn number(var: &str, value: &str) -> Result<u64> {
    value
        .trim()
        .parse::<u64>()
        .map_err(|_| bad(var, value, "expected a whole non-negative number"))
}

impl Config {
    /// Read the process environment.
    pub fn from_env() -> Result<Config> {
        Self::from_vars(std::env::vars())
    }

    /// Read settings from `(name, value)` pairs (unknown names are ignored).
    pub fn from_vars<K: AsRef<str>, V: AsRef<str>>(
        vars: impl IntoIterator<Item = (K, V)>,
    ) -> Result<Config> {
        let mut c = Config {
            ttl: DEFAULT_TTL,
            state_dir: None,
            durability: Durability::Sync,
            max_id_len: None,
            capacity: None,
            memory_limit: None,
            recovery_mode: RecoveryMode::default(),
            shards: None,
        };
        let (mut ttl, mut ttl_alias) = (None, None);
        let (mut limit, mut policy) = (None, MemoryPolicy::default());
        for (k, v) in vars {
            let (k, v) = (k.as_ref(), v.as_ref());
            match k {
                "SEEN_TTL_SECONDS" => ttl = Some(number(k, v)?),
                "KAFKA_DEDUP_TTL_SECONDS" => ttl_alias = Some(number(k, v)?),
                "SEEN_STATE_DIR" if !v.is_empty() => c.state_dir = Some(PathBuf::from(v)),
                "SEEN_DURABILITY" => {
                    c.durability = match v.trim() {
                        "sync" => Durability::Sync,
                        "none" => Durability::None,
                        "periodic" => Durability::Periodic(Duration::from_millis(10)),
                        p => match p.strip_prefix("periodic:") {
                            Some(d) => Durability::Periodic(
                                humantime::parse_duration(d).map_err(|e| bad(k, v, e))?,
                            ),
                            None => {
                                return Err(bad(
                                    k,
                                    v,
                                    "expected sync, none, periodic or periodic:<duration>",
                                ))
                            }
                        },
                    }
                }
                "SEEN_MAX_ID_LEN" => c.max_id_len = Some(number(k, v)? as usize),
                "SEEN_CAPACITY" => c.capacity = Some(number(k, v)? as usize),
                "SEEN_MEMORY_LIMIT_BYTES" => limit = Some(number(k, v)? as usize),
                "SEEN_MEMORY_POLICY" => {
                    policy = match v.trim() {
                        "reject" => MemoryPolicy::Reject,
                        "evict-oldest" => MemoryPolicy::EvictOldest,
                        _ => return Err(bad(k, v, "expected reject or evict-oldest")),
                    }
                }
                "SEEN_RECOVERY_MODE" => {
                    c.recovery_mode = match v.trim() {
                        "tolerate-torn-tail" => RecoveryMode::TolerateTornTail,
                        "absolute-consistency" => RecoveryMode::AbsoluteConsistency,
                        "salvage" => RecoveryMode::Salvage,
                        _ => {
                            return Err(bad(
                                k,
                                v,
                                "expected tolerate-torn-tail, absolute-consistency or salvage",
                            ))
                        }
                    }
                }
                "SEEN_SHARDS" => c.shards = Some(number(k, v)? as usize),
                _ => {}
            }
        }
        // SEEN_TTL_SECONDS wins over the alias.
        if let Some(secs) = ttl.or(ttl_alias) {
            c.ttl = Duration::from_secs(secs);
        }
        c.memory_limit = limit.map(|l| (l, policy));
        Ok(c)
    }

    /// An engine builder with these settings.
    pub fn builder(&self) -> EngineBuilder {
        let mut b = Engine::builder()
            .ttl(self.ttl)
            .durability(self.durability)
            .recovery_mode(self.recovery_mode);
        if let Some(n) = self.max_id_len {
            b = b.max_id_len(n);
        }
        if let Some(n) = self.capacity {
            b = b.capacity(n);
        }
        if let Some((bytes, policy)) = self.memory_limit {
            b = b.memory_limit(bytes, policy);
        }
        if let Some(n) = self.shards {
            b = b.shards(n);
        }
        b
    }

    /// Open the configured engine: durable in `state_dir` if set, else in memory.
    pub fn open(&self) -> Result<Engine> {
        match &self.state_dir {
            Some(dir) => self.builder().open(dir),
            None => self.builder().build(),
        }
    }
}
