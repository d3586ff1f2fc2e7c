//! The pulling half of sync: make this node's volume include what a peer has.
//!
//! 1. Compare roots: equal roots end the round (one request per volume when converged).
//! 2. Walk only what differs: for each directory, fetch the peer's page list and only
//!    the pages whose (first name, hash) we do not have; recurse into child directories
//!    whose tree hashes differ.
//! 3. Decide each name with version vectors: the peer's version dominates -> take it;
//!    ours dominates or is equal -> keep ours; concurrent -> [`super::conflict`].
//! 4. Take files: fetch the chunk list, reuse every chunk held locally (a rename moves no
//!    chunk bytes), fetch the rest from the peers that share the volume (spread over
//!    them, each chunk checked against its BLAKE3 id), assemble in staging, then publish
//!    a batch: one `syncfs`, atomic renames, directory fsyncs, one durable index write.
//! 5. Deletes run last, deepest first, so content that moved elsewhere in the same round
//!    is still there to be reused; a local file changed since the last scan is never
//!    overwritten or deleted (the next scan indexes it and it syncs as a change).

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use s2n_quic::connection::Handle;
use tokio::task::JoinSet;

use super::{Node, Peer, SyncError, conflict, request};
use crate::chunking::{CHUNK_PAGE_TARGET, ChunkRef, chunk_list_pages, content_id};
use crate::entry::{Causality, Entry, EntryKind};
use crate::ids::{ChunkId, ContentId};
use crate::pathname::{VolPath, escape};
use crate::protocol::{ListPart, MAX_CHUNKS_PER_REQUEST, Request, Response, WireEntry};
use crate::tree::{PageSummary, TreeNode};
use crate::volume_fs::{Staged, finish_staged, stamp_of_stat};

/// Files prepared at once (each may ask for its chunk list), and chunk requests in
/// flight (together well under the transport's stream limit).
const FILE_CONCURRENCY: usize = 32;
const REQUESTS_IN_FLIGHT: usize = 16;
/// Files made durable and visible together.
const PUBLISH_BATCH: usize = 256;
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
    /// Files left unfinished because some chunk could not be fetched: worth another
    /// round soon, not a heartbeat away.
    pub incomplete: u64,
}

impl PullReport {
    pub fn changed(&self) -> bool {
        self.applied + self.deleted + self.conflicts > 0
    }
}

/// What the peer told us beside an entry.
#[derive(Clone, Default)]
struct Hints {
    /// A directory's sync hash.
    subtree: Option<crate::ids::TreeHash>,
    /// A small file's chunk list, sent inline.
    chunks: Option<Vec<ChunkRef>>,
}

/// A file to fetch and publish under `dir/name`.
struct FileJob {
    dir: VolPath,
    name: Vec<u8>,
    /// The entry to record (its content is fetched from `source_path` on the peer).
    entry: Entry,
    source_path: VolPath,
    /// The local entry being replaced, if any (checked unchanged before replacing).
    replaces: Option<Entry>,
    /// The chunk list, when the peer sent it inline.
    chunks: Option<Vec<ChunkRef>>,
}

struct ReadyFile {
    job: FileJob,
    staged: Staged,
    chunks: Vec<ChunkRef>,
}

/// Pulls one volume from one peer.
pub async fn pull_volume(
    node: &Arc<Node>,
    peer: &Arc<Peer>,
    volume_index: usize,
) -> Result<PullReport, SyncError> {
    let handle = peer
        .connection()
        .ok_or_else(|| SyncError::Connection("not connected".into()))?;
    let volume = &node.volumes[volume_index];
    let _guard = volume.lock.lock().await;
    let mut pull = Pull {
        node: node.clone(),
        peer: peer.clone(),
        handle,
        volume_index,
        deferred: Vec::new(),
        rename_sources: HashMap::new(),
        renames_seen: 0,
        files: Vec::new(),
        report: PullReport::default(),
    };
    let Some(remote_root) = pull.get_dir(&VolPath::root()).await? else {
        return Ok(pull.report);
    };
    let local_root = node.store.tree_node(volume.id, &VolPath::root())?;
    if local_root.map(|n| n.sync_hash()) == Some(remote_root.sync_hash()) {
        return Ok(pull.report);
    }
    let mut pending = vec![(VolPath::root(), Some(remote_root))];
    while let Some((dir, remote)) = pending.pop() {
        pull.sync_dir(&dir, remote, &mut pending).await?;
    }
    let files = std::mem::take(&mut pull.files);
    pull.take_files(files).await?;
    pull.apply_deletes()?;
    crate::tree::update(&node.store, volume.id)?;
    Ok(pull.report)
}

struct Pull {
    node: Arc<Node>,
    peer: Arc<Peer>,
    handle: Handle,
    volume_index: usize,
    /// (parent, name, remote tombstone) to apply at the end of the round.
    deferred: Vec<(VolPath, Vec<u8>, Entry)>,
    /// Files among `deferred` that a new file of the same content can take over, by
    /// content id (see [`Pull::find_rename_sources`]).
    rename_sources: HashMap<ContentId, RenameSource>,
    /// How many of `deferred` have been looked at for `rename_sources`.
    renames_seen: usize,
    /// Files decided on but not yet fetched (taken in batches across directories).
    files: Vec<FileJob>,
    report: PullReport,
}

impl Pull {
    fn volume(&self) -> &super::Volume {
        &self.node.volumes[self.volume_index]
    }

    async fn get_dir(&mut self, dir: &VolPath) -> Result<Option<TreeNode>, SyncError> {
        let volume = self.volume().name.clone();
        match request(
            &mut self.handle,
            &Request::GetDir {
                volume,
                dir: dir.clone(),
            },
        )
        .await?
        {
            Response::Dir(node) => Ok(node),
            other => Err(SyncError::Refused(format!(
                "unexpected answer to GetDir: {other:?}"
            ))),
        }
    }

