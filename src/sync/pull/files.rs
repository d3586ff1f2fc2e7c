//! Taking files: chunk lists, local copies, fetches, and publication in batches.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use s2n_quic::connection::Handle;
use tokio::sync::OwnedMutexGuard;
use tokio::task::JoinSet;

use super::{Deferred, PUBLISH_BATCH, Pull, Spawned};
use crate::chunking::{CHUNK_PAGE_MAX, CHUNK_PAGE_TARGET, ChunkRef, chunk_list_pages, content_id};
use crate::entry::{Causality, Entry, EntryKind};
use crate::ids::NodeId;
use crate::pathname::{VolPath, escape};
use crate::protocol::{ListPart, MAX_LIST_CHUNKS, ProtocolError, Request, Response};
use crate::store::versions::Why;
use crate::store::{ChunkReads, Durability};
use crate::sync::room::{Refused, Reservation};
use crate::sync::transfer::{ChunkTargets, Missing, fetch_chunks, fill_from_local};
use crate::sync::{Node, Peer, SyncError, request};
use crate::volume_fs::{FileStat, Staged, finish_staged, staging_name};

/// Chunk lists asked of the peer at once.
const FILE_CONCURRENCY: usize = 32;

/// Files up to this size are staged unnamed where the file system allows it
/// ([`VolumeFs::stage_unnamed`](crate::volume_fs::VolumeFs::stage_unnamed)): fetched
/// again whole if a transfer is cut short, which costs less than a named staging file
/// for each (two entries made and removed in the staging directory, under its lock).
const UNNAMED_UP_TO: u64 = 1 << 20;

/// Whether a file of `size` bytes is staged unnamed on `fs` ([`UNNAMED_UP_TO`]).
fn stages_unnamed(fs: &crate::volume_fs::VolumeFs, size: u64) -> bool {
    size <= UNNAMED_UP_TO && fs.can_stage_unnamed()
}

/// What a file about to be staged needs of the volume's file system.
#[derive(Clone, Copy)]
enum Needs {
    /// Nothing: a local file moved into staging (the other half of a rename).
    Nothing,
    /// Its size, less what a named staging file to resume holds already, out of
    /// `available` bytes free (read once for a whole batch).
    Room { available: u64 },
}

/// Where a file being taken is staged.
enum Staging {
    /// A named staging file: resumable, or a local file moved there (a rename).
    Named(Staged),
    /// An unnamed one, linked in under its name when published. Shared with the
    /// fetches that fill it (a named one is duplicated for them instead): two system
    /// calls fewer for each small file, a `dup` and its `close`.
    Unnamed(Arc<File>),
}

impl Staging {
    fn file(&self) -> &File {
        match self {
            Staging::Named(staged) => &staged.file,
            Staging::Unnamed(file) => file,
        }
    }

    /// Whether the staging file held content already (to check, not to trust).
    fn resumed(&self) -> bool {
        matches!(self, Staging::Named(staged) if staged.resumed)
    }
}

/// A publish batch of at most this many files, or a chunk of deletes in at most this
/// many directories, flushes each one (`fsync`); a larger one flushes the whole file
/// system at once (`syncfs`, one call instead of hundreds). A `syncfs` also waits for
/// every other writer's dirty data on that file system: on a disk shared with a busy
/// build it held a one-file change for over a second.
pub(super) const FSYNC_EACH_UP_TO: usize = 16;

/// Makes what a publish relies on durable: the batch's `publishing/` records, then the
/// content of its staged files (an `fsync` each for a few, one `syncfs` for many).
///
/// The records say what is about to be renamed into place: a crash before the index
/// write then leaves files the next scan knows it received (their peer's versions), not
/// local changes that would bump our own counter and could outlive a delete made
/// meanwhile elsewhere. They are written here, off the pull's serial publish step and
/// without a log `fsync` of their own: the flush takes the log to disk with the files
/// where the index shares their file system (the log's own `fsync` after it then finds
/// nothing to write), instead of a second commit of that file system's journal queued
/// behind the flush.
fn flush_staged(node: &Node, volume_index: usize, ready: &[ReadyFile]) -> Result<(), SyncError> {
    if ready.is_empty() {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let volume = &node.volumes[volume_index];
    let mut journal = node.store.batch();
    for file in ready {
        journal.put_publishing(volume.id, &file.job.dir, &file.job.name, &file.job.entry);
    }
    node.store.write(journal, Durability::Buffered)?;
    if ready.len() <= FSYNC_EACH_UP_TO {
        for file in ready {
            file.staged
                .file()
                .sync_all()
                .map_err(SyncError::local(format!(
                    "flushing staged {}",
                    escape(&file.job.name)
                )))?;
        }
    } else {
        volume.fs.sync_all()?;
    }
    node.store.sync()?;
    tracing::debug!(
        files = ready.len(),
        flush_ms = started.elapsed().as_millis() as u64,
        "batch flushed"
    );
    Ok(())
}

/// A batch being flushed on the blocking pool ([`flush_staged`]), to publish once done.
pub(super) struct Flushing(tokio::task::JoinHandle<Result<Vec<ReadyFile>, SyncError>>);

impl Flushing {
    fn start(node: &Arc<Node>, volume_index: usize, ready: Vec<ReadyFile>) -> Self {
        let node = node.clone();
        Flushing(tokio::task::spawn_blocking(move || {
            flush_staged(&node, volume_index, &ready)?;
            Ok(ready)
        }))
    }

    /// The batch, flushed.
    async fn done(self) -> Result<Vec<ReadyFile>, SyncError> {
        self.0.await.map_err(|e| SyncError::Task {
            what: "flushing",
            source: e,
        })?
    }
}

/// The open-file limit under which the walk waits for each batch to be staged: a batch
/// staging while the one before it waits to flush and the one before that flushes took
/// up to 1,315 descriptors in all on `small` (770-810 with two batches in flight), past
/// the 1,024 many service managers set.
const STAGE_AHEAD_MIN_OPEN_FILES: u64 = 4096;

/// Files published together where the open-file limit leaves room for three batches
/// of them ([`LARGE_BATCH_MIN_OPEN_FILES`]). Each batch pays a fixed cost whatever it
/// holds: a round trip for its chunks, and three journal commits (its flush, the index
/// log's, its directories' fsyncs). Twice [`PUBLISH_BATCH`] took a tenth of `million`
/// about 13% faster in each of three alternating pairs, and an initial `small` about
/// 10% in two of three (docs/BENCHMARKS.md, "Batches of 512 files"); 1,024 was faster
/// still on `million`, but took a receiver of tiny files past 64 MiB.
const LARGE_PUBLISH_BATCH: usize = 512;

/// The open-file limit from which a pull takes [`LARGE_PUBLISH_BATCH`] files at once:
/// three such batches in flight took up to 1,813 descriptors on `small`.
const LARGE_BATCH_MIN_OPEN_FILES: u64 = 8192;

/// How a pull takes the files it decided on, by what this process's open-file limit
/// allows (decided once per round).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Batching {
    /// Files made durable and visible together.
    pub(super) files: usize,
    /// Whether a third batch of staging files may be open, so that the walk goes on
    /// while a batch stages (see [`Pull::take_batches`]).
    pub(super) stage_ahead: bool,
}

impl Batching {
    /// For this process's soft open-file limit.
    pub(super) fn for_this_process() -> Batching {
        let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        Batching::for_open_files(limit.current)
    }

