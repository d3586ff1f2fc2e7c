//! The RocksDB column families and their key layout (specified in `schema/store.md`).
//!
//! Column family names carry a version: a later layout gets new names, and a store of
//! an older layout is recognised by its format number before anything is touched.

use crate::ids::{ChunkId, ContentId, HASH_LEN, VolumeId};
use crate::pathname::{InvalidPath, VolPath};

pub const CF_META: &str = "meta-v1";
pub const CF_ENTRIES: &str = "entries-v1";
pub const CF_CHUNK_LISTS: &str = "chunklists-v1";
pub const CF_CHUNKS: &str = "chunks-v1";
pub const CF_TREE: &str = "tree-v1";
pub const CF_SCAN_CACHE: &str = "scancache-v1";
pub const CF_DIRTY: &str = "dirty-v1";
pub const CF_CONTENTS: &str = "contents-v1";
pub const CF_VERSIONS: &str = "versions-v1";

/// Column families a store may lack: added after format 1 was first written, created
/// when such a store is next opened for writing (a reader of an older store finds
/// them absent, and reads nothing from them).
pub const LATER_CFS: [&str; 1] = [CF_VERSIONS];

/// Families whose keys start with a chunk or content id (32 bytes), looked up by it.
pub const HASH_KEYED_CFS: [&str; 2] = [CF_CHUNKS, CF_CONTENTS];

pub const ALL_CFS: [&str; 9] = [
    CF_META,
    CF_ENTRIES,
    CF_CHUNK_LISTS,
    CF_CHUNKS,
    CF_TREE,
    CF_SCAN_CACHE,
    CF_DIRTY,
    CF_CONTENTS,
    CF_VERSIONS,
];

pub const META_FORMAT: &[u8] = b"format";
pub const META_NODE_ID: &[u8] = b"node-id";
pub const META_CHUNK_PARAMS: &[u8] = b"chunk-params";
pub const META_NEXT_VOLUME: &[u8] = b"next-volume-id";
/// The rules the stored tree nodes were computed by ([`super::TREE_RULES`]).
pub const META_TREE_RULES: &[u8] = b"tree-rules";
const META_VOLUME_PREFIX: &[u8] = b"volume/";
/// `publishing/` ++ entry key: a file sync is about to rename into place (see
/// [`publishing_key`]).
const META_PUBLISHING_PREFIX: &[u8] = b"publishing/";
/// `feed/` ++ u32 BE volume: the volume's change feed (id, lower bound, reserved numbers).
const META_FEED_PREFIX: &[u8] = b"feed/";
/// `change/` ++ u32 BE volume ++ u64 BE number: the entry one change of the feed wrote.
const META_CHANGE_PREFIX: &[u8] = b"change/";
/// `change-origin/` u32 BE volume u64 BE number -> u64 BE node id: the peer whose entry
/// that change wrote exactly as it was sent (absent: a change made here).
const META_CHANGE_ORIGIN_PREFIX: &[u8] = b"change-origin/";
/// `feed-mark/` ++ u32 BE volume ++ u64 BE peer node id: how far this node applied the
/// peer's feed of the volume.
const META_FEED_MARK_PREFIX: &[u8] = b"feed-mark/";
/// `issued/` ++ entry key: the highest count this node gave the name, kept while the
/// name's entry holds a lower one (see [`issued_key`]).
const META_ISSUED_PREFIX: &[u8] = b"issued/";
/// `held/` ++ volume id ++ path: a delete the guard holds back from peers (see
/// [`held_key`]).
const META_HELD_PREFIX: &[u8] = b"held/";

/// Location kinds in `chunks` keys.
const LOCATION_LIVE: u8 = 0;
const LOCATION_PACK: u8 = 1;

pub fn volume_meta_key(name: &str) -> Vec<u8> {
    [META_VOLUME_PREFIX, name.as_bytes()].concat()
}

