//! seen::checkpoint against a real PostgreSQL server: a throwaway cluster
//! from Debian's `postgresql` package, started once for this binary on a
//! loopback port, one database per test, stopped and removed at the end.
//! (A custom harness, so the cluster is shut down however the tests end.)

use std::sync::Arc;
use std::time::{Duration, Instant};

use seen::checkpoint::{Checkpointer, ImportTable, PgError, PgOptions, Postgres};
use seen::{Durability, Engine, EngineBuilder, Verdict};

#[cfg(feature = "kafka")]
mod common;
mod pg;
use pg::Cluster;

type Test = fn(&Cluster, &tokio::runtime::Runtime);

fn main() {
    let tests: &[(&str, Test)] = &[
        ("migrate_from_empty_then_again_is_a_no_op", migrate_twice),
        ("a_newer_or_missing_schema_is_a_clear_error", schema_errors),
        ("checkpoint_lose_the_disk_restore", checkpoint_then_restore),
        ("checkpoints_are_incremental_and_idempotent", incremental),
        ("import_processed_events_honours_age_and_ttl", import),
        (
            "a_transactional_mark_follows_its_transaction",
            transactional,
        ),
        (
            "server_stopped_mid_checkpoint_loses_nothing",
            server_stopped,
        ),
        (
            "a_second_host_restores_while_the_first_checkpoints",
            hand_off,
        ),
        (
            "bad_urls_credentials_and_databases_fail_fast",
            bad_connections,
        ),
        ("the_cli_migrates_checkpoints_restores_and_imports", cli),
        #[cfg(feature = "kafka")]
        (
            "a_partition_moves_between_hosts_with_duplicates_in_flight",
            kafka_hand_off::partition_moves_between_hosts,
        ),
    ];
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let cluster = Cluster::start(false);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut failed = Vec::new();
    let mut passed = 0;
    for (name, test) in tests {
        if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        let started = Instant::now();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| test(&cluster, &rt)));
        match result {
            Ok(()) => {
                passed += 1;
                println!("test {name} ... ok ({:.1?})", started.elapsed());
            }
            Err(_) => {
                println!("test {name} ... FAILED");
                failed.push(*name);
            }
        }
    }
    drop(rt);
    drop(cluster);
    println!("{passed} passed, {} failed", failed.len());
    if !failed.is_empty() {
        println!("failed: {failed:?}");
        std::process::exit(1);
    }
}

fn pg(url: &str, store: &str) -> Postgres {
    let mut opts = PgOptions::new(url, store);
    opts.connect_timeout = Duration::from_secs(1);
    opts.attempts = 2;
    opts.breaker_cooldown = Duration::from_millis(300);
    Postgres::new(opts).unwrap()
}

fn engine(_dir: &std::path::Path) -> EngineBuilder {
    Engine::builder()
        .ttl(Duration::from_secs(3600))
        .durability(Durability::None)
        .segment_size(1 << 20)
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// Live marks of `store` in the database: ids whose latest row is a mark
/// that has not expired, plus transactional marks.
fn count(c: &Cluster, db: &str, store: &str) -> i64 {
    c.psql(
        db,
        &format!(
            "WITH s AS (SELECT id FROM seen_stores WHERE store = '{store}'),
                  now AS (SELECT extract(epoch FROM now())::bigint AS t)
             SELECT count(*) FROM (
               SELECT fingerprint FROM seen_marks, now WHERE store_id = (SELECT id FROM s)
               GROUP BY fingerprint
               HAVING max(batch) FILTER (WHERE expires_at > (SELECT t FROM now))
                    > coalesce(max(batch) FILTER (WHERE expires_at < 0), -1)
               UNION
               SELECT fingerprint FROM seen_tx_marks, now
               WHERE store_id = (SELECT id FROM s) AND expires_at > (SELECT t FROM now)) live"
        ),
    )
    .parse()
    .unwrap()
}

fn migrate_twice(c: &Cluster, rt: &tokio::runtime::Runtime) {
    let url = c.create_db("migrate");
    let p = pg(&url, "s");
    let first = rt.block_on(p.migrate()).unwrap();
    assert_eq!(
        (first.from, first.to),
        (0, seen::checkpoint::SCHEMA_VERSION)
    );
    let again = rt.block_on(p.migrate()).unwrap();
    assert_eq!(again.from, again.to);
    assert_eq!(
        c.psql("migrate", "SELECT count(*) FROM seen_schema_version"),
        seen::checkpoint::SCHEMA_VERSION.to_string()
    );
    // Two processes migrating at once queue on the advisory lock.
    let (a, b) = rt.block_on(async {
        let url2 = c.create_db("migrate2");
        let (p1, p2) = (pg(&url2, "s"), pg(&url2, "s"));
        tokio::join!(p1.migrate(), p2.migrate())
    });
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.from.min(b.from), 0);
    assert_eq!(a.from.max(b.from), seen::checkpoint::SCHEMA_VERSION);
}