    /// For a soft open-file limit of `limit` (`None`: unlimited).
    fn for_open_files(limit: Option<u64>) -> Batching {
        let at_least = |open| limit.is_none_or(|limit| limit >= open);
        Batching {
            files: match at_least(LARGE_BATCH_MIN_OPEN_FILES) {
                true => LARGE_PUBLISH_BATCH,
                false => PUBLISH_BATCH,
            },
            stage_ahead: at_least(STAGE_AHEAD_MIN_OPEN_FILES),
        }
    }
}

/// What staging a batch came to.
#[derive(Default)]
pub(super) struct StagedBatch {
    /// Complete, flushed not yet.
    ready: Vec<ReadyFile>,
    /// Files left for the next round: their transfer failed, or they changed on the peer.
    skipped: u64,
    /// Files some chunk of which no reachable peer holds intact, left in staging.
    incomplete: u64,
    /// Files and bytes of a batch the file system had no room for after all, left in
    /// staging.
    no_room: Option<(u64, u64)>,
}

/// Stages a batch: gets its files' chunk lists (`FILE_CONCURRENCY` of them asked of the
/// peer at once), stages every file on the blocking pool in one trip ([`stage_files`]),
/// fetches the chunks the whole batch still lacks in shared requests, and finishes the
/// files whose chunks all came. It holds nothing of the pull, so the batch before it is
/// published meanwhile.
async fn stage_batch(
    node: Arc<Node>,
    peer: Arc<Peer>,
    handle: Handle,
    volume_index: usize,
    jobs: Vec<(FileJob, Reservation)>,
) -> Result<StagedBatch, SyncError> {
    let started = std::time::Instant::now();
    let mut staged = StagedBatch::default();
    let listed = list_batch(
        &node,
        &peer,
        &handle,
        volume_index,
        jobs,
        &mut staged.skipped,
    )
    .await?;
    let mut prepared = Vec::with_capacity(listed.len());
    for file in stage_files(&node, volume_index, listed).await? {
        match file {
            Ok(file) => prepared.push(file),
            Err((name, e)) => {
                tracing::warn!(peer = %peer.addr, "{}: transfer failed, will retry next round: {e}", escape(&name));
                staged.skipped += 1;
            }
        }
    }
    let files = prepared.len() as u64;
    let bytes = prepared.iter().map(|p| p.job.size()).sum();
    let prepared_in = started.elapsed();
    match fill(&node, &peer, volume_index, prepared, &mut staged.incomplete).await {
        Ok(ready) => staged.ready = ready,
        Err(e) if e.is_no_space() => staged.no_room = Some((files, bytes)),
        Err(e) => return Err(e),
    }
    tracing::debug!(
        files,
        prepare_ms = prepared_in.as_millis() as u64,
        total_ms = started.elapsed().as_millis() as u64,
        "batch staged"
    );
    Ok(staged)
}

/// Gets the chunk list of each of `jobs`: those at hand at once, the others asked of the
/// peer `FILE_CONCURRENCY` at a time. A file whose list cannot be had is counted in
/// `skipped`, for a later round.
async fn list_batch(
    node: &Arc<Node>,
    peer: &Arc<Peer>,
    handle: &Handle,
    volume_index: usize,
    jobs: Vec<(FileJob, Reservation)>,
    skipped: &mut u64,
) -> Result<Vec<Listed>, SyncError> {
    let mut listed = Vec::with_capacity(jobs.len());
    let mut asking = JoinSet::new();
    let mut take = |outcome: Result<Option<Listed>, SyncError>| match outcome {
        Ok(Some(file)) => listed.push(file),
        Ok(None) => *skipped += 1,
        Err(e) => {
            tracing::warn!(peer = %peer.addr, "transfer failed, will retry next round: {e}");
            *skipped += 1;
        }
    };
    let joined = |done: Result<_, tokio::task::JoinError>| {
        done.map_err(|source| SyncError::Task {
            what: "chunk list",
            source,
        })
    };
    for (job, room) in jobs {
        let (node, peer, handle) = (node.clone(), peer.clone(), handle.clone());
        if list_at_hand(&job) {
            take(list(node, peer, handle, volume_index, job, room).await);
            continue;
        }
        if asking.len() >= FILE_CONCURRENCY
            && let Some(done) = asking.join_next().await
        {
            take(joined(done)?);
        }
        asking.spawn(list(node, peer, handle, volume_index, job, room));
    }
    while let Some(done) = asking.join_next().await {
        take(joined(done)?);
    }
    Ok(listed)
}

/// Stages `files` on the blocking pool in one trip ([`stage_job`] for each): a trip
/// per file cost the receiving node an eighth of its CPU on many small files, in
/// threads woken and put back to sleep. A file that cannot be staged comes back with
/// its name and why.
async fn stage_files(
    node: &Arc<Node>,
    volume_index: usize,
    files: Vec<Listed>,
) -> Result<Vec<Result<Prepared, (Vec<u8>, SyncError)>>, SyncError> {
    if files.is_empty() {
        return Ok(Vec::new());
    }
    let node = node.clone();
    tokio::task::spawn_blocking(move || {
        // One view of the chunk index for the batch's local copies.
        let mut reads = node.store.chunk_reads();
        files
            .into_iter()
            .map(|Listed { job, chunks, room }| {
                let name = job.name.clone();
                stage_job(&node, &mut reads, volume_index, job, chunks, None, room)
                    .map_err(|e| (name, e))
            })
            .collect()
    })
    .await
    .map_err(|e| SyncError::Task {
        what: "staging",
        source: e,
    })
}

/// Fetches what the prepared files still lack and finishes them; files left
/// incomplete are counted in `incomplete` (and resumed from staging next round).
async fn fill(
    node: &Arc<Node>,
    peer: &Arc<Peer>,
    volume_index: usize,
    prepared: Vec<Prepared>,
    incomplete: &mut u64,
) -> Result<Vec<ReadyFile>, SyncError> {
    let mut targets = ChunkTargets::default();
    for file in &prepared {
        targets.add_missing(&file.missing, &file.file);
    }
    let received = match targets.is_empty() {
        true => Default::default(),
        false => fetch_chunks(node, Some(peer), volume_index, targets).await?,
    };
    let mut ready = Vec::new();
    for file in prepared {
        if let Some((id, _, _)) = file
            .missing
            .iter()
            .find(|(id, _, _)| !received.contains(id))
        {
            tracing::warn!(peer = %peer.addr, "{}: chunk {id} is held intact by no reachable peer; will retry", escape(&file.job.name));
            *incomplete += 1;
            continue;
        }
        ready.push(file.finish(node, volume_index)?);
    }
    Ok(ready)
}

/// Runs `work`, synchronous file system and index writes (a batch's publish: tens of
/// milliseconds), without holding up the tasks queued on this async worker thread: the
/// transport's event loop and the fetches of the batch staging meanwhile waited for it
/// (on many small files, a fetch's first chunk came milliseconds after the peer had
/// read it). Where the runtime has a single thread, there is no other thread to hand
/// them to.
fn off_async_worker<R>(work: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current().map(|runtime| runtime.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(work),
        _ => work(),
    }
}

/// How much of the files decided on [`Pull::take_files`] takes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Until {
    /// Whole batches ([`Batching::files`]); the rest waits for more files, and the last
    /// batch is left staging or flushing, taken on by the next call.
    Batches,
    /// Every file, every batch published.
    All,
}

