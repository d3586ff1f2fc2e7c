//! What the index knows of one name in a volume: its kind, the metadata that syncs, and
//! its version vector.
//!
//! Entries are the unit of multi-master sync. A deleted name stays as a tombstone (with
//! its version vector) so that the delete can reach nodes that were offline.

use std::cmp::Ordering;

use crate::ids::{ContentId, NodeId};
use crate::pathname::VolPath;
use crate::xattrs::Xattrs;

/// Permission bits that sync (including setuid, setgid and sticky).
pub const MODE_MASK: u32 = 0o7777;

#[derive(Clone, PartialEq, Eq, Debug)]
pub enum EntryKind {
    File {
        size: u64,
        content_id: ContentId,
        /// Number of chunks in the file's chunk list (not part of any hash).
        chunks: u32,
    },
    Dir,
    /// A symbolic link, recorded as its target bytes (wherever it points) and never
    /// followed.
    Symlink {
        target: Vec<u8>,
    },
    /// A named pipe: recreated empty, with its mode, owner and mtime (what flows through
    /// it is a running program's, not data).
    Fifo,
    /// A deleted name.
    Tombstone {
        deleted_at_ns: i64,
    },
}

#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Entry {
    pub kind: EntryKind,
    /// Permission bits (`MODE_MASK`); 0 for symlinks and tombstones.
    pub mode: u32,
    /// Modification time in nanoseconds since the Unix epoch; synced for files and
    /// directories (a directory's is set after its children are applied, so it sticks).
    pub mtime_ns: i64,
    /// Ownership; synced only by nodes that run as root.
    pub uid: u32,
    pub gid: u32,
    /// Extended attributes and ACLs of a file or directory ([`crate::xattrs`]).
    pub xattrs: Xattrs,
    /// For a file whose inode has other names in the volume (hard links): the group's
    /// leader, the least of those paths by bytes (itself included), the same on every
    /// name of the group. A receiver links the other names to the leader instead of
    /// fetching them.
    pub link: Option<VolPath>,
    pub version: VersionVector,
}

impl Entry {
    /// The tombstone of a name deleted now (`deleted_at_ns`, by this node's clock) with
    /// history `version`.
    pub fn deleted(version: VersionVector, deleted_at_ns: i64) -> Entry {
        Entry {
            kind: EntryKind::Tombstone { deleted_at_ns },
            mode: 0,
            mtime_ns: 0,
            uid: 0,
            gid: 0,
            xattrs: Xattrs::default(),
            link: None,
            version,
        }
    }

    pub fn is_tombstone(&self) -> bool {
        matches!(self.kind, EntryKind::Tombstone { .. })
    }

    pub fn is_dir(&self) -> bool {
        matches!(self.kind, EntryKind::Dir)
    }

    /// Whether two entries describe the same thing on disk, ignoring their histories:
    /// the same kind, content, permission bits, file and directory mtime, ownership,
    /// extended attributes and hard-link group.
    /// Two deletes are the same state whatever else their entries carry.
    pub fn same_state(&self, other: &Entry) -> bool {
        match (&self.kind, &other.kind) {
            (EntryKind::Tombstone { .. }, EntryKind::Tombstone { .. }) => true,
            (a, b) => {
                a == b
                    && self.mode == other.mode
                    && self.uid == other.uid
                    && self.gid == other.gid
                    && self.xattrs == other.xattrs
                    && self.link == other.link
                    && (!self.has_synced_mtime() || self.mtime_ns == other.mtime_ns)
            }
        }
    }

    /// The hard-link group leader when this entry is another name of it (not the leader
    /// itself): the name a receiver links instead of fetching.
    pub fn link_leader(&self, own: &VolPath) -> Option<&VolPath> {
        self.link.as_ref().filter(|leader| *leader != own)
    }

    /// Whether the mtime is part of what syncs (symlinks' and tombstones' are not).
    pub fn has_synced_mtime(&self) -> bool {
        matches!(
            self.kind,
            EntryKind::File { .. } | EntryKind::Dir | EntryKind::Fifo
        )
    }
}

