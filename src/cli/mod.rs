//! The `shoal` command line: argument definitions, logging setup, and the exit code
//! contract (0 success, 1 problems found, 2 could not run).
//!
//! Parsing has no side effects; [`Settings::resolve`] turns the parsed flags plus the
//! optional config file into settings; each command in [`commands`] then opens what it
//! needs. Errors from the library are typed; they become one clear sentence here.

mod commands;
mod conflicts;
mod status;
mod versions;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config::{FileConfig, Settings};

#[derive(Parser, Debug)]
#[command(
    name = "shoal",
    version,
    about = "Master-to-master mirroring of Docker volumes",
    propagate_version = true
)]
pub struct Cli {
    /// TOML file with defaults for any setting (keys are the long flag names).
    #[arg(long, global = true, env = "SHOAL_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,

    /// Log filter, e.g. `info` or `shoal=debug`.
    #[arg(
        long,
        global = true,
        env = "SHOAL_LOG",
        value_name = "FILTER",
        default_value = "warn"
    )]
    log: String,

    /// Log lines as text, or as JSON objects (one a line: timestamp, level, message and
    /// fields), for a log collector.
    #[arg(
        long,
        global = true,
        env = "SHOAL_LOG_FORMAT",
        value_name = "FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Index volumes: chunk and hash new and changed files, update the Merkle tree.
    Scan(ScanArgs),
    /// Show the node's health, each volume and each peer's sync state (from the running
    /// daemon; without one, each volume's root hash and counts from the store).
    Status(StatusArgs),
    /// Re-hash live files and packs against the index; exit 1 if anything is damaged.
    Verify(VerifyArgs),
    /// Run the daemon: mirror the volumes with peers over QUIC (mutual TLS).
    Serve(Box<ServeArgs>),
    /// With the daemon stopped: restore what `verify` finds damaged, from local copies
    /// or peers; exit 1 if some damage could not be repaired.
    Repair(RepairArgs),
    /// With the daemon stopped: drop the kept versions each volume's retention policy no
    /// longer keeps and reclaim the pack space of chunks nothing references (`serve`
    /// does this itself every --gc-interval).
    Gc(GcArgs),
    /// Ask a running daemon whether it is healthy (its HTTP /healthz): exit 0 if so, 1
    /// if not (the image's HEALTHCHECK).
    Health(HealthArgs),
    /// Pause a volume (or, without one, every volume): the running daemon stops pulling
    /// it, serving it to peers and announcing its changes, until `shoal resume`, across
    /// restarts. Local changes are still indexed and go out on resume.
    Pause(ControlArgs),
    /// Resume what `shoal pause` paused: the volume (or, without one, the node-wide
    /// pause) syncs again, starting with what changed meanwhile.
    Resume(ControlArgs),
    /// Let the deletes the delete guard holds back in a volume go to peers (check the
    /// volume first: on every node, the names are then deleted).
    Release(ReleaseArgs),
    /// Change a setting of the running daemon, through its control socket.
    #[command(subcommand)]
    Set(SetCommand),
    /// List the conflict copies of a volume (or of every volume) with the name each lost
    /// and both versions' nodes, times and sizes; `shoal conflicts resolve` settles one.
    Conflicts(ConflictsArgs),
    /// List the kept versions of a file or directory: what changes from peers replaced
    /// or deleted on this node (when, by which node, where the content is held).
    Versions(VersionsArgs),
    /// Put a file, a directory or a whole volume back as it was: the newest kept
    /// version of a file, one version (--version), or what was there at a time (--at).
    /// In place it is an ordinary change that syncs to every node; --to writes the
    /// files elsewhere and syncs nothing. Chunks this node lacks come from its peers.
    Restore(RestoreArgs),
    /// Cluster credentials.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Run the signer: the one holder of the CA key, issuing nodes that show the join
    /// token (or their current certificate) short-lived certificates for the keys they
    /// made.
    Signer(SignerArgs),
}

#[derive(Args, Debug)]
struct SignerArgs {
    /// Directory with the cluster CA (ca.pem, ca-key.pem, join-token.blake3); the
    /// signer keeps its records in it (nodes/) and reads revocations.txt from it.
    #[arg(long, env = "SHOAL_CA", value_name = "DIR")]
    ca: PathBuf,

    /// Writable directory for the signer's records (nodes/), the revocation list and the
    /// join token's hash [default: --ca]; for a CA read from secrets.
    #[arg(long, env = "SHOAL_SIGNER_STATE", value_name = "DIR")]
    state: Option<PathBuf>,