/// The key of the entry sync is publishing at `vol`/`dir`/`name`: written durably before
/// the rename, removed with the index write after it, so a scan after a crash in between
/// recognises the received file for what it is (not a local change).
pub fn publishing_key(vol: VolumeId, dir: &VolPath, name: &[u8]) -> Vec<u8> {
    [META_PUBLISHING_PREFIX, &entry_key(vol, dir, name)].concat()
}

/// The key of the highest count this node gave `vol`/`dir`/`name` while the name's entry
/// holds a lower one: written when a peer's version that lacks our delete of the name
/// takes its place (it keeps its own history, see `sync::conflict::only_news_is_the_delete`),
/// removed once a change of ours is counted past it.
pub fn issued_key(vol: VolumeId, dir: &VolPath, name: &[u8]) -> Vec<u8> {
    [META_ISSUED_PREFIX, &entry_key(vol, dir, name)].concat()
}

/// The keys of every publishing record of volume `vol`.
pub fn publishing_range(vol: VolumeId) -> (Vec<u8>, Vec<u8>) {
    let start = [META_PUBLISHING_PREFIX, &vol.0.to_be_bytes()[..]].concat();
    let end = successor(&start);
    (start, end)
}

/// The key of volume `vol`'s feed state (see `super::feed`).
pub fn feed_key(vol: VolumeId) -> Vec<u8> {
    [META_FEED_PREFIX, &vol.0.to_be_bytes()[..]].concat()
}

/// The key of change number `seq` of volume `vol`'s feed; its value is the entry key
/// without the volume (`dir || 0x00 || name`).
pub fn change_key(vol: VolumeId, seq: u64) -> Vec<u8> {
    [
        META_CHANGE_PREFIX,
        &vol.0.to_be_bytes()[..],
        &seq.to_be_bytes()[..],
    ]
    .concat()
}

/// The key of the peer a change of volume `vol`'s feed was taken from whole, if it was.
pub fn change_origin_key(vol: VolumeId, seq: u64) -> Vec<u8> {
    [
        META_CHANGE_ORIGIN_PREFIX,
        &vol.0.to_be_bytes()[..],
        &seq.to_be_bytes()[..],
    ]
    .concat()
}

/// The keys of every change of volume `vol`'s feed, in number order.
pub fn changes_range(vol: VolumeId) -> (Vec<u8>, Vec<u8>) {
    let start = [META_CHANGE_PREFIX, &vol.0.to_be_bytes()[..]].concat();
    let end = successor(&start);
    (start, end)
}

/// The key of a name whose delete the guard holds (`crate::guard`): the volume id
/// (big-endian) and the name's whole path, so a volume's held names are one range in
/// path order.
pub fn held_key(vol: VolumeId, path: &VolPath) -> Vec<u8> {
    [META_HELD_PREFIX, &vol.0.to_be_bytes()[..], path.as_bytes()].concat()
}

/// The keys of every held delete of volume `vol`.
pub fn held_range(vol: VolumeId) -> (Vec<u8>, Vec<u8>) {
    let start = [META_HELD_PREFIX, &vol.0.to_be_bytes()[..]].concat();
    let end = successor(&start);
    (start, end)
}

/// The directory and name of a change record's value (an entry key without its
/// volume), validated.
pub fn parse_change_entry(value: &[u8]) -> Result<(VolPath, Vec<u8>), String> {
    let key = [&[0u8; 4][..], value].concat();
    parse_entry_key(&key).map(|(_, dir, name)| (dir, name.to_vec()))
}

/// The key of the mark up to which this node applied `peer`'s feed of volume `vol`.
pub fn feed_mark_key(vol: VolumeId, peer: crate::ids::NodeId) -> Vec<u8> {
    [
        META_FEED_MARK_PREFIX,
        &vol.0.to_be_bytes()[..],
        &peer.0.to_be_bytes()[..],
    ]
    .concat()
}

/// The path of a held-delete key of volume `vol`.
pub fn held_path_of(vol: VolumeId, key: &[u8]) -> Result<VolPath, String> {
    let (start, _) = held_range(vol);
    let path = key
        .strip_prefix(&start[..])
        .ok_or_else(|| format!("bad held key {}", crate::ids::to_hex(key)))?;
    VolPath::parse(path).map_err(|e| e.to_string())
}

