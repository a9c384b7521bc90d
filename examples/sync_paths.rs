//! The candidate write paths for the log's `Sync` durability, measured on
//! this machine's disk in one run (issue 13's first step): 32 KiB appended
//! per sync, 300 syncs per candidate, two alternating rounds.
//!
//! ```sh
//! cargo run --release --example sync_paths -- /path/on/the/disk/to/test
//! ```
//!
//! Each candidate gets a fresh 64 MiB file prepared its way (zero-filled
//! from user space, `fallocate`d, or sparse), then appends 32 KiB and makes
//! it durable, 300 times: through the shared mapping then `msync` or
//! `fdatasync`, with `pwrite` then `fdatasync`, with `O_DSYNC` writes, or
//! with `O_DIRECT | O_DSYNC` writes from an aligned buffer.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const FILE: usize = 64 << 20;
const CHUNK: usize = 32 << 10;
const SYNCS: usize = 300;

#[derive(Clone, Copy, Debug)]
enum Prep {
    ZeroFilled,
    Fallocated,
    Sparse,
}

#[derive(Clone, Copy, Debug)]
enum Write {
    MmapMsync,
    MmapFdatasync,
    PwriteFdatasync,
    Dsync,
    DirectDsync,
}

fn prepare(path: &Path, prep: Prep, flags: i32) -> io::Result<File> {
    let _ = std::fs::remove_file(path);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .custom_flags(flags)
        .open(path)?;
    match prep {
        Prep::ZeroFilled => {
            // Through a plain descriptor: O_DIRECT would need alignment.
            let plain = OpenOptions::new().write(true).open(path)?;
            let zeros = vec![0u8; 1 << 20];
            for at in (0..FILE).step_by(zeros.len()) {
                plain.write_all_at(&zeros, at as u64)?;
            }
            plain.sync_all()?;
        }
        Prep::Fallocated => {
            // SAFETY: a plain syscall on a descriptor we own.
            let rc = unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, FILE as libc::off_t) };
            if rc != 0 {
                return Err(io::Error::from_raw_os_error(rc));
            }
            f.sync_all()?;
        }
        Prep::Sparse => {
            f.set_len(FILE as u64)?;
            f.sync_all()?;
        }
    }
    Ok(f)
}

fn fdatasync(f: &File) -> io::Result<()> {
    // SAFETY: a plain syscall on a descriptor we own.
    if unsafe { libc::fdatasync(f.as_raw_fd()) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Per-sync latencies of one candidate.
fn run(dir: &Path, prep: Prep, write: Write) -> io::Result<Vec<Duration>> {
    let path = dir.join(format!("sync-paths-{prep:?}-{write:?}"));
    let flags = match write {
        Write::Dsync => libc::O_DSYNC,
        Write::DirectDsync => libc::O_DIRECT | libc::O_DSYNC,
        _ => 0,
    };
    let f = prepare(&path, prep, flags)?;
    let data = vec![0xa5u8; CHUNK];
    let mut times = Vec::with_capacity(SYNCS);
    match write {
        Write::MmapMsync | Write::MmapFdatasync => {
            // SAFETY: the file is ours, created above, and nobody else
            // truncates it while mapped; the map is dropped before removal.
            let mut map = unsafe { memmap2::MmapMut::map_mut(&f)? };
            for i in 0..SYNCS {
                let at = i * CHUNK;
                let t = Instant::now();
                map[at..at + CHUNK].copy_from_slice(&data);
                match write {
                    Write::MmapMsync => map.flush_range(at, CHUNK)?,
                    _ => fdatasync(&f)?,
                }
                times.push(t.elapsed());
            }
        }
        Write::PwriteFdatasync | Write::Dsync => {
            for i in 0..SYNCS {
                let t = Instant::now();
                f.write_all_at(&data, (i * CHUNK) as u64)?;
                if let Write::PwriteFdatasync = write {
                    fdatasync(&f)?;
                }
                times.push(t.elapsed());
            }
        }
        Write::DirectDsync => {
            // O_DIRECT wants a block-aligned buffer.
            let layout = std::alloc::Layout::from_size_align(CHUNK, 4096)
                .map_err(|e| io::Error::other(e.to_string()))?;
            // SAFETY: a non-zero-sized layout; freed below with the same layout.
            let buf = unsafe { std::alloc::alloc_zeroed(layout) };
            if buf.is_null() {
                return Err(io::Error::other("out of memory"));
            }
            // SAFETY: `buf` is a live allocation of CHUNK bytes.
            let aligned = unsafe { std::slice::from_raw_parts_mut(buf, CHUNK) };
            aligned.copy_from_slice(&data);
            let mut result = Ok(());
            for i in 0..SYNCS {
                let t = Instant::now();
                if let Err(e) = f.write_all_at(aligned, (i * CHUNK) as u64) {
                    result = Err(e);
                    break;
                }
                times.push(t.elapsed());
            }
            // SAFETY: allocated above with this layout, not used after.
            unsafe { std::alloc::dealloc(buf, layout) };
            result?;
        }
    }
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(times)
}

fn quantile(sorted: &[Duration], q: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted.get(i).map(|d| d.as_secs_f64() * 1e6).unwrap_or(0.0)
}

fn main() -> io::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let candidates = [
        (Prep::ZeroFilled, Write::MmapMsync),
        (Prep::ZeroFilled, Write::MmapFdatasync),
        (Prep::ZeroFilled, Write::PwriteFdatasync),
        (Prep::ZeroFilled, Write::Dsync),
        (Prep::ZeroFilled, Write::DirectDsync),
        (Prep::Fallocated, Write::MmapMsync),
        (Prep::Fallocated, Write::PwriteFdatasync),
        (Prep::Sparse, Write::MmapMsync),
        (Prep::Sparse, Write::PwriteFdatasync),
    ];
    println!(
        "{SYNCS} syncs of {} KiB each, in {}",
        CHUNK >> 10,
        dir.display()
    );
    println!("| file | write, then make durable | round | p50 µs | p99 µs | mean µs |");
    println!("|---|---|---|---|---|---|");
    for round in 1..=2 {
        for &(prep, write) in &candidates {
            match run(&dir, prep, write) {
                Ok(mut t) => {
                    let mean =
                        t.iter().map(Duration::as_secs_f64).sum::<f64>() / t.len() as f64 * 1e6;
                    t.sort();
                    println!(
                        "| {prep:?} | {write:?} | {round} | {:.0} | {:.0} | {mean:.0} |",
                        quantile(&t, 0.5),
                        quantile(&t, 0.99)
                    );
                }
                Err(e) => println!("| {prep:?} | {write:?} | {round} | failed: {e} | | |"),
            }
        }
    }
    Ok(())
}