    /// The peer's children of `dir` with `start <= name < end`, all pages of them.
    async fn get_entries(
        &mut self,
        dir: &VolPath,
        start: &[u8],
        end: Option<&[u8]>,
    ) -> Result<Vec<WireEntry>, SyncError> {
        let volume = self.volume().name.clone();
        let mut out: Vec<WireEntry> = Vec::new();
        let mut from = start.to_vec();
        let mut after = false;
        loop {
            let req = Request::GetEntries {
                volume: volume.clone(),
                dir: dir.clone(),
                start: from.clone(),
                after,
                end: end.map(<[u8]>::to_vec),
            };
            match request(&mut self.handle, &req).await? {
                Response::Entries { entries, more } => {
                    let last = entries.last().map(|e| e.name.clone());
                    out.extend(entries);
                    match (more, last) {
                        (true, Some(last)) => {
                            from = last;
                            after = true;
                        }
                        _ => return Ok(out),
                    }
                }
                other => {
                    return Err(SyncError::Refused(format!(
                        "unexpected answer to GetEntries: {other:?}"
                    )));
                }
            }
        }
    }

    /// Reconciles one directory with the peer's. `remote` is the peer's tree node for
    /// it, or `None` when the peer deleted it (then all its entries are compared).
    async fn sync_dir(
        &mut self,
        dir: &VolPath,
        remote: Option<TreeNode>,
        pending: &mut Vec<(VolPath, Option<TreeNode>)>,
    ) -> Result<(), SyncError> {
        let vol = self.volume().id;
        let local = self.node.store.tree_node(vol, dir)?;
        let mut ranges: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
        match &remote {
            // Same content but different histories, or nothing live left on the peer's
            // side (deletes): only the entries, tombstones included, can tell.
            Some(remote)
                if remote.pages.is_empty()
                    || local.as_ref().is_some_and(|l| l.hash == remote.hash) =>
            {
                ranges.push((Vec::new(), None))
            }
            Some(remote) => {
                // A name range differs if either side has a page there the other lacks;
                // the peer's tombstones may sit in a range only our pages mark.
                let local_pages = local.as_ref().map_or(&[][..], |n| &n.pages[..]);
                ranges.extend(differing_ranges(&remote.pages, local_pages));
                ranges.extend(differing_ranges(local_pages, &remote.pages));
                ranges = merge_ranges(ranges);
            }
            None => ranges.push((Vec::new(), None)),
        }
        let mut files = std::mem::take(&mut self.files);
        for (start, end) in ranges {
            for remote_entry in self.get_entries(dir, &start, end.as_deref()).await? {
                self.reconcile(dir, remote_entry, &mut files, pending)
                    .await?;
            }
        }
        // Files of many small directories travel together: one publish batch for all.
        if files.len() >= PUBLISH_BATCH {
            self.take_files(files).await
        } else {
            self.files = files;
            Ok(())
        }
    }

    async fn reconcile(
        &mut self,
        dir: &VolPath,
        wire: WireEntry,
        files: &mut Vec<FileJob>,
        pending: &mut Vec<(VolPath, Option<TreeNode>)>,
    ) -> Result<(), SyncError> {
        let vol = self.volume().id;
        let WireEntry {
            name,
            entry: remote,
            subtree,
            chunks,
        } = wire;
        let hints = Hints { subtree, chunks };
        let path = dir
            .join(&name)
            .map_err(|e| SyncError::Refused(e.to_string()))?;
        if path.is_shoal_internal() {
            tracing::warn!(peer = %self.peer.addr, "ignoring an entry for Shoal's own directory: {}", path.display());
            return Ok(());
        }
        let local = self.node.store.entry(vol, dir, &name)?;
        let local_live = local.as_ref().filter(|l| !l.is_tombstone());

        // Both directories: descend if their contents differ, whatever the entries say.
        if remote.is_dir() && local_live.is_some_and(Entry::is_dir) {
            let local_hash = self
                .node
                .store
                .tree_node(vol, &path)?
                .map(|n| n.sync_hash());
            if hints.subtree.is_some() && hints.subtree != local_hash {
                let node = self.get_dir(&path).await?;
                pending.push((path.clone(), node));
            }
        }
        let Some(local) = local else {
            if remote.is_tombstone() {
                // Remember the delete so it reaches nodes that still have the name.
                let mut batch = self.node.store.batch();
                batch.put_entry(vol, dir, &name, &remote);
                batch.mark_dirty(vol, dir);
                self.node.store.write(batch, false)?;
            } else {
                self.take(dir, &name, remote, None, &hints, files, pending)
                    .await?;
            }
            return Ok(());
        };
        match remote.version.compare(&local.version) {
            Causality::Equal | Causality::DominatedBy => Ok(()),
            Causality::Dominates if remote.same_state(&local) => {
                self.record_version(dir, &name, remote)
            }
            Causality::Dominates if remote.is_tombstone() => {
                if local.is_dir() {
                    // The peer deleted the directory: compare all of its children first.
                    pending.push((path, None));
                }
                self.defer_delete(dir, name, remote)
            }
            Causality::Dominates => {
                if local.is_dir() && !remote.is_dir() {
                    // The directory must empty before the file can take its place.
                    pending.push((path, None));
                }
                self.take(dir, &name, remote, Some(local), &hints, files, pending)
                    .await
            }
            Causality::Concurrent if remote.same_state(&local) => {
                let merged = Entry {
                    version: remote.version.merged(&local.version),
                    ..local
                };
                self.record_version(dir, &name, merged)
            }
            Causality::Concurrent => {
                self.conflict(dir, &name, remote, local, &hints, files, pending)
                    .await
            }
        }
    }

    fn record_version(
        &mut self,
        dir: &VolPath,
        name: &[u8],
        entry: Entry,
    ) -> Result<(), SyncError> {
        let mut batch = self.node.store.batch();
        batch.put_entry(self.volume().id, dir, name, &entry);
        // Histories are part of the tree's `versions` hash.
        batch.mark_dirty(self.volume().id, dir);
        self.node.store.write(batch, false)?;
        Ok(())
    }

    fn defer_delete(
        &mut self,
        dir: &VolPath,
        name: Vec<u8>,
        tombstone: Entry,
    ) -> Result<(), SyncError> {
        self.deferred.push((dir.clone(), name, tombstone));
        if self.deferred.len() >= MAX_DEFERRED_DELETES {
            self.apply_deletes()?;
        }
        Ok(())
    }

