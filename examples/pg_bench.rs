//! `seen` with PostgreSQL checkpoints against the approach it replaces,
//! one run, one throwaway PostgreSQL cluster (fsync on), one stream:
//!
//! ```sh
//! cargo run --release --features postgres --example pg_bench -- 1000000 10000000
//! ```
//!
//! The stream is N UUID-like ids, 25 % of them repeats of an id from the
//! last 100k. Contenders, each over the same stream:
//!
//! * **per event** (the seed approach): one `INSERT … ON CONFLICT DO
//!   NOTHING` per event, autocommit, on 1 and on 8 connections. Too slow
//!   for the whole stream: it runs for `SEEN_PG_PER_EVENT_SECS` (default
//!   20 s) and its rate is reported.
//! * **batched**: the same, 1000 ids per statement (`unnest`), 1 connection.
//! * **seen**: a `Periodic` (10 ms) engine with a background checkpointer
//!   (every 100 ms, so checkpoints run while events are decided), first with
//!   `check_and_insert` per event, then with `check_and_insert_batch` (1000
//!   ids per call, as a consumer deciding a poll's worth would). Reported:
//!   the rate at which events are decided while checkpoints run, and the
//!   end-to-end rate until the last checkpoint has committed (what the
//!   checkpoint can sustain: every distinct id is a row in PostgreSQL).
//!
//! Then a checkpoint of M marks (rows/s) and the restore of those M marks
//! into an empty state directory (seconds).

use std::sync::Arc;
use std::time::{Duration, Instant};

use seen::checkpoint::{Checkpointer, PgOptions, Postgres};
use seen::{Durability, Engine, Verdict};

#[path = "../tests/pg/mod.rs"]
mod pg;

fn stream(n: usize) -> Vec<String> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut ids: Vec<String> = Vec::with_capacity(n);
    for i in 0..n {
        if i > 0 && next() % 4 == 0 {
            let back = (next() as usize % i.min(100_000)) + 1;
            let repeat = ids[i - back].clone();
            ids.push(repeat);
        } else {
            let (a, b) = (next(), next());
            ids.push(format!(
                "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
                a >> 32,
                (a >> 16) & 0xffff,
                a & 0xffff,
                b >> 48,
                b & 0xffff_ffff_ffff
            ));
        }
    }
    ids
}

