//! Live files: each indexed name checked on disk, each file re-hashed chunk by chunk.

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::chunking::{ChunkRef, content_id};
use crate::entry::{Entry, EntryKind};
use crate::ids::{ChunkId, VolumeId};
use crate::pathname::VolPath;
use crate::store::{Store, StoreError};

use super::{Finding, Problem, Severity, VerifyReport, finding};

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

/// Checks what can be checked without reading file content; returns the content check
/// to run for a file.
#[allow(clippy::too_many_arguments)]
pub(super) fn check_entry(
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
            damage(Problem::Missing, "in the index but not on disk".into());
            return Ok(None);
        }
        Err(e) => {
            damage(Problem::Unreadable, format!("cannot stat: {e}"));
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
                    Problem::Modified,
                    Some(volume),
                    Some(display),
                    "symlink target changed since the last scan".into(),
                )),
                Err(e) => damage(Problem::Unreadable, format!("cannot read symlink: {e}")),
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
                    Problem::Modified,
                    Some(volume),
                    Some(display),
                    "modified since the last scan (run `shoal scan`)".into(),
                ));
                return Ok(None);
            }
            let Some(chunks) = store.chunk_list(vol, dir, name)? else {
                damage(
                    Problem::IndexMissingChunkList,
                    "the index has no chunk list for this file".into(),
                );
                return Ok(None);
            };
            if content_id(&chunks) != *expected
                || chunks.iter().map(|c| u64::from(c.len)).sum::<u64>() != *size
            {
                damage(
                    Problem::IndexInconsistent,
                    "the chunk list does not match the file's content id or size".into(),
                );
                return Ok(None);
            }
            for chunk in &chunks {
                if !store.has_live_location(&chunk.id, vol, dir, name)? {
                    damage(
                        Problem::IndexMissingLocation,
                        format!("chunk {} has no location record", chunk.id),
                    );
                    break;
                }
            }
            if meta.len() != *size {
                let problem = if meta.len() < *size {
                    Problem::Truncated
                } else {
                    Problem::SizeMismatch
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
                Problem::TypeChanged,
                format!("the index has a {} here", kind_name(&entry.kind)),
            );
            Ok(None)
        }
    }
}

pub(super) fn kind_name(kind: &EntryKind) -> &'static str {
    match kind {
        EntryKind::File { .. } => "file",
        EntryKind::Dir => "directory",
        EntryKind::Symlink { .. } => "symlink",
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
        && meta.mtime() * 1_000_000_000 + meta.mtime_nsec() != check.mtime_ns
    {
        // Edited while we read it: what we saw says nothing about damage.
        findings.clear();
    }
    (offset, findings)
}