    /// Whether the name on disk is still what the index says (nobody changed it since
    /// the last scan); only then may sync replace or delete it.
    fn unchanged_on_disk(
        &self,
        dir_fd: &OwnedFd,
        dir: &VolPath,
        name: &[u8],
    ) -> Result<bool, SyncError> {
        let recorded = self.node.store.stamp(self.volume().id, dir, name)?;
        let current = self
            .volume()
            .fs
            .stat(dir_fd, name)
            .ok()
            .map(|s| stamp_of_stat(&s));
        Ok(match (recorded, current) {
            (_, None) => true,
            (Some(recorded), Some(current)) => recorded == current,
            (None, Some(_)) => false,
        })
    }

    #[allow(clippy::too_many_arguments)]
    async fn take(
        &mut self,
        dir: &VolPath,
        name: &[u8],
        remote: Entry,
        replaces: Option<Entry>,
        hints: &Hints,
        files: &mut Vec<FileJob>,
        pending: &mut Vec<(VolPath, Option<TreeNode>)>,
    ) -> Result<(), SyncError> {
        let vol = self.volume().id;
        let path = dir
            .join(name)
            .map_err(|e| SyncError::Refused(e.to_string()))?;
        match &remote.kind {
            EntryKind::File { .. } => {
                files.push(FileJob {
                    dir: dir.clone(),
                    name: name.to_vec(),
                    entry: remote,
                    source_path: path,
                    replaces,
                    chunks: hints.chunks.clone(),
                });
                Ok(())
            }
            EntryKind::Dir => {
                let dir_fd = self.volume().fs.open_dir(dir, true)?;
                if let Some(old) = replaces
                    .as_ref()
                    .filter(|o| !o.is_tombstone() && !o.is_dir())
                {
                    if !self.unchanged_on_disk(&dir_fd, dir, name)? {
                        self.report.skipped += 1;
                        return Ok(());
                    }
                    self.volume().fs.remove_file(&dir_fd, name)?;
                    self.forget_chunks(dir, name, old)?;
                }
                self.volume().fs.mkdir(&dir_fd, name, remote.mode)?;
                self.volume().fs.chmod_dir(&dir_fd, name, remote.mode)?;
                let stat = self.volume().fs.stat(&dir_fd, name)?;
                let mut batch = self.node.store.batch();
                batch.put_entry(vol, dir, name, &remote);
                batch.put_stamp(vol, dir, name, &stamp_of_stat(&stat));
                batch.mark_dirty(vol, dir);
                batch.mark_dirty(vol, &path);
                self.node.store.write(batch, false)?;
                self.report.applied += 1;
                if hints.subtree.is_some() && replaces.as_ref().is_none_or(|o| !o.is_dir()) {
                    let node = self.get_dir(&path).await?;
                    pending.push((path, node));
                }
                Ok(())
            }
            EntryKind::Symlink { target } => {
                if !symlink_stays_inside(dir, target) {
                    tracing::warn!(peer = %self.peer.addr, "refusing symlink {} -> {}: it leaves the volume", path.display(), escape(target));
                    self.report.skipped += 1;
                    return Ok(());
                }
                let dir_fd = self.volume().fs.open_dir(dir, true)?;
                if !self.unchanged_on_disk(&dir_fd, dir, name)? {
                    self.report.skipped += 1;
                    return Ok(());
                }
                // A directory cannot be replaced atomically; it goes only when empty.
                if replaces.as_ref().is_some_and(Entry::is_dir)
                    && !self.volume().fs.remove_dir(&dir_fd, name)?
                {
                    self.report.skipped += 1;
                    return Ok(());
                }
                let temp = self
                    .volume()
                    .fs
                    .stage_symlink(target, &format!("{:016x}", rand_u64()))?;
                self.volume().fs.publish(&temp, &dir_fd, name)?;
                crate::volume_fs::VolumeFs::fsync_dir(&dir_fd)?;
                let stat = self.volume().fs.stat(&dir_fd, name)?;
                let mut batch = self.node.store.batch();
                if let Some(old) = replaces.as_ref() {
                    self.forget_chunks_in(&mut batch, dir, name, old)?;
                }
                batch.put_entry(vol, dir, name, &remote);
                batch.put_stamp(vol, dir, name, &stamp_of_stat(&stat));
                batch.mark_dirty(vol, dir);
                self.node.store.write(batch, true)?;
                self.report.applied += 1;
                self.node
                    .stats
                    .files_applied
                    .fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            EntryKind::Tombstone { .. } => unreachable!("tombstones are deferred deletes"),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn conflict(
        &mut self,
        dir: &VolPath,
        name: &[u8],
        remote: Entry,
        local: Entry,
        hints: &Hints,
        files: &mut Vec<FileJob>,
        pending: &mut Vec<(VolPath, Option<TreeNode>)>,
    ) -> Result<(), SyncError> {
        let merged_version = remote.version.merged(&local.version);
        let remote_wins = conflict::wins(&remote, &local);
        let (winner, loser) = if remote_wins {
            (&remote, &local)
        } else {
            (&local, &remote)
        };
        let copy_name = conflict::conflict_name(name, loser, winner);
        let both_dirs = remote.is_dir() && local.is_dir();
        tracing::info!(
            peer = %self.peer.addr,
            "concurrent changes to {}: {} version wins{}",
            dir.join(name).map(|p| p.display().to_string()).unwrap_or_default(),
            if remote_wins { "the peer's" } else { "our" },
            if loser.is_tombstone() || both_dirs { String::new() } else { format!(", the other is kept as {}", escape(&copy_name)) }
        );
        self.report.conflicts += 1;
        self.node.stats.conflicts.fetch_add(1, Ordering::Relaxed);
        if remote_wins {
            if !local.is_tombstone() && !both_dirs {
                // Our version moves aside, under its conflict name, with its history.
                let vol = self.volume().id;
                let dir_fd = self.volume().fs.open_dir(dir, false)?;
                if !self.unchanged_on_disk(&dir_fd, dir, name)? {
                    self.report.skipped += 1;
                    return Ok(());
                }
                rustix::fs::renameat_with(
                    &dir_fd,
                    OsStr::from_bytes(name),
                    &dir_fd,
                    OsStr::from_bytes(&copy_name),
                    rustix::fs::RenameFlags::NOREPLACE,
                )
                .map_err(|e| {
                    SyncError::Refused(format!(
                        "cannot keep the conflict copy {}: {e}",
                        escape(&copy_name)
                    ))
                })?;
                crate::volume_fs::VolumeFs::fsync_dir(&dir_fd)?;
                let mut batch = self.node.store.batch();
                batch.put_entry(vol, dir, &copy_name, &local);
                if let EntryKind::File { .. } = local.kind {
                    let chunks = self.indexed_chunks(dir, name, Some(&local))?;
                    batch.delete_chunks(vol, dir, name, &chunks);
                    batch.set_chunks(vol, dir, &copy_name, &chunks, &[]);
                }
                batch.delete_stamp(vol, dir, name);
                batch.mark_dirty(vol, dir);
                self.node.store.write(batch, true)?;
            }
            let winner = Entry {
                version: merged_version,
                ..remote
            };
            let replaced = if local.is_tombstone() || !both_dirs {
                None
            } else {
                Some(local)
            };
            self.take(dir, name, winner, replaced, hints, files, pending)
                .await
        } else {
            if !remote.is_tombstone() && !both_dirs {
                let copy_path = dir
                    .join(&copy_name)
                    .map_err(|e| SyncError::Refused(e.to_string()))?;
                let source_path = dir
                    .join(name)
                    .map_err(|e| SyncError::Refused(e.to_string()))?;
                match &remote.kind {
                    EntryKind::File { .. } => files.push(FileJob {
                        dir: dir.clone(),
                        name: copy_name,
                        entry: remote.clone(),
                        source_path,
                        replaces: None,
                        chunks: hints.chunks.clone(),
                    }),
                    _ => {
                        let (copy_dir, copy) =
                            copy_path.split_last().expect("a joined path has a name");
                        Box::pin(self.take(
                            &copy_dir,
                            copy,
                            remote.clone(),
                            None,
                            &Hints::default(),
                            files,
                            pending,
                        ))
                        .await?;
                    }
                }
            }
            self.record_version(
                dir,
                name,
                Entry {
                    version: merged_version,
                    ..local
                },
            )
        }
    }

    fn forget_chunks(&self, dir: &VolPath, name: &[u8], old: &Entry) -> Result<(), SyncError> {
        let mut batch = self.node.store.batch();
        self.forget_chunks_in(&mut batch, dir, name, old)?;
        self.node.store.write(batch, false)?;
        Ok(())
    }

    fn forget_chunks_in(
        &self,
        batch: &mut crate::store::Batch<'_>,
        dir: &VolPath,
        name: &[u8],
        old: &Entry,
    ) -> Result<(), SyncError> {
        if let EntryKind::File { .. } = old.kind {
            let chunks = self.indexed_chunks(dir, name, Some(old))?;
            batch.delete_chunks(self.volume().id, dir, name, &chunks);
        }
        Ok(())
    }

    /// The chunk list the index holds for `dir/name` when `entry` (the local entry there)
    /// is a file; empty otherwise.
    fn indexed_chunks(
        &self,
        dir: &VolPath,
        name: &[u8],
        entry: Option<&Entry>,
    ) -> Result<Vec<ChunkRef>, SyncError> {
        match entry.map(|e| &e.kind) {
            Some(EntryKind::File { .. }) => Ok(self
                .node
                .store
                .chunk_list(self.volume().id, dir, name)?
                .unwrap_or_default()),
            _ => Ok(Vec::new()),
        }
    }

    /// Local files this round deletes, by content: a new file with the same content is
    /// the other half of a rename, and takes the old file itself instead of a copy of
    /// its chunks (a renamed directory of media is not rewritten on every peer). Only
    /// files that are what the index says (their stamp, checked again at the move).
    /// Each deferred delete is looked at once, however many batches of files follow.
    fn find_rename_sources(&mut self) -> Result<(), SyncError> {
        let vol = self.volume().id;
        let new = &self.deferred[self.renames_seen..];
        self.renames_seen = self.deferred.len();
        for (dir, name, tombstone) in new {
            let Some(local) = self.node.store.entry(vol, dir, name)? else {
                continue;
            };
            let EntryKind::File {
                size, content_id, ..
            } = local.kind
            else {
                continue;
            };
            if size == 0 || tombstone.version.compare(&local.version) != Causality::Dominates {
                continue;
            }
            if let Some(stamp) = self.node.store.stamp(vol, dir, name)? {
                self.rename_sources.insert(
                    content_id,
                    RenameSource {
                        dir: dir.clone(),
                        name: name.clone(),
                        stamp,
                    },
                );
            }
        }
        Ok(())
    }

    /// Takes files in batches of up to `PUBLISH_BATCH`: prepares them (`FILE_CONCURRENCY`
    /// at a time), fetches the chunks the whole batch still lacks in shared requests,
    /// then publishes the batch (one `syncfs`, one durable index write).
    async fn take_files(&mut self, files: Vec<FileJob>) -> Result<(), SyncError> {
        self.find_rename_sources()?;
        let mut jobs = files.into_iter().peekable();
        while jobs.peek().is_some() {
            let mut set = JoinSet::new();
            let mut prepared = Vec::new();
            let mut started = 0;
            loop {
                while set.len() < FILE_CONCURRENCY && started < PUBLISH_BATCH {
                    let Some(job) = jobs.next() else { break };
                    started += 1;
                    let source = match &job.entry.kind {
                        EntryKind::File { content_id, .. } => {
                            self.rename_sources.remove(content_id)
                        }
                        _ => None,
                    };
                    let (node, peer, handle, index) = (
                        self.node.clone(),
                        self.peer.clone(),
                        self.handle.clone(),
                        self.volume_index,
                    );
                    set.spawn(async move { prepare(node, peer, handle, index, job, source).await });
                }
                match set.join_next().await {
                    Some(Ok(Ok(Some(file)))) => prepared.push(file),
                    Some(Ok(Ok(None))) => self.report.skipped += 1,
                    Some(Ok(Err(e))) => {
                        tracing::warn!(peer = %self.peer.addr, "transfer failed, will retry next round: {e}");
                        self.report.skipped += 1;
                    }
                    Some(Err(e)) => {
                        return Err(SyncError::Refused(format!("transfer task failed: {e}")));
                    }
                    None => break,
                }
            }
            let ready = self.fill(prepared).await?;
            self.publish(ready)?;
        }
        Ok(())
    }

    /// Fetches what the prepared files still lack and finishes them; files left
    /// incomplete are skipped (and resumed from staging next round).
    async fn fill(&mut self, prepared: Vec<Prepared>) -> Result<Vec<ReadyFile>, SyncError> {
        let mut targets = ChunkTargets::default();
        for file in &prepared {
            for id in &file.missing {
                for &offset in &file.offsets[id] {
                    targets
                        .places
                        .entry(*id)
                        .or_default()
                        .push((file.file.clone(), offset));
                }
            }
        }
        let wanted: Vec<ChunkId> = targets.places.keys().copied().collect();
        let received = if wanted.is_empty() {
            HashSet::new()
        } else {
            fetch_chunks(
                &self.node,
                &self.peer,
                self.volume_index,
                wanted,
                Arc::new(targets),
            )
            .await?
        };
        let mut ready = Vec::new();
        for file in prepared {
            if let Some(id) = file.missing.iter().find(|id| !received.contains(id)) {
                tracing::warn!(peer = %self.peer.addr, "{}: chunk {id} is held intact by no reachable peer; will retry", escape(&file.job.name));
                self.report.incomplete += 1;
                continue;
            }
            let owner = self
                .node
                .sync_ownership
                .then_some((file.job.entry.uid, file.job.entry.gid));
            finish_staged(
                &file.file,
                file.job.entry.mode,
                file.job.entry.mtime_ns,
                owner,
            )
            .map_err(|e| SyncError::Refused(format!("staging {}: {e}", escape(&file.job.name))))?;
            ready.push(ReadyFile {
                job: file.job,
                staged: file.staged,
                chunks: file.chunks,
            });
        }
        Ok(ready)
    }

    /// Makes a batch of assembled files durable and visible, then indexes them.
    fn publish(&mut self, ready: Vec<ReadyFile>) -> Result<(), SyncError> {
        if ready.is_empty() {
            return Ok(());
        }
        let node = self.node.clone();
        let fs = &node.volumes[self.volume_index].fs;
        fs.sync_all()?;
        let mut dirs: HashMap<VolPath, OwnedFd> = HashMap::new();
        let mut batch = node.store.batch();
        let mut published = 0;
        for file in ready {
            let name = escape(&file.job.name);
            match self.publish_one(fs, &mut dirs, &mut batch, file) {
                Ok(true) => published += 1,
                Ok(false) => self.report.skipped += 1,
                // One file that cannot be placed does not hold back the others.
                Err(e) => {
                    tracing::warn!("cannot publish {name}: {e}; will retry next round");
                    self.report.skipped += 1;
                }
            }
        }
        for dir_fd in dirs.values() {
            crate::volume_fs::VolumeFs::fsync_dir(dir_fd)?;
        }
        node.store.write(batch, true)?;
        self.report.applied += published;
        node.stats
            .files_applied
            .fetch_add(published, Ordering::Relaxed);
        Ok(())
    }

    /// Renames one assembled file into place and records it in `batch`; `false` if it
    /// had to be left alone (something local is in the way).
    fn publish_one(
        &self,
        fs: &crate::volume_fs::VolumeFs,
        dirs: &mut HashMap<VolPath, OwnedFd>,
        batch: &mut crate::store::Batch<'_>,
        file: ReadyFile,
    ) -> Result<bool, SyncError> {
        let ReadyFile {
            job,
            staged,
            chunks,
        } = file;
        let vol = self.volume().id;
        if !dirs.contains_key(&job.dir) {
            dirs.insert(job.dir.clone(), fs.open_dir(&job.dir, true)?);
        }
        let dir_fd = &dirs[&job.dir];
        let replaces_dir = job.replaces.as_ref().is_some_and(Entry::is_dir);
        if replaces_dir {
            // A directory goes only once it is empty (its children are synced first).
            if !fs.remove_dir(dir_fd, &job.name)? {
                return Ok(false);
            }
            if let Ok(path) = job.dir.join(&job.name) {
                batch.delete_tree_node(vol, &path);
                batch.clear_dirty(vol, &path);
            }
        } else if !self.unchanged_on_disk(dir_fd, &job.dir, &job.name)? {
            tracing::info!(
                "{} changed locally since the last scan; not replacing it",
                escape(&job.name)
            );
            return Ok(false);
        }
        fs.publish(&staged.temp_name, dir_fd, &job.name)?;
        // fstat through the still-open descriptor: the stamp of exactly what we wrote.
        let stat =
            rustix::fs::fstat(&staged.file).map_err(|e| SyncError::Refused(e.to_string()))?;
        let old_chunks = self.indexed_chunks(&job.dir, &job.name, job.replaces.as_ref())?;
        batch.put_entry(vol, &job.dir, &job.name, &job.entry);
        batch.set_chunks(vol, &job.dir, &job.name, &chunks, &old_chunks);
        batch.put_stamp(vol, &job.dir, &job.name, &stamp_of_stat(&stat));
        batch.mark_dirty(vol, &job.dir);
        Ok(true)
    }

    /// Applies the deferred deletes, deepest first.
    fn apply_deletes(&mut self) -> Result<(), SyncError> {
        let mut deletes = std::mem::take(&mut self.deferred);
        self.rename_sources.clear();
        self.renames_seen = 0;
        deletes.sort_by_key(|(dir, _, _)| std::cmp::Reverse(dir.depth()));
        let vol = self.volume().id;
        for (dir, name, tombstone) in deletes {
            let Ok(dir_fd) = self.volume().fs.open_dir(&dir, false) else {
                continue;
            };
            let Some(local) = self.node.store.entry(vol, &dir, &name)? else {
                continue;
            };
            if local.is_tombstone()
                || tombstone.version.compare(&local.version) != Causality::Dominates
            {
                continue;
            }
            let removed = if local.is_dir() {
                self.volume().fs.remove_dir(&dir_fd, &name)?
            } else if self.unchanged_on_disk(&dir_fd, &dir, &name)? {
                self.volume().fs.remove_file(&dir_fd, &name)?;
                true
            } else {
                false
            };
            let mut batch = self.node.store.batch();
            if removed {
                self.forget_chunks_in(&mut batch, &dir, &name, &local)?;
                batch.put_entry(vol, &dir, &name, &tombstone);
                batch.delete_stamp(vol, &dir, &name);
                if let Ok(path) = dir.join(&name) {
                    batch.delete_tree_node(vol, &path);
                    batch.clear_dirty(vol, &path);
                }
                batch.mark_dirty(vol, &dir);
                self.report.deleted += 1;
            } else {
                // Something new is in the way: keep it, and make our version win.
                let mut version = tombstone.version.merged(&local.version);
                version.bump(self.node.meta.node_id);
                batch.put_entry(vol, &dir, &name, &Entry { version, ..local });
                self.report.skipped += 1;
            }
            self.node.store.write(batch, false)?;
            crate::volume_fs::VolumeFs::fsync_dir(&dir_fd)?;
        }
        Ok(())
    }
}

/// The name ranges of the pages of `ours` that `theirs` does not have (same first name
/// and hash). The first page's range starts at the empty name.
fn differing_ranges(
    ours: &[PageSummary],
    theirs: &[PageSummary],
) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    let have: HashSet<(&[u8], crate::ids::TreeHash)> =
        theirs.iter().map(|p| (&p.first_name[..], p.hash)).collect();
    (0..ours.len())
        .filter(|&i| !have.contains(&(&ours[i].first_name[..], ours[i].hash)))
        .map(|i| {
            let start = if i == 0 {
                Vec::new()
            } else {
                ours[i].first_name.clone()
            };
            (start, ours.get(i + 1).map(|p| p.first_name.clone()))
        })
        .collect()
}

/// Sorts name ranges and merges those that overlap or touch (`None` ends at the end).
fn merge_ranges(mut ranges: Vec<(Vec<u8>, Option<Vec<u8>>)>) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    ranges.sort();
    let mut merged: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
    for (start, end) in ranges {
        match merged.last_mut() {
            Some((_, last_end)) if last_end.as_ref().is_none_or(|e| *e >= start) => {
                *last_end = match (last_end.take(), end) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    _ => None,
                };
            }
            _ => merged.push((start, end)),
        }
    }
    merged
}

