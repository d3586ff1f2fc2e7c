//! Byte encodings of the values kept in the index (specified in `schema/store.md`).
//!
//! Little-endian fixed-width integers, length-prefixed byte strings. Decoding never
//! trusts a length: every read is bounds-checked and a short, long or unknown record is
//! a [`DecodeError`], never a panic.

use crate::chunking::ChunkRef;
use crate::encoding::{DecodeError, Reader, put_short_bytes};
use crate::entry::{Entry, EntryKind, VersionVector};
use crate::ids::{ChunkId, ContentId, HASH_LEN, NodeId, TreeHash};
use crate::pathname::VolPath;
use crate::tree::{PageSummary, SubtreeTotals, TreeNode};
use crate::xattrs::Xattrs;

/// Version byte that starts every entry and tree-node value.
const VALUE_FORMAT: u8 = 1;

const KIND_TOMBSTONE: u8 = 0;
const KIND_FILE: u8 = 1;
const KIND_DIR: u8 = 2;
const KIND_SYMLINK: u8 = 3;
const KIND_FIFO: u8 = 4;

/// Optional sections after an entry's kind-specific fields, each a tag byte and its
/// fields, tags strictly increasing; an entry without them is encoded as before they
/// existed, so entries written by earlier versions decode unchanged.
const EXT_XATTRS: u8 = 1;
const EXT_LINK: u8 = 2;

pub fn encode_entry(entry: &Entry) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.push(VALUE_FORMAT);
    out.push(match entry.kind {
        EntryKind::Tombstone { .. } => KIND_TOMBSTONE,
        EntryKind::File { .. } => KIND_FILE,
        EntryKind::Dir => KIND_DIR,
        EntryKind::Symlink { .. } => KIND_SYMLINK,
        EntryKind::Fifo => KIND_FIFO,
    });
    out.extend_from_slice(&entry.mode.to_le_bytes());
    out.extend_from_slice(&entry.mtime_ns.to_le_bytes());
    out.extend_from_slice(&entry.uid.to_le_bytes());
    out.extend_from_slice(&entry.gid.to_le_bytes());
    // Vectors hold at most MAX_VECTOR_PAIRS pairs (`VersionVector::merged` and the
    // decoders see to it); were that ever broken, the record would still decode.
    let pairs = entry.version.pairs();
    let pairs = &pairs[..pairs.len().min(usize::from(u16::MAX))];
    let count = u16::try_from(pairs.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&count.to_le_bytes());
    for (node, counter) in pairs {
        out.extend_from_slice(&node.0.to_le_bytes());
        out.extend_from_slice(&counter.to_le_bytes());
    }
    match &entry.kind {
        EntryKind::Tombstone { deleted_at_ns } => {
            out.extend_from_slice(&deleted_at_ns.to_le_bytes())
        }
        EntryKind::File {
            size,
            content_id,
            chunks,
        } => {
            out.extend_from_slice(&size.to_le_bytes());
            out.extend_from_slice(content_id.as_bytes());
            out.extend_from_slice(&chunks.to_le_bytes());
        }
        EntryKind::Dir | EntryKind::Fifo => {}
        EntryKind::Symlink { target } => put_short_bytes(&mut out, target),
    }
    if !entry.xattrs.is_empty() {
        out.push(EXT_XATTRS);
        entry.xattrs.encode(&mut out);
    }
    if let Some(leader) = &entry.link {
        out.push(EXT_LINK);
        put_short_bytes(&mut out, leader.as_bytes());
    }
    out
}

/// Decodes an entry read from the store, normalising its version vector.
pub fn decode_entry(bytes: &[u8]) -> Result<Entry, DecodeError> {
    let (entry, pairs) = decode_entry_parts(bytes)?;
    Ok(Entry {
        version: VersionVector::from_pairs(pairs),
        ..entry
    })
}

/// Whether an encoded entry is of a live name (not a tombstone), reading no more of it
/// than its kind: for walks over many entries that need nothing else.
pub fn decode_is_live(bytes: &[u8]) -> Result<bool, DecodeError> {
    let mut r = Reader::new(bytes);
    let format = r.u8("format")?;
    if format != VALUE_FORMAT {
        return Err(DecodeError(format!("unknown entry format {format}")));
    }
    Ok(r.u8("kind")? != KIND_TOMBSTONE)
}

/// Decodes an entry a peer sent: its version vector must be canonical (sorted, unique,
/// bounded, counters in range), see [`VersionVector::try_canonical`].
pub fn decode_canonical_entry(bytes: &[u8]) -> Result<Entry, DecodeError> {
    let (entry, pairs) = decode_entry_parts(bytes)?;
    let version =
        VersionVector::try_canonical(pairs).map_err(|e| DecodeError(format!("entry: {e}")))?;
    Ok(Entry { version, ..entry })
}

