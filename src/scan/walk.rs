//! The walk: each directory's listing merged with the index's children of it, one window
//! of names at a time, so that a directory of any size costs the same memory.

use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::ffi::OsStr;
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ignore::gitignore::{Gitignore, GitignoreBuilder};
use indicatif::ProgressBar;
use rustix::fs::FileType;

use super::hash::{HashJob, HashOutcome, HashResult, Reading, SNAPSHOT_MAX_BYTES};
use super::rules::IgnoreRules;
use super::{
    BATCH_OPS, Depth, IGNORE_FILE, SNAPSHOT_INTERVAL, ScanReport, ScanScope, UNVERIFIED_CTIME,
    now_ns,
};
use crate::chunking::{ChunkRef, ChunkedContent};
use crate::entry::{Entry, EntryKind, VersionVector};
use crate::ids::{NodeId, VolumeId};
use crate::pathname::{MAX_PATH_LEN, SHOAL_DIR, VolPath, escape};
use crate::store::codec::ScanStamp;
use crate::store::{Batch, Durability, Store, StoreError};
use crate::volume_fs::{FileStat, lstat_at, open_dir_at, open_regular};
use crate::workers::Pool;
use crate::xattrs::{Namespaces, XattrError, Xattrs};

/// Largest `.shoalignore` read; the rest of a longer one is ignored (and reported).
const MAX_IGNORE_FILE: u64 = 1 << 20;

/// One child of a directory as listed on disk.
pub(super) struct Listed {
    pub(super) name: Vec<u8>,
    pub(super) meta: FileStat,
}

/// Names of a directory listed at once: a scan holds one window of a directory's names
/// (about 70 bytes each; each name is stated only when the merge comes to it), however
/// large the directory (invariant 6: 100,000 names in one directory, each held with its
/// `lstat` and the index's names beside them, took some 50 MiB); a directory of more
/// names is read once per window.
pub(super) const LIST_WINDOW: usize = 32_768;

/// Files a walk gathers before handing them to the hashing threads, largest first.
const HASH_GATHER: usize = 1024;

/// A directory being listed window by window ([`Walker::next_window`]).
struct Listing {
    reader: rustix::fs::Dir,
    /// The last name of the window before; the next window's names come after it.
    after: Option<Vec<u8>>,
    /// The last window has been read.
    done: bool,
}

/// One window of a directory's listing.
struct Window {
    /// Its names on disk, in name order, not stated yet.
    names: Vec<Vec<u8>>,
    /// Its names come after this one (`None`: from the first name on).
    after: Option<Vec<u8>>,
    /// Its last name, when more names follow in the next window (`None`: it is the last
    /// window, and goes to the end of the directory).
    upto: Option<Vec<u8>>,
}

/// A directory being walked: its descriptor (every name in it is reached through it)
/// and the ignore rules for its names.
pub(super) struct OpenDir {
    fd: Arc<OwnedFd>,
    rules: Arc<IgnoreRules>,
}

pub(super) struct Walker<'s> {
    pub(super) store: &'s Store,
    pub(super) vol: VolumeId,
    pub(super) node: NodeId,
    /// The volume directory: shown in messages, and matched by the ignore rules.
    pub(super) root: PathBuf,
    /// The volume directory, opened once: every directory is opened from it one
    /// component at a time without following symlinks, so a directory swapped for a
    /// symlink mid-scan cannot bring outside files into the index.
    pub(super) root_fd: OwnedFd,
    /// The root is the directory `serve` has watched since its start: finding it empty
    /// is a deletion of its names, not a fresh volume.
    pub(super) emptied_while_watched: bool,
    /// The delete guard's threshold for this scan ([`crate::guard`]).
    pub(super) guard: crate::guard::ScanGuard,
    /// The names whose deletes the guard holds: left live in the index while gone.
    pub(super) guard_held: HashSet<VolPath>,
    pub(super) batch: Batch<'s>,
    /// Writes the batches of a full walk while it goes on; `None` in a narrow scan, and
    /// once the walk is done (what follows reads what it wrote).
    pub(super) writer: Option<super::writer::Writer<'s>>,
    /// Taken (closing the queue) once the walk is done.
    /// The hashing threads.
    pub(super) hashers: Pool<HashJob, HashResult>,
    /// Directories still to walk.
    pub(super) pending: Vec<PendingDir>,
    /// Names of a directory listed at once ([`LIST_WINDOW`] unless a test says).
    pub(super) list_window: usize,
    /// When to publish what the walk has indexed so far (a full walk that was asked to).
    pub(super) checkpoints: Option<Due<'s>>,
    /// A batch was written since the last checkpoint.
    pub(super) wrote_since_checkpoint: bool,
    /// Files of the directory being walked that need reading, with their sizes.
    pub(super) to_hash: Vec<(u64, HashJob)>,
    pub(super) progress: Option<ProgressBar>,
    pub(super) hold: &'s HashSet<VolPath>,
    /// Names the watcher saw still changing: read as busy files ([`Walker::busy_read`]).
    pub(super) busy: &'s HashSet<VolPath>,
    /// Names the last scan left to this one, by directory ([`Depth::Left`]).
    pub(super) left: HashMap<VolPath, Vec<Vec<u8>>>,
    /// The watcher's renames, new path -> old path.
    pub(super) renamed: HashMap<VolPath, VolPath>,
    /// Indexed names found gone from disk, deleted once everything else is written.
    pub(super) gone: Vec<(VolPath, Vec<u8>)>,
    /// Which extended attributes this node indexes.
    pub(super) namespaces: Namespaces,
    /// Hard links: every listed file with other names, by (device, inode), in a full
    /// scan (which sees every name of a group).
    pub(super) linked: Option<HashMap<(u64, u64), super::links::Group>>,
    /// This walk left a directory unlisted (held, or unreadable): a group with fewer
    /// names seen than its link count may have its other names there.
    pub(super) dirs_unseen: bool,
    /// A narrow scan met a change to a hard-linked file (its other names, elsewhere,
    /// changed too, and its group may have): the caller scans the whole volume.
    pub(super) links_changed: bool,
    /// Names kept in `linked` so far.
    pub(super) linked_names: usize,
    /// Hard-linked files read by this full walk, recorded with their whole group at its
    /// end.
    pub(super) changed_linked: HashMap<VolPath, super::links::Changed>,
    /// Names held or unreadable in this walk: their groups are left as indexed.
    pub(super) unsettled: HashSet<VolPath>,
    pub(super) report: ScanReport,
}

/// How a busy file is to be read (see [`HashJob`]'s fields of the same names).
#[derive(Default)]
struct BusyRead {
    appended_to: Option<Vec<ChunkRef>>,
    may_snapshot: bool,
}

/// The names a tree node's totals count below it (files, directories, symlinks).
fn names_in(totals: &crate::tree::SubtreeTotals) -> u64 {
    totals
        .files
        .saturating_add(totals.dirs)
        .saturating_add(totals.symlinks)
}

/// A name the index holds as existing in a directory, with its scan stamp if it has one.
type IndexedName = (Vec<u8>, Option<ScanStamp>);

