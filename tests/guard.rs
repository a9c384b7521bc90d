//! The idempotency guard: exact run counts under races of Ok, Err, panic
//! and cancellation; the crash window; compatibility calls; metrics.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use seen::guard::{IdempotencyGuard, InFlightPolicy, Outcome};
use seen::{Durability, Engine, Error};

fn engine() -> Arc<Engine> {
    Arc::new(Engine::builder().build().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_tasks_racing_on_one_id_run_the_work_once() {
    let guard = Arc::new(IdempotencyGuard::new(engine()));
    let runs = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let (guard, runs) = (guard.clone(), runs.clone());
            tokio::spawn(async move {
                guard
                    .process_if_new("payment-1", async {
                        runs.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        Ok::<_, String>(())
                    })
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut success = 0;
    for t in tasks {
        match t.await.unwrap() {
            Outcome::Success(()) => success += 1,
            Outcome::AlreadyProcessed => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(success, 1);
    assert_eq!(guard.engine().stats().new, 1);
    let s = guard.stats();
    assert!(s.inflight_collisions >= 1, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn return_in_flight_policy_answers_at_once() {
    let guard = Arc::new(IdempotencyGuard::with_policy(
        engine(),
        InFlightPolicy::ReturnInFlight,
    ));
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let (finish_tx, finish_rx) = tokio::sync::oneshot::channel::<()>();
    let g = guard.clone();
    let first = tokio::spawn(async move {
        g.process_if_new("x", async move {
            started_tx.send(()).unwrap();
            finish_rx.await.unwrap();
            Ok::<_, ()>(1)
        })
        .await
        .unwrap()
    });
    started_rx.await.unwrap();
    let second = guard
        .process_if_new("x", async { Ok::<_, ()>(2) })
        .await
        .unwrap();
    assert_eq!(second, Outcome::InFlight);
    finish_tx.send(()).unwrap();
    assert_eq!(first.await.unwrap(), Outcome::Success(1));
    assert_eq!(
        guard
            .process_if_new("x", async { Ok::<_, ()>(3) })
            .await
            .unwrap(),
        Outcome::AlreadyProcessed
    );
}

/// Attempts fail, panic or get cancelled until one succeeds: every failed
/// attempt releases the claim, the work succeeds exactly once, and after
/// that nobody runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn err_panic_and_cancel_release_the_claim() {
    let guard = Arc::new(IdempotencyGuard::new(engine()));
    let runs = Arc::new(AtomicUsize::new(0));
    let successes = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for attempt in 0..40usize {
        let (guard, runs, successes) = (guard.clone(), runs.clone(), successes.clone());
        let task = tokio::spawn(async move {
            guard
                .process_if_new("job-9", async move {
                    let n = runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    match attempt % 4 {
                        0 if n < 30 => Err("transient"),
                        1 if n < 30 => panic!("work panicked"),
                        2 if n < 30 => {
                            // Cancelled below while sleeping.
                            tokio::time::sleep(Duration::from_secs(60)).await;
                            Ok(())
                        }
                        _ => {
                            successes.fetch_add(1, Ordering::SeqCst);
                            Ok(())
                        }
                    }
                })
                .await
        });
        if attempt % 4 == 2 {
            let abort = task.abort_handle();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                abort.abort();
            });
        }
        tasks.push(task);
    }
    for t in tasks {
        let _ = t.await; // panics and cancellations surface as JoinErrors
    }
    assert_eq!(
        successes.load(Ordering::SeqCst),
        1,
        "the work succeeded exactly once"
    );
    let ran = runs.load(Ordering::SeqCst);
    let s = guard.stats();
    // Every run but the successful one released its claim.
    assert_eq!(s.released as usize, ran - 1, "{s:?}");
    assert!(guard.is_processed("job-9").unwrap());
    let after = guard
        .process_if_new("job-9", async { Ok::<_, ()>(()) })
        .await
        .unwrap();
    assert_eq!(after, Outcome::AlreadyProcessed);
}

#[tokio::test]
async fn failure_returns_failed_and_a_retry_runs() {
    let guard = IdempotencyGuard::new(engine());
    let r = guard
        .process_if_new("a", async { Err::<(), _>("boom") })
        .await
        .unwrap();
    assert_eq!(r, Outcome::Failed("boom"));
    assert!(!guard.is_processed("a").unwrap());
    let r = guard
        .process_if_new("a", async { Ok::<_, ()>(5) })
        .await
        .unwrap();
    assert_eq!(r, Outcome::Success(5));
    let s = guard.stats();
    assert_eq!(
        (s.failed, s.released, guard.engine().stats().new),
        (1, 1, 2)
    );
}

#[tokio::test]
async fn invalid_ids_are_errors_not_outcomes() {
    let guard = IdempotencyGuard::new(engine());
    let r = guard.process_if_new("", async { Ok::<_, ()>(()) }).await;
    assert!(matches!(r, Err(Error::EmptyId)));
}

#[tokio::test]
async fn crash_between_work_and_mark_leaves_the_id_unmarked() {
    let dir = tempfile::tempdir().unwrap();
    {
        let engine = Arc::new(
            Engine::builder()
                .durability(Durability::Sync)
                .open(dir.path())
                .unwrap(),
        );
        let guard = IdempotencyGuard::new(engine.clone());
        assert!(matches!(
            guard
                .process_if_new("done", async { Ok::<_, ()>(()) })
                .await
                .unwrap(),
            Outcome::Success(())
        ));
        // The work for "in-flight" runs, and the process dies before the
        // mark is written: the future is never completed.
        let fut = guard.process_if_new("in-flight", async {
            std::future::pending::<()>().await;
            Ok::<_, ()>(())
        });
        let _ = tokio::time::timeout(Duration::from_millis(20), fut).await;
    }
    let engine = Engine::builder().open(dir.path()).unwrap();
    assert!(engine.contains("done").unwrap());
    assert!(
        !engine.contains("in-flight").unwrap(),
        "at-least-once: it runs again after the crash"
    );
}

#[test]
fn compatibility_calls_and_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(Engine::builder().open(dir.path()).unwrap());
    let guard = IdempotencyGuard::new(engine);
    let meta = serde_json::json!({"handler": "billing", "attempt": 1});
    assert!(guard.mark_processed("evt-1", Some(&meta)).unwrap());
    assert!(!guard.mark_processed("evt-1", None).unwrap());
    assert!(guard.mark_processed("evt-2", None).unwrap());
    assert!(guard.is_processed("evt-1").unwrap());
    let huge = serde_json::json!({"blob": "x".repeat(5000)});
    assert!(matches!(
        guard.mark_processed("evt-3", Some(&huge)),
        Err(Error::MetadataTooLarge { .. })
    ));
    assert!(!guard.is_processed("evt-3").unwrap());
    assert_eq!(guard.cleanup_old_events(), 0);
    drop(guard);
    // The metadata record replays as a mark.
    let engine = Engine::builder().open(dir.path()).unwrap();
    assert!(engine.contains("evt-1").unwrap() && engine.contains("evt-2").unwrap());
    assert_eq!(engine.recovery_report().unwrap().replayed, 2);
}

/// While a claim's work runs, plain checks see the id as marked (as they
/// always did); when the work fails they see it new again, and once a
/// retry succeeds it is marked for good, with a real expiry that a sweep
/// keeps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_checks_see_a_claim_in_flight_as_marked() {
    let engine = engine();
    let guard = Arc::new(IdempotencyGuard::new(engine.clone()));
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let (finish_tx, finish_rx) = tokio::sync::oneshot::channel::<bool>();
    let g = guard.clone();
    let work = tokio::spawn(async move {
        g.process_if_new("order-9", async move {
            started_tx.send(()).unwrap();
            if finish_rx.await.unwrap() {
                Ok(())
            } else {
                Err("declined")
            }
        })
        .await
        .unwrap()
    });
    started_rx.await.unwrap();
    assert!(engine.contains("order-9").unwrap());
    assert_eq!(
        engine.check_and_insert("order-9").unwrap(),
        seen::Verdict::Duplicate
    );
    finish_tx.send(false).unwrap();
    assert_eq!(work.await.unwrap(), Outcome::Failed("declined"));
    assert!(!engine.contains("order-9").unwrap(), "released");
    let again = guard
        .process_if_new("order-9", async { Ok::<_, ()>(7) })
        .await
        .unwrap();
    assert_eq!(again, Outcome::Success(7));
    engine.expire_now();
    assert!(
        engine.contains("order-9").unwrap(),
        "a settled mark is live, not in flight"
    );
    assert_eq!(
        guard
            .process_if_new("order-9", async { Ok::<_, ()>(8) })
            .await
            .unwrap(),
        Outcome::AlreadyProcessed
    );
}

/// `Engine::forget` of an id whose work is still running: the forget wins,
/// in memory and after a restart (the work's commit, which logs its mark
/// after the forget was logged, must not bring the id back on replay).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forget_during_the_work_stays_forgotten_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let open = || {
        Arc::new(
            Engine::builder()
                .durability(Durability::Sync)
                .open(dir.path())
                .unwrap(),
        )
    };
    {
        let guard = IdempotencyGuard::new(open());
        let engine = guard.engine().clone();
        let outcome = guard
            .process_if_new("refund-7", async {
                assert!(engine.forget("refund-7").unwrap(), "in flight: forgettable");
                Ok::<_, String>(())
            })
            .await
            .unwrap();
        assert!(matches!(outcome, Outcome::Success(())), "{outcome:?}");
        assert!(!engine.contains("refund-7").unwrap(), "forgotten in memory");
    }
    let engine = open();
    assert!(
        !engine.contains("refund-7").unwrap(),
        "forgotten after a restart"
    );
}