/// An entry with an empty version vector, and the vector's pairs as encoded.
fn decode_entry_parts(bytes: &[u8]) -> Result<(Entry, Vec<(NodeId, u64)>), DecodeError> {
    let mut r = Reader::new(bytes);
    let format = r.u8("format")?;
    if format != VALUE_FORMAT {
        return Err(DecodeError(format!("unknown entry format {format}")));
    }
    let kind_tag = r.u8("kind")?;
    let mode = r.u32("mode")?;
    let mtime_ns = r.i64("mtime")?;
    let uid = r.u32("uid")?;
    let gid = r.u32("gid")?;
    let count = r.u16("version vector")?;
    // Bounded by the bytes present before anything is reserved.
    if usize::from(count) * 16 > bytes.len() {
        return Err(DecodeError(format!(
            "version vector of {count} pairs in a {}-byte entry",
            bytes.len()
        )));
    }
    let mut pairs = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        pairs.push((NodeId(r.u64("version vector")?), r.u64("version vector")?));
    }
    let kind = match kind_tag {
        KIND_TOMBSTONE => EntryKind::Tombstone {
            deleted_at_ns: r.i64("deletion time")?,
        },
        KIND_FILE => EntryKind::File {
            size: r.u64("size")?,
            content_id: ContentId(r.hash("content id")?),
            chunks: r.u32("chunk count")?,
        },
        KIND_DIR => EntryKind::Dir,
        KIND_FIFO => EntryKind::Fifo,
        KIND_SYMLINK => EntryKind::Symlink {
            target: r.short_bytes("symlink target")?.to_vec(),
        },
        other => return Err(DecodeError(format!("unknown entry kind {other}"))),
    };
    let mut xattrs = Xattrs::default();
    let mut link = None;
    let mut last_tag = 0;
    while r.remaining() > 0 {
        let tag = r.u8("entry section")?;
        if tag <= last_tag {
            return Err(DecodeError(format!(
                "entry section {tag} after section {last_tag}"
            )));
        }
        match tag {
            EXT_XATTRS => {
                xattrs = Xattrs::decode(&mut r)?;
                if xattrs.is_empty() {
                    return Err(DecodeError("an empty extended attribute section".into()));
                }
            }
            EXT_LINK => {
                let path = VolPath::parse(r.short_bytes("hard link leader")?)
                    .map_err(|e| DecodeError(format!("hard link leader: {e}")))?;
                if path.is_root() || !matches!(kind, EntryKind::File { .. }) {
                    return Err(DecodeError(
                        "a hard link section on the root or on something not a file".into(),
                    ));
                }
                link = Some(path);
            }
            other => return Err(DecodeError(format!("unknown entry section {other}"))),
        }
        last_tag = tag;
    }
    r.finish("entry")?;
    let entry = Entry {
        kind,
        mode,
        mtime_ns,
        uid,
        gid,
        xattrs,
        link,
        version: VersionVector::default(),
    };
    Ok((entry, pairs))
}

/// Bytes one chunk takes in an encoded chunk list: its id and its u32 length.
pub const CHUNK_REF_LEN: usize = HASH_LEN + 4;

pub fn encode_chunk_list(chunks: &[ChunkRef]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + chunks.len() * CHUNK_REF_LEN);
    out.extend_from_slice(&(chunks.len() as u32).to_le_bytes());
    for chunk in chunks {
        out.extend_from_slice(chunk.id.as_bytes());
        out.extend_from_slice(&chunk.len.to_le_bytes());
    }
    out
}

pub fn decode_chunk_list(bytes: &[u8]) -> Result<Vec<ChunkRef>, DecodeError> {
    let mut r = Reader::new(bytes);
    let count = r.u32("chunk count")? as usize;
    if bytes.len() != 4 + count * CHUNK_REF_LEN {
        return Err(DecodeError(format!(
            "chunk list of {count} chunks has {} bytes",
            bytes.len()
        )));
    }
    let mut chunks = Vec::with_capacity(count);
    for _ in 0..count {
        chunks.push(ChunkRef {
            id: ChunkId(r.hash("chunk id")?),
            len: r.u32("chunk length")?,
        });
    }
    Ok(chunks)
}

/// What `stat` said of a name when it was last indexed; if it still says the same, the
/// scanner trusts the index without reading the file.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct ScanStamp {
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub ino: u64,
    pub dev: u64,
}

