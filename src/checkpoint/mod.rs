//! PostgreSQL as the place a store's marks go to survive the loss of its
//! host (feature `postgres`).
//!
//! * **Checkpoint** ([`Postgres::checkpoint`], or a background
//!   [`Checkpointer`]): the durable log records since the last checkpoint of
//!   this log, folded per fingerprint, sent with binary `COPY` into a
//!   staging table and merged in one transaction with the new log position,
//!   so a checkpoint is all-or-nothing, incremental and idempotent; expired
//!   rows are deleted in the same transaction.
//! * **Restore** ([`Postgres::open`]): a store opened with empty or stale
//!   local state loads the live marks before its first check, with the
//!   fingerprint secret that travels with them.
//! * **Import** ([`Postgres::import`]): an existing `processed_events` table.
//! * **Mark inside the caller's transaction** ([`Postgres::mark_in_transaction`]).
//!
//! The engine never waits for PostgreSQL: deduplication goes on from memory
//! and the local log while the database is down, and the next checkpoint
//! catches up.

mod conn;
mod import;
mod periodic;
mod schema;
mod transaction;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::TryStreamExt;
use sqlx::{PgPool, Row};

use crate::engine::EngineBuilder;
use crate::fingerprint::{Fingerprint, Secret};
use crate::wal::format::Record;
use crate::Engine;
pub use import::{ImportReport, ImportTable};
pub(crate) use periodic::require_interval;
pub use periodic::{CheckpointStatus, CheckpointWatch, Checkpointer};
pub use schema::{Migrated, SCHEMA_VERSION};
pub use transaction::TxMark;

/// Log records read, folded and sent per `COPY`.
const CHUNK: usize = 64 * 1024;