/// A file to fetch and publish under `dir/name`.
pub(super) struct FileJob {
    pub(super) dir: VolPath,
    pub(super) name: Vec<u8>,
    /// The entry to record (its content is fetched from `source_path` on the peer).
    pub(super) entry: Entry,
    pub(super) source_path: VolPath,
    /// The local entry being replaced, if any (checked unchanged before replacing).
    pub(super) replaces: Option<Entry>,
    /// What the index held under the name when the file was decided on (a tombstone,
    /// say, or the entry a conflict moved aside): the file is published only if it still
    /// does, since the volume lock was let go in between.
    pub(super) decided_against: Option<Entry>,
    /// The chunk list, when the peer sent it inline.
    pub(super) chunks: Option<Vec<ChunkRef>>,
    /// The peer, when `entry` is its entry exactly as sent ([`Pull::sent_by`]).
    pub(super) sent_by: Option<NodeId>,
}

struct ReadyFile {
    job: FileJob,
    staged: Staging,
    chunks: Vec<ChunkRef>,
    /// Room held for the staging file until it is published.
    _room: Reservation,
}

/// A local file that a deleted name leaves behind, to be moved to a new name of the
/// same content instead of copied.
pub(super) struct RenameSource {
    pub(super) dir: VolPath,
    pub(super) name: Vec<u8>,
    /// What the index recorded of it: it is moved only if it is still exactly that.
    pub(super) stamp: crate::store::codec::ScanStamp,
    /// The peer's delete of it, recorded as soon as the file has moved.
    pub(super) tombstone: Entry,
    /// The peer, when `tombstone` is its entry exactly as sent.
    pub(super) sent_by: Option<NodeId>,
}

/// A file whose chunk list is checked, to be staged.
struct Listed {
    job: FileJob,
    chunks: Vec<ChunkRef>,
    room: Reservation,
}

/// A file whose staging file exists and holds every chunk we had locally.
struct Prepared {
    job: FileJob,
    staged: Staging,
    file: Arc<File>,
    chunks: Vec<ChunkRef>,
    /// Chunks still to fetch.
    missing: Missing,
    room: Reservation,
    /// The local file of a rename that became the staging file, if one did.
    taken_from: Option<RenameSource>,
}

impl FileJob {
    /// The file's size, as its entry says.
    pub(super) fn size(&self) -> u64 {
        match self.entry.kind {
            EntryKind::File { size, .. } => size,
            _ => 0,
        }
    }
}

impl Pull {
    /// Local files this round deletes, by content: a new file with the same content is
    /// the other half of a rename, and takes the old file itself instead of a copy of
    /// its chunks (a renamed directory of media is not rewritten on every peer). Only
    /// files that are what the index says (their stamp, checked again at the move).
    /// Each deferred delete is looked at once, however many batches of files follow.
    fn find_rename_sources(&mut self) -> Result<(), SyncError> {
        let vol = self.volume().id;
        let new = &self.deferred[self.renames_seen..];
        self.renames_seen = self.deferred.len();
        for Deferred {
            dir,
            name,
            tombstone,
            sent_by,
        } in new
        {
            let Some(local) = self.node.store.entry(vol, dir, name)? else {
                continue;
            };
            let EntryKind::File {
                size, content_id, ..
            } = local.kind
            else {
                continue;
            };
            if size == 0 || tombstone.version.compare(&local.version) != Causality::Dominates {
                continue;
            }
            if let Some(stamp) = self.node.store.stamp(vol, dir, name)? {
                self.rename_sources.insert(
                    content_id,
                    RenameSource {
                        dir: dir.clone(),
                        name: name.clone(),
                        stamp,
                        tombstone: tombstone.clone(),
                        sent_by: *sent_by,
                    },
                );
            }
        }
        Ok(())
    }

    /// Takes the files decided on so far in batches of up to [`Batching::files`]: stages
    /// each batch ([`stage_batch`]: chunk lists, local chunks, fetches), then publishes
    /// it (files flushed, one durable index write). A batch stages while the one before
    /// it flushes on the blocking pool and the one before that is published (under the
    /// volume lock): the disk writes one batch while the network brings the next.
    pub(super) async fn take_files(&mut self, until: Until) -> Result<(), SyncError> {
        self.find_rename_sources()?;
        let mut fetched = Vec::new();
        let mut moved = Vec::new();
        for job in std::mem::take(&mut self.files) {
            let source = match &job.entry.kind {
                EntryKind::File { content_id, .. } => self.rename_sources.remove(content_id),
                _ => None,
            };
            match source {
                Some(source) => moved.push((job, source)),
                None => fetched.push(job),
            }
        }
        self.take_renamed(moved).await?;
        if until == Until::Batches {
            // A batch short of full waits for the files of the next directories.
            let whole = fetched.len() - fetched.len() % self.batching.files;
            self.files = fetched.split_off(whole);
        }
        let taken = self.take_batches(fetched).await;
        match until {
            Until::All => taken.and(self.settle_batches().await),
            Until::Batches => taken,
        }
    }

    /// Publishes the batch left flushing, if there is one.
    async fn publish_flushing(&mut self) -> Result<(), SyncError> {
        match self.flushing.take() {
            Some(flushing) => self.publish_flushed(flushing).await,
            None => Ok(()),
        }
    }

    /// Takes `fetched` batch by batch. Each batch is staged on a task of its own
    /// ([`stage_batch`]) while the one before it finishes flushing and is published.
    /// Where [`Batching::stage_ahead`] allows, the last batch is left staging in
    /// `self.staging` and the walk goes on to fill the next one meanwhile (it waited for
    /// every batch's network and disk before); otherwise it is waited for and left
    /// flushing in `self.flushing`. The next call, or [`Pull::settle_batches`], takes it
    /// from there.
    async fn take_batches(&mut self, fetched: Vec<FileJob>) -> Result<(), SyncError> {
        let mut jobs = fetched.into_iter().peekable();
        while jobs.peek().is_some() {
            if let Some(pause) = self.node.faults.staging_pause(self.peer.addr) {
                tracing::warn!(
                    "FAULT INJECTION: pausing {} ms before staging a batch from {}",
                    pause.as_millis(),
                    self.peer.addr
                );
                tokio::time::sleep(pause).await;
            }
            let mut batch = Vec::new();
            // Read once a batch: nothing is staged until the whole batch holds its room.
            // A file system that cannot say how full it is is taken to have room.
            let available = self.volume().fs.available().unwrap_or(u64::MAX);
            for job in jobs.by_ref().take(self.batching.files) {
                if let Some(room) = self.reserve_room(&job, Needs::Room { available }) {
                    batch.push((job, room));
                }
            }
            // Aborted if the publish fails: what it wrote stays in staging, to be resumed.
            let (node, peer, handle) = (self.node.clone(), self.peer.clone(), self.handle.clone());
            let staging = Spawned::spawn(
                "staging",
                stage_batch(node, peer, handle, self.volume_index, batch),
            );
            let before = match self.batching.stage_ahead {
                true => self.staging.replace(staging),
                false => Some(staging),
            };
            if let Some(before) = before {
                self.flush_staged_batch(before).await?;
            }
        }
        Ok(())
    }

