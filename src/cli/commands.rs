//! The commands behind `shoal scan`, `status` and `verify`: open the store, run the
//! library, and print for a person or (with `--json`) for a script.

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::Context;
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use serde::Serialize;

use super::{Outcome, print};
use crate::config::{ConfigError, Settings};
use crate::pathname::VolPath;
use crate::scan::{ScanOptions, ScanReport, scan_volume};
use crate::store::{OpenOptions, Store};
use crate::tree::SubtreeTotals;
use crate::verify::{Severity, verify as verify_store};

fn progress_bar(json: bool, template: &str) -> Option<ProgressBar> {
    if json || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template(template).expect("templates are fixed strings"));
    bar.enable_steady_tick(Duration::from_millis(120));
    Some(bar)
}

pub fn scan(settings: &Settings, threads: usize, json: bool) -> anyhow::Result<Outcome> {
    if settings.volumes.is_empty() {
        return Err(ConfigError::NoVolumes.into());
    }
    for name in &settings.volumes {
        let dir = settings.volume_dir(name);
        if !dir.is_dir() {
            anyhow::bail!(
                "volume {name}: {} is not a directory (is the volume mounted under the data root {}?)",
                dir.display(),
                settings.data_root.display()
            );
        }
    }
    let options = OpenOptions {
        create: true,
        read_only: false,
        chunk_params: settings.chunk_params,
    };
    let store = Store::open(&settings.state_dir, options)?;
    let mut reports = Vec::new();
    for name in &settings.volumes {
        let progress = progress_bar(
            json,
            &format!("{{spinner}} scanning {name}: {{bytes}} read ({{bytes_per_sec}}), {{msg}}"),
        );
        let options = ScanOptions {
            threads,
            progress: progress.clone(),
            guard: crate::guard::ScanGuard {
                policy: settings.delete_guard.for_volume(name),
                ..Default::default()
            },
            ..ScanOptions::default()
        };
        let report = scan_volume(&store, name, &settings.volume_dir(name), &options)?;
        if let Some(bar) = progress {
            bar.finish_and_clear();
        }
        for unsyncable in report.unsyncable.names() {
            let path = settings.volume_dir(name).join(&unsyncable.path);
            eprintln!(
                "shoal: cannot sync {}: {}",
                path.display(),
                unsyncable.reason
            );
        }
        if !json {
            print(&human_scan(&report))?;
        }
        reports.push(report);
    }
    if json {
        print(&format!("{}\n", serde_json::to_string_pretty(&reports)?))?;
    }
    let problems: usize = reports.iter().map(|r| r.problems.len()).sum();
    if problems > 0 {
        eprintln!(
            "shoal: {problems} names could not be indexed (see the warnings above); their previous entries were kept"
        );
        return Ok(Outcome::ProblemsFound);
    }
    let unsyncable: u64 = reports.iter().map(|r| r.unsyncable.total()).sum();
    if unsyncable > 0 {
        eprintln!("shoal: {unsyncable} names cannot be synced (see above)");
        return Ok(Outcome::ProblemsFound);
    }
    Ok(Outcome::Success)
}

fn human_scan(r: &ScanReport) -> String {
    let mut out = String::new();
    let rate = if r.seconds > 0.0 {
        r.bytes_read as f64 / r.seconds
    } else {
        0.0
    };
    let _ = writeln!(out, "volume {}: scanned in {:.2} s", r.volume, r.seconds);
    write_totals(&mut out, &r.totals);
    let _ = writeln!(
        out,
        "  chunks   {} ({} unique, dedup ratio {:.2})",
        r.totals.chunks,
        r.unique_chunks,
        r.dedup_ratio()
    );
    let _ = writeln!(
        out,
        "  read     {} files, {} ({}/s)",
        r.files_read,
        HumanBytes(r.bytes_read),
        HumanBytes(rate as u64)
    );
    let _ = writeln!(
        out,
        "  changes  {} added, {} modified, {} deleted",
        r.added, r.modified, r.deleted
    );
    if r.skipped_special > 0 {
        let _ = writeln!(out, "  skipped  {} devices", r.skipped_special);
    }
    if r.deletes_held > 0 {
        let _ = writeln!(
            out,
            "  held     {} deletes held back from peers by the delete guard ({}); `shoal release {}` lets them go",
            r.deletes_held,
            r.deletes_held_sample.join(", "),
            r.volume
        );
    }
    let _ = writeln!(out, "  root     {}", r.root);
    out
}

