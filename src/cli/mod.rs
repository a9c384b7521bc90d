//! Command-line interface: argument parsing and dispatch. Every command is
//! a thin front-end over a library call.

mod bench;
mod filter;
#[cfg(feature = "kafka")]
mod kafka;
#[cfg(feature = "postgres")]
mod pg;
mod store;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use seen::config::{parse_count, parse_size, parse_ttl};
use seen::{Config, Durability, Engine, MemoryPolicy, RecoveryMode};

/// Have I already processed this event? Deduplicates event streams.
#[derive(Parser, Debug)]
#[command(name = "seen", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Copy stdin to stdout, keeping only lines whose id was not seen before.
    Filter(filter::FilterArgs),
    /// Describe a state directory: segments, live keys, expiry range,
    /// bytes; or one id's mark and metadata (`--id`).
    Inspect(store::InspectArgs),
    /// Check every record of a state directory; exit 1 on any damage,
    /// naming the file and offset.
    Verify(store::StoreArgs),
    /// Measure a durable workload on a scratch state directory.
    Bench(bench::BenchArgs),
    /// Deduplicate a Kafka topic into another: each id once in the output,
    /// even across kill -9 (feature `kafka`).
    #[cfg(feature = "kafka")]
    Kafka(Box<kafka::KafkaArgs>),
    /// Checkpoint to, restore from and import from PostgreSQL (feature
    /// `postgres`).
    #[cfg(feature = "postgres")]
    Pg(pg::PgCommand),
}

/// Exit code for bad input under `--on-invalid fail`, and for usage errors.
pub(crate) const EXIT_INVALID_INPUT: u8 = 2;