    /// Waits for `staging` and leaves it flushing in place of the batch flushed before
    /// it, then publishes that one: a batch flushes while the one before it is
    /// published, instead of the pull waiting for each flush in turn.
    async fn flush_staged_batch(&mut self, staging: Spawned<StagedBatch>) -> Result<(), SyncError> {
        let waited = std::time::Instant::now();
        let staged = match staging.result().await {
            Ok(staged) => staged,
            Err(e) => {
                // What is already flushing goes in all the same.
                self.publish_flushing().await?;
                return Err(e);
            }
        };
        tracing::debug!(
            waited_ms = waited.elapsed().as_millis() as u64,
            "waited for a batch to stage"
        );
        self.report.skipped += staged.skipped;
        self.report.incomplete += staged.incomplete;
        let before = match staged.no_room {
            // Something else took the room meanwhile: what was written stays in
            // staging, to be resumed once there is room.
            Some((files, bytes)) => {
                self.waiting.add(files, bytes);
                self.flushing.take()
            }
            None => {
                self.flushing
                    .replace(Flushing::start(&self.node, self.volume_index, staged.ready))
            }
        };
        match before {
            Some(flushing) => self.publish_flushed(flushing).await,
            None => Ok(()),
        }
    }

    /// Publishes every batch still staging or flushing, and waits for the last one's
    /// index write (also after a failed round: what was fetched is kept).
    pub(super) async fn settle_batches(&mut self) -> Result<(), SyncError> {
        let staged = match self.staging.take() {
            // On failure, what was flushing is published all the same.
            Some(staging) => self.flush_staged_batch(staging).await,
            None => Ok(()),
        };
        let published = self.publish_flushing().await;
        let indexed = self.indexed().await;
        staged.and(published).and(indexed)
    }

    /// Waits for the batch being indexed, if there is one.
    async fn indexed(&mut self) -> Result<(), SyncError> {
        match self.indexing.take() {
            Some(indexing) => indexing.done().await,
            None => Ok(()),
        }
    }

    /// Publishes a batch once its flush is done: placed under the volume lock, then
    /// indexed on the blocking pool ([`Indexing`]), still under it, while the walk goes
    /// on. The batch before it is indexed first: index writes stay in order.
    async fn publish_flushed(&mut self, flushing: Flushing) -> Result<(), SyncError> {
        let waited = std::time::Instant::now();
        let ready = flushing.done().await?;
        tracing::debug!(
            waited_ms = waited.elapsed().as_millis() as u64,
            "waited for a batch to flush"
        );
        self.indexed().await?;
        let lock = self.volume().lock.clone().lock_owned().await;
        let placed = off_async_worker(|| self.place_batch(ready, Durability::Buffered))?;
        if let Some(placed) = placed {
            self.indexing = Some(Indexing::start(&self.node, Arc::new(lock), placed));
        }
        Ok(())
    }

    /// Takes the files whose content a local file about to be deleted holds (the other
    /// half of a rename): each such file is moved into staging, checked, and published
    /// under the volume lock in one go, with no network wait, so no scan ever sees the
    /// old name gone before the new one is there. A file that turns out to lack chunks
    /// (it changed behind the index's back) stays in staging for a later round.
    async fn take_renamed(&mut self, moved: Vec<(FileJob, RenameSource)>) -> Result<(), SyncError> {
        let mut jobs = moved.into_iter().peekable();
        while jobs.peek().is_some() {
            let node = self.node.clone();
            let _guard = node.volumes[self.volume_index].lock.lock().await;
            let mut ready = Vec::new();
            // The directories files leave: their mtimes are put back too (dirty marks).
            let mut left = node.store.batch();
            let mut reads = node.store.chunk_reads();
            for (job, source) in jobs.by_ref().take(self.batching.files) {
                left.mark_dirty(node.volumes[self.volume_index].id, &source.dir);
                self.moved(&source.dir);
                let Some(room) = self.reserve_room(&job, Needs::Nothing) else {
                    continue;
                };
                let Some(chunks) = local_chunk_list(&node, &job)? else {
                    self.report.skipped += 1;
                    continue;
                };
                let name = escape(&job.name);
                let staged = stage_job(
                    &node,
                    &mut reads,
                    self.volume_index,
                    job,
                    chunks,
                    Some(source),
                    room,
                );
                if let Ok(Prepared {
                    taken_from: Some(source),
                    ..
                }) = &staged
                {
                    self.record_moved_away(&mut left, source)?;
                }
                match staged {
                    Ok(file) if file.missing.is_empty() => {
                        ready.push(file.finish(&node, self.volume_index)?)
                    }
                    Ok(_) => self.report.incomplete += 1,
                    Err(e) if e.is_local() => return Err(e),
                    Err(e) => {
                        tracing::warn!("cannot take {name} from a local rename: {e}");
                        self.report.skipped += 1;
                    }
                }
            }
            node.store.write(left, Durability::Buffered)?;
            self.publish(ready)?;
            // Also when nothing was ready: a file may have left its directory.
            self.restore_moved_dir_mtimes()?;
        }
        Ok(())
    }

    /// Records the peer's delete of a local file that has just moved into staging as
    /// the other half of a rename, in the same index write as the move's directory
    /// marks and under the same hold of the volume lock: a scan that comes before the
    /// round's deletes must find the name deleted as received, not missing from disk
    /// (which it would take for a local delete, and send back to every peer).
    fn record_moved_away(
        &mut self,
        batch: &mut crate::store::Batch<'_>,
        source: &RenameSource,
    ) -> Result<(), SyncError> {
        let vol = self.volume().id;
        if let Some(local) = self.node.store.entry(vol, &source.dir, &source.name)? {
            // The old name is a version too (`restore DIR --at` puts a renamed tree back
            // where it was): its content lives on under the new name, so the record
            // costs no pack bytes; a later change of the new name keeps the chunks.
            let chunks = self
                .indexed_chunks(&source.dir, &source.name, Some(&local))?
                .unwrap_or_default();
            if !local.is_tombstone() {
                let version = self.version_record(
                    (&source.dir, &source.name),
                    &local,
                    &source.tombstone.version,
                    Why::Deleted,
                    chunks,
                )?;
                batch.put_version(&version);
            }
            self.forget_chunks_in(batch, &source.dir, &source.name, &local)?;
        }
        batch.put_entry_sent_by(
            vol,
            &source.dir,
            &source.name,
            &source.tombstone,
            source.sent_by,
        );
        batch.delete_stamp(vol, &source.dir, &source.name);
        self.report.deleted += 1;
        Ok(())
    }

    /// Holds room on the volume's file system for `job`'s staging file, or counts the
    /// job as waiting for room, or for another pull that is taking the same file
    /// (`None`). A staging file to resume needs only what it does not hold yet.
    fn reserve_room(&mut self, job: &FileJob, needs: Needs) -> Option<Reservation> {
        let volume = &self.node.volumes[self.volume_index];
        let EntryKind::File { content_id, .. } = &job.entry.kind else {
            return None;
        };
        let size = job.size();
        let staging = staging_name(content_id, &job.dir, &job.name);
        if self
            .wanted_staging
            .as_mut()
            .is_some_and(|wanted| !wanted.insert(&staging))
        {
            self.wanted_staging = None;
        }
        let (available, needed) = match needs {
            Needs::Nothing => (u64::MAX, 0),
            Needs::Room { available } => {
                // An unnamed staging file starts empty whatever staging holds by this name.
                let resumed = match stages_unnamed(&volume.fs, size) {
                    true => 0,
                    false => volume.fs.staged_bytes(&staging),
                };
                (available, size.saturating_sub(resumed))
            }
        };
        match volume.room.reserve(available, needed, &staging) {
            Ok(reservation) => Some(reservation),
            Err(Refused::NoRoom) => {
                self.waiting.add(1, size);
                self.waiting.available_bytes = available;
                None
            }
            // A pull from another peer is taking this very file: it publishes it, and
            // another round soon finds it in place (or takes it, if that pull failed).
            Err(Refused::Busy) => {
                self.report.incomplete += 1;
                None
            }
        }
    }

