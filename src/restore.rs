//! Kept versions as an operator sees and uses them: `shoal versions` lists what a
//! file or directory was ([`list`]), `shoal restore` puts it back as it was
//! ([`restore`]). Both run inside the daemon (through the control socket: the CLI
//! never opens the index beside it), or, when no daemon runs, on a node opened for the
//! command alone, which has no peers.
//!
//! **What was there at a time T.** A path's kept versions are ordered by when this
//! node recorded their replacement. The version at T is the first one replaced after
//! T, if an earlier one was replaced at or before T (then it was the live one since)
//! or it was modified at or before T (a file created after T was not there); a path
//! with no version replaced after T is as it was at T already. A directory is
//! restored entry by entry: what it held at T comes back; what was added since is left
//! alone (a restore deletes nothing).
//!
//! **In place**, a restore is an ordinary local change: each file is assembled in the
//! volume's staging area from the chunks this node holds (live files, packs) and those
//! it fetches from its peers (each checked against its id), given its mode, owner,
//! extended attributes and mtime, flushed, and renamed into place under the volume
//! lock; the watcher (or the next scan) indexes it and it syncs to every node, on top
//! of the versions it replaces. **`--to DIR`** writes the same files under `DIR`
//! instead (outside every volume), and nothing syncs.

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::chunking::ChunkRef;
use crate::conflicts::{KnownNodes, locate};
use crate::entry::{Entry, EntryKind};
use crate::ids::ChunkId;
use crate::pathname::{VolPath, escape};
use crate::store::versions::{VersionId, VersionRecord};
use crate::sync::transfer::{ChunkTargets, fetch_chunks, fill_from_local};
use crate::sync::{Node, Volume};

/// The most versions one listing holds; past it, `more` says how many were left out.
pub const MAX_LISTED: usize = 10_000;

/// Files assembled at once (each holds a file descriptor until it is placed).
const RESTORE_BATCH: usize = 256;

/// The versions `shoal versions` lists.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    pub versions: Vec<Listed>,
    /// Versions past [`MAX_LISTED`], not listed.
    pub more: u64,
}

/// One kept version.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub volume: String,
    /// Its path in the volume (bytes that are not UTF-8 escaped as `\xNN`).
    pub path: String,
    /// What `shoal restore --version` takes.
    pub id: String,
    /// When this node recorded that it was replaced (RFC 3339 UTC), and in ns.
    pub replaced_at: String,
    pub replaced_at_ns: u64,
    /// `replaced`, `deleted` or `conflict-loser`.
    pub why: String,
    /// The node whose change replaced it, and that node's name if known.
    pub replaced_by: String,
    pub replaced_by_name: Option<String>,
    /// `file`, `directory`, `symlink` or `fifo`.
    pub kind: String,
    pub size: u64,
    pub mode: u32,
    pub mtime: String,
    pub mtime_ns: i64,
    /// Its chunks, and how many of them this node holds (a pack or a live file).
    pub chunks: u64,
    pub chunks_here: u64,
    /// Where its content is: `here`, `partly here` (the rest on peers), `peers`.
    pub held: String,
}

/// What `shoal restore` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `VOLUME/PATH`, or an absolute path inside a volume's directory.
    pub path: Vec<u8>,
    pub at: Option<i64>,
    pub version: Option<VersionId>,
    /// Write there instead of in place.
    pub to: Option<PathBuf>,
}

/// What a restore did.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct Restored {
    pub files: u64,
    pub dirs: u64,
    /// Symlinks and FIFOs.
    pub others: u64,
    pub bytes: u64,
    /// Already as they were: left alone.
    pub unchanged: u64,
    /// Chunks fetched from peers.
    pub fetched_chunks: u64,
    /// What could not be restored, each with why.
    pub failed: Vec<String>,
}

fn time_of(ns: i64) -> SystemTime {
    match u64::try_from(ns) {
        Ok(ns) => SystemTime::UNIX_EPOCH + Duration::from_nanos(ns),
        Err(_) => SystemTime::UNIX_EPOCH,
    }
}

