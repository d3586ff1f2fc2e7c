//! Room on a volume's file system for what its pulls stage.
//!
//! A pull assembles each file in a staging file on the volume's own file system before
//! publishing it. On a disk that cannot hold everything a peer has, staging everything at
//! once would fill it with partial files and publish nothing. So each file is staged only
//! once its bytes are reserved here against the room the file system has (measured with
//! `statvfs`, less [`VOLUME_RESERVE`], less what other transfers of the volume hold):
//! what fits is fetched and published, what does not waits, and the volume is reported
//! short of room ([`crate::space::ShortageState`], in the log once, in `/status` and
//! `/metrics`) until a round finds room for everything again.
//!
//! Staging files are not preallocated (`fallocate`): the room is checked, not taken, so
//! sparse files stay sparse.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use crate::space::{Shortage, ShortageState};

/// Room left free on a volume's file system (for the volume's other writers, and so that
/// sync does not write to the last byte).
pub const VOLUME_RESERVE: u64 = 1 << 20;

/// What one volume's pulls hold of its file system's room, and whether it is short.
#[derive(Default)]
pub struct Room {
    held: Arc<Mutex<Held>>,
    /// What the last complete round with each peer could not fetch for lack of room.
    waiting: Mutex<HashMap<SocketAddr, Shortage>>,
    /// Whether any peer's last round found files it had no room for.
    pub shortage: ShortageState,
}

#[derive(Default)]
struct Held {
    bytes: u64,
    /// Staging files being filled now (not to be reclaimed).
    staging: HashSet<String>,
}

/// Why [`Room::reserve`] held nothing.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// The file system has no room for the file now.
    NoRoom,
    /// Another transfer (a pull of the same file from another peer) is filling the same
    /// staging file: two writers would publish it twice, the second writing into the
    /// file the first has already put in place.
    Busy,
}

/// Bytes held for one staging file; given back when dropped.
pub struct Reservation {
    held: Arc<Mutex<Held>>,
    bytes: u64,
    staging_name: String,
}

impl Room {
    /// Holds `bytes` for the staging file `staging_name` if no other transfer holds it
    /// and the file system, with `available` bytes free, has that much room beyond
    /// [`VOLUME_RESERVE`] and what is held already.
    pub fn reserve(
        &self,
        available: u64,
        bytes: u64,
        staging_name: &str,
    ) -> Result<Reservation, Refused> {
        let mut held = self.held.lock().expect("room lock");
        if held.staging.contains(staging_name) {
            return Err(Refused::Busy);
        }
        let room = available
            .saturating_sub(VOLUME_RESERVE)
            .saturating_sub(held.bytes);
        if bytes > room {
            return Err(Refused::NoRoom);
        }
        held.bytes += bytes;
        held.staging.insert(staging_name.to_string());
        Ok(Reservation {
            held: self.held.clone(),
            bytes,
            staging_name: staging_name.to_string(),
        })
    }

    /// Records what a complete round with `peer` left waiting for room (`None`: nothing),
    /// and so whether volume `name` is short of room: while any peer's last round was.
    pub fn note_round(&self, name: &str, peer: SocketAddr, waiting: Option<Shortage>) {
        let mut by_peer = self.waiting.lock().expect("room lock");
        match waiting {
            Some(shortage) => by_peer.insert(peer, shortage),
            None => by_peer.remove(&peer),
        };
        let worst = by_peer.values().max_by_key(|s| s.needed_bytes).copied();
        self.shortage.set(&format!("volume {name}"), worst);
    }

    /// Whether a transfer is filling the staging file `name` now.
    pub fn in_use(&self, name: &str) -> bool {
        self.held.lock().expect("room lock").staging.contains(name)
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut held = self.held.lock().expect("room lock");
        held.bytes -= self.bytes;
        held.staging.remove(&self.staging_name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_share_the_room_and_give_it_back_when_dropped() {
        let room = Room::default();
        let free = VOLUME_RESERVE + 100;
        let first = room.reserve(free, 60, "a.part").expect("fits");
        assert!(room.in_use("a.part"));
        let refused = room.reserve(free, 50, "b.part").err();
        assert_eq!(refused, Some(Refused::NoRoom), "60 + 50 > 100");
        let second = room.reserve(free, 40, "c.part").expect("60 + 40 fits");
        drop(first);
        assert!(!room.in_use("a.part"));
        assert!(room.reserve(free, 50, "b.part").is_ok());
        drop(second);
        assert!(room.reserve(VOLUME_RESERVE - 1, 0, "d.part").is_ok());
        let refused = room.reserve(VOLUME_RESERVE, 1, "e.part").err();
        assert_eq!(refused, Some(Refused::NoRoom));
    }

    #[test]
    fn a_staging_file_is_filled_by_one_transfer_at_a_time() {
        let room = Room::default();
        let first = room.reserve(u64::MAX, 10, "f.part").expect("fits");
        let again = room.reserve(u64::MAX, 10, "f.part").err();
        assert_eq!(again, Some(Refused::Busy));
        drop(first);
        assert!(!room.in_use("f.part"), "the refused second holds nothing");
        assert!(room.reserve(u64::MAX, 10, "f.part").is_ok());
    }
}