/// The names `store` holds as existing in `dir` from `start` on (all of them for
/// `None`), in name order, each with its scan stamp if it has one; read as the walk goes,
/// not gathered. A live entry without a stamp is one the index took without this
/// node's scan seeing it on disk (a conflict copy a pull moved aside, say): listed, it
/// is read like a new name; gone from disk, it is a delete like any other. Without this
/// a name gone from disk before a scan stamped it would stay live in the index for good,
/// unchecked, while the disk lacks it.
fn indexed_names<'s>(
    store: &'s Store,
    vol: VolumeId,
    dir: &VolPath,
    start: Option<&[u8]>,
) -> impl Iterator<Item = Result<IndexedName, StoreError>> + 's {
    let start = start.unwrap_or_default();
    let mut stamps = store.stamps(vol, dir, start).peekable();
    let mut live = store.live_names(vol, dir, start).peekable();
    std::iter::from_fn(move || {
        if let Some(Err(e)) = stamps.next_if(Result::is_err) {
            return Some(Err(e));
        }
        if let Some(Err(e)) = live.next_if(Result::is_err) {
            return Some(Err(e));
        }
        let stamped = stamps.peek().and_then(|r| r.as_ref().ok()).map(|(n, _)| n);
        let live_name = live.peek().and_then(|r| r.as_ref().ok());
        let order = match (stamped, live_name) {
            (None, None) => return None,
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some(stamped), Some(live_name)) => stamped.cmp(live_name),
        };
        if order == std::cmp::Ordering::Greater {
            return live.next().map(|r| r.map(|name| (name, None)));
        }
        if order == std::cmp::Ordering::Equal {
            live.next();
        }
        stamps
            .next()
            .map(|r| r.map(|(name, stamp)| (name, Some(stamp))))
    })
}

/// `name` in the directory `opened` (`fs_dir` on disk) as the walk scans it, stated
/// through the directory's descriptor: `None` if it is not there (deleted between
/// readdir and lstat) or ignored; the name with the error if it cannot be stated.
fn stat_listed(
    opened: &OpenDir,
    fs_dir: &Path,
    name: Vec<u8>,
) -> Option<Result<Listed, (Vec<u8>, io::Error)>> {
    match lstat_at(&*opened.fd, &name) {
        Ok(meta) => {
            let path = fs_dir.join(OsStr::from_bytes(&name));
            (!opened.rules.is_ignored(&path, meta.is_dir())).then_some(Ok(Listed { name, meta }))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => Some(Err((name, e))),
    }
}

/// The next of `indexed`, without taking it; an error is taken, and returned.
fn peek_indexed<I>(indexed: &mut std::iter::Peekable<I>) -> Result<Option<&IndexedName>, StoreError>
where
    I: Iterator<Item = Result<IndexedName, StoreError>>,
{
    if let Some(Err(e)) = indexed.next_if(Result::is_err) {
        return Err(e);
    }
    Ok(indexed.peek().and_then(|r| r.as_ref().ok()))
}

/// When a walk's next checkpoint is due ([`super::Checkpoints`]).
pub(super) struct Due<'s> {
    checkpoints: &'s super::Checkpoints,
    /// From the last checkpoint to the next: `first`, doubled after each up to `every`.
    interval: Duration,
    next: Instant,
}

impl<'s> Due<'s> {
    pub(super) fn new(checkpoints: &'s super::Checkpoints) -> Self {
        let interval = checkpoints.first.min(checkpoints.every);
        Due {
            checkpoints,
            interval,
            next: Instant::now() + interval,
        }
    }

    fn is_due(&self) -> bool {
        Instant::now() >= self.next
    }

    /// A checkpoint begun at `started` is made: announced if it `changed` the tree, and
    /// the next one set.
    fn made(&mut self, started: Instant, changed: bool) {
        let cost = started.elapsed();
        self.interval = (self.interval * 2).min(self.checkpoints.every);
        self.next = started + self.interval.max(cost * 10);
        if changed {
            (self.checkpoints.published)();
        }
    }
}

/// A directory waiting to be walked, with the ignore rules of its ancestors.
pub(super) type PendingDir = (VolPath, Arc<IgnoreRules>, Depth);

impl<'s> Walker<'s> {
    pub(super) fn run(&mut self, scope: &ScanScope) -> Result<(), StoreError> {
        match scope {
            ScanScope::Everything => {
                self.pending
                    .push((VolPath::root(), IgnoreRules::none(), Depth::Subtree));
            }
            ScanScope::Dirs(dirs) => {
                let mut known_rules = HashMap::new();
                for (dir, depth) in self.start_dirs(dirs)? {
                    if let Some(rules) = self.rules_above(&dir, &mut known_rules) {
                        self.restat_start_dir(&dir, &rules)?;
                        self.pending.push((dir, rules, depth));
                    }
                }
            }
        }
        while let Some((dir, rules, depth)) = self.pending.pop() {
            self.walk_dir(&dir, &rules, depth)?;
            self.checkpoint_if_due()?;
        }
        self.hashers.close();
        while let Some(result) = self.hashers.next_result() {
            self.on_hashed(result)?;
            self.checkpoint_if_due()?;
        }
        self.checkpoints = None;
        self.settle()?;
        self.record_link_groups()?;
        // Deletes are written last, in the walk's last write (see `settle`): a peer
        // pulling between two writes of a long scan sees a moved file's new name
        // before its old one goes, and so still holds the content locally (its chunks
        // are not fetched again).
        let gone = std::mem::take(&mut self.gone);
        for (dir, name) in self.guard_deletes(gone)? {
            if let Some(old) = self
                .store
                .entry(self.vol, &dir, &name)?
                .filter(|e| !e.is_tombstone())
            {
                // The group lost a name: its leader may change.
                self.links_changed |= old.link.is_some();
                self.delete_name(&dir, &name, old)?;
                self.flush(false)?;
            }
        }
        self.flush(true)
    }

    /// Where a narrow scan starts: each directory, or its nearest ancestor that is both
    /// indexed and on disk (a directory new to the index is entered from its parent, one
    /// gone from disk is deleted by its parent), without directories that a `Subtree`
    /// start already covers.
    fn start_dirs(
        &self,
        dirs: &BTreeMap<VolPath, Depth>,
    ) -> Result<BTreeMap<VolPath, Depth>, StoreError> {
        let mut starts: BTreeMap<VolPath, Depth> = BTreeMap::new();
        for (dir, depth) in dirs {
            if dir.is_shoal_internal() {
                continue;
            }
            let mut at = dir.clone();
            let mut depth = *depth;
            while let Some((parent, name)) = at.split_last() {
                let indexed = self
                    .store
                    .entry(self.vol, &parent, name)?
                    .is_some_and(|e| e.is_dir());
                let on_disk = open_dir_at(&self.root_fd, &at, false).is_ok();
                if indexed && on_disk {
                    break;
                }
                at = parent;
                depth = Depth::Names;
            }
            let merged = starts.get(&at).map_or(depth, |d| (*d).max(depth));
            starts.insert(at, merged);
        }
        let subtrees: Vec<VolPath> = starts
            .iter()
            .filter(|(_, d)| **d == Depth::Subtree)
            .map(|(p, _)| p.clone())
            .collect();
        starts.retain(|dir, _| !subtrees.iter().any(|top| dir.is_below(top)));
        Ok(starts)
    }