fn kind_word(entry: &Entry) -> &'static str {
    match &entry.kind {
        EntryKind::File { .. } => "file",
        EntryKind::Dir => "directory",
        EntryKind::Symlink { .. } => "symlink",
        EntryKind::Fifo => "fifo",
        EntryKind::Tombstone { .. } => "deleted",
    }
}

/// The kept versions of `path` (`VOLUME/PATH` or an absolute path): a file's, or a
/// directory's and everything's below it, by path, each path's oldest first.
pub fn list(node: &Node, path: &[u8]) -> Result<Listing, String> {
    let (volume, rel) = locate(node, path)?;
    let names = KnownNodes::of(node);
    let mut listing = Listing::default();
    for record in node.store.versions_below(volume.id, &rel) {
        let record = record.map_err(|e| e.to_string())?;
        if listing.versions.len() >= MAX_LISTED {
            listing.more += 1;
            continue;
        }
        listing
            .versions
            .push(describe(node, volume, &record, &names)?);
    }
    Ok(listing)
}

fn describe(
    node: &Node,
    volume: &Volume,
    record: &VersionRecord,
    names: &KnownNodes,
) -> Result<Listed, String> {
    let distinct: HashSet<ChunkId> = record.chunks.iter().map(|c| c.id).collect();
    let mut here = 0;
    for id in &distinct {
        let locations = node.store.chunk_locations(id).map_err(|e| e.to_string())?;
        // A pack record counts only while its pack is there (what a read would find
        // first); a live file's is trusted as indexed.
        let held = locations.iter().any(|location| match location {
            crate::store::ChunkLocation::Live { .. } => true,
            crate::store::ChunkLocation::Pack { pack, .. } => node
                .store
                .packs_dir()
                .join(crate::store::pack::pack_file_name(*pack))
                .exists(),
        });
        here += u64::from(held);
    }
    let held = match (here, distinct.len() as u64) {
        (h, n) if h == n => "here",
        (0, _) => "peers",
        _ => "partly here",
    };
    let size = match record.entry.kind {
        EntryKind::File { size, .. } => size,
        _ => 0,
    };
    Ok(Listed {
        volume: volume.name.clone(),
        path: escape(record.path.as_bytes()),
        id: record.id.to_hex(),
        replaced_at: humantime::format_rfc3339_nanos(time_of(record.id.replaced_at_ns as i64))
            .to_string(),
        replaced_at_ns: record.id.replaced_at_ns,
        why: record.why.word().to_string(),
        replaced_by: record.replaced_by.to_string(),
        replaced_by_name: names.name(record.replaced_by),
        kind: kind_word(&record.entry).to_string(),
        size,
        mode: record.entry.mode,
        mtime: humantime::format_rfc3339_nanos(time_of(record.entry.mtime_ns)).to_string(),
        mtime_ns: record.entry.mtime_ns,
        chunks: distinct.len() as u64,
        chunks_here: here,
        held: held.to_string(),
    })
}

/// One name to put back: where, and as what.
struct Item {
    path: VolPath,
    entry: Entry,
    chunks: Vec<ChunkRef>,
}

