//! Deciding each name: the peer's version, ours, or a conflict.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::Ordering;

use super::files::FileJob;
use super::{Deferred, MAX_DEFERRED_DELETES, Pull, RemoteDir};
use crate::chunking::ChunkRef;
use crate::entry::{Causality, Entry, EntryKind};
use crate::pathname::{VolPath, escape, escape_in};
use crate::protocol::WireEntry;
use crate::store::Durability;
use crate::sync::{SyncError, conflict};

/// Numbered conflict-copy names tried when the usual one is taken.
const MAX_CONFLICT_NAME_ATTEMPTS: u32 = 100;

/// What the peer told us beside an entry.
#[derive(Clone, Default)]
pub(super) struct Hints {
    /// A directory's sync hash.
    pub(super) subtree: Option<crate::ids::TreeHash>,
    /// A small file's chunk list, sent inline.
    pub(super) chunks: Option<Vec<ChunkRef>>,
}

impl Pull {
    /// Decides one of the peer's entries against ours and applies or schedules it.
    /// Runs under the volume lock; never waits on the network (directories to descend
    /// into are asked for later, see [`RemoteDir::Present`]).
    pub(super) fn reconcile(&mut self, dir: &VolPath, wire: WireEntry) -> Result<(), SyncError> {
        let vol = self.volume().id;
        let WireEntry {
            name,
            entry: mut remote,
            subtree,
            chunks,
        } = wire;
        // When a delete expires here is this node's business: it counts from when the
        // tombstone arrived, whatever time the peer claims (invariant 9).
        if let EntryKind::Tombstone { deleted_at_ns } = &mut remote.kind {
            *deleted_at_ns = crate::scan::now_ns();
        }
        let hints = Hints { subtree, chunks };
        let path = dir.join(&name)?;
        if path.is_shoal_internal() {
            tracing::warn!(peer = %self.peer.addr, "ignoring an entry for Shoal's own directory: {}", path.display());
            return Ok(());
        }
        if self.volume().guard.covers(&path) {
            // The delete guard holds this name's delete (or an ancestor's): what the
            // peer has of it must not bring it back before the operator releases it.
            self.report.held += 1;
            return Ok(());
        }
        let local = self.node.store.entry(vol, dir, &name)?;
        // A history too long to merge with ours (and still take one more bump) is
        // refused whole: stored, it could no longer be encoded (invariant 9).
        let ours = local
            .as_ref()
            .map(|l| l.version.clone())
            .unwrap_or_default();
        if let Err(e) = remote.version.merged(&ours) {
            tracing::warn!(peer = %self.peer.addr, "refusing the peer's entry for {}: {e}", path.display());
            self.report.skipped += 1;
            return Ok(());
        }
        let local_live = local.as_ref().filter(|l| !l.is_tombstone());

        // Both directories: descend if their contents differ, whatever the entries say.
        if remote.is_dir() && local_live.is_some_and(Entry::is_dir) {
            let local_hash = self
                .node
                .store
                .tree_node(vol, &path)?
                .map(|n| n.sync_hash());
            if hints.subtree.is_some() && hints.subtree != local_hash {
                self.queue_dir(path.clone(), RemoteDir::Present)?;
            }
        }
        let Some(local) = local else {
            if remote.is_tombstone() {
                // Remember the delete so it reaches nodes that still have the name.
                let mut batch = self.node.store.batch();
                batch.put_entry_sent_by(vol, dir, &name, &remote, self.sent_by());
                batch.mark_dirty(vol, dir);
                self.node.store.write(batch, Durability::Buffered)?;
            } else {
                self.take(dir, &name, remote, None, &hints, self.sent_by())?;
            }
            return Ok(());
        };
        match remote.version.compare(&local.version) {
            Causality::Equal if !remote.same_state(&local) => {
                // One history with two states: a conflict's loser moved aside on one
                // node (a tombstone with the loser's history) while another still holds
                // it, until the winner, which succeeds both, arrives. Said, so that a
                // pair that never settles shows in the log.
                let state = |e: &Entry| {
                    if e.is_tombstone() {
                        "deleted"
                    } else {
                        "present"
                    }
                };
                tracing::info!(
                    peer = %self.peer.addr,
                    "{}: the peer's version has the same history as ours but differs ({} here, {} there); left for a later version to settle",
                    path.display(),
                    state(&local),
                    state(&remote)
                );
                Ok(())
            }
            Causality::Equal | Causality::DominatedBy => Ok(()),
            Causality::Dominates if remote.same_state(&local) => {
                self.record_version(dir, &name, remote, self.sent_by())
            }
            Causality::Dominates if remote.is_tombstone() => {
                if local.is_dir() {
                    // The peer deleted the directory: compare all of its children first.
                    self.queue_dir(path, RemoteDir::Deleted)?;
                }
                self.defer_delete(dir, name, remote, self.sent_by())
            }
            Causality::Dominates => {
                if local.is_dir() && !remote.is_dir() {
                    // The directory must empty before the file can take its place.
                    self.queue_dir(path, RemoteDir::Deleted)?;
                }
                self.take(dir, &name, remote, Some(local), &hints, self.sent_by())
            }
            Causality::Concurrent if remote.same_state(&local) => {
                let merged = Entry {
                    version: remote.version.merged(&local.version)?,
                    ..local
                };
                self.record_version(dir, &name, merged, None)
            }
            // A directory changed on both sides (each added a name, say) is no conflict:
            // the contents merge name by name, and of its own metadata the rule that
            // picks a conflict's winner keeps one.
            Causality::Concurrent if remote.is_dir() && local.is_dir() => {
                let version = remote.version.merged(&local.version)?;
                if conflict::wins(&remote, &local) {
                    let winner = Entry { version, ..remote };
                    self.take(dir, &name, winner, Some(local), &hints, None)
                } else {
                    self.record_version(dir, &name, Entry { version, ..local }, None)
                }
            }
            Causality::Concurrent => self.conflict(dir, &name, remote, local, &hints),
        }
    }

