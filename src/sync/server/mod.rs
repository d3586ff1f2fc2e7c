//! The serving half of sync: answers a peer's requests from the local store.
//!
//! Each request arrives on its own stream. A malformed, oversized or unexpected request
//! gets an `Error` frame with a code, a log line, and the stream is closed; a peer that
//! speaks another protocol version or uses other chunk sizes has its connection closed.
//! What requests and answers cost in memory is reserved from one node-wide
//! [`budget`] before it is allocated, and held until the requester has acknowledged
//! the answer: no number of peers, connections or streams makes this side hold more.
//!
//! `serve_stream` reads the one request of a stream and checks that the connection
//! began with `Hello`; each request then has its own handler, in the manner of
//! mini-redis's `cmd/`: `hello.rs`, `notify.rs`, `dir.rs`, `entries.rs`,
//! `changes.rs`, `chunk_list.rs`, `chunks.rs` (with `listed.rs`, what the listings
//! tell the chunk requests that follow them).

pub mod budget;
mod changes;
mod chunk_list;
mod chunks;
mod dir;
mod entries;
mod hello;
mod listed;
mod notify;
mod revocations;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use s2n_quic::Connection;
use s2n_quic::stream::{ReceiveStream, SendStream};

pub use budget::{Budget, Reserved};
pub use listed::ListedChunks;

use super::Node;
use crate::identity::Proven;
use crate::ids::{NodeId, VolumeId};
use crate::protocol::{self, ErrorCode, MAX_CONTROL_FRAME, ProtocolError, Request, Response};
use crate::store::StoreError;

/// How long a requester may take to send its request and finish its side of the
/// stream.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// How long one answer frame may take to be taken by the requester.
const REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// What one connection knows of its peer, shared by the tasks serving its streams.
struct Session {
    /// Who the peer is, as its certificate proves.
    peer: Proven,
    /// The protocol version the handshake negotiated (its ALPN): the `Hello` must say it.
    version: u16,
    /// Whether the peer's `Hello` was accepted; nothing else is answered before it.
    greeted: AtomicBool,
}

impl Session {
    /// The peer's node id, once its `Hello` was accepted.
    fn peer_id(&self) -> Option<NodeId> {
        self.greeted
            .load(Ordering::Acquire)
            .then_some(self.peer.node_id)
    }
}