fn write_totals(out: &mut String, t: &SubtreeTotals) {
    let _ = writeln!(
        out,
        "  files    {} ({}), dirs {}, symlinks {}",
        t.files,
        HumanBytes(t.bytes),
        t.dirs,
        t.symlinks
    );
}

#[derive(Serialize)]
struct VolumeStatus {
    name: String,
    root: Option<String>,
    /// Content and histories together, as `/status` shows it.
    histories_root: Option<String>,
    #[serde(flatten)]
    totals: SubtreeTotals,
    unique_chunks: Option<u64>,
    last_scan_unix: Option<i64>,
    /// The kept versions of the volume and the bytes of their chunks.
    versions_held: crate::gc::Held,
}

#[derive(Serialize)]
struct StoreStatus {
    node_id: String,
    state_dir: String,
    chunk_sizes: String,
    volumes: Vec<VolumeStatus>,
    last_collection: Option<crate::gc::Collection>,
}

pub fn status(settings: &Settings, json: bool) -> anyhow::Result<Outcome> {
    let store = Store::open(&settings.state_dir, OpenOptions::READ_ONLY)?;
    let mut volumes = Vec::new();
    for (name, record) in store.volumes()? {
        if !settings.volumes.is_empty() && !settings.volumes.contains(&name) {
            continue;
        }
        let root = store.tree_node(record.id, &VolPath::root())?;
        volumes.push(VolumeStatus {
            name,
            root: root.as_ref().map(|n| n.hash.to_hex()),
            histories_root: root.as_ref().map(|n| n.sync_hash().to_hex()),
            totals: root.map(|n| n.totals).unwrap_or_default(),
            unique_chunks: record.unique_chunks,
            last_scan_unix: record.last_scan_unix,
            versions_held: crate::gc::versions_held(&store, record.id)?,
        });
    }
    for name in &settings.volumes {
        if !volumes.iter().any(|v| &v.name == name) {
            anyhow::bail!(
                "volume {name} is not in the store at {} (run `shoal scan --volume {name}`)",
                settings.state_dir.display()
            );
        }
    }
    let meta = store.meta();
    let status = StoreStatus {
        node_id: meta.node_id.to_string(),
        state_dir: settings.state_dir.display().to_string(),
        chunk_sizes: meta.chunk_params.to_string(),
        volumes,
        last_collection: crate::gc::last_collection(&store)?,
    };
    if json {
        print(&format!("{}\n", serde_json::to_string_pretty(&status)?))?;
        return Ok(Outcome::Success);
    }
    let mut out = format!(
        "node {} (store {}, chunk sizes {})\n",
        status.node_id, status.state_dir, status.chunk_sizes
    );
    if status.volumes.is_empty() {
        out.push_str("no volumes indexed yet (run `shoal scan --volume NAME`)\n");
    }
    for v in &status.volumes {
        let _ = writeln!(out, "volume {}", v.name);
        let _ = writeln!(
            out,
            "  root     {}",
            v.root.as_deref().unwrap_or("(never scanned)")
        );
        if let Some(histories) = &v.histories_root {
            let _ = writeln!(out, "  histories {histories}");
        }
        write_totals(&mut out, &v.totals);
        let last = v.last_scan_unix.map_or("never".to_string(), |secs| {
            humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64))
                .to_string()
        });
        let _ = writeln!(out, "  scanned  {last}");
        let _ = writeln!(out, "  versions {}", held_line(&v.versions_held));
    }
    let _ = writeln!(out, "{}", collection_line(status.last_collection.as_ref()));
    print(&out)?;
    Ok(Outcome::Success)
}

