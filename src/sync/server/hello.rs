//! `Hello`: the handshake. Another protocol version or other chunk sizes end the
//! connection; otherwise the peer's node id is remembered for the connection.

use std::sync::Arc;

use super::Session;
use crate::protocol::{self, ErrorCode, Hello, ProtocolError, Response};
use crate::sync::{Node, Peer};

pub(super) fn answer(
    node: &Node,
    session: &Session,
    hello: Hello,
) -> Result<Response, ProtocolError> {
    if hello.version != protocol::PROTOCOL_VERSION {
        return Err(ProtocolError::Refused {
            code: ErrorCode::Version,
            message: format!(
                "protocol version {} is not supported (this node speaks {})",
                hello.version,
                protocol::PROTOCOL_VERSION
            ),
        });
    }
    if hello.chunk_params != node.meta.chunk_params {
        return Err(ProtocolError::Refused {
            code: ErrorCode::ChunkParams,
            message: format!(
                "chunk sizes {} differ from this node's {}",
                hello.chunk_params, node.meta.chunk_params
            ),
        });
    }
    *session.peer_id.lock().expect("peer id lock") = Some(hello.node_id);
    // A peer may connect to us before we reach it: learn its id from its address
    // so that what we send it is counted against it from the start.
    if node.peer_by_id(hello.node_id).is_none() {
        let same_host = |p: &&Arc<Peer>| session.remote_addr.is_some_and(|a| a.ip() == p.addr.ip());
        if let Some(peer) = node
            .peers()
            .iter()
            .filter(same_host)
            .find(|p| p.node_id().is_none())
        {
            *peer.node_id.lock().expect("peer state lock") = Some(hello.node_id);
        }
    }
    Ok(Response::Hello(node.hello()))
}