pub fn volume_meta_range() -> (Vec<u8>, Vec<u8>) {
    (META_VOLUME_PREFIX.to_vec(), successor(META_VOLUME_PREFIX))
}

pub fn volume_name_of_meta_key(key: &[u8]) -> Option<&str> {
    std::str::from_utf8(key.strip_prefix(META_VOLUME_PREFIX)?).ok()
}

/// `vol | dir | 0x00 | name`: the key of a name in `entries`, `chunklists` and
/// `scancache`. All children of a directory are one contiguous, name-sorted range.
pub fn entry_key(vol: VolumeId, dir: &VolPath, name: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(4 + dir.as_bytes().len() + 1 + name.len());
    key.extend_from_slice(&vol.0.to_be_bytes());
    key.extend_from_slice(dir.as_bytes());
    key.push(0);
    key.extend_from_slice(name);
    key
}

/// Splits an entry key into its volume, directory and name, validating the path.
pub fn parse_entry_key(key: &[u8]) -> Result<(VolumeId, VolPath, &[u8]), String> {
    let bad = |why: &str| format!("bad entry key {}: {why}", crate::ids::to_hex(key));
    let (vol, rest) = key
        .split_first_chunk::<4>()
        .ok_or_else(|| bad("too short"))?;
    let nul = rest
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| bad("no separator"))?;
    let dir = VolPath::parse(&rest[..nul]).map_err(|e: InvalidPath| bad(&e.to_string()))?;
    let name = &rest[nul + 1..];
    crate::pathname::validate_name(name).map_err(|e| bad(&e.to_string()))?;
    Ok((VolumeId(u32::from_be_bytes(*vol)), dir, name))
}

/// The range of all children of `dir`.
pub fn children_range(vol: VolumeId, dir: &VolPath) -> (Vec<u8>, Vec<u8>) {
    let start = entry_key(vol, dir, b"");
    let end = successor(&start);
    (start, end)
}

/// The key ranges that hold every descendant of `dir` (one range for the root).
pub fn descendant_ranges(vol: VolumeId, dir: &VolPath) -> Vec<(Vec<u8>, Vec<u8>)> {
    if dir.is_root() {
        let start = vol.0.to_be_bytes().to_vec();
        return vec![(start.clone(), successor(&start))];
    }
    let mut below = dir_key(vol, dir);
    below.push(b'/');
    vec![children_range(vol, dir), (below.clone(), successor(&below))]
}

/// `vol | dir`: the key of a directory in `tree` and `dirty`.
pub fn dir_key(vol: VolumeId, dir: &VolPath) -> Vec<u8> {
    [&vol.0.to_be_bytes()[..], dir.as_bytes()].concat()
}

pub fn parse_dir_key(key: &[u8]) -> Result<(VolumeId, VolPath), String> {
    let (vol, rest) = key
        .split_first_chunk::<4>()
        .ok_or("directory key too short")?;
    let dir = VolPath::parse(rest).map_err(|e| format!("bad directory key: {e}"))?;
    Ok((VolumeId(u32::from_be_bytes(*vol)), dir))
}

/// The range of every `tree`/`dirty` key of a volume.
pub fn volume_range(vol: VolumeId) -> (Vec<u8>, Vec<u8>) {
    let start = vol.0.to_be_bytes().to_vec();
    let end = successor(&start);
    (start, end)
}

/// `content id | entry key`: a live file with that content (to find a chunk list by
/// content, e.g. for a file renamed on a peer).
pub fn content_key(content: &ContentId, entry_key: &[u8]) -> Vec<u8> {
    [&content.as_bytes()[..], entry_key].concat()
}

/// `chunk id | 0x00 | entry key`: the chunk is in that live file.
pub fn live_location_key(chunk: &ChunkId, entry_key: &[u8]) -> Vec<u8> {
    [&chunk.as_bytes()[..], &[LOCATION_LIVE], entry_key].concat()
}

