//! `seen kafka`: a Kafka → Kafka dedup stage, over `seen::kafka::stage`.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use seen::kafka::stage::{self, StageConfig};
use seen::kafka::IdStrategy;
use seen::stage::{OnInvalid, StageError, Summary};

use super::{EngineArgs, EXIT_INVALID_INPUT};

#[derive(Args, Debug)]
pub(crate) struct KafkaArgs {
    /// Bootstrap brokers, HOST:PORT[,HOST:PORT…] [env: KAFKA_BOOTSTRAP_SERVERS].
    #[arg(long)]
    brokers: Option<String>,
    /// Consumer group of the input.
    #[arg(long)]
    group: String,
    /// Input topics (comma-separated).
    #[arg(long, value_delimiter = ',', required = true)]
    input: Vec<String>,
    /// Output topic.
    #[arg(long)]
    output: String,
    /// Where ids come from: header[:NAME], tpo, key, json:/ptr[,/ptr…],
    /// hash, debezium; A|B falls back from A to B.
    #[arg(long, default_value = "header", value_parser = clap::value_parser!(IdStrategy))]
    id: IdStrategy,
    /// A message without a readable id: skip, pass (produce it unmarked)
    /// or fail (stop with exit code 2).
    #[arg(long, default_value = "skip", value_parser = parse_on_invalid)]
    on_invalid: OnInvalid,
    /// Messages decided per batch (one flush, one sync, one commit each).
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// A librdkafka consumer property, KEY=VALUE (repeatable).
    #[arg(short = 'X', value_parser = parse_property)]
    consumer_property: Vec<(String, String)>,
    /// A librdkafka producer property, KEY=VALUE (repeatable).
    #[arg(short = 'P', value_parser = parse_property)]
    producer_property: Vec<(String, String)>,
    #[command(flatten)]
    engine: EngineArgs,
    #[cfg(feature = "postgres")]
    #[command(flatten)]
    pg: super::pg::PgArgs,
    /// No summary on stderr.
    #[arg(long, short)]
    quiet: bool,
}

fn parse_property(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("{s:?}: expected KEY=VALUE"))
}

fn parse_on_invalid(s: &str) -> Result<OnInvalid, String> {
    match s.parse()? {
        OnInvalid::DeadLetter => {
            Err("seen kafka has no dead-letter topic yet; use skip, pass or fail".into())
        }
        p => Ok(p),
    }
}

/// Set by SIGINT/SIGTERM.
static SIGNALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    SIGNALLED.store(true, Relaxed);
}

/// Route SIGINT and SIGTERM to a flag, so the stage stops between batches:
/// outputs flushed, marks durable, offsets committed.
fn stop_on_signals() -> Arc<AtomicBool> {
    #[allow(unsafe_code)]
    // SAFETY: the handler only stores to an atomic (async-signal-safe).
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    std::thread::spawn(move || loop {
        if SIGNALLED.load(Relaxed) {
            flag.store(true, Relaxed);
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    });
    stop
}

pub(crate) fn run(args: KafkaArgs) -> anyhow::Result<ExitCode> {
    let brokers = match args.brokers.clone() {
        Some(b) => b,
        None => std::env::var("KAFKA_BOOTSTRAP_SERVERS")
            .context("--brokers (or KAFKA_BOOTSTRAP_SERVERS) is required")?,
    };
    let mut config = args.engine.config()?;
    let state = config
        .state_dir
        .clone()
        .context("seen kafka needs --state DIR (or SEEN_STATE_DIR): the read-back after a crash depends on it")?;
    std::fs::create_dir_all(&state).with_context(|| format!("creating {}", state.display()))?;
    // Marks in their own store; output positions beside it.
    config.state_dir = Some(state.join("marks"));
    #[cfg(feature = "postgres")]
    let attached = {
        let plain = config.clone();
        super::pg::Attached::open_config(&args.pg, config, args.quiet, move || {
            Ok(std::sync::Arc::new(plain.open()?))
        })?
    };
    #[cfg(feature = "postgres")]
    let engine = std::sync::Arc::clone(&attached.engine);
    #[cfg(not(feature = "postgres"))]
    let engine = config.open()?;
    let stage_config = StageConfig {
        ids: args.id,
        consumer_properties: args.consumer_property,
        producer_properties: args.producer_property,
        ..StageConfig::new(
            &brokers,
            &args.group,
            &args.input.iter().map(String::as_str).collect::<Vec<_>>(),
            &args.output,
        )
    };
    let started = Instant::now();
    let mut summary = Summary::default();
    let outcome = stage::run(
        &stage_config,
        &engine,
        &state,
        args.on_invalid,
        args.batch.max(1),
        stop_on_signals(),
        &mut summary,
    );
    if !args.quiet {
        eprintln!(
            "seen kafka: read {}, produced {}, duplicate {}, invalid {} in {} batches, {:.1} s",
            summary.read,
            summary.new,
            summary.duplicate,
            summary.invalid,
            summary.batches,
            started.elapsed().as_secs_f64()
        );
    }
    #[cfg(feature = "postgres")]
    {
        drop(engine);
        attached.finish()?;
    }
    match outcome {
        Ok(read_back) => {
            if !args.quiet && read_back > 0 {
                eprintln!("seen kafka: read back {read_back} output messages on start");
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(StageError::Invalid { seq, why }) => {
            eprintln!("seen kafka: message {seq}: {why}");
            Ok(ExitCode::from(EXIT_INVALID_INPUT))
        }
        Err(e) => Err(e.into()),
    }
}
