//! The HTTP endpoint: `/healthz` (liveness: the process answers), `/readyz` (readiness:
//! [`crate::health`]), `/status` (JSON: volumes, each peer's sync state, health,
//! counters, conflict copies, the last changes applied), `/metrics` (Prometheus,
//! [`crate::metrics`]) and the status page at `/` ([`crate::page`]). Every answer is built from
//! shared state and short store reads, never waiting on a volume lock, a scan or a peer.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use crate::health::{CauseKind, Health};
use crate::metrics::{Kind, Metrics};
use crate::space::Shortage;
use crate::sync::Node;
use crate::sync::state::{Failure, PeerVolumeStatus, ScanProgress, Verdict};
use crate::sync::stats::Totals;

/// What an endpoint serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Everything: the local endpoint (`--http`).
    Everything,
    /// `/metrics`, `/readyz` and `/healthz` only (`--metrics`): what a scraper on another
    /// host needs, without `/status`'s detail (paths, errors, identities).
    Metrics,
}

/// Serves `scope` on `listener` from a thread and runtime of its own until `shutdown`
/// flips: a node whose worker threads are all busy hashing, fetching and applying still
/// answers `/status`, `/metrics` and the health check at once.
pub fn spawn(
    listener: std::net::TcpListener,
    node: Arc<Node>,
    scope: Scope,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let addr = listener.local_addr()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name(format!("http {addr}"))
        .spawn(move || {
            if let Err(e) = runtime.block_on(serve(listener, node, scope, shutdown)) {
                tracing::error!("HTTP endpoint on {addr} failed: {e}");
            }
        })
}

/// Serves `scope` on `listener` until `shutdown` flips.
async fn serve(
    listener: std::net::TcpListener,
    node: Arc<Node>,
    scope: Scope,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut router = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics));
    if scope == Scope::Everything {
        router = crate::page::routes(router.route("/status", get(status)));
    }
    let router = router.with_state(node);
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let mut shutdown = shutdown;
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        })
        .await
}

async fn status(State(node): State<Arc<Node>>) -> Json<NodeStatus> {
    Json(node_status(&node))
}

/// 200 `ready` when the node does its job; 503 with one line per cause when degraded.
async fn readyz(State(node): State<Arc<Node>>) -> impl IntoResponse {
    let health = crate::health::assess(&node);
    if health.ready {
        return (StatusCode::OK, "ready\n".to_string());
    }
    let mut text = String::from("degraded\n");
    for cause in &health.causes {
        text.push_str(&format!("{}: {}\n", cause.kind.name(), cause.message));
    }
    (StatusCode::SERVICE_UNAVAILABLE, text)
}

async fn metrics(State(node): State<Arc<Node>>) -> impl IntoResponse {
    let text = encode_metrics(&node_status(&node));
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        text,
    )
}

fn flag(on: bool) -> f64 {
    if on { 1.0 } else { 0.0 }
}

/// `/metrics`: the counters, then the node's, volumes' and peers' gauges.
fn encode_metrics(status: &NodeStatus) -> String {
    let mut m = Metrics::default();
    for (name, help, value) in status.totals.metrics() {
        m.family(name, Kind::Counter, help)
            .sample(&[], value as f64);
    }
    m.family(
        "ready",
        Kind::Gauge,
        "Whether the node does its job (1) or is degraded (0); /readyz says why",
    )
    .sample(&[], flag(status.health.ready));
    let mut causes = m.family(
        "degraded_causes",
        Kind::Gauge,
        "Reasons the node is degraded now, by kind (see /readyz)",
    );
    for kind in CauseKind::ALL {
        let count = status
            .health
            .causes
            .iter()
            .filter(|c| c.kind == kind)
            .count();
        causes.sample(&[("cause", kind.name())], count as f64);
    }
    m.family(
        "state_dir_full",
        Kind::Gauge,
        "Whether the state directory is too full for the index to be written (1) or not (0)",
    )
    .sample(&[], flag(status.state_dir_full.is_some()));
    m.family(
        "max_rate_bytes_per_second",
        Kind::Gauge,
        "The bandwidth limit in use for chunk bytes, each way (0: none)",
    )
    .sample(&[], status.max_rate as f64);
    let last = status.last_collection.as_ref();
    m.family(
        "last_collection_timestamp_seconds",
        Kind::Gauge,
        "When the last collection of kept versions and packs finished (Unix time; 0: none since start)",
    )
    .sample(&[], last.map_or(0.0, |c| c.finished_unix as f64));
    m.family(
        "last_collection_reclaimed_bytes",
        Kind::Gauge,
        "Bytes of pack files the last collection freed",
    )
    .sample(&[], last.map_or(0.0, |c| c.bytes_reclaimed as f64));
    volume_metrics(&mut m, &status.volumes);
    peer_metrics(&mut m, &status.peers);
    m.finish()
}

