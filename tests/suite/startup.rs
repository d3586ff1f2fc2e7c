//! What a node says and does at start when its surroundings are not yet right (issue 16's
//! small items): a peer name that does not resolve yet, a private key others may read, a
//! volume directory it may not write, a low soft limit of open files. Real `shoal serve`
//! processes; the log, the exit status and `/proc` are what is checked.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::cluster::*;
use crate::util::{shoal, stderr, write_file};

const CONVERGE: Duration = Duration::from_secs(60);

fn running_as_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Waits until node `i`'s log holds `text`.
fn wait_log(c: &Cluster, i: usize, text: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !c.log(i).contains(text) {
        assert!(
            Instant::now() < deadline,
            "node {i} never logged {text:?}:\n{}",
            tail(&c.log(i), 30)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_peer_name_that_does_not_resolve_yet_is_retried_until_it_does() {
    if !running_as_root() {
        eprintln!("skipped: a private /etc/hosts needs a mount namespace (root)");
        return;
    }
    let mut c = Cluster::new(2);
    // Node 0 knows node 1 only by a name, resolved through an /etc/hosts of its own
    // (bind-mounted in a mount namespace) that lacks it at first, as in compose before
    // the other container runs.
    let hosts = c.dir.path().join("hosts");
    fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();
    let name = "shoal-peer-not-running-yet";
    c.peers[0] = Some(vec![format!("{name}:7029")]);
    // Node 1 knows no peer: what it holds reaches node 0 only through node 0's pulls.
    c.peers[1] = Some(Vec::new());
    c.wrapper[0] = vec![
        "unshare".into(),
        "--mount".into(),
        "--propagation".into(),
        "private".into(),
        "sh".into(),
        "-c".into(),
        format!("mount --bind {} /etc/hosts && exec \"$@\"", hosts.display()),
        "sh".into(),
    ];
    write_file(&c.vol(1).join("from-b.txt"), b"made on node 1");
    c.start_all();
    wait_log(
        &c,
        0,
        &format!("peer {name}:7029 does not resolve yet"),
        CONVERGE,
    );
    // Not fatal: the node serves, and keeps trying (with backoff, said once).
    std::thread::sleep(Duration::from_secs(3));
    let answer = c.http(0, "/healthz", Duration::from_secs(5));
    assert_eq!(answer.map(|a| a.code), Some(200), "{}", tail(&c.log(0), 30));
    let log = c.log(0);
    assert_eq!(log.matches("does not resolve yet").count(), 1, "{log}");
    assert!(
        !log.contains("HOST:PORT"),
        "the hint blames the format:\n{log}"
    );

    // The name starts to resolve (written in place: the bind mount keeps the inode).
    let mut text = fs::read_to_string(&hosts).unwrap();
    text.push_str(&format!("{} {name}\n", c.ip(1)));
    fs::OpenOptions::new()
        .write(true)
        .open(&hosts)
        .and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()))
        .unwrap();
    wait_log(
        &c,
        0,
        &format!("peer {name}:7029 resolves to {}:7029", c.ip(1)),
        CONVERGE,
    );
    c.wait_converged(&[0, 1], CONVERGE);
    assert_eq!(
        fs::read(c.vol(0).join("from-b.txt")).unwrap(),
        b"made on node 1"
    );
}

#[test]
fn a_peer_that_is_not_host_and_port_is_refused_at_start_with_the_format() {
    let mut c = Cluster::new(1);
    c.peers[0] = Some(vec!["just-a-name".into()]);
    c.start(0);
    let code = c.wait_exit(0, Duration::from_secs(30));
    assert_eq!(code, Some(2), "{}", c.log(0));
    assert!(
        c.log(0)
            .contains("peer \"just-a-name\": expected HOST:PORT"),
        "{}",
        c.log(0)
    );
}

#[test]
fn a_private_key_others_may_read_is_used_with_a_warning() {
    let mut c = Cluster::new(1);
    let ca = c.dir.path().join("ca");
    let creds = c.dir.path().join("creds-node0");
    let init = shoal(&["cluster", "init", "--out", ca.to_str().unwrap()]);
    assert!(init.status.success(), "{}", stderr(&init));
    let add = shoal(&[
        "cluster",
        "add-node",
        "node0",
        "--ca",
        ca.to_str().unwrap(),
        "--out",
        creds.to_str().unwrap(),
    ]);
    assert!(add.status.success(), "{}", stderr(&add));
    // What a Docker secret is mounted as unless the stack gives it a mode.
    fs::set_permissions(creds.join("key.pem"), fs::Permissions::from_mode(0o444)).unwrap();
    c.credentials[0] = creds.clone();
    c.start(0);
    wait_log(&c, 0, "serving", CONVERGE);
    let log = c.log(0);
    let warning = format!(
        "{} is readable by other users (mode 444)",
        creds.join("key.pem").display()
    );
    assert_eq!(log.matches(&warning).count(), 1, "{log}");
    assert!(log.contains("make it 0600"), "{log}");
}

/// A new cluster's credentials in `dir/creds` and an empty volume `dir/data/vol`, for
/// [`serve_through`]; the credentials' path.
fn lone_node_dir(dir: &Path) -> std::path::PathBuf {
    let creds = dir.join("creds");
    let init = shoal(&["cluster", "init", "--out", creds.to_str().unwrap()]);
    assert!(init.status.success(), "{}", stderr(&init));
    fs::create_dir_all(dir.join("data/vol")).unwrap();
    creds
}

/// `WRAPPER ARGS.. shoal serve` of `dir`'s volume `data/vol` (state in `dir/state`), alone:
/// no peers, any port, stdout dropped. The wrapper (util-linux) execs the node, so the
/// child's pid is the node's.
fn serve_through(wrapper: &str, args: &[&str], dir: &Path, creds: &Path) -> Command {
    let mut command = Command::new(wrapper);
    command
        .args(args)
        .arg(env!("CARGO_BIN_EXE_shoal"))
        .arg("serve")
        .args(["--data-root", dir.join("data").to_str().unwrap()])
        .args(["--state-dir", dir.join("state").to_str().unwrap()])
        .args(["--volume", "vol"])
        .args(["--listen", "127.0.0.1:0"])
        .args(["--credentials", creds.to_str().unwrap()])
        .env("SHOAL_NODE_NAME", "startup")
        .env_remove("SYNC_VOLUMES")
        .env_remove("SHOAL_PEERS")
        .stdout(Stdio::null());
    command
}

/// Runs `shoal serve` on `data_root`'s volume `vol` as uid/gid 65534 until it exits (at
/// most 60 s); its exit code and stderr.
fn serve_as_nobody(dir: &Path, creds: &Path) -> (Option<i32>, String) {
    let mut child = serve_through(
        "setpriv",
        &["--reuid=65534", "--regid=65534", "--clear-groups"],
        dir,
        creds,
    )
    .stderr(Stdio::piped())
    .spawn()
    .expect("setpriv (util-linux) runs");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let output = child.wait_with_output().unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into(),
    )
}

