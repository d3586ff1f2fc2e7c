//! `GetEntries`: the children of a directory in a name range, tombstones included, with
//! each child directory's sync hash and each small file's chunk list; at most one
//! response's worth, `more` set when names in the range remain.

use super::{internal, volume_id};
use crate::entry::EntryKind;
use crate::pathname::VolPath;
use crate::protocol::{
    MAX_ENTRIES_BYTES, MAX_ENTRIES_PER_RESPONSE, MAX_INLINE_CHUNKS, ProtocolError, Response,
    WireEntry,
};
use crate::sync::Node;

pub(super) fn answer(
    node: &Node,
    volume: &str,
    dir: &VolPath,
    start: &[u8],
    after: bool,
    end: Option<&[u8]>,
) -> Result<Response, ProtocolError> {
    let vol = volume_id(node, volume)?;
    let mut entries = Vec::new();
    let mut bytes = 0;
    let mut more = false;
    for item in node.store.children_from(vol, dir, start) {
        let (name, entry) = item.map_err(internal)?;
        if after && name == start {
            continue;
        }
        if end.is_some_and(|end| name.as_slice() >= end) {
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
            EntryKind::File { chunks, .. } if chunks as usize <= MAX_INLINE_CHUNKS => {
                node.store.chunk_list(vol, dir, &name).map_err(internal)?
            }
            _ => None,
        };
        let wire = WireEntry {
            name,
            entry,
            subtree,
            chunks,
        };
        bytes += wire.counted_len();
        entries.push(wire);
    }
    Ok(Response::Entries { entries, more })
}
