//! One configuration for the library and the CLI: [`Config`] reads the
//! environment, the CLI layers its flags over it, and both parse every
//! value with the same `FromStr` spellings defined here.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::{Durability, Engine, EngineBuilder, Error, MemoryPolicy, RecoveryMode, Result};

/// Service configuration, from environment variables and (in the CLI) flags.
///
/// | variable | flag | meaning | default |
/// |---|---|---|---|
/// | `SEEN_TTL_SECONDS` (alias `KAFKA_DEDUP_TTL_SECONDS`) | `--ttl` | mark lifetime: seconds or a duration (`90s`, `1h`, `7d`); `0` disables dedup | `1h` |
/// | `SEEN_STATE_DIR` | `--state` | state directory; unset = in memory only | unset |
/// | `SEEN_DURABILITY` | `--durability` | `sync`, `none`, `periodic` (10 ms) or `periodic:<duration>` | `sync` |
/// | `SEEN_MAX_ID_LEN` | `--max-id-len` | longest id in bytes | 1024 |
/// | `SEEN_CAPACITY` | `--capacity` | expected live ids (pre-sizes memory) | 0 |
/// | `SEEN_MEMORY_LIMIT_BYTES` | `--memory-limit` | memory ceiling for the set (`512MiB`, bytes) | unset |
/// | `SEEN_MEMORY_POLICY` | `--memory-policy` | `reject` or `evict-oldest` at the ceiling | `reject` |
/// | `SEEN_RECOVERY_MODE` | `--recovery-mode` | `tolerate-torn-tail`, `absolute-consistency` or `salvage` | `tolerate-torn-tail` |
/// | `SEEN_SHARDS` | `--shards` | shards, a power of two | 64 |
/// | `SEEN_SEGMENT_SIZE` | `--segment-size` | bytes per log segment (`4MiB`, bytes) | `64MiB` |
/// | `SEEN_METRICS_ADDR` | `--metrics-addr` | serve Prometheus metrics here (CLI) | unset |
/// | `SEEN_POSTGRES_URL` | `--postgres` | checkpoint to / restore from PostgreSQL (feature `postgres`) | unset |
/// | `SEEN_PG_STORE` | `--store` | the store's name in PostgreSQL | `default` |
/// | `SEEN_CHECKPOINT_INTERVAL` | `--checkpoint-every` | time between checkpoints | `10s` |
///
/// A bad value is an [`Error::Config`] that names the variable (the CLI's
/// flag errors name the flag).
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
    /// Log segment size in bytes.
    pub segment_size: Option<usize>,
    /// Where the CLI serves metrics.
    pub metrics_addr: Option<SocketAddr>,
    /// PostgreSQL URL(s), comma-separated, for checkpoints (feature `postgres`).
    pub postgres_url: Option<String>,
    /// The store's name in PostgreSQL.
    pub pg_store: Option<String>,
    /// Time between checkpoints.
    pub checkpoint_interval: Option<Duration>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            ttl: crate::DEFAULT_TTL,
            state_dir: None,
            durability: Durability::Sync,
            max_id_len: None,
            capacity: None,
            memory_limit: None,
            recovery_mode: RecoveryMode::default(),
            shards: None,
            segment_size: None,
            metrics_addr: None,
            postgres_url: None,
            pg_store: None,
            checkpoint_interval: None,
        }
    }
}

/// Every variable [`Config::from_vars`] reads.
pub const ENV_VARS: &[&str] = &[
    "SEEN_TTL_SECONDS",
    "KAFKA_DEDUP_TTL_SECONDS",
    "SEEN_STATE_DIR",
    "SEEN_DURABILITY",
    "SEEN_MAX_ID_LEN",
    "SEEN_CAPACITY",
    "SEEN_MEMORY_LIMIT_BYTES",
    "SEEN_MEMORY_POLICY",
    "SEEN_RECOVERY_MODE",
    "SEEN_SHARDS",
    "SEEN_SEGMENT_SIZE",
    "SEEN_METRICS_ADDR",
    "SEEN_POSTGRES_URL",
    "SEEN_PG_STORE",
    "SEEN_CHECKPOINT_INTERVAL",
];

fn named<T, E: std::fmt::Display>(
    var: &str,
    value: &str,
    parsed: std::result::Result<T, E>,
) -> Result<T> {
    parsed.map_err(|why| Error::Config(format!("{var}={value:?}: {why}")))
}

impl Config {
    /// Read the process environment.
    pub fn from_env() -> Result<Config> {
        Self::from_vars(std::env::vars())
    }