    /// The peer's node id, for an entry this round writes exactly as the peer sent it
    /// (`sent_by`): the change feed then leaves the name out of its answers to that
    /// peer, which holds it already (store.md "Change feed", origins).
    pub(super) fn sent_by(&self) -> Option<crate::ids::NodeId> {
        self.peer.node_id()
    }

    fn record_version(
        &mut self,
        dir: &VolPath,
        name: &[u8],
        entry: Entry,
        sent_by: Option<crate::ids::NodeId>,
    ) -> Result<(), SyncError> {
        let mut batch = self.node.store.batch();
        batch.put_entry_sent_by(self.volume().id, dir, name, &entry, sent_by);
        // Histories are part of the tree's `versions` hash.
        batch.mark_dirty(self.volume().id, dir);
        self.node.store.write(batch, Durability::Buffered)?;
        Ok(())
    }

    pub(super) fn defer_delete(
        &mut self,
        dir: &VolPath,
        name: Vec<u8>,
        tombstone: Entry,
        sent_by: Option<crate::ids::NodeId>,
    ) -> Result<(), SyncError> {
        self.deferred.push(Deferred {
            dir: dir.clone(),
            name,
            tombstone,
            sent_by,
        });
        if self.deferred.len() >= MAX_DEFERRED_DELETES {
            self.apply_deletes()?;
        }
        Ok(())
    }

