//! `Revocations`: a peer passes on the newest CA-signed revocation list it holds; it is
//! adopted if its signature holds and it is newer than ours.

use super::Session;
use crate::protocol::{ErrorCode, ProtocolError, Response};
use crate::sync::Node;

pub(super) fn answer(
    node: &Node,
    session: &Session,
    list: &str,
) -> Result<Response, ProtocolError> {
    let from = format!("the revocation list from {}", session.peer.describe());
    node.receive_revocations(list, &from)
        .map_err(|e| ProtocolError::Refused {
            code: ErrorCode::Malformed,
            message: e.to_string(),
        })?;
    Ok(Response::Ack)
}
