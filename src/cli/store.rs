//! `seen inspect` and `seen verify`: read-only looks at a state directory.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use seen::wal::inspect::{inspect as scan_store, StoreInfo};
use seen::Clock;

use super::filter::anyhow_like;

#[derive(Args, Debug)]
pub(crate) struct StoreArgs {
    /// The state directory.
    dir: PathBuf,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
}

fn load(args: &StoreArgs) -> anyhow_like::Result<StoreInfo> {
    let bar = super::progress_bar("scanning log", args.quiet);
    let b = bar.clone();
    let info = scan_store(
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

pub(crate) fn inspect(args: StoreArgs) -> anyhow_like::Result<ExitCode> {
    let info = load(&args)?;
    let file_bytes: u64 = info.segments.iter().map(|s| s.file_bytes).sum();
    let used_bytes: u64 = info.segments.iter().map(|s| s.used_bytes).sum();
    println!("store        {}", args.dir.display());
    println!("store id     {:032x}", info.store_id);
    println!("created      {}", when(info.created_unix_secs));
    println!("format       v{}", seen::wal::format::FORMAT_VERSION);
    println!("live keys    {}", info.live_keys);
    println!(
        "expiring     {} .. {}",
        when(info.live_min_expiry),
        when(info.live_max_expiry)
    );
    println!("segments     {}", info.segments.len());
    println!("bytes        {used_bytes} used of {file_bytes} allocated");
    println!();
    println!(
        "{:>6}  {:>12}  {:>12}  {:>9}  {:>7}  {:<20}  {:<20}  status",
        "seq", "used", "size", "marks", "forgets", "first expiry", "last expiry"
    );
    for s in &info.segments {
        let status = match (&s.unreadable, &s.damage) {
            (Some(e), _) => format!("UNREADABLE: {e}"),
            (None, Some(d)) => format!("DAMAGED at {}: {}", d.offset, d.reason),
            (None, None) => "ok".into(),
        };
        println!(
            "{:>6}  {:>12}  {:>12}  {:>9}  {:>7}  {:<20}  {:<20}  {status}",
            s.seq,
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

pub(crate) fn verify(args: StoreArgs) -> anyhow_like::Result<ExitCode> {
    let info = load(&args)?;
    let last = info.segments.last().map(|s| s.seq);
    let mut problems = 0;
    for s in &info.segments {
        if let Some(e) = &s.unreadable {
            problems += 1;
            eprintln!("{}: offset 0: {e}", s.path.display());
        }
        if let Some(d) = &s.damage {
            problems += 1;
            let what = if Some(s.seq) == last && d.valid_after == 0 {
                "torn tail (opening the store cuts it)"
            } else {
                "corruption"
            };
            eprintln!(
                "{}: offset {}: {what}: {} ({} bytes affected, {} valid records after it)",
                s.path.display(),
                d.offset,
                d.reason,
                d.nonzero_end.saturating_sub(d.offset),
                d.valid_after
            );
        }
    }
    let records: u64 = info.segments.iter().map(|s| s.marks + s.forgets).sum();
    if problems == 0 {
        println!(
            "ok: {} segments, {records} records, {} live keys",
            info.segments.len(),
            info.live_keys
        );
        Ok(ExitCode::SUCCESS)
    } else {
        println!(
            "DAMAGED: {problems} problem(s) in {} segments",
            info.segments.len()
        );
        Ok(ExitCode::FAILURE)
    }
}
