//! What bringing the Merkle tree up to date costs after a change spread over many
//! directories: the step every scan and every pull ends with.
//!
//!     cargo bench --bench tree
//!
//! The index holds the layout of the `small` set (50 directories of 20 subdirectories,
//! each of the 1,000 with 50 files) in a RocksDB store on disk. Each iteration replaces
//! one file of each of the 1,000 leaf directories by a tombstone, as the delete of
//! 1,000 files spread over the set does (`tools/bench-sync.py --only delete`), and times
//! `tree::update` alone: 1,000 dirty leaves, their 50 parents and the root.

use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use shoal::entry::{Entry, EntryKind, VersionVector};
use shoal::ids::{ContentId, NodeId, VolumeId};
use shoal::pathname::VolPath;
use shoal::store::{Durability, OpenOptions, Store};

const TOP_DIRS: usize = 50;
const SUBDIRS: usize = 20;
const FILES: usize = 50;

fn dir_entry() -> Entry {
    Entry {
        kind: EntryKind::Dir,
        mode: 0o755,
        mtime_ns: 1_764_000_000_000_000_000,
        uid: 1000,
        gid: 1000,
        xattrs: Default::default(),
        link: None,
        version: version(1),
    }
}

fn file_entry(seed: usize) -> Entry {
    let mut content = [0u8; 32];
    content[..8].copy_from_slice(&(seed as u64).to_le_bytes());
    Entry {
        kind: EntryKind::File {
            size: 1024 + (seed as u64 % 15_000),
            content_id: ContentId(content),
            chunks: 1,
        },
        version: version(1),
        ..dir_entry()
    }
}

fn version(counter: u64) -> VersionVector {
    let mut version = VersionVector::default();
    for _ in 0..counter {
        version.bump(NodeId(0x5e11));
    }
    version
}

fn path(path: &str) -> VolPath {
    VolPath::parse(path.as_bytes()).expect("a valid path")
}

/// The `small` layout: `dirNN` holding `subNN` directories, each leaf 50 files.
fn populate(store: &Store, vol: VolumeId) {
    for top in 0..TOP_DIRS {
        let top_name = format!("dir{top:02}");
        let mut batch = store.batch();
        batch.put_entry(vol, &VolPath::root(), top_name.as_bytes(), &dir_entry());
        batch.mark_dirty(vol, &VolPath::root());
        let top_path = path(&top_name);
        for sub in 0..SUBDIRS {
            let sub_name = format!("sub{sub:02}");
            batch.put_entry(vol, &top_path, sub_name.as_bytes(), &dir_entry());
            batch.mark_dirty(vol, &top_path);
            let leaf = path(&format!("{top_name}/{sub_name}"));
            for file in 0..FILES {
                let name = format!("f{file:04}.dat");
                batch.put_entry(vol, &leaf, name.as_bytes(), &file_entry(file));
            }
            batch.mark_dirty(vol, &leaf);
        }
        store.write(batch, Durability::Buffered).unwrap();
    }
    shoal::tree::update(store, vol).unwrap();
}

/// Replaces file `round` of every leaf directory by a tombstone (marking each leaf dirty).
fn delete_one_per_leaf(store: &Store, vol: VolumeId, round: usize) {
    let name = format!("f{:04}.dat", round % FILES);
    let mut batch = store.batch();
    for top in 0..TOP_DIRS {
        for sub in 0..SUBDIRS {
            let leaf = path(&format!("dir{top:02}/sub{sub:02}"));
            let tombstone = Entry {
                kind: EntryKind::Tombstone {
                    deleted_at_ns: 1_764_000_000_000_000_000,
                },
                version: version(2 + round as u64),
                ..dir_entry()
            };
            batch.put_entry(vol, &leaf, name.as_bytes(), &tombstone);
            batch.mark_dirty(vol, &leaf);
        }
    }
    store.write(batch, Durability::Buffered).unwrap();
}

fn tree_update(c: &mut Criterion) {
    let state = tempfile::tempdir().unwrap();
    let options = OpenOptions {
        create: true,
        ..OpenOptions::default()
    };
    let store = Store::open(state.path(), options).unwrap();
    let vol = store.ensure_volume("bench").unwrap().id;
    populate(&store, vol);
    let mut round = 0;
    let mut group = c.benchmark_group("tree");
    group.sample_size(20);
    group.bench_function("update 1,000 dirty directories of 50 files", |b| {
        b.iter_custom(|iterations| {
            let mut spent = Duration::ZERO;
            for _ in 0..iterations {
                round += 1;
                delete_one_per_leaf(&store, vol, round);
                let started = Instant::now();
                shoal::tree::update(&store, vol).unwrap();
                spent += started.elapsed();
            }
            spent
        })
    });
    group.finish();
}

criterion_group!(benches, tree_update);
criterion_main!(benches);
