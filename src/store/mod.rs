//! The per-node store: a RocksDB index of every volume's entries, chunk locations,
//! Merkle tree and scan cache, plus the pack files (see `schema/store.md`).
//!
//! The store knows nothing of the network and does no file-system walking: the scanner
//! and the sync engine describe changes as a [`Batch`], which the store writes
//! atomically. Each batch leaves the index consistent on its own (an entry, its chunk
//! list, its chunk locations, its scan stamp and the dirty mark of its directory go
//! together), so a crash between batches loses only work, never consistency.
//!
//! One process at a time opens a store for writing: [`Store::open`] takes an exclusive
//! lock on `STATE_DIR/lock`. Read-only opens (`shoal verify`, `shoal status`) take no
//! lock and may run beside a writer.

mod batch;
mod busy;
mod chunks;
pub mod codec;
mod collect;
mod feed;
pub mod keys;
pub mod pack;
pub mod versions;

pub use batch::{Batch, Durability, Sealed};
pub use busy::{BUSY_PACK_AGE, BUSY_PACK_BYTES};
pub use chunks::{ChunkLocation, ChunkReads};
pub use collect::{CrashPoint, PackVerdict, Rewrite};
pub use feed::{Changes, DEFAULT_RETENTION as DEFAULT_FEED_RETENTION, FeedId, FeedMark};

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use rocksdb::{
    ColumnFamily, ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options, ReadOptions,
    SliceTransform, WriteBatch,
};
use serde::{Deserialize, Serialize};

use crate::chunking::{ChunkParams, ChunkRef};
use crate::encoding::DecodeError;
use crate::entry::{Entry, EntryKind};
use crate::ids::{HASH_LEN, NodeId, VolumeId};
use crate::pathname::VolPath;
use crate::tree::TreeNode;
use codec::ScanStamp;
use keys::*;

/// The layout version of the index and packs; a store of another version is refused.
pub const STORE_FORMAT: u32 = 1;

/// The rules the tree's nodes are computed by (`crate::tree`): 2 since a directory
/// without a node counts as an empty one in its parent's versions hash. A store of
/// earlier rules has its tree recomputed once ([`Store::mark_tree_of_older_rules`]).
pub const TREE_RULES: u32 = 2;
/// Dirty marks written in one batch when a whole tree is marked.
const TREE_MARKS_PER_WRITE: usize = 10_000;

const INDEX_DIR: &str = "index";
/// Where a new index is built before it is renamed to `INDEX_DIR`.
const INDEX_STAGING_DIR: &str = "index.creating";
const PACKS_DIR: &str = "packs";
/// Where `shoal repair --rebuild-index` moves an index it replaces.
const INDEX_DAMAGED_DIR: &str = "index.damaged";
const LOCK_FILE: &str = "lock";

/// RocksDB's memtables, shared by all column families: bounds the index's share of a
/// node's memory whatever the number of files (schema/store.md, "Memory").
const WRITE_BUFFER_BUDGET: usize = 8 << 20;

/// The blocks a memtable is allocated in (RocksDB's default for a family's 2 MiB
/// memtable, set so that it does not move with it): the node has glibc serve blocks of
/// this size by `mmap` (`main.rs`), so that a flushed memtable's blocks go back to the
/// system instead of staying resident as holes in the allocator's arenas.
pub const MEMTABLE_BLOCK_BYTES: usize = 256 << 10;

/// RocksDB's block cache, one for every column family, index and filter blocks
/// included: without it each family makes its own 8 MiB cache, and the index blocks of
/// every open table stay in memory beside it, growing with the index.
const BLOCK_CACHE_BYTES: usize = 8 << 20;

/// Level-0 tables a column family gathers before RocksDB merges them into level 1 (its
/// default is 4). Each of those compactions rewrites the part of level 1 that the new
/// tables overlap, which for keys that arrive in no order (a chunk or content id
/// first) is all of it: with level 1 growing to tens of MiB on a first sync of
/// 1,000,000 files, every node rewrote its index about eight times over (1.7-1.9 GB
/// written for 235 MB), a fifth of both nodes' CPU. Merging four times fewer batches
/// cuts that by three quarters. Reads pay little for the longer level 0: its tables'
/// filters and indexes stay pinned in the block cache, and a point lookup asks each
/// filter first (docs/BENCHMARKS.md, "Compactions of a first sync").
const LEVEL0_TABLES_TO_COMPACT: i32 = 16;

/// The size at which a compaction ends a table and starts the next (RocksDB's default
/// is 64 MiB). A compaction keeps the index and filter blocks of the table it is
/// writing in memory until the table is done: at 64 MiB, 3.8 MiB of a receiving node's
/// peak heap on a first sync of 1,000,000 files. Smaller tables also let a compaction
/// of keys that arrive mostly in order (names, directory by directory) pass over the
/// level-1 tables it does not overlap instead of rewriting one large table: that sync
/// compacted 14% fewer bytes on the receiver (docs/BENCHMARKS.md, "Smaller tables and
/// write buffers for RocksDB"). With `max_open_files` at 512, every table of an index
/// of up to about 8 GB stays open.
const TABLE_BYTES: u64 = 16 << 20;

/// The buffer RocksDB writes each file through (its log, a flush's or a compaction's
/// table), 1 MiB by default: at that size a flush's and a compaction's buffers held 2.5
/// MiB of a receiving node's peak heap on a first sync of 1,000,000 files.
const FILE_WRITE_BUFFER_BYTES: u64 = 256 << 10;

