//! Moving chunks, for sync and for repair alike: a staging file is filled from the
//! copies this node holds ([`fill_from_local`], [`Node::read_local_chunk`]), and what
//! it still lacks is fetched from the peers ([`fetch_chunks`]) straight into the
//! staging files that wait for it ([`ChunkTargets`]). Every chunk is checked against
//! its BLAKE3 id before it is written.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::task::JoinSet;

use super::{Node, Peer, SyncError};
use crate::chunking::{ChunkRef, zero_chunk};
use crate::ids::{ChunkId, VolumeId};
use crate::protocol::{MAX_CHUNKS_PER_REQUEST, ProtocolError, Request, Response};
use crate::store::{ChunkLocation, StoreError, pack};
use crate::volume_fs::{punch_hole, write_sparse};

/// Chunk requests in flight (together with the files a pull prepares at once, well
/// under the transport's stream limit).
const REQUESTS_IN_FLIGHT: usize = 16;

/// How long a helper (a peer other than the one being pulled from, which has just
/// answered) may take to start answering a chunk request before its chunks are asked of
/// another peer: a live peer sends its first chunk in milliseconds, a frozen one never,
/// and its connection only times out after [`crate::transport`]'s idle timeout.
const HELPER_PATIENCE: std::time::Duration = std::time::Duration::from_millis(500);

impl Node {
    /// Reads a chunk from wherever this node holds it (a live file or a pack), checked
    /// against its id; `None` if no copy is intact. Every location is tried: one in a
    /// volume not open here, or a copy that changed, does not hide a good one. Blocking
    /// (file reads): call it off the async worker threads.
    pub fn read_local_chunk(&self, id: &ChunkId) -> Result<Option<Vec<u8>>, StoreError> {
        self.read_chunk_for(id, None)
    }

    /// [`Node::read_local_chunk`] for a peer: with `holds` (the volumes the peer may
    /// hold, when it may not hold them all), only from live files of those volumes; a
    /// pack's copy belongs to no volume the peer can be shown to hold.
    pub fn read_chunk_for(
        &self,
        id: &ChunkId,
        holds: Option<&[VolumeId]>,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        for location in self.store.chunk_locations(id)? {
            let allowed = match (&location, holds) {
                (_, None) => true,
                (ChunkLocation::Live { vol, .. }, Some(holds)) => holds.contains(vol),
                (ChunkLocation::Pack { .. }, Some(_)) => false,
            };
            if !allowed {
                continue;
            }
            let data = match location {
                ChunkLocation::Live {
                    vol,
                    dir,
                    name,
                    extent,
                } => {
                    let volume = self.volumes.iter().find(|v| v.id == vol);
                    let path = dir.join(&name).ok();
                    volume
                        .zip(path)
                        .and_then(|(volume, path)| volume.fs.read_chunk(&path, extent, id))
                }
                ChunkLocation::Pack { pack, extent } => {
                    let path = self.store.packs_dir().join(pack::pack_file_name(pack));
                    pack::read_chunk(&path, extent, id).ok()
                }
            };
            if data.is_some() {
                return Ok(data);
            }
        }
        Ok(None)
    }
}

/// The chunks a staging file still lacks after [`fill_from_local`], each with its
/// length in the chunk list and the offsets where it goes.
pub type Missing = Vec<(ChunkId, u32, Vec<u64>)>;

/// Writes into `file`, the staging file of content `chunks`, every chunk this node holds
/// intact: already in place (`resumed`: an interrupted transfer, or a file moved into
/// staging), in `nearby` at one of its offsets (the damaged file that repair rebuilds),
/// or anywhere else ([`Node::read_local_chunk`]). Zero chunks (what holes are made
/// of) are holes, and all-zero blocks of the others too ([`write_sparse`]). Returns
/// what is still missing.
pub fn fill_from_local(
    node: &Node,
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
            None => node.read_local_chunk(&id).map_err(io::Error::other)?,
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
    places: HashMap<ChunkId, Vec<(Arc<File>, u64, u32)>>,
}

