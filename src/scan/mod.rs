//! The scanner: brings a volume's index up to date with its directory.
//!
//! A scan walks the volume one directory at a time and merges each directory's listing
//! with the index's children of that directory (both sorted by name), so memory is
//! bounded by the largest directory, not by the volume. A name whose `lstat` matches its
//! scan stamp (size, mtime, ctime, inode, device) is trusted without reading it; changed
//! and new files go to a pool of hashing threads (one per core) that chunk them with
//! FastCDC and hash the chunks with BLAKE3. A file whose `fstat` differs after reading
//! from before was written to during the read: it is read again, and left for the next
//! scan if it keeps changing. Names gone from the directory become tombstones.
//!
//! Every change is written as a [`Batch`](crate::store::Batch) that keeps the index consistent on its own, so
//! a scan killed at any point leaves a store that the next scan completes. A full walk
//! hands its batches to a writer thread ([`writer`]), in order, and goes on walking. The Merkle
//! tree is updated at the end from the dirty marks the batches left ([`crate::tree`]).
//!
//! A scan can be narrowed ([`ScanScope::Dirs`]) to the directories the file watcher saw
//! change, and told to leave alone names still being written ([`ScanOptions::hold`]).
//! While the watcher is healthy, the daemon's heartbeat rescans a volume a slice of
//! directories at a time ([`slices`]).

mod hash;
mod links;
mod rules;
pub mod slices;
mod walk;
mod writer;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use indicatif::ProgressBar;

use crate::entry::EntryKind;
use crate::ids::{TreeHash, VolumeId};
use crate::pathname::VolPath;
use crate::store::{Durability, Store, StoreError};
use crate::tree::SubtreeTotals;
use crate::workers::Pool;
use hash::hasher;
use walk::Walker;

/// The per-directory ignore file (gitignore syntax).
pub const IGNORE_FILE: &str = ".shoalignore";

/// Batches are written once they hold this many operations.
const BATCH_OPS: usize = 4096;

/// Hashing jobs (and results) queued between the walker and the hashing threads.
const QUEUE_DEPTH: usize = 64;

/// A busy file rewritten in place is copied at most this often: each copy is read,
/// hashed and kept in a busy pack whole.
pub const SNAPSHOT_INTERVAL: Duration = Duration::from_secs(3);

/// The ctime of the scan stamp of a file indexed from what was appended to it (the
/// chunks before trusted, not read): no file has it, so the stamp never matches and
/// the file is read whole once it settles.
pub const UNVERIFIED_CTIME: i64 = i64::MIN;

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("volume directory {0} does not exist (is the volume mounted under the data root?)")]
    VolumeMissing(PathBuf),
    #[error("{0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("cannot read the volume directory {path}: {source}")]
    RootUnreadable { path: PathBuf, source: io::Error },
    #[error(
        "volume {volume:?} was indexed with another store layout; its index is damaged: {source}"
    )]
    Store {
        volume: String,
        #[source]
        source: StoreError,
    },
}

/// How to run a scan.
#[derive(Clone, Default)]
pub struct ScanOptions {
    /// Hashing threads; 0 means one per core.
    pub threads: usize,
    /// Shows bytes hashed and files seen, when set.
    pub progress: Option<ProgressBar>,
    pub scope: ScanScope,
    /// Names still being written: left exactly as indexed (not read, not deleted), for a
    /// later scan once they are quiet.
    pub hold: HashSet<VolPath>,
    /// Names scanned while they still change (the watcher's busy names): read from
    /// their last indexed chunk if they only grew, else copied whole if small enough
    /// (see `hash.rs`).
    pub busy: HashSet<VolPath>,
    /// Renames the watcher saw, `(from, to)`: a file that appears under `to` with the
    /// size, mtime, inode and device indexed for its old path under `from` takes that
    /// path's chunk list instead of being read again (a moved directory of media is
    /// not re-hashed). The old path must still be indexed: the scan covers both.
    pub renamed: Vec<(VolPath, VolPath)>,
    /// Names the last scan found gone and left to this one, looked up one by one in
    /// the directories scanned at [`Depth::Left`].
    pub left: HashSet<VolPath>,
    /// The volume directory that `serve` has watched since it started, for the scans it
    /// makes while running: finding that very directory (same device and inode) empty
    /// means its names were deleted while the node watched, and they become tombstones
    /// like any delete. Without it (the scan at start, `shoal scan`), or when the
    /// directory is another one now (a new or unmounted disk), an empty volume is taken
    /// for a fresh one (store.md "Empty volumes").
    pub watched_root: Option<crate::volume_fs::DirId>,
    /// Leave the index's hard-link groups as they are: a pull is between publishing a
    /// hard-linked file and linking its other names, so the groups on disk are not yet
    /// what the index (the peer's) says they will be.
    pub keep_link_groups: bool,
    /// The delete guard's threshold, and whether the operator released its holds
    /// ([`crate::guard`]).
    pub guard: crate::guard::ScanGuard,
    /// Names of one directory listed at once; 0 means the default, 32,768 (tests make
    /// it small, to cross the windows of a directory that a scan lists in parts).
    pub list_window: usize,
    /// Publish what a full walk has indexed so far while it goes on ([`Checkpoints`]).
    pub checkpoints: Option<Checkpoints>,
}