    fn conflict(
        &mut self,
        dir: &VolPath,
        name: &[u8],
        remote: Entry,
        local: Entry,
        hints: &Hints,
    ) -> Result<(), SyncError> {
        let merged_version = remote.version.merged(&local.version)?;
        let remote_wins = conflict::wins(&remote, &local);
        // A live version that beats a concurrent delete (live beats deleted) whose only
        // news is the delete itself keeps its own history. Merged, it would carry the
        // delete's count: a node that saw the live version and not that delete, and
        // then deletes it, would make a tombstone concurrent with the merge, which it
        // loses again, and the name would come back although the delete came after the
        // content it deleted. Unmerged, such a delete dominates it; a node still holding
        // the losing tombstone takes the live version when it pulls it (the same rule).
        // A delete that saw more (an edit the live version lacks) is merged as before,
        // so that what it replaced stays replaced.
        let (live, deleted) = if remote.is_tombstone() {
            (&local, &remote)
        } else {
            (&remote, &local)
        };
        if remote.is_tombstone() != local.is_tombstone()
            && conflict::only_news_is_the_delete(deleted, live)
        {
            if remote.is_tombstone() {
                return Ok(());
            }
            tracing::info!(peer = %self.peer.addr, "concurrent changes to {}: the peer's version wins over our delete", escape_in(dir, name));
            self.keep_count_of_our_delete(dir, name, deleted, live)?;
            self.report.conflicts += 1;
            self.node.stats.conflicts.fetch_add(1, Ordering::Relaxed);
            return self.take(dir, name, remote, None, hints, self.sent_by());
        }
        let (winner, loser) = if remote_wins {
            (&remote, &local)
        } else {
            (&local, &remote)
        };
        if let Some(copy_name) = self.kept_already(dir, name, loser, winner)? {
            tracing::info!(
                peer = %self.peer.addr,
                "concurrent changes to {}: {} version wins, the other is kept already as {}",
                escape_in(dir, name),
                if remote_wins { "the peer's" } else { "our" },
                escape(&copy_name)
            );
            self.report.conflicts += 1;
            self.node.stats.conflicts.fetch_add(1, Ordering::Relaxed);
            let version = merged_version;
            return if remote_wins {
                // Replaced only if unchanged since it was indexed, as any file is.
                let winner = Entry { version, ..remote };
                self.take(dir, name, winner, Some(local), hints, None)
            } else {
                self.record_version(dir, name, Entry { version, ..local }, None)
            };
        }
        let Some(copy_name) = self.free_conflict_name(dir, name, loser, winner)? else {
            tracing::warn!(peer = %self.peer.addr, "concurrent changes to {}: every conflict-copy name is taken; trying again next round", escape_in(dir, name));
            self.report.skipped += 1;
            return Ok(());
        };
        tracing::info!(
            peer = %self.peer.addr,
            "concurrent changes to {}: {} version wins{}",
            escape_in(dir, name),
            if remote_wins { "the peer's" } else { "our" },
            if loser.is_tombstone() { String::new() } else { format!(", the other is kept as {}", escape(&copy_name)) }
        );
        self.report.conflicts += 1;
        self.node.stats.conflicts.fetch_add(1, Ordering::Relaxed);
        if remote_wins {
            // Our version moves aside, under its conflict name, with its history.
            if !local.is_tombstone()
                && !self.move_aside(dir, name, &local, &copy_name, &merged_version)?
            {
                self.report.skipped += 1;
                return Ok(());
            }
            let winner = Entry {
                version: merged_version,
                ..remote
            };
            self.take(dir, name, winner, None, hints, None)
        } else {
            if !remote.is_tombstone() {
                self.take_as_copy(dir, name, remote, copy_name, hints)?;
            }
            self.record_version(
                dir,
                name,
                Entry {
                    version: merged_version,
                    ..local
                },
                None,
            )
        }
    }

