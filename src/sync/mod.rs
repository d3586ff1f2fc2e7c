//! Peer sync: the node's shared state, the request/response plumbing over QUIC, and the
//! two halves of anti-entropy.
//!
//! - [`server`] answers peers' requests from the local store (roots, tree pages, chunk
//!   lists, chunk bytes).
//! - [`pull`] compares a peer's tree with ours, descends only into what differs, decides
//!   entry by entry with version vectors, fetches the chunks we hold nowhere, and applies
//!   changes atomically.
//! - [`conflict`] is the deterministic rule for concurrent edits.
//!
//! Every node pulls from every peer; nobody pushes data. A local change only sends a
//! `Notify`, after which peers pull at once.

pub mod conflict;
pub mod pull;
pub mod server;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use s2n_quic::connection::Handle;
use serde::Serialize;

use crate::ids::{NodeId, VolumeId};
use crate::protocol::{self, ProtocolError, Request, Response};
use crate::store::{Store, StoreMeta};
use crate::volume_fs::VolumeFs;

/// One synced volume of this node.
pub struct Volume {
    pub name: String,
    pub id: VolumeId,
    pub fs: VolumeFs,
    /// Held by whoever changes the volume's index (a scan, or applying a pull), so the
    /// two never interleave.
    pub lock: tokio::sync::Mutex<()>,
}

/// Counters exposed on `/status` and `/metrics`.
#[derive(Default)]
pub struct Stats {
    pub chunk_bytes_sent: AtomicU64,
    pub chunk_bytes_received: AtomicU64,
    pub files_applied: AtomicU64,
    pub conflicts: AtomicU64,
    pub rejected_chunks: AtomicU64,
    pub local_changes_published: AtomicU64,
    /// Names added, changed or deleted by local scans (never by applying a peer's change).
    pub local_changes: AtomicU64,
    /// Narrow scans started by the file watcher.
    pub watch_scans: AtomicU64,
    /// Whole-volume rescans because watcher events were lost.
    pub watch_rescans: AtomicU64,
}

/// What this node knows of one configured peer.
pub struct Peer {
    pub addr: SocketAddr,
    pub node_id: Mutex<Option<NodeId>>,
    pub connected: AtomicBool,
    pub chunk_bytes_sent: AtomicU64,
    pub chunk_bytes_received: AtomicU64,
    pub rejected_chunks: AtomicU64,
    /// Volumes the peer announced, intersected with ours.
    pub shared_volumes: Mutex<Vec<String>>,
    /// The open connection, for requests from any task.
    pub handle: Mutex<Option<Handle>>,
    /// Wakes the peer's task to pull now.
    pub wake: tokio::sync::Notify,
}

impl Peer {
    pub fn new(addr: SocketAddr) -> Self {
        Peer {
            addr,
            node_id: Mutex::new(None),
            connected: AtomicBool::new(false),
            chunk_bytes_sent: AtomicU64::new(0),
            chunk_bytes_received: AtomicU64::new(0),
            rejected_chunks: AtomicU64::new(0),
            shared_volumes: Mutex::new(Vec::new()),
            handle: Mutex::new(None),
            wake: tokio::sync::Notify::new(),
        }
    }

    pub fn node_id(&self) -> Option<NodeId> {
        *self.node_id.lock().expect("peer state lock")
    }

    pub fn connection(&self) -> Option<Handle> {
        self.handle.lock().expect("peer state lock").clone()
    }

    pub fn shares(&self, volume: &str) -> bool {
        self.shared_volumes
            .lock()
            .expect("peer state lock")
            .iter()
            .any(|v| v == volume)
    }
}

/// A running node: its store, volumes, peers and counters.
pub struct Node {
    pub store: Store,
    pub meta: StoreMeta,
    pub volumes: Vec<Volume>,
    /// Changes at run time as peers are discovered and leave: read a snapshot with
    /// [`Node::peers`], change it with [`Node::set_peers`].
    pub peers: std::sync::RwLock<Vec<Arc<Peer>>>,
    pub stats: Stats,
    /// Sync ownership (uid/gid) too: only when running as root.
    pub sync_ownership: bool,
    pub faults: Faults,
}

/// Fault injection for tests of the *other* side: a node told to misbehave, so that its
/// peers' defences can be checked against a real process. Set from the environment
/// (`SHOAL_FAULT_CORRUPT_CHUNKS=1`, `SHOAL_FAULT_HOSTILE_NAMES=1`,
/// `SHOAL_FAULT_WATCH_QUEUE=N`); never set in production.
#[derive(Clone, Copy, Debug, Default)]
pub struct Faults {
    /// Flip a byte of every chunk sent.
    pub corrupt_chunks: bool,
    /// Answer every entry listing with names that try to leave the volume.
    pub hostile_names: bool,
    /// Shrink the file watcher's event queue, so that a burst overflows it as the
    /// kernel's queue overflows under load.
    pub watch_queue: Option<usize>,
}

