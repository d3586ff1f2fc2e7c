//! Collecting packs: rewriting a version pack without the chunks nothing needs any more,
//! crash-safely (`schema/store.md`, "Collecting packs").
//!
//! Packs are append-only, so a pack is collected by copying what is kept into a new pack
//! and switching the index over in one batch: [`Store::rewrite_pack`]. Each rewrite is
//! registered in `meta-v1` (`gc-pack/` ++ u64 BE old pack number) before anything is
//! written, with its state; opening the store for writing finishes or undoes a rewrite a
//! crash interrupted, so at every point the old pack is valid and indexed, or the new
//! one is. What is kept is the caller's decision ([`Store::rewrite_pack`]'s `keep`);
//! which packs may be rewritten at all is the store's ([`Store::mark_collectable_packs`]:
//! neither a busy pack, nor the version pack that takes chunks now, nor a pack a version
//! being recorded relies on: [`PackClaims`]).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use super::codec::{self, Extent};
use super::keys::{
    CF_CHUNKS, CF_META, LocationKey, pack_location_key, parse_location_key, successor,
};
use super::pack::{
    PackEnd, PackScanner, PackWriter, RECORD_HEADER_LEN, pack_file_name, read_chunk,
};
use super::{Batch, Durability, Store, StoreError};
use crate::ids::ChunkId;

const GC_PREFIX: &[u8] = b"gc-pack/";
const LAST_COLLECTION: &[u8] = b"last-collection";
/// States of a registered rewrite (first byte of its value; then u64 LE new pack
/// number, 0 for none).
const COPYING: u8 = 1;
const SWITCHED: u8 = 2;

fn gc_key(old: u64) -> Vec<u8> {
    [GC_PREFIX, &old.to_be_bytes()[..]].concat()
}

fn gc_value(state: u8, new: u64) -> Vec<u8> {
    let mut value = vec![state];
    value.extend_from_slice(&new.to_le_bytes());
    value
}

/// Where a rewrite stops on purpose, for crash tests (`SHOAL_FAULT_GC_CRASH_AT=N`: exit
/// with status 99 at the Nth point of the rewrites of this process).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashPoint {
    Registered,
    Copied,
    Switched,
    OldRemoved,
}

/// What a rewrite of one pack did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rewrite {
    /// The new pack (none when nothing was kept).
    pub new_pack: Option<u64>,
    pub kept_chunks: u64,
    pub kept_bytes: u64,
    /// Records dropped, and the bytes of the pack file they took (headers included).
    pub dropped_chunks: u64,
    pub reclaimed_bytes: u64,
}

/// What a pack holds, as [`Store::rewrite_pack`] judged it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PackVerdict {
    Rewritten(Rewrite),
    /// Less than the asked share of it is garbage: left as it is.
    NotWorthIt {
        garbage_bytes: u64,
        file_bytes: u64,
    },
    /// A record that is kept does not hash to its id (or the pack ends torn): left for
    /// `shoal repair`.
    Damaged,
}

/// Which packs a collection round has marked and which packs versions being recorded
/// rely on, decided under one lock so that the two never meet: a collection does not
/// mark a pinned pack, and a version does not count on a marked pack's copy of a chunk
/// (it appends its own). A pull pins every pack it relies on from its first look for a
/// pack copy until the batch holding its version records is written ([`Pins`], dropped
/// after that write), so a record written after a collection read what is referenced
/// never relies on a pack that collection rewrites.
#[derive(Default)]
struct PackClaims {
    collecting: HashSet<u64>,
    /// Pack number -> how many pins it has.
    pinned: HashMap<u64, u32>,
}

/// The store's [`PackClaims`], shared with the [`Pins`] that outlive a borrow of it.
#[derive(Clone, Default)]
pub(super) struct Claims(Arc<Mutex<PackClaims>>);

impl Claims {
    fn lock(&self) -> std::sync::MutexGuard<'_, PackClaims> {
        self.0.lock().expect("pack claims lock")
    }
}