/// How each level's tables are compressed: level 0 not at all (its tables are read
/// back by the compaction that follows soon, so compressing them was work thrown
/// away), the levels below with LZ4, which costs less CPU than Snappy (RocksDB's
/// default) for about the same size. The last entry stands for every deeper level.
const COMPRESSION_PER_LEVEL: [rocksdb::DBCompressionType; 2] = [
    rocksdb::DBCompressionType::None,
    rocksdb::DBCompressionType::Lz4,
];

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no Shoal store in {0} (run `shoal scan` to create one)")]
    Missing(PathBuf),
    #[error(
        "the state directory {0} is in use by another shoal process (it holds {0}/{LOCK_FILE}); stop it or use another --state-dir"
    )]
    Locked(PathBuf),
    #[error("{dir} holds a store of format {found}; this shoal reads format {STORE_FORMAT}")]
    Format { dir: PathBuf, found: u32 },
    #[error("{0} is not a Shoal store (its RocksDB index has no `{CF_META}` column family)")]
    NotAStore(PathBuf),
    #[error(
        "the store in {dir} was created with chunk sizes {stored}; refusing to use it with {requested} (chunk sizes are fixed per cluster)"
    )]
    ChunkParams {
        dir: PathBuf,
        stored: ChunkParams,
        requested: ChunkParams,
    },
    #[error("RocksDB error in {dir}: {source}")]
    Rocks {
        dir: PathBuf,
        source: rocksdb::Error,
    },
    #[error("corrupt record in {cf} at key {key}: {reason}")]
    Corrupt {
        cf: &'static str,
        key: String,
        reason: String,
    },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    /// A pack the store writes itself (a busy pack).
    #[error(transparent)]
    Pack(#[from] pack::PackError),
    /// The state directory's file system is (nearly) full: nothing was written.
    #[error("state directory {0}")]
    LowSpace(#[from] crate::space::LowSpace),
}

impl StoreError {
    fn corrupt(cf: &'static str, key: &[u8], reason: impl ToString) -> Self {
        StoreError::Corrupt {
            cf,
            key: crate::ids::to_hex(key),
            reason: reason.to_string(),
        }
    }
}

/// What a store was created with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreMeta {
    pub node_id: NodeId,
    pub chunk_params: ChunkParams,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct OpenOptions {
    /// Create the state directory and a new store if there is none.
    pub create: bool,
    /// Open without the lock and without writing anything.
    pub read_only: bool,
    /// Chunk sizes to create the store with, or to check an existing store against.
    pub chunk_params: Option<ChunkParams>,
}

impl OpenOptions {
    /// For readers (`status`, `verify`): no lock, nothing written, no store created.
    pub const READ_ONLY: OpenOptions = OpenOptions {
        create: false,
        read_only: true,
        chunk_params: None,
    };
}

/// What the store remembers of a volume besides its tree.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeRecord {
    pub id: VolumeId,
    /// When the last complete scan finished (seconds since the Unix epoch).
    pub last_scan_unix: Option<i64>,
    /// Distinct chunk ids in the volume as of the last scan.
    pub unique_chunks: Option<u64>,
}

pub struct Store {
    db: DB,
    state_dir: PathBuf,
    meta: StoreMeta,
    read_only: bool,
    /// Held for the store's lifetime; the OS releases it when the process dies.
    _lock: Option<File>,
    /// The packs that keep consistent copies of busy files ([`busy`]).
    busy: busy::BusyPacks,
    /// The pack that takes chunks of kept versions ([`versions`]).
    versions: versions::VersionPacks,
    /// The highest pack number handed out by [`Store::new_pack_number`].
    last_pack: std::sync::Mutex<u64>,
    /// The numbering of each volume's changes ([`feed`]).
    feeds: feed::Feeds,
    /// Packs a collection round is rewriting, and packs a version being recorded relies
    /// on, under one lock ([`collect::PackClaims`]).
    claims: collect::Claims,
}

type RawItem = Result<(Box<[u8]>, Box<[u8]>), StoreError>;

/// Tries of a busy writer lock, 50 ms apart, before the store is reported locked.
const LOCK_ATTEMPTS: u32 = 10;

impl Store {
    /// Opens the store in `dir`, creating it with the default chunk sizes if there is
    /// none: the unit tests' store.
    #[cfg(test)]
    pub(crate) fn open_for_test(dir: &Path) -> Store {
        let options = OpenOptions {
            create: true,
            ..OpenOptions::default()
        };
        Store::open(dir, options).unwrap()
    }