fn schema_errors(c: &Cluster, rt: &tokio::runtime::Runtime) {
    let url = c.create_db("schema");
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path()).open(dir.path()).unwrap();
    let p = pg(&url, "s");
    let err = rt.block_on(p.checkpoint(&e)).unwrap_err();
    assert!(matches!(err, PgError::SchemaMissing), "{err}");
    assert!(err.to_string().contains("seen pg migrate"), "{err}");
    rt.block_on(p.migrate()).unwrap();
    c.psql(
        "schema",
        "INSERT INTO seen_schema_version VALUES (99, 'from the future')",
    );
    let err = rt.block_on(p.checkpoint(&e)).unwrap_err();
    assert!(
        matches!(err, PgError::SchemaTooNew { found: 99, .. }),
        "{err}"
    );
    let err = rt.block_on(p.migrate()).unwrap_err();
    assert!(err.to_string().contains("upgrade seen"), "{err}");
}

fn checkpoint_then_restore(c: &Cluster, rt: &tokio::runtime::Runtime) {
    let url = c.create_db("restore");
    let p = pg(&url, "orders");
    rt.block_on(p.migrate()).unwrap();
    let live = ids("live", 20_000);
    let short = ids("short", 500);
    let first_dir = tempfile::tempdir().unwrap();
    {
        let e = engine(first_dir.path()).open(first_dir.path()).unwrap();
        for id in &live {
            assert_eq!(e.check_and_insert(id).unwrap(), Verdict::New);
        }
        for id in &short {
            assert_eq!(
                e.check_and_insert_with_ttl(id, Duration::from_secs(1))
                    .unwrap(),
                Verdict::New
            );
        }
        assert!(e.forget("live-7").unwrap());
        e.sync().unwrap();
        let first = rt.block_on(p.checkpoint(&e)).unwrap();
        assert_eq!(
            first.written,
            (live.len() - 1 + short.len()) as u64,
            "{first:?}"
        );
        // Let the short marks expire; a checkpoint removes them (the first
        // already may have, if it took over a second).
        std::thread::sleep(Duration::from_millis(2100));
        let r = rt.block_on(p.checkpoint(&e)).unwrap();
        assert_eq!(first.expired + r.expired, short.len() as u64, "{r:?}");
        // Forgets in a later checkpoint than their marks: one stays
        // forgotten, one is marked again after its forget.
        assert!(e.forget("live-9").unwrap() && e.forget("live-11").unwrap());
        let r = rt.block_on(p.checkpoint(&e)).unwrap();
        assert_eq!(r.forgotten, 2, "{r:?}");
        assert_eq!(e.check_and_insert("live-11").unwrap(), Verdict::New);
        let r = rt.block_on(p.checkpoint(&e)).unwrap();
        assert_eq!(r.written, 1, "{r:?}");
    }
    assert_eq!(count(c, "restore", "orders"), live.len() as i64 - 2);
    // The host is lost: a new state directory on another host.
    drop(first_dir);
    let second_dir = tempfile::tempdir().unwrap();
    let progress = std::sync::Mutex::new(Vec::new());
    let (e, report) = rt
        .block_on(p.open(
            engine(second_dir.path()),
            second_dir.path(),
            |done, total| progress.lock().unwrap().push((done, total)),
        ))
        .unwrap();
    assert!(report.restored);
    // live-9's mark row is loaded, then its later forget applied.
    assert_eq!(report.loaded, live.len() as u64 - 1, "{report:?}");
    assert_eq!(report.forgotten, 1, "{report:?}");
    let progress = progress.into_inner().unwrap();
    assert_eq!(progress.last(), Some(&(report.rows, report.rows)));
    for id in &live {
        let expected = if id == "live-7" || id == "live-9" {
            Verdict::New
        } else {
            Verdict::Duplicate
        };
        assert_eq!(e.check_and_insert(id).unwrap(), expected, "{id}");
    }
    for id in &short {
        assert_eq!(
            e.check_and_insert(id).unwrap(),
            Verdict::New,
            "{id} expired"
        );
    }
    // The restored marks are in the new log: they survive a restart
    // without the database.
    drop(e);
    let e = engine(second_dir.path()).open(second_dir.path()).unwrap();
    assert_eq!(e.check_and_insert("live-1").unwrap(), Verdict::Duplicate);
    // ...and the next checkpoint sends only what is new since the restore.
    let r = rt.block_on(p.checkpoint(&e)).unwrap();
    assert_eq!(r.records, 2 + short.len() as u64, "{r:?}");
}

