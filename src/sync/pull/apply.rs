//! Applying what was decided: directories, symlinks and FIFOs in place, deletes at the
//! end, then the directories' mtimes.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;

use super::decide::Hints;
use super::files::{FSYNC_EACH_UP_TO, FileJob};
use super::{Deferred, Pull, RemoteDir};
use crate::chunking::ChunkRef;
use crate::entry::{Causality, Entry, EntryKind};
use crate::ids::NodeId;
use crate::pathname::{VolPath, escape, escape_in};
use crate::store::codec::ScanStamp;
use crate::store::versions::{KeptChunks, VersionRecord, Why};
use crate::store::{Durability, Store};
use crate::sync::conflict::conflict_name;
use crate::sync::{SyncError, Volume};
use crate::volume_fs::{FileStat, Removal as OnDisk};

/// The version records of a round's deletes, by name, until each is written with its
/// tombstone.
type KeptVersions = HashMap<(VolPath, Vec<u8>), VersionRecord>;

/// Directory stamps written at once by [`Pull::restore_dir_mtimes`].
const RESTORE_BATCH: usize = 1024;

/// Whether the name `dir/name` on disk (through `dir_fd`) agrees with its recorded
/// stamp by `same` (a name gone from disk agrees; one on disk with no stamp does not).
pub(super) fn on_disk_as_indexed(
    store: &Store,
    volume: &Volume,
    (dir_fd, dir, name): (&OwnedFd, &VolPath, &[u8]),
    same: impl Fn(&ScanStamp, &ScanStamp) -> bool,
) -> Result<bool, SyncError> {
    let recorded = store.stamp(volume.id, dir, name)?;
    let current = volume.fs.stat(dir_fd, name).ok().map(|s| s.stamp());
    Ok(match (recorded, current) {
        (_, None) => true,
        (Some(recorded), Some(current)) => same(&recorded, &current),
        (None, Some(_)) => false,
    })
}

/// The chunk list the index holds for `dir/name` when `entry` (the local entry there)
/// is a file; `None` otherwise.
pub(super) fn indexed_chunks(
    store: &Store,
    volume: &Volume,
    (dir, name): (&VolPath, &[u8]),
    entry: Option<&Entry>,
) -> Result<Option<Vec<ChunkRef>>, SyncError> {
    match entry.map(|e| &e.kind) {
        Some(EntryKind::File { .. }) => Ok(store.chunk_list(volume.id, dir, name)?),
        _ => Ok(None),
    }
}

impl Pull {
    /// Whether the name on disk is still what the index says (nobody changed it since
    /// the last scan); only then may sync replace or delete it.
    pub(super) fn unchanged_on_disk(
        &self,
        dir_fd: &OwnedFd,
        dir: &VolPath,
        name: &[u8],
    ) -> Result<bool, SyncError> {
        self.on_disk_as_indexed(dir_fd, dir, name, |recorded, current| recorded == current)
    }

    /// Whether the name on disk agrees with its recorded stamp by `same` (a name gone
    /// from disk agrees; one on disk with no stamp does not).
    pub(super) fn on_disk_as_indexed(
        &self,
        dir_fd: &OwnedFd,
        dir: &VolPath,
        name: &[u8],
        same: impl Fn(&ScanStamp, &ScanStamp) -> bool,
    ) -> Result<bool, SyncError> {
        on_disk_as_indexed(&self.node.store, self.volume(), (dir_fd, dir, name), same)
    }

    /// Takes the peer's `remote` entry for `dir/name`: a file is queued for fetching, a
    /// directory, symlink or FIFO is placed now, a delete waits for the end of the round.
    /// A name this node's file system refuses is noted and skipped ([`Pull::placed`]).
    /// `sent_by`: the peer, when `remote` is its entry exactly as sent ([`Pull::sent_by`]).
    pub(super) fn take(
        &mut self,
        dir: &VolPath,
        name: &[u8],
        remote: Entry,
        replaces: Option<Entry>,
        hints: &Hints,
        sent_by: Option<NodeId>,
    ) -> Result<(), SyncError> {
        let result = self.take_entry(dir, name, remote, replaces, hints, sent_by);
        self.placed(dir, name, result)
    }

