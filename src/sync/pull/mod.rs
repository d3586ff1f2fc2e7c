//! The pulling half of sync: make this node's volume include what a peer has.
//!
//! 0. On a peer's announcement, follow its change feed ([`feed`]) from the mark this
//!    node applied last: only the names changed since, decided as in step 3. A peer of
//!    an earlier release, a first round, a feed that no longer reaches back that far
//!    and every heartbeat's round (the anti-entropy backstop) go on with the walk.
//! 1. Compare roots: equal roots end the round (one request per volume when converged).
//! 2. Walk only what differs: for each directory, fetch the peer's page list and only
//!    the pages whose (first name, hash) we do not have; recurse into child directories
//!    whose tree hashes differ.
//! 3. Decide each name with version vectors: the peer's version dominates -> take it;
//!    ours dominates or is equal -> keep ours; concurrent -> [`super::conflict`].
//! 4. Take files: fetch the chunk list, reuse every chunk held locally (a rename moves no
//!    chunk bytes), fetch the rest from the peers that share the volume (spread over
//!    them, each chunk checked against its BLAKE3 id), assemble in staging, then publish
//!    a batch: the files flushed (an `fsync` each for a few, one `syncfs` for many),
//!    atomic renames, directory fsyncs, one durable index write. The next batch is
//!    staged on a task of its own meanwhile, and the walk goes on to fill the one after,
//!    also while the batch's directories are synced and its index written (it shares
//!    the volume lock the batch holds until then).
//!    Other names of a hard-linked file are linked to their group's leader once the
//!    round's files are in: transferred once, one inode as on the peer.
//! 5. Before a file is replaced or deleted, the version there is kept ([`keep`]): its
//!    chunks the new content lacks go into a version pack, made durable before the old
//!    bytes are gone, and its record is written with the change's own index write.
//! 6. Deletes run last, deepest first, so content that moved elsewhere in the same round
//!    is still there to be reused; a local file changed since the last scan is never
//!    overwritten or deleted (the next scan indexes it and it syncs as a change).
//! 7. Every directory the round changed gets back the mtime its entry records (applying
//!    its children moved it).
//!
//! The volume lock (which a scan holds too) is never held while waiting on the network:
//! a peer that stops answering must not stall the scans of this node, nor its pulls from
//! other peers. Answers are fetched first; the lock is taken only to decide and apply
//! what they bring (one answer's entries, one publish batch, the deletes, the tree
//! update). What was decided under one hold is checked again under the next (the local
//! entry a file replaces must still be the one it was decided against), so a scan or
//! another peer's pull in between is never overwritten.

mod apply;
mod decide;
mod feed;
mod files;
mod keep;
mod links;
mod walk;

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use s2n_quic::connection::Handle;

use super::{Node, Peer, SyncError};
use crate::entry::Entry;
use crate::ids::ContentId;
use crate::pathname::{VolPath, escape};
use crate::store::FeedMark;
use crate::tree::TreeNode;
use crate::unsyncable::{Cause, Noted, Origin};
use files::{FileJob, RenameSource, Until};

/// Files made durable and visible together where the open-file limit is low
/// ([`files::Batching`]).
const PUBLISH_BATCH: usize = 256;
/// Memory a round may hold for directories still to compare (their paths): a peer
/// offering directories without end, or a directory of more than about 250,000
/// subdirectories, ends the round here instead of growing without bound (invariant 6).
const MAX_PENDING_BYTES: usize = 32 << 20;

/// What one directory waiting in `Pull::pending` costs: its path and the bookkeeping.
fn pending_cost(path: &VolPath) -> usize {
    path.as_bytes().len() + 64
}

/// Staging names a round remembers as wanted (about 16 bytes each); a round that
/// wanted more reclaims no staging at its end, as it can no longer tell which it wanted.
const MAX_WANTED_STAGING: usize = 100_000;

/// The staging names a round wanted, up to [`MAX_WANTED_STAGING`], each kept as a
/// 64-bit hash of it: the names themselves took some 10 MiB on a round of 100,000 files.
/// A collision only spares a staging file that a later round reclaims.
#[derive(Default)]
struct WantedStaging {
    hasher: RandomState,
    names: HashSet<u64>,
}

impl WantedStaging {
    /// Remembers `name`; `false` if it holds too many already (and remembers nothing).
    fn insert(&mut self, name: &str) -> bool {
        if self.names.len() >= MAX_WANTED_STAGING {
            return false;
        }
        self.names.insert(self.hasher.hash_one(name));
        true
    }