/// What `request` puts back, parents before their children.
fn plan(
    node: &Node,
    volume: &Volume,
    rel: &VolPath,
    request: &Request,
) -> Result<Vec<Item>, String> {
    let store = &node.store;
    let err = |e: crate::store::StoreError| e.to_string();
    let shown = || format!("{}/{}", volume.name, rel.display());
    if let Some(id) = request.version {
        let record = store
            .version(volume.id, rel, id)
            .map_err(err)?
            .ok_or_else(|| format!("{} has no version {}", shown(), id.to_hex()))?;
        return Ok(vec![item_of(record)]);
    }
    let Some(at) = request.at else {
        // The newest kept version of one name.
        let newest = store
            .versions_of(volume.id, rel)
            .last()
            .transpose()
            .map_err(err)?
            .ok_or_else(|| {
                format!(
                    "{} has no kept version (for a directory, give --at TIME)",
                    shown()
                )
            })?;
        return Ok(vec![item_of(newest)]);
    };
    let at_ns = u64::try_from(at).unwrap_or(0);
    // Each path's records are contiguous, oldest first.
    let mut chosen: BTreeMap<Vec<u8>, Option<Item>> = BTreeMap::new();
    let mut previous: Option<(VolPath, u64)> = None;
    for record in store.versions_below(volume.id, rel) {
        let record = record.map_err(err)?;
        let same_path = previous.as_ref().is_some_and(|(p, _)| *p == record.path);
        let earlier_replaced_before =
            same_path && previous.as_ref().is_some_and(|(_, t)| *t <= at_ns);
        let replaced_at = record.id.replaced_at_ns;
        previous = Some((record.path.clone(), replaced_at));
        if replaced_at <= at_ns || chosen.contains_key(record.path.as_bytes()) {
            continue;
        }
        // The first version replaced after T: it was there at T if an earlier one was
        // replaced by it before T, or if it was made before T.
        let there = earlier_replaced_before || record.entry.is_dir() || record.entry.mtime_ns <= at;
        let key = record.path.as_bytes().to_vec();
        chosen.insert(key, there.then(|| item_of(record)));
    }
    let mut items: Vec<Item> = Vec::new();
    if request.to.is_some() {
        // A copy elsewhere holds what was there at T: the names unchanged since too.
        let own = match rel.split_last() {
            Some((parent, name)) => store.entry(volume.id, &parent, name).map_err(err)?,
            None => None,
        };
        let live = own
            .into_iter()
            .map(|entry| Ok::<_, String>((rel.clone(), entry)))
            .chain(store.descendants(volume.id, rel).map(|item| {
                let (parent, name, entry) = item.map_err(err)?;
                Ok((parent.join(&name).map_err(|e| e.to_string())?, entry))
            }));
        for item in live {
            let (path, entry): (VolPath, Entry) = item?;
            if entry.is_tombstone() || chosen.contains_key(path.as_bytes()) {
                continue;
            }
            let chunks = match &entry.kind {
                EntryKind::File { .. } => {
                    let (parent, name) = path.split_last().expect("below the root");
                    store
                        .chunk_list(volume.id, &parent, name)
                        .map_err(err)?
                        .unwrap_or_default()
                }
                _ => Vec::new(),
            };
            items.push(Item {
                path,
                entry,
                chunks,
            });
        }
    }
    items.extend(chosen.into_values().flatten());
    items.sort_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
    if items.is_empty() && request.to.is_none() {
        let state = match store.versions_below(volume.id, rel).next().is_none() {
            true => "has no kept version",
            false => "is as it was then",
        };
        return Err(format!("{} {state}", shown()));
    }
    Ok(items)
}

fn item_of(record: VersionRecord) -> Item {
    Item {
        path: record.path,
        entry: record.entry,
        chunks: record.chunks,
    }
}

