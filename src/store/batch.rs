//! Writing: changes gathered in a [`Batch`] and applied atomically.

use rocksdb::{WriteBatch, WriteOptions};

use super::codec::{self, Extent, ScanStamp};
use super::keys::*;
use super::{ChunkLocation, Store, StoreError, VolumeRecord};
use crate::chunking::ChunkRef;
use crate::entry::Entry;
use crate::ids::{ChunkId, NodeId, VolumeId};
use crate::pathname::VolPath;
use crate::tree::TreeNode;

/// How far a write has gone when [`Store::write`] returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// RocksDB has the batch, its write-ahead log not yet on disk: a crash may lose the
    /// whole batch, never part of it. For work that the next scan or round redoes.
    Buffered,
    /// The write-ahead log is on disk (`fsync`): for what a later step relies on (files
    /// published, pack records appended, a finished scan).
    Durable,
}

impl Store {
    pub fn batch(&self) -> Batch<'_> {
        Batch {
            store: self,
            wb: WriteBatch::default(),
            ops: 0,
            changed: Vec::new(),
            last_dirty: None,
        }
    }

    /// Applies a batch atomically, as durably as `durability` says; refused with
    /// [`StoreError::LowSpace`] (nothing written) while the state directory has less than
    /// [`crate::space::STATE_WRITE_RESERVE`] free.
    pub fn write(&self, batch: Batch<'_>, durability: Durability) -> Result<(), StoreError> {
        self.write_sealed(batch.seal(), durability)
    }

    /// [`Store::write`] for a batch sealed earlier ([`Batch::seal`]).
    pub fn write_sealed(&self, batch: Sealed, durability: Durability) -> Result<(), StoreError> {
        Self::ensure_room(&self.state_dir, crate::space::STATE_WRITE_RESERVE)?;
        let options = match durability {
            Durability::Durable => durable(),
            Durability::Buffered => WriteOptions::default(),
        };
        if batch.changed.is_empty() {
            return self
                .db
                .write_opt(batch.wb, &options)
                .map_err(|e| self.rocks(e));
        }
        self.write_numbered(batch.wb, &batch.changed, &options)
    }

    /// Makes every write so far durable.
    pub fn sync(&self) -> Result<(), StoreError> {
        self.db.flush_wal(true).map_err(|e| self.rocks(e))
    }
}

pub(super) fn durable() -> WriteOptions {
    let mut options = WriteOptions::default();
    options.set_sync(true);
    options
}

/// A set of changes applied atomically by [`Store::write`].
pub struct Batch<'s> {
    pub(super) store: &'s Store,
    pub(super) wb: WriteBatch,
    pub(super) ops: usize,
    /// The entries this batch writes: each gets the next number of its volume's change
    /// feed when the batch is written.
    pub(super) changed: Vec<Changed>,
    /// The dirty mark this batch wrote last: marking it again (each file of a directory
    /// marks it) writes nothing more.
    last_dirty: Option<Vec<u8>>,
}

/// A batch with every change gathered, borrowing nothing: written later, perhaps by
/// another thread, with [`Store::write_sealed`].
pub struct Sealed {
    wb: WriteBatch,
    changed: Vec<Changed>,
}

/// One entry write of a batch, to number in its volume's change feed.
pub(super) struct Changed {
    pub(super) vol: VolumeId,
    /// The entry key without the volume.
    pub(super) key: Vec<u8>,
    /// The peer whose entry this is, exactly as it sent it.
    pub(super) sent_by: Option<NodeId>,
}

