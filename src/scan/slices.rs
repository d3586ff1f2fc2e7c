//! Heartbeat slices: how `serve` rescans a volume whose file watcher is healthy, a share
//! of it each heartbeat, so that an idle node costs nearly nothing.
//!
//! The watcher sees almost every change, but not all of them: a file written through a
//! shared mapping (`mmap`) or through a hard link outside the volume raises no event in
//! the volume, and a watch that inotify drops or never adds goes unnoticed. Rescans are
//! the backstop. A whole rescan lists and `lstat`s every name (2.4-3.2 CPU seconds for
//! a million files here): at every heartbeat that is the node's main cost while idle.
//!
//! So each heartbeat rescans one *slice*: the volume's directories in the order of their
//! tree keys, from where the previous slice stopped, until they hold [`SLICES`]th of the
//! volume's names (at least [`MIN_SLICE_NAMES`], at most [`MAX_SLICE_DIRS`] directories).
//! Each directory of a slice has its own names listed and checked against their scan
//! stamps ([`Depth::Names`]); a subdirectory the index does not know is walked whole, as
//! in any narrow scan. When the slices reach the last directory a *pass* is complete,
//! and the next one starts again at the volume's root. A directory that is indexed at
//! the start of a pass is visited once in it, so a change the watcher missed is found
//! within [`SLICES`] heartbeats (more only for a volume of over `SLICES` ×
//! `MAX_SLICE_DIRS` directories). A volume of at most [`MIN_SLICE_NAMES`] names fits in
//! one slice: it is rescanned whole every heartbeat.
//!
//! Whole rescans remain where the watcher cannot be trusted: at start (changes made
//! while the node was down), when events were lost (a queue overflow, a watcher error),
//! and at every heartbeat once the watcher has stopped (the watch limit). A whole rescan
//! starts a new pass. Peers' anti-entropy rounds are not sliced: they run every heartbeat.
//!
//! A whole rescan counts the volume's conflict copies; a pass counts them slice by slice
//! and gives the total when it ends ([`Slicer::scanned`]).

use std::collections::BTreeMap;

use super::{CONFLICT_PATHS_KEPT, Depth, ScanReport, ScanScope};
use crate::ids::VolumeId;
use crate::pathname::VolPath;
use crate::store::{Store, StoreError};

/// A pass over a volume takes at most this many heartbeats.
pub const SLICES: u64 = 24;

/// The least names a slice holds: a rescan of this many unchanged names costs a few
/// tens of milliseconds, and a volume this small is rescanned whole every heartbeat.
pub const MIN_SLICE_NAMES: u64 = 10_000;

/// The most directories in one slice (bounds the slice's list in memory).
pub const MAX_SLICE_DIRS: usize = 65_536;

/// Where a volume's pass stands.
#[derive(Debug)]
pub struct Slicer {
    /// The least names of a slice ([`MIN_SLICE_NAMES`] but in tests).
    floor: u64,
    /// The first directory of the next slice; `None` when the next slice starts a pass.
    next: Option<VolPath>,
    /// Set by [`Slicer::plan`]: where the planned slice leaves the pass (`Some(None)`:
    /// it ends it). Only a slice that was scanned moves the pass on.
    planned: Option<Option<VolPath>>,
    /// Conflict copies the pass has counted so far, and the first of them.
    conflict_copies: u64,
    conflict_paths: Vec<VolPath>,
}

/// The conflict copies a completed pass counted.
#[derive(Debug, PartialEq, Eq)]
pub struct PassConflicts {
    pub copies: u64,
    pub paths: Vec<VolPath>,
}

impl Slicer {
    /// A pass about to start, with slices of at least `floor` names.
    pub fn new(floor: u64) -> Self {
        Slicer {
            floor: floor.max(1),
            next: None,
            planned: None,
            conflict_copies: 0,
            conflict_paths: Vec::new(),
        }
    }

    /// The scope of the next heartbeat's rescan of `vol`: the next slice, or the whole
    /// volume when one slice holds all of it.
    pub fn plan(&mut self, store: &Store, vol: VolumeId) -> Result<ScanScope, StoreError> {
        let volume_names = store
            .tree_node(vol, &VolPath::root())?
            .map_or(0, |n| n.totals.files + n.totals.dirs + n.totals.symlinks);
        let budget = volume_names.div_ceil(SLICES).max(self.floor);
        let start = self.next.clone().unwrap_or_else(VolPath::root);
        let mut dirs = BTreeMap::new();
        let mut names = 0u64;
        let mut after = None;
        for item in store.tree_nodes_from(vol, &start) {
            let (dir, node) = item?;
            if names >= budget || dirs.len() >= MAX_SLICE_DIRS {
                after = Some(dir);
                break;
            }
            let own: u64 = node.pages.iter().map(|p| u64::from(p.entries)).sum();
            names += 1 + own;
            dirs.insert(dir, Depth::Names);
        }
        let whole = self.next.is_none() && after.is_none();
        self.planned = Some(after);
        Ok(match whole {
            true => ScanScope::Everything,
            false => ScanScope::Dirs(dirs),
        })
    }

