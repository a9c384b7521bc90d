//! Metric values after scripted sequences; configuration from the
//! environment, good and bad; the CLI's /metrics endpoint.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use seen::guard::{IdempotencyGuard, Outcome};
use seen::{Config, Durability, Engine, Error, ManualClock, MemoryPolicy, RecoveryMode};

fn scrape(registry: &Registry) -> HashMap<String, f64> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

#[tokio::test]
async fn metrics_follow_a_scripted_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_800_000_000));
    let engine = Arc::new(
        Engine::builder()
            .ttl(Duration::from_secs(10))
            .clock(clock.clone())
            .background_sweep(false)
            .durability(Durability::Sync)
            .open(dir.path())
            .unwrap(),
    );
    let mut registry = Registry::default();
    seen::metrics::register(&mut registry, &engine);
    for id in ["a", "b", "a", "c", "b"] {
        let _ = engine.check_and_insert(id).unwrap();
    }
    assert!(engine.check_and_insert("").is_err());
    let guard = Arc::new(IdempotencyGuard::new(engine.clone()));
    seen::metrics::register_guard(&mut registry, &guard);
    assert_eq!(
        guard
            .process_if_new("d", async { Err::<(), _>(()) })
            .await
            .unwrap(),
        Outcome::Failed(())
    );
    assert_eq!(
        guard
            .process_if_new("d", async { Ok::<_, ()>(()) })
            .await
            .unwrap(),
        Outcome::Success(())
    );
    clock.advance(Duration::from_secs(11));
    assert_eq!(engine.expire_now(), 4);
    let m = scrape(&registry);
    assert_eq!(m["seen_new_total"], 5.0); // a b c d(failed) d
    assert_eq!(m["seen_duplicate_total"], 2.0);
    assert_eq!(m["seen_invalid_total"], 1.0);
    assert_eq!(m["seen_failed_total"], 1.0);
    assert_eq!(m["seen_released_total"], 1.0);
    assert_eq!(m["seen_expired_total"], 4.0);
    assert_eq!(m["seen_evicted_total"], 0.0);
    assert_eq!(m["seen_inflight_collisions_total"], 0.0);
    assert_eq!(m["seen_live_keys"], 0.0);
    assert_eq!(m["seen_log_bytes"], 64.0 + 4.0 * 32.0);
    assert_eq!(m["seen_durability_lag_bytes"], 0.0);
    assert!(m["seen_memory_bytes"] > 0.0);
    assert!(m["seen_sync_seconds_count"] >= 1.0, "{m:?}");
    assert_eq!(m["seen_replay_seconds_count"], 1.0);
}

#[test]
fn config_from_environment() {
    let c = Config::from_vars([
        ("SEEN_TTL_SECONDS", "90"),
        ("SEEN_STATE_DIR", "/var/lib/seen"),
        ("SEEN_DURABILITY", "periodic:25ms"),
        ("SEEN_MEMORY_LIMIT_BYTES", "1048576"),
        ("SEEN_MEMORY_POLICY", "evict-oldest"),
        ("SEEN_RECOVERY_MODE", "salvage"),
        ("SEEN_SHARDS", "16"),
        ("PATH", "/usr/bin"),
    ])
    .unwrap();
    assert_eq!(c.ttl, Duration::from_secs(90));
    assert_eq!(
        c.state_dir.as_deref(),
        Some(std::path::Path::new("/var/lib/seen"))
    );
    assert_eq!(
        c.durability,
        Durability::Periodic(Duration::from_millis(25))
    );
    assert_eq!(c.memory_limit, Some((1 << 20, MemoryPolicy::EvictOldest)));
    assert_eq!(c.recovery_mode, RecoveryMode::Salvage);
    // The Kafka-style alias, and SEEN_ winning over it.
    let c = Config::from_vars([("KAFKA_DEDUP_TTL_SECONDS", "120")]).unwrap();
    assert_eq!(c.ttl, Duration::from_secs(120));
    let c = Config::from_vars([
        ("KAFKA_DEDUP_TTL_SECONDS", "120"),
        ("SEEN_TTL_SECONDS", "7"),
    ])
    .unwrap();
    assert_eq!(c.ttl, Duration::from_secs(7));
    // TTL 0 disables dedup: every event is new.
    let e = Config::from_vars([("SEEN_TTL_SECONDS", "0")])
        .unwrap()
        .open()
        .unwrap();
    assert!(e.check_and_insert("x").unwrap().is_new());
    assert!(e.check_and_insert("x").unwrap().is_new());
    // Defaults.
    let c = Config::from_vars(Vec::<(String, String)>::new()).unwrap();
    assert_eq!(
        (c.ttl, c.durability, c.state_dir),
        (seen::DEFAULT_TTL, Durability::Sync, None)
    );
}