impl Batch<'_> {
    /// The changes gathered so far, to write later ([`Store::write_sealed`]).
    pub fn seal(self) -> Sealed {
        Sealed {
            wb: self.wb,
            changed: self.changed,
        }
    }

    /// Number of operations queued (to bound batch size).
    pub fn len(&self) -> usize {
        self.ops
    }

    pub fn is_empty(&self) -> bool {
        self.ops == 0
    }

    pub(super) fn put(&mut self, cf: &'static str, key: &[u8], value: &[u8]) {
        self.wb.put_cf(self.store.cf(cf), key, value);
        self.ops += 1;
    }

    pub(super) fn delete(&mut self, cf: &'static str, key: &[u8]) {
        self.wb.delete_cf(self.store.cf(cf), key);
        self.ops += 1;
    }

    pub fn put_volume(&mut self, name: &str, record: &VolumeRecord) {
        let value = serde_json::to_vec(record).expect("a volume record always serializes");
        self.put(CF_META, &volume_meta_key(name), &value);
    }

    /// Writes an entry made on this node, and numbers the change in the volume's feed.
    pub fn put_entry(&mut self, vol: VolumeId, dir: &VolPath, name: &[u8], entry: &Entry) {
        self.put_entry_sent_by(vol, dir, name, entry, None);
    }

    /// Writes an entry, and numbers the change in the volume's feed; `sent_by` names the
    /// peer whose entry it is, exactly as that peer sent it (a pull that took it whole),
    /// and is recorded with the number: the feed leaves the name out of its answers to
    /// that peer while this is its last change ([`Store::changes_since`]).
    pub fn put_entry_sent_by(
        &mut self,
        vol: VolumeId,
        dir: &VolPath,
        name: &[u8],
        entry: &Entry,
        sent_by: Option<NodeId>,
    ) {
        let key = entry_key(vol, dir, name);
        self.put(CF_ENTRIES, &key, &codec::encode_entry(entry));
        self.changed.push(Changed {
            vol,
            key: key[4..].to_vec(),
            sent_by,
        });
    }

    /// Records that sync is about to rename a received file with `entry` into place at
    /// `dir/name` (see [`publishing_key`]).
    pub fn put_publishing(&mut self, vol: VolumeId, dir: &VolPath, name: &[u8], entry: &Entry) {
        self.put(
            CF_META,
            &publishing_key(vol, dir, name),
            &codec::encode_entry(entry),
        );
    }

    pub fn delete_publishing(&mut self, vol: VolumeId, dir: &VolPath, name: &[u8]) {
        self.delete(CF_META, &publishing_key(vol, dir, name));
    }

    /// Records `count` as the highest count of ours the name was given (see
    /// [`issued_key`]).
    pub fn put_issued(&mut self, vol: VolumeId, dir: &VolPath, name: &[u8], count: u64) {
        self.put(CF_META, &issued_key(vol, dir, name), &count.to_le_bytes());
    }

    pub fn delete_issued(&mut self, vol: VolumeId, dir: &VolPath, name: &[u8]) {
        self.delete(CF_META, &issued_key(vol, dir, name));
    }

    /// Holds the delete of `path` back from peers (`crate::guard`).
    pub fn put_held(&mut self, vol: VolumeId, path: &VolPath, held: &codec::Held) {
        self.put(CF_META, &held_key(vol, path), &codec::encode_held(held));
    }

    /// Lets the held delete of `path` go (released, restored, or written as tombstones).
    pub fn delete_held(&mut self, vol: VolumeId, path: &VolPath) {
        self.delete(CF_META, &held_key(vol, path));
    }

    /// Forgets a name entirely, without a tombstone (for names that never synced, and
    /// tombstones past their retention): not a change the feed numbers, since no peer
    /// is to act on it.
    pub fn delete_entry(&mut self, vol: VolumeId, dir: &VolPath, name: &[u8]) {
        self.delete(CF_ENTRIES, &entry_key(vol, dir, name));
    }

    pub fn put_stamp(&mut self, vol: VolumeId, dir: &VolPath, name: &[u8], stamp: &ScanStamp) {
        self.put(
            CF_SCAN_CACHE,
            &entry_key(vol, dir, name),
            &codec::encode_stamp(stamp),
        );
    }

    pub fn delete_stamp(&mut self, vol: VolumeId, dir: &VolPath, name: &[u8]) {
        self.delete(CF_SCAN_CACHE, &entry_key(vol, dir, name));
    }

    /// Records a live file's chunk list and where each chunk sits in it, replacing the
    /// locations of its previous chunk list `old` (`None`: the index holds none for the
    /// name, and nothing is there to delete: a new file writes no tombstones).
    pub fn set_chunks(
        &mut self,
        vol: VolumeId,
        dir: &VolPath,
        name: &[u8],
        chunks: &[ChunkRef],
        old: Option<&[ChunkRef]>,
    ) {
        let key = entry_key(vol, dir, name);
        if let Some(old) = old {
            for chunk in old {
                self.delete(CF_CHUNKS, &live_location_key(&chunk.id, &key));
            }
            self.delete(
                CF_CONTENTS,
                &content_key(&crate::chunking::content_id(old), &key),
            );
        }
        self.put(
            CF_CONTENTS,
            &content_key(&crate::chunking::content_id(chunks), &key),
            b"",
        );
        let mut offset = 0u64;
        for chunk in chunks {
            let extent = codec::encode_extent(Extent {
                offset,
                len: chunk.len,
            });
            self.put(CF_CHUNKS, &live_location_key(&chunk.id, &key), &extent);
            offset += u64::from(chunk.len);
        }
        self.put(CF_CHUNK_LISTS, &key, &codec::encode_chunk_list(chunks));
    }

    /// Forgets a file's chunk list and the locations it gave.
    pub fn delete_chunks(&mut self, vol: VolumeId, dir: &VolPath, name: &[u8], old: &[ChunkRef]) {
        let key = entry_key(vol, dir, name);
        for chunk in old {
            self.delete(CF_CHUNKS, &live_location_key(&chunk.id, &key));
        }
        self.delete(
            CF_CONTENTS,
            &content_key(&crate::chunking::content_id(old), &key),
        );
        self.delete(CF_CHUNK_LISTS, &key);
    }

    /// Forgets one location of a chunk (a record that points at nothing valid).
    pub fn delete_location(&mut self, chunk: &ChunkId, location: &ChunkLocation) {
        let key = match location {
            ChunkLocation::Live { vol, dir, name, .. } => {
                live_location_key(chunk, &entry_key(*vol, dir, name))
            }
            ChunkLocation::Pack { pack, .. } => pack_location_key(chunk, *pack),
        };
        self.delete(CF_CHUNKS, &key);
    }

    /// Records a chunk stored in a pack.
    pub fn put_pack_location(&mut self, chunk: &ChunkId, pack: u64, extent: Extent) {
        self.put(
            CF_CHUNKS,
            &pack_location_key(chunk, pack),
            &codec::encode_extent(extent),
        );
    }

    pub fn mark_dirty(&mut self, vol: VolumeId, dir: &VolPath) {
        let key = dir_key(vol, dir);
        if self.last_dirty.as_ref() != Some(&key) {
            self.put(CF_DIRTY, &key, b"");
            self.last_dirty = Some(key);
        }
    }

    pub fn clear_dirty(&mut self, vol: VolumeId, dir: &VolPath) {
        self.last_dirty = None;
        self.delete(CF_DIRTY, &dir_key(vol, dir));
    }

    pub fn put_tree_node(&mut self, vol: VolumeId, dir: &VolPath, node: &TreeNode) {
        self.put(CF_TREE, &dir_key(vol, dir), &codec::encode_tree_node(node));
    }

    pub fn delete_tree_node(&mut self, vol: VolumeId, dir: &VolPath) {
        self.delete(CF_TREE, &dir_key(vol, dir));
    }
}
