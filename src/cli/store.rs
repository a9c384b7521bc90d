//! `seen inspect` and `seen verify`: read-only looks at a state directory,
//! printed from `seen::inspect`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use seen::inspect::{self, ProblemKind, StoreInfo};
use seen::Clock;

#[derive(Args, Debug)]
pub(crate) struct StoreArgs {
    /// The state directory.
    dir: PathBuf,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Args, Debug)]
pub(crate) struct InspectArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Show one id's mark instead: its expiry, whether it is live, and the
    /// metadata stored with it. Exit 1 if the log holds no mark of it.
    #[arg(long, value_name = "ID")]
    id: Option<String>,
}

fn load(args: &StoreArgs) -> anyhow::Result<StoreInfo> {
    let bar = super::progress_bar("scanning log", "segments", args.quiet);
    let b = bar.clone();
    let info = inspect::inspect(
        &args.dir,
        seen::SystemClock.now_unix_secs(),
        &move |done, total| {
            b.set_length(total as u64);
            b.set_position(done as u64);
        },
    )?;
    bar.finish_and_clear();
    Ok(info)
}

fn when(unix: u64) -> String {
    if unix == 0 {
        return "-".into();
    }
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix))
        .to_string()
}

pub(crate) fn inspect(args: InspectArgs) -> anyhow::Result<ExitCode> {
    if let Some(id) = &args.id {
        return inspect_id(&args.store, id);
    }
    let args = args.store;
    let info = load(&args)?;
    let file_bytes: u64 = info.segments.iter().map(|s| s.file_bytes).sum();
    let used_bytes: u64 = info.segments.iter().map(|s| s.used_bytes).sum();
    let with_meta: u64 = info.segments.iter().map(|s| s.marks_with_metadata).sum();
    println!("store        {}", args.dir.display());
    println!("store id     {:032x}", info.store_id);
    println!("created      {}", when(info.created_unix_secs));
    println!("format       v{}", info.version);
    println!("live keys    {}", info.live_keys);
    println!(
        "expiring     {} .. {}",
        when(info.live_min_expiry),
        when(info.live_max_expiry)
    );
    println!("metadata     {with_meta} marks carry metadata (seen inspect --id ID shows it)");
    println!("segments     {}", info.segments.len());
    println!("bytes        {used_bytes} used of {file_bytes} allocated");
    println!();
    println!(
        "{:>6}  {:>3}  {:>12}  {:>12}  {:>9}  {:>7}  {:<20}  {:<20}  status",
        "seq", "ver", "used", "size", "marks", "forgets", "first expiry", "last expiry"
    );
    for s in &info.segments {
        let status = match (&s.unreadable, &s.damage) {
            (Some(e), _) => format!("UNREADABLE: {e}"),
            (None, Some(d)) => format!("DAMAGED at {}: {}", d.offset, d.reason),
            (None, None) => "ok".into(),
        };
        println!(
            "{:>6}  {:>3}  {:>12}  {:>12}  {:>9}  {:>7}  {:<20}  {:<20}  {status}",
            s.seq,
            s.version,
            s.used_bytes,
            s.file_bytes,
            s.marks,
            s.forgets,
            when(s.min_expiry),
            when(s.max_expiry)
        );
    }
    if !info.stray_files.is_empty() {
        println!(
            "\nstray files (not part of the store): {:?}",
            info.stray_files
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn inspect_id(args: &StoreArgs, id: &str) -> anyhow::Result<ExitCode> {
    let now = seen::SystemClock.now_unix_secs();
    let Some(mark) = inspect::find(&args.dir, id.as_bytes())? else {
        println!("id           {id}");
        println!("mark         none in the log");
        return Ok(ExitCode::FAILURE);
    };
    let state = if mark.forgotten {
        "forgotten"
    } else if mark.is_live(now) {
        "live"
    } else {
        "expired"
    };
    println!("id           {id}");
    println!("mark         {state}");
    println!("expires      {}", when(mark.expiry_unix_secs));
    match &mark.metadata {
        Some(m) => println!("metadata     {}", String::from_utf8_lossy(m)),
        None => println!("metadata     -"),
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn verify(args: StoreArgs) -> anyhow::Result<ExitCode> {
    let info = load(&args)?;
    let problems = info.problems();
    for p in &problems {
        let what = match p.kind {
            ProblemKind::TornTail => "torn tail (opening the store cuts it)",
            ProblemKind::Unreadable => "unreadable segment",
            _ => "corruption",
        };
        eprintln!(
            "{}: offset {}: {what}: {} ({} bytes affected, {} valid records after it)",
            p.path.display(),
            p.offset,
            p.reason,
            p.bytes,
            p.valid_after
        );
    }
    if problems.is_empty() {
        println!(
            "ok: {} segments, {} records, {} live keys",
            info.segments.len(),
            info.records(),
            info.live_keys
        );
        Ok(ExitCode::SUCCESS)
    } else {
        println!(
            "DAMAGED: {} problem(s) in {} segments",
            problems.len(),
            info.segments.len()
        );
        Ok(ExitCode::FAILURE)
    }
}
