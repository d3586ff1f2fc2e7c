//! Packs: damaged records, torn tails, lost and orphan records.

use std::collections::{BTreeMap, HashSet};
use std::fs::OpenOptions as FsOpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use super::{Repair, RepairError};
use crate::ids::ChunkId;
use crate::store::codec::Extent;
use crate::store::pack::{self, PackEnd, PackScanner, PackWriter};
use crate::store::{ChunkLocation, Durability};
use crate::sync::transfer::ChunkTargets;

/// What a sequential read of one pack found.
#[derive(Default)]
struct PackState {
    /// Records whose bytes do not match their id.
    damaged: Vec<(ChunkId, Extent)>,
    /// Offsets of the whole, intact records.
    intact: HashSet<u64>,
    /// Intact records that no index record points at.
    orphans: Vec<(ChunkId, Extent)>,
    /// (valid length, file length) when the pack ends inside a record.
    torn: Option<(u64, u64)>,
}

impl PackState {
    /// Reads pack `number` at `path` (a missing pack holds nothing); `indexed` holds the
    /// (pack, offset) of every pack location record.
    fn read(
        path: &Path,
        number: u64,
        indexed: &BTreeMap<(u64, u64), ChunkId>,
    ) -> Result<PackState, RepairError> {
        let mut state = PackState::default();
        if !path.exists() {
            return Ok(state);
        }
        let mut scanner = PackScanner::open(path)?;
        while let Some(record) = scanner.next_record()? {
            if !record.intact {
                state.damaged.push((record.id, record.extent));
            } else {
                state.intact.insert(record.extent.offset);
                if !indexed.contains_key(&(number, record.extent.offset)) {
                    state.orphans.push((record.id, record.extent));
                }
            }
        }
        if let Some(PackEnd::Torn {
            valid_len,
            file_len,
        }) = scanner.end()
        {
            state.torn = Some((*valid_len, *file_len));
        }
        Ok(state)
    }
}

