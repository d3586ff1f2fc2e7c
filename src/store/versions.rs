//! Kept versions: what a file (or symlink, FIFO, directory) was before a change from a
//! peer replaced or deleted it here, and the packs that hold the chunks no live file
//! holds any more (`schema/store.md`, "Versions").
//!
//! This module owns the `versions-v1` column family and the **version packs**:
//!
//! - **record**: [`Batch::put_version`] writes a [`VersionRecord`] in the same batch as
//!   the index change that replaced the version, so a crash leaves both or neither;
//! - **list**: [`Store::versions_of`] (one path), [`Store::versions_below`] (a directory
//!   and everything under it, or a whole volume), [`Store::all_versions`] (every record
//!   of the store, in key order: what a collector walks to find every chunk a kept
//!   version references, [`VersionRecord::chunks`]);
//! - **look up**: [`Store::version`] by path and [`VersionId`].
//!
//! Chunks of an old version go into the current version pack
//! ([`Store::keep_version_chunk`]) before the old bytes are gone; the pack is fsynced
//! ([`KeptChunks::finish`]) before any index record points into it. A chunk that a
//! version pack holds already is not appended twice (a busy pack's copy does not count:
//! busy packs are retired within a minute).

use std::collections::HashSet;
use std::sync::Mutex;

use super::codec::{self, Extent};
use super::collect::Pins;
use super::keys::{CF_VERSIONS, successor};
use super::pack::{PackWriter, pack_file_name};
use super::{Batch, Store, StoreError};
use crate::chunking::ChunkRef;
use crate::encoding::{DecodeError, Reader};
use crate::entry::Entry;
use crate::ids::{ChunkId, NodeId, VolumeId};
use crate::pathname::VolPath;

/// A version pack stops taking chunks at this size; the next chunk starts a new pack
/// (smaller packs are cheaper for a collector to rewrite).
pub const VERSION_PACK_BYTES: u64 = 256 << 20;

/// Format byte that starts every `versions-v1` value.
const VERSION_FORMAT: u8 = 1;

/// Why a version stopped being the live one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Why {
    /// A peer's newer version took its name.
    Replaced,
    /// A peer's delete removed it.
    Deleted,
    /// It lost a conflict: moved aside as a conflict copy (or its name taken).
    ConflictLoser,
}

impl Why {
    fn byte(self) -> u8 {
        match self {
            Why::Replaced => 1,
            Why::Deleted => 2,
            Why::ConflictLoser => 3,
        }
    }

    fn from_byte(byte: u8) -> Result<Why, DecodeError> {
        Ok(match byte {
            1 => Why::Replaced,
            2 => Why::Deleted,
            3 => Why::ConflictLoser,
            other => return Err(DecodeError(format!("unknown version reason {other}"))),
        })
    }

    pub fn word(self) -> &'static str {
        match self {
            Why::Replaced => "replaced",
            Why::Deleted => "deleted",
            Why::ConflictLoser => "conflict-loser",
        }
    }
}

/// Names one record among a path's versions: when it was replaced and a tiebreak.
/// Written as 24 hex digits (`shoal versions` prints it, `shoal restore --version`
/// takes it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VersionId {
    /// When this node recorded the replacement, ns since the Unix epoch (never negative).
    pub replaced_at_ns: u64,
    /// Distinguishes records of one path made in the same nanosecond.
    pub seq: u32,
}

impl VersionId {
    /// A new id for a replacement happening now.
    pub fn now() -> VersionId {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        VersionId {
            replaced_at_ns: crate::scan::now_ns().max(0) as u64,
            seq: SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        }
    }

    fn to_key_bytes(self) -> [u8; 12] {
        let mut out = [0u8; 12];
        out[..8].copy_from_slice(&self.replaced_at_ns.to_be_bytes());
        out[8..].copy_from_slice(&self.seq.to_be_bytes());
        out
    }