impl Faults {
    pub fn from_env() -> Self {
        let set = |name: &str| std::env::var_os(name).is_some_and(|v| v == "1");
        let faults = Faults {
            corrupt_chunks: set("SHOAL_FAULT_CORRUPT_CHUNKS"),
            hostile_names: set("SHOAL_FAULT_HOSTILE_NAMES"),
            watch_queue: std::env::var("SHOAL_FAULT_WATCH_QUEUE")
                .ok()
                .and_then(|v| v.parse().ok()),
        };
        if faults.corrupt_chunks || faults.hostile_names || faults.watch_queue.is_some() {
            tracing::warn!(
                ?faults,
                "FAULT INJECTION ENABLED: this node misbehaves on purpose (testing only)"
            );
        }
        faults
    }
}

impl Node {
    pub fn volume(&self, name: &str) -> Option<&Volume> {
        self.volumes.iter().find(|v| v.name == name)
    }

    pub fn hello(&self) -> protocol::Hello {
        protocol::Hello {
            version: protocol::PROTOCOL_VERSION,
            node_id: self.meta.node_id,
            chunk_params: self.meta.chunk_params,
            volumes: self.volumes.iter().map(|v| v.name.clone()).collect(),
        }
    }

    /// The current peers.
    pub fn peers(&self) -> Vec<Arc<Peer>> {
        self.peers.read().expect("peer list lock").clone()
    }

    /// Makes the peers exactly `wanted`: returns the peers added and those removed.
    pub fn set_peers(
        &self,
        wanted: &std::collections::BTreeSet<SocketAddr>,
    ) -> (Vec<Arc<Peer>>, Vec<Arc<Peer>>) {
        let mut peers = self.peers.write().expect("peer list lock");
        let (kept, removed): (Vec<_>, Vec<_>) =
            peers.drain(..).partition(|p| wanted.contains(&p.addr));
        let added: Vec<Arc<Peer>> = wanted
            .iter()
            .filter(|addr| !kept.iter().any(|p| p.addr == **addr))
            .map(|addr| Arc::new(Peer::new(*addr)))
            .collect();
        *peers = kept;
        peers.extend(added.iter().cloned());
        (added, removed)
    }

    /// The peer whose node id is `id`, if it is one of ours.
    pub fn peer_by_id(&self, id: NodeId) -> Option<Arc<Peer>> {
        self.peers().into_iter().find(|p| p.node_id() == Some(id))
    }

    /// Tells every connected peer that shares `volume` to pull from us.
    pub async fn notify_peers(&self, volume: &str) {
        for peer in &self.peers() {
            if !peer.shares(volume) {
                continue;
            }
            if let Some(mut handle) = peer.connection()
                && let Err(e) = request(
                    &mut handle,
                    &Request::Notify {
                        volume: volume.to_string(),
                    },
                )
                .await
            {
                tracing::debug!(peer = %peer.addr, "notify failed: {e}");
            }
        }
        self.stats
            .local_changes_published
            .fetch_add(1, Ordering::Relaxed);
    }

    pub fn status(&self) -> NodeStatus {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let volumes = self
            .volumes
            .iter()
            .map(|v| {
                let node = self
                    .store
                    .tree_node(v.id, &crate::pathname::VolPath::root())
                    .ok()
                    .flatten();
                VolumeStatus {
                    name: v.name.clone(),
                    root: node.as_ref().map(|n| n.hash.to_hex()),
                    files: node.as_ref().map_or(0, |n| n.totals.files),
                    bytes: node.as_ref().map_or(0, |n| n.totals.bytes),
                }
            })
            .collect();
        let peers = self
            .peers()
            .iter()
            .map(|p| PeerStatus {
                addr: p.addr.to_string(),
                node_id: p.node_id().map(|id| id.to_string()),
                connected: p.connected.load(Ordering::Relaxed),
                chunk_bytes_sent: load(&p.chunk_bytes_sent),
                chunk_bytes_received: load(&p.chunk_bytes_received),
                rejected_chunks: load(&p.rejected_chunks),
            })
            .collect();
        NodeStatus {
            node_id: self.meta.node_id.to_string(),
            volumes,
            peers,
            totals: Totals {
                chunk_bytes_sent: load(&self.stats.chunk_bytes_sent),
                chunk_bytes_received: load(&self.stats.chunk_bytes_received),
                files_applied: load(&self.stats.files_applied),
                conflicts: load(&self.stats.conflicts),
                rejected_chunks: load(&self.stats.rejected_chunks),
                local_changes_published: load(&self.stats.local_changes_published),
                local_changes: load(&self.stats.local_changes),
                watch_scans: load(&self.stats.watch_scans),
                watch_rescans: load(&self.stats.watch_rescans),
            },
        }
    }
}