    fn take_entry(
        &mut self,
        dir: &VolPath,
        name: &[u8],
        remote: Entry,
        replaces: Option<Entry>,
        hints: &Hints,
        sent_by: Option<NodeId>,
    ) -> Result<(), SyncError> {
        let vol = self.volume().id;
        let path = dir.join(name)?;
        match &remote.kind {
            EntryKind::File { .. } => {
                let decided_against = self.node.store.entry(vol, dir, name)?;
                // Another name of a hard-linked file: linked to its leader once the
                // round's files are in ([`Pull::link_names`]), never fetched.
                if remote.link.is_some() {
                    self.volume().links_pending.store(true, Ordering::Relaxed);
                }
                let job = FileJob {
                    dir: dir.clone(),
                    name: name.to_vec(),
                    entry: remote,
                    source_path: path,
                    replaces,
                    decided_against,
                    chunks: hints.chunks.clone(),
                    sent_by,
                };
                match job.entry.link_leader(&job.source_path) {
                    Some(_) => self.links.push(job),
                    None => self.queue_file(job),
                }
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
                    // What the directory replaces is kept: its chunks durable in a version
                    // pack before it goes, its record written with the removal.
                    let mut kept = self.node.store.kept_chunks();
                    let version = self.keep_version(
                        &mut kept,
                        (dir, name),
                        old,
                        (&remote.version, &[]),
                        Why::Replaced,
                    )?;
                    let mut batch = self.node.store.batch();
                    kept.finish(&self.node.store, &mut batch)?;
                    let recorded = self.node.store.stamp(self.volume().id, dir, name)?;
                    let changed = changed_here(old, self.node.meta.node_id);
                    let spare_names = |attempt| conflict_name(name, &changed, &remote, attempt);
                    let removal = self.volume().fs.remove_file_as_checked(
                        &dir_fd,
                        name,
                        recorded.as_ref(),
                        spare_names,
                    )?;
                    if removal != OnDisk::Removed {
                        changed_while_removed(name, &removal);
                        self.report.skipped += 1;
                        return Ok(());
                    }
                    if let Some(version) = &version {
                        batch.put_version(version);
                    }
                    self.forget_chunks_in(&mut batch, dir, name, old)?;
                    self.node.store.write(batch, Durability::Buffered)?;
                }
                self.volume().fs.mkdir(&dir_fd, name, remote.mode)?;
                // Owner first: the mode may hold setgid, which a later chown could clear.
                if self.node.sync_ownership {
                    self.volume()
                        .fs
                        .chown_dir(&dir_fd, name, (remote.uid, remote.gid))?;
                }
                let not_set =
                    self.volume()
                        .fs
                        .set_dir_xattrs(&dir_fd, name, remote.mode, &remote.xattrs)?;
                (self.volume().xattrs_not_applied).note(&self.volume().name, &path, &not_set);
                self.moved(dir);
                self.moved(&path);
                let stamp = self.volume().fs.stat(&dir_fd, name)?.stamp();
                let mut batch = self.node.store.batch();
                batch.put_entry_sent_by(vol, dir, name, &remote, sent_by);
                batch.put_stamp(vol, dir, name, &stamp);
                batch.mark_dirty(vol, dir);
                batch.mark_dirty(vol, &path);
                self.node.store.write(batch, Durability::Buffered)?;
                self.volume().echoes.expect([(path.clone(), Some(stamp))]);
                self.report.applied += 1;
                self.note_applied("dir", escape(path.as_bytes()), 0);
                if hints.subtree.is_some() && replaces.as_ref().is_none_or(|o| !o.is_dir()) {
                    self.queue_dir(path, RemoteDir::Present)?;
                }
                Ok(())
            }
            EntryKind::Symlink { .. } | EntryKind::Fifo => {
                self.place_special(dir, name, remote, replaces.as_ref(), sent_by)
            }
            // A delete that won a conflict: applied at the end like any other.
            EntryKind::Tombstone { .. } => self.defer_delete(dir, name.to_vec(), remote, sent_by),
        }
    }

    /// Puts the peer's symlink or FIFO at `dir/name`, replacing what is there only if
    /// it is unchanged since the last scan (a directory only once it is empty).
    fn place_special(
        &mut self,
        dir: &VolPath,
        name: &[u8],
        remote: Entry,
        replaces: Option<&Entry>,
        sent_by: Option<NodeId>,
    ) -> Result<(), SyncError> {
        let vol = self.volume().id;
        let fs = &self.node.volumes[self.volume_index].fs;
        let dir_fd = fs.open_dir(dir, true)?;
        if !self.unchanged_on_disk(&dir_fd, dir, name)? {
            self.report.skipped += 1;
            return Ok(());
        }
        // A directory cannot be replaced atomically; it goes only when empty.
        if replaces.is_some_and(Entry::is_dir) && !fs.remove_dir(&dir_fd, name)? {
            self.report.skipped += 1;
            return Ok(());
        }
        // What it replaces is kept: chunks durable in a version pack before the name is
        // taken, the record written with the index change.
        let mut kept = self.node.store.kept_chunks();
        let version = match replaces {
            Some(old) => self.keep_version(
                &mut kept,
                (dir, name),
                old,
                (&remote.version, &[]),
                Why::Replaced,
            )?,
            None => None,
        };
        let mut batch = self.node.store.batch();
        kept.finish(&self.node.store, &mut batch)?;
        let owner = self.node.sync_ownership.then_some((remote.uid, remote.gid));
        let stat = match &remote.kind {
            EntryKind::Symlink { target } => {
                fs.place_symlink(&dir_fd, name, target, remote.mtime_ns, owner)?
            }
            _ => fs.place_fifo(&dir_fd, name, remote.mode, remote.mtime_ns, owner)?,
        };
        // Not `self.moved`: the batch above holds the node.
        self.moved_dirs.insert(dir.clone());
        if let Some(old) = replaces {
            self.forget_chunks_in(&mut batch, dir, name, old)?;
        }
        if let Some(version) = &version {
            batch.put_version(version);
        }
        let stamp = stat.stamp();
        batch.put_entry_sent_by(vol, dir, name, &remote, sent_by);
        batch.put_stamp(vol, dir, name, &stamp);
        batch.mark_dirty(vol, dir);
        self.node.store.write(batch, Durability::Durable)?;
        if let Ok(path) = dir.join(name) {
            self.volume().echoes.expect([(path, Some(stamp))]);
        }
        // The record is written: the packs it relies on may be collected again.
        drop(kept);
        self.report.applied += 1;
        self.node
            .stats
            .files_applied
            .fetch_add(1, Ordering::Relaxed);
        let what = match remote.kind {
            EntryKind::Symlink { .. } => "symlink",
            _ => "fifo",
        };
        self.note_applied(what, escape_in(dir, name), 0);
        Ok(())
    }

    pub(super) fn forget_chunks_in(
        &self,
        batch: &mut crate::store::Batch<'_>,
        dir: &VolPath,
        name: &[u8],
        old: &Entry,
    ) -> Result<(), SyncError> {
        if let EntryKind::File { .. } = old.kind {
            let chunks = self
                .indexed_chunks(dir, name, Some(old))?
                .unwrap_or_default();
            batch.delete_chunks(self.volume().id, dir, name, &chunks);
        }
        Ok(())
    }

    /// The chunk list the index holds for `dir/name` when `entry` (the local entry there)
    /// is a file; `None` otherwise.
    pub(super) fn indexed_chunks(
        &self,
        dir: &VolPath,
        name: &[u8],
        entry: Option<&Entry>,
    ) -> Result<Option<Vec<ChunkRef>>, SyncError> {
        indexed_chunks(&self.node.store, self.volume(), (dir, name), entry)
    }

    /// Gives every directory whose index entries this round changed (its `dirty` mark)
    /// the mtime its entry records: applying its children moved it to the time of the
    /// sync, and the peer's time (or our last scan's) must stick, or the next scan would
    /// take the sync's own writes for a local change. Runs after everything else of the
    /// round, so nothing moves the mtime again; while the round goes on, each release
    /// of the volume lock (a scan may come next) puts back those it moved since the
    /// last one ([`Pull::restore_moved_dir_mtimes`]).
    pub(super) fn restore_dir_mtimes(&mut self) -> Result<(), SyncError> {
        self.moved_dirs.clear();
        let dirty = self.node.store.dirty_dirs(self.volume().id)?;
        self.restore_mtimes(dirty)
    }

    /// [`Pull::restore_dir_mtimes`] for the directories applying moved since the last
    /// release of the volume lock ([`Pull::moved_dirs`]).
    pub(super) fn restore_moved_dir_mtimes(&mut self) -> Result<(), SyncError> {
        let moved = std::mem::take(&mut self.moved_dirs);
        self.restore_mtimes(moved)
    }

    /// Notes that applying made, replaced or removed a name in `dir` (or made `dir`):
    /// its mtime moved, and is put back before the volume lock goes.
    pub(super) fn moved(&mut self, dir: &VolPath) {
        if !self.moved_dirs.contains(dir) {
            self.moved_dirs.insert(dir.clone());
        }
    }

    /// Gives each of `dirs` the mtime its entry records. A directory whose permissions
    /// or owner differ from its entry was changed locally: it is left for the next scan.
    fn restore_mtimes(&self, dirs: impl IntoIterator<Item = VolPath>) -> Result<(), SyncError> {
        let vol = self.volume().id;
        let store = &self.node.store;
        let mut batch = store.batch();
        let mut echoes = Vec::new();
        for path in dirs {
            let Some((parent, name)) = path.split_last() else {
                continue; // The volume root: its mtime is the mount point's own.
            };
            let Some(entry) = store.entry(vol, &parent, name)?.filter(Entry::is_dir) else {
                continue;
            };
            let Ok(fd) = self.volume().fs.open_dir(&path, false) else {
                continue;
            };
            let stat = FileStat::of(&fd).map_err(SyncError::local(path.display().to_string()))?;
            let owner_kept =
                !self.node.sync_ownership || (stat.uid(), stat.gid()) == (entry.uid, entry.gid);
            if stat.permissions() != entry.mode || !owner_kept {
                continue;
            }
            crate::volume_fs::set_mtime(&fd, entry.mtime_ns)
                .map_err(SyncError::local(path.display().to_string()))?;
            let stamp = FileStat::of(&fd)
                .map_err(SyncError::local(path.display().to_string()))?
                .stamp();
            batch.put_stamp(vol, &parent, name, &stamp);
            echoes.push((path, Some(stamp)));
            if batch.len() >= RESTORE_BATCH {
                store.write(
                    std::mem::replace(&mut batch, store.batch()),
                    Durability::Buffered,
                )?;
            }
        }
        store.write(batch, Durability::Buffered)?;
        self.volume().echoes.expect(echoes);
        Ok(())
    }

    /// Keeps the versions `deletes` are about to remove (those a delete would apply to
    /// now): their chunks appended to a version pack, made durable in one fsync, and
    /// their pack records written, before any file goes. Each record is written with
    /// its name's tombstone; the packs they rely on stay pinned until the returned
    /// [`KeptChunks`] is dropped.
    fn keep_deleted(&self, deletes: &[Deferred]) -> Result<(KeptVersions, KeptChunks), SyncError> {
        let vol = self.volume().id;
        let mut kept = self.node.store.kept_chunks();
        let mut versions = HashMap::new();
        for Deferred {
            dir,
            name,
            tombstone,
            ..
        } in deletes
        {
            let Some(local) = self.node.store.entry(vol, dir, name)? else {
                continue;
            };
            if tombstone.version.compare(&local.version) != Causality::Dominates {
                continue;
            }
            let record = self.keep_version(
                &mut kept,
                (dir, name),
                &local,
                (&tombstone.version, &[]),
                Why::Deleted,
            )?;
            if let Some(record) = record {
                versions.insert((dir.clone(), name.clone()), record);
            }
        }
        let mut batch = self.node.store.batch();
        kept.finish(&self.node.store, &mut batch)?;
        self.node.store.write(batch, Durability::Buffered)?;
        Ok((versions, kept))
    }

    /// Applies the deferred deletes, deepest first (a directory after the names in it),
    /// a chunk of [`DELETE_CHUNK`] at a time ([`Pull::delete_chunk`]). Every delete is
    /// durable when this returns (its directory fsynced), before the round's index
    /// writes are made durable and its feed mark moves.
    pub(super) fn apply_deletes(&mut self) -> Result<(), SyncError> {
        let mut deletes = std::mem::take(&mut self.deferred);
        self.rename_sources.clear();
        self.renames_seen = 0;
        deletes.sort_by(|a, b| {
            (std::cmp::Reverse(a.dir.depth()), a.dir.as_bytes(), &a.name).cmp(&(
                std::cmp::Reverse(b.dir.depth()),
                b.dir.as_bytes(),
                &b.name,
            ))
        });
        // A name can be queued twice in a round: a change the feed brought, and again
        // as a child of a directory the peer deleted (compared whole). The first stays.
        deletes.dedup_by(|later, first| later.dir == first.dir && later.name == first.name);
        let started = std::time::Instant::now();
        let count = deletes.len();
        // `kept` pins the packs the records rely on until the last of them is written.
        let (mut versions, kept) = self.keep_deleted(&deletes)?;
        let keep_ms = started.elapsed().as_millis() as u64;
        let mut deletes = deletes.into_iter().peekable();
        while let Some(first) = deletes.next() {
            let depth = first.dir.depth();
            let mut chunk = vec![first];
            while chunk.len() < DELETE_CHUNK
                && let Some(next) = deletes.next_if(|d| d.dir.depth() == depth)
            {
                chunk.push(next);
            }
            self.delete_chunk(chunk, &mut versions)?;
        }
        drop(kept);
        if count > 0 {
            let total_ms = started.elapsed().as_millis() as u64;
            tracing::debug!(count, keep_ms, total_ms, "deletes applied");
        }
        Ok(())
    }

    /// Removes one chunk of deletes, all at one depth (none inside another), from disk
    /// and records them: each decided against the index and the disk first, then removed
    /// from [`DELETE_THREADS`] threads at once, recorded, and each directory that lost a
    /// name fsynced (from as many threads), or, past [`FSYNC_EACH_UP_TO`] directories,
    /// the file system flushed once (`syncfs`). An unlink, and a directory fsync's cache
    /// flush, each wait on the device (about 3 ms each on this machine's ext4 mounted
    /// with `discard`): one at a time, 1,000 deletes in 1,000 directories took 6 s;
    /// overlapped, they take a fraction of it. Removals that succeed are recorded even
    /// when another fails (the first error is returned after).
    fn delete_chunk(
        &mut self,
        chunk: Vec<Deferred>,
        versions: &mut KeptVersions,
    ) -> Result<(), SyncError> {
        let vol = self.volume().id;
        let node = self.node.clone();
        let volume = &node.volumes[self.volume_index];
        // The chunk's directories, each opened once (the deletes come sorted by them).
        let mut dirs: Vec<(VolPath, DirOnDisk)> = Vec::new();
        let mut decided = Vec::with_capacity(chunk.len());
        for delete in chunk {
            if dirs.last().is_none_or(|(dir, _)| *dir != delete.dir) {
                let opened = DirOnDisk::open(&volume.fs, &delete.dir);
                dirs.push((delete.dir.clone(), opened));
            }
            let dir_index = dirs.len() - 1;
            if let DirOnDisk::Unopenable = dirs[dir_index].1 {
                continue;
            }
            let Some(local) = self.node.store.entry(vol, &delete.dir, &delete.name)? else {
                continue;
            };
            if local.is_tombstone()
                || delete.tombstone.version.compare(&local.version) != Causality::Dominates
            {
                continue;
            }
            let removal = match &dirs[dir_index].1 {
                // Removed here since the last scan, with everything in it: the name is
                // gone as the delete has it (its tombstone is recorded, or it would stay
                // live in the index under a deleted directory, on no disk).
                DirOnDisk::Gone => Removal::Gone,
                _ if local.is_dir() => Removal::Dir,
                DirOnDisk::Open(dir_fd)
                    if self.unchanged_on_disk(dir_fd, &delete.dir, &delete.name)? =>
                {
                    Removal::File(self.node.store.stamp(vol, &delete.dir, &delete.name)?)
                }
                _ => Removal::InTheWay,
            };
            decided.push((delete, local, dir_index, removal));
        }
        if let Some(pause) = self.node.faults.pause_before_removing
            && decided.iter().any(|(.., r)| matches!(r, Removal::File(_)))
        {
            tracing::warn!(
                "FAULT INJECTION: pausing {} ms between deciding deletes and removing them",
                pause.as_millis()
            );
            std::thread::sleep(pause);
        }
        let us = node.meta.node_id;
        let removed = overlapped(&decided, |(delete, local, dir_index, removal)| {
            let DirOnDisk::Open(dir_fd) = &dirs[*dir_index].1 else {
                // Only a delete in a directory found gone is decided without it open.
                return Ok(true);
            };
            match removal {
                Removal::Gone => Ok(true),
                Removal::Dir => volume.fs.remove_dir(dir_fd, &delete.name),
                Removal::File(expected) => {
                    let changed = changed_here(local, us);
                    let spare_names =
                        |attempt| conflict_name(&delete.name, &changed, &delete.tombstone, attempt);
                    let removal = volume.fs.remove_file_as_checked(
                        dir_fd,
                        &delete.name,
                        expected.as_ref(),
                        spare_names,
                    )?;
                    if removal != OnDisk::Removed {
                        changed_while_removed(&delete.name, &removal);
                    }
                    Ok(removal == OnDisk::Removed)
                }
                Removal::InTheWay => Ok(false),
            }
        });
        let mut first_error = None;
        let mut changed_dirs = vec![false; dirs.len()];
        let mut echoes = Vec::new();
        // The chunk's records go in one write (each reads only keys of its own name),
        // also those recorded before an index read failed.
        let mut batch = node.store.batch();
        let mut index_error = None;
        let mut removed_dirs = Vec::new();
        for ((delete, local, dir_index, _), removed) in decided.into_iter().zip(removed) {
            let removed = match removed {
                Ok(removed) => removed,
                Err(e) => {
                    first_error.get_or_insert(e);
                    continue;
                }
            };
            let Deferred {
                dir,
                name,
                tombstone,
                sent_by,
            } = delete;
            if removed {
                self.moved(&dir);
                if let Err(e) = self.forget_chunks_in(&mut batch, &dir, &name, &local) {
                    index_error = Some(e);
                    break;
                }
                if let Some(version) = versions.remove(&(dir.clone(), name.clone())) {
                    batch.put_version(&version);
                }
                batch.put_entry_sent_by(vol, &dir, &name, &tombstone, sent_by);
                batch.delete_stamp(vol, &dir, &name);
                let path = dir.join(&name);
                if let Ok(path) = &path {
                    batch.delete_tree_node(vol, path);
                    batch.clear_dirty(vol, path);
                    echoes.push((path.clone(), None));
                    if local.is_dir() {
                        removed_dirs.push(path.clone());
                    }
                }
                batch.mark_dirty(vol, &dir);
                self.report.deleted += 1;
                changed_dirs[dir_index] = true;
                let path = path.map(|p| escape(p.as_bytes()));
                self.note_applied("delete of", path.unwrap_or_else(|_| escape(&name)), 0);
            } else {
                // Something new is in the way: keep it, and make our version win.
                // The tombstone dominates ours: merged, it is the tombstone's own.
                let mut version = tombstone
                    .version
                    .merged(&local.version)
                    .unwrap_or_else(|_| tombstone.version.clone());
                let ours = (vol, &dir, &name[..]);
                if let Err(e) = node.store.count_ours(&mut batch, ours, us, &mut version) {
                    index_error = Some(e.into());
                    break;
                }
                batch.put_entry(vol, &dir, &name, &Entry { version, ..local });
                self.report.skipped += 1;
            }
        }
        node.store.write(batch, Durability::Buffered)?;
        volume.echoes.expect(echoes);
        if let Some(e) = index_error {
            return Err(e);
        }
        self.delete_left_under(&removed_dirs)?;
        let to_sync: Vec<&OwnedFd> = dirs
            .iter()
            .zip(changed_dirs)
            .filter_map(|((_, opened), changed)| match opened {
                DirOnDisk::Open(fd) if changed => Some(fd),
                _ => None,
            })
            .collect();
        if to_sync.len() > FSYNC_EACH_UP_TO {
            volume.fs.sync_all()?;
        } else {
            for synced in overlapped(&to_sync, |fd| crate::volume_fs::VolumeFs::fsync_dir(fd)) {
                synced?;
            }
        }
        match first_error {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    /// Records as deleted here every name the index still holds as live under
    /// `removed`, directories whose deletes this round has just recorded: each is off the
    /// disk (removed empty, or found gone), so nothing under it is on disk either. Such a
    /// name was not among the peer's deletes (written or changed here concurrently with
    /// them, so the delete did not dominate it), and the local removal of its directory
    /// took it before any scan saw that. It is recorded as a scan records a name found
    /// gone: a delete of ours. Left live it would stay in the index on no disk for good:
    /// a scan lists only live directories.
    ///
    /// Only children are read, and the children of a live directory found there: a
    /// removed subdirectory had its own sweep (deletes run deepest first), so an `rm -rf`
    /// of a deep tree reads each name once, not once for each directory above it.
    fn delete_left_under(&mut self, removed: &[VolPath]) -> Result<(), SyncError> {
        let vol = self.volume().id;
        let node = self.node.clone();
        let us = node.meta.node_id;
        let mut batch = node.store.batch();
        let mut pending = removed.to_vec();
        while let Some(parent) = pending.pop() {
            for item in node.store.children(vol, &parent) {
                let (name, local) = item?;
                let path = parent.join(&name)?;
                // A name whose delete the guard holds stays live while gone, by design.
                if local.is_tombstone() || self.volume().guard.covers(&path) {
                    continue;
                }
                let at = (vol, &parent, &name[..]);
                let now = crate::scan::now_ns();
                node.store
                    .put_delete_of_ours(&mut batch, at, &local, us, now)?;
                if local.is_dir() {
                    // Left live under a removed directory: what it holds is too.
                    pending.push(path.clone());
                }
                self.report.deleted += 1;
                tracing::info!(
                    volume = %self.volume().name,
                    "{}: gone from disk with its directory before a scan saw it; deleted",
                    escape(path.as_bytes())
                );
                if batch.len() >= LEFT_UNDER_PER_WRITE {
                    let full = std::mem::replace(&mut batch, node.store.batch());
                    node.store.write(full, Durability::Buffered)?;
                }
            }
        }
        node.store.write(batch, Durability::Buffered)?;
        Ok(())
    }
}

/// Names [`Pull::delete_left_under`] records in one index write, at most (its batch is
/// bounded whatever the number of names left under a removed directory).
const LEFT_UNDER_PER_WRITE: usize = 4096;

/// Deletes removed (and their directories held open) at once, at most.
const DELETE_CHUNK: usize = 256;

/// Threads that remove names, or fsync directories, at once.
const DELETE_THREADS: usize = 16;

/// What a file written here after its check (`old` as indexed before) is as the loser
/// of its name, for a conflict-copy name ([`conflict_name`]): a change of ours (`us`),
/// made now.
fn changed_here(old: &Entry, us: NodeId) -> Entry {
    let mut changed = old.clone();
    changed.version.bump(us);
    changed.mtime_ns = crate::scan::now_ns();
    changed
}

/// Says that `name` was written here while sync removed it, and is kept.
fn changed_while_removed(name: &[u8], removal: &OnDisk) {
    let beside = match removal {
        OnDisk::KeptAs(spare) => format!(" as {}", escape(spare)),
        _ => String::new(),
    };
    tracing::info!(
        "{} changed here while sync removed it; kept{beside}",
        escape(name)
    );
}

/// What a delete does on disk, decided before any of its chunk is removed.
enum Removal {
    /// The name's directory is gone from disk: so is the name, nothing to remove.
    Gone,
    /// An empty directory goes (one that is not empty stays: something new is in it).
    Dir,
    /// The file goes if it is still what its stamp in the index says (`None`: none,
    /// and nothing was there).
    File(Option<ScanStamp>),
    /// The file changed here since the last scan: it stays, and our version wins.
    InTheWay,
}

/// The directory a chunk of deletes is in, as opening it found it.
enum DirOnDisk {
    Open(OwnedFd),
    /// Not there (nor anything in it): removed, or replaced by a file or symlink.
    Gone,
    /// There, but it would not open (permissions, I/O): its names are left as they are.
    Unopenable,
}

impl DirOnDisk {
    fn open(fs: &crate::volume_fs::VolumeFs, dir: &VolPath) -> Self {
        match fs.open_dir(dir, false) {
            Ok(fd) => DirOnDisk::Open(fd),
            Err(e) if e.is_gone() => DirOnDisk::Gone,
            Err(e) => {
                tracing::warn!("cannot apply deletes in {}: {e}", dir.display());
                DirOnDisk::Unopenable
            }
        }
    }
}

/// `work` applied to every item, from up to [`DELETE_THREADS`] threads at once, the
/// results in the items' order: for calls that wait on the device, not the CPU.
fn overlapped<T: Sync, R: Send>(
    items: &[T],
    work: impl Fn(&T) -> Result<R, crate::volume_fs::FsError> + Sync,
) -> Vec<Result<R, crate::volume_fs::FsError>> {
    if items.len() <= 1 {
        return items.iter().map(&work).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let threads = DELETE_THREADS.min(items.len());
    let mut results: Vec<(usize, Result<R, crate::volume_fs::FsError>)> =
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    scope.spawn(|| {
                        let mut done = Vec::new();
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            let Some(item) = items.get(i) else {
                                return done;
                            };
                            done.push((i, work(item)));
                        }
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|worker| worker.join().expect("a delete worker does not panic"))
                .collect()
        });
    results.sort_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, result)| result).collect()
}