    /// The slice planned last was scanned, with `report`: the pass moves on. At the end
    /// of a pass of several slices, the conflict copies it counted (a whole rescan
    /// counts its own).
    pub fn scanned(&mut self, report: &ScanReport) -> Option<PassConflicts> {
        let after = self.planned.take()?;
        if self.next.is_none() && after.is_none() {
            self.restart();
            return None;
        }
        self.conflict_copies += report.conflict_copies;
        let room = CONFLICT_PATHS_KEPT.saturating_sub(self.conflict_paths.len());
        self.conflict_paths
            .extend(report.conflict_paths.iter().take(room).cloned());
        self.next = after;
        if self.next.is_some() {
            return None;
        }
        let ended = PassConflicts {
            copies: self.conflict_copies,
            paths: std::mem::take(&mut self.conflict_paths),
        };
        self.restart();
        Some(ended)
    }

    /// A whole rescan covered the volume: the next slice starts a new pass.
    pub fn restart(&mut self) {
        *self = Slicer::new(self.floor);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::OpenOptions;

    fn dirs(scope: &ScanScope) -> Vec<String> {
        match scope {
            ScanScope::Everything => vec!["<everything>".into()],
            ScanScope::Dirs(dirs) => dirs
                .keys()
                .map(|d| String::from_utf8_lossy(d.as_bytes()).into_owned())
                .collect(),
        }
    }

    /// A scanned volume of `dirs` directories of `files` files each.
    fn volume(dirs: usize, files: usize) -> (tempfile::TempDir, Store, VolumeId) {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("vol");
        for d in 0..dirs {
            let dir = root.join(format!("d{d:02}"));
            std::fs::create_dir_all(&dir).unwrap();
            for f in 0..files {
                std::fs::write(dir.join(format!("f{f}")), format!("{d}/{f}")).unwrap();
            }
        }
        let create = OpenOptions {
            create: true,
            ..OpenOptions::default()
        };
        let store = Store::open(&tmp.path().join("state"), create).unwrap();
        super::super::scan_volume(&store, "v", &root, &Default::default()).unwrap();
        let vol = store.volume("v").unwrap().unwrap().id;
        (tmp, store, vol)
    }

    #[test]
    fn a_pass_visits_every_directory_once_in_at_most_slices_heartbeats() {
        // 40 directories of 5 files: 240 names, slices of at least 10.
        let (_tmp, store, vol) = volume(40, 5);
        let mut slicer = Slicer::new(10);
        let mut seen = Vec::new();
        let mut slices = 0;
        loop {
            let scope = slicer.plan(&store, vol).unwrap();
            slices += 1;
            seen.extend(dirs(&scope));
            let report = ScanReport {
                conflict_copies: 1,
                ..ScanReport::default()
            };
            if let Some(ended) = slicer.scanned(&report) {
                assert_eq!(ended.copies, slices);
                break;
            }
            assert!(slices < 100, "the pass never ended");
        }
        assert!(slices > 1 && slices <= SLICES, "{slices} slices");
        let mut expected: Vec<String> = (0..40).map(|d| format!("d{d:02}")).collect();
        expected.insert(0, String::new());
        assert_eq!(seen, expected, "each directory once, in key order");
        // The next pass starts at the root again.
        assert_eq!(dirs(&slicer.plan(&store, vol).unwrap())[0], "");
    }

    #[test]
    fn a_slice_that_was_not_scanned_is_planned_again() {
        let (_tmp, store, vol) = volume(40, 5);
        let mut slicer = Slicer::new(10);
        let first = dirs(&slicer.plan(&store, vol).unwrap());
        slicer.scanned(&ScanReport::default());
        let second = dirs(&slicer.plan(&store, vol).unwrap());
        // Its scan failed: `scanned` is not called.
        assert_ne!(first, second);
        assert_eq!(dirs(&slicer.plan(&store, vol).unwrap()), second);
    }

    #[test]
    fn a_volume_within_one_slice_is_rescanned_whole_and_a_restart_begins_a_pass() {
        let (_tmp, store, vol) = volume(3, 2);
        let mut slicer = Slicer::new(MIN_SLICE_NAMES);
        let scope = slicer.plan(&store, vol).unwrap();
        assert!(matches!(scope, ScanScope::Everything));
        assert_eq!(slicer.scanned(&ScanReport::default()), None);

        let (_tmp, store, vol) = volume(40, 5);
        let mut slicer = Slicer::new(10);
        slicer.plan(&store, vol).unwrap();
        slicer.scanned(&ScanReport::default());
        assert_ne!(dirs(&slicer.plan(&store, vol).unwrap())[0], "");
        slicer.restart();
        assert_eq!(dirs(&slicer.plan(&store, vol).unwrap())[0], "");
    }
}
