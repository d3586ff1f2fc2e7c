//! The local HTTP endpoint: `/healthz`, `/status` (JSON) and `/metrics` (Prometheus).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;

use crate::space::Shortage;
use crate::sync::Node;
use crate::sync::stats::Totals;

pub async fn serve(
    addr: SocketAddr,
    node: Arc<Node>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    let router = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .with_state(node);
    let listener = tokio::net::TcpListener::bind(addr).await?;
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VolumeLabels {
    volume: String,
}

async fn metrics(State(node): State<Arc<Node>>) -> impl IntoResponse {
    let status = node_status(&node);
    let mut registry = Registry::with_prefix("shoal");
    for (name, help, value) in status.totals.metrics() {
        let metric = Counter::<u64>::default();
        metric.inc_by(value);
        registry.register(name, help, metric);
    }
    let files = Family::<VolumeLabels, Gauge>::default();
    let bytes = Family::<VolumeLabels, Gauge>::default();
    let full = Family::<VolumeLabels, Gauge>::default();
    let waiting = Family::<VolumeLabels, Gauge>::default();
    for v in &status.volumes {
        let labels = VolumeLabels {
            volume: v.name.clone(),
        };
        files.get_or_create(&labels).set(v.files as i64);
        bytes.get_or_create(&labels).set(v.bytes as i64);
        full.get_or_create(&labels)
            .set(i64::from(v.disk_full.is_some()));
        waiting
            .get_or_create(&labels)
            .set(v.disk_full.map_or(0, |s| s.needed_bytes as i64));
    }
    let state_full = Gauge::<i64>::default();
    state_full.set(i64::from(status.state_dir_full.is_some()));
    registry.register(
        "state_dir_full",
        "Whether the state directory is too full for the index to be written (1) or not (0)",
        state_full,
    );
    registry.register("volume_files", "Files in the volume", files);
    registry.register("volume_bytes", "Bytes in the volume's files", bytes);
    registry.register(
        "volume_disk_full",
        "Whether files wait for room on the volume's file system (1) or not (0)",
        full,
    );
    registry.register(
        "volume_bytes_waiting_for_room",
        "Bytes of the files that wait for room on the volume's file system",
        waiting,
    );
    let connected = Family::<PeerLabels, Gauge>::default();
    let sent = Family::<PeerLabels, Counter>::default();
    let received = Family::<PeerLabels, Counter>::default();
    for p in &status.peers {
        let labels = PeerLabels {
            peer: p.addr.clone(),
        };
        connected.get_or_create(&labels).set(i64::from(p.connected));
        sent.get_or_create(&labels).inc_by(p.chunk_bytes_sent);
        received
            .get_or_create(&labels)
            .inc_by(p.chunk_bytes_received);
    }
    registry.register("peer_connected", "Whether the peer is connected", connected);
    registry.register(
        "peer_chunk_bytes_sent",
        "Chunk bytes sent to the peer",
        sent,
    );
    registry.register(
        "peer_chunk_bytes_received",
        "Chunk bytes received from the peer",
        received,
    );
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, &registry) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            text,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// What `/status` shows: the node, its volumes, its peers and its counters.
pub fn node_status(node: &Node) -> NodeStatus {
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let volumes = node
        .volumes
        .iter()
        .map(|v| {
            let node = node
                .store
                .tree_node(v.id, &crate::pathname::VolPath::root())
                .ok()
                .flatten();
            VolumeStatus {
                name: v.name.clone(),
                disk_full: v.room.shortage.get(),
                root: node.as_ref().map(|n| n.hash.to_hex()),
                files: node.as_ref().map_or(0, |n| n.totals.files),
                bytes: node.as_ref().map_or(0, |n| n.totals.bytes),
            }
        })
        .collect();
    let peers = node
        .peers()
        .iter()
        .map(|p| PeerStatus {
            addr: p.addr.to_string(),
            node_id: p.node_id().map(|id| id.to_string()),
            name: p.identity().map(|i| i.name),
            cert_expires: p.identity().map(|i| expiry(&i)),
            connected: p.connected.load(Ordering::Relaxed),
            chunk_bytes_sent: load(&p.chunk_bytes_sent),
            chunk_bytes_received: load(&p.chunk_bytes_received),
            rejected_chunks: load(&p.rejected_chunks),
        })
        .collect();
    NodeStatus {
        node_id: node.meta.node_id.to_string(),
        name: node.identity().map(|i| i.name),
        cert_expires: node.identity().as_ref().map(expiry),
        state_dir_full: node.state_room.get(),
        volumes,
        peers,
        totals: node.stats.totals(),
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
    /// The state directory's file system is too full for the index to be written
    /// (scans and pulls wait until there is room); `null` when it is not.
    pub state_dir_full: Option<Shortage>,
    pub volumes: Vec<VolumeStatus>,
    pub peers: Vec<PeerStatus>,
    pub totals: Totals,
}

#[derive(Serialize, serde::Deserialize, Debug, Clone)]
pub struct VolumeStatus {
    pub name: String,
    /// The volume's file system has no room for some files a peer has (they wait, and
    /// are fetched once there is room): how many, their bytes, the bytes free; `null`
    /// when nothing waits.
    pub disk_full: Option<Shortage>,
    pub root: Option<String>,
    pub files: u64,
    pub bytes: u64,
}

#[derive(Serialize, serde::Deserialize, Debug, Clone)]
pub struct PeerStatus {
    pub addr: String,
    /// The peer's identity as its certificate proved it on the last connection.
    pub node_id: Option<String>,
    pub name: Option<String>,
    pub cert_expires: Option<String>,
    pub connected: bool,
    pub chunk_bytes_sent: u64,
    pub chunk_bytes_received: u64,
    pub rejected_chunks: u64,
}