    fn contains(&self, name: &str) -> bool {
        self.names.contains(&self.hasher.hash_one(name))
    }
}

/// Deletes held back until the end of a round (so moved content can be reused); past
/// this many they are applied early.
const MAX_DEFERRED_DELETES: usize = 100_000;

/// What one pull round did.
#[derive(Debug, Default, Clone, Copy)]
pub struct PullReport {
    pub applied: u64,
    pub deleted: u64,
    pub conflicts: u64,
    pub skipped: u64,
    /// The peer's entries left alone because the delete guard holds their names'
    /// deletes here (`crate::guard`).
    pub held: u64,
    /// Files left unfinished because some chunk could not be fetched: worth another
    /// round soon, not a heartbeat away.
    pub incomplete: u64,
    /// Files not fetched because the volume's file system has no room for them: also
    /// worth another round soon (room may come back at any time).
    pub waiting_for_room: u64,
    /// Files fetched but not placed because the index took another version of the name
    /// meanwhile (a round from another peer, a scan): decided again soon. Without
    /// that, a round that followed the feed would move the mark past them, and only the
    /// heartbeat's walk would see that the peer's history is newer.
    pub outdated: u64,
}

impl PullReport {
    pub fn changed(&self) -> bool {
        self.applied + self.deleted + self.conflicts > 0
    }

    /// Files this round left for another round soon, not a heartbeat away (the feed
    /// mark is not moved past them).
    pub fn left_for_soon(&self) -> u64 {
        self.incomplete + self.waiting_for_room + self.outdated
    }
}

/// How a round finds what the peer changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// The peer's change feed from the mark this node applied last, if it has one and
    /// the feed reaches back to it; the walk otherwise.
    Feed,
    /// Compare the roots and walk what differs (the heartbeat's backstop).
    Walk,
}

/// What a round compared with the peer.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// Every name that differs (a walk): what it could not place is the whole list.
    Whole,
    /// Only the names the peer's feed brought.
    Changes,
}

/// Pulls one volume from one peer.
pub async fn pull_volume(
    node: &Arc<Node>,
    peer: &Arc<Peer>,
    volume_index: usize,
    via: Via,
) -> Result<PullReport, SyncError> {
    let handle = peer.connection().ok_or(SyncError::NotConnected)?;
    let volume = &node.volumes[volume_index];
    let mut pull = Pull {
        node: node.clone(),
        peer: peer.clone(),
        handle,
        volume_index,
        deferred: Vec::new(),
        rename_sources: HashMap::new(),
        renames_seen: 0,
        pending: Vec::new(),
        pending_bytes: 0,
        files: Vec::new(),
        flushing: None,
        staging: None,
        indexing: None,
        batching: files::Batching::for_this_process(),
        links: Vec::new(),
        links_waiting: 0,
        report: PullReport::default(),
        waiting: Waiting::default(),
        wanted_staging: Some(WantedStaging::default()),
        applied: Applied::default(),
        unsyncable: Noted::default(),
        moved_dirs: HashSet::new(),
    };
    let origin = Origin::Peer(peer.addr);
    let root_dir = volume.fs.root_path();
    let feed_peer = pull.feed_peer();
    if let (Via::Feed, Some(peer_id)) = (via, feed_peer)
        && let Some(since) = node.store.applied_mark(volume.id, peer_id)?
    {
        match pull.follow_feed(since).await {
            Ok(feed::FeedOutcome::Followed(mark)) => {
                node.stats.feed_rounds.fetch_add(1, Ordering::Relaxed);
                return pull.finish(Ok(()), Scope::Changes, Some(mark)).await;
            }
            Ok(feed::FeedOutcome::Gone) => {
                node.stats.feed_fallbacks.fetch_add(1, Ordering::Relaxed);
                tracing::info!(peer = %peer.addr, volume = %volume.name, "the peer's change feed no longer reaches back to {} (feed {}): walking the tree", since.seq, since.feed);
            }
            Err(e) => return pull.finish(Err(e), Scope::Changes, None).await,
        }
    }
    // Asked before the walk: a complete walk has at least every change up to it.
    let reached = match feed_peer {
        Some(_) => Some(pull.feed_position().await?),
        None => None,
    };
    let Some(remote_root) = pull.get_dir(&VolPath::root()).await? else {
        // The peer has not indexed the volume yet: nothing of it to take.
        peer.sync.round_done(&volume.name, 0, 0);
        volume
            .unsyncable
            .replace(&volume.name, root_dir, origin, Noted::default());
        return Ok(pull.report);
    };
    let local_root = node.store.tree_node(volume.id, &VolPath::root())?;
    let local_totals = local_root.as_ref().map(|n| n.totals).unwrap_or_default();
    if local_root.map(|n| n.sync_hash()) == Some(remote_root.sync_hash()) {
        peer.sync.round_done(&volume.name, 0, 0);
        volume
            .unsyncable
            .replace(&volume.name, root_dir, origin, Noted::default());
        pull.record_mark(reached)?;
        return Ok(pull.report);
    }
    peer.sync
        .round_started(&volume.name, remote_root.totals, local_totals);
    let round = pull.walk_and_take(remote_root).await;
    pull.finish(round, Scope::Whole, reached).await
}