    /// Brings the entry of a narrow scan's start directory (kept in its parent, which the
    /// scan does not list) up to date: the names added or removed in it moved its mtime.
    fn restat_start_dir(
        &mut self,
        dir: &VolPath,
        rules: &Arc<IgnoreRules>,
    ) -> Result<(), StoreError> {
        let Some((parent, name)) = dir.split_last() else {
            return Ok(());
        };
        let Ok(parent_fd) = open_dir_at(&self.root_fd, &parent, false) else {
            return Ok(());
        };
        let Ok(meta) = lstat_at(&parent_fd, name) else {
            return Ok(());
        };
        if !meta.is_dir() || self.is_held(&parent, name) {
            return Ok(());
        }
        let stamp = self.store.stamp(self.vol, &parent, name)?;
        let item = Listed {
            name: name.to_vec(),
            meta,
        };
        let opened = OpenDir {
            fd: Arc::new(parent_fd),
            rules: rules.clone(),
        };
        self.on_listed(&parent, item, stamp, &opened, Depth::Names)
    }

    /// The ignore rules that apply to `dir`'s names from its ancestors' `.shoalignore`
    /// files; `None` if `dir` itself is ignored. `known` keeps the rules within each
    /// ancestor read so far in this scan: a narrow scan's start directories share
    /// ancestors, whose files are then read once, not once for each start.
    fn rules_above(
        &mut self,
        dir: &VolPath,
        known: &mut HashMap<VolPath, Option<Arc<IgnoreRules>>>,
    ) -> Option<Arc<IgnoreRules>> {
        let mut rules = IgnoreRules::none();
        let mut at = VolPath::root();
        for name in dir.components() {
            rules = match known.get(&at) {
                Some(within) => within.clone()?,
                None => {
                    let within = self.rules_within(&at, rules);
                    known.insert(at.clone(), within.clone());
                    within?
                }
            };
            at = at.join(name).ok()?;
            if rules.is_ignored(&at.under(&self.root), true) {
                return None;
            }
        }
        Some(rules)
    }

    /// The rules for the names in `dir`: `above` (its ancestors'), and its own
    /// `.shoalignore` if it has one; `None` if `dir` cannot be opened.
    fn rules_within(&mut self, dir: &VolPath, above: Arc<IgnoreRules>) -> Option<Arc<IgnoreRules>> {
        let dir_fd = open_dir_at(&self.root_fd, dir, false).ok()?;
        if !lstat_at(&dir_fd, IGNORE_FILE.as_bytes()).is_ok_and(|m| m.is_file()) {
            return Some(above);
        }
        Some(Arc::new(IgnoreRules {
            own: Some(self.load_ignore_file(&dir_fd, &dir.under(&self.root))),
            parent: Some(above),
        }))
    }

    pub(super) fn flush(&mut self, force: bool) -> Result<(), StoreError> {
        if self.batch.len() >= BATCH_OPS || (force && !self.batch.is_empty()) {
            self.wrote_since_checkpoint = true;
            let full = std::mem::replace(&mut self.batch, self.store.batch());
            match &mut self.writer {
                Some(writer) => writer.write(full)?,
                None => self.store.write(full, Durability::Buffered)?,
            }
        }
        Ok(())
    }

    /// Waits until the writer has written every batch handed to it, and stops it: from
    /// here on every write is made in line. The batch being filled stays open, and the
    /// deletes join it: the reads they make (the gone names, which no write of this
    /// walk touched) need none of it, and a peer pulling meanwhile sees a move's new
    /// names and its deletes in one write (it moves its own files, instead of copying
    /// them to the new names and deleting the old a round later), unless the move
    /// outgrew a batch.
    fn settle(&mut self) -> Result<(), StoreError> {
        match self.writer.take() {
            Some(mut writer) => writer.settle(),
            None => Ok(()),
        }
    }

    pub(super) fn problem(&mut self, message: String) {
        tracing::warn!("{message}");
        self.report.problems.push(message);
    }

    /// Opens a directory to list window by window ([`Walker::next_window`]), with the
    /// ignore rules for its names. The directory is opened from the volume root without
    /// following symlinks. `None` if it cannot be read (or is no longer a directory).
    fn open_listing(
        &mut self,
        dir: &VolPath,
        parent_rules: &Arc<IgnoreRules>,
    ) -> Option<(Listing, OpenDir)> {
        let fs_dir = dir.under(&self.root);
        let listing = open_dir_at(&self.root_fd, dir, false)
            .map_err(|e| e.to_string())
            .and_then(|fd| {
                let reader = rustix::fs::Dir::read_from(&fd).map_err(|e| e.to_string())?;
                Ok((fd, reader))
            });
        let (dir_fd, reader) = match listing {
            Ok(listing) => listing,
            Err(e) => {
                self.cannot_list(&fs_dir, &e);
                return None;
            }
        };
        let rules = match lstat_at(&dir_fd, IGNORE_FILE.as_bytes()).is_ok_and(|m| m.is_file()) {
            true => Arc::new(IgnoreRules {
                own: Some(self.load_ignore_file(&dir_fd, &fs_dir)),
                parent: Some(parent_rules.clone()),
            }),
            false => parent_rules.clone(),
        };
        let listing = Listing {
            reader,
            after: None,
            done: false,
        };
        let fd = Arc::new(dir_fd);
        Some((listing, OpenDir { fd, rules }))
    }

    /// The next window of a directory's listing: its `list_window` smallest names
    /// after the last window's, sorted, without `.`, `..` and Shoal's own directory.
    /// Each window reads the whole directory again and keeps only its names, so that a
    /// directory of any size costs one window's memory (invariant 6); a directory of up
    /// to a window's names is read once, as before windows. `None` when the listing is
    /// done, or the directory can no longer be read (reported; the index entries of the
    /// names not listed yet are kept).
    fn next_window(&mut self, dir: &VolPath, listing: &mut Listing) -> Option<Window> {
        if listing.done {
            return None;
        }
        listing.reader.rewind();
        // The window's names, largest on top: a smaller name found later replaces it.
        let mut names: BinaryHeap<Vec<u8>> = BinaryHeap::new();
        let mut more = false;
        while let Some(item) = listing.reader.read() {
            let item = match item {
                Ok(item) => item,
                Err(e) => {
                    self.cannot_list(&dir.under(&self.root), &e);
                    return None;
                }
            };
            let name = item.file_name().to_bytes();
            if name == b"." || name == b".." || (dir.is_root() && name == SHOAL_DIR) {
                continue;
            }
            if listing.after.as_deref().is_some_and(|after| name <= after) {
                continue;
            }
            if names.len() < self.list_window {
                names.push(name.to_vec());
                continue;
            }
            more = true;
            if names
                .peek()
                .is_some_and(|largest| name < largest.as_slice())
            {
                names.pop();
                names.push(name.to_vec());
            }
        }
        let names = names.into_sorted_vec();
        let upto = match more {
            true => names.last().cloned(),
            false => None,
        };
        let after = std::mem::replace(&mut listing.after, upto.clone());
        listing.done = upto.is_none();
        Some(Window { names, after, upto })
    }