/// Whether a symlink at `dir` with `target` stays inside the volume: a relative target
/// made of leading `..` components that do not climb above the root, then plain names.
/// (A `..` after a name is refused: the name could itself be a symlink, and chains of
/// such links could climb out.)
pub fn symlink_stays_inside(dir: &VolPath, target: &[u8]) -> bool {
    if target.is_empty() || target.starts_with(b"/") || target.contains(&0) {
        return false;
    }
    let mut depth = dir.depth() as i64;
    let mut descended = false;
    for part in target.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." if descended => return false,
            b".." => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            _ => descended = true,
        }
    }
    true
}

fn rand_u64() -> u64 {
    crate::ids::NodeId::random().map(|n| n.0).unwrap_or(0)
}

/// Gets a file's chunk list from the peer. With `previous` (our older version's list),
/// asks for the page hashes first and then only for the pages we do not have.
async fn fetch_chunk_list(
    handle: &mut Handle,
    volume: &str,
    path: &VolPath,
    content: crate::ids::ContentId,
    previous: Option<Vec<ChunkRef>>,
) -> Result<Option<Vec<ChunkRef>>, SyncError> {
    let ask = |part| Request::GetChunkList {
        volume: volume.to_string(),
        path: path.clone(),
        content_id: content,
        part,
    };
    let unexpected = |other: Response| {
        SyncError::Refused(format!("unexpected answer to GetChunkList: {other:?}"))
    };
    let Some(previous) = previous else {
        return match request(handle, &ask(ListPart::Whole)).await? {
            Response::ChunkList(list) => Ok(list),
            other => Err(unexpected(other)),
        };
    };
    let remote_pages = match request(handle, &ask(ListPart::PageHashes)).await? {
        Response::ChunkPages(Some(pages)) => pages,
        Response::ChunkPages(None) => return Ok(None),
        other => return Err(unexpected(other)),
    };
    let ours: HashMap<[u8; 32], std::ops::Range<usize>> = chunk_list_pages(&previous)
        .into_iter()
        .map(|p| (p.hash, p.range))
        .collect();
    let missing: Vec<u32> = (0..remote_pages.len())
        .filter(|&i| !ours.contains_key(&remote_pages[i].1))
        .map(|i| i as u32)
        .collect();
    let mut fetched = match missing.is_empty() {
        true => Vec::new(),
        false => match request(handle, &ask(ListPart::Pages(missing.clone()))).await? {
            Response::ChunkList(Some(chunks)) => chunks,
            Response::ChunkList(None) => return Ok(None),
            other => return Err(unexpected(other)),
        },
    }
    .into_iter();
    // Splice: our pages where the hashes match, the fetched ones in between. The caller
    // checks the result against the content id, so a lying peer gains nothing.
    let mut list = Vec::new();
    for (count, hash) in &remote_pages {
        match ours.get(hash) {
            Some(range) => list.extend_from_slice(&previous[range.clone()]),
            None => list.extend(fetched.by_ref().take(*count as usize)),
        }
    }
    Ok(Some(list))
}