/// Puts back what `request` names; what was done, or why nothing could be.
pub async fn restore(node: &Arc<Node>, request: Request) -> Result<Restored, String> {
    let (volume, rel) = locate(node, &request.path)?;
    if rel.is_shoal_internal() {
        return Err(format!("{} is Shoal's own", escape(&request.path)));
    }
    let volume_index = node
        .volumes
        .iter()
        .position(|v| std::ptr::eq(v, volume))
        .expect("located among the node's volumes");
    if let Some(to) = &request.to {
        refuse_inside_volumes(node, to)?;
    }
    let items = {
        let (node, rel, request) = (node.clone(), rel.clone(), request.clone());
        tokio::task::spawn_blocking(move || {
            let volume = &node.volumes[volume_index];
            plan(&node, volume, &rel, &request)
        })
        .await
        .map_err(|e| format!("planning the restore failed: {e}"))??
    };
    let base = rel.parent().unwrap_or_default();
    let mut restorer = Restorer {
        node: node.clone(),
        volume_index,
        to: request.to.clone(),
        base,
        done: Restored::default(),
        dirs: Vec::new(),
    };
    let (files, others): (Vec<Item>, Vec<Item>) = items
        .into_iter()
        .partition(|i| matches!(i.entry.kind, EntryKind::File { .. }));
    for item in &others {
        if let Err(e) = restorer.place_other(item).await {
            restorer.fail(&item.path, e);
        }
    }
    let mut files = files.into_iter().peekable();
    while files.peek().is_some() {
        let batch: Vec<Item> = files.by_ref().take(RESTORE_BATCH).collect();
        restorer.place_files(batch).await?;
    }
    restorer.finish_dirs();
    let done = restorer.done;
    tracing::warn!(
        volume = %volume.name, path = %rel.display(), files = done.files, dirs = done.dirs,
        bytes = done.bytes, fetched_chunks = done.fetched_chunks, failed = done.failed.len(),
        "restored {}/{}{} by the operator ({} files, {} chunks fetched from peers)",
        volume.name, rel.display(),
        request.to.as_ref().map(|t| format!(" to {}", t.display())).unwrap_or_default(),
        done.files, done.fetched_chunks
    );
    Ok(done)
}

/// `--to` must not write into a volume: that would sync.
fn refuse_inside_volumes(node: &Node, to: &Path) -> Result<(), String> {
    if !to.is_absolute() {
        return Err(format!("--to {} is not an absolute path", to.display()));
    }
    let target = std::fs::canonicalize(to).unwrap_or_else(|_| to.to_path_buf());
    for volume in &node.volumes {
        let root = volume.fs.root_path();
        let root = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
        if target.starts_with(&root) {
            return Err(format!(
                "--to {} is inside volume {}: restore in place instead, or to a directory outside every volume",
                to.display(),
                volume.name
            ));
        }
    }
    Ok(())
}

struct Restorer {
    node: Arc<Node>,
    volume_index: usize,
    to: Option<PathBuf>,
    /// What `--to` paths are relative to: the parent of the path restored.
    base: VolPath,
    done: Restored,
    /// Directories restored, with the mtime to give them once their children are in.
    dirs: Vec<(VolPath, i64)>,
}

/// A file being assembled.
struct Assembling {
    item: Item,
    file: Arc<File>,
    /// Its staging name (in place) or temporary path (`--to`).
    temp: Temp,
    missing: crate::sync::transfer::Missing,
}

enum Temp {
    Staged(String),
    Outside(PathBuf),
}

impl Restorer {
    fn volume(&self) -> &Volume {
        &self.node.volumes[self.volume_index]
    }

    fn fail(&mut self, path: &VolPath, why: impl std::fmt::Display) {
        let message = format!("{}/{}: {why}", self.volume().name, path.display());
        tracing::warn!("restore: {message}");
        self.done.failed.push(message);
    }

    /// Where `path` goes with `--to`.
    fn outside(&self, to: &Path, path: &VolPath) -> PathBuf {
        let rel = &path.as_bytes()[self.base.as_bytes().len()..];
        let rel = rel.strip_prefix(b"/").unwrap_or(rel);
        to.join(OsStr::from_bytes(rel))
    }

    fn owner(&self, entry: &Entry) -> Option<(u32, u32)> {
        self.node.sync_ownership.then_some((entry.uid, entry.gid))
    }

