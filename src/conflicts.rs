//! Conflict copies as an operator finds and settles them (`shoal conflicts`), through
//! the running daemon (the control socket): the CLI never opens the index beside it.
//!
//! A conflict copy is the version that lost a name to a concurrent edit
//! ([`crate::sync::conflict`]): `stem.sync-conflict-<UTC time>-<node>.ext`, beside the
//! name it lost. Settling one is an ordinary local change to the volume, made through
//! the volume's directory descriptors and found by the node's watcher (or its next
//! heartbeat scan) like an operator's own edit, so it syncs to every node:
//!
//! - `mine`: keep the version under the original name, the one every node shows there
//!   once they agree: the copy is deleted;
//! - `theirs`: keep the version in the conflict copy, the one that lost the name (made
//!   by the node the copy's name ends with): it is renamed over the original name;
//! - `both`: keep both as ordinary files: the copy loses its `sync-conflict-` mark
//!   (`report.sync-conflict-20261130-120000-5f0c3a1.pdf` becomes
//!   `report.20261130-120000-5f0c3a1.pdf`) and is no longer listed.
//!
//! "Mine" and "theirs" are the same on every node: the name's version, and the copy's.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::entry::{Entry, EntryKind};
use crate::ids::NodeId;
use crate::pathname::{VolPath, escape};
use crate::sync::conflict::{MARKER, parse_copy_name};
use crate::sync::{Node, Volume};

/// The most copies one listing holds (a JSON line of a few MiB); past it, `more` says
/// how many were left out.
pub const MAX_LISTED: usize = 10_000;

/// The conflict copies of the volumes asked for.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    pub copies: Vec<ConflictCopy>,
    /// Copies past [`MAX_LISTED`], not listed.
    pub more: u64,
}

/// One conflict copy and the version it lost to.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ConflictCopy {
    pub volume: String,
    /// The copy's path in the volume (bytes that are not UTF-8 escaped as `\xNN`).
    pub path: String,
    /// The name it lost, beside it.
    pub original: String,
    /// The version in the copy: the one that lost the name (`--keep theirs`).
    pub copy: Version,
    /// The version under the original name now (`--keep mine`); `null` when nothing is
    /// there any more.
    pub current: Option<Version>,
}

/// One side of a conflict, as the index holds it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Version {
    /// `file`, `symlink`, `fifo` or `directory`.
    pub kind: String,
    /// Bytes (of a file; 0 otherwise).
    pub size: u64,
    /// Its modification time (RFC 3339 UTC).
    pub modified: String,
    /// The node that made it: for the copy, the one its name names; for the current
    /// version, the node with the most changes the copy has not seen. The full node id
    /// where known, else the start its name gives.
    pub node: Option<String>,
    /// That node's name, if it is this node or a peer that proved it.
    pub node_name: Option<String>,
}

/// Which version `resolve` keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keep {
    Mine,
    Theirs,
    Both,
}

impl Keep {
    pub fn word(self) -> &'static str {
        match self {
            Keep::Mine => "mine",
            Keep::Theirs => "theirs",
            Keep::Both => "both",
        }
    }

    pub fn parse(word: &str) -> Result<Keep, String> {
        match word {
            "mine" => Ok(Keep::Mine),
            "theirs" => Ok(Keep::Theirs),
            "both" => Ok(Keep::Both),
            _ => Err(format!("--keep {word:?}: expected mine, theirs or both")),
        }
    }
}

/// Every conflict copy the index of `volume` (or of every volume) lists, in path order.
/// Reads the whole index of those volumes: run it on a blocking thread.
pub fn list(node: &Node, volume: Option<&str>) -> Result<Listing, String> {
    if let Some(name) = volume
        && node.volume(name).is_none()
    {
        return Err(format!("volume {name} is not synced by this node"));
    }
    let names = KnownNodes::of(node);
    let mut listing = Listing::default();
    for v in node
        .volumes
        .iter()
        .filter(|v| volume.is_none_or(|n| v.name == n))
    {
        for item in node.store.descendants(v.id, &VolPath::root()) {
            let (dir, name, entry) = item.map_err(|e| e.to_string())?;
            if entry.is_tombstone() || parse_copy_name(&name).is_none() {
                continue;
            }
            if listing.copies.len() >= MAX_LISTED {
                listing.more += 1;
                continue;
            }
            listing
                .copies
                .extend(describe(node, v, &dir, &name, &entry, &names)?);
        }
    }
    Ok(listing)
}

