//! What the index knows of one name in a volume: its kind, the metadata that syncs, and
//! its version vector.
//!
//! Entries are the unit of multi-master sync. A deleted name stays as a tombstone (with
//! its version vector) so that the delete can reach nodes that were offline.

use std::cmp::Ordering;

use crate::ids::{ContentId, NodeId};

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
    /// A symbolic link, recorded as its target bytes and never followed.
    Symlink {
        target: Vec<u8>,
    },
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
    pub version: VersionVector,
}

impl Entry {
    pub fn is_tombstone(&self) -> bool {
        matches!(self.kind, EntryKind::Tombstone { .. })
    }

    pub fn is_dir(&self) -> bool {
        matches!(self.kind, EntryKind::Dir)
    }

    /// Whether two entries describe the same thing on disk, ignoring their histories:
    /// the same kind, content, permission bits, file and directory mtime and ownership.
    pub fn same_state(&self, other: &Entry) -> bool {
        let same_kind = match (&self.kind, &other.kind) {
            (EntryKind::Tombstone { .. }, EntryKind::Tombstone { .. }) => true,
            (a, b) => a == b,
        };
        same_kind
            && self.mode == other.mode
            && self.uid == other.uid
            && self.gid == other.gid
            && (!self.has_synced_mtime() || self.mtime_ns == other.mtime_ns)
    }

    /// Whether the mtime is part of what syncs (symlinks' and tombstones' are not).
    pub fn has_synced_mtime(&self) -> bool {
        matches!(self.kind, EntryKind::File { .. } | EntryKind::Dir)
    }
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

    pub fn pairs(&self) -> &[(NodeId, u64)] {
        &self.0
    }

    pub fn get(&self, node: NodeId) -> u64 {
        self.0
            .binary_search_by_key(&node, |&(n, _)| n)
            .map(|i| self.0[i].1)
            .unwrap_or(0)
    }

    /// Records one more change made by `node`.
    pub fn bump(&mut self, node: NodeId) {
        match self.0.binary_search_by_key(&node, |&(n, _)| n) {
            Ok(i) => self.0[i].1 = self.0[i].1.saturating_add(1),
            Err(i) => self.0.insert(i, (node, 1)),
        }
    }

    /// The least vector that dominates or equals both.
    pub fn merged(&self, other: &VersionVector) -> VersionVector {
        Self::from_pairs(self.0.iter().chain(other.0.iter()).copied())
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
        let merged = a.merged(&b);
        assert_eq!(merged.pairs(), &[(A, 2), (B, 1)]);
        assert_eq!(merged.compare(&a), Causality::Dominates);
        assert_eq!(merged.compare(&b), Causality::Dominates);
    }

    #[test]
    fn from_pairs_normalises() {
        let vv = VersionVector::from_pairs([(B, 3), (A, 0), (B, 5), (A, 2)]);
        assert_eq!(vv.pairs(), &[(A, 2), (B, 5)]);
    }
}