    /// Reports a directory (or the rest of it) that cannot be listed: its index entries
    /// are kept, and hard-link groups may have names in it unseen.
    fn cannot_list(&mut self, fs_dir: &Path, e: &dyn std::fmt::Display) {
        self.problem(format!(
            "cannot list {}: {e}; its index entries are kept",
            fs_dir.display()
        ));
        self.dirs_unseen = true;
    }

    /// The rules of the `.shoalignore` in `dir_fd` (the directory `fs_dir`), read
    /// through the descriptor as a regular file of at most `MAX_IGNORE_FILE` bytes.
    fn load_ignore_file(&mut self, dir_fd: &OwnedFd, fs_dir: &Path) -> Gitignore {
        let shown = fs_dir.join(IGNORE_FILE);
        let mut text = Vec::new();
        let read = open_regular(dir_fd, IGNORE_FILE.as_bytes())
            .and_then(|(file, _)| file.take(MAX_IGNORE_FILE).read_to_end(&mut text));
        match read {
            Ok(n) if n as u64 >= MAX_IGNORE_FILE => self.problem(format!(
                "{}: longer than {MAX_IGNORE_FILE} bytes; the rest is ignored",
                shown.display()
            )),
            Ok(_) => {}
            Err(e) => self.problem(format!("{}: {e}", shown.display())),
        }
        let mut builder = GitignoreBuilder::new(fs_dir);
        for line in String::from_utf8_lossy(&text).lines() {
            if let Err(e) = builder.add_line(Some(shown.clone()), line) {
                self.problem(format!("{}: {e}", shown.display()));
            }
        }
        builder.build().unwrap_or_else(|e| {
            self.problem(format!(
                "{}: {e}; ignoring none of its patterns",
                shown.display()
            ));
            Gitignore::empty()
        })
    }

    fn walk_dir(
        &mut self,
        dir: &VolPath,
        rules: &Arc<IgnoreRules>,
        depth: Depth,
    ) -> Result<(), StoreError> {
        if depth == Depth::Left && self.still_gone(dir) {
            return Ok(());
        }
        let Some((mut listing, opened)) = self.open_listing(dir, rules) else {
            return Ok(());
        };
        let mut first = true;
        while let Some(window) = self.next_window(dir, &mut listing) {
            let start = window.after.map(|mut after| {
                // The smallest name after it (names hold no NUL byte).
                after.push(0);
                after
            });
            let mut indexed = indexed_names(self.store, self.vol, dir, start.as_deref()).peekable();
            if first
                && dir.is_root()
                && window.upto.is_none()
                && !self.emptied_while_watched
                && self.guard_held.is_empty()
                && peek_indexed(&mut indexed)?.is_some()
                && window
                    .names
                    .iter()
                    .all(|name| !self.listable(&opened, dir, name))
            {
                // An empty volume where the index knows files is a new or unmounted disk,
                // not a request to delete everything on every node (the lsyncd failure):
                // forget the index, and let peers fill the volume again. (A volume emptied
                // under a running node's eyes is a deletion, made below like any other, and
                // so is one whose deletes the guard already holds: a restart in between
                // keeps them held, not undone.)
                tracing::warn!(
                    "volume {} is empty but its index holds {} names: treating it as a fresh volume that pulls from peers, not as a deletion",
                    self.report.volume,
                    indexed.count()
                );
                return self.forget_everything();
            }
            first = false;
            if !self.merge_window(dir, window.names, indexed, window.upto, &opened, depth)? {
                break;
            }
        }
        self.hash_gathered()
    }

    /// Whether `name` in `dir` would be scanned: it is there, and not ignored.
    fn listable(&self, opened: &OpenDir, dir: &VolPath, name: &[u8]) -> bool {
        let fs_dir = dir.under(&self.root);
        matches!(stat_listed(opened, &fs_dir, name.to_vec()), Some(Ok(_)))
    }

    /// Hands the files gathered so far to the hashing threads, largest first, so they
    /// finish together instead of one of them hashing the biggest file alone at the end.
    fn hash_gathered(&mut self) -> Result<(), StoreError> {
        let mut to_hash = std::mem::take(&mut self.to_hash);
        to_hash.sort_by_key(|(size, _)| std::cmp::Reverse(*size));
        for (_, job) in to_hash {
            self.submit(job)?;
        }
        Ok(())
    }

    /// Merges one window of a directory's listing with the index's names in the same
    /// range (up to `upto`, its last name, or to the end for the last window): a name on
    /// disk is stated when its turn comes (through the directory's descriptor) and
    /// scanned, unless ignored; one only in the index is gone. `false` if a name could
    /// not be stated: the rest of the directory is left as indexed (reported).
    fn merge_window<I>(
        &mut self,
        dir: &VolPath,
        names: Vec<Vec<u8>>,
        mut indexed: std::iter::Peekable<I>,
        upto: Option<Vec<u8>>,
        opened: &OpenDir,
        depth: Depth,
    ) -> Result<bool, StoreError>
    where
        I: Iterator<Item = Result<IndexedName, StoreError>>,
    {
        let fs_dir = dir.under(&self.root);
        let mut listed = names
            .into_iter()
            .filter_map(|name| stat_listed(opened, &fs_dir, name))
            .peekable();
        loop {
            if let Some(Err((name, e))) = listed.next_if(Result::is_err) {
                self.problem(format!(
                    "cannot stat {}: {e}; the index entries of the names from it on are kept",
                    fs_dir.join(OsStr::from_bytes(&name)).display()
                ));
                self.dirs_unseen = true;
                return Ok(false);
            }
            let next_listed = listed.peek().and_then(|l| l.as_ref().ok());
            let next_indexed = peek_indexed(&mut indexed)?
                .filter(|(name, _)| upto.as_ref().is_none_or(|upto| name <= upto));
            let order = match (next_listed, next_indexed) {
                (None, None) => break,
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (Some(l), Some(i)) => l.name.cmp(&i.0),
            };
            let stamp = match order {
                std::cmp::Ordering::Less => None,
                std::cmp::Ordering::Equal => indexed.next().expect("peeked")?.1,
                std::cmp::Ordering::Greater => {
                    let (name, _) = indexed.next().expect("peeked")?;
                    if !self.is_held(dir, &name) {
                        self.gone.push((dir.clone(), name));
                    }
                    self.flush(false)?;
                    continue;
                }
            };
            let Some(Ok(item)) = listed.next() else {
                unreachable!("peeked a listed name");
            };
            self.found_again(dir, &item.name);
            match self.is_held(dir, &item.name) {
                false => self.on_listed(dir, item, stamp, opened, depth)?,
                true => self.note_held(dir, &item),
            }
            if self.to_hash.len() >= HASH_GATHER {
                self.hash_gathered()?;
            }
            self.flush(false)?;
        }
        Ok(true)
    }

