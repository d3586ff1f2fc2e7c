//! Several real `shoal serve` processes on 127.0.x.y, talking QUIC with mutual TLS.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::shoal;

/// Each cluster gets its own 127.A.B.0/24 (see [`free_net`]), so tests running at once
/// never collide.
static NEXT_NET: AtomicU32 = AtomicU32::new(0);

/// Subnets of 127.0.0.0/8 a cluster can take: 127.A.B.0/24 with A and B in 1..=250.
const NETS: u32 = 250 * 250;

/// The address of node `i` in subnet `net`.
fn ip_in(net: u32, i: usize) -> String {
    format!("127.{}.{}.{}", 1 + net / 250, 1 + net % 250, i + 1)
}

/// A subnet whose node addresses nobody listens on now: other test runs on the same
/// machine (another checkout's suite, a soak) take subnets the same way, and a node
/// that cannot listen fails to start. Spread by process and cluster, probed in turn.
fn free_net(size: usize) -> u32 {
    let start = std::process::id().wrapping_mul(7919).wrapping_add(
        NEXT_NET
            .fetch_add(1, Ordering::SeqCst)
            .wrapping_mul(104_729),
    );
    (0..1000)
        .map(|k| start.wrapping_add(k) % NETS)
        .find(|&net| {
            (0..size).all(|i| {
                let ip = ip_in(net, i);
                std::net::UdpSocket::bind(format!("{ip}:7029")).is_ok()
                    && std::net::TcpListener::bind(format!("{ip}:7030")).is_ok()
            })
        })
        .expect("a free 127.A.B.0/24 among 1000 tried")
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    net: u32,
    pub size: usize,
    children: Vec<Option<Child>>,
    pub extra_env: Vec<Vec<(String, String)>>,
    pub credentials: Vec<PathBuf>,
    /// Seconds between full rescans and pull rounds: long, to show that only the file
    /// watcher can explain a change arriving.
    pub heartbeat: u64,
    /// A command line that node `i`'s `shoal serve ...` is appended to (and `exec`ed by).
    pub wrapper: Vec<Vec<String>>,
    /// Volumes besides `vol` every node syncs (their directories made at start).
    pub more_volumes: Vec<String>,
    /// The `shoal` binary node `i` runs (this build's, unless a test runs another).
    pub binary: Vec<PathBuf>,
    /// Node `i`'s `--peer` list, when not every other node's address.
    pub peers: Vec<Option<Vec<String>>>,
}