/// Every place (staging file, offset) a chunk of the current batch goes.
#[derive(Default)]
pub(crate) struct ChunkTargets {
    places: HashMap<ChunkId, Vec<(Arc<File>, u64)>>,
}

impl ChunkTargets {
    /// Asks for `id` to be written at `offset` of `file` when it arrives.
    pub(crate) fn add(&mut self, id: ChunkId, file: Arc<File>, offset: u64) {
        self.places.entry(id).or_default().push((file, offset));
    }

    /// The chunks asked for.
    pub(crate) fn ids(&self) -> Vec<ChunkId> {
        self.places.keys().copied().collect()
    }

    fn write(&self, id: &ChunkId, data: &[u8]) -> std::io::Result<()> {
        for (file, offset) in self.places.get(id).into_iter().flatten() {
            file.write_all_at(data, *offset)?;
        }
        Ok(())
    }
}

/// A local file that a deleted name leaves behind, to be moved to a new name of the
/// same content instead of copied.
struct RenameSource {
    dir: VolPath,
    name: Vec<u8>,
    /// What the index recorded of it: it is moved only if it is still exactly that.
    stamp: crate::store::codec::ScanStamp,
}

/// A file whose staging file exists and holds every chunk we had locally.
struct Prepared {
    job: FileJob,
    staged: Staged,
    file: Arc<File>,
    chunks: Vec<ChunkRef>,
    offsets: HashMap<ChunkId, Vec<u64>>,
    /// Chunks still to fetch.
    missing: Vec<ChunkId>,
}

