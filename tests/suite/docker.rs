//! The image on the real Docker Engine of the test machine: built offline by
//! `tools/build-image.sh` (from the test binary, to save a release build), run as
//! containers on user-defined networks that find each other through the Docker API, and
//! deployed as a Swarm stack from `deploy/`.
//!
//! Every Docker object created here is named `shoal-test-<pid>-<n>...` and removed when
//! its owner is dropped, also when a test fails. Every wait is bounded.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::util::{flip_byte_keeping_mtime, random_bytes, shoal, write_file};

static NEXT: AtomicU32 = AtomicU32::new(0);

fn unique(what: &str) -> String {
    format!(
        "shoal-test-{}-{}-{what}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    )
}

fn docker<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    Command::new("docker")
        .args(args)
        .output()
        .expect("the docker CLI runs (these tests need a Docker Engine)")
}

/// Runs docker; panics with its output unless it succeeds; returns stdout.
fn docker_ok<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> String {
    let out = docker(args);
    assert!(
        out.status.success(),
        "docker {:?} failed: {}{}",
        args.iter().map(|a| a.as_ref()).collect::<Vec<_>>(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Fresh cluster credentials (`shoal cluster init`) in `dir/creds`, returned.
fn cluster_credentials(dir: &Path) -> PathBuf {
    let creds = dir.join("creds");
    let out = shoal(&["cluster", "init", "--out", creds.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "shoal cluster init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    creds
}

/// The image, built once and shared by the tests running at the same time; removed
/// when the last one is done.
struct Image {
    tag: String,
}

static IMAGE: Mutex<Weak<Image>> = Mutex::new(Weak::new());

impl Image {
    fn get() -> Arc<Image> {
        let mut shared = IMAGE.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(image) = shared.upgrade() {
            return image;
        }
        let image = Arc::new(Image {
            tag: format!("{}:latest", unique("image")),
        });
        let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tools/build-image.sh"))
            .arg(&image.tag)
            .env("SHOAL_BINARY", env!("CARGO_BIN_EXE_shoal"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tools/build-image.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        *shared = Arc::downgrade(&image);
        image
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = docker(&["rmi", "--force", &self.tag]);
    }
}

/// A user-defined network and the `shoal serve` containers on it (MODE=docker), each
/// with its volume bind-mounted from a host directory (so the test reads and writes it
/// directly) and its state on a named volume of its own.
struct Group {
    image: Arc<Image>,
    name: String,
    dir: tempfile::TempDir,
    containers: Vec<String>,
    volumes: Vec<String>,
}

impl Group {
    fn new() -> Self {
        let image = Image::get();
        let name = unique("net");
        docker_ok(&["network", "create", &name]);
        let dir = tempfile::tempdir().unwrap();
        cluster_credentials(dir.path());
        Group {
            image,
            name,
            dir,
            containers: Vec::new(),
            volumes: Vec::new(),
        }
    }

    fn container(&self, i: usize) -> String {
        format!("{}-n{i}", self.name)
    }

    fn data(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("n{i}"))
    }

    /// Starts (or starts anew, on the same volumes) member `i`.
    fn start(&mut self, i: usize) {
        let container = self.container(i);
        if !self.containers.contains(&container) {
            self.containers.push(container.clone());
        }
        let mut args = vec!["run", "--detach", "--name", &container];
        let member = self.member_args(i);
        args.extend(member.iter().map(String::as_str));
        args.push(&self.image.tag);
        docker_ok(&args);
    }

    /// `docker run` options that make a container member `i`: the group's network and
    /// label, MODE=docker, the docker socket, credentials, `i`'s data and state volumes.
    fn member_args(&mut self, i: usize) -> Vec<String> {
        let state = format!("{}-state{i}", self.name);
        fs::create_dir_all(self.data(i)).unwrap();
        if !self.volumes.contains(&state) {
            self.volumes.push(state.clone());
        }
        let creds = self.dir.path().join("creds");
        [
            "--init",
            "--network",
            &self.name,
            "--label",
            &format!("shoal.cluster={}", self.name),
            "--env",
            "MODE=docker",
            "--env",
            "HEARTBEAT=2",
            "--env",
            "SYNC_VOLUMES=vol",
            "--volume",
            "/var/run/docker.sock:/var/run/docker.sock:ro",
            "--volume",
            &format!("{}:/run/secrets:ro", creds.display()),
            "--volume",
            &format!("{}:/srv/shoal/volumes/vol", self.data(i).display()),
            "--volume",
            &format!("{state}:/var/lib/shoal"),
        ]
        .map(String::from)
        .to_vec()
    }

    fn remove(&self, i: usize) {
        docker_ok(&["rm", "--force", "--volumes", &self.container(i)]);
    }

    fn logs(&self, i: usize) -> String {
        let out = docker(&["logs", &self.container(i)]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    fn ip(&self, i: usize) -> String {
        docker_ok(&[
            "inspect",
            "--format",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            &self.container(i),
        ])
    }

    /// The peer addresses member `i` currently has, from `shoal status` inside it.
    fn peers(&self, i: usize) -> Vec<String> {
        let out = docker(&[
            "exec",
            &self.container(i),
            "/usr/local/bin/shoal",
            "status",
            "--http",
            "127.0.0.1:7030",
            "--json",
        ]);
        let Ok(status) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
            return vec!["(no answer)".into()];
        };
        status["peers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["addr"].as_str().unwrap().to_string())
            .collect()
    }

    /// `shoal verify` inside member `i` (beside its running serve) finds no damage.
    fn assert_verify_clean(&self, i: usize) {
        let verify = docker(&["exec", &self.container(i), "/usr/local/bin/shoal", "verify"]);
        let stdout = String::from_utf8_lossy(&verify.stdout);
        assert!(
            verify.status.success() && stdout.contains("no damage"),
            "{stdout}{}",
            String::from_utf8_lossy(&verify.stderr)
        );
    }

    /// Waits until members `members` hold the same files (Shoal's `.shoal/` aside).
    fn wait_converged(&self, members: &[usize], timeout: Duration) {
        let start = Instant::now();
        loop {
            let last: Vec<BTreeMap<String, Vec<u8>>> =
                members.iter().map(|&i| listing(&self.data(i))).collect();
            if last.windows(2).all(|w| w[0] == w[1]) {
                return;
            }
            if start.elapsed() > timeout {
                let names: Vec<Vec<&String>> = last.iter().map(|l| l.keys().collect()).collect();
                let logs: Vec<String> = members.iter().map(|&i| self.logs(i)).collect();
                panic!("members {members:?} did not converge in {timeout:?}: {names:?}\n{logs:#?}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        for container in &self.containers {
            let _ = docker(&["rm", "--force", "--volumes", container]);
        }
        for volume in &self.volumes {
            let _ = docker(&["volume", "rm", "--force", volume]);
        }
        let _ = docker(&["network", "rm", &self.name]);
    }
}

/// Every file under `root` (outside `.shoal/`) with its content.
fn listing(root: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            if rel == ".shoal" {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(content) = fs::read(&path) {
                out.insert(rel, content);
            }
        }
    }
    out
}

#[test]
fn image_builds_offline_and_answers_help() {
    let image = Image::get();
    let help = docker_ok(&["run", "--rm", &image.tag, "--help"]);
    assert!(help.contains("serve") && help.contains("health"), "{help}");
    let health = docker(&["run", "--rm", &image.tag, "health"]);
    assert_eq!(health.status.code(), Some(1), "no daemon: unhealthy");
}

#[test]
fn containers_find_each_other_a_late_one_catches_up_a_removed_one_is_forgotten() {
    let mut group = Group::new();
    write_file(&group.data(0).join("a/first.txt"), b"from n0");
    write_file(&group.data(1).join("second.bin"), &random_bytes(300_000, 1));
    for i in 0..3 {
        group.start(i);
    }
    group.wait_converged(&[0, 1, 2], Duration::from_secs(60));
    assert_eq!(listing(&group.data(2)).len(), 2);

    group.start(3);
    group.wait_converged(&[0, 1, 2, 3], Duration::from_secs(60));
    let gone = format!("{}:7029", group.ip(3));
    wait_until("n0 knows n3", Duration::from_secs(20), || {
        group.peers(0).contains(&gone)
    });
    group.remove(3);
    wait_until("n0 forgets n3", Duration::from_secs(20), || {
        let peers = group.peers(0);
        peers.len() == 2 && !peers.contains(&gone)
    });
    write_file(&group.data(2).join("after.txt"), b"n3 gone");
    group.wait_converged(&[0, 1, 2], Duration::from_secs(30));
}

#[test]
fn a_disconnected_container_converges_on_reconnect_with_a_conflict_copy() {
    let mut group = Group::new();
    write_file(&group.data(0).join("shared.txt"), b"original");
    for i in 0..3 {
        group.start(i);
    }
    group.wait_converged(&[0, 1, 2], Duration::from_secs(60));

    docker_ok(&["network", "disconnect", &group.name, &group.container(2)]);
    wait_until("n2 alone", Duration::from_secs(20), || {
        group.peers(2).is_empty() && group.peers(0).len() == 1
    });
    write_file(&group.data(0).join("shared.txt"), b"changed on n0");
    write_file(&group.data(0).join("only-n0.txt"), b"n0");
    write_file(&group.data(2).join("shared.txt"), b"changed on n2, cut off");
    write_file(&group.data(2).join("only-n2.txt"), b"n2");
    // Both sides index their change (HEARTBEAT=2) before they meet again.
    std::thread::sleep(Duration::from_secs(5));
    assert!(!group.data(1).join("only-n2.txt").exists());
    docker_ok(&["network", "connect", &group.name, &group.container(2)]);

    group.wait_converged(&[0, 1, 2], Duration::from_secs(60));
    let files = listing(&group.data(1));
    assert_eq!(files["only-n0.txt"], b"n0");
    assert_eq!(files["only-n2.txt"], b"n2");
    let mut versions: Vec<&[u8]> = files
        .iter()
        .filter(|(name, _)| name.starts_with("shared"))
        .map(|(_, content)| content.as_slice())
        .collect();
    versions.sort();
    assert_eq!(
        versions,
        [&b"changed on n0"[..], &b"changed on n2, cut off"[..]],
        "both versions kept: {:?}",
        files.keys().collect::<Vec<_>>()
    );
    assert!(
        files.keys().any(|n| n.contains(".sync-conflict-")),
        "{:?}",
        files.keys().collect::<Vec<_>>()
    );
}

#[test]
fn a_container_killed_mid_transfer_resumes_on_its_state_volume() {
    let mut group = Group::new();
    const FILES: usize = 48;
    for f in 0..FILES {
        write_file(
            &group.data(0).join(format!("media/{f:02}.bin")),
            &random_bytes(4 << 20, f as u64),
        );
    }
    group.start(0);
    wait_until("n0 has scanned", Duration::from_secs(60), || {
        group.logs(0).contains("serving")
    });
    group.start(1);
    // Content being received is assembled under .shoal/staging/ before it is published.
    let staging = group.data(1).join(".shoal/staging");
    wait_until("n1 receives data", Duration::from_secs(60), || {
        fs::read_dir(&staging).is_ok_and(|mut d| d.next().is_some())
    });
    docker_ok(&["kill", &group.container(1)]);
    let at_kill = fs::read_dir(group.data(1).join("media")).map_or(0, |d| d.count());
    assert!(at_kill < FILES, "the transfer was over before the kill");

    // A new container on the same data and state volumes.
    group.remove(1);
    group.start(1);
    group.wait_converged(&[0, 1], Duration::from_secs(120));
    group.assert_verify_clean(1);
}

/// Offline repair of a stopped member, run as a one-off container beside it: the peers
/// it fetches from are found through the Docker API (MODE=docker), not listed.
#[test]
fn a_stopped_member_is_repaired_from_peers_it_discovers() {
    let mut group = Group::new();
    let content = random_bytes(4 << 20, 77);
    write_file(&group.data(0).join("media/clip.bin"), &content);
    group.start(0);
    group.start(1);
    group.wait_converged(&[0, 1], Duration::from_secs(120));

    // Bit rot on member 1 while it is stopped: a flipped byte, the mtime unchanged.
    docker_ok(&["stop", &group.container(1)]);
    let damaged = group.data(1).join("media/clip.bin");
    flip_byte_keeping_mtime(&damaged, 2 << 20);

    let repairer = format!("{}-repair", group.name);
    let mut args = vec!["run", "--rm", "--name", &repairer];
    let member = group.member_args(1);
    args.extend(member.iter().map(String::as_str));
    args.extend([group.image.tag.as_str(), "repair"]);
    let out = docker(&args);
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{report}");
    assert!(fs::read(&damaged).unwrap() == content, "{report}");

    docker_ok(&["start", &group.container(1)]);
    group.assert_verify_clean(1);
}

/// Each misconfiguration: a non-zero exit and exactly one line that says what is wrong.
#[test]
fn misconfigured_containers_exit_with_one_clear_line() {
    let group = Group::new();
    fs::create_dir_all(group.data(0)).unwrap();
    let creds = format!(
        "{}:/run/secrets:ro",
        group.dir.path().join("creds").display()
    );
    let data = format!("{}:/srv/shoal/volumes/vol", group.data(0).display());
    let socket = "/var/run/docker.sock:/var/run/docker.sock:ro";
    let cases: [(&str, Vec<&str>, &str); 4] = [
        (
            "missing secrets",
            vec!["-e", "MODE=static", "-v", &data],
            "no cluster credentials in /run/secrets",
        ),
        (
            "unknown MODE",
            vec!["-e", "MODE=kubernetes", "-v", &creds, "-v", &data],
            "unknown MODE \"kubernetes\"",
        ),
        (
            "unmounted volume",
            vec![
                "-e",
                "SYNC_VOLUMES=vol other",
                "-v",
                &creds,
                "-v",
                &data,
                "-v",
                socket,
            ],
            "volume other: /srv/shoal/volumes/other is not a mounted volume",
        ),
        (
            "no docker socket",
            vec!["-e", "MODE=docker", "-v", &creds, "-v", &data],
            "MODE=docker finds peers through the Docker API, but /var/run/docker.sock cannot be reached",
        ),
    ];
    for (what, args, expected) in cases {
        let name = unique("bad");
        let mut all = vec!["run", "--rm", "--name", &name, "-e", "SYNC_VOLUMES=vol"];
        all.extend(args);
        all.extend([group.image.tag.as_str(), "serve"]);
        let out = docker(&all);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "{what}: exited 0: {text}");
        let lines: Vec<&str> = text.lines().filter(|l| l.contains(expected)).collect();
        assert_eq!(
            lines.len(),
            1,
            "{what}: expected one line with {expected:?} in: {text}"
        );
        let _ = docker(&["rm", "--force", &name]);
    }
}

/// The engine is in one Swarm at a time: the Swarm tests take turns.
static SWARM_TESTS: Mutex<()> = Mutex::new(());

/// A one-node Swarm of this engine and what the test deployed on it, removed in reverse.
struct Swarm {
    /// This test made the engine a Swarm manager (and leaves the Swarm afterwards).
    joined: bool,
    /// ... and `swarm init` created docker_gwbridge, which `swarm leave` keeps.
    made_gwbridge: bool,
    prefix: String,
    /// Nodes that joined this test's Swarm (removed from it at the end).
    nodes: Vec<String>,
    stacks: Vec<String>,
    services: Vec<String>,
    secrets: Vec<String>,
    volumes: Vec<String>,
    networks: Vec<String>,
}

/// The node label this suite puts on the engine when it makes it a Swarm manager; its
/// value is the id of the test process. A run killed before `Swarm::drop` (a CI timeout,
/// an interrupted session) leaves the engine in that Swarm, and the next run must tell such
/// a leftover (its owner is gone: leave it) from a Swarm in use (wait) or someone else's.
const OWNER_LABEL: &str = "org.shoal.test-swarm-owner";

/// Who owns this engine's Swarm, as the suite sees it.
enum SwarmOwner {
    NoSwarm,
    /// A test process that is still running.
    LiveTest,
    /// A test process that has ended without leaving.
    DeadTest,
    /// A Swarm this suite did not make.
    Other(String),
}

fn swarm_owner() -> SwarmOwner {
    let state = docker_ok(&["info", "--format", "{{.Swarm.LocalNodeState}}"]);
    if state == "inactive" {
        return SwarmOwner::NoSwarm;
    }
    let label = format!("{{{{index .Spec.Labels \"{OWNER_LABEL}\"}}}}");
    let owner = docker(&["node", "inspect", "self", "--format", &label]);
    let owner = String::from_utf8_lossy(&owner.stdout).trim().to_string();
    match owner.parse::<u32>() {
        Ok(pid) if std::path::Path::new(&format!("/proc/{pid}")).exists() => SwarmOwner::LiveTest,
        Ok(_) => SwarmOwner::DeadTest,
        Err(_) => SwarmOwner::Other(state),
    }
}

impl Swarm {
    /// Makes this engine a Swarm manager advertising `advertise`, unless it is one
    /// already (then only if `reuse` allows). A Swarm left by a killed run of this suite
    /// is left first; without `reuse`, one that a running test process owns is waited for.
    fn join(advertise: &str, reuse: bool) -> Self {
        let start = Instant::now();
        let mut had_gwbridge = true;
        let joined = loop {
            match swarm_owner() {
                SwarmOwner::NoSwarm => {
                    had_gwbridge = docker(&["network", "inspect", "docker_gwbridge"])
                        .status
                        .success();
                    docker_ok(&["swarm", "init", "--advertise-addr", advertise]);
                    let label = format!("{OWNER_LABEL}={}", std::process::id());
                    let node = docker_ok(&["info", "--format", "{{.Swarm.NodeID}}"]);
                    docker_ok(&["node", "update", "--label-add", &label, &node]);
                    break true;
                }
                SwarmOwner::DeadTest => {
                    docker_ok(&["swarm", "leave", "--force"]);
                }
                SwarmOwner::LiveTest | SwarmOwner::Other(_) if reuse => break false,
                SwarmOwner::LiveTest => {
                    assert!(
                        start.elapsed() < Duration::from_secs(600),
                        "another test process kept this engine's Swarm for 10 minutes"
                    );
                    std::thread::sleep(Duration::from_secs(1));
                }
                SwarmOwner::Other(state) => panic!(
                    "this engine's Swarm state is {state:?} and this suite did not make that Swarm: the test needs an engine it can make a Swarm manager of its own"
                ),
            }
        };
        Swarm {
            joined,
            made_gwbridge: joined && !had_gwbridge,
            prefix: unique("swarm"),
            nodes: Vec::new(),
            stacks: Vec::new(),
            services: Vec::new(),
            secrets: Vec::new(),
            volumes: Vec::new(),
            networks: Vec::new(),
        }
    }

    /// The running container of the only task of `service`, once healthy.
    fn healthy_task(&self, service: &str) -> String {
        let filter = format!("label=com.docker.swarm.service.name={service}");
        let mut container = String::new();
        wait_until(
            "the task's container is healthy",
            Duration::from_secs(120),
            || {
                container = docker_ok(&["ps", "--quiet", "--filter", &filter]);
                !container.is_empty()
                    && docker_ok(&[
                        "inspect",
                        "--format",
                        "{{.State.Health.Status}}",
                        &container,
                    ]) == "healthy"
            },
        );
        container
    }
}

impl Drop for Swarm {
    fn drop(&mut self) {
        for stack in &self.stacks {
            let _ = docker(&["stack", "rm", stack]);
        }
        for service in &self.services {
            let _ = docker(&["service", "rm", service]);
        }
        // Task containers go away asynchronously; volumes and networks are freed after.
        let deadline = Instant::now() + Duration::from_secs(60);
        for volume in &self.volumes {
            while !docker(&["volume", "rm", "--force", volume])
                .status
                .success()
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(500));
            }
        }
        for secret in &self.secrets {
            let _ = docker(&["secret", "rm", secret]);
        }
        for network in &self.networks {
            while docker(&["network", "inspect", network]).status.success()
                && Instant::now() < deadline
            {
                let _ = docker(&["network", "rm", network]);
                std::thread::sleep(Duration::from_millis(500));
            }
        }
        for node in &self.nodes {
            let _ = docker(&["node", "rm", "--force", node]);
        }
        if self.joined {
            let _ = docker(&["swarm", "leave", "--force"]);
        }
        if self.made_gwbridge {
            let _ = docker(&["network", "rm", "docker_gwbridge"]);
        }
    }
}

/// Both Swarm checks in one test: they share the engine's one Swarm membership.
/// 1. `deploy/docker-stack.yml` as shipped (global mode: one task on this one node) runs
///    healthy and finds no peer, without any error.
/// 2. Two tasks of one replicated service, each with a volume of its own, find each other
///    through `tasks.<service>` DNS and mirror both ways.
#[test]
fn swarm_the_stack_runs_healthy_alone_and_two_tasks_of_a_service_mirror() {
    let _serial = SWARM_TESTS.lock().unwrap_or_else(|e| e.into_inner());
    let image = Image::get();
    let mut swarm = Swarm::join("127.0.0.1", true);
    let (creds_dir, stack) = deploy_stack(&mut swarm, &image, &[]);
    let creds = creds_dir.path().join("creds");
    let service = format!("{stack}_shoal");
    let container = swarm.healthy_task(&service);
    let logs = docker(&["logs", &container]);
    let logs = String::from_utf8_lossy(&logs.stderr).into_owned();
    assert!(
        logs.contains(&format!("peers=the tasks of service {service}")),
        "{logs}"
    );
    assert!(logs.contains("certificate from the signer"), "{logs}");
    assert!(!logs.contains("WARN") && !logs.contains("ERROR"), "{logs}");
    assert!(
        !logs.contains("discovered peers"),
        "a one-node Swarm has no peers: {logs}"
    );

    // Two tasks: volumes named after the task slot, written through their mount points.
    let net = format!("{}-net", swarm.prefix);
    docker_ok(&["network", "create", "--driver", "overlay", &net]);
    swarm.networks.push(net.clone());
    let mut secret_args = Vec::new();
    for file in ["ca.pem", "ca-key.pem"] {
        let secret = format!("{}-{file}", swarm.prefix);
        docker_ok(&[
            "secret",
            "create",
            &secret,
            creds.join(file).to_str().unwrap(),
        ]);
        swarm.secrets.push(secret.clone());
        secret_args.push(format!("source={secret},target={file}"));
    }
    let volume = |what: &str, slot: u32| format!("{}-{what}-{slot}", swarm.prefix);
    for slot in [1, 2] {
        for what in ["media", "state"] {
            swarm.volumes.push(volume(what, slot));
        }
    }
    docker_ok(&["volume", "create", &volume("media", 1)]);
    let mountpoint = |slot: u32| -> PathBuf {
        docker_ok(&[
            "volume",
            "inspect",
            "--format",
            "{{.Mountpoint}}",
            &volume("media", slot),
        ])
        .into()
    };
    write_file(&mountpoint(1).join("one.txt"), b"written on task 1");
    let replicated = format!("{}-svc", swarm.prefix);
    swarm.services.push(replicated.clone());
    let media = format!(
        "type=volume,src={}-media-{{{{.Task.Slot}}}},dst=/srv/shoal/volumes/media",
        swarm.prefix
    );
    let state = format!(
        "type=volume,src={}-state-{{{{.Task.Slot}}}},dst=/var/lib/shoal",
        swarm.prefix
    );
    let mut args = vec![
        "service",
        "create",
        "--detach",
        "--quiet",
        "--no-resolve-image",
        "--name",
        &replicated,
        "--replicas",
        "2",
        "--network",
        &net,
        "--env",
        "SYNC_VOLUMES=media",
        "--env",
        "HEARTBEAT=2",
        "--mount",
        "type=bind,src=/var/run/docker.sock,dst=/var/run/docker.sock,readonly",
        "--mount",
        &media,
        "--mount",
        &state,
    ];
    for secret in &secret_args {
        args.extend(["--secret", secret.as_str()]);
    }
    args.push(&image.tag);
    docker_ok(&args);
    let content = |slot: u32, name: &str| fs::read(mountpoint(slot).join(name)).ok();
    wait_until("task 2 pulls from task 1", Duration::from_secs(90), || {
        docker(&["volume", "inspect", &volume("media", 2)])
            .status
            .success()
            && content(2, "one.txt").as_deref() == Some(&b"written on task 1"[..])
    });
    write_file(&mountpoint(2).join("two.txt"), b"written on task 2");
    wait_until("task 1 pulls from task 2", Duration::from_secs(60), || {
        content(1, "two.txt").as_deref() == Some(&b"written on task 2"[..])
    });
}

/// A `docker-compose` project of `deploy/docker-compose.yml`, taken down with its volumes.
struct Compose {
    project: String,
    env: Vec<(&'static str, String)>,
}

impl Compose {
    fn run(&self, args: &[&str]) -> Output {
        Command::new("docker-compose")
            .args(["--project-name", &self.project, "--file"])
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/deploy/docker-compose.yml"
            ))
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("docker-compose runs")
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        let _ = self.run(&["down", "--volumes", "--timeout", "5"]);
    }
}

#[test]
fn the_compose_file_runs_three_members_that_find_each_other() {
    let image = Image::get();
    let dir = tempfile::tempdir().unwrap();
    let creds = cluster_credentials(dir.path());
    let compose = Compose {
        project: unique("compose"),
        env: vec![
            ("SHOAL_IMAGE", image.tag.clone()),
            ("SHOAL_CREDENTIALS_DIR", creds.to_str().unwrap().to_string()),
            ("HEARTBEAT", "2".to_string()),
        ],
    };
    let up = compose.run(&["up", "--detach"]);
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    // Each member's volume, written and read through its mount point.
    let mountpoint = |i: usize| -> PathBuf {
        let volume = format!("{}_media-{i}", compose.project);
        docker_ok(&["volume", "inspect", "--format", "{{.Mountpoint}}", &volume]).into()
    };
    write_file(&mountpoint(1).join("from-1.txt"), b"one");
    write_file(&mountpoint(3).join("from-3.txt"), b"three");
    wait_until(
        "the three members converge",
        Duration::from_secs(90),
        || {
            (1..=3).all(|i| {
                let files = listing(&mountpoint(i));
                files.get("from-1.txt").map(Vec::as_slice) == Some(b"one")
                    && files.get("from-3.txt").map(Vec::as_slice) == Some(b"three")
            })
        },
    );
}

static NEXT_ENGINE: AtomicU32 = AtomicU32::new(0);

/// A second Docker Engine on this machine, to be a second Swarm node (as moby's own
/// tests run several daemons): its own network namespace, joined to the host by a veth
/// pair; its own mount namespace, where its socket is /var/run/docker.sock as on a real
/// node (so its tasks ask it, not the first engine); its data and exec roots in a
/// temporary directory, with the vfs storage driver. Stopped and removed when dropped.
struct SecondEngine {
    netns: String,
    veth: String,
    host_ip: String,
    ip: String,
    dir: tempfile::TempDir,
    daemon: Option<std::process::Child>,
}

impl SecondEngine {
    fn start() -> Self {
        let n = std::process::id() % 1000 * 10 + NEXT_ENGINE.fetch_add(1, Ordering::SeqCst) % 10;
        let subnet = 100 + n % 150;
        let mut engine = SecondEngine {
            netns: format!("shoal-test-{n}"),
            veth: format!("shoalt{n}"),
            host_ip: format!("10.231.{subnet}.1"),
            ip: format!("10.231.{subnet}.2"),
            dir: tempfile::tempdir().unwrap(),
            daemon: None,
        };
        let peer = format!("{}n", engine.veth);
        let host = format!("{}h", engine.veth);
        let run = |args: &[&str]| {
            let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
            assert!(
                out.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(&["ip", "netns", "add", &engine.netns]);
        run(&[
            "ip", "link", "add", &host, "type", "veth", "peer", "name", &peer,
        ]);
        run(&["ip", "link", "set", &peer, "netns", &engine.netns]);
        run(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", engine.host_ip),
            "dev",
            &host,
        ]);
        run(&["ip", "link", "set", &host, "up"]);
        for args in [
            vec![
                "ip",
                "addr",
                "add",
                &format!("{}/24", engine.ip),
                "dev",
                &peer,
            ],
            vec!["ip", "link", "set", &peer, "up"],
            vec!["ip", "link", "set", "lo", "up"],
        ] {
            let mut all = vec!["ip", "netns", "exec", &engine.netns];
            all.extend(args);
            run(&all);
        }
        let root = engine.dir.path();
        fs::write(root.join("daemon.json"), r#"{"storage-driver": "vfs"}"#).unwrap();
        let script = format!(
            "mount -t tmpfs tmpfs /run && exec dockerd --config-file {root}/daemon.json \
             --data-root {root}/data --exec-root {root}/exec --pidfile {root}/docker.pid \
             -H unix:///var/run/docker.sock -H unix://{root}/docker.sock \
             --bridge none --iptables=false",
            root = root.display()
        );
        let log = fs::File::create(root.join("dockerd.log")).unwrap();
        engine.daemon = Some(
            Command::new("nsenter")
                .arg(format!("--net=/run/netns/{}", engine.netns))
                .args(["unshare", "--mount", "--propagation", "private", "sh", "-c"])
                .arg(&script)
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("nsenter and unshare run"),
        );
        wait_until("the second engine answers", Duration::from_secs(60), || {
            engine.docker(&["info"]).status.success()
        });
        engine
    }

    fn docker(&self, args: &[&str]) -> Output {
        Command::new("docker")
            .arg("--host")
            .arg(format!("unix://{}/docker.sock", self.dir.path().display()))
            .args(args)
            .output()
            .unwrap()
    }

    fn docker_ok(&self, args: &[&str]) -> String {
        let out = self.docker(args);
        assert!(
            out.status.success(),
            "second engine: docker {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for SecondEngine {
    fn drop(&mut self) {
        let _ = self.docker(&["swarm", "leave", "--force"]);
        if let Some(mut daemon) = self.daemon.take() {
            // SIGTERM: dockerd stops its containers and its containerd before it exits.
            let _ = Command::new("kill")
                .args(["-TERM", &daemon.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while daemon.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(200));
            }
            let _ = daemon.kill();
            let _ = daemon.wait();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &format!("{}h", self.veth)])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
}

/// A two-node Swarm on one machine: this engine as manager, a second engine as worker.
/// The `deploy/` stack (global: one task per node) mirrors both ways between the nodes
/// over the overlay network, the worker finding the manager's task without the manager's
/// API (workers cannot list tasks).
#[test]
fn swarm_of_two_engines_the_stack_mirrors_between_manager_and_worker() {
    let _serial = SWARM_TESTS.lock().unwrap_or_else(|e| e.into_inner());
    let image = Image::get();
    // Dropped in reverse: the Swarm goes first (stack, volumes, the worker's node entry,
    // then this engine leaves), then the second engine stops and its namespace goes.
    let worker = SecondEngine::start();
    let mut swarm = Swarm::join(&worker.host_ip, false);
    let token = docker_ok(&["swarm", "join-token", "--quiet", "worker"]);
    worker.docker_ok(&[
        "swarm",
        "join",
        "--advertise-addr",
        &worker.ip,
        "--token",
        &token,
        &format!("{}:2377", worker.host_ip),
    ]);
    swarm
        .nodes
        .push(worker.docker_ok(&["info", "--format", "{{.Swarm.NodeID}}"]));
    // The image reaches the worker as it would without a registry: docker save | load.
    let mut save = Command::new("docker")
        .args(["save", &image.tag])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let load = Command::new("docker")
        .arg("--host")
        .arg(format!(
            "unix://{}/docker.sock",
            worker.dir.path().display()
        ))
        .arg("load")
        .stdin(save.stdout.take().unwrap())
        .output()
        .unwrap();
    assert!(save.wait().unwrap().success() && load.status.success());

    // Certificates of 20 s: both nodes renew while they mirror.
    let (_creds, stack) = deploy_stack(
        &mut swarm,
        &image,
        &[("HEARTBEAT", "2"), ("SHOAL_CERT_LIFETIME", "20s")],
    );
    let volume = format!("{stack}_media");
    let inspect = ["volume", "inspect", "--format", "{{.Mountpoint}}", &volume];
    let mut on_worker = PathBuf::new();
    wait_until(
        "the stack's volume on both nodes",
        Duration::from_secs(90),
        || {
            let out = worker.docker(&inspect);
            on_worker = String::from_utf8_lossy(&out.stdout).trim().into();
            out.status.success() && docker(&inspect).status.success()
        },
    );
    let on_manager = PathBuf::from(docker_ok(&inspect));
    write_file(
        &on_manager.join("from-manager.bin"),
        &random_bytes(3 << 20, 7),
    );
    write_file(&on_worker.join("from-worker.txt"), b"worker");
    let logs = || {
        let service = format!("label=com.docker.swarm.service.name={stack}_shoal");
        let id = worker.docker_ok(&["ps", "--all", "--quiet", "--filter", &service]);
        let out = worker.docker(&["logs", id.lines().next().unwrap_or("none")]);
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let start = Instant::now();
    while listing(&on_manager) != listing(&on_worker) {
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "the two nodes did not converge; worker's task: {}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(listing(&on_worker).len(), 2);

    // Both enrolled with the signer (on the manager) and renew their certificates while
    // a transfer runs; no connection between them drops.
    let manager_logs = || {
        let service = format!("label=com.docker.swarm.service.name={stack}_shoal");
        let id = docker_ok(&["ps", "--all", "--quiet", "--filter", &service]);
        let out = docker(&["logs", id.lines().next().unwrap_or("none")]);
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    write_file(
        &on_manager.join("during-renewal.bin"),
        &random_bytes(24 << 20, 8),
    );
    wait_until(
        "both nodes renew their certificates",
        Duration::from_secs(60),
        || logs().contains("certificate renewed") && manager_logs().contains("certificate renewed"),
    );
    let start = Instant::now();
    while listing(&on_manager) != listing(&on_worker) {
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "the two nodes did not converge after the renewal; worker's task: {}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    for log in [logs(), manager_logs()] {
        assert!(log.contains("certificate from the signer"), "{log}");
        assert!(!log.contains("disconnected"), "{log}");
    }
}

/// Deploys `deploy/docker-stack.yml` as a stack named after the test, with fresh cluster
/// credentials (kept in the returned directory) and extra environment for the file's
/// variables; registers what the stack creates for removal.
fn deploy_stack(
    swarm: &mut Swarm,
    image: &Image,
    env: &[(&str, &str)],
) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let creds = cluster_credentials(dir.path());
    let stack = format!("{}-stack", swarm.prefix);
    swarm.stacks.push(stack.clone());
    for what in ["media", "state", "signer-state"] {
        swarm.volumes.push(format!("{stack}_{what}"));
    }
    swarm.networks.push(format!("{stack}_shoal"));
    let out = Command::new("docker")
        .args(["stack", "deploy", "--resolve-image", "never", "-c"])
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/docker-stack.yml"
        ))
        .arg(&stack)
        .env("SHOAL_IMAGE", &image.tag)
        .env("SHOAL_CREDENTIALS_DIR", &creds)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // No service holds the Docker socket (root on the host); only the signer holds the
    // CA key, the nodes the CA certificate and the join token.
    let spec = |service: &str, what: &str| {
        docker_ok(&[
            "service",
            "inspect",
            "--format",
            &format!("{{{{json .Spec.TaskTemplate.ContainerSpec.{what}}}}}"),
            &format!("{stack}_{service}"),
        ])
    };
    for service in ["shoal", "signer"] {
        let mounts = spec(service, "Mounts");
        assert!(!mounts.contains("docker.sock"), "{service}: {mounts}");
    }
    let node_secrets = spec("shoal", "Secrets");
    assert!(
        node_secrets.contains("\"ca.pem\"") && node_secrets.contains("\"join-token\""),
        "{node_secrets}"
    );
    assert!(!node_secrets.contains("ca-key.pem"), "{node_secrets}");
    assert!(spec("signer", "Secrets").contains("ca-key.pem"));
    (dir, stack)
}

/// The stack as shipped, for an operator (issue 15): its metrics address answers another
/// container on the stack's overlay network, and a `docker service update` that lists a
/// volume the service does not mount rolls back by itself, the service running on.
#[test]
fn swarm_the_stack_serves_metrics_on_its_network_and_rolls_a_bad_update_back() {
    let _serial = SWARM_TESTS.lock().unwrap_or_else(|e| e.into_inner());
    let image = Image::get();
    // A Swarm of its own: another test process leaving a Swarm it shared mid-update
    // would take the service with it.
    let mut swarm = Swarm::join("127.0.0.1", false);
    let (_creds, stack) = deploy_stack(&mut swarm, &image, &[]);
    let service = format!("{stack}_shoal");
    let network = format!("{stack}_shoal");
    let container = swarm.healthy_task(&service);
    let ip_template = format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}");
    let ip = docker_ok(&["inspect", "--format", &ip_template, &container]);
    assert!(!ip.is_empty(), "the task has no address on {network}");
    // Another container on the overlay network asks the task's metrics address.
    let client = format!("{}-client", swarm.prefix);
    let readiness = docker(&[
        "run",
        "--rm",
        "--name",
        &client,
        "--network",
        &network,
        &image.tag,
        "health",
        "--ready",
        "--http",
        &format!("{ip}:9030"),
    ]);
    assert!(
        readiness.status.success(),
        "{}{}",
        String::from_utf8_lossy(&readiness.stdout),
        String::from_utf8_lossy(&readiness.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&readiness.stdout), "ready\n");

    // An update that adds a volume without its mount: the new task refuses to start,
    // Swarm rolls the service back to its previous spec.
    docker_ok(&[
        "service",
        "update",
        "--detach",
        "--env-add",
        "SYNC_VOLUMES=media docs",
        &service,
    ]);
    let state = || {
        docker_ok(&[
            "service",
            "inspect",
            "--format",
            "{{if .UpdateStatus}}{{.UpdateStatus.State}}{{end}}",
            &service,
        ])
    };
    wait_until("the update rolled back", Duration::from_secs(240), || {
        state() == "rollback_completed"
    });
    let env = docker_ok(&[
        "service",
        "inspect",
        "--format",
        "{{json .Spec.TaskTemplate.ContainerSpec.Env}}",
        &service,
    ]);
    assert!(
        env.contains("SYNC_VOLUMES=media\"") && !env.contains("docs"),
        "{env}"
    );
    let container = swarm.healthy_task(&service);
    let logs = docker(&["logs", &container]);
    let logs = String::from_utf8_lossy(&logs.stderr).into_owned();
    assert!(
        !logs.contains("docs"),
        "the running task is the old spec's: {logs}"
    );
}

/// A stand-in for lsyncd_swarm's image, built offline: Debian's static busybox on an empty
/// base. Its task does what matters here of lsyncd: it runs as the stack's `lsyncd`
/// service and keeps writing into the volume it mounts (a counter in `.lsyncd-standin`),
/// so the test sees whether it still runs.
struct LsyncdStandin {
    tag: String,
}

impl LsyncdStandin {
    fn build() -> Self {
        let busybox = Path::new("/bin/busybox");
        assert!(
            busybox.exists(),
            "the migration test needs Debian's busybox-static (tools/test.sh installs it)"
        );
        let context = tempfile::tempdir().unwrap();
        fs::copy(busybox, context.path().join("busybox")).unwrap();
        write_file(
            &context.path().join("Dockerfile"),
            b"FROM scratch\nCOPY busybox /bin/busybox\nENTRYPOINT [\"/bin/busybox\"]\n",
        );
        let standin = LsyncdStandin {
            tag: format!("{}:latest", unique("lsyncd-standin")),
        };
        docker_ok(&[
            "build",
            "--quiet",
            "--tag",
            &standin.tag,
            context.path().to_str().unwrap(),
        ]);
        standin
    }
}

impl Drop for LsyncdStandin {
    fn drop(&mut self) {
        let _ = docker(&["rmi", "--force", &self.tag]);
    }
}

/// lsyncd_swarm's example stack (its README), with the stand-in image: a global `lsyncd`
/// service on an overlay network, the volume at `/srv/lsyncd_swarm/volumes/NAME`, the
/// ssh key pair as secrets.
const LSYNCD_STACK: &str = r#"version: "3.8"
services:
  lsyncd:
    image: ${LSYNCD_IMAGE}
    command: ["sh", "-c", "i=0; while :; do i=$$((i+1)); echo $$i > /srv/lsyncd_swarm/volumes/media/.lsyncd-standin; sleep 1; done"]
    networks:
      - csi_lsyncd
    environment:
      SYNC_VOLUMES: media
      MODE: swarm
      HEARTBEAT: 25
    volumes:
      - media:/srv/lsyncd_swarm/volumes/media
    secrets:
      - id_rsa_lsyncd
      - authorized_keys_lsyncd
    deploy:
      mode: global
networks:
  csi_lsyncd:
    driver: overlay
volumes:
  media:
secrets:
  id_rsa_lsyncd:
    file: ${LSYNCD_SECRETS}/id_rsa
  authorized_keys_lsyncd:
    file: ${LSYNCD_SECRETS}/authorized_keys
"#;

/// `deploy/MIGRATION.md`, followed as written on a one-node Swarm (issue 15): a running
/// stand-in lsyncd stack named `STACK`, the cut-over (note the old service, deploy
/// `docker-stack.yml` under the same stack name with `--prune`, watch it, remove what
/// lsyncd left), then the roll-back (deploy the old file with `--prune`, remove
/// `.shoal/`). Shoal must take over the very volume lsyncd used (not a new empty one),
/// lsyncd must not run beside it, and the files must come through both ways unchanged.
#[test]
fn migration_from_an_lsyncd_stack_cuts_over_and_rolls_back_on_the_same_volume() {
    let _serial = SWARM_TESTS.lock().unwrap_or_else(|e| e.into_inner());
    let image = Image::get();
    let standin = LsyncdStandin::build();
    let mut swarm = Swarm::join("127.0.0.1", true);
    let dir = tempfile::tempdir().unwrap();
    let creds = cluster_credentials(dir.path());
    let lsyncd_secrets = dir.path().join("lsyncd-secrets");
    write_file(&lsyncd_secrets.join("id_rsa"), b"not a real key");
    write_file(&lsyncd_secrets.join("authorized_keys"), b"not a real key");
    let lsyncd_file = dir.path().join("lsyncd-stack.yml");
    write_file(&lsyncd_file, LSYNCD_STACK.as_bytes());

    let stack = format!("{}-files", swarm.prefix);
    swarm.stacks.push(stack.clone());
    for what in ["media", "state", "signer-state"] {
        swarm.volumes.push(format!("{stack}_{what}"));
    }
    for network in ["shoal", "csi_lsyncd"] {
        swarm.networks.push(format!("{stack}_{network}"));
    }
    let deploy = |file: &Path, prune: bool| {
        let mut command = Command::new("docker");
        command.args(["stack", "deploy", "--resolve-image", "never"]);
        if prune {
            command.arg("--prune");
        }
        let out = command
            .arg("-c")
            .arg(file)
            .arg(&stack)
            .env("LSYNCD_IMAGE", &standin.tag)
            .env("LSYNCD_SECRETS", &lsyncd_secrets)
            .env("SHOAL_IMAGE", &image.tag)
            .env("SHOAL_CREDENTIALS_DIR", &creds)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "docker stack deploy {}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let services = || docker_ok(&["service", "ls", "--format", "{{.Name}}"]);
    let lsyncd = format!("{stack}_lsyncd");
    let shoal_service = format!("{stack}_shoal");
    let volume: PathBuf = {
        deploy(&lsyncd_file, false);
        let media = format!("{stack}_media");
        wait_until(
            "the lsyncd stack made its volume",
            Duration::from_secs(60),
            || docker(&["volume", "inspect", &media]).status.success(),
        );
        docker_ok(&["volume", "inspect", "--format", "{{.Mountpoint}}", &media]).into()
    };
    let counter = || fs::read(volume.join(".lsyncd-standin")).ok();
    let writing = |what: &str| {
        let before = counter();
        wait_until(what, Duration::from_secs(60), || {
            counter().is_some() && counter() != before
        });
    };
    writing("the stand-in lsyncd writes its volume");
    // What lsyncd has been mirroring.
    for i in 0..20 {
        write_file(
            &volume.join(format!("uploads/{i:02}.jpg")),
            &random_bytes(1000 + i * 3000, i as u64),
        );
    }
    write_file(&volume.join("index.html"), b"<h1>kept</h1>");

    // Cut-over, step 1: what to roll back to.
    let noted = docker_ok(&["service", "inspect", &lsyncd]);
    assert!(noted.contains(&standin.tag), "{noted}");
    // Step 2 (and 3): the Shoal file under the same stack name, with --prune.
    let repo_stack = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/docker-stack.yml"
    ));
    deploy(repo_stack, true);
    let listed = services();
    assert!(!listed.contains(&lsyncd), "lsyncd left running: {listed}");
    let container = swarm.healthy_task(&shoal_service);
    // lsyncd's task is gone: its counter stands still.
    let task_filter = format!("label=com.docker.swarm.service.name={lsyncd}");
    wait_until("lsyncd's task is gone", Duration::from_secs(60), || {
        docker_ok(&["ps", "--all", "--quiet", "--filter", &task_filter]).is_empty()
    });
    let stopped_at = counter();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(counter(), stopped_at, "lsyncd still writes the volume");
    // Step 4: Shoal indexed the volume lsyncd used, then sees a change made in it.
    let files_indexed = || {
        let out = docker(&[
            "exec",
            &container,
            "/usr/local/bin/shoal",
            "status",
            "--json",
        ]);
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .and_then(|status| status["volumes"][0]["files"].as_u64())
    };
    // 20 uploads, index.html and the stand-in's counter.
    wait_until(
        "Shoal indexed lsyncd's volume",
        Duration::from_secs(60),
        || files_indexed() == Some(22),
    );
    write_file(&volume.join("uploads/after-cut-over.jpg"), b"new");
    wait_until(
        "Shoal sees a change in the volume",
        Duration::from_secs(60),
        || files_indexed() == Some(23),
    );
    assert!(volume.join(".shoal").is_dir());
    // Step 5: lsyncd's secrets and network go.
    docker_ok(&[
        "secret",
        "rm",
        &format!("{stack}_id_rsa_lsyncd"),
        &format!("{stack}_authorized_keys_lsyncd"),
    ]);
    let lsyncd_network = format!("{stack}_csi_lsyncd");
    wait_until(
        "lsyncd's network can be removed",
        Duration::from_secs(60),
        || {
            docker(&["network", "rm", &lsyncd_network]).status.success()
                || !docker(&["network", "inspect", &lsyncd_network])
                    .status
                    .success()
        },
    );
    let before_roll_back = listing(&volume);

    // Roll-back, step 1: the old stack file with --prune takes Shoal away ...
    deploy(&lsyncd_file, true);
    let listed = services();
    assert!(
        !listed.contains(&shoal_service) && !listed.contains(&format!("{stack}_signer")),
        "Shoal left running: {listed}"
    );
    let shoal_filter = format!("label=com.docker.swarm.service.name={shoal_service}");
    wait_until("Shoal's task is gone", Duration::from_secs(60), || {
        docker_ok(&["ps", "--all", "--quiet", "--filter", &shoal_filter]).is_empty()
    });
    // ... step 2: `.shoal/` goes; step 3: the stack file made the secrets and network
    // again, and lsyncd runs on the same volume.
    fs::remove_dir_all(volume.join(".shoal")).unwrap();
    writing("the stand-in lsyncd writes its volume again");
    let mut after = listing(&volume);
    let mut before = before_roll_back;
    for files in [&mut after, &mut before] {
        files.remove(".lsyncd-standin");
    }
    assert_eq!(after, before, "the roll-back changed the volume's files");
    assert_eq!(after.len(), 22);
}