/// "12 kept, 3.40 MiB in their chunks" for `shoal status`.
pub fn held_line(held: &crate::gc::Held) -> String {
    format!(
        "{} kept, {} in their chunks",
        held.versions,
        indicatif::HumanBytes(held.bytes)
    )
}

/// The last collection, for `shoal status`.
pub fn collection_line(last: Option<&crate::gc::Collection>) -> String {
    match last {
        None => "last collection: never".to_string(),
        Some(c) => format!(
            "last collection: {} ({} versions dropped, {} reclaimed)",
            humantime::format_rfc3339_seconds(
                UNIX_EPOCH + Duration::from_secs(c.finished_unix.max(0) as u64)
            ),
            c.versions_dropped,
            indicatif::HumanBytes(c.bytes_reclaimed)
        ),
    }
}

pub fn gc(
    settings: &Settings,
    retention: &crate::retention::Retention,
    json: bool,
) -> anyhow::Result<Outcome> {
    let store = Store::open(&settings.state_dir, OpenOptions::default())?;
    let mut volumes = Vec::new();
    for (name, record) in store.volumes()? {
        if !settings.volumes.is_empty() && !settings.volumes.contains(&name) {
            continue;
        }
        volumes.push(crate::gc::VolumeToCollect {
            policy: retention.policy(&name),
            fs_bytes: crate::space::total(&settings.volume_dir(&name)).unwrap_or(0),
            name,
            id: record.id,
        });
    }
    let mut held = Vec::new();
    let collection = crate::gc::collect(
        &store,
        &volumes,
        crate::gc::now_ns(),
        &mut |name, h| held.push((name.to_string(), h)),
        &mut || {},
        &mut crate::gc::crash_from_env(),
    )?;
    if json {
        #[derive(Serialize)]
        struct Done<'a> {
            collection: &'a crate::gc::Collection,
            versions_held: std::collections::BTreeMap<String, crate::gc::Held>,
        }
        let done = Done {
            collection: &collection,
            versions_held: held.into_iter().collect(),
        };
        print(&format!("{}\n", serde_json::to_string_pretty(&done)?))?;
        return Ok(Outcome::Success);
    }
    let mut out = String::new();
    for (name, h) in &held {
        let _ = writeln!(out, "volume {name}: versions {}", held_line(h));
    }
    let _ = writeln!(
        out,
        "collected: {} versions dropped, {} packs rewritten, {} removed, {} chunks ({}) reclaimed",
        collection.versions_dropped,
        collection.packs_rewritten,
        collection.packs_removed,
        collection.chunks_reclaimed,
        indicatif::HumanBytes(collection.bytes_reclaimed)
    );
    if collection.packs_damaged > 0 {
        let _ = writeln!(
            out,
            "{} packs left as they are: a chunk to keep is damaged (run `shoal repair`)",
            collection.packs_damaged
        );
    }
    print(&out)?;
    Ok(Outcome::Success)
}

