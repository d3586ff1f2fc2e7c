//! `shoal serve`: the daemon. Scans its volumes, answers peers, pulls from peers, and
//! shuts down cleanly.
//!
//! Tasks (each stops when the shutdown signal flips):
//! - the QUIC accept loop, one task per incoming connection ([`crate::sync::server`]);
//! - discovery ([`crate::discovery`]), publishing the current set of peer addresses;
//! - one task per peer in that set, started and stopped as it changes: connect (with
//!   backoff), hello, then pull every shared volume on connect, on the peer's `Notify`,
//!   and every heartbeat;
//! - one task per volume for local changes: narrow scans of what the file watcher saw
//!   change ([`crate::watcher`]), a rescan every heartbeat as the backstop (of a slice of
//!   the volume while the watcher is healthy, [`crate::scan::slices`]; of all of it at
//!   start, after lost events and without a watcher), and a `Notify` to peers when
//!   anything changed;
//! - the hourly sweep of expired tombstones;
//! - for a node enrolled with a signer, its certificate's renewal
//!   ([`crate::enroll::client::keep_renewed`]);
//! - the HTTP endpoint ([`crate::http`]);
//! - the local control socket ([`crate::control`]).

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::config::Settings;
use crate::credentials::Credentials;
use crate::discovery::{Discovery, Mode, StaticPeers};
use crate::revocation::{HELD_FILE, REVOCATIONS_FILE, Revocations, Trust};
use crate::scan::slices::{MIN_SLICE_NAMES, Slicer};
use crate::scan::{ScanOptions, ScanReport, ScanScope, scan_volume};
use crate::space::Size;
use crate::store::{OpenOptions, Store};
use crate::sync::{Faults, Node, Peer, SyncError, Volume, pull};
use crate::watcher::{Debouncer, Signal, VolumeWatcher, WatchError};

pub struct ServeOptions {
    pub settings: Settings,
    pub listen: SocketAddr,
    /// The peers of `MODE=static`.
    pub peers: Vec<String>,
    pub mode: Mode,
    /// The Docker API socket, for `MODE=docker` (and optional for `MODE=swarm`).
    pub docker_socket: String,
    /// `MODE=swarm`: this task's service (from the stack's `{{.Service.Name}}`).
    pub service: Option<String>,
    /// Refuse a volume directory that is not a mount point (in a container, data written
    /// elsewhere would be lost with the container).
    pub require_mounts: bool,
    /// UDP segmentation offload for QUIC (off where a container network breaks it).
    pub gso: bool,
    pub credentials: PathBuf,
    /// This node's name, for a certificate it signs itself or asks the signer for.
    pub node_name: Option<String>,
    /// The signer's `HOST:PORT`, for credentials with a join token.
    pub signer: Option<String>,
    /// Which peers may hold which volume.
    pub access: crate::access::Access,
    pub http: Option<SocketAddr>,
    /// Serves only `/metrics`, `/readyz` and `/healthz` (for a scraper elsewhere).
    pub metrics: Option<SocketAddr>,
    pub heartbeat: Duration,
    /// Quiet time before a changed name is scanned.
    pub debounce: Duration,
    /// How long tombstones are kept.
    pub tombstone_retention: Duration,
    /// Changes of each volume kept in the change feed.
    pub feed_retention: u64,
    /// Bytes per second of chunk data each way (0: no limit).
    pub max_rate: u64,
    /// The same for each peer.
    pub max_rate_peer: crate::rate::PeerRates,
    /// Each volume's retention policy for kept versions.
    pub retention: crate::retention::Retention,
    /// Time between two collections (`crate::gc`).
    pub gc_interval: Duration,
}

/// How often expired tombstones are looked for.
const TOMBSTONE_SWEEP: Duration = Duration::from_secs(3600);

/// Threads of the async runtime's blocking pool (tokio's default is 512): scans, the
/// collector, file staging and chunk reads. None of them waits for another, so a cap
/// only queues work; each thread that ran is memory kept (its stack, and what the
/// allocator holds for it), and more threads than this do not make two cores faster.
pub const BLOCKING_THREADS: usize = 16;

const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A connection attempt pending this long when some peer greets this node is made
/// again (a handshake that answers takes milliseconds; one whose first packets were
/// lost waits a second or more for QUIC to send them again).
const STALE_ATTEMPT: Duration = Duration::from_millis(250);

