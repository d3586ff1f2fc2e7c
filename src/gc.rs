//! The garbage collector: drops the kept versions each volume's retention policy no
//! longer keeps ([`crate::retention`]), then reclaims the pack space of chunks that no
//! kept version and no live file references (`schema/store.md`, "Collecting packs").
//!
//! A collection works one pack at a time (the store's crash-safe
//! [`Store::rewrite_pack`]), pausing between packs, so `shoal serve` runs it beside sync
//! on a timer without holding anything sync waits for; `shoal gc` runs one with the
//! daemon stopped. What is referenced is read after the packs it looks at are marked
//! ([`Store::mark_collectable_packs`]): a version recorded meanwhile puts its own copy
//! of a chunk in the current version pack rather than rely on a marked pack, and a pack
//! a version being recorded relied on before is not marked. It is read once per group
//! of packs, for that group's chunks alone ([`GROUP_CHUNKS`]), so a collection's memory
//! does not grow with what the versions hold.

use std::collections::HashMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ids::{ChunkId, VolumeId};
use crate::pathname::VolPath;
use crate::retention::{self, Policy};
use crate::store::{CrashPoint, Durability, PackVerdict, Store, StoreError};

/// A pack is rewritten once at least this share of its file is garbage (all of it:
/// removed); below, copying the rest would cost more than it frees.
pub const MIN_GARBAGE_SHARE: f64 = 0.25;
/// How long a collection rests between two packs, so that sync's own reads and writes
/// are not queued behind a run of pack copies.
pub const PAUSE_BETWEEN_PACKS: Duration = Duration::from_millis(50);
/// Chunk ids a collection holds at once (about 16 MiB): packs are collected in groups
/// whose records name at most this many chunks (or one pack, which its size bounds),
/// and the version records are read once per group, noting only that group's chunks.
/// Memory stays the same whatever the kept versions hold; a store with more pack
/// records than this reads its version records once more per group.
pub const GROUP_CHUNKS: usize = 1 << 18;
/// Version records deleted per write batch.
const DROP_BATCH: usize = 4096;

/// What a volume's kept versions hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    pub versions: u64,
    /// The bytes of their chunks (a chunk two versions share counted for each).
    pub bytes: u64,
}

/// What one collection did; the last one is kept in the store (`meta-v1`
/// `last-collection`, JSON) for `shoal status`, `/status` and `/metrics`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Collection {
    /// When it finished, seconds since the Unix epoch.
    pub finished_unix: i64,
    pub versions_dropped: u64,
    pub packs_rewritten: u64,
    pub packs_removed: u64,
    pub chunks_reclaimed: u64,
    /// Bytes of pack files freed.
    pub bytes_reclaimed: u64,
    /// Packs left alone because a chunk to keep is damaged (`shoal repair` fixes them).
    pub packs_damaged: u64,
}

/// A volume as a collection sees it.
pub struct VolumeToCollect {
    pub name: String,
    pub id: VolumeId,
    pub policy: Policy,
    /// Size of the file system the volume is on (for a budget in percent).
    pub fs_bytes: u64,
}

/// What `shoal serve` last learned of its collections, for `/status` and `/metrics`.
#[derive(Debug, Default)]
pub struct Figures(std::sync::Mutex<FiguresInner>);

#[derive(Debug, Default)]
struct FiguresInner {
    held: std::collections::BTreeMap<String, Held>,
    last: Option<Collection>,
}

impl Figures {
    pub fn set_held(&self, volume: &str, held: Held) {
        let mut inner = self.0.lock().expect("figures lock");
        inner.held.insert(volume.to_string(), held);
    }

    pub fn set_last(&self, collection: Collection) {
        self.0.lock().expect("figures lock").last = Some(collection);
    }

    pub fn held(&self, volume: &str) -> Option<Held> {
        self.0
            .lock()
            .expect("figures lock")
            .held
            .get(volume)
            .copied()
    }

    pub fn last(&self) -> Option<Collection> {
        self.0.lock().expect("figures lock").last.clone()
    }
}

/// The time a collection decides at: now, unless a test moves the clock ahead
/// (`SHOAL_FAULT_GC_CLOCK_AHEAD_S=N`: N seconds later), so that thinning and expiry
/// can be tested without waiting hours.
pub fn now_ns() -> i64 {
    let ahead: i64 = std::env::var("SHOAL_FAULT_GC_CLOCK_AHEAD_S")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if ahead != 0 {
        tracing::warn!(
            ahead,
            "FAULT INJECTION ENABLED: the collector's clock is ahead (testing only)"
        );
    }
    crate::scan::now_ns().saturating_add(ahead.saturating_mul(1_000_000_000))
}