    /// Address to accept enrolling nodes on (UDP, QUIC, ALPN shoal-enroll/1).
    #[arg(
        long,
        env = "SHOAL_SIGNER_LISTEN",
        value_name = "ADDR:PORT",
        default_value = "0.0.0.0:7031"
    )]
    listen: std::net::SocketAddr,

    /// How long the certificates it issues are valid (nodes renew at 2/3 of it), e.g.
    /// `24h`, `3days`.
    #[arg(
        long,
        env = "SHOAL_CERT_LIFETIME",
        value_name = "DURATION",
        default_value = "24h"
    )]
    lifetime: humantime::Duration,

    /// Turn off UDP segmentation offload (GSO) for QUIC.
    #[arg(long, env = "SHOAL_NO_GSO", value_parser = clap::builder::BoolishValueParser::new())]
    no_gso: bool,
}

#[derive(Subcommand, Debug)]
enum ClusterCommand {
    /// Create a cluster CA: ca.pem (every node's) and ca-key.pem (it signs node
    /// certificates: keep it where only the signing happens).
    Init {
        /// Directory to write the credentials to (created; existing files are kept).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Issue one node its own key and certificate, offline: ca.pem, cert.pem, key.pem
    /// in --out (that node's --credentials), a copy of the certificate in CA/nodes/.
    AddNode {
        /// The node's name (its certificate's common name).
        name: String,
        /// Directory with the cluster CA (ca.pem, ca-key.pem).
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// Directory to write the node's credentials to (created; existing files are kept).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Days the certificate is valid.
        #[arg(long, value_name = "DAYS", default_value_t = crate::credentials::DEFAULT_NODE_DAYS)]
        days: i64,
    },
    /// Replace the join token (CA/join-token and its hash): the signer takes only the
    /// new one for new nodes from now on; members stay connected and renew with their
    /// certificates.
    RotateToken {
        /// Directory with the cluster CA (ca.pem, ca-key.pem).
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// The signer's --state, if it has one [default: --ca].
        #[arg(long, value_name = "DIR")]
        state: Option<PathBuf>,
    },
    /// Revoke a node: add it to the CA-signed revocation list CA/revocations.txt. A
    /// signer on this directory hands it to enrolled members; otherwise copy it into a
    /// member's credentials directory. Members pass it on and drop the node.
    Revoke {
        /// The node's name, or its 16-hex-digit node id (`shoal status` shows both).
        node: String,
        /// Directory with the cluster CA (ca.pem, ca-key.pem).
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// The signer's --state, if it has one [default: --ca].
        #[arg(long, value_name = "DIR")]
        state: Option<PathBuf>,
    },
}

#[derive(Args, Debug)]
struct ServeArgs {
    #[command(flatten)]
    locations: Locations,

    #[command(flatten)]
    remote: RemoteArgs,

    #[command(flatten)]
    retention: RetentionArgs,

