//! Hard links in a scan: the names of each multiply-linked file, and their group's
//! leader (store.md "Entry", hard-link group).
//!
//! A full walk lists every name, so at its end it knows each group: the leader is the
//! least path by bytes (the same on every node holding the same names), recorded on
//! every name of the group. The names of a group change together (they are one inode):
//! a full walk records the changed names of each group together at its end, and leaves
//! a group alone (unstamped, to be read again) while one of its names is being written
//! or cannot be read. A walk that cannot see the other names of a hard-linked file (a
//! narrow one, or one while a pull links names) leaves the file as indexed; a narrow
//! one says so ([`Walker::links_changed`]) and the scan goes on as a full one.

use super::walk::{Listed, Walker};
use crate::chunking::ChunkedContent;
use crate::entry::EntryKind;
use crate::pathname::VolPath;
use crate::store::StoreError;
use crate::volume_fs::FileStat;
use crate::xattrs::Xattrs;

/// The names of one inode seen by a full walk, with its link count.
pub(super) type Group = (u64, Vec<VolPath>);

/// A hard-linked file read by a full walk, recorded once its group is known.
pub(super) struct Changed {
    pub(super) content: ChunkedContent,
    pub(super) meta: FileStat,
    pub(super) xattrs: Xattrs,
}

/// Hard-linked names a full scan keeps in memory to find their groups' leaders; names
/// past it sync as separate files (and the scan says so).
const MAX_LINKED_NAMES: usize = 1 << 20;

impl Walker<'_> {
    /// A changed file that is (`linked_now`) or was hard-linked: kept for the end of a
    /// full walk; one no longer linked is recorded now (the end of the walk fixes what
    /// is left of its group); a walk that does not group leaves it as indexed.
    pub(super) fn defer_linked(
        &mut self,
        dir: &VolPath,
        name: &[u8],
        changed: Changed,
        linked_now: bool,
    ) -> Result<(), StoreError> {
        match (self.linked.is_some(), linked_now) {
            (true, true) => {
                if let Ok(path) = dir.join(name) {
                    self.changed_linked.insert(path, changed);
                }
                Ok(())
            }
            (true, false) => {
                let Changed {
                    content,
                    meta,
                    xattrs,
                } = changed;
                self.record_file_as(dir, name, content, &meta, xattrs, None)
            }
            (false, _) => {
                self.links_changed = true;
                Ok(())
            }
        }
    }

    /// A name the walk leaves alone (still being written): its group too.
    pub(super) fn note_held(&mut self, dir: &VolPath, item: &Listed) {
        // A held directory is not listed: names of groups may be in it.
        self.dirs_unseen |= item.meta.is_dir();
        if item.meta.is_file()
            && item.meta.nlink() > 1
            && let Ok(path) = dir.join(&item.name)
        {
            self.note_linked(&path, &item.meta, true);
            self.unsettled.insert(path);
        }
    }

    /// A name that could not be read this walk: its group is left as indexed.
    pub(super) fn unsettle(&mut self, dir: &VolPath, name: &[u8]) {
        if self.linked.is_some()
            && let Ok(path) = dir.join(name)
        {
            self.unsettled.insert(path);
        }
    }

    /// Takes note of a listed file with several names: kept for the group's leader in a
    /// full scan; in a narrow one a change to it asks for a full scan.
    pub(super) fn note_linked(&mut self, path: &VolPath, meta: &FileStat, unchanged: bool) {
        let Some(linked) = &mut self.linked else {
            self.links_changed |= !unchanged;
            return;
        };
        if self.linked_names < MAX_LINKED_NAMES {
            self.linked_names += 1;
            let (nlink, names) = linked.entry(meta.dev_ino()).or_default();
            *nlink = meta.nlink();
            names.push(path.clone());
        } else if self.linked_names == MAX_LINKED_NAMES {
            self.linked_names += 1;
            self.problem(format!(
                "more than {MAX_LINKED_NAMES} hard-linked names in volume {}: the rest sync as separate files",
                self.report.volume
            ));
        }
    }

    /// At the end of a full walk, which listed every name: gives each name of a hard-link
    /// group the group's leader (its least path; none for a file whose other names are
    /// all outside the volume or ignored), as a change where it differs from the index.
    pub(super) fn record_link_groups(&mut self) -> Result<(), StoreError> {
        let Some(linked) = self.linked.take() else {
            return Ok(());
        };
        // Entries written by this walk must be readable below.
        self.flush(true)?;
        for (_, (nlink, names)) in linked {
            // Every name seen and readable, or the names not seen are outside the volume.
            let settled = !names.iter().any(|p| self.unsettled.contains(p))
                && (names.len() as u64 >= nlink || !self.dirs_unseen);
            let leader = match names.len() > 1 {
                true => names.iter().min().cloned(),
                false => None,
            };
            for path in names {
                let changed = self.changed_linked.remove(&path);
                let Some((dir, name)) = path.split_last() else {
                    continue;
                };
                if !settled {
                    continue;
                }
                if let Some(Changed {
                    content,
                    meta,
                    xattrs,
                }) = changed
                {
                    self.record_file_as(&dir, name, content, &meta, xattrs, leader.clone())?;
                    continue;
                }
                let Some(mut entry) = self.store.entry(self.vol, &dir, name)? else {
                    continue;
                };
                if !matches!(entry.kind, EntryKind::File { .. }) || entry.link == leader {
                    continue;
                }
                entry.link = leader.clone();
                self.count_ours(&dir, name, &mut entry.version)?;
                self.report.modified += 1;
                self.name_change(&dir, name);
                self.batch.put_entry(self.vol, &dir, name, &entry);
                self.batch.mark_dirty(self.vol, &dir);
            }
            // Between groups only: a group's names are written together.
            self.flush(false)?;
        }
        // Names past MAX_LINKED_NAMES, in no group: recorded on their own.
        for (path, changed) in std::mem::take(&mut self.changed_linked) {
            if let Some((dir, name)) = path.split_last() {
                let Changed {
                    content,
                    meta,
                    xattrs,
                } = changed;
                self.record_file_as(&dir, name, content, &meta, xattrs, None)?;
            }
        }
        Ok(())
    }
}
