//! What this host charges for the memory the engine's tables live in, to
//! read the engine benchmarks against (issue 11):
//!
//! ```sh
//! cargo run --release --example host_memory
//! ```
//!
//! * a dependent cache miss (a pointer chase over 256 MiB, so every load
//!   waits for the one before: a single-call insert's first probe is such
//!   a miss), on 4 KiB pages and on 2 MiB pages;
//! * the first write to fresh pages (what growing a table pays the kernel
//!   to zero them), on 4 KiB and on 2 MiB pages, against writing the same
//!   pages again.
//!
//! `host_memory warm MIB` instead writes MIB of fresh huge pages and exits:
//! run just before a benchmark, it hands that benchmark pages the host
//! still backs (see "Round 6" in `docs/benchmarks.md`).
//!
//! Linux only (it asks for huge pages with `madvise`); elsewhere it says so.

#[cfg(target_os = "linux")]
fn main() {
    use std::time::Instant;

    const MIB: usize = 1 << 20;
    const HUGE: usize = 2 * MIB;

    /// `bytes` of fresh anonymous memory from a 2 MiB boundary, asked to
    /// live on huge pages or not.
    fn map(bytes: usize, huge: bool) -> &'static mut [u8] {
        // SAFETY: a fresh private anonymous mapping; it is leaked on
        // purpose (the process ends right after), so the slice stays valid.
        #[allow(unsafe_code)]
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                bytes + HUGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert!(p != libc::MAP_FAILED, "mmap failed");
            let start = (p as usize).next_multiple_of(HUGE) as *mut u8;
            let advice = if huge {
                libc::MADV_HUGEPAGE
            } else {
                libc::MADV_NOHUGEPAGE
            };
            libc::madvise(start.cast(), bytes, advice);
            std::slice::from_raw_parts_mut(start, bytes)
        }
    }

    /// Nanoseconds per load of a pointer chase through `mem`, one 64-byte
    /// line per step, in a random cycle over all lines.
    fn chase(mem: &mut [u8]) -> f64 {
        let lines = mem.len() / 64;
        let mut order: Vec<usize> = (0..lines).collect();
        // A fixed-seed shuffle (xorshift): the same cycle every run.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for i in (1..lines).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            order.swap(i, (x % (i as u64 + 1)) as usize);
        }
        for w in 0..lines {
            let (from, to) = (order[w], order[(w + 1) % lines]);
            mem[from * 64..from * 64 + 8].copy_from_slice(&(to as u64).to_ne_bytes());
        }
        let steps = 20_000_000;
        let mut at = order[0];
        let started = Instant::now();
        for _ in 0..steps {
            let next = u64::from_ne_bytes(mem[at * 64..at * 64 + 8].try_into().unwrap());
            at = std::hint::black_box(next as usize);
        }
        started.elapsed().as_secs_f64() * 1e9 / steps as f64
    }

    /// GB/s of writing one byte per 4 KiB page (the fault and the kernel's
    /// zeroing), then of filling the same pages again.
    fn first_touch(bytes: usize, huge: bool) -> (f64, f64) {
        let mem = map(bytes, huge);
        let started = Instant::now();
        for page in mem.chunks_mut(4096) {
            page[0] = 1;
        }
        let fresh = bytes as f64 / started.elapsed().as_secs_f64() / 1e9;
        let started = Instant::now();
        mem.fill(0);
        std::hint::black_box(&mem);
        let again = bytes as f64 / started.elapsed().as_secs_f64() / 1e9;
        (fresh, again)
    }

    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("warm") {
        let mib: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1500);
        map(mib * MIB, true).fill(1);
        return;
    }
    for huge in [false, true] {
        let pages = if huge { "2 MiB pages" } else { "4 KiB pages" };
        let ns = chase(map(256 * MIB, huge));
        println!("dependent cache miss, 256 MiB on {pages}: {ns:.0} ns");
    }
    for huge in [false, true] {
        let pages = if huge { "2 MiB pages" } else { "4 KiB pages" };
        let (fresh, again) = first_touch(512 * MIB, huge);
        println!(
            "first write to 512 MiB of fresh {pages}: {fresh:.2} GB/s; writing them again: {again:.2} GB/s"
        );
    }
    let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .unwrap_or_else(|_| "unknown".into());
    println!("transparent huge pages: {}", thp.trim());
}

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("host_memory measures Linux memory (madvise); nothing to do here");
}
