//! Fault injection: a node that misbehaves on purpose, for tests of its peers.

use std::net::SocketAddr;
use std::time::Duration;

use crate::ids::NodeId;
use crate::protocol::Response;

/// Fault injection for tests of the *other* side: a node told to misbehave, so that its
/// peers' defences can be checked against a real process. Set from the environment
/// (`SHOAL_FAULT_CORRUPT_CHUNKS=1`, `SHOAL_FAULT_HOSTILE_NAMES=1`,
/// `SHOAL_FAULT_WATCH_QUEUE=N`, `SHOAL_FAULT_CLAIM_NODE_ID=HEX`,
/// `SHOAL_FAULT_CRASH_BEFORE_INDEXING=1`, `SHOAL_FAULT_CRASH_AFTER_MOVE_ASIDE=1`,
/// `SHOAL_FAULT_PAUSE_BEFORE_DELETES_MS=N`, `SHOAL_FAULT_PAUSE_BEFORE_REMOVING_MS=N`,
/// `SHOAL_FAULT_HOLD_CONNECTIONS_MS=N`, `SHOAL_FAULT_PAUSE_BEFORE_STAGING_MS=N` (with
/// `SHOAL_FAULT_PAUSE_STAGING_PEER=ADDR`),
/// `SHOAL_FAULT_SLICE_NAMES=N`, `SHOAL_FAULT_SLOW_FIRST_SCAN_MS=N`); never
/// set in production.
#[derive(Clone, Copy, Debug, Default)]
pub struct Faults {
    /// Flip a byte of every chunk sent.
    pub corrupt_chunks: bool,
    /// Answer every entry listing with names that try to leave the volume.
    pub hostile_names: bool,
    /// Shrink the file watcher's event queue, so that a burst overflows it as the
    /// kernel's queue overflows under load.
    pub watch_queue: Option<usize>,
    /// Claim this node id in `Hello` (another node's, say) instead of our own.
    pub claim_node_id: Option<NodeId>,
    /// Die (exit status 99, no cleanup) right after renaming the first batch of received
    /// files into place, before indexing them: the crash that `kill -9` can only hit
    /// by chance.
    pub crash_before_indexing: bool,
    /// Die (exit status 99) right after moving our losing version of a conflict aside
    /// as its conflict copy, before the winner is fetched: the name is empty on disk
    /// and the copy not yet seen by any scan.
    pub crash_after_move_aside: bool,
    /// Wait this long in every pull round between taking the files and applying the
    /// deletes (the volume lock not held): widens the window in which a scan runs while
    /// a round is half applied, which a busy node hits only by chance.
    pub pause_before_deletes: Option<Duration>,
    /// Wait this long between checking that files are unchanged here and removing them
    /// (a round's deletes) or replacing them (each received file): widens the window in
    /// which a local write lands on a file sync is about to remove or replace.
    pub pause_before_removing: Option<Duration>,
    /// Wait this long after each connection to a peer is made (its `Hello` answered)
    /// before using it: widens the window in which this node's connection to a peer is
    /// being opened while the peer's own connection to it is up, which a reconnect hits
    /// only by chance.
    pub hold_connections: Option<Duration>,
    /// Wait this long before staging each batch of files a pull round decided on (the
    /// volume lock not held), in rounds with `pause_staging_peer` only, if set: widens
    /// the window in which another peer's round places the same name first, which
    /// only a round that waits for a full batch hits by chance.
    pub pause_before_staging: Option<Duration>,
    pub pause_staging_peer: Option<SocketAddr>,
    /// Heartbeat slices of at least this many names instead of
    /// [`crate::scan::slices::MIN_SLICE_NAMES`]: a small volume rescanned a slice at a
    /// time, as only a large one is otherwise.
    pub slice_names: Option<u64>,
    /// Make the scan at start publish what it has read at every chance (each directory,
    /// each file hashed) and wait this long after each: a first scan that lasts, as
    /// one of a large volume does, with peers pulling from it meanwhile.
    pub slow_first_scan: Option<Duration>,
}

impl Faults {
    pub fn from_env() -> Self {
        let set = |name: &str| std::env::var_os(name).is_some_and(|v| v == "1");
        fn parsed<T: std::str::FromStr>(name: &str) -> Option<T> {
            std::env::var(name).ok().and_then(|v| v.parse().ok())
        }
        let millis = |name: &str| parsed(name).map(Duration::from_millis);
        let faults = Faults {
            corrupt_chunks: set("SHOAL_FAULT_CORRUPT_CHUNKS"),
            hostile_names: set("SHOAL_FAULT_HOSTILE_NAMES"),
            watch_queue: parsed("SHOAL_FAULT_WATCH_QUEUE"),
            claim_node_id: std::env::var("SHOAL_FAULT_CLAIM_NODE_ID")
                .ok()
                .and_then(|v| u64::from_str_radix(&v, 16).ok())
                .map(NodeId),
            crash_before_indexing: set("SHOAL_FAULT_CRASH_BEFORE_INDEXING"),
            crash_after_move_aside: set("SHOAL_FAULT_CRASH_AFTER_MOVE_ASIDE"),
            pause_before_deletes: millis("SHOAL_FAULT_PAUSE_BEFORE_DELETES_MS"),
            pause_before_removing: millis("SHOAL_FAULT_PAUSE_BEFORE_REMOVING_MS"),
            hold_connections: millis("SHOAL_FAULT_HOLD_CONNECTIONS_MS"),
            pause_before_staging: millis("SHOAL_FAULT_PAUSE_BEFORE_STAGING_MS"),
            pause_staging_peer: parsed("SHOAL_FAULT_PAUSE_STAGING_PEER"),
            slice_names: parsed("SHOAL_FAULT_SLICE_NAMES"),
            slow_first_scan: millis("SHOAL_FAULT_SLOW_FIRST_SCAN_MS"),
        };
        if faults.corrupt_chunks
            || faults.hostile_names
            || faults.watch_queue.is_some()
            || faults.claim_node_id.is_some()
            || faults.crash_before_indexing
            || faults.crash_after_move_aside
            || faults.pause_before_deletes.is_some()
            || faults.pause_before_removing.is_some()
            || faults.hold_connections.is_some()
            || faults.pause_before_staging.is_some()
            || faults.slice_names.is_some()
            || faults.slow_first_scan.is_some()
        {
            tracing::warn!(
                ?faults,
                "FAULT INJECTION ENABLED: this node misbehaves on purpose (testing only)"
            );
        }
        faults
    }

    /// How long a round with `peer` waits before staging a batch
    /// ([`Faults::pause_before_staging`]).
    pub fn staging_pause(&self, peer: SocketAddr) -> Option<Duration> {
        self.pause_before_staging
            .filter(|_| self.pause_staging_peer.is_none_or(|p| p == peer))
    }

    /// Makes an answer wrong in the ways this node is told to misbehave: entry names
    /// that try to leave the volume, chunks with a flipped byte.
    pub fn tamper(&self, response: &mut Response) {
        match response {
            Response::Entries { entries, .. } if self.hostile_names => {
                for entry in entries {
                    entry.name = if entry.name.len() % 2 == 0 {
                        b"../../etc/passwd".to_vec()
                    } else {
                        b"/abs".to_vec()
                    };
                }
            }
            Response::Chunk { data, .. } if self.corrupt_chunks && !data.is_empty() => {
                let mut wrong = data.to_vec();
                wrong[0] ^= 0xff;
                *data = wrong.into();
            }
            _ => {}
        }
    }
}