    /// A directory, symlink or FIFO.
    async fn place_other(&mut self, item: &Item) -> Result<(), String> {
        let fs_err = |e: crate::volume_fs::FsError| e.to_string();
        let (parent, name) = item.path.split_last().ok_or("the volume root")?;
        let entry = &item.entry;
        if let Some(to) = self.to.clone() {
            let target = self.outside(&to, &item.path);
            match &entry.kind {
                EntryKind::Dir => {
                    std::fs::create_dir_all(&target)
                        .map_err(|e| format!("{}: {e}", target.display()))?;
                    std::fs::set_permissions(
                        &target,
                        std::os::unix::fs::PermissionsExt::from_mode(entry.mode),
                    )
                    .map_err(|e| format!("{}: {e}", target.display()))?;
                    self.dirs.push((item.path.clone(), entry.mtime_ns));
                    self.done.dirs += 1;
                }
                EntryKind::Symlink { target: link } => {
                    if let Some(dir) = target.parent() {
                        std::fs::create_dir_all(dir)
                            .map_err(|e| format!("{}: {e}", dir.display()))?;
                    }
                    std::os::unix::fs::symlink(OsStr::from_bytes(link), &target)
                        .map_err(|e| format!("{}: {e}", target.display()))?;
                    self.done.others += 1;
                }
                _ => return Err("FIFOs are restored in place only".to_string()),
            }
            return Ok(());
        }
        let volume = &self.node.volumes[self.volume_index];
        let _guard = volume.lock.lock().await;
        let dir_fd = volume.fs.open_dir(&parent, true).map_err(fs_err)?;
        match &entry.kind {
            EntryKind::Dir => {
                volume.fs.mkdir(&dir_fd, name, entry.mode).map_err(fs_err)?;
                if self.node.sync_ownership {
                    volume
                        .fs
                        .chown_dir(&dir_fd, name, (entry.uid, entry.gid))
                        .map_err(fs_err)?;
                }
                volume
                    .fs
                    .set_dir_xattrs(&dir_fd, name, entry.mode, &entry.xattrs)
                    .map_err(fs_err)?;
                self.dirs.push((item.path.clone(), entry.mtime_ns));
                self.done.dirs += 1;
            }
            EntryKind::Symlink { target } => {
                if is_dir_at(volume, &dir_fd, name) {
                    return Err("a directory is there now".to_string());
                }
                volume
                    .fs
                    .place_symlink(&dir_fd, name, target, entry.mtime_ns, self.owner(entry))
                    .map_err(fs_err)?;
                self.done.others += 1;
            }
            EntryKind::Fifo => {
                if is_dir_at(volume, &dir_fd, name) {
                    return Err("a directory is there now".to_string());
                }
                volume
                    .fs
                    .place_fifo(&dir_fd, name, entry.mode, entry.mtime_ns, self.owner(entry))
                    .map_err(fs_err)?;
                self.done.others += 1;
            }
            _ => {}
        }
        crate::volume_fs::VolumeFs::fsync_dir(&dir_fd).map_err(fs_err)?;
        Ok(())
    }

    /// Assembles a batch of files from local chunks and peers, then places them.
    async fn place_files(&mut self, items: Vec<Item>) -> Result<(), String> {
        let mut assembling = Vec::new();
        for item in items {
            if self.to.is_none() && self.already_there(&item) {
                self.done.unchanged += 1;
                continue;
            }
            let path = item.path.clone();
            match self.start(item) {
                Ok(file) => assembling.push(file),
                Err(e) => self.fail(&path, e),
            }
        }
        let mut targets = ChunkTargets::default();
        for file in &assembling {
            targets.add_missing(&file.missing, &file.file);
        }
        let wanted: HashSet<ChunkId> = assembling
            .iter()
            .flat_map(|f| f.missing.iter().map(|(id, _, _)| *id))
            .collect();
        let received = if wanted.is_empty() {
            HashSet::new()
        } else {
            fetch_chunks(&self.node, None, self.volume_index, targets)
                .await
                .map_err(|e| format!("fetching chunks from peers: {e}"))?
        };
        if !wanted.is_empty() {
            tracing::info!(
                volume = %self.volume().name, wanted = wanted.len(), fetched = received.len(),
                "restore fetched {} of {} chunks it lacked from peers", received.len(), wanted.len()
            );
        }
        self.done.fetched_chunks += received.len() as u64;
        for file in assembling {
            let path = file.item.path.clone();
            let lacking = file
                .missing
                .iter()
                .filter(|(id, _, _)| !received.contains(id))
                .count();
            if lacking > 0 {
                let why = match self.node.peers().is_empty() {
                    true => format!(
                        "{lacking} chunks are held by no local copy (no daemon runs to fetch them from peers: start `shoal serve` and restore again)"
                    ),
                    false => format!("{lacking} chunks are held by no reachable peer"),
                };
                self.discard(&file.temp);
                self.fail(&path, why);
                continue;
            }
            if let Err(e) = self.place_file(file).await {
                self.fail(&path, e);
            }
        }
        Ok(())
    }