    /// The name of the conflict copy that keeps `loser`'s content already, if one does:
    /// the name every node picks alike, live in the index or queued to be taken this
    /// round with that very content. Another node decided the same conflict first and
    /// its copy reached us before its winner did; a second copy would only hold the same
    /// bytes under a numbered name.
    fn kept_already(
        &self,
        dir: &VolPath,
        name: &[u8],
        loser: &Entry,
        winner: &Entry,
    ) -> Result<Option<Vec<u8>>, SyncError> {
        if !matches!(loser.kind, EntryKind::File { .. }) {
            return Ok(None);
        }
        let copy_name = conflict::conflict_name(name, loser, winner, 0);
        let queued = self
            .queued_at(dir, &copy_name)
            .any(|job| job.entry.kind == loser.kind);
        let indexed = || -> Result<bool, SyncError> {
            let copy = self.node.store.entry(self.volume().id, dir, &copy_name)?;
            Ok(copy.is_some_and(|copy| copy.kind == loser.kind))
        };
        Ok((queued || indexed()?).then_some(copy_name))
    }

    /// The files this round is about to take at `dir/name`.
    fn queued_at<'a>(
        &'a self,
        dir: &'a VolPath,
        name: &'a [u8],
    ) -> impl Iterator<Item = &'a FileJob> + 'a {
        self.files
            .iter()
            .filter(move |job| job.dir == *dir && job.name == name)
    }

    /// The conflict-copy name for `loser`: the one every node picks alike, or, if that
    /// name is taken here (on disk, live in the index, or a file this round is about to
    /// take), the first numbered one that
    /// is free (a planted name must not stall sync). `None` if all are taken.
    fn free_conflict_name(
        &self,
        dir: &VolPath,
        name: &[u8],
        loser: &Entry,
        winner: &Entry,
    ) -> Result<Option<Vec<u8>>, SyncError> {
        let vol = self.volume().id;
        let dir_fd = self.volume().fs.open_dir(dir, false).ok();
        for attempt in 0..MAX_CONFLICT_NAME_ATTEMPTS {
            let candidate = conflict::conflict_name(name, loser, winner, attempt);
            let on_disk = dir_fd
                .as_ref()
                .is_some_and(|fd| self.volume().fs.stat(fd, &candidate).is_ok());
            let indexed = self
                .node
                .store
                .entry(vol, dir, &candidate)?
                .is_some_and(|e| !e.is_tombstone());
            let queued = self.queued_at(dir, &candidate).next().is_some();
            if !on_disk && !indexed && !queued {
                return Ok(Some(candidate));
            }
        }
        Ok(None)
    }

    /// Before `live` takes the name from our `deleted` without our delete's count
    /// ([`conflict::only_news_is_the_delete`]): keeps that count as issued for the name
    /// ([`crate::store::Store::issued`]), so that our next change of it is counted past
    /// it. Counted again, that change would look, to a node that merged our delete with
    /// another's, like one it has seen, and be deleted there.
    fn keep_count_of_our_delete(
        &self,
        dir: &VolPath,
        name: &[u8],
        deleted: &Entry,
        live: &Entry,
    ) -> Result<(), SyncError> {
        let (vol, us) = (self.volume().id, self.node.meta.node_id);
        let ours = deleted.version.get(us);
        if ours <= live.version.get(us) {
            return Ok(());
        }
        let issued = self.node.store.issued(vol, dir, name)?.unwrap_or(0);
        let mut batch = self.node.store.batch();
        batch.put_issued(vol, dir, name, ours.max(issued));
        self.node.store.write(batch, Durability::Buffered)?;
        Ok(())
    }

    /// Renames our version of `dir/name` to `copy_name`, its index records with it, and
    /// records the name as deleted here: it is empty on disk until the winner is
    /// published, and may stay so (the winner's transfer fails, the node is killed). The
    /// index must say what the disk holds: a live entry left under the name would be one
    /// that no scan checks (it has no stamp), kept by this node and sent to its peers.
    /// The copy gets no stamp: the next scan reads it (what the rename moved is what was
    /// there, and only a read says so for certain).
    ///
    /// `false` if the name is not as the last scan saw it (changed, or gone: a local
    /// delete not scanned yet) or cannot be moved: it stays, and the next round decides
    /// again; one name that cannot be kept aside does not end the round.
    fn move_aside(
        &mut self,
        dir: &VolPath,
        name: &[u8],
        local: &Entry,
        copy_name: &[u8],
        winner: &crate::entry::VersionVector,
    ) -> Result<bool, SyncError> {
        let vol = self.volume().id;
        let dir_fd = self.volume().fs.open_dir(dir, false)?;
        let on_disk = self.volume().fs.stat(&dir_fd, name).is_ok();
        if !on_disk || !self.unchanged_on_disk(&dir_fd, dir, name)? {
            tracing::info!(
                "{} changed here since the last scan; the conflict is decided again next round",
                escape_in(dir, name)
            );
            return Ok(false);
        }
        // The loser is a version of the name too: kept whatever becomes of its copy.
        let mut kept = self.node.store.kept_chunks();
        let version = self.keep_version(
            &mut kept,
            (dir, name),
            local,
            (winner, &[]),
            crate::store::versions::Why::ConflictLoser,
        )?;
        if let Err(e) = rustix::fs::renameat_with(
            &dir_fd,
            OsStr::from_bytes(name),
            &dir_fd,
            OsStr::from_bytes(copy_name),
            rustix::fs::RenameFlags::NOREPLACE,
        ) {
            tracing::warn!(
                "cannot keep {} aside as the conflict copy {}: {e}; the conflict is decided again next round",
                escape_in(dir, name),
                escape(copy_name)
            );
            return Ok(false);
        }
        self.moved(dir);
        crate::volume_fs::VolumeFs::fsync_dir(&dir_fd)?;
        let mut batch = self.node.store.batch();
        kept.finish(&self.node.store, &mut batch)?;
        if let Some(version) = &version {
            batch.put_version(version);
        }
        batch.put_entry(vol, dir, copy_name, local);
        if let EntryKind::File { .. } = local.kind {
            let chunks = self
                .indexed_chunks(dir, name, Some(local))?
                .unwrap_or_default();
            batch.delete_chunks(vol, dir, name, &chunks);
            batch.set_chunks(vol, dir, copy_name, &chunks, Some(&[]));
        }
        // Our version left the name. The tombstone keeps our version's history as it
        // is, with no count of ours added: the winner, which is merged from both, then
        // succeeds it everywhere, and no node that saw this tombstone holds a count that
        // the winner lacks (a later delete of the winner elsewhere would lose to it).
        let moved = Entry::deleted(local.version.clone(), crate::scan::now_ns());
        batch.put_entry(vol, dir, name, &moved);
        batch.delete_stamp(vol, dir, name);
        batch.mark_dirty(vol, dir);
        self.node.store.write(batch, Durability::Durable)?;
        // The record is written: the packs it relies on may be collected again.
        drop(kept);
        if self.node.faults.crash_after_move_aside {
            tracing::warn!("FAULT INJECTION: dying after moving a conflict's loser aside");
            std::process::exit(99);
        }
        Ok(true)
    }

    /// Takes the peer's losing version of `dir/name` under `copy_name`.
    fn take_as_copy(
        &mut self,
        dir: &VolPath,
        name: &[u8],
        remote: Entry,
        copy_name: Vec<u8>,
        hints: &Hints,
    ) -> Result<(), SyncError> {
        let copy_path = dir.join(&copy_name)?;
        let source_path = dir.join(name)?;
        // A conflict copy is a file of its own, in no hard-link group.
        let remote = Entry {
            link: None,
            ..remote
        };
        match &remote.kind {
            EntryKind::File { .. } => {
                let decided_against = self.node.store.entry(self.volume().id, dir, &copy_name)?;
                self.queue_file(FileJob {
                    dir: dir.clone(),
                    name: copy_name,
                    entry: remote,
                    source_path,
                    replaces: None,
                    decided_against,
                    chunks: hints.chunks.clone(),
                    sent_by: None,
                });
                Ok(())
            }
            _ => {
                let (copy_dir, copy) = copy_path.split_last().expect("a joined path has a name");
                self.take(&copy_dir, copy, remote, None, &Hints::default(), None)
            }
        }
    }
}
