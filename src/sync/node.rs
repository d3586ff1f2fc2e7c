//! A running node: its store, its volumes, its peers and its counters.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use s2n_quic::connection::Handle;

use super::{Faults, Stats, SyncError, request};
use crate::access::Access;
use crate::identity::Proven;
use crate::ids::{NodeId, VolumeId};
use crate::protocol::{self, Request};
use crate::revocation::{RevocationError, Revocations, Trust};
use crate::space::{LowSpace, ShortageState};
use crate::store::{Store, StoreMeta};
use crate::volume_fs::VolumeFs;

/// One synced volume of this node.
pub struct Volume {
    pub name: String,
    pub id: VolumeId,
    pub fs: VolumeFs,
    /// Held by whoever changes the volume's index (a scan, or applying a pull), so the
    /// two never interleave. Shared: a pull's batch holds it on another thread while
    /// its directories are synced and its index write made.
    pub lock: Arc<tokio::sync::Mutex<()>>,
    /// Files received from peers keep their setuid/setgid bits (the volume opted in).
    pub keep_setid: bool,
    /// Room on the volume's file system for what pulls stage.
    pub room: super::room::Room,
    /// The scan under way, if any (for `/status`).
    pub scanning: super::state::ScanActivity,
    /// Conflict copies the last whole-volume scan found in it.
    pub conflict_copies: AtomicU64,
    /// The first of them by path (for `/status`, which describes them).
    pub conflict_paths: Mutex<Vec<crate::pathname::VolPath>>,
    /// Extended attributes received that this node could not set.
    pub xattrs_not_applied: crate::xattrs::NotApplied,
    /// Names that cannot be synced (found by scans and by pulls), and why.
    pub unsyncable: crate::unsyncable::Unsyncable,
    /// A pull took a hard-linked file and has not linked all its other names yet: scans
    /// leave the index's link groups alone meanwhile (see `ScanOptions::keep_link_groups`).
    pub links_pending: AtomicBool,
    /// The delete guard: its threshold and the deletes it holds back from peers.
    pub guard: crate::guard::Guard,
    /// What pulls wrote lately, so that the watcher does not scan it again.
    pub echoes: crate::watcher::Echoes,
}

impl Volume {
    /// Opens volume `name`, whose files are in `dir`, for sync: registers it in the store
    /// if it is new, and opens its directory (creating its staging area and removing
    /// what a crash left there).
    pub fn open(store: &Store, name: &str, dir: &Path) -> Result<Volume, SyncError> {
        let fs = VolumeFs::open(dir)?;
        let record = store.ensure_volume(name)?;
        let guard = crate::guard::Guard::default();
        guard.load(store, record.id)?;
        Ok(Volume {
            name: name.to_string(),
            id: record.id,
            fs,
            lock: Arc::new(tokio::sync::Mutex::new(())),
            keep_setid: false,
            room: super::room::Room::default(),
            scanning: super::state::ScanActivity::default(),
            conflict_copies: AtomicU64::new(0),
            conflict_paths: Mutex::new(Vec::new()),
            xattrs_not_applied: Default::default(),
            unsyncable: Default::default(),
            links_pending: AtomicBool::new(false),
            guard,
            echoes: Default::default(),
        })
    }

    /// The volume with the delete guard's threshold `policy`.
    pub fn guarded_by(mut self, policy: crate::guard::Policy) -> Volume {
        self.guard.policy = policy;
        self
    }

    /// Whether files received from peers keep their setuid/setgid bits here.
    pub fn keeping_setid(self, keep: bool) -> Volume {
        Volume {
            keep_setid: keep,
            ..self
        }
    }

    /// The permission bits a file received with `mode` gets on disk: setuid and setgid
    /// cleared unless the volume opted in. (The index keeps the mode as received, so
    /// the file is not seen as changed here and synced back stripped.)
    pub fn received_file_mode(&self, mode: u32) -> u32 {
        match self.keep_setid {
            true => mode,
            false => mode & !0o6000,
        }
    }
}

/// What this node knows of one configured peer.
pub struct Peer {
    pub addr: SocketAddr,
    pub node_id: Mutex<Option<NodeId>>,
    /// Who the peer is, as its certificate proved on the last connection.
    pub identity: Mutex<Option<Proven>>,
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
    /// Local changes the peer has not acknowledged being told of.
    pub announcements: super::announce::Announcements,
    /// Whether it can be reached and how each volume's sync with it stands.
    pub sync: super::state::PeerSync,
}

impl Peer {
    pub fn new(addr: SocketAddr) -> Self {
        Peer {
            addr,
            node_id: Mutex::new(None),
            identity: Mutex::new(None),
            connected: AtomicBool::new(false),
            chunk_bytes_sent: AtomicU64::new(0),
            chunk_bytes_received: AtomicU64::new(0),
            rejected_chunks: AtomicU64::new(0),
            shared_volumes: Mutex::new(Vec::new()),
            handle: Mutex::new(None),
            wake: tokio::sync::Notify::new(),
            announcements: Default::default(),
            sync: super::state::PeerSync::default(),
        }
    }

