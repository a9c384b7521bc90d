//! Kill harness. A child process marks ids (under `Durability::Sync`,
//! then `Periodic` and `None`, whose promise is the same for a kill: an
//! acknowledged mark is in the page cache) in
//! batches from two writer threads at once (so kills land in concurrent,
//! lock-free appends and in segment rollovers) and acknowledges each batch
//! to the parent over a pipe; the parent
//! SIGKILLs it at random moments (200 times by default, `SEEN_KILL_ROUNDS`
//! to change) and after every kill reopens the store and checks:
//!
//! * every acknowledged id is present;
//! * no id that was never written is present.
//!
//! The same binary is parent and child (`SEEN_KILL_CHILD` selects).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use seen::{Durability, Engine};

const BATCH: u64 = 64;
const WRITERS: u64 = 2;
/// Writer `t` uses ids `t * LANE + n`.
const LANE: u64 = 1 << 40;

fn id(n: u64) -> [u8; 8] {
    n.to_le_bytes()
}

fn engine(dir: &Path, durability: Durability) -> Engine {
    Engine::builder()
        .durability(durability)
        .segment_size(64 << 10) // small: kills land during rollovers too
        .background_sweep(false)
        .open(dir)
        .expect("open store")
}

fn child(dir: &str, start: u64, durability: Durability) {
    let e = engine(Path::new(dir), durability);
    println!("READY");
    std::thread::scope(|s| {
        for t in 0..WRITERS {
            let e = &e;
            s.spawn(move || {
                let mut next = t * LANE + start;
                loop {
                    let ids: Vec<[u8; 8]> = (next..next + BATCH).map(id).collect();
                    println!("BEGIN {}", next + BATCH);
                    e.check_and_insert_batch(&ids).expect("insert");
                    // Returned: the whole batch is durable (Sync), or in
                    // the page cache, which a kill does not take.
                    println!("ACK {}", next + BATCH);
                    next += BATCH;
                }
            });
        }
    });
}

struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn main() {
    if let Ok(dir) = std::env::var("SEEN_KILL_CHILD") {
        let start = std::env::var("SEEN_KILL_START").unwrap().parse().unwrap();
        let durability = std::env::var("SEEN_KILL_DURABILITY")
            .unwrap()
            .parse()
            .unwrap();
        child(&dir, start, durability);
        return;
    }
    let rounds: u32 = std::env::var("SEEN_KILL_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(200);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    // Each write path in turn: staged (Sync), pwrite per append (Periodic),
    // the mapping (None).
    for (durability, rounds) in [
        ("sync", rounds),
        ("periodic:5ms", rounds.div_ceil(4)),
        ("none", rounds.div_ceil(4)),
    ] {
        harness(durability, rounds, seed);
    }
    println!("1 passed, 0 failed");
}

fn harness(durability_name: &str, rounds: u32, seed: u64) {
    let durability: Durability = durability_name.parse().unwrap();
    println!("kill harness, {durability_name}: {rounds} rounds, seed {seed}");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let started = Instant::now();
    // Acknowledged batches (their end ids; a batch is `end - BATCH .. end`),
    // and the id from which nothing was ever handed to the engine. A batch
    // in flight at a kill is neither: it may or may not be there.
    let mut acked: Vec<u64> = Vec::new();
    // Per writer lane: the offset from which nothing was handed to the engine.
    let mut attempted = 0u64;
    let mut kills_mid_batch = 0;
    let mut cut_tails = 0;
    for round in 0..rounds {
        let mut child = Command::new(&exe)
            .env("SEEN_KILL_CHILD", dir.path())
            .env("SEEN_KILL_START", attempted.to_string())
            .env("SEEN_KILL_DURABILITY", durability_name)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut acks = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line == "READY" {
                    let _ = ready_tx.send(());
                }
                acks.push(line);
            }
            acks
        });
        // One round in four kills at a random moment of startup and
        // recovery; the rest wait until the child writes, then kill it a
        // random 0–8 ms into its batches.
        let delay = if rng.below(4) == 0 {
            Duration::from_micros(rng.below(20_000))
        } else {
            let _ = ready_rx.recv_timeout(Duration::from_secs(10));
            Duration::from_micros(rng.below(8_000))
        };
        let deadline = Instant::now() + delay;
        while Instant::now() < deadline {
            std::hint::spin_loop();
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let lines = reader.join().unwrap();
        let round_acks = acked.len();
        for line in &lines {
            if let Some(n) = line.strip_prefix("ACK ") {
                acked.push(n.parse().unwrap());
            } else if let Some(n) = line.strip_prefix("BEGIN ") {
                let n: u64 = n.parse().unwrap();
                attempted = attempted.max(n % LANE);
            }
        }
        if lines.last().is_some_and(|l| l.starts_with("BEGIN")) {
            kills_mid_batch += 1;
        }
        // Reopen and check.
        let e = engine(dir.path(), durability);
        for &end in &acked[round_acks..] {
            for n in end - BATCH..end {
                assert!(
                    e.contains(id(n)).unwrap(),
                    "{durability_name} round {round}: acknowledged id {n} lost (seed {seed})"
                );
            }
        }
        for _ in 0..200 {
            if !acked.is_empty() {
                let end = acked[rng.below(acked.len() as u64) as usize];
                let n = end - 1 - rng.below(BATCH);
                assert!(
                    e.contains(id(n)).unwrap(),
                    "{durability_name} round {round}: old acknowledged id {n} lost (seed {seed})"
                );
            }
        }
        for n in attempted..attempted + 500 {
            assert!(
                !e.contains(id(n)).unwrap(),
                "{durability_name} round {round}: never-written id {n} present (seed {seed})"
            );
        }
        for _ in 0..200 {
            let n = u64::MAX - rng.below(1 << 40);
            assert!(
                !e.contains(id(n)).unwrap(),
                "{durability_name} round {round}: phantom id {n} (seed {seed})"
            );
        }
        // Records of a batch in flight may sit beyond a hole left by the
        // other writer's unfinished batch; recovery cuts them with the tail.
        // None of them was acknowledged (checked above).
        let r = e.recovery_report().unwrap();
        cut_tails += (r.truncated_bytes > 0) as u32;
    }
    assert!(
        acked.len() > 100,
        "the child acknowledged too little: {}",
        acked.len()
    );
    println!(
        "kill harness, {durability_name}: {rounds} SIGKILLs ({kills_mid_batch} mid-batch, {cut_tails} torn tails cut), {} ids acknowledged, all present; no phantoms; {:.1} s",
        acked.len() as u64 * BATCH,
        started.elapsed().as_secs_f64()
    );
}
