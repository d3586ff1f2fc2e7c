//! Busy packs: where the scanner keeps the chunks of a consistent copy of a file that is
//! rewritten in place all the time, so that peers can fetch that version whatever
//! happens to the live file next (`schema/store.md`, "Busy packs").
//!
//! Busy packs rotate: the current one takes copies until it holds [`BUSY_PACK_BYTES`] or
//! is [`BUSY_PACK_AGE`] old; it then becomes the previous one, and the pack that was
//! previous is retired (its index records removed, then its file). A version so stays
//! fetchable for at least one rotation, and busy packs take at most two packs' room.
//! Each busy pack is registered in `meta-v1` (`busy-pack/` ++ u64 BE number) before it
//! is created, so a pack a crash left behind is retired when the store next opens for
//! writing. Copies are written like any pack record: appended, the pack fsynced, and
//! only then their index records written.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::pack::{PackScanner, PackWriter, pack_file_name};
use super::{Batch, ChunkLocation, Durability, Store, StoreError};
use crate::chunking::ChunkRef;
use crate::ids::ChunkId;

/// A busy pack stops taking copies once it holds this many bytes.
pub const BUSY_PACK_BYTES: u64 = 256 << 20;
/// ... or once it is this old.
pub const BUSY_PACK_AGE: Duration = Duration::from_secs(30);

const BUSY_PACK_PREFIX: &[u8] = b"busy-pack/";

fn busy_pack_key(number: u64) -> Vec<u8> {
    [BUSY_PACK_PREFIX, &number.to_be_bytes()[..]].concat()
}

/// The busy packs in use, by the store that owns them.
#[derive(Default)]
pub(super) struct BusyPacks(Mutex<Rotation>);

#[derive(Default)]
struct Rotation {
    current: Option<Current>,
    /// The pack that took copies before the current one, and when it stopped.
    previous: Option<(Kept, Instant)>,
}

struct Current {
    writer: PackWriter,
    kept: Kept,
    started: Instant,
}

/// A busy pack's number and the chunks recorded in it (what retiring it removes).
struct Kept {
    number: u64,
    chunks: Vec<ChunkId>,
}

impl Store {
    /// Keeps `chunks` (the chunks of `data`, in order) in the current busy pack: appended,
    /// the pack made durable, and their pack locations added to `batch`, which the
    /// caller writes with the version's entry.
    pub fn keep_busy_version(
        &self,
        batch: &mut Batch<'_>,
        chunks: &[ChunkRef],
        data: &[u8],
    ) -> Result<(), StoreError> {
        let mut rotation = self.busy.0.lock().expect("busy packs lock");
        self.rotate(&mut rotation, data.len() as u64)?;
        if rotation.current.is_none() {
            rotation.current = Some(self.start_busy_pack()?);
        }
        let current = rotation.current.as_mut().expect("just started");
        let mut offset = 0usize;
        let mut located = Vec::with_capacity(chunks.len());
        for chunk in chunks {
            let bytes = &data[offset..offset + chunk.len as usize];
            offset += chunk.len as usize;
            let extent = current.writer.append(&chunk.id, bytes)?;
            located.push((chunk.id, extent));
        }
        current.writer.sync()?;
        for (id, extent) in located {
            batch.put_pack_location(&id, current.kept.number, extent);
            current.kept.chunks.push(id);
        }
        Ok(())
    }

    /// Retires busy packs whose time is up (called after every scan, so that packs of a
    /// file that went quiet do not stay).
    pub fn rotate_busy_packs(&self) -> Result<(), StoreError> {
        let mut rotation = self.busy.0.lock().expect("busy packs lock");
        self.rotate(&mut rotation, 0)
    }