    pub fn node_id(&self) -> Option<NodeId> {
        *self.node_id.lock().expect("peer state lock")
    }

    pub fn identity(&self) -> Option<Proven> {
        self.identity.lock().expect("peer state lock").clone()
    }

    pub fn connection(&self) -> Option<Handle> {
        self.handle.lock().expect("peer state lock").clone()
    }

    /// Whether the peer, connected, has stopped answering (a frozen process, a cut
    /// network): see [`crate::transport::is_silent`]. Known in a few hundred
    /// milliseconds, long before its connection's idle timeout ends it.
    pub fn is_silent(&self) -> bool {
        self.connection()
            .is_some_and(|handle| crate::transport::is_silent(&handle))
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
    /// What this node's own certificate proves (set once credentials are loaded, again
    /// at each renewal): read it with [`Node::identity`].
    pub identity: std::sync::RwLock<Option<Proven>>,
    /// Which peers may hold which volume.
    pub access: Access,
    /// The newest CA-signed revocation list seen; revoked peers are refused.
    pub revocations: std::sync::RwLock<Revocations>,
    /// How lists received from peers and the signer are checked and kept (set with the
    /// credentials; without it, such lists are refused).
    pub trust: std::sync::OnceLock<Trust>,
    /// Whether the state directory was last found too full for the store to write.
    pub state_room: ShortageState,
    /// Seconds between anti-entropy rounds: the unit of the health rules and of how
    /// often a lasting error is logged again.
    pub heartbeat: std::time::Duration,
    /// The volumes (or the whole node) an operator paused.
    pub paused: crate::pause::Paused,
    /// The bandwidth limit on chunk bytes sent and received.
    pub rate: crate::rate::RateLimit,
    /// The last changes applied from peers (for `/status`).
    pub recent_changes: super::state::RecentChanges,
    /// Kept versions held per volume and the last collection (`crate::gc`).
    pub collections: crate::gc::Figures,
    /// The memory that peers' requests and their answers may hold, node-wide.
    pub serving: crate::sync::server::Budget,
    /// Where the small chunks of the files listed to peers are, for their chunk requests.
    pub listed: crate::sync::server::ListedChunks,
    /// Woken when a peer's `Hello` is accepted: that peer is up, and a connection of
    /// ours to it waiting out a retry pause tries again at once (two nodes started
    /// together find each other as soon as the later one listens, not a backoff later).
    pub greeted: tokio::sync::Notify,
}

impl Node {
    /// A node over `store` and its opened `volumes`, with `peers` to start with (the
    /// daemon's discovery changes them), every counter at zero. Ownership (uid/gid)
    /// syncs only when running as root.
    pub fn new(
        store: Store,
        volumes: Vec<Volume>,
        peers: impl IntoIterator<Item = SocketAddr>,
        faults: Faults,
    ) -> Node {
        let meta = store.meta();
        Node {
            serving: crate::sync::server::Budget::for_chunks(meta.chunk_params.max as usize),
            listed: Default::default(),
            meta,
            store,
            volumes,
            peers: std::sync::RwLock::new(
                peers.into_iter().map(|a| Arc::new(Peer::new(a))).collect(),
            ),
            stats: Stats::default(),
            sync_ownership: rustix::process::geteuid().is_root(),
            faults,
            identity: std::sync::RwLock::new(None),
            revocations: std::sync::RwLock::new(Revocations::default()),
            trust: std::sync::OnceLock::new(),
            access: Access::default(),
            state_room: ShortageState::default(),
            heartbeat: std::time::Duration::from_secs(25),
            paused: crate::pause::Paused::default(),
            rate: crate::rate::RateLimit::default(),
            recent_changes: Default::default(),
            collections: Default::default(),
            greeted: tokio::sync::Notify::new(),
        }
    }