/// Names shown in the log line that sums up a burst of applied changes.
const BURST_NAMES: usize = 5;

/// Changes applied since the last log line: said one line per change when they are
/// few, summed up (count, bytes, the first names) when they come in a burst.
#[derive(Default)]
struct Applied {
    entries: u64,
    bytes: u64,
    /// The first [`BURST_NAMES`] changes: what, the path, its bytes.
    first: Vec<(&'static str, String, u64)>,
}

/// Files of a round that found no room on the volume's file system.
#[derive(Default)]
struct Waiting {
    files: u64,
    bytes: u64,
    /// Bytes free when room was last found short.
    available_bytes: u64,
}

impl Waiting {
    fn add(&mut self, files: u64, bytes: u64) {
        self.files += files;
        self.bytes += bytes;
    }
}

/// A peer's delete this round applies at its end.
struct Deferred {
    dir: VolPath,
    name: Vec<u8>,
    tombstone: Entry,
    /// The peer, when `tombstone` is its entry exactly as sent ([`Pull::sent_by`]).
    sent_by: Option<crate::ids::NodeId>,
}

struct Pull {
    node: Arc<Node>,
    peer: Arc<Peer>,
    handle: Handle,
    volume_index: usize,
    /// Deletes to apply at the end of the round.
    deferred: Vec<Deferred>,
    /// Files among `deferred` that a new file of the same content can take over, by
    /// content id (see [`Pull::find_rename_sources`]).
    rename_sources: HashMap<ContentId, RenameSource>,
    /// How many of `deferred` have been looked at for `rename_sources`.
    renames_seen: usize,
    /// Directories still to compare with the peer's.
    pending: Vec<(VolPath, RemoteDir)>,
    /// What `pending` costs, by [`pending_cost`], bounded by [`MAX_PENDING_BYTES`].
    pending_bytes: usize,
    /// Files decided on but not yet fetched (taken in batches across directories).
    files: Vec<FileJob>,
    /// The last batch fetched, being flushed while the next is fetched
    /// ([`Pull::take_files`]); published before the round's deletes at the latest.
    flushing: Option<files::Flushing>,
    /// The batch being staged while the walk goes on to fill the next one (only where
    /// the open-file limit allows a third batch of staging files: [`files::Batching`]);
    /// published at the round's end at the latest, also after a failure. A round
    /// abandoned drops it: aborted, what it wrote stays in staging, to be resumed.
    staging: Option<Spawned<files::StagedBatch>>,
    /// The last batch published, its directories being synced and its index written
    /// under the volume lock, which the walk shares meanwhile ([`Pull::lock_volume`]).
    indexing: Option<files::Indexing>,
    /// How many files a batch takes, and whether the walk goes on while one stages
    /// (decided once per round).
    batching: files::Batching,
    /// Other names of hard-linked files, linked to their leaders at the end of the round.
    links: Vec<FileJob>,
    /// Of those, how many could not be linked this round.
    links_waiting: u64,
    report: PullReport,
    /// What this round left waiting for room.
    waiting: Waiting,
    /// The staging names of every file this round wanted (reclaiming spares them);
    /// `None` past [`MAX_WANTED_STAGING`] (the round then reclaims nothing).
    wanted_staging: Option<WantedStaging>,
    /// Changes applied and not logged yet.
    applied: Applied,
    /// Names of the peer's this node's file system refused (see [`crate::unsyncable`]).
    unsyncable: Noted,
    /// Directories whose mtime applying moved since the last release of the volume
    /// lock (an entry made, replaced or removed in them): each release puts back only
    /// theirs ([`Pull::restore_moved_dir_mtimes`]), not every directory the round
    /// marked dirty so far, which made a round quadratic in its directories. Emptied at
    /// every release, so it holds at most one answer's or one batch's directories.
    moved_dirs: HashSet<VolPath>,
}

/// What the peer has at a directory still to compare.
enum RemoteDir {
    /// A directory: its tree node is asked for when its turn comes.
    Present,
    /// Nothing live (the peer deleted it): all its entries are compared.
    Deleted,
}

impl Pull {
    fn volume(&self) -> &super::Volume {
        &self.node.volumes[self.volume_index]
    }

