//! Handing the allocator's free memory back to the system after large, rare
//! work: building, replacing and snapshotting a registry.
//!
//! mimalloc returns freed pages to the system only after a delay, and only
//! when a thread that holds them allocates again. The blocking threads that
//! parse a 100,000-token document and build its registry go idle right
//! after, so without this the transient memory of every reload stays
//! resident (about 240 MiB instead of 70 MiB with 100,000 tokens; see
//! BENCHMARKS.md, "Memory after reloads").

/// Returns the memory mimalloc holds free to the system now. Cheap next to
/// the work it follows (a walk of the calling thread's heap and the arenas).
pub fn release_free_memory() {
    // SAFETY: `mi_collect` takes no pointer and has no precondition. When
    // mimalloc is not the global allocator (tests), it has nothing to free.
    unsafe { libmimalloc_sys::mi_collect(true) }
}
