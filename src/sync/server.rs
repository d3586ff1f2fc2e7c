//! The serving half of sync: answers a peer's requests from the local store.
//!
//! Each request arrives on its own stream. A malformed, oversized or unexpected request
//! gets an `Error` frame with a code, a log line, and the stream is closed; a peer that
//! speaks another protocol version or uses other chunk sizes has its connection closed.
//! Nothing a peer sends can make this side allocate more than one frame's limit.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use s2n_quic::Connection;
use s2n_quic::stream::SendStream;

use super::Node;
use crate::chunking::chunk_list_pages;
use crate::ids::NodeId;
use crate::protocol::{
    self, ListPart, MAX_CONTROL_FRAME, MAX_ENTRIES_BYTES, MAX_ENTRIES_PER_RESPONSE,
    MAX_INLINE_CHUNKS, ProtocolError, Request, Response, WireEntry, code,
};

/// Serves one incoming connection until it closes.
pub async fn serve_connection(node: Arc<Node>, mut connection: Connection) {
    let remote_addr = connection.remote_addr().ok();
    let remote = remote_addr
        .map(|a| a.to_string())
        .unwrap_or_else(|| "?".into());
    let peer_id: Arc<Mutex<Option<NodeId>>> = Arc::new(Mutex::new(None));
    let handle = connection.handle();
    loop {
        match connection.accept_bidirectional_stream().await {
            Ok(Some(stream)) => {
                let (node, peer_id, remote, handle) = (
                    node.clone(),
                    peer_id.clone(),
                    remote.clone(),
                    handle.clone(),
                );
                tokio::spawn(async move {
                    let (mut recv, mut send) = stream.split();
                    if let Err(e) =
                        serve_stream(&node, &mut recv, &mut send, &peer_id, remote_addr).await
                    {
                        tracing::warn!(peer = %remote, "refused a request: {e}");
                        let reply = Response::Error {
                            code: e.code(),
                            message: e.to_string(),
                        };
                        let _ = protocol::write_frame(&mut send, reply.encode()).await;
                        if matches!(e.code(), code::VERSION | code::CHUNK_PARAMS) {
                            // Let the error frame reach the peer before the connection goes.
                            let _ = send.close().await;
                            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                            handle.close(u32::from(e.code()).into());
                            return;
                        }
                    }
                    let _ = send.close().await;
                });
            }
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(peer = %remote, "connection ended: {e}");
                break;
            }
        }
    }
}

