//! Packs: every record re-hashed, every pack location record read back.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::Path;

use indicatif::ProgressBar;

use super::{Finding, Problem, Severity, VerifyReport, finding};
use crate::store::pack::{self, PackEnd, PackScanner, pack_number};
use crate::store::{ChunkLocation, Store, StoreError};

/// Reads every pack record and every pack location the index holds.
pub(super) fn check_packs(
    store: &Store,
    progress: Option<&ProgressBar>,
    report: &mut VerifyReport,
) -> Result<(), StoreError> {
    let packs_dir = store.packs_dir();
    // Where the index says pack records are: anything else in a pack is an orphan.
    let mut referenced = HashSet::new();
    for item in store.all_chunk_locations() {
        if let (_, ChunkLocation::Pack { pack, extent }) = item? {
            referenced.insert((pack, extent.offset));
        }
    }
    let leftovers = store.rewrite_leftovers()?;
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
        if pack_number(&path).is_some_and(|n| leftovers.contains(&n)) {
            // Left by an interrupted collection; the next writer removes it.
            continue;
        }
        if path.extension().is_some_and(|ext| ext == "pack") {
            report.packs_checked += 1;
            check_pack_file(&path, &referenced, progress, report);
        }
    }
    check_pack_locations(store, &packs_dir, report)
}

/// Re-hashes every record of one pack file and looks for a torn tail; `referenced`
/// holds the (pack, offset) of every pack location record.
fn check_pack_file(
    path: &Path,
    referenced: &HashSet<(u64, u64)>,
    progress: Option<&ProgressBar>,
    report: &mut VerifyReport,
) {
    let shown = Some(path.display().to_string());
    let found = |severity, problem, detail| finding(severity, problem, None, shown.clone(), detail);
    let mut scanner = match PackScanner::open(path) {
        Ok(scanner) => scanner,
        Err(e) => {
            report.findings.push(found(
                Severity::Damage,
                Problem::PackUnreadable,
                e.to_string(),
            ));
            return;
        }
    };
    loop {
        let record = match scanner.next_record() {
            Ok(Some(record)) => record,
            Ok(None) => break,
            Err(e) => {
                report.findings.push(found(
                    Severity::Damage,
                    Problem::PackUnreadable,
                    e.to_string(),
                ));
                break;
            }
        };
        report.bytes_hashed += u64::from(record.extent.len);
        if let Some(progress) = progress {
            progress.inc(u64::from(record.extent.len));
        }
        let known =
            pack_number(path).is_some_and(|n| referenced.contains(&(n, record.extent.offset)));
        let problem = if !record.intact {
            let detail = format!("chunk {} does not match its bytes", record.id);
            Some(found(Severity::Damage, Problem::PackRecordDamaged, detail))
        } else if !known {
            let detail = format!(
                "chunk {} is in the pack but no index record points at it",
                record.id
            );
            Some(found(Severity::Warning, Problem::OrphanPackRecord, detail))
        } else {
            None
        };
        if let Some(problem) = problem {
            let start = record.extent.offset;
            report.findings.push(Finding {
                range: Some((start, start + u64::from(record.extent.len))),
                ..problem
            });
        }
    }
    if let Some(PackEnd::Torn {
        valid_len,
        file_len,
    }) = scanner.end()
    {
        let detail = format!(
            "the pack ends inside a record: bytes {valid_len}..{file_len} are not a whole record"
        );
        report.findings.push(Finding {
            range: Some((*valid_len, *file_len)),
            ..found(Severity::Damage, Problem::PackTruncated, detail)
        });
    }
}

/// Reads back the chunk of every pack location record.
fn check_pack_locations(
    store: &Store,
    packs_dir: &Path,
    report: &mut VerifyReport,
) -> Result<(), StoreError> {
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