/// Everything that can go wrong talking to PostgreSQL.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PgError {
    /// A setting is unusable (a malformed URL, an empty store name...).
    #[error("PostgreSQL configuration: {0}")]
    Config(String),
    /// The server refused or failed the request.
    #[error("PostgreSQL{}: {source}", host_suffix(.host))]
    Database {
        /// The host (URL without password) it happened on, once known.
        host: Option<String>,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// No answer within the bound.
    #[error("PostgreSQL at {host} did not answer within {after:?}")]
    Timeout {
        /// The host (URL without password).
        host: String,
        /// How long we waited.
        after: Duration,
    },
    /// Too many failures in a row: calls fail fast for a while.
    #[error("PostgreSQL circuit breaker open after repeated failures; next try in {retry_in:?}")]
    CircuitOpen {
        /// Until the next trial call.
        retry_in: Duration,
    },
    /// The database has no seen schema.
    #[error("the seen schema is not installed in this database: run `seen pg migrate`")]
    SchemaMissing,
    /// The database has an older seen schema.
    #[error("the database has seen schema version {found}, this build needs {expected}: run `seen pg migrate`")]
    SchemaOutdated {
        /// The version found.
        found: i32,
        /// The version this build writes.
        expected: i32,
    },
    /// The database was migrated by a newer seen.
    #[error("the database has seen schema version {found}, newer than this build's {supported}: upgrade seen")]
    SchemaTooNew {
        /// The version found.
        found: i32,
        /// The newest this build knows.
        supported: i32,
    },
    /// The store name is taken by a store with another fingerprint secret.
    #[error("store {store:?} in PostgreSQL belongs to another store (a different fingerprint secret); choose another store name")]
    SecretMismatch {
        /// The store name.
        store: String,
    },
    /// Another process held the store's lease for the whole wait.
    #[error("store {store:?} is still in use by another process (its lease was not released within {waited:?})")]
    Leased {
        /// The store name.
        store: String,
        /// How long we waited.
        waited: Duration,
    },
    /// Restore found nothing to restore from.
    #[error("PostgreSQL has no checkpoint of store {store:?}")]
    NoCheckpoint {
        /// The store name.
        store: String,
    },
    /// The engine failed (the local log, an id...).
    #[error(transparent)]
    Engine(#[from] crate::Error),
}

fn host_suffix(host: &Option<String>) -> String {
    host.as_ref()
        .map(|h| format!(" at {h}"))
        .unwrap_or_default()
}

impl From<sqlx::Error> for PgError {
    fn from(source: sqlx::Error) -> PgError {
        PgError::Database { host: None, source }
    }
}

impl PgError {
    fn at(self, shown: &str) -> PgError {
        match self {
            PgError::Database { host: None, source } => PgError::Database {
                host: Some(shown.to_owned()),
                source,
            },
            e => e,
        }
    }

    /// The connection failed or the server went away: another host or a
    /// later attempt may work.
    fn is_connection(&self) -> bool {
        match self {
            PgError::Timeout { .. } => true,
            PgError::Database { source, .. } => match source {
                sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Protocol(_) => true,
                sqlx::Error::Database(db) => db.code().is_some_and(|c| {
                    c.starts_with("08") || matches!(c.as_ref(), "57P01" | "57P02" | "57P03")
                }),
                _ => false,
            },
            _ => false,
        }
    }

    /// Worth retrying: connection trouble, or a transaction the server
    /// aborted for concurrency reasons.
    fn is_transient(&self) -> bool {
        self.is_connection()
            || matches!(self, PgError::Database { source: sqlx::Error::Database(db), .. }
                if db.code().is_some_and(|c| matches!(c.as_ref(), "40001" | "40P01" | "53300")))
    }
}

/// How to reach the database and which store this is.
#[derive(Clone, Debug)]
pub struct PgOptions {
    /// One URL per host (`postgres://user:pass@host:port/db`); operations
    /// move to the next host when a connection fails.
    pub urls: Vec<String>,
    /// The store's name in the database: one per state directory, or per
    /// Kafka partition in partition scope.
    pub store: String,
    /// Kafka topic and partition of a partition-scope store (recorded on
    /// the store's row).
    pub partition: Option<(String, i32)>,
    /// Bound on getting a connection (default 5 s).
    pub connect_timeout: Duration,
    /// Bound on one statement, enforced by the server (default 60 s).
    pub statement_timeout: Duration,
    /// Connections per host (default 4).
    pub max_connections: u32,
    /// Attempts per operation on transient errors (default 4: backoff 10,
    /// 20, 40 ms between them).
    pub attempts: u32,
    /// Failed operations in a row that open the circuit breaker (default 3).
    pub breaker_failures: u32,
    /// How long the open breaker fails fast (default 5 s).
    pub breaker_cooldown: Duration,
}

impl PgOptions {
    /// Options for `urls` (one URL, or several separated by commas) and
    /// store `store`, with the defaults above.
    pub fn new(urls: &str, store: impl Into<String>) -> PgOptions {
        PgOptions {
            urls: conn::split_urls(urls),
            store: store.into(),
            partition: None,
            connect_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(60),
            max_connections: 4,
            attempts: 4,
            breaker_failures: 3,
            breaker_cooldown: Duration::from_secs(5),
        }
    }
}

/// What one checkpoint did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckpointReport {
    /// Log records read since the previous checkpoint.
    pub records: u64,
    /// Mark rows written (one per fingerprint per chunk of the log).
    pub written: u64,
    /// Forget rows written (the log forgot those ids).
    pub forgotten: u64,
    /// Expired rows deleted.
    pub expired: u64,
    /// The log position checkpointed up to (`LogPosition::as_u64`).
    pub position: u64,
    /// Wall time.
    pub duration: Duration,
}

/// What opening with PostgreSQL did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestoreReport {
    /// Whether live marks were loaded (local state was empty or behind).
    pub restored: bool,
    /// Live rows read from the database.
    pub rows: u64,
    /// Marks the local store did not have.
    pub loaded: u64,
    /// Marks removed because the store forgot their ids.
    pub forgotten: u64,
    /// Wall time.
    pub duration: Duration,
}

/// Exclusive use of a store across hosts while held: a session-level
/// advisory lock on a connection of its own. Dropping it closes the
/// connection, which releases the lock; a host that dies releases it when
/// the server notices the dead connection (keepalives: about 25 s).
pub struct Lease {
    _conn: sqlx::PgConnection,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Lease")
    }
}

/// A store's PostgreSQL connection: checkpoint, restore, import, and marks
/// inside the caller's transactions. Cheap to share behind an `Arc`.
pub struct Postgres {
    hosts: conn::Hosts,
    store: String,
    partition: Option<(String, i32)>,
    /// The store's id once registered (0 before), for transactional marks.
    store_id: std::sync::atomic::AtomicI32,
}