fn incremental(c: &Cluster, rt: &tokio::runtime::Runtime) {
    let url = c.create_db("incremental");
    let p = pg(&url, "s");
    rt.block_on(p.migrate()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Small segments: the checkpoint reads across several of them.
    let e = engine(dir.path())
        .segment_size(8192)
        .open(dir.path())
        .unwrap();
    for id in ids("a", 1000) {
        assert_eq!(e.check_and_insert(id).unwrap(), Verdict::New);
    }
    let r = rt.block_on(p.checkpoint(&e)).unwrap();
    assert_eq!((r.records, r.written), (1000, 1000));
    for id in ids("b", 10) {
        assert_eq!(e.check_and_insert(id).unwrap(), Verdict::New);
    }
    // A duplicate is not logged.
    assert_eq!(e.check_and_insert("a-1").unwrap(), Verdict::Duplicate);
    let r = rt.block_on(p.checkpoint(&e)).unwrap();
    assert_eq!((r.records, r.written), (10, 10), "{r:?}");
    let r = rt.block_on(p.checkpoint(&e)).unwrap();
    assert_eq!((r.records, r.written, r.forgotten), (0, 0, 0), "{r:?}");
    assert_eq!(count(c, "incremental", "s"), 1010);
    // Reopened, the log resumes where its checkpoint stopped.
    let position = r.position;
    drop(e);
    let e = engine(dir.path())
        .segment_size(8192)
        .open(dir.path())
        .unwrap();
    let r = rt.block_on(p.checkpoint(&e)).unwrap();
    assert_eq!((r.records, r.position), (0, position));
}

fn import(c: &Cluster, rt: &tokio::runtime::Runtime) {
    let url = c.create_db("import");
    c.psql(
        "import",
        "CREATE TABLE processed_events (event_id varchar PRIMARY KEY, processed_at timestamptz, metadata jsonb);
         INSERT INTO processed_events
           SELECT 'recent-' || i, now() - interval '10 minutes', '{}' FROM generate_series(1, 3000) i;
         INSERT INTO processed_events
           SELECT 'old-' || i, now() - interval '2 hours', NULL FROM generate_series(1, 500) i;
         INSERT INTO processed_events VALUES ('', now(), NULL), ('no-time', NULL, NULL);",
    );
    let p = pg(&url, "s");
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path()).open(dir.path()).unwrap();
    let r = rt
        .block_on(p.import(&e, &ImportTable::default(), |_, _| {}))
        .unwrap();
    assert_eq!((r.rows, r.imported, r.invalid), (3001, 3000, 1), "{r:?}");
    assert_eq!(e.check_and_insert("recent-17").unwrap(), Verdict::Duplicate);
    assert_eq!(e.check_and_insert("old-17").unwrap(), Verdict::New);
    // Imported marks expire at processed_at + TTL, not now + TTL.
    let mark = e.stored_mark("recent-1").unwrap().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let left = mark.expiry_unix_secs as i64 - now as i64;
    assert!((3000 - 5..=3000).contains(&left), "{left}");
    // Repeatable.
    let again = rt
        .block_on(p.import(&e, &ImportTable::default(), |_, _| {}))
        .unwrap();
    assert_eq!(again.imported, 0);
    // Column names are configurable and quoted.
    c.psql("import", "CREATE TABLE \"Done\" (\"Key\" text, at timestamptz); INSERT INTO \"Done\" VALUES ('k-1', now())");
    let r = rt
        .block_on(p.import(
            &e,
            &ImportTable {
                table: "Done".into(),
                id_column: "Key".into(),
                processed_at_column: "at".into(),
            },
            |_, _| {},
        ))
        .unwrap();
    assert_eq!(r.imported, 1);
    let err = rt
        .block_on(p.import(
            &e,
            &ImportTable {
                table: "missing_table".into(),
                ..ImportTable::default()
            },
            |_, _| {},
        ))
        .unwrap_err();
    assert!(err.to_string().contains("missing_table"), "{err}");
}

