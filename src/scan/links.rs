//! Hard links in a scan: the names of each multiply-linked file, and their group's
//! leader (store.md "Entry", hard-link group).
//!
//! A full walk lists every name, so at its end it knows each group: the leader is the
//! least path by bytes (the same on every node holding the same names), recorded on
//! every name of the group. A narrow walk cannot see the other names of a file it finds
//! changed; it says so ([`Walker::links_changed`]) and the scan goes on as a full one.

use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;

use super::walk::Walker;
use crate::entry::EntryKind;
use crate::pathname::VolPath;
use crate::store::StoreError;

/// Hard-linked names a full scan keeps in memory to find their groups' leaders; names
/// past it sync as separate files (and the scan says so).
const MAX_LINKED_NAMES: usize = 1 << 20;

impl Walker<'_> {
    /// Takes note of a listed file with several names: kept for the group's leader in a
    /// full scan; in a narrow one a change to it asks for a full scan.
    pub(super) fn note_linked(&mut self, path: &VolPath, meta: &Metadata, unchanged: bool) {
        let Some(linked) = &mut self.linked else {
            self.links_changed |= !unchanged;
            return;
        };
        if self.linked_names < MAX_LINKED_NAMES {
            self.linked_names += 1;
            let names = linked.entry((meta.dev(), meta.ino())).or_default();
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
        for (_, names) in linked {
            let leader = match names.len() > 1 {
                true => names.iter().min().cloned(),
                false => None,
            };
            for path in names {
                let Some((dir, name)) = path.split_last() else {
                    continue;
                };
                let Some(mut entry) = self.store.entry(self.vol, &dir, name)? else {
                    continue;
                };
                if !matches!(entry.kind, EntryKind::File { .. }) || entry.link == leader {
                    continue;
                }
                entry.link = leader.clone();
                entry.version.bump(self.node);
                self.report.modified += 1;
                self.batch.put_entry(self.vol, &dir, name, &entry);
                self.batch.mark_dirty(self.vol, &dir);
                self.flush(false)?;
            }
        }
        Ok(())
    }
}
