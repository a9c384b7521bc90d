//! Time sources. The set never reads the system clock directly: it asks a
//! [`Clock`], so tests drive time by hand and never sleep.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A source of wall-clock time in whole seconds since the Unix epoch.
///
/// Wall-clock (not monotonic) time because expiry instants are persisted and
/// must mean the same thing after a restart.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// Seconds since 1970-01-01T00:00:00Z.
    fn now_unix_secs(&self) -> u64;
}

/// The operating system's real-time clock, read through the coarse
/// (vDSO, no syscall) variant: TTLs have one-second resolution, so the
/// coarse clock's few milliseconds of granularity cost nothing and save
/// ~20 ns per event.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[inline]
    fn now_unix_secs(&self) -> u64 {
        coarse_realtime_secs()
    }
}

#[cfg(target_os = "linux")]
#[inline]
#[allow(unsafe_code)]
fn coarse_realtime_secs() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_REALTIME_COARSE
    // exists on every Linux since 2.6.32 and the call only writes `ts`.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) };
    if rc == 0 && ts.tv_sec >= 0 {
        ts.tv_sec as u64
    } else {
        precise_realtime_secs()
    }
}

#[cfg(not(target_os = "linux"))]
#[inline]
fn coarse_realtime_secs() -> u64 {
    precise_realtime_secs()
}

fn precise_realtime_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A clock that only moves when told to. For tests and simulations.
#[derive(Debug)]
pub struct ManualClock {
    secs: AtomicU64,
}

impl ManualClock {
    /// A clock standing at `unix_secs`.
    pub fn new(unix_secs: u64) -> Self {
        ManualClock {
            secs: AtomicU64::new(unix_secs),
        }
    }
    /// Move the clock forward.
    pub fn advance(&self, by: Duration) {
        self.secs.fetch_add(by.as_secs(), Ordering::SeqCst);
    }
    /// Set the clock to `unix_secs` (may go backwards, like a real clock can).
    pub fn set(&self, unix_secs: u64) {
        self.secs.store(unix_secs, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_unix_secs(&self) -> u64 {
        self.secs.load(Ordering::SeqCst)
    }
}

impl<C: Clock + ?Sized> Clock for std::sync::Arc<C> {
    fn now_unix_secs(&self) -> u64 {
        (**self).now_unix_secs()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_clock_is_close_to_std() {
        let ours = SystemClock.now_unix_secs();
        let std = precise_realtime_secs();
        assert!(ours.abs_diff(std) <= 1, "{ours} vs {std}");
    }

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = ManualClock::new(1_700_000_000);
        assert_eq!(c.now_unix_secs(), 1_700_000_000);
        c.advance(Duration::from_secs(5));
        assert_eq!(c.now_unix_secs(), 1_700_000_005);
        c.set(10);
        assert_eq!(c.now_unix_secs(), 10);
    }
}