fn transactional(c: &Cluster, rt: &tokio::runtime::Runtime) {
    let url = c.create_db("tx");
    c.psql("tx", "CREATE TABLE orders (id text PRIMARY KEY)");
    let p = pg(&url, "s");
    rt.block_on(p.migrate()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path()).open(dir.path()).unwrap();
    rt.block_on(async {
        // Rolled back with the user's write: the id stays unmarked.
        let mut tx = p.pool().begin().await.unwrap();
        sqlx::query("INSERT INTO orders VALUES ('o-1')")
            .execute(&mut *tx)
            .await
            .unwrap();
        let mark = p.mark_in_transaction(&mut tx, &e, "evt-1").await.unwrap();
        assert_eq!(mark.verdict(), Verdict::New);
        tx.rollback().await.unwrap();
        drop(mark);
        assert!(!e.contains("evt-1").unwrap());
        // Committed: both the user's row and the mark.
        let mut tx = p.pool().begin().await.unwrap();
        sqlx::query("INSERT INTO orders VALUES ('o-1')")
            .execute(&mut *tx)
            .await
            .unwrap();
        let mark = p.mark_in_transaction(&mut tx, &e, "evt-1").await.unwrap();
        assert_eq!(mark.verdict(), Verdict::New);
        tx.commit().await.unwrap();
        mark.applied(&e).unwrap();
        assert!(e.contains("evt-1").unwrap());
        // Again, in a new transaction: a duplicate.
        let mut tx = p.pool().begin().await.unwrap();
        let mark = p.mark_in_transaction(&mut tx, &e, "evt-1").await.unwrap();
        assert_eq!(mark.verdict(), Verdict::Duplicate);
        tx.rollback().await.unwrap();
        // Committed but never applied (a crash): the database still
        // answers for it.
        let mut tx = p.pool().begin().await.unwrap();
        let mark = p.mark_in_transaction(&mut tx, &e, "evt-2").await.unwrap();
        assert_eq!(mark.verdict(), Verdict::New);
        tx.commit().await.unwrap();
        let mut tx = p.pool().begin().await.unwrap();
        let mark = p.mark_in_transaction(&mut tx, &e, "evt-2").await.unwrap();
        assert_eq!(mark.verdict(), Verdict::Duplicate);
        tx.rollback().await.unwrap();
    });
    assert_eq!(c.psql("tx", "SELECT count(*) FROM orders"), "1");
    assert_eq!(count(c, "tx", "s"), 2);
}