pub(crate) fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Filter(args) => filter::run(args),
        Command::Inspect(args) => store::inspect(args),
        Command::Verify(args) => store::verify(args),
        Command::Bench(args) => bench::run(args),
        #[cfg(feature = "kafka")]
        Command::Kafka(args) => kafka::run(*args),
        #[cfg(feature = "postgres")]
        Command::Pg(args) => pg::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("seen: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Engine settings shared by the commands that open a store. Each flag
/// overrides its `SEEN_*` variable (see `seen::Config`); a bad flag is
/// reported by its flag name, a bad variable by its variable name.
#[derive(Args, Debug, Default)]
pub(crate) struct EngineArgs {
    /// State directory: marks persist across runs (created if missing).
    /// Without it, state lives only as long as the run [env: SEEN_STATE_DIR].
    #[arg(long, value_name = "DIR")]
    state: Option<std::path::PathBuf>,

    /// How long an id is remembered: `90s`, `1h`, `7d`, or seconds; 0
    /// disables dedup [default: 1h; env: SEEN_TTL_SECONDS, alias
    /// KAFKA_DEDUP_TTL_SECONDS].
    #[arg(long, value_parser = parse_ttl)]
    ttl: Option<Duration>,

    /// When marks reach the disk: `sync`, `periodic` (every 10 ms),
    /// `periodic:<duration>`, or `none` [default: sync; env: SEEN_DURABILITY].
    #[arg(long, value_parser = clap::value_parser!(Durability))]
    durability: Option<Durability>,

    /// Sync interval for `--durability periodic` (same as `periodic:<d>`).
    #[arg(long, value_parser = humantime::parse_duration, hide = true)]
    flush_interval: Option<Duration>,

    /// Longest accepted id in bytes [default: 1024; env: SEEN_MAX_ID_LEN].
    #[arg(long, value_parser = parse_count)]
    max_id_len: Option<usize>,

    /// Expected live ids, to size memory up front [env: SEEN_CAPACITY].
    #[arg(long, value_parser = parse_count)]
    capacity: Option<usize>,

    /// Memory ceiling for the set, e.g. `512MiB` [env: SEEN_MEMORY_LIMIT_BYTES].
    #[arg(long, value_parser = parse_size)]
    memory_limit: Option<usize>,

    /// At the ceiling: `reject` or `evict-oldest` [env: SEEN_MEMORY_POLICY].
    #[arg(long, value_parser = clap::value_parser!(MemoryPolicy))]
    memory_policy: Option<MemoryPolicy>,

    /// Damage found on open: `tolerate-torn-tail`, `absolute-consistency`
    /// or `salvage` [env: SEEN_RECOVERY_MODE].
    #[arg(long, value_parser = clap::value_parser!(RecoveryMode))]
    recovery_mode: Option<RecoveryMode>,

    /// Shards, a power of two [default: 64; env: SEEN_SHARDS].
    #[arg(long, value_parser = parse_count)]
    shards: Option<usize>,

    /// Bytes per log segment, preallocated on disk, e.g. `4MiB`
    /// [default: 64MiB; env: SEEN_SEGMENT_SIZE].
    #[arg(long, value_parser = parse_size)]
    segment_size: Option<usize>,

    /// Serve Prometheus metrics at http://ADDR/metrics while running
    /// (e.g. 127.0.0.1:9898) [env: SEEN_METRICS_ADDR].
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
}

impl EngineArgs {
    /// The environment's configuration with these flags over it.
    pub(crate) fn config(&self) -> anyhow::Result<Config> {
        let mut c = Config::from_env()?;
        if let Some(dir) = &self.state {
            c.state_dir = Some(dir.clone());
        }
        if let Some(ttl) = self.ttl {
            c.ttl = ttl;
        }
        if let Some(d) = self.durability {
            c.durability = d;
        }
        if let (Durability::Periodic(_), Some(every)) = (c.durability, self.flush_interval) {
            c.durability = Durability::Periodic(every);
        }
        c.max_id_len = self.max_id_len.or(c.max_id_len);
        c.capacity = self.capacity.or(c.capacity);
        c.shards = self.shards.or(c.shards);
        c.segment_size = self.segment_size.or(c.segment_size);
        c.metrics_addr = self.metrics_addr.or(c.metrics_addr);
        if let Some(m) = self.recovery_mode {
            c.recovery_mode = m;
        }
        match (self.memory_limit, c.memory_limit) {
            (Some(bytes), Some((_, policy))) => c.memory_limit = Some((bytes, policy)),
            (Some(bytes), None) => c.memory_limit = Some((bytes, MemoryPolicy::default())),
            _ => {}
        }
        if let (Some(policy), Some((bytes, _))) = (self.memory_policy, c.memory_limit) {
            c.memory_limit = Some((bytes, policy));
        }
        Ok(c)
    }

    /// Open the configured engine, with a replay progress bar, and serve
    /// metrics if asked.
    #[cfg_attr(feature = "postgres", allow(dead_code))]
    pub(crate) fn open(&self, quiet: bool, command: &str) -> anyhow::Result<Arc<Engine>> {
        let engine = self.open_engine(quiet, command)?;
        if let Some(addr) = self.config()?.metrics_addr {
            serve_metrics(addr, &engine, |_| {})?;
        }
        Ok(engine)
    }

    /// [`EngineArgs::open`] without the metrics endpoint.
    pub(crate) fn open_engine(&self, quiet: bool, command: &str) -> anyhow::Result<Arc<Engine>> {
        let config = self.config()?;
        let engine = match &config.state_dir {
            None => config.builder().build()?,
            Some(dir) => {
                let bar = progress_bar("replaying log", "segments", quiet);
                let replay_bar = bar.clone();
                let engine = config
                    .builder()
                    .replay_progress(move |done, total| {
                        replay_bar.set_length(total as u64);
                        replay_bar.set_position(done as u64);
                    })
                    .open(dir)?;
                bar.finish_and_clear();
                if let (Some(r), false) = (engine.recovery_report(), quiet) {
                    if r.truncated_bytes > 0 || !r.stray_files.is_empty() {
                        eprintln!(
                            "seen {command}: recovery cut a torn tail of {} bytes ({} unacknowledged records); stray files left alone: {:?}",
                            r.truncated_bytes, r.dropped_records, r.stray_files
                        );
                    }
                }
                engine
            }
        };
        Ok(Arc::new(engine))
    }
}

/// Serve `/metrics` for `engine` on `addr` from a background thread.
pub(crate) fn serve_metrics(
    addr: std::net::SocketAddr,
    engine: &Arc<Engine>,
    more: impl FnOnce(&mut prometheus_client::registry::Registry),
) -> anyhow::Result<()> {
    let mut registry = prometheus_client::registry::Registry::default();
    seen::metrics::register(&mut registry, engine);
    more(&mut registry);
    let server = tiny_http::Server::http(addr)
        .map_err(|e| anyhow::anyhow!("metrics address {addr}: {e}"))?;
    std::thread::Builder::new()
        .name("seen-metrics".into())
        .spawn(move || {
            for request in server.incoming_requests() {
                let response = if request.url() == "/metrics" {
                    let mut body = String::new();
                    let _ = prometheus_client::encoding::text::encode(&mut body, &registry);
                    let header = tiny_http::Header::from_bytes(
                        "Content-Type",
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )
                    .ok();
                    let mut r = tiny_http::Response::from_string(body);
                    if let Some(h) = header {
                        r.add_header(h);
                    }
                    r
                } else {
                    tiny_http::Response::from_string("see /metrics\n").with_status_code(404)
                };
                let _ = request.respond(response);
            }
        })
        .context("starting the metrics thread")?;
    Ok(())
}

/// A progress bar on stderr; hidden when stderr is not a terminal or `quiet`.
pub(crate) fn progress_bar(
    what: &'static str,
    unit: &'static str,
    quiet: bool,
) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let bar =
        indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
    if let Ok(style) = indicatif::ProgressStyle::with_template(&format!(
        "{{msg}} [{{bar:30}}] {{pos}}/{{len}} {unit} ({{eta}})"
    )) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what);
    bar
}