#[test]
fn bad_environment_values_name_the_variable() {
    for (var, value) in [
        ("SEEN_TTL_SECONDS", "an hour"),
        ("KAFKA_DEDUP_TTL_SECONDS", "-5"),
        ("SEEN_DURABILITY", "always"),
        ("SEEN_DURABILITY", "periodic:soon"),
        ("SEEN_MEMORY_POLICY", "lru"),
        ("SEEN_RECOVERY_MODE", "yolo"),
        ("SEEN_CAPACITY", "1e6"),
    ] {
        let err = Config::from_vars([(var, value)]).unwrap_err();
        assert!(matches!(err, Error::Config(_)), "{var}");
        assert!(err.to_string().contains(var), "{err} should name {var}");
    }
    // A value that parses but is out of range fails when the engine is built.
    let err = Config::from_vars([("SEEN_SHARDS", "3")])
        .unwrap()
        .open()
        .unwrap_err();
    assert!(err.to_string().contains("power of two"), "{err}");
}

#[test]
fn cli_serves_metrics_while_filtering() {
    // A port the OS just handed out (and we released) is very likely free.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_seen"))
        .args(["filter", "--batch", "1", "--metrics-addr", &addr])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"a\nb\na\n").unwrap();
    stdin.flush().unwrap();
    let mut body = String::new();
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(50));
        let Ok(mut s) = std::net::TcpStream::connect(&addr) else {
            continue;
        };
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            .unwrap();
        body.clear();
        s.read_to_string(&mut body).unwrap();
        if body.contains("seen_duplicate_total 1") {
            break;
        }
    }
    drop(stdin);
    child.wait().unwrap();
    assert!(body.contains("seen_new_total 2"), "{body}");
    assert!(body.contains("seen_duplicate_total 1"), "{body}");
}

/// Every variable the README documents is read by `Config`, every variable
/// `Config` reads is documented, and each one changes the configuration.
#[test]
fn every_documented_variable_works() {
    let readme = include_str!("../README.md");
    let mut documented: Vec<String> = Vec::new();
    for (i, _) in readme.match_indices("SEEN_") {
        let name: String = readme[i..]
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || *c == '_' || c.is_ascii_digit())
            .collect();
        if name.len() > "SEEN_".len() && !documented.contains(&name) {
            documented.push(name);
        }
    }
    assert!(readme.contains("KAFKA_DEDUP_TTL_SECONDS"));
    documented.push("KAFKA_DEDUP_TTL_SECONDS".into());
    // Variables of the test harnesses, not of seen itself.
    let harness = [
        "SEEN_FUZZ_SECONDS",
        "SEEN_KILL_ROUNDS",
        "SEEN_BENCH_PEERS",
        "SEEN_BENCH_PRESIZE",
        "SEEN_REGENERATE_FIXTURE",
    ];
    documented.retain(|v| !harness.contains(&v.as_str()));
    for var in &documented {
        assert!(
            seen::config::ENV_VARS.contains(&var.as_str()),
            "the README documents {var}, which Config does not read"
        );
    }
    let default = Config::from_vars(Vec::<(String, String)>::new()).unwrap();
    for &var in seen::config::ENV_VARS {
        assert!(
            documented.iter().any(|d| d == var),
            "Config reads {var}, which the README does not document"
        );
        let value = match var {
            "SEEN_TTL_SECONDS" | "KAFKA_DEDUP_TTL_SECONDS" => "90s",
            "SEEN_STATE_DIR" => "/tmp/x",
            "SEEN_DURABILITY" => "none",
            "SEEN_MAX_ID_LEN" | "SEEN_CAPACITY" | "SEEN_SHARDS" => "16",
            "SEEN_MEMORY_LIMIT_BYTES" | "SEEN_SEGMENT_SIZE" => "1MiB",
            "SEEN_MEMORY_POLICY" => "evict-oldest",
            "SEEN_RECOVERY_MODE" => "salvage",
            "SEEN_METRICS_ADDR" => "127.0.0.1:9898",
            "SEEN_POSTGRES_URL" => "postgres://u:p@127.0.0.1:5432/db",
            "SEEN_PG_STORE" => "orders",
            "SEEN_CHECKPOINT_INTERVAL" => "2s",
            other => panic!("no sample value for {other}: add one"),
        };
        let mut vars = vec![(var, value)];
        if var == "SEEN_MEMORY_POLICY" {
            vars.push(("SEEN_MEMORY_LIMIT_BYTES", "1MiB"));
        }
        let c = Config::from_vars(vars.clone()).unwrap();
        assert_ne!(c, default, "{var}={value} changed nothing");
        let bad = Config::from_vars([(var, "\u{1F600}")]);
        // Any path and any store name are valid.
        if var != "SEEN_STATE_DIR" && var != "SEEN_PG_STORE" {
            let err = bad.unwrap_err().to_string();
            assert!(err.contains(var), "{err}");
        }
    }
}