pub fn verify(settings: &Settings, sample: Option<f64>, json: bool) -> anyhow::Result<Outcome> {
    if let Some(p) = sample
        && !(p > 0.0 && p <= 100.0)
    {
        anyhow::bail!("--sample takes a percentage greater than 0 and at most 100, not {p}");
    }
    if Store::index_missing(&settings.state_dir) {
        let report = crate::verify::VerifyReport {
            findings: vec![crate::verify::Finding {
                severity: Severity::Damage,
                problem: crate::verify::Problem::IndexMissing,
                volume: None,
                path: Some(settings.state_dir.join("index").display().to_string()),
                range: None,
                detail:
                    "the store has packs but no RocksDB index (run `shoal repair --rebuild-index`)"
                        .into(),
                file: None,
            }],
            ..Default::default()
        };
        print_verify(&report, json)?;
        return Ok(Outcome::ProblemsFound);
    }
    let store = Store::open(&settings.state_dir, OpenOptions::READ_ONLY)?;
    if Store::in_use(&settings.state_dir) {
        eprintln!(
            "shoal: the store at {} is locked by a running shoal (serve, scan or repair); verifying read-only beside it: files it changes meanwhile may be reported as modified",
            settings.state_dir.display()
        );
    }
    let names: Vec<String> = if settings.volumes.is_empty() {
        store.volumes()?.into_iter().map(|(name, _)| name).collect()
    } else {
        settings.volumes.clone()
    };
    let volumes: Vec<_> = names
        .iter()
        .map(|n| (n.clone(), settings.volume_dir(n)))
        .collect();
    let progress = progress_bar(json, "").inspect(|bar| {
        // What there is to hash: the indexed bytes of the volumes (sampled) and the packs.
        let mut total = 0u64;
        for name in &names {
            if let Ok(Some(record)) = store.volume(name)
                && let Ok(Some(node)) = store.tree_node(record.id, &VolPath::root())
            {
                total += node.totals.bytes;
            }
        }
        total = (total as f64 * sample.unwrap_or(100.0) / 100.0) as u64;
        for entry in std::fs::read_dir(store.packs_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            total += entry.metadata().map_or(0, |m| m.len());
        }
        bar.set_length(total);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} verifying [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, ETA {eta})",
            )
            .expect("templates are fixed strings")
            .progress_chars("=> "),
        );
    });
    let options = crate::verify::VerifyOptions {
        sample: sample.map(|p| p / 100.0),
        progress: progress.clone(),
    };
    let report = verify_store(&store, &volumes, &options).context("verify could not finish")?;
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    print_verify(&report, json)?;
    Ok(if report.damaged() {
        Outcome::ProblemsFound
    } else {
        Outcome::Success
    })
}

/// One line per finding (`DAMAGED vol:path: detail (problem)`), then a summary.
fn human_findings(findings: &[crate::verify::Finding]) -> String {
    let mut out = String::new();
    for f in findings {
        let label = match f.severity {
            Severity::Damage => "DAMAGED",
            Severity::Warning => "warning",
        };
        let place = match (&f.volume, &f.path) {
            (Some(v), Some(p)) => format!("{v}:{p}"),
            (None, Some(p)) => p.clone(),
            (Some(v), None) => v.clone(),
            (None, None) => "store".to_string(),
        };
        let _ = writeln!(out, "{label} {place}: {} ({})", f.detail, f.problem);
    }
    out
}

fn print_verify(report: &crate::verify::VerifyReport, json: bool) -> anyhow::Result<()> {
    if json {
        return print(&format!("{}\n", serde_json::to_string_pretty(report)?));
    }
    let mut out = human_findings(&report.findings);
    let damaged = report
        .findings
        .iter()
        .filter(|f| f.severity == Severity::Damage)
        .count();
    let sampled = report
        .sample_percent
        .map_or(String::new(), |p| format!(" (a {p}% sample)"));
    let _ = writeln!(
        out,
        "verified {} files{sampled} and {} packs ({}) in {:.2} s: {}",
        report.files_checked,
        report.packs_checked,
        HumanBytes(report.bytes_hashed),
        report.seconds,
        if damaged == 0 {
            "no damage".to_string()
        } else {
            format!("{damaged} problems")
        }
    );
    print(&out)
}

/// `shoal repair`'s flags beside the locations.
pub struct RepairFlags {
    /// How peers are found, as for serve (`None`: static).
    pub mode: Option<String>,
    pub docker_socket: Option<String>,
    pub service: Option<String>,
    /// The port peers listen on (discovered peers are reached on it).
    pub port: u16,
    pub peers: Vec<String>,
    pub credentials: std::path::PathBuf,
    pub node_name: Option<String>,
    pub dry_run: bool,
    pub rebuild_index: bool,
    pub json: bool,
}

