//! `GetChunks`: one frame per id asked, the chunk's bytes (read from a live file or a
//! pack and checked: [`ReadFor::Peer`]) or `ChunkMissing`. The reads run on tokio's
//! blocking pool, one at a time per request: a slow disk (or a file a local user
//! swapped for something else) never holds an async worker thread.
//!
//! Each chunk's cost (its bytes, the encoded frame and the send buffer's copy while it
//! is written) is reserved from the node's budget before it is read; the frames
//! written stay reserved until the requester acknowledges them, which the answer waits
//! for whenever [`UNACKED_PER_STREAM`] bytes are outstanding: a requester that stops
//! reading holds at most that much of one stream's answer.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use s2n_quic::stream::SendStream;

use super::budget::UNACKED_PER_STREAM;
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
    // The largest frame a chunk of this node's can take.
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
    // `held` keeps the request (the ids) until the answer ends; the loop holds the
    // frames written and not yet acknowledged.
    let request = std::mem::take(held);
    for id in ids {
        if held.bytes() >= UNACKED_PER_STREAM {
            wait_for_acknowledgement(send).await?;
            *held = Reserved::default();
        }
        let mut cost = reserve(node, session, 3 * frame_bound).await?;
        let (reader, holds) = (node.clone(), holds.clone());
        let read = tokio::task::spawn_blocking(move || {
            let holds = holds.as_deref();
            reader.read_chunk_for(&id, ReadFor::Peer { holds })
        })
        .await
        .map_err(|e| ProtocolError::Refused {
            code: ErrorCode::Internal,
            message: format!("reading chunk {id}: {e}"),
        })?
        .map_err(internal)?;
        let response = match read {
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
        let written = reply(node, send, response).await?;
        cost.shrink_to(written);
        held.absorb(cost);
    }
    held.absorb(request);
    Ok(())
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