    pub fn to_hex(self) -> String {
        crate::ids::to_hex(&self.to_key_bytes())
    }

    pub fn from_hex(text: &str) -> Option<VersionId> {
        let bytes: [u8; 12] = crate::ids::from_hex(text)?.try_into().ok()?;
        Some(VersionId {
            replaced_at_ns: u64::from_be_bytes(bytes[..8].try_into().expect("8 bytes")),
            seq: u32::from_be_bytes(bytes[8..].try_into().expect("4 bytes")),
        })
    }
}

/// One kept version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VersionRecord {
    pub vol: VolumeId,
    /// Where it was (never the volume root).
    pub path: VolPath,
    pub id: VersionId,
    pub why: Why,
    /// The node whose change replaced or deleted it (for a conflict loser: the winner's).
    pub replaced_by: NodeId,
    /// The version itself as the index held it: kind (a symlink's target), mode, mtime,
    /// owner, extended attributes, size and content id, version vector.
    pub entry: Entry,
    /// A file's chunk list, in file order (empty for anything else).
    pub chunks: Vec<ChunkRef>,
}

/// `u32 BE volume || path || 0x00 || u64 BE replaced-at ns || u32 BE seq`.
pub fn version_key(vol: VolumeId, path: &VolPath, id: VersionId) -> Vec<u8> {
    let mut key = path_prefix(vol, path);
    key.extend_from_slice(&id.to_key_bytes());
    key
}

/// The prefix of every record of `path`.
fn path_prefix(vol: VolumeId, path: &VolPath) -> Vec<u8> {
    let mut key = Vec::with_capacity(4 + path.as_bytes().len() + 13);
    key.extend_from_slice(&vol.0.to_be_bytes());
    key.extend_from_slice(path.as_bytes());
    key.push(0);
    key
}

fn parse_version_key(key: &[u8]) -> Result<(VolumeId, VolPath, VersionId), String> {
    let bad = |why: &str| format!("bad version key {}: {why}", crate::ids::to_hex(key));
    if key.len() < 4 + 1 + 12 + 1 {
        return Err(bad("too short"));
    }
    let (vol, rest) = key.split_at(4);
    let (path, id) = rest.split_at(rest.len() - 13);
    if id[0] != 0 {
        return Err(bad("no separator"));
    }
    let path = VolPath::parse(path).map_err(|e| bad(&e.to_string()))?;
    if path.is_root() {
        return Err(bad("the volume root"));
    }
    let id: [u8; 12] = id[1..].try_into().expect("12 bytes");
    Ok((
        VolumeId(u32::from_be_bytes(vol.try_into().expect("4 bytes"))),
        path,
        VersionId {
            replaced_at_ns: u64::from_be_bytes(id[..8].try_into().expect("8 bytes")),
            seq: u32::from_be_bytes(id[8..].try_into().expect("4 bytes")),
        },
    ))
}

/// `01 || u8 why || u64 replaced-by node || u32 n || entry (n bytes) || chunk list`.
fn encode_value(record: &VersionRecord) -> Vec<u8> {
    let entry = codec::encode_entry(&record.entry);
    let chunks = codec::encode_chunk_list(&record.chunks);
    let mut out = Vec::with_capacity(14 + entry.len() + chunks.len());
    out.push(VERSION_FORMAT);
    out.push(record.why.byte());
    out.extend_from_slice(&record.replaced_by.0.to_le_bytes());
    out.extend_from_slice(&(entry.len() as u32).to_le_bytes());
    out.extend_from_slice(&entry);
    out.extend_from_slice(&chunks);
    out
}

