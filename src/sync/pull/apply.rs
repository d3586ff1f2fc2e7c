//! Applying what was decided: directories, symlinks and FIFOs in place, deletes at the
//! end, then the directories' mtimes.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;

use super::decide::Hints;
use super::files::FileJob;
use super::{Pull, RemoteDir};
use crate::chunking::ChunkRef;
use crate::entry::{Causality, Entry, EntryKind, MODE_MASK};
use crate::pathname::{VolPath, escape};
use crate::store::Durability;
use crate::store::codec::ScanStamp;
use crate::store::versions::{KeptChunks, VersionRecord, Why};
use crate::sync::SyncError;
use crate::volume_fs::stamp_of_stat;

/// The version records of a round's deletes, by name, until each is written with its
/// tombstone.
type KeptVersions = HashMap<(VolPath, Vec<u8>), VersionRecord>;

/// Directory stamps written at once by [`Pull::restore_dir_mtimes`].
const RESTORE_BATCH: usize = 1024;

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
        let recorded = self.node.store.stamp(self.volume().id, dir, name)?;
        let current = self
            .volume()
            .fs
            .stat(dir_fd, name)
            .ok()
            .map(|s| stamp_of_stat(&s));
        Ok(match (recorded, current) {
            (_, None) => true,
            (Some(recorded), Some(current)) => same(&recorded, &current),
            (None, Some(_)) => false,
        })
    }

    /// Takes the peer's `remote` entry for `dir/name`: a file is queued for fetching, a
    /// directory, symlink or FIFO is placed now, a delete waits for the end of the round.
    /// A name this node's file system refuses is noted and skipped ([`Pull::placed`]).
    pub(super) fn take(
        &mut self,
        dir: &VolPath,
        name: &[u8],
        remote: Entry,
        replaces: Option<Entry>,
        hints: &Hints,
    ) -> Result<(), SyncError> {
        let result = self.take_entry(dir, name, remote, replaces, hints);
        self.placed(dir, name, result)
    }

    fn take_entry(
        &mut self,
        dir: &VolPath,
        name: &[u8],
        remote: Entry,
        replaces: Option<Entry>,
        hints: &Hints,
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
                    self.volume().fs.remove_file(&dir_fd, name)?;
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
                let stat = self.volume().fs.stat(&dir_fd, name)?;
                let mut batch = self.node.store.batch();
                batch.put_entry(vol, dir, name, &remote);
                batch.put_stamp(vol, dir, name, &stamp_of_stat(&stat));
                batch.mark_dirty(vol, dir);
                batch.mark_dirty(vol, &path);
                self.node.store.write(batch, Durability::Buffered)?;
                self.report.applied += 1;
                self.note_applied("dir", escape(path.as_bytes()), 0);
                if hints.subtree.is_some() && replaces.as_ref().is_none_or(|o| !o.is_dir()) {
                    self.queue_dir(path, RemoteDir::Present)?;
                }
                Ok(())
            }
            EntryKind::Symlink { .. } | EntryKind::Fifo => {
                self.place_special(dir, name, remote, replaces.as_ref())
            }
            // A delete that won a conflict: applied at the end like any other.
            EntryKind::Tombstone { .. } => self.defer_delete(dir, name.to_vec(), remote),
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
        if let Some(old) = replaces {
            self.forget_chunks_in(&mut batch, dir, name, old)?;
        }
        if let Some(version) = &version {
            batch.put_version(version);
        }
        batch.put_entry(vol, dir, name, &remote);
        batch.put_stamp(vol, dir, name, &stamp_of_stat(&stat));
        batch.mark_dirty(vol, dir);
        self.node.store.write(batch, Durability::Durable)?;
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
        let path = dir.join(name).map(|p| escape(p.as_bytes()));
        self.note_applied(what, path.unwrap_or_else(|_| escape(name)), 0);
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
            let chunks = self.indexed_chunks(dir, name, Some(old))?;
            batch.delete_chunks(self.volume().id, dir, name, &chunks);
        }
        Ok(())
    }

    /// The chunk list the index holds for `dir/name` when `entry` (the local entry there)
    /// is a file; empty otherwise.
    pub(super) fn indexed_chunks(
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

    /// Gives every directory whose index entries this round changed (its `dirty` mark)
    /// the mtime its entry records: applying its children moved it to the time of the
    /// sync, and the peer's time (or our last scan's) must stick, or the next scan would
    /// take the sync's own writes for a local change. Runs before every release of the
    /// volume lock (a scan may come next) and after everything else of the round, so
    /// nothing moves the mtime again. A directory whose permissions or owner
    /// differ from its entry was changed locally: it is left for the next scan.
    pub(super) fn restore_dir_mtimes(&self) -> Result<(), SyncError> {
        let vol = self.volume().id;
        let store = &self.node.store;
        let mut batch = store.batch();
        for path in store.dirty_dirs(vol)? {
            let Some((parent, name)) = path.split_last() else {
                continue; // The volume root: its mtime is the mount point's own.
            };
            let Some(entry) = store.entry(vol, &parent, name)?.filter(Entry::is_dir) else {
                continue;
            };
            let Ok(fd) = self.volume().fs.open_dir(&path, false) else {
                continue;
            };
            let stat = rustix::fs::fstat(&fd)
                .map_err(|e| SyncError::local(path.display().to_string())(e.into()))?;
            let owner_kept =
                !self.node.sync_ownership || (stat.st_uid, stat.st_gid) == (entry.uid, entry.gid);
            if stat.st_mode & MODE_MASK != entry.mode || !owner_kept {
                continue;
            }
            crate::volume_fs::set_mtime(&fd, entry.mtime_ns)
                .map_err(SyncError::local(path.display().to_string()))?;
            let stat = rustix::fs::fstat(&fd)
                .map_err(|e| SyncError::local(path.display().to_string())(e.into()))?;
            batch.put_stamp(vol, &parent, name, &stamp_of_stat(&stat));
            if batch.len() >= RESTORE_BATCH {
                store.write(
                    std::mem::replace(&mut batch, store.batch()),
                    Durability::Buffered,
                )?;
            }
        }
        store.write(batch, Durability::Buffered)?;
        Ok(())
    }

    /// Keeps the versions `deletes` are about to remove (those a delete would apply to
    /// now): their chunks appended to a version pack, made durable in one fsync, and
    /// their pack records written, before any file goes. Each record is written with
    /// its name's tombstone; the packs they rely on stay pinned until the returned
    /// [`KeptChunks`] is dropped.
    fn keep_deleted(
        &self,
        deletes: &[(VolPath, Vec<u8>, Entry)],
    ) -> Result<(KeptVersions, KeptChunks), SyncError> {
        let vol = self.volume().id;
        let mut kept = self.node.store.kept_chunks();
        let mut versions = HashMap::new();
        for (dir, name, tombstone) in deletes {
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

    /// Applies the deferred deletes, deepest first.
    pub(super) fn apply_deletes(&mut self) -> Result<(), SyncError> {
        let mut deletes = std::mem::take(&mut self.deferred);
        self.rename_sources.clear();
        self.renames_seen = 0;
        deletes.sort_by_key(|(dir, _, _)| std::cmp::Reverse(dir.depth()));
        let vol = self.volume().id;
        // `kept` pins the packs the records rely on until the last of them is written.
        let (mut versions, kept) = self.keep_deleted(&deletes)?;
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
                if let Some(version) = versions.remove(&(dir.clone(), name.clone())) {
                    batch.put_version(&version);
                }
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
                // The tombstone dominates ours: merged, it is the tombstone's own.
                let mut version = tombstone
                    .version
                    .merged(&local.version)
                    .unwrap_or_else(|_| tombstone.version.clone());
                version.bump(self.node.meta.node_id);
                batch.put_entry(vol, &dir, &name, &Entry { version, ..local });
                self.report.skipped += 1;
            }
            self.node.store.write(batch, Durability::Buffered)?;
            crate::volume_fs::VolumeFs::fsync_dir(&dir_fd)?;
            if removed {
                let path = dir.join(&name).map(|p| escape(p.as_bytes()));
                self.note_applied("delete of", path.unwrap_or_else(|_| escape(&name)), 0);
            }
        }
        drop(kept);
        Ok(())
    }
}