    /// The volume lock, to decide and apply a peer's answer under: shared with this
    /// round's batch being indexed while it holds the lock (scans and other pulls stay
    /// out all the same), taken otherwise. Held until every holder drops it. The batch's
    /// names are decided already; one decided again (a feed round that brings a name
    /// twice) is checked at its own publish, which refuses it as changed here.
    async fn lock_volume(&self) -> Arc<tokio::sync::OwnedMutexGuard<()>> {
        if let Some(shared) = self
            .indexing
            .as_ref()
            .and_then(files::Indexing::shared_lock)
        {
            return shared;
        }
        Arc::new(self.volume().lock.clone().lock_owned().await)
    }

    /// Ends a round that `round` says how it went: the deletes (deepest first), the
    /// directories' mtimes, the log, the names this node could not place, the tree;
    /// then, if it left nothing to fetch, the peer's feed mark it reached.
    async fn finish(
        mut self,
        round: Result<(), SyncError>,
        scope: Scope,
        reached: Option<FeedMark>,
    ) -> Result<PullReport, SyncError> {
        // The batches still staging or flushing go in first, whatever became of the round.
        let round = match self.settle_batches().await {
            Ok(()) => round,
            Err(e) => round.and(Err(e)),
        };
        if let Some(pause) = self.node.faults.pause_before_deletes {
            tokio::time::sleep(pause).await;
        }
        let node = self.node.clone();
        let volume = &node.volumes[self.volume_index];
        let _guard = volume.lock.lock().await;
        let round = match round {
            Ok(()) => self.apply_deletes(),
            failed => failed,
        };
        // Also after a failed round: what it did apply keeps its directories' mtimes.
        self.restore_dir_mtimes()?;
        self.log_applied();
        // A complete walk went to every name that differs: what it could not place is
        // the whole list from this peer. A round cut short, or one that followed the
        // feed, only adds to the last one.
        let refused = std::mem::take(&mut self.unsyncable);
        let (root_dir, origin) = (volume.fs.root_path(), Origin::Peer(self.peer.addr));
        match (&round, scope) {
            (Ok(()), Scope::Whole) => {
                volume
                    .unsyncable
                    .replace(&volume.name, root_dir, origin, refused)
            }
            _ => volume
                .unsyncable
                .add(&volume.name, root_dir, origin, refused),
        }
        round?;
        crate::tree::update(&node.store, volume.id)?;
        self.settle_room();
        if self.links_waiting == 0 {
            // Every hard-linked name this node took is linked: groups on disk are whole.
            volume.links_pending.store(false, Ordering::Relaxed);
        }
        let report = self.report;
        let left = report.left_for_soon();
        self.peer
            .sync
            .round_done(&volume.name, left, self.waiting.bytes);
        if left == 0 {
            self.record_mark(reached)?;
        }
        Ok(report)
    }

    /// Records that this node has applied the peer's feed up to `mark`, once what it
    /// applied is durable: a crash must not leave a mark past a change it lost.
    fn record_mark(&self, mark: Option<FeedMark>) -> Result<(), SyncError> {
        let (Some(mark), Some(peer)) = (mark, self.peer.node_id()) else {
            return Ok(());
        };
        let vol = self.volume().id;
        if self.node.store.applied_mark(vol, peer)? == Some(mark) {
            return Ok(());
        }
        self.node.store.sync()?;
        self.node.store.set_applied_mark(vol, peer, mark)?;
        Ok(())
    }

    /// Queues a file to fetch (and counts it in the round's progress).
    fn queue_file(&mut self, job: FileJob) {
        self.peer.sync.found(&self.volume().name, 1, job.size());
        self.files.push(job);
    }

