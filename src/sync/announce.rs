//! Announcing local changes: a `Notify` to every peer that shares the volume, after
//! which it pulls at once.
//!
//! A change must reach a peer whatever state its connection is in when the change is
//! made, without anyone waiting on that peer:
//! - each peer keeps, per volume, whether an announcement is in flight or still owed
//!   ([`Announcements`]);
//! - a change made while the connection to the peer is down (or being opened again) is
//!   owed, and announced as soon as a connection is up ([`announce_owed`], which the
//!   peer's task calls right after the `Hello`), not at the next heartbeat;
//! - a `Notify` is sent in a task of its own, which waits for the `Ack` as long as the
//!   connection lives: a peer frozen for a moment gets it when it runs again (QUIC
//!   delivers the request then); one whose connection fails owes it again, and a
//!   connection opened meanwhile carries it at once;
//! - one `Notify` per peer and volume is in flight at a time; a change made meanwhile is
//!   announced again once it is acknowledged (the peer's round may have started before
//!   that change).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use s2n_quic::connection::Handle;

use super::{Node, Peer, request};
use crate::protocol::Request;

/// The announcements one peer has not acknowledged, by volume.
#[derive(Default)]
pub struct Announcements(Mutex<HashMap<String, Announcement>>);

enum Announcement {
    /// A `Notify` waits for its `Ack`; `again`: a change came after it was sent.
    InFlight { again: bool },
    /// Nothing could be sent (no connection): sent once one is up.
    Owed,
}

/// Tells `peer` that `volume` changed here (it shares the volume).
pub fn announce(peer: &Arc<Peer>, volume: &str) {
    let mut state = peer.announcements.0.lock().expect("announcements lock");
    if let Some(Announcement::InFlight { again }) = state.get_mut(volume) {
        *again = true;
        return;
    }
    // Read under the announcements lock: a connection set after this read finds the
    // change owed when its task calls `announce_owed`, which takes the same lock.
    let Some(handle) = peer.connection() else {
        state.insert(volume.to_string(), Announcement::Owed);
        return;
    };
    state.insert(volume.to_string(), Announcement::InFlight { again: false });
    drop(state);
    tokio::spawn(send(peer.clone(), handle, volume.to_string()));
}

/// Sends what `peer` is owed, now that its connection is up (volumes paused here stay
/// owed: resuming announces them).
pub fn announce_owed(node: &Node, peer: &Arc<Peer>) {
    let owed: Vec<String> = {
        let mut state = peer.announcements.0.lock().expect("announcements lock");
        state.retain(|volume, _| peer.shares(volume));
        state
            .iter()
            .filter(|(volume, a)| matches!(a, Announcement::Owed) && !node.paused.holds(volume))
            .map(|(volume, _)| volume.clone())
            .collect()
    };
    for volume in owed {
        tracing::debug!(peer = %peer.addr, %volume, "announcing changes made while disconnected");
        {
            // Announced afresh: `announce` sees it owed, not in flight.
            let mut state = peer.announcements.0.lock().expect("announcements lock");
            state.remove(&volume);
        }
        announce(peer, &volume);
    }
}

/// Sends `Notify` for `volume` to `peer` until it is acknowledged (again while changes
/// came meanwhile), the peer refuses it, or no connection is left to carry it.
async fn send(peer: Arc<Peer>, mut handle: Handle, volume: String) {
    let notify = Request::Notify {
        volume: volume.clone(),
    };
    loop {
        let result = request(&mut handle, &notify).await;
        let mut state = peer.announcements.0.lock().expect("announcements lock");
        match result {
            Ok(_) => {
                tracing::debug!(peer = %peer.addr, %volume, "notify acknowledged");
                if let Some(Announcement::InFlight { again }) = state.get_mut(&volume)
                    && *again
                {
                    *again = false;
                    continue;
                }
                state.remove(&volume);
                return;
            }
            Err(e) if e.is_connection_lost() => {
                // A connection opened since carries it now; otherwise the next one will.
                match peer.connection() {
                    Some(newer) if newer.id() != handle.id() => handle = newer,
                    _ => {
                        tracing::debug!(peer = %peer.addr, %volume, "notify failed: {e}; announced again once connected");
                        state.insert(volume, Announcement::Owed);
                        return;
                    }
                }
            }
            // The peer refused it (the volume is paused or forbidden there): it pulls
            // when that changes.
            Err(e) => {
                tracing::debug!(peer = %peer.addr, %volume, "notify refused: {e}");
                state.remove(&volume);
                return;
            }
        }
    }
}
