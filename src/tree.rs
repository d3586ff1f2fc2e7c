//! The Merkle tree of a volume's namespace.
//!
//! Each directory has a node: its children, sorted by name bytes, are cut into pages,
//! each page is hashed over its children's records, and the directory's hash is a hash
//! over its page hashes. A child directory enters its parent's record through its own
//! hash, so the root hash covers the whole volume. What is hashed is exactly what syncs:
//! names, kinds, permission bits, file sizes, file and FIFO mtimes, content ids,
//! symlink targets, extended attributes (ACLs included) and hard-link groups. Inode numbers, atimes, ownership and scan order are not, so identical trees
//! give identical roots on any machine. Tombstones are not content and are not hashed.
//!
//! Page boundaries depend only on names (a name ends a page when its hash has its low
//! ten bits zero, so pages average [`PAGE_TARGET_ENTRIES`] children), so adding or
//! removing a name in a directory of 100,000 changes one page, not all of them, and a
//! peer comparing trees fetches only the pages whose hashes differ. The byte layout is
//! in `schema/store.md`, "Merkle tree".
//!
//! The tree is brought up to date from the `dirty` marks that every index change
//! leaves on the changed directory: deepest directories first, each one's new node
//! written together with a dirty mark on its parent, so a crash at any point leaves
//! marks for everything still to redo.

use std::cmp::Reverse;
use std::collections::BTreeSet;

use crate::entry::{Entry, EntryKind};
use crate::ids::{TreeHash, VolumeId};
use crate::pathname::VolPath;
use crate::store::{Durability, Store, StoreError};

const PAGE_CONTEXT: &str = "shoal 2026-11 tree page v1";
const DIR_CONTEXT: &str = "shoal 2026-11 tree dir v1";
const VERSIONS_CONTEXT: &str = "shoal 2026-11 tree versions v1";

/// Average children per page.
pub const PAGE_TARGET_ENTRIES: u32 = 1024;
/// A page is cut after this many children even without a name boundary (bounds the
/// page size whatever the names).
pub const PAGE_MAX_ENTRIES: u32 = 4096;

const KIND_FILE: u8 = 1;
const KIND_DIR: u8 = 2;
const KIND_SYMLINK: u8 = 3;
const KIND_FIFO: u8 = 4;

/// One page of a directory's children in the Merkle tree.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct PageSummary {
    /// Name of the page's first child (pages are name ranges).
    pub first_name: Vec<u8>,
    pub entries: u32,
    pub hash: TreeHash,
}

/// A directory's node in the Merkle tree, with totals over its whole subtree.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct TreeNode {
    /// Hash of the content (what the directory holds; the same on every node that holds
    /// the same files).
    pub hash: TreeHash,
    /// Hash of the histories: every child's version vector (tombstones included) and
    /// child directories' own `versions`. Nodes whose contents agree but whose histories
    /// do not (say, the same file created on two nodes) still find each other this way.
    pub versions: TreeHash,
    pub pages: Vec<PageSummary>,
    pub totals: SubtreeTotals,
}

impl TreeNode {
    /// What two nodes compare to know whether they are fully in sync: content and
    /// histories together.
    pub fn sync_hash(&self) -> TreeHash {
        let mut hasher = blake3::Hasher::new();
        hasher
            .update(self.hash.as_bytes())
            .update(self.versions.as_bytes());
        TreeHash(*hasher.finalize().as_bytes())
    }
}

/// Counts over a directory's subtree (tombstones excluded, the directory itself not
/// counted).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct SubtreeTotals {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
    pub chunks: u64,
}

impl SubtreeTotals {
    pub fn add(&mut self, other: &SubtreeTotals) {
        self.files += other.files;
        self.dirs += other.dirs;
        self.symlinks += other.symlinks;
        self.bytes += other.bytes;
        self.chunks += other.chunks;
    }
}

/// Whether `name` ends its page.
pub fn is_page_boundary(name: &[u8]) -> bool {
    let hash = blake3::hash(name);
    let low = u16::from_le_bytes([hash.as_bytes()[0], hash.as_bytes()[1]]);
    u32::from(low) % PAGE_TARGET_ENTRIES == 0
}