/// Test-only crash points (`SHOAL_FAULT_GC_CRASH_AT=N`: the process exits with status 99
/// at the Nth point a pack rewrite passes, counted from 1).
pub fn crash_from_env() -> impl FnMut(CrashPoint) {
    let at: Option<u64> = std::env::var("SHOAL_FAULT_GC_CRASH_AT")
        .ok()
        .and_then(|v| v.parse().ok());
    if at.is_some() {
        tracing::warn!("FAULT INJECTION ENABLED: the collector crashes on purpose (testing only)");
    }
    let mut passed = 0u64;
    move |point| {
        passed += 1;
        if Some(passed) == at {
            eprintln!("SHOAL_FAULT_GC_CRASH_AT: exiting at {point:?}");
            std::process::exit(99);
        }
    }
}

/// Drops what `volume`'s policy no longer keeps at `now_ns`; returns how many records
/// went and what the volume's versions hold after.
pub fn apply_retention(
    store: &Store,
    volume: &VolumeToCollect,
    now_ns: i64,
) -> Result<(u64, Held), StoreError> {
    let mut ids = Vec::new();
    let mut versions = Vec::new();
    for record in store.versions_below(volume.id, &VolPath::root()) {
        let record = record?;
        versions.push(retention::Version {
            path: record.path.as_bytes().to_vec(),
            replaced_at: i64::try_from(record.id.replaced_at_ns).unwrap_or(i64::MAX),
            seq: u64::from(record.id.seq),
            bytes: record.chunks.iter().map(|c| u64::from(c.len)).sum(),
        });
        ids.push((record.path, record.id));
    }
    let dropped = retention::decide(now_ns, &versions, &volume.policy, volume.fs_bytes);
    let mut held = Held {
        versions: versions.len() as u64,
        bytes: versions.iter().map(|v| v.bytes).sum(),
    };
    for group in dropped.chunks(DROP_BATCH) {
        let mut batch = store.batch();
        for &(i, reason) in group {
            let (path, id) = &ids[i];
            tracing::debug!(volume = %volume.name, path = ?path, version = %id.to_hex(), ?reason, "dropping a kept version");
            batch.delete_version(volume.id, path, *id);
            held.versions -= 1;
            held.bytes -= versions[i].bytes;
        }
        store.write(batch, Durability::Durable)?;
    }
    Ok((dropped.len() as u64, held))
}

/// What every volume's versions hold, without dropping anything (`shoal status`).
pub fn versions_held(store: &Store, vol: VolumeId) -> Result<Held, StoreError> {
    let mut held = Held::default();
    for record in store.versions_below(vol, &VolPath::root()) {
        let record = record?;
        held.versions += 1;
        held.bytes += record.chunks.iter().map(|c| u64::from(c.len)).sum::<u64>();
    }
    Ok(held)
}

/// One collection: retention on every volume, then every collectable pack. `held` is
/// told each volume's figures as they are known; `pause` runs between packs.
pub fn collect(
    store: &Store,
    volumes: &[VolumeToCollect],
    now_ns: i64,
    held: &mut dyn FnMut(&str, Held),
    pause: &mut dyn FnMut(),
    crash_at: &mut dyn FnMut(CrashPoint),
) -> Result<Collection, StoreError> {
    let mut collection = Collection::default();
    for volume in volumes {
        let (dropped, now_held) = apply_retention(store, volume, now_ns)?;
        if dropped > 0 {
            tracing::info!(volume = %volume.name, dropped, "dropped kept versions past their retention");
        }
        collection.versions_dropped += dropped;
        held(&volume.name, now_held);
    }
    let packs = store.mark_collectable_packs()?;
    let result = collect_packs(
        store,
        &packs,
        GROUP_CHUNKS,
        &mut collection,
        pause,
        crash_at,
    );
    store.unmark_packs();
    result?;
    collection.finished_unix = crate::scan::now_ns() / 1_000_000_000;
    store.record_collection(&serde_json::to_vec(&collection).expect("serializes"))?;
    Ok(collection)
}

