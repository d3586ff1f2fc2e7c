//! `GetChunkList`: a file's chunk list, if the file still has the content asked for:
//! whole, as page hashes, or the chunks of some pages.

use super::{internal, volume_id};
use crate::chunking::chunk_list_pages;
use crate::entry::EntryKind;
use crate::ids::ContentId;
use crate::pathname::VolPath;
use crate::protocol::{ListPart, ProtocolError, Response};
use crate::sync::Node;

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
        (ListPart::Whole, Some(list)) => Response::ChunkList(Some(list)),
        (ListPart::PageHashes, Some(list)) => Response::ChunkPages(Some(
            chunk_list_pages(&list)
                .into_iter()
                .map(|p| (p.range.len() as u32, p.hash))
                .collect(),
        )),
        (ListPart::Pages(wanted), Some(list)) => {
            let pages = chunk_list_pages(&list);
            let mut chunks = Vec::new();
            for index in wanted {
                let page = pages.get(index as usize).ok_or_else(|| {
                    ProtocolError::Malformed(format!("chunk list page {index} of {}", pages.len()))
                })?;
                chunks.extend_from_slice(&list[page.range.clone()]);
            }
            Response::ChunkList(Some(chunks))
        }
    })
}
