//! Connections that survive trouble: one lazily connected pool per host,
//! an operation retried on transient errors with exponential backoff and
//! jitter (10 → 20 → 40 ms ...), moving to the next host when the
//! connection itself failed, every attempt bounded in time, and a circuit
//! breaker that fails fast while the database is down and logs once per
//! state change.

use std::future::Future;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering::*};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

use super::{PgError, PgOptions};

pub(super) struct Hosts {
    pools: Vec<Host>,
    next: AtomicUsize,
    attempts: u32,
    attempt_timeout: Duration,
    breaker: Breaker,
}

struct Host {
    /// The URL without its password, for messages.
    shown: String,
    options: PgPoolOptions,
    connect: PgConnectOptions,
    /// Made on first use: a pool needs a Tokio runtime to exist.
    pool: OnceLock<PgPool>,
}

impl Host {
    fn pool(&self) -> &PgPool {
        self.pool
            .get_or_init(|| self.options.clone().connect_lazy_with(self.connect.clone()))
    }
}

impl Hosts {
    pub(super) fn new(opts: &PgOptions) -> Result<Hosts, PgError> {
        if opts.urls.is_empty() {
            return Err(PgError::Config("no PostgreSQL URL given".into()));
        }
        let mut pools = Vec::new();
        for url in &opts.urls {
            let shown = redact(url);
            let connect = PgConnectOptions::from_str(url)
                .map_err(|e| PgError::Config(format!("bad PostgreSQL URL {shown}: {e}")))?
                .application_name("seen")
                .options([(
                    "statement_timeout",
                    format!("{}", opts.statement_timeout.as_millis()),
                )]);
            let options = PgPoolOptions::new()
                .max_connections(opts.max_connections.max(1))
                .min_connections(0)
                .acquire_timeout(opts.connect_timeout)
                // A connection that sat idle may be dead (server restarted).
                .test_before_acquire(true);
            pools.push(Host {
                shown,
                options,
                connect,
                pool: OnceLock::new(),
            });
        }
        Ok(Hosts {
            pools,
            next: AtomicUsize::new(0),
            attempts: opts.attempts.max(1),
            attempt_timeout: opts.connect_timeout + opts.statement_timeout,
            breaker: Breaker::new(opts.breaker_failures.max(1), opts.breaker_cooldown),
        })
    }

    /// The pool of the host in use (for statements the caller retries itself).
    pub(super) fn current(&self) -> &PgPool {
        self.pools[self.next.load(Relaxed) % self.pools.len()].pool()
    }

    pub(super) fn breaker_open(&self) -> bool {
        self.breaker.open.load(Relaxed)
    }

    /// Connections checked out across hosts.
    pub(super) fn in_use(&self) -> usize {
        self.pools
            .iter()
            .filter_map(|h| h.pool.get())
            .map(|p| (p.size() as usize).saturating_sub(p.num_idle()))
            .sum()
    }

    pub(super) async fn close(&self) {
        for h in &self.pools {
            if let Some(p) = h.pool.get() {
                p.close().await;
            }
        }
    }

    /// Run `op` against a host, retrying transient failures. `op` must be
    /// safe to repeat (each of ours is one transaction, or idempotent).
    pub(super) async fn run<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T, PgError>
    where
        F: FnMut(PgPool) -> Fut,
        Fut: Future<Output = Result<T, PgError>>,
    {
        self.breaker.admit()?;
        let mut attempt = 0;
        loop {
            let i = self.next.load(Relaxed) % self.pools.len();
            let host = &self.pools[i];
            let result =
                match tokio::time::timeout(self.attempt_timeout, op(host.pool().clone())).await {
                    Ok(r) => r,
                    Err(_) => Err(PgError::Timeout {
                        host: host.shown.clone(),
                        after: self.attempt_timeout,
                    }),
                };
            let e = match result {
                Ok(v) => {
                    self.breaker.success();
                    return Ok(v);
                }
                Err(e) => e,
            };
            let e = e.at(&host.shown);
            attempt += 1;
            if !e.is_transient() || attempt >= self.attempts {
                if e.is_transient() {
                    self.breaker.failure(&e);
                }
                return Err(e);
            }
            if e.is_connection() && self.pools.len() > 1 {
                // Next host; another caller may have moved on already.
                let _ = self.next.compare_exchange(i, i + 1, Relaxed, Relaxed);
            }
            let delay = backoff(attempt);
            tracing::debug!(%e, what, attempt, ?delay, "seen: PostgreSQL call failed; retrying");
            tokio::time::sleep(delay).await;
        }
    }
}

