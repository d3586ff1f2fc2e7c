//! Hard links: the other names of a hard-linked file, linked to their group's leader.
//!
//! A peer's entry names the group's leader ([`Entry::link`]). Once the round's files are
//! published, each other name is linked to the leader here, if the leader here is that
//! very file (same content, metadata and group, unchanged on disk since it was
//! indexed): the content is not fetched again, and a change through any name is a
//! change of all, as on the peer. Otherwise the name waits for a later round: fetching
//! it as a separate file would leave an index that says "linked" over a disk that is
//! not, which the next scan would take for a local change.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;

use super::Pull;
use crate::entry::Entry;
use crate::pathname::{VolPath, escape};
use crate::store::Durability;
use crate::store::versions::Why;
use crate::sync::SyncError;

impl Pull {
    /// Links the round's other names of hard-linked files to their leaders, under the
    /// volume lock.
    pub(super) async fn link_names(&mut self) -> Result<(), SyncError> {
        let jobs = std::mem::take(&mut self.links);
        if jobs.is_empty() {
            return Ok(());
        }
        let node = self.node.clone();
        let volume = &node.volumes[self.volume_index];
        let _guard = volume.lock.lock().await;
        // Every name of a group whose link count this changed: their ctimes moved.
        let mut touched = BTreeSet::new();
        for job in jobs {
            let Ok(path) = job.dir.join(&job.name) else {
                continue;
            };
            let Some(leader) = job.entry.link_leader(&path).cloned() else {
                continue;
            };
            match self.link_one(
                &job.dir,
                &job.name,
                &job.entry,
                &leader,
                &job.decided_against,
            ) {
                Ok(true) => {
                    self.note_applied("hard link", escape(path.as_bytes()), 0);
                    touched.insert(path);
                    touched.insert(leader);
                    self.report.applied += 1;
                    node.stats.files_applied.fetch_add(1, Ordering::Relaxed);
                }
                Ok(false) => {
                    self.report.incomplete += 1;
                    self.links_waiting += 1;
                }
                // A name this file system refuses is listed (and said once), not waited for.
                Err(e) if e.refusal().is_some() => self.placed(&job.dir, &job.name, Err(e))?,
                Err(e) if e.is_local() => return Err(e),
                Err(e) => {
                    tracing::warn!(
                        "cannot link {} to {}: {e}",
                        path.display(),
                        leader.display()
                    );
                    self.report.skipped += 1;
                    self.links_waiting += 1;
                }
            }
        }
        let mut batch = node.store.batch();
        for path in &touched {
            let Some((dir, name)) = path.split_last() else {
                continue;
            };
            let Ok(stat) = volume
                .fs
                .open_dir(&dir, false)
                .and_then(|fd| volume.fs.stat(&fd, name))
            else {
                continue;
            };
            // Only the link count (so the ctime) may have moved: anything else is a local
            // change, left for the next scan to see.
            let now = stat.stamp();
            let recorded = node.store.stamp(volume.id, &dir, name)?;
            if recorded.is_some_and(|r| {
                (r.size, r.mtime_ns, r.ino, r.dev) == (now.size, now.mtime_ns, now.ino, now.dev)
            }) {
                batch.put_stamp(volume.id, &dir, name, &now);
            }
        }
        node.store.write(batch, Durability::Durable)?;
        self.restore_dir_mtimes()
    }

    /// Whether `dir/name` is what the index says, but for its ctime: a name of a
    /// hard-linked file whose leader this round replaced had its link count moved by
    /// that, not by a local change.
    fn unchanged_but_ctime(
        &self,
        dir_fd: &std::os::fd::OwnedFd,
        dir: &VolPath,
        name: &[u8],
    ) -> Result<bool, SyncError> {
        let key = |s: &crate::store::codec::ScanStamp| (s.size, s.mtime_ns, s.ino, s.dev);
        self.on_disk_as_indexed(dir_fd, dir, name, |recorded, current| {
            key(recorded) == key(current)
        })
    }

    /// Links `dir/name` to `leader` and indexes it; `false` if the leader here is not
    /// (yet) the file the entry links to, or the name changed locally.
    fn link_one(
        &self,
        dir: &VolPath,
        name: &[u8],
        entry: &Entry,
        leader: &VolPath,
        decided_against: &Option<Entry>,
    ) -> Result<bool, SyncError> {
        let vol = self.volume().id;
        let fs = &self.volume().fs;
        let store = &self.node.store;
        let Some((leader_dir, leader_name)) = leader.split_last() else {
            return Ok(false);
        };
        let leader_entry = store.entry(vol, &leader_dir, leader_name)?;
        if !leader_entry.is_some_and(|l| l.same_state(entry))
            || store.entry(vol, dir, name)? != *decided_against
        {
            return Ok(false);
        }
        let Ok(leader_fd) = fs.open_dir(&leader_dir, false) else {
            return Ok(false);
        };
        let recorded = store.stamp(vol, &leader_dir, leader_name)?;
        let on_disk = fs.stat(&leader_fd, leader_name).ok();
        let Some(leader_stat) = on_disk.filter(|s| Some(s.stamp()) == recorded) else {
            return Ok(false);
        };
        let dir_fd = fs.open_dir(dir, true)?;
        let replaces = decided_against.as_ref().filter(|e| !e.is_tombstone());
        let here = fs.stat(&dir_fd, name).ok();
        let same_inode = here
            .as_ref()
            .is_some_and(|s| s.dev_ino() == leader_stat.dev_ino());
        let chunks = store
            .chunk_list(vol, &leader_dir, leader_name)?
            .unwrap_or_default();
        let mut kept = store.kept_chunks();
        let mut version = None;
        let mut batch = store.batch();
        if !same_inode {
            if replaces.is_some_and(Entry::is_dir) {
                // A directory goes only once it is empty (its children are synced first).
                if !fs.remove_dir(&dir_fd, name)? {
                    return Ok(false);
                }
            } else if !self.unchanged_but_ctime(&dir_fd, dir, name)? {
                tracing::info!(
                    "{} changed locally since the last scan; not linking over it",
                    escape(name)
                );
                return Ok(false);
            }
            // What the link replaces is kept, as a received file's old version is.
            if let Some(old) = replaces {
                let new = (&entry.version, &chunks[..]);
                version = self.keep_version(&mut kept, (dir, name), old, new, Why::Replaced)?;
                kept.finish(store, &mut batch)?;
            }
            fs.link_into(&leader_fd, leader_name, &leader_stat, &dir_fd, name)?;
        }
        let stat = fs.stat(&dir_fd, name)?;
        // The leader's link count moved with this name: the next name checks it again.
        let leader_now = fs.stat(&leader_fd, leader_name)?;
        let old_chunks = self.indexed_chunks(dir, name, replaces)?;
        if let Some(version) = &version {
            batch.put_version(version);
        }
        if replaces.is_some_and(Entry::is_dir)
            && let Ok(path) = dir.join(name)
        {
            batch.delete_tree_node(vol, &path);
            batch.clear_dirty(vol, &path);
        }
        batch.put_entry(vol, dir, name, entry);
        batch.set_chunks(vol, dir, name, &chunks, old_chunks.as_deref());
        batch.put_stamp(vol, dir, name, &stat.stamp());
        batch.put_stamp(vol, &leader_dir, leader_name, &leader_now.stamp());
        batch.mark_dirty(vol, dir);
        store.write(batch, Durability::Durable)?;
        // The record is written: the packs it relies on may be collected again.
        drop(kept);
        Ok(true)
    }
}
