//! Where the small chunks of the files listed to peers (`Entries` and `Changes`
//! answers) are, so that the `GetChunks` that follow find them without the index.
//!
//! A requester asks for the chunks of the files it was just listed, by id. Looking an
//! id up in the index is a seek in `chunks-v1`, whose keys begin with the id: random
//! keys, so nearly every lookup reads and decompresses a block of its own, and the
//! file's scan stamp is a second lookup. On a first sync of tiny files the two were a
//! quarter of the serving node's CPU (docs/BENCHMARKS.md). The listing has just read
//! each small file's chunk list, in name order: each chunk's file and extent are noted
//! here, and a request for it reads it from there.
//!
//! A note is only a hint. It may be stale by the time the chunk is asked for (the file
//! rewritten or rescanned since), so the bytes read there are hashed and checked
//! against the id, never trusted through a stamp read later than the list; a chunk not
//! found intact there is looked up in the index as any other. A peer is served from a
//! note only what it may hold ([`crate::sync::transfer::ReadFor::Peer`]), so the notes
//! are kept once for the node, whoever was listed what: their memory is a constant of
//! the node (at most [`MAX_NOTED`] notes and [`MAX_NOTED_PATH_BYTES`] of their paths,
//! about half a MiB), not of its connections. Only chunks of at most [`NOTED_CHUNK_MAX`]
//! bytes are noted: hashing one costs less than the lookups it saves. The oldest notes
//! go first.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use crate::chunking::ChunkRef;
use crate::ids::{ChunkId, VolumeId};
use crate::pathname::VolPath;
use crate::store::ChunkLocation;
use crate::store::codec::Extent;

/// The largest chunk noted: hashing 16 KiB takes a few microseconds, about what the
/// index lookups it replaces take.
pub(super) const NOTED_CHUNK_MAX: u32 = 16 << 10;

/// Chunks noted at most: a full `Entries` answer of single-chunk files. About 130
/// bytes each: a slot of the map (key and note, 56 bytes, the map at least a little
/// over half full), one of the queue (8, its capacity at most twice its length) and
/// the name's allocation (32 at its shortest); the directory is shared by the notes of
/// one listing.
const MAX_NOTED: usize = 4096;

/// Path bytes (directory and name) noted at most, whatever the paths' lengths.
const MAX_NOTED_PATH_BYTES: usize = 256 << 10;

/// The chunk locations listings noted.
#[derive(Default)]
pub struct ListedChunks {
    noted: Mutex<Noted>,
}

/// Notes by the first 8 bytes of their chunk's id: two ids that share them (which
/// only someone who made them so would find) share a note, and the chunk whose note
/// it is not fails its hash check there and is looked up in the index.
#[derive(Default)]
struct Noted {
    by_key: HashMap<u64, Note>,
    /// Keys in the order they were noted, the oldest first (a key noted again keeps its
    /// first place).
    order: VecDeque<u64>,
    path_bytes: usize,
}

struct Note {
    vol: VolumeId,
    dir: Arc<VolPath>,
    name: Box<[u8]>,
    extent: Extent,
}

impl Note {
    fn path_bytes(&self) -> usize {
        self.dir.as_bytes().len() + self.name.len()
    }
}

fn key(id: &ChunkId) -> u64 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&id.as_bytes()[..8]);
    u64::from_le_bytes(first)
}

impl ListedChunks {
    /// Notes where the chunks of the file `dir/name` of volume `vol` are, by its chunk
    /// list (read with its entry for a listing).
    pub(super) fn note(&self, vol: VolumeId, dir: &Arc<VolPath>, name: &[u8], chunks: &[ChunkRef]) {
        let Ok(mut noted) = self.noted.lock() else {
            return;
        };
        let mut offset = 0u64;
        for chunk in chunks {
            let extent = Extent {
                offset,
                len: chunk.len,
            };
            offset += u64::from(chunk.len);
            if chunk.len > NOTED_CHUNK_MAX {
                continue;
            }
            let note = Note {
                vol,
                dir: dir.clone(),
                name: name.into(),
                extent,
            };
            noted.insert(key(&chunk.id), note);
        }
    }