/// Collects `packs` in groups whose records name at most `group_chunks` chunks.
fn collect_packs(
    store: &Store,
    packs: &[u64],
    group_chunks: usize,
    collection: &mut Collection,
    pause: &mut dyn FnMut(),
    crash_at: &mut dyn FnMut(CrashPoint),
) -> Result<(), StoreError> {
    let mut rest = packs;
    while !rest.is_empty() {
        // A group of packs whose records name at most `group_chunks` chunks (or one
        // pack), and which of those chunks a kept version references.
        let mut referenced: HashMap<ChunkId, bool> = HashMap::new();
        let mut taken = 0;
        while taken < rest.len() && (taken == 0 || referenced.len() < group_chunks) {
            for id in store.pack_chunk_ids(rest[taken])? {
                referenced.insert(id, false);
            }
            taken += 1;
        }
        let (group, later) = rest.split_at(taken);
        mark_referenced(store, &mut referenced)?;
        for &pack in group {
            let mut keep = |id: &ChunkId| -> Result<bool, StoreError> {
                Ok(referenced.get(id) == Some(&true) || store.live_copy_exists(id)?)
            };
            collect_pack(store, pack, &mut keep, collection, crash_at)?;
            pause();
        }
        rest = later;
    }
    Ok(())
}

fn collect_pack(
    store: &Store,
    pack: u64,
    keep: &mut dyn FnMut(&ChunkId) -> Result<bool, StoreError>,
    collection: &mut Collection,
    crash_at: &mut dyn FnMut(CrashPoint),
) -> Result<(), StoreError> {
    match store.rewrite_pack(pack, keep, MIN_GARBAGE_SHARE, crash_at)? {
        PackVerdict::Rewritten(rewrite) => {
            tracing::info!(
                pack,
                new_pack = rewrite.new_pack,
                dropped_chunks = rewrite.dropped_chunks,
                reclaimed_bytes = rewrite.reclaimed_bytes,
                "collected a pack"
            );
            match rewrite.new_pack {
                Some(_) => collection.packs_rewritten += 1,
                None => collection.packs_removed += 1,
            }
            collection.chunks_reclaimed += rewrite.dropped_chunks;
            collection.bytes_reclaimed += rewrite.reclaimed_bytes;
        }
        PackVerdict::NotWorthIt { .. } => {}
        PackVerdict::Damaged => {
            tracing::warn!(
                pack,
                "pack not collected: a chunk to keep is damaged (run `shoal repair`)"
            );
            collection.packs_damaged += 1;
        }
    }
    Ok(())
}

/// Sets to `true` every chunk of `chunks` that a kept version references (one read of
/// every version record; the other chunks they reference are not held).
fn mark_referenced(store: &Store, chunks: &mut HashMap<ChunkId, bool>) -> Result<(), StoreError> {
    for record in store.all_versions() {
        for chunk in &record?.chunks {
            if let Some(referenced) = chunks.get_mut(&chunk.id) {
                *referenced = true;
            }
        }
    }
    Ok(())
}

