//! `GetChunks`: one frame per id asked, the chunk's bytes (read from a live file or a
//! pack and checked: [`ReadFor::Peer`]; first where a listing found it,
//! [`super::listed`]) or `ChunkMissing`. The reads run on tokio's
//! blocking pool, a run of chunks at a time per request ([`READ_RUN`] bytes of frames,
//! [`Node::read_run_for`]): a slow disk (or a file a local user swapped for something
//! else) never holds an async worker thread, and a 64 KiB chunk does not cost two
//! thread hand-offs of its own. A run is read into one buffer, and its chunks go to the
//! stream as slices of it ([`crate::protocol::send_frame`]): s2n-quic sends them from
//! there, nothing copies them. Once they are all acknowledged the buffer is kept for a
//! later run ([`SPARE_RUNS`]).
//!
//! Each run's cost (its frames, which s2n-quic holds until they are acknowledged) is
//! reserved from the node's budget before it is read; the frames written stay reserved
//! until the requester acknowledges them, which the answer waits for whenever
//! [`UNACKED_PER_STREAM`] bytes are outstanding: a requester that stops reading holds at
//! most that much of one stream's answer and a run.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use s2n_quic::stream::SendStream;

use super::budget::{READ_RUN, UNACKED_PER_STREAM};
use super::{REPLY_TIMEOUT, Reserved, Session, internal, reply, reserve};
use crate::ids::{ChunkId, VolumeId};
use crate::protocol::{ErrorCode, ProtocolError, Response};
use crate::rate::Direction;
use crate::sync::Node;
use crate::sync::transfer::ReadFor;

pub(super) async fn send(
    node: &Arc<Node>,
    session: &Session,
    ids: Vec<ChunkId>,
    send: &mut SendStream,
    held: &mut Reserved,
) -> Result<(), ProtocolError> {
    // The largest frame a chunk of this node's can take: a run has room for one at least.
    let frame_bound = crate::protocol::chunk_frame_limit(node.meta.chunk_params.max);
    // A peer that may not hold every volume is served only what the volumes it may hold
    // contain.
    let holds: Option<Arc<[VolumeId]>> = (!node.access.is_open()).then(|| {
        node.volumes
            .iter()
            .filter(|v| node.access.allows(&v.name, &session.peer))
            .map(|v| v.id)
            .collect()
    });
    // Where listings found the chunks, read there first.
    let mut listed = node.listed.locations_of(&ids);
    // `held` keeps the request (the ids) until the answer ends; the loop holds the
    // frames written and not yet acknowledged.
    let request = std::mem::take(held);
    let mut ids = VecDeque::from(ids);
    while !ids.is_empty() {
        if held.bytes() >= UNACKED_PER_STREAM {
            wait_for_acknowledgement(send).await?;
            *held = Reserved::default();
        }
        let mut cost = reserve(node, session, READ_RUN.max(frame_bound)).await?;
        let room = cost.bytes();
        let buffer = SPARE_RUNS.buffer(room);
        let (reader, holds) = (node.clone(), holds.clone());
        let (run, buffer, rest, noted) = tokio::task::spawn_blocking(move || {
            let (holds, mut buffer) = (holds.as_deref(), buffer);
            let peer = ReadFor::Peer { holds };
            let run = reader.read_run_for(&mut ids, room, peer, &listed, &mut buffer);
            (run, buffer, ids, listed)
        })
        .await
        .map_err(|e| ProtocolError::Refused {
            code: ErrorCode::Internal,
            message: format!("reading chunks: {e}"),
        })?;
        (ids, listed) = (rest, noted);
        // The run's chunks are slices of this one buffer, sent without a copy; it is
        // held, and stays reserved, until the requester has acknowledged all of them.
        let allocated = buffer.capacity();
        let buffer = SPARE_RUNS.lend(buffer);
        let mut written = 0;
        for (id, read) in run.map_err(internal)? {
            let response = match read.map(|range| buffer.slice(range)) {
                Some(data) => {
                    node.rate
                        .pass(Some(&session.peer), Direction::Sent, data.len())
                        .await;
                    let len = data.len() as u64;
                    node.stats
                        .chunk_bytes_sent
                        .fetch_add(len, Ordering::Relaxed);
                    if let Some(peer) = session.peer_id().and_then(|id| node.peer_by_id(id)) {
                        peer.chunk_bytes_sent.fetch_add(len, Ordering::Relaxed);
                    }
                    Response::Chunk { id, data }
                }
                None => Response::ChunkMissing { id },
            };
            written += reply(node, send, response).await?;
        }
        cost.shrink_to(written.max(allocated));
        held.absorb(cost);
    }
    held.absorb(request);
    Ok(())
}

