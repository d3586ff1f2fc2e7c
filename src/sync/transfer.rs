//! Moving chunks, for sync and for repair alike: a staging file is filled from the
//! copies this node holds ([`fill_from_local`], [`Node::read_local_chunk_through`]), and what
//! it still lacks is fetched from the peers ([`fetch_chunks`]) straight into the
//! staging files that wait for it ([`ChunkTargets`]). Every chunk is checked against
//! its BLAKE3 id before it is written.
//!
//! Chunks are asked for in the order their files need them (file by file, front to
//! back), and the kernel is told to write each staging file back to disk every
//! [`WRITEBACK_STEP`] bytes as they arrive: the disk works while the transfer goes on,
//! so flushing a batch before it is published finds little left to write (with the
//! kernel's own thresholds, a tenth of memory, it would all wait for that flush).

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io;
use std::num::NonZeroU64;
use std::ops::Range;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tokio::task::JoinSet;

use super::{Node, Peer, SyncError};
use crate::chunking::{ChunkRef, zero_chunk};
use crate::ids::{ChunkId, VolumeId};
use crate::pathname::VolPath;
use crate::protocol::{
    CHUNK_FRAME_OVERHEAD, MAX_CHUNKS_PER_REQUEST, ProtocolError, Request, Response,
};
use crate::store::codec::ScanStamp;
use crate::store::{ChunkLocation, ChunkReads, StoreError, pack};
use crate::volume_fs::{VolumeFs, punch_hole, read_chunk_in, write_sparse};

/// Chunk requests in flight (together with the files a pull prepares at once, well
/// under the transport's stream limit).
const REQUESTS_IN_FLIGHT: usize = 16;

/// How often a chunk request whose peer another peer could stand in for looks at
/// whether that peer went silent ([`crate::transport::is_silent`]).
const SILENCE_CHECK: std::time::Duration = std::time::Duration::from_millis(20);

/// Times a peer may go silent on this node's chunk requests in one batch before it is
/// asked nothing more for it (a peer that keeps freezing and thawing).
const MAX_SILENCES: u32 = 3;

/// Bytes written to one staging file between two requests to the kernel to start
/// writing it back ([`ChunkTargets::write`]).
const WRITEBACK_STEP: u64 = 8 << 20;

/// Who a chunk read from this node's copies is for, which decides how it is checked.
#[derive(Clone, Copy)]
pub enum ReadFor<'a> {
    /// This node itself (a copy into another file, repair): hashed against its id.
    Us,
    /// A peer, which checks every chunk it receives against its id: a live file still
    /// exactly as it was when its chunks were hashed (its stamp) is not hashed again
    /// ([`crate::volume_fs::read_chunk_in`]); anything else is. With `holds`
    /// (the volumes the peer may hold, when it may not hold them all), only from live
    /// files of those volumes: a pack's copy belongs to no volume the peer can be shown
    /// to hold.
    Peer { holds: Option<&'a [VolumeId]> },
}

/// A chunk of a run [`Node::read_run_for`] read: its id, and where its bytes are in the
/// run's buffer (`None`: no intact copy here).
pub type RunChunk = (ChunkId, Option<Range<usize>>);

impl Node {
    /// Reads a chunk from wherever this node holds it (a live file or a pack), checked
    /// against its id; `None` if no copy is intact. Every location is tried: one in a
    /// volume not open here, or a copy that changed, does not hide a good one. Blocking
    /// (file reads): call it off the async worker threads.
    pub fn read_local_chunk(&self, id: &ChunkId) -> Result<Option<Vec<u8>>, StoreError> {
        let locations = self.store.chunk_locations(id)?;
        self.read_own_copy(id, locations)
    }

    /// [`Node::read_local_chunk`], its locations looked up through `reads`: the seek of
    /// an iterator made once for many chunks (a batch's files), not a new iterator for
    /// each (on a first pull of tiny files, one per file: 5% of the receiver's time).
    /// A copy indexed after `reads` was made is not found, and one gone since fails its
    /// hash: either way the chunk is fetched instead.
    pub fn read_local_chunk_through(
        &self,
        reads: &mut ChunkReads<'_>,
        id: &ChunkId,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let locations = reads.locations(id)?;
        self.read_own_copy(id, locations)
    }

    /// The first intact copy of chunk `id` among `locations`, for this node: every copy
    /// is hashed, so no file's stamp is asked for.
    fn read_own_copy(
        &self,
        id: &ChunkId,
        locations: Vec<ChunkLocation>,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let mut data = Vec::new();
        let no_stamp = |_, _: &VolPath, _: &[u8]| Ok(None);
        let reader = (ReadFor::Us, &mut LastDir::default());
        let found = self.read_chunk_into(id, &locations, no_stamp, reader, &mut data)?;
        Ok(found.then_some(data))
    }

