//! `seen filter`: stdin → first-seen lines on stdout.

use std::borrow::Cow;
use std::io::{self, BufRead, BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use seen::{Deferred, Durability, Engine, Error};

use super::EXIT_INVALID_INPUT;

#[derive(Args, Debug)]
pub(crate) struct FilterArgs {
    /// JSON pointer(s) to the id inside each NDJSON line (repeat for a
    /// composite id, e.g. `--key /source/lsn --key /source/txId`). Without
    /// `--key`, each whole line (minus its line ending) is the id.
    #[arg(long = "key", value_name = "POINTER")]
    keys: Vec<String>,

    /// How long an id is remembered: `90s`, `1h`, `7d`, or seconds; 0
    /// disables dedup [default: 1h; env KAFKA_DEDUP_TTL_SECONDS is an alias].
    #[arg(long, value_parser = super::parse_ttl, env = "SEEN_TTL_SECONDS")]
    ttl: Option<Duration>,

    /// What to do with a line whose id cannot be read (bad JSON, missing
    /// key, empty or oversized id).
    #[arg(long, value_enum, default_value_t = OnInvalid::Skip)]
    on_invalid: OnInvalid,

    /// Longest accepted id in bytes.
    #[arg(long, default_value_t = seen::DEFAULT_MAX_ID_LEN)]
    max_id_len: usize,

    /// Lines decided and written per batch.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    batch: u32,

    /// State directory: marks persist across runs (created if missing).
    /// Without it, state lives only as long as the run.
    #[arg(long, value_name = "DIR", env = "SEEN_STATE_DIR")]
    state: Option<PathBuf>,

    /// When marks reach the disk. `sync`: each batch's lines are written
    /// and flushed to stdout, then its marks are made durable before more
    /// input is read (a crash repeats at most one batch, never loses a
    /// line). `periodic`: synced every --flush-interval. `none`: page cache.
    #[arg(long, value_enum, default_value_t = DurabilityArg::Sync, env = "SEEN_DURABILITY")]
    durability: DurabilityArg,

    /// Sync interval for `--durability periodic`.
    #[arg(long, default_value = "10ms", value_parser = humantime::parse_duration)]
    flush_interval: Duration,

    /// Serve Prometheus metrics at http://ADDR/metrics while running
    /// (e.g. 127.0.0.1:9898).
    #[arg(long, value_name = "ADDR", env = "SEEN_METRICS_ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,

    /// Print no summary on stderr.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum DurabilityArg {
    None,
    Periodic,
    Sync,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum OnInvalid {
    /// Drop the line (counted and reported).
    Skip,
    /// Write the line through as if new (counted and reported).
    Pass,
    /// Stop with exit code 2 at the first invalid line.
    Fail,
}

/// Why a line has no usable id.
#[derive(Debug)]
enum Invalid {
    Json(serde_json::Error),
    MissingKey(String),
    NullKey(String),
    Id(Error),
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Invalid::Json(e) => write!(f, "malformed JSON: {e}"),
            Invalid::MissingKey(k) => write!(f, "missing key {k}"),
            Invalid::NullKey(k) => write!(f, "key {k} is null"),
            Invalid::Id(e) => write!(f, "{e}"),
        }
    }
}

#[derive(Default, Debug)]
struct Summary {
    read: u64,
    new: u64,
    duplicate: u64,
    invalid: u64,
}

/// Invalid lines reported individually before the rest are only counted.
const MAX_REPORTED: u64 = 20;