/// Run buffers whose frames were all acknowledged, kept for the next runs. A run
/// buffer is larger than the allocator's fixed `mmap` threshold (`main.rs`): allocated
/// afresh, each run was an `mmap`, a page fault per 4 KiB of it and a `munmap`, a sixth
/// more CPU on a bulk transfer (docs/BENCHMARKS.md). Sixteen at most are kept (4 MiB of
/// [`READ_RUN`]s: the runs in flight on one peer's pull of large files), however many
/// streams were served at once.
static SPARE_RUNS: SpareRuns = SpareRuns::new(16);

struct SpareRuns {
    kept: Mutex<Vec<Vec<u8>>>,
    most: usize,
}

impl SpareRuns {
    const fn new(most: usize) -> Self {
        SpareRuns {
            kept: Mutex::new(Vec::new()),
            most,
        }
    }

    /// An empty buffer with room for `room` bytes, a spare one if there is.
    fn buffer(&self, room: usize) -> Vec<u8> {
        let spare = self.kept.lock().ok().and_then(|mut kept| kept.pop());
        let mut buffer = spare.unwrap_or_default();
        buffer.reserve(room);
        buffer
    }

    /// `buffer` as bytes to slice each chunk's frame from, given back here when the
    /// last slice is dropped (acknowledged, or its stream gone).
    fn lend(&'static self, buffer: Vec<u8>) -> Bytes {
        Bytes::from_owner(RunBuffer {
            buffer,
            spares: self,
        })
    }

    fn give_back(&self, mut buffer: Vec<u8>) {
        buffer.clear();
        if let Ok(mut kept) = self.kept.lock()
            && kept.len() < self.most
        {
            kept.push(buffer);
        }
    }
}

struct RunBuffer {
    buffer: Vec<u8>,
    spares: &'static SpareRuns,
}

impl AsRef<[u8]> for RunBuffer {
    fn as_ref(&self) -> &[u8] {
        &self.buffer
    }
}

impl Drop for RunBuffer {
    fn drop(&mut self) {
        self.spares.give_back(std::mem::take(&mut self.buffer));
    }
}

/// Waits until the requester has acknowledged everything written on the stream.
async fn wait_for_acknowledgement(send: &mut SendStream) -> Result<(), ProtocolError> {
    tokio::time::timeout(REPLY_TIMEOUT, send.flush())
        .await
        .map_err(|_| {
            ProtocolError::Malformed(format!(
                "the requester took no answer for {} s",
                REPLY_TIMEOUT.as_secs()
            ))
        })?
        .map_err(|e| ProtocolError::Io(e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept(spares: &SpareRuns) -> usize {
        spares.kept.lock().unwrap().len()
    }

    #[test]
    fn a_run_buffer_comes_back_when_its_last_frame_is_dropped_and_only_so_many_are_kept() {
        let spares: &'static SpareRuns = Box::leak(Box::new(SpareRuns::new(1)));
        let mut first = spares.buffer(1000);
        first.extend_from_slice(b"two chunks");
        let address = first.as_ptr();
        let run = spares.lend(first);
        let frame = run.slice(4..);
        drop(run);
        assert_eq!(kept(spares), 0, "a frame still being sent holds its run");
        assert_eq!(&frame[..], b"chunks");
        drop(frame);
        assert_eq!(kept(spares), 1);

        let again = spares.buffer(1000);
        assert_eq!(again.as_ptr(), address, "the spare is reused");
        assert!(again.is_empty() && again.capacity() >= 1000);
        let (one, other) = (spares.lend(again), spares.lend(spares.buffer(10)));
        drop((one, other));
        assert_eq!(kept(spares), 1, "no more than the most kept");
    }
}
