//! The serving half of sync: answers a peer's requests from the local store.
//!
//! Each request arrives on its own stream. A malformed, oversized or unexpected request
//! gets an `Error` frame with a code, a log line, and the stream is closed; a peer that
//! speaks another protocol version or uses other chunk sizes has its connection closed.
//! Nothing a peer sends can make this side allocate more than one frame's limit.
//!
//! `serve_stream` reads the one request of a stream and checks that the connection
//! began with `Hello`; each request then has its own handler, in the manner of
//! mini-redis's `cmd/`: `hello.rs`, `notify.rs`, `dir.rs`, `entries.rs`,
//! `chunk_list.rs`, `chunks.rs`.

mod chunk_list;
mod chunks;
mod dir;
mod entries;
mod hello;
mod notify;
mod revocations;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use s2n_quic::Connection;
use s2n_quic::stream::{ReceiveStream, SendStream};

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
                    if let Err(e) = serve_stream(&node, &mut recv, &mut send, &session).await {
                        tracing::warn!(peer = %remote, "refused a request: {e}");
                        let reply = Response::Error {
                            code: e.code().number(),
                            message: e.to_string(),
                        };
                        let _ = protocol::write_frame(&mut send, reply.encode()).await;
                        if e.code().ends_connection() {
                            // Let the error frame reach the peer before the connection goes.
                            let _ = send.close().await;
                            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                            handle.close(u32::from(e.code().number()).into());
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

/// Reads the stream's one request, checks that the connection began with `Hello`, and
/// hands the request to its handler.
async fn serve_stream(
    node: &Arc<Node>,
    recv: &mut ReceiveStream,
    send: &mut SendStream,
    session: &Session,
) -> Result<(), ProtocolError> {
    // A requester that opens a stream and sends nothing must not hold it forever.
    let timed_out = || {
        ProtocolError::Malformed(format!(
            "no complete request within {} s",
            REQUEST_TIMEOUT.as_secs()
        ))
    };
    let read = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let Some(frame) = protocol::read_frame(recv, MAX_CONTROL_FRAME).await? else {
            return Ok(None);
        };
        // One request per stream: wait for the requester to finish its side (dropping
        // the receiving half early would reset the stream under the requester's feet).
        let mut rest = [0u8; 1];
        if tokio::io::AsyncReadExt::read(recv, &mut rest).await? != 0 {
            return Err(ProtocolError::Malformed(
                "more than one request on a stream".into(),
            ));
        }
        Ok(Some(frame))
    });
    let Some((kind, body)) = read.await.map_err(|_| timed_out())?? else {
        return Ok(());
    };
    let request = Request::decode(kind, &body)?;
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
        Request::GetChunkList {
            volume,
            path,
            content_id,
            part,
        } => chunk_list::answer(node, &volume, &path, content_id, part)?,
        // Many frames, written as the chunks are read.
        Request::GetChunks { ids } => return chunks::send(node, session, ids, send).await,
    };
    reply(node, send, response).await
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

/// Writes one response frame (made wrong first if this node is told to misbehave).
async fn reply(
    node: &Node,
    send: &mut SendStream,
    mut response: Response,
) -> Result<(), ProtocolError> {
    node.faults.tamper(&mut response);
    // A requester that stops reading (QUIC flow control then stops this write) must not
    // hold the handler forever.
    tokio::time::timeout(
        REPLY_TIMEOUT,
        protocol::write_frame(send, response.encode()),
    )
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
