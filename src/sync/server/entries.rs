//! `GetEntries`: the children of a directory in a name range, tombstones included, with
//! each child directory's sync hash and each small file's chunk list; at most one
//! response's worth, `more` set when names in the range remain. Where the chunks
//! of the listed lists are is noted for the requests that follow ([`super::listed`]).

use super::{internal, volume_id};
use crate::chunking::ChunkRef;
use crate::entry::EntryKind;
use crate::pathname::VolPath;
use crate::protocol::{
    MAX_ENTRIES_BYTES, MAX_ENTRIES_PER_RESPONSE, MAX_INLINE_CHUNKS, ProtocolError, Response,
    WireEntry,
};
use crate::store::StoreError;
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
    // The directory of every note this answer makes, shared by them.
    let noted_dir = std::sync::Arc::new(dir.clone());
    let mut lists = node
        .store
        .chunk_lists_from(vol, dir, start, MAX_INLINE_CHUNKS)
        .peekable();
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
                list_of(&mut lists, &name)?
            }
            _ => None,
        };
        if let Some(chunks) = &chunks {
            node.listed.note(vol, &noted_dir, &name, chunks);
        }
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

/// The chunk list of `name` from `lists` (in name order, like the entries), passing over
/// those of the names before it.
fn list_of(
    lists: &mut std::iter::Peekable<
        impl Iterator<Item = Result<(Vec<u8>, Option<Vec<ChunkRef>>), StoreError>>,
    >,
    name: &[u8],
) -> Result<Option<Vec<ChunkRef>>, ProtocolError> {
    let not_past = |item: &Result<(Vec<u8>, _), _>| {
        item.as_ref()
            .map_or(true, |(listed, _)| listed.as_slice() <= name)
    };
    while let Some(item) = lists.next_if(not_past) {
        let (listed, list) = item.map_err(internal)?;
        if listed == name {
            return Ok(list);
        }
    }
    Ok(None)
}