fn server_stopped(c: &Cluster, rt: &tokio::runtime::Runtime) {
    let url = c.create_db("outage");
    let p = Arc::new(pg(&url, "s"));
    rt.block_on(p.migrate()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let e = Arc::new(engine(dir.path()).open(dir.path()).unwrap());
    for id in ids("a", 300_000) {
        assert_eq!(e.check_and_insert(id).unwrap(), Verdict::New);
    }
    e.sync().unwrap();
    // Stop the server while a large checkpoint is under way.
    let stopper = {
        std::thread::scope(|s| {
            let h = s.spawn(|| {
                std::thread::sleep(Duration::from_millis(150));
                c.stop();
            });
            let r = rt.block_on(p.checkpoint(&e));
            h.join().unwrap();
            r
        })
    };
    c.start_server();
    match stopper {
        // All or nothing: a failed checkpoint left no rows behind.
        Err(err) => {
            println!("  (the stop interrupted the checkpoint: {err})");
            assert_eq!(count(c, "outage", "s"), 0, "{err}");
        }
        // It finished before the stop.
        Ok(r) => assert_eq!(r.written, 300_000),
    }
    // A background checkpointer through an outage: lag rises, then falls.
    let cp = Checkpointer::start(
        Arc::clone(&p),
        Arc::clone(&e),
        Duration::from_millis(200),
        None,
    )
    .unwrap();
    wait_for(
        || cp.status().checkpoints >= 1 && cp.status().marks_behind == 0,
        "first checkpoint",
    );
    c.stop();
    for id in ids("b", 5000) {
        assert_eq!(e.check_and_insert(id).unwrap(), Verdict::New);
    }
    wait_for(|| cp.status().failures >= 2, "failures while down");
    let down = cp.status();
    assert!(down.marks_behind >= 5000, "{down:?}");
    // Dedup goes on while the database is down.
    assert_eq!(e.check_and_insert("b-1").unwrap(), Verdict::Duplicate);
    std::thread::sleep(Duration::from_millis(1100));
    assert!(cp.status().seconds_behind >= 1.0, "{:?}", cp.status());
    c.start_server();
    wait_for(|| cp.status().marks_behind == 0, "catching up");
    assert_eq!(cp.status().seconds_behind, 0.0);
    assert!(cp.stop().is_none());
    assert_eq!(count(c, "outage", "s"), 305_000);
}

fn hand_off(c: &Cluster, rt: &tokio::runtime::Runtime) {
    let url = c.create_db("handoff");
    let mut opts = PgOptions::new(&url, "orders/3");
    opts.partition = Some(("orders".into(), 3));
    opts.connect_timeout = Duration::from_secs(1);
    let p = Arc::new(Postgres::new(opts).unwrap());
    rt.block_on(p.migrate()).unwrap();
    let dir_a = tempfile::tempdir().unwrap();
    let a = Arc::new(engine(dir_a.path()).open(dir_a.path()).unwrap());
    let cp = Checkpointer::start(
        Arc::clone(&p),
        Arc::clone(&a),
        Duration::from_millis(50),
        None,
    )
    .unwrap();
    // Host A keeps marking and checkpointing while host B restores.
    let marked = std::sync::atomic::AtomicUsize::new(0);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let dir_b = tempfile::tempdir().unwrap();
    let (b, checkpointed_before) = std::thread::scope(|s| {
        s.spawn(|| {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && i < 100_000 {
                assert_eq!(a.check_and_insert(format!("e-{i}")).unwrap(), Verdict::New);
                i += 1;
                marked.store(i, std::sync::atomic::Ordering::Relaxed);
            }
        });
        wait_for(
            || marked.load(std::sync::atomic::Ordering::Relaxed) > 20_000,
            "marks",
        );
        a.sync().unwrap();
        let upto = marked.load(std::sync::atomic::Ordering::Relaxed);
        let done = cp.status().checkpoints;
        wait_for(
            || cp.status().checkpoints >= done + 2,
            "a checkpoint after the marks",
        );
        let opened = rt.block_on(p.open(engine(dir_b.path()), dir_b.path(), |_, _| {}));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (opened.unwrap(), upto)
    });
    let (b, report) = b;
    assert!(
        report.restored && report.loaded as usize >= checkpointed_before,
        "{report:?}"
    );
    for i in 0..checkpointed_before {
        assert_eq!(
            b.check_and_insert(format!("e-{i}")).unwrap(),
            Verdict::Duplicate,
            "e-{i}"
        );
    }
    // A still checkpoints its own log; B's log has its own position.
    assert!(cp.stop().is_none());
    assert_eq!(
        c.psql(
            "handoff",
            "SELECT count(*) FROM seen_checkpoints JOIN seen_stores ON id = store_id WHERE store = 'orders/3'"
        ),
        "2"
    );
    assert_eq!(
        c.psql(
            "handoff",
            "SELECT topic || '/' || kafka_partition FROM seen_stores"
        ),
        "orders/3"
    );
}

fn bad_connections(c: &Cluster, rt: &tokio::runtime::Runtime) {
    c.create_db("bad");
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path()).open(dir.path()).unwrap();
    let bounded = |url: &str| -> String {
        let started = Instant::now();
        let mut opts = PgOptions::new(url, "s");
        opts.connect_timeout = Duration::from_secs(1);
        let err = match Postgres::new(opts) {
            Err(e) => e,
            Ok(p) => rt.block_on(p.checkpoint(&e)).unwrap_err(),
        };
        // Four attempts of at most a second each, and their backoff.
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{url}: {:?}",
            started.elapsed()
        );
        let msg = err.to_string();
        assert!(!msg.contains(pg::PASSWORD), "password leaked: {msg}");
        msg
    };
    let msg = bounded("not a url at all");
    assert!(msg.contains("URL"), "{msg}");
    let wrong = format!(
        "postgres://{}:wrong-password@127.0.0.1:{}/bad",
        pg::USER,
        c.port
    );
    let msg = bounded(&wrong);
    assert!(msg.contains("password authentication failed"), "{msg}");
    let msg = bounded(&c.url("no_such_db"));
    assert!(msg.contains("does not exist"), "{msg}");
    // Nobody listening: refused, retried with backoff, then a clear error.
    let dead = format!("postgres://{}:{}@127.0.0.1:1/bad", pg::USER, pg::PASSWORD);
    let msg = bounded(&dead);
    assert!(msg.contains("127.0.0.1:1"), "{msg}");
    // A second host that works takes over from a dead first one.
    let both = format!("{dead},{}", c.url("bad"));
    let p = pg(&both, "s");
    rt.block_on(p.migrate()).unwrap();
    rt.block_on(p.checkpoint(&e)).unwrap();
    // A zero interval would checkpoint back to back: refused up front.
    let err = Checkpointer::start(Arc::new(p), Arc::new(e), Duration::ZERO, None).unwrap_err();
    assert!(
        err.to_string()
            .contains("checkpoint interval must be above zero"),
        "{err}"
    );
}