fn volume_metrics(m: &mut Metrics, volumes: &[VolumeStatus]) {
    type Gauge = (&'static str, &'static str, fn(&VolumeStatus) -> f64);
    let gauges: [Gauge; 10] = [
        (
            "volume_versions_held",
            "Kept versions of the volume's files (as of the last collection)",
            |v| v.versions_held.map_or(0.0, |h| h.versions as f64),
        ),
        (
            "volume_versions_held_bytes",
            "Bytes of the chunks of the volume's kept versions (a chunk two versions share counted for each)",
            |v| v.versions_held.map_or(0.0, |h| h.bytes as f64),
        ),
        (
            "volume_conflict_copies",
            "Conflict copies in the volume (as of its last whole-volume scan; the same on every node once they agree)",
            |v| v.conflict_copies as f64,
        ),
        (
            "volume_files",
            "Files in the volume (as of its last scan or pull)",
            |v| v.files as f64,
        ),
        ("volume_bytes", "Bytes in the volume's files", |v| {
            v.bytes as f64
        }),
        (
            "volume_disk_full",
            "Whether files wait for room on the volume's file system (1) or not (0)",
            |v| flag(v.disk_full.is_some()),
        ),
        (
            "volume_bytes_waiting_for_room",
            "Bytes of the files that wait for room on the volume's file system",
            |v| v.disk_full.map_or(0.0, |s| s.needed_bytes as f64),
        ),
        (
            "volume_scanning",
            "Whether a scan of the volume is under way (1) or not (0)",
            |v| flag(v.scan.is_some()),
        ),
        (
            "paused",
            "Whether the operator paused the volume or the node (1) or not (0)",
            |v| flag(v.paused),
        ),
        (
            "volume_deletes_held",
            "Names whose deletes the delete guard holds back from peers until `shoal release VOLUME` (0: none)",
            |v| v.deletes_held.as_ref().map_or(0.0, |h| h.names as f64),
        ),
    ];
    for (name, help, value) in gauges {
        let mut family = m.family(name, Kind::Gauge, help);
        for v in volumes {
            family.sample(&[("volume", &v.name)], value(v));
        }
    }
    let mut unsyncable = m.family(
        "volume_unsyncable_names",
        Kind::Gauge,
        "Names that cannot be synced (a path too long, a name or type the file system refuses, a directory not writable), by cause; /status lists them",
    );
    for v in volumes {
        let causes = crate::unsyncable::Cause::ALL.map(|c| c.label());
        for cause in causes.into_iter().chain(["unknown"]) {
            let count = v.unsyncable.by_cause.get(cause).copied().unwrap_or(0);
            unsyncable.sample(&[("volume", &v.name), ("cause", cause)], count as f64);
        }
    }
}