impl ChunkTargets {
    /// Asks for `id`, `len` bytes long, to be written at `offset` of `file` when it
    /// arrives.
    pub fn add(&mut self, id: ChunkId, len: u32, file: Arc<File>, offset: u64) {
        self.places.entry(id).or_default().push((file, offset, len));
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

    /// The chunks asked for.
    fn ids(&self) -> Vec<ChunkId> {
        self.places.keys().copied().collect()
    }

    /// Writes `data` wherever chunk `id` of its length goes; `false` if no place
    /// wanted that length (a chunk list that lied about it: nothing is written).
    fn write(&self, id: &ChunkId, data: &[u8]) -> std::io::Result<bool> {
        let mut written = false;
        for (file, offset, len) in self.places.get(id).into_iter().flatten() {
            if *len as usize == data.len() {
                write_sparse(file, data, *offset)?;
                written = true;
            }
        }
        Ok(written)
    }
}

/// Fetches the chunks of `targets` into their staging files from the connected peers
/// that share the volume, `first` (the peer being pulled from) first: requests are
/// spread over them, a chunk one peer lacks is asked of another, and a peer that sends
/// wrong bytes, or whose connection failed or kept silent, is not asked again during
/// this batch. Returns the chunks received.
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
    let ids = targets.ids();
    let sink = Arc::new(targets);
    let mut distrusted = vec![false; peers.len()];
    let mut wanted: Vec<ChunkId> = ids;
    let mut received: HashSet<ChunkId> = HashSet::new();
    for attempt in 0..peers.len() * 2 {
        let trusted: Vec<usize> = (0..peers.len()).filter(|&i| !distrusted[i]).collect();
        if wanted.is_empty() || trusted.is_empty() {
            break;
        }
        // Each chunk goes to the next peer on every attempt, so a chunk that one peer
        // lacks is asked of every other in turn, whatever happens to the rest.
        let mut by_peer: Vec<Vec<ChunkId>> = vec![Vec::new(); peers.len()];
        for id in &wanted {
            let spread = usize::from(id.as_bytes()[0]);
            by_peer[trusted[(spread + attempt) % trusted.len()]].push(*id);
        }
        let mut set = JoinSet::new();
        let groups: Vec<(usize, Vec<ChunkId>)> = by_peer
            .iter()
            .enumerate()
            .flat_map(|(index, ids)| {
                ids.chunks(MAX_CHUNKS_PER_REQUEST)
                    .map(move |group| (index, group.to_vec()))
            })
            .collect();
        for (index, group) in groups {
            let (peer, node, sink) = (peers[index].clone(), node.clone(), sink.clone());
            let patience = (index > 0 && first.is_some()).then_some(HELPER_PATIENCE);
            set.spawn(async move {
                let outcome = fetch_group(&node, &peer, &group, &sink, patience).await;
                (index, outcome)
            });
            while set.len() >= REQUESTS_IN_FLIGHT {
                if let Some(done) = set.join_next().await {
                    settle(done, &mut received, &mut distrusted)?;
                }
            }
        }
        while let Some(done) = set.join_next().await {
            settle(done, &mut received, &mut distrusted)?;
        }
        wanted.retain(|id| !received.contains(id));
    }
    Ok(received)
}

/// What one `GetChunks` request brought.
struct GroupOutcome {
    received: Vec<ChunkId>,
    /// The peer sent bytes that did not match their id.
    misbehaved: bool,
}

fn settle(
    done: Result<(usize, Result<GroupOutcome, SyncError>), tokio::task::JoinError>,
    received: &mut HashSet<ChunkId>,
    distrusted: &mut [bool],
) -> Result<(), SyncError> {
    match done {
        Ok((index, Ok(outcome))) => {
            received.extend(outcome.received);
            distrusted[index] |= outcome.misbehaved;
        }
        // This node's own disk: another peer would not help.
        Ok((_, Err(e))) if e.is_local() => return Err(e),
        // The chunks stay wanted and go to another peer in the next pass.
        Ok((index, Err(e))) => {
            tracing::debug!("chunk request failed: {e}");
            distrusted[index] |= e.is_connection_lost();
        }
        Err(e) => {
            return Err(SyncError::Task {
                what: "chunk fetch",
                source: e,
            });
        }
    }
    Ok(())
}

/// One `GetChunks` request to one peer, written to the sink as chunks arrive; wrong
/// bytes are counted against the peer and dropped. With `patience`, a peer that sends
/// nothing for that long after the request is given up on (nothing was received from
/// it, so nothing is fetched twice).
async fn fetch_group(
    node: &Node,
    peer: &Peer,
    ids: &[ChunkId],
    sink: &ChunkTargets,
    patience: Option<std::time::Duration>,
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
        misbehaved: false,
    };
    // One answer per id asked, no more.
    for answer in 0..ids.len() {
        let next = match patience.filter(|_| answer == 0) {
            Some(patience) => tokio::time::timeout(patience, responses.next())
                .await
                .map_err(|_| {
                    SyncError::Connection(format!(
                        "no answer to a chunk request within {} ms",
                        patience.as_millis()
                    ))
                })?,
            None => responses.next().await,
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