    /// Reads for a peer the chunks at the front of `ids`, in order, while their frames
    /// fit in `room` bytes (each chunk's length and [`CHUNK_FRAME_OVERHEAD`]; the first
    /// chunk whatever its length), each from its first intact copy, one after the
    /// other into `buffer`: one call off the async worker threads reads a run of them
    /// (one thread hand-off per run, not per chunk), into one buffer. The ids read leave
    /// `ids`, each returned with where its bytes are in `buffer` (`None`: no intact copy
    /// here). A chunk `listed` says where to find (a listing just read its file's chunk
    /// list) is read there first and hashed: the index is looked up only if it is not
    /// there intact.
    pub fn read_run_for(
        &self,
        ids: &mut VecDeque<ChunkId>,
        room: usize,
        reader: ReadFor<'_>,
        listed: &HashMap<ChunkId, ChunkLocation>,
        buffer: &mut Vec<u8>,
    ) -> Result<Vec<RunChunk>, StoreError> {
        let mut run = Vec::new();
        let mut used = 0;
        let mut reads = self.store.chunk_reads();
        let mut last_dir = LastDir::default();
        while let Some(&id) = ids.front() {
            let fits =
                |len: u32| run.is_empty() || used + len as usize + CHUNK_FRAME_OVERHEAD <= room;
            let start = buffer.len();
            let mut found = false;
            if let Some(noted) = listed.get(&id) {
                if !fits(noted.extent().len) {
                    break;
                }
                // A noted location may be stale: hashed, never taken on a stamp.
                let hashed = |_, _: &VolPath, _: &[u8]| Ok(None);
                let noted = std::slice::from_ref(noted);
                let reader = (reader, &mut last_dir);
                found = self.read_chunk_into(&id, noted, hashed, reader, buffer)?;
            }
            if !found {
                let locations = reads.locations(&id)?;
                let longest = locations.iter().map(|l| l.extent().len).max();
                if !fits(longest.unwrap_or(0)) {
                    break;
                }
                let stamp = |vol, dir: &VolPath, name: &[u8]| reads.stamp(vol, dir, name);
                let reader = (reader, &mut last_dir);
                found = self.read_chunk_into(&id, &locations, stamp, reader, buffer)?;
            }
            ids.pop_front();
            used += buffer.len() - start + CHUNK_FRAME_OVERHEAD;
            run.push((id, found.then_some(start..buffer.len())));
        }
        Ok(run)
    }