pub(crate) fn run(args: FilterArgs) -> anyhow_like::Result<ExitCode> {
    for k in &args.keys {
        if !(k.is_empty() || k.starts_with('/')) {
            eprintln!("seen: error: --key {k:?} is not a JSON pointer (it must start with '/')");
            return Ok(ExitCode::from(EXIT_INVALID_INPUT));
        }
    }
    let ttl = match args.ttl {
        Some(ttl) => ttl,
        None => match std::env::var("KAFKA_DEDUP_TTL_SECONDS") {
            Ok(v) => super::parse_ttl(&v)
                .map_err(|e| anyhow_like::Error::msg(format!("KAFKA_DEDUP_TTL_SECONDS: {e}")))?,
            Err(_) => seen::DEFAULT_TTL,
        },
    };
    let builder = Engine::builder().ttl(ttl).max_id_len(args.max_id_len);
    let engine = match &args.state {
        None => builder.build()?,
        Some(dir) => {
            let durability = match args.durability {
                DurabilityArg::None => Durability::None,
                DurabilityArg::Periodic => Durability::Periodic(args.flush_interval),
                DurabilityArg::Sync => Durability::Sync,
            };
            let bar = super::progress_bar("replaying log", args.quiet);
            let replay_bar = bar.clone();
            let engine = builder
                .durability(durability)
                .replay_progress(move |done, total| {
                    replay_bar.set_length(total as u64);
                    replay_bar.set_position(done as u64);
                })
                .open(dir)?;
            bar.finish_and_clear();
            if let (Some(r), false) = (engine.recovery_report(), args.quiet) {
                if r.truncated_bytes > 0 || !r.stray_files.is_empty() {
                    eprintln!(
                        "seen filter: recovery cut a torn tail of {} bytes ({} unacknowledged records); stray files left alone: {:?}",
                        r.truncated_bytes, r.dropped_records, r.stray_files
                    );
                }
            }
            engine
        }
    };
    let engine = std::sync::Arc::new(engine);
    if let Some(addr) = args.metrics_addr {
        super::serve_metrics(addr, &engine)?;
    }
    let started = Instant::now();
    let stdin = io::stdin().lock();
    let stdout = io::stdout().lock();
    let mut out = BufWriter::with_capacity(1 << 16, stdout);
    let mut summary = Summary::default();
    let outcome = filter_stream(&engine, &args, stdin, &mut out, &mut summary);
    // Whatever happened, what was decided new is written out.
    let flushed = out.flush();
    if !args.quiet {
        let secs = started.elapsed().as_secs_f64();
        eprintln!(
            "seen filter: read {} lines, new {}, duplicate {}, invalid {} in {:.3} s ({:.0} lines/s)",
            summary.read,
            summary.new,
            summary.duplicate,
            summary.invalid,
            secs,
            summary.read as f64 / secs.max(1e-9)
        );
    }
    match outcome {
        Ok(()) => {
            flushed.map_err(|e| anyhow_like::Error::io("stdout", e))?;
            Ok(ExitCode::SUCCESS)
        }
        Err(Stop::Invalid) => Ok(ExitCode::from(EXIT_INVALID_INPUT)),
        Err(Stop::Io(e)) => Err(e),
    }
}

enum Stop {
    Invalid,
    Io(anyhow_like::Error),
}

fn filter_stream(
    engine: &Engine,
    args: &FilterArgs,
    mut input: impl BufRead,
    out: &mut impl Write,
    summary: &mut Summary,
) -> Result<(), Stop> {
    let mut line = Vec::with_capacity(4096);
    let mut marks = Vec::with_capacity(args.batch as usize);
    loop {
        // One batch: decide up to `batch` lines in memory, write the new
        // ones and flush stdout, and only then log their marks. A crash
        // anywhere repeats at most this batch's lines; it never marks a
        // line that was not printed.
        marks.clear();
        let mut eof = false;
        for _ in 0..args.batch {
            line.clear();
            let n = input
                .read_until(b'\n', &mut line)
                .map_err(|e| Stop::Io(anyhow_like::Error::io("stdin", e)))?;
            if n == 0 {
                eof = true;
                break;
            }
            summary.read += 1;
            let write = match id_of(&line, &args.keys)
                .and_then(|id| engine.check_and_insert_deferred(&id).map_err(Invalid::Id))
            {
                Ok(Deferred::New(mark)) => {
                    marks.push(mark);
                    summary.new += 1;
                    true
                }
                Ok(Deferred::Duplicate) => {
                    summary.duplicate += 1;
                    false
                }
                Err(Invalid::Id(e)) if !matches!(e, Error::EmptyId | Error::IdTooLong { .. }) => {
                    // Not the line's fault (memory ceiling, storage): stop.
                    return Err(Stop::Io(e.into()));
                }
                Err(why) => {
                    summary.invalid += 1;
                    if summary.invalid <= MAX_REPORTED || args.on_invalid == OnInvalid::Fail {
                        eprintln!("seen filter: line {}: {why}", summary.read);
                    } else if summary.invalid == MAX_REPORTED + 1 {
                        eprintln!("seen filter: (further invalid lines are only counted)");
                    }
                    match args.on_invalid {
                        OnInvalid::Skip => false,
                        OnInvalid::Pass => true,
                        OnInvalid::Fail => {
                            // Keep the promise for the lines already written.
                            out.flush()
                                .map_err(|e| Stop::Io(anyhow_like::Error::io("stdout", e)))?;
                            engine.commit(&marks).map_err(|e| Stop::Io(e.into()))?;
                            return Err(Stop::Invalid);
                        }
                    }
                }
            };
            if write {
                out.write_all(&line)
                    .map_err(|e| Stop::Io(anyhow_like::Error::io("stdout", e)))?;
                if line.last() != Some(&b'\n') {
                    // Last line without a newline: keep the output line-based.
                    out.write_all(b"\n")
                        .map_err(|e| Stop::Io(anyhow_like::Error::io("stdout", e)))?;
                }
            }
        }
        out.flush()
            .map_err(|e| Stop::Io(anyhow_like::Error::io("stdout", e)))?;
        engine.commit(&marks).map_err(|e| Stop::Io(e.into()))?;
        if eof {
            return Ok(());
        }
    }
}