/// Gets a file's chunk list (inline or from the peer), checks it, and writes into its
/// staging file every chunk found there already (an interrupted transfer) or held
/// locally (a rename, a copy, an edit of a few chunks).
async fn prepare(
    node: Arc<Node>,
    peer: Arc<Peer>,
    mut handle: Handle,
    volume_index: usize,
    job: FileJob,
    source: Option<RenameSource>,
) -> Result<Option<Prepared>, SyncError> {
    let volume = &node.volumes[volume_index];
    let EntryKind::File {
        size,
        content_id: expected,
        ..
    } = job.entry.kind
    else {
        return Ok(None);
    };
    let chunks = match (&job.chunks, size) {
        (_, 0) => Vec::new(),
        (Some(inline), _) => inline.clone(),
        // The same content is here already (a rename or a copy on the peer).
        (None, _) if let Some(local) = node.store.chunk_list_by_content(&expected)? => local,
        (None, _) => {
            // An older version of the file here: only the pages of its list that changed
            // need to come over.
            let previous = match &job.replaces {
                Some(Entry {
                    kind: EntryKind::File { chunks, .. },
                    ..
                }) if *chunks as usize > CHUNK_PAGE_TARGET => {
                    node.store.chunk_list(volume.id, &job.dir, &job.name)?
                }
                _ => None,
            };
            match fetch_chunk_list(
                &mut handle,
                &volume.name,
                &job.source_path,
                expected,
                previous,
            )
            .await?
            {
                Some(list) => list,
                // The peer's file changed meanwhile: a later round gets the new version.
                None => return Ok(None),
            }
        }
    };
    let max = node.meta.chunk_params.max;
    if content_id(&chunks) != expected
        || chunks.iter().map(|c| u64::from(c.len)).sum::<u64>() != size
        || chunks.iter().any(|c| c.len == 0 || c.len > max)
    {
        peer.rejected_chunks.fetch_add(1, Ordering::Relaxed);
        return Err(SyncError::Refused(format!(
            "peer {} sent a chunk list that does not match its content id",
            peer.addr
        )));
    }
    let moved = match &source {
        Some(from) => volume.fs.stage_by_move(
            (&from.dir, &from.name),
            &from.stamp,
            &expected,
            &job.dir,
            &job.name,
        )?,
        None => None,
    };
    let staged = match moved {
        Some(staged) => staged,
        None => volume.fs.stage(&expected, &job.dir, &job.name, size)?,
    };
    let io = |e: std::io::Error| SyncError::Refused(format!("staging {}: {e}", escape(&job.name)));
    let file = Arc::new(staged.file.try_clone().map_err(io)?);
    let mut offsets: HashMap<ChunkId, Vec<u64>> = HashMap::new();
    let mut lengths: HashMap<ChunkId, u32> = HashMap::new();
    let mut offset = 0u64;
    for chunk in &chunks {
        offsets.entry(chunk.id).or_default().push(offset);
        lengths.insert(chunk.id, chunk.len);
        offset += u64::from(chunk.len);
    }
    let write = |id: &ChunkId, data: &[u8]| -> std::io::Result<()> {
        for at in &offsets[id] {
            file.write_all_at(data, *at)?;
        }
        Ok(())
    };
    let mut missing = Vec::new();
    for (id, at) in &offsets {
        let mut existing = vec![0u8; lengths[id] as usize];
        if staged.resumed
            && file.read_exact_at(&mut existing, at[0]).is_ok()
            && ChunkId::of(&existing) == *id
        {
            if at.len() > 1 {
                write(id, &existing).map_err(io)?;
            }
            continue;
        }
        match node.read_local_chunk(id) {
            Some(data) => write(id, &data).map_err(io)?,
            None => missing.push(*id),
        }
    }
    Ok(Some(Prepared {
        job,
        staged,
        file,
        chunks,
        offsets,
        missing,
    }))
}

