//! `GetDir`: a directory's tree node (pages and totals), or none.

use super::{internal, volume_id};
use crate::pathname::VolPath;
use crate::protocol::{ProtocolError, Response};
use crate::sync::Node;

pub(super) fn answer(node: &Node, volume: &str, dir: &VolPath) -> Result<Response, ProtocolError> {
    let vol = volume_id(node, volume)?;
    Ok(Response::Dir(
        node.store.tree_node(vol, dir).map_err(internal)?,
    ))
}