/// `MODE` as given; unset or empty is `static`.
fn parse_mode(text: Option<&str>) -> anyhow::Result<crate::discovery::Mode> {
    Ok(match text.map(str::trim) {
        None | Some("") => crate::discovery::Mode::Static,
        Some(text) => text.parse()?,
    })
}

/// The peers `mode` finds now (repair runs once; it does not follow them).
fn discover_once(
    mode: crate::discovery::Mode,
    (socket, service): (Option<String>, Option<String>),
    port: u16,
) -> anyhow::Result<Vec<std::net::SocketAddr>> {
    let socket = socket.unwrap_or_else(|| crate::discovery::DEFAULT_DOCKER_SOCKET.to_string());
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async {
        let discovery = crate::discovery::Discovery::new(
            mode,
            Default::default(),
            (&socket, service.as_deref()),
            port,
            Duration::from_secs(1),
        )
        .await?;
        let peers = discovery
            .look()
            .await
            .map_err(|e| anyhow::anyhow!("peer discovery ({mode}) failed: {e}"))?;
        tracing::info!(
            ?peers,
            "repair: peers found through {}",
            discovery.describe()
        );
        Ok(peers.into_iter().collect())
    })
}

pub fn repair(settings: &Settings, flags: RepairFlags) -> anyhow::Result<Outcome> {
    use std::net::ToSocketAddrs;
    if settings.volumes.is_empty() {
        return Err(ConfigError::NoVolumes.into());
    }
    let mut peers = Vec::new();
    for target in flags.peers.iter().flat_map(|p| p.split(',')).map(str::trim) {
        if target.is_empty() {
            continue;
        }
        let addr = target
            .to_socket_addrs()
            .ok()
            .and_then(|mut addrs| addrs.next())
            .with_context(|| format!("cannot resolve peer {target:?} (expected HOST:PORT)"))?;
        peers.push(addr);
    }
    let mode = parse_mode(flags.mode.as_deref())?;
    if mode != crate::discovery::Mode::Static {
        peers = discover_once(mode, (flags.docker_socket, flags.service), flags.port)?;
    }
    let options = crate::repair::RepairOptions {
        dry_run: flags.dry_run,
        rebuild_index: flags.rebuild_index,
        peers,
        credentials: flags.credentials,
        node_name: flags.node_name,
    };
    let report = crate::repair::repair(settings, &options)?;
    if flags.json {
        print(&format!("{}\n", serde_json::to_string_pretty(&report)?))?;
    } else {
        let mut out = String::new();
        if report.index_rebuilt {
            out.push_str("index rebuilt from the packs and live files\n");
        }
        for a in report
            .actions
            .iter()
            .chain(&report.unrepaired)
            .chain(&report.incomplete_versions)
        {
            let place = match (&a.volume, &a.path) {
                (Some(v), Some(p)) => format!("{v}:{p}"),
                (None, Some(p)) => p.clone(),
                (Some(v), None) => v.clone(),
                (None, None) => "store".to_string(),
            };
            let label = match a.action {
                "unrepaired" => "UNREPAIRED",
                "version-incomplete" => "INCOMPLETE",
                action => action,
            };
            let _ = writeln!(out, "{label} {place}: {}", a.detail);
        }
        let incomplete = match report.incomplete_versions.len() {
            0 => String::new(),
            n => format!(", {n} kept versions lack chunks"),
        };
        let _ = writeln!(
            out,
            "{} actions{}, {} problems left{incomplete}{}",
            report.actions.len(),
            if report.dry_run { " planned" } else { "" },
            report.unrepaired.len(),
            if report.rescanned {
                "; volumes rescanned"
            } else if report.dry_run {
                ""
            } else {
                "; volumes not rescanned (damage left must not be indexed as an edit)"
            }
        );
        print(&out)?;
    }
    Ok(if report.complete() {
        Outcome::Success
    } else {
        Outcome::ProblemsFound
    })
}

