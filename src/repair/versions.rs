//! Kept versions: chunks a version record references that this node holds nowhere (a
//! pack lost or damaged beyond repair, a live copy edited before a pack took it) are
//! fetched from the peers into a version pack, each checked against its id, and indexed.
//! What no peer sends is reported per version; it is not damage (`verify` names it a
//! warning, `version-chunk-not-held`), so it neither fails the repair nor stops the
//! final rescan.

use std::collections::BTreeMap;

use super::{Repair, RepairError};
use crate::ids::ChunkId;
use crate::pathname::VolPath;
use crate::store::Durability;

/// Chunks asked of the peers in one round, and the bytes they may take on disk: the
/// scratch file and the memory of the walk stay bounded whatever the versions hold.
const ROUND_CHUNKS: usize = 1024;
const ROUND_BYTES: u64 = 256 << 20;

impl Repair<'_> {
    /// Fetches the chunks of kept versions held nowhere here, then reports the
    /// versions still lacking some.
    pub(super) async fn fetch_version_chunks(&mut self) -> Result<(), RepairError> {
        let node = self.node.clone();
        for (volume_index, volume) in node.volumes.iter().enumerate() {
            let mut round: BTreeMap<ChunkId, u32> = BTreeMap::new();
            let mut round_bytes = 0u64;
            let mut any_missing = false;
            // A chunk fetched in one round is indexed before the walk goes on, so a later
            // record that shares it does not ask for it again.
            let mut records = node.store.versions_below(volume.id, &VolPath::root());
            loop {
                let next = records.next().transpose()?;
                for chunk in next.iter().flat_map(|r| &r.chunks) {
                    // A length no chunker makes (a damaged record) is never asked for:
                    // the version is reported as lacking it.
                    if chunk.len <= fastcdc::v2020::MAXIMUM_MAX
                        && !round.contains_key(&chunk.id)
                        && node.store.chunk_locations(&chunk.id)?.is_empty()
                    {
                        round.insert(chunk.id, chunk.len);
                        round_bytes += u64::from(chunk.len);
                    }
                }
                let full = round.len() >= ROUND_CHUNKS || round_bytes >= ROUND_BYTES;
                if !round.is_empty() && (full || next.is_none()) {
                    any_missing = true;
                    self.fetch_round(volume_index, std::mem::take(&mut round))
                        .await?;
                    round_bytes = 0;
                }
                if next.is_none() {
                    break;
                }
            }
            if any_missing {
                self.report_incomplete_versions(volume_index, &volume.name)?;
            }
        }
        Ok(())
    }

    /// Asks the peers for `wanted` (id -> length) into a scratch file beside the packs,
    /// then appends each chunk that arrived and hashes to its id to a version pack and
    /// indexes it.
    async fn fetch_round(
        &mut self,
        volume_index: usize,
        wanted: BTreeMap<ChunkId, u32>,
    ) -> Result<(), RepairError> {
        if self.node.peers().is_empty() {
            return Ok(());
        }
        let node = self.node.clone();
        let scratch_path = node.store.packs_dir().join("versions.repair.tmp");
        let mut kept = node.store.kept_chunks();
        let mut fetched = 0u64;
        self.fetch_through_scratch(volume_index, &scratch_path, wanted, |id, data| {
            node.store.keep_version_chunk(&mut kept, &id, data)?;
            fetched += 1;
            Ok(())
        })
        .await?;
        let mut batch = node.store.batch();
        kept.finish(&node.store, &mut batch)?;
        node.store.write(batch, Durability::Durable)?;
        if fetched > 0 {
            let volume = node.volumes[volume_index].name.clone();
            self.done(
                "version-chunks-fetched",
                Some(&volume),
                None,
                format!("{fetched} chunks of kept versions fetched from peers into a version pack"),
            );
        }
        Ok(())
    }

    /// Each kept version of the volume that still references chunks held nowhere here.
    fn report_incomplete_versions(
        &mut self,
        volume_index: usize,
        volume: &str,
    ) -> Result<(), RepairError> {
        let node = self.node.clone();
        let vol = node.volumes[volume_index].id;
        let why = if node.peers().is_empty() {
            "give --peer to fetch them"
        } else {
            "no peer sent them"
        };
        for record in node.store.versions_below(vol, &VolPath::root()) {
            let record = record?;
            let mut lacking = 0usize;
            for chunk in &record.chunks {
                if node.store.chunk_locations(&chunk.id)?.is_empty() {
                    lacking += 1;
                }
            }
            if lacking > 0 {
                self.report.incomplete_versions.push(super::Action {
                    action: "version-incomplete",
                    volume: Some(volume.to_string()),
                    path: Some(record.path.display().to_string()),
                    detail: format!(
                        "version {} lacks {lacking} of its {} chunks: {why}",
                        record.id.to_hex(),
                        record.chunks.len()
                    ),
                });
            }
        }
        Ok(())
    }
}