impl Repair<'_> {
    /// Packs: damaged records restored in place, torn tails cut and lost records
    /// appended again, unfindable records dropped from the index, orphans indexed.
    pub(super) async fn fix_packs(&mut self) -> Result<(), RepairError> {
        let node = self.node.clone();
        let packs_dir = node.store.packs_dir();
        let mut indexed: BTreeMap<(u64, u64), ChunkId> = BTreeMap::new();
        let mut wanted_in: BTreeMap<u64, Vec<(ChunkId, Extent)>> = BTreeMap::new();
        for item in node.store.all_chunk_locations() {
            if let (id, ChunkLocation::Pack { pack, extent }) = item? {
                indexed.insert((pack, extent.offset), id);
                wanted_in.entry(pack).or_default().push((id, extent));
            }
        }
        let pack_files = std::fs::read_dir(&packs_dir)
            .map_err(|e| RepairError::Io(packs_dir.display().to_string(), e))?
            .flatten()
            .filter_map(|e| crate::store::pack::pack_number(&e.path()));
        for number in pack_files {
            wanted_in.entry(number).or_default();
        }
        for (number, wanted) in wanted_in {
            self.fix_pack(number, wanted, &indexed).await?;
        }
        Ok(())
    }

    /// Repairs pack `number`, which the index says holds `wanted`.
    async fn fix_pack(
        &mut self,
        number: u64,
        wanted: Vec<(ChunkId, Extent)>,
        indexed: &BTreeMap<(u64, u64), ChunkId>,
    ) -> Result<(), RepairError> {
        let node = self.node.clone();
        let path = node.store.packs_dir().join(pack::pack_file_name(number));
        let shown = path.display().to_string();
        // Sequential read: which records are whole and intact, where the valid part ends.
        let mut state = PackState::read(&path, number, indexed)?;
        if !state.damaged.is_empty() {
            self.rewrite_damaged(&path, &mut state).await?;
        }
        if let Some((valid_len, file_len)) = state.torn {
            // Opening for appending cuts the torn tail.
            drop(PackWriter::open(&path)?);
            self.done(
                "pack-tail-cut",
                None,
                Some(shown.clone()),
                format!("bytes {valid_len}..{file_len} were not a whole record"),
            );
        }
        // Index records into the pack that no intact record backs.
        let lost: Vec<(ChunkId, Extent)> = wanted
            .into_iter()
            .filter(|(_, extent)| !state.intact.contains(&extent.offset))
            .collect();
        let mut batch = node.store.batch();
        for (id, extent) in &state.orphans {
            batch.put_pack_location(id, number, *extent);
            self.done(
                "location-added",
                None,
                Some(shown.clone()),
                format!("chunk {id}: an intact record no index record pointed at"),
            );
        }
        if !lost.is_empty() {
            self.restore_lost(number, &path, lost, &mut batch).await?;
        }
        if !batch.is_empty() {
            node.store.write(batch, Durability::Durable)?;
        }
        Ok(())
    }

    /// Damaged records: the same bytes again, in place, from a local copy or a peer;
    /// those restored count as intact.
    async fn rewrite_damaged(
        &mut self,
        path: &Path,
        state: &mut PackState,
    ) -> Result<(), RepairError> {
        let shown = path.display().to_string();
        let io = |e| RepairError::Io(shown.clone(), e);
        let file = Arc::new(
            FsOpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(io)?,
        );
        let mut targets = ChunkTargets::default();
        let mut local = Vec::new();
        for (id, extent) in &state.damaged {
            match self.node.read_local_chunk(id)? {
                Some(data) => {
                    file.write_all_at(&data, extent.offset).map_err(io)?;
                    local.push(*id);
                }
                None => targets.add(*id, extent.len, file.clone(), extent.offset),
            }
        }
        let received = self.fetch(0, targets).await?;
        file.sync_data().map_err(io)?;
        for (id, extent) in &state.damaged {
            let at = extent.offset;
            if local.contains(id) || received.contains(id) {
                state.intact.insert(at);
                let detail = format!("chunk {id} at byte {at} rewritten from another copy");
                self.done("pack-record-restored", None, Some(shown.clone()), detail);
            } else {
                let detail = format!("chunk {id} at byte {at} is damaged and no copy was found");
                self.left(None, Some(shown.clone()), detail);
            }
        }
        Ok(())
    }

    /// Chunks the index says are in pack `number` but are not (a torn tail, a missing
    /// pack, a damaged record nobody could restore): held by a live file -> the record
    /// goes (a pack holds only what no live file does); found elsewhere -> appended to
    /// the pack again; found nowhere -> the record goes and the loss is reported.
    async fn restore_lost(
        &mut self,
        number: u64,
        path: &Path,
        lost: Vec<(ChunkId, Extent)>,
        batch: &mut crate::store::Batch<'_>,
    ) -> Result<(), RepairError> {
        let node = self.node.clone();
        let shown = path.display().to_string();
        let mut again: Vec<(ChunkId, Vec<u8>)> = Vec::new();
        let mut from_peers = Vec::new();
        for (id, extent) in &lost {
            let old = ChunkLocation::Pack {
                pack: number,
                extent: *extent,
            };
            batch.delete_location(id, &old);
            let live = node
                .store
                .chunk_locations(id)?
                .into_iter()
                .any(|l| matches!(l, ChunkLocation::Live { .. }));
            if live && node.read_local_chunk(id)?.is_some() {
                self.done(
                    "location-removed",
                    None,
                    Some(shown.clone()),
                    format!("chunk {id} is not in the pack but a live file holds it"),
                );
            } else if let Some(data) = node.read_local_chunk(id)? {
                again.push((*id, data));
            } else {
                from_peers.push((*id, *extent));
            }
        }
        if !from_peers.is_empty() && !node.peers().is_empty() {
            // Received chunks land in a scratch file beside the packs, then are appended.
            let wanted: Vec<_> = from_peers
                .iter()
                .map(|(id, extent)| (*id, extent.len))
                .collect();
            let mut arrived = HashSet::new();
            self.fetch_through_scratch(
                0,
                &path.with_extension("repair.tmp"),
                wanted,
                |id, data| {
                    again.push((id, data.to_vec()));
                    arrived.insert(id);
                    Ok(())
                },
            )
            .await?;
            from_peers.retain(|(id, _)| !arrived.contains(id));
        }
        if !again.is_empty() {
            let mut writer = PackWriter::open(path)?;
            let mut appended = Vec::new();
            for (id, data) in &again {
                appended.push((*id, writer.append(id, data)?));
            }
            // The records are durable before the index points at them.
            writer.sync()?;
            for (id, extent) in appended {
                batch.put_pack_location(&id, number, extent);
                self.done(
                    "pack-record-restored",
                    None,
                    Some(shown.clone()),
                    format!("chunk {id} appended again from another copy"),
                );
            }
        }
        for (id, _) in from_peers {
            self.left(None, Some(shown.clone()), format!("chunk {id} is lost: no local copy and no peer has it (its index record was removed)"));
        }
        Ok(())
    }
}