    /// Moves the current pack to previous if it is full (with `adding` more bytes) or
    /// old, retiring the previous one; retires a previous pack that has been previous
    /// for [`BUSY_PACK_AGE`].
    fn rotate(&self, rotation: &mut Rotation, adding: u64) -> Result<(), StoreError> {
        let now = Instant::now();
        let full = rotation.current.as_ref().is_some_and(|c| {
            c.writer.len() + adding > BUSY_PACK_BYTES
                || now.duration_since(c.started) >= BUSY_PACK_AGE
        });
        if full {
            if let Some((old, _)) = rotation.previous.take() {
                self.retire_busy_pack(old)?;
            }
            let current = rotation.current.take().expect("checked");
            rotation.previous = Some((current.kept, now));
        }
        if rotation
            .previous
            .as_ref()
            .is_some_and(|(_, since)| now.duration_since(*since) >= BUSY_PACK_AGE)
        {
            let (old, _) = rotation.previous.take().expect("checked");
            self.retire_busy_pack(old)?;
        }
        Ok(())
    }

    /// Registers and creates a new busy pack, numbered past every pack in the packs
    /// directory.
    fn start_busy_pack(&self) -> Result<Current, StoreError> {
        let number = self.new_pack_number()?;
        let mut batch = self.batch();
        batch.put(super::keys::CF_META, &busy_pack_key(number), b"");
        self.write(batch, Durability::Durable)?;
        let writer = PackWriter::open(&self.packs_dir().join(pack_file_name(number)))?;
        Ok(Current {
            writer,
            kept: Kept {
                number,
                chunks: Vec::new(),
            },
            started: Instant::now(),
        })
    }

    /// Whether pack `number` is a busy pack (registered as one).
    pub(super) fn is_busy_pack(&self, number: u64) -> bool {
        matches!(
            self.get(super::keys::CF_META, &busy_pack_key(number)),
            Ok(Some(_))
        )
    }

    /// Removes a busy pack's index records, then its file, then its registration.
    fn retire_busy_pack(&self, kept: Kept) -> Result<(), StoreError> {
        let mut batch = self.batch();
        for id in &kept.chunks {
            let location = ChunkLocation::Pack {
                pack: kept.number,
                extent: super::codec::Extent { offset: 0, len: 0 },
            };
            batch.delete_location(id, &location);
        }
        self.write(batch, Durability::Durable)?;
        let path = self.packs_dir().join(pack_file_name(kept.number));
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(StoreError::Io { path, source }),
        }
        let mut batch = self.batch();
        batch.delete(super::keys::CF_META, &busy_pack_key(kept.number));
        self.write(batch, Durability::Durable)
    }

    /// Retires the busy packs a previous run left (registered, whatever state they are
    /// in): their records are read back from the pack itself.
    pub(super) fn retire_leftover_busy_packs(&self) -> Result<(), StoreError> {
        let start = BUSY_PACK_PREFIX.to_vec();
        let end = super::keys::successor(BUSY_PACK_PREFIX);
        let numbers: Vec<u64> = self
            .range(super::keys::CF_META, start, end)
            .filter_map(|item| {
                let (key, _) = item.ok()?;
                let number = key.strip_prefix(BUSY_PACK_PREFIX)?;
                Some(u64::from_be_bytes(number.try_into().ok()?))
            })
            .collect();
        for number in numbers {
            let path = self.packs_dir().join(pack_file_name(number));
            let mut chunks = Vec::new();
            if let Ok(mut scanner) = PackScanner::open(&path) {
                while let Ok(Some(record)) = scanner.next_record() {
                    chunks.push(record.id);
                }
            }
            self.retire_busy_pack(Kept { number, chunks })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_version_is_readable_from_its_pack_until_a_restart_retires_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_for_test(dir.path());
        let data = b"one version of a busy file".to_vec();
        let chunks = [ChunkRef {
            id: ChunkId::of(&data),
            len: data.len() as u32,
        }];
        let mut batch = store.batch();
        store.keep_busy_version(&mut batch, &chunks, &data).unwrap();
        store.write(batch, Durability::Durable).unwrap();
        let locations = store.chunk_locations(&chunks[0].id).unwrap();
        let Some(ChunkLocation::Pack { pack, extent }) = locations.first().cloned() else {
            panic!("no pack location: {locations:?}");
        };
        let path = store.packs_dir().join(pack_file_name(pack));
        assert_eq!(
            super::super::pack::read_chunk(&path, extent, &chunks[0].id).unwrap(),
            data
        );
        drop(store);
        let store = Store::open_for_test(dir.path());
        assert!(store.chunk_locations(&chunks[0].id).unwrap().is_empty());
        assert!(!path.exists());
    }
}