impl std::fmt::Debug for Postgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Postgres")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl Postgres {
    /// Set up connections (lazily: nothing is dialled until the first call).
    pub fn new(opts: PgOptions) -> Result<Postgres, PgError> {
        if opts.store.is_empty() {
            return Err(PgError::Config("the store name is empty".into()));
        }
        Ok(Postgres {
            hosts: conn::Hosts::new(&opts)?,
            store: opts.store,
            partition: opts.partition,
            store_id: Default::default(),
        })
    }

    /// The store name.
    pub fn store(&self) -> &str {
        &self.store
    }

    /// Whether the circuit breaker is failing calls fast.
    pub fn breaker_open(&self) -> bool {
        self.hosts.breaker_open()
    }

    /// Connections checked out now, across hosts.
    pub fn connections_in_use(&self) -> usize {
        self.hosts.in_use()
    }

    /// The pool of the host in use, for callers who run their own
    /// transactions (see [`Postgres::mark_in_transaction`]).
    pub fn pool(&self) -> &PgPool {
        self.hosts.current()
    }

    /// Install or upgrade the schema ([`SCHEMA_VERSION`]); a no-op when it
    /// is current. Safe to run from several processes at once.
    pub async fn migrate(&self) -> Result<Migrated, PgError> {
        self.hosts
            .run(
                "migrate",
                |pool| async move { schema::migrate(&pool).await },
            )
            .await
    }

    /// Take the store's lease, waiting up to `wait` for its holder (the
    /// previous owner of a Kafka partition, finishing its last checkpoint)
    /// to release it.
    pub async fn lease(&self, wait: Duration) -> Result<Lease, PgError> {
        let deadline = Instant::now() + wait;
        let mut conn = self
            .hosts
            .run("lease the store", |pool| async move {
                let mut conn = pool.acquire().await?.detach();
                // Notice a dead holder in about 25 s, not TCP's 2 hours.
                sqlx::raw_sql(
                    "SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5; SET tcp_keepalives_count = 3",
                )
                .execute(&mut conn)
                .await?;
                Ok(conn)
            })
            .await?;
        let key = format!("seen-store:{}", self.store);
        loop {
            let got: bool =
                sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
                    .bind(&key)
                    .fetch_one(&mut conn)
                    .await?;
            if got {
                return Ok(Lease { _conn: conn });
            }
            if Instant::now() >= deadline {
                return Err(PgError::Leased {
                    store: self.store.clone(),
                    waited: wait,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Close every connection.
    pub async fn close(&self) {
        self.hosts.close().await
    }

    /// Send the engine's durable marks since this log's last checkpoint.
    pub async fn checkpoint(&self, engine: &Engine) -> Result<CheckpointReport, PgError> {
        let log_id = engine.require_log()?;
        self.hosts
            .run("checkpoint", |pool| async move {
                self.checkpoint_once(&pool, engine, log_id).await
            })
            .await
    }

    async fn checkpoint_once(
        &self,
        pool: &PgPool,
        engine: &Engine,
        log_id: u128,
    ) -> Result<CheckpointReport, PgError> {
        let started = Instant::now();
        schema::check(pool).await?;
        // Only durable records are sent (a checkpoint must not hold a mark
        // the local log could still lose); under `None` or `Periodic`
        // that means syncing first.
        engine.sync()?;
        let mut tx = pool.begin().await?;
        let store_id = self.ensure_store(&mut tx, engine.secret()).await?;
        let log_key = log_id.to_le_bytes().to_vec();
        // The row lock serialises checkpoints of one log (two processes
        // cannot hold its directory lock, but a stale one may linger).
        let from: i64 = sqlx::query(
            "INSERT INTO seen_checkpoints (store_id, log_id, position) VALUES ($1, $2, 0)
             ON CONFLICT (store_id, log_id) DO UPDATE SET position = seen_checkpoints.position
             RETURNING position",
        )
        .bind(store_id)
        .bind(&log_key)
        .fetch_one(&mut *tx)
        .await?
        .try_get(0)?;

        let mut report = CheckpointReport::default();
        let mut changes = engine.changes_since(from as u64)?;
        let mut records = Vec::with_capacity(CHUNK);
        let mut latest: HashMap<u128, i64> = HashMap::with_capacity(CHUNK);
        loop {
            records.clear();
            let more = changes.next_chunk(CHUNK, &mut records)?;
            report.records += records.len() as u64;
            // Within a chunk the last record of a fingerprint wins (a mark
            // as its expiry, a forget as minus its expiry); chunks get
            // increasing batch numbers, so later ones win on restore.
            latest.clear();
            for r in &records {
                let (fp, expiry) = match *r {
                    Record::Mark {
                        fingerprint,
                        expiry_unix_secs,
                    } => (fingerprint, clamp(expiry_unix_secs)),
                    Record::Forget {
                        fingerprint,
                        expiry_unix_secs,
                    } => (fingerprint, -clamp(expiry_unix_secs)),
                };
                latest.insert(fp, expiry);
            }
            if !latest.is_empty() {
                let (written, forgotten) = write_chunk(&mut tx, store_id, &latest).await?;
                report.written += written;
                report.forgotten += forgotten;
            }
            if !more {
                break;
            }
        }
        let now = clamp(crate::ttl::clock::Clock::now_unix_secs(
            &crate::ttl::clock::SystemClock,
        ));
        // Expired marks and forgets, found through the BRIN index.
        report.expired = sqlx::query(
            "DELETE FROM seen_marks WHERE store_id = $1
               AND ((expires_at > 0 AND expires_at <= $2) OR (expires_at < 0 AND expires_at >= -$2))",
        )
        .bind(store_id)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        report.expired +=
            sqlx::query("DELETE FROM seen_tx_marks WHERE store_id = $1 AND expires_at <= $2")
                .bind(store_id)
                .bind(now)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        report.position = u64::from(changes.end());
        sqlx::query(
            "UPDATE seen_checkpoints SET position = $3, updated_at = now()
             WHERE store_id = $1 AND log_id = $2",
        )
        .bind(store_id)
        .bind(&log_key)
        .bind(report.position as i64)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        report.duration = started.elapsed();
        Ok(report)
    }

    /// Register the store with `secret`, or check that its registered
    /// secret is `secret`; its id.
    async fn ensure_store(
        &self,
        conn: &mut sqlx::PgConnection,
        secret: Secret,
    ) -> Result<i32, PgError> {
        let (topic, partition) = match &self.partition {
            Some((t, p)) => (Some(t.as_str()), Some(*p)),
            None => (None, None),
        };
        let row = sqlx::query(
            "INSERT INTO seen_stores (store, secret, topic, kafka_partition) VALUES ($1, $2, $3, $4)
             ON CONFLICT (store) DO UPDATE SET store = EXCLUDED.store
             RETURNING id, secret",
        )
        .bind(&self.store)
        .bind(secret.as_bytes().as_slice())
        .bind(topic)
        .bind(partition)
        .fetch_one(&mut *conn)
        .await?;
        let stored: Vec<u8> = row.try_get(1)?;
        if stored.as_slice() != secret.as_bytes().as_slice() {
            return Err(PgError::SecretMismatch {
                store: self.store.clone(),
            });
        }
        Ok(row.try_get(0)?)
    }

    /// The store's id and fingerprint secret, if it was ever checkpointed.
    async fn stored(&self) -> Result<Option<(i32, Secret)>, PgError> {
        self.hosts
            .run("read the store", |pool| async move {
                schema::check(&pool).await?;
                let row = sqlx::query("SELECT id, secret FROM seen_stores WHERE store = $1")
                    .bind(&self.store)
                    .fetch_optional(&pool)
                    .await?;
                let Some(row) = row else { return Ok(None) };
                let bytes: Vec<u8> = row.try_get(1)?;
                let bytes: [u8; 16] = bytes.try_into().map_err(|_| {
                    PgError::Config(format!("store {:?} has a malformed secret", self.store))
                })?;
                Ok(Some((row.try_get(0)?, Secret::from_bytes(bytes))))
            })
            .await
    }

    /// Open the engine in `dir` with this store's state: a new state
    /// directory gets the store's fingerprint secret and its live marks; an
    /// existing one that is behind (never checkpointed, or another host
    /// checkpointed the store since it last did) loads the marks it lacks.
    /// `progress(rows, total)` is called while loading.
    pub async fn open(
        &self,
        builder: EngineBuilder,
        dir: impl AsRef<Path>,
        progress: impl Fn(u64, u64),
    ) -> Result<(Engine, RestoreReport), PgError> {
        let dir = dir.as_ref();
        let stored = self.stored().await?;
        let fresh = !crate::wal::has_store(dir);
        let builder = match (stored, fresh) {
            (Some((_, secret)), true) => builder.secret(secret),
            _ => builder,
        };
        let engine = builder.open(dir)?;
        let Some((store_id, secret)) = stored else {
            return Ok((engine, RestoreReport::default()));
        };
        if secret != engine.secret() {
            return Err(PgError::SecretMismatch {
                store: self.store.clone(),
            });
        }
        let behind = fresh || engine.is_empty() || self.is_behind(store_id, &engine).await?;
        if !behind {
            return Ok((engine, RestoreReport::default()));
        }
        if !fresh {
            // Send this log's own unsent marks first: after the load, its
            // checkpoint position moves past everything in it.
            self.checkpoint(&engine).await?;
        }
        // Nobody else holds the engine yet, so every record logged from
        // here to the end is a restored one.
        let report = self
            .restore_into(store_id, &engine, &progress, true)
            .await?;
        Ok((engine, report))
    }

    /// Whether another log of this store checkpointed after this one did
    /// (or this one never did).
    async fn is_behind(&self, store_id: i32, engine: &Engine) -> Result<bool, PgError> {
        let log_key = engine.require_log()?.to_le_bytes().to_vec();
        self.hosts
            .run("compare checkpoints", |pool| {
                let log_key = log_key.clone();
                async move {
                    let behind: bool = sqlx::query(
                        "SELECT coalesce(
                           (SELECT max(updated_at) FROM seen_checkpoints WHERE store_id = $1 AND log_id <> $2)
                             > (SELECT updated_at FROM seen_checkpoints WHERE store_id = $1 AND log_id = $2),
                           NOT EXISTS (SELECT 1 FROM seen_checkpoints WHERE store_id = $1 AND log_id = $2))",
                    )
                    .bind(store_id)
                    .bind(&log_key)
                    .fetch_one(&pool)
                    .await?
                    .try_get(0)?;
                    Ok(behind)
                }
            })
            .await
    }

    /// Load every live mark of the store into `engine` (marks it already
    /// has are left alone), and apply the store's forgets. The engine may
    /// be in use meanwhile; the next checkpoint then sends the loaded marks
    /// back once. [`Postgres::open`] avoids that.
    pub async fn restore(&self, engine: &Engine) -> Result<RestoreReport, PgError> {
        let Some((store_id, secret)) = self.stored().await? else {
            return Err(PgError::NoCheckpoint {
                store: self.store.clone(),
            });
        };
        if secret != engine.secret() {
            return Err(PgError::SecretMismatch {
                store: self.store.clone(),
            });
        }
        self.restore_into(store_id, engine, &|_, _| {}, false).await
    }

    /// [`Postgres::restore`]; with `advance`, record this log as
    /// checkpointed up to its end afterwards (only right when everything
    /// in it is checkpointed or restored).
    async fn restore_into(
        &self,
        store_id: i32,
        engine: &Engine,
        progress: &dyn Fn(u64, u64),
        advance: bool,
    ) -> Result<RestoreReport, PgError> {
        let log_key = engine.require_log()?.to_le_bytes().to_vec();
        self.hosts
            .run("restore", |pool| {
                let log_key = log_key.clone();
                async move {
                    let started = Instant::now();
                    let now = clamp(crate::ttl::clock::Clock::now_unix_secs(
                        &crate::ttl::clock::SystemClock,
                    ));
                    let live = "SELECT fingerprint, expires_at FROM seen_marks
                                  WHERE store_id = $1 AND expires_at > $2
                                UNION ALL
                                SELECT fingerprint, expires_at FROM seen_tx_marks
                                  WHERE store_id = $1 AND expires_at > $2";
                    let total: i64 = sqlx::query(&format!("SELECT count(*) FROM ({live}) l"))
                        .bind(store_id)
                        .bind(now)
                        .fetch_one(&pool)
                        .await?
                        .try_get(0)?;
                    progress(0, total as u64);
                    let mut conn = pool.acquire().await?;
                    let mut report = RestoreReport {
                        restored: true,
                        ..RestoreReport::default()
                    };
                    {
                        let mut rows = sqlx::query(live)
                            .bind(store_id)
                            .bind(now)
                            .fetch(&mut *conn);
                        let mut loader = Loader::new(engine);
                        while let Some(row) = rows.try_next().await? {
                            let fp: uuid::Uuid = row.try_get(0)?;
                            let expires: i64 = row.try_get(1)?;
                            report.rows += 1;
                            let fp = Fingerprint::from_le_bytes(*fp.as_bytes());
                            if loader.push(fp, expires as u64)? {
                                progress(report.rows, total as u64);
                            }
                        }
                        report.loaded = loader.finish()?;
                        progress(report.rows, total as u64);
                    }
                    // Forgets later than every live mark of their id.
                    let forgotten: Vec<uuid::Uuid> = sqlx::query_scalar(
                        "WITH t AS (
                           SELECT fingerprint, max(batch) AS b FROM seen_marks
                           WHERE store_id = $1 AND expires_at < -$2 GROUP BY fingerprint)
                         SELECT t.fingerprint FROM t WHERE NOT EXISTS (
                           SELECT 1 FROM seen_marks m WHERE m.store_id = $1
                             AND m.fingerprint = t.fingerprint AND m.expires_at > $2 AND m.batch > t.b)",
                    )
                    .bind(store_id)
                    .bind(now)
                    .fetch_all(&mut *conn)
                    .await?;
                    let forgotten: Vec<Fingerprint> = forgotten
                        .iter()
                        .map(|u| Fingerprint::from_le_bytes(*u.as_bytes()))
                        .collect();
                    report.forgotten = engine.forget_fingerprints(&forgotten)? as u64;
                    if advance {
                        // Everything in the log now is in the database already.
                        let position = engine.durable_position().map_or(0, |p| p.as_u64());
                        sqlx::query(
                            "INSERT INTO seen_checkpoints (store_id, log_id, position) VALUES ($1, $2, $3)
                             ON CONFLICT (store_id, log_id) DO UPDATE
                               SET position = GREATEST(seen_checkpoints.position, EXCLUDED.position), updated_at = now()",
                        )
                        .bind(store_id)
                        .bind(&log_key)
                        .bind(position as i64)
                        .execute(&mut *conn)
                        .await?;
                    }
                    report.duration = started.elapsed();
                    Ok(report)
                }
            })
            .await
    }
}

/// Marks loaded into an engine a chunk at a time (restore, import).
struct Loader<'e> {
    engine: &'e Engine,
    batch: Vec<(Fingerprint, u64)>,
    loaded: u64,
}

impl<'e> Loader<'e> {
    fn new(engine: &'e Engine) -> Loader<'e> {
        Loader {
            engine,
            batch: Vec::with_capacity(CHUNK),
            loaded: 0,
        }
    }

    /// Queue a mark; `true` when a full chunk was just loaded.
    fn push(&mut self, fp: Fingerprint, expiry_unix_secs: u64) -> crate::Result<bool> {
        self.batch.push((fp, expiry_unix_secs));
        if self.batch.len() < CHUNK {
            return Ok(false);
        }
        self.loaded += self.engine.load_marks(&self.batch)? as u64;
        self.batch.clear();
        Ok(true)
    }

    /// Load the rest; how many marks were new to the engine in all.
    fn finish(mut self) -> crate::Result<u64> {
        self.loaded += self.engine.load_marks(&self.batch)? as u64;
        Ok(self.loaded)
    }
}

/// Unix seconds as PostgreSQL's `bigint`.
fn clamp(secs: u64) -> i64 {
    secs.min(i64::MAX as u64) as i64
}

/// Append one folded chunk to `seen_marks` with binary `COPY`, as one
/// batch; (marks, forgets) written.
async fn write_chunk(
    tx: &mut sqlx::PgConnection,
    store_id: i32,
    latest: &HashMap<u128, i64>,
) -> Result<(u64, u64), PgError> {
    let batch: i64 = sqlx::query("SELECT nextval('seen_batch_seq')")
        .fetch_one(&mut *tx)
        .await?
        .try_get(0)?;
    // Binary COPY: a signature, flags and an empty header extension; per
    // row a field count and length-prefixed big-endian fields; a trailer.
    let mut copy = Vec::with_capacity(19 + latest.len() * 50 + 2);
    copy.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    copy.extend_from_slice(&0i32.to_be_bytes());
    copy.extend_from_slice(&0i32.to_be_bytes());
    let (mut marks, mut forgets) = (0, 0);
    for (&fp, &expires_at) in latest {
        copy.extend_from_slice(&4i16.to_be_bytes());
        copy.extend_from_slice(&4i32.to_be_bytes());
        copy.extend_from_slice(&store_id.to_be_bytes());
        copy.extend_from_slice(&16i32.to_be_bytes());
        copy.extend_from_slice(&fp.to_le_bytes());
        copy.extend_from_slice(&8i32.to_be_bytes());
        copy.extend_from_slice(&expires_at.to_be_bytes());
        copy.extend_from_slice(&8i32.to_be_bytes());
        copy.extend_from_slice(&batch.to_be_bytes());
        if expires_at > 0 {
            marks += 1;
        } else {
            forgets += 1;
        }
    }
    copy.extend_from_slice(&(-1i16).to_be_bytes());
    let mut sink = tx
        .copy_in_raw(
            "COPY seen_marks (store_id, fingerprint, expires_at, batch) FROM STDIN (FORMAT binary)",
        )
        .await?;
    sink.send(copy).await?;
    sink.finish().await?;
    Ok((marks, forgets))
}