    /// Whether the name holds this content, mode and mtime already (as indexed, and on
    /// disk as indexed).
    fn already_there(&self, item: &Item) -> bool {
        let Some((parent, name)) = item.path.split_last() else {
            return false;
        };
        let volume = self.volume();
        let Ok(Some(current)) = self.node.store.entry(volume.id, &parent, name) else {
            return false;
        };
        let same = current.kind == item.entry.kind
            && current.mode == item.entry.mode
            && current.mtime_ns == item.entry.mtime_ns;
        let on_disk = volume.fs.open_dir(&parent, false).ok().and_then(|fd| {
            let stamp = volume.fs.stat(&fd, name).ok()?.stamp();
            Some(self.node.store.stamp(volume.id, &parent, name).ok()?? == stamp)
        });
        same && on_disk == Some(true)
    }

    /// Opens the file's temporary and writes into it every chunk held here.
    fn start(&mut self, item: Item) -> Result<Assembling, String> {
        let EntryKind::File {
            size, content_id, ..
        } = item.entry.kind
        else {
            unreachable!("only files are assembled");
        };
        let (file, temp, resumed) = match self.to.clone() {
            Some(to) => {
                let target = self.outside(&to, &item.path);
                let dir = target.parent().ok_or("no parent directory")?;
                std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
                let mut temp_name = target.file_name().unwrap_or_default().to_os_string();
                temp_name.push(".shoal-restore.tmp");
                let temp = dir.join(temp_name);
                let file = File::create(&temp).map_err(|e| format!("{}: {e}", temp.display()))?;
                file.set_len(size)
                    .map_err(|e| format!("{}: {e}", temp.display()))?;
                (file, Temp::Outside(temp), false)
            }
            None => {
                let (parent, name) = item.path.split_last().ok_or("the volume root")?;
                let staged = self
                    .volume()
                    .fs
                    .stage(&content_id, &parent, name, size)
                    .map_err(|e| e.to_string())?;
                (staged.file, Temp::Staged(staged.temp_name), staged.resumed)
            }
        };
        let mut reads = self.node.store.chunk_reads();
        let missing = fill_from_local(&self.node, &mut reads, &file, &item.chunks, resumed, None)
            .map_err(|e| e.to_string())?;
        Ok(Assembling {
            item,
            file: Arc::new(file),
            temp,
            missing,
        })
    }

    fn discard(&self, temp: &Temp) {
        let _ = match temp {
            Temp::Staged(name) => self
                .volume()
                .fs
                .remove_staged(name)
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Temp::Outside(path) => std::fs::remove_file(path).map_err(|e| e.to_string()),
        };
    }