    /// Makes a batch of assembled files durable and visible, then indexes them durably
    /// (with the peer's deletes of the names they were moved from). Runs under the
    /// volume lock.
    fn publish(&mut self, ready: Vec<ReadyFile>) -> Result<(), SyncError> {
        flush_staged(&self.node, self.volume_index, &ready)?;
        match self.place_batch(ready, Durability::Durable)? {
            Some(placed) => placed.index(&self.node),
            None => Ok(()),
        }
    }

    /// Renames a batch of assembled files, their content flushed already, into place
    /// and gathers their index write, which [`PlacedBatch::index`] makes once their
    /// directories are synced. Runs under the volume lock, held until that write too.
    /// `None` for an empty batch.
    ///
    /// The index write waits for the disk only where `index` asks, or where the batch
    /// kept versions of the files it replaced (a record lost would lose the version).
    /// Otherwise the durable `publishing/` records written first already say what a
    /// power loss leaves on disk (schema/store.md, "Sync"), and the next durable write
    /// (the next batch's records, the round's feed mark) takes the index write to disk
    /// with it: one log `fsync` per batch instead of two.
    fn place_batch(
        &mut self,
        ready: Vec<ReadyFile>,
        index: Durability,
    ) -> Result<Option<PlacedBatch>, SyncError> {
        if ready.is_empty() {
            return Ok(None);
        }
        let node = self.node.clone();
        let vol = self.volume().id;
        let ready_count = ready.len();
        let started = std::time::Instant::now();
        let mut batch = node.store.batch();
        for file in &ready {
            batch.delete_publishing(vol, &file.job.dir, &file.job.name);
        }
        // The versions the batch replaces are kept before the renames take them: their
        // chunks durable in a version pack (one fsync for the batch), their records
        // written with the index write.
        let mut kept = node.store.kept_chunks();
        let mut versions = Vec::with_capacity(ready.len());
        for file in &ready {
            let record = match &file.job.replaces {
                Some(old) => self.keep_version(
                    &mut kept,
                    (&file.job.dir, &file.job.name),
                    old,
                    (&file.job.entry.version, &file.chunks),
                    Why::Replaced,
                )?,
                _ => None,
            };
            versions.push(record);
        }
        kept.finish(&node.store, &mut batch)?;
        let versions_kept = versions.iter().any(Option::is_some);
        let (placings, dirs) = place_all(&node, self.volume_index, ready);
        let mut published = Vec::new();
        let mut echoes = Vec::with_capacity(ready_count);
        for (placing, version) in placings.into_iter().zip(versions) {
            let Placing {
                job,
                chunks,
                removed_dir,
                outcome,
            } = placing;
            if let Some(path) = &removed_dir {
                batch.delete_tree_node(vol, path);
                batch.clear_dirty(vol, path);
            }
            let name = escape(&job.name);
            match outcome {
                Ok(Placement::Placed(Placed { stamp, old_chunks })) => {
                    self.moved(&job.dir);
                    batch.put_entry_sent_by(vol, &job.dir, &job.name, &job.entry, job.sent_by);
                    batch.set_chunks(vol, &job.dir, &job.name, &chunks, old_chunks.as_deref());
                    batch.put_stamp(vol, &job.dir, &job.name, &stamp);
                    batch.mark_dirty(vol, &job.dir);
                    if let Some(version) = &version {
                        batch.put_version(version);
                    }
                    let path = job.dir.join(&job.name);
                    let shown = path.as_ref().ok().map(|p| escape(p.as_bytes()));
                    if let Ok(path) = path {
                        echoes.push((path, Some(stamp)));
                    }
                    published.push((shown.unwrap_or(name), job.size()))
                }
                Ok(Placement::Outdated) => self.report.outdated += 1,
                Ok(Placement::LeftAlone) => self.report.skipped += 1,
                // A name this file system refuses is listed (and said once).
                Err(e) if e.refusal().is_some() => self.placed(&job.dir, &job.name, Err(e))?,
                // One file that cannot be placed does not hold back the others.
                Err(e) => {
                    tracing::warn!("cannot publish {name}: {e}; will retry next round");
                    self.report.skipped += 1;
                }
            }
        }
        // Before the lock goes: a scan must not take the renames for local changes.
        self.restore_moved_dir_mtimes()?;
        let count = published.len() as u64;
        self.report.applied += count;
        node.stats.files_applied.fetch_add(count, Ordering::Relaxed);
        for (path, size) in published {
            self.note_applied("file", path, size);
        }
        self.log_applied();
        Ok(Some(PlacedBatch {
            volume_index: self.volume_index,
            batch: batch.seal(),
            durability: match versions_kept {
                true => Durability::Durable,
                false => index,
            },
            dirs,
            echoes,
            kept,
            any_placed: count > 0,
            files: ready_count,
            started,
            placed: started.elapsed(),
        }))
    }
}

/// A batch renamed into place under the volume lock, its directories not synced and
/// its index write not made yet ([`PlacedBatch::index`]).
pub(super) struct PlacedBatch {
    volume_index: usize,
    batch: crate::store::Sealed,
    durability: Durability,
    /// The directories placed into, open.
    dirs: HashMap<VolPath, OwnedFd>,
    echoes: Vec<(VolPath, Option<crate::store::codec::ScanStamp>)>,
    /// The version packs the batch's records rely on, pinned until they are written.
    kept: crate::store::versions::KeptChunks,
    any_placed: bool,
    files: usize,
    started: std::time::Instant,
    placed: std::time::Duration,
}

impl PlacedBatch {
    /// Syncs the batch's directories, then writes its index: in that order, so that an
    /// index write a power loss keeps never names a file whose rename it lost. Runs
    /// under the volume lock (a scan must not find the files placed but not indexed).
    fn index(self, node: &Node) -> Result<(), SyncError> {
        let synced = std::time::Instant::now();
        for dir_fd in self.dirs.values() {
            crate::volume_fs::VolumeFs::fsync_dir(dir_fd)?;
        }
        let dirs_synced = synced.elapsed();
        if node.faults.crash_before_indexing && self.any_placed {
            tracing::warn!("FAULT INJECTION: dying after publishing, before indexing");
            std::process::exit(99);
        }
        node.store.write_sealed(self.batch, self.durability)?;
        node.volumes[self.volume_index].echoes.expect(self.echoes);
        // The records are written: the packs they rely on may be collected again.
        drop(self.kept);
        tracing::debug!(
            files = self.files,
            dirs = self.dirs.len(),
            placed_ms = self.placed.as_millis() as u64,
            dir_fsyncs_ms = dirs_synced.as_millis() as u64,
            total_ms = self.started.elapsed().as_millis() as u64,
            "batch published"
        );
        Ok(())
    }
}

