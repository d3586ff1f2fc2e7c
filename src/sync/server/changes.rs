//! `GetChanges`: the names of a volume changed after a mark of this node's change feed
//! (`crate::store::Changes`), with their entries as `GetEntries` sends them (inline
//! chunk lists of small files), but no directory's sync hash: the requester applies
//! what changed and descends nowhere. Bounded like `Entries`: at most the count asked
//! for (itself at most [`MAX_ENTRIES_PER_RESPONSE`]) and about [`MAX_ENTRIES_BYTES`];
//! the mark answered stops before the first name left out. Names whose last change
//! took the requester's own entry as it sent it are not sent back to it. Where the
//! chunks of the inline lists are is noted for the requests that follow
//! ([`super::listed`]).

use std::cmp::Ordering;

use super::{Session, internal, volume_id};
use crate::entry::EntryKind;
use crate::protocol::{
    CHANGES_VERSION, MAX_ENTRIES_BYTES, MAX_INLINE_CHUNKS, ProtocolError, Response, WireEntry,
};
use crate::store::{Changes, FeedMark};
use crate::sync::Node;

pub(super) fn answer(
    node: &Node,
    session: &Session,
    volume: &str,
    since: FeedMark,
    max: u32,
) -> Result<Response, ProtocolError> {
    if session.version < CHANGES_VERSION {
        return Err(ProtocolError::Malformed(format!(
            "GetChanges needs protocol version {CHANGES_VERSION}; this connection speaks {}",
            session.version
        )));
    }
    let vol = volume_id(node, volume)?;
    let (names, mut high, mut more) = match node
        .store
        .changes_since(vol, since, max as usize, session.peer_id())
        .map_err(internal)?
    {
        Changes::Gone { current } => return Ok(Response::ChangesGone { current }),
        Changes::Since { names, high, more } => (names, high, more),
    };
    let mut entries = Vec::with_capacity(names.len());
    let mut bytes = 0;
    for (seq, dir, name) in names {
        if bytes >= MAX_ENTRIES_BYTES {
            // What is left waits for the next request, from this name's number on.
            high.seq = seq - 1;
            more = true;
            break;
        }
        // A name forgotten since (an expired tombstone) is nothing to send.
        let Some(mut entry) = node.store.entry(vol, &dir, &name).map_err(internal)? else {
            continue;
        };
        // The requester stores its own time of arrival as a delete's time (expiry is
        // local); sent as 0, the answer's deletes compress to almost nothing.
        if let EntryKind::Tombstone { deleted_at_ns } = &mut entry.kind {
            *deleted_at_ns = 0;
        }
        let chunks = match entry.kind {
            EntryKind::File { chunks, .. } if chunks as usize <= MAX_INLINE_CHUNKS => {
                node.store.chunk_list(vol, &dir, &name).map_err(internal)?
            }
            _ => None,
        };
        if let Some(chunks) = &chunks {
            let noted_dir = std::sync::Arc::new(dir.clone());
            node.listed.note(vol, &noted_dir, &name, chunks);
        }
        let wire = WireEntry {
            name,
            entry,
            subtree: None,
            chunks,
        };
        bytes += wire.counted_len() + 2 + dir.as_bytes().len();
        entries.push((dir, wire));
    }
    // In entry-key order: a directory's entry before the names it holds.
    entries.sort_by(
        |(a_dir, a), (b_dir, b)| match a_dir.as_bytes().cmp(b_dir.as_bytes()) {
            Ordering::Equal => a.name.cmp(&b.name),
            other => other,
        },
    );
    Ok(Response::Changes {
        high,
        more,
        entries,
    })
}
