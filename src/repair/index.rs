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
        let us = self.node.meta.node_id;
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
                // No scan looks under a deleted directory: recorded here as the scan
                // would have recorded it, had it looked (a delete of ours, which syncs).
                Problem::IndexLiveUnderDeleted => {
                    let name_at = (vol, &dir, name);
                    if let Some(live) = store.entry(vol, &dir, name)?.filter(|e| !e.is_tombstone())
                    {
                        let now = crate::scan::now_ns();
                        store.put_delete_of_ours(&mut batch, name_at, &live, us, now)?;
                        fixed.push((
                            "deleted",
                            volume.clone(),
                            f.path.clone(),
                            "live in the index under a deleted directory, on no disk: recorded as deleted",
                        ));
                    }
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

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use crate::config::{FileConfig, Settings};
    use crate::entry::Entry;
    use crate::pathname::VolPath;
    use crate::repair::{RepairOptions, repair};
    use crate::store::{Durability, OpenOptions, Store};
    use crate::verify::{Problem, Severity, VerifyOptions, verify};

    /// The damage each volume's `verify` finds, as (problem, path).
    fn damage(store: &Store, volume: &std::path::Path) -> Vec<(Problem, String)> {
        let volumes = [("v".to_string(), volume.to_path_buf())];
        let report = verify(store, &volumes, &VerifyOptions::default()).unwrap();
        report
            .findings
            .iter()
            .filter(|f| f.severity == Severity::Damage)
            .map(|f| (f.problem, f.path.clone().unwrap_or_default()))
            .collect()
    }

    /// Names left live in the index under a deleted directory, on no disk (what a pull
    /// made before fa42f33 when a local removal crossed a peer's delete; no scan looks
    /// there): `verify` names each of them, a directory's contents included, and
    /// `repair` records them as deleted, after which `verify` finds nothing.
    #[test]
    fn names_live_under_a_deleted_directory_are_found_and_recorded_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let (data, state) = (dir.path().join("data"), dir.path().join("state"));
        let volume = data.join("v");
        std::fs::create_dir_all(volume.join("c/d")).unwrap();
        std::fs::write(volume.join("c/f.txt"), b"f").unwrap();
        std::fs::write(volume.join("c/d/g.txt"), b"g").unwrap();
        std::fs::write(volume.join("kept.txt"), b"k").unwrap();
        let open = OpenOptions {
            create: true,
            ..Default::default()
        };
        let store = Store::open(&state, open).unwrap();
        crate::scan::scan_volume(&store, "v", &volume, &Default::default()).unwrap();
        let vol = store.volume("v").unwrap().unwrap().id;
        let root = VolPath::root();
        let c = store.entry(vol, &root, b"c").unwrap().unwrap();
        let mut batch = store.batch();
        batch.put_entry(vol, &root, b"c", &Entry::deleted(c.version, 1));
        store.write(batch, Durability::Durable).unwrap();
        std::fs::remove_dir_all(volume.join("c")).unwrap();
        let under_deleted = |path: &str| (Problem::IndexLiveUnderDeleted, path.to_string());
        assert_eq!(
            damage(&store, &volume),
            [
                under_deleted("c/d"),
                under_deleted("c/d/g.txt"),
                under_deleted("c/f.txt")
            ]
        );
        drop(store);

        let settings = Settings::resolve(
            FileConfig::default(),
            Some(data),
            Some(state.clone()),
            vec!["v".into()],
            None,
        )
        .unwrap();
        let options = RepairOptions {
            dry_run: false,
            rebuild_index: false,
            peers: Vec::new(),
            credentials: PathBuf::new(),
            node_name: None,
        };
        let report = repair(&settings, &options).unwrap();
        assert!(report.complete(), "{:?}", report.unrepaired);
        let deleted: Vec<_> = report
            .actions
            .iter()
            .filter(|a| a.action == "deleted")
            .filter_map(|a| a.path.clone())
            .collect();
        assert_eq!(deleted, ["c/d", "c/d/g.txt", "c/f.txt"]);

        let store = Store::open(&state, OpenOptions::default()).unwrap();
        assert_eq!(damage(&store, &volume), []);
        for (dir, name) in [("c", "f.txt"), ("c/d", "g.txt"), ("c", "d")] {
            let dir = VolPath::parse(dir.as_bytes()).unwrap();
            let entry = store.entry(vol, &dir, name.as_bytes()).unwrap().unwrap();
            assert!(entry.is_tombstone(), "{dir:?}/{name}: {entry:?}");
        }
        assert!(
            !store
                .entry(vol, &root, b"kept.txt")
                .unwrap()
                .unwrap()
                .is_tombstone()
        );
    }
}