/// A batch placed ([`PlacedBatch`]) whose directories are synced and index written on
/// the blocking pool, under the volume lock, while the pull decides what comes next:
/// it shares the lock meanwhile ([`Indexing::shared_lock`]), and no scan or other pull
/// of the volume comes in between. A round abandoned lets it finish.
pub(super) struct Indexing {
    lock: Weak<OwnedMutexGuard<()>>,
    task: tokio::task::JoinHandle<Result<(), SyncError>>,
}

impl Indexing {
    fn start(node: &Arc<Node>, lock: Arc<OwnedMutexGuard<()>>, placed: PlacedBatch) -> Self {
        let shared = Arc::downgrade(&lock);
        let node = node.clone();
        let task = tokio::task::spawn_blocking(move || {
            let indexed = placed.index(&node);
            drop(lock);
            indexed
        });
        Indexing { lock: shared, task }
    }

    /// The volume lock this batch holds, while it still does.
    pub(super) fn shared_lock(&self) -> Option<Arc<OwnedMutexGuard<()>>> {
        self.lock.upgrade()
    }

    async fn done(self) -> Result<(), SyncError> {
        self.task.await.map_err(|source| SyncError::Task {
            what: "indexing",
            source,
        })?
    }
}

/// A batch of at least this many files is placed by two threads, each taking half of
/// it: placing is mostly system calls (`linkat`, a `stat`, the index lookups that check
/// each name is still as decided), a batch's publish is the step of a pull that waits
/// for nothing else, and each half's renames land in different directories, or queue on
/// one directory's lock only for the kernel's part.
const PLACE_IN_TWO_FROM: usize = 64;

/// One file of a batch after its placing, for the batch's index write.
struct Placing {
    job: FileJob,
    chunks: Vec<ChunkRef>,
    /// The directory the file replaced, removed from disk (also when the file itself
    /// could not be placed after all): its tree node and dirty mark go.
    removed_dir: Option<VolPath>,
    outcome: Result<Placement, SyncError>,
}

/// What became of a file at placing.
enum Placement {
    Placed(Placed),
    /// The index took another version of the name while the file was fetched (a round
    /// from another peer, a scan): the decision no longer holds and is made again soon
    /// ([`super::PullReport::outdated`]).
    Outdated,
    /// Something local is in the way (changed since the last scan, a directory not
    /// empty): it stays, and reaches the peers from here once scanned.
    LeftAlone,
}

/// A file renamed or linked into place, not indexed yet.
struct Placed {
    /// The stamp of exactly what was written, to index it with.
    stamp: crate::store::codec::ScanStamp,
    /// The chunk list the index held for the name before: its locations go.
    old_chunks: Option<Vec<ChunkRef>>,
}

/// Places a batch of assembled files, their content flushed already, in the order
/// given: a large batch in two halves at once ([`PLACE_IN_TWO_FROM`]). Returns each
/// file's [`Placing`], and the directories placed into, open, to fsync before the index
/// write.
fn place_all(
    node: &Node,
    volume_index: usize,
    ready: Vec<ReadyFile>,
) -> (Vec<Placing>, HashMap<VolPath, OwnedFd>) {
    if ready.len() < PLACE_IN_TWO_FROM {
        return place_run(node, volume_index, ready);
    }
    let span = tracing::Span::current();
    let [(mut placings, mut dirs), (more, more_dirs)] = on_two_threads(ready, |files| {
        span.in_scope(|| place_run(node, volume_index, files))
    });
    placings.extend(more);
    for (dir, fd) in more_dirs {
        dirs.entry(dir).or_insert(fd);
    }
    (placings, dirs)
}

/// Runs `work` on the two halves of `items` at once, on this thread and a scoped one,
/// and returns what it gave for each, the first half's first. If no thread can be
/// started, both halves run here, one after the other.
fn on_two_threads<T: Send, R: Send>(
    mut items: Vec<T>,
    work: impl Fn(Vec<T>) -> R + Sync,
) -> [R; 2] {
    let mut second = Some(items.split_off(items.len() / 2));
    let (first, from_second) = std::thread::scope(|scope| {
        let other = std::thread::Builder::new()
            .name("shoal-place".into())
            .spawn_scoped(scope, || work(second.take().unwrap_or_default()));
        let first = work(items);
        let from_second = other.ok().map(|other| {
            other
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        });
        (first, from_second)
    });
    let second = from_second.unwrap_or_else(|| work(second.unwrap_or_default()));
    [first, second]
}

/// Places `files` one after the other ([`place_one`]).
fn place_run(
    node: &Node,
    volume_index: usize,
    files: Vec<ReadyFile>,
) -> (Vec<Placing>, HashMap<VolPath, OwnedFd>) {
    let mut dirs = HashMap::new();
    let placings = files
        .into_iter()
        .map(|file| place_one(node, volume_index, &mut dirs, file))
        .collect();
    (placings, dirs)
}

/// Renames or links one assembled file into place, unless the name changed here since
/// the decision or since the last scan. Runs under the volume lock.
fn place_one(
    node: &Node,
    volume_index: usize,
    dirs: &mut HashMap<VolPath, OwnedFd>,
    file: ReadyFile,
) -> Placing {
    let ReadyFile {
        job,
        staged,
        chunks,
        ..
    } = file;
    let mut removed_dir = None;
    let outcome = place_staged(node, volume_index, dirs, &job, &staged, &mut removed_dir);
    Placing {
        job,
        chunks,
        removed_dir,
        outcome,
    }
}

/// [`place_one`]'s checks and rename; a directory the file replaces is removed first,
/// and said in `removed_dir`.
fn place_staged(
    node: &Node,
    volume_index: usize,
    dirs: &mut HashMap<VolPath, OwnedFd>,
    job: &FileJob,
    staged: &Staging,
    removed_dir: &mut Option<VolPath>,
) -> Result<Placement, SyncError> {
    let volume = &node.volumes[volume_index];
    let (vol, fs) = (volume.id, &volume.fs);
    if !dirs.contains_key(&job.dir) {
        dirs.insert(job.dir.clone(), fs.open_dir(&job.dir, true)?);
    }
    let dir_fd = &dirs[&job.dir];
    if node.store.entry(vol, &job.dir, &job.name)? != job.decided_against {
        tracing::info!(
            "{} changed here while it was being fetched; decided again soon",
            escape(&job.name)
        );
        return Ok(Placement::Outdated);
    }
    // A name the index holds nothing for has no stamp either: it must be free on
    // disk, which linking an unnamed staging file checks by itself (it never takes
    // a name something holds, `VolumeFs::publish_unnamed`).
    let link_checks = job.decided_against.is_none()
        && job.replaces.is_none()
        && matches!(staged, Staging::Unnamed(_));
    let replaces_dir = job.replaces.as_ref().is_some_and(Entry::is_dir);
    if replaces_dir {
        // A directory goes only once it is empty (its children are synced first).
        if !fs.remove_dir(dir_fd, &job.name)? {
            return Ok(Placement::LeftAlone);
        }
        *removed_dir = job.dir.join(&job.name).ok();
    } else if !link_checks
        && !super::apply::on_disk_as_indexed(
            &node.store,
            volume,
            (dir_fd, &job.dir, &job.name),
            |recorded, current| recorded == current,
        )?
    {
        tracing::info!(
            "{} changed locally since the last scan; not replacing it",
            escape(&job.name)
        );
        return Ok(Placement::LeftAlone);
    }
    // Checked again as it is replaced: a write landing now must not go with it. (A
    // name with no entry has no stamp: nothing to read for a new file.)
    let recorded = match job.decided_against {
        Some(_) => node.store.stamp(vol, &job.dir, &job.name)?,
        None => None,
    };
    if let Some(pause) = node.faults.pause_before_removing {
        tracing::warn!(
            "FAULT INJECTION: pausing {} ms between checking a file and replacing it",
            pause.as_millis()
        );
        std::thread::sleep(pause);
    }
    let placed = match staged {
        Staging::Named(named) => {
            fs.replace_as_checked(&named.temp_name, dir_fd, &job.name, recorded.as_ref())?
        }
        Staging::Unnamed(file) => fs.publish_unnamed(file, dir_fd, &job.name, recorded.as_ref())?,
    };
    if !placed {
        tracing::info!(
            "{} changed here while sync replaced it; kept, the next round decides again",
            escape(&job.name)
        );
        return Ok(Placement::LeftAlone);
    }
    // fstat through the still-open descriptor: the stamp of exactly what we wrote.
    let stat = FileStat::of(staged.file())
        .map_err(SyncError::local(format!("staging {}", escape(&job.name))))?;
    let old_chunks = super::apply::indexed_chunks(
        &node.store,
        volume,
        (&job.dir, &job.name),
        job.replaces.as_ref(),
    )?;
    Ok(Placement::Placed(Placed {
        stamp: stat.stamp(),
        old_chunks,
    }))
}