    /// Local address for /healthz, /metrics and /status ("off" to disable).
    #[arg(
        long,
        env = "SHOAL_HTTP",
        value_name = "ADDR:PORT",
        default_value = "127.0.0.1:7030"
    )]
    http: String,

    /// Address that serves only /metrics, /readyz and /healthz, for a Prometheus on
    /// another host or container (e.g. 0.0.0.0:9030 on a stack's network), while
    /// /status stays on the local --http [default: none].
    #[arg(long, env = "SHOAL_METRICS", value_name = "ADDR:PORT")]
    metrics: Option<String>,

    /// Refuse to start if a volume's directory is not a mount point (set in the image:
    /// data written into the container itself would be lost with it).
    #[arg(long, env = "SHOAL_REQUIRE_MOUNTS", value_parser = clap::builder::BoolishValueParser::new())]
    require_mounts: bool,

    /// Turn off UDP segmentation offload (GSO) for QUIC: for container networks where
    /// it breaks sends (s2n-quic issue 2485).
    #[arg(long, env = "SHOAL_NO_GSO", value_parser = clap::builder::BoolishValueParser::new())]
    no_gso: bool,

    /// The signer to enroll with (and renew at), for credentials with a join token
    /// (ca.pem and join-token, no cert.pem or ca-key.pem).
    #[arg(long, env = "SHOAL_SIGNER", value_name = "HOST:PORT")]
    signer: Option<String>,

    /// Seconds between anti-entropy rounds (rescan, compare roots with every peer) and
    /// peer re-discovery [default: 25].
    #[arg(long, env = "HEARTBEAT", value_name = "SECONDS")]
    heartbeat: Option<u64>,

    /// Changes of each volume kept in this node's change feed, which peers follow
    /// instead of walking the tree; a peer further behind walks it.
    #[arg(
        long,
        env = "SHOAL_FEED_RETENTION",
        value_name = "CHANGES",
        default_value_t = crate::store::DEFAULT_FEED_RETENTION
    )]
    feed_retention: u64,

    /// Milliseconds a changed name must be quiet before it is scanned and announced.
    #[arg(
        long,
        env = "SHOAL_DEBOUNCE_MS",
        value_name = "MS",
        default_value_t = crate::watcher::DEFAULT_DEBOUNCE.as_millis() as u64
    )]
    debounce_ms: u64,

    /// Chunk sizes MIN/AVG/MAX for a new store.
    #[arg(long, env = "SHOAL_CHUNK_SIZES", value_name = "MIN/AVG/MAX")]
    chunk_sizes: Option<String>,

    /// Which nodes may hold a volume: VOLUME=NODE,NODE (names or node ids; repeatable;
    /// SHOAL_ACCESS takes a space-separated list). A volume without a rule: every node.
    #[arg(
        long,
        env = "SHOAL_ACCESS",
        value_name = "VOLUME=NODES",
        value_delimiter = ' '
    )]
    access: Vec<String>,

    /// Bandwidth limit for chunk bytes, each way (sent, received), in bytes per second:
    /// 500K, 10M, 20MiB (powers of 1024); 0 or off: none. Tree comparisons are not
    /// limited. Changed while running with `shoal set max-rate`.
    #[arg(long, env = "SHOAL_MAX_RATE", value_name = "RATE")]
    max_rate: Option<String>,

    /// Bandwidth limit for chunk bytes to and from each peer, each way: RATE for every
    /// peer, NODE=RATE for one (its name or node id; that rule wins); repeatable,
    /// SHOAL_MAX_RATE_PEER takes a space-separated list. Applies besides --max-rate.
    /// Changed while running with `shoal set max-rate --per-peer` or `--peer NODE`.
    #[arg(
        long,
        env = "SHOAL_MAX_RATE_PEER",
        value_name = "[NODE=]RATE",
        value_delimiter = ' '
    )]
    max_rate_peer: Vec<String>,

    /// Seconds between two collections of kept versions and packs (the first runs at
    /// start).
    #[arg(
        long,
        env = "SHOAL_GC_INTERVAL",
        value_name = "SECONDS",
        default_value_t = 600
    )]
    gc_interval: u64,

    /// Days a delete is remembered (a node offline for longer could bring the file back).
    #[arg(
        long,
        env = "SHOAL_TOMBSTONE_DAYS",
        value_name = "DAYS",
        default_value_t = 30
    )]
    tombstone_days: u64,
}

/// Which peers to talk to, and with what credentials (`serve` mirrors with them, `repair`
/// fetches from them what no local copy holds).
#[derive(Args, Debug)]
struct RemoteArgs {
    /// Address serve accepts peers on (UDP, QUIC); discovered peers (MODE=docker or
    /// swarm) are expected on its port.
    #[arg(
        long,
        env = "SHOAL_LISTEN",
        value_name = "ADDR:PORT",
        default_value = "0.0.0.0:7029"
    )]
    listen: std::net::SocketAddr,

    /// A peer (repeatable); SHOAL_PEERS takes a space- or comma-separated list.
    #[arg(
        long = "peer",
        env = "SHOAL_PEERS",
        value_name = "HOST:PORT",
        value_delimiter = ' '
    )]
    peers: Vec<String>,

    /// Directory with the cluster credentials (ca.pem, cert.pem, key.pem).
    #[arg(
        long,
        env = "SHOAL_CREDENTIALS",
        value_name = "DIR",
        default_value = "/run/secrets"
    )]
    credentials: PathBuf,

    /// This node's name in the certificate it signs itself (when the credentials hold
    /// ca-key.pem rather than its own cert.pem) [default: the host name].
    #[arg(long, env = "SHOAL_NODE_NAME", value_name = "NAME")]
    node_name: Option<String>,

    /// How peers are found: `static` (the --peer list), `docker` (running containers
    /// with the same `shoal.cluster` label on this container's networks) or `swarm` (the
    /// other tasks of this container's service) [default: static].
    #[arg(long, env = "MODE", value_name = "MODE")]
    mode: Option<String>,

    /// The Docker API socket, for MODE=docker (mount it read-only); optional for
    /// MODE=swarm with --service [default: /var/run/docker.sock].
    #[arg(long, env = "SHOAL_DOCKER_SOCKET", value_name = "PATH")]
    docker_socket: Option<String>,

    /// MODE=swarm: this task's service, whose tasks are the peers (the stack sets it
    /// with `SHOAL_SERVICE: "{{.Service.Name}}"`); without it the service is read from
    /// the container's labels through the Docker socket.
    #[arg(long, env = "SHOAL_SERVICE", value_name = "NAME")]
    service: Option<String>,
}