pub async fn run(
    options: ServeOptions,
    shutdown_signal: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let settings = &options.settings;
    let (obtained, enrollment) = crate::enroll::client::node_credentials(
        &options.credentials,
        &settings.state_dir,
        options.node_name.as_deref(),
        options.signer.as_deref(),
        options.gso,
    )
    .await?;
    let credentials = obtained.credentials;
    if settings.volumes.is_empty() {
        return Err(crate::config::ConfigError::NoVolumes.into());
    }
    let revocations = options.credentials.join(REVOCATIONS_FILE);
    let node = open_node(&options, &credentials)?;
    if let Some(list) = obtained.revocations {
        node.adopt_revocations(list);
    }
    let discovery = Discovery::new(
        options.mode,
        StaticPeers::new(&options.peers, options.listen)?,
        (&options.docker_socket, options.service.as_deref()),
        options.listen.port(),
        options.heartbeat,
    )
    .await?;
    tracing::info!(node = %node.meta.node_id, name = %credentials.identity.name, volumes = %settings.volumes.join(" "), "starting");
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    // Before the first scan, which can take minutes: `/status` shows it under way.
    let endpoints = [
        (options.http, crate::http::Scope::Everything),
        (options.metrics, crate::http::Scope::Metrics),
    ];
    let mut http_threads = Vec::new();
    for (addr, scope) in endpoints {
        if let Some(addr) = addr {
            let listener = std::net::TcpListener::bind(addr)
                .with_context(|| format!("cannot serve HTTP on {addr}"))?;
            let thread = crate::http::spawn(listener, node.clone(), scope, stop_rx.clone())
                .with_context(|| format!("cannot start the HTTP endpoint on {addr}"))?;
            http_threads.push(thread);
        }
    }
    let control = crate::control::bind(&settings.state_dir)?;
    tasks.spawn(crate::control::serve(
        control,
        node.clone(),
        stop_rx.clone(),
    ));
    // Watch before the first scan, so nothing changed during it goes unseen.
    let watchers: Vec<_> = node
        .volumes
        .iter()
        .map(|volume| start_watcher(&node, volume, options.heartbeat))
        .collect();
    // The publishing records a crash left, read before any pull of this run can write
    // its own: each volume's first scan takes them for what they were, then forgets them.
    let left_by_a_crash = node
        .volumes
        .iter()
        .map(|volume| node.store.publishing_records(volume.id))
        .collect::<Result<Vec<_>, _>>()?;
    // Peers are served, and followed, while the first scan runs: a node reading a
    // large volume for the first time serves what it has read so far (the scan's
    // checkpoints announce it) instead of nothing for minutes. Pulls from peers wait
    // for the scan (both hold the volume lock).
    let tls = crate::transport::NodeTls::new(&credentials)?;
    let server = crate::transport::listen_with(options.listen, &tls, options.gso)?;
    let bind = SocketAddr::new(options.listen.ip(), 0);
    let client = crate::transport::client_with(bind, &tls, options.gso)?;
    tasks.spawn(accept(node.clone(), server, stop_rx.clone()));
    let (peers_tx, peers_rx) = watch::channel(BTreeSet::new());
    let following = discovery.describe();
    tasks.spawn(discovery.run(peers_tx, stop_rx.clone()));
    tasks.spawn(follow_peers(
        node.clone(),
        client,
        options.heartbeat,
        peers_rx,
        stop_rx.clone(),
    ));
    tracing::info!(listen = %options.listen, "accepting peers; scanning the volumes");
    for (index, left_by_a_crash) in left_by_a_crash.into_iter().enumerate() {
        first_scan(&node, index, left_by_a_crash).await?;
    }
    for (index, watcher) in watchers.into_iter().enumerate() {
        let (node, stop) = (node.clone(), stop_rx.clone());
        let timing = (options.debounce, options.heartbeat);
        tasks.spawn(async move { local_changes(node, index, watcher, timing, stop).await });
    }
    tasks.spawn(follow_revocations(
        node.clone(),
        (revocations, credentials.ca_pem.clone()),
        enrollment.clone(),
        options.heartbeat,
        stop_rx.clone(),
    ));
    if let Some(enrollment) = enrollment {
        let renew =
            crate::enroll::client::keep_renewed(node.clone(), enrollment, tls, stop_rx.clone());
        tasks.spawn(renew);
    }
    let retention = options.tombstone_retention;
    tasks.spawn(sweep_tombstones(node.clone(), retention, stop_rx.clone()));
    tasks.spawn(collect_garbage(
        node.clone(),
        options.retention.clone(),
        options.gc_interval,
        stop_rx.clone(),
    ));
    let http = options.http.map_or("off".to_string(), |a| a.to_string());
    let metrics = options.metrics.map_or("off".to_string(), |a| a.to_string());
    tracing::info!(listen = %options.listen, %http, %metrics, mode = %options.mode, peers = %following, "serving");
    shutdown_signal.await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    let drain = async { while tasks.join_next().await.is_some() {} };
    let http_done = async {
        // A client holding a connection open keeps its endpoint's thread; not for long.
        while !http_threads.iter().all(|t| t.is_finished()) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(10), async {
        tokio::join!(drain, http_done)
    })
    .await
    .is_err()
    {
        tracing::warn!("some tasks did not stop within 10 s");
    }
    node.store.sync()?;
    Ok(())
}

/// Opens the store and the volumes and assembles the node: its identity, access rules and
/// revocation list.
fn open_node(options: &ServeOptions, credentials: &Credentials) -> anyhow::Result<Arc<Node>> {
    let settings = &options.settings;
    let mut store = Store::open(
        &settings.state_dir,
        OpenOptions {
            create: true,
            read_only: false,
            chunk_params: settings.chunk_params,
        },
    )?;
    store.adopt_node_id(credentials.identity.node_id)?;
    store.set_feed_retention(options.feed_retention);
    let volumes = open_volumes(options, &store)?;
    let mut node = Node::new(store, volumes, [], Faults::from_env());
    if !options.access.is_open() {
        tracing::info!(rules = %options.access.describe(), "per-volume access");
    }
    node.access = options.access.clone();
    node.heartbeat = options.heartbeat;
    node.paused = crate::pause::Paused::load(&settings.state_dir)?;
    node.rate.set(options.max_rate);
    node.rate.set_peer_rates(options.max_rate_peer.clone());
    let node = Arc::new(node);
    *node.identity.write().expect("identity lock") = Some(credentials.identity.clone());
    let _ = node.trust.set(Trust {
        ca_pem: credentials.ca_pem.clone(),
        keep: Some(settings.state_dir.join(HELD_FILE)),
    });
    let held = crate::revocation::held(
        &options.credentials,
        &settings.state_dir,
        &credentials.ca_pem,
    )?;
    node.adopt_revocations(held);
    Ok(node)
}