fn peer_metrics(m: &mut Metrics, peers: &[PeerStatus]) {
    let mut info = m.family(
        "peer_info",
        Kind::Gauge,
        "A peer's identity as its certificate proved it (always 1)",
    );
    for p in peers {
        let (id, name) = (p.node_id.as_deref(), p.name.as_deref());
        let labels = [
            ("peer", p.addr.as_str()),
            ("node_id", id.unwrap_or("")),
            ("name", name.unwrap_or("")),
        ];
        info.sample(&labels, 1.0);
    }
    let mut rates = m.family(
        "peer_max_rate_bytes_per_second",
        Kind::Gauge,
        "The bandwidth limit in use for chunk bytes to and from the peer, each way (0: none)",
    );
    for p in peers {
        rates.sample(&[("peer", &p.addr)], p.max_rate as f64);
    }
    let mut connected = m.family(
        "peer_connected",
        Kind::Gauge,
        "Whether the peer is connected",
    );
    for p in peers {
        connected.sample(&[("peer", &p.addr)], flag(p.connected));
    }
    type Counter = (&'static str, &'static str, fn(&PeerStatus) -> u64);
    let counters: [Counter; 3] = [
        (
            "peer_chunk_bytes_sent",
            "Chunk bytes sent to the peer",
            |p| p.chunk_bytes_sent,
        ),
        (
            "peer_chunk_bytes_received",
            "Chunk bytes received from the peer",
            |p| p.chunk_bytes_received,
        ),
        (
            "peer_rejected_chunks",
            "Chunks from the peer whose bytes did not match their id",
            |p| p.rejected_chunks,
        ),
    ];
    for (name, help, value) in counters {
        let mut family = m.family(name, Kind::Counter, help);
        for p in peers {
            family.sample(&[("peer", &p.addr)], value(p) as f64);
        }
    }
    type Gauge = (&'static str, &'static str, fn(&PeerVolumeStatus) -> f64);
    let gauges: [Gauge; 6] = [
        (
            "peer_volume_in_sync",
            "Whether this node holds what the peer has of the volume (1) or not yet (0)",
            |v| flag(v.state == Verdict::InSync),
        ),
        (
            "peer_volume_pending_entries",
            "Entries of the volume still to take from the peer",
            |v| v.pending_entries as f64,
        ),
        (
            "peer_volume_pending_bytes",
            "Bytes of the volume still to take from the peer",
            |v| v.pending_bytes as f64,
        ),
        (
            "peer_volume_lag_seconds",
            "Seconds since this node fell behind the peer on the volume (0 when in sync)",
            |v| v.lag_seconds as f64,
        ),
        (
            "peer_volume_last_round_timestamp_seconds",
            "When the last pull round of the volume from the peer ended without error (Unix time; 0: never)",
            |v| v.last_round_unix.unwrap_or(0) as f64,
        ),
        (
            "peer_volume_failed_rounds",
            "Pull rounds of the volume from the peer that failed in a row",
            |v| v.last_error.as_ref().map_or(0.0, |f| f.count as f64),
        ),
    ];
    for (name, help, value) in gauges {
        let mut family = m.family(name, Kind::Gauge, help);
        for p in peers {
            for v in &p.volumes {
                family.sample(&[("peer", &p.addr), ("volume", &v.volume)], value(v));
            }
        }
    }
}

/// What `/status` shows: the node, its health, its volumes, its peers and its counters.
pub fn node_status(node: &Node) -> NodeStatus {
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let node_ref = node;
    let volumes = node
        .volumes
        .iter()
        .map(|v| {
            let paused = node.paused.holds(&v.name);
            let node = node
                .store
                .tree_node(v.id, &crate::pathname::VolPath::root())
                .ok()
                .flatten();
            VolumeStatus {
                name: v.name.clone(),
                disk_full: v.room.shortage.get(),
                root: node.as_ref().map(|n| n.hash.to_hex()),
                histories_root: node.as_ref().map(|n| n.sync_hash().to_hex()),
                files: node.as_ref().map_or(0, |n| n.totals.files),
                bytes: node.as_ref().map_or(0, |n| n.totals.bytes),
                scan: v.scanning.status(),
                conflict_copies: v.conflict_copies.load(Ordering::Relaxed),
                conflicts: {
                    let paths = v
                        .conflict_paths
                        .lock()
                        .expect("conflict paths lock")
                        .clone();
                    crate::conflicts::describe_paths(node_ref, v, &paths)
                },
                xattrs_not_applied: v.xattrs_not_applied.list(),
                unsyncable: v.unsyncable.listing(),
                paused,
                deletes_held: v.guard.status(&v.name),
                versions_held: node_ref.collections.held(&v.name),
            }
        })
        .collect();
    let peers = node
        .peers()
        .iter()
        .filter(|p| !p.sync.is_self())
        .map(|p| {
            let (since, last_error) = p.sync.link_status();
            PeerStatus {
                addr: p.addr.to_string(),
                node_id: p.node_id().map(|id| id.to_string()),
                name: p.identity().map(|i| i.name),
                cert_expires: p.identity().map(|i| expiry(&i)),
                connected: p.connected.load(Ordering::Relaxed),
                since,
                last_error,
                chunk_bytes_sent: load(&p.chunk_bytes_sent),
                chunk_bytes_received: load(&p.chunk_bytes_received),
                rejected_chunks: load(&p.rejected_chunks),
                max_rate: p
                    .identity()
                    .map_or_else(|| node.rate.peer_rates().every, |i| node.rate.peer_rate(&i)),
                volumes: p.sync.volumes(),
            }
        })
        .collect();
    NodeStatus {
        node_id: node.meta.node_id.to_string(),
        name: node.identity().map(|i| i.name),
        cert_expires: node.identity().as_ref().map(expiry),
        health: crate::health::assess(node),
        state_dir_full: node.state_room.get(),
        volumes,
        peers,
        totals: node.stats.totals(),
        max_rate: node.rate.rate(),
        recent_changes: node.recent_changes.newest_first(),
        last_collection: node.collections.last(),
    }
}

/// When a certificate expires, as RFC 3339 UTC.
fn expiry(identity: &crate::identity::Proven) -> String {
    humantime::format_rfc3339_seconds(identity.not_after).to_string()
}

