//! Live files: each indexed name checked on disk, each file re-hashed chunk by chunk.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::{Finding, Problem, Severity, VerifyReport, finding};
use crate::chunking::{ChunkRef, content_id};
use crate::entry::{Entry, EntryKind};
use crate::ids::{ChunkId, VolumeId};
use crate::pathname::VolPath;
use crate::store::{Store, StoreError};

/// A file to re-hash, with what the index says of it.
pub(super) struct FileCheck {
    pub(super) volume: String,
    pub(super) display: String,
    pub(super) file: VolPath,
    pub(super) path: PathBuf,
    pub(super) size: u64,
    pub(super) mtime_ns: i64,
    pub(super) chunks: Vec<ChunkRef>,
}

/// The volume being verified.
pub(super) struct Target<'a> {
    pub(super) vol: VolumeId,
    pub(super) name: &'a str,
    pub(super) root: &'a Path,
    /// Names whose deletes the delete guard holds: gone from disk on purpose while
    /// their entries stay (`crate::guard`), not damage.
    pub(super) held: std::collections::BTreeSet<VolPath>,
}

/// One indexed name being checked.
struct Subject<'a> {
    target: &'a Target<'a>,
    dir: &'a VolPath,
    name: &'a [u8],
    path: VolPath,
    display: String,
}

impl<'a> Subject<'a> {
    fn new(target: &'a Target<'a>, dir: &'a VolPath, name: &'a [u8], path: VolPath) -> Self {
        Subject {
            target,
            dir,
            name,
            display: path.display().to_string(),
            path,
        }
    }

    /// Damage to this name (repair acts on it: it carries the volume path).
    fn damage(&self, problem: Problem, detail: String) -> Finding {
        Finding {
            file: Some(self.path.clone()),
            ..self.finding(Severity::Damage, problem, detail)
        }
    }

    fn warning(&self, problem: Problem, detail: String) -> Finding {
        self.finding(Severity::Warning, problem, detail)
    }

    fn finding(&self, severity: Severity, problem: Problem, detail: String) -> Finding {
        let (volume, path) = (Some(self.target.name), Some(self.display.clone()));
        finding(severity, problem, volume, path, detail)
    }
}

/// The directories the index holds as deleted, as the walk over a volume's entries meets
/// them (in key order a directory's own entry comes before what it holds): which live
/// entries lie under one.
#[derive(Default)]
pub(super) struct DeletedDirs {
    /// The directory last looked up, and whether it is deleted or under a deleted one.
    last: Option<(VolPath, bool)>,
    /// Directories live in the index under a deleted one: deleted for what they hold.
    live_under_deleted: HashSet<VolPath>,
}

impl DeletedDirs {
    /// Whether the live entry `dir/name` lies under a directory the index holds as
    /// deleted (a tombstone, or no directory entry at all).
    pub(super) fn holds(
        &mut self,
        store: &Store,
        vol: VolumeId,
        dir: &VolPath,
        name: &[u8],
        entry: &Entry,
    ) -> Result<bool, StoreError> {
        let deleted = match &self.last {
            Some((last, deleted)) if last == dir => *deleted,
            _ => {
                let deleted = match dir.split_last() {
                    None => false,
                    Some((parent, dir_name)) => {
                        self.live_under_deleted.contains(dir)
                            || !store
                                .entry(vol, &parent, dir_name)?
                                .is_some_and(|e| e.is_dir())
                    }
                };
                self.last = Some((dir.clone(), deleted));
                deleted
            }
        };
        if deleted
            && entry.is_dir()
            && let Ok(path) = dir.join(name)
        {
            self.live_under_deleted.insert(path);
        }
        Ok(deleted)
    }
}

/// Reports the live entry `dir/name`, which lies under a deleted directory, if it is on
/// no disk: `true` if it did. On disk it is checked like any entry (the next scan finds
/// its directory there again and takes it up).
pub(super) fn gone_under_deleted(
    target: &Target<'_>,
    dir: &VolPath,
    name: &[u8],
    report: &mut VerifyReport,
) -> bool {
    let Ok(path) = dir.join(name) else {
        return false;
    };
    let gone = match fs::symlink_metadata(path.under(target.root)) {
        Err(e) => matches!(
            e.kind(),
            io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
        ),
        Ok(_) => false,
    };
    if !gone || crate::guard::covered(&target.held, &path) {
        return false;
    }
    let subject = Subject::new(target, dir, name, path);
    let detail = "live in the index under a directory it holds as deleted, on no disk".into();
    report
        .findings
        .push(subject.damage(Problem::IndexLiveUnderDeleted, detail));
    true
}

