//! Offline verification: do the index, the pack files and the live files agree?
//!
//! `verify` re-reads every indexed file chunk by chunk, at the boundaries the index
//! recorded, and checks each chunk's BLAKE3 id, so damage is reported as a byte range
//! of a named file. It also checks that the index is consistent with itself (chunk
//! lists match content ids and sizes, every chunk of a live file has its location
//! record, every location points at an existing file) and that every pack record is
//! intact. Findings are collected, not fatal: one run lists everything.
//!
//! The line between damage and an edit: a file whose size or mtime differs from the
//! index was changed by someone since the last scan (a warning: scan it); content that
//! no longer matches while size and mtime are unchanged is damage (bit rot, or a write
//! that hid itself).
//!
//! With a sample (`--sample PERCENT`), each indexed name and each location record is
//! checked with that probability, so a spot check of a huge store takes a fraction of
//! the time; packs are always read whole.
//!
//! Pack records that no index record points at are reported as orphans (a warning:
//! their space could be reclaimed, nothing is lost).
//!
//! Verification only reads, through a read-only open of the store, so it is safe beside
//! a running `shoal serve`. `shoal repair` ([`crate::repair`]) acts on the findings.

mod files;
mod locations;
mod packs;
mod versions;

use std::path::PathBuf;
use std::time::Instant;

use indicatif::ProgressBar;
use serde::Serialize;

use crate::pathname::VolPath;
use crate::store::{Store, StoreError};
use crate::workers::Pool;
use files::{DeletedDirs, FileCheck, Target, check_entry, check_file, gone_under_deleted};
pub(crate) use locations::ChunkListCache;
use locations::check_locations;
use packs::check_packs;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Something differs from what the index promises and was not an edit.
    Damage,
    /// Not damage, but worth knowing (e.g. files edited since the last scan).
    Warning,
}

