//! `Notify`: the peer changed a volume; the task that pulls from it wakes up now.

use super::{Session, volume_id};
use crate::protocol::{ProtocolError, Response};
use crate::sync::Node;

pub(super) fn answer(
    node: &Node,
    session: &Session,
    volume: &str,
) -> Result<Response, ProtocolError> {
    volume_id(node, volume)?;
    if let Some(peer) = session.peer_id().and_then(|id| node.peer_by_id(id)) {
        tracing::debug!(peer = %peer.addr, %volume, "notified of a change: pulling");
        peer.wake.notify_one();
    }
    Ok(Response::Ack)
}
