//! The allocator's tuning: large blocks in their own mappings, freed memory handed back.
//!
//! Raw libc on purpose: mallopt and malloc_trim are glibc's own knobs, and no
//! maintained crate wraps them (nix does not; the allocator crates replace
//! malloc instead of tuning it).

/// The index's arenas and maps grow by doubling, and start-up and reconcile
/// passes build large tables they drop again. glibc serves such blocks from the
/// heap once its threshold has adapted upwards (up to 32 MiB), and a freed block
/// then stays resident wherever a live one sits above it: measured at 100k
/// IPs (before the index had its hash maps), 184 bytes of RSS per IP instead
/// of 50. A fixed threshold keeps every
/// block of 64 KiB or more in its own mapping, returned whole on free (and
/// grown with mremap, without copying).
pub fn return_large_blocks_on_free() {
    // SAFETY: mallopt only changes the allocator's tuning (under its own lock).
    if unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 64 * 1024) } != 1 {
        log::warn!("could not set the malloc mmap threshold; freed memory may stay resident");
    }
}

/// Start-up and every reconcile pass build large short-lived tables (the
/// kernel's records, tallies); glibc keeps such freed memory in the heap, where
/// it would count as the agent's for good. Hand it back.
pub fn release_freed_memory() {
    // SAFETY: malloc_trim only releases free heap memory; it has no preconditions.
    unsafe { libc::malloc_trim(0) };
}