/// Gets a file's chunk list of `count` chunks from the peer. A list that fits one
/// answer and has no older version here comes whole; otherwise the page hashes come
/// first, and then only the pages we lack (those of `previous`, our older version's
/// list, are reused), a bounded number of chunks per request. What the peer says is
/// checked before it is believed: page sizes in range and adding up to `count`, each
/// answer exactly the chunks asked for. The caller checks the list against the
/// content id.
async fn fetch_chunk_list(
    handle: &mut Handle,
    volume: &str,
    path: &VolPath,
    (content, count): (crate::ids::ContentId, usize),
    previous: Option<Vec<ChunkRef>>,
) -> Result<Option<Vec<ChunkRef>>, SyncError> {
    let ask = |part| Request::GetChunkList {
        volume: volume.to_string(),
        path: path.clone(),
        content_id: content,
        part,
    };
    let unexpected = |other: Response| SyncError::unexpected("GetChunkList", &other);
    let lied = |why: &str| -> SyncError {
        ProtocolError::Malformed(format!("GetChunkList answer: {why}")).into()
    };
    if previous.is_none() && count <= MAX_LIST_CHUNKS {
        return match request(handle, &ask(ListPart::Whole)).await? {
            Response::ChunkList(list) => Ok(list),
            other => Err(unexpected(other)),
        };
    }
    let previous = previous.unwrap_or_default();
    let remote_pages = match request(handle, &ask(ListPart::PageHashes)).await? {
        Response::ChunkPages(Some(pages)) => pages,
        Response::ChunkPages(None) => return Ok(None),
        other => return Err(unexpected(other)),
    };
    let sizes_fit = remote_pages
        .iter()
        .all(|(n, _)| (1..=CHUNK_PAGE_MAX as u32).contains(n));
    if !sizes_fit || remote_pages.iter().map(|(n, _)| *n as usize).sum::<usize>() != count {
        return Err(lied("page sizes do not add up to the file's chunk count"));
    }
    // Ours by hash, only where the size matches what the peer says of that page.
    let ours: HashMap<[u8; 32], std::ops::Range<usize>> = chunk_list_pages(&previous)
        .into_iter()
        .map(|p| (p.hash, p.range))
        .collect();
    let have = |(n, hash): &(u32, [u8; 32])| ours.get(hash).filter(|r| r.len() == *n as usize);
    let mut list = Vec::with_capacity(count);
    let mut batch: Vec<u32> = Vec::new();
    let mut batch_chunks = 0;
    for (index, page) in remote_pages.iter().enumerate() {
        if let Some(range) = have(page) {
            // Pages are spliced in order: what is asked for so far comes first.
            fetch_pages(handle, &ask, &mut batch, &mut batch_chunks, &mut list).await?;
            list.extend_from_slice(&previous[range.clone()]);
            continue;
        }
        if batch_chunks + page.0 as usize > MAX_LIST_CHUNKS {
            fetch_pages(handle, &ask, &mut batch, &mut batch_chunks, &mut list).await?;
        }
        batch.push(index as u32);
        batch_chunks += page.0 as usize;
    }
    fetch_pages(handle, &ask, &mut batch, &mut batch_chunks, &mut list).await?;
    Ok(Some(list))
}

/// Asks for the pages in `batch` (their chunks `batch_chunks` in all), appends them
/// to `list`, and empties the batch. `None` from the peer (its file changed) or an
/// answer of another length is an error: the list cannot be completed.
async fn fetch_pages(
    handle: &mut Handle,
    ask: &impl Fn(ListPart) -> Request,
    batch: &mut Vec<u32>,
    batch_chunks: &mut usize,
    list: &mut Vec<ChunkRef>,
) -> Result<(), SyncError> {
    if batch.is_empty() {
        return Ok(());
    }
    let pages = std::mem::take(batch);
    let wanted = std::mem::take(batch_chunks);
    match request(handle, &ask(ListPart::Pages(pages))).await? {
        Response::ChunkList(Some(chunks)) if chunks.len() == wanted => {
            list.extend(chunks);
            Ok(())
        }
        Response::ChunkList(Some(chunks)) => Err(ProtocolError::Malformed(format!(
            "GetChunkList answer: {} chunks for pages of {wanted}",
            chunks.len()
        ))
        .into()),
        Response::ChunkList(None) => Err(SyncError::Connection(
            "the peer's file changed while its chunk list was fetched".into(),
        )),
        other => Err(SyncError::unexpected("GetChunkList", &other)),
    }
}

/// Whether a file of `size` bytes can have `count` chunks with these chunk sizes (at
/// least `size / max`, at most `size / min` and one more for the tail): a count a peer
/// claims is bounded before anything is fetched or allocated for it.
fn plausible_chunk_count(size: u64, count: usize, params: crate::chunking::ChunkParams) -> bool {
    let count = count as u64;
    let fewest = size.div_ceil(u64::from(params.max));
    let most = size / u64::from(params.min) + 1;
    (size == 0 && count == 0) || (size > 0 && (fewest..=most).contains(&count))
}