/// The id of one input line.
fn id_of<'a>(line: &'a [u8], keys: &[String]) -> Result<Cow<'a, [u8]>, Invalid> {
    let line = strip_line_ending(line);
    if keys.is_empty() {
        return Ok(Cow::Borrowed(line));
    }
    let doc: serde_json::Value = serde_json::from_slice(line).map_err(Invalid::Json)?;
    if let [key] = keys {
        return part(&doc, key).map(Cow::Owned);
    }
    // Composite: each part length-prefixed (u32 LE), so ("ab","c") and
    // ("a","bc") stay different ids.
    let mut id = Vec::with_capacity(64);
    for key in keys {
        let p = part(&doc, key)?;
        id.extend_from_slice(&(p.len() as u32).to_le_bytes());
        id.extend_from_slice(&p);
    }
    Ok(Cow::Owned(id))
}

/// A string's own bytes; any other JSON value as compact JSON text.
fn part(doc: &serde_json::Value, key: &str) -> Result<Vec<u8>, Invalid> {
    match doc.pointer(key) {
        None => Err(Invalid::MissingKey(key.to_owned())),
        Some(serde_json::Value::Null) => Err(Invalid::NullKey(key.to_owned())),
        Some(serde_json::Value::String(s)) => Ok(s.as_bytes().to_vec()),
        Some(v) => Ok(v.to_string().into_bytes()),
    }
}

fn strip_line_ending(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// A tiny error type for the CLI: a message with context.
pub(crate) mod anyhow_like {
    pub(crate) type Result<T> = std::result::Result<T, Error>;

    #[derive(Debug)]
    pub(crate) struct Error(String);

    impl Error {
        pub(crate) fn io(what: &str, e: std::io::Error) -> Error {
            Error(format!("{what}: {e}"))
        }
        pub(crate) fn msg(m: impl Into<String>) -> Error {
            Error(m.into())
        }
    }

    impl std::fmt::Display for Error {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.0)
        }
    }

    impl From<seen::Error> for Error {
        fn from(e: seen::Error) -> Error {
            Error(e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_ids_strip_line_endings() {
        assert_eq!(&*id_of(b"abc\r\n", &[]).unwrap(), b"abc");
        assert_eq!(&*id_of(b"abc", &[]).unwrap(), b"abc");
    }

    #[test]
    fn composite_ids_are_unambiguous() {
        let keys = vec!["/a".to_owned(), "/b".to_owned()];
        let x = id_of(br#"{"a":"ab","b":"c"}"#, &keys).unwrap();
        let y = id_of(br#"{"a":"a","b":"bc"}"#, &keys).unwrap();
        assert_ne!(x, y);
    }

    #[test]
    fn json_values_and_errors() {
        let k = vec!["/n".to_owned()];
        assert_eq!(&*id_of(br#"{"n":42}"#, &k).unwrap(), b"42");
        assert!(matches!(
            id_of(br#"{"m":1}"#, &k),
            Err(Invalid::MissingKey(_))
        ));
        assert!(matches!(
            id_of(br#"{"n":null}"#, &k),
            Err(Invalid::NullKey(_))
        ));
        assert!(matches!(id_of(b"{nope", &k), Err(Invalid::Json(_))));
    }
}
