//! Offline repair: put right what [`crate::verify`] finds, with the daemon stopped.
//!
//! - **Damaged live files** (content no longer matching the index while the mtime is
//!   unchanged: bit rot, a truncation that hid itself, a deleted file) are rebuilt from
//!   their indexed chunk list in the volume's staging area, exactly as sync assembles a
//!   received file: every chunk comes from an intact local copy (the file's own
//!   undamaged chunks, another live file, a pack) or, failing that, from the peers over
//!   the sync protocol, each checked against its BLAKE3 id; the staging file gets the
//!   indexed mode and mtime, is fsynced and renamed over the name, and the directory is
//!   fsynced. A file whose mtime changed was edited while Shoal was stopped: it is
//!   never overwritten, and the rescan at the end makes it the newest version, which
//!   then syncs.
//! - **Packs**: a damaged record is rewritten in place from another copy; a torn tail is
//!   cut off and the records the index still wants are appended again; an index record
//!   whose chunk cannot be found anywhere is removed (and reported); an intact record no
//!   index record points at (an orphan, e.g. after an index rebuild) is indexed again.
//! - **Kept versions**: chunks a version references that this node holds nowhere are
//!   fetched from the peers into a version pack; versions still lacking some are
//!   reported.
//! - **The index**: location records that point nowhere are removed, missing ones added
//!   from the file's chunk list; a file whose chunk list is missing or inconsistent loses
//!   its scan stamp so the rescan reads it again; a name live under a deleted directory,
//!   on no disk, is recorded as deleted (no scan looks there). `--rebuild-index` sets a lost or
//!   damaged RocksDB directory aside and builds a new one from the live files (a scan)
//!   and the packs (their records describe themselves).
//!
//! Repair is restartable: staging files are resumed, every step is durable before the
//! next relies on it, and a second run verifies again and does what is left.
//! Unrestorable damage is reported and the final rescan is skipped, so damage is never
//! indexed as if it were an edit.

mod files;
mod index;
mod packs;
mod versions;

use std::collections::HashSet;
use std::fs::OpenOptions as FsOpenOptions;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use crate::config::Settings;
use crate::ids::ChunkId;
use crate::scan::{ScanOptions, scan_volume};
use crate::store::{OpenOptions, Store, StoreError};
use crate::sync::transfer::{ChunkTargets, fetch_chunks};
use crate::sync::{Faults, Node, SyncError, Volume};
use crate::verify::{Finding, Problem, Severity, VerifyOptions, VerifyReport, verify};

