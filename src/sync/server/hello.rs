//! `Hello`: the handshake. Another protocol version, other chunk sizes or a node id
//! other than the one the peer's certificate proves end the connection; otherwise the
//! connection is open for requests.

use std::sync::atomic::Ordering;

use super::Session;
use crate::protocol::{ErrorCode, Hello, ProtocolError, Response};
use crate::sync::Node;

pub(super) fn answer(
    node: &Node,
    session: &Session,
    hello: Hello,
) -> Result<Response, ProtocolError> {
    if hello.version != session.version {
        return Err(ProtocolError::Refused {
            code: ErrorCode::Version,
            message: format!(
                "protocol version {} is not the one the handshake chose ({})",
                hello.version, session.version
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
    if hello.node_id != session.peer.node_id {
        return Err(ProtocolError::Refused {
            code: ErrorCode::Identity,
            message: format!(
                "Hello claims node id {}, but the certificate is node {}'s",
                hello.node_id,
                session.peer.describe()
            ),
        });
    }
    session.greeted.store(true, Ordering::Release);
    node.greeted.notify_waiters();
    Ok(Response::Hello(node.hello(session.version)))
}