/// Gets a file's chunk list (inline, held here, or from the peer) and checks it against
/// the file's entry before anything is staged for it.
async fn list(
    node: Arc<Node>,
    peer: Arc<Peer>,
    mut handle: Handle,
    volume_index: usize,
    job: FileJob,
    room: Reservation,
) -> Result<Option<Listed>, SyncError> {
    let volume = &node.volumes[volume_index];
    let EntryKind::File {
        size,
        content_id: expected,
        chunks: count,
    } = job.entry.kind
    else {
        return Ok(None);
    };
    let count = count as usize;
    if !plausible_chunk_count(size, count, node.meta.chunk_params) {
        peer.rejected_chunks.fetch_add(1, Ordering::Relaxed);
        return Err(SyncError::BadChunkList(peer.addr));
    }
    let chunks = match local_chunk_list(&node, &job)? {
        Some(chunks) => chunks,
        None => {
            // An older version of the file here: only the pages of its list that changed
            // need to come over.
            let previous = match &job.replaces {
                Some(Entry {
                    kind: EntryKind::File { chunks, .. },
                    ..
                }) if *chunks as usize > CHUNK_PAGE_TARGET => {
                    node.store.chunk_list(volume.id, &job.dir, &job.name)?
                }
                _ => None,
            };
            match fetch_chunk_list(
                &mut handle,
                &volume.name,
                &job.source_path,
                (expected, count),
                previous,
            )
            .await?
            {
                Some(list) => list,
                // The peer's file changed meanwhile: a later round gets the new version.
                None => return Ok(None),
            }
        }
    };
    let max = node.meta.chunk_params.max;
    if content_id(&chunks) != expected
        || chunks.len() != count
        || chunks.iter().map(|c| u64::from(c.len)).sum::<u64>() != size
        || chunks.iter().any(|c| c.len == 0 || c.len > max)
    {
        peer.rejected_chunks.fetch_add(1, Ordering::Relaxed);
        return Err(SyncError::BadChunkList(peer.addr));
    }
    Ok(Some(Listed { job, chunks, room }))
}

/// Whether `job`'s chunk list needs no lookup and no question to the peer: an empty
/// file, or a list sent inline (every small file's).
fn list_at_hand(job: &FileJob) -> bool {
    job.chunks.is_some() || job.size() == 0
}

/// A file's chunk list without asking the peer: empty for an empty file, sent inline,
/// or the list of the same content held here (a rename or a copy on the peer).
fn local_chunk_list(node: &Node, job: &FileJob) -> Result<Option<Vec<ChunkRef>>, SyncError> {
    let EntryKind::File {
        size, content_id, ..
    } = job.entry.kind
    else {
        return Ok(None);
    };
    Ok(match (&job.chunks, size) {
        (_, 0) => Some(Vec::new()),
        (Some(inline), _) => Some(inline.clone()),
        (None, _) => node.store.chunk_list_by_content(&content_id)?,
    })
}

/// Opens `job`'s staging file (or moves `source` there, a local file of the same
/// content) and writes into it every chunk of `chunks` held here; what is still missing
/// is left for [`fetch_chunks`].
fn stage_job(
    node: &Node,
    reads: &mut ChunkReads<'_>,
    volume_index: usize,
    job: FileJob,
    chunks: Vec<ChunkRef>,
    source: Option<RenameSource>,
    room: Reservation,
) -> Result<Prepared, SyncError> {
    let volume = &node.volumes[volume_index];
    let EntryKind::File {
        size,
        content_id: expected,
        ..
    } = job.entry.kind
    else {
        unreachable!("file jobs are files");
    };
    let moved = match &source {
        Some(from) => volume.fs.stage_by_move(
            (&from.dir, &from.name),
            &from.stamp,
            &expected,
            &job.dir,
            &job.name,
        )?,
        None => None,
    };
    let unnamed = match (&moved, stages_unnamed(&volume.fs, size)) {
        (None, true) => volume.fs.stage_unnamed(size)?,
        _ => None,
    };
    let (staged, taken_from) = match (moved, unnamed) {
        (Some(staged), _) => (Staging::Named(staged), source),
        (None, Some(file)) => (Staging::Unnamed(Arc::new(file)), None),
        (None, None) => {
            let staged = volume.fs.stage(&expected, &job.dir, &job.name, size)?;
            // An older version of this file, left half-fetched, will not be wanted
            // again: the staging area keeps no abandoned version of a name (a file
            // rewritten all the time would otherwise leave one per version). Unnamed
            // staging files leave nothing behind to begin with.
            if !staged.resumed {
                for old in volume.fs.superseded_by(&staged.temp_name) {
                    if !volume.room.in_use(&old) {
                        let _ = volume.fs.remove_staged(&old);
                    }
                }
            }
            (Staging::Named(staged), None)
        }
    };
    let io = |e: std::io::Error| SyncError::local(format!("staging {}", escape(&job.name)))(e);
    let file = match &staged {
        Staging::Unnamed(file) => file.clone(),
        Staging::Named(named) => Arc::new(named.file.try_clone().map_err(io)?),
    };
    let missing =
        fill_from_local(node, reads, &file, &chunks, staged.resumed(), None).map_err(io)?;
    Ok(Prepared {
        job,
        staged,
        file,
        chunks,
        missing,
        room,
        taken_from,
    })
}

impl Prepared {
    /// Sets the staged file's metadata: it is ready to publish.
    fn finish(self, node: &Node, volume_index: usize) -> Result<ReadyFile, SyncError> {
        let entry = &self.job.entry;
        let owner = node.sync_ownership.then_some((entry.uid, entry.gid));
        let volume = &node.volumes[volume_index];
        let mode = volume.received_file_mode(entry.mode);
        let not_set =
            finish_staged(&self.file, mode, entry.mtime_ns, owner, &entry.xattrs).map_err(
                SyncError::local(format!("staging {}", escape(&self.job.name))),
            )?;
        if !not_set.is_empty() {
            let path = self.job.dir.join(&self.job.name)?;
            volume
                .xattrs_not_applied
                .note(&volume.name, &path, &not_set);
        }
        Ok(ReadyFile {
            job: self.job,
            staged: self.staged,
            chunks: self.chunks,
            _room: self.room,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{Batching, PUBLISH_BATCH, off_async_worker, on_two_threads};

    #[test]
    fn batches_grow_and_stage_ahead_only_where_descriptors_allow() {
        let batching = |files, stage_ahead| Batching { files, stage_ahead };
        // The soft limit many service managers set: two batches of 256 in flight.
        let low = Batching::for_open_files(Some(1024));
        assert_eq!(low, batching(PUBLISH_BATCH, false));
        assert_eq!(Batching::for_open_files(Some(4095)), low);
        assert_eq!(
            Batching::for_open_files(Some(4096)),
            batching(PUBLISH_BATCH, true)
        );
        assert_eq!(
            Batching::for_open_files(Some(8191)),
            batching(PUBLISH_BATCH, true)
        );
        let large = batching(2 * PUBLISH_BATCH, true);
        assert_eq!(Batching::for_open_files(Some(8192)), large);
        assert_eq!(Batching::for_open_files(Some(1 << 20)), large);
        assert_eq!(Batching::for_open_files(None), large);
    }

    #[test]
    fn a_publish_runs_on_any_runtime_and_outside_one() {
        let single = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert_eq!(single.block_on(async { off_async_worker(|| 7) }), 7);
        let multi = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        let on_a_worker = multi.block_on(multi.spawn(async { off_async_worker(|| 7) }));
        assert_eq!(on_a_worker.unwrap(), 7);
        assert_eq!(off_async_worker(|| 7), 7);
    }

    #[test]
    fn two_threads_give_each_half_its_result_in_order() {
        let items: Vec<u32> = (0..101).collect();
        let [first, second] = on_two_threads(items, |half| half);
        assert_eq!(first, (0..50).collect::<Vec<_>>());
        assert_eq!(second, (50..101).collect::<Vec<_>>());
        let threads = on_two_threads(vec![(); 2], |_| std::thread::current().id());
        assert_ne!(threads[0], threads[1], "the halves ran on one thread");
        let [empty, one] = on_two_threads(vec!["only"], |half| half);
        assert_eq!((empty, one), (vec![], vec!["only"]));
    }
}