/// `chunk id | 0x01 | pack id (u64 BE)`: the chunk is in that pack file.
pub fn pack_location_key(chunk: &ChunkId, pack: u64) -> Vec<u8> {
    [&chunk.as_bytes()[..], &[LOCATION_PACK], &pack.to_be_bytes()].concat()
}

/// Where a `chunks` key says a chunk is.
#[derive(Debug, PartialEq, Eq)]
pub enum LocationKey<'a> {
    Live { entry_key: &'a [u8] },
    Pack { pack: u64 },
}

pub fn parse_location_key(key: &[u8]) -> Result<(ChunkId, LocationKey<'_>), String> {
    let bad = || format!("bad chunk location key {}", crate::ids::to_hex(key));
    let (id, rest) = key.split_first_chunk::<HASH_LEN>().ok_or_else(bad)?;
    let (&kind, rest) = rest.split_first().ok_or_else(bad)?;
    let location = match kind {
        LOCATION_LIVE => LocationKey::Live { entry_key: rest },
        LOCATION_PACK => LocationKey::Pack {
            pack: u64::from_be_bytes(rest.try_into().map_err(|_| bad())?),
        },
        _ => return Err(bad()),
    };
    Ok((ChunkId(*id), location))
}

/// The smallest key greater than every key that starts with `prefix`.
pub fn successor(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Only an all-0xff prefix gets here; no key of ours is that long.
    vec![0xff; prefix.len() + 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_keys_round_trip() {
        let dir = VolPath::parse(b"a/b").unwrap();
        let key = entry_key(VolumeId(3), &dir, b"c\xff");
        let (vol, parsed_dir, name) = parse_entry_key(&key).unwrap();
        assert_eq!((vol, parsed_dir, name), (VolumeId(3), dir, &b"c\xff"[..]));
        assert!(parse_entry_key(&[0, 0, 0, 1, b'x']).is_err());
        assert!(parse_entry_key(&[0, 0, 0, 1, b'/', 0, b'x']).is_err());
    }

    #[test]
    fn descendant_ranges_hold_exactly_the_subtree() {
        let vol = VolumeId(1);
        let a = VolPath::parse(b"a").unwrap();
        let inside = [
            entry_key(vol, &a, b"x"),
            entry_key(vol, &VolPath::parse(b"a/b").unwrap(), b"y"),
            entry_key(vol, &VolPath::parse(b"a/b/c").unwrap(), b"z"),
        ];
        let outside = [
            entry_key(vol, &VolPath::root(), b"a"),
            entry_key(vol, &VolPath::parse(b"a.b").unwrap(), b"x"),
            entry_key(vol, &VolPath::parse(b"a\x01").unwrap(), b"x"),
            entry_key(vol, &VolPath::parse(b"ab").unwrap(), b"x"),
            entry_key(VolumeId(2), &a, b"x"),
        ];
        let ranges = descendant_ranges(vol, &a);
        let covered = |key: &Vec<u8>| ranges.iter().any(|(s, e)| key >= s && key < e);
        assert!(inside.iter().all(covered));
        assert!(!outside.iter().any(covered));
    }

    #[test]
    fn location_keys_round_trip() {
        let id = ChunkId([9; 32]);
        let key = live_location_key(&id, b"entry");
        assert_eq!(
            parse_location_key(&key).unwrap(),
            (
                id,
                LocationKey::Live {
                    entry_key: b"entry"
                }
            )
        );
        let key = pack_location_key(&id, 42);
        assert_eq!(
            parse_location_key(&key).unwrap(),
            (id, LocationKey::Pack { pack: 42 })
        );
        assert!(parse_location_key(&[1, 2, 3]).is_err());
    }

    #[test]
    fn successor_bounds_a_prefix() {
        assert_eq!(successor(b"ab"), b"ac");
        assert_eq!(successor(&[1, 0xff]), vec![2]);
    }
}
