//! `seen bench`: a durable workload on a scratch state directory —
//! throughput, acknowledgement latency, reopen time, bytes per key.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use seen::{Durability, Engine};

#[derive(Args, Debug)]
pub(crate) struct BenchArgs {
    /// Events in the stream (25 % of them duplicates).
    #[arg(long, default_value_t = 2_000_000)]
    events: u64,
    /// Writer threads.
    #[arg(long, default_value_t = 2)]
    threads: u64,
    /// Ids per call (1 = single `check_and_insert` calls).
    #[arg(long, default_value_t = 1000)]
    batch: u64,
    /// Durability of the engine under test: `sync`, `periodic`,
    /// `periodic:<duration>` or `none` (the same spellings as everywhere).
    #[arg(long, default_value = "sync", value_parser = clap::value_parser!(Durability))]
    durability: Durability,
    /// Interval for `--durability periodic` (same as `periodic:<d>`).
    #[arg(long, value_parser = humantime::parse_duration, hide = true)]
    flush_interval: Option<Duration>,
    /// Scratch state directory (default: a fresh one under the system temp
    /// dir, removed afterwards).
    #[arg(long)]
    dir: Option<PathBuf>,
}

fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The k-th event's id: every 4th repeats an earlier id of the same thread.
fn event_id(thread: u64, k: u64, out: &mut [u8; 36]) {
    let n = if k % 4 == 3 && k > 4 {
        mix64(k) % (k - k / 4)
    } else {
        k - k / 4
    };
    let bits = (mix64(n ^ (thread << 48)) as u128) << 64 | mix64(n.wrapping_add(thread)) as u128;
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut j = 0;
    for (i, o) in out.iter_mut().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) {
            *o = b'-';
        } else {
            *o = HEX[((bits >> (124 - 4 * j)) & 0xf) as usize];
            j += 1;
        }
    }
}

/// The disk's own cost of what a sync does: `pwrite` `bytes` at the end of
/// a zero-filled, preallocated 64 MiB scratch file beside the store, then
/// `fdatasync`, 200 times; (p50, mean) in microseconds.
fn disk_baseline(dir: &std::path::Path, bytes: usize) -> std::io::Result<(f64, f64)> {
    use std::os::unix::fs::FileExt;
    let path = dir.join("disk-baseline.tmp");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)?;
    const SIZE: usize = 64 << 20;
    let zeros = vec![0u8; 1 << 20];
    for at in (0..SIZE).step_by(zeros.len()) {
        file.write_all_at(&zeros, at as u64)?;
    }
    file.sync_all()?;
    let data = vec![0x5au8; bytes.min(SIZE / 200)];
    let mut took = Vec::with_capacity(200);
    for i in 0..200 {
        let t = Instant::now();
        file.write_all_at(&data, (i * data.len()) as u64)?;
        file.sync_data()?;
        took.push(t.elapsed().as_nanos() as u64);
    }
    drop(file);
    let _ = std::fs::remove_file(&path);
    let mean = took.iter().sum::<u64>() as f64 / took.len() as f64 / 1000.0;
    took.sort_unstable();
    Ok((percentile(&took, 0.5), mean))
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

pub(crate) fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let (dir, scratch) = match &args.dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("seen-bench-{}", std::process::id())),
            true,
        ),
    };
    let durability = match (args.durability, args.flush_interval) {
        (Durability::Periodic(_), Some(every)) => Durability::Periodic(every),
        (d, _) => d,
    };
    let per_thread = args.events / args.threads.max(1);
    let batch = args.batch.max(1);
    let engine = Arc::new(
        Engine::builder()
            .durability(durability)
            .capacity((args.events as usize) * 3 / 4)
            .open(&dir)?,
    );
    let bar = super::progress_bar("events", "events", false);
    bar.set_length(per_thread * args.threads);
    let started = Instant::now();
    let latencies: Vec<Vec<u64>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..args.threads)
            .map(|t| {
                let engine = Arc::clone(&engine);
                let bar = bar.clone();
                s.spawn(move || {
                    let mut lat = Vec::with_capacity((per_thread / batch) as usize + 1);
                    let mut ids = vec![[0u8; 36]; batch as usize];
                    let mut out = Vec::with_capacity(batch as usize);
                    let mut k = 0;
                    while k < per_thread {
                        let n = batch.min(per_thread - k);
                        for (j, id) in ids[..n as usize].iter_mut().enumerate() {
                            event_id(t, k + j as u64, id);
                        }
                        let call = Instant::now();
                        if n == 1 {
                            let _ = engine.check_and_insert(ids[0])?;
                        } else {
                            out.clear();
                            engine.check_and_insert_batch_into(&ids[..n as usize], &mut out)?;
                        }
                        lat.push(call.elapsed().as_nanos() as u64);
                        k += n;
                        if k % 65536 < n {
                            bar.inc(65536);
                        }
                    }
                    Ok::<_, seen::Error>(lat)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("bench thread panicked"))
            .collect::<Result<Vec<_>, _>>()
    })?;
    let elapsed = started.elapsed();
    bar.finish_and_clear();
    let stats = engine.stats();
    let total = per_thread * args.threads;
    let mut all: Vec<u64> = latencies.into_iter().flatten().collect();
    all.sort_unstable();
    println!(
        "write: {total} events ({} new, {} duplicate), {} threads, batch {batch}, durability {:?}",
        stats.new, stats.duplicate, args.threads, args.durability
    );
    println!(
        "  {:.0} events/s acknowledged; ack latency per call p50 {:.1} us, p99 {:.1} us, max {:.1} us",
        total as f64 / elapsed.as_secs_f64(),
        percentile(&all, 0.50),
        percentile(&all, 0.99),
        percentile(&all, 1.0)
    );
    if stats.log_syncs > 0 {
        let per_sync_us = stats.log_sync_nanos as f64 / stats.log_syncs as f64 / 1000.0;
        let bytes_per_sync = (stats.log_bytes / stats.log_syncs).max(1) as usize;
        println!(
            "  syncs: {} ({:.0}/s), {:.1} new marks and {} bytes per sync, {:.1} us per sync",
            stats.log_syncs,
            stats.log_syncs as f64 / elapsed.as_secs_f64(),
            stats.new as f64 / stats.log_syncs as f64,
            bytes_per_sync,
            per_sync_us
        );
        match disk_baseline(&dir, bytes_per_sync) {
            Ok((p50, mean)) => println!(
                "  disk baseline, same run: pwrite + fdatasync of {bytes_per_sync} bytes: p50 {p50:.1} us, mean {mean:.1} us; the log's syncs cost {:.2}x that",
                per_sync_us / mean
            ),
            Err(e) => println!("  disk baseline: {e}"),
        }
    }
    println!(
        "  log: {} bytes in {} segments = {:.1} bytes on disk per live key",
        stats.log_bytes,
        stats.log_segments,
        stats.log_bytes as f64 / stats.live_keys.max(1) as f64
    );
    drop(engine);
    let reopened = Instant::now();
    let engine = Engine::builder().open(&dir)?;
    let took = reopened.elapsed();
    let report = engine.recovery_report().cloned().unwrap_or_default();
    println!(
        "reopen: {} live keys in {:.3} s ({:.2} GB/s of log scanned, {} bytes)",
        engine.len(),
        took.as_secs_f64(),
        report.bytes_scanned as f64 / took.as_secs_f64() / 1e9,
        report.bytes_scanned
    );
    drop(engine);
    if scratch {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(ExitCode::SUCCESS)
}