    /// Looks up the names of `dir` the last scan left ([`Depth::Left`]) without listing
    /// it again (in a delete of one file in each of 1,000 directories, the second
    /// listing was most of the scan that let the deletes go): `true` if every one of
    /// them is still gone (they are deletes again), `false` if one is there again or
    /// cannot be looked up (the directory is then listed).
    fn still_gone(&mut self, dir: &VolPath) -> bool {
        let Some(names) = self.left.remove(dir) else {
            return false;
        };
        let Ok(dir_fd) = open_dir_at(&self.root_fd, dir, false) else {
            return false;
        };
        let gone = names.iter().all(
            |name| matches!(lstat_at(&dir_fd, name), Err(e) if e.kind() == io::ErrorKind::NotFound),
        );
        if gone {
            for name in names {
                if !self.is_held(dir, &name) {
                    self.gone.push((dir.clone(), name));
                }
            }
        }
        gone
    }

    /// A name listed on disk whose delete the guard holds was restored: its hold goes,
    /// and it is scanned like any name.
    fn found_again(&mut self, dir: &VolPath, name: &[u8]) {
        if self.guard_held.is_empty() {
            return;
        }
        if let Ok(path) = dir.join(name)
            && self.guard_held.remove(&path)
        {
            self.batch.delete_held(self.vol, &path);
            self.report.deletes_restored += 1;
        }
    }

    /// Which of the names found gone are deleted now. The delete guard holds them all
    /// back from peers (a `held/` record each, no tombstone) when they, with the deletes
    /// let go within its window, are more than its share of the volume, or when it
    /// already holds others (a mass delete still under way joins its hold). Names it
    /// already holds stay held; a release lets every hold go. A watcher's scan leaves
    /// deletes it would let go to the next scan (`ScanGuard::defer`).
    fn guard_deletes(
        &mut self,
        gone: Vec<(VolPath, Vec<u8>)>,
    ) -> Result<Vec<(VolPath, Vec<u8>)>, StoreError> {
        if self.guard.release {
            for path in std::mem::take(&mut self.guard_held) {
                self.batch.delete_held(self.vol, &path);
            }
            return Ok(gone);
        }
        let mut fresh = Vec::with_capacity(gone.len());
        let mut deleting: u64 = 0;
        for (dir, name) in gone {
            let Ok(path) = dir.join(&name) else {
                continue;
            };
            if self.guard_held.contains(&path) {
                continue;
            }
            let Some(old) = self
                .store
                .entry(self.vol, &dir, &name)?
                .filter(|e| !e.is_tombstone())
            else {
                continue;
            };
            let below = match old.is_dir() {
                true => self
                    .store
                    .tree_node(self.vol, &path)?
                    .map_or(0, |n| names_in(&n.totals)),
                false => 0,
            };
            deleting = deleting.saturating_add(1 + below);
            fresh.push((dir, name, path, 1 + below));
        }
        let policy = self.guard.policy;
        let total = self
            .store
            .tree_node(self.vol, &VolPath::root())?
            .map_or(0, |n| names_in(&n.totals));
        let recent = self.guard.recent;
        // What the volume loses: a rename or move deletes as many names as it adds.
        let added = self.report.added.saturating_add(self.guard.recent_added);
        let losing = deleting.saturating_add(recent).saturating_sub(added);
        let hold = policy != crate::guard::Policy::Off
            && !fresh.is_empty()
            && (!self.guard_held.is_empty() || policy.holds(losing, total.saturating_add(recent)));
        // Names as many as it deletes added: a rename or move, whose two halves go
        // together (a peer then moves its own files instead of copying them).
        if !hold && self.guard.defer && policy != crate::guard::Policy::Off && losing > 0 {
            let mut dirs = HashSet::new();
            for (dir, _, path, _) in fresh {
                if dirs.insert(dir) {
                    self.report.deletes_deferred.push(path);
                }
            }
            return Ok(Vec::new());
        }
        if !hold {
            return Ok(fresh
                .into_iter()
                .map(|(dir, name, _, _)| (dir, name))
                .collect());
        }
        let held_at_ns = now_ns();
        for (_, _, path, names) in fresh {
            let record = crate::store::codec::Held { held_at_ns, names };
            self.batch.put_held(self.vol, &path, &record);
            self.report.deletes_held += names;
            if self.report.deletes_held_sample.len() < super::NAMES_IN_REPORT {
                self.report
                    .deletes_held_sample
                    .push(path.display().to_string());
            }
            self.guard_held.insert(path);
            self.flush(false)?;
        }
        Ok(Vec::new())
    }

    fn is_held(&self, dir: &VolPath, name: &[u8]) -> bool {
        !self.hold.is_empty() && dir.join(name).is_ok_and(|path| self.hold.contains(&path))
    }