/// Set on a record's kind byte when the record ends with the digest of the entry's
/// extended attributes (an entry without any hashes exactly as before they synced).
const WITH_XATTRS: u8 = 0x80;
/// Set on a file record's kind byte when the record carries its hard-link group leader.
const WITH_LINK: u8 = 0x40;

/// Appends the hashed record of one child to `out`. `subtree` is the child's own tree
/// hash when it is a directory.
fn encode_record(out: &mut Vec<u8>, name: &[u8], entry: &Entry, subtree: Option<TreeHash>) {
    out.extend_from_slice(&(name.len() as u16).to_le_bytes());
    out.extend_from_slice(name);
    let flags = match entry.xattrs.is_empty() {
        true => 0,
        false => WITH_XATTRS,
    } | match entry.link {
        Some(_) => WITH_LINK,
        None => 0,
    };
    match &entry.kind {
        EntryKind::File {
            size, content_id, ..
        } => {
            out.push(KIND_FILE | flags);
            out.extend_from_slice(&entry.mode.to_le_bytes());
            out.extend_from_slice(&size.to_le_bytes());
            out.extend_from_slice(&entry.mtime_ns.to_le_bytes());
            out.extend_from_slice(content_id.as_bytes());
        }
        EntryKind::Dir => {
            out.push(KIND_DIR | flags);
            out.extend_from_slice(&entry.mode.to_le_bytes());
            out.extend_from_slice(subtree.unwrap_or_else(empty_dir_hash).as_bytes());
        }
        EntryKind::Symlink { target } => {
            out.push(KIND_SYMLINK | flags);
            out.extend_from_slice(&(target.len() as u16).to_le_bytes());
            out.extend_from_slice(target);
        }
        EntryKind::Fifo => {
            out.push(KIND_FIFO | flags);
            out.extend_from_slice(&entry.mode.to_le_bytes());
            out.extend_from_slice(&entry.mtime_ns.to_le_bytes());
        }
        EntryKind::Tombstone { .. } => unreachable!("tombstones are never hashed"),
    }
    if let Some(leader) = &entry.link {
        out.extend_from_slice(&(leader.as_bytes().len() as u16).to_le_bytes());
        out.extend_from_slice(leader.as_bytes());
    }
    if flags & WITH_XATTRS != 0 {
        out.extend_from_slice(&entry.xattrs.digest());
    }
}

fn page_hash(records: &[u8]) -> TreeHash {
    let mut hasher = blake3::Hasher::new_derive_key(PAGE_CONTEXT);
    hasher.update(records);
    TreeHash(*hasher.finalize().as_bytes())
}

fn dir_hash(pages: &[PageSummary]) -> TreeHash {
    let mut hasher = blake3::Hasher::new_derive_key(DIR_CONTEXT);
    hasher.update(&(pages.len() as u32).to_le_bytes());
    for page in pages {
        hasher.update(&page.entries.to_le_bytes());
        hasher.update(page.hash.as_bytes());
    }
    TreeHash(*hasher.finalize().as_bytes())
}

/// The hash of a directory with no children.
pub fn empty_dir_hash() -> TreeHash {
    dir_hash(&[])
}

/// The versions hash of a directory with no children (no tombstones either).
fn empty_dir_versions() -> TreeHash {
    TreeHash(
        *blake3::Hasher::new_derive_key(VERSIONS_CONTEXT)
            .finalize()
            .as_bytes(),
    )
}

