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

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crossbeam_channel::bounded;
use indicatif::ProgressBar;
use serde::Serialize;

use crate::chunking::{ChunkRef, content_id};
use crate::entry::{Entry, EntryKind};
use crate::ids::{ChunkId, VolumeId};
use crate::pathname::VolPath;
use crate::store::codec::Extent;
use crate::store::pack::{self, PackEnd, PackScanner};
use crate::store::{ChunkLocation, Store, StoreError};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Something differs from what the index promises and was not an edit.
    Damage,
    /// Not damage, but worth knowing (e.g. files edited since the last scan).
    Warning,
}

/// One problem found.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    /// Short stable name of the problem, for scripts (e.g. `content-mismatch`).
    pub problem: &'static str,
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
}

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

/// A file to re-hash, with what the index says of it.
struct FileCheck {
    volume: String,
    display: String,
    file: VolPath,
    path: PathBuf,
    size: u64,
    mtime_ns: i64,
    chunks: Vec<ChunkRef>,
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
    let (job_tx, job_rx) = bounded::<FileCheck>(64);
    let (found_tx, found_rx) = bounded::<(u64, Vec<Finding>)>(64);
    std::thread::scope(|scope| -> Result<(), StoreError> {
        for _ in 0..threads {
            let (job_rx, found_tx) = (job_rx.clone(), found_tx.clone());
            scope.spawn(move || {
                for check in job_rx {
                    let outcome = check_file(&check);
                    if found_tx.send(outcome).is_err() {
                        return;
                    }
                }
            });
        }
        drop(found_tx);
        let collect = |report: &mut VerifyReport, (bytes, findings): (u64, Vec<Finding>)| {
            report.files_checked += 1;
            report.bytes_hashed += bytes;
            report.findings.extend(findings);
            if let Some(progress) = &progress {
                progress.inc(bytes);
            }
        };
        for (name, root) in volumes {
            let Some(record) = store.volume(name)? else {
                report.findings.push(finding(
                    Severity::Damage,
                    "volume-not-indexed",
                    Some(name),
                    None,
                    format!("volume {name} is not in the index (run `shoal scan --volume {name}`)"),
                ));
                continue;
            };
            let vol = VolumeId(record.id);
            for item in store.descendants(vol, &VolPath::root()) {
                let (dir, entry_name, entry) = item?;
                if !sampler.pick() {
                    continue;
                }
                let path = match dir.join(&entry_name) {
                    Ok(path) => path,
                    Err(e) => {
                        report.findings.push(finding(
                            Severity::Damage,
                            "bad-index-key",
                            Some(name),
                            None,
                            e.to_string(),
                        ));
                        continue;
                    }
                };
                if let Some(check) = check_entry(
                    store,
                    vol,
                    name,
                    root,
                    &dir,
                    &entry_name,
                    &path,
                    &entry,
                    &mut report,
                )? {
                    let mut pending = Some(check);
                    while let Some(check) = pending.take() {
                        if let Err(crossbeam_channel::TrySendError::Full(back)) =
                            job_tx.try_send(check)
                        {
                            pending = Some(back);
                            let done = found_rx
                                .recv()
                                .expect("verify threads answer every job they took");
                            collect(&mut report, done);
                        }
                    }
                }
            }
            check_locations(store, vol, name, &mut sampler, &mut report)?;
        }
        drop(job_tx);
        for done in found_rx.iter() {
            collect(&mut report, done);
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
    problem: &'static str,
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

/// Checks what can be checked without reading file content; returns the content check
/// to run for a file.
#[allow(clippy::too_many_arguments)]
fn check_entry(
    store: &Store,
    vol: VolumeId,
    volume: &str,
    root: &Path,
    dir: &VolPath,
    name: &[u8],
    path: &VolPath,
    entry: &Entry,
    report: &mut VerifyReport,
) -> Result<Option<FileCheck>, StoreError> {
    let display = path.display().to_string();
    let fs_path = path.under(root);
    let mut damage = |problem, detail: String| {
        report.findings.push(Finding {
            file: Some(path.clone()),
            ..finding(
                Severity::Damage,
                problem,
                Some(volume),
                Some(display.clone()),
                detail,
            )
        });
    };
    let meta = match fs::symlink_metadata(&fs_path) {
        _ if entry.is_tombstone() => return Ok(None),
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            damage("missing", "in the index but not on disk".into());
            return Ok(None);
        }
        Err(e) => {
            damage("unreadable", format!("cannot stat: {e}"));
            return Ok(None);
        }
    };
    match &entry.kind {
        EntryKind::Tombstone { .. } => Ok(None),
        EntryKind::Dir if meta.is_dir() => Ok(None),
        EntryKind::Symlink { target } if meta.file_type().is_symlink() => {
            match fs::read_link(&fs_path) {
                Ok(actual) if actual.as_os_str().as_bytes() == target.as_slice() => {}
                Ok(_) => report.findings.push(finding(
                    Severity::Warning,
                    "modified",
                    Some(volume),
                    Some(display),
                    "symlink target changed since the last scan".into(),
                )),
                Err(e) => damage("unreadable", format!("cannot read symlink: {e}")),
            }
            Ok(None)
        }
        EntryKind::File {
            size,
            content_id: expected,
            ..
        } if meta.is_file() => {
            let mtime_ns = meta.mtime() * 1_000_000_000 + meta.mtime_nsec();
            if mtime_ns != entry.mtime_ns {
                report.findings.push(finding(
                    Severity::Warning,
                    "modified",
                    Some(volume),
                    Some(display),
                    "modified since the last scan (run `shoal scan`)".into(),
                ));
                return Ok(None);
            }
            let Some(chunks) = store.chunk_list(vol, dir, name)? else {
                damage(
                    "index-missing-chunk-list",
                    "the index has no chunk list for this file".into(),
                );
                return Ok(None);
            };
            if content_id(&chunks) != *expected
                || chunks.iter().map(|c| u64::from(c.len)).sum::<u64>() != *size
            {
                damage(
                    "index-inconsistent",
                    "the chunk list does not match the file's content id or size".into(),
                );
                return Ok(None);
            }
            for chunk in &chunks {
                if !store.has_live_location(&chunk.id, vol, dir, name)? {
                    damage(
                        "index-missing-location",
                        format!("chunk {} has no location record", chunk.id),
                    );
                    break;
                }
            }
            if meta.len() != *size {
                let problem = if meta.len() < *size {
                    "truncated"
                } else {
                    "size-mismatch"
                };
                let detail = format!(
                    "{} bytes on disk, {} in the index, mtime unchanged",
                    meta.len(),
                    size
                );
                report.findings.push(Finding {
                    range: Some((meta.len().min(*size), meta.len().max(*size))),
                    file: Some(path.clone()),
                    ..finding(
                        Severity::Damage,
                        problem,
                        Some(volume),
                        Some(display),
                        detail,
                    )
                });
                return Ok(None);
            }
            Ok(Some(FileCheck {
                volume: volume.to_string(),
                display,
                file: path.clone(),
                path: fs_path,
                size: *size,
                mtime_ns,
                chunks,
            }))
        }
        _ => {
            damage(
                "type-changed",
                format!("the index has a {} here", kind_name(&entry.kind)),
            );
            Ok(None)
        }
    }
}

fn kind_name(kind: &EntryKind) -> &'static str {
    match kind {
        EntryKind::File { .. } => "file",
        EntryKind::Dir => "directory",
        EntryKind::Symlink { .. } => "symlink",
        EntryKind::Tombstone { .. } => "tombstone",
    }
}

/// Re-hashes one file chunk by chunk; returns the bytes read and the findings.
fn check_file(check: &FileCheck) -> (u64, Vec<Finding>) {
    let mut findings = Vec::new();
    let damage = |problem, range: Option<(u64, u64)>, detail: String| Finding {
        range,
        file: Some(check.file.clone()),
        ..finding(
            Severity::Damage,
            problem,
            Some(&check.volume),
            Some(check.display.clone()),
            detail,
        )
    };
    let mut file = match File::open(&check.path) {
        Ok(file) => file,
        Err(e) => {
            return (
                0,
                vec![damage("unreadable", None, format!("cannot open: {e}"))],
            );
        }
    };
    let mut buffer = Vec::new();
    let mut offset = 0u64;
    // Adjacent bad chunks are reported as one range.
    let mut bad: Option<(u64, u64)> = None;
    let report_bad = |bad: &mut Option<(u64, u64)>, findings: &mut Vec<Finding>| {
        if let Some(range) = bad.take() {
            findings.push(damage(
                "content-mismatch",
                Some(range),
                format!(
                    "bytes {}..{} do not match the index (size and mtime unchanged)",
                    range.0, range.1
                ),
            ));
        }
    };
    for chunk in &check.chunks {
        buffer.resize(chunk.len as usize, 0);
        if let Err(e) = file.read_exact(&mut buffer) {
            report_bad(&mut bad, &mut findings);
            findings.push(damage(
                "unreadable",
                Some((offset, check.size)),
                format!("read failed at byte {offset}: {e}"),
            ));
            return (offset, findings);
        }
        let end = offset + u64::from(chunk.len);
        if ChunkId::of(&buffer) != chunk.id {
            bad = Some((bad.map_or(offset, |(start, _)| start), end));
        } else {
            report_bad(&mut bad, &mut findings);
        }
        offset = end;
    }
    report_bad(&mut bad, &mut findings);
    if let Ok(meta) = file.metadata()
        && meta.mtime() * 1_000_000_000 + meta.mtime_nsec() != check.mtime_ns
    {
        // Edited while we read it: what we saw says nothing about damage.
        findings.clear();
    }
    (offset, findings)
}

/// Every live-file location of `vol` must point at a file entry whose chunk list holds
/// that chunk at that offset.
fn check_locations(
    store: &Store,
    vol: VolumeId,
    volume: &str,
    sampler: &mut Sampler,
    report: &mut VerifyReport,
) -> Result<(), StoreError> {
    let mut lists = ChunkListCache::default();
    let mut batch = Vec::new();
    for item in store.all_chunk_locations() {
        let (id, location) = item?;
        if !sampler.pick() {
            continue;
        }
        let ChunkLocation::Live {
            vol: v,
            dir,
            name,
            extent,
        } = location
        else {
            continue;
        };
        if v != vol {
            continue;
        }
        batch.push(LocationCheck {
            file: crate::store::keys::entry_key(vol, &dir, &name),
            id,
            dir,
            name,
            extent,
        });
        if batch.len() >= LOCATION_BATCH {
            check_location_batch(store, vol, volume, &mut batch, &mut lists, report)?;
        }
    }
    check_location_batch(store, vol, volume, &mut batch, &mut lists, report)
}

/// Location records checked at once. They come in chunk id order, which is random
/// order for the files they name; checked in file order instead, the files' chunk
/// lists are read from the index nearly sequentially (on a cold cache, random reads
/// made a 5% sample of a million files take half a minute).
const LOCATION_BATCH: usize = 1 << 16;

/// A live location record to check against its file's chunk list.
struct LocationCheck {
    /// The file's index key: the order to check in.
    file: Vec<u8>,
    id: ChunkId,
    dir: VolPath,
    name: Vec<u8>,
    extent: Extent,
}

fn check_location_batch(
    store: &Store,
    vol: VolumeId,
    volume: &str,
    batch: &mut Vec<LocationCheck>,
    lists: &mut ChunkListCache,
    report: &mut VerifyReport,
) -> Result<(), StoreError> {
    batch.sort_unstable_by(|a, b| a.file.cmp(&b.file));
    for check in batch.drain(..) {
        if !lists.holds(store, &check.id, vol, &check.dir, &check.name, check.extent)? {
            let path = check
                .dir
                .join(&check.name)
                .map(|p| p.display().to_string())
                .ok();
            report.findings.push(finding(Severity::Damage, "index-dangling-location", Some(volume), path, format!(
                "the index says chunk {} is at byte {} of this file, but the file's chunk list does not",
                check.id, check.extent.offset
            )));
        }
    }
    Ok(())
}

/// What [`ChunkListCache`] holds before it starts over, in chunks, each file counting
/// four more for its key and bookkeeping (at most about 24 MiB).
const CACHED_CHUNKS: usize = 1 << 19;
const FILE_COST: usize = 4;

/// Decoded chunk lists of the files whose location records are being checked: location
/// records come in chunk id order, so one file's records are far apart, and decoding
/// its list for each would cost (chunks of the file)^2. Bounded by [`CACHED_CHUNKS`].
#[derive(Default)]
pub(crate) struct ChunkListCache {
    /// Entry key -> (offset, id, length) of each chunk, in file order.
    lists: std::collections::HashMap<Vec<u8>, Vec<(u64, ChunkId, u32)>>,
    chunks: usize,
}

impl ChunkListCache {
    /// Whether the chunk list of `dir/name` has chunk `id` at `extent`, as a live
    /// location record says.
    pub(crate) fn holds(
        &mut self,
        store: &Store,
        id: &ChunkId,
        vol: VolumeId,
        dir: &VolPath,
        name: &[u8],
        extent: Extent,
    ) -> Result<bool, StoreError> {
        let key = crate::store::keys::entry_key(vol, dir, name);
        if !self.lists.contains_key(&key) {
            let mut offset = 0u64;
            let list: Vec<_> = store
                .chunk_list(vol, dir, name)?
                .unwrap_or_default()
                .iter()
                .map(|c| {
                    let at = offset;
                    offset += u64::from(c.len);
                    (at, c.id, c.len)
                })
                .collect();
            let cost = list.len() + FILE_COST;
            if self.chunks + cost > CACHED_CHUNKS {
                self.lists.clear();
                self.chunks = 0;
            }
            self.chunks += cost;
            self.lists.insert(key.clone(), list);
        }
        let list = &self.lists[&key];
        // Offsets strictly increase (no chunk is empty).
        Ok(list
            .binary_search_by_key(&extent.offset, |c| c.0)
            .is_ok_and(|i| list[i].1 == *id && list[i].2 == extent.len))
    }
}

/// Reads every pack record and every pack location the index holds.
/// The pack number a pack file's name gives (`NNNNNNNNNNNNNNNN.pack`).
pub fn pack_number(path: &Path) -> Option<u64> {
    let stem = path.file_stem()?.to_str()?;
    (stem.len() == 16 && path.extension()? == "pack")
        .then(|| u64::from_str_radix(stem, 16).ok())
        .flatten()
}

fn check_packs(
    store: &Store,
    progress: Option<&ProgressBar>,
    report: &mut VerifyReport,
) -> Result<(), StoreError> {
    let packs_dir = store.packs_dir();
    // Where the index says pack records are: anything else in a pack is an orphan.
    let mut referenced = std::collections::HashSet::new();
    for item in store.all_chunk_locations() {
        if let (_, ChunkLocation::Pack { pack, extent }) = item? {
            referenced.insert((pack, extent.offset));
        }
    }
    let entries = match fs::read_dir(&packs_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(StoreError::Io {
                path: packs_dir,
                source,
            });
        }
    };
    for item in entries {
        let path = item
            .map_err(|source| StoreError::Io {
                path: packs_dir.clone(),
                source,
            })?
            .path();
        if path.extension().is_none_or(|ext| ext != "pack") {
            continue;
        }
        report.packs_checked += 1;
        let shown = Some(path.display().to_string());
        let mut scanner = match PackScanner::open(&path) {
            Ok(scanner) => scanner,
            Err(e) => {
                report.findings.push(finding(
                    Severity::Damage,
                    "pack-unreadable",
                    None,
                    shown,
                    e.to_string(),
                ));
                continue;
            }
        };
        loop {
            match scanner.next_record() {
                Ok(Some(record)) => {
                    report.bytes_hashed += u64::from(record.extent.len);
                    if let Some(progress) = progress {
                        progress.inc(u64::from(record.extent.len));
                    }
                    let known = pack_number(&path)
                        .is_some_and(|n| referenced.contains(&(n, record.extent.offset)));
                    let problem = if !record.intact {
                        Some((
                            Severity::Damage,
                            "pack-record-damaged",
                            format!("chunk {} does not match its bytes", record.id),
                        ))
                    } else if !known {
                        Some((
                            Severity::Warning,
                            "orphan-pack-record",
                            format!(
                                "chunk {} is in the pack but no index record points at it",
                                record.id
                            ),
                        ))
                    } else {
                        None
                    };
                    if let Some((severity, problem, detail)) = problem {
                        let start = record.extent.offset;
                        report.findings.push(Finding {
                            range: Some((start, start + u64::from(record.extent.len))),
                            ..finding(severity, problem, None, shown.clone(), detail)
                        });
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    report.findings.push(finding(
                        Severity::Damage,
                        "pack-unreadable",
                        None,
                        shown.clone(),
                        e.to_string(),
                    ));
                    break;
                }
            }
        }
        if let Some(PackEnd::Torn {
            valid_len,
            file_len,
        }) = scanner.end()
        {
            report.findings.push(Finding {
                range: Some((*valid_len, *file_len)),
                ..finding(Severity::Damage, "pack-truncated", None, shown, format!(
                    "the pack ends inside a record: bytes {valid_len}..{file_len} are not a whole record"
                ))
            });
        }
    }
    for item in store.all_chunk_locations() {
        let (id, location) = item?;
        if let ChunkLocation::Pack {
            pack: pack_id,
            extent,
        } = location
        {
            let path = packs_dir.join(pack::pack_file_name(pack_id));
            if let Err(e) = pack::read_chunk(&path, extent, &id) {
                report.findings.push(Finding {
                    range: Some((extent.offset, extent.offset + u64::from(extent.len))),
                    ..finding(
                        Severity::Damage,
                        "pack-location-broken",
                        None,
                        Some(path.display().to_string()),
                        format!("the index says chunk {id} is here: {e}"),
                    )
                });
            }
        }
    }
    Ok(())
}