fn decode_record(key: &[u8], value: &[u8]) -> Result<VersionRecord, StoreError> {
    let corrupt = |e: String| StoreError::corrupt(CF_VERSIONS, key, e);
    let (vol, path, id) = parse_version_key(key).map_err(corrupt)?;
    let mut r = Reader::new(value);
    let decoded = (|| {
        let format = r.u8("version format")?;
        if format != VERSION_FORMAT {
            return Err(DecodeError(format!("unknown version format {format}")));
        }
        let why = Why::from_byte(r.u8("version reason")?)?;
        let replaced_by = NodeId(r.u64("replacing node")?);
        let len = r.u32("entry length")? as usize;
        let entry = codec::decode_entry(r.take(len, "entry")?)?;
        let chunks = codec::decode_chunk_list(r.take(r.remaining(), "chunk list")?)?;
        Ok((why, replaced_by, entry, chunks))
    })();
    let (why, replaced_by, entry, chunks) = decoded.map_err(|e| corrupt(e.0))?;
    Ok(VersionRecord {
        vol,
        path,
        id,
        why,
        replaced_by,
        entry,
        chunks,
    })
}

impl Batch<'_> {
    /// Records a kept version (with the index change that replaced it).
    pub fn put_version(&mut self, record: &VersionRecord) {
        let key = version_key(record.vol, &record.path, record.id);
        self.put(CF_VERSIONS, &key, &encode_value(record));
    }

    /// Forgets a kept version (its chunks stay in their packs until collected).
    pub fn delete_version(&mut self, vol: VolumeId, path: &VolPath, id: VersionId) {
        self.delete(CF_VERSIONS, &version_key(vol, path, id));
    }
}

/// The current version pack, shared by every pull of the store.
#[derive(Default)]
pub(super) struct VersionPacks(Mutex<Option<(u64, PackWriter)>>);

impl VersionPacks {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Option<(u64, PackWriter)>> {
        self.0.lock().expect("version pack lock")
    }
}

/// Chunks appended to a version pack for one batch of changes, not yet durable, and the
/// packs the batch relies on: pinned against a collection until this is dropped, which
/// the caller does after writing the batch that holds the version records
/// (`schema/store.md`, "Collecting packs").
pub struct KeptChunks {
    located: Vec<(ChunkId, u64, Extent)>,
    seen: HashSet<ChunkId>,
    bytes: u64,
    pins: Pins,
}

impl KeptChunks {
    /// Whether `id` is in a version pack already (which stays pinned), or was appended
    /// for this batch.
    pub fn holds(&mut self, store: &Store, id: &ChunkId) -> Result<bool, StoreError> {
        Ok(self.seen.contains(id) || store.rely_on_version_pack(id, &mut self.pins)?)
    }

    /// Whether `id` was appended for this batch.
    pub fn appended(&self, id: &ChunkId) -> bool {
        self.seen.contains(id)
    }

    /// Bytes appended so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Makes the appended chunks durable (one fsync of the pack) and adds their pack
    /// locations to `batch`, which the caller writes before, or with, the version
    /// records that need them. The pins stay until `self` is dropped.
    pub fn finish(&mut self, store: &Store, batch: &mut Batch<'_>) -> Result<(), StoreError> {
        if self.located.is_empty() {
            return Ok(());
        }
        if let Some((_, writer)) = store.versions.lock().as_ref() {
            writer.sync()?;
        }
        for (id, pack, extent) in self.located.drain(..) {
            batch.put_pack_location(&id, pack, extent);
        }
        Ok(())
    }
}

impl Store {
    /// A batch of kept versions to come: nothing appended, nothing pinned.
    pub fn kept_chunks(&self) -> KeptChunks {
        KeptChunks {
            located: Vec::new(),
            seen: HashSet::new(),
            bytes: 0,
            pins: self.no_pins(),
        }
    }

