//! `seen filter`: stdin → first-seen lines on stdout, over the library's
//! dedup loop (`seen::stage`).

use std::io::{self, BufWriter};
use std::process::ExitCode;
use std::time::Instant;

use clap::Args;
use seen::stage::{
    self, IdSpec, LineSink, LineSource, OnInvalid, StageError, StageOptions, Summary,
};

use super::{EngineArgs, EXIT_INVALID_INPUT};

#[derive(Args, Debug)]
pub(crate) struct FilterArgs {
    /// Where each line's id comes from: `line` (the whole line, minus its
    /// line ending), `json:/ptr[,/ptr…]` (JSON pointers into NDJSON; several
    /// make a composite id), or `debezium` (a Debezium change event's
    /// position, table, operation and, for snapshot rows, row image).
    #[arg(long, value_parser = IdSpec::parse, conflicts_with = "keys")]
    id: Option<IdSpec>,

    /// A JSON pointer to the id inside each NDJSON line; repeat for a
    /// composite id (same as `--id json:/a,/b`).
    #[arg(long = "key", value_name = "POINTER")]
    keys: Vec<String>,

    /// What to do with a line whose id cannot be read (bad JSON, missing
    /// key, not a Debezium event, empty or oversized id): `skip`, `pass`
    /// (write it through) or `fail` (stop with exit code 2).
    #[arg(long, default_value = "skip", value_parser = parse_on_invalid)]
    on_invalid: OnInvalid,

    /// Lines decided and written per batch.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    batch: u32,

    #[command(flatten)]
    engine: EngineArgs,

    #[cfg(feature = "postgres")]
    #[command(flatten)]
    pg: super::pg::PgArgs,

    /// Print no summary on stderr.
    #[arg(long, short)]
    quiet: bool,
}

fn parse_on_invalid(s: &str) -> Result<OnInvalid, String> {
    match s.parse()? {
        OnInvalid::DeadLetter => Err("seen filter has no dead-letter destination".into()),
        p => Ok(p),
    }
}

/// Invalid lines reported individually before the rest are only counted.
const MAX_REPORTED: u64 = 20;

pub(crate) fn run(args: FilterArgs) -> anyhow::Result<ExitCode> {
    let id = match (&args.id, args.keys.is_empty()) {
        (Some(spec), _) => spec.clone(),
        (None, true) => IdSpec::Whole,
        (None, false) => {
            if let Err(e) = stage::id::check_pointers(&args.keys) {
                eprintln!("seen: error: --key: {e}");
                return Ok(ExitCode::from(EXIT_INVALID_INPUT));
            }
            IdSpec::Json(args.keys.clone())
        }
    };
    #[cfg(feature = "postgres")]
    let attached = super::pg::Attached::open(&args.pg, &args.engine, args.quiet)?;
    #[cfg(feature = "postgres")]
    let engine = std::sync::Arc::clone(&attached.engine);
    #[cfg(not(feature = "postgres"))]
    let engine = args.engine.open(args.quiet, "filter")?;
    let options = StageOptions {
        id,
        batch: args.batch as usize,
        on_invalid: args.on_invalid,
    };
    let started = Instant::now();
    let mut reported = 0u64;
    let mut source = LineSource::new(io::stdin());
    let mut sink = LineSink::new(
        BufWriter::with_capacity(1 << 16, io::stdout().lock()),
        move |line, why, action| {
            reported += 1;
            if reported <= MAX_REPORTED || action == OnInvalid::Fail {
                eprintln!("seen filter: line {line}: {why}");
            } else if reported == MAX_REPORTED + 1 {
                eprintln!("seen filter: (further invalid lines are only counted)");
            }
        },
    );
    let mut summary = Summary::default();
    let outcome = stage::run(&engine, &mut source, &mut sink, &options, &mut summary);
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
    #[cfg(feature = "postgres")]
    {
        drop(engine);
        attached.finish()?;
    }
    match outcome {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(StageError::Invalid { .. }) => Ok(ExitCode::from(EXIT_INVALID_INPUT)),
        Err(e) => Err(e.into()),
    }
}