/// Nanoseconds since the epoch of a (seconds, nanoseconds) time, saturating instead of
/// overflowing for times beyond the year 2262 (or before 1677).
pub fn timestamp_ns(secs: i64, nsec: i64) -> i64 {
    secs.saturating_mul(1_000_000_000).saturating_add(nsec)
}

/// How two version vectors relate.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Causality {
    Equal,
    /// Self has seen everything the other has, and more.
    Dominates,
    DominatedBy,
    Concurrent,
}

/// Most (node, counter) pairs a version vector may hold: one per node that ever changed
/// the name. Decoders refuse more, and a merge that would leave no room for one more
/// node's bump is refused, so every stored vector stays encodable and decodable.
pub const MAX_VECTOR_PAIRS: usize = 1024;

/// Largest counter a peer may send (2^62: a node changing one name a million times a
/// second needs 146,000 years to get there), so that a local bump never saturates and
/// two different versions never compare equal.
pub const MAX_COUNTER: u64 = 1 << 62;

/// Why a version vector from a peer (or a merge with one) is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VectorError {
    #[error("a version vector of {0} pairs (at most {MAX_VECTOR_PAIRS})")]
    TooLong(usize),
    #[error("version vector pairs not sorted by node id, or a node repeated")]
    NotCanonical,
    #[error("version vector counter {0} out of range (1..={MAX_COUNTER})")]
    Counter(u64),
}

/// One counter per node that changed an entry, sorted by node id.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct VersionVector(Vec<(NodeId, u64)>);

impl VersionVector {
    /// Builds a vector from (node, counter) pairs in any order; zero counters and
    /// repeated nodes (the larger counter wins) are normalised away.
    pub fn from_pairs(pairs: impl IntoIterator<Item = (NodeId, u64)>) -> Self {
        let mut counters: Vec<(NodeId, u64)> = pairs.into_iter().filter(|&(_, c)| c > 0).collect();
        counters.sort();
        counters.dedup_by(|later, earlier| {
            if later.0 == earlier.0 {
                earlier.1 = earlier.1.max(later.1);
                true
            } else {
                false
            }
        });
        Self(counters)
    }

    /// A vector exactly as a peer must send it: at most `MAX_VECTOR_PAIRS` pairs,
    /// strictly increasing node ids, counters in `1..=MAX_COUNTER`.
    pub fn try_canonical(pairs: Vec<(NodeId, u64)>) -> Result<Self, VectorError> {
        if pairs.len() > MAX_VECTOR_PAIRS {
            return Err(VectorError::TooLong(pairs.len()));
        }
        if let Some(&(_, counter)) = pairs.iter().find(|&&(_, c)| c == 0 || c > MAX_COUNTER) {
            return Err(VectorError::Counter(counter));
        }
        if pairs.windows(2).any(|w| w[0].0 >= w[1].0) {
            return Err(VectorError::NotCanonical);
        }
        Ok(Self(pairs))
    }

    pub fn pairs(&self) -> &[(NodeId, u64)] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn get(&self, node: NodeId) -> u64 {
        self.0
            .binary_search_by_key(&node, |&(n, _)| n)
            .map(|i| self.0[i].1)
            .unwrap_or(0)
    }

    /// Records one more change made by `node`.
    pub fn bump(&mut self, node: NodeId) {
        self.bump_past(node, 0);
    }

    /// Records one more change made by `node`, counted past `issued`: the highest count
    /// `node` already gave this name, which the vector may lack (see
    /// `Store::issued`). A count is never given to two changes: a node holding one of
    /// them would take the other for a change it has seen.
    pub fn bump_past(&mut self, node: NodeId, issued: u64) {
        match self.0.binary_search_by_key(&node, |&(n, _)| n) {
            Ok(i) => self.0[i].1 = self.0[i].1.max(issued).saturating_add(1),
            Err(i) => self.0.insert(i, (node, issued.saturating_add(1))),
        }
    }