async fn per_event(url: &str, ids: &[String], connections: usize, budget: Duration) -> (u64, f64) {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(connections as u32)
        .connect(url)
        .await
        .unwrap();
    sqlx::query("TRUNCATE processed_events")
        .execute(&pool)
        .await
        .unwrap();
    let started = Instant::now();
    let ids = Arc::new(ids.to_vec());
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (pool, ids, next) = (pool.clone(), Arc::clone(&ids), Arc::clone(&next));
        tasks.push(tokio::spawn(async move {
            while started.elapsed() < budget {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(id) = ids.get(i) else { break };
                sqlx::query(
                    "INSERT INTO processed_events (event_id, processed_at) VALUES ($1, now())
                     ON CONFLICT DO NOTHING",
                )
                .bind(id)
                .execute(&pool)
                .await
                .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let done = next
        .load(std::sync::atomic::Ordering::Relaxed)
        .min(ids.len()) as u64;
    let secs = started.elapsed().as_secs_f64();
    pool.close().await;
    (done, done as f64 / secs)
}

async fn batched(url: &str, ids: &[String]) -> f64 {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(url)
        .await
        .unwrap();
    sqlx::query("TRUNCATE processed_events")
        .execute(&pool)
        .await
        .unwrap();
    let started = Instant::now();
    for chunk in ids.chunks(1000) {
        sqlx::query(
            "INSERT INTO processed_events (event_id, processed_at)
             SELECT DISTINCT unnest($1::text[]), now() ON CONFLICT DO NOTHING",
        )
        .bind(chunk)
        .execute(&pool)
        .await
        .unwrap();
    }
    let rate = ids.len() as f64 / started.elapsed().as_secs_f64();
    pool.close().await;
    rate
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args
        .get(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let m: usize = args
        .get(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000_000);
    let budget = Duration::from_secs(
        std::env::var("SEEN_PG_PER_EVENT_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(20),
    );
    let cluster = pg::Cluster::start(true);
    let url = cluster.create_db("bench");
    cluster.psql(
        "bench",
        "CREATE TABLE processed_events (event_id varchar PRIMARY KEY, processed_at timestamptz NOT NULL, metadata jsonb)",
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ids = stream(n);
    let distinct = ids.iter().collect::<std::collections::HashSet<_>>().len();
    println!("stream: {n} ids, {distinct} distinct; PostgreSQL with fsync on, loopback");

    let (done1, per1) = rt.block_on(per_event(&url, &ids, 1, budget));
    println!("per event, 1 connection : {per1:>12.0} events/s ({done1} events in {budget:?})");
    let (done8, per8) = rt.block_on(per_event(&url, &ids, 8, budget));
    println!("per event, 8 connections: {per8:>12.0} events/s ({done8} events in {budget:?})");
    let batch = rt.block_on(batched(&url, &ids));
    println!("batched, 1000 per stmt  : {batch:>12.0} events/s");

    let p = Arc::new(Postgres::new(PgOptions::new(&url, "bench")).unwrap());
    rt.block_on(p.migrate()).unwrap();
    for batched_calls in [false, true] {
        let p = Arc::new(
            Postgres::new(PgOptions::new(
                &url,
                if batched_calls {
                    "bench-batch"
                } else {
                    "bench-single"
                },
            ))
            .unwrap(),
        );
        let dir = tempfile::tempdir().unwrap();
        let engine = Arc::new(
            Engine::builder()
                .durability(Durability::Periodic(Duration::from_millis(10)))
                .open(dir.path())
                .unwrap(),
        );
        let started = Instant::now();
        let cp = {
            let _rt = rt.enter();
            Checkpointer::start(
                Arc::clone(&p),
                Arc::clone(&engine),
                Duration::from_millis(100),
                None,
            )
            .unwrap()
        };
        let mut new = 0;
        if batched_calls {
            let mut out = Vec::with_capacity(1000);
            for chunk in ids.chunks(1000) {
                out.clear();
                engine.check_and_insert_batch_into(chunk, &mut out).unwrap();
                new += out.iter().filter(|v| **v == Verdict::New).count();
            }
        } else {
            for id in &ids {
                if engine.check_and_insert(id).unwrap() == Verdict::New {
                    new += 1;
                }
            }
        }
        let decided = started.elapsed();
        let during = cp.status().checkpoints;
        assert!(cp.stop().is_none());
        let total = started.elapsed();
        assert_eq!(new, distinct);
        let rate = n as f64 / decided.as_secs_f64();
        let end_to_end = n as f64 / total.as_secs_f64();
        let how = if batched_calls {
            "batch of 1000"
        } else {
            "per event    "
        };
        println!(
            "seen, {how}     : {rate:>12.0} events/s decided ({during} checkpoints meanwhile); {end_to_end:.0} events/s until the last checkpoint committed ({:.3} s)",
            total.as_secs_f64()
        );
        println!(
            "  ratios decided: {:.0}x per event (1 conn), {:.0}x per event (8 conns), {:.1}x batched; end to end: {:.0}x, {:.0}x, {:.1}x",
            rate / per1,
            rate / per8,
            rate / batch,
            end_to_end / per1,
            end_to_end / per8,
            end_to_end / batch
        );
    }

    // Checkpoint and restore of M marks.
    let big_dir = tempfile::tempdir().unwrap();
    let big = Engine::builder()
        .durability(Durability::None)
        .capacity(m)
        .open(big_dir.path())
        .unwrap();
    let fps: Vec<_> = (0..m as u64)
        .map(|i| seen::Fingerprint(u128::from(i) * 0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835 + 1))
        .collect();
    let mut out = Vec::new();
    for chunk in fps.chunks(4096) {
        out.clear();
        big.check_and_insert_fingerprints(chunk, &mut out).unwrap();
    }
    drop(fps);
    let big_pg = Postgres::new(PgOptions::new(&url, "big")).unwrap();
    let r = rt.block_on(big_pg.checkpoint(&big)).unwrap();
    println!(
        "checkpoint of {m} marks : {:.1} s, {:.0} rows/s",
        r.duration.as_secs_f64(),
        r.written as f64 / r.duration.as_secs_f64()
    );
    drop(big);
    let restore_dir = tempfile::tempdir().unwrap();
    let (restored, report) = rt
        .block_on(big_pg.open(
            Engine::builder().durability(Durability::None).capacity(m),
            restore_dir.path(),
            |_, _| {},
        ))
        .unwrap();
    assert_eq!(report.loaded as usize, m);
    println!(
        "restore of {m} marks    : {:.1} s ({:.0} marks/s), {} live after",
        report.duration.as_secs_f64(),
        report.loaded as f64 / report.duration.as_secs_f64(),
        restored.len()
    );
}
