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
        self.hash_range(CF_CHUNKS, chunk.as_bytes())
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
        for item in self.hash_range(CF_CONTENTS, content.as_bytes()) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Durability;
    use crate::store::keys::HASH_KEYED_CFS;

    fn chunk(file: u32, n: u32) -> ChunkRef {
        ChunkRef {
            id: ChunkId(*blake3::hash(&[file.to_le_bytes(), n.to_le_bytes()].concat()).as_bytes()),
            len: 100 + n,
        }
    }

    /// The families looked up by hash filter their tables by it: a lookup must still find
    /// every key under its hash, in the memtable and in every table, and a walk of a
    /// whole family must still see every hash.
    #[test]
    fn lookups_by_hash_and_whole_walks_find_everything_across_tables() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_for_test(dir.path());
        let vol = VolumeId(1);
        let folder = VolPath::parse(b"d").unwrap();
        let files: Vec<(Vec<u8>, Vec<ChunkRef>)> = (0..300)
            .map(|f| {
                (
                    format!("f{f}").into_bytes(),
                    (0..3).map(|n| chunk(f, n)).collect(),
                )
            })
            .collect();
        // Three tables per family, and the last part left in the memtable.
        for (part, files) in files.chunks(75).enumerate() {
            let mut batch = store.batch();
            for (name, chunks) in files {
                batch.set_chunks(vol, &folder, name, chunks, &[]);
            }
            store.write(batch, Durability::Buffered).unwrap();
            if part < 3 {
                for cf in HASH_KEYED_CFS {
                    store.db.flush_cf(store.cf(cf)).unwrap();
                }
            }
        }
        for (name, chunks) in &files {
            for c in chunks {
                let found = store.chunk_locations(&c.id).unwrap();
                assert!(
                    matches!(&found[..], [ChunkLocation::Live { name: n, .. }] if n == name),
                    "{found:?}"
                );
            }
            let content = crate::chunking::content_id(chunks);
            assert_eq!(
                store.chunk_list_by_content(&content).unwrap().as_ref(),
                Some(chunks)
            );
        }
        assert!(store.chunk_locations(&chunk(999, 0).id).unwrap().is_empty());
        let all = store
            .all_chunk_locations()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        assert_eq!(all.len(), 900);
    }

    /// A directory's chunk lists read in one pass come in name order, from the name
    /// asked for, only that directory's, each as written; longer ones are passed over.
    #[test]
    fn a_directorys_chunk_lists_come_in_name_order_and_long_ones_are_passed_over() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_for_test(dir.path());
        let vol = VolumeId(1);
        let folder = VolPath::parse(b"d").unwrap();
        let below = VolPath::parse(b"d/e").unwrap();
        let mut batch = store.batch();
        for (f, name) in [b"a", b"b", b"c", b"e"].into_iter().enumerate() {
            let chunks: Vec<ChunkRef> = (0..=f as u32).map(|n| chunk(f as u32, n)).collect();
            batch.set_chunks(vol, &folder, name, &chunks, &[]);
        }
        batch.set_chunks(vol, &below, b"a", &[chunk(9, 0)], &[]);
        store.write(batch, Durability::Buffered).unwrap();
        let lists: Vec<(Vec<u8>, Option<Vec<ChunkRef>>)> = store
            .chunk_lists_from(vol, &folder, b"b", 2)
            .collect::<Result<_, _>>()
            .unwrap();
        let expected = vec![
            (b"b".to_vec(), Some(vec![chunk(1, 0), chunk(1, 1)])),
            (b"c".to_vec(), None),
            (b"e".to_vec(), None),
        ];
        assert_eq!(lists, expected);
    }
}