    /// Handles a name present on disk; `stamp` is its scan stamp if it is indexed.
    fn on_listed(
        &mut self,
        dir: &VolPath,
        item: Listed,
        stamp: Option<ScanStamp>,
        opened: &OpenDir,
        depth: Depth,
    ) -> Result<(), StoreError> {
        let Ok(path) = dir.join(&item.name) else {
            // Longer than Linux's PATH_MAX: no node could open it by path either.
            let mut whole = dir.as_bytes().to_vec();
            if !dir.is_root() {
                whole.push(b'/');
            }
            whole.extend_from_slice(&item.name);
            let reason = format!(
                "the path is {} bytes, longer than the {MAX_PATH_LEN} Linux allows; not indexed",
                whole.len()
            );
            let cause = crate::unsyncable::Cause::PathTooLong;
            self.report.unsyncable.note(escape(&whole), cause, reason);
            return Ok(());
        };
        let is_dir = item.meta.is_dir();
        if crate::sync::conflict::is_conflict_copy(&item.name) {
            self.report.conflict_copies += 1;
            if self.report.conflict_paths.len() < super::CONFLICT_PATHS_KEPT {
                self.report.conflict_paths.push(path.clone());
            }
        }
        let unchanged = stamp == Some(item.meta.stamp());
        if item.meta.is_file() && item.meta.nlink() > 1 {
            self.note_linked(&path, &item.meta, unchanged);
        }
        // Below a directory new to the index everything is new: it is walked whole.
        let mut new_dir = false;
        if !unchanged {
            let old = self.store.entry(self.vol, dir, &item.name)?;
            let file_type = item.meta.file_type();
            if file_type == FileType::RegularFile {
                // A name that was hard-linked and no longer is: its group changed.
                self.links_changed |= old.as_ref().is_some_and(|o| o.link.is_some());
                self.drop_if_kind_changed(dir, &item.name, old, |k| {
                    matches!(k, EntryKind::File { .. })
                })?;
                if stamp.is_none()
                    && let Some(content) = self.content_before_rename(&path, &item.meta)?
                {
                    let read = open_regular(&*opened.fd, &item.name)
                        .map_err(|e| XattrError::Io(e.to_string()))
                        .and_then(|(file, _)| crate::xattrs::read(&file, self.namespaces));
                    let xattrs = self.xattrs_or_problem(read, &path);
                    return self.record_file(dir, &item.name, content, &item.meta, xattrs);
                }
                let BusyRead {
                    appended_to,
                    may_snapshot,
                } = match self.busy.contains(&path) {
                    true => match self.busy_read(dir, &item, stamp)? {
                        Some(busy) => busy,
                        None => {
                            // Copied a moment ago, or too large to copy: left as indexed
                            // until its next turn, or until it settles.
                            self.note_held(dir, &item);
                            return Ok(());
                        }
                    },
                    false => BusyRead::default(),
                };
                let job = HashJob {
                    dir: dir.clone(),
                    name: item.name,
                    dir_fd: opened.fd.clone(),
                    appended_to,
                    may_snapshot,
                };
                self.to_hash.push((item.meta.size(), job));
                return Ok(());
            } else if is_dir {
                new_dir = !old.as_ref().is_some_and(Entry::is_dir);
                let old = self
                    .drop_if_kind_changed(dir, &item.name, old, |k| matches!(k, EntryKind::Dir))?;
                if old.is_none() {
                    // A new directory gets its own tree node even if it stays empty.
                    self.batch.mark_dirty(self.vol, &path);
                }
                let xattrs = self.dir_xattrs(&opened.fd, &path);
                self.record(dir, &item.name, old, EntryKind::Dir, &item.meta, xattrs)?;
            } else if file_type == FileType::Symlink {
                let old = self.drop_if_kind_changed(dir, &item.name, old, |k| {
                    matches!(k, EntryKind::Symlink { .. })
                })?;
                match rustix::fs::readlinkat(&*opened.fd, OsStr::from_bytes(&item.name), Vec::new())
                {
                    Ok(target) => {
                        let kind = EntryKind::Symlink {
                            target: target.into_bytes(),
                        };
                        self.record(dir, &item.name, old, kind, &item.meta, Xattrs::default())?;
                    }
                    Err(rustix::io::Errno::NOENT) => {}
                    Err(e) => self.problem(format!("cannot read symlink {}: {e}", path.display())),
                }
            } else if file_type == FileType::Fifo {
                let old =
                    self.drop_if_kind_changed(dir, &item.name, old, |k| *k == EntryKind::Fifo)?;
                let kind = EntryKind::Fifo;
                self.record(dir, &item.name, old, kind, &item.meta, Xattrs::default())?;
            } else {
                // A socket belongs to the program listening on it, not to the data: it is
                // skipped without a word. A device node is worth a warning.
                if file_type != FileType::Socket {
                    self.report.skipped_special += 1;
                    tracing::warn!("skipping {}: devices are not synced", path.display());
                }
                if let Some(old) = old.filter(|e| !e.is_tombstone()) {
                    self.delete_name(dir, &item.name, old)?;
                }
                return Ok(());
            }
        }
        if is_dir && (depth == Depth::Subtree || new_dir) {
            self.pending
                .push((path, opened.rules.clone(), Depth::Subtree));
        }
        Ok(())
    }

    /// How to read a busy file (one the watcher saw still changing): from its last
    /// indexed chunk on if it only grew (the indexed chunk list), else copied whole into
    /// memory if it is small enough and its last copy is [`SNAPSHOT_INTERVAL`] old;
    /// `None` to leave it alone this time. A hard-linked file is read as any other.
    fn busy_read(
        &self,
        dir: &VolPath,
        item: &Listed,
        stamp: Option<ScanStamp>,
    ) -> Result<Option<BusyRead>, StoreError> {
        let meta = &item.meta;
        if meta.nlink() > 1 {
            return Ok(Some(BusyRead::default()));
        }
        let same_file = stamp.filter(|s| (s.dev, s.ino) == meta.dev_ino());
        if same_file.is_some_and(|s| meta.size() > s.size)
            && let Some(chunks) = self.store.chunk_list(self.vol, dir, &item.name)?
            && !chunks.is_empty()
        {
            // If it was rewritten rather than appended to, a copy still does.
            return Ok(Some(BusyRead {
                appended_to: Some(chunks),
                may_snapshot: meta.size() <= SNAPSHOT_MAX_BYTES,
            }));
        }
        let copied_lately = same_file.is_some_and(|s| {
            let age_ns = now_ns().saturating_sub(s.mtime_ns);
            (0..SNAPSHOT_INTERVAL.as_nanos() as i64).contains(&age_ns)
        });
        if meta.size() > SNAPSHOT_MAX_BYTES || copied_lately {
            return Ok(None);
        }
        Ok(Some(BusyRead {
            appended_to: None,
            may_snapshot: true,
        }))
    }

    /// If the indexed entry is of another kind than what is now on disk, deletes it
    /// (and its subtree); returns the entry that the new one succeeds.
    fn drop_if_kind_changed(
        &mut self,
        dir: &VolPath,
        name: &[u8],
        old: Option<Entry>,
        same_kind: impl Fn(&EntryKind) -> bool,
    ) -> Result<Option<Entry>, StoreError> {
        match old {
            Some(old) if !old.is_tombstone() && !same_kind(&old.kind) => {
                Ok(Some(self.delete_name(dir, name, old)?))
            }
            other => Ok(other),
        }
    }