/// How long kept versions stay (docs/OPERATIONS.md "Retention"). Each flag takes `VALUE`
/// for every volume or `VOLUME=VALUE` for one (that rule wins); repeatable, and its
/// environment variable takes a space-separated list.
#[derive(Args, Debug, Clone)]
struct RetentionArgs {
    /// Keep a replaced or deleted version for this long: 90s, 12h, 30d, 4w; 0 keeps
    /// none [default: 30d].
    #[arg(
        long,
        env = "SHOAL_KEEP_VERSIONS",
        value_name = "[VOLUME=]DURATION",
        value_delimiter = ' '
    )]
    keep_versions: Vec<String>,

    /// Staggered thinning, on or off: every version of the last hour, then the newest
    /// of each hour for a day, of each day for 30 days, of each week after [default: on].
    #[arg(
        long,
        env = "SHOAL_THIN_VERSIONS",
        value_name = "[VOLUME=]on|off",
        value_delimiter = ' '
    )]
    thin_versions: Vec<String>,

    /// Room kept versions may take: a size (50GiB) or a percent of the volume's file
    /// system (10%), the oldest dropped first beyond it; off: no limit [default: 10%].
    #[arg(
        long,
        env = "SHOAL_VERSIONS_BUDGET",
        value_name = "[VOLUME=]SIZE|PCT%",
        value_delimiter = ' '
    )]
    versions_budget: Vec<String>,
}

impl RetentionArgs {
    /// The rules, each list from the flags (or environment) if given, else from the file.
    fn resolve(self, file: &FileConfig) -> anyhow::Result<crate::retention::Retention> {
        let pick = |given: Vec<String>, from_file: &Option<Vec<String>>| match given
            .iter()
            .all(|g| g.trim().is_empty())
        {
            true => from_file.clone().unwrap_or_default(),
            false => given,
        };
        let rules = crate::retention::RetentionRules {
            keep_versions: pick(self.keep_versions, &file.keep_versions),
            thin_versions: pick(self.thin_versions, &file.thin_versions),
            versions_budget: pick(self.versions_budget, &file.versions_budget),
        };
        crate::retention::Retention::parse(&rules).map_err(anyhow::Error::msg)
    }
}

#[derive(Args, Debug)]
struct GcArgs {
    #[command(flatten)]
    locations: Locations,

    #[command(flatten)]
    retention: RetentionArgs,

    /// Print what was done as JSON.
    #[arg(long)]
    json: bool,
}

/// Where the volumes and the store are.
#[derive(Args, Debug, Clone)]
struct Locations {
    /// Directory holding one sub-directory per volume.
    #[arg(long, env = "SHOAL_DATA_ROOT", value_name = "DIR")]
    data_root: Option<PathBuf>,

    /// Directory of this node's store (index and packs) [default: /var/lib/shoal].
    #[arg(long, env = "SHOAL_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,

    /// A volume to work on (repeatable); SYNC_VOLUMES takes a space-separated list.
    #[arg(
        long = "volume",
        value_name = "NAME",
        env = "SYNC_VOLUMES",
        value_delimiter = ' '
    )]
    volumes: Vec<String>,

    /// A volume whose files received from peers keep their setuid/setgid bits
    /// (repeatable; SHOAL_KEEP_SETID takes a space-separated list). By default they
    /// are cleared on received files, as a stolen node key must not plant setuid
    /// binaries on every node.
    #[arg(
        long = "keep-setid",
        value_name = "NAME",
        env = "SHOAL_KEEP_SETID",
        value_delimiter = ' '
    )]
    keep_setid: Vec<String>,

    /// The delete guard: a scan that would delete more than a share of a volume at once
    /// holds those deletes back from peers until `shoal release VOLUME`. THRESHOLD is
    /// `PERCENT%/MIN` (held when more than PERCENT% of the volume's names and at least
    /// MIN names) or `off`; `VOLUME=THRESHOLD` sets one volume's (repeatable;
    /// SHOAL_DELETE_GUARD takes a space-separated list) [default: 50%/10].
    #[arg(
        long = "delete-guard",
        value_name = "[VOLUME=]THRESHOLD",
        env = "SHOAL_DELETE_GUARD",
        value_delimiter = ' '
    )]
    delete_guard: Vec<String>,
}