    /// Gives an assembled file its metadata, flushes it and renames it into place.
    async fn place_file(&mut self, file: Assembling) -> Result<(), String> {
        let Assembling {
            item, file, temp, ..
        } = file;
        let entry = &item.entry;
        let volume = &self.node.volumes[self.volume_index];
        let mode = volume.received_file_mode(entry.mode);
        crate::volume_fs::finish_staged(
            &file,
            mode,
            entry.mtime_ns,
            self.owner(entry),
            &entry.xattrs,
        )
        .map_err(|e| e.to_string())?;
        file.sync_all().map_err(|e| e.to_string())?;
        let size = match entry.kind {
            EntryKind::File { size, .. } => size,
            _ => 0,
        };
        match temp {
            Temp::Outside(temp) => {
                let target = temp.with_file_name(
                    item.path
                        .split_last()
                        .map(|(_, n)| OsStr::from_bytes(n).to_os_string())
                        .unwrap_or_default(),
                );
                std::fs::rename(&temp, &target)
                    .map_err(|e| format!("{}: {e}", target.display()))?;
            }
            Temp::Staged(temp_name) => {
                let (parent, name) = item.path.split_last().ok_or("the volume root")?;
                // No pull applies a change in the volume meanwhile.
                let _guard = volume.lock.lock().await;
                let dir_fd = volume
                    .fs
                    .open_dir(&parent, true)
                    .map_err(|e| e.to_string())?;
                if is_dir_at(volume, &dir_fd, name) {
                    let _ = volume.fs.remove_staged(&temp_name);
                    return Err("a directory is there now".to_string());
                }
                volume
                    .fs
                    .publish(&temp_name, &dir_fd, name)
                    .map_err(|e| e.to_string())?;
                crate::volume_fs::VolumeFs::fsync_dir(&dir_fd).map_err(|e| e.to_string())?;
            }
        }
        self.done.files += 1;
        self.done.bytes += size;
        Ok(())
    }

    /// Gives the restored directories their mtimes, deepest first (placing their
    /// children moved them).
    fn finish_dirs(&mut self) {
        let mut dirs = std::mem::take(&mut self.dirs);
        dirs.sort_by_key(|(path, _)| std::cmp::Reverse(path.depth()));
        for (path, mtime) in dirs {
            let result = match &self.to {
                Some(to) => File::open(self.outside(to, &path))
                    .and_then(|dir| crate::volume_fs::set_mtime(&dir, mtime)),
                None => self
                    .volume()
                    .fs
                    .open_dir(&path, false)
                    .map_err(|e| std::io::Error::other(e.to_string()))
                    .and_then(|dir| crate::volume_fs::set_mtime(&dir, mtime)),
            };
            if let Err(e) = result {
                tracing::warn!("restore: cannot set the mtime of {}: {e}", path.display());
            }
        }
    }
}

fn is_dir_at(volume: &Volume, dir_fd: &std::os::fd::OwnedFd, name: &[u8]) -> bool {
    volume.fs.stat(dir_fd, name).is_ok_and(|s| s.is_dir())
}

/// Parses `--at`: RFC 3339 (`2026-11-30T19:00:00Z`, or with a space, UTC), or seconds
/// since the Unix epoch (`@1764529200`, fractions allowed). In ns since the epoch.
pub fn parse_time(text: &str) -> Result<i64, String> {
    if let Some(seconds) = text.strip_prefix('@') {
        let seconds: f64 = seconds
            .parse()
            .map_err(|_| format!("{text:?} is not @SECONDS since the Unix epoch"))?;
        if !seconds.is_finite() || !(0.0..9.2e9).contains(&seconds) {
            return Err(format!("{text:?} is out of range"));
        }
        return Ok((seconds * 1e9) as i64);
    }
    let time = humantime::parse_rfc3339_weak(text)
        .map_err(|e| format!("{text:?} is not a time (RFC 3339 UTC, or @SECONDS): {e}"))?;
    let ns = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(|_| format!("{text:?} is before 1970"))?
        .as_nanos();
    i64::try_from(ns).map_err(|_| format!("{text:?} is out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_read_as_rfc3339_or_epoch_seconds() {
        assert_eq!(parse_time("@1.5").unwrap(), 1_500_000_000);
        assert_eq!(parse_time("1970-01-01T00:00:02Z").unwrap(), 2_000_000_000);
        assert_eq!(parse_time("1970-01-01 00:00:03").unwrap(), 3_000_000_000);
        assert!(parse_time("yesterday").is_err());
        assert!(parse_time("@-1").is_err());
        assert!(parse_time("@1e300").is_err());
    }
}