/// Checks what can be checked of `dir/name` without reading file content; returns the
/// content check to run for a file.
pub(super) fn check_entry(
    store: &Store,
    target: &Target<'_>,
    dir: &VolPath,
    name: &[u8],
    entry: &Entry,
    report: &mut VerifyReport,
) -> Result<Option<FileCheck>, StoreError> {
    let path = match dir.join(name) {
        Ok(path) => path,
        Err(e) => {
            let bad_key = Problem::BadIndexKey;
            let found = finding(
                Severity::Damage,
                bad_key,
                Some(target.name),
                None,
                e.to_string(),
            );
            report.findings.push(found);
            return Ok(None);
        }
    };
    let subject = Subject::new(target, dir, name, path);
    let fs_path = subject.path.under(target.root);
    let meta = match fs::symlink_metadata(&fs_path) {
        _ if entry.is_tombstone() => return Ok(None),
        Ok(meta) => meta,
        Err(e)
            if e.kind() == io::ErrorKind::NotFound
                && crate::guard::covered(&target.held, &subject.path) =>
        {
            return Ok(None);
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let detail = "in the index but not on disk".into();
            report
                .findings
                .push(subject.damage(Problem::Missing, detail));
            return Ok(None);
        }
        Err(e) => {
            let detail = format!("cannot stat: {e}");
            report
                .findings
                .push(subject.damage(Problem::Unreadable, detail));
            return Ok(None);
        }
    };
    match &entry.kind {
        EntryKind::Tombstone { .. } => {}
        EntryKind::Dir if meta.is_dir() => {}
        EntryKind::Fifo if meta.file_type().is_fifo() => {}
        EntryKind::Symlink { target } if meta.file_type().is_symlink() => {
            match fs::read_link(&fs_path) {
                Ok(actual) if actual.as_os_str().as_bytes() == target.as_slice() => {}
                Ok(_) => report.findings.push(subject.warning(
                    Problem::Modified,
                    "symlink target changed since the last scan".into(),
                )),
                Err(e) => report
                    .findings
                    .push(subject.damage(Problem::Unreadable, format!("cannot read symlink: {e}"))),
            }
        }
        EntryKind::File { .. } if meta.is_file() => {
            return check_file_entry(store, &subject, entry, &meta, fs_path, report);
        }
        _ => {
            let detail = format!("the index has a {} here", kind_name(&entry.kind));
            report
                .findings
                .push(subject.damage(Problem::TypeChanged, detail));
        }
    }
    Ok(None)
}

/// A file's index records against each other and its size on disk; returns the
/// content check to run if they agree.
fn check_file_entry(
    store: &Store,
    subject: &Subject<'_>,
    entry: &Entry,
    meta: &fs::Metadata,
    fs_path: PathBuf,
    report: &mut VerifyReport,
) -> Result<Option<FileCheck>, StoreError> {
    let EntryKind::File {
        size,
        content_id: expected,
        ..
    } = entry.kind
    else {
        return Ok(None);
    };
    let (vol, dir, name) = (subject.target.vol, subject.dir, subject.name);
    let mtime_ns = crate::entry::timestamp_ns(meta.mtime(), meta.mtime_nsec());
    if mtime_ns != entry.mtime_ns {
        let detail = "modified since the last scan (run `shoal scan`)".into();
        report
            .findings
            .push(subject.warning(Problem::Modified, detail));
        return Ok(None);
    }
    let Some(chunks) = store.chunk_list(vol, dir, name)? else {
        let detail = "the index has no chunk list for this file".into();
        report
            .findings
            .push(subject.damage(Problem::IndexMissingChunkList, detail));
        return Ok(None);
    };
    if content_id(&chunks) != expected
        || chunks.iter().map(|c| u64::from(c.len)).sum::<u64>() != size
    {
        let detail = "the chunk list does not match the file's content id or size".into();
        report
            .findings
            .push(subject.damage(Problem::IndexInconsistent, detail));
        return Ok(None);
    }
    for chunk in &chunks {
        if !store.has_live_location(&chunk.id, vol, dir, name)? {
            let detail = format!("chunk {} has no location record", chunk.id);
            report
                .findings
                .push(subject.damage(Problem::IndexMissingLocation, detail));
            break;
        }
    }
    if meta.len() != size {
        let problem = match meta.len() < size {
            true => Problem::Truncated,
            false => Problem::SizeMismatch,
        };
        let detail = format!(
            "{} bytes on disk, {size} in the index, mtime unchanged",
            meta.len()
        );
        report.findings.push(Finding {
            range: Some((meta.len().min(size), meta.len().max(size))),
            ..subject.damage(problem, detail)
        });
        return Ok(None);
    }
    Ok(Some(FileCheck {
        volume: subject.target.name.to_string(),
        display: subject.display.clone(),
        file: subject.path.clone(),
        path: fs_path,
        size,
        mtime_ns,
        chunks,
    }))
}

pub(super) fn kind_name(kind: &EntryKind) -> &'static str {
    match kind {
        EntryKind::File { .. } => "file",
        EntryKind::Dir => "directory",
        EntryKind::Symlink { .. } => "symlink",
        EntryKind::Fifo => "FIFO",
        EntryKind::Tombstone { .. } => "tombstone",
    }
}

/// Re-hashes one file chunk by chunk; returns the bytes read and the findings.
pub(super) fn check_file(check: &FileCheck) -> (u64, Vec<Finding>) {
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
                vec![damage(
                    Problem::Unreadable,
                    None,
                    format!("cannot open: {e}"),
                )],
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
                Problem::ContentMismatch,
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
                Problem::Unreadable,
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
        && crate::entry::timestamp_ns(meta.mtime(), meta.mtime_nsec()) != check.mtime_ns
    {
        // Edited while we read it: what we saw says nothing about damage.
        findings.clear();
    }
    (offset, findings)
}
