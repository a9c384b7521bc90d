//! How long opening (replaying) a large state directory takes: the bulk of
//! a restart after a kill.
//!
//! ```sh
//! cargo run --release --example open_bench -- 10000000 5
//! ```
//!
//! A child process marks N distinct ids in batches (default durability)
//! and is SIGKILLed; then R fresh processes each open the directory once
//! and report the time `Engine::builder().open` took. The log is in the
//! page cache, as it is right after a crash-restart of the same host.

use std::io::BufRead;
use std::time::{Duration, Instant};

use seen::Engine;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(dir) = std::env::var_os("SEEN_OPEN_BENCH_FILL") {
        let n: usize = args[1].parse()?;
        let engine = Engine::builder().capacity(n).open(dir)?;
        let mut ids = Vec::with_capacity(10_000);
        for chunk in 0..n.div_ceil(10_000) {
            ids.clear();
            ids.extend((0..10_000.min(n - chunk * 10_000)).map(|i| format!("id-{chunk}-{i}")));
            engine.check_and_insert_batch(&ids)?;
        }
        println!("ready");
        // Killed here, without a clean close.
        std::thread::sleep(Duration::from_secs(600));
        return Ok(());
    }
    if let Some(dir) = std::env::var_os("SEEN_OPEN_BENCH_OPEN") {
        let started = Instant::now();
        let engine = Engine::builder().open(dir)?;
        println!("{} {}", started.elapsed().as_secs_f64(), engine.len());
        return Ok(());
    }
    let n: usize = args
        .get(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(10_000_000);
    let rounds: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(5);
    let dir = tempfile::tempdir_in(".")?;
    let marks = dir.path().join("marks");
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .arg(n.to_string())
        .env("SEEN_OPEN_BENCH_FILL", &marks)
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().ok_or("no stdout")?).read_line(&mut line)?;
    child.kill()?;
    child.wait()?;
    let mut secs = Vec::new();
    for _ in 0..rounds {
        let out = std::process::Command::new(std::env::current_exe()?)
            .env("SEEN_OPEN_BENCH_OPEN", &marks)
            .output()?;
        let text = String::from_utf8(out.stdout)?;
        let mut words = text.split_whitespace();
        let s: f64 = words.next().ok_or("no time")?.parse()?;
        let len: usize = words.next().ok_or("no len")?.parse()?;
        if len != n {
            return Err(format!("opened {len} ids, expected {n}").into());
        }
        println!("open of {n} ids: {s:.3} s");
        secs.push(s);
    }
    secs.sort_by(|a, b| a.total_cmp(b));
    println!("median {:.3} s over {rounds} opens", secs[rounds / 2]);
    Ok(())
}