    /// The synced extended attributes of the directory `path` (the child of `parent_fd`
    /// listed a moment ago); none, and a problem reported, if they cannot be read.
    fn dir_xattrs(&mut self, parent_fd: &OwnedFd, path: &VolPath) -> Xattrs {
        let name = path.split_last().map_or(&b""[..], |(_, n)| n).to_vec();
        let read = rustix::fs::openat(
            parent_fd,
            OsStr::from_bytes(&name),
            rustix::fs::OFlags::DIRECTORY
                | rustix::fs::OFlags::RDONLY
                | rustix::fs::OFlags::NOFOLLOW
                | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(|e| XattrError::Io(e.to_string()))
        .and_then(|fd| crate::xattrs::read(&fd, self.namespaces));
        self.xattrs_or_problem(read, path)
    }

    /// The attributes read, or none (and a problem said) if they could not be.
    fn xattrs_or_problem(&mut self, read: Result<Xattrs, XattrError>, path: &VolPath) -> Xattrs {
        read.unwrap_or_else(|e| {
            self.problem(format!(
                "{}: extended attributes not indexed: {e}",
                path.under(&self.root).display()
            ));
            Xattrs::default()
        })
    }

    /// Writes the entry for a directory, symlink or FIFO if it changed, and its stamp.
    fn record(
        &mut self,
        dir: &VolPath,
        name: &[u8],
        old: Option<Entry>,
        kind: EntryKind,
        meta: &FileStat,
        xattrs: Xattrs,
    ) -> Result<(), StoreError> {
        let entry = self.entry_from((dir, name), kind, meta, (xattrs, None), old.as_ref())?;
        if let Some(entry) = entry {
            self.count_change(dir, name, old.as_ref());
            self.batch.put_entry(self.vol, dir, name, &entry);
            self.batch.mark_dirty(self.vol, dir);
        }
        self.batch.put_stamp(self.vol, dir, name, &meta.stamp());
        Ok(())
    }

    /// The entry for what is on disk at `dir/name`, succeeding `old`; `None` if `old`
    /// already says it. `extra` is the entry's extended attributes and hard-link group
    /// leader.
    fn entry_from(
        &mut self,
        (dir, name): (&VolPath, &[u8]),
        kind: EntryKind,
        meta: &FileStat,
        (xattrs, link): (Xattrs, Option<VolPath>),
        old: Option<&Entry>,
    ) -> Result<Option<Entry>, StoreError> {
        let mode = if matches!(kind, EntryKind::Symlink { .. }) {
            0
        } else {
            meta.permissions()
        };
        let mut entry = Entry {
            kind,
            mode,
            mtime_ns: meta.mtime_ns(),
            uid: meta.uid(),
            gid: meta.gid(),
            xattrs,
            link,
            version: old.map(|o| o.version.clone()).unwrap_or_default(),
        };
        if old.is_some_and(|o| o.same_state(&entry)) {
            return Ok(None);
        }
        if old.is_some() {
            self.count_ours(dir, name, &mut entry.version)?;
        } else {
            entry.version.bump(self.node);
        }
        Ok(Some(entry))
    }

    /// Counts one more change of ours in `version` ([`Store::count_ours`]).
    pub(super) fn count_ours(
        &mut self,
        dir: &VolPath,
        name: &[u8],
        version: &mut VersionVector,
    ) -> Result<(), StoreError> {
        let name = (self.vol, dir, name);
        self.store
            .count_ours(&mut self.batch, name, self.node, version)
    }

    fn count_change(&mut self, dir: &VolPath, name: &[u8], old: Option<&Entry>) {
        match old {
            Some(old) if !old.is_tombstone() => self.report.modified += 1,
            _ => self.report.added += 1,
        }
        self.name_change(dir, name);
    }

    /// Keeps the first few changed names for the log.
    pub(super) fn name_change(&mut self, dir: &VolPath, name: &[u8]) {
        if self.report.changed_names.len() < super::NAMES_IN_REPORT {
            let path = dir.join(name).map(|p| p.display().to_string());
            self.report
                .changed_names
                .push(path.unwrap_or_else(|_| crate::pathname::escape(name)));
        }
    }

    /// Replaces a live entry (and, for a directory, everything below it) by tombstones.
    /// Returns the tombstone.
    fn delete_name(&mut self, dir: &VolPath, name: &[u8], old: Entry) -> Result<Entry, StoreError> {
        let path = dir.join(name).map_err(|e| StoreError::Corrupt {
            cf: crate::store::keys::CF_ENTRIES,
            key: dir.display().to_string(),
            reason: e.to_string(),
        })?;
        if old.is_dir() {
            // Descendants first, the directory's own entry last: a crash half-way
            // leaves the directory indexed, so the next scan deletes the rest. Read as
            // they are deleted, not gathered first (a tree of a million files would hold
            // all their entries at once; invariant 6): the read does not see the
            // tombstones written behind it.
            let store = self.store;
            for item in store.descendants(self.vol, &path) {
                let (parent, child, entry) = item?;
                if !entry.is_tombstone() {
                    self.tombstone(&parent, &child, entry)?;
                    self.flush(false)?;
                }
            }
        }
        self.tombstone(dir, name, old)
    }

    /// Drops every entry of the volume without tombstones (see the empty-volume guard).
    fn forget_everything(&mut self) -> Result<(), StoreError> {
        let root = VolPath::root();
        // Read as they are dropped, not gathered first: the whole volume's entries.
        let store = self.store;
        for item in store.descendants(self.vol, &root) {
            let (dir, name, entry) = item?;
            if let EntryKind::File { .. } = entry.kind {
                let chunks = self
                    .store
                    .chunk_list(self.vol, &dir, &name)?
                    .unwrap_or_default();
                self.batch.delete_chunks(self.vol, &dir, &name, &chunks);
            }
            if let (true, Ok(path)) = (entry.is_dir(), dir.join(&name)) {
                self.batch.delete_tree_node(self.vol, &path);
                self.batch.clear_dirty(self.vol, &path);
            }
            self.batch.delete_entry(self.vol, &dir, &name);
            self.batch.delete_stamp(self.vol, &dir, &name);
            self.batch.delete_issued(self.vol, &dir, &name);
            self.flush(false)?;
        }
        self.batch.mark_dirty(self.vol, &root);
        Ok(())
    }

    fn tombstone(&mut self, dir: &VolPath, name: &[u8], old: Entry) -> Result<Entry, StoreError> {
        let name_at = (self.vol, dir, name);
        let tombstone =
            self.store
                .put_delete_of_ours(&mut self.batch, name_at, &old, self.node, now_ns())?;
        self.report.deleted += 1;
        self.name_change(dir, name);
        Ok(tombstone)
    }

    fn submit(&mut self, job: HashJob) -> Result<(), StoreError> {
        match self.hashers.submit(job) {
            Some(result) => {
                self.on_hashed(result)?;
                self.checkpoint_if_due()
            }
            None => Ok(()),
        }
    }

    /// Brings the tree up to date with what the walk has written so far, and says so,
    /// when a checkpoint is due ([`super::Checkpoints`]).
    fn checkpoint_if_due(&mut self) -> Result<(), StoreError> {
        if self.linked_names > 0 {
            self.checkpoints = None;
        }
        if !self.checkpoints.as_ref().is_some_and(Due::is_due) {
            return Ok(());
        }
        let started = Instant::now();
        self.flush(true)?;
        if !std::mem::take(&mut self.wrote_since_checkpoint) {
            // Nothing new for the tree: the next write is checkpointed if still due.
            return Ok(());
        }
        if let Some(writer) = &mut self.writer {
            writer.drain()?;
        }
        let before = self.store.tree_node(self.vol, &VolPath::root())?;
        let after = crate::tree::update(self.store, self.vol)?;
        let changed = before.is_none_or(|node| node.hash != after.hash);
        if let Some(due) = &mut self.checkpoints {
            due.made(started, changed);
        }
        Ok(())
    }

    /// The content indexed for `path`'s old name, if the watcher saw it renamed and it is
    /// the same file, unchanged (ctime aside: a rename sets it).
    fn content_before_rename(
        &self,
        path: &VolPath,
        meta: &FileStat,
    ) -> Result<Option<ChunkedContent>, StoreError> {
        if self.renamed.is_empty() {
            return Ok(None);
        }
        // The path itself, or its nearest renamed ancestor: one lookup per level.
        let mut at = path.clone();
        let old_path = loop {
            if let Some(from) = self.renamed.get(&at) {
                let suffix = &path.as_bytes()[at.as_bytes().len()..];
                match VolPath::parse(&[from.as_bytes(), suffix].concat()) {
                    Ok(old) => break old,
                    Err(_) => return Ok(None),
                }
            }
            match at.parent() {
                Some(parent) if !parent.is_root() => at = parent,
                _ => return Ok(None),
            }
        };
        let Some((old_dir, old_name)) = old_path.split_last() else {
            return Ok(None);
        };
        let now = meta.stamp();
        let same_file = self
            .store
            .stamp(self.vol, &old_dir, old_name)?
            .is_some_and(|then| {
                (then.size, then.mtime_ns, then.ino, then.dev)
                    == (now.size, now.mtime_ns, now.ino, now.dev)
            });
        if !same_file {
            return Ok(None);
        }
        let Some(Entry {
            kind: EntryKind::File {
                size, content_id, ..
            },
            ..
        }) = self.store.entry(self.vol, &old_dir, old_name)?
        else {
            return Ok(None);
        };
        Ok(self
            .store
            .chunk_list(self.vol, &old_dir, old_name)?
            .map(|chunks| ChunkedContent {
                chunks,
                size,
                content_id,
            }))
    }

    /// Writes a file's entry and chunk list if its content or metadata changed, and its
    /// stamp.
    fn record_file(
        &mut self,
        dir: &VolPath,
        name: &[u8],
        content: ChunkedContent,
        meta: &FileStat,
        xattrs: Xattrs,
    ) -> Result<(), StoreError> {
        let linked_now = meta.nlink() > 1;
        let old = self.store.entry(self.vol, dir, name)?;
        let was_linked = old.as_ref().is_some_and(|o| o.link.is_some());
        if linked_now || was_linked {
            let changed = super::links::Changed {
                content,
                meta: *meta,
                xattrs,
            };
            return self.defer_linked(dir, name, changed, linked_now);
        }
        self.record_file_with(dir, name, old, content, meta, (xattrs, None))
    }

    /// Writes a file's entry (with `link`, its hard-link group) and chunk list if its
    /// content or metadata changed, and its stamp.
    pub(super) fn record_file_as(
        &mut self,
        dir: &VolPath,
        name: &[u8],
        content: ChunkedContent,
        meta: &FileStat,
        xattrs: Xattrs,
        link: Option<VolPath>,
    ) -> Result<(), StoreError> {
        let old = self.store.entry(self.vol, dir, name)?;
        self.record_file_with(dir, name, old, content, meta, (xattrs, link))
    }

    /// [`Walker::record_file_as`], with `old`, what the index holds under the name.
    fn record_file_with(
        &mut self,
        dir: &VolPath,
        name: &[u8],
        old: Option<Entry>,
        content: ChunkedContent,
        meta: &FileStat,
        (xattrs, link): (Xattrs, Option<VolPath>),
    ) -> Result<(), StoreError> {
        let kind = EntryKind::File {
            size: content.size,
            content_id: content.content_id,
            chunks: content.chunks.len() as u32,
        };
        let received = self.received(dir, name, &kind)?;
        let from_peer = received.is_some();
        let changed = match received {
            Some(entry) => Some(entry),
            None => self.entry_from((dir, name), kind, meta, (xattrs, link), old.as_ref())?,
        };
        if let Some(entry) = changed {
            let old_chunks = match old.as_ref().map(|o| &o.kind) {
                Some(EntryKind::File { .. }) => self.store.chunk_list(self.vol, dir, name)?,
                _ => None,
            };
            if !from_peer {
                self.count_change(dir, name, old.as_ref());
            }
            self.batch.put_entry(self.vol, dir, name, &entry);
            self.batch
                .set_chunks(self.vol, dir, name, &content.chunks, old_chunks.as_deref());
            self.batch.mark_dirty(self.vol, dir);
        }
        self.batch.put_stamp(self.vol, dir, name, &meta.stamp());
        Ok(())
    }

    /// The entry sync was publishing at `dir/name` when it stopped between the rename
    /// and its index write (a crash), if the file there is what it was publishing: the
    /// file is then the peer's version, not a local change. The record is consumed.
    fn received(
        &mut self,
        dir: &VolPath,
        name: &[u8],
        kind: &EntryKind,
    ) -> Result<Option<Entry>, StoreError> {
        let Some(publishing) = self.store.publishing(self.vol, dir, name)? else {
            return Ok(None);
        };
        self.batch.delete_publishing(self.vol, dir, name);
        Ok((publishing.kind == *kind).then_some(publishing))
    }

    fn on_hashed(&mut self, result: HashResult) -> Result<(), StoreError> {
        let HashResult { dir, name, outcome } = result;
        let path = || dir.join(&name).unwrap_or_default().under(&self.root);
        match outcome {
            HashOutcome::Hashed {
                content,
                meta,
                xattrs,
                read,
            } => {
                self.report.files_read += 1;
                self.report.bytes_read += content.size;
                if let Some(progress) = &self.progress {
                    progress.inc(content.size);
                    progress.set_message(format!("{} files read", self.report.files_read));
                }
                let xattrs = match dir.join(&name) {
                    Ok(path) => self.xattrs_or_problem(xattrs, &path),
                    Err(_) => Xattrs::default(),
                };
                let chunks = match &read {
                    Reading::Snapshot(_) => content.chunks.clone(),
                    Reading::Whole | Reading::Appended => Vec::new(),
                };
                self.record_file(&dir, &name, content, &meta, xattrs)?;
                match read {
                    Reading::Whole => {}
                    // The chunks before the append are trusted, not read: the stamp
                    // never matches, so the file is read whole once it settles.
                    Reading::Appended => {
                        let unverified = ScanStamp {
                            ctime_ns: UNVERIFIED_CTIME,
                            ..meta.stamp()
                        };
                        self.batch.put_stamp(self.vol, &dir, &name, &unverified);
                    }
                    // The live file holds this version no longer: its chunks are kept
                    // where peers can fetch them.
                    Reading::Snapshot(copy) => {
                        self.store
                            .keep_busy_version(&mut self.batch, &chunks, &copy.data)?;
                    }
                }
            }
            HashOutcome::Vanished => self.gone.push((dir, name)),
            HashOutcome::Unstable => {
                let message = format!(
                    "{} kept changing while being read; it will be indexed on a later scan",
                    path().display()
                );
                self.problem(message);
                self.unsettle(&dir, &name);
            }
            HashOutcome::Failed(e) => {
                let message = format!(
                    "cannot read {}: {e}; its previous index entry is kept",
                    path().display()
                );
                self.problem(message);
                self.unsettle(&dir, &name);
            }
        }
        self.flush(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_come_soon_then_less_often_up_to_every() {
        let checkpoints = crate::scan::Checkpoints {
            first: Duration::from_millis(250),
            every: Duration::from_secs(1),
            published: Arc::new(|| {}),
        };
        let mut due = Due::new(&checkpoints);
        let mut intervals = vec![due.interval];
        for _ in 0..3 {
            due.made(Instant::now(), false);
            intervals.push(due.interval);
        }
        let ms = |ms| Duration::from_millis(ms);
        assert_eq!(intervals, [ms(250), ms(500), ms(1000), ms(1000)]);
        // A checkpoint that took long puts the next one ten times its cost away.
        let started = Instant::now() - ms(300);
        due.made(started, false);
        assert!(due.next >= started + ms(3000));
    }
}