/// Fetches chunks into their staging files from the peers that share the volume:
/// requests are spread over them, a chunk one peer lacks is asked of another, and a peer
/// that sends wrong bytes is not asked again during this batch. Returns the chunks
/// received.
pub(crate) async fn fetch_chunks(
    node: &Arc<Node>,
    source: &Arc<Peer>,
    volume_index: usize,
    ids: Vec<ChunkId>,
    sink: Arc<ChunkTargets>,
) -> Result<HashSet<ChunkId>, SyncError> {
    let volume = &node.volumes[volume_index].name;
    let mut peers: Vec<Arc<Peer>> = vec![source.clone()];
    peers.extend(
        node.peers()
            .iter()
            .filter(|p| !Arc::ptr_eq(p, source) && p.shares(volume) && p.connection().is_some())
            .cloned(),
    );
    let mut distrusted = vec![false; peers.len()];
    let mut wanted: Vec<ChunkId> = ids;
    let mut received: HashSet<ChunkId> = HashSet::new();
    for attempt in 0..peers.len() * 2 {
        let trusted: Vec<usize> = (0..peers.len()).filter(|&i| !distrusted[i]).collect();
        if wanted.is_empty() || trusted.is_empty() {
            break;
        }
        // Each chunk goes to the next peer on every attempt, so a chunk that one peer
        // lacks is asked of every other in turn, whatever happens to the rest.
        let mut by_peer: Vec<Vec<ChunkId>> = vec![Vec::new(); peers.len()];
        for id in &wanted {
            let spread = usize::from(id.as_bytes()[0]);
            by_peer[trusted[(spread + attempt) % trusted.len()]].push(*id);
        }
        let mut set = JoinSet::new();
        let groups: Vec<(usize, Vec<ChunkId>)> = by_peer
            .iter()
            .enumerate()
            .flat_map(|(index, ids)| {
                ids.chunks(MAX_CHUNKS_PER_REQUEST)
                    .map(move |group| (index, group.to_vec()))
            })
            .collect();
        for (index, group) in groups {
            let (peer, node, sink) = (peers[index].clone(), node.clone(), sink.clone());
            set.spawn(async move { (index, fetch_group(&node, &peer, &group, &sink).await) });
            while set.len() >= REQUESTS_IN_FLIGHT {
                if let Some(done) = set.join_next().await {
                    settle(done, &mut received, &mut distrusted)?;
                }
            }
        }
        while let Some(done) = set.join_next().await {
            settle(done, &mut received, &mut distrusted)?;
        }
        wanted.retain(|id| !received.contains(id));
    }
    Ok(received)
}