    /// Appends one chunk of a version to keep (its bytes already checked against `id`)
    /// to the current version pack, unless a version pack holds it already.
    pub fn keep_version_chunk(
        &self,
        kept: &mut KeptChunks,
        id: &ChunkId,
        data: &[u8],
    ) -> Result<(), StoreError> {
        if kept.holds(self, id)? {
            return Ok(());
        }
        let mut current = self.versions.lock();
        if current
            .as_ref()
            .is_some_and(|(_, w)| w.len() + data.len() as u64 > VERSION_PACK_BYTES)
        {
            // The full pack's appended records are made durable by `finish` only if it
            // is still current: sync it now, before it is let go.
            if let Some((_, writer)) = current.as_ref() {
                writer.sync()?;
            }
            *current = None;
        }
        if current.is_none() {
            let number = self.new_pack_number()?;
            let writer = PackWriter::open(&self.packs_dir().join(pack_file_name(number)))?;
            *current = Some((number, writer));
        }
        let (number, writer) = current.as_mut().expect("just opened");
        // Pinned while the pack is still current, so no collection can have marked it.
        self.pin_pack(&mut kept.pins, *number);
        let extent = writer.append(id, data)?;
        kept.located.push((*id, *number, extent));
        kept.seen.insert(*id);
        kept.bytes += data.len() as u64;
        Ok(())
    }

