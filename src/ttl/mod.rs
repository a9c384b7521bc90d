//! Time-to-live: the tick scale, and when expired entries are reclaimed.
//!
//! # How expiry works
//!
//! Every entry in the set carries its own expiry instant (a [`Tick`], held
//! in a slot as 29 bits of seconds from the set's start). A lookup compares it with the current tick, so an
//! expired entry is *logically* gone the moment its time passes, whatever
//! the reclaimer is doing. That keeps answers exact without any per-key
//! timer structure (a timer-wheel node per key would cost more memory than
//! the key itself).
//!
//! *Physical* reclamation is the job of the sweep, on the
//! [`SweepSchedule`]: at most once per `sweep_interval` (default TTL/16,
//! clamped to 1 s ..= 60 s) it looks at each shard whose earliest expiry
//! has passed, and rebuilds it without its dead entries when that is
//! worth it: when a quarter of its slots are reclaimable, or when every
//! entry its last rebuild copied has expired. Each rebuild remembers how
//! many entries it copied per eighth of their remaining lifetimes, so the
//! sweep knows what has expired since without scanning the table. A
//! rebuild thus always frees a good part of what it copies, and a key is
//! copied a few times in its life (about three under steady traffic)
//! whatever the TTL — O(1) amortised work per key, like a timing wheel.
//! (Rebuilding every shard with anything expired at each interval, as
//! before, copied a key TTL / interval times: 60 with the default 1 h TTL.)
//! An expired entry stays resident until its shard's rebuild, and
//! [`crate::Engine::expire_now`] rebuilds every shard at once.

pub mod clock;

use std::time::Duration;

/// Seconds since [`Tick::EPOCH_UNIX_SECS`], in 31 bits (until the year 2088).
///
/// Tick 1 means "dead" (a forgotten entry); 0 is reserved by the set, and
/// so are the two ticks above [`Tick::MAX`] (a claim whose work is still
/// running, later than any real instant). Real instants are clamped to
/// `2..=Tick::MAX`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Tick(pub u32);

impl Tick {
    /// 2020-01-01T00:00:00Z.
    pub const EPOCH_UNIX_SECS: u64 = 1_577_836_800;
    /// Largest representable instant (2088-01-19).
    pub const MAX: Tick = Tick((1 << 31) - 3);
    /// Marks a forgotten entry; earlier than every real instant.
    pub const DEAD: Tick = Tick(1);
    /// Earliest real instant.
    pub const MIN_LIVE: Tick = Tick(2);

    /// The tick of a Unix time, clamped into range.
    pub fn from_unix_secs(secs: u64) -> Tick {
        let t = secs.saturating_sub(Self::EPOCH_UNIX_SECS);
        Tick(t.clamp(Self::MIN_LIVE.0 as u64, Self::MAX.0 as u64) as u32)
    }

    /// The Unix time of this tick.
    pub fn to_unix_secs(self) -> u64 {
        self.0 as u64 + Self::EPOCH_UNIX_SECS
    }

    /// This instant plus `ttl`, saturating at [`Tick::MAX`].
    pub fn plus(self, ttl: Duration) -> Tick {
        let t = (self.0 as u64).saturating_add(ttl.as_secs());
        Tick(t.min(Self::MAX.0 as u64) as u32)
    }
}

/// When shards get swept for expired entries.
#[derive(Clone, Copy, Debug)]
pub struct SweepSchedule {
    /// Minimum time between two sweeps of one shard.
    pub interval: Duration,
}

impl SweepSchedule {
    /// The default schedule for a TTL: TTL/16, clamped to 1 s ..= 60 s.
    pub fn for_ttl(ttl: Duration) -> Self {
        let interval = (ttl / 16).clamp(Duration::from_secs(1), Duration::from_secs(60));
        SweepSchedule { interval }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_conversion_clamps() {
        assert_eq!(Tick::from_unix_secs(0), Tick::MIN_LIVE);
        assert_eq!(Tick::from_unix_secs(Tick::EPOCH_UNIX_SECS + 100), Tick(100));
        assert_eq!(Tick::from_unix_secs(u64::MAX), Tick::MAX);
        assert_eq!(Tick(100).to_unix_secs(), Tick::EPOCH_UNIX_SECS + 100);
        assert_eq!(Tick(100).plus(Duration::from_secs(5)), Tick(105));
        assert_eq!(Tick(100).plus(Duration::MAX), Tick::MAX);
    }

    #[test]
    fn sweep_interval_is_a_sixteenth_of_ttl_within_bounds() {
        assert_eq!(
            SweepSchedule::for_ttl(Duration::from_secs(3600)).interval,
            Duration::from_secs(60)
        );
        assert_eq!(
            SweepSchedule::for_ttl(Duration::from_secs(160)).interval,
            Duration::from_secs(10)
        );
        assert_eq!(
            SweepSchedule::for_ttl(Duration::from_secs(3)).interval,
            Duration::from_secs(1)
        );
    }
}
