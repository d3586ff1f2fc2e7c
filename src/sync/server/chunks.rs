//! `GetChunks`: one frame per id asked, the chunk's bytes (read from a live file or a
//! pack and checked against the id) or `ChunkMissing`.

use std::sync::atomic::Ordering;

use s2n_quic::stream::SendStream;

use super::{Session, reply};
use crate::ids::ChunkId;
use crate::protocol::{ProtocolError, Response};
use crate::sync::Node;

pub(super) async fn send(
    node: &Node,
    session: &Session,
    ids: Vec<ChunkId>,
    send: &mut SendStream,
) -> Result<(), ProtocolError> {
    for id in ids {
        let response = match node.read_local_chunk(&id) {
            Some(data) => {
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