/// 10 ms doubling per attempt, plus up to half again of jitter so many
/// clients do not retry in step.
fn backoff(attempt: u32) -> Duration {
    let base = 10u64 << (attempt - 1).min(10);
    let mut r = [0u8; 2];
    let _ = getrandom::getrandom(&mut r);
    let jitter = base * u64::from(u16::from_le_bytes(r)) / (2 * u64::from(u16::MAX));
    Duration::from_millis(base + jitter)
}

/// Closed → (`failures` operations in a row failed) → open for `cooldown`,
/// failing fast → one trial operation → closed or open again.
struct Breaker {
    failures: u32,
    cooldown: Duration,
    consecutive: AtomicU32,
    open: AtomicBool,
    reopen_at: Mutex<Option<Instant>>,
}

impl Breaker {
    fn new(failures: u32, cooldown: Duration) -> Breaker {
        Breaker {
            failures,
            cooldown,
            consecutive: AtomicU32::new(0),
            open: AtomicBool::new(false),
            reopen_at: Mutex::new(None),
        }
    }

    fn admit(&self) -> Result<(), PgError> {
        if !self.open.load(Acquire) {
            return Ok(());
        }
        let mut at = self.reopen_at.lock();
        match *at {
            Some(t) if Instant::now() < t => Err(PgError::CircuitOpen {
                retry_in: t - Instant::now(),
            }),
            _ => {
                // Half open: let this one through; a failure re-opens.
                *at = Some(Instant::now() + self.cooldown);
                Ok(())
            }
        }
    }

    fn success(&self) {
        self.consecutive.store(0, Relaxed);
        if self.open.swap(false, AcqRel) {
            tracing::warn!("seen: PostgreSQL reachable again; circuit breaker closed");
        }
    }

    fn failure(&self, e: &PgError) {
        let n = self.consecutive.fetch_add(1, Relaxed) + 1;
        if n >= self.failures {
            *self.reopen_at.lock() = Some(Instant::now() + self.cooldown);
            if !self.open.swap(true, AcqRel) {
                tracing::warn!(
                    error = %e,
                    cooldown = ?self.cooldown,
                    "seen: PostgreSQL unavailable; circuit breaker open (dedup goes on from memory and the local log)"
                );
            }
        }
    }
}

/// `url` with its password replaced, for messages and logs.
pub(super) fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &userinfo[..colon],
                    &url[at..]
                ),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Split a list of URLs (`postgres://a/db,postgres://b/db`) at the commas
/// that start a new URL.
pub(super) fn split_urls(list: &str) -> Vec<String> {
    let mut urls: Vec<String> = Vec::new();
    for piece in list.split(',') {
        let piece = piece.trim();
        let starts_url = piece.starts_with("postgres://") || piece.starts_with("postgresql://");
        match urls.last_mut() {
            Some(last) if !starts_url => {
                last.push(',');
                last.push_str(piece);
            }
            _ if !piece.is_empty() => urls.push(piece.to_owned()),
            _ => {}
        }
    }
    urls
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_shown() {
        assert_eq!(
            redact("postgres://seen:hunter2@db:5432/x"),
            "postgres://seen:***@db:5432/x"
        );
        assert_eq!(redact("postgres://seen@db/x"), "postgres://seen@db/x");
        assert_eq!(redact("postgres://db/x"), "postgres://db/x");
    }

    #[test]
    fn url_lists_split_at_new_urls() {
        assert_eq!(
            split_urls("postgres://a/db, postgresql://b/db?options=x,y"),
            vec!["postgres://a/db", "postgresql://b/db?options=x,y"]
        );
        assert!(split_urls(" , ").is_empty());
    }

    #[test]
    fn backoff_doubles_with_bounded_jitter() {
        for attempt in 1..=4u32 {
            let base = 10u64 << (attempt - 1);
            let d = backoff(attempt).as_millis() as u64;
            assert!((base..=base + base / 2).contains(&d), "{attempt}: {d}");
        }
    }
}
