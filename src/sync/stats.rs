//! The node's counters, shown on `/status` and `/metrics`.

use std::sync::atomic::AtomicU64;

/// Counters exposed on `/status` and `/metrics`.
#[derive(Default)]
pub struct Stats {
    pub chunk_bytes_sent: AtomicU64,
    pub chunk_bytes_received: AtomicU64,
    pub files_applied: AtomicU64,
    pub conflicts: AtomicU64,
    pub rejected_chunks: AtomicU64,
    pub local_changes_published: AtomicU64,
    /// Names added, changed or deleted by local scans (never by applying a peer's change).
    pub local_changes: AtomicU64,
    /// Narrow scans started by the file watcher.
    pub watch_scans: AtomicU64,
    /// Whole-volume rescans because watcher events were lost.
    pub watch_rescans: AtomicU64,
}
