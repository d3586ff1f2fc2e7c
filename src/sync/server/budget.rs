//! The responder's memory budget: one node-wide count of the bytes that peers'
//! requests cost while they are served, so that no number of connections and streams
//! can make the serving side hold more than [`Budget::total`].
//!
//! What is counted, each reserved before it is allocated:
//! - a request's body and the request it decodes to (twice the frame's length, taken
//!   when the frame header has been read and before its body is);
//! - an answer while it is built (what is read from the store for it, its value and its
//!   encoded frame) and then its frame until the requester has acknowledged every byte
//!   of it (until then s2n-quic keeps a copy in the stream's send buffer).
//!
//! Each member (a proven node id) may hold at most a quarter of the budget
//! ([`Budget::member_share`]), so one member's streams cannot take all of it from the
//! others. A reservation waits while the bytes are spent (within the request's or the
//! answer's timeout, after which the stream is refused with an error naming the budget);
//! nothing is ever allocated past it. An answer that would cost more than a member's
//! share (the chunk list of a file with hundreds of thousands of chunks, which only
//! this node's own data can hold) waits for the whole share, so it is built alone.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::ids::NodeId;
use crate::protocol::CHUNK_FRAME_OVERHEAD;

/// A member's share of the budget with the default chunk sizes: room for an honest
/// pull from this node (16 `GetChunks` answers in flight, each with
/// [`UNACKED_PER_STREAM`] written and a [`READ_RUN`] being read, 12 MiB; a directory's
/// entries, 12 MiB; chunk lists).
pub const MEMBER_SHARE: usize = 32 << 20;

/// Members that can hold their whole share at once: the budget is this many shares.
pub const SHARES: usize = 4;

/// Chunk bytes one `GetChunks` answer may have written and not yet seen acknowledged
/// before it waits for the acknowledgements.
pub const UNACKED_PER_STREAM: usize = 512 << 10;

/// Bytes of chunk frames one `GetChunks` answer reads in one go (at least one frame of
/// the largest chunk): a few chunks per hand-off to the blocking pool.
pub const READ_RUN: usize = 256 << 10;

/// Bytes of one chunk reference in a chunk list, in memory and encoded (a 32-byte id
/// and a 4-byte length).
pub const CHUNK_REF_BYTES: usize = 36;

/// The node-wide budget and each member's share of it.
#[derive(Debug)]
pub struct Budget {
    node: Arc<Semaphore>,
    share: usize,
    members: Mutex<HashMap<NodeId, Arc<Semaphore>>>,
}

impl Default for Budget {
    fn default() -> Self {
        Budget::new(MEMBER_SHARE)
    }
}

impl Budget {
    /// A budget of [`SHARES`] member shares of `share` bytes.
    pub fn new(share: usize) -> Self {
        Budget {
            node: Arc::new(Semaphore::new(SHARES * share)),
            share,
            members: Mutex::default(),
        }
    }

    /// A budget whose member share holds at least three frames of the largest chunk
    /// (`max_chunk` bytes: a chunk being read, encoded and in the send buffer), and
    /// [`MEMBER_SHARE`] with smaller chunks.
    pub fn for_chunks(max_chunk: usize) -> Self {
        Budget::new(MEMBER_SHARE.max(3 * (max_chunk + CHUNK_FRAME_OVERHEAD)))
    }

    /// The whole budget, in bytes.
    pub fn total(&self) -> usize {
        SHARES * self.share
    }

    /// What one member may hold at once, in bytes.
    pub fn member_share(&self) -> usize {
        self.share
    }

    /// Bytes not reserved at the moment, node-wide.
    pub fn available(&self) -> usize {
        self.node.available_permits()
    }

    /// Reserves `bytes` for `member` (at most its share: see the module header),
    /// waiting while they are spent.
    pub async fn reserve(&self, member: NodeId, bytes: usize) -> Reserved {
        let permits = u32::try_from(bytes.clamp(1, self.share)).expect("shares are below 4 GiB");
        let member = self.member(member);
        let mine = member.acquire_many_owned(permits).await;
        let node = self.node.clone().acquire_many_owned(permits).await;
        let (Ok(mine), Ok(node)) = (mine, node) else {
            unreachable!("the budget's semaphores are never closed");
        };
        Reserved(Some((mine, node)))
    }

    /// `member`'s share (forgetting the shares of members holding nothing, so the map
    /// holds only members being served).
    fn member(&self, member: NodeId) -> Arc<Semaphore> {
        let mut members = self.members.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(share) = members.get(&member) {
            return share.clone();
        }
        members.retain(|_, share| {
            Arc::strong_count(share) > 1 || share.available_permits() < self.share
        });
        members
            .entry(member)
            .or_insert_with(|| Arc::new(Semaphore::new(self.share)))
            .clone()
    }
}

/// Bytes of the budget held (of the member's share and of the node's), given back when
/// dropped.
#[derive(Debug, Default)]
pub struct Reserved(Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>);

impl Reserved {
    /// How many bytes are held.
    pub fn bytes(&self) -> usize {
        self.0.as_ref().map_or(0, |(mine, _)| mine.num_permits())
    }

    /// Holds `other`'s bytes too (both reserved for the same member).
    pub fn absorb(&mut self, other: Reserved) {
        match (&mut self.0, other.0) {
            (Some((mine, node)), Some((their_share, their_node))) => {
                mine.merge(their_share);
                node.merge(their_node);
            }
            (held @ None, other) => *held = other,
            (Some(_), None) => {}
        }
    }

    /// Gives back all but `bytes` (when what was reserved for the worst case turned out
    /// smaller).
    pub fn shrink_to(&mut self, bytes: usize) {
        if let Some((mine, node)) = &mut self.0 {
            let excess = mine.num_permits().saturating_sub(bytes.max(1));
            drop((mine.split(excess), node.split(excess)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reservations_wait_for_bytes_given_back_and_never_exceed_a_share() {
        let budget = Arc::new(Budget::new(1 << 20));
        let (a, b) = (NodeId(1), NodeId(2));
        let mut first = budget.reserve(a, (1 << 20) - 10).await;
        assert_eq!(budget.available(), budget.total() - (1 << 20) + 10);
        let waiting = tokio::spawn({
            let budget = budget.clone();
            async move { budget.reserve(a, 100).await.bytes() }
        });
        tokio::task::yield_now().await;
        assert!(
            !waiting.is_finished(),
            "100 bytes are not left in a's share"
        );
        // Another member is not held up by a's share being spent.
        let other = budget.reserve(b, 1 << 20).await;
        assert_eq!(other.bytes(), 1 << 20);
        first.shrink_to(1000);
        assert_eq!(waiting.await.unwrap(), 100);
        let mut held = Reserved::default();
        held.absorb(first);
        held.absorb(budget.reserve(a, 24).await);
        assert_eq!(held.bytes(), 1024);
        drop((held, other));
        assert_eq!(budget.available(), budget.total());
        // More than a share waits for all of it, and takes no more.
        let whole = budget.reserve(a, usize::MAX).await;
        assert_eq!(whole.bytes(), budget.member_share());
        assert_eq!(budget.available(), budget.total() - budget.member_share());
    }

    #[test]
    fn a_share_holds_three_frames_of_the_largest_chunk() {
        assert_eq!(Budget::for_chunks(256 << 10).member_share(), MEMBER_SHARE);
        let big = Budget::for_chunks(16 << 20);
        assert_eq!(big.member_share(), 3 * ((16 << 20) + CHUNK_FRAME_OVERHEAD));
        assert_eq!(big.total(), SHARES * big.member_share());
    }
}
