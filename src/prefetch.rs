//! A software prefetch hint: lets the batch path overlap the cache misses
//! of many independent probes (memory-level parallelism).

/// Hint that the cache line at `ptr` will be read soon. Never faults.
#[inline(always)]
#[allow(unsafe_code)]
pub(crate) fn prefetch_read(ptr: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 is a hint; it never dereferences architecturally
    // and never faults, whatever the address. SSE is baseline on x86_64.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(ptr.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = ptr;
}
