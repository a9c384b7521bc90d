//! `seen bench`: a durable workload on a scratch state directory —
//! throughput, acknowledgement latency, reopen time, bytes per key.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use clap::Args;
use seen::{Durability, Engine, ManualClock};

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
    /// Steady state instead of growth: keep about this many ids resident
    /// under TTL churn, what a long-running consumer sees. A simulated
    /// clock moves one second per tenth of them with a 10 s TTL, so new
    /// ids replace expiring ones; after a warm-up that marks that many new
    /// ids, `--events` are timed. Duplicates repeat one of the last 100k
    /// ids.
    #[arg(long, value_name = "IDS")]
    steady: Option<u64>,
    /// Shards of the engine under test (a power of two; default: the
    /// engine's, 64), as `--shards` sets them for a store. More shards
    /// make each table rebuild shorter, and so the latency tail.
    #[arg(long)]
    shards: Option<usize>,
}

/// The steady state's TTL, in simulated seconds.
const STEADY_TTL_SECS: u64 = 10;

/// Moves the steady state's simulated clock one second per `every` events.
struct Churn {
    clock: Arc<ManualClock>,
    every: u64,
    done: AtomicU64,
    next: AtomicU64,
}

impl Churn {
    fn events(&self, n: u64) {
        let done = self.done.fetch_add(n, Relaxed) + n;
        loop {
            let next = self.next.load(Relaxed);
            if done < next {
                return;
            }
            if self
                .next
                .compare_exchange(next, next + self.every, Relaxed, Relaxed)
                .is_ok()
            {
                self.clock.advance(Duration::from_secs(1));
            }
        }
    }
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
    uuid_like(thread, n, out);
}

/// The steady state's k-th id: every 4th repeats one of the thread's last
/// 75k new ids (the last 100k events), all still live under churn.
fn steady_id(thread: u64, k: u64, out: &mut [u8; 36]) {
    let fresh = k - k / 4;
    let n = if k % 4 == 3 && k > 100_000 {
        fresh - 1 - mix64(k) % 75_000
    } else {
        fresh
    };
    uuid_like(thread, n, out);
}

/// Thread `thread`'s n-th distinct id, spelled like a UUID.
fn uuid_like(thread: u64, n: u64, out: &mut [u8; 36]) {
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

/// The writers: `threads` threads, each deciding its ids `k` in `from..to`
/// in calls of `batch`, timing each call.
struct Stream<'a> {
    engine: &'a Engine,
    threads: u64,
    batch: u64,
    id: fn(u64, u64, &mut [u8; 36]),
    churn: Option<&'a Churn>,
}

impl Stream<'_> {
    fn run(&self, from: u64, to: u64, bar: &indicatif::ProgressBar) -> seen::Result<Vec<Vec<u64>>> {
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..self.threads)
                .map(|t| {
                    let bar = bar.clone();
                    s.spawn(move || self.thread(t, from, to, &bar))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("bench thread panicked"))
                .collect()
        })
    }

    fn thread(
        &self,
        t: u64,
        from: u64,
        to: u64,
        bar: &indicatif::ProgressBar,
    ) -> seen::Result<Vec<u64>> {
        let batch = self.batch;
        let mut lat = Vec::with_capacity(((to - from) / batch) as usize + 1);
        let mut ids = vec![[0u8; 36]; batch as usize];
        let mut out = Vec::with_capacity(batch as usize);
        let mut k = from;
        while k < to {
            let n = batch.min(to - k);
            for (j, id) in ids[..n as usize].iter_mut().enumerate() {
                (self.id)(t, k + j as u64, id);
            }
            let call = Instant::now();
            if n == 1 {
                let _ = self.engine.check_and_insert(ids[0])?;
            } else {
                out.clear();
                self.engine
                    .check_and_insert_batch_into(&ids[..n as usize], &mut out)?;
            }
            lat.push(call.elapsed().as_nanos() as u64);
            if let Some(churn) = self.churn {
                churn.events(n);
            }
            k += n;
            if (k - from) % 65536 < n {
                bar.inc(65536);
            }
        }
        Ok(lat)
    }
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
    let threads = args.threads.max(1);
    let per_thread = args.events / threads;
    let batch = args.batch.max(1);
    let mut builder = Engine::builder().durability(durability);
    if let Some(shards) = args.shards {
        builder = builder.shards(shards);
    }
    let churn = match args.steady {
        None => {
            builder = builder.capacity((args.events as usize) * 3 / 4);
            None
        }
        Some(resident) => {
            let clock = Arc::new(ManualClock::new(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
            ));
            builder = builder
                .capacity(resident as usize)
                .ttl(Duration::from_secs(STEADY_TTL_SECS))
                .clock(Arc::clone(&clock) as Arc<dyn seen::Clock>);
            // A tenth of the resident ids arrive per simulated second: with
            // a quarter of the events duplicates, that is 4/3 as many events.
            let every = (resident * 4 / 3 / STEADY_TTL_SECS).max(1);
            Some(Churn {
                clock,
                every,
                done: AtomicU64::new(0),
                next: AtomicU64::new(every),
            })
        }
    };
    let engine = Arc::new(builder.open(&dir)?);
    let stream = Stream {
        engine: &engine,
        threads,
        batch,
        id: if churn.is_some() { steady_id } else { event_id },
        churn: churn.as_ref(),
    };
    // The steady state's warm-up: as many events as ids to keep resident,
    // untimed, so the timed part starts with the set full and churning.
    let warm_up = args.steady.map_or(0, |r| r * 4 / 3 / threads);
    if warm_up > 0 {
        let bar = super::progress_bar("warm-up", "events", false);
        bar.set_length(warm_up * threads);
        stream.run(0, warm_up, &bar)?;
        bar.finish_and_clear();
    }
    let before = engine.stats();
    let bar = super::progress_bar("events", "events", false);
    bar.set_length(per_thread * threads);
    let started = Instant::now();
    let latencies = stream.run(warm_up, warm_up + per_thread, &bar)?;
    let elapsed = started.elapsed();
    bar.finish_and_clear();
    let stats = engine.stats();
    let total = per_thread * threads;
    let mut all: Vec<u64> = latencies.into_iter().flatten().collect();
    all.sort_unstable();
    match args.steady {
        None => println!(
            "write: {total} events ({} new, {} duplicate), {threads} threads, batch {batch}, durability {:?}",
            stats.new, stats.duplicate, args.durability
        ),
        Some(resident) => println!(
            "steady: {total} events ({} new, {} duplicate) over ~{resident} resident ids under TTL churn ({STEADY_TTL_SECS} s TTL, the clock moving 1 s per {} events), {threads} threads, batch {batch}, durability {:?}",
            stats.new - before.new,
            stats.duplicate - before.duplicate,
            churn.as_ref().map_or(0, |c| c.every),
            args.durability
        ),
    }
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
    if args.steady.is_some() {
        // The reopen below would judge expiry by the real clock; in the
        // steady state memory is the other half of the answer.
        let resident = args.steady.unwrap_or(1).max(1);
        println!(
            "  memory: {:.1} bytes of table per resident id; the tables hold {} entries (live, or expired and not yet dropped); {} expired entries dropped by {} table rebuilds while timed (growth and the background sweep)",
            stats.memory_bytes as f64 / resident as f64,
            stats.live_keys,
            stats.expired - before.expired,
            stats.table_rebuilds - before.table_rebuilds
        );
        drop(engine);
        if scratch {
            let _ = std::fs::remove_dir_all(&dir);
        }
        return Ok(ExitCode::SUCCESS);
    }
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