    /// The records of `cf`-ordered keys in `[start, end)`, decoded.
    fn versions_in(
        &self,
        start: Vec<u8>,
        end: Vec<u8>,
    ) -> Box<dyn Iterator<Item = Result<VersionRecord, StoreError>> + '_> {
        // A store opened read-only that was written before versions existed has no
        // such column family: it holds no versions.
        if self.db.cf_handle(CF_VERSIONS).is_none() {
            return Box::new(std::iter::empty());
        }
        Box::new(self.range(CF_VERSIONS, start, end).map(|item| {
            let (key, value) = item?;
            decode_record(&key, &value)
        }))
    }

    /// The kept versions of `path`, oldest first.
    pub fn versions_of(
        &self,
        vol: VolumeId,
        path: &VolPath,
    ) -> impl Iterator<Item = Result<VersionRecord, StoreError>> + '_ {
        let start = path_prefix(vol, path);
        let end = successor(&start);
        self.versions_in(start, end)
    }

    /// The kept versions of `dir` itself and of every path below it (the whole volume
    /// for the root), in key order: by path bytes, each path's oldest first.
    pub fn versions_below(
        &self,
        vol: VolumeId,
        dir: &VolPath,
    ) -> impl Iterator<Item = Result<VersionRecord, StoreError>> + '_ {
        let ranges = if dir.is_root() {
            let start = vol.0.to_be_bytes().to_vec();
            vec![(start.clone(), successor(&start))]
        } else {
            let own = path_prefix(vol, dir);
            let mut below = [&vol.0.to_be_bytes()[..], dir.as_bytes()].concat();
            below.push(b'/');
            vec![
                (own.clone(), successor(&own)),
                (below.clone(), successor(&below)),
            ]
        };
        ranges
            .into_iter()
            .flat_map(move |(start, end)| self.versions_in(start, end))
    }

    /// Every kept version of the store, in key order (volume, path, time).
    pub fn all_versions(&self) -> impl Iterator<Item = Result<VersionRecord, StoreError>> + '_ {
        self.versions_in(Vec::new(), vec![0xff; 5])
    }

    /// One kept version of `path`.
    pub fn version(
        &self,
        vol: VolumeId,
        path: &VolPath,
        id: VersionId,
    ) -> Result<Option<VersionRecord>, StoreError> {
        if self.db.cf_handle(CF_VERSIONS).is_none() {
            return Ok(None);
        }
        let key = version_key(vol, path, id);
        self.get(CF_VERSIONS, &key)?
            .map(|value| decode_record(&key, &value))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::{EntryKind, VersionVector};
    use crate::store::{Durability, OpenOptions};

    fn record(path: &str, id: VersionId, chunks: Vec<ChunkRef>) -> VersionRecord {
        VersionRecord {
            vol: VolumeId(1),
            path: VolPath::parse(path.as_bytes()).unwrap(),
            id,
            why: Why::Replaced,
            replaced_by: NodeId(7),
            entry: Entry {
                kind: EntryKind::File {
                    size: chunks.iter().map(|c| u64::from(c.len)).sum(),
                    content_id: crate::chunking::content_id(&chunks),
                    chunks: chunks.len() as u32,
                },
                mode: 0o640,
                mtime_ns: 1_700_000_000_000_000_000,
                uid: 0,
                gid: 0,
                xattrs: Default::default(),
                link: None,
                version: VersionVector::from_pairs([(NodeId(7), 3)]),
            },
            chunks,
        }
    }

    #[test]
    fn records_list_by_path_and_by_directory_and_read_back_by_id() {
        let dir = tempfile::tempdir().unwrap();
        let options = OpenOptions {
            create: true,
            read_only: false,
            chunk_params: None,
        };
        let store = Store::open(dir.path(), options).unwrap();
        let chunk = ChunkRef {
            id: ChunkId::of(b"old bytes"),
            len: 9,
        };
        let at = |ns, seq| VersionId {
            replaced_at_ns: ns,
            seq,
        };
        let records = [
            record("a", at(5, 0), vec![]),
            record("a/x", at(9, 0), vec![chunk]),
            record("a/x", at(2, 1), vec![]),
            record("a.b", at(1, 0), vec![]),
            record("ab/y", at(1, 0), vec![]),
        ];
        let mut batch = store.batch();
        for r in &records {
            batch.put_version(r);
        }
        store.write(batch, Durability::Durable).unwrap();
        let x = VolPath::parse(b"a/x").unwrap();
        let of_x: Vec<_> = store
            .versions_of(VolumeId(1), &x)
            .map(|r| r.unwrap().id)
            .collect();
        assert_eq!(of_x, [at(2, 1), at(9, 0)]);
        let below: Vec<_> = store
            .versions_below(VolumeId(1), &VolPath::parse(b"a").unwrap())
            .map(|r| r.unwrap().path.display().to_string())
            .collect();
        assert_eq!(below, ["a", "a/x", "a/x"]);
        assert_eq!(store.all_versions().count(), 5);
        let id = VersionId::from_hex(&at(9, 0).to_hex()).unwrap();
        assert_eq!(
            store.version(VolumeId(1), &x, id).unwrap().unwrap(),
            records[1]
        );
    }

    #[test]
    fn kept_chunks_are_appended_once_and_readable_from_their_pack() {
        let dir = tempfile::tempdir().unwrap();
        let options = OpenOptions {
            create: true,
            read_only: false,
            chunk_params: None,
        };
        let store = Store::open(dir.path(), options).unwrap();
        let data = b"a chunk of an old version";
        let id = ChunkId::of(data);
        let mut kept = store.kept_chunks();
        store.keep_version_chunk(&mut kept, &id, data).unwrap();
        store.keep_version_chunk(&mut kept, &id, data).unwrap();
        assert_eq!(kept.bytes(), data.len() as u64);
        let mut batch = store.batch();
        kept.finish(&store, &mut batch).unwrap();
        store.write(batch, Durability::Durable).unwrap();
        drop(kept);
        assert!(store.kept_chunks().holds(&store, &id).unwrap());
        let mut again = store.kept_chunks();
        store.keep_version_chunk(&mut again, &id, data).unwrap();
        assert_eq!(again.bytes(), 0);
    }

    #[test]
    fn damaged_keys_and_values_are_corrupt_records_not_panics() {
        assert!(parse_version_key(b"\0\0\0\x01").is_err());
        assert!(
            parse_version_key(&[0, 0, 0, 1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]).is_err()
        );
        let good = record("f", VersionId::now(), vec![]);
        let key = version_key(good.vol, &good.path, good.id);
        let value = encode_value(&good);
        assert_eq!(decode_record(&key, &value).unwrap(), good);
        for cut in 0..value.len() {
            assert!(decode_record(&key, &value[..cut]).is_err());
        }
    }
}
