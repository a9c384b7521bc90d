//! `seen pg …` and `--postgres` on the commands that open a store: thin
//! front-ends over `seen::checkpoint`.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use seen::checkpoint::{Checkpointer, ImportTable, PgOptions, Postgres, RestoreReport};
use seen::config::{parse_count, parse_interval, parse_postgres_url};
use seen::{Config, Engine};

use super::EngineArgs;

/// Where checkpoints go. Each flag overrides its `SEEN_*` variable.
#[derive(Args, Debug, Default)]
pub(crate) struct PgArgs {
    /// PostgreSQL URL (several separated by commas: tried in turn):
    /// `postgres://user:password@host:5432/db` [env: SEEN_POSTGRES_URL].
    #[arg(long = "postgres", value_name = "URL", value_parser = parse_postgres_url)]
    url: Option<String>,

    /// The store's name in PostgreSQL: the same name restores the same
    /// marks on another host [default: default; env: SEEN_PG_STORE].
    #[arg(long, value_name = "NAME")]
    store: Option<String>,

    /// Time between checkpoints [default: 10s; env: SEEN_CHECKPOINT_INTERVAL].
    #[arg(long, value_parser = parse_interval)]
    checkpoint_every: Option<Duration>,

    /// Also checkpoint as soon as this many new marks have accumulated.
    #[arg(long, value_parser = parse_count)]
    checkpoint_marks: Option<usize>,
}

/// The default time between checkpoints.
const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);

impl PgArgs {
    fn url(&self, config: &Config) -> Option<String> {
        self.url.clone().or_else(|| config.postgres_url.clone())
    }

    fn postgres(&self, config: &Config) -> anyhow::Result<Option<Postgres>> {
        let Some(url) = self.url(config) else {
            return Ok(None);
        };
        let store = self
            .store
            .clone()
            .or_else(|| config.pg_store.clone())
            .unwrap_or_else(|| "default".into());
        Ok(Some(Postgres::new(PgOptions::new(&url, store))?))
    }
}

#[derive(Args, Debug)]
pub(crate) struct PgCommand {
    #[command(subcommand)]
    action: PgAction,
}

#[derive(Subcommand, Debug)]
enum PgAction {
    /// Install or upgrade seen's tables (a no-op when current).
    Migrate(PgOnly),
    /// Send the marks logged since the last checkpoint.
    Checkpoint(PgStore),
    /// Load the store's live marks into a new or stale state directory.
    Restore(PgStore),
    /// Mark the ids of a `processed_events` table processed within the TTL.
    Import(PgImport),
}

