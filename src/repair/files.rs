//! Damaged live files rebuilt in staging from their chunk lists and published.

use std::collections::BTreeMap;
use std::fs::File;
use std::sync::Arc;

use super::{FILE_BATCH, Repair, RepairError};
use crate::chunking::ChunkRef;
use crate::entry::EntryKind;
use crate::pathname::VolPath;
use crate::store::Durability;
use crate::sync::transfer::{ChunkTargets, Missing, fill_from_local};
use crate::verify::{Problem, Severity, VerifyReport};
use crate::volume_fs::{VolumeFs, finish_staged};

/// A damaged file being rebuilt in staging.
struct Rebuild {
    volume_index: usize,
    dir: VolPath,
    name: Vec<u8>,
    display: String,
    mode: u32,
    mtime_ns: i64,
    owner: (u32, u32),
    xattrs: crate::xattrs::Xattrs,
    staged: crate::volume_fs::Staged,
    file: Arc<File>,
    chunks: Vec<ChunkRef>,
    /// Chunks no local copy held, with their offsets.
    missing: Missing,
}

impl Repair<'_> {
    /// Rebuilds every damaged live file from its chunk list.
    pub(super) async fn restore_files(&mut self, found: &VerifyReport) -> Result<(), RepairError> {
        // One job per file, whatever the number of findings about it.
        let mut damaged: BTreeMap<(String, VolPath), Problem> = BTreeMap::new();
        for f in &found.findings {
            match (&f.volume, &f.file) {
                (Some(volume), Some(path)) if f.problem.is_restorable() => {
                    damaged
                        .entry((volume.clone(), path.clone()))
                        .or_insert(f.problem);
                }
                (Some(volume), _) if f.problem == Problem::Modified => {
                    let detail = "edited since the last scan: kept; the rescan indexes it as the newest version";
                    self.done("kept", Some(volume), f.path.clone(), detail.into());
                }
                // Another kind of entry where the index has a file (or the reverse):
                // replaced while Shoal was stopped, an edit the rescan records.
                (Some(volume), Some(_)) if f.problem == Problem::TypeChanged => {
                    let detail = "replaced by another kind of entry: kept as a local change";
                    self.done("kept", Some(volume), f.path.clone(), detail.into());
                }
                _ if f.severity == Severity::Damage
                    && f.file.is_some()
                    && !f.problem.is_index_record() =>
                {
                    let detail = format!("{}: {}", f.problem, f.detail);
                    self.left(f.volume.as_deref(), f.path.clone(), detail);
                }
                _ => {}
            }
        }
        for volume_index in 0..self.node.volumes.len() {
            let name = self.node.volumes[volume_index].name.clone();
            // In path order: a directory is restored before what it holds.
            let files: Vec<_> = damaged
                .iter()
                .filter(|((volume, _), _)| *volume == name)
                .map(|((_, path), problem)| (path.clone(), *problem))
                .collect();
            for batch in files.chunks(FILE_BATCH) {
                self.restore_batch(volume_index, batch).await?;
            }
        }
        Ok(())
    }

    async fn restore_batch(
        &mut self,
        volume_index: usize,
        batch: &[(VolPath, Problem)],
    ) -> Result<(), RepairError> {
        {
            let mut rebuilds = Vec::new();
            let mut targets = ChunkTargets::default();
            for (path, problem) in batch {
                if let Some(rebuild) = self.prepare(volume_index, path, *problem, &mut targets)? {
                    rebuilds.push(rebuild);
                }
            }
            let received = self.fetch(volume_index, targets).await?;
            for rebuild in rebuilds {
                let lacking: usize = rebuild
                    .missing
                    .iter()
                    .filter(|(id, _, _)| !received.contains(id))
                    .map(|(_, _, offsets)| offsets.len())
                    .sum();
                let volume = self.node.volumes[rebuild.volume_index].name.clone();
                if lacking > 0 {
                    let why = if self.node.peers().is_empty() {
                        "no intact local copy (give --peer to fetch them)"
                    } else {
                        "no intact local copy and no peer sent them"
                    };
                    let detail = format!("{lacking} chunks not restored: {why}");
                    self.left(Some(&volume), Some(rebuild.display.clone()), detail);
                    continue;
                }
                self.publish(rebuild)?;
            }
        }
        Ok(())
    }

    /// Opens (or resumes) the staging file of a damaged file and fills it with every
    /// chunk held locally; the others are added to `targets`.
    fn prepare(
        &mut self,
        volume_index: usize,
        path: &VolPath,
        problem: Problem,
        targets: &mut ChunkTargets,
    ) -> Result<Option<Rebuild>, RepairError> {
        let node = self.node.clone();
        let vol = &node.volumes[volume_index];
        let volume = vol.name.as_str();
        let display = path.display().to_string();
        let Some((dir, name)) = path.split_last() else {
            return Ok(None);
        };
        let Some(entry) = node.store.entry(vol.id, &dir, name)? else {
            return Ok(None);
        };
        let size_and_content = match &entry.kind {
            EntryKind::File {
                size, content_id, ..
            } => Some((*size, *content_id)),
            EntryKind::Dir => {
                let fd = vol.fs.open_dir(path, true)?;
                drop(fd);
                let parent = vol.fs.open_dir(&dir, false)?;
                if node.sync_ownership {
                    vol.fs.chown_dir(&parent, name, (entry.uid, entry.gid))?;
                }
                let not_set = vol
                    .fs
                    .set_dir_xattrs(&parent, name, entry.mode, &entry.xattrs)?;
                vol.xattrs_not_applied.note(volume, path, &not_set);
                VolumeFs::fsync_dir(&parent)?;
                self.done(
                    "restored",
                    Some(volume),
                    Some(display),
                    "directory created".into(),
                );
                return Ok(None);
            }
            EntryKind::Symlink { .. } | EntryKind::Fifo => {
                let parent = vol.fs.open_dir(&dir, true)?;
                let owner = node.sync_ownership.then_some((entry.uid, entry.gid));
                let (stat, what) = match &entry.kind {
                    EntryKind::Symlink { target } => (
                        vol.fs
                            .place_symlink(&parent, name, target, entry.mtime_ns, owner)?,
                        "symlink recreated",
                    ),
                    _ => (
                        vol.fs
                            .place_fifo(&parent, name, entry.mode, entry.mtime_ns, owner)?,
                        "FIFO recreated",
                    ),
                };
                let mut batch = node.store.batch();
                batch.put_stamp(vol.id, &dir, name, &stat.stamp());
                node.store.write(batch, Durability::Durable)?;
                self.done("restored", Some(volume), Some(display), what.into());
                return Ok(None);
            }
            EntryKind::Tombstone { .. } => None,
        };
        let (Some((size, content_id)), Some(chunks)) =
            (size_and_content, node.store.chunk_list(vol.id, &dir, name)?)
        else {
            self.left(
                Some(volume),
                Some(display),
                "no indexed content to restore".into(),
            );
            return Ok(None);
        };
        let staged = vol.fs.stage(&content_id, &dir, name, size)?;
        let io = |e| RepairError::Io(format!("staging for {display}"), e);
        let file = Arc::new(staged.file.try_clone().map_err(io)?);
        // The damaged file's own chunks are the nearest copies of most of its content.
        let damaged = File::open(path.under(vol.fs.root_path())).ok();
        let mut reads = node.store.chunk_reads();
        let missing = fill_from_local(
            &node,
            &mut reads,
            &file,
            &chunks,
            staged.resumed,
            damaged.as_ref(),
        )
        .map_err(io)?;
        targets.add_missing(&missing, &file);
        let shown = display.as_str();
        tracing::info!(volume, path = shown, problem = problem.name(), "restoring");
        Ok(Some(Rebuild {
            volume_index,
            dir,
            name: name.to_vec(),
            display,
            mode: entry.mode,
            mtime_ns: entry.mtime_ns,
            owner: (entry.uid, entry.gid),
            xattrs: entry.xattrs.clone(),
            staged,
            file,
            chunks,
            missing,
        }))
    }

    /// Makes a complete staging file durable, renames it over the damaged name (unless
    /// that was edited meanwhile) and records its new scan stamp.
    fn publish(&mut self, rebuild: Rebuild) -> Result<(), RepairError> {
        let node = self.node.clone();
        let vol = &node.volumes[rebuild.volume_index];
        let io = |e| RepairError::Io(format!("staging for {}", rebuild.display), e);
        let dir_fd = vol.fs.open_dir(&rebuild.dir, true)?;
        if let Ok(stat) = vol.fs.stat(&dir_fd, &rebuild.name)
            && stat.mtime_ns() != rebuild.mtime_ns
        {
            self.done(
                "kept",
                Some(&vol.name),
                Some(rebuild.display),
                "edited while repair ran: kept as a local change".into(),
            );
            return Ok(());
        }
        let owner = node.sync_ownership.then_some(rebuild.owner);
        let mode = vol.received_file_mode(rebuild.mode);
        let not_set = finish_staged(
            &rebuild.staged.file,
            mode,
            rebuild.mtime_ns,
            owner,
            &rebuild.xattrs,
        )
        .map_err(io)?;
        if let Ok(path) = rebuild.dir.join(&rebuild.name) {
            vol.xattrs_not_applied.note(&vol.name, &path, &not_set);
        }
        rebuild.file.sync_all().map_err(io)?;
        vol.fs
            .publish(&rebuild.staged.temp_name, &dir_fd, &rebuild.name)?;
        VolumeFs::fsync_dir(&dir_fd)?;
        let stat = vol.fs.stat(&dir_fd, &rebuild.name)?;
        let mut batch = node.store.batch();
        batch.put_stamp(vol.id, &rebuild.dir, &rebuild.name, &stat.stamp());
        node.store.write(batch, Durability::Durable)?;
        self.done(
            "restored",
            Some(&vol.name),
            Some(rebuild.display),
            format!("{} chunks, {} bytes", rebuild.chunks.len(), stat.size()),
        );
        Ok(())
    }
}
