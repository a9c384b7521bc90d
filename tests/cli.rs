//! `seen filter` end to end, through the real binary.

use std::io::Write;
use std::process::{Command, Output, Stdio};

fn filter(args: &[&str], input: &[u8]) -> Output {
    filter_env(args, &[], input)
}

fn filter_env(args: &[&str], env: &[(&str, &str)], input: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_seen"))
        .arg("filter")
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Feed stdin from another thread: the child writes stdout as it reads,
    // and a full pipe on both sides would deadlock.
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    out
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn plain_lines_keep_first_sightings_unchanged() {
    let o = filter(&[], b"a\nb\r\na\nc\nb\r\n");
    assert!(o.status.success());
    assert_eq!(stdout(&o), "a\nb\r\nc\n");
    assert!(
        stderr(&o).contains("read 5 lines, new 3, duplicate 2, invalid 0"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn composite_json_keys() {
    let input = br#"{"s":{"lsn":1,"tx":7},"ts":1}
{"s":{"lsn":1,"tx":7},"ts":2}
{"s":{"lsn":1,"tx":8},"ts":3}
"#;
    let o = filter(&["--key", "/s/lsn", "--key", "/s/tx"], input);
    assert!(o.status.success());
    assert_eq!(stdout(&o).lines().count(), 2);
    assert!(stdout(&o).contains(r#""ts":1"#) && stdout(&o).contains(r#""ts":3"#));
}

#[test]
fn invalid_lines_are_counted_and_reported_with_line_numbers() {
    let mut input = b"{\"id\":1}\nnot json\n{\"other\":1}\n{\"id\":null}\n\xff\xfe\n".to_vec();
    input.extend_from_slice(format!("{{\"id\":\"{}\"}}\n", "x".repeat(2000)).as_bytes());
    input.extend_from_slice(b"{\"id\":1}\n");
    for (mode, expect_out) in [("skip", 1), ("pass", 6)] {
        let o = filter(&["--key", "/id", "--on-invalid", mode], &input);
        assert!(o.status.success(), "{mode}");
        assert_eq!(stdout(&o).lines().count(), expect_out, "{mode}");
        let err = stderr(&o);
        assert!(err.contains("line 2: malformed JSON"), "{err}");
        assert!(err.contains("line 3: missing key /id"), "{err}");
        assert!(err.contains("line 4: key /id is null"), "{err}");
        assert!(err.contains("line 5: malformed JSON"), "{err}");
        assert!(
            err.contains("line 6: event id is 2000 bytes, over the limit of 1024"),
            "{err}"
        );
        assert!(err.contains("invalid 5"), "{err}");
    }
}

#[test]
fn on_invalid_fail_stops_with_exit_code_2_after_writing_earlier_lines() {
    let o = filter(
        &["--key", "/id", "--on-invalid", "fail"],
        b"{\"id\":1}\n{oops\n{\"id\":2}\n",
    );
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(stdout(&o), "{\"id\":1}\n");
    assert!(stderr(&o).contains("line 2: malformed JSON"));
}

#[test]
fn non_utf8_plain_ids_are_fine_and_empty_lines_invalid() {
    let o = filter(&[], b"\xff\xfe\n\n\xff\xfe\n");
    assert!(o.status.success());
    assert_eq!(o.stdout, b"\xff\xfe\n");
    assert!(stderr(&o).contains("line 2: event id is empty"));
}

#[test]
fn bad_flags_are_clear_errors() {
    let o = filter(&["--ttl", "soon"], b"");
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("--ttl") && stderr(&o).contains("duration"),
        "{}",
        stderr(&o)
    );
    let o = filter(&["--key", "id"], b"");
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("JSON pointer"), "{}", stderr(&o));
}

#[test]
fn sample_has_about_a_quarter_duplicates_and_the_quick_start_keeps_every_event() {
    let sample = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/debezium-sample.ndjson"
    ))
    .unwrap();
    // Ground truth: an event is its JSON minus the envelope's ts_ms.
    let mut distinct = std::collections::HashSet::new();
    let mut read = 0;
    for line in sample.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let mut v: serde_json::Value = serde_json::from_slice(line).unwrap();
        v.as_object_mut().unwrap().remove("ts_ms");
        distinct.insert(v.to_string());
        read += 1;
    }
    // The README's quick start.
    let o = filter(&["--id", "debezium"], &sample);
    assert!(o.status.success());
    let new = stdout(&o).lines().count();
    assert_eq!(new, distinct.len(), "every distinct change event, once");
    let dup = read - new;
    assert!(
        (0.2..0.3).contains(&(dup as f64 / read as f64)),
        "{dup} of {read}"
    );
}

fn seen(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_seen"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn state_persists_across_runs() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let state = state.to_str().unwrap();
    let input = b"a\nb\nc\nb\n";
    for durability in ["sync", "periodic", "none"] {
        let _ = std::fs::remove_dir_all(state);
        let first = filter(&["--state", state, "--durability", durability], input);
        assert!(first.status.success(), "{}", stderr(&first));
        assert_eq!(stdout(&first), "a\nb\nc\n");
        let second = filter(&["--state", state, "--durability", durability], input);
        assert!(second.status.success());
        assert_eq!(
            stdout(&second),
            "",
            "{durability}: nothing is new the second time"
        );
        let third = filter(&["--state", state], b"c\nd\n");
        assert_eq!(stdout(&third), "d\n");
    }
}

#[test]
fn inspect_and_verify_a_state_directory() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let s = state.to_str().unwrap();
    let o = filter(&["--state", s], b"x\ny\nz\n");
    assert!(o.status.success());
    let o = seen(&["inspect", s]);
    assert!(o.status.success());
    let text = stdout(&o);
    assert!(text.contains("live keys    3"), "{text}");
    assert!(text.contains("segments     1"), "{text}");
    let o = seen(&["verify", s]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("ok: 1 segments, 3 records, 3 live keys"),
        "{}",
        stdout(&o)
    );
    // Damage a record: verify names the file and offset and exits non-zero.
    let seg = state.join("wal-0000000000000001.seg");
    let mut b = std::fs::read(&seg).unwrap();
    b[64 + 32 + 10] ^= 0xff;
    std::fs::write(&seg, &b).unwrap();
    let o = seen(&["verify", s]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.contains("wal-0000000000000001.seg: offset 96"), "{err}");
    assert!(err.contains("checksum"), "{err}");
    // Not a store at all.
    let o = seen(&["verify", dir.path().to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("STORE"), "{}", stderr(&o));
}

#[test]
fn a_second_filter_on_the_same_state_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = dir.path().to_str().unwrap();
    let mut first = Command::new(env!("CARGO_BIN_EXE_seen"))
        .args(["filter", "--state", s])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The first run holds the lock from before it writes STORE until it ends.
    for _ in 0..500 {
        if dir.path().join("STORE").exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let second = filter(&["--state", s], b"a\n");
    drop(first.stdin.take());
    assert!(first.wait().unwrap().success());
    assert!(!second.status.success());
    assert!(
        stderr(&second).contains("in use by another process"),
        "{}",
        stderr(&second)
    );
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/fixtures/debezium/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

/// Real PostgreSQL-connector output: a 9-row snapshot sharing one lsn and
/// txId, 7 streaming changes (a three-row transaction among them), then 10
/// redeliveries. 16 distinct change events.
#[test]
fn debezium_ids_keep_every_distinct_postgres_change() {
    let input = fixture("postgres.ndjson");
    let o = filter(&["--id", "debezium"], &input);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert_eq!(out.lines().count(), 16, "{}", stderr(&o));
    assert!(stderr(&o).contains("new 16, duplicate 10, invalid 0"));
    // Every snapshot row made it through.
    for id in [1001, 1002, 1003, 1004, 101, 102, 103, 104, 105] {
        let row = format!(r#""after":{{"id":{id},"#);
        assert!(
            out.lines()
                .any(|l| l.contains(r#""op":"r""#) && l.contains(&row)),
            "snapshot row {id} lost"
        );
    }
    // The old quick-start recipe keyed on position and table only: it takes
    // snapshot rows for redeliveries of each other and loses them.
    let old = filter(
        &[
            "--key",
            "/source/lsn",
            "--key",
            "/source/txId",
            "--key",
            "/source/table",
        ],
        &input,
    );
    assert!(
        stdout(&old).lines().count() < 16,
        "the old recipe would be fine after all"
    );
}

/// MySQL-connector output in the JSON converter's schema/payload envelope:
/// a snapshot at one binlog position, a three-row INSERT (one event,
/// rows 0..2), an update, and 4 redeliveries.
#[test]
fn debezium_ids_read_mysql_positions_in_the_schema_envelope() {
    let o = filter(&["--id", "debezium"], &fixture("mysql-envelope.ndjson"));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).lines().count(), 7);
    assert!(stderr(&o).contains("new 7, duplicate 4, invalid 0"));
}

#[test]
fn debezium_bad_events_follow_the_invalid_policy() {
    let input = b"{\"op\":\"c\"}\nnull\n{\"source\":{\"lsn\":1\n{\"source\":{\"lsn\":1,\"table\":\"t\"},\"op\":\"c\"}\n";
    let o = filter(&["--id", "debezium"], input);
    assert!(o.status.success());
    assert_eq!(stdout(&o).lines().count(), 1);
    let err = stderr(&o);
    assert!(
        err.contains("line 1: not a Debezium change event: no source block"),
        "{err}"
    );
    assert!(err.contains("line 2: tombstone"), "{err}");
    assert!(err.contains("line 3: malformed JSON"), "{err}");
    let o = filter(&["--id", "debezium", "--on-invalid", "fail"], input);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(stdout(&o), "");
    let o = filter(&["--id", "nope"], b"");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--id"), "{}", stderr(&o));
}

/// The environment and the flags are one configuration: the CLI honours
/// every SEEN_* variable the library does, and a bad variable is reported
/// by its own name, not by a flag the user never typed.
#[test]
fn environment_configures_the_cli_like_the_library() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("s");
    let s = state.to_str().unwrap();
    let o = filter_env(
        &["--state", s],
        &[
            ("SEEN_DURABILITY", "periodic:5ms"),
            ("SEEN_TTL_SECONDS", "1h"),
            ("SEEN_SEGMENT_SIZE", "64KiB"),
            ("SEEN_SHARDS", "8"),
            ("SEEN_MEMORY_LIMIT_BYTES", "16MiB"),
            ("SEEN_MEMORY_POLICY", "evict-oldest"),
            ("SEEN_RECOVERY_MODE", "absolute-consistency"),
        ],
        b"a\nb\na\n",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "a\nb\n");
    let seg = std::fs::metadata(state.join("wal-0000000000000001.seg")).unwrap();
    assert_eq!(seg.len(), 64 << 10, "SEEN_SEGMENT_SIZE sized the segment");
    for (var, value) in [
        ("SEEN_TTL_SECONDS", "soon"),
        ("SEEN_DURABILITY", "always"),
        ("SEEN_SHARDS", "many"),
        ("SEEN_SEGMENT_SIZE", "12 parsecs"),
    ] {
        let o = filter_env(&[], &[(var, value)], b"");
        assert!(!o.status.success(), "{var}={value}");
        let err = stderr(&o);
        assert!(err.contains(var), "{var}: {err}");
        assert!(!err.contains("--"), "{var} blamed on a flag: {err}");
    }
    // A flag wins over its variable.
    let o = filter_env(&["--ttl", "0"], &[("SEEN_TTL_SECONDS", "1h")], b"a\na\n");
    assert_eq!(stdout(&o), "a\na\n");
    // Out of range (a parsed value the engine refuses) names the setting.
    let o = filter_env(&[], &[("SEEN_SHARDS", "3")], b"");
    assert!(stderr(&o).contains("power of two"), "{}", stderr(&o));
}

#[test]
fn inspect_shows_one_ids_mark_and_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let s = dir.path().to_str().unwrap();
    {
        let engine = seen::Engine::builder().open(dir.path()).unwrap();
        assert!(engine
            .check_and_insert_with_metadata("order-7", br#"{"by":"billing"}"#)
            .unwrap()
            .is_new());
        assert!(engine.check_and_insert("order-8").unwrap().is_new());
    }
    let o = seen(&["inspect", s, "--id", "order-7"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("mark         live"), "{text}");
    assert!(text.contains(r#"metadata     {"by":"billing"}"#), "{text}");
    let o = seen(&["inspect", s, "--id", "order-8"]);
    assert!(stdout(&o).contains("metadata     -"), "{}", stdout(&o));
    let o = seen(&["inspect", s, "--id", "order-9"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains("none in the log"));
    let o = seen(&["inspect", s]);
    assert!(stdout(&o).contains("format       v2"), "{}", stdout(&o));
    assert!(
        stdout(&o).contains("1 marks carry metadata"),
        "{}",
        stdout(&o)
    );
}

/// `seen bench --steady 40000 --events 200000 --durability none` in
/// `state`, plus `extra`; its standard output.
fn steady_bench(state: &std::path::Path, extra: &[&str]) -> String {
    let mut args = vec!["bench", "--steady", "40000", "--events", "200000"];
    args.extend(["--durability", "none", "--dir", state.to_str().unwrap()]);
    args.extend(extra);
    let out = seen(&args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// `seen bench --steady`: the set kept at its resident size under TTL
/// churn. Expired ids must actually be dropped (the simulated clock moves)
/// and the set must not hold more than one TTL of ids.
#[test]
fn bench_steady_state_churns_without_holding_expired_ids() {
    let dir = tempfile::tempdir().unwrap();
    let stdout = steady_bench(&dir.path().join("bench"), &[]);
    assert!(stdout.contains("steady: 200000 events"), "{stdout}");
    let field = |after: &str, before: &str| -> u64 {
        let line = stdout.lines().find(|l| l.contains("memory:")).unwrap();
        let rest = &line[line.find(after).unwrap() + after.len()..];
        rest[..rest.find(before).unwrap()].trim().parse().unwrap()
    };
    let held = field("hold", "entries");
    let dropped = field("not yet dropped);", "expired");
    // 200k events over a 40k window: most of what was marked has expired
    // and been dropped; what is held is about one window (plus expired
    // entries a rebuild has not reached yet), not everything ever marked.
    assert!(dropped > 100_000, "{stdout}");
    assert!(held < 100_000, "{stdout}");
}

#[test]
fn bench_runs_the_engine_with_the_shards_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let rebuilds = |shards: &str| -> u64 {
        let state = dir.path().join(format!("bench-{shards}"));
        let stdout = steady_bench(&state, &["--shards", shards]);
        let line = stdout.lines().find(|l| l.contains("memory:")).unwrap();
        let rest = &line[line.find("dropped by").unwrap() + "dropped by".len()..];
        rest[..rest.find("table rebuilds").unwrap()]
            .trim()
            .parse()
            .unwrap()
    };
    // Each rebuild covers one shard: sixteen times the shards, many more
    // (and smaller) rebuilds for the same churn.
    let (one, sixteen) = (rebuilds("1"), rebuilds("16"));
    assert!(
        sixteen > 4 * one.max(1),
        "1 shard: {one}, 16 shards: {sixteen}"
    );
    let out = seen(&["bench", "--shards", "100", "--events", "1000"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("shards must be a power of two"), "{stderr}");
}