#[derive(Args, Debug)]
struct PgOnly {
    #[command(flatten)]
    pg: PgArgs,
    /// Print nothing on success.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Args, Debug)]
struct PgStore {
    #[command(flatten)]
    pg: PgArgs,
    #[command(flatten)]
    engine: EngineArgs,
    /// No progress bar or summary.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Args, Debug)]
struct PgImport {
    #[command(flatten)]
    store: PgStore,
    /// The table (optionally `schema.table`).
    #[arg(long, default_value = "processed_events")]
    table: String,
    /// Its id column.
    #[arg(long, default_value = "event_id")]
    id_column: String,
    /// Its `timestamptz` column of when the event was processed.
    #[arg(long, default_value = "processed_at")]
    processed_at_column: String,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the PostgreSQL runtime")
}

pub(crate) fn run(cmd: PgCommand) -> anyhow::Result<ExitCode> {
    let rt = runtime()?;
    let _in_runtime = rt.enter();
    match cmd.action {
        PgAction::Migrate(a) => {
            let pg = require(&a.pg, &Config::from_env()?)?;
            let m = rt.block_on(pg.migrate())?;
            if !a.quiet {
                if m.from == m.to {
                    eprintln!("seen pg migrate: schema already at version {}", m.to);
                } else {
                    eprintln!("seen pg migrate: schema version {} → {}", m.from, m.to);
                }
            }
        }
        PgAction::Checkpoint(a) => {
            let (pg, engine) = open_plain(&a)?;
            let r = rt.block_on(pg.checkpoint(&engine))?;
            if !a.quiet {
                eprintln!(
                    "seen pg checkpoint: {} log records → {} rows written, {} deleted (forgotten), {} expired rows removed in {:.3} s",
                    r.records, r.written, r.forgotten, r.expired, r.duration.as_secs_f64()
                );
            }
        }
        PgAction::Restore(a) => {
            require(&a.pg, &a.engine.config()?)?;
            let (_, _, report) = open(&a.pg, &a.engine, a.quiet, &rt)?;
            if !a.quiet && !report.is_some_and(|r| r.restored) {
                eprintln!("seen pg restore: the local state is current; nothing to restore");
            }
        }
        PgAction::Import(a) => {
            let (pg, engine) = open_plain(&a.store)?;
            let bar = super::progress_bar("importing", "rows", a.store.quiet);
            let r = rt.block_on(pg.import(
                &engine,
                &ImportTable {
                    table: a.table,
                    id_column: a.id_column,
                    processed_at_column: a.processed_at_column,
                },
                |done, total| {
                    bar.set_length(total);
                    bar.set_position(done);
                },
            ))?;
            bar.finish_and_clear();
            if !a.store.quiet {
                eprintln!(
                    "seen pg import: {} rows within the TTL, {} ids marked, {} invalid (null/empty/too long) in {:.3} s",
                    r.rows, r.imported, r.invalid, r.duration.as_secs_f64()
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn require(pg: &PgArgs, config: &Config) -> anyhow::Result<Postgres> {
    pg.postgres(config)?
        .context("--postgres URL (or SEEN_POSTGRES_URL) is required")
}

/// The store without restoring (checkpoint and import act on it as is).
fn open_plain(a: &PgStore) -> anyhow::Result<(Postgres, Arc<Engine>)> {
    let config = a.engine.config()?;
    if config.state_dir.is_none() {
        bail!("--state DIR (or SEEN_STATE_DIR) is required");
    }
    let pg = require(&a.pg, &config)?;
    Ok((pg, a.engine.open_engine(a.quiet, "pg")?))
}

/// Open the configured store; with a PostgreSQL URL, restore it first if
/// its local state is empty or behind (with a progress bar).
pub(crate) fn open(
    pg: &PgArgs,
    engine: &EngineArgs,
    quiet: bool,
    rt: &tokio::runtime::Runtime,
) -> anyhow::Result<(Option<Postgres>, Arc<Engine>, Option<RestoreReport>)> {
    open_config(pg, &engine.config()?, quiet, rt, || {
        engine.open_engine(quiet, "pg")
    })
}

/// [`open`] for settings already read; `plain` opens without PostgreSQL.
fn open_config(
    pg: &PgArgs,
    config: &Config,
    quiet: bool,
    rt: &tokio::runtime::Runtime,
    plain: impl FnOnce() -> anyhow::Result<Arc<Engine>>,
) -> anyhow::Result<(Option<Postgres>, Arc<Engine>, Option<RestoreReport>)> {
    let Some(p) = pg.postgres(config)? else {
        return Ok((None, plain()?, None));
    };
    let Some(dir) = &config.state_dir else {
        bail!("--postgres needs a state directory (--state DIR or SEEN_STATE_DIR)");
    };
    let bar = super::progress_bar("restoring", "marks", quiet);
    let (engine, report) = rt
        .block_on(p.open(config.builder(), dir, |done, total| {
            bar.set_length(total);
            bar.set_position(done);
        }))
        .with_context(|| format!("opening store {:?} with PostgreSQL", p.store()))?;
    bar.finish_and_clear();
    if report.restored && !quiet {
        eprintln!(
            "seen: restored store {:?} from PostgreSQL: {} live marks, {} new here, in {:.3} s",
            p.store(),
            report.rows,
            report.loaded,
            report.duration.as_secs_f64()
        );
    }
    Ok((Some(p), Arc::new(engine), Some(report)))
}

/// A store opened for a long-running command: restored if needed, then
/// checkpointed in the background until [`Attached::finish`].
pub(crate) struct Attached {
    pub engine: Arc<Engine>,
    pub checkpointer: Option<Checkpointer>,
    _rt: tokio::runtime::Runtime,
}

impl Attached {
    pub(crate) fn open(pg: &PgArgs, engine: &EngineArgs, quiet: bool) -> anyhow::Result<Attached> {
        let config = engine.config()?;
        Self::open_config(pg, config, quiet, || engine.open_engine(quiet, "filter"))
    }

    /// [`Attached::open`] for settings already read; `plain` opens
    /// without PostgreSQL.
    pub(crate) fn open_config(
        pg: &PgArgs,
        config: Config,
        quiet: bool,
        plain: impl FnOnce() -> anyhow::Result<Arc<Engine>>,
    ) -> anyhow::Result<Attached> {
        let rt = runtime()?;
        let _in_runtime = rt.enter();
        let (p, engine, _) = open_config(pg, &config, quiet, &rt, plain)?;
        let checkpointer = match p {
            None => None,
            Some(p) => Some(Checkpointer::start(
                Arc::new(p),
                Arc::clone(&engine),
                pg.checkpoint_every
                    .or(config.checkpoint_interval)
                    .unwrap_or(DEFAULT_INTERVAL),
                pg.checkpoint_marks.map(|n| n as u64),
            )?),
        };
        if let Some(addr) = config.metrics_addr {
            let watch = checkpointer.as_ref().map(Checkpointer::watch);
            super::serve_metrics(addr, &engine, |registry| {
                if let Some(w) = watch {
                    seen::metrics::register_checkpoint(registry, w);
                }
            })?;
        }
        drop(_in_runtime);
        Ok(Attached {
            engine,
            checkpointer,
            _rt: rt,
        })
    }

    /// The checkpointer's status, for metrics.
    #[cfg_attr(not(feature = "kafka"), allow(dead_code))]
    pub(crate) fn watch(&self) -> Option<seen::checkpoint::CheckpointWatch> {
        self.checkpointer.as_ref().map(Checkpointer::watch)
    }

    /// Stop checkpointing after a last checkpoint.
    pub(crate) fn finish(self) -> anyhow::Result<()> {
        if let Some(cp) = self.checkpointer {
            if let Some(e) = cp.stop() {
                return Err(e).context("the last checkpoint to PostgreSQL");
            }
        }
        Ok(())
    }
}