/// Builds a directory's node from its children in name order. `subtree` gives a child
/// directory's node (its hash and totals).
pub fn build_node(
    children: impl Iterator<Item = Result<(Vec<u8>, Entry), StoreError>>,
    mut subtree: impl FnMut(&[u8]) -> Result<Option<TreeNode>, StoreError>,
) -> Result<TreeNode, StoreError> {
    let mut pages = Vec::new();
    let mut totals = SubtreeTotals::default();
    let mut records = Vec::new();
    let mut first_name: Option<Vec<u8>> = None;
    let mut entries = 0u32;
    let mut versions = blake3::Hasher::new_derive_key(VERSIONS_CONTEXT);
    for child in children {
        let (name, entry) = child?;
        versions
            .update(&(name.len() as u16).to_le_bytes())
            .update(&name);
        versions.update(&(entry.version.pairs().len() as u16).to_le_bytes());
        for (node, counter) in entry.version.pairs() {
            versions
                .update(&node.0.to_le_bytes())
                .update(&counter.to_le_bytes());
        }
        let mut child_hash = None;
        match &entry.kind {
            EntryKind::Tombstone { .. } => {
                versions.update(&[0]);
                continue;
            }
            EntryKind::File { size, chunks, .. } => {
                totals.files += 1;
                totals.bytes += size;
                totals.chunks += u64::from(*chunks);
            }
            EntryKind::Symlink { .. } => totals.symlinks += 1,
            // Counted in no total: a FIFO holds no data.
            EntryKind::Fifo => {}
            EntryKind::Dir => {
                totals.dirs += 1;
                let node = subtree(&name)?;
                if let Some(node) = &node {
                    totals.add(&node.totals);
                    child_hash = Some(node.hash);
                }
                // A directory no update has built a node for (an empty one a scan
                // found; one taken from a peer has a node) counts as an empty one, as
                // in the content hash: whether it has a node depends on how it came,
                // and two nodes holding the same would never agree.
                let child_versions = node.map_or_else(empty_dir_versions, |n| n.versions);
                versions.update(child_versions.as_bytes());
            }
        }
        encode_record(&mut records, &name, &entry, child_hash);
        entries += 1;
        let boundary = entries >= PAGE_MAX_ENTRIES || is_page_boundary(&name);
        first_name.get_or_insert(name);
        if boundary {
            let first_name = first_name.take().expect("set above");
            pages.push(PageSummary {
                first_name,
                entries,
                hash: page_hash(&records),
            });
            records.clear();
            entries = 0;
        }
    }
    if let Some(first_name) = first_name {
        pages.push(PageSummary {
            first_name,
            entries,
            hash: page_hash(&records),
        });
    }
    Ok(TreeNode {
        hash: dir_hash(&pages),
        versions: TreeHash(*versions.finalize().as_bytes()),
        pages,
        totals,
    })
}

/// Directories whose new nodes [`update`] writes in one batch, at most: one write each
/// cost a sixth of an update of many small directories.
const DIRS_PER_WRITE: usize = 256;

