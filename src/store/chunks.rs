//! Where chunks can be read from: the index's chunk locations (a live file's extent or a
//! pack record) and the lookups the sync engine, verify and repair make on them.

use rocksdb::ReadOptions;

use super::codec::{self, Extent, ScanStamp};
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
            .map(|item| item.and_then(|(key, value)| decode_location(&key, &value)))
            .collect()
    }

    /// One view of the index, as it is now, for reading a run of chunks: their locations
    /// through one iterator (one iterator's creation for the run, not one per chunk),
    /// and the scan stamps of the files that hold them, from the same moment.
    pub fn chunk_reads(&self) -> ChunkReads<'_> {
        let snapshot = self.db.snapshot();
        let mut locations = ReadOptions::default();
        locations.set_snapshot(&snapshot);
        // Each seek takes its chunk id as the prefix: the tables' prefix filters answer
        // it, and the iterator ends at the id's last key.
        locations.set_prefix_same_as_start(true);
        let mut points = ReadOptions::default();
        points.set_snapshot(&snapshot);
        ChunkReads {
            store: self,
            locations: self.db.raw_iterator_cf_opt(self.cf(CF_CHUNKS), locations),
            points,
            _snapshot: snapshot,
        }
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
                let location = decode_location(&item.0, &item.1)?;
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

/// [`Store::chunk_reads`]. A location and the stamp of its file read through one view
/// agree: the stamp is the one of the scan that found the chunk there, so a file that
/// still has that stamp still holds the chunk there.
pub struct ChunkReads<'s> {
    store: &'s Store,
    // The iterator and the options read through the snapshot: declared before it, so
    // they are dropped before it is released.
    locations: rocksdb::DBRawIterator<'s>,
    points: ReadOptions,
    _snapshot: rocksdb::Snapshot<'s>,
}

impl ChunkReads<'_> {
    /// Every place the index said `chunk` can be read from, as [`Store::chunk_locations`].
    pub fn locations(&mut self, chunk: &ChunkId) -> Result<Vec<ChunkLocation>, StoreError> {
        let id = chunk.as_bytes();
        let mut found = Vec::new();
        self.locations.seek(id);
        while let (Some(key), Some(value)) = (self.locations.key(), self.locations.value()) {
            if !key.starts_with(id) {
                break;
            }
            found.push(decode_location(key, value)?);
            self.locations.next();
        }
        self.locations.status().map_err(|e| self.store.rocks(e))?;
        Ok(found)
    }

    /// The scan stamp of `dir/name`, as [`Store::stamp`].
    pub fn stamp(
        &self,
        vol: VolumeId,
        dir: &VolPath,
        name: &[u8],
    ) -> Result<Option<ScanStamp>, StoreError> {
        self.store.stamp_through(vol, dir, name, &self.points)
    }
}

fn decode_location(key: &[u8], value: &[u8]) -> Result<ChunkLocation, StoreError> {
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
                batch.set_chunks(vol, &folder, name, chunks, None);
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
        // One view for many lookups, in any order, a missing id among them, finds what a
        // lookup of its own finds.
        let mut reads = store.chunk_reads();
        let mut ids: Vec<ChunkId> = files
            .iter()
            .flat_map(|(_, chunks)| chunks.iter().map(|c| c.id))
            .collect();
        ids.reverse();
        ids.insert(100, chunk(999, 0).id);
        for id in &ids {
            assert_eq!(
                reads.locations(id).unwrap(),
                store.chunk_locations(id).unwrap()
            );
        }
        let all = store
            .all_chunk_locations()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        assert_eq!(all.len(), 900);
    }

    /// A run's view keeps a chunk's location and its file's stamp from one moment: a
    /// rescan written after the view was made (new content, new stamp) is seen by
    /// neither, so the old extent is never trusted under the new stamp.
    #[test]
    fn a_runs_view_keeps_locations_and_stamps_of_one_moment() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_for_test(dir.path());
        let vol = VolumeId(1);
        let folder = VolPath::parse(b"d").unwrap();
        let (old, new) = ([chunk(1, 0), chunk(1, 1)], [chunk(2, 0)]);
        let (old_stamp, new_stamp) = (
            ScanStamp {
                size: 201,
                mtime_ns: 1,
                ..ScanStamp::default()
            },
            ScanStamp {
                size: 100,
                mtime_ns: 2,
                ..ScanStamp::default()
            },
        );
        let mut batch = store.batch();
        batch.set_chunks(vol, &folder, b"f", &old, None);
        batch.put_stamp(vol, &folder, b"f", &old_stamp);
        store.write(batch, Durability::Buffered).unwrap();

        let mut reads = store.chunk_reads();
        let mut rescan = store.batch();
        rescan.set_chunks(vol, &folder, b"f", &new, Some(&old));
        rescan.put_stamp(vol, &folder, b"f", &new_stamp);
        store.write(rescan, Durability::Buffered).unwrap();

        assert_eq!(reads.locations(&old[1].id).unwrap().len(), 1);
        assert!(reads.locations(&new[0].id).unwrap().is_empty());
        assert_eq!(reads.stamp(vol, &folder, b"f").unwrap(), Some(old_stamp));
        // A view made now sees the rescan.
        let mut now = store.chunk_reads();
        assert!(now.locations(&old[1].id).unwrap().is_empty());
        assert_eq!(now.locations(&new[0].id).unwrap().len(), 1);
        assert_eq!(now.stamp(vol, &folder, b"f").unwrap(), Some(new_stamp));
    }

    /// A new file's chunk list is written with puts alone (no tombstones of a previous
    /// list that was never there); replacing a list, even an empty file's, takes the old
    /// content's key and locations with it.
    #[test]
    fn a_new_list_writes_only_puts_and_a_replaced_one_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_for_test(dir.path());
        let vol = VolumeId(1);
        let folder = VolPath::parse(b"d").unwrap();
        let (empty, full) = (Vec::<ChunkRef>::new(), vec![chunk(3, 0), chunk(3, 1)]);
        let content = crate::chunking::content_id;

        let mut batch = store.batch();
        batch.set_chunks(vol, &folder, b"f", &empty, None);
        // The content key and the list itself.
        assert_eq!(batch.len(), 2);
        store.write(batch, Durability::Buffered).unwrap();
        assert_eq!(
            store.chunk_list_by_content(&content(&empty)).unwrap(),
            Some(empty.clone())
        );

        let mut batch = store.batch();
        batch.set_chunks(vol, &folder, b"f", &full, Some(&empty));
        store.write(batch, Durability::Buffered).unwrap();
        assert_eq!(store.chunk_list_by_content(&content(&empty)).unwrap(), None);
        assert_eq!(
            store.chunk_list_by_content(&content(&full)).unwrap(),
            Some(full.clone())
        );

        let mut batch = store.batch();
        batch.set_chunks(vol, &folder, b"f", &[chunk(4, 0)], Some(&full));
        store.write(batch, Durability::Buffered).unwrap();
        assert_eq!(store.chunk_list_by_content(&content(&full)).unwrap(), None);
        assert!(store.chunk_locations(&full[1].id).unwrap().is_empty());
        assert_eq!(store.chunk_locations(&chunk(4, 0).id).unwrap().len(), 1);
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
            batch.set_chunks(vol, &folder, name, &chunks, None);
        }
        batch.set_chunks(vol, &below, b"a", &[chunk(9, 0)], None);
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