/// Opens the configured volumes: a missing directory is created empty (it fills from
/// peers), unless mounts are required and it is not one.
fn open_volumes(options: &ServeOptions, store: &Store) -> anyhow::Result<Vec<Volume>> {
    let mut volumes = Vec::new();
    for name in &options.settings.volumes {
        let dir = options.settings.volume_dir(name);
        if options.require_mounts && !crate::container::is_mount_point(&dir).unwrap_or(false) {
            anyhow::bail!(
                "volume {name}: {dir} is not a mounted volume; mount the Docker volume there (in a stack file, \"- {name}:{dir}\" under the service's volumes: and \"{name}:\" under the top-level volumes:; with docker service update, --mount-add type=volume,source={name},target={dir}; with docker run, -v {name}:{dir}) or remove {name} from SYNC_VOLUMES",
                dir = dir.display()
            );
        }
        if !dir.exists() {
            tracing::warn!(
                "volume {name}: {} does not exist; creating it empty (it will be filled from peers)",
                dir.display()
            );
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let volume = Volume::open(store, name, &dir).map_err(|e| {
            match e.os_error().map(std::io::Error::kind) {
                Some(std::io::ErrorKind::PermissionDenied) => anyhow::anyhow!(
                    "volume {name}: this node (uid {}) may not write in {} ({e}); make that directory writable for it (chown or chmod), or run the node as its owner",
                    rustix::process::geteuid().as_raw(),
                    dir.display()
                ),
                _ => anyhow::Error::new(e).context(format!("volume {name}")),
            }
        })?;
        let guard = options.settings.delete_guard.for_volume(name);
        volumes.push(
            volume
                .keeping_setid(options.settings.keep_setid.contains(name))
                .guarded_by(guard),
        );
    }
    Ok(volumes)
}

/// Peers' connections served at once; past it, new ones are closed at once. (Each
/// connection has at most the transport's stream limit of requests in flight.)
const MAX_CONNECTIONS: usize = 256;

/// Connections one member (one proven node id) may have served at once: an honest node
/// keeps one to each peer, and for a moment a second while it reconnects. So one
/// member cannot take every slot of [`MAX_CONNECTIONS`] from the others.
const MAX_CONNECTIONS_PER_PEER: usize = 8;

/// Accepts peers' connections, each served in a task of its own, until `stop` flips.
async fn accept(node: Arc<Node>, mut server: s2n_quic::Server, mut stop: watch::Receiver<bool>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let per_peer = PeerSlots::default();
    loop {
        let connection = tokio::select! {
            accepted = server.accept() => match accepted {
                Some(connection) => connection,
                None => break,
            },
            _ = stop.wait_for(|s| *s) => break,
        };
        let too_many = |message: String| {
            let peer = connection
                .remote_addr()
                .map_or("?".to_string(), |a| a.to_string());
            tracing::warn!(%peer, "refusing a connection: {message}");
            connection.close(u32::from(crate::protocol::ErrorCode::TooLarge.number()).into());
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            too_many(format!("{MAX_CONNECTIONS} are open already"));
            continue;
        };
        // A connection without a proven identity is refused by `serve_connection`.
        let peer = crate::identity::peer_identity(&connection.handle()).ok();
        let peer_slot = match &peer {
            Some(peer) => match per_peer.take(peer.node_id) {
                Some(peer_slot) => Some(peer_slot),
                None => {
                    too_many(format!(
                        "node {} has {MAX_CONNECTIONS_PER_PEER} open already",
                        peer.describe()
                    ));
                    continue;
                }
            },
            None => None,
        };
        let node = node.clone();
        tokio::spawn(async move {
            crate::sync::server::serve_connection(node, connection).await;
            drop((slot, peer_slot));
        });
    }
}

/// How many connections each member has being served.
#[derive(Clone, Default)]
struct PeerSlots(Arc<std::sync::Mutex<HashMap<crate::ids::NodeId, usize>>>);

/// One member's connection, counted until dropped.
struct PeerSlot {
    slots: PeerSlots,
    peer: crate::ids::NodeId,
}

impl PeerSlots {
    /// Counts one more connection of `peer`, unless it has its share open already.
    fn take(&self, peer: crate::ids::NodeId) -> Option<PeerSlot> {
        let mut open = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(peer).or_default();
        if *count >= MAX_CONNECTIONS_PER_PEER {
            return None;
        }
        *count += 1;
        Some(PeerSlot {
            slots: self.clone(),
            peer,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut open = self.slots.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.peer) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.peer);
            }
        }
    }
}

