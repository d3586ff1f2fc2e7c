//! Packs: every record re-hashed, every pack location record read back.

use std::fs::{self};
use std::io::{self};
use std::path::Path;

use indicatif::ProgressBar;

use super::{Finding, Problem, Severity, VerifyReport, finding};
use crate::store::pack::{self, PackEnd, PackScanner};
use crate::store::{ChunkLocation, Store, StoreError};

/// Reads every pack record and every pack location the index holds.
/// The pack number a pack file's name gives (`NNNNNNNNNNNNNNNN.pack`).
pub fn pack_number(path: &Path) -> Option<u64> {
    let stem = path.file_stem()?.to_str()?;
    (stem.len() == 16 && path.extension()? == "pack")
        .then(|| u64::from_str_radix(stem, 16).ok())
        .flatten()
}

pub(super) fn check_packs(
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
                    Problem::PackUnreadable,
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
                            Problem::PackRecordDamaged,
                            format!("chunk {} does not match its bytes", record.id),
                        ))
                    } else if !known {
                        Some((
                            Severity::Warning,
                            Problem::OrphanPackRecord,
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
                        Problem::PackUnreadable,
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
                ..finding(Severity::Damage, Problem::PackTruncated, None, shown, format!(
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
                        Problem::PackLocationBroken,
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