pub fn encode_stamp(stamp: &ScanStamp) -> [u8; 40] {
    let mut out = [0u8; 40];
    out[0..8].copy_from_slice(&stamp.size.to_le_bytes());
    out[8..16].copy_from_slice(&stamp.mtime_ns.to_le_bytes());
    out[16..24].copy_from_slice(&stamp.ctime_ns.to_le_bytes());
    out[24..32].copy_from_slice(&stamp.ino.to_le_bytes());
    out[32..40].copy_from_slice(&stamp.dev.to_le_bytes());
    out
}

pub fn decode_stamp(bytes: &[u8]) -> Result<ScanStamp, DecodeError> {
    let mut r = Reader::new(bytes);
    let stamp = ScanStamp {
        size: r.u64("size")?,
        mtime_ns: r.i64("mtime")?,
        ctime_ns: r.i64("ctime")?,
        ino: r.u64("inode")?,
        dev: r.u64("device")?,
    };
    r.finish("scan stamp")?;
    Ok(stamp)
}

/// The highest count of ours a name was given (`keys::issued_key`): u64 LE.
pub fn decode_issued(bytes: &[u8]) -> Result<u64, DecodeError> {
    let mut r = Reader::new(bytes);
    let count = r.u64("issued count")?;
    r.finish("issued count")?;
    Ok(count)
}

/// A delete the guard holds back from peers (`crate::guard`): when it was first held,
/// and how many names it covers (the name itself and, for a directory, every name the
/// index held below it then).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Held {
    pub held_at_ns: i64,
    pub names: u64,
}

pub fn encode_held(held: &Held) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[0..8].copy_from_slice(&held.held_at_ns.to_le_bytes());
    out[8..16].copy_from_slice(&held.names.to_le_bytes());
    out
}

pub fn decode_held(bytes: &[u8]) -> Result<Held, DecodeError> {
    let mut r = Reader::new(bytes);
    let held = Held {
        held_at_ns: r.i64("held at")?,
        names: r.u64("names")?,
    };
    r.finish("held delete")?;
    Ok(held)
}

/// Where one copy of a chunk's bytes can be read.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Extent {
    pub offset: u64,
    pub len: u32,
}

pub fn encode_extent(extent: Extent) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[..8].copy_from_slice(&extent.offset.to_le_bytes());
    out[8..].copy_from_slice(&extent.len.to_le_bytes());
    out
}

pub fn decode_extent(bytes: &[u8]) -> Result<Extent, DecodeError> {
    let mut r = Reader::new(bytes);
    let extent = Extent {
        offset: r.u64("offset")?,
        len: r.u32("length")?,
    };
    r.finish("extent")?;
    Ok(extent)
}

/// The fewest bytes a page takes in a tree node: its u32 entry count, its hash and the
/// u16 length of its first name.
const MIN_PAGE_LEN: usize = 4 + HASH_LEN + 2;

pub fn encode_tree_node(node: &TreeNode) -> Vec<u8> {
    // Format, two hashes, five u64 totals, the page count; pages with short names.
    let mut out = Vec::with_capacity(1 + 2 * HASH_LEN + 40 + 4 + node.pages.len() * 64);
    out.push(VALUE_FORMAT);
    out.extend_from_slice(node.hash.as_bytes());
    out.extend_from_slice(node.versions.as_bytes());
    let t = &node.totals;
    for n in [t.files, t.dirs, t.symlinks, t.bytes, t.chunks] {
        out.extend_from_slice(&n.to_le_bytes());
    }
    out.extend_from_slice(&(node.pages.len() as u32).to_le_bytes());
    for page in &node.pages {
        out.extend_from_slice(&page.entries.to_le_bytes());
        out.extend_from_slice(page.hash.as_bytes());
        put_short_bytes(&mut out, &page.first_name);
    }
    out
}

