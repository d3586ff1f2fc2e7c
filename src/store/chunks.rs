//! Where chunks can be read from: the index's chunk locations (a live file's extent or a
//! pack record) and the lookups the sync engine, verify and repair make on them.

use super::codec::{self, Extent};
use super::keys::*;
use super::{Store, StoreError};
use crate::chunking::ChunkRef;
use crate::encoding::DecodeError;
use crate::ids::{ChunkId, ContentId, VolumeId};
use crate::pathname::VolPath;

impl Store {
    /// Every place the index says `chunk` can be read from.
    pub fn chunk_locations(&self, chunk: &ChunkId) -> Result<Vec<ChunkLocation>, StoreError> {
        let start = chunk.as_bytes().to_vec();
        let end = successor(&start);
        self.range(CF_CHUNKS, start, end)
            .map(|item| decode_location(&item?))
            .collect()
    }

    /// Whether the index records `chunk` as held by the live file `dir/name`.
    pub fn has_live_location(
        &self,
        chunk: &ChunkId,
        vol: VolumeId,
        dir: &VolPath,
        name: &[u8],
    ) -> Result<bool, StoreError> {
        let key = live_location_key(chunk, &entry_key(vol, dir, name));
        Ok(self.get(CF_CHUNKS, &key)?.is_some())
    }

    /// The chunk list of some live file whose content is `content`, if this node has one
    /// (so a file renamed or copied elsewhere needs no list from a peer).
    pub fn chunk_list_by_content(
        &self,
        content: &ContentId,
    ) -> Result<Option<Vec<ChunkRef>>, StoreError> {
        let start = content.as_bytes().to_vec();
        let end = successor(&start);
        for item in self.range(CF_CONTENTS, start, end) {
            let (key, _) = item?;
            let entry = &key[crate::ids::HASH_LEN..];
            if let Some(bytes) = self.get(CF_CHUNK_LISTS, entry)? {
                let list = codec::decode_chunk_list(&bytes)
                    .map_err(|e| StoreError::corrupt(CF_CHUNK_LISTS, entry, e))?;
                if crate::chunking::content_id(&list) == *content {
                    return Ok(Some(list));
                }
            }
        }
        Ok(None)
    }

    /// Every chunk location of the store, in chunk id order.
    pub fn all_chunk_locations(
        &self,
    ) -> impl Iterator<Item = Result<(ChunkId, ChunkLocation), StoreError>> + '_ {
        self.range(CF_CHUNKS, Vec::new(), vec![0xff; 33])
            .map(|item| {
                let item = item?;
                let location = decode_location(&item)?;
                Ok((
                    ChunkId(
                        item.0[..32]
                            .try_into()
                            .expect("location keys start with a chunk id"),
                    ),
                    location,
                ))
            })
    }

    /// Counts the distinct chunks that live files of `vol` hold.
    pub fn count_unique_chunks(&self, vol: VolumeId) -> Result<u64, StoreError> {
        let mut count = 0;
        let mut last: Option<ChunkId> = None;
        for item in self.all_chunk_locations() {
            let (id, location) = item?;
            if let ChunkLocation::Live { vol: v, .. } = location
                && v == vol
                && last != Some(id)
            {
                count += 1;
                last = Some(id);
            }
        }
        Ok(count)
    }
}

/// Where one copy of a chunk lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChunkLocation {
    /// Inside a live file of a volume, at `extent`.
    Live {
        vol: VolumeId,
        dir: VolPath,
        name: Vec<u8>,
        extent: Extent,
    },
    /// Inside a pack file.
    Pack { pack: u64, extent: Extent },
}

impl ChunkLocation {
    /// Where in its file the copy is.
    pub fn extent(&self) -> Extent {
        match self {
            ChunkLocation::Live { extent, .. } | ChunkLocation::Pack { extent, .. } => *extent,
        }
    }
}

fn decode_location((key, value): &(Box<[u8]>, Box<[u8]>)) -> Result<ChunkLocation, StoreError> {
    let corrupt = |e: String| StoreError::corrupt(CF_CHUNKS, key, e);
    let extent = codec::decode_extent(value).map_err(|e: DecodeError| corrupt(e.0))?;
    let (_, location) = parse_location_key(key).map_err(corrupt)?;
    Ok(match location {
        LocationKey::Live { entry_key } => {
            let (vol, dir, name) = parse_entry_key(entry_key).map_err(corrupt)?;
            ChunkLocation::Live {
                vol,
                dir,
                name: name.to_vec(),
                extent,
            }
        }
        LocationKey::Pack { pack } => ChunkLocation::Pack { pack, extent },
    })
}