/// How often a full walk brings the Merkle tree up to date with what it has indexed
/// so far, and what it calls then: a node in its first scan of a large volume serves
/// its peers the part already read instead of nothing until the end (peers take a
/// smaller tree for a node that has fewer names, never for deletes). A checkpoint costs
/// a tree update of the directories written since the last one. The first comes
/// `first` after the walk starts, so that a peer waits little for a volume that takes
/// a second or two to read; each next one twice as long after the last, up to `every`,
/// or ten times the last one's cost if that is longer. A walk that met hard-linked
/// files makes none (their groups are recorded whole at its end).
#[derive(Clone)]
pub struct Checkpoints {
    pub first: Duration,
    pub every: Duration,
    /// Called on the walking thread after each checkpoint that changed the tree (to
    /// announce it to peers).
    pub published: std::sync::Arc<dyn Fn() + Send + Sync>,
}

/// Which directories a scan lists.
#[derive(Clone, Debug, Default)]
pub enum ScanScope {
    /// The whole volume.
    #[default]
    Everything,
    /// Only these directories. A subdirectory is entered only when the index does not
    /// know it as a directory, so a directory created or moved in is scanned whole.
    Dirs(BTreeMap<VolPath, Depth>),
}

/// How much of a directory in [`ScanScope::Dirs`] to scan.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Depth {
    /// Only its names in [`ScanOptions::left`], each looked up by `lstat`: the deletes
    /// the last scan left to this one (`crate::guard::ScanGuard::defer`), which listed
    /// the directory already. If one of them is there again, the directory is listed.
    Left,
    /// Its own names.
    Names,
    /// Everything below it (its ignore rules changed, say).
    Subtree,
}

/// How many changed names a scan report lists (the log's "local changes" line).
pub const NAMES_IN_REPORT: usize = 5;

/// What a scan found and did.
/// Conflict copies a scan names in its report (it counts them all).
pub const CONFLICT_PATHS_KEPT: usize = 20;

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ScanReport {
    pub volume: String,
    pub root: String,
    pub totals: SubtreeTotals,
    pub unique_chunks: u64,
    /// Names that are new, changed or gone since the previous scan.
    pub added: u64,
    pub modified: u64,
    pub deleted: u64,
    /// The first [`NAMES_IN_REPORT`] of those names, for the log.
    pub changed_names: Vec<String>,
    /// Files opened and read (unchanged files are not read).
    pub files_read: u64,
    pub bytes_read: u64,
    /// Device nodes, which never sync (sockets are skipped without counting).
    pub skipped_special: u64,
    /// Conflict copies listed (names holding [`crate::sync::conflict::MARKER`]): a
    /// whole-volume scan counts every one the volume holds, the same on every node once
    /// they agree.
    pub conflict_copies: u64,
    /// The first [`CONFLICT_PATHS_KEPT`] of them, in walk order (`/status` describes them).
    #[serde(skip)]
    pub conflict_paths: Vec<VolPath>,
    /// Names whose delete the guard held back from peers in this scan (a held directory
    /// counts with the names below it), and the first [`NAMES_IN_REPORT`] of them.
    pub deletes_held: u64,
    pub deletes_held_sample: Vec<String>,
    /// Held names this scan found on disk again (restored): their holds are gone.
    pub deletes_restored: u64,
    /// Deletes left for the next scan ([`crate::guard::ScanGuard::defer`]): one deleted
    /// name per directory that had some, for the watcher to scan again.
    #[serde(skip)]
    pub deletes_deferred: Vec<VolPath>,
    /// Names that could not be read; their previous index entries were kept.
    pub problems: Vec<String>,
    /// Names that cannot be synced at all (a path longer than Linux allows): not
    /// indexed, and said here rather than as problems, so the daemon logs each once.
    pub unsyncable: crate::unsyncable::Noted,
    pub seconds: f64,
}