/// The settings of `serve` that come from flags, environment or the config file.
pub struct ServeFlags {
    pub mode: Option<String>,
    pub peers: Vec<String>,
    pub docker_socket: Option<String>,
    pub require_mounts: bool,
    pub heartbeat: u64,
    pub debounce_ms: u64,
    pub feed_retention: u64,
    pub gso: bool,
    pub node_name: Option<String>,
    pub signer: Option<String>,
    pub access: crate::access::Access,
    pub service: Option<String>,
    /// The metrics-only HTTP address.
    pub metrics: Option<String>,
    /// `--max-rate` as given.
    pub max_rate: Option<String>,
    /// `--max-rate-peer` rules as given.
    pub max_rate_peer: Vec<String>,
    /// Each volume's retention policy.
    pub retention: crate::retention::Retention,
    /// `--gc-interval` in seconds.
    pub gc_interval: u64,
}

pub fn serve(
    settings: Settings,
    listen: std::net::SocketAddr,
    flags: ServeFlags,
    credentials: std::path::PathBuf,
    http: &str,
    tombstone_days: u64,
) -> anyhow::Result<Outcome> {
    let ServeFlags {
        mode,
        peers,
        docker_socket,
        require_mounts,
        heartbeat,
        debounce_ms,
        feed_retention,
        gso,
        node_name,
        signer,
        access,
        service,
        metrics,
        max_rate,
        max_rate_peer,
        retention,
        gc_interval,
    } = flags;
    let max_rate_peer = crate::rate::PeerRates::parse(&max_rate_peer)
        .map_err(|e| anyhow::anyhow!("--max-rate-peer (SHOAL_MAX_RATE_PEER): {e}"))?;
    let max_rate = max_rate
        .as_deref()
        .map(crate::rate::parse_rate)
        .transpose()
        .map_err(|e| anyhow::anyhow!("--max-rate (SHOAL_MAX_RATE): {e}"))?
        .unwrap_or(0);
    let mode = parse_mode(mode.as_deref())?;
    if mode != crate::discovery::Mode::Static && !peers.is_empty() {
        tracing::warn!("MODE={mode} finds its peers itself: ignoring the --peer list");
    }
    let http = match http {
        "off" | "" => None,
        addr => Some(
            addr.parse()
                .with_context(|| format!("--http {addr:?} is not ADDR:PORT or \"off\""))?,
        ),
    };
    let metrics = match metrics.as_deref() {
        None | Some("off" | "") => None,
        Some(addr) => Some(
            addr.parse()
                .with_context(|| format!("--metrics {addr:?} is not ADDR:PORT or \"off\""))?,
        ),
    };
    if heartbeat == 0 {
        anyhow::bail!("--heartbeat (HEARTBEAT) must be at least 1 second");
    }
    let peers = peers
        .iter()
        .flat_map(|p| p.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect();
    let options = crate::serve::ServeOptions {
        settings,
        listen,
        peers,
        mode,
        docker_socket: docker_socket
            .unwrap_or_else(|| crate::discovery::DEFAULT_DOCKER_SOCKET.to_string()),
        service,
        require_mounts,
        gso,
        credentials,
        node_name,
        signer,
        access,
        http,
        metrics,
        heartbeat: Duration::from_secs(heartbeat),
        debounce: Duration::from_millis(debounce_ms),
        feed_retention,
        tombstone_retention: Duration::from_secs(tombstone_days.saturating_mul(86_400)),
        max_rate,
        max_rate_peer,
        retention,
        gc_interval: Duration::from_secs(gc_interval.max(1)),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(crate::serve::BLOCKING_THREADS)
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(crate::serve::run(options, shutdown_signal()))?;
    Ok(Outcome::Success)
}

/// Resolves on SIGINT or SIGTERM (what `docker stop` sends).
async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::warn!("cannot watch SIGTERM: {e}");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

pub fn cluster_init(out: &std::path::Path) -> anyhow::Result<Outcome> {
    let files = crate::credentials::init_cluster(out)?;
    let mut text = String::from("created cluster credentials:\n");
    for file in files {
        let _ = writeln!(text, "  {}", file.display());
    }
    text.push_str(
        "every node needs ca.pem and its own key and certificate: run `shoal signer --ca DIR`\nwhere the CA key may be, and give nodes ca.pem and join-token (they enroll with\n--signer HOST:PORT); or issue them offline with `shoal cluster add-node NAME --ca DIR\n--out NODE_DIR`; or give nodes ca-key.pem too and each signs its own (then every node\nholds the CA key).\n",
    );
    print(&text)?;
    Ok(Outcome::Success)
}

pub fn cluster_add_node(
    ca: &std::path::Path,
    name: &str,
    out: &std::path::Path,
    days: i64,
) -> anyhow::Result<Outcome> {
    if days < 1 {
        anyhow::bail!("--days must be at least 1");
    }
    let proven = crate::credentials::add_node(ca, name, out, days)?;
    print(&format!(
        "issued node {} (id {}) its credentials in {}: ca.pem, cert.pem, key.pem\n",
        proven.name,
        proven.node_id,
        out.display()
    ))?;
    Ok(Outcome::Success)
}

pub fn cluster_revoke(
    ca: &std::path::Path,
    state: &std::path::Path,
    node: &str,
) -> anyhow::Result<Outcome> {
    let (list, path) = crate::revocation::revoke(ca, state, node)?;
    print(&format!(
        "revoked {node}: {} (serial {}, {} ids, {} names); a signer using this directory hands it to its members within a heartbeat; without one, copy it into any member's credentials directory as {}: members pass it on to each other\n",
        path.display(),
        list.serial,
        list.ids.len(),
        list.names.len(),
        crate::revocation::REVOCATIONS_FILE,
    ))?;
    Ok(Outcome::Success)
}

pub fn cluster_rotate_token(
    ca: &std::path::Path,
    state: &std::path::Path,
) -> anyhow::Result<Outcome> {
    let token = crate::credentials::rotate_token(ca, state)?;
    print(&format!(
        "new join token in {}: the signer takes only it for new nodes from now on (members are not affected); give it to nodes that are still to join\n",
        token.display()
    ))?;
    Ok(Outcome::Success)
}

pub fn signer(options: crate::enroll::signer::SignerOptions) -> anyhow::Result<Outcome> {
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(crate::enroll::signer::run(options, shutdown_signal()))?;
    Ok(Outcome::Success)
}

/// `GET /healthz` on the daemon: healthy (exit 0) only on a 200 within 5 s.
/// With `ready`, `GET /readyz` instead: ready (exit 0), or degraded (exit 1, the causes
/// printed).
pub fn health(addr: &str, ready: bool) -> anyhow::Result<Outcome> {
    use std::io::{Read, Write};
    let path = if ready { "/readyz" } else { "/healthz" };
    let check = || -> anyhow::Result<(String, String)> {
        let addr: std::net::SocketAddr = addr
            .parse()
            .with_context(|| format!("--http {addr:?} is not ADDR:PORT"))?;
        let timeout = Duration::from_secs(5);
        let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)
            .with_context(|| format!("no shoal serve answering on {addr}"))?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut raw = Vec::new();
        stream.take(64 * 1024).read_to_end(&mut raw)?;
        let text = String::from_utf8_lossy(&raw);
        let status = text.lines().next().unwrap_or_default().to_string();
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        Ok((status, body.to_string()))
    };
    match check() {
        Ok((status, _)) if status.split(' ').nth(1) == Some("200") => {
            print(if ready { "ready\n" } else { "healthy\n" })?;
            Ok(Outcome::Success)
        }
        Ok((_, body)) if ready && !body.is_empty() => {
            eprint!("{body}");
            Ok(Outcome::ProblemsFound)
        }
        Ok((status, _)) => {
            eprintln!("unhealthy: {addr}{path} answered {status:?}");
            Ok(Outcome::ProblemsFound)
        }
        Err(e) => {
            eprintln!("unhealthy: {e:#}");
            Ok(Outcome::ProblemsFound)
        }
    }
}