impl Cluster {
    pub fn new(size: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let net = free_net(size);
        let creds = dir.path().join("creds");
        let out = shoal(&["cluster", "init", "--out", creds.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for i in 0..size {
            fs::create_dir_all(dir.path().join(format!("node{i}/data/vol"))).unwrap();
        }
        Cluster {
            dir,
            net,
            size,
            children: (0..size).map(|_| None).collect(),
            extra_env: vec![Vec::new(); size],
            credentials: vec![creds; size],
            heartbeat: 1,
            wrapper: vec![Vec::new(); size],
            more_volumes: Vec::new(),
            binary: vec![PathBuf::from(env!("CARGO_BIN_EXE_shoal")); size],
            peers: vec![None; size],
        }
    }

    pub fn ip(&self, i: usize) -> String {
        ip_in(self.net, i)
    }

    pub fn vol(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("node{i}/data/vol"))
    }

    pub fn log(&self, i: usize) -> String {
        fs::read_to_string(self.dir.path().join(format!("node{i}.log"))).unwrap_or_default()
    }

    /// Starts node `i` with every other node as a peer.
    pub fn start(&mut self, i: usize) {
        assert!(self.children[i].is_none(), "node {i} already running");
        let node = self.dir.path().join(format!("node{i}"));
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("node{i}.log")))
            .unwrap();
        let mut command = match self.wrapper[i].split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(&self.binary[i]);
                command
            }
            None => Command::new(&self.binary[i]),
        };
        command
            .arg("serve")
            .args(["--data-root", node.join("data").to_str().unwrap()])
            .args(["--state-dir", node.join("state").to_str().unwrap()])
            .args(["--volume", "vol"])
            .args(
                self.more_volumes
                    .iter()
                    .flat_map(|v| ["--volume", v.as_str()]),
            )
            .args(["--listen", &format!("{}:7029", self.ip(i))])
            .args(["--http", &format!("{}:7030", self.ip(i))])
            .args(["--credentials", self.credentials[i].to_str().unwrap()])
            .env("SHOAL_NODE_NAME", format!("node{i}"))
            .args(["--heartbeat", &self.heartbeat.to_string()])
            .env_remove("SYNC_VOLUMES")
            .env_remove("SHOAL_PEERS")
            .env("SHOAL_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log);
        let others = (0..self.size).filter(|&j| j != i);
        let peers = match &self.peers[i] {
            Some(peers) => peers.clone(),
            None => others.map(|j| format!("{}:7029", self.ip(j))).collect(),
        };
        for peer in peers {
            command.args(["--peer", &peer]);
        }
        for (key, value) in &self.extra_env[i] {
            command.env(key, value);
        }
        self.children[i] = Some(command.spawn().unwrap());
    }

    /// Starts node `i` and waits until it logs "serving": its first scan is over, so a
    /// change made from here on is not seen by that scan (being connected is not enough:
    /// a node connects while it scans).
    pub fn start_and_wait_serving(&mut self, i: usize, timeout: Duration) {
        let served = self.log(i).matches("serving").count();
        self.start(i);
        let deadline = Instant::now() + timeout;
        while self.log(i).matches("serving").count() == served {
            assert!(
                Instant::now() < deadline,
                "node {i} never served:\n{}",
                tail(&self.log(i), 30)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn start_all(&mut self) {
        for i in 0..self.size {
            self.start(i);
        }
    }

    /// SIGTERM, then wait (SIGKILL after 15 s).
    pub fn stop(&mut self, i: usize) {
        if let Some(mut child) = self.children[i].take() {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(15);
            while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits for node `i` to exit on its own; its exit code.
    pub fn wait_exit(&mut self, i: usize, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        let child = self.children[i].as_mut().expect("node running");
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.children[i] = None;
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "node {i} still running after {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.children[i].take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// Node `i`'s id, as its status shows it (its key's, once it has started).
    pub fn node_id(&self, i: usize) -> Option<String> {
        self.status(i)?["node_id"].as_str().map(str::to_string)
    }

    /// Freezes node `i` (SIGSTOP): alive to the kernel, silent to its peers. Dropping the
    /// cluster kills it all the same (SIGKILL ends a stopped process).
    pub fn freeze(&self, i: usize) {
        self.signal(i, libc::SIGSTOP);
    }

    /// Lets a frozen node `i` run again (SIGCONT).
    pub fn thaw(&self, i: usize) {
        self.signal(i, libc::SIGCONT);
    }

    fn signal(&self, i: usize, signal: i32) {
        let child = self.children[i].as_ref().expect("node running");
        assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
    }

    /// Node `i`'s peak resident memory so far, in KiB (`VmHWM` in `/proc/PID/status`).
    pub fn peak_rss_kib(&self, i: usize) -> Option<u64> {
        self.proc_status_kib(i, "VmHWM:")
    }

    /// Node `i`'s resident memory now, in KiB (`VmRSS`).
    pub fn rss_kib(&self, i: usize) -> Option<u64> {
        self.proc_status_kib(i, "VmRSS:")
    }

    fn proc_status_kib(&self, i: usize, field: &str) -> Option<u64> {
        let pid = self.children[i].as_ref()?.id();
        let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let line = status.lines().find(|l| l.starts_with(field))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    pub fn status(&self, i: usize) -> Option<Value> {
        serde_json::from_str(&self.http_get(i, "/status")?).ok()
    }

    /// Node `i`'s `/metrics` text.
    pub fn metrics(&self, i: usize) -> Option<String> {
        self.http_get(i, "/metrics")
    }

    fn http_get(&self, i: usize, path: &str) -> Option<String> {
        Some(self.http(i, path, Duration::from_secs(5))?.body)
    }

    /// `GET path` on node `i`'s HTTP endpoint, waiting at most `timeout` for the answer.
    pub fn http(&self, i: usize, path: &str, timeout: Duration) -> Option<HttpAnswer> {
        let addr = format!("{}:7030", self.ip(i));
        let mut stream =
            std::net::TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_secs(2))
                .ok()?;
        stream.set_read_timeout(Some(timeout)).ok()?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut raw = String::new();
        stream.read_to_string(&mut raw).ok()?;
        let (head, body) = raw.split_once("\r\n\r\n")?;
        let code = head.split(' ').nth(1)?.parse().ok()?;
        Some(HttpAnswer {
            code,
            head: head.to_string(),
            body: body.to_string(),
        })
    }

    pub fn root(&self, i: usize) -> Option<String> {
        self.status(i)?["volumes"][0]["root"]
            .as_str()
            .map(str::to_string)
    }

    pub fn total(&self, i: usize, counter: &str) -> u64 {
        self.status(i)
            .map_or(0, |s| s["totals"][counter].as_u64().unwrap_or(0))
    }

    /// Waits until every node has a connection to every other node.
    pub fn wait_connected(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        for i in 0..self.size {
            loop {
                // Every other node listed (the list fills as discovery runs: an empty
                // one says nothing yet) and connected.
                let connected = self.status(i).is_some_and(|s| {
                    s["peers"].as_array().is_some_and(|p| {
                        p.len() == self.size - 1 && p.iter().all(|p| p["connected"] == true)
                    })
                });
                if connected {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "node {i} not connected to all peers in {timeout:?}:\n{}",
                    tail(&self.log(i), 30)
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// How many scans of node `i` found local changes (its "local changes" lines).
    pub fn scans_with_changes(&self, i: usize) -> usize {
        self.log(i).matches("local changes").count()
    }

    /// Waits until node `i` has logged more than `before` scans with local changes;
    /// panics with `what` and its log after `timeout`.
    pub fn wait_scan_with_changes(&self, i: usize, before: usize, timeout: Duration, what: &str) {
        let deadline = Instant::now() + timeout;
        while self.scans_with_changes(i) == before {
            assert!(
                Instant::now() < deadline,
                "{what}:\n{}",
                tail(&self.log(i), 30)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Node `i`'s first volume's `histories_root`: content and histories together.
    pub fn histories_root(&self, i: usize) -> Option<String> {
        self.status(i)?["volumes"][0]["histories_root"]
            .as_str()
            .map(str::to_string)
    }

    /// Waits until the nodes hold the same files with the same histories (equal
    /// `histories_root`s; equal `root`s alone leave a node that took a file's content
    /// under an older history, which a settle made there would conflict with) and
    /// their trees on disk are equal too.
    pub fn wait_converged(&self, nodes: &[usize], timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let roots: Vec<Option<String>> = nodes.iter().map(|&i| self.root(i)).collect();
            let same_root = roots[0].is_some() && roots.iter().all(|r| *r == roots[0]);
            let histories: Vec<Option<String>> =
                nodes.iter().map(|&i| self.histories_root(i)).collect();
            // A node of an earlier release shows no histories root: roots alone then.
            let same_histories =
                histories.contains(&None) || histories.iter().all(|h| *h == histories[0]);
            if same_root && same_histories {
                let first = snapshot(&self.vol(nodes[0]));
                if nodes.iter().all(|&i| snapshot(&self.vol(i)) == first) {
                    return;
                }
            }
            if Instant::now() > deadline {
                let logs: Vec<String> = nodes
                    .iter()
                    .map(|&i| format!("--- node {i} log:\n{}", tail(&self.log(i), 30)))
                    .collect();
                // Where the trees on disk differ; with equal roots a node's disk is not
                // what its index says, and its own `verify` tells; with roots that differ,
                // each node's view of its peers says why no round closes the gap.
                let disks = if same_root {
                    format!(
                        "{}\n{}",
                        self.disk_differences(nodes),
                        self.verify_all(nodes)
                    )
                } else {
                    format!(
                        "{}\n{}",
                        self.disk_differences(nodes),
                        self.peer_views(nodes)
                    )
                };
                panic!(
                    "nodes {nodes:?} did not converge in {timeout:?}: roots {roots:?}, \
                     histories roots {histories:?}\n{disks}{}",
                    logs.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Paths shown at most by [`Cluster::disk_differences`].
const MAX_DIFFERENCES_SHOWN: usize = 40;

impl Cluster {
    /// Per path where the nodes' trees on disk differ, what each node has there.
    pub fn disk_differences(&self, nodes: &[usize]) -> String {
        let trees: Vec<BTreeMap<Vec<u8>, Item>> =
            nodes.iter().map(|&i| snapshot(&self.vol(i))).collect();
        let paths: std::collections::BTreeSet<&Vec<u8>> =
            trees.iter().flat_map(|t| t.keys()).collect();
        let differing: Vec<&Vec<u8>> = paths
            .into_iter()
            .filter(|p| trees.iter().any(|t| t.get(*p) != trees[0].get(*p)))
            .collect();
        let mut out = format!("--- {} paths differ on disk:\n", differing.len());
        for path in differing.iter().take(MAX_DIFFERENCES_SHOWN) {
            out += &format!("{}:\n", String::from_utf8_lossy(path));
            for (k, &i) in nodes.iter().enumerate() {
                out += &format!("  node {i}: {:?}\n", trees[k].get(*path));
            }
        }
        out
    }

    /// Each node's `/status` view of its peers (sync state, last error), shortened.
    pub fn peer_views(&self, nodes: &[usize]) -> String {
        nodes
            .iter()
            .map(|&i| {
                let peers = self
                    .status(i)
                    .map(|s| s["peers"].to_string())
                    .unwrap_or_else(|| "(no answer)".to_string());
                let shown: String = peers.chars().take(3000).collect();
                format!("--- node {i} peers: {shown}")
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// `shoal verify` on node `i` exits 0 (nothing found); its report if not.
    pub fn assert_verifies_clean(&self, i: usize) {
        let node = self.dir.path().join(format!("node{i}"));
        let out = crate::util::shoal_at(&node.join("data"), &node.join("state"), "verify", &[]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

    /// What `shoal verify` finds on each node (read-only beside a running node): an index
    /// that says one thing and a disk that holds another.
    pub fn verify_all(&self, nodes: &[usize]) -> String {
        nodes
            .iter()
            .map(|&i| {
                let node = self.dir.path().join(format!("node{i}"));
                let out =
                    crate::util::shoal_at(&node.join("data"), &node.join("state"), "verify", &[]);
                format!(
                    "--- node {i} verify (exit {:?}):\n{}",
                    out.status.code(),
                    tail(&String::from_utf8_lossy(&out.stdout), 40)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// An HTTP answer: status code, status line and headers, body.
pub struct HttpAnswer {
    pub code: u16,
    pub head: String,
    pub body: String,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for child in self.children.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// What a tree holds, as sync promises to reproduce it: per path the kind, permission
/// bits, file and FIFO mtime and content, symlink target; `.shoal/`, sockets and
/// devices (which do not sync) excluded.
#[derive(Debug, PartialEq, Eq, Clone)]
pub enum Item {
    File {
        mode: u32,
        mtime_ns: i64,
        hash: String,
    },
    Dir {
        mode: u32,
    },
    Symlink(Vec<u8>),
    Fifo {
        mode: u32,
        mtime_ns: i64,
    },
}

pub fn snapshot(root: &Path) -> BTreeMap<Vec<u8>, Item> {
    let mut out = BTreeMap::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(rel) = pending.pop() {
        let Ok(entries) = fs::read_dir(root.join(&rel)) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            if rel.as_os_str().is_empty() && name == ".shoal" {
                continue;
            }
            let path = rel.join(&name);
            let Ok(meta) = fs::symlink_metadata(root.join(&path)) else {
                continue;
            };
            let item = if meta.file_type().is_symlink() {
                Item::Symlink(
                    fs::read_link(root.join(&path))
                        .unwrap_or_default()
                        .as_os_str()
                        .as_bytes()
                        .to_vec(),
                )
            } else if meta.is_dir() {
                pending.push(path.clone());
                Item::Dir {
                    mode: meta.permissions().mode() & 0o7777,
                }
            } else if meta.file_type().is_fifo() {
                Item::Fifo {
                    mode: meta.permissions().mode() & 0o7777,
                    mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
                }
            } else if !meta.is_file() {
                continue;
            } else {
                let Ok(content) = fs::read(root.join(&path)) else {
                    continue;
                };
                Item::File {
                    mode: meta.permissions().mode() & 0o7777,
                    mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
                    hash: blake3::hash(&content).to_hex().to_string(),
                }
            };
            out.insert(path.as_os_str().as_bytes().to_vec(), item);
        }
    }
    out
}

pub fn names(root: &Path) -> Vec<String> {
    snapshot(root)
        .keys()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect()
}