#[derive(Serialize, serde::Deserialize, Debug, Clone)]
pub struct NodeStatus {
    pub node_id: String,
    pub volumes: Vec<VolumeStatus>,
    pub peers: Vec<PeerStatus>,
    pub totals: Totals,
}

#[derive(Serialize, serde::Deserialize, Debug, Clone)]
pub struct VolumeStatus {
    pub name: String,
    pub root: Option<String>,
    pub files: u64,
    pub bytes: u64,
}

#[derive(Serialize, serde::Deserialize, Debug, Clone)]
pub struct PeerStatus {
    pub addr: String,
    pub node_id: Option<String>,
    pub connected: bool,
    pub chunk_bytes_sent: u64,
    pub chunk_bytes_received: u64,
    pub rejected_chunks: u64,
}

#[derive(Serialize, serde::Deserialize, Debug, Clone)]
pub struct Totals {
    pub chunk_bytes_sent: u64,
    pub chunk_bytes_received: u64,
    pub files_applied: u64,
    pub conflicts: u64,
    pub rejected_chunks: u64,
    pub local_changes_published: u64,
    pub local_changes: u64,
    pub watch_scans: u64,
    pub watch_rescans: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("connection: {0}")]
    Connection(String),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Fs(#[from] crate::volume_fs::FsError),
    #[error("{0}")]
    Refused(String),
}

/// Sends one request on a new stream and reads its single response.
pub async fn request(handle: &mut Handle, request: &Request) -> Result<Response, SyncError> {
    let mut responses = open_request(handle, request).await?;
    let response = responses.next().await?.ok_or(ProtocolError::Truncated)?;
    match response {
        Response::Error { code, message } => Err(ProtocolError::Remote { code, message }.into()),
        other => Ok(other),
    }
}

/// The response frames of one request, read as they arrive.
pub struct Responses {
    recv: s2n_quic::stream::ReceiveStream,
    limit: usize,
}

/// How long a peer may take to send the next frame of an answer. A live connection
/// whose peer never answers would otherwise hold the volume lock of the pull waiting
/// on it (QUIC keep-alives stop the idle timeout from ending it).
const ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

impl Responses {
    pub async fn next(&mut self) -> Result<Option<Response>, SyncError> {
        let frame = tokio::time::timeout(
            ANSWER_TIMEOUT,
            protocol::read_frame(&mut self.recv, self.limit),
        )
        .await
        .map_err(|_| {
            SyncError::Connection(format!(
                "the peer sent nothing for {} s",
                ANSWER_TIMEOUT.as_secs()
            ))
        })??;
        match frame {
            Some((kind, body)) => Ok(Some(Response::decode(kind, &body)?)),
            None => Ok(None),
        }
    }
}

/// Opens a stream, sends `request` and finishes the sending side.
pub async fn open_request(handle: &mut Handle, request: &Request) -> Result<Responses, SyncError> {
    let stream = handle
        .open_bidirectional_stream()
        .await
        .map_err(|e| SyncError::Connection(e.to_string()))?;
    let (recv, mut send) = stream.split();
    protocol::write_frame(&mut send, request.encode()).await?;
    send.close()
        .await
        .map_err(|e| SyncError::Connection(e.to_string()))?;
    Ok(Responses {
        recv,
        limit: protocol::response_limit(request),
    })
}

impl Node {
    /// Reads a chunk from wherever this node holds it (a live file or a pack), checked
    /// against its id; `None` if no copy is intact.
    pub fn read_local_chunk(&self, id: &crate::ids::ChunkId) -> Option<Vec<u8>> {
        let locations = self.store.chunk_locations(id).ok()?;
        for location in locations {
            let data = match location {
                crate::store::ChunkLocation::Live {
                    vol,
                    dir,
                    name,
                    extent,
                } => {
                    let volume = self.volumes.iter().find(|v| v.id == vol)?;
                    let path = dir.join(&name).ok()?;
                    volume.fs.read_chunk(&path, extent, id)
                }
                crate::store::ChunkLocation::Pack { pack, extent } => {
                    let path = self
                        .store
                        .packs_dir()
                        .join(crate::store::pack::pack_file_name(pack));
                    crate::store::pack::read_chunk(&path, extent, id).ok()
                }
            };
            if data.is_some() {
                return data;
            }
        }
        None
    }
}
