//! `GetChunks`: one frame per id asked, the chunk's bytes (read from a live file or a
//! pack and checked against the id) or `ChunkMissing`. The reads run on tokio's
//! blocking pool, one at a time per request: a slow disk (or a file a local user
//! swapped for something else) never holds an async worker thread.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use s2n_quic::stream::SendStream;

use super::{Session, internal, reply};
use crate::ids::{ChunkId, VolumeId};
use crate::protocol::{ErrorCode, ProtocolError, Response};
use crate::rate::Direction;
use crate::sync::Node;

pub(super) async fn send(
    node: &Arc<Node>,
    session: &Session,
    ids: Vec<ChunkId>,
    send: &mut SendStream,
) -> Result<(), ProtocolError> {
    // A peer that may not hold every volume is served only what the volumes it may hold
    // contain.
    let holds: Option<Arc<[VolumeId]>> = (!node.access.is_open()).then(|| {
        node.volumes
            .iter()
            .filter(|v| node.access.allows(&v.name, &session.peer))
            .map(|v| v.id)
            .collect()
    });
    for id in ids {
        let (reader, holds) = (node.clone(), holds.clone());
        let read =
            tokio::task::spawn_blocking(move || reader.read_chunk_for(&id, holds.as_deref()))
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
        reply(node, send, response).await?;
    }
    Ok(())
}