#[derive(Serialize, serde::Deserialize, Debug, Clone)]
pub struct NodeStatus {
    pub node_id: String,
    /// This node's name and certificate expiry (what its peers see).
    pub name: Option<String>,
    pub cert_expires: Option<String>,
    /// Ready, or degraded and why (what `/readyz` says).
    pub health: Health,
    /// The state directory's file system is too full for the index to be written
    /// (scans and pulls wait until there is room); `null` when it is not.
    pub state_dir_full: Option<Shortage>,
    pub volumes: Vec<VolumeStatus>,
    pub peers: Vec<PeerStatus>,
    pub totals: Totals,
    /// The bandwidth limit in use for chunk bytes, each way, in bytes per second (0:
    /// none).
    #[serde(default)]
    pub max_rate: u64,
    /// The last changes applied from peers, newest first (at most
    /// [`crate::sync::state::RECENT_CHANGES`]).
    #[serde(default)]
    pub recent_changes: Vec<crate::sync::state::AppliedChange>,
    /// What the last collection of kept versions and packs did (`null`: none since
    /// start).
    #[serde(default)]
    pub last_collection: Option<crate::gc::Collection>,
}

#[derive(Serialize, serde::Deserialize, Debug, Clone)]
pub struct VolumeStatus {
    pub name: String,
    /// The volume's file system has no room for some files a peer has (they wait, and
    /// are fetched once there is room): how many, their bytes, the bytes free; `null`
    /// when nothing waits.
    pub disk_full: Option<Shortage>,
    /// The volume's tree as of its last completed scan or pull round (a round under way
    /// shows in each peer's `volumes`).
    pub root: Option<String>,
    /// The hash of content and histories together ([`crate::tree::TreeNode::sync_hash`]),
    /// as of the same moment: two nodes with the same `root` hold the same files, and
    /// only with the same `histories_root` too does neither have a version the other
    /// lacks (a conflict settled on one of them then settles it everywhere).
    pub histories_root: Option<String>,
    pub files: u64,
    pub bytes: u64,
    /// The scan under way, if any.
    pub scan: Option<ScanProgress>,
    /// Conflict copies in the volume, as its last whole-volume scan (every heartbeat)
    /// counted them: the same on every node once they agree.
    pub conflict_copies: u64,
    /// The first of those copies (up to 20, in path order), described as `shoal
    /// conflicts` lists them; a copy settled since is left out.
    #[serde(default)]
    pub conflicts: Vec<crate::conflicts::ConflictCopy>,
    /// Kinds of extended attributes or ACLs that peers sent and this node could not
    /// set (a file system without support, not running as root), one line each.
    #[serde(default)]
    pub xattrs_not_applied: Vec<String>,
    /// Names that cannot be synced (here, or from a peer to here), and why: the total,
    /// by cause, and the first names by path. The roots of two nodes differ by these.
    #[serde(default)]
    pub unsyncable: crate::unsyncable::Listing,
    /// Paused by the operator (`shoal pause`), by itself or with the whole node: no
    /// pulls, no answers to peers, no announcements; local changes still indexed.
    #[serde(default)]
    pub paused: bool,
    /// The deletes the delete guard holds back from peers (how many names, the first
    /// of them, since when, and what to do); `null` when none.
    #[serde(default)]
    pub deletes_held: Option<crate::guard::HeldDeletes>,
    /// The volume's kept versions and the bytes of their chunks, as the last
    /// collection counted them (`null` before the first).
    #[serde(default)]
    pub versions_held: Option<crate::gc::Held>,
}

#[derive(Serialize, serde::Deserialize, Debug, Clone)]
pub struct PeerStatus {
    pub addr: String,
    /// The peer's identity as its certificate proved it on the last connection.
    pub node_id: Option<String>,
    pub name: Option<String>,
    pub cert_expires: Option<String>,
    pub connected: bool,
    /// Since when connected, or not (RFC 3339 UTC).
    pub since: String,
    /// Why the last connection attempts failed (or the connection was lost), while they
    /// keep failing.
    pub last_error: Option<Failure>,
    pub chunk_bytes_sent: u64,
    pub chunk_bytes_received: u64,
    pub rejected_chunks: u64,
    /// The bandwidth limit for chunk bytes to and from this peer, each way, in bytes per
    /// second (0: none; `--max-rate-peer`), besides the node's `max_rate`.
    #[serde(default)]
    pub max_rate: u64,
    /// Each shared volume's sync from this peer: in sync or behind by how much, the
    /// round under way, the last round, the last error.
    pub volumes: Vec<PeerVolumeStatus>,
}