/// What one `GetChunks` request brought.
struct GroupOutcome {
    received: Vec<ChunkId>,
    /// The peer sent bytes that did not match their id.
    misbehaved: bool,
}

fn settle(
    done: Result<(usize, Result<GroupOutcome, SyncError>), tokio::task::JoinError>,
    received: &mut HashSet<ChunkId>,
    distrusted: &mut [bool],
) -> Result<(), SyncError> {
    match done {
        Ok((index, Ok(outcome))) => {
            received.extend(outcome.received);
            distrusted[index] |= outcome.misbehaved;
        }
        Ok((_, Err(SyncError::Fs(e)))) => return Err(SyncError::Fs(e)),
        // The chunks stay wanted and go to another peer in the next pass.
        Ok((_, Err(e))) => tracing::debug!("chunk request failed: {e}"),
        Err(e) => return Err(SyncError::Refused(format!("chunk fetch task failed: {e}"))),
    }
    Ok(())
}

/// One `GetChunks` request to one peer, written to the sink as chunks arrive; wrong
/// bytes are counted against the peer and dropped.
async fn fetch_group(
    node: &Node,
    peer: &Peer,
    ids: &[ChunkId],
    sink: &ChunkTargets,
) -> Result<GroupOutcome, SyncError> {
    let mut handle = peer
        .connection()
        .ok_or_else(|| SyncError::Connection("not connected".into()))?;
    let wanted: HashSet<ChunkId> = ids.iter().copied().collect();
    let mut responses =
        super::open_request(&mut handle, &Request::GetChunks { ids: ids.to_vec() }).await?;
    let mut outcome = GroupOutcome {
        received: Vec::new(),
        misbehaved: false,
    };
    // One answer per id asked, no more.
    for _ in 0..ids.len() {
        let Some(response) = responses.next().await? else {
            break;
        };
        match response {
            Response::Chunk { id, data } if wanted.contains(&id) => {
                if ChunkId::of(&data) != id {
                    tracing::warn!(peer = %peer.addr, "peer sent wrong bytes for chunk {id}; not trusting it for this transfer");
                    peer.rejected_chunks.fetch_add(1, Ordering::Relaxed);
                    node.stats.rejected_chunks.fetch_add(1, Ordering::Relaxed);
                    outcome.misbehaved = true;
                    continue;
                }
                let len = data.len() as u64;
                peer.chunk_bytes_received.fetch_add(len, Ordering::Relaxed);
                node.stats
                    .chunk_bytes_received
                    .fetch_add(len, Ordering::Relaxed);
                sink.write(&id, &data)
                    .map_err(|e| SyncError::Refused(format!("staging: {e}")))?;
                outcome.received.push(id);
            }
            Response::ChunkMissing { .. } => {}
            Response::Error { code, message } => {
                return Err(crate::protocol::ProtocolError::Remote { code, message }.into());
            }
            other => {
                return Err(SyncError::Refused(format!(
                    "unexpected answer to GetChunks: {other:?}"
                )));
            }
        }
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cover_pages_missing_on_either_side_and_merge() {
        let page = |first: &str, h: u8| PageSummary {
            first_name: first.as_bytes().to_vec(),
            entries: 1,
            hash: crate::ids::TreeHash([h; 32]),
        };
        // We have an extra first page (a name the peer deleted was a boundary).
        let ours = [page("a", 1), page("m", 2)];
        let theirs = [page("m", 2)];
        assert_eq!(differing_ranges(&theirs, &ours), vec![]);
        assert_eq!(
            differing_ranges(&ours, &theirs),
            vec![(vec![], Some(b"m".to_vec()))]
        );
        let merged = merge_ranges(vec![
            (b"k".to_vec(), None),
            (vec![], Some(b"c".to_vec())),
            (b"b".to_vec(), Some(b"d".to_vec())),
        ]);
        assert_eq!(
            merged,
            vec![(vec![], Some(b"d".to_vec())), (b"k".to_vec(), None)]
        );
    }

    #[test]
    fn symlinks_that_leave_the_volume_are_refused() {
        let root = VolPath::root();
        let deep = VolPath::parse(b"a/b").unwrap();
        assert!(symlink_stays_inside(&root, b"file"));
        assert!(symlink_stays_inside(&deep, b"../../top"));
        assert!(!symlink_stays_inside(&deep, b"../../../etc/passwd"));
        assert!(!symlink_stays_inside(&root, b"/etc/passwd"));
        assert!(!symlink_stays_inside(&root, b"../x"));
        assert!(!symlink_stays_inside(&root, b""));
        // A chain: `s -> ../..` is fine on its own, `s/../../..` through it is not.
        assert!(symlink_stays_inside(&deep, b"../.."));
        assert!(!symlink_stays_inside(&deep, b"s/../../.."));
    }
}
