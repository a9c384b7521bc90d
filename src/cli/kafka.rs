//! `seen kafka`: a Kafka → Kafka dedup stage, over `seen::kafka::stage`.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use seen::kafka::sink::{Compression, Partitioning};
use seen::kafka::stage::{self, StageConfig, StageStats};
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
    /// A message without a readable id: skip, pass (produce it unmarked),
    /// dead-letter (to --dead-letter-topic, the reason in a header) or
    /// fail (stop with exit code 2).
    #[arg(long, default_value = "skip", value_parser = clap::value_parser!(OnInvalid))]
    on_invalid: OnInvalid,
    /// The dead-letter topic for --on-invalid dead-letter.
    #[arg(long)]
    dead_letter_topic: Option<String>,
    /// Messages decided per stage batch (one flush, one sync, one commit each).
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Output partition: input (the one read from), key (murmur2 of the
    /// key), round-robin, or fixed:N.
    #[arg(long, default_value = "input", value_parser = clap::value_parser!(Partitioning))]
    partitioner: Partitioning,
    /// Output compression: none, gzip, snappy, lz4 or zstd.
    #[arg(long, default_value = "none", value_parser = clap::value_parser!(Compression))]
    compression: Compression,
    /// How long the producer waits to fill a batch (linger.ms).
    #[arg(long, default_value = "5ms", value_parser = humantime::parse_duration)]
    linger: std::time::Duration,
    /// The largest produce request batch in bytes (batch.size).
    #[arg(long, default_value_t = 1_000_000)]
    batch_bytes: usize,
    /// The largest produce request batch in messages (batch.num.messages).
    #[arg(long, default_value_t = 10_000)]
    batch_messages: usize,
    /// Keep resending failed deliveries (backoff with jitter) this long,
    /// then stop with an error.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    retry_for: std::time::Duration,
    /// Consecutive failed deliveries that open the circuit breaker.
    #[arg(long, default_value_t = 5)]
    breaker_failures: u32,
    /// How long the breaker stays open before a probe.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    breaker_open_for: std::time::Duration,
    /// Produce and commit the input offsets in one Kafka transaction per
    /// batch, with this transactional.id (for readers with
    /// isolation.level=read_committed).
    #[arg(long)]
    transactional_id: Option<String>,
    /// A librdkafka consumer property, KEY=VALUE (repeatable).
    #[arg(short = 'X', value_parser = parse_property)]
    consumer_property: Vec<(String, String)>,
    /// A librdkafka producer property, KEY=VALUE (repeatable; applied last).
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
    // The stage makes its marks durable itself, before it records output
    // positions (about once a second); a sync per batch buys nothing, so
    // unless asked for, batches are not synced one by one.
    if args.engine.durability.is_none() && std::env::var_os("SEEN_DURABILITY").is_none() {
        config.durability = seen::Durability::None;
    }
    // Served below, with the stage's metrics.
    let metrics_addr = config.metrics_addr.take();
    let mut stage_config = StageConfig {
        ids: args.id,
        consumer_properties: args.consumer_property,
        dead_letter_topic: args.dead_letter_topic,
        on_invalid: args.on_invalid,
        batch: args.batch.max(1),
        ..StageConfig::new(
            &brokers,
            &args.group,
            &args.input.iter().map(String::as_str).collect::<Vec<_>>(),
            &args.output,
        )
    };
    let producer = &mut stage_config.producer;
    producer.partitioning = args.partitioner;
    producer.compression = args.compression;
    producer.linger = args.linger;
    producer.batch_bytes = args.batch_bytes;
    producer.batch_messages = args.batch_messages;
    producer.retry.give_up_after = args.retry_for;
    producer.breaker.failures = args.breaker_failures.max(1);
    producer.breaker.open_for = args.breaker_open_for;
    producer.properties = args.producer_property;
    producer.transactional_id = args.transactional_id;
    // The read-back's broker round trips (connect, metadata, the first
    // fetches) overlap the replay of the marks.
    let (opened, read_back) = std::thread::scope(|scope| {
        let read_back = scope.spawn(|| stage::ReadBack::start(&stage_config, &state));
        let opened = (|| -> anyhow::Result<_> {
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
            let engine = Arc::new(config.open()?);
            #[cfg(feature = "postgres")]
            return Ok((attached, engine));
            #[cfg(not(feature = "postgres"))]
            Ok(engine)
        })();
        (opened, read_back.join())
    });
    // An engine that cannot open (another process holds the state) says
    // so first.
    #[cfg(feature = "postgres")]
    let (attached, engine) = opened?;
    #[cfg(not(feature = "postgres"))]
    let engine = opened?;
    let read_back = read_back
        .map_err(|_| anyhow::anyhow!("the read-back thread panicked"))?
        .map_err(|e| anyhow::anyhow!(e))?;
    let stats = Arc::new(StageStats::default());
    if let Some(addr) = metrics_addr {
        let stats = Arc::clone(&stats);
        #[cfg(feature = "postgres")]
        let watch = attached.watch();
        super::serve_metrics(addr, &engine, move |registry| {
            seen::metrics::register_stage(registry, stats);
            #[cfg(feature = "postgres")]
            if let Some(w) = watch {
                seen::metrics::register_checkpoint(registry, w);
            }
        })?;
    }
    let progress = Progress::start(Arc::clone(&stats), args.quiet);
    let started = Instant::now();
    let mut summary = Summary::default();
    let outcome = stage::run_after(
        read_back,
        &stage_config,
        &engine,
        &state,
        stop_on_signals(),
        &stats,
        &mut summary,
    );
    progress.finish();
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

/// A one-line status on stderr while the stage runs (hidden when stderr
/// is not a terminal, or with --quiet).
struct Progress {
    bar: indicatif::ProgressBar,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Progress {
    fn start(stats: Arc<StageStats>, quiet: bool) -> Progress {
        let bar = if quiet {
            indicatif::ProgressBar::hidden()
        } else {
            let bar = indicatif::ProgressBar::with_draw_target(
                None,
                indicatif::ProgressDrawTarget::stderr(),
            );
            if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} {msg}") {
                bar.set_style(style);
            }
            bar
        };
        let stop = Arc::new(AtomicBool::new(false));
        let thread = (!bar.is_hidden()).then(|| {
            let (bar, stop) = (bar.clone(), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(Relaxed) {
                    let lag: i64 = stats.lag().iter().map(|l| l.2.max(0)).sum();
                    bar.set_message(format!(
                        "seen kafka: read {} messages, produced {}, invalid {}, lag {lag}",
                        stats.read.load(Relaxed),
                        stats.produced.load(Relaxed),
                        stats.invalid.load(Relaxed),
                    ));
                    bar.tick();
                    std::thread::sleep(std::time::Duration::from_millis(200));
                }
            })
        });
        Progress { bar, stop, thread }
    }

    fn finish(mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.bar.finish_and_clear();
    }
}
