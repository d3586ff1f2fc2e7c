//! Index records that contradict the index itself.

use super::{Repair, RepairError};
use crate::store::{ChunkLocation, Durability};
use crate::verify::{Problem, VerifyReport};

impl Repair<'_> {
    /// Index records that contradict the index itself.
    pub(super) fn fix_index(&mut self, found: &VerifyReport) -> Result<(), RepairError> {
        let store = &self.node.store;
        let mut batch = store.batch();
        let mut removed = Vec::new();
        let mut lists = crate::verify::ChunkListCache::default();
        for item in store.all_chunk_locations() {
            let (id, location) = item?;
            if let ChunkLocation::Live {
                vol,
                dir,
                name,
                extent,
            } = &location
                && !lists.holds(store, &id, *vol, dir, name, *extent)?
            {
                batch.delete_location(&id, &location);
                let path = dir.join(name).map(|p| p.display().to_string()).ok();
                removed.push((path, id));
            }
        }
        let mut fixed = Vec::new();
        for f in &found.findings {
            let (Some(volume), Some(path)) = (&f.volume, &f.file) else {
                continue;
            };
            let Some(index) = self.volume_index(volume) else {
                continue;
            };
            let Some((dir, name)) = path.split_last() else {
                continue;
            };
            let vol = self.node.volumes[index].id;
            match f.problem {
                Problem::IndexMissingLocation => {
                    if let Some(chunks) = store.chunk_list(vol, &dir, name)? {
                        batch.set_chunks(vol, &dir, name, &chunks, Some(&chunks));
                        fixed.push((
                            "location-added",
                            volume.clone(),
                            f.path.clone(),
                            "location records added from the file's chunk list",
                        ));
                    }
                }
                Problem::IndexMissingChunkList | Problem::IndexInconsistent => {
                    batch.delete_stamp(vol, &dir, name);
                    fixed.push((
                        "rescan",
                        volume.clone(),
                        f.path.clone(),
                        "scan stamp dropped: the rescan reads the file again",
                    ));
                }
                _ => {}
            }
        }
        if !batch.is_empty() {
            store.write(batch, Durability::Durable)?;
        }
        for (path, id) in removed {
            self.done(
                "location-removed",
                None,
                path,
                format!("removed the record of chunk {id}, which the file's chunk list does not hold there"),
            );
        }
        for (action, volume, path, detail) in fixed {
            self.done(action, Some(&volume), path, detail.to_string());
        }
        Ok(())
    }
}