    /// Appends chunk `id` to `out` from the first intact copy at `locations` (`false`,
    /// and `out` as it was, if none is), as [`Node::read_local_chunk`] says. `stamp` gives the
    /// scan stamp of a live location's file, read from the same view of the index as
    /// `locations` (a file that still has it holds the chunk there unchanged).
    fn read_chunk_into(
        &self,
        id: &ChunkId,
        locations: &[ChunkLocation],
        stamp: impl Fn(VolumeId, &VolPath, &[u8]) -> Result<Option<ScanStamp>, StoreError>,
        (reader, last_dir): (ReadFor<'_>, &mut LastDir),
        out: &mut Vec<u8>,
    ) -> Result<bool, StoreError> {
        let holds = match reader {
            ReadFor::Us => None,
            ReadFor::Peer { holds } => holds,
        };
        for location in locations {
            let allowed = match (location, holds) {
                (_, None) => true,
                (ChunkLocation::Live { vol, .. }, Some(holds)) => holds.contains(vol),
                (ChunkLocation::Pack { .. }, Some(_)) => false,
            };
            if !allowed {
                continue;
            }
            let found = match location {
                ChunkLocation::Live {
                    vol,
                    dir,
                    name,
                    extent,
                } => {
                    let volume = self.volumes.iter().find(|v| v.id == *vol);
                    // What the file was when its chunks were hashed: unchanged since, it
                    // is not hashed again for a peer.
                    let indexed = match reader {
                        ReadFor::Us => None,
                        ReadFor::Peer { .. } => stamp(*vol, dir, name)?,
                    };
                    volume.is_some_and(|volume| {
                        last_dir.open(&volume.fs, *vol, dir).is_some_and(|dir_fd| {
                            read_chunk_in(dir_fd, name, *extent, id, indexed.as_ref(), out)
                        })
                    })
                }
                ChunkLocation::Pack { pack, extent } => {
                    let path = self.store.packs_dir().join(pack::pack_file_name(*pack));
                    pack::read_chunk(&path, *extent, id)
                        .map(|data| out.extend_from_slice(&data))
                        .is_ok()
                }
            };
            if found {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// The directory the last chunk read from a live file was in, kept open for the next
/// read: a run of chunks served is mostly of files in one directory (those a listing
/// just named), and opening the directory beneath the volume (`openat2`) and closing it
/// again for each was about a third of reading a small file's chunk. Kept for one run
/// (one call off the async workers): a directory renamed meanwhile is still read
/// through, and what is read there is checked as anywhere else (the file's stamp, or
/// its hash), under the same volume-access rule.
#[derive(Default)]
struct LastDir(Option<(VolumeId, VolPath, OwnedFd)>);

impl LastDir {
    /// The directory `dir` of volume `vol` on `fs`, opened unless it was the last one.
    fn open(&mut self, fs: &VolumeFs, vol: VolumeId, dir: &VolPath) -> Option<&OwnedFd> {
        if !matches!(&self.0, Some((v, d, _)) if *v == vol && d == dir) {
            self.0 = None;
            let opened = fs.open_dir(dir, false).ok()?;
            self.0 = Some((vol, dir.clone(), opened));
        }
        self.0.as_ref().map(|(_, _, opened)| opened)
    }
}

/// The chunks a staging file still lacks after [`fill_from_local`], each with its
/// length in the chunk list and the offsets where it goes.
pub type Missing = Vec<(ChunkId, u32, Vec<u64>)>;

/// Writes into `file`, the staging file of content `chunks`, every chunk this node holds
/// intact: already in place (`resumed`: an interrupted transfer, or a file moved into
/// staging), in `nearby` at one of its offsets (the damaged file that repair rebuilds),
/// or anywhere else the index, read through `reads`, says
/// ([`Node::read_local_chunk_through`]). Zero chunks (what holes are made of) are
/// holes, and all-zero blocks of the others too ([`write_sparse`]). Returns what is
/// still missing.
pub fn fill_from_local(
    node: &Node,
    reads: &mut ChunkReads<'_>,
    file: &File,
    chunks: &[ChunkRef],
    resumed: bool,
    nearby: Option<&File>,
) -> io::Result<Missing> {
    // Each distinct chunk once, in file order, with every offset it goes to.
    let mut places: Vec<(ChunkId, u32, Vec<u64>)> = Vec::new();
    let mut seen: HashMap<ChunkId, usize> = HashMap::new();
    let mut offset = 0u64;
    for chunk in chunks {
        let index = *seen.entry(chunk.id).or_insert_with(|| {
            places.push((chunk.id, chunk.len, Vec::new()));
            places.len() - 1
        });
        places[index].2.push(offset);
        offset += u64::from(chunk.len);
    }
    let mut missing = Missing::new();
    let mut buffer = Vec::new();
    let zero = zero_chunk(node.meta.chunk_params);
    for (id, len, offsets) in places {
        // A run of zeros (a hole on the sender) is a hole here too, never fetched.
        if (id, len) == (zero.id, zero.len) {
            for &at in &offsets {
                punch_hole(file, at, u64::from(len))?;
            }
            continue;
        }
        buffer.resize(len as usize, 0);
        let mut intact_in = |from: &File| {
            offsets.iter().copied().find(|&at| {
                from.read_exact_at(&mut buffer, at).is_ok() && ChunkId::of(&buffer) == id
            })
        };
        // In place already: only its other offsets need it.
        if let Some(here) = resumed.then(|| intact_in(file)).flatten() {
            for &at in offsets.iter().filter(|&&at| at != here) {
                write_sparse(file, &buffer, at)?;
            }
            continue;
        }
        let data = match nearby.and_then(&mut intact_in) {
            Some(_) => Some(std::mem::take(&mut buffer)),
            None => node
                .read_local_chunk_through(reads, &id)
                .map_err(io::Error::other)?,
        };
        // A copy of another length than the list says is not this list's chunk (the
        // list lies: its id vouches for the bytes, not for the length claimed).
        match data.filter(|data| data.len() == len as usize) {
            Some(data) => {
                for &at in &offsets {
                    write_sparse(file, &data, at)?;
                }
            }
            None => missing.push((id, len, offsets)),
        }
    }
    Ok(missing)
}

/// Every place (staging file, offset, length the chunk must have there) a chunk of the
/// current batch goes.
#[derive(Default)]
pub struct ChunkTargets {
    /// The chunks in the order they were first asked for: the order they are fetched in.
    order: Vec<ChunkId>,
    /// Where each goes: an index into `files`, the offset, the length it must have.
    places: HashMap<ChunkId, Vec<(usize, u64, u32)>>,
    files: Vec<Filling>,
}

/// A file being filled, and what was written to it since the kernel was last asked to
/// write it back.
struct Filling {
    file: Arc<File>,
    unflushed: Mutex<Unflushed>,
}

/// Bytes written to a file and the range they span, since its last writeback request.
#[derive(Default)]
struct Unflushed {
    bytes: u64,
    start: u64,
    end: u64,
}

impl Filling {
    /// Notes `len` bytes written at `offset`; past [`WRITEBACK_STEP`] of them, asks the
    /// kernel to write back the range they span. `POSIX_FADV_DONTNEED` starts that
    /// writeback without waiting for it (and drops the pages already written from the
    /// cache: a large transfer does not push everything else out of it). Advice only: a
    /// file system that ignores it is flushed in full when the batch is published.
    fn wrote(&self, offset: u64, len: u64) {
        let range = {
            let mut unflushed = self.unflushed.lock().expect("writeback lock");
            if unflushed.bytes == 0 {
                (unflushed.start, unflushed.end) = (offset, offset + len);
            }
            unflushed.bytes += len;
            unflushed.start = unflushed.start.min(offset);
            unflushed.end = unflushed.end.max(offset + len);
            if unflushed.bytes < WRITEBACK_STEP {
                return;
            }
            let range = (unflushed.start, unflushed.end);
            *unflushed = Unflushed::default();
            range
        };
        let _ = rustix::fs::fadvise(
            &*self.file,
            range.0,
            NonZeroU64::new(range.1 - range.0),
            rustix::fs::Advice::DontNeed,
        );
    }
}

impl ChunkTargets {
    /// Asks for `id`, `len` bytes long, to be written at `offset` of `file` when it
    /// arrives.
    pub fn add(&mut self, id: ChunkId, len: u32, file: Arc<File>, offset: u64) {
        let file = match self.files.last() {
            Some(last) if Arc::ptr_eq(&last.file, &file) => self.files.len() - 1,
            _ => match self.files.iter().position(|f| Arc::ptr_eq(&f.file, &file)) {
                Some(index) => index,
                None => {
                    self.files.push(Filling {
                        file,
                        unflushed: Mutex::default(),
                    });
                    self.files.len() - 1
                }
            },
        };
        let places = self.places.entry(id).or_default();
        if places.is_empty() {
            self.order.push(id);
        }
        places.push((file, offset, len));
    }

    /// Asks for what `file` still lacks.
    pub fn add_missing(&mut self, missing: &Missing, file: &Arc<File>) {
        for (id, len, offsets) in missing {
            for &offset in offsets {
                self.add(*id, *len, file.clone(), offset);
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.places.is_empty()
    }

    /// The chunks asked for, in the order they were.
    fn ids(&self) -> Vec<ChunkId> {
        self.order.clone()
    }

    /// Writes `data` wherever chunk `id` of its length goes; `false` if no place
    /// wanted that length (a chunk list that lied about it: nothing is written).
    fn write(&self, id: &ChunkId, data: &[u8]) -> std::io::Result<bool> {
        let mut written = false;
        for &(file, offset, len) in self.places.get(id).into_iter().flatten() {
            if len as usize == data.len() {
                let filling = &self.files[file];
                write_sparse(&filling.file, data, offset)?;
                filling.wrote(offset, u64::from(len));
                written = true;
            }
        }
        Ok(written)
    }
}

/// Fetches the chunks of `targets` into their staging files from the connected peers
/// that share the volume (`first`, the peer being pulled from, among them; it lists what
/// it holds). Requests are spread over the peers heard from lately: a peer gone silent
/// (frozen, cut off: [`Peer::is_silent`]) is asked for a chunk only once every other
/// peer said it lacks it, and a request outstanding to a peer that goes silent is asked
/// of another at once, as soon as the silence shows (a few hundred milliseconds), not
/// after the connection's idle timeout. A chunk one peer lacks is asked of the others in
/// turn; a peer that sends wrong bytes, or whose connection fails, is asked nothing more
/// in this batch. Returns the chunks received.
pub async fn fetch_chunks(
    node: &Arc<Node>,
    first: Option<&Arc<Peer>>,
    volume_index: usize,
    targets: ChunkTargets,
) -> Result<HashSet<ChunkId>, SyncError> {
    let volume = &node.volumes[volume_index].name;
    let others = node.peers().into_iter().filter(|p| {
        !first.is_some_and(|f| Arc::ptr_eq(f, p)) && p.shares(volume) && p.connection().is_some()
    });
    let peers: Vec<Arc<Peer>> = first.cloned().into_iter().chain(others).collect();
    let mut plan = FetchPlan {
        queue: targets.ids(),
        distrusted: vec![false; peers.len()],
        silences: vec![0; peers.len()],
        lacking: HashSet::new(),
    };
    let sink = Arc::new(targets);
    let mut received: HashSet<ChunkId> = HashSet::new();
    // Requests waiting for a slot among the REQUESTS_IN_FLIGHT, and those in flight.
    let mut ready: VecDeque<Group> = VecDeque::new();
    let mut set = JoinSet::new();
    loop {
        if !plan.queue.is_empty() {
            let silent: Vec<bool> = peers.iter().map(|p| p.is_silent()).collect();
            ready.extend(plan.assign(&silent));
        }
        while set.len() < REQUESTS_IN_FLIGHT
            && let Some(group) = ready.pop_front()
        {
            if plan.distrusted[group.peer] {
                plan.queue.extend(group.ids);
                continue;
            }
            let (peer, node, sink) = (peers[group.peer].clone(), node.clone(), sink.clone());
            set.spawn(async move {
                let outcome = fetch_group(&node, &peer, &group.ids, &sink, group.stand_in).await;
                (group, outcome)
            });
        }
        if set.is_empty() && !plan.queue.is_empty() {
            continue;
        }
        let Some(done) = set.join_next().await else {
            break;
        };
        let (group, outcome) = done.map_err(|e| SyncError::Task {
            what: "chunk fetch",
            source: e,
        })?;
        plan.settle(&peers, group, outcome, &mut received)?;
    }
    Ok(received)
}

/// Which chunks are still to be asked for, and of whom they may be.
struct FetchPlan {
    /// Chunks to ask for (again).
    queue: Vec<ChunkId>,
    /// Peers asked nothing more in this batch (wrong bytes, a failed connection, or
    /// silent too often).
    distrusted: Vec<bool>,
    /// How often each peer went silent on a request of this batch.
    silences: Vec<u32>,
    /// (chunk, peer) pairs where the peer said it lacks the chunk.
    lacking: HashSet<(ChunkId, usize)>,
}

/// One `GetChunks` request: the peer (an index into the batch's peers) and the ids.
struct Group {
    peer: usize,
    ids: Vec<ChunkId>,
    /// Another peer heard from lately could be asked for these chunks instead: if this
    /// one goes silent, the request is given up and they are.
    stand_in: bool,
}

impl FetchPlan {
    /// Groups the queued chunks by the peer each is asked of: among the peers that may
    /// hold it (trusted, not known to lack it), one of those heard from lately, spread
    /// by the chunk's id; a silent one only if no other is left. A chunk no peer may
    /// hold is dropped (the file it belongs to stays unfinished this round).
    fn assign(&mut self, silent: &[bool]) -> Vec<Group> {
        let mut groups: HashMap<(usize, bool), Vec<ChunkId>> = HashMap::new();
        for id in std::mem::take(&mut self.queue) {
            let may_hold: Vec<usize> = (0..silent.len())
                .filter(|&i| !self.distrusted[i] && !self.lacking.contains(&(id, i)))
                .collect();
            let heard: Vec<usize> = may_hold.iter().copied().filter(|&i| !silent[i]).collect();
            let spread = usize::from(id.as_bytes()[0]);
            let (peer, stand_in) = match (heard.len(), may_hold.len()) {
                (_, 0) => continue,
                (0, n) => (may_hold[spread % n], false),
                (n, _) => (heard[spread % n], n > 1),
            };
            groups.entry((peer, stand_in)).or_default().push(id);
        }
        groups
            .into_iter()
            .flat_map(|((peer, stand_in), ids)| {
                ids.chunks(MAX_CHUNKS_PER_REQUEST)
                    .map(|ids| Group {
                        peer,
                        ids: ids.to_vec(),
                        stand_in,
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Takes note of how one request ended: what arrived, which peer lacks what, and
    /// which chunks to ask of someone else.
    fn settle(
        &mut self,
        peers: &[Arc<Peer>],
        group: Group,
        outcome: Result<GroupOutcome, SyncError>,
        received: &mut HashSet<ChunkId>,
    ) -> Result<(), SyncError> {
        let peer = group.peer;
        let outcome = match outcome {
            Ok(outcome) => outcome,
            // This node's own disk: another peer would not help.
            Err(e) if e.is_local() => return Err(e),
            Err(e) => {
                tracing::debug!(peer = %peers[peer].addr, "chunk request failed: {e}");
                if e.is_connection_lost() {
                    self.distrusted[peer] = true;
                } else {
                    // An error answer: this peer does not give these chunks now.
                    self.lacking.extend(group.ids.iter().map(|id| (*id, peer)));
                }
                self.queue.extend(group.ids);
                return Ok(());
            }
        };
        received.extend(outcome.received.iter().copied());
        self.distrusted[peer] |= outcome.misbehaved;
        let answered: HashSet<ChunkId> = outcome.answered.into_iter().collect();
        for id in group.ids.into_iter().filter(|id| !received.contains(id)) {
            if outcome.silent && !answered.contains(&id) {
                self.queue.push(id);
                continue;
            }
            // Said missing, sent wrong, or left out of a complete answer.
            self.lacking.insert((id, peer));
            self.queue.push(id);
        }
        if outcome.silent {
            self.silences[peer] += 1;
            self.distrusted[peer] |= self.silences[peer] >= MAX_SILENCES;
            tracing::debug!(peer = %peers[peer].addr, "peer went silent on a chunk request; asking another");
        }
        Ok(())
    }
}

/// What one `GetChunks` request brought.
struct GroupOutcome {
    received: Vec<ChunkId>,
    /// Ids the peer answered for (with a chunk, right or wrong, or `ChunkMissing`).
    answered: Vec<ChunkId>,
    /// The peer sent bytes that did not match their id.
    misbehaved: bool,
    /// The peer went silent before answering for every id (the request was given up).
    silent: bool,
}

/// One `GetChunks` request to one peer, written to the sink as chunks arrive; wrong
/// bytes are counted against the peer and dropped. With `stand_in` (another peer could
/// be asked instead), the request is given up as soon as the peer goes silent: what it
/// sent until then is kept, the rest is asked of another peer.
async fn fetch_group(
    node: &Node,
    peer: &Peer,
    ids: &[ChunkId],
    sink: &ChunkTargets,
    stand_in: bool,
) -> Result<GroupOutcome, SyncError> {
    let mut handle = peer.connection().ok_or(SyncError::NotConnected)?;
    let wanted: HashSet<ChunkId> = ids.iter().copied().collect();
    // Each answer frame is read whole: it may be no larger than the agreed largest chunk.
    let mut responses = super::open_request(&mut handle, &Request::GetChunks { ids: ids.to_vec() })
        .await?
        .with_frame_limit(crate::protocol::chunk_frame_limit(
            node.meta.chunk_params.max,
        ));
    let mut outcome = GroupOutcome {
        received: Vec::new(),
        answered: Vec::new(),
        misbehaved: false,
        silent: false,
    };
    // One answer per id asked, no more.
    for _ in 0..ids.len() {
        let next = match stand_in {
            true => match until_silent(&handle, responses.next()).await {
                Some(next) => next,
                None => {
                    outcome.silent = true;
                    return Ok(outcome);
                }
            },
            false => responses.next().await,
        };
        let next = match next {
            Err(SyncError::Protocol(ProtocolError::TooLarge { len, limit })) => {
                tracing::warn!(peer = %peer.addr, "peer answered a chunk request with a frame of {len} bytes, over the {limit} the agreed largest chunk takes; not reading it, and not trusting the peer for this transfer");
                outcome.misbehaved = true;
                break;
            }
            next => next?,
        };
        let Some(response) = next else {
            break;
        };
        match response {
            Response::Chunk { id, data } if wanted.contains(&id) => {
                outcome.answered.push(id);
                if ChunkId::of(&data) != id {
                    tracing::warn!(peer = %peer.addr, "peer sent wrong bytes for chunk {id}; not trusting it for this transfer");
                    peer.rejected_chunks.fetch_add(1, Ordering::Relaxed);
                    node.stats.rejected_chunks.fetch_add(1, Ordering::Relaxed);
                    outcome.misbehaved = true;
                    continue;
                }
                node.rate
                    .pass(
                        peer.identity().as_ref(),
                        crate::rate::Direction::Received,
                        data.len(),
                    )
                    .await;
                let len = data.len() as u64;
                peer.chunk_bytes_received.fetch_add(len, Ordering::Relaxed);
                node.stats
                    .chunk_bytes_received
                    .fetch_add(len, Ordering::Relaxed);
                if !sink
                    .write(&id, &data)
                    .map_err(SyncError::local("staging"))?
                {
                    tracing::warn!(peer = %peer.addr, "chunk {id} is {len} bytes, not the length its chunk list gave; not using it");
                    continue;
                }
                outcome.received.push(id);
            }
            Response::ChunkMissing { id } if wanted.contains(&id) => outcome.answered.push(id),
            Response::ChunkMissing { .. } => {}
            Response::Error { code, message } => {
                return Err(ProtocolError::Remote { code, message }.into());
            }
            other => {
                return Err(SyncError::unexpected("GetChunks", &other));
            }
        }
    }
    Ok(outcome)
}

/// Awaits `answer` unless the connection's peer goes silent first (`None` then).
async fn until_silent<T>(
    connection: &s2n_quic::connection::Handle,
    answer: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::pin!(answer);
    let mut checks = tokio::time::interval(SILENCE_CHECK);
    loop {
        tokio::select! {
            answer = &mut answer => return Some(answer),
            _ = checks.tick() => if crate::transport::is_silent(connection) {
                return None;
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(ids: &[ChunkId], peers: usize) -> FetchPlan {
        FetchPlan {
            queue: ids.to_vec(),
            distrusted: vec![false; peers],
            silences: vec![0; peers],
            lacking: HashSet::new(),
        }
    }

    fn peers(n: usize) -> Vec<Arc<Peer>> {
        (0..n)
            .map(|i| Arc::new(Peer::new(([127, 0, 0, 1], 7000 + i as u16).into())))
            .collect()
    }

    /// Every id once, to whom, and whether another peer could stand in.
    fn asked(groups: &[Group]) -> Vec<(ChunkId, usize, bool)> {
        let mut asked: Vec<_> = groups
            .iter()
            .flat_map(|g| g.ids.iter().map(move |id| (*id, g.peer, g.stand_in)))
            .collect();
        asked.sort();
        asked
    }

    /// A run's reads in one directory open it once; another directory, or the same
    /// path in another volume, is opened anew, and a directory that cannot be opened
    /// leaves nothing cached.
    #[test]
    fn a_run_opens_each_directory_it_reads_in_once_in_a_row() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("d")).unwrap();
        std::fs::create_dir_all(root.path().join("e")).unwrap();
        let fs = VolumeFs::open(root.path()).unwrap();
        let (vol, other_vol) = (VolumeId(1), VolumeId(2));
        let d = VolPath::parse(b"d").unwrap();
        let inode = |fd: &OwnedFd| rustix::fs::fstat(fd).unwrap().st_ino;
        let mut last = LastDir::default();
        let first = inode(last.open(&fs, vol, &d).unwrap());
        // Renamed away: the run still reads through the directory it opened.
        std::fs::rename(root.path().join("d"), root.path().join("moved")).unwrap();
        assert_eq!(inode(last.open(&fs, vol, &d).unwrap()), first);
        // The same path in another volume is another directory: opened anew (and gone).
        assert!(last.open(&fs, other_vol, &d).is_none());
        assert!(last.0.is_none());
        assert!(last.open(&fs, vol, &d).is_none());
        let e = VolPath::parse(b"e").unwrap();
        assert_ne!(inode(last.open(&fs, vol, &e).unwrap()), first);
    }

    #[test]
    fn chunks_are_fetched_file_by_file_in_file_order_and_written_to_every_place() {
        let dir = tempfile::tempdir().unwrap();
        let open = |name: &str| {
            let file = File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(dir.path().join(name))
                .unwrap();
            file.set_len(8).unwrap();
            Arc::new(file)
        };
        let (first, second) = (open("first"), open("second"));
        let id = |bytes: &[u8]| ChunkId::of(bytes);
        let mut targets = ChunkTargets::default();
        targets.add(id(b"zzzz"), 4, first.clone(), 0);
        targets.add(id(b"aaaa"), 4, first.clone(), 4);
        // In both files: asked for once, at its first place in the order.
        targets.add(id(b"zzzz"), 4, second.clone(), 4);
        targets.add(id(b"mmmm"), 4, second.clone(), 0);
        assert_eq!(targets.ids(), vec![id(b"zzzz"), id(b"aaaa"), id(b"mmmm")]);
        assert!(targets.write(&id(b"zzzz"), b"zzzz").unwrap());
        assert!(targets.write(&id(b"aaaa"), b"aaaa").unwrap());
        assert!(targets.write(&id(b"mmmm"), b"mmmm").unwrap());
        // A chunk of another length than asked is written nowhere.
        assert!(!targets.write(&id(b"aaaa"), b"aaaaa").unwrap());
        assert_eq!(
            std::fs::read(dir.path().join("first")).unwrap(),
            b"zzzzaaaa"
        );
        assert_eq!(
            std::fs::read(dir.path().join("second")).unwrap(),
            b"mmmmzzzz"
        );
    }

    #[test]
    fn a_silent_peer_is_asked_only_for_what_the_others_lack() {
        let ids: Vec<ChunkId> = (0..200u32).map(|i| ChunkId::of(&i.to_le_bytes())).collect();
        let peers = peers(2);
        let mut plan = plan(&ids, 2);
        // Peer 1 is silent: everything goes to peer 0, with nobody to stand in.
        let groups = plan.assign(&[false, true]);
        assert!(groups.iter().all(|g| g.ids.len() <= MAX_CHUNKS_PER_REQUEST));
        assert!(
            asked(&groups)
                .iter()
                .all(|&(_, peer, stand_in)| peer == 0 && !stand_in)
        );
        // Peer 0 lacks the first id and sends the rest.
        let mut received = HashSet::new();
        for group in groups {
            let outcome = GroupOutcome {
                received: group
                    .ids
                    .iter()
                    .copied()
                    .filter(|id| *id != ids[0])
                    .collect(),
                answered: group.ids.clone(),
                misbehaved: false,
                silent: false,
            };
            plan.settle(&peers, group, Ok(outcome), &mut received)
                .unwrap();
        }
        assert_eq!(received.len(), 199);
        // Only then is the silent peer asked, for that one id.
        let groups = plan.assign(&[false, true]);
        assert_eq!(asked(&groups), vec![(ids[0], 1, false)]);
        // It lacks it too: nobody is left to ask.
        let group = groups.into_iter().next().unwrap();
        let outcome = GroupOutcome {
            received: Vec::new(),
            answered: group.ids.clone(),
            misbehaved: false,
            silent: false,
        };
        plan.settle(&peers, group, Ok(outcome), &mut received)
            .unwrap();
        assert!(plan.assign(&[false, true]).is_empty());
    }

    #[test]
    fn what_a_peer_going_silent_left_unanswered_goes_to_another_at_once() {
        let ids: Vec<ChunkId> = (0..100u32).map(|i| ChunkId::of(&i.to_le_bytes())).collect();
        let peers = peers(2);
        let mut plan = plan(&ids, 2);
        // Both answer: the ids are spread, and each side has a stand-in.
        let groups = plan.assign(&[false, false]);
        let spread = asked(&groups);
        assert!(spread.iter().any(|&(_, peer, _)| peer == 0));
        assert!(spread.iter().any(|&(_, peer, _)| peer == 1));
        assert!(spread.iter().all(|&(_, _, stand_in)| stand_in));
        let mut received = HashSet::new();
        let mut given_up = Vec::new();
        for group in groups {
            let outcome = match group.peer {
                0 => GroupOutcome {
                    received: group.ids.clone(),
                    answered: group.ids.clone(),
                    misbehaved: false,
                    silent: false,
                },
                // Peer 1 sent one chunk, then went silent.
                _ => {
                    given_up.extend(group.ids[1..].iter().copied());
                    GroupOutcome {
                        received: group.ids[..1].to_vec(),
                        answered: group.ids[..1].to_vec(),
                        misbehaved: false,
                        silent: true,
                    }
                }
            };
            plan.settle(&peers, group, Ok(outcome), &mut received)
                .unwrap();
        }
        // What it did not answer is asked of peer 0 (peer 1 is silent now), and only that.
        let groups = plan.assign(&[false, true]);
        given_up.sort();
        let again: Vec<ChunkId> = asked(&groups).iter().map(|(id, _, _)| *id).collect();
        assert_eq!(again, given_up);
        assert!(asked(&groups).iter().all(|&(_, peer, _)| peer == 0));
        // Heard again, it is not held against it: it is asked for the ids peer 0 lacks.
        let lacked = groups.into_iter().next().unwrap();
        let first = lacked.ids[0];
        let outcome = GroupOutcome {
            received: Vec::new(),
            answered: lacked.ids.clone(),
            misbehaved: false,
            silent: false,
        };
        plan.settle(&peers, lacked, Ok(outcome), &mut received)
            .unwrap();
        let groups = plan.assign(&[false, false]);
        assert!(
            asked(&groups)
                .iter()
                .any(|&(id, peer, _)| id == first && peer == 1)
        );
    }

    #[test]
    fn a_peer_that_keeps_going_silent_is_asked_nothing_more_in_the_batch() {
        let ids = vec![ChunkId::of(b"one chunk")];
        let peers = peers(2);
        let mut plan = plan(&ids, 2);
        let mut received = HashSet::new();
        for _ in 0..MAX_SILENCES {
            // Peer 1 looks live each time it is asked, then goes silent.
            let group = Group {
                peer: 1,
                ids: ids.clone(),
                stand_in: true,
            };
            let outcome = GroupOutcome {
                received: Vec::new(),
                answered: Vec::new(),
                misbehaved: false,
                silent: true,
            };
            plan.settle(&peers, group, Ok(outcome), &mut received)
                .unwrap();
            plan.queue.clear();
        }
        assert!(plan.distrusted[1]);
        plan.queue = ids.clone();
        assert_eq!(
            asked(&plan.assign(&[false, false])),
            vec![(ids[0], 0, false)]
        );
    }
}
