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
//! - **The index**: location records that point nowhere are removed, missing ones added
//!   from the file's chunk list; a file whose chunk list is missing or inconsistent loses
//!   its scan stamp so the rescan reads it again. `--rebuild-index` sets a lost or
//!   damaged RocksDB directory aside and builds a new one from the live files (a scan)
//!   and the packs (their records describe themselves).
//!
//! Repair is restartable: staging files are resumed, every step is durable before the
//! next relies on it, and a second run verifies again and does what is left.
//! Unrestorable damage is reported and the final rescan is skipped, so damage is never
//! indexed as if it were an edit.

use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions as FsOpenOptions};
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;

use crate::chunking::ChunkRef;
use crate::config::Settings;
use crate::entry::EntryKind;
use crate::ids::{ChunkId, VolumeId};
use crate::pathname::VolPath;
use crate::scan::{ScanOptions, scan_volume};
use crate::store::codec::Extent;
use crate::store::pack::{self, PackEnd, PackScanner, PackWriter};
use crate::store::{ChunkLocation, OpenOptions, Store, StoreError};
use crate::sync::transfer::{ChunkTargets, fetch_chunks};
use crate::sync::{Node, Peer, Stats, SyncError, Volume};
use crate::verify::{Finding, Severity, VerifyOptions, VerifyReport, verify};
use crate::volume_fs::{VolumeFs, finish_staged, stamp_of_stat};

/// Damaged files restored at once (each holds a staging file open).
const FILE_BATCH: usize = 256;

