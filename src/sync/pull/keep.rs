//! Keeping what a round replaces: before a peer's change takes a name, the version
//! there is described as a [`VersionRecord`] and its chunks that the new content does
//! not hold are appended to a version pack (`schema/store.md`, "Versions"). The caller
//! makes the pack durable ([`KeptChunks::finish`]) before the old bytes are gone, and
//! writes the record in the batch of the change itself.

use std::collections::HashSet;
use std::os::unix::fs::FileExt;

use super::Pull;
use crate::chunking::ChunkRef;
use crate::entry::{Entry, EntryKind, VersionVector};
use crate::ids::{ChunkId, NodeId};
use crate::pathname::{VolPath, escape_in};
use crate::store::versions::{KeptChunks, VersionId, VersionRecord, Why};
use crate::sync::SyncError;

impl Pull {
    /// The record of `old`, the local version of `dir/name` that a change of history
    /// `new_version` whose content holds `new_chunks` is about to replace; its other
    /// chunks are appended to `kept`, read from the live file and checked against their
    /// ids (one that no longer matches, changed behind Shoal's back, is left out: peers
    /// hold it). `None` for a name that holds nothing (a tombstone).
    pub(super) fn keep_version(
        &self,
        kept: &mut KeptChunks,
        (dir, name): (&VolPath, &[u8]),
        old: &Entry,
        (new_version, new_chunks): (&VersionVector, &[ChunkRef]),
        why: Why,
    ) -> Result<Option<VersionRecord>, SyncError> {
        if old.is_tombstone() {
            return Ok(None);
        }
        let chunks = self
            .indexed_chunks(dir, name, Some(old))?
            .unwrap_or_default();
        if let EntryKind::File { .. } = old.kind {
            let shared: HashSet<ChunkId> = new_chunks.iter().map(|c| c.id).collect();
            self.pack_chunks(kept, dir, name, &chunks, &shared)?;
        }
        self.version_record((dir, name), old, new_version, why, chunks)
            .map(Some)
    }

    /// The record of `old`, the local version of `dir/name` holding `chunks`, which a
    /// change of history `new_version` replaces; nothing is packed (its chunks are held
    /// elsewhere, or `keep_version` packs them).
    pub(super) fn version_record(
        &self,
        (dir, name): (&VolPath, &[u8]),
        old: &Entry,
        new_version: &VersionVector,
        why: Why,
        chunks: Vec<ChunkRef>,
    ) -> Result<VersionRecord, SyncError> {
        let replaced_by = replacing_node(new_version, &old.version)
            .or_else(|| self.peer.node_id())
            .unwrap_or(self.node.meta.node_id);
        Ok(VersionRecord {
            vol: self.volume().id,
            path: dir.join(name)?,
            id: VersionId::now(),
            why,
            replaced_by,
            entry: old.clone(),
            chunks,
        })
    }

    /// Appends the chunks of the live file `dir/name` that are neither `shared` nor in
    /// a version pack already to `kept`.
    fn pack_chunks(
        &self,
        kept: &mut KeptChunks,
        dir: &VolPath,
        name: &[u8],
        chunks: &[ChunkRef],
        shared: &HashSet<ChunkId>,
    ) -> Result<(), SyncError> {
        let store = &self.node.store;
        let mut wanted = Vec::new();
        let mut offset = 0u64;
        for chunk in chunks {
            if !shared.contains(&chunk.id) && !kept.holds(store, &chunk.id)? {
                wanted.push((*chunk, offset));
            }
            offset += u64::from(chunk.len);
        }
        if wanted.is_empty() {
            return Ok(());
        }
        let opened = match self.volume().fs.open_dir(dir, false) {
            Ok(dir_fd) => crate::volume_fs::open_regular(&dir_fd, name)
                .map(|(file, _)| file)
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let file = match opened {
            Ok(file) => file,
            Err(e) => {
                tracing::warn!(volume = %self.volume().name, "cannot keep the replaced version of {}: {e}", escape_in(dir, name));
                return Ok(());
            }
        };
        let mut data = Vec::new();
        for (chunk, offset) in wanted {
            if kept.appended(&chunk.id) {
                continue; // The same chunk twice in one file.
            }
            data.resize(chunk.len as usize, 0);
            if file.read_exact_at(&mut data, offset).is_err() || ChunkId::of(&data) != chunk.id {
                tracing::warn!(volume = %self.volume().name, "{}: a chunk of the replaced version changed on disk; only peers hold it", escape_in(dir, name));
                continue;
            }
            store.keep_version_chunk(kept, &chunk.id, &data)?;
        }
        Ok(())
    }
}

/// The node whose change `new` replaced `old` with: the first (by id) whose counter
/// `new` has higher.
fn replacing_node(new: &VersionVector, old: &VersionVector) -> Option<NodeId> {
    new.pairs()
        .iter()
        .find(|(node, counter)| *counter > old.get(*node))
        .map(|(node, _)| *node)
}
