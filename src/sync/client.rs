//! The requesting side of a connection: one request per stream, its answers read as
//! they arrive.

use std::sync::atomic::Ordering;

use s2n_quic::connection::Handle;

use super::{Node, Peer, SyncError};
use crate::protocol::{self, ProtocolError, Request, Response};

/// Sends one request on a new stream and reads its single response.
pub async fn request(handle: &mut Handle, request: &Request) -> Result<Response, SyncError> {
    let mut responses = open_request(handle, request).await?;
    let response = responses.next().await?.ok_or(ProtocolError::Truncated)?;
    match response {
        Response::Error { code, message } => Err(ProtocolError::Remote { code, message }.into()),
        other => Ok(other),
    }
}

/// The response frames of one request, read as they arrive (chunk bytes left in the
/// buffers they arrived in: [`Response::read`]).
pub struct Responses {
    frames: protocol::FrameReader,
    limit: usize,
}

/// How long a peer may take to send the next frame of an answer. A live connection
/// whose peer never answers (its process alive but stuck) would otherwise hold up the
/// pull waiting on it for good (QUIC keep-alives stop the idle timeout from ending it).
const ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

impl Responses {
    /// Refuses frames over `limit` bytes too (below the protocol's limit for the
    /// request: a `GetChunks` answer frame past the chunk sizes both nodes agreed on).
    pub fn with_frame_limit(mut self, limit: usize) -> Self {
        self.limit = self.limit.min(limit);
        self
    }

    pub async fn next(&mut self) -> Result<Option<Response>, SyncError> {
        let response =
            tokio::time::timeout(ANSWER_TIMEOUT, Response::read(&mut self.frames, self.limit))
                .await
                .map_err(|_| {
                    SyncError::Connection(format!(
                        "the peer sent nothing for {} s",
                        ANSWER_TIMEOUT.as_secs()
                    ))
                })??;
        Ok(response)
    }
}

/// Opens a stream, sends `request` and finishes the sending side.
pub async fn open_request(handle: &mut Handle, request: &Request) -> Result<Responses, SyncError> {
    let stream = handle
        .open_bidirectional_stream()
        .await
        .map_err(|e| SyncError::Connection(e.to_string()))?;
    let (recv, mut send) = stream.split();
    protocol::write_frame(&mut send, request.encode()).await?;
    // `finish`, not `close`: `close` waits for the peer to acknowledge the request, and
    // a frozen peer never does (its answer is waited for with a timeout instead).
    send.finish()
        .map_err(|e| SyncError::Connection(e.to_string()))?;
    Ok(Responses {
        frames: protocol::FrameReader::new(recv),
        limit: protocol::response_limit(request),
    })
}

/// Connects to `peer` and exchanges `Hello`s: on success the peer is marked connected,
/// with the identity its certificate proves, the volumes it shares with us and the
/// connection's handle.
pub async fn connect(
    node: &Node,
    peer: &Peer,
    client: &s2n_quic::Client,
) -> Result<s2n_quic::Connection, SyncError> {
    let connection = crate::transport::connect(client, peer.addr)
        .await
        .map_err(|e| SyncError::Connection(e.to_string()))?;
    let mut handle = connection.handle();
    let proven =
        crate::identity::peer_identity(&handle).map_err(|e| SyncError::Identity(e.to_string()))?;
    if proven.node_id == node.meta.node_id {
        return Err(SyncError::SelfConnection);
    }
    if node.is_revoked(&proven) {
        return Err(SyncError::Identity(format!(
            "node {} is revoked",
            proven.describe()
        )));
    }
    let version = protocol::negotiated_version(&handle)?;
    let hello = match request(&mut handle, &Request::Hello(node.hello(version))).await? {
        Response::Hello(hello) => hello,
        other => {
            return Err(SyncError::unexpected("Hello", &other));
        }
    };
    if hello.version != version {
        return Err(SyncError::PeerVersion(hello.version));
    }
    if hello.node_id != proven.node_id {
        return Err(SyncError::Identity(format!(
            "its Hello claims node id {}, but its certificate is node {}'s",
            hello.node_id,
            proven.describe()
        )));
    }
    if let Some(hold) = node.faults.hold_connections {
        tokio::time::sleep(hold).await;
    }
    // Nothing is pulled of a volume the peer may not hold, nor announced to it.
    let shared: Vec<String> = hello
        .volumes
        .into_iter()
        .filter(|v| node.volume(v).is_some() && node.access.allows(v, &proven))
        .collect();
    *peer.node_id.lock().expect("peer state lock") = Some(proven.node_id);
    *peer.identity.lock().expect("peer state lock") = Some(proven);
    *peer.shared_volumes.lock().expect("peer state lock") = shared;
    *peer.handle.lock().expect("peer state lock") = Some(handle);
    peer.connected.store(true, Ordering::Relaxed);
    Ok(connection)
}