/// Declares [`Problem`] from one table: each variant with its stable name.
macro_rules! problems {
    ($($(#[doc = $doc:literal])* $variant:ident = $name:literal,)*) => {
        /// What a finding is about. Serialized (`--json`'s `problem`) and shown by its
        /// stable name, as listed in `schema/store.md`, "Verify and repair".
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        pub enum Problem {
            $($(#[doc = $doc])* #[serde(rename = $name)] $variant,)*
        }

        impl Problem {
            /// Every problem, in the table's order.
            pub const ALL: &[Problem] = &[$(Problem::$variant,)*];

            /// The stable name (`content-mismatch`, ...).
            pub fn name(self) -> &'static str {
                match self {
                    $(Problem::$variant => $name,)*
                }
            }
        }
    };
}

problems! {
    /// Bytes of a file no longer hash to its chunk ids; size and mtime unchanged.
    ContentMismatch = "content-mismatch",
    /// The file is shorter than the index says, mtime unchanged.
    Truncated = "truncated",
    /// The file is longer than the index says, mtime unchanged.
    SizeMismatch = "size-mismatch",
    /// Indexed, not on disk.
    Missing = "missing",
    /// Cannot be stat'ed, opened or read.
    Unreadable = "unreadable",
    /// A directory, symlink or file where the index has another kind.
    TypeChanged = "type-changed",
    /// Edited since the last scan (a warning: not damage).
    Modified = "modified",
    /// A file's chunk list is absent from the index.
    IndexMissingChunkList = "index-missing-chunk-list",
    /// A file's chunk list disagrees with its content id or size.
    IndexInconsistent = "index-inconsistent",
    /// A chunk of a file has no location record.
    IndexMissingLocation = "index-missing-location",
    /// A live location record points at no such chunk of that file.
    IndexDanglingLocation = "index-dangling-location",
    /// Live in the index under a directory the index holds as deleted, and on no disk:
    /// no scan looks under a deleted directory, so nothing else would ever notice.
    IndexLiveUnderDeleted = "index-live-under-deleted",
    /// The state directory has packs or a lock file but no index.
    IndexMissing = "index-missing",
    /// A volume to verify is not in the index at all.
    VolumeNotIndexed = "volume-not-indexed",
    /// An index key names no valid path.
    BadIndexKey = "bad-index-key",
    /// A pack record's bytes do not hash to its id.
    PackRecordDamaged = "pack-record-damaged",
    /// A pack ends inside a record (a torn tail).
    PackTruncated = "pack-truncated",
    /// Not a pack, or an I/O error reading it.
    PackUnreadable = "pack-unreadable",
    /// A pack location record points at a missing pack or at other bytes.
    PackLocationBroken = "pack-location-broken",
    /// An intact pack record no index record points at (a warning).
    OrphanPackRecord = "orphan-pack-record",
    /// A kept version references chunks held nowhere on this node (a warning: its
    /// peers hold them).
    VersionChunkNotHeld = "version-chunk-not-held",
}

impl Problem {
    /// Damage to a live file's content that its indexed chunk list can restore.
    pub fn is_restorable(self) -> bool {
        matches!(
            self,
            Problem::ContentMismatch
                | Problem::Truncated
                | Problem::SizeMismatch
                | Problem::Missing
        )
    }

    /// A problem of the index's own records, not of the file they describe.
    pub fn is_index_record(self) -> bool {
        matches!(
            self,
            Problem::IndexMissingChunkList
                | Problem::IndexInconsistent
                | Problem::IndexMissingLocation
                | Problem::IndexDanglingLocation
                | Problem::IndexLiveUnderDeleted
                | Problem::IndexMissing
        )
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One problem found.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    /// What it is, by a stable name for scripts (e.g. `content-mismatch`).
    pub problem: Problem,
    pub volume: Option<String>,
    /// The file, escaped for display, or the pack file.
    pub path: Option<String>,
    /// Byte range `[start, end)` of a file that is damaged.
    pub range: Option<(u64, u64)>,
    pub detail: String,
    /// The file as a volume path, for `repair` (the display form above is escaped).
    #[serde(skip)]
    pub file: Option<VolPath>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct VerifyReport {
    pub volumes: Vec<String>,
    pub files_checked: u64,
    pub bytes_hashed: u64,
    pub packs_checked: u64,
    /// The share of names re-hashed, when sampling (`--sample`).
    pub sample_percent: Option<f64>,
    pub findings: Vec<Finding>,
    pub seconds: f64,
}

impl VerifyReport {
    pub fn damaged(&self) -> bool {
        self.findings.iter().any(|f| f.severity == Severity::Damage)
    }

    /// Counts a file re-hashed: its bytes and what was found.
    fn add_checked(
        &mut self,
        (bytes, findings): (u64, Vec<Finding>),
        progress: Option<&ProgressBar>,
    ) {
        self.files_checked += 1;
        self.bytes_hashed += bytes;
        self.findings.extend(findings);
        if let Some(progress) = progress {
            progress.inc(bytes);
        }
    }
}

/// Files waiting for a re-hashing thread (and results waiting to be counted).
const QUEUE_DEPTH: usize = 64;

/// How to verify.
#[derive(Clone, Debug, Default)]
pub struct VerifyOptions {
    /// Check each name and location with this probability (0 < p <= 1); all when `None`.
    pub sample: Option<f64>,
    /// Advanced by the bytes hashed.
    pub progress: Option<ProgressBar>,
}

/// Picks items with a fixed probability (xorshift64, seeded at random).
struct Sampler {
    threshold: Option<u64>,
    state: u64,
}

impl Sampler {
    fn new(sample: Option<f64>) -> Self {
        let seed = crate::ids::NodeId::random().map_or(0x9E37_79B9_7F4A_7C15, |n| n.0);
        Sampler {
            threshold: sample
                .filter(|p| *p < 1.0)
                .map(|p| (p.max(0.0) * u64::MAX as f64) as u64),
            state: seed | 1,
        }
    }

    fn pick(&mut self) -> bool {
        let Some(threshold) = self.threshold else {
            return true;
        };
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.state < threshold
    }
}

/// Verifies the named volumes (each with its directory) and the store's packs.
pub fn verify(
    store: &Store,
    volumes: &[(String, PathBuf)],
    options: &VerifyOptions,
) -> Result<VerifyReport, StoreError> {
    let started = Instant::now();
    let progress = options.progress.clone();
    let mut sampler = Sampler::new(options.sample);
    let mut report = VerifyReport {
        volumes: volumes.iter().map(|(n, _)| n.clone()).collect(),
        sample_percent: options.sample.map(|p| p * 100.0),
        ..Default::default()
    };
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    std::thread::scope(|scope| -> Result<(), StoreError> {
        let mut checkers = Pool::start(scope, threads, QUEUE_DEPTH, || {
            |check: FileCheck| check_file(&check)
        });
        for (name, root) in volumes {
            let Some(record) = store.volume(name)? else {
                report.findings.push(finding(
                    Severity::Damage,
                    Problem::VolumeNotIndexed,
                    Some(name),
                    None,
                    format!("volume {name} is not in the index (run `shoal scan --volume {name}`)"),
                ));
                continue;
            };
            let target = Target {
                vol: record.id,
                name,
                root,
                held: crate::guard::held_paths(store, record.id)?,
            };
            let mut deleted_dirs = DeletedDirs::default();
            for item in store.descendants(target.vol, &VolPath::root()) {
                let (dir, entry_name, entry) = item?;
                // Followed for every entry, sampled or not: what lies under a deleted
                // directory is known from the entries before it.
                let under_deleted = !entry.is_tombstone()
                    && deleted_dirs.holds(store, target.vol, &dir, &entry_name, &entry)?;
                if !sampler.pick()
                    || under_deleted && gone_under_deleted(&target, &dir, &entry_name, &mut report)
                {
                    continue;
                }
                let check = check_entry(store, &target, &dir, &entry_name, &entry, &mut report)?;
                if let Some(done) = check.and_then(|check| checkers.submit(check)) {
                    report.add_checked(done, progress.as_ref());
                }
            }
            check_locations(store, target.vol, name, &mut sampler, &mut report)?;
            versions::check_versions(store, target.vol, name, &mut report)?;
        }
        checkers.close();
        while let Some(done) = checkers.next_result() {
            report.add_checked(done, progress.as_ref());
        }
        Ok(())
    })?;
    check_packs(store, progress.as_ref(), &mut report)?;
    report
        .findings
        .sort_by(|a, b| (a.severity, &a.volume, &a.path).cmp(&(b.severity, &b.volume, &b.path)));
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

fn finding(
    severity: Severity,
    problem: Problem,
    volume: Option<&str>,
    path: Option<String>,
    detail: String,
) -> Finding {
    Finding {
        severity,
        problem,
        volume: volume.map(str::to_string),
        path,
        range: None,
        detail,
        file: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_serialize_as_their_stable_names() {
        for &problem in Problem::ALL {
            assert_eq!(
                serde_json::to_value(problem).unwrap(),
                serde_json::Value::from(problem.name())
            );
            assert_eq!(
                problem.is_index_record(),
                problem.name().starts_with("index-")
            );
        }
        assert_eq!(Problem::ALL.len(), 21);
    }
}