/// The last collection the store recorded.
pub fn last_collection(store: &Store) -> Result<Option<Collection>, StoreError> {
    Ok(store
        .recorded_collection()?
        .and_then(|bytes| serde_json::from_slice(&bytes).ok()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunking::ChunkRef;
    use crate::entry::{Entry, EntryKind, VersionVector};
    use crate::ids::NodeId;
    use crate::store::versions::{KeptChunks, VersionId, VersionRecord, Why};
    use crate::store::{ChunkLocation, OpenOptions};

    const NOW: i64 = 1_764_547_200 * 1_000_000_000;
    const SEC: i64 = 1_000_000_000;

    /// Keeps a version of `path` replaced `ago` ns before NOW, holding `chunks` (bytes).
    fn keep(store: &Store, path: &str, ago: i64, seq: u32, chunks: &[Vec<u8>]) {
        let mut kept = start_keeping(store, chunks);
        finish_keeping(store, &mut kept, path, ago, seq, chunks);
    }

    /// What a pull does first: appends (or finds in a version pack) `chunks`.
    fn start_keeping(store: &Store, chunks: &[Vec<u8>]) -> KeptChunks {
        let mut kept = store.kept_chunks();
        for data in chunks {
            store
                .keep_version_chunk(&mut kept, &ChunkId::of(data), data)
                .unwrap();
        }
        kept
    }

    /// What a pull does last: writes the record of a version of `path` replaced `ago`
    /// ns before NOW, holding `chunks`, with the pack locations of what it appended.
    fn finish_keeping(
        store: &Store,
        kept: &mut KeptChunks,
        path: &str,
        ago: i64,
        seq: u32,
        chunks: &[Vec<u8>],
    ) {
        let refs: Vec<ChunkRef> = chunks
            .iter()
            .map(|c| ChunkRef {
                id: ChunkId::of(c),
                len: c.len() as u32,
            })
            .collect();
        let mut batch = store.batch();
        kept.finish(store, &mut batch).unwrap();
        batch.put_version(&VersionRecord {
            vol: VolumeId(1),
            path: VolPath::parse(path.as_bytes()).unwrap(),
            id: VersionId {
                replaced_at_ns: (NOW - ago) as u64,
                seq,
            },
            why: Why::Replaced,
            replaced_by: NodeId(7),
            entry: Entry {
                kind: EntryKind::File {
                    size: refs.iter().map(|c| u64::from(c.len)).sum(),
                    content_id: crate::chunking::content_id(&refs),
                    chunks: refs.len() as u32,
                },
                mode: 0o644,
                mtime_ns: 0,
                uid: 0,
                gid: 0,
                xattrs: Default::default(),
                link: None,
                version: VersionVector::from_pairs([(NodeId(7), 1)]),
            },
            chunks: refs,
        });
        store.write(batch, Durability::Durable).unwrap();
    }

    /// A volume whose versions expire after a minute.
    fn expiring() -> VolumeToCollect {
        VolumeToCollect {
            name: "v".into(),
            id: VolumeId(1),
            policy: Policy {
                keep_for: Duration::from_secs(60),
                thin: false,
                budget: retention::Budget::Unlimited,
            },
            fs_bytes: 0,
        }
    }

    fn collect_now(store: &Store, pause: &mut dyn FnMut()) -> Collection {
        let volume = expiring();
        collect(
            store,
            std::slice::from_ref(&volume),
            NOW,
            &mut |_, _| {},
            pause,
            &mut |_| {},
        )
        .unwrap()
    }

    #[test]
    fn a_version_that_found_its_chunk_in_a_pack_before_a_collection_keeps_it_through_it() {
        let dir = tempfile::tempdir().unwrap();
        let chunk = "needed by the new version".repeat(40).into_bytes();
        // An expired version holds the chunk in a pack that no longer takes chunks.
        keep(
            &Store::open_for_test(dir.path()),
            "old",
            120 * SEC,
            0,
            std::slice::from_ref(&chunk),
        );
        let store = Store::open_for_test(dir.path());
        // A pull replacing another file with that chunk finds the pack's copy and
        // relies on it, appending nothing ...
        let mut kept = start_keeping(&store, std::slice::from_ref(&chunk));
        assert_eq!(kept.bytes(), 0);
        // ... a whole collection runs before the pull writes its record: the expired
        // version goes, and nothing else references the chunk yet ...
        let collection = collect_now(&store, &mut || {});
        assert_eq!(collection.versions_dropped, 1);
        // ... and the record, written after, still finds its chunk.
        finish_keeping(&store, &mut kept, "new", 0, 0, std::slice::from_ref(&chunk));
        drop(kept);
        assert!(readable(&store, &chunk));
        // Once the record is written, the next collection sees it referenced.
        collect_now(&store, &mut || {});
        assert!(readable(&store, &chunk));
    }

    #[test]
    fn a_version_that_looks_for_its_chunk_while_a_collection_runs_keeps_its_own_copy() {
        let dir = tempfile::tempdir().unwrap();
        let (first, second) = (
            "in the first pack".repeat(40).into_bytes(),
            "in the second pack".repeat(40).into_bytes(),
        );
        // Two expired versions, each in its own pack.
        keep(
            &Store::open_for_test(dir.path()),
            "a",
            120 * SEC,
            0,
            std::slice::from_ref(&first),
        );
        keep(
            &Store::open_for_test(dir.path()),
            "b",
            120 * SEC,
            0,
            std::slice::from_ref(&second),
        );
        let store = Store::open_for_test(dir.path());
        // Between the two packs of the collection (both marked), a pull keeps a version
        // holding the second pack's chunk: it appends its own copy.
        let mut kept = None;
        let collection = collect_now(&store, &mut || {
            if kept.is_none() {
                let started = start_keeping(&store, std::slice::from_ref(&second));
                assert_eq!(started.bytes(), second.len() as u64);
                kept = Some(started);
            }
        });
        assert_eq!(collection.packs_removed, 2);
        let mut kept = kept.unwrap();
        finish_keeping(
            &store,
            &mut kept,
            "new",
            0,
            0,
            std::slice::from_ref(&second),
        );
        drop(kept);
        assert!(readable(&store, &second));
        assert!(!readable(&store, &first));
    }

    fn readable(store: &Store, data: &[u8]) -> bool {
        let id = ChunkId::of(data);
        store
            .chunk_locations(&id)
            .unwrap()
            .into_iter()
            .any(|l| match l {
                ChunkLocation::Pack { pack, extent } => crate::store::pack::read_chunk(
                    &store
                        .packs_dir()
                        .join(crate::store::pack::pack_file_name(pack)),
                    extent,
                    &id,
                )
                .is_ok(),
                ChunkLocation::Live { .. } => false,
            })
    }

    #[test]
    fn a_collection_drops_expired_versions_and_reclaims_exactly_their_own_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(
            dir.path(),
            OpenOptions {
                create: true,
                read_only: false,
                chunk_params: None,
            },
        )
        .unwrap();
        let chunk = |name: &str| name.repeat(100).into_bytes();
        let (shared, old_only, new_only) = (chunk("shared"), chunk("old"), chunk("new"));
        keep(
            &store,
            "f",
            120 * SEC,
            0,
            &[shared.clone(), old_only.clone()],
        );
        keep(
            &store,
            "f",
            10 * SEC,
            1,
            &[shared.clone(), new_only.clone()],
        );
        // Packs are only collected once no version pack takes chunks: start a fresh one
        // by reopening the store.
        drop(store);
        let store = Store::open(dir.path(), OpenOptions::default()).unwrap();
        let volume = VolumeToCollect {
            name: "v".into(),
            id: VolumeId(1),
            policy: Policy {
                keep_for: Duration::from_secs(60),
                thin: true,
                budget: retention::Budget::Unlimited,
            },
            fs_bytes: 0,
        };
        let mut figures = Vec::new();
        let collection = collect(
            &store,
            std::slice::from_ref(&volume),
            NOW,
            &mut |name, held| figures.push((name.to_string(), held)),
            &mut || {},
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(collection.versions_dropped, 1);
        assert_eq!(collection.chunks_reclaimed, 1);
        assert_eq!(
            figures,
            [(
                "v".to_string(),
                Held {
                    versions: 1,
                    bytes: (shared.len() + new_only.len()) as u64
                }
            )]
        );
        assert!(readable(&store, &shared) && readable(&store, &new_only));
        assert!(!readable(&store, &old_only));
        assert_eq!(last_collection(&store).unwrap(), Some(collection));
        assert_eq!(
            store
                .versions_of(VolumeId(1), &VolPath::parse(b"f").unwrap())
                .count(),
            1
        );
    }

    #[test]
    fn packs_collected_one_group_at_a_time_keep_exactly_what_the_versions_reference() {
        let dir = tempfile::tempdir().unwrap();
        let chunk = |name: String| name.repeat(60).into_bytes();
        let mut garbage = Vec::new();
        let mut kept = Vec::new();
        // Three packs, each with an expired version's chunks and a kept version's.
        for pack in 0..3u32 {
            let store = Store::open_for_test(dir.path());
            let old = [
                chunk(format!("old {pack} a")),
                chunk(format!("old {pack} b")),
            ];
            let new = [chunk(format!("new {pack}"))];
            keep(&store, &format!("old{pack}"), 120 * SEC, pack, &old);
            keep(&store, &format!("new{pack}"), 0, pack, &new);
            garbage.extend(old);
            kept.extend(new);
        }
        let store = Store::open_for_test(dir.path());
        let (dropped, _) = apply_retention(&store, &expiring(), NOW).unwrap();
        assert_eq!(dropped, 3);
        let packs = store.mark_collectable_packs().unwrap();
        assert_eq!(packs.len(), 3);
        let mut collection = Collection::default();
        // Groups of one pack: the version records are read once per pack.
        collect_packs(&store, &packs, 1, &mut collection, &mut || {}, &mut |_| {}).unwrap();
        store.unmark_packs();
        assert_eq!(collection.packs_rewritten, 3);
        assert_eq!(collection.chunks_reclaimed, 6);
        assert!(kept.iter().all(|c| readable(&store, c)));
        assert!(garbage.iter().all(|c| !readable(&store, c)));
    }
}