/// The copies among `paths` (what a scan saw) that the index still lists, described.
pub fn describe_paths(node: &Node, volume: &Volume, paths: &[VolPath]) -> Vec<ConflictCopy> {
    let names = KnownNodes::of(node);
    paths
        .iter()
        .filter_map(|path| {
            let (dir, name) = path.split_last()?;
            let entry = node.store.entry(volume.id, &dir, name).ok()??;
            if entry.is_tombstone() {
                return None;
            }
            describe(node, volume, &dir, name, &entry, &names).ok()?
        })
        .collect()
}

/// The copy `dir/name` holding `entry`, and the version it lost to.
fn describe(
    node: &Node,
    volume: &Volume,
    dir: &VolPath,
    name: &[u8],
    entry: &Entry,
    names: &KnownNodes,
) -> Result<Option<ConflictCopy>, String> {
    let Some(parsed) = parse_copy_name(name) else {
        return Ok(None);
    };
    let path = |name: &[u8]| {
        dir.join(name)
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| escape(name))
    };
    let author = entry
        .version
        .pairs()
        .iter()
        .map(|(id, _)| *id)
        .find(|id| id.to_string().starts_with(&parsed.author));
    let copy = version(entry, author, names).with_fallback_node(&parsed.author);
    let current = node
        .store
        .entry(volume.id, dir, &parsed.original)
        .map_err(|e| e.to_string())?
        .filter(|e| !e.is_tombstone())
        .map(|current| {
            // The node whose changes the copy lacks the most of made the current version.
            let maker = current
                .version
                .pairs()
                .iter()
                .filter(|(id, counter)| *counter > entry.version.get(*id))
                .max_by_key(|(id, counter)| counter - entry.version.get(*id))
                .map(|(id, _)| *id);
            version(&current, maker, names)
        });
    Ok(Some(ConflictCopy {
        volume: volume.name.clone(),
        path: path(name),
        original: path(&parsed.original),
        copy,
        current,
    }))
}

fn version(entry: &Entry, node: Option<NodeId>, names: &KnownNodes) -> Version {
    let (kind, size) = match &entry.kind {
        EntryKind::File { size, .. } => ("file", *size),
        EntryKind::Dir => ("directory", 0),
        EntryKind::Symlink { .. } => ("symlink", 0),
        EntryKind::Fifo => ("fifo", 0),
        EntryKind::Tombstone { .. } => ("deleted", 0),
    };
    let modified = match u64::try_from(entry.mtime_ns) {
        Ok(ns) => SystemTime::UNIX_EPOCH + Duration::from_nanos(ns),
        Err(_) => SystemTime::UNIX_EPOCH,
    };
    Version {
        kind: kind.to_string(),
        size,
        modified: crate::sync::state::rfc3339(modified),
        node: node.map(|id| id.to_string()),
        node_name: node.and_then(|id| names.name(id)),
    }
}

impl Version {
    /// Where the index did not say which node it was, what the name says.
    fn with_fallback_node(self, author: &str) -> Version {
        Version {
            node: self.node.or_else(|| Some(author.to_string())),
            ..self
        }
    }
}

/// The names of the nodes this node knows: its own and its peers'.
pub(crate) struct KnownNodes(Vec<(NodeId, String)>);

impl KnownNodes {
    pub(crate) fn of(node: &Node) -> KnownNodes {
        let me = node.identity().map(|i| (node.meta.node_id, i.name));
        let peers = node
            .peers()
            .into_iter()
            .filter_map(|p| p.identity().map(|i| (i.node_id, i.name)));
        KnownNodes(me.into_iter().chain(peers).collect())
    }

    pub(crate) fn name(&self, id: NodeId) -> Option<String> {
        self.0
            .iter()
            .find(|(n, _)| *n == id)
            .map(|(_, name)| name.clone())
    }
}

