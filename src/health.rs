//! Readiness: whether this node is doing its job, and if not, why. Liveness (`/healthz`,
//! the image's `HEALTHCHECK`) only says the process answers: restarting a task cannot
//! fix a peer with another CA or a full disk, so Swarm must not kill it for those. What
//! an operator must hear of goes here instead: `/readyz` (503 with the causes),
//! `/status`'s `health` and the `shoal_ready` gauge.
//!
//! A node is degraded while any of these holds (`N` heartbeats, the node's `--heartbeat`):
//! - peers are expected (discovery found some) and none has been reachable for
//!   [`UNREACHABLE_HEARTBEATS`] heartbeats (every connection attempt failed, for
//!   example on certificates from another CA);
//! - a volume's pull rounds with some peer failed [`FAILING_ROUNDS`] times in a row;
//! - a volume's file system has no room for files a peer has;
//! - the state directory is too full for the index to be written;
//! - the delete guard holds a volume's deletes back from peers until an operator
//!   releases them (`crate::guard`).

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::sync::Node;
use crate::sync::state::rfc3339;

/// Heartbeats without any reachable peer after which the node is degraded (so it is
/// reported within three heartbeats of losing its last peer).
pub const UNREACHABLE_HEARTBEATS: u32 = 2;

/// Failed pull rounds in a row after which a volume degrades the node.
pub const FAILING_ROUNDS: u64 = 3;

/// What is wrong.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CauseKind {
    NoPeerReachable,
    VolumeFailing,
    VolumeFull,
    StateDirFull,
    DeleteHeld,
}

impl CauseKind {
    pub const ALL: [CauseKind; 5] = [
        CauseKind::NoPeerReachable,
        CauseKind::VolumeFailing,
        CauseKind::VolumeFull,
        CauseKind::StateDirFull,
        CauseKind::DeleteHeld,
    ];

    pub fn name(self) -> &'static str {
        match self {
            CauseKind::NoPeerReachable => "no_peer_reachable",
            CauseKind::VolumeFailing => "volume_failing",
            CauseKind::VolumeFull => "volume_full",
            CauseKind::StateDirFull => "state_dir_full",
            CauseKind::DeleteHeld => "delete_held",
        }
    }
}

/// One reason the node is degraded.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Cause {
    pub kind: CauseKind,
    /// The volume it concerns, if one.
    pub volume: Option<String>,
    pub message: String,
    /// Since when (RFC 3339 UTC), where known.
    pub since: Option<String>,
}

/// The node's readiness, as `/status` and `/readyz` show it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// `true` when nothing below holds.
    pub ready: bool,
    pub causes: Vec<Cause>,
}

/// Looks at the node's state now (no lock a sync takes, no store read).
pub fn assess(node: &Node) -> Health {
    let mut causes = Vec::new();
    unreachable_peers(node, &mut causes);
    for peer in node.peers() {
        for (volume, failure) in peer.sync.failing_volumes() {
            if failure.count() >= FAILING_ROUNDS {
                causes.push(Cause {
                    kind: CauseKind::VolumeFailing,
                    message: format!(
                        "volume {volume}: {} pull rounds from {} failed in a row: {}",
                        failure.count(),
                        peer.addr,
                        failure.message()
                    ),
                    volume: Some(volume),
                    since: Some(rfc3339(failure.since())),
                });
            }
        }
    }
    for volume in &node.volumes {
        if let Some(short) = volume.room.shortage.get() {
            causes.push(Cause {
                kind: CauseKind::VolumeFull,
                volume: Some(volume.name.clone()),
                message: format!(
                    "volume {}: no room for {} files ({}) a peer has; {} free",
                    volume.name,
                    short.waiting_files,
                    crate::space::Size(short.needed_bytes),
                    crate::space::Size(short.available_bytes)
                ),
                since: None,
            });
        }
    }
    for volume in &node.volumes {
        if let Some(held) = volume.guard.status(&volume.name) {
            causes.push(Cause {
                kind: CauseKind::DeleteHeld,
                volume: Some(volume.name.clone()),
                message: format!("volume {}: {}", volume.name, held.message),
                since: Some(held.since),
            });
        }
    }
    if let Some(short) = node.state_room.get() {
        causes.push(Cause {
            kind: CauseKind::StateDirFull,
            volume: None,
            message: format!(
                "state directory {}: {} free, the index needs {}",
                node.store.state_dir().display(),
                crate::space::Size(short.available_bytes),
                crate::space::Size(short.needed_bytes)
            ),
            since: None,
        });
    }
    Health {
        ready: causes.is_empty(),
        causes,
    }
}

/// Adds a cause if peers are expected and none has been reachable for
/// [`UNREACHABLE_HEARTBEATS`] heartbeats.
fn unreachable_peers(node: &Node, causes: &mut Vec<Cause>) {
    let peers: Vec<_> = node
        .peers()
        .into_iter()
        .filter(|p| !p.sync.is_self())
        .collect();
    if peers.is_empty() {
        return;
    }
    let patience = node.heartbeat * UNREACHABLE_HEARTBEATS;
    let mut latest = SystemTime::UNIX_EPOCH;
    for peer in &peers {
        let (connected, since) = peer.sync.link();
        if connected {
            return;
        }
        latest = latest.max(since);
    }
    if SystemTime::now()
        .duration_since(latest)
        .unwrap_or(Duration::ZERO)
        < patience
    {
        return;
    }
    let errors: Vec<String> = peers
        .iter()
        .map(|p| {
            let error = p.sync.link_failure();
            let error = error.as_ref().map_or("never reached", |f| f.message());
            format!("{}: {error}", p.addr)
        })
        .collect();
    causes.push(Cause {
        kind: CauseKind::NoPeerReachable,
        volume: None,
        message: format!(
            "no peer reachable for {}: {}",
            humantime::format_duration(patience),
            errors.join("; ")
        ),
        since: Some(rfc3339(latest)),
    });
}