    /// Notes one applied change (`what`: "file", "dir", "deleted"...) of `path`, `bytes`
    /// of file content, for the round's progress and the log.
    fn note_applied(&mut self, what: &'static str, path: String, bytes: u64) {
        self.peer.sync.applied(&self.volume().name, 1, bytes);
        self.node
            .recent_changes
            .note(crate::sync::state::AppliedChange {
                time: crate::sync::state::rfc3339(std::time::SystemTime::now()),
                volume: self.volume().name.clone(),
                peer: self.peer.addr.to_string(),
                what: what.to_string(),
                path: path.clone(),
                bytes,
            });
        self.applied.entries += 1;
        self.applied.bytes += bytes;
        if self.applied.first.len() < BURST_NAMES {
            self.applied.first.push((what, path, bytes));
        }
    }

    /// Handles what placing `dir/name` ended with: a refusal of the name by this node's
    /// file system (see [`SyncError::refusal`]) is noted for `/status` and the round
    /// goes on; any other error ends the round.
    fn placed(
        &mut self,
        dir: &VolPath,
        name: &[u8],
        result: Result<(), SyncError>,
    ) -> Result<(), SyncError> {
        let Err(error) = result else {
            return Ok(());
        };
        let Some(cause) = error.refusal() else {
            return Err(error);
        };
        let mut path = dir.as_bytes().to_vec();
        if !dir.is_root() {
            path.push(b'/');
        }
        path.extend_from_slice(name);
        let os_error = error
            .os_error()
            .map_or_else(|| error.to_string(), |e| e.to_string());
        let reason = match cause {
            Cause::PathTooLong => format!(
                "this file system refuses a name or path this long ({} bytes: {os_error})",
                path.len()
            ),
            Cause::NameRefused => format!("this file system refuses the name ({os_error})"),
            Cause::TypeNotSupported => error.to_string(),
            Cause::NotPermitted => {
                let root = self.volume().fs.root_path();
                format!(
                    "this node (uid {}) may not make or change it ({os_error}): fix the owner, mode or attributes (lsattr) of its directory {} or of {} itself",
                    rustix::process::geteuid().as_raw(),
                    dir.under(root).display(),
                    root.join(std::ffi::OsStr::from_bytes(&path)).display(),
                )
            }
        };
        self.unsyncable.note(escape(&path), cause, reason);
        self.report.skipped += 1;
        Ok(())
    }

    /// Logs the changes applied since the last call: each one, or a burst's summary.
    fn log_applied(&mut self) {
        let applied = std::mem::take(&mut self.applied);
        let (peer, volume) = (self.peer.addr, &self.volume().name);
        if applied.entries as usize <= BURST_NAMES {
            for (what, path, bytes) in applied.first {
                tracing::info!(%peer, %volume, %path, bytes, "applied {what} {path}");
            }
            return;
        }
        let names: Vec<&str> = applied.first.iter().map(|(_, p, _)| p.as_str()).collect();
        let more = applied.entries - names.len() as u64;
        tracing::info!(
            %peer, %volume, entries = applied.entries, bytes = applied.bytes,
            "applied {} changes ({}): {} and {more} more",
            applied.entries, crate::space::Size(applied.bytes), names.join(", ")
        );
    }

    /// Walks what differs and takes the files decided on (the deletes wait for the end
    /// of the round, under the volume lock).
    async fn walk_and_take(&mut self, remote_root: TreeNode) -> Result<(), SyncError> {
        self.sync_dir(&VolPath::root(), Some(remote_root), None)
            .await?;
        self.drain_pending().await?;
        self.take_files(Until::All).await?;
        self.link_names().await
    }

    /// Compares every directory queued with the peer's (and those they queue).
    async fn drain_pending(&mut self) -> Result<(), SyncError> {
        let mut ahead = walk::Lookahead::default();
        loop {
            self.ask_ahead(&mut ahead)?;
            let Some((dir, remote)) = self.pending.pop() else {
                break;
            };
            self.pending_bytes -= pending_cost(&dir);
            let asked = ahead.take(&dir);
            let remote = match asked {
                // Asked ahead for all of its entries: nothing to compare pages with.
                Some(_) => None,
                None => match remote {
                    RemoteDir::Present if !self.has_tree_node(&dir)? => None,
                    // The peer's tree node is asked for only now: the directories
                    // waiting hold a path each, not a tree node of up to a frame's size.
                    RemoteDir::Present => self.get_dir(&dir).await?,
                    RemoteDir::Deleted => None,
                },
            };
            self.sync_dir(&dir, remote, asked).await?;
        }
        Ok(())
    }