/// Every heartbeat, reads the revocation list `file` again (checking it against the CA
/// certificate `ca_pem`) and, for an enrolled node, asks the signer for a newer one;
/// adopts a newer list (which passes it on to the peers), until `stop` flips.
async fn follow_revocations(
    node: Arc<Node>,
    (file, ca_pem): (PathBuf, String),
    signer: Option<crate::enroll::client::Enrollment>,
    heartbeat: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut last_error = String::new();
    let mut say = |result: Result<(), String>| match result {
        Ok(()) => last_error.clear(),
        Err(message) if message != last_error => {
            tracing::error!("ignoring the revocation list: {message}");
            last_error = message;
        }
        Err(_) => {}
    };
    loop {
        tokio::select! {
            _ = tokio::time::sleep(heartbeat) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        say(Revocations::load(&file, &ca_pem)
            .map(|list| {
                node.adopt_revocations(list);
            })
            .map_err(|e| e.to_string()));
        if let Some(signer) = &signer {
            let serial = node.revocations.read().expect("revocations lock").serial;
            let from = "the signer's revocation list";
            say(match signer.revocations_after(serial).await {
                Ok(Some(text)) => node
                    .receive_revocations(&text, from)
                    .map(drop)
                    .map_err(|e| e.to_string()),
                Ok(None) => Ok(()),
                Err(e) => Err(e.to_string()),
            });
        }
    }
}

/// Forgets expired tombstones now and every [`TOMBSTONE_SWEEP`], until `stop` flips.
async fn sweep_tombstones(node: Arc<Node>, retention: Duration, mut stop: watch::Receiver<bool>) {
    loop {
        if let Err(e) = expire_tombstones(&node, retention).await {
            tracing::error!("expiring tombstones failed: {e:#}");
        }
        tokio::select! {
            _ = tokio::time::sleep(TOMBSTONE_SWEEP) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
}

/// Runs a collection now and every `interval`, until `stop` flips. A collection runs on
/// a thread of its own, a pack at a time, beside sync (it takes no volume lock).
async fn collect_garbage(
    node: Arc<Node>,
    retention: crate::retention::Retention,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let node2 = node.clone();
        let retention = retention.clone();
        let stop2 = stop.clone();
        let done = tokio::task::spawn_blocking(move || {
            let volumes: Vec<crate::gc::VolumeToCollect> = node2
                .volumes
                .iter()
                .map(|v| crate::gc::VolumeToCollect {
                    name: v.name.clone(),
                    id: v.id,
                    policy: retention.policy(&v.name),
                    fs_bytes: crate::space::total(v.fs.root_path()).unwrap_or(0),
                })
                .collect();
            crate::gc::collect(
                &node2.store,
                &volumes,
                crate::gc::now_ns(),
                &mut |name, held| node2.collections.set_held(name, held),
                &mut || {
                    if !*stop2.borrow() {
                        std::thread::sleep(crate::gc::PAUSE_BETWEEN_PACKS);
                    }
                },
                &mut crate::gc::crash_from_env(),
            )
        })
        .await;
        match done {
            Ok(Ok(collection)) => {
                if collection.bytes_reclaimed > 0 || collection.versions_dropped > 0 {
                    tracing::info!(
                        versions_dropped = collection.versions_dropped,
                        chunks_reclaimed = collection.chunks_reclaimed,
                        bytes_reclaimed = collection.bytes_reclaimed,
                        "collection done"
                    );
                }
                node.collections.set_last(collection);
            }
            Ok(Err(e)) => tracing::error!("collecting kept versions failed: {e}"),
            Err(e) => tracing::error!("collecting kept versions failed: {e}"),
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
}

/// Forgets tombstones older than the retention period, one volume at a time.
async fn expire_tombstones(node: &Arc<Node>, retention: Duration) -> anyhow::Result<()> {
    let cutoff = std::time::SystemTime::now()
        .checked_sub(retention)
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as i64);
    for index in 0..node.volumes.len() {
        let volume = &node.volumes[index];
        let _guard = volume.lock.lock().await;
        let node2 = node.clone();
        let expired = tokio::task::spawn_blocking(move || {
            crate::scan::expire_tombstones(&node2.store, node2.volumes[index].id, cutoff)
        })
        .await??;
        if expired > 0 {
            tracing::info!(volume = %volume.name, expired, "forgot tombstones past their retention");
        }
    }
    Ok(())
}

/// Rescans one volume (or the part `options` names) under its lock; announces local
/// changes to peers. Its report says which deletes the scan left for the next one
/// ([`crate::guard::ScanGuard::defer`]).
async fn rescan(
    node: &Arc<Node>,
    index: usize,
    options: ScanOptions,
) -> anyhow::Result<ScanReport> {
    let report = {
        let _guard = node.volumes[index].lock.lock().await;
        scan_locked(node, index, options).await?
    };
    say_local_changes(node, index, &report);
    Ok(report)
}

/// How soon the scan at start first publishes what it has read so far: a peer of a
/// node whose volume takes a second or two to read starts pulling a quarter second in.
const FIRST_SCAN_FIRST_CHECKPOINT: Duration = Duration::from_millis(250);
/// How often the scan at start publishes once it has gone on for a while (less often
/// where a checkpoint costs more than a tenth of that: [`crate::scan::Checkpoints`]).
const FIRST_SCAN_CHECKPOINTS: Duration = Duration::from_secs(1);

/// The scan at start: a whole scan that publishes what it has read as it goes
/// ([`FIRST_SCAN_CHECKPOINTS`]), then, under the same hold of the volume lock (a pull may
/// be waiting for it), forgets the publishing records a crash left, which the scan
/// has taken for what they were: `left_by_a_crash`, read before any pull of this run
/// began. A pull stages and flushes meanwhile, and the records of a batch it is about to
/// publish must stay.
async fn first_scan(
    node: &Arc<Node>,
    index: usize,
    left_by_a_crash: Vec<Box<[u8]>>,
) -> anyhow::Result<()> {
    let volume = &node.volumes[index];
    let announcer = node.clone();
    let slowed = node.faults.slow_first_scan;
    let (first, every) = match slowed {
        Some(_) => (Duration::ZERO, Duration::ZERO),
        None => (FIRST_SCAN_FIRST_CHECKPOINT, FIRST_SCAN_CHECKPOINTS),
    };
    let checkpoints = crate::scan::Checkpoints {
        first,
        every,
        published: Arc::new(move || {
            announcer.notify_peers(&announcer.volumes[index].name);
            if let Some(pause) = slowed {
                std::thread::sleep(pause);
            }
        }),
    };
    let options = ScanOptions {
        checkpoints: Some(checkpoints),
        ..ScanOptions::default()
    };
    let report = {
        let _guard = volume.lock.lock().await;
        let report = scan_locked(node, index, options).await?;
        node.store.forget_publishing(left_by_a_crash)?;
        report
    };
    say_local_changes(node, index, &report);
    Ok(())
}

/// Scans one volume (or the part `options` names); the caller holds its lock.
async fn scan_locked(
    node: &Arc<Node>,
    index: usize,
    options: ScanOptions,
) -> anyhow::Result<ScanReport> {
    let volume = &node.volumes[index];
    let (recent, recent_added) = volume.guard.recent_changes();
    let options = ScanOptions {
        keep_link_groups: volume.links_pending.load(Ordering::Relaxed),
        guard: crate::guard::ScanGuard {
            policy: volume.guard.policy,
            recent,
            recent_added,
            release: options.guard.release,
            defer: options.guard.defer,
        },
        ..options
    };
    let scanner = node.clone();
    let whole = matches!(options.scope, ScanScope::Everything);
    let options = ScanOptions {
        progress: Some(volume.scanning.start()),
        ..options
    };
    let scanned = tokio::task::spawn_blocking(move || {
        let volume = &scanner.volumes[index];
        scan_volume(
            &scanner.store,
            &volume.name,
            volume.fs.root_path(),
            &options,
        )
    })
    .await;
    volume.scanning.end();
    let mut report = scanned??;
    let was_holding = volume.guard.holding();
    // A whole scan's new names (the start's first indexing, a heartbeat's) are no
    // rename's other half: only a narrow scan's adds, which may precede the deletes
    // it left to the next scan, offset deletes.
    volume
        .guard
        .note_changes(report.deleted, if whole { 0 } else { report.added });
    volume.guard.load(&node.store, volume.id)?;
    say_held(volume, &report, was_holding);
    let unsyncable = std::mem::take(&mut report.unsyncable);
    let (root, origin) = (volume.fs.root_path(), crate::unsyncable::Origin::Scan);
    if whole {
        let copies = report.conflict_copies;
        volume.conflict_copies.store(copies, Ordering::Relaxed);
        *volume.conflict_paths.lock().expect("conflict paths lock") = report.conflict_paths.clone();
        volume
            .unsyncable
            .replace(&volume.name, root, origin, unsyncable);
    } else {
        volume
            .unsyncable
            .add(&volume.name, root, origin, unsyncable);
    }
    Ok(report)
}

/// Counts and logs the local changes a scan found, and announces them to peers.
fn say_local_changes(node: &Node, index: usize, report: &ScanReport) {
    let volume = &node.volumes[index];
    let changes = report.added + report.modified + report.deleted;
    if changes > 0 {
        node.stats
            .local_changes
            .fetch_add(changes, Ordering::Relaxed);
        let names = report.changed_names.join(", ");
        let more = changes.saturating_sub(report.changed_names.len() as u64);
        let more = if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        };
        tracing::info!(volume = %volume.name, added = report.added, modified = report.modified, deleted = report.deleted, "local changes: {names}{more}");
        node.notify_peers(&volume.name);
    }
}

/// Logs what the delete guard did in a scan: a hold that begins (once, with the count
/// and the first names), names that joined it or were restored.
fn say_held(volume: &Volume, report: &ScanReport, was_holding: bool) {
    let name = &volume.name;
    if report.deletes_held > 0 && !was_holding {
        tracing::warn!(
            volume = %name,
            held = report.deletes_held,
            "the delete guard holds back from peers a scan's deletes of {} names, more than its threshold ({}) of the volume at once: {}{}; check the volume, then `shoal release {name}` lets them go (restoring the names ends their hold too)",
            report.deletes_held,
            volume.guard.policy,
            report.deletes_held_sample.join(", "),
            match report.deletes_held_sample.len() as u64 >= report.deletes_held {
                true => "",
                false => ", ...",
            }
        );
    } else if report.deletes_held > 0 {
        tracing::info!(volume = %name, held = report.deletes_held, "{} more deleted names join the deletes the guard holds: {}", report.deletes_held, report.deletes_held_sample.join(", "));
    }
    if report.deletes_restored > 0 {
        tracing::info!(volume = %name, restored = report.deletes_restored, "{} names whose deletes the guard held are on disk again: their holds end", report.deletes_restored);
    }
}

/// Lets the deletes the guard holds in volume `index` go (`shoal release`): a whole scan
/// that writes them as tombstones, as any scan would, and announces them. Returns how
/// many names were held.
pub async fn release_deletes(node: &Arc<Node>, index: usize) -> anyhow::Result<u64> {
    let volume = &node.volumes[index];
    let held = volume
        .guard
        .status(&volume.name)
        .map_or(0, |held| held.names);
    let options = ScanOptions {
        watched_root: volume.fs.root_id().ok(),
        guard: crate::guard::ScanGuard {
            release: true,
            ..Default::default()
        },
        ..ScanOptions::default()
    };
    rescan(node, index, options).await?;
    Ok(held)
}

/// A volume's watcher and its events, or `None` (with the reason logged) if the volume
/// must do with heartbeat rescans.
type WatchedVolume = Option<(VolumeWatcher, mpsc::Receiver<Signal>)>;

fn start_watcher(node: &Node, volume: &Volume, heartbeat: Duration) -> WatchedVolume {
    let queue = node
        .faults
        .watch_queue
        .unwrap_or(crate::watcher::DEFAULT_QUEUE);
    match VolumeWatcher::start(volume.fs.root_path(), queue) {
        Ok(watched) => Some(watched),
        Err(e) => {
            tracing::warn!(volume = %volume.name, "{e}; falling back to a full rescan every {}", humantime::format_duration(heartbeat));
            None
        }
    }
}

/// Keeps one volume's index up to date: narrow scans of what the watcher saw change, and
/// a rescan every heartbeat that catches anything it missed: of the volume's next slice
/// while the watcher is healthy, of all of it once the watcher has stopped.
async fn local_changes(
    node: Arc<Node>,
    index: usize,
    mut watched: WatchedVolume,
    (debounce, heartbeat): (Duration, Duration),
    mut stop: watch::Receiver<bool>,
) {
    let name = node.volumes[index].name.clone();
    let mut debouncer = Debouncer::new(debounce);
    let mut next_full = Instant::now() + heartbeat;
    let floor = node.faults.slice_names.unwrap_or(MIN_SLICE_NAMES);
    let slicer = Arc::new(std::sync::Mutex::new(Slicer::new(floor)));
    let mut scan: Option<tokio::task::JoinHandle<Vec<crate::pathname::VolPath>>> = None;
    let overflow = watched.as_ref().map(|(watcher, _)| watcher.overflow());
    // The directory opened at start: emptied from now on, it is a deletion, not a new disk.
    let watched_root = node.volumes[index].fs.root_id().ok();
    // Deletes left by scans to later ones (`ScanGuard::defer`), and whether the scan
    // under way may leave some.
    let mut deferral = crate::guard::Deferral::default();
    let mut deferring = false;
    loop {
        let due = debouncer.due().map(Instant::from_std);
        tokio::select! {
            _ = async { overflow.as_ref().expect("guarded").notified().await }, if overflow.is_some() && watched.is_some() => {
                tracing::warn!(volume = %name, "file watcher queue overflowed; rescanning the volume");
                node.stats.watch_rescans.fetch_add(1, Ordering::Relaxed);
                debouncer.lost(std::time::Instant::now());
            }
            signal = next_signal(&mut watched) => {
                on_signal(&node, index, heartbeat, signal, &mut debouncer, &mut watched);
            }
            _ = tokio::time::sleep_until(due.unwrap_or(next_full)), if due.is_some() && scan.is_none() => {
                let now = std::time::Instant::now();
                let volume = &node.volumes[index];
                let mut echoes = volume.echoes.checker(&volume.fs);
                let forgotten = debouncer.forget_echoes(now, &mut echoes);
                node.stats.watch_echoes.fetch_add(forgotten, Ordering::Relaxed);
                if let Some(request) = debouncer.take_ready(now) {
                    // A whole rescan (events were lost) covers every slice.
                    match &request.scope {
                        ScanScope::Dirs(_) => {
                            node.stats.watch_scans.fetch_add(1, Ordering::Relaxed);
                        }
                        ScanScope::Everything => slicer.lock().expect("slicer lock").restart(),
                    }
                    deferring = deferral.defer(true, !request.hold.is_empty(), now);
                    let defer = deferring;
                    let options = ScanOptions {
                        scope: request.scope,
                        hold: request.hold,
                        busy: request.busy,
                        renamed: request.renamed,
                        left: request.left,
                        watched_root,
                        guard: crate::guard::ScanGuard { defer, ..Default::default() },
                        ..ScanOptions::default()
                    };
                    scan = Some(spawn_rescan(&node, index, options));
                }
            }
            _ = tokio::time::sleep_until(next_full), if scan.is_none() => {
                next_full = Instant::now() + heartbeat;
                let now = std::time::Instant::now();
                let hold = debouncer.held(now);
                deferring = deferral.defer(false, !hold.is_empty(), now);
                let guard = crate::guard::ScanGuard { defer: deferring, ..Default::default() };
                let options = ScanOptions { hold, watched_root, guard, ..ScanOptions::default() };
                scan = Some(match watched {
                    Some(_) => spawn_slice(&node, index, slicer.clone(), options),
                    None => spawn_rescan(&node, index, options),
                });
            }
            deferred = async { scan.as_mut().expect("guarded").await }, if scan.is_some() => {
                scan = None;
                let deferred = deferred.unwrap_or_default();
                // Events already queued belong to the burst: recorded first, so that
                // the deletes left to the next scan wait for a quiet window after them.
                while let Some(signal) = watched.as_mut().and_then(|(_, signals)| signals.try_recv().ok()) {
                    on_signal(&node, index, heartbeat, Some(signal), &mut debouncer, &mut watched);
                }
                let now = std::time::Instant::now();
                deferral.ended(deferring, !deferred.is_empty(), now);
                for path in deferred {
                    // Scanned again once the burst settles.
                    debouncer.again(path, now);
                }
            }
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    if let Some(scan) = scan {
        let _ = scan.await;
    }
}

/// Takes one signal of volume `index`'s watcher (`None`: the watcher stopped).
fn on_signal(
    node: &Node,
    index: usize,
    heartbeat: Duration,
    signal: Option<Signal>,
    debouncer: &mut Debouncer,
    watched: &mut WatchedVolume,
) {
    let name = &node.volumes[index].name;
    let now = std::time::Instant::now();
    match signal {
        Some(Signal::Changed { path, change }) => debouncer.record(path, change, now),
        Some(Signal::Renamed { from, to }) => debouncer.renamed(from, to),
        Some(Signal::Lost(reason)) => {
            tracing::warn!(volume = %name, "{reason}; rescanning the volume");
            node.stats.watch_rescans.fetch_add(1, Ordering::Relaxed);
            debouncer.lost(now);
        }
        Some(Signal::WatchLimit) => {
            let root = node.volumes[index].fs.root_path();
            tracing::warn!(volume = %name, "{}; falling back to a full rescan every {}", WatchError::limit(root), humantime::format_duration(heartbeat));
            *watched = None;
            debouncer.lost(now);
        }
        None => {
            tracing::warn!(volume = %name, "the file watcher stopped; falling back to a full rescan every {}", humantime::format_duration(heartbeat));
            *watched = None;
            debouncer.lost(now);
        }
    }
}

/// Runs [`rescan`] in a task of its own; the task's result is the deletes left for the
/// next scan (none if the scan failed).
fn spawn_rescan(
    node: &Arc<Node>,
    index: usize,
    options: ScanOptions,
) -> tokio::task::JoinHandle<Vec<crate::pathname::VolPath>> {
    let n = node.clone();
    spawn_scan(node, index, async move {
        Ok(rescan(&n, index, options).await?.deletes_deferred)
    })
}

/// A heartbeat's rescan while the watcher is healthy: the volume's next slice. A slice
/// whose scan fails is planned again at the next heartbeat.
fn spawn_slice(
    node: &Arc<Node>,
    index: usize,
    slicer: Arc<std::sync::Mutex<Slicer>>,
    options: ScanOptions,
) -> tokio::task::JoinHandle<Vec<crate::pathname::VolPath>> {
    let n = node.clone();
    spawn_scan(node, index, async move {
        let (planner, plan) = (n.clone(), slicer.clone());
        let scope = tokio::task::spawn_blocking(move || -> anyhow::Result<ScanScope> {
            let store = &planner.store;
            let Some(record) = store.volume(&planner.volumes[index].name)? else {
                return Ok(ScanScope::Everything);
            };
            Ok(plan.lock().expect("slicer lock").plan(store, record.id)?)
        })
        .await??;
        let report = rescan(&n, index, ScanOptions { scope, ..options }).await?;
        if let Some(pass) = slicer.lock().expect("slicer lock").scanned(&report) {
            let volume = &n.volumes[index];
            volume.conflict_copies.store(pass.copies, Ordering::Relaxed);
            *volume.conflict_paths.lock().expect("conflict paths lock") = pass.paths;
        }
        Ok(report.deletes_deferred)
    })
}

/// Runs a scan of volume `index` as a task of its own, logging its failure; the task's
/// result is the deletes the scan left for the next one (none if it failed).
fn spawn_scan(
    node: &Arc<Node>,
    index: usize,
    scan: impl Future<Output = anyhow::Result<Vec<crate::pathname::VolPath>>> + Send + 'static,
) -> tokio::task::JoinHandle<Vec<crate::pathname::VolPath>> {
    let node = node.clone();
    tokio::spawn(async move {
        match scan.await {
            Ok(deferred) => {
                node.note_state_room(None);
                deferred
            }
            Err(e) => {
                if !node.note_state_room(Some(e.as_ref())) {
                    tracing::error!("rescan of {} failed: {e:#}", node.volumes[index].name);
                }
                Vec::new()
            }
        }
    })
}

async fn next_signal(watched: &mut WatchedVolume) -> Option<Signal> {
    match watched {
        Some((_, signals)) => signals.recv().await,
        None => std::future::pending().await,
    }
}

/// Keeps one peer task per address of the discovered set, until `stop` flips.
async fn follow_peers(
    node: Arc<Node>,
    client: s2n_quic::Client,
    heartbeat: Duration,
    mut wanted: watch::Receiver<BTreeSet<SocketAddr>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut retire: HashMap<SocketAddr, watch::Sender<bool>> = HashMap::new();
    let mut loops = tokio::task::JoinSet::new();
    loop {
        let set = wanted.borrow_and_update().clone();
        let (added, removed) = node.set_peers(&set);
        for peer in removed {
            let id = peer.node_id().map_or("?".to_string(), |id| id.to_string());
            tracing::info!(peer = %peer.addr, node = %id, "peer left");
            if let Some(tx) = retire.remove(&peer.addr) {
                let _ = tx.send(true);
            }
        }
        for peer in added {
            tracing::info!(peer = %peer.addr, "peer joined");
            let (tx, rx) = watch::channel(false);
            retire.insert(peer.addr, tx);
            let (node, client) = (node.clone(), client.clone());
            loops.spawn(async move { supervise_peer(node, peer, client, heartbeat, rx).await });
        }
        let settled = tokio::select! {
            changed = wanted.changed() => changed.is_err(),
            Some(_) = loops.join_next(), if !loops.is_empty() => false,
            _ = stop.wait_for(|s| *s) => break,
        };
        if settled {
            // Discovery is done (a static list): nothing more will change.
            let _ = stop.wait_for(|s| *s).await;
            break;
        }
    }
    for tx in retire.values() {
        let _ = tx.send(true);
    }
    while loops.join_next().await.is_some() {}
}

/// Runs [`peer_loop`] for one peer, and again after a pause (doubling up to
/// `MAX_BACKOFF`) if it ever fails (a panic): a bug that one peer's answers trigger must
/// not end this node's sync with it for good.
async fn supervise_peer(
    node: Arc<Node>,
    peer: Arc<Peer>,
    client: s2n_quic::Client,
    heartbeat: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let (n, p, c, s) = (node.clone(), peer.clone(), client.clone(), stop.clone());
        match tokio::spawn(peer_loop(n, p, c, heartbeat, s)).await {
            Ok(()) => return,
            Err(e) => {
                tracing::error!(peer = %peer.addr, "the task syncing with this peer failed: {e}; restarting it in {}", humantime::format_duration(backoff));
                peer.connected.store(false, Ordering::Relaxed);
                *peer.handle.lock().expect("peer state lock") = None;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Keeps one peer connected and pulls from it.
async fn peer_loop(
    node: Arc<Node>,
    peer: Arc<Peer>,
    client: s2n_quic::Client,
    heartbeat: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        if *stop.borrow() {
            return;
        }
        // A peer that left (or shutdown) must not wait out a handshake timeout.
        let started = tokio::time::Instant::now();
        let connecting = crate::sync::client::connect(&node, &peer, &client);
        tokio::pin!(connecting);
        let attempt = loop {
            tokio::select! {
                attempt = &mut connecting => break Some(attempt),
                // A peer greeted this node: perhaps this one, up since an attempt that
                // is still waiting out QUIC's retransmission timer (a peer not listening
                // yet drops the first packets): that one starts afresh.
                _ = node.greeted.notified() => if started.elapsed() >= STALE_ATTEMPT {
                    break None;
                },
                _ = stop.wait_for(|s| *s) => return,
            }
        };
        let Some(attempt) = attempt else {
            continue;
        };
        match attempt {
            Ok(mut connection) => {
                backoff = Duration::from_millis(200);
                peer.sync.connected();
                let id = peer.node_id().map_or("?".to_string(), |id| id.to_string());
                tracing::info!(peer = %peer.addr, node = %id, "connected");
                node.share_revocations(&peer);
                crate::sync::announce::announce_owed(&node, &peer);
                let reason = sync_with(&node, &peer, &mut connection, heartbeat, &mut stop).await;
                drop(connection);
                peer.connected.store(false, Ordering::Relaxed);
                *peer.handle.lock().expect("peer state lock") = None;
                match reason {
                    Some(e) => {
                        let message = format!("disconnected: {e}");
                        if peer.sync.unreachable(&message, node.relog_interval()) {
                            tracing::warn!(peer = %peer.addr, "{message}");
                        }
                    }
                    None => return,
                }
            }
            Err(SyncError::SelfConnection) => {
                peer.sync.mark_self();
                return;
            }
            Err(e) => {
                let message = format!("cannot sync: {e}");
                if peer.sync.unreachable(&message, node.relog_interval()) {
                    let repeats = peer.sync.link_failure().map(|f| f.describe_repeats());
                    tracing::warn!(peer = %peer.addr, "{message}; retrying{}", repeats.unwrap_or_default());
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            // A peer just greeted this node: perhaps this one, up at last.
            _ = node.greeted.notified() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// How often a pull round under way says how far it got.
const PROGRESS_LOG: Duration = Duration::from_secs(10);

/// Pulls one volume from `peer`, with a progress line (done, pending, rate, ETA) every
/// [`PROGRESS_LOG`] while the round lasts.
async fn pull_logging_progress(
    node: &Arc<Node>,
    peer: &Arc<Peer>,
    index: usize,
    via: pull::Via,
) -> Result<pull::PullReport, SyncError> {
    let name = &node.volumes[index].name;
    let pulling = pull::pull_volume(node, peer, index, via);
    tokio::pin!(pulling);
    let mut ticks = tokio::time::interval_at(Instant::now() + PROGRESS_LOG, PROGRESS_LOG);
    loop {
        tokio::select! {
            pulled = &mut pulling => return pulled,
            _ = ticks.tick() => if let Some(p) = peer.sync.progress(name) {
                let eta = p.eta_seconds.map_or("unknown".to_string(), |s| {
                    humantime::format_duration(Duration::from_secs(s)).to_string()
                });
                tracing::info!(
                    peer = %peer.addr, volume = %name, entries_done = p.entries_done, bytes_done = p.bytes_done,
                    pending_entries = p.pending_entries, pending_bytes = p.pending_bytes,
                    "pulling: {} entries ({}) done, {} entries ({}) to go, {}/s, ETA {eta}",
                    p.entries_done, Size(p.bytes_done), p.pending_entries, Size(p.pending_bytes), Size(p.bytes_per_second)
                );
            },
        }
    }
}

/// How soon a pull that left files unfinished is tried again.
const RETRY_INCOMPLETE: Duration = Duration::from_secs(2);

/// Pulls from a connected peer on connect, on notify (following its change feed) and
/// every heartbeat (walking its tree: the backstop). Returns why it
/// stopped: `None` for shutdown. Between rounds it watches the connection, so that one
/// that closes (the peer fell silent for the idle timeout) is noticed at once and
/// reconnected, not at the next round.
async fn sync_with(
    node: &Arc<Node>,
    peer: &Arc<Peer>,
    connection: &mut s2n_quic::Connection,
    heartbeat: Duration,
    stop: &mut watch::Receiver<bool>,
) -> Option<SyncError> {
    // The first round after connecting walks: what changed while apart may be more
    // than the peer's feed still holds, and the walk says so at no cost when nothing did.
    let mut via = pull::Via::Walk;
    loop {
        let mut incomplete = false;
        for index in 0..node.volumes.len() {
            let name = node.volumes[index].name.clone();
            if !peer.shares(&name) || node.paused.holds(&name) {
                continue;
            }
            let pulled = pull_logging_progress(node, peer, index, via).await;
            incomplete |= pulled.as_ref().is_ok_and(|r| r.left_for_soon() > 0);
            let error = pulled
                .as_ref()
                .err()
                .map(|e| e as &(dyn std::error::Error + 'static));
            let room_short = node.note_state_room(error);
            if let Err(e) = &pulled
                && e.is_peer_paused()
            {
                if peer.sync.round_paused(&name) {
                    tracing::info!(peer = %peer.addr, volume = %name, "{e}; pulling again once it is resumed");
                }
                continue;
            }
            if let Err(e) = &pulled {
                let message = format!("pull failed: {e}");
                // A lost connection is the peer's task's to say, a full state directory
                // note_state_room's.
                if peer
                    .sync
                    .round_failed(&name, &message, node.relog_interval())
                    && !e.is_connection_lost()
                    && !room_short
                {
                    let repeats = peer.sync.failing_volumes().into_iter();
                    let repeats = repeats
                        .filter(|(v, _)| *v == name)
                        .map(|(_, f)| f.describe_repeats());
                    tracing::warn!(peer = %peer.addr, volume = %name, "{message}{}", repeats.collect::<String>());
                }
            }
            if room_short {
                // Tried again soon, not a heartbeat away.
                incomplete = true;
                continue;
            }
            match pulled {
                Ok(report) if report.changed() => {
                    tracing::info!(peer = %peer.addr, volume = %name, applied = report.applied, deleted = report.deleted, conflicts = report.conflicts, "pulled");
                    node.notify_peers(&name);
                }
                Ok(_) => {}
                Err(e) if e.is_connection_lost() => return Some(e),
                // Logged above, at a bounded rate.
                Err(_) => {}
            }
        }
        let next_round = if incomplete {
            heartbeat.min(RETRY_INCOMPLETE)
        } else {
            heartbeat
        };
        tokio::select! {
            _ = tokio::time::sleep(next_round) => via = pull::Via::Walk,
            _ = peer.wake.notified() => via = pull::Via::Feed,
            // Peers open no streams on the connections we opened: this only ends.
            closed = connection.accept_bidirectional_stream() => match closed {
                Ok(Some(_)) => {}
                Ok(None) => return Some(SyncError::Connection("the connection closed".into())),
                Err(e) => return Some(SyncError::Connection(e.to_string())),
            },
            _ = stop.wait_for(|s| *s) => return None,
        }
    }
}
