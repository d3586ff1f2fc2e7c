//! Kept versions: every chunk a version record references is held here (in a live file
//! or a pack). Whether those copies hash right is the packs' and files' checks' job; a
//! chunk held nowhere here is a warning, not damage: a version whose live copy was
//! edited locally before a pack took it is held by the peers, and `shoal restore`
//! fetches it from them.

use std::collections::HashSet;

use super::{Problem, Severity, VerifyReport, finding};
use crate::ids::VolumeId;
use crate::pathname::VolPath;
use crate::store::{Store, StoreError};

pub(super) fn check_versions(
    store: &Store,
    vol: VolumeId,
    name: &str,
    report: &mut VerifyReport,
) -> Result<(), StoreError> {
    for record in store.versions_below(vol, &VolPath::root()) {
        let record = record?;
        let mut missing = HashSet::new();
        for chunk in &record.chunks {
            if !missing.contains(&chunk.id) && store.chunk_locations(&chunk.id)?.is_empty() {
                missing.insert(chunk.id);
            }
        }
        if let Some(first) = missing.iter().next() {
            report.findings.push(finding(
                Severity::Warning,
                Problem::VersionChunkNotHeld,
                Some(name),
                Some(record.path.display().to_string()),
                format!(
                    "version {} references {} chunks this node holds nowhere (the first: {first}); `shoal restore` fetches them from a peer",
                    record.id.to_hex(),
                    missing.len()
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::chunking::ChunkRef;
    use crate::entry::{Entry, EntryKind, VersionVector};
    use crate::ids::{ChunkId, NodeId};
    use crate::pathname::VolPath;
    use crate::store::versions::{VersionId, VersionRecord, Why};
    use crate::store::{Durability, OpenOptions, Store};
    use crate::verify::{Problem, Severity, VerifyOptions, verify};

    #[test]
    fn a_version_whose_chunks_are_held_nowhere_here_is_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        let volume = dir.path().join("v");
        std::fs::create_dir(&volume).unwrap();
        let store = Store::open(
            &dir.path().join("state"),
            OpenOptions {
                create: true,
                read_only: false,
                chunk_params: None,
            },
        )
        .unwrap();
        let vol = store.ensure_volume("v").unwrap().id;
        let chunks = vec![ChunkRef {
            id: ChunkId::of(b"only on a peer"),
            len: 14,
        }];
        let mut batch = store.batch();
        batch.put_version(&VersionRecord {
            vol,
            path: VolPath::parse(b"gone.txt").unwrap(),
            id: VersionId {
                replaced_at_ns: 1,
                seq: 0,
            },
            why: Why::Deleted,
            replaced_by: NodeId(2),
            entry: Entry {
                kind: EntryKind::File {
                    size: 14,
                    content_id: crate::chunking::content_id(&chunks),
                    chunks: 1,
                },
                mode: 0o644,
                mtime_ns: 0,
                uid: 0,
                gid: 0,
                xattrs: Default::default(),
                link: None,
                version: VersionVector::from_pairs([(NodeId(2), 1)]),
            },
            chunks,
        });
        store.write(batch, Durability::Durable).unwrap();
        let options = VerifyOptions {
            sample: None,
            progress: None,
        };
        let report = verify(&store, &[("v".to_string(), volume)], &options).unwrap();
        let found: Vec<_> = report
            .findings
            .iter()
            .map(|f| (f.severity, f.problem, f.path.clone()))
            .collect();
        assert_eq!(
            found,
            [(
                Severity::Warning,
                Problem::VersionChunkNotHeld,
                Some("gone.txt".to_string())
            )]
        );
    }
}