fn wait_for(mut cond: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Run `seen` with `args` and `stdin`; (exit code, stdout, stderr).
fn seen_cli(args: &[&str], stdin: &str) -> (i32, String, String) {
    use std::io::Write;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_seen"))
        .args(args)
        .env_remove("SEEN_POSTGRES_URL")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn cli(c: &Cluster, _rt: &tokio::runtime::Runtime) {
    let url = c.create_db("cli");
    let (code, _, err) = seen_cli(&["pg", "migrate", "--postgres", &url], "");
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("0 → 1"), "{err}");
    let (code, _, err) = seen_cli(&["pg", "migrate", "--postgres", &url], "");
    assert!(code == 0 && err.contains("already"), "{err}");
    // A filter run checkpoints as it goes and once more at the end.
    let a = tempfile::tempdir().unwrap();
    let input: String = (0..2000).map(|i| format!("id-{}\n", i % 1500)).collect();
    let (code, out, err) = seen_cli(
        &[
            "filter",
            "--durability",
            "none",
            "--state",
            a.path().to_str().unwrap(),
            "--postgres",
            &url,
            "--store",
            "lines",
        ],
        &input,
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 1500);
    assert_eq!(count(c, "cli", "lines"), 1500);
    // Another host: restore, then the same input is all duplicates.
    let b = tempfile::tempdir().unwrap();
    let b_dir = b.path().join("state");
    let b_dir = b_dir.to_str().unwrap();
    let (code, _, err) = seen_cli(
        &[
            "pg",
            "restore",
            "--state",
            b_dir,
            "--postgres",
            &url,
            "--store",
            "lines",
        ],
        "",
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("1500 live marks"), "{err}");
    let (code, out, err) = seen_cli(&["filter", "--state", b_dir], &input);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "", "restored marks make every line a duplicate");
    // Import a processed_events table into a third store.
    c.psql("cli", "CREATE TABLE processed_events (event_id varchar PRIMARY KEY, processed_at timestamptz, metadata jsonb); INSERT INTO processed_events VALUES ('x-1', now(), NULL), ('x-2', now() - interval '3 hours', NULL)");
    let d = tempfile::tempdir().unwrap();
    let d = d.path().to_str().unwrap();
    let (code, _, err) = seen_cli(&["pg", "import", "--state", d, "--postgres", &url], "");
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("1 ids marked"), "{err}");
    let (_, out, _) = seen_cli(&["filter", "--state", d], "x-1\nx-2\n");
    assert_eq!(out, "x-2\n");
    // Errors name what is wrong and do not show the password.
    let (code, _, err) = seen_cli(
        &["pg", "checkpoint", "--state", d, "--postgres", "mysql://x"],
        "",
    );
    assert_ne!(code, 0);
    assert!(err.contains("postgres://"), "{err}");
    let wrong = c.url("cli").replace(pg::PASSWORD, "nope-not-it");
    let (code, _, err) = seen_cli(
        &["pg", "checkpoint", "--state", d, "--postgres", &wrong],
        "",
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("password authentication failed") && !err.contains("nope-not-it"),
        "{err}"
    );
}