impl ScanReport {
    /// Chunk references per distinct chunk (1.0 means no duplicate content).
    pub fn dedup_ratio(&self) -> f64 {
        if self.unique_chunks == 0 {
            1.0
        } else {
            self.totals.chunks as f64 / self.unique_chunks as f64
        }
    }
}

/// Scans volume `name`, whose files are in `root`, into `store`.
pub fn scan_volume(
    store: &Store,
    name: &str,
    root: &Path,
    options: &ScanOptions,
) -> Result<ScanReport, ScanError> {
    let started = Instant::now();
    let store_err = |source| ScanError::Store {
        volume: name.to_string(),
        source,
    };
    // The volume directory itself may be a symlink (a bind mount, a moved disk); names
    // inside it are never followed.
    match fs::metadata(root) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => return Err(ScanError::NotADirectory(root.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(ScanError::VolumeMissing(root.to_path_buf()));
        }
        Err(source) => {
            return Err(ScanError::RootUnreadable {
                path: root.to_path_buf(),
                source,
            });
        }
    }
    let root_fd = rustix::fs::open(
        root,
        rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| ScanError::RootUnreadable {
        path: root.to_path_buf(),
        source: e.into(),
    })?;
    let emptied_while_watched = options.watched_root.is_some()
        && crate::volume_fs::DirId::of(&root_fd).ok() == options.watched_root;
    let record = store.ensure_volume(name).map_err(store_err)?;
    let vol = record.id;
    let threads = if options.threads > 0 {
        options.threads
    } else {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    };
    let params = store.meta().chunk_params;
    let namespaces = crate::xattrs::Namespaces::for_this_process();
    let full = matches!(options.scope, ScanScope::Everything);
    let find_groups = full && !options.keep_link_groups;
    let budget = hash::SnapshotBudget::new();
    let guard_held = crate::guard::held_paths(store, vol)
        .map_err(store_err)?
        .into_iter()
        .collect();
    let (mut report, links_changed) = std::thread::scope(|scope| -> Result<_, StoreError> {
        let mut walker = Walker {
            store,
            vol,
            node: store.meta().node_id,
            root: root.to_path_buf(),
            root_fd,
            emptied_while_watched,
            guard: options.guard,
            guard_held,
            batch: store.batch(),
            writer: (full && options.renamed.is_empty())
                .then(|| writer::Writer::start(scope, store)),
            hashers: Pool::start(scope, threads, QUEUE_DEPTH, || {
                hasher(params, namespaces, budget.clone())
            }),
            pending: Vec::new(),
            list_window: match options.list_window {
                0 => walk::LIST_WINDOW,
                names => names,
            },
            checkpoints: options
                .checkpoints
                .as_ref()
                .filter(|_| full)
                .map(walk::Due::new),
            wrote_since_checkpoint: false,
            to_hash: Vec::new(),
            progress: options.progress.clone(),
            hold: &options.hold,
            busy: &options.busy,
            left: left_by_dir(&options.left),
            renamed: options
                .renamed
                .iter()
                .map(|(from, to)| (to.clone(), from.clone()))
                .collect(),
            gone: Vec::new(),
            namespaces,
            linked: find_groups.then(Default::default),
            links_changed: false,
            linked_names: 0,
            dirs_unseen: false,
            changed_linked: Default::default(),
            unsettled: Default::default(),
            report: ScanReport {
                volume: name.to_string(),
                ..ScanReport::default()
            },
        };
        walker.run(&options.scope)?;
        Ok((walker.report, walker.links_changed))
    })
    .map_err(store_err)?;
    if !full && links_changed && !options.keep_link_groups {
        // A hard-linked file changed: its other names (anywhere in the volume) changed
        // with it, and only a walk of every name finds its group.
        let whole = ScanOptions {
            scope: ScanScope::Everything,
            ..options.clone()
        };
        let mut rest = scan_volume(store, name, root, &whole)?;
        rest.added += report.added;
        rest.modified += report.modified;
        rest.deleted += report.deleted;
        let room = NAMES_IN_REPORT.saturating_sub(report.changed_names.len());
        rest.changed_names.truncate(room);
        rest.changed_names.splice(0..0, report.changed_names);
        rest.deletes_held += report.deletes_held;
        rest.deletes_held_sample
            .splice(0..0, report.deletes_held_sample);
        rest.deletes_held_sample.truncate(NAMES_IN_REPORT);
        rest.deletes_restored += report.deletes_restored;
        rest.deletes_deferred.splice(0..0, report.deletes_deferred);
        rest.files_read += report.files_read;
        rest.bytes_read += report.bytes_read;
        rest.problems.splice(0..0, report.problems);
        for name in report.unsyncable.names() {
            rest.unsyncable.note(name.path, name.cause, name.reason);
        }
        rest.seconds = started.elapsed().as_secs_f64();
        return Ok(rest);
    }

    let root_node = crate::tree::update(store, vol).map_err(store_err)?;
    // Copies of busy files that have settled since are no longer needed.
    store.rotate_busy_packs().map_err(store_err)?;
    let changed = report.added + report.modified + report.deleted > 0;
    // Counting distinct chunks reads every chunk location: a full scan pays for it, a
    // narrow one (the watcher's, many times a minute) leaves the count to the next.
    let unique_chunks = match (&options.scope, record.unique_chunks) {
        (_, Some(count)) if !changed => Some(count),
        (ScanScope::Everything, _) => Some(store.count_unique_chunks(vol).map_err(store_err)?),
        (ScanScope::Dirs(_), _) => None,
    };
    let mut batch = store.batch();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    batch.put_volume(
        name,
        &crate::store::VolumeRecord {
            id: record.id,
            last_scan_unix: Some(now.as_secs() as i64),
            unique_chunks,
        },
    );
    store.write(batch, Durability::Durable).map_err(store_err)?;
    report.root = root_node.hash.to_hex();
    report.totals = root_node.totals;
    report.unique_chunks = unique_chunks.unwrap_or_default();
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Forgets the tombstones of `vol` deleted before `cutoff_ns` (ns since the epoch):
/// after the retention period a delete is taken to have reached every node. A node
/// offline for longer can bring such a file back; the period is configurable for that.
pub fn expire_tombstones(store: &Store, vol: VolumeId, cutoff_ns: i64) -> Result<u64, StoreError> {
    let mut batch = store.batch();
    let mut expired = 0;
    for item in store.descendants(vol, &VolPath::root()) {
        let (dir, name, entry) = item?;
        if matches!(entry.kind, EntryKind::Tombstone { deleted_at_ns } if deleted_at_ns < cutoff_ns)
        {
            batch.delete_entry(vol, &dir, &name);
            batch.delete_issued(vol, &dir, &name);
            batch.mark_dirty(vol, &dir);
            expired += 1;
            if batch.len() >= BATCH_OPS {
                store.write(
                    std::mem::replace(&mut batch, store.batch()),
                    Durability::Buffered,
                )?;
            }
        }
    }
    store.write(batch, Durability::Durable)?;
    if expired > 0 {
        crate::tree::update(store, vol)?;
    }
    Ok(expired)
}

/// The root hash of a volume as last scanned, if it was ever scanned.
pub fn volume_root(store: &Store, vol: VolumeId) -> Result<Option<TreeHash>, StoreError> {
    Ok(store
        .tree_node(vol, &VolPath::root())?
        .map(|node| node.hash))
}

/// The names of [`ScanOptions::left`] by directory.
fn left_by_dir(left: &HashSet<VolPath>) -> HashMap<VolPath, Vec<Vec<u8>>> {
    let mut by_dir: HashMap<VolPath, Vec<Vec<u8>>> = HashMap::new();
    for path in left {
        if let Some((dir, name)) = path.split_last() {
            by_dir.entry(dir).or_default().push(name.to_vec());
        }
    }
    by_dir
}

/// Nanoseconds since the epoch, now, by this node's clock.
pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}