/// Settles the conflict copy at `path` (`VOLUME/PATH`, or an absolute path inside a
/// volume's directory) by keeping `keep`; what was done, for the operator.
pub async fn resolve(node: &Node, path: &[u8], keep: Keep) -> Result<String, String> {
    let (volume, rel) = locate(node, path)?;
    if rel.is_shoal_internal() {
        return Err(format!(
            "{} is Shoal's own, not a conflict copy",
            escape(path)
        ));
    }
    let (dir, name) = rel
        .split_last()
        .ok_or_else(|| format!("{} names a volume, not a conflict copy", escape(path)))?;
    let parsed = parse_copy_name(name).ok_or_else(|| {
        format!(
            "{} is not a conflict copy (its name has no {}<time>-<node>)",
            escape(path),
            String::from_utf8_lossy(MARKER)
        )
    })?;
    let shown = |name: &[u8]| {
        format!(
            "{}/{}",
            volume.name,
            dir.join(name)
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        )
    };
    // No pull applies a change in the volume meanwhile.
    let _guard = volume.lock.lock().await;
    let fs_error = |e: crate::volume_fs::FsError| e.to_string();
    let dir_fd = volume.fs.open_dir(&dir, false).map_err(fs_error)?;
    let copy = volume
        .fs
        .stat(&dir_fd, name)
        .map_err(|_| format!("no conflict copy {}", shown(name)))?;
    if copy.is_dir() {
        return Err(format!(
            "{} is a directory, not a conflict copy",
            shown(name)
        ));
    }
    let rename = |to: &[u8], flags| {
        rustix::fs::renameat_with(
            &dir_fd,
            OsStr::from_bytes(name),
            &dir_fd,
            OsStr::from_bytes(to),
            flags,
        )
    };
    let done = match keep {
        Keep::Mine => {
            volume.fs.remove_file(&dir_fd, name).map_err(fs_error)?;
            format!(
                "kept {}; deleted the conflict copy {}",
                shown(&parsed.original),
                shown(name)
            )
        }
        Keep::Theirs => {
            if let Ok(current) = volume.fs.stat(&dir_fd, &parsed.original)
                && current.is_dir()
            {
                return Err(format!(
                    "{} is a directory now: move it away first, or keep both",
                    shown(&parsed.original)
                ));
            }
            rename(&parsed.original, rustix::fs::RenameFlags::empty()).map_err(|e| {
                format!(
                    "cannot rename {} over {}: {e}",
                    shown(name),
                    shown(&parsed.original)
                )
            })?;
            format!(
                "{} now holds the conflict copy's version; the copy is gone",
                shown(&parsed.original)
            )
        }
        Keep::Both => {
            let kept = kept_name(name);
            rename(&kept, rustix::fs::RenameFlags::NOREPLACE)
                .map_err(|e| format!("cannot rename {} to {}: {e}", shown(name), shown(&kept)))?;
            format!(
                "kept both: {} and {}",
                shown(&parsed.original),
                shown(&kept)
            )
        }
    };
    crate::volume_fs::VolumeFs::fsync_dir(&dir_fd).map_err(fs_error)?;
    tracing::warn!(
        "conflict settled by the operator (keep {}): {done}",
        keep.word()
    );
    Ok(done)
}

/// The ordinary name a copy kept with `both` takes: its name without `sync-conflict-`.
fn kept_name(copy: &[u8]) -> Vec<u8> {
    match copy.windows(MARKER.len()).rposition(|w| w == MARKER) {
        Some(at) => [&copy[..at], b".", &copy[at + MARKER.len()..]].concat(),
        None => copy.to_vec(),
    }
}

/// The volume and path `path` names: `VOLUME/PATH`, or an absolute path inside one of
/// the volumes' directories.
pub(crate) fn locate<'a>(node: &'a Node, path: &[u8]) -> Result<(&'a Volume, VolPath), String> {
    let bad = |e: crate::pathname::InvalidPath| format!("{}: {e}", escape(path));
    if path.starts_with(b"/") {
        for volume in &node.volumes {
            let root = volume.fs.root_path();
            let roots = [Some(root.to_path_buf()), std::fs::canonicalize(root).ok()];
            for root in roots.iter().flatten() {
                if let Ok(rel) = Path::new(OsStr::from_bytes(path)).strip_prefix(root) {
                    let rel = VolPath::parse(rel.as_os_str().as_bytes()).map_err(bad)?;
                    return Ok((volume, rel));
                }
            }
        }
        return Err(format!(
            "{} is in no volume's directory of this node",
            escape(path)
        ));
    }
    let (name, rest) = match path.iter().position(|&b| b == b'/') {
        Some(at) => (&path[..at], &path[at + 1..]),
        None => (path, &b""[..]),
    };
    let name = String::from_utf8_lossy(name);
    let volume = node
        .volume(&name)
        .ok_or_else(|| format!("volume {name} is not synced by this node (give VOLUME/PATH or the file's absolute path)"))?;
    Ok((volume, VolPath::parse(rest).map_err(bad)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_kept_with_both_loses_its_mark_and_nothing_else() {
        assert_eq!(
            kept_name(b"report.sync-conflict-20261130-120000-5f0c3a1.pdf"),
            b"report.20261130-120000-5f0c3a1.pdf"
        );
        assert!(!crate::sync::conflict::is_conflict_copy(&kept_name(
            b"Makefile.sync-conflict-20261130-120000-5f0c3a1-2"
        )));
        for word in ["mine", "theirs", "both"] {
            assert_eq!(Keep::parse(word).map(Keep::word), Ok(word));
        }
        assert!(Keep::parse("ours").is_err());
    }
}