/// Partition scope across hosts: two consumers of one group, each with its
/// own state directory, sharing only PostgreSQL. The second joins
/// mid-stream; a partition moves to it, and duplicates of ids the first
/// handled keep arriving on that partition. None may be handled twice.
#[cfg(feature = "kafka")]
mod kafka_hand_off {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use rdkafka::config::ClientConfig;
    use rdkafka::message::Message;
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::FutureProducer;
    use seen::checkpoint::PgOptions;
    use seen::kafka::{DedupConsumer, DedupConsumerConfig, PartitionCheckpoint, Scope};

    use super::Cluster;

    const TOPIC: &str = "orders";
    type Seen = Arc<Mutex<HashMap<String, u32>>>;

    pub fn partition_moves_between_hosts(c: &Cluster, rt: &tokio::runtime::Runtime) {
        let url = c.create_db("handoff_kafka");
        rt.block_on(async {
            let pg = seen::checkpoint::Postgres::new(PgOptions::new(&url, "x")).unwrap();
            pg.migrate().await.unwrap();
        });
        rt.block_on(run(&url));
    }

    fn config(brokers: &str, url: &str) -> DedupConsumerConfig {
        let mut c = DedupConsumerConfig::new(brokers, "hosts", &[TOPIC]);
        c.commit_interval = Duration::from_millis(100);
        c.properties = vec![("session.timeout.ms".into(), "6000".into())];
        let mut postgres = PgOptions::new(url, "billing");
        postgres.connect_timeout = Duration::from_secs(2);
        c.checkpoint = Some(PartitionCheckpoint {
            postgres,
            every: Duration::from_millis(200),
        })
        // NO_HANDOFF=1 shows this test failing without the hand-off.
        .filter(|_| std::env::var_os("NO_HANDOFF").is_none());
        c
    }