/// Serves one incoming connection until it closes.
pub async fn serve_connection(node: Arc<Node>, mut connection: Connection) {
    let remote = connection
        .remote_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    let handle = connection.handle();
    let peer = match crate::identity::peer_identity(&handle) {
        Ok(peer) => peer,
        Err(e) => {
            tracing::warn!(peer = %remote, "refused a connection: {e}");
            handle.close(u32::from(ErrorCode::Identity.number()).into());
            return;
        }
    };
    let version = match crate::protocol::negotiated_version(&handle) {
        Ok(version) => version,
        Err(e) => {
            tracing::warn!(peer = %remote, "refused a connection: {e}");
            handle.close(u32::from(ErrorCode::Version.number()).into());
            return;
        }
    };
    let session = Arc::new(Session {
        peer,
        version,
        greeted: AtomicBool::new(false),
    });
    loop {
        match connection.accept_bidirectional_stream().await {
            Ok(Some(stream)) => {
                let (node, session, remote, handle) = (
                    node.clone(),
                    session.clone(),
                    remote.clone(),
                    handle.clone(),
                );
                tokio::spawn(async move {
                    let (mut recv, mut send) = stream.split();
                    // The budget this stream holds, given back once the requester has
                    // acknowledged every byte of the answer (or the stream is reset).
                    let mut held = Reserved::default();
                    if let Err(e) =
                        serve_stream(&node, &mut recv, &mut send, &session, &mut held).await
                    {
                        tracing::warn!(peer = %remote, "refused a request: {e}");
                        let reply = Response::Error {
                            code: e.code().number(),
                            message: e.to_string(),
                        };
                        let _ = tokio::time::timeout(
                            REPLY_TIMEOUT,
                            protocol::write_frame(&mut send, reply.encode()),
                        )
                        .await;
                        if e.code().ends_connection() {
                            // Let the error frame reach the peer before the connection goes.
                            let _ = tokio::time::timeout(
                                std::time::Duration::from_secs(2),
                                send.close(),
                            )
                            .await;
                            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                            handle.close(u32::from(e.code().number()).into());
                            return;
                        }
                    }
                    finish(&mut send).await;
                    drop(held);
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

/// Reads the stream's one request, checks that the connection began with `Hello`, and
/// hands the request to its handler. What the request and its answer cost is reserved
/// in `held` (see [`budget`]).
async fn serve_stream(
    node: &Arc<Node>,
    recv: &mut ReceiveStream,
    send: &mut SendStream,
    session: &Session,
    held: &mut Reserved,
) -> Result<(), ProtocolError> {
    // A requester that opens a stream and sends nothing must not hold it forever.
    let mut waited_for_budget = false;
    let read = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let Some(header) = protocol::read_header(recv, MAX_CONTROL_FRAME).await? else {
            return Ok(None);
        };
        // The body, and the request it decodes to (no larger: see `budget`).
        waited_for_budget = true;
        held.absorb(
            node.serving
                .reserve(session.peer.node_id, 2 * header.body_len)
                .await,
        );
        waited_for_budget = false;
        let body = protocol::read_body(recv, &header).await?;
        // One request per stream: wait for the requester to finish its side (dropping
        // the receiving half early would reset the stream under the requester's feet).
        let mut rest = [0u8; 1];
        if tokio::io::AsyncReadExt::read(recv, &mut rest).await? != 0 {
            return Err(ProtocolError::Malformed(
                "more than one request on a stream".into(),
            ));
        }
        Ok(Some((header.kind, body)))
    })
    .await;
    let Some((kind, body)) = read.map_err(|_| match waited_for_budget {
        true => no_room(node, REQUEST_TIMEOUT, "read the request"),
        false => ProtocolError::Malformed(format!(
            "no complete request within {} s",
            REQUEST_TIMEOUT.as_secs()
        )),
    })??
    else {
        return Ok(());
    };
    let request = Request::decode(kind, &body)?;
    drop(body);
    if node.is_revoked(&session.peer) {
        return Err(ProtocolError::Refused {
            code: ErrorCode::Identity,
            message: format!("node {} is revoked", session.peer.describe()),
        });
    }
    if !matches!(request, Request::Hello(_)) && session.peer_id().is_none() {
        return Err(ProtocolError::Malformed(
            "the first request on a connection must be Hello".into(),
        ));
    }
    if let Some(volume) = request.volume()
        && !node.access.allows(volume, &session.peer)
    {
        return Err(ProtocolError::Refused {
            code: ErrorCode::Forbidden,
            message: format!(
                "node {} may not hold volume {volume}",
                session.peer.describe()
            ),
        });
    }
    refuse_if_paused(node, &request)?;
    let mut answer = match &request {
        // Reserved chunk by chunk as they are read.
        Request::GetChunks { .. } => Reserved::default(),
        other => reserve(node, session, answer_cost(node, other)?).await?,
    };
    let response = match request {
        Request::Hello(hello) => hello::answer(node, session, hello)?,
        Request::Notify { volume } => notify::answer(node, session, &volume)?,
        Request::Revocations { list } => revocations::answer(node, session, &list)?,
        Request::GetDir { volume, dir } => dir::answer(node, &volume, &dir)?,
        Request::GetEntries {
            volume,
            dir,
            start,
            after,
            end,
        } => entries::answer(node, &volume, &dir, &start, after, end.as_deref())?,
        Request::GetChanges { volume, since, max } => {
            changes::answer(node, session, &volume, since, max)?
        }
        Request::GetChunkList {
            volume,
            path,
            content_id,
            part,
        } => chunk_list::answer(node, &volume, &path, content_id, part)?,
        // Many frames, written as the chunks are read.
        Request::GetChunks { ids } => return chunks::send(node, session, ids, send, held).await,
    };
    let written = reply(node, send, response).await?;
    // The request and the answer's value are gone; its frame stays in the stream's send
    // buffer until the requester acknowledges it.
    answer.shrink_to(written);
    *held = answer;
    Ok(())
}

/// Takes `bytes` of the budget for an answer, waiting at most the answer timeout.
async fn reserve(node: &Node, session: &Session, bytes: usize) -> Result<Reserved, ProtocolError> {
    tokio::time::timeout(
        REPLY_TIMEOUT,
        node.serving.reserve(session.peer.node_id, bytes),
    )
    .await
    .map_err(|_| no_room(node, REPLY_TIMEOUT, "answer"))
}

/// The refusal of a request that found no room in the budget in time.
fn no_room(node: &Node, waited: std::time::Duration, to: &str) -> ProtocolError {
    ProtocolError::Refused {
        code: ErrorCode::Internal,
        message: format!(
            "no room to {to} within {} s: the {} MiB this node lets one member's requests and answers hold (of {} MiB for all) are spent",
            waited.as_secs(),
            node.serving.member_share() >> 20,
            node.serving.total() >> 20,
        ),
    }
}

/// The most an answer other than `GetChunks` costs while it is built and sent: what
/// it reads from the store, its value, its encoded frame and the send buffer's copy of
/// the frame. Tree nodes and entries fit one control frame (the requester refuses
/// more), so three frames' worth; a chunk list's answer is bounded by the list the
/// store holds, whose length its entry gives (four copies of it at most: the stored
/// value, the decoded list, the encoded answer and the send buffer's copy).
fn answer_cost(node: &Node, request: &Request) -> Result<usize, ProtocolError> {
    Ok(match request {
        Request::Hello(_) => {
            let names: usize = node.volumes.iter().map(|v| v.name.len() + 32).sum();
            3 * names + ANSWER_SLACK
        }
        Request::Notify { .. } => ANSWER_SLACK,
        // Parsing the list costs about its length again.
        Request::Revocations { list } => 2 * list.len() + ANSWER_SLACK,
        Request::GetDir { .. } | Request::GetEntries { .. } | Request::GetChanges { .. } => {
            3 * MAX_CONTROL_FRAME
        }
        Request::GetChunkList { volume, path, .. } => {
            chunk_list::stored_chunks(node, volume, path)? * 4 * budget::CHUNK_REF_BYTES
                + ANSWER_SLACK
        }
        Request::GetChunks { .. } => 0,
    })
}

/// What an answer costs besides what [`answer_cost`] counts (a frame header, an
/// `Ack`, small values).
const ANSWER_SLACK: usize = 4096;

/// Finishes a stream once the requester has acknowledged every byte of the answer;
/// a requester that takes none within [`REPLY_TIMEOUT`] has its stream reset, which
/// frees the send buffer.
async fn finish(send: &mut SendStream) {
    if !matches!(
        tokio::time::timeout(REPLY_TIMEOUT, send.close()).await,
        Ok(Ok(()))
    ) {
        let _ = send.reset(u32::from(ErrorCode::Internal.number()).into());
    }
}

/// A request for a paused volume, or for chunk bytes from a paused node, is refused
/// with [`ErrorCode::Paused`] (the peer says so and tries again later).
fn refuse_if_paused(node: &Node, request: &Request) -> Result<(), ProtocolError> {
    let paused = match (request, request.volume()) {
        (_, Some(volume)) if node.paused.holds(volume) => format!("volume {volume} is"),
        (Request::GetChunks { .. }, _) if node.paused.node() => "every volume is".to_string(),
        _ => return Ok(()),
    };
    Err(ProtocolError::Refused {
        code: ErrorCode::Paused,
        message: format!("{paused} paused on this node by its operator"),
    })
}

/// Writes one response frame (made wrong first if this node is told to misbehave);
/// returns its length.
async fn reply(
    node: &Node,
    send: &mut SendStream,
    mut response: Response,
) -> Result<usize, ProtocolError> {
    node.faults.tamper(&mut response);
    let (kind, body, tail) = response.into_frame();
    // A requester that stops reading (QUIC flow control then stops this write) must not
    // hold the handler forever.
    tokio::time::timeout(REPLY_TIMEOUT, protocol::send_frame(send, kind, body, tail))
        .await
        .map_err(|_| {
            ProtocolError::Malformed(format!(
                "the requester took no answer for {} s",
                REPLY_TIMEOUT.as_secs()
            ))
        })?
}

/// The local id of the volume a request names.
fn volume_id(node: &Node, name: &str) -> Result<VolumeId, ProtocolError> {
    node.volume(name)
        .map(|v| v.id)
        .ok_or_else(|| ProtocolError::Refused {
            code: ErrorCode::UnknownVolume,
            message: format!("volume {name} is not synced here"),
        })
}

/// A store error while answering: the peer is told the request failed here.
fn internal(e: StoreError) -> ProtocolError {
    ProtocolError::Refused {
        code: ErrorCode::Internal,
        message: e.to_string(),
    }
}