    pub fn open(state_dir: &Path, options: OpenOptions) -> Result<Store, StoreError> {
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { path, source }
        };
        if !state_dir.is_dir() {
            if !options.create {
                return Err(StoreError::Missing(state_dir.to_path_buf()));
            }
            fs::create_dir_all(state_dir).map_err(io_err(state_dir))?;
        }
        let lock = if options.read_only {
            None
        } else {
            let lock_path = state_dir.join(LOCK_FILE);
            let file = File::create(&lock_path).map_err(io_err(&lock_path))?;
            // A child forked by a process that held the lock shares it until its exec
            // closes the descriptor: a busy lock is tried again for a moment before it
            // is taken to belong to another writer.
            let mut attempts = 0;
            loop {
                match file.try_lock() {
                    Ok(()) => break Some(file),
                    Err(fs::TryLockError::WouldBlock) if attempts < LOCK_ATTEMPTS => {
                        attempts += 1;
                        std::thread::sleep(std::time::Duration::from_millis(50));
                    }
                    Err(fs::TryLockError::WouldBlock) => {
                        return Err(StoreError::Locked(state_dir.to_path_buf()));
                    }
                    Err(fs::TryLockError::Error(e)) => return Err(io_err(&lock_path)(e)),
                }
            }
        };
        if !options.read_only {
            Self::ensure_room(state_dir, crate::space::STATE_OPEN_RESERVE)?;
        }
        let index = state_dir.join(INDEX_DIR);
        let rocks_err = |source| StoreError::Rocks {
            dir: index.clone(),
            source,
        };
        let existing = if index.join("CURRENT").exists() {
            Some(Self::read_meta(&index, state_dir)?)
        } else {
            None
        };
        if let (Some(meta), Some(requested)) = (existing, options.chunk_params)
            && meta.chunk_params != requested
        {
            return Err(StoreError::ChunkParams {
                dir: state_dir.to_path_buf(),
                stored: meta.chunk_params,
                requested,
            });
        }
        let cache = rocksdb::Cache::new_lru_cache(BLOCK_CACHE_BYTES).map_err(rocks_err)?;
        let db_options = Self::db_options(&cache);
        if options.read_only {
            let meta = existing.ok_or_else(|| StoreError::Missing(state_dir.to_path_buf()))?;
            // Only the families the store has: one written before a later family existed
            // is read as it is.
            let present = DB::list_cf(&Options::default(), &index).map_err(rocks_err)?;
            let families = ALL_CFS.iter().filter(|cf| present.iter().any(|p| p == *cf));
            let db = DB::open_cf_for_read_only(&db_options, &index, families, false)
                .map_err(rocks_err)?;
            return Ok(Store {
                db,
                state_dir: state_dir.to_path_buf(),
                meta,
                read_only: true,
                _lock: None,
                busy: Default::default(),
                versions: Default::default(),
                last_pack: Default::default(),
                feeds: Default::default(),
                claims: Default::default(),
            });
        }
        if existing.is_none() && !options.create {
            return Err(StoreError::Missing(state_dir.to_path_buf()));
        }
        fs::create_dir_all(state_dir.join(PACKS_DIR))
            .map_err(io_err(&state_dir.join(PACKS_DIR)))?;
        let meta = match existing {
            Some(meta) => meta,
            None => Self::create_index(
                state_dir,
                options.chunk_params.unwrap_or(ChunkParams::DEFAULT),
            )?,
        };
        let descriptors = ALL_CFS
            .iter()
            .map(|name| ColumnFamilyDescriptor::new(*name, Self::cf_options(name, &cache)));
        let db = DB::open_cf_descriptors(&db_options, &index, descriptors).map_err(rocks_err)?;
        let store = Store {
            db,
            state_dir: state_dir.to_path_buf(),
            meta,
            read_only: false,
            _lock: lock,
            busy: Default::default(),
            versions: Default::default(),
            last_pack: Default::default(),
            feeds: Default::default(),
            claims: Default::default(),
        };
        store.retire_leftover_busy_packs()?;
        store.finish_interrupted_rewrites()?;
        store.mark_tree_of_older_rules()?;
        Ok(store)
    }

    /// Creates a new index beside its final place and renames it there once its metadata
    /// is durable, so a crash during creation leaves either no index or a whole one.
    fn create_index(state_dir: &Path, chunk_params: ChunkParams) -> Result<StoreMeta, StoreError> {
        let io_err = |path: PathBuf| move |source| StoreError::Io { path, source };
        let staging = state_dir.join(INDEX_STAGING_DIR);
        if staging.exists() {
            fs::remove_dir_all(&staging).map_err(io_err(staging.clone()))?;
        }
        let node_id = NodeId::random()
            .map_err(|e| io_err(state_dir.to_path_buf())(io::Error::other(e.to_string())))?;
        let meta = StoreMeta {
            node_id,
            chunk_params,
        };
        {
            let rocks_err = |source| StoreError::Rocks {
                dir: staging.clone(),
                source,
            };
            let cache = rocksdb::Cache::new_lru_cache(BLOCK_CACHE_BYTES).map_err(rocks_err)?;
            let descriptors = ALL_CFS
                .iter()
                .map(|name| ColumnFamilyDescriptor::new(*name, Self::cf_options(name, &cache)));
            let db = DB::open_cf_descriptors(&Self::db_options(&cache), &staging, descriptors)
                .map_err(rocks_err)?;
            let cf = db
                .cf_handle(CF_META)
                .expect("opened with every column family");
            let mut batch = WriteBatch::default();
            let p = chunk_params;
            batch.put_cf(cf, META_NODE_ID, node_id.0.to_le_bytes());
            batch.put_cf(
                cf,
                META_CHUNK_PARAMS,
                [
                    p.min.to_le_bytes(),
                    p.avg.to_le_bytes(),
                    p.max.to_le_bytes(),
                ]
                .concat(),
            );
            batch.put_cf(cf, META_FORMAT, STORE_FORMAT.to_le_bytes());
            db.write_opt(batch, &batch::durable()).map_err(rocks_err)?;
        }
        let index = state_dir.join(INDEX_DIR);
        fs::rename(&staging, &index).map_err(io_err(index.clone()))?;
        File::open(state_dir)
            .and_then(|dir| dir.sync_all())
            .map_err(io_err(state_dir.to_path_buf()))?;
        Ok(meta)
    }

    /// The families keyed by a hash first ([`HASH_KEYED_CFS`]) filter their tables by
    /// that hash as well as by whole key: most of their lookups ask for the keys under one
    /// hash ([`Store::hash_range`]), and most of those find none (a first pull looks
    /// for each chunk it receives among the chunks held here: none, on an empty node). A
    /// range seek without such a filter searched the index of every table of the family
    /// for each one: a tenth of a receiving node's time on a volume of tiny files.
    fn cf_options(name: &str, cache: &rocksdb::Cache) -> Options {
        let mut options = Options::default();
        options.set_write_buffer_size(WRITE_BUFFER_BUDGET / 4);
        options.set_arena_block_size(MEMTABLE_BLOCK_BYTES);
        options.set_block_based_table_factory(&Self::table_options(cache));
        options.set_level_zero_file_num_compaction_trigger(LEVEL0_TABLES_TO_COMPACT);
        // RocksDB slows writes down, then stops them, when compaction falls this far
        // behind (its defaults, 20 and 36, assume a trigger of 4).
        options.set_level_zero_slowdown_writes_trigger(LEVEL0_TABLES_TO_COMPACT + 12);
        options.set_level_zero_stop_writes_trigger(LEVEL0_TABLES_TO_COMPACT + 24);
        options.set_compression_per_level(&COMPRESSION_PER_LEVEL);
        options.set_target_file_size_base(TABLE_BYTES);
        if HASH_KEYED_CFS.contains(&name) {
            options.set_prefix_extractor(SliceTransform::create_fixed_prefix(HASH_LEN));
            // The memtables too (a twentieth of their size, 100 KiB each).
            options.set_memtable_prefix_bloom_ratio(0.05);
        }
        options
    }

    /// Tables read through the store's one block cache, their index and filter blocks
    /// counted in it (those of level-0 tables pinned there, as they are read most).
    ///
    /// Each table has a Bloom filter (10 bits a key, about 1% false positives): most
    /// lookups of a first scan or a first pull are of names the index does not have,
    /// and without a filter each of them read and decompressed a data block of every
    /// table that might hold the key. Index and filter are partitioned in blocks of
    /// 4 KiB, of which a lookup reads one each, only their top levels pinned: whole, a
    /// large table's index and filter were each bigger than a share of the 8 MiB cache,
    /// and were read again on almost every lookup (a first scan of 1,000,000 files spent
    /// 45% of its time copying them and 28% decompressing blocks; docs/BENCHMARKS.md).
    fn table_options(cache: &rocksdb::Cache) -> rocksdb::BlockBasedOptions {
        let mut table = rocksdb::BlockBasedOptions::default();
        table.set_block_cache(cache);
        table.set_bloom_filter(10.0, false);
        table.set_index_type(rocksdb::BlockBasedIndexType::TwoLevelIndexSearch);
        table.set_partition_filters(true);
        table.set_metadata_block_size(4096);
        table.set_cache_index_and_filter_blocks(true);
        table.set_pin_top_level_index_and_filter(true);
        table.set_pin_l0_filter_and_index_blocks_in_cache(true);
        table
    }

    fn db_options(cache: &rocksdb::Cache) -> Options {
        let mut options = Options::default();
        options.set_block_based_table_factory(&Self::table_options(cache));
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        options.set_db_write_buffer_size(WRITE_BUFFER_BUDGET);
        options.set_max_open_files(512);
        options.set_writable_file_max_buffer_size(FILE_WRITE_BUFFER_BYTES);
        options.increase_parallelism(2);
        options.set_keep_log_file_num(3);
        options.set_max_log_file_size(4 << 20);
        options
    }

    /// Reads and checks the metadata of an existing index without writing to it.
    fn read_meta(index: &Path, state_dir: &Path) -> Result<StoreMeta, StoreError> {
        let rocks_err = |source| StoreError::Rocks {
            dir: index.to_path_buf(),
            source,
        };
        let cfs = DB::list_cf(&Options::default(), index).map_err(rocks_err)?;
        if !cfs.iter().any(|cf| cf == CF_META) {
            return Err(StoreError::NotAStore(state_dir.to_path_buf()));
        }
        let db = DB::open_cf_for_read_only(&Options::default(), index, [CF_META], false)
            .map_err(rocks_err)?;
        let cf = db
            .cf_handle(CF_META)
            .expect("opened with the meta column family");
        let get = |key: &[u8]| db.get_cf(cf, key).map_err(rocks_err);
        let format = match get(META_FORMAT)? {
            Some(bytes) => u32::from_le_bytes(
                bytes
                    .as_slice()
                    .try_into()
                    .map_err(|_| StoreError::corrupt(CF_META, META_FORMAT, "not 4 bytes"))?,
            ),
            None => return Err(StoreError::NotAStore(state_dir.to_path_buf())),
        };
        let known = |cf: &String| cf == "default" || ALL_CFS.contains(&cf.as_str());
        let complete = ALL_CFS
            .iter()
            .all(|cf| LATER_CFS.contains(cf) || cfs.iter().any(|c| c == cf));
        if format != STORE_FORMAT || !complete || !cfs.iter().all(known) {
            return Err(StoreError::Format {
                dir: state_dir.to_path_buf(),
                found: format,
            });
        }
        let node_id = get(META_NODE_ID)?
            .and_then(|b| Some(NodeId(u64::from_le_bytes(b.as_slice().try_into().ok()?))))
            .ok_or_else(|| StoreError::corrupt(CF_META, META_NODE_ID, "missing or not 8 bytes"))?;
        let params = get(META_CHUNK_PARAMS)?
            .filter(|b| b.len() == 12)
            .and_then(|b| {
                let n = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
                ChunkParams::new(n(0), n(4), n(8)).ok()
            })
            .ok_or_else(|| StoreError::corrupt(CF_META, META_CHUNK_PARAMS, "missing or invalid"))?;
        Ok(StoreMeta {
            node_id,
            chunk_params: params,
        })
    }

    pub fn meta(&self) -> StoreMeta {
        self.meta
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    pub fn packs_dir(&self) -> PathBuf {
        self.state_dir.join(PACKS_DIR)
    }

    /// A pack number no pack file has, nor any pack started by this process: past the
    /// highest in the packs directory and the last one handed out (busy packs and
    /// version packs are numbered alike, so they never meet).
    pub fn new_pack_number(&self) -> Result<u64, StoreError> {
        let mut last = self.last_pack.lock().expect("pack number lock");
        let highest = self.pack_numbers()?.max().unwrap_or(0);
        *last = highest.max(*last) + 1;
        Ok(*last)
    }

    /// The numbers of the pack files in the packs directory.
    fn pack_numbers(&self) -> Result<impl Iterator<Item = u64>, StoreError> {
        let packs = self.packs_dir();
        let entries = fs::read_dir(&packs).map_err(|source| StoreError::Io {
            path: packs.clone(),
            source,
        })?;
        Ok(entries
            .flatten()
            .filter_map(|e| pack::pack_number(&e.path())))
    }

    /// Whether a writer (`shoal serve`, `scan`, `repair`) holds the store's lock now.
    pub fn in_use(state_dir: &Path) -> bool {
        File::open(state_dir.join(LOCK_FILE))
            .is_ok_and(|file| matches!(file.try_lock_shared(), Err(fs::TryLockError::WouldBlock)))
    }

    /// Whether `state_dir` holds the rest of a store (packs, lock) but no index.
    pub fn index_missing(state_dir: &Path) -> bool {
        !state_dir.join(INDEX_DIR).join("CURRENT").exists()
            && (state_dir.join(PACKS_DIR).is_dir() || state_dir.join(LOCK_FILE).exists())
    }

    /// Moves a lost or damaged index out of the way (to `index.damaged/`, replacing an
    /// older one) so that [`Store::open`] with `create` builds a new one. The caller
    /// holds no store open.
    pub fn set_index_aside(state_dir: &Path) -> Result<(), StoreError> {
        let io_err = |path: PathBuf| move |source| StoreError::Io { path, source };
        let index = state_dir.join(INDEX_DIR);
        let aside = state_dir.join(INDEX_DAMAGED_DIR);
        if !index.exists() {
            return Ok(());
        }
        if aside.exists() {
            fs::remove_dir_all(&aside).map_err(io_err(aside.clone()))?;
        }
        fs::rename(&index, &aside).map_err(io_err(index.clone()))?;
        File::open(state_dir)
            .and_then(|dir| dir.sync_all())
            .map_err(io_err(state_dir.to_path_buf()))
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn cf(&self, name: &'static str) -> &ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("the store is opened with every column family")
    }

    /// Checks that the state directory's file system has `needed` bytes free (see
    /// [`crate::space`]: RocksDB must never meet a full disk).
    fn ensure_room(state_dir: &Path, needed: u64) -> Result<(), StoreError> {
        crate::space::ensure_room(state_dir, needed).map_err(|e| match e {
            crate::space::LowSpaceOrIo::LowSpace(low) => StoreError::LowSpace(low),
            crate::space::LowSpaceOrIo::Io { path, source } => StoreError::Io { path, source },
        })
    }

    fn rocks(&self, source: rocksdb::Error) -> StoreError {
        StoreError::Rocks {
            dir: self.state_dir.join(INDEX_DIR),
            source,
        }
    }

    fn get(&self, cf: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.db.get_cf(self.cf(cf), key).map_err(|e| self.rocks(e))
    }

    /// A `u32 LE` record of `meta-v1`; one of another length is corrupt.
    fn meta_u32(&self, key: &[u8]) -> Result<Option<u32>, StoreError> {
        self.get(CF_META, key)?
            .map(|bytes| match bytes.as_slice().try_into() {
                Ok(four) => Ok(u32::from_le_bytes(four)),
                Err(_) => Err(StoreError::corrupt(CF_META, key, "not 4 bytes")),
            })
            .transpose()
    }

    /// The value of `key` in `cf`, decoded; a value that does not decode is a corrupt
    /// record.
    fn get_decoded<T>(
        &self,
        cf: &'static str,
        key: &[u8],
        decode: fn(&[u8]) -> Result<T, DecodeError>,
    ) -> Result<Option<T>, StoreError> {
        self.get_decoded_through(cf, key, &ReadOptions::default(), decode)
    }

    /// [`Store::get_decoded`], read through `options` (a snapshot's, say).
    fn get_decoded_through<T>(
        &self,
        cf: &'static str,
        key: &[u8],
        options: &ReadOptions,
        decode: fn(&[u8]) -> Result<T, DecodeError>,
    ) -> Result<Option<T>, StoreError> {
        let bytes = (self.db)
            .get_cf_opt(self.cf(cf), key, options)
            .map_err(|e| self.rocks(e))?;
        bytes
            .map(|bytes| decode(&bytes).map_err(|e| StoreError::corrupt(cf, key, e)))
            .transpose()
    }

    /// Every key-value pair of `cf` in `[start, end)`, in key order.
    fn range(
        &self,
        cf: &'static str,
        start: Vec<u8>,
        end: Vec<u8>,
    ) -> impl Iterator<Item = RawItem> + '_ {
        let mut read = ReadOptions::default();
        read.set_iterate_upper_bound(end);
        // A range may cross hashes in the families filtered by them: all of it is read.
        read.set_total_order_seek(true);
        self.iterate(cf, &start, read)
    }

    /// Every key-value pair of `cf`, one of [`HASH_KEYED_CFS`], whose key starts with
    /// `hash`, in key order; the tables with no key under it are passed over by their
    /// filters.
    fn hash_range(
        &self,
        cf: &'static str,
        hash: &[u8; HASH_LEN],
    ) -> impl Iterator<Item = RawItem> + '_ {
        debug_assert!(HASH_KEYED_CFS.contains(&cf));
        let mut read = ReadOptions::default();
        read.set_iterate_upper_bound(successor(hash));
        read.set_prefix_same_as_start(true);
        self.iterate(cf, hash, read)
    }

    fn iterate<'s>(
        &'s self,
        cf: &'static str,
        start: &[u8],
        read: ReadOptions,
    ) -> impl Iterator<Item = RawItem> + use<'s> {
        self.db
            .iterator_cf_opt(
                self.cf(cf),
                read,
                IteratorMode::From(start, Direction::Forward),
            )
            .map(move |item| item.map_err(|e| self.rocks(e)))
    }

    // ---- volumes ----

    pub fn volume(&self, name: &str) -> Result<Option<VolumeRecord>, StoreError> {
        let key = volume_meta_key(name);
        match self.get(CF_META, &key)? {
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| StoreError::corrupt(CF_META, &key, e)),
            None => Ok(None),
        }
    }

    /// The volume's record, registering the volume if it is new.
    pub fn ensure_volume(&self, name: &str) -> Result<VolumeRecord, StoreError> {
        if let Some(record) = self.volume(name)? {
            return Ok(record);
        }
        let next = self.meta_u32(META_NEXT_VOLUME)?.unwrap_or(1);
        let record = VolumeRecord {
            id: VolumeId(next),
            last_scan_unix: None,
            unique_chunks: None,
        };
        let mut batch = self.batch();
        batch.put_volume(name, &record);
        batch
            .wb
            .put_cf(self.cf(CF_META), META_NEXT_VOLUME, (next + 1).to_le_bytes());
        self.write(batch, Durability::Durable)?;
        Ok(record)
    }

    /// Makes `id` this store's node id: the id the node's key proves (see
    /// `crate::identity`). A store made before nodes had keys of their own has a random
    /// id; its version vectors keep the counters of that id as history, and new changes
    /// count under `id`.
    pub fn adopt_node_id(&mut self, id: NodeId) -> Result<(), StoreError> {
        if self.meta.node_id == id {
            return Ok(());
        }
        let mut batch = self.batch();
        batch
            .wb
            .put_cf(self.cf(CF_META), META_NODE_ID, id.0.to_le_bytes());
        self.write(batch, Durability::Durable)?;
        self.meta.node_id = id;
        Ok(())
    }

    /// Every registered volume, by name.
    pub fn volumes(&self) -> Result<Vec<(String, VolumeRecord)>, StoreError> {
        let (start, end) = volume_meta_range();
        let mut out = Vec::new();
        for item in self.range(CF_META, start, end) {
            let (key, value) = item?;
            let name = volume_name_of_meta_key(&key)
                .ok_or_else(|| StoreError::corrupt(CF_META, &key, "bad volume name"))?;
            let record = serde_json::from_slice(&value)
                .map_err(|e| StoreError::corrupt(CF_META, &key, e))?;
            out.push((name.to_string(), record));
        }
        Ok(out)
    }

    // ---- entries, chunk lists, scan stamps ----

    pub fn entry(
        &self,
        vol: VolumeId,
        dir: &VolPath,
        name: &[u8],
    ) -> Result<Option<Entry>, StoreError> {
        self.get_decoded(CF_ENTRIES, &entry_key(vol, dir, name), codec::decode_entry)
    }

    /// The entry sync was publishing at `dir/name` when it last stopped between the
    /// rename and the index write (see [`publishing_key`]), if any.
    pub fn publishing(
        &self,
        vol: VolumeId,
        dir: &VolPath,
        name: &[u8],
    ) -> Result<Option<Entry>, StoreError> {
        self.get_decoded(
            CF_META,
            &publishing_key(vol, dir, name),
            codec::decode_entry,
        )
    }

    /// The keys of volume `vol`'s publishing records now: read as the daemon starts,
    /// before any pull, the records a crash left (see [`Store::forget_publishing`]).
    pub fn publishing_records(&self, vol: VolumeId) -> Result<Vec<Box<[u8]>>, StoreError> {
        let (start, end) = publishing_range(vol);
        self.range(CF_META, start, end)
            .map(|item| item.map(|(key, _)| key))
            .collect()
    }

    /// Forgets the publishing records `keys`, those [`Store::publishing_records`] found
    /// as the daemon started, once the scan at start has consumed those of files it
    /// found renamed. Records written since are a pull's, about to publish: they stay.
    pub fn forget_publishing(&self, keys: Vec<Box<[u8]>>) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut batch = self.batch();
        for key in keys {
            batch.delete(CF_META, &key);
        }
        self.write(batch, Durability::Durable)
    }

    /// The deletes the guard holds in volume `vol`, in path order.
    pub fn held(
        &self,
        vol: VolumeId,
    ) -> impl Iterator<Item = Result<(VolPath, codec::Held), StoreError>> + '_ {
        let (start, end) = held_range(vol);
        self.range(CF_META, start, end).map(move |item| {
            let (key, value) = item?;
            let path =
                held_path_of(vol, &key).map_err(|e| StoreError::corrupt(CF_META, &key, e))?;
            let held =
                codec::decode_held(&value).map_err(|e| StoreError::corrupt(CF_META, &key, e))?;
            Ok((path, held))
        })
    }

    pub fn chunk_list(
        &self,
        vol: VolumeId,
        dir: &VolPath,
        name: &[u8],
    ) -> Result<Option<Vec<ChunkRef>>, StoreError> {
        self.get_decoded(
            CF_CHUNK_LISTS,
            &entry_key(vol, dir, name),
            codec::decode_chunk_list,
        )
    }

    /// Counts one more change by `node` (this node) of `dir/name` in `version`, past
    /// the highest count of ours the name was given when its entry holds a lower one
    /// (see [`keys::issued_key`]); that record is then spent, in `batch`.
    pub fn count_ours(
        &self,
        batch: &mut Batch<'_>,
        (vol, dir, name): (VolumeId, &VolPath, &[u8]),
        node: NodeId,
        version: &mut crate::entry::VersionVector,
    ) -> Result<(), StoreError> {
        let issued = self.issued(vol, dir, name)?;
        version.bump_past(node, issued.unwrap_or(0));
        if issued.is_some() {
            batch.delete_issued(vol, dir, name);
        }
        Ok(())
    }

    /// Records `dir/name`, indexed live as `old`, as deleted by this node (`us`) at
    /// `deleted_at_ns`, in `batch`, as a scan records a name it finds gone from disk: a
    /// tombstone whose vector counts one more change of ours; the name's stamp, chunk
    /// records and (a directory's) tree node and dirty mark dropped; its parent marked
    /// dirty. Returns the tombstone.
    pub fn put_delete_of_ours(
        &self,
        batch: &mut Batch<'_>,
        (vol, dir, name): (VolumeId, &VolPath, &[u8]),
        old: &Entry,
        us: NodeId,
        deleted_at_ns: i64,
    ) -> Result<Entry, StoreError> {
        if let EntryKind::File { .. } = old.kind {
            let chunks = self.chunk_list(vol, dir, name)?.unwrap_or_default();
            batch.delete_chunks(vol, dir, name, &chunks);
        }
        if old.is_dir()
            && let Ok(path) = dir.join(name)
        {
            batch.delete_tree_node(vol, &path);
            batch.clear_dirty(vol, &path);
        }
        let mut version = old.version.clone();
        self.count_ours(batch, (vol, dir, name), us, &mut version)?;
        let tombstone = Entry::deleted(version, deleted_at_ns);
        batch.put_entry(vol, dir, name, &tombstone);
        batch.delete_stamp(vol, dir, name);
        batch.mark_dirty(vol, dir);
        Ok(tombstone)
    }

    /// The highest count of ours `dir/name` was given, when its entry holds a lower one
    /// (see [`keys::issued_key`]).
    pub fn issued(
        &self,
        vol: VolumeId,
        dir: &VolPath,
        name: &[u8],
    ) -> Result<Option<u64>, StoreError> {
        self.get_decoded(CF_META, &issued_key(vol, dir, name), codec::decode_issued)
    }

    /// The scan stamp of one name, if it is indexed as existing.
    pub fn stamp(
        &self,
        vol: VolumeId,
        dir: &VolPath,
        name: &[u8],
    ) -> Result<Option<ScanStamp>, StoreError> {
        self.stamp_through(vol, dir, name, &ReadOptions::default())
    }

    /// [`Store::stamp`], read through `options` (a run's view: [`ChunkReads::stamp`]).
    fn stamp_through(
        &self,
        vol: VolumeId,
        dir: &VolPath,
        name: &[u8],
        options: &ReadOptions,
    ) -> Result<Option<ScanStamp>, StoreError> {
        let key = entry_key(vol, dir, name);
        self.get_decoded_through(CF_SCAN_CACHE, &key, options, codec::decode_stamp)
    }

    /// The children of `dir` in name order, tombstones included.
    pub fn children(
        &self,
        vol: VolumeId,
        dir: &VolPath,
    ) -> impl Iterator<Item = Result<(Vec<u8>, Entry), StoreError>> + '_ {
        self.children_in(CF_ENTRIES, vol, dir, &[], codec::decode_entry)
    }

    /// The children of `dir` whose names are `>= start`, in name order.
    pub fn children_from(
        &self,
        vol: VolumeId,
        dir: &VolPath,
        start: &[u8],
    ) -> impl Iterator<Item = Result<(Vec<u8>, Entry), StoreError>> + '_ {
        self.children_in(CF_ENTRIES, vol, dir, start, codec::decode_entry)
    }

    /// The chunk lists of `dir`'s child files whose names are `>= start`, in name order;
    /// a list of more than `max_chunks` chunks is passed over undecoded (`None`). Read
    /// alongside [`Store::children_from`]: one seek for a directory instead of a lookup
    /// for each file.
    pub fn chunk_lists_from(
        &self,
        vol: VolumeId,
        dir: &VolPath,
        start: &[u8],
        max_chunks: usize,
    ) -> impl Iterator<Item = Result<(Vec<u8>, Option<Vec<ChunkRef>>), StoreError>> + '_ {
        let longest = max_chunks
            .saturating_mul(codec::CHUNK_REF_LEN)
            .saturating_add(4);
        self.children_in(CF_CHUNK_LISTS, vol, dir, start, move |value| {
            match value.len() <= longest {
                true => codec::decode_chunk_list(value).map(Some),
                false => Ok(None),
            }
        })
    }

    /// The names `>= start` of `dir`'s children that the index holds as existing (not
    /// tombstones), in name order.
    pub fn live_names(
        &self,
        vol: VolumeId,
        dir: &VolPath,
        start: &[u8],
    ) -> impl Iterator<Item = Result<Vec<u8>, StoreError>> + '_ {
        self.children_in(CF_ENTRIES, vol, dir, start, codec::decode_is_live)
            .filter_map(|item| match item {
                Ok((name, true)) => Some(Ok(name)),
                Ok((_, false)) => None,
                Err(e) => Some(Err(e)),
            })
    }

    /// The scan stamps of `dir`'s children whose names are `>= start`, in name order:
    /// the names that exist (are not tombstones) in the index and that a scan or sync
    /// saw on disk.
    pub fn stamps(
        &self,
        vol: VolumeId,
        dir: &VolPath,
        start: &[u8],
    ) -> impl Iterator<Item = Result<(Vec<u8>, ScanStamp), StoreError>> + '_ {
        self.children_in(CF_SCAN_CACHE, vol, dir, start, codec::decode_stamp)
    }

    /// The records of `cf` (keyed by entry key) for the children of `dir` whose names are
    /// `>= start`, in name order, as (name, decoded value).
    fn children_in<T: 'static>(
        &self,
        cf: &'static str,
        vol: VolumeId,
        dir: &VolPath,
        start: &[u8],
        decode: impl Fn(&[u8]) -> Result<T, DecodeError> + 'static,
    ) -> impl Iterator<Item = Result<(Vec<u8>, T), StoreError>> + '_ {
        let (prefix, end) = children_range(vol, dir);
        let name_at = prefix.len();
        let from = [prefix.as_slice(), start].concat();
        self.range(cf, from, end).map(move |item| {
            let (key, value) = item?;
            let value = decode(&value).map_err(|e| StoreError::corrupt(cf, &key, e))?;
            Ok((key[name_at..].to_vec(), value))
        })
    }

    /// Every entry strictly below `dir` (all of the volume for the root), tombstones
    /// included, as (parent directory, name, entry).
    pub fn descendants(
        &self,
        vol: VolumeId,
        dir: &VolPath,
    ) -> impl Iterator<Item = Result<(VolPath, Vec<u8>, Entry), StoreError>> + '_ {
        descendant_ranges(vol, dir)
            .into_iter()
            .flat_map(move |(start, end)| {
                self.range(CF_ENTRIES, start, end).map(|item| {
                    let (key, value) = item?;
                    let (_, parent, name) = parse_entry_key(&key)
                        .map_err(|e| StoreError::corrupt(CF_ENTRIES, &key, e))?;
                    let entry = codec::decode_entry(&value)
                        .map_err(|e| StoreError::corrupt(CF_ENTRIES, &key, e))?;
                    Ok((parent, name.to_vec(), entry))
                })
            })
    }

    // ---- Merkle tree ----

    pub fn tree_node(&self, vol: VolumeId, dir: &VolPath) -> Result<Option<TreeNode>, StoreError> {
        self.get_decoded(CF_TREE, &dir_key(vol, dir), codec::decode_tree_node)
    }

    /// The tree nodes of `vol`'s directories from `from` on (itself included, if it is
    /// one), in key order: the order in which heartbeat slices visit a volume.
    pub fn tree_nodes_from(
        &self,
        vol: VolumeId,
        from: &VolPath,
    ) -> impl Iterator<Item = Result<(VolPath, TreeNode), StoreError>> + '_ {
        let (_, end) = volume_range(vol);
        self.range(CF_TREE, dir_key(vol, from), end).map(|item| {
            let (key, value) = item?;
            let (_, dir) =
                parse_dir_key(&key).map_err(|e| StoreError::corrupt(CF_TREE, &key, e))?;
            let node = codec::decode_tree_node(&value)
                .map_err(|e| StoreError::corrupt(CF_TREE, &key, e))?;
            Ok((dir, node))
        })
    }

    /// Marks every directory with a tree node dirty, once, in a store whose nodes were
    /// computed by rules before [`TREE_RULES`]: the next tree update recomputes them
    /// all. Otherwise a node kept a hash that the current rules no longer give (a
    /// parent of an empty directory without a node), which a peer computing afresh
    /// would differ from on every round, with nothing to take.
    fn mark_tree_of_older_rules(&self) -> Result<(), StoreError> {
        let rules = self.meta_u32(META_TREE_RULES)?.unwrap_or(1);
        if rules >= TREE_RULES {
            return Ok(());
        }
        let mut batch = self.batch();
        for item in self.iterate(CF_TREE, &[], ReadOptions::default()) {
            let (key, _) = item?;
            batch.put(CF_DIRTY, &key, b"");
            if batch.len() >= TREE_MARKS_PER_WRITE {
                self.write(
                    std::mem::replace(&mut batch, self.batch()),
                    Durability::Buffered,
                )?;
            }
        }
        batch.put(CF_META, META_TREE_RULES, &TREE_RULES.to_le_bytes());
        self.write(batch, Durability::Durable)
    }

    /// Directories whose tree node is out of date.
    pub fn dirty_dirs(&self, vol: VolumeId) -> Result<Vec<VolPath>, StoreError> {
        let (start, end) = volume_range(vol);
        self.range(CF_DIRTY, start, end)
            .map(|item| {
                let (key, _) = item?;
                parse_dir_key(&key)
                    .map(|(_, dir)| dir)
                    .map_err(|e| StoreError::corrupt(CF_DIRTY, &key, e))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_volume_record_is_stored_as_json_with_a_plain_numeric_id() {
        let record = VolumeRecord {
            id: VolumeId(3),
            last_scan_unix: Some(5),
            unique_chunks: None,
        };
        let json = serde_json::to_string(&record).unwrap();
        assert_eq!(json, r#"{"id":3,"last_scan_unix":5,"unique_chunks":null}"#);
        assert_eq!(serde_json::from_str::<VolumeRecord>(&json).unwrap(), record);
    }

    /// The records found as the daemon started are forgotten after the scan at start; a
    /// record a pull wrote meanwhile (a batch about to be renamed into place) stays.
    #[test]
    fn only_the_publishing_records_found_at_start_are_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_for_test(dir.path());
        let (vol, folder) = (VolumeId(1), VolPath::parse(b"d").unwrap());
        let entry = Entry {
            kind: crate::entry::EntryKind::Dir,
            mode: 0o755,
            mtime_ns: 1,
            uid: 0,
            gid: 0,
            xattrs: Default::default(),
            link: None,
            version: crate::entry::VersionVector::from_pairs([(NodeId(1), 1)]),
        };
        let mut batch = store.batch();
        batch.put_publishing(vol, &folder, b"crashed", &entry);
        batch.put_publishing(VolumeId(2), &folder, b"other volume", &entry);
        store.write(batch, Durability::Durable).unwrap();

        let left = store.publishing_records(vol).unwrap();
        assert_eq!(left.len(), 1);
        let mut batch = store.batch();
        batch.put_publishing(vol, &folder, b"being published", &entry);
        store.write(batch, Durability::Durable).unwrap();
        store.forget_publishing(left).unwrap();

        assert_eq!(store.publishing(vol, &folder, b"crashed").unwrap(), None);
        assert_eq!(
            store.publishing(vol, &folder, b"being published").unwrap(),
            Some(entry.clone())
        );
        assert_eq!(
            store
                .publishing(VolumeId(2), &folder, b"other volume")
                .unwrap(),
            Some(entry)
        );
    }

    #[test]
    fn a_tree_computed_by_older_rules_is_marked_for_recomputing_once() {
        let dir = tempfile::tempdir().unwrap();
        let vol = VolumeId(1);
        let folders = [VolPath::root(), VolPath::parse(b"d").unwrap()];
        {
            let store = Store::open_for_test(dir.path());
            assert!(store.dirty_dirs(vol).unwrap().is_empty());
            let node = crate::tree::build_node(std::iter::empty(), |_| Ok(None)).unwrap();
            let mut batch = store.batch();
            for folder in &folders {
                batch.put_tree_node(vol, folder, &node);
            }
            // As a store of the first rules has it: no record of them.
            batch.delete(CF_META, META_TREE_RULES);
            store.write(batch, Durability::Durable).unwrap();
        }
        let store = Store::open_for_test(dir.path());
        assert_eq!(store.dirty_dirs(vol).unwrap(), folders);
        crate::tree::update(&store, vol).unwrap();
        assert!(store.dirty_dirs(vol).unwrap().is_empty());
        drop(store);
        let store = Store::open_for_test(dir.path());
        assert!(store.dirty_dirs(vol).unwrap().is_empty());
    }
}