#[derive(Args, Debug)]
struct ScanArgs {
    #[command(flatten)]
    locations: Locations,

    /// Chunk sizes MIN/AVG/MAX for a new store (e.g. 16K/64K/256K); an existing store
    /// must have been created with the same.
    #[arg(long, env = "SHOAL_CHUNK_SIZES", value_name = "MIN/AVG/MAX")]
    chunk_sizes: Option<String>,

    /// Hashing threads [default: one per core].
    #[arg(long, value_name = "N", default_value_t = 0, hide_default_value = true)]
    threads: usize,

    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct StatusArgs {
    #[command(flatten)]
    locations: Locations,

    /// The running `shoal serve` to ask (its --http) [default: 127.0.0.1:7030, and the
    /// store is read if nothing answers there; "off": read the store].
    #[arg(long, env = "SHOAL_HTTP", value_name = "ADDR:PORT")]
    http: Option<String>,

    /// Print again every 2 s, with progress bars on a terminal (until interrupted).
    #[arg(long)]
    watch: bool,

    /// Print as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum SetCommand {
    /// The bandwidth limit for chunk bytes, each way, until changed again or the daemon
    /// restarts (then --max-rate and --max-rate-peer hold): 500K, 10M, 20MiB (powers of
    /// 1024); 0 or off: none. The node's limit; with --per-peer, each peer's; with
    /// --peer NODE, that peer's.
    MaxRate {
        rate: String,

        /// The limit for each peer that no --peer rule names.
        #[arg(long, conflicts_with = "peer")]
        per_peer: bool,

        /// The limit for this peer (its name or node id, as `shoal status` shows them).
        #[arg(long, value_name = "NODE")]
        peer: Option<String>,

        /// The daemon's state directory, where its control socket is [default:
        /// /var/lib/shoal].
        #[arg(long, env = "SHOAL_STATE_DIR", value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
}

#[derive(Args, Debug)]
struct VersionsArgs {
    /// VOLUME/PATH, or a path on disk inside a volume (VOLUME alone: the whole volume).
    path: PathBuf,

    /// Print as JSON.
    #[arg(long)]
    json: bool,

    #[command(flatten)]
    locations: Locations,
}

/// `--version` is the version to restore, not Shoal's own.
#[derive(Args, Debug)]
#[command(disable_version_flag = true)]
struct RestoreArgs {
    /// VOLUME/PATH, or a path on disk inside a volume (VOLUME alone: the whole volume).
    path: PathBuf,

    /// Put back what was there at this time: RFC 3339 in UTC (`2026-11-30T19:00:00Z`)
    /// or @SECONDS since the Unix epoch. Names added since are left alone.
    #[arg(long, value_name = "TIME", conflicts_with = "version_id")]
    at: Option<String>,

    /// Put back this version of a file (its id, as `shoal versions` prints it).
    #[arg(long = "version", id = "version_id", value_name = "ID")]
    version_id: Option<String>,

    /// Write the restored files under DIR (outside every volume) instead of in place;
    /// nothing syncs.
    #[arg(long, value_name = "DIR")]
    to: Option<PathBuf>,

    /// Print the report as JSON.
    #[arg(long)]
    json: bool,

    #[command(flatten)]
    locations: Locations,
}

/// `shoal conflicts`: asks the running daemon (its control socket).
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
struct ConflictsArgs {
    #[command(subcommand)]
    resolve: Option<ConflictsCommand>,

    /// The volume [default: every volume].
    volume: Option<String>,

    /// Print as JSON.
    #[arg(long)]
    json: bool,

    /// The daemon's state directory, where its control socket is [default:
    /// /var/lib/shoal].
    #[arg(long, env = "SHOAL_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum ConflictsCommand {
    /// Settle one conflict copy, as an ordinary change that syncs to every node.
    ///
    /// `mine`: keep the version under the original name (the copy is deleted);
    /// `theirs`: keep the copy's version (the one that lost the name; it replaces the
    /// original name); `both`: keep both as ordinary files (the copy loses its
    /// `sync-conflict-` mark).
    Resolve {
        /// The conflict copy: VOLUME/PATH as `shoal conflicts` prints it, or its path on
        /// disk.
        path: PathBuf,

        /// Which version to keep.
        #[arg(long, value_name = "WHICH", value_parser = ["mine", "theirs", "both"])]
        keep: String,

        /// The daemon's state directory, where its control socket is [default:
        /// /var/lib/shoal].
        #[arg(long, env = "SHOAL_STATE_DIR", value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
}

/// A command for the running daemon, through its control socket (root or the daemon's
/// user only).
#[derive(Args, Debug)]
struct ControlArgs {
    /// The volume [default: the whole node].
    volume: Option<String>,

    /// The daemon's state directory, where its control socket is [default:
    /// /var/lib/shoal].
    #[arg(long, env = "SHOAL_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct ReleaseArgs {
    /// The volume whose held deletes go.
    volume: String,

    /// The daemon's state directory, where its control socket is [default:
    /// /var/lib/shoal].
    #[arg(long, env = "SHOAL_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct HealthArgs {
    /// The daemon's HTTP address (its --http).
    #[arg(
        long,
        env = "SHOAL_HTTP",
        value_name = "ADDR:PORT",
        default_value = "127.0.0.1:7030"
    )]
    http: String,

    /// Ask whether it is ready (its /readyz) instead: exit 1 and print why if it is
    /// degraded (no peer reachable, failing rounds, a full disk).
    #[arg(long)]
    ready: bool,
}

#[derive(Args, Debug)]
struct VerifyArgs {
    #[command(flatten)]
    locations: Locations,