    /// Where those of `ids` that were noted may be.
    pub(super) fn locations_of(&self, ids: &[ChunkId]) -> HashMap<ChunkId, ChunkLocation> {
        let Ok(noted) = self.noted.lock() else {
            return HashMap::new();
        };
        ids.iter()
            .filter_map(|id| {
                let note = noted.by_key.get(&key(id))?;
                let location = ChunkLocation::Live {
                    vol: note.vol,
                    dir: VolPath::clone(&note.dir),
                    name: note.name.to_vec(),
                    extent: note.extent,
                };
                Some((*id, location))
            })
            .collect()
    }
}

impl Noted {
    fn insert(&mut self, key: u64, note: Note) {
        let bytes = note.path_bytes();
        match self.by_key.insert(key, note) {
            Some(old) => self.path_bytes -= old.path_bytes(),
            None => self.order.push_back(key),
        }
        self.path_bytes += bytes;
        while self.order.len() > MAX_NOTED || self.path_bytes > MAX_NOTED_PATH_BYTES {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if let Some(old) = self.by_key.remove(&oldest) {
                self.path_bytes -= old.path_bytes();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(n: u8, len: u32) -> ChunkRef {
        ChunkRef {
            id: ChunkId::of(&[n]),
            len,
        }
    }

    fn extent_of(listed: &ListedChunks, id: ChunkId) -> Option<(Vec<u8>, Extent)> {
        match listed.locations_of(&[id]).remove(&id)? {
            ChunkLocation::Live { name, extent, .. } => Some((name, extent)),
            ChunkLocation::Pack { .. } => None,
        }
    }

    #[test]
    fn a_file_s_small_chunks_are_noted_at_their_offsets_and_large_ones_are_not() {
        let listed = ListedChunks::default();
        let dir = Arc::new(VolPath::parse(b"photos").unwrap());
        let chunks = [chunk(1, 100), chunk(2, NOTED_CHUNK_MAX + 1), chunk(3, 50)];
        listed.note(VolumeId(1), &dir, b"a.jpg", &chunks);
        let at = |offset, len| Some((b"a.jpg".to_vec(), Extent { offset, len }));
        assert_eq!(extent_of(&listed, chunks[0].id), at(0, 100));
        assert_eq!(extent_of(&listed, chunks[1].id), None);
        assert_eq!(
            extent_of(&listed, chunks[2].id),
            at(u64::from(100 + NOTED_CHUNK_MAX + 1), 50)
        );
        assert!(listed.locations_of(&[chunk(9, 1).id]).is_empty());
    }

    #[test]
    fn a_note_takes_the_bytes_the_bound_counts() {
        assert!(std::mem::size_of::<(u64, Note)>() <= 56);
    }

    #[test]
    fn the_oldest_notes_go_first_by_count_and_by_path_bytes() {
        let listed = ListedChunks::default();
        let dir = Arc::new(VolPath::root());
        let ids: Vec<ChunkId> = (0..MAX_NOTED + 10)
            .map(|n| ChunkId::of(&n.to_le_bytes()))
            .collect();
        for id in &ids {
            let list = [ChunkRef { id: *id, len: 10 }];
            listed.note(VolumeId(1), &dir, b"f", &list);
        }
        assert_eq!(listed.locations_of(&ids).len(), MAX_NOTED);
        assert!(listed.locations_of(&ids[..10]).is_empty());
        assert_eq!(listed.locations_of(&ids[10..]).len(), MAX_NOTED);

        let long = vec![b'n'; 255];
        let component = vec![b'd'; 250];
        let dir = Arc::new(VolPath::parse(&[&component[..]; 12].join(&b'/')).unwrap());
        for id in &ids[..1000] {
            listed.note(VolumeId(1), &dir, &long, &[ChunkRef { id: *id, len: 10 }]);
        }
        let noted = listed.noted.lock().unwrap();
        assert!(noted.path_bytes <= MAX_NOTED_PATH_BYTES);
        let counted: usize = noted.by_key.values().map(Note::path_bytes).sum();
        assert_eq!(noted.path_bytes, counted);
        assert!(noted.by_key.len() < 1000 && noted.by_key.len() == noted.order.len());
    }
}