/// Packs one batch of kept versions relies on; unpinned when dropped.
pub struct Pins {
    claims: Claims,
    packs: Vec<u64>,
}

impl Pins {
    /// Pins `pack` (again: pins count) unless this batch pinned it already.
    fn pin(&mut self, claims: &mut PackClaims, pack: u64) {
        if !self.packs.contains(&pack) {
            self.packs.push(pack);
            *claims.pinned.entry(pack).or_default() += 1;
        }
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        let mut claims = self.claims.lock();
        for pack in &self.packs {
            if let Some(count) = claims.pinned.get_mut(pack) {
                *count -= 1;
                if *count == 0 {
                    claims.pinned.remove(pack);
                }
            }
        }
    }
}

impl Store {
    /// Marks the packs a collection round will rewrite and returns them in number order:
    /// every pack file but the busy packs, the version pack that takes chunks now and the
    /// packs a version being recorded relies on ([`PackClaims`]). Until
    /// [`Store::unmark_packs`], a new version appends its own copy of a chunk they hold
    /// rather than rely on theirs, so a chunk the round finds unreferenced stays so.
    pub fn mark_collectable_packs(&self) -> Result<Vec<u64>, StoreError> {
        // The current version pack cannot change (nor a new one appear) meanwhile.
        let current = self.versions.lock();
        let current = current.as_ref().map(|(number, _)| *number);
        let mut claims = self.claims.lock();
        let mut numbers: Vec<u64> = self
            .pack_numbers()?
            .filter(|&n| {
                Some(n) != current && !self.is_busy_pack(n) && !claims.pinned.contains_key(&n)
            })
            .collect();
        numbers.sort_unstable();
        claims.collecting = numbers.iter().copied().collect();
        Ok(numbers)
    }

    /// The chunk ids pack `number` holds records of (read from their headers).
    pub fn pack_chunk_ids(&self, number: u64) -> Result<Vec<ChunkId>, StoreError> {
        Ok(super::pack::record_ids(
            &self.packs_dir().join(pack_file_name(number)),
        )?)
    }

    /// Ends a collection round's marks.
    pub fn unmark_packs(&self) {
        self.claims.lock().collecting.clear();
    }

    /// No pins yet: what a batch of kept versions starts with.
    pub(super) fn no_pins(&self) -> Pins {
        Pins {
            claims: self.claims.clone(),
            packs: Vec::new(),
        }
    }