async fn serve_stream(
    node: &Node,
    recv: &mut s2n_quic::stream::ReceiveStream,
    send: &mut SendStream,
    peer_id: &Mutex<Option<NodeId>>,
    remote_addr: Option<std::net::SocketAddr>,
) -> Result<(), ProtocolError> {
    let Some((kind, body)) = protocol::read_frame(recv, MAX_CONTROL_FRAME).await? else {
        return Ok(());
    };
    // One request per stream: wait for the requester to finish its side (dropping the
    // receiving half early would reset the stream under the requester's feet).
    let mut rest = [0u8; 1];
    if tokio::io::AsyncReadExt::read(recv, &mut rest).await? != 0 {
        return Err(ProtocolError::Malformed(
            "more than one request on a stream".into(),
        ));
    }
    let request = Request::decode(kind, &body)?;
    if !matches!(request, Request::Hello(_)) && peer_id.lock().expect("peer id lock").is_none() {
        return Err(ProtocolError::Malformed(
            "the first request on a connection must be Hello".into(),
        ));
    }
    let volume_id = |name: &str| {
        node.volume(name)
            .map(|v| v.id)
            .ok_or_else(|| ProtocolError::Remote {
                code: code::UNKNOWN_VOLUME,
                message: format!("volume {name} is not synced here"),
            })
    };
    let internal = |e: crate::store::StoreError| ProtocolError::Remote {
        code: code::INTERNAL,
        message: e.to_string(),
    };
    let response = match request {
        Request::Hello(hello) => {
            if hello.version != protocol::PROTOCOL_VERSION {
                return Err(ProtocolError::Remote {
                    code: code::VERSION,
                    message: format!(
                        "protocol version {} is not supported (this node speaks {})",
                        hello.version,
                        protocol::PROTOCOL_VERSION
                    ),
                });
            }
            if hello.chunk_params != node.meta.chunk_params {
                return Err(ProtocolError::Remote {
                    code: code::CHUNK_PARAMS,
                    message: format!(
                        "chunk sizes {} differ from this node's {}",
                        hello.chunk_params, node.meta.chunk_params
                    ),
                });
            }
            *peer_id.lock().expect("peer id lock") = Some(hello.node_id);
            // A peer may connect to us before we reach it: learn its id from its address
            // so that what we send it is counted against it from the start.
            if node.peer_by_id(hello.node_id).is_none() {
                let same_host =
                    |p: &&Arc<super::Peer>| remote_addr.is_some_and(|a| a.ip() == p.addr.ip());
                if let Some(peer) = node
                    .peers()
                    .iter()
                    .filter(same_host)
                    .find(|p| p.node_id().is_none())
                {
                    *peer.node_id.lock().expect("peer state lock") = Some(hello.node_id);
                }
            }
            Response::Hello(node.hello())
        }
        Request::Notify { volume } => {
            volume_id(&volume)?;
            let from = *peer_id.lock().expect("peer id lock");
            if let Some(peer) = from.and_then(|id| node.peer_by_id(id)) {
                peer.wake.notify_one();
            }
            Response::Ack
        }
        Request::GetDir { volume, dir } => Response::Dir(
            node.store
                .tree_node(volume_id(&volume)?, &dir)
                .map_err(internal)?,
        ),
        Request::GetEntries {
            volume,
            dir,
            start,
            after,
            end,
        } => {
            let vol = volume_id(&volume)?;
            let mut entries = Vec::new();
            let mut bytes = 0;
            let mut more = false;
            for item in node.store.children_from(vol, &dir, &start) {
                let (name, entry) = item.map_err(internal)?;
                if after && name == start {
                    continue;
                }
                if end.as_ref().is_some_and(|end| name >= *end) {
                    break;
                }
                if entries.len() >= MAX_ENTRIES_PER_RESPONSE || bytes >= MAX_ENTRIES_BYTES {
                    more = true;
                    break;
                }
                let subtree = match entry.is_dir() {
                    true => {
                        let child = dir
                            .join(&name)
                            .map_err(|e| ProtocolError::Malformed(e.to_string()))?;
                        node.store
                            .tree_node(vol, &child)
                            .map_err(internal)?
                            .map(|n| n.sync_hash())
                    }
                    false => None,
                };
                let chunks = match entry.kind {
                    crate::entry::EntryKind::File { chunks, .. }
                        if chunks as usize <= MAX_INLINE_CHUNKS =>
                    {
                        node.store.chunk_list(vol, &dir, &name).map_err(internal)?
                    }
                    _ => None,
                };
                bytes += name.len()
                    + crate::store::codec::encode_entry(&entry).len()
                    + chunks.as_ref().map_or(0, |c| c.len() * 36)
                    + 56;
                entries.push(WireEntry {
                    name,
                    entry,
                    subtree,
                    chunks,
                });
            }
            if node.faults.hostile_names {
                for entry in &mut entries {
                    entry.name = if entry.name.len() % 2 == 0 {
                        b"../../etc/passwd".to_vec()
                    } else {
                        b"/abs".to_vec()
                    };
                }
            }
            Response::Entries { entries, more }
        }
        Request::GetChunkList {
            volume,
            path,
            content_id,
            part,
        } => {
            let vol = volume_id(&volume)?;
            let Some((dir, name)) = path.split_last() else {
                return Err(ProtocolError::Malformed(
                    "the volume root has no chunk list".into(),
                ));
            };
            let current = node.store.entry(vol, &dir, name).map_err(internal)?;
            let same_content = matches!(current.map(|e| e.kind), Some(crate::entry::EntryKind::File { content_id: c, .. }) if c == content_id);
            let list = match same_content {
                true => node.store.chunk_list(vol, &dir, name).map_err(internal)?,
                false => None,
            };
            match (part, list) {
                (_, None) => Response::ChunkList(None),
                (ListPart::Whole, Some(list)) => Response::ChunkList(Some(list)),
                (ListPart::PageHashes, Some(list)) => Response::ChunkPages(Some(
                    chunk_list_pages(&list)
                        .into_iter()
                        .map(|p| (p.range.len() as u32, p.hash))
                        .collect(),
                )),
                (ListPart::Pages(wanted), Some(list)) => {
                    let pages = chunk_list_pages(&list);
                    let mut chunks = Vec::new();
                    for index in wanted {
                        let page = pages.get(index as usize).ok_or_else(|| {
                            ProtocolError::Malformed(format!(
                                "chunk list page {index} of {}",
                                pages.len()
                            ))
                        })?;
                        chunks.extend_from_slice(&list[page.range.clone()]);
                    }
                    Response::ChunkList(Some(chunks))
                }
            }
        }
        Request::GetChunks { ids } => {
            for id in ids {
                let reply = match node.read_local_chunk(&id) {
                    Some(mut data) => {
                        if node.faults.corrupt_chunks && !data.is_empty() {
                            data[0] ^= 0xff;
                        }
                        let len = data.len() as u64;
                        node.stats
                            .chunk_bytes_sent
                            .fetch_add(len, Ordering::Relaxed);
                        if let Some(peer) = (*peer_id.lock().expect("peer id lock"))
                            .and_then(|id| node.peer_by_id(id))
                        {
                            peer.chunk_bytes_sent.fetch_add(len, Ordering::Relaxed);
                        }
                        Response::Chunk { id, data }
                    }
                    None => Response::ChunkMissing { id },
                };
                protocol::write_frame(send, reply.encode()).await?;
            }
            return Ok(());
        }
    };
    protocol::write_frame(send, response.encode()).await
}