pub fn decode_tree_node(bytes: &[u8]) -> Result<TreeNode, DecodeError> {
    let mut r = Reader::new(bytes);
    let format = r.u8("format")?;
    if format != VALUE_FORMAT {
        return Err(DecodeError(format!("unknown tree node format {format}")));
    }
    let hash = TreeHash(r.hash("hash")?);
    let versions = TreeHash(r.hash("versions hash")?);
    let totals = SubtreeTotals {
        files: r.u64("totals")?,
        dirs: r.u64("totals")?,
        symlinks: r.u64("totals")?,
        bytes: r.u64("totals")?,
        chunks: r.u64("totals")?,
    };
    let count = r.u32("page count")?;
    // Refuse counts the value cannot hold.
    if count as usize > bytes.len() / MIN_PAGE_LEN {
        return Err(DecodeError(format!(
            "tree node claims {count} pages in {} bytes",
            bytes.len()
        )));
    }
    let mut pages = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let entries = r.u32("page entry count")?;
        let hash = TreeHash(r.hash("page hash")?);
        let first_name = r.short_bytes("page first name")?.to_vec();
        pages.push(PageSummary {
            first_name,
            entries,
            hash,
        });
    }
    r.finish("tree node")?;
    Ok(TreeNode {
        hash,
        versions,
        pages,
        totals,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_entries() -> Vec<Entry> {
        let version = VersionVector::from_pairs([(NodeId(7), 3), (NodeId(9), 1)]);
        let base = Entry {
            kind: EntryKind::Dir,
            mode: 0o755,
            mtime_ns: -5,
            uid: 1,
            gid: 2,
            xattrs: Xattrs::default(),
            link: None,
            version,
        };
        vec![
            base.clone(),
            Entry {
                kind: EntryKind::File {
                    size: 10,
                    content_id: ContentId([4; 32]),
                    chunks: 1,
                },
                ..base.clone()
            },
            Entry {
                kind: EntryKind::Symlink {
                    target: b"../x\xff".to_vec(),
                },
                ..base.clone()
            },
            Entry {
                kind: EntryKind::Tombstone { deleted_at_ns: 99 },
                ..base
            },
        ]
    }

    #[test]
    fn entries_round_trip() {
        for entry in sample_entries() {
            assert_eq!(decode_entry(&encode_entry(&entry)).unwrap(), entry);
        }
    }

    #[test]
    fn attributes_are_an_optional_section_that_old_entries_lack() {
        // A directory entry as the store wrote it before attributes synced.
        let mut old = vec![1, 2];
        old.extend_from_slice(&0o755u32.to_le_bytes());
        old.extend_from_slice(&7i64.to_le_bytes());
        old.extend_from_slice(&[0; 8]);
        old.extend_from_slice(&0u16.to_le_bytes());
        let decoded = decode_entry(&old).unwrap();
        assert!(decoded.xattrs.is_empty());
        assert_eq!(encode_entry(&decoded), old);

        let with = Entry {
            xattrs: Xattrs::try_canonical(vec![(b"user.a".to_vec(), b"1".to_vec())]).unwrap(),
            ..decoded
        };
        let bytes = encode_entry(&with);
        assert_eq!(decode_canonical_entry(&bytes).unwrap(), with);
        let linked = Entry {
            kind: EntryKind::File {
                size: 1,
                content_id: ContentId([1; 32]),
                chunks: 1,
            },
            link: Some(VolPath::parse(b"a/b").unwrap()),
            ..with.clone()
        };
        assert_eq!(decode_entry(&encode_entry(&linked)).unwrap(), linked);
        // A link section on a directory is refused.
        let dir_link = [bytes.clone(), vec![EXT_LINK, 1, 0, b'a']].concat();
        assert!(decode_entry(&dir_link).is_err());
        // An empty section, an unknown one, or one repeated: refused.
        for bad in [
            [old.clone(), vec![EXT_XATTRS, 0, 0]].concat(),
            [old.clone(), vec![9]].concat(),
            [bytes.clone(), bytes[old.len()..].to_vec()].concat(),
        ] {
            assert!(decode_entry(&bad).is_err());
        }
    }

    #[test]
    fn truncated_or_extended_values_are_errors() {
        for entry in sample_entries() {
            let bytes = encode_entry(&entry);
            for cut in 0..bytes.len() {
                assert!(decode_entry(&bytes[..cut]).is_err());
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert!(decode_entry(&longer).is_err());
        }
        assert!(decode_chunk_list(&[255, 255, 255, 255]).is_err());
        assert!(decode_tree_node(&[1; 40]).is_err());
    }

    #[test]
    fn tree_nodes_and_chunk_lists_round_trip() {
        let node = TreeNode {
            hash: TreeHash([1; 32]),
            versions: TreeHash([9; 32]),
            pages: vec![PageSummary {
                first_name: b"a".to_vec(),
                entries: 3,
                hash: TreeHash([2; 32]),
            }],
            totals: SubtreeTotals {
                files: 1,
                dirs: 2,
                symlinks: 3,
                bytes: 4,
                chunks: 5,
            },
        };
        assert_eq!(decode_tree_node(&encode_tree_node(&node)).unwrap(), node);
        let chunks = vec![ChunkRef {
            id: ChunkId([3; 32]),
            len: 77,
        }];
        assert_eq!(
            decode_chunk_list(&encode_chunk_list(&chunks)).unwrap(),
            chunks
        );
        let stamp = ScanStamp {
            size: 1,
            mtime_ns: 2,
            ctime_ns: 3,
            ino: 4,
            dev: 5,
        };
        assert_eq!(decode_stamp(&encode_stamp(&stamp)).unwrap(), stamp);
    }
}