/// Damaged files restored at once (each holds a staging file open).
const FILE_BATCH: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Sync(#[from] SyncError),
    #[error(transparent)]
    Fs(#[from] crate::volume_fs::FsError),
    #[error(transparent)]
    Pack(#[from] crate::store::pack::PackError),
    #[error(transparent)]
    Scan(#[from] crate::scan::ScanError),
    #[error(transparent)]
    Credentials(#[from] crate::credentials::CredentialsError),
    #[error(transparent)]
    Revocations(#[from] crate::revocation::RevocationError),
    #[error(transparent)]
    Transport(#[from] crate::transport::TransportError),
    #[error(
        "the store at {0} has no index; run `shoal repair --rebuild-index` to rebuild it from the packs and live files"
    )]
    NoIndex(PathBuf),
    #[error("volume {name}: {dir} is not a directory")]
    NoVolume { name: String, dir: PathBuf },
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
}

pub struct RepairOptions {
    /// Only list what would change (reads the store, writes nothing, asks no peer).
    pub dry_run: bool,
    /// Set the index aside and rebuild it from the packs and the live files.
    pub rebuild_index: bool,
    /// Peers to fetch what no local copy holds; none means local copies only.
    pub peers: Vec<SocketAddr>,
    /// The cluster credentials directory, for the peers.
    pub credentials: PathBuf,
    /// This node's name, for a certificate it signs itself.
    pub node_name: Option<String>,
}

/// One thing repair did (or, with `--dry-run`, would do).
#[derive(Clone, Debug, Serialize)]
pub struct Action {
    /// Short stable name: `restored`, `pack-record-restored`, `location-removed`, ...
    pub action: &'static str,
    pub volume: Option<String>,
    pub path: Option<String>,
    pub detail: String,
}

#[derive(Debug, Default, Serialize)]
pub struct RepairReport {
    pub dry_run: bool,
    pub index_rebuilt: bool,
    /// What verify found before repairing.
    pub found: Vec<Finding>,
    pub actions: Vec<Action>,
    /// Damage left as it was, with why.
    pub unrepaired: Vec<Action>,
    /// Kept versions that still reference chunks held nowhere here (no peer sent them):
    /// not damage, as `verify` counts it; a peer that holds them serves a restore.
    pub incomplete_versions: Vec<Action>,
    /// Whether the volumes were rescanned at the end (edits made while stopped become
    /// the newest versions).
    pub rescanned: bool,
}

impl RepairReport {
    pub fn complete(&self) -> bool {
        self.unrepaired.is_empty()
    }
}

/// Repairs the volumes of `settings` and the store's packs.
pub fn repair(settings: &Settings, options: &RepairOptions) -> Result<RepairReport, RepairError> {
    let mut report = RepairReport {
        dry_run: options.dry_run,
        ..Default::default()
    };
    let volumes: Vec<(String, PathBuf)> = settings
        .volumes
        .iter()
        .map(|n| (n.clone(), settings.volume_dir(n)))
        .collect();
    for (name, dir) in &volumes {
        if !dir.is_dir() {
            return Err(RepairError::NoVolume {
                name: name.clone(),
                dir: dir.clone(),
            });
        }
    }
    if options.dry_run {
        return dry_run(settings, options, &volumes, report);
    }
    let create = if options.rebuild_index {
        // Refuse while a writer runs, before touching anything.
        if Store::in_use(&settings.state_dir) {
            return Err(StoreError::Locked(settings.state_dir.clone()).into());
        }
        Store::set_index_aside(&settings.state_dir)?;
        report.index_rebuilt = true;
        true
    } else if Store::index_missing(&settings.state_dir) {
        return Err(RepairError::NoIndex(settings.state_dir.clone()));
    } else {
        false
    };
    let mut store = Store::open(
        &settings.state_dir,
        OpenOptions {
            create,
            read_only: false,
            chunk_params: settings.chunk_params,
        },
    )?;
    // Peers know this node by its key: its id must be the key's before a Hello (a
    // credentials error matters only if a peer is needed).
    let credentials = (!options.peers.is_empty()).then(|| {
        crate::credentials::Credentials::load(
            &options.credentials,
            &settings.state_dir,
            options.node_name.as_deref(),
        )
    });
    if let Some(Ok(credentials)) = &credentials {
        store.adopt_node_id(credentials.identity.node_id)?;
    }
    if report.index_rebuilt {
        // The live files first: a scan indexes them (new entries, new version vectors
        // from a new node id; equal content merges with the peers' histories). The
        // packs' records are indexed below as orphans.
        for (name, dir) in &volumes {
            scan_volume(&store, name, dir, &ScanOptions::default())?;
        }
    }
    let found = verify(&store, &volumes, &VerifyOptions::default())?;
    let node_volumes = volumes
        .iter()
        .map(|(name, dir)| {
            let keep = settings.keep_setid.iter().any(|k| k == name);
            let guard = settings.delete_guard.for_volume(name);
            Volume::open(&store, name, dir).map(|v| v.keeping_setid(keep).guarded_by(guard))
        })
        .collect::<Result<_, _>>()?;
    let node = Arc::new(Node::new(
        store,
        node_volumes,
        options.peers.iter().copied(),
        Faults::default(),
    ));
    // Revoked peers are refused here as by the daemon (the list it kept, or the
    // credentials directory's if newer).
    if let Some(Ok(credentials)) = &credentials {
        node.adopt_revocations(crate::revocation::held(
            &options.credentials,
            &settings.state_dir,
            &credentials.ca_pem,
        )?);
    }
    let runtime = tokio::runtime::Runtime::new()
        .map_err(|e| RepairError::Io("cannot start the async runtime".into(), e))?;
    runtime.block_on(async {
        let mut repair = Repair {
            node: node.clone(),
            report: &mut report,
            client: None,
            connections: Vec::new(),
            credentials,
        };
        repair.fix_index(&found)?;
        repair.restore_files(&found).await?;
        repair.fix_packs().await?;
        repair.fetch_version_chunks().await?;
        Ok::<(), RepairError>(())
    })?;
    report.found = found.findings;
    if report.complete() {
        for (name, dir) in &volumes {
            scan_volume(&node.store, name, dir, &ScanOptions::default())?;
        }
        node.store.sync()?;
        report.rescanned = true;
    }
    Ok(report)
}

/// `--dry-run`: what a repair would do, from a read-only verify.
fn dry_run(
    settings: &Settings,
    options: &RepairOptions,
    volumes: &[(String, PathBuf)],
    mut report: RepairReport,
) -> Result<RepairReport, RepairError> {
    if options.rebuild_index || Store::index_missing(&settings.state_dir) {
        report.actions.push(Action {
            action: "index-rebuilt",
            volume: None,
            path: Some(settings.state_dir.join("index").display().to_string()),
            detail: "would set the index aside and rebuild it from the packs and live files".into(),
        });
        return Ok(report);
    }
    let store = Store::open(&settings.state_dir, OpenOptions::READ_ONLY)?;
    let found = verify(&store, volumes, &VerifyOptions::default())?;
    plan(&found, &mut report);
    report.found = found.findings;
    Ok(report)
}

/// What a repair would do about each finding (for `--dry-run`).
fn plan(found: &VerifyReport, report: &mut RepairReport) {
    for f in &found.findings {
        let (action, detail) = match f.problem {
            p if p.is_restorable() => (
                "restored",
                format!("would restore the indexed content ({p}) from local copies or peers"),
            ),
            Problem::PackRecordDamaged => (
                "pack-record-restored",
                "would rewrite the record from another copy".to_string(),
            ),
            Problem::PackTruncated => (
                "pack-tail-cut",
                "would cut the torn tail and append the lost records again".to_string(),
            ),
            Problem::PackLocationBroken => (
                "pack-location-fixed",
                "would restore the chunk into a pack, or remove the record if it is held by a live file or nowhere".to_string(),
            ),
            Problem::OrphanPackRecord => (
                "location-added",
                "would index the record again".to_string(),
            ),
            Problem::IndexDanglingLocation => (
                "location-removed",
                "would remove the location record".to_string(),
            ),
            Problem::IndexMissingLocation => (
                "location-added",
                "would add the file's location records from its chunk list".to_string(),
            ),
            Problem::IndexMissingChunkList | Problem::IndexInconsistent => (
                "rescan",
                "would have the file read again by the rescan".to_string(),
            ),
            Problem::IndexLiveUnderDeleted => (
                "deleted",
                "would record it as deleted here, as a scan records a name found gone".to_string(),
            ),
            Problem::Modified => (
                "kept",
                "edited since the last scan: would be kept and indexed as the newest version"
                    .to_string(),
            ),
            Problem::TypeChanged => (
                "kept",
                "replaced by another kind of entry: would be kept as a local change".to_string(),
            ),
            Problem::VersionChunkNotHeld => (
                "version-chunks-fetched",
                "would fetch the version's chunks from the peers into a version pack".to_string(),
            ),
            _ if f.severity == Severity::Warning => continue,
            other => (
                "left",
                format!("{other}: not something repair changes (an edit, or a scan's job)"),
            ),
        };
        report.actions.push(Action {
            action,
            volume: f.volume.clone(),
            path: f.path.clone(),
            detail,
        });
    }
}

struct Repair<'r> {
    node: Arc<Node>,
    report: &'r mut RepairReport,
    /// Connected on first need; the connections live as long as the repair.
    client: Option<s2n_quic::Client>,
    connections: Vec<s2n_quic::Connection>,
    /// Loaded before the store's node id was settled; taken on first connect.
    credentials:
        Option<Result<crate::credentials::Credentials, crate::credentials::CredentialsError>>,
}

impl Repair<'_> {
    fn volume_index(&self, name: &str) -> Option<usize> {
        self.node.volumes.iter().position(|v| v.name == name)
    }

    fn done(
        &mut self,
        action: &'static str,
        volume: Option<&str>,
        path: Option<String>,
        detail: String,
    ) {
        self.report.actions.push(Action {
            action,
            volume: volume.map(str::to_string),
            path,
            detail,
        });
    }

    fn left(&mut self, volume: Option<&str>, path: Option<String>, detail: String) {
        self.report.unrepaired.push(Action {
            action: "unrepaired",
            volume: volume.map(str::to_string),
            path,
            detail,
        });
    }

    /// Fetches the `wanted` chunks (id, length) from the peers of volume `volume_index`
    /// into a scratch file at `scratch_path`, hands each one that arrived and matches its
    /// id to `arrived`, one at a time (a round's chunks are never all in memory), and
    /// removes the scratch file.
    async fn fetch_through_scratch(
        &mut self,
        volume_index: usize,
        scratch_path: &Path,
        wanted: impl IntoIterator<Item = (ChunkId, u32)>,
        mut arrived: impl FnMut(ChunkId, &[u8]) -> Result<(), RepairError>,
    ) -> Result<(), RepairError> {
        let io = |e| RepairError::Io(scratch_path.display().to_string(), e);
        let scratch = Arc::new(
            FsOpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(scratch_path)
                .map_err(io)?,
        );
        let mut targets = ChunkTargets::default();
        let mut places = Vec::new();
        let mut at = 0u64;
        for (id, len) in wanted {
            targets.add(id, len, scratch.clone(), at);
            places.push((id, at, len));
            at += u64::from(len);
        }
        let received = self.fetch(volume_index, targets).await?;
        let mut data = Vec::new();
        for (id, at, len) in places {
            if !received.contains(&id) {
                continue;
            }
            data.resize(len as usize, 0);
            if scratch.read_exact_at(&mut data, at).is_ok() && ChunkId::of(&data) == id {
                arrived(id, &data)?;
            }
        }
        drop(scratch);
        std::fs::remove_file(scratch_path).map_err(io)
    }

    /// Fetches chunks from the peers that share volume `volume_index` (connecting to
    /// them on first need) into their targets; returns those received.
    async fn fetch(
        &mut self,
        volume_index: usize,
        targets: ChunkTargets,
    ) -> Result<HashSet<ChunkId>, RepairError> {
        if targets.is_empty() || self.node.peers().is_empty() || self.node.volumes.is_empty() {
            return Ok(HashSet::new());
        }
        self.connect().await?;
        Ok(fetch_chunks(&self.node, None, volume_index, targets).await?)
    }

    /// Connects to every peer not yet connected (once per repair run).
    async fn connect(&mut self) -> Result<(), RepairError> {
        if self.client.is_some() {
            return Ok(());
        }
        let Some(credentials) = self.credentials.take() else {
            return Ok(());
        };
        let credentials = credentials?;
        let any = if self.node.peers().iter().any(|p| p.addr.is_ipv6()) {
            std::net::Ipv6Addr::UNSPECIFIED.into()
        } else {
            std::net::Ipv4Addr::UNSPECIFIED.into()
        };
        let client = crate::transport::client(SocketAddr::new(any, 0), &credentials, true)?;
        for peer in self.node.peers() {
            match crate::sync::client::connect(&self.node, &peer, &client).await {
                Ok(connection) => self.connections.push(connection),
                Err(e) => tracing::warn!(peer = %peer.addr, "cannot reach peer: {e}"),
            }
        }
        self.client = Some(client);
        Ok(())
    }
}
