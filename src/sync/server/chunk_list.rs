//! `GetChunkList`: a file's chunk list, if the file still has the content asked for:
//! whole, as page hashes, or the chunks of some pages. Every answer fits one frame: a
//! whole list or a set of pages over `MAX_LIST_CHUNKS` chunks is refused (`TOO_LARGE`),
//! and large lists are fetched by pages.

use super::{internal, volume_id};
use crate::chunking::ChunkRef;
use crate::chunking::chunk_list_pages;
use crate::entry::EntryKind;
use crate::ids::ContentId;
use crate::pathname::VolPath;
use crate::protocol::{ErrorCode, ListPart, MAX_LIST_CHUNKS, ProtocolError, Response};
use crate::sync::Node;

/// How many chunks the list of the file at `path` holds, as its entry says (0 when
/// there is no such file): what an answer from it can cost is known before the list is
/// read.
pub(super) fn stored_chunks(
    node: &Node,
    volume: &str,
    path: &VolPath,
) -> Result<usize, ProtocolError> {
    let vol = volume_id(node, volume)?;
    let Some((dir, name)) = path.split_last() else {
        return Ok(0);
    };
    Ok(match node.store.entry(vol, &dir, name).map_err(internal)? {
        Some(crate::entry::Entry {
            kind: EntryKind::File { chunks, .. },
            ..
        }) => chunks as usize,
        _ => 0,
    })
}

pub(super) fn answer(
    node: &Node,
    volume: &str,
    path: &VolPath,
    content_id: ContentId,
    part: ListPart,
) -> Result<Response, ProtocolError> {
    let vol = volume_id(node, volume)?;
    let Some((dir, name)) = path.split_last() else {
        return Err(ProtocolError::Malformed(
            "the volume root has no chunk list".into(),
        ));
    };
    let current = node.store.entry(vol, &dir, name).map_err(internal)?;
    let same_content = matches!(current.map(|e| e.kind), Some(EntryKind::File { content_id: c, .. }) if c == content_id);
    let list = match same_content {
        true => node.store.chunk_list(vol, &dir, name).map_err(internal)?,
        false => None,
    };
    Ok(match (part, list) {
        (_, None) => Response::ChunkList(None),
        (ListPart::Whole, Some(list)) if list.len() > MAX_LIST_CHUNKS => {
            return Err(too_large(format!(
                "the chunk list has {} chunks, more than one answer holds ({MAX_LIST_CHUNKS}): ask for its pages",
                list.len()
            )));
        }
        (ListPart::Whole, Some(list)) => Response::ChunkList(Some(list)),
        (ListPart::PageHashes, Some(list)) => Response::ChunkPages(Some(
            chunk_list_pages(&list)
                .into_iter()
                .map(|p| (p.range.len() as u32, p.hash))
                .collect(),
        )),
        (ListPart::Pages(wanted), Some(list)) => {
            Response::ChunkList(Some(pages_of(&list, &wanted)?))
        }
    })
}

/// The chunks of the pages `wanted` of `list`: indices strictly increasing and in range,
/// at most `MAX_LIST_CHUNKS` chunks in all (bounded before anything is copied).
fn pages_of(list: &[ChunkRef], wanted: &[u32]) -> Result<Vec<ChunkRef>, ProtocolError> {
    if wanted.windows(2).any(|w| w[0] >= w[1]) {
        return Err(ProtocolError::Malformed(
            "chunk list page indices must be strictly increasing".into(),
        ));
    }
    let pages = chunk_list_pages(list);
    let mut total = 0;
    for &index in wanted {
        let page = pages.get(index as usize).ok_or_else(|| {
            ProtocolError::Malformed(format!("chunk list page {index} of {}", pages.len()))
        })?;
        total += page.range.len();
    }
    if total > MAX_LIST_CHUNKS {
        return Err(too_large(format!(
            "{total} chunks asked for in one answer (at most {MAX_LIST_CHUNKS})"
        )));
    }
    let mut chunks = Vec::with_capacity(total);
    for &index in wanted {
        chunks.extend_from_slice(&list[pages[index as usize].range.clone()]);
    }
    Ok(chunks)
}

fn too_large(message: String) -> ProtocolError {
    ProtocolError::Refused {
        code: ErrorCode::TooLarge,
        message,
    }
}
