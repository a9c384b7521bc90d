//! Atomics used by the lock-free set, swapped for loom's under `--cfg seen_loom`
//! so the insert protocol can be model-checked (see `src/set/loom_tests.rs`, run by `.ci/run` with `RUSTFLAGS="--cfg seen_loom"`).

#[cfg(seen_loom)]
pub(crate) use loom::sync::atomic;
#[cfg(not(seen_loom))]
pub(crate) use std::sync::atomic;

/// Spin briefly, then yield: used only while another thread finishes a
/// two-instruction publish (claim a slot, then write its second word).
#[inline]
pub(crate) fn backoff(spins: &mut u32) {
    #[cfg(seen_loom)]
    {
        let _ = spins;
        loom::thread::yield_now();
    }
    #[cfg(not(seen_loom))]
    {
        *spins += 1;
        if *spins < 64 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}