    /// Read settings from `(name, value)` pairs (other names are ignored).
    pub fn from_vars<K: AsRef<str>, V: AsRef<str>>(
        vars: impl IntoIterator<Item = (K, V)>,
    ) -> Result<Config> {
        let mut c = Config::default();
        let (mut ttl, mut ttl_alias) = (None, None);
        let (mut limit, mut policy) = (None, MemoryPolicy::default());
        for (k, v) in vars {
            let (k, v) = (k.as_ref(), v.as_ref());
            match k {
                "SEEN_TTL_SECONDS" => ttl = Some(named(k, v, parse_ttl(v))?),
                "KAFKA_DEDUP_TTL_SECONDS" => ttl_alias = Some(named(k, v, parse_ttl(v))?),
                "SEEN_STATE_DIR" if !v.is_empty() => c.state_dir = Some(PathBuf::from(v)),
                "SEEN_DURABILITY" => c.durability = named(k, v, v.parse())?,
                "SEEN_MAX_ID_LEN" => c.max_id_len = Some(named(k, v, parse_count(v))?),
                "SEEN_CAPACITY" => c.capacity = Some(named(k, v, parse_count(v))?),
                "SEEN_MEMORY_LIMIT_BYTES" => limit = Some(named(k, v, parse_size(v))?),
                "SEEN_MEMORY_POLICY" => policy = named(k, v, v.parse())?,
                "SEEN_RECOVERY_MODE" => c.recovery_mode = named(k, v, v.parse())?,
                "SEEN_SHARDS" => c.shards = Some(named(k, v, parse_count(v))?),
                "SEEN_SEGMENT_SIZE" => c.segment_size = Some(named(k, v, parse_size(v))?),
                "SEEN_METRICS_ADDR" if !v.is_empty() => {
                    c.metrics_addr = Some(named(k, v, v.trim().parse::<SocketAddr>())?)
                }
                "SEEN_POSTGRES_URL" if !v.is_empty() => {
                    c.postgres_url = Some(named(k, "(hidden)", parse_postgres_url(v))?)
                }
                "SEEN_PG_STORE" if !v.is_empty() => c.pg_store = Some(v.to_owned()),
                "SEEN_CHECKPOINT_INTERVAL" => {
                    c.checkpoint_interval = Some(named(k, v, parse_interval(v))?)
                }
                _ => {}
            }
        }
        // SEEN_TTL_SECONDS wins over the alias.
        if let Some(t) = ttl.or(ttl_alias) {
            c.ttl = t;
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
        if let Some(n) = self.segment_size {
            b = b.segment_size(n);
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

/// A PostgreSQL URL, or several separated by commas (checked for shape
/// only; the driver parses the rest).
pub fn parse_postgres_url(s: &str) -> std::result::Result<String, String> {
    let ok = s
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .all(|u| {
            u.starts_with("postgres://") || u.starts_with("postgresql://") || !u.contains("://")
        });
    let first = s.trim_start();
    if ok && (first.starts_with("postgres://") || first.starts_with("postgresql://")) {
        Ok(s.to_owned())
    } else {
        Err(
            "expected postgres://user:password@host:port/database (several separated by commas)"
                .into(),
        )
    }
}

/// A positive duration: `500ms`, `10s`, `1m`, or seconds.
pub fn parse_interval(s: &str) -> std::result::Result<Duration, String> {
    let d = match s.trim().parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(s.trim()).map_err(|e| e.to_string())?,
    };
    if d.is_zero() {
        return Err("must be above zero".into());
    }
    Ok(d)
}

/// A TTL: bare seconds (`3600`) or a duration (`90s`, `1h 30m`, `7d`),
/// whole seconds only; `0` disables dedup.
pub fn parse_ttl(s: &str) -> std::result::Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("expected seconds or a duration like 90s, 1h, 7d ({e})"))?;
    if d.subsec_nanos() != 0 {
        return Err("TTLs have one-second resolution".into());
    }
    Ok(d)
}

/// A whole non-negative number.
pub fn parse_count(s: &str) -> std::result::Result<usize, String> {
    s.trim()
        .parse::<usize>()
        .map_err(|_| "expected a whole non-negative number".into())
}

/// A byte size: a number with an optional binary unit (`K`/`KiB`,
/// `M`/`MiB`, `G`/`GiB`; case-insensitive).
pub fn parse_size(s: &str) -> std::result::Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: usize = digits
        .parse()
        .map_err(|_| "expected a size in bytes, like 1048576 or 64MiB")?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        other => return Err(format!("unknown size unit {other:?} (use KiB, MiB or GiB)")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| "size too large".into())
}

impl FromStr for Durability {
    type Err = String;
    /// `sync`, `none`, `periodic` (every 10 ms) or `periodic:<duration>`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim() {
            "sync" => Ok(Durability::Sync),
            "none" => Ok(Durability::None),
            "periodic" => Ok(Durability::Periodic(Duration::from_millis(10))),
            p => match p.strip_prefix("periodic:") {
                Some(d) => match humantime::parse_duration(d.trim()) {
                    Ok(d) if !d.is_zero() => Ok(Durability::Periodic(d)),
                    Ok(_) => Err("the periodic interval must be above zero".into()),
                    Err(e) => Err(format!("bad periodic interval {d:?}: {e}")),
                },
                None => Err("expected sync, none, periodic or periodic:<duration>".into()),
            },
        }
    }
}

impl FromStr for MemoryPolicy {
    type Err = String;
    /// `reject` or `evict-oldest`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim() {
            "reject" => Ok(MemoryPolicy::Reject),
            "evict-oldest" => Ok(MemoryPolicy::EvictOldest),
            _ => Err("expected reject or evict-oldest".into()),
        }
    }
}

impl FromStr for RecoveryMode {
    type Err = String;
    /// `tolerate-torn-tail`, `absolute-consistency` or `salvage`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim() {
            "tolerate-torn-tail" => Ok(RecoveryMode::TolerateTornTail),
            "absolute-consistency" => Ok(RecoveryMode::AbsoluteConsistency),
            "salvage" => Ok(RecoveryMode::Salvage),
            _ => Err("expected tolerate-torn-tail, absolute-consistency or salvage".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings() {
        assert_eq!(parse_ttl("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_ttl("1h 30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_ttl("0").unwrap(), Duration::ZERO);
        assert!(parse_ttl("1.5s").is_err());
        assert!(parse_ttl("soon").is_err());
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("2 g").unwrap(), 2 << 30);
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("-1").is_err());
        assert_eq!(
            "periodic:25ms".parse::<Durability>().unwrap(),
            Durability::Periodic(Duration::from_millis(25))
        );
        assert!("periodic:0s".parse::<Durability>().is_err());
    }
}
