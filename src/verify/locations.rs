//! Location records: each live location checked against its file's chunk list.

use super::{Problem, Sampler, Severity, VerifyReport, finding};
use crate::ids::{ChunkId, VolumeId};
use crate::pathname::VolPath;
use crate::store::codec::Extent;
use crate::store::{ChunkLocation, Store, StoreError};

/// Every live-file location of `vol` must point at a file entry whose chunk list holds
/// that chunk at that offset.
pub(super) fn check_locations(
    store: &Store,
    vol: VolumeId,
    volume: &str,
    sampler: &mut Sampler,
    report: &mut VerifyReport,
) -> Result<(), StoreError> {
    let mut lists = ChunkListCache::default();
    let mut batch = Vec::new();
    for item in store.all_chunk_locations() {
        let (id, location) = item?;
        if !sampler.pick() {
            continue;
        }
        let ChunkLocation::Live {
            vol: v,
            dir,
            name,
            extent,
        } = location
        else {
            continue;
        };
        if v != vol {
            continue;
        }
        batch.push(LocationCheck {
            file: crate::store::keys::entry_key(vol, &dir, &name),
            id,
            dir,
            name,
            extent,
        });
        if batch.len() >= LOCATION_BATCH {
            check_location_batch(store, vol, volume, &mut batch, &mut lists, report)?;
        }
    }
    check_location_batch(store, vol, volume, &mut batch, &mut lists, report)
}

/// Location records checked at once. They come in chunk id order, which is random
/// order for the files they name; checked in file order instead, the files' chunk
/// lists are read from the index nearly sequentially (on a cold cache, random reads
/// made a 5% sample of a million files take half a minute).
pub(super) const LOCATION_BATCH: usize = 1 << 16;

/// A live location record to check against its file's chunk list.
pub(super) struct LocationCheck {
    /// The file's index key: the order to check in.
    pub(super) file: Vec<u8>,
    pub(super) id: ChunkId,
    pub(super) dir: VolPath,
    pub(super) name: Vec<u8>,
    pub(super) extent: Extent,
}

pub(super) fn check_location_batch(
    store: &Store,
    vol: VolumeId,
    volume: &str,
    batch: &mut Vec<LocationCheck>,
    lists: &mut ChunkListCache,
    report: &mut VerifyReport,
) -> Result<(), StoreError> {
    batch.sort_unstable_by(|a, b| a.file.cmp(&b.file));
    for check in batch.drain(..) {
        if !lists.holds(store, &check.id, vol, &check.dir, &check.name, check.extent)? {
            let path = check
                .dir
                .join(&check.name)
                .map(|p| p.display().to_string())
                .ok();
            report.findings.push(finding(Severity::Damage, Problem::IndexDanglingLocation, Some(volume), path, format!(
                "the index says chunk {} is at byte {} of this file, but the file's chunk list does not",
                check.id, check.extent.offset
            )));
        }
    }
    Ok(())
}

/// What [`ChunkListCache`] holds before it starts over, in chunks, each file counting
/// four more for its key and bookkeeping (at most about 24 MiB).
pub(super) const CACHED_CHUNKS: usize = 1 << 19;
pub(super) const FILE_COST: usize = 4;

/// Decoded chunk lists of the files whose location records are being checked: location
/// records come in chunk id order, so one file's records are far apart, and decoding
/// its list for each would cost (chunks of the file)^2. Bounded by [`CACHED_CHUNKS`].
#[derive(Default)]
pub(crate) struct ChunkListCache {
    /// Entry key -> (offset, id, length) of each chunk, in file order.
    lists: std::collections::HashMap<Vec<u8>, Vec<(u64, ChunkId, u32)>>,
    chunks: usize,
}

impl ChunkListCache {
    /// Whether the chunk list of `dir/name` has chunk `id` at `extent`, as a live
    /// location record says.
    pub(crate) fn holds(
        &mut self,
        store: &Store,
        id: &ChunkId,
        vol: VolumeId,
        dir: &VolPath,
        name: &[u8],
        extent: Extent,
    ) -> Result<bool, StoreError> {
        let key = crate::store::keys::entry_key(vol, dir, name);
        if !self.lists.contains_key(&key) {
            let mut offset = 0u64;
            let list: Vec<_> = store
                .chunk_list(vol, dir, name)?
                .unwrap_or_default()
                .iter()
                .map(|c| {
                    let at = offset;
                    offset += u64::from(c.len);
                    (at, c.id, c.len)
                })
                .collect();
            let cost = list.len() + FILE_COST;
            if self.chunks + cost > CACHED_CHUNKS {
                self.lists.clear();
                self.chunks = 0;
            }
            self.chunks += cost;
            self.lists.insert(key.clone(), list);
        }
        let list = &self.lists[&key];
        // Offsets strictly increase (no chunk is empty).
        Ok(list
            .binary_search_by_key(&extent.offset, |c| c.0)
            .is_ok_and(|i| list[i].1 == *id && list[i].2 == extent.len))
    }
}