    /// Re-hash a random PERCENT of the files (and check as many index records) instead
    /// of all; packs are always read whole.
    #[arg(long, value_name = "PERCENT")]
    sample: Option<f64>,

    /// Print findings as JSON (no progress bar).
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct RepairArgs {
    #[command(flatten)]
    locations: Locations,

    #[command(flatten)]
    remote: RemoteArgs,

    /// List what would change, change nothing (reads the store; safe beside serve).
    #[arg(long)]
    dry_run: bool,

    /// Set the RocksDB index aside and rebuild it from the packs and live files (for a
    /// lost or corrupt index; the node gets a new node id).
    #[arg(long)]
    rebuild_index: bool,

    /// Chunk sizes MIN/AVG/MAX of the cluster, for --rebuild-index [default: the
    /// defaults].
    #[arg(long, env = "SHOAL_CHUNK_SIZES", value_name = "MIN/AVG/MAX")]
    chunk_sizes: Option<String>,

    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// How a command ended, beyond success.
pub enum Outcome {
    Success,
    /// The command ran and found problems (damage, unreadable files).
    ProblemsFound,
}

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    // The daemon reports what it does; one-shot commands only what goes wrong.
    let daemon = matches!(cli.command, Command::Serve(_) | Command::Signer(_));
    let default_level = if daemon && cli.log == "warn" {
        "info"
    } else {
        cli.log.as_str()
    };
    init_logging(default_level, daemon, cli.log_format);
    match run(cli) {
        Ok(Outcome::Success) => ExitCode::SUCCESS,
        Ok(Outcome::ProblemsFound) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::from(2)
        }
    }
}

/// An error and its causes on one line, each said once: many errors print their
/// source in their own message already ("PATH: Permission denied"), and `{:#}` would
/// add it again.
fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

fn init_logging(filter: &str, timestamps: bool, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|e| {
        eprintln!("warning: ignoring log filter {filter:?}: {e}");
        tracing_subscriber::EnvFilter::new("warn")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match (format, timestamps) {
        // A collector wants every field as JSON and the time of every line.
        (LogFormat::Json, _) => builder.json().flatten_event(true).init(),
        (LogFormat::Text, true) => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        (LogFormat::Text, false) => builder
            .with_ansi(std::io::stderr().is_terminal())
            .without_time()
            .init(),
    }
}

fn file_config(config: Option<&PathBuf>) -> anyhow::Result<FileConfig> {
    Ok(match config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    })
}

fn settings(
    config: Option<PathBuf>,
    locations: Locations,
    chunk_sizes: Option<String>,
) -> anyhow::Result<Settings> {
    let file = file_config(config.as_ref())?;
    let mut settings = Settings::resolve(
        file,
        locations.data_root,
        locations.state_dir,
        locations.volumes,
        chunk_sizes,
    )?;
    let keep_setid: Vec<String> = locations
        .keep_setid
        .into_iter()
        .filter(|v| !v.trim().is_empty())
        .collect();
    if !keep_setid.is_empty() {
        for name in &keep_setid {
            crate::config::validate_volume_name(name)?;
        }
        settings.keep_setid = keep_setid;
    }
    let delete_guard: Vec<String> = locations
        .delete_guard
        .into_iter()
        .filter(|v| !v.trim().is_empty())
        .collect();
    if !delete_guard.is_empty() {
        settings.delete_guard = crate::guard::Rules::parse(&delete_guard)
            .map_err(crate::config::ConfigError::DeleteGuard)?;
    }
    Ok(settings)
}

fn run(cli: Cli) -> anyhow::Result<Outcome> {
    match cli.command {
        Command::Scan(args) => {
            let settings = settings(cli.config, args.locations, args.chunk_sizes)?;
            commands::scan(&settings, args.threads, args.json)
        }
        Command::Status(args) => {
            let daemon = match args.http.as_deref() {
                Some("off") => None,
                Some(addr) => Some(parse_http(addr)?),
                // No address given: the daemon at the default one, if it runs.
                None => {
                    Some(parse_http(status::DEFAULT_HTTP)?).filter(|addr| status::listening(*addr))
                }
            };
            match daemon {
                Some(addr) => status::show(addr, args.json, args.watch),
                None if args.watch => {
                    anyhow::bail!("--watch needs a running shoal serve (none answers)")
                }
                None => commands::status(&settings(cli.config, args.locations, None)?, args.json),
            }
        }
        Command::Serve(args) => {
            let file = file_config(cli.config.as_ref())?;
            let retention = args.retention.resolve(&file)?;
            let serve = commands::ServeFlags {
                mode: args.remote.mode.or(file.mode),
                peers: if args.remote.peers.is_empty() {
                    file.peers.unwrap_or_default()
                } else {
                    args.remote.peers
                },
                docker_socket: args.remote.docker_socket.or(file.docker_socket),
                require_mounts: args.require_mounts || file.require_mounts.unwrap_or(false),
                heartbeat: args.heartbeat.or(file.heartbeat).unwrap_or(25),
                debounce_ms: args.debounce_ms,
                feed_retention: args.feed_retention,
                gso: !args.no_gso,
                node_name: args.remote.node_name,
                signer: args.signer,
                access: crate::access::Access::resolve(&args.access, file.access)?,
                service: args.remote.service,
                metrics: args.metrics,
                retention,
                gc_interval: args.gc_interval,
                max_rate: args.max_rate.or(file.max_rate),
                max_rate_peer: match args.max_rate_peer.is_empty() {
                    true => file.max_rate_peer.unwrap_or_default(),
                    false => args.max_rate_peer,
                },
            };
            let settings = settings(cli.config, args.locations, args.chunk_sizes)?;
            commands::serve(
                settings,
                args.remote.listen,
                serve,
                args.remote.credentials,
                &args.http,
                args.tombstone_days,
            )
        }
        Command::Gc(args) => {
            let file = file_config(cli.config.as_ref())?;
            let retention = args.retention.resolve(&file)?;
            let settings = settings(cli.config, args.locations, None)?;
            commands::gc(&settings, &retention, args.json)
        }
        Command::Health(args) => commands::health(&args.http, args.ready),
        Command::Pause(args) => control_pause(cli.config, args, true),
        Command::Resume(args) => control_pause(cli.config, args, false),
        Command::Release(args) => {
            crate::config::validate_volume_name(&args.volume)?;
            let command = crate::control::Command::Release(args.volume);
            control_send(cli.config, args.state_dir, &command)
        }
        Command::Set(SetCommand::MaxRate {
            rate,
            per_peer,
            peer,
            state_dir,
        }) => {
            use crate::control::Command as Control;
            let rate = crate::rate::parse_rate(&rate).map_err(|e| anyhow::anyhow!(e))?;
            let command = match (per_peer, peer) {
                (false, None) => Control::SetMaxRate(rate),
                (true, _) => Control::SetPeerMaxRate { node: None, rate },
                (false, Some(node)) => {
                    if !crate::identity::is_node_name(&node) {
                        anyhow::bail!("--peer {node:?} is not a node name or id");
                    }
                    Control::SetPeerMaxRate {
                        node: Some(node),
                        rate,
                    }
                }
            };
            control_send(cli.config, state_dir, &command)
        }
        Command::Conflicts(args) => match args.resolve {
            None => {
                if let Some(name) = &args.volume {
                    crate::config::validate_volume_name(name)?;
                }
                let state_dir = control_state_dir(cli.config, args.state_dir)?;
                conflicts::list(&state_dir, args.volume, args.json)
            }
            Some(ConflictsCommand::Resolve {
                path,
                keep,
                state_dir,
            }) => {
                let keep = crate::conflicts::Keep::parse(&keep).map_err(|e| anyhow::anyhow!(e))?;
                let state_dir = control_state_dir(cli.config, state_dir)?;
                conflicts::resolve(&state_dir, &path, keep)
            }
        },
        Command::Versions(args) => versions::versions(
            &settings(cli.config, args.locations, None)?,
            &args.path,
            args.json,
        ),
        Command::Restore(args) => versions::restore(
            &settings(cli.config, args.locations, None)?,
            &args.path,
            args.at,
            args.version_id,
            args.to,
            args.json,
        ),
        Command::Cluster(ClusterCommand::Init { out }) => commands::cluster_init(&out),
        Command::Cluster(ClusterCommand::AddNode {
            name,
            ca,
            out,
            days,
        }) => commands::cluster_add_node(&ca, &name, &out, days),
        Command::Cluster(ClusterCommand::Revoke { node, ca, state }) => {
            commands::cluster_revoke(&ca, state.as_deref().unwrap_or(&ca), &node)
        }
        Command::Cluster(ClusterCommand::RotateToken { ca, state }) => {
            commands::cluster_rotate_token(&ca, state.as_deref().unwrap_or(&ca))
        }
        Command::Signer(args) => commands::signer(crate::enroll::signer::SignerOptions {
            state_dir: args.state.unwrap_or_else(|| args.ca.clone()),
            ca_dir: args.ca,
            listen: args.listen,
            lifetime: args.lifetime.into(),
            gso: !args.no_gso,
        }),
        Command::Repair(args) => {
            let file = file_config(cli.config.as_ref())?;
            let settings = settings(cli.config, args.locations, args.chunk_sizes)?;
            let options = commands::RepairFlags {
                mode: args.remote.mode.or(file.mode),
                docker_socket: args.remote.docker_socket.or(file.docker_socket),
                service: args.remote.service,
                port: args.remote.listen.port(),
                peers: args.remote.peers,
                credentials: args.remote.credentials,
                node_name: args.remote.node_name,
                dry_run: args.dry_run,
                rebuild_index: args.rebuild_index,
                json: args.json,
            };
            commands::repair(&settings, options)
        }
        Command::Verify(args) => commands::verify(
            &settings(cli.config, args.locations, None)?,
            args.sample,
            args.json,
        ),
    }
}

/// `shoal pause` (`pause = true`) or `shoal resume`, through the daemon's control socket.
fn control_pause(
    config: Option<PathBuf>,
    args: ControlArgs,
    pause: bool,
) -> anyhow::Result<Outcome> {
    use crate::control::Command as Control;
    use crate::pause::Target;
    let target = match args.volume {
        Some(name) => {
            crate::config::validate_volume_name(&name)?;
            Target::Volume(name)
        }
        None => Target::Node,
    };
    let command = match pause {
        true => Control::Pause(target),
        false => Control::Resume(target),
    };
    control_send(config, args.state_dir, &command)
}

/// Sends `command` to the daemon of `state_dir` (or the config file's, or the default)
/// and prints its answer.
fn control_send(
    config: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    command: &crate::control::Command,
) -> anyhow::Result<Outcome> {
    let state_dir = control_state_dir(config, state_dir)?;
    let answer = crate::control::request(&state_dir, command)?;
    print(&format!("{answer}\n"))?;
    Ok(Outcome::Success)
}

/// The state directory of the daemon to command: `--state-dir`, the config file's, or
/// the default.
fn control_state_dir(
    config: Option<PathBuf>,
    state_dir: Option<PathBuf>,
) -> anyhow::Result<PathBuf> {
    Ok(state_dir
        .or(file_config(config.as_ref())?.state_dir)
        .unwrap_or_else(|| crate::config::DEFAULT_STATE_DIR.into()))
}

fn parse_http(addr: &str) -> anyhow::Result<std::net::SocketAddr> {
    use anyhow::Context;
    addr.parse()
        .with_context(|| format!("--http {addr:?} is not ADDR:PORT or \"off\""))
}

/// Writes to stdout; a closed pipe (`shoal status | head -1`) is not an error.
fn print(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}