/// Recomputes the node of every dirty directory of `vol` and of their ancestors, and
/// returns the volume's root node. Every change the volume's feed numbered before the
/// update began is then in the tree (noted for `GetChanges`: the position a peer's walk
/// reaches).
pub fn update(store: &Store, vol: VolumeId) -> Result<TreeNode, StoreError> {
    // Read first: every entry numbered up to it is committed, its directory marked dirty
    // in the same write, so the update below takes it in.
    let covers = store.feed_mark(vol)?;
    let mut pending: BTreeSet<(Reverse<usize>, VolPath)> = store
        .dirty_dirs(vol)?
        .into_iter()
        .map(|dir| (Reverse(dir.depth()), dir))
        .collect();
    if store.tree_node(vol, &VolPath::root())?.is_none() {
        pending.insert((Reverse(0), VolPath::root()));
    }
    // Directories of one depth are written together, a bounded number at a time: a
    // node is built from its children's nodes, one level deeper, so a level's batch is
    // written before the next level is read.
    let mut batch = store.batch();
    let mut batch_dirs = 0;
    let mut batch_depth = None;
    while let Some((Reverse(depth), dir)) = pending.pop_first() {
        if batch_depth != Some(depth) || batch_dirs >= DIRS_PER_WRITE {
            if !batch.is_empty() {
                store.write(
                    std::mem::replace(&mut batch, store.batch()),
                    Durability::Buffered,
                )?;
            }
            (batch_dirs, batch_depth) = (0, Some(depth));
        }
        batch_dirs += 1;
        let exists = match dir.split_last() {
            None => true,
            Some((parent, name)) => store.entry(vol, &parent, name)?.is_some_and(|e| e.is_dir()),
        };
        let old = store.tree_node(vol, &dir)?;
        let new = if exists {
            let node = build_node(store.children(vol, &dir), |name| {
                store.tree_node(
                    vol,
                    &dir.join(name).map_err(|e| StoreError::Corrupt {
                        cf: crate::store::keys::CF_ENTRIES,
                        key: dir.display().to_string(),
                        reason: e.to_string(),
                    })?,
                )
            })?;
            batch.put_tree_node(vol, &dir, &node);
            Some(node)
        } else {
            batch.delete_tree_node(vol, &dir);
            None
        };
        batch.clear_dirty(vol, &dir);
        let summary = |n: &TreeNode| (n.hash, n.versions, n.totals);
        let changed = old.as_ref().map(summary) != new.as_ref().map(summary);
        if let Some(parent) = dir.parent().filter(|_| changed) {
            batch.mark_dirty(vol, &parent);
            pending.insert((Reverse(parent.depth()), parent));
        }
    }
    store.write(batch, Durability::Buffered)?;
    store.note_tree_covers(vol, covers)?;
    Ok(store
        .tree_node(vol, &VolPath::root())?
        .expect("the root node was written above or before"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::VersionVector;
    use crate::ids::ContentId;

    fn file(content: u8) -> Entry {
        Entry {
            kind: EntryKind::File {
                size: 1,
                content_id: ContentId([content; 32]),
                chunks: 1,
            },
            mode: 0o644,
            mtime_ns: 1,
            uid: 0,
            gid: 0,
            xattrs: Default::default(),
            link: None,
            version: VersionVector::default(),
        }
    }

    fn node_of(children: &[(Vec<u8>, Entry)]) -> TreeNode {
        build_node(children.iter().cloned().map(Ok), |_| Ok(None)).unwrap()
    }

    #[test]
    fn a_large_directory_is_paged_and_one_change_touches_one_page() {
        let children: Vec<(Vec<u8>, Entry)> = (0..100_000u32)
            .map(|i| (format!("file-{i:06}").into_bytes(), file(1)))
            .collect();
        let before = node_of(&children);
        assert!(before.pages.len() > 50, "{} pages", before.pages.len());
        assert!(before.pages.iter().all(|p| p.entries <= PAGE_MAX_ENTRIES));
        assert_eq!(before.totals.files, 100_000);

        let mut edited = children.clone();
        edited[54_321].1 = file(2);
        let after = node_of(&edited);
        let differing = before
            .pages
            .iter()
            .zip(&after.pages)
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!((before.pages.len(), differing), (after.pages.len(), 1));
        assert_ne!(before.hash, after.hash);

        // Removing a name that is not a boundary changes one page too.
        let mut removed = children.clone();
        let victim = (40_000..)
            .find(|&i| !is_page_boundary(&children[i].0))
            .unwrap();
        removed.remove(victim);
        let after = node_of(&removed);
        let differing = before
            .pages
            .iter()
            .zip(&after.pages)
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(differing, 1);
    }

    #[test]
    fn tombstones_ownership_and_versions_change_only_the_versions_hash() {
        let plain = vec![(b"a".to_vec(), file(1))];
        let mut other = plain.clone();
        other[0].1.uid = 1000;
        other[0].1.version.bump(crate::ids::NodeId(5));
        other.push((
            b"b".to_vec(),
            Entry {
                kind: EntryKind::Tombstone { deleted_at_ns: 3 },
                ..file(1)
            },
        ));
        assert_eq!(node_of(&plain).hash, node_of(&other).hash);
        assert_ne!(node_of(&plain).versions, node_of(&other).versions);
        let mut chmod = plain.clone();
        chmod[0].1.mode = 0o600;
        assert_ne!(node_of(&plain).hash, node_of(&chmod).hash);
        assert_eq!(node_of(&[]).hash, empty_dir_hash());
    }

    #[test]
    fn an_empty_subdirectory_hashes_the_same_with_or_without_a_node() {
        let dir = Entry {
            kind: EntryKind::Dir,
            ..file(1)
        };
        let children = [(b"empty".to_vec(), dir)];
        let without = node_of(&children);
        let with =
            build_node(children.iter().cloned().map(Ok), |_| Ok(Some(node_of(&[])))).unwrap();
        assert_eq!(without.sync_hash(), with.sync_hash());
        // A subdirectory holding only a tombstone is not empty to the histories.
        let tombstone = Entry {
            kind: EntryKind::Tombstone { deleted_at_ns: 3 },
            ..file(1)
        };
        let holding_a_delete = build_node(children.iter().cloned().map(Ok), |_| {
            Ok(Some(node_of(&[(b"gone".to_vec(), tombstone.clone())])))
        })
        .unwrap();
        assert_eq!(without.hash, holding_a_delete.hash);
        assert_ne!(without.versions, holding_a_delete.versions);
    }
}