    /// Whether this node has a tree node for `dir`. One it has none of (new here) has
    /// no pages to compare: all of its entries are listed, and the peer's tree node
    /// would cost a round trip for nothing.
    fn has_tree_node(&self, dir: &VolPath) -> Result<bool, SyncError> {
        Ok(self.node.store.tree_node(self.volume().id, dir)?.is_some())
    }

    /// Asks the peer now for the first entries of the next directories to compare whose
    /// entries are all listed (new here, or deleted there), up to
    /// [`walk::LOOKAHEAD`] at a time: their answers travel while this node decides and
    /// applies the one before, instead of a round trip each after it.
    fn ask_ahead(&mut self, ahead: &mut walk::Lookahead) -> Result<(), SyncError> {
        for (dir, remote) in self.pending.iter().rev() {
            if ahead.is_full() {
                break;
            }
            if ahead.has(dir) {
                continue;
            }
            let whole = match remote {
                RemoteDir::Deleted => true,
                RemoteDir::Present => !self.has_tree_node(dir)?,
            };
            if !whole {
                // Its tree node comes first: nothing to ask ahead for; the rest wait.
                break;
            }
            let request = walk::whole_listing(&self.volume().name, dir);
            ahead.ask(dir.clone(), self.handle.clone(), request);
        }
        Ok(())
    }

    /// Queues directory `path` to compare later, within the round's budget.
    fn queue_dir(&mut self, path: VolPath, remote: RemoteDir) -> Result<(), SyncError> {
        self.pending_bytes += pending_cost(&path);
        if self.pending_bytes > MAX_PENDING_BYTES {
            return Err(SyncError::OverBudget(format!(
                "the round holds more than {} MiB of directories still to compare; it ends here, and what it applied stays",
                MAX_PENDING_BYTES >> 20
            )));
        }
        self.pending.push((path, remote));
        Ok(())
    }

    /// At the end of a complete round: reports whether files waited for room, and if
    /// they did, reclaims the staging files that no transfer fills now and that this
    /// round did not want (their names are gone, or hold newer content, on the peer).
    fn settle_room(&mut self) {
        let volume = &self.node.volumes[self.volume_index];
        self.report.waiting_for_room = self.waiting.files;
        if self.waiting.files == 0 {
            volume.room.note_round(&volume.name, self.peer.addr, None);
            return;
        }
        let mut reclaimed = (0u64, 0u64);
        let wanted = self.wanted_staging.as_ref();
        for name in volume.fs.staging_files() {
            if wanted.is_none_or(|w| w.contains(&name)) || volume.room.in_use(&name) {
                continue;
            }
            match volume.fs.remove_staged(&name) {
                Ok(bytes) => reclaimed = (reclaimed.0 + 1, reclaimed.1 + bytes),
                Err(e) => tracing::warn!(volume = %volume.name, "cannot reclaim staging: {e}"),
            }
        }
        if reclaimed.0 > 0 {
            tracing::info!(volume = %volume.name, files = reclaimed.0, bytes = reclaimed.1, "reclaimed staging files of names gone or superseded");
        }
        let shortage = crate::space::Shortage {
            needed_bytes: self.waiting.bytes,
            available_bytes: self.waiting.available_bytes + reclaimed.1,
            waiting_files: self.waiting.files,
        };
        volume
            .room
            .note_round(&volume.name, self.peer.addr, Some(shortage));
    }
}

/// A task a pull starts now and waits for later (a listing asked ahead, a batch being
/// staged): aborted if dropped before its result is taken, so that nothing of a round
/// that ended goes on.
pub(super) struct Spawned<T> {
    task: tokio::task::JoinHandle<Result<T, SyncError>>,
    what: &'static str,
}

impl<T: Send + 'static> Spawned<T> {
    fn spawn(
        what: &'static str,
        future: impl Future<Output = Result<T, SyncError>> + Send + 'static,
    ) -> Self {
        Spawned {
            task: tokio::spawn(future),
            what,
        }
    }

    async fn result(mut self) -> Result<T, SyncError> {
        let what = self.what;
        (&mut self.task)
            .await
            .map_err(|source| SyncError::Task { what, source })?
    }
}

impl<T> Drop for Spawned<T> {
    fn drop(&mut self) {
        self.task.abort();
    }
}