    /// The least vector that dominates or equals both; refused if it would leave no
    /// room under `MAX_VECTOR_PAIRS` for one more node's bump.
    pub fn merged(&self, other: &VersionVector) -> Result<VersionVector, VectorError> {
        let merged = Self::from_pairs(self.0.iter().chain(other.0.iter()).copied());
        match merged.0.len() < MAX_VECTOR_PAIRS {
            true => Ok(merged),
            false => Err(VectorError::TooLong(merged.0.len())),
        }
    }

    pub fn compare(&self, other: &VersionVector) -> Causality {
        let (mut greater, mut less) = (false, false);
        let nodes = self.0.iter().chain(other.0.iter()).map(|&(n, _)| n);
        for node in nodes {
            match self.get(node).cmp(&other.get(node)) {
                Ordering::Greater => greater = true,
                Ordering::Less => less = true,
                Ordering::Equal => {}
            }
        }
        match (greater, less) {
            (false, false) => Causality::Equal,
            (true, false) => Causality::Dominates,
            (false, true) => Causality::DominatedBy,
            (true, true) => Causality::Concurrent,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: NodeId = NodeId(1);
    const B: NodeId = NodeId(2);

    #[test]
    fn a_change_is_counted_past_a_count_already_issued() {
        let mut v = VersionVector::from_pairs([(A, 1), (B, 1)]);
        v.bump_past(A, 2);
        assert_eq!(v.get(A), 3);
        v.bump_past(A, 1);
        assert_eq!(v.get(A), 4, "a lower issued count changes nothing");
        v.bump_past(NodeId(3), 5);
        assert_eq!(v.get(NodeId(3)), 6);
    }

    #[test]
    fn version_vectors_order_changes() {
        let mut a = VersionVector::default();
        a.bump(A);
        let mut b = a.clone();
        assert_eq!(a.compare(&b), Causality::Equal);
        b.bump(B);
        assert_eq!(b.compare(&a), Causality::Dominates);
        assert_eq!(a.compare(&b), Causality::DominatedBy);
        a.bump(A);
        assert_eq!(a.compare(&b), Causality::Concurrent);
        let merged = a.merged(&b).unwrap();
        assert_eq!(merged.pairs(), &[(A, 2), (B, 1)]);
        assert_eq!(merged.compare(&a), Causality::Dominates);
        assert_eq!(merged.compare(&b), Causality::Dominates);
    }

    #[test]
    fn peers_must_send_canonical_bounded_vectors() {
        assert!(VersionVector::try_canonical(vec![(A, 1), (B, MAX_COUNTER)]).is_ok());
        assert_eq!(
            VersionVector::try_canonical(vec![(B, 1), (A, 1)]),
            Err(VectorError::NotCanonical)
        );
        assert_eq!(
            VersionVector::try_canonical(vec![(A, 1), (A, 2)]),
            Err(VectorError::NotCanonical)
        );
        assert_eq!(
            VersionVector::try_canonical(vec![(A, u64::MAX)]),
            Err(VectorError::Counter(u64::MAX))
        );
        assert_eq!(
            VersionVector::try_canonical(vec![(A, 0)]),
            Err(VectorError::Counter(0))
        );
        let long: Vec<_> = (0..=MAX_VECTOR_PAIRS as u64)
            .map(|n| (NodeId(n), 1))
            .collect();
        assert_eq!(
            VersionVector::try_canonical(long),
            Err(VectorError::TooLong(MAX_VECTOR_PAIRS + 1))
        );
        // Two full halves from different nodes do not merge past the bound.
        let half =
            |from: u64| VersionVector::from_pairs((from..from + 600).map(|n| (NodeId(n), 1)));
        assert_eq!(half(0).merged(&half(1000)), Err(VectorError::TooLong(1200)));
    }

    #[test]
    fn from_pairs_normalises() {
        let vv = VersionVector::from_pairs([(B, 3), (A, 0), (B, 5), (A, 2)]);
        assert_eq!(vv.pairs(), &[(A, 2), (B, 5)]);
    }
}
