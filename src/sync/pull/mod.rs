//! The pulling half of sync: make this node's volume include what a peer has.
//!
//! 1. Compare roots: equal roots end the round (one request per volume when converged).
//! 2. Walk only what differs: for each directory, fetch the peer's page list and only
//!    the pages whose (first name, hash) we do not have; recurse into child directories
//!    whose tree hashes differ.
//! 3. Decide each name with version vectors: the peer's version dominates -> take it;
//!    ours dominates or is equal -> keep ours; concurrent -> [`super::conflict`].
//! 4. Take files: fetch the chunk list, reuse every chunk held locally (a rename moves no
//!    chunk bytes), fetch the rest from the peers that share the volume (spread over
//!    them, each chunk checked against its BLAKE3 id), assemble in staging, then publish
//!    a batch: one `syncfs`, atomic renames, directory fsyncs, one durable index write.
//! 5. Deletes run last, deepest first, so content that moved elsewhere in the same round
//!    is still there to be reused; a local file changed since the last scan is never
//!    overwritten or deleted (the next scan indexes it and it syncs as a change).
//! 6. Every directory the round changed gets back the mtime its entry records (applying
//!    its children moved it).

mod apply;
mod decide;
mod files;
mod walk;

use std::collections::HashMap;
use std::sync::Arc;

use s2n_quic::connection::Handle;

use super::{Node, Peer, SyncError};
use crate::entry::Entry;
use crate::ids::ContentId;
use crate::pathname::VolPath;
use crate::tree::TreeNode;
use files::{FileJob, RenameSource};

/// Files made durable and visible together.
const PUBLISH_BATCH: usize = 256;
/// Deletes held back until the end of a round (so moved content can be reused); past
/// this many they are applied early.
const MAX_DEFERRED_DELETES: usize = 100_000;

/// What one pull round did.
#[derive(Debug, Default, Clone, Copy)]
pub struct PullReport {
    pub applied: u64,
    pub deleted: u64,
    pub conflicts: u64,
    pub skipped: u64,
    /// Files left unfinished because some chunk could not be fetched: worth another
    /// round soon, not a heartbeat away.
    pub incomplete: u64,
}

impl PullReport {
    pub fn changed(&self) -> bool {
        self.applied + self.deleted + self.conflicts > 0
    }
}

/// Pulls one volume from one peer.
pub async fn pull_volume(
    node: &Arc<Node>,
    peer: &Arc<Peer>,
    volume_index: usize,
) -> Result<PullReport, SyncError> {
    let handle = peer.connection().ok_or(SyncError::NotConnected)?;
    let volume = &node.volumes[volume_index];
    let _guard = volume.lock.lock().await;
    let mut pull = Pull {
        node: node.clone(),
        peer: peer.clone(),
        handle,
        volume_index,
        deferred: Vec::new(),
        rename_sources: HashMap::new(),
        renames_seen: 0,
        pending: Vec::new(),
        files: Vec::new(),
        report: PullReport::default(),
    };
    let Some(remote_root) = pull.get_dir(&VolPath::root()).await? else {
        return Ok(pull.report);
    };
    let local_root = node.store.tree_node(volume.id, &VolPath::root())?;
    if local_root.map(|n| n.sync_hash()) == Some(remote_root.sync_hash()) {
        return Ok(pull.report);
    }
    let round = pull.walk_and_apply(remote_root).await;
    // Also after a failed round: what it did apply keeps its directories' mtimes.
    pull.restore_dir_mtimes()?;
    round?;
    crate::tree::update(&node.store, volume.id)?;
    Ok(pull.report)
}

struct Pull {
    node: Arc<Node>,
    peer: Arc<Peer>,
    handle: Handle,
    volume_index: usize,
    /// (parent, name, remote tombstone) to apply at the end of the round.
    deferred: Vec<(VolPath, Vec<u8>, Entry)>,
    /// Files among `deferred` that a new file of the same content can take over, by
    /// content id (see [`Pull::find_rename_sources`]).
    rename_sources: HashMap<ContentId, RenameSource>,
    /// How many of `deferred` have been looked at for `rename_sources`.
    renames_seen: usize,
    /// Directories still to compare with the peer's.
    pending: Vec<(VolPath, RemoteDir)>,
    /// Files decided on but not yet fetched (taken in batches across directories).
    files: Vec<FileJob>,
    report: PullReport,
}

/// What the peer has at a directory still to compare.
enum RemoteDir {
    /// A directory: its tree node is asked for when its turn comes.
    Present,
    /// Nothing live (the peer deleted it): all its entries are compared.
    Deleted,
}

impl Pull {
    fn volume(&self) -> &super::Volume {
        &self.node.volumes[self.volume_index]
    }

    /// Walks what differs, then takes the files and applies the deletes decided on.
    async fn walk_and_apply(&mut self, remote_root: TreeNode) -> Result<(), SyncError> {
        self.sync_dir(&VolPath::root(), Some(remote_root)).await?;
        while let Some((dir, remote)) = self.pending.pop() {
            // The peer's tree node is asked for only now: the directories waiting hold
            // a path each, not a tree node of up to a frame's size.
            let remote = match remote {
                RemoteDir::Present => self.get_dir(&dir).await?,
                RemoteDir::Deleted => None,
            };
            self.sync_dir(&dir, remote).await?;
        }
        self.take_files().await?;
        self.apply_deletes()
    }
}