    /// Takes note of how a scan or a pull ended, for the state directory's room: a
    /// refusal for lack of room is remembered (and said once) and `true` returned; once
    /// the room is back, the shortage is forgotten (and that said once).
    pub fn note_state_room(&self, error: Option<&(dyn std::error::Error + 'static)>) -> bool {
        let what = format!("state directory {}", self.store.state_dir().display());
        if let Some(low) = error.and_then(LowSpace::in_chain) {
            self.state_room.set(&what, Some(low.shortage()));
            return true;
        }
        if self.state_room.get().is_some()
            && crate::space::available(self.store.state_dir())
                .is_ok_and(|free| free >= crate::space::STATE_WRITE_RESERVE)
        {
            self.state_room.set(&what, None);
        }
        false
    }

    /// How often an error that persists is logged again.
    pub fn relog_interval(&self) -> std::time::Duration {
        self.heartbeat * super::state::RELOG_HEARTBEATS
    }

    pub fn volume(&self, name: &str) -> Option<&Volume> {
        self.volumes.iter().find(|v| v.name == name)
    }

    /// Our `Hello` on a connection that negotiated protocol `version`.
    pub fn hello(&self, version: u16) -> protocol::Hello {
        protocol::Hello {
            version,
            node_id: self.faults.claim_node_id.unwrap_or(self.meta.node_id),
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

    /// What this node's current certificate proves.
    pub fn identity(&self) -> Option<Proven> {
        self.identity.read().expect("identity lock").clone()
    }

    pub fn is_revoked(&self, node: &Proven) -> bool {
        self.revocations
            .read()
            .expect("revocations lock")
            .is_revoked(node)
    }

    /// Adopts `list` if it is newer than the one held; then keeps it in the state
    /// directory, closes the connections to peers it revokes (their next handshakes are
    /// refused) and passes it on to the other connected peers. Returns whether it was
    /// adopted.
    pub fn adopt_revocations(&self, list: Revocations) -> bool {
        {
            let mut held = self.revocations.write().expect("revocations lock");
            if list.serial <= held.serial {
                return false;
            }
            let ids: Vec<String> = list.ids.iter().map(|id| id.to_string()).collect();
            let names: Vec<&str> = list.names.iter().map(String::as_str).collect();
            tracing::warn!(serial = list.serial, ids = %ids.join(" "), names = %names.join(" "), "revocation list adopted");
            if let Some(me) = self.identity().filter(|me| list.is_revoked(me)) {
                tracing::error!(
                    "this node, {}, is revoked by the cluster CA: its peers refuse it",
                    me.describe()
                );
            }
            if let Some(path) = self.trust.get().and_then(|t| t.keep.as_ref())
                && let Err(e) = crate::revocation::keep(path, &list)
            {
                tracing::error!("cannot keep the revocation list: {e}");
            }
            *held = list;
        }
        for peer in self.peers() {
            if let Some(identity) = peer.identity()
                && self.is_revoked(&identity)
                && let Some(handle) = peer.connection()
            {
                tracing::warn!(peer = %peer.addr, node = %identity.describe(), "dropping a revoked peer");
                handle.close(u32::from(protocol::ErrorCode::Identity.number()).into());
            } else {
                self.share_revocations(&peer);
            }
        }
        true
    }

    /// A list received as `text` (from a peer or the signer, named by `from`): adopted
    /// if its CA signature holds and it is newer than the one held.
    pub fn receive_revocations(&self, text: &str, from: &str) -> Result<bool, RevocationError> {
        let trust = self.trust.get().ok_or_else(|| RevocationError::Malformed {
            path: from.into(),
            reason: "this node has no cluster CA to check it with".into(),
        })?;
        let list = Revocations::parse_verified(text, &trust.ca_pem, std::path::Path::new(from))?;
        Ok(self.adopt_revocations(list))
    }

    /// Passes the list held (if the CA ever signed one) to `peer`, if it is connected:
    /// in a task of its own, given [`REVOCATIONS_TIMEOUT`] to acknowledge.
    pub fn share_revocations(&self, peer: &Arc<Peer>) {
        let list = self
            .revocations
            .read()
            .expect("revocations lock")
            .signed
            .clone();
        let Some(mut handle) = peer.connection().filter(|_| !list.is_empty()) else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let peer = peer.clone();
        runtime.spawn(async move {
            let list_request = Request::Revocations { list };
            match tokio::time::timeout(REVOCATIONS_TIMEOUT, request(&mut handle, &list_request))
                .await
            {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::debug!(peer = %peer.addr, "passing on the revocation list failed: {e}")
                }
                Err(_) => tracing::debug!(peer = %peer.addr, "revocation list not acknowledged"),
            }
        });
    }

    /// The peer whose node id is `id`, if it is one of ours.
    pub fn peer_by_id(&self, id: NodeId) -> Option<Arc<Peer>> {
        self.peers().into_iter().find(|p| p.node_id() == Some(id))
    }

    /// Tells every peer that shares `volume` to pull from us (unless it is paused:
    /// resuming tells them), in tasks of their own: a peer that stopped answering
    /// delays neither the others nor the caller, and one not connected now is told once
    /// it is ([`super::announce`]).
    pub fn notify_peers(&self, volume: &str) {
        if self.paused.holds(volume) {
            return;
        }
        for peer in self.peers() {
            // A peer never connected yet has not said which volumes it holds: it is
            // owed the change, and told once connected if it shares the volume.
            if peer.shares(volume) || peer.identity().is_none() {
                super::announce::announce(&peer, volume);
            }
        }
        self.stats
            .local_changes_published
            .fetch_add(1, Ordering::Relaxed);
    }
}

/// How long a peer may take to acknowledge a revocation list (a round trip on a live
/// connection: milliseconds).
const REVOCATIONS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);