    fn scope(dir: &std::path::Path) -> Scope {
        Scope::Partition {
            dir: dir.to_path_buf(),
            engine: seen::Config::from_vars([("SEEN_DURABILITY", "none")]).unwrap(),
        }
    }

    type Handled =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), std::io::Error>> + Send>>;

    /// Records `partition:id` of every message handled.
    fn handler(
        seen: Seen,
    ) -> impl Fn(Arc<seen::kafka::Received>) -> Handled + Send + Sync + 'static {
        move |msg| {
            let seen = Arc::clone(&seen);
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                let p = format!(
                    "{}:{}",
                    msg.partition(),
                    String::from_utf8_lossy(msg.payload().unwrap_or_default())
                );
                *seen.lock().unwrap().entry(p).or_default() += 1;
                Ok(())
            })
        }
    }

    async fn run(url: &str) {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic(TOPIC, 2, 1).unwrap();
        let brokers = cluster.bootstrap_servers();
        // A zero checkpoint interval is refused when the consumer is made,
        // not when its first partition store opens.
        let mut zero = config(&brokers, url);
        if let Some(c) = zero.checkpoint.as_mut() {
            c.every = Duration::ZERO;
            let dir = tempfile::tempdir().unwrap();
            let err = DedupConsumer::with_scope(zero, scope(dir.path())).unwrap_err();
            assert!(
                err.to_string()
                    .contains("checkpoint interval must be above zero"),
                "{err}"
            );
        }
        // Message i goes to partition i % 2; every third id comes again 80
        // messages later, on its own partition.
        let mut msgs = Vec::new();
        for i in 0..800usize {
            let n = if i >= 80 && i % 3 == 0 { i - 80 } else { i };
            msgs.push(format!("s-{n}"));
        }
        let distinct: std::collections::HashSet<String> = msgs
            .iter()
            .enumerate()
            .map(|(i, id)| format!("{}:{id}", i % 2))
            .collect();
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()
            .unwrap();
        for (i, id) in msgs.iter().enumerate() {
            crate::common::send_with_id(&producer, TOPIC, (i % 2) as i32, id).await;
        }
        let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let seen: Seen = Arc::default();
        let a = DedupConsumer::with_scope(config(&brokers, url), scope(dir_a.path())).unwrap();
        let (done_tx, done_rx) = tokio::sync::watch::channel(false);
        let b_task = {
            let (seen, brokers, url) = (Arc::clone(&seen), brokers.clone(), url.to_owned());
            let dir = dir_b.path().to_path_buf();
            tokio::spawn(async move {
                while seen.lock().unwrap().len() < 100 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                let b = DedupConsumer::with_scope(config(&brokers, &url), scope(&dir)).unwrap();
                let mut done = done_rx.clone();
                let r = b
                    .run(handler(seen), async move {
                        let _ = done.wait_for(|d| *d).await;
                    })
                    .await;
                (
                    r,
                    b.stats()
                        .received
                        .load(std::sync::atomic::Ordering::Relaxed),
                )
            })
        };
        let stop_a = {
            let seen = Arc::clone(&seen);
            let want = distinct.len();
            async move {
                for _ in 0..6000 {
                    if seen.lock().unwrap().len() == want {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                let _ = done_tx.send(true);
            }
        };
        a.run(handler(Arc::clone(&seen)), stop_a).await.unwrap();
        drop(a);
        let (b_result, b_received) = b_task.await.unwrap();
        b_result.unwrap();
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), distinct.len(), "none skipped");
        let twice: Vec<_> = seen.iter().filter(|(_, &n)| n > 1).collect();
        assert!(
            twice.is_empty(),
            "handled twice across the hand-off: {twice:?}"
        );
        assert!(b_received > 0, "the second host took a partition over");
    }
}
