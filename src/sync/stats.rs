//! The node's counters: one table (the `counters!` call below) from which the live counters
//! ([`Stats`]), `/status`'s totals ([`Totals`]) and `/metrics` (each counter's name and
//! help, [`Totals::metrics`]) all come.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

macro_rules! counters {
    ($($name:ident: $help:literal,)*) => {
        /// The node's counters, updated where things happen.
        #[derive(Default)]
        pub struct Stats {
            $(#[doc = $help] pub $name: AtomicU64,)*
        }

        /// The counters at one moment (`/status`'s `totals`).
        #[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
        pub struct Totals {
            $(#[doc = $help] pub $name: u64,)*
        }

        impl Stats {
            pub fn totals(&self) -> Totals {
                Totals {
                    $($name: self.$name.load(Ordering::Relaxed),)*
                }
            }
        }

        impl Totals {
            /// Each counter as `/metrics` shows it: name (between `shoal_` and `_total`), help
            /// text and value, in the table's order.
            pub fn metrics(&self) -> Vec<(&'static str, &'static str, u64)> {
                vec![$((stringify!($name), $help, self.$name),)*]
            }
        }
    };
}

counters! {
    chunk_bytes_sent: "Chunk bytes sent to peers",
    chunk_bytes_received: "Chunk bytes received from peers",
    files_applied: "Files, directories and symlinks applied from peers",
    conflicts: "Concurrent changes resolved with a conflict copy",
    rejected_chunks: "Chunks whose bytes did not match their id",
    local_changes_published: "Local changes announced to peers",
    local_changes: "Names added, changed or deleted by local scans",
    watch_scans: "Narrow scans started by the file watcher",
    watch_echoes: "Names the file watcher saw change that were still as a pull had just written them (not scanned)",
    watch_rescans: "Whole-volume rescans because file watcher events were lost",
    feed_changes: "Entries received through peers' change feeds",
    feed_rounds: "Pull rounds that followed a peer's change feed instead of walking the tree",
    feed_fallbacks: "Pull rounds that walked the tree because a peer's change feed no longer reached back to this node's mark",
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_and_metrics_come_from_the_same_counters() {
        let stats = Stats::default();
        stats.files_applied.fetch_add(3, Ordering::Relaxed);
        stats.watch_rescans.fetch_add(1, Ordering::Relaxed);
        let totals = stats.totals();
        assert_eq!((totals.files_applied, totals.watch_rescans), (3, 1));
        let metrics = totals.metrics();
        assert_eq!(metrics.len(), 13);
        assert!(metrics.contains(&(
            "files_applied",
            "Files, directories and symlinks applied from peers",
            3
        )));
        let json = serde_json::to_value(&totals).unwrap();
        for (name, _, value) in metrics {
            assert_eq!(json[name], value, "{name}");
        }
    }
}