/// What verify reports of a live file that repair restores from its chunk list.
const RESTORABLE: [&str; 4] = ["content-mismatch", "truncated", "size-mismatch", "missing"];

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
        if options.rebuild_index || Store::index_missing(&settings.state_dir) {
            report.actions.push(Action {
                action: "index-rebuilt",
                volume: None,
                path: Some(settings.state_dir.join("index").display().to_string()),
                detail: "would set the index aside and rebuild it from the packs and live files"
                    .into(),
            });
            return Ok(report);
        }
        let store = Store::open(&settings.state_dir, OpenOptions::READ_ONLY)?;
        let found = verify(&store, &volumes, &VerifyOptions::default())?;
        plan(&found, &mut report);
        report.found = found.findings;
        return Ok(report);
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
    let store = Store::open(
        &settings.state_dir,
        OpenOptions {
            create,
            read_only: false,
            chunk_params: settings.chunk_params,
        },
    )?;
    if report.index_rebuilt {
        // The live files first: a scan indexes them (new entries, new version vectors
        // from a new node id; equal content merges with the peers' histories). The
        // packs' records are indexed below as orphans.
        for (name, dir) in &volumes {
            scan_volume(&store, name, dir, &ScanOptions::default())?;
        }
    }
    let found = verify(&store, &volumes, &VerifyOptions::default())?;
    let mut node_volumes = Vec::new();
    for (name, dir) in &volumes {
        let record = store.ensure_volume(name)?;
        node_volumes.push(Volume {
            name: name.clone(),
            id: VolumeId(record.id),
            fs: VolumeFs::open(dir)?,
            lock: tokio::sync::Mutex::new(()),
        });
    }
    let node = Arc::new(Node {
        meta: store.meta(),
        store,
        volumes: node_volumes,
        peers: std::sync::RwLock::new(
            options
                .peers
                .iter()
                .map(|addr| Arc::new(Peer::new(*addr)))
                .collect(),
        ),
        stats: Stats::default(),
        sync_ownership: rustix::process::geteuid().is_root(),
        faults: crate::sync::Faults::default(),
    });
    let runtime = tokio::runtime::Runtime::new()
        .map_err(|e| RepairError::Io("cannot start the async runtime".into(), e))?;
    runtime.block_on(async {
        let mut repair = Repair {
            node: node.clone(),
            report: &mut report,
            client: None,
            connections: Vec::new(),
            credentials: &options.credentials,
        };
        repair.fix_index(&found)?;
        repair.restore_files(&found).await?;
        repair.fix_packs().await?;
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

/// What a repair would do about each finding (for `--dry-run`).
fn plan(found: &VerifyReport, report: &mut RepairReport) {
    for f in &found.findings {
        let (action, detail) = match f.problem {
            p if RESTORABLE.contains(&p) => (
                "restored",
                format!("would restore the indexed content ({p}) from local copies or peers"),
            ),
            "pack-record-damaged" => (
                "pack-record-restored",
                "would rewrite the record from another copy".to_string(),
            ),
            "pack-truncated" => (
                "pack-tail-cut",
                "would cut the torn tail and append the lost records again".to_string(),
            ),
            "pack-location-broken" => (
                "pack-location-fixed",
                "would restore the chunk into a pack, or remove the record if it is held by a live file or nowhere".to_string(),
            ),
            "orphan-pack-record" => (
                "location-added",
                "would index the record again".to_string(),
            ),
            "index-dangling-location" => (
                "location-removed",
                "would remove the location record".to_string(),
            ),
            "index-missing-location" => (
                "location-added",
                "would add the file's location records from its chunk list".to_string(),
            ),
            "index-missing-chunk-list" | "index-inconsistent" => (
                "rescan",
                "would have the file read again by the rescan".to_string(),
            ),
            "modified" => (
                "kept",
                "edited since the last scan: would be kept and indexed as the newest version"
                    .to_string(),
            ),
            "type-changed" => (
                "kept",
                "replaced by another kind of entry: would be kept as a local change".to_string(),
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
    credentials: &'r std::path::Path,
}

/// A damaged file being rebuilt in staging.
struct Rebuild {
    volume_index: usize,
    dir: VolPath,
    name: Vec<u8>,
    display: String,
    mode: u32,
    mtime_ns: i64,
    owner: (u32, u32),
    staged: crate::volume_fs::Staged,
    file: Arc<File>,
    chunks: Vec<ChunkRef>,
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

    /// Index records that contradict the index itself.
    fn fix_index(&mut self, found: &VerifyReport) -> Result<(), RepairError> {
        let store = &self.node.store;
        let mut batch = store.batch();
        let mut removed = Vec::new();
        let mut lists = crate::verify::ChunkListCache::default();
        for item in store.all_chunk_locations() {
            let (id, location) = item?;
            if let ChunkLocation::Live {
                vol,
                dir,
                name,
                extent,
            } = &location
                && !lists.holds(store, &id, *vol, dir, name, *extent)?
            {
                batch.delete_location(&id, &location);
                let path = dir.join(name).map(|p| p.display().to_string()).ok();
                removed.push((path, id));
            }
        }
        let mut fixed = Vec::new();
        for f in &found.findings {
            let (Some(volume), Some(path)) = (&f.volume, &f.file) else {
                continue;
            };
            let Some(index) = self.volume_index(volume) else {
                continue;
            };
            let Some((dir, name)) = path.split_last() else {
                continue;
            };
            let vol = self.node.volumes[index].id;
            match f.problem {
                "index-missing-location" => {
                    if let Some(chunks) = store.chunk_list(vol, &dir, name)? {
                        batch.set_chunks(vol, &dir, name, &chunks, &chunks);
                        fixed.push((
                            "location-added",
                            volume.clone(),
                            f.path.clone(),
                            "location records added from the file's chunk list",
                        ));
                    }
                }
                "index-missing-chunk-list" | "index-inconsistent" => {
                    batch.delete_stamp(vol, &dir, name);
                    fixed.push((
                        "rescan",
                        volume.clone(),
                        f.path.clone(),
                        "scan stamp dropped: the rescan reads the file again",
                    ));
                }
                _ => {}
            }
        }
        if !batch.is_empty() {
            store.write(batch, true)?;
        }
        for (path, id) in removed {
            self.done(
                "location-removed",
                None,
                path,
                format!("removed the record of chunk {id}, which the file's chunk list does not hold there"),
            );
        }
        for (action, volume, path, detail) in fixed {
            self.done(action, Some(&volume), path, detail.to_string());
        }
        Ok(())
    }

    /// Rebuilds every damaged live file from its chunk list.
    async fn restore_files(&mut self, found: &VerifyReport) -> Result<(), RepairError> {
        // One job per file, whatever the number of findings about it.
        let mut damaged: BTreeMap<(String, VolPath), String> = BTreeMap::new();
        for f in &found.findings {
            match (&f.volume, &f.file) {
                (Some(volume), Some(path)) if RESTORABLE.contains(&f.problem) => {
                    damaged
                        .entry((volume.clone(), path.clone()))
                        .or_insert_with(|| f.problem.to_string());
                }
                (Some(volume), _) if f.problem == "modified" => {
                    let detail = "edited since the last scan: kept; the rescan indexes it as the newest version";
                    self.done("kept", Some(volume), f.path.clone(), detail.into());
                }
                // Another kind of entry where the index has a file (or the reverse):
                // replaced while Shoal was stopped, an edit the rescan records.
                (Some(volume), Some(_)) if f.problem == "type-changed" => {
                    let detail = "replaced by another kind of entry: kept as a local change";
                    self.done("kept", Some(volume), f.path.clone(), detail.into());
                }
                _ if f.severity == Severity::Damage
                    && f.file.is_some()
                    && !f.problem.starts_with("index-") =>
                {
                    let detail = format!("{}: {}", f.problem, f.detail);
                    self.left(f.volume.as_deref(), f.path.clone(), detail);
                }
                _ => {}
            }
        }
        for volume_index in 0..self.node.volumes.len() {
            let name = self.node.volumes[volume_index].name.clone();
            // In path order: a directory is restored before what it holds.
            let files: Vec<_> = damaged
                .iter()
                .filter(|((volume, _), _)| *volume == name)
                .map(|((_, path), problem)| (path.clone(), problem.clone()))
                .collect();
            for batch in files.chunks(FILE_BATCH) {
                self.restore_batch(volume_index, batch).await?;
            }
        }
        Ok(())
    }

    async fn restore_batch(
        &mut self,
        volume_index: usize,
        batch: &[(VolPath, String)],
    ) -> Result<(), RepairError> {
        {
            let mut rebuilds = Vec::new();
            let mut targets = ChunkTargets::default();
            for (path, problem) in batch {
                if let Some(rebuild) = self.prepare(volume_index, path, problem, &mut targets)? {
                    rebuilds.push(rebuild);
                }
            }
            let wanted = targets.ids();
            let received = self.fetch(volume_index, targets).await?;
            for rebuild in rebuilds {
                let lacking = rebuild
                    .chunks
                    .iter()
                    .filter(|c| wanted.contains(&c.id) && !received.contains(&c.id))
                    .count();
                let volume = self.node.volumes[rebuild.volume_index].name.clone();
                if lacking > 0 {
                    let why = if self.node.peers().is_empty() {
                        "no intact local copy (give --peer to fetch them)"
                    } else {
                        "no intact local copy and no peer sent them"
                    };
                    let detail = format!("{lacking} chunks not restored: {why}");
                    self.left(Some(&volume), Some(rebuild.display.clone()), detail);
                    continue;
                }
                self.publish(rebuild)?;
            }
        }
        Ok(())
    }

    /// Opens (or resumes) the staging file of a damaged file and fills it with every
    /// chunk held locally; the others are added to `targets`.
    fn prepare(
        &mut self,
        volume_index: usize,
        path: &VolPath,
        problem: &str,
        targets: &mut ChunkTargets,
    ) -> Result<Option<Rebuild>, RepairError> {
        let node = self.node.clone();
        let vol = &node.volumes[volume_index];
        let volume = vol.name.as_str();
        let display = path.display().to_string();
        let Some((dir, name)) = path.split_last() else {
            return Ok(None);
        };
        let Some(entry) = node.store.entry(vol.id, &dir, name)? else {
            return Ok(None);
        };
        let size_and_content = match &entry.kind {
            EntryKind::File {
                size, content_id, ..
            } => Some((*size, *content_id)),
            EntryKind::Dir => {
                let fd = vol.fs.open_dir(path, true)?;
                drop(fd);
                let parent = vol.fs.open_dir(&dir, false)?;
                vol.fs.chmod_dir(&parent, name, entry.mode)?;
                VolumeFs::fsync_dir(&parent)?;
                self.done(
                    "restored",
                    Some(volume),
                    Some(display),
                    "directory created".into(),
                );
                return Ok(None);
            }
            EntryKind::Symlink { target } => {
                let unique = &blake3::hash(path.as_bytes()).to_hex()[..16];
                let temp = vol.fs.stage_symlink(target, unique)?;
                let parent = vol.fs.open_dir(&dir, true)?;
                vol.fs.publish(&temp, &parent, name)?;
                VolumeFs::fsync_dir(&parent)?;
                let stat = vol.fs.stat(&parent, name)?;
                let mut batch = node.store.batch();
                batch.put_stamp(vol.id, &dir, name, &stamp_of_stat(&stat));
                node.store.write(batch, true)?;
                self.done(
                    "restored",
                    Some(volume),
                    Some(display),
                    "symlink recreated".into(),
                );
                return Ok(None);
            }
            EntryKind::Tombstone { .. } => None,
        };
        let (Some((size, content_id)), Some(chunks)) =
            (size_and_content, node.store.chunk_list(vol.id, &dir, name)?)
        else {
            self.left(
                Some(volume),
                Some(display),
                "no indexed content to restore".into(),
            );
            return Ok(None);
        };
        let staged = vol.fs.stage(&content_id, &dir, name, size)?;
        let io = |e| RepairError::Io(format!("staging for {display}"), e);
        let file = Arc::new(staged.file.try_clone().map_err(io)?);
        // The damaged file's own chunks are the nearest copies of most of its content.
        let damaged = File::open(path.under(vol.fs.root_path())).ok();
        let mut offset = 0u64;
        let mut buffer = Vec::new();
        for chunk in &chunks {
            buffer.resize(chunk.len as usize, 0);
            let intact = |from: &File, buffer: &mut [u8]| {
                from.read_exact_at(buffer, offset).is_ok() && ChunkId::of(buffer) == chunk.id
            };
            let mut here = staged.resumed && intact(file.as_ref(), &mut buffer);
            if !here
                && let Some(from) = &damaged
                && intact(from, &mut buffer)
            {
                file.write_all_at(&buffer, offset).map_err(io)?;
                here = true;
            }
            if !here {
                match node.read_local_chunk(&chunk.id) {
                    Some(data) => file.write_all_at(&data, offset).map_err(io)?,
                    None => targets.add(chunk.id, file.clone(), offset),
                }
            }
            offset += u64::from(chunk.len);
        }
        let shown = display.as_str();
        tracing::info!(volume, path = shown, problem, "restoring");
        Ok(Some(Rebuild {
            volume_index,
            dir,
            name: name.to_vec(),
            display,
            mode: entry.mode,
            mtime_ns: entry.mtime_ns,
            owner: (entry.uid, entry.gid),
            staged,
            file,
            chunks,
        }))
    }

    /// Makes a complete staging file durable, renames it over the damaged name (unless
    /// that was edited meanwhile) and records its new scan stamp.
    fn publish(&mut self, rebuild: Rebuild) -> Result<(), RepairError> {
        let node = self.node.clone();
        let vol = &node.volumes[rebuild.volume_index];
        let io = |e| RepairError::Io(format!("staging for {}", rebuild.display), e);
        let dir_fd = vol.fs.open_dir(&rebuild.dir, true)?;
        if let Ok(stat) = vol.fs.stat(&dir_fd, &rebuild.name) {
            let mtime_ns = stat.st_mtime * 1_000_000_000 + stat.st_mtime_nsec as i64;
            if mtime_ns != rebuild.mtime_ns {
                self.done(
                    "kept",
                    Some(&vol.name),
                    Some(rebuild.display),
                    "edited while repair ran: kept as a local change".into(),
                );
                return Ok(());
            }
        }
        let owner = node.sync_ownership.then_some(rebuild.owner);
        finish_staged(&rebuild.staged.file, rebuild.mode, rebuild.mtime_ns, owner).map_err(io)?;
        rebuild.file.sync_all().map_err(io)?;
        vol.fs
            .publish(&rebuild.staged.temp_name, &dir_fd, &rebuild.name)?;
        VolumeFs::fsync_dir(&dir_fd)?;
        let stat = vol.fs.stat(&dir_fd, &rebuild.name)?;
        let mut batch = node.store.batch();
        batch.put_stamp(vol.id, &rebuild.dir, &rebuild.name, &stamp_of_stat(&stat));
        node.store.write(batch, true)?;
        self.done(
            "restored",
            Some(&vol.name),
            Some(rebuild.display),
            format!("{} chunks, {} bytes", rebuild.chunks.len(), stat.st_size),
        );
        Ok(())
    }

    /// Fetches chunks from the peers into their targets; returns those received.
    /// Fetches chunks from the peers that share volume `volume_index` into their
    /// targets; returns those received.
    async fn fetch(
        &mut self,
        volume_index: usize,
        targets: ChunkTargets,
    ) -> Result<HashSet<ChunkId>, RepairError> {
        let wanted = targets.ids();
        if wanted.is_empty() || self.node.peers().is_empty() || self.node.volumes.is_empty() {
            return Ok(HashSet::new());
        }
        self.connect().await?;
        let node = self.node.clone();
        let volume = &node.volumes[volume_index].name;
        let Some(source) = node
            .peers()
            .into_iter()
            .find(|p| p.connection().is_some() && p.shares(volume))
        else {
            return Ok(HashSet::new());
        };
        Ok(fetch_chunks(&node, &source, volume_index, wanted, Arc::new(targets)).await?)
    }

    /// Connects to every peer not yet connected (once per repair run).
    async fn connect(&mut self) -> Result<(), RepairError> {
        if self.client.is_some() {
            return Ok(());
        }
        let credentials = crate::credentials::Credentials::load(self.credentials)?;
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

    /// Packs: damaged records restored in place, torn tails cut and lost records
    /// appended again, unfindable records dropped from the index, orphans indexed.
    async fn fix_packs(&mut self) -> Result<(), RepairError> {
        let node = self.node.clone();
        let store = &node.store;
        let packs_dir = store.packs_dir();
        let mut indexed: BTreeMap<(u64, u64), ChunkId> = BTreeMap::new();
        let mut wanted_in: BTreeMap<u64, Vec<(ChunkId, Extent)>> = BTreeMap::new();
        for item in store.all_chunk_locations() {
            if let (id, ChunkLocation::Pack { pack, extent }) = item? {
                indexed.insert((pack, extent.offset), id);
                wanted_in.entry(pack).or_default().push((id, extent));
            }
        }
        let mut pack_files: Vec<(u64, PathBuf)> = std::fs::read_dir(&packs_dir)
            .map_err(|e| RepairError::Io(packs_dir.display().to_string(), e))?
            .flatten()
            .filter_map(|e| Some((crate::verify::pack_number(&e.path())?, e.path())))
            .collect();
        pack_files.sort();
        for (number, _) in &pack_files {
            wanted_in.entry(*number).or_default();
        }
        for (number, wanted) in wanted_in {
            let path = packs_dir.join(pack::pack_file_name(number));
            let shown = path.display().to_string();
            // Sequential read: which records are whole and intact, where the valid part ends.
            let mut damaged = Vec::new();
            let mut intact: HashSet<u64> = HashSet::new();
            let mut orphans = Vec::new();
            let mut torn = None;
            if path.exists() {
                let mut scanner = PackScanner::open(&path)?;
                while let Some(record) = scanner.next_record()? {
                    if !record.intact {
                        damaged.push((record.id, record.extent));
                    } else {
                        intact.insert(record.extent.offset);
                        if !indexed.contains_key(&(number, record.extent.offset)) {
                            orphans.push((record.id, record.extent));
                        }
                    }
                }
                if let Some(PackEnd::Torn {
                    valid_len,
                    file_len,
                }) = scanner.end()
                {
                    torn = Some((*valid_len, *file_len));
                }
            }
            // Damaged records: the same bytes again, in place.
            if !damaged.is_empty() {
                let file = Arc::new(
                    FsOpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(&path)
                        .map_err(|e| RepairError::Io(shown.clone(), e))?,
                );
                let mut targets = ChunkTargets::default();
                let mut local = Vec::new();
                for (id, extent) in &damaged {
                    match node.read_local_chunk(id) {
                        Some(data) => {
                            file.write_all_at(&data, extent.offset)
                                .map_err(|e| RepairError::Io(shown.clone(), e))?;
                            local.push(*id);
                        }
                        None => targets.add(*id, file.clone(), extent.offset),
                    }
                }
                let received = self.fetch(0, targets).await?;
                file.sync_data()
                    .map_err(|e| RepairError::Io(shown.clone(), e))?;
                for (id, extent) in &damaged {
                    if local.contains(id) || received.contains(id) {
                        intact.insert(extent.offset);
                        self.done(
                            "pack-record-restored",
                            None,
                            Some(shown.clone()),
                            format!(
                                "chunk {id} at byte {} rewritten from another copy",
                                extent.offset
                            ),
                        );
                    } else {
                        self.left(
                            None,
                            Some(shown.clone()),
                            format!(
                                "chunk {id} at byte {} is damaged and no copy was found",
                                extent.offset
                            ),
                        );
                    }
                }
            }
            if let Some((valid_len, file_len)) = torn {
                // Opening for appending cuts the torn tail.
                drop(PackWriter::open(&path)?);
                self.done(
                    "pack-tail-cut",
                    None,
                    Some(shown.clone()),
                    format!("bytes {valid_len}..{file_len} were not a whole record"),
                );
            }
            // Index records into the pack that no intact record backs.
            let lost: Vec<(ChunkId, Extent)> = wanted
                .into_iter()
                .filter(|(_, extent)| !intact.contains(&extent.offset))
                .collect();
            let mut batch = store.batch();
            for (id, extent) in &orphans {
                batch.put_pack_location(id, number, *extent);
                self.done(
                    "location-added",
                    None,
                    Some(shown.clone()),
                    format!("chunk {id}: an intact record no index record pointed at"),
                );
            }
            if !lost.is_empty() {
                self.restore_lost(number, &path, lost, &mut batch).await?;
            }
            if !batch.is_empty() {
                store.write(batch, true)?;
            }
        }
        Ok(())
    }

    /// Chunks the index says are in pack `number` but are not (a torn tail, a missing
    /// pack, a damaged record nobody could restore): held by a live file -> the record
    /// goes (a pack holds only what no live file does); found elsewhere -> appended to
    /// the pack again; found nowhere -> the record goes and the loss is reported.
    async fn restore_lost(
        &mut self,
        number: u64,
        path: &std::path::Path,
        lost: Vec<(ChunkId, Extent)>,
        batch: &mut crate::store::Batch<'_>,
    ) -> Result<(), RepairError> {
        let node = self.node.clone();
        let shown = path.display().to_string();
        let mut again: Vec<(ChunkId, Vec<u8>)> = Vec::new();
        let mut from_peers = Vec::new();
        for (id, extent) in &lost {
            let old = ChunkLocation::Pack {
                pack: number,
                extent: *extent,
            };
            batch.delete_location(id, &old);
            let live = node
                .store
                .chunk_locations(id)?
                .into_iter()
                .any(|l| matches!(l, ChunkLocation::Live { .. }));
            if live && node.read_local_chunk(id).is_some() {
                self.done(
                    "location-removed",
                    None,
                    Some(shown.clone()),
                    format!("chunk {id} is not in the pack but a live file holds it"),
                );
            } else if let Some(data) = node.read_local_chunk(id) {
                again.push((*id, data));
            } else {
                from_peers.push((*id, *extent));
            }
        }
        if !from_peers.is_empty() && !node.peers().is_empty() {
            // Received chunks land in a scratch file beside the packs, then are appended.
            let scratch_path = path.with_extension("repair.tmp");
            let scratch = Arc::new(
                FsOpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&scratch_path)
                    .map_err(|e| RepairError::Io(scratch_path.display().to_string(), e))?,
            );
            let mut targets = ChunkTargets::default();
            let mut at = 0u64;
            let mut places = Vec::new();
            for (id, extent) in &from_peers {
                targets.add(*id, scratch.clone(), at);
                places.push((*id, at, extent.len));
                at += u64::from(extent.len);
            }
            let received = self.fetch(0, targets).await?;
            for (id, at, len) in places {
                let mut data = vec![0u8; len as usize];
                if received.contains(&id)
                    && scratch.read_exact_at(&mut data, at).is_ok()
                    && ChunkId::of(&data) == id
                {
                    again.push((id, data));
                    from_peers.retain(|(i, _)| *i != id);
                }
            }
            drop(scratch);
            let _ = std::fs::remove_file(&scratch_path);
        }
        if !again.is_empty() {
            let mut writer = PackWriter::open(path)?;
            let mut appended = Vec::new();
            for (id, data) in &again {
                appended.push((*id, writer.append(id, data)?));
            }
            // The records are durable before the index points at them.
            writer.sync()?;
            for (id, extent) in appended {
                batch.put_pack_location(&id, number, extent);
                self.done(
                    "pack-record-restored",
                    None,
                    Some(shown.clone()),
                    format!("chunk {id} appended again from another copy"),
                );
            }
        }
        for (id, _) in from_peers {
            self.left(None, Some(shown.clone()), format!("chunk {id} is lost: no local copy and no peer has it (its index record was removed)"));
        }
        Ok(())
    }
}