    /// Whether a version pack (any pack that is neither a busy pack nor marked by a
    /// collection) holds `id`; the first such pack is pinned in `pins`.
    pub(super) fn rely_on_version_pack(
        &self,
        id: &ChunkId,
        pins: &mut Pins,
    ) -> Result<bool, StoreError> {
        // The index is read under the lock: a collection cannot mark (and then rewrite)
        // the pack between the read and the pin.
        let mut claims = self.claims.lock();
        for item in self.hash_range(CF_CHUNKS, id.as_bytes()) {
            let (key, _) = item?;
            if let Ok((_, LocationKey::Pack { pack })) = parse_location_key(&key)
                && !self.is_busy_pack(pack)
                && !claims.collecting.contains(&pack)
            {
                pins.pin(&mut claims, pack);
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Pins `pack` in `pins`: a version pack this batch appended chunks to, which no
    /// index record points into yet.
    pub(super) fn pin_pack(&self, pins: &mut Pins, pack: u64) {
        pins.pin(&mut self.claims.lock(), pack);
    }

    /// Rewrites pack `old` without the records that are not worth keeping: a record is
    /// kept when it is the one the index points at for its chunk in this pack and
    /// `keep(chunk)` says so. Does nothing unless the dropped records take at least
    /// `min_share` (0 to 1) of the pack file. Crash-safe: see the module header.
    pub fn rewrite_pack(
        &self,
        old: u64,
        keep: &mut dyn FnMut(&ChunkId) -> Result<bool, StoreError>,
        min_share: f64,
        crash_at: &mut dyn FnMut(CrashPoint),
    ) -> Result<PackVerdict, StoreError> {
        let old_path = self.packs_dir().join(pack_file_name(old));
        let mut scanner = PackScanner::open(&old_path)?;
        let file_bytes = std::fs::metadata(&old_path)
            .map_err(|source| StoreError::Io {
                path: old_path.clone(),
                source,
            })?
            .len();
        // Records to copy, by chunk; every chunk the pack holds (their locations into
        // this pack go).
        let mut kept: Vec<(ChunkId, Extent)> = Vec::new();
        let mut seen: HashSet<ChunkId> = HashSet::new();
        let mut kept_bytes = 0u64;
        while let Some(record) = scanner.next_record()? {
            let first = seen.insert(record.id);
            let indexed = self
                .get(CF_CHUNKS, &pack_location_key(&record.id, old))?
                .and_then(|v| codec::decode_extent(&v).ok())
                == Some(record.extent);
            if !(first && indexed && keep(&record.id)?) {
                continue;
            }
            if !record.intact {
                return Ok(PackVerdict::Damaged);
            }
            kept_bytes += RECORD_HEADER_LEN + u64::from(record.extent.len);
            kept.push((record.id, record.extent));
        }
        if matches!(scanner.end(), Some(PackEnd::Torn { .. })) {
            return Ok(PackVerdict::Damaged);
        }
        let garbage_bytes = file_bytes.saturating_sub(kept_bytes + super::pack::HEADER_LEN);
        let all_garbage = kept.is_empty();
        if !all_garbage && (garbage_bytes as f64) < min_share * file_bytes as f64 {
            return Ok(PackVerdict::NotWorthIt {
                garbage_bytes,
                file_bytes,
            });
        }
        let new = if all_garbage {
            0
        } else {
            self.new_pack_number()?
        };
        self.put_gc_state(old, COPYING, new)?;
        crash_at(CrashPoint::Registered);
        let mut moved: HashMap<ChunkId, Extent> = HashMap::new();
        if new != 0 {
            let new_path = self.packs_dir().join(pack_file_name(new));
            let mut writer = PackWriter::open(&new_path)?;
            for (id, extent) in &kept {
                let data = read_chunk(&old_path, *extent, id)?;
                moved.insert(*id, writer.append(id, &data)?);
            }
            writer.sync()?;
            self.sync_packs_dir()?;
        }
        crash_at(CrashPoint::Copied);
        let mut batch = self.batch();
        for id in &seen {
            batch.delete(CF_CHUNKS, &pack_location_key(id, old));
        }
        for (id, extent) in &moved {
            batch.put_pack_location(id, new, *extent);
        }
        batch.put(CF_META, &gc_key(old), &gc_value(SWITCHED, new));
        self.write(batch, Durability::Durable)?;
        crash_at(CrashPoint::Switched);
        self.remove_pack_file(old)?;
        crash_at(CrashPoint::OldRemoved);
        self.clear_gc_state(old)?;
        Ok(PackVerdict::Rewritten(Rewrite {
            new_pack: (new != 0).then_some(new),
            kept_chunks: kept.len() as u64,
            kept_bytes,
            dropped_chunks: (seen.len() - kept.len()) as u64,
            reclaimed_bytes: garbage_bytes
                + if all_garbage {
                    super::pack::HEADER_LEN
                } else {
                    0
                },
        }))
    }

    /// The pack files an interrupted rewrite left, which the next open for writing
    /// removes (a new pack nothing points into yet, or an old one nothing points into
    /// any more): `shoal verify`, which opens read-only, does not take their records for
    /// orphans.
    pub fn rewrite_leftovers(&self) -> Result<HashSet<u64>, StoreError> {
        Ok(self
            .pending_rewrites()?
            .into_iter()
            .map(|(old, state, new)| if state == SWITCHED { old } else { new })
            .filter(|&n| n != 0)
            .collect())
    }

    fn pending_rewrites(&self) -> Result<Vec<(u64, u8, u64)>, StoreError> {
        let start = GC_PREFIX.to_vec();
        let end = successor(GC_PREFIX);
        let mut pending = Vec::new();
        for item in self.range(CF_META, start, end) {
            let (key, value) = item?;
            let parsed = (|| {
                let old = u64::from_be_bytes(key.strip_prefix(GC_PREFIX)?.try_into().ok()?);
                let new = u64::from_le_bytes(value.get(1..9)?.try_into().ok()?);
                Some((old, *value.first()?, new))
            })();
            match parsed {
                Some(p) => pending.push(p),
                None => {
                    return Err(StoreError::corrupt(
                        CF_META,
                        &key,
                        "bad pack rewrite record",
                    ));
                }
            }
        }
        Ok(pending)
    }

    /// Finishes or undoes the rewrites a crash interrupted: one that had switched the
    /// index loses its old pack; one that had not loses its new pack (nothing points
    /// into it) and keeps the old one, indexed as before.
    pub(super) fn finish_interrupted_rewrites(&self) -> Result<(), StoreError> {
        for (old, state, new) in self.pending_rewrites()? {
            match state {
                SWITCHED => self.remove_pack_file(old)?,
                _ if new != 0 => self.remove_pack_file(new)?,
                _ => {}
            }
            tracing::info!(
                old_pack = old,
                new_pack = new,
                switched = state == SWITCHED,
                "finished a pack rewrite a crash interrupted"
            );
            self.clear_gc_state(old)?;
        }
        Ok(())
    }

    /// Whether a live file of some volume holds `id` (the index has a live location).
    pub fn live_copy_exists(&self, id: &ChunkId) -> Result<bool, StoreError> {
        Ok(self
            .chunk_locations(id)?
            .iter()
            .any(|l| matches!(l, super::ChunkLocation::Live { .. })))
    }

    /// Keeps what the last collection did (`meta-v1` `last-collection`).
    pub fn record_collection(&self, value: &[u8]) -> Result<(), StoreError> {
        let mut batch = self.batch();
        batch.put(CF_META, LAST_COLLECTION, value);
        self.write(batch, Durability::Durable)
    }

    /// What [`Store::record_collection`] kept, if a collection ever ran.
    pub fn recorded_collection(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.get(CF_META, LAST_COLLECTION)
    }

    fn put_gc_state(&self, old: u64, state: u8, new: u64) -> Result<(), StoreError> {
        let mut batch: Batch<'_> = self.batch();
        batch.put(CF_META, &gc_key(old), &gc_value(state, new));
        self.write(batch, Durability::Durable)
    }

    fn clear_gc_state(&self, old: u64) -> Result<(), StoreError> {
        let mut batch = self.batch();
        batch.delete(CF_META, &gc_key(old));
        self.write(batch, Durability::Durable)
    }

    fn remove_pack_file(&self, number: u64) -> Result<(), StoreError> {
        let path = self.packs_dir().join(pack_file_name(number));
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(StoreError::Io { path, source }),
        }
        self.sync_packs_dir()
    }

    fn sync_packs_dir(&self) -> Result<(), StoreError> {
        let packs = self.packs_dir();
        std::fs::File::open(&packs)
            .and_then(|dir| dir.sync_all())
            .map_err(|source| StoreError::Io {
                path: packs,
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ChunkLocation;

    /// A pack of `n` chunks, indexed, and the chunks' bytes.
    fn pack_of(store: &Store, n: usize) -> (u64, Vec<(ChunkId, Vec<u8>)>) {
        let number = store.new_pack_number().unwrap();
        let mut writer = PackWriter::open(&store.packs_dir().join(pack_file_name(number))).unwrap();
        let mut batch = store.batch();
        let mut chunks = Vec::new();
        for i in 0..n {
            let data = format!("chunk {i} of pack {number}")
                .repeat(50)
                .into_bytes();
            let id = ChunkId::of(&data);
            let extent = writer.append(&id, &data).unwrap();
            batch.put_pack_location(&id, number, extent);
            chunks.push((id, data));
        }
        writer.sync().unwrap();
        store.write(batch, Durability::Durable).unwrap();
        (number, chunks)
    }

    fn read_back(store: &Store, id: &ChunkId) -> Option<Vec<u8>> {
        store
            .chunk_locations(id)
            .unwrap()
            .into_iter()
            .find_map(|l| match l {
                ChunkLocation::Pack { pack, extent } => {
                    read_chunk(&store.packs_dir().join(pack_file_name(pack)), extent, id).ok()
                }
                ChunkLocation::Live { .. } => None,
            })
    }

    #[test]
    fn a_rewrite_keeps_exactly_the_kept_chunks_and_removes_the_old_pack() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_for_test(dir.path());
        let (old, chunks) = pack_of(&store, 6);
        let keep: HashSet<ChunkId> = chunks.iter().step_by(2).map(|(id, _)| *id).collect();
        let verdict = store
            .rewrite_pack(old, &mut |id| Ok(keep.contains(id)), 0.25, &mut |_| {})
            .unwrap();
        let PackVerdict::Rewritten(rewrite) = verdict else {
            panic!("{verdict:?}");
        };
        assert_eq!((rewrite.kept_chunks, rewrite.dropped_chunks), (3, 3));
        assert!(!store.packs_dir().join(pack_file_name(old)).exists());
        for (id, data) in &chunks {
            assert_eq!(
                read_back(&store, id).as_ref(),
                keep.contains(id).then_some(data)
            );
        }
        // A pack with nothing to keep goes without a new one.
        let new = rewrite.new_pack.unwrap();
        let verdict = store
            .rewrite_pack(new, &mut |_| Ok(false), 0.25, &mut |_| {})
            .unwrap();
        assert!(matches!(
            verdict,
            PackVerdict::Rewritten(Rewrite { new_pack: None, .. })
        ));
        assert_eq!(store.mark_collectable_packs().unwrap(), Vec::<u64>::new());
        // Too little garbage: left alone.
        let (full, _) = pack_of(&store, 4);
        let verdict = store
            .rewrite_pack(full, &mut |_| Ok(true), 0.25, &mut |_| {})
            .unwrap();
        assert!(matches!(verdict, PackVerdict::NotWorthIt { .. }));
    }

    #[test]
    fn a_rewrite_stopped_at_any_point_leaves_the_old_pack_or_the_new_one_after_reopening() {
        for stop in [
            CrashPoint::Registered,
            CrashPoint::Copied,
            CrashPoint::Switched,
            CrashPoint::OldRemoved,
        ] {
            let dir = tempfile::tempdir().unwrap();
            let (old, chunks) = {
                let store = Store::open_for_test(dir.path());
                let (old, chunks) = pack_of(&store, 4);
                let keep = chunks[0].0;
                // A panic stands for the crash: nothing after the point runs.
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    store.rewrite_pack(old, &mut |id| Ok(*id == keep), 0.1, &mut |at| {
                        if at == stop {
                            panic!("stopped at {at:?}");
                        }
                    })
                }));
                assert!(result.is_err(), "{stop:?}");
                (old, chunks)
            };
            let store = Store::open_for_test(dir.path());
            let packs = store.mark_collectable_packs().unwrap();
            assert_eq!(packs.len(), 1, "{stop:?}: one pack left, {packs:?}");
            let switched = matches!(stop, CrashPoint::Switched | CrashPoint::OldRemoved);
            assert_eq!(packs[0] == old, !switched, "{stop:?}");
            assert_eq!(read_back(&store, &chunks[0].0).as_ref(), Some(&chunks[0].1));
            for (id, data) in &chunks[1..] {
                let expected = (!switched).then_some(data);
                assert_eq!(read_back(&store, id).as_ref(), expected, "{stop:?}");
            }
        }
    }
}