#[test]
fn a_volume_directory_the_node_may_not_write_is_named_once_with_what_to_fix() {
    if !running_as_root() {
        eprintln!("skipped: needs root to run the daemon as another user");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let creds = lone_node_dir(dir.path());
    let volume = dir.path().join("data/vol");
    fs::create_dir_all(dir.path().join("state")).unwrap();
    // Everything but the volume itself is the daemon's: root keeps the volume 0755.
    for path in [
        dir.path(),
        &dir.path().join("data"),
        &dir.path().join("state"),
    ] {
        rustix::fs::chown(
            path,
            Some(rustix::fs::Uid::from_raw(65534)),
            Some(rustix::fs::Gid::from_raw(65534)),
        )
        .unwrap();
    }
    for file in fs::read_dir(&creds).unwrap() {
        let path = file.unwrap().path();
        rustix::fs::chown(
            &path,
            Some(rustix::fs::Uid::from_raw(65534)),
            Some(rustix::fs::Gid::from_raw(65534)),
        )
        .unwrap();
    }
    rustix::fs::chown(
        &creds,
        Some(rustix::fs::Uid::from_raw(65534)),
        Some(rustix::fs::Gid::from_raw(65534)),
    )
    .unwrap();
    let (code, err) = serve_as_nobody(dir.path(), &creds);
    assert_eq!(code, Some(2), "{err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_default();
    assert_eq!(line.matches("Permission denied").count(), 1, "{err}");
    assert!(
        line.contains(&format!("may not write in {}", volume.display()))
            && line.contains("uid 65534"),
        "the error says which directory to fix, for whom:\n{err}"
    );
}

/// A node started with the soft open-file limit many service managers still give (here
/// 64) raises it to the hard limit: a pull holds hundreds of staging files open.
#[test]
fn a_node_started_with_a_low_soft_open_file_limit_raises_it_to_the_hard_one() {
    let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .maximum
        .unwrap_or(1 << 20);
    if hard <= 64 {
        eprintln!("skipped: the hard open-file limit here is {hard}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let creds = lone_node_dir(dir.path());
    let mut child = serve_through(
        "prlimit",
        &[&format!("--nofile=64:{hard}")],
        dir.path(),
        &creds,
    )
    .stderr(Stdio::null())
    .spawn()
    .expect("prlimit (util-linux) runs");
    let limits = format!("/proc/{}/limits", child.id());
    let deadline = Instant::now() + Duration::from_secs(30);
    let soft = loop {
        let text = fs::read_to_string(&limits).unwrap_or_default();
        let soft = text
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .and_then(|l| l.split_whitespace().nth(3).map(str::to_owned));
        let is_shoal = fs::read_link(format!("/proc/{}/exe", child.id()))
            .map(|exe| exe.ends_with("shoal"))
            .unwrap_or(false);
        if is_shoal && soft.as_deref() == Some(hard.to_string().as_str()) {
            break soft;
        }
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            break soft;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(soft, Some(hard.to_string()), "{limits} of the running node");
}
