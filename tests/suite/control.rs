//! Operator controls on running nodes, through the local control socket: pause and
//! resume (kept across a restart), and who may use the socket.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::cluster::Cluster;

fn wait_for(timeout: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "{what} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn state_dir(c: &Cluster, i: usize) -> PathBuf {
    c.dir.path().join(format!("node{i}/state"))
}

/// `shoal ARGS --state-dir` node `i`'s, as the test's user.
fn control(c: &Cluster, i: usize, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(args)
        .arg("--state-dir")
        .arg(state_dir(c, i))
        .output()
        .unwrap()
}

fn volume_paused(c: &Cluster, i: usize) -> Option<bool> {
    c.status(i)?["volumes"][0]["paused"].as_bool()
}

/// Node `i`'s volume indexes `files` files.
fn indexed(c: &Cluster, i: usize, files: u64) -> bool {
    c.status(i)
        .is_some_and(|s| s["volumes"][0]["files"].as_u64() == Some(files))
}

#[test]
fn a_paused_volume_takes_and_gives_nothing_across_a_restart_until_resumed() {
    let mut c = Cluster::new(2);
    fs::write(c.vol(0).join("before.txt"), b"both have this").unwrap();
    c.start_all();
    c.wait_connected(Duration::from_secs(30));
    c.wait_converged(&[0, 1], Duration::from_secs(30));

    let out = control(&c, 1, &["pause", "vol"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("volume vol paused"),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(volume_paused(&c, 1), Some(true));
    let metrics = c.metrics(1).unwrap();
    assert!(
        metrics.contains("shoal_paused{volume=\"vol\"} 1"),
        "{metrics}"
    );

    fs::write(
        c.vol(0).join("from0.txt"),
        b"written on node 0 during the pause",
    )
    .unwrap();
    fs::write(
        c.vol(1).join("from1.txt"),
        b"written on node 1 during the pause",
    )
    .unwrap();
    // Both indexed their own file; node 0 asked node 1 for the volume and was told it
    // is paused; a few more heartbeats (1 s) go by.
    wait_for(Duration::from_secs(30), "both nodes indexed", || {
        indexed(&c, 0, 2) && indexed(&c, 1, 2)
    });
    wait_for(Duration::from_secs(30), "node 0 told of the pause", || {
        c.log(0).contains("paused on this node by its operator")
    });
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !c.vol(1).join("from0.txt").exists(),
        "node 0's change reached the paused node"
    );
    assert!(
        !c.vol(0).join("from1.txt").exists(),
        "the paused node's change went out"
    );

    // The pause survives a restart.
    c.stop(1);
    c.start(1);
    wait_for(Duration::from_secs(30), "node 1 back", || {
        c.status(1).is_some_and(|s| {
            s["peers"]
                .as_array()
                .is_some_and(|p| p.iter().all(|p| p["connected"] == true))
        })
    });
    assert_eq!(volume_paused(&c, 1), Some(true));
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !c.vol(1).join("from0.txt").exists(),
        "a restart lifted the pause"
    );
    assert!(
        !c.vol(0).join("from1.txt").exists(),
        "a restart lifted the pause"
    );

    let out = control(&c, 1, &["resume", "vol"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(volume_paused(&c, 1), Some(false));
    c.wait_converged(&[0, 1], Duration::from_secs(30));
    assert!(c.vol(1).join("from0.txt").exists() && c.vol(0).join("from1.txt").exists());

    // A node-wide pause covers the volume too; a volume the node does not sync is refused.
    let out = control(&c, 0, &["pause"]);
    assert!(out.status.success());
    assert_eq!(volume_paused(&c, 0), Some(true));
    assert!(control(&c, 0, &["resume"]).status.success());
    assert_eq!(volume_paused(&c, 0), Some(false));
    let out = control(&c, 0, &["pause", "other"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("volume other is not synced by this node")
    );
}

#[test]
fn the_control_socket_refuses_a_user_other_than_root_or_the_daemons() {
    if !rustix_is_root() {
        eprintln!("skipped: needs root to run a command as another user");
        return;
    }
    let mut c = Cluster::new(1);
    c.start(0);
    let socket = state_dir(&c, 0).join("control/shoal.sock");
    wait_for(Duration::from_secs(30), "the control socket", || {
        socket.exists()
    });
    let mode = |p: &std::path::Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&socket), 0o600);
    assert_eq!(mode(socket.parent().unwrap()), 0o700);
    let as_nobody = |c: &Cluster| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(env!("CARGO_BIN_EXE_shoal"))
            .args(["pause", "--state-dir"])
            .arg(state_dir(c, 0))
            .output()
            .unwrap()
    };
    // The file modes keep another user out...
    let mut dir = socket.parent().unwrap().to_path_buf();
    while dir != c.dir.path().parent().unwrap() {
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        dir.pop();
    }
    fs::set_permissions(socket.parent().unwrap(), fs::Permissions::from_mode(0o700)).unwrap();
    let out = as_nobody(&c);
    assert_eq!(out.status.code(), Some(2));
    // ...and were they loosened by mistake, the peer's uid still is.
    fs::set_permissions(socket.parent().unwrap(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&socket, fs::Permissions::from_mode(0o666)).unwrap();
    let out = as_nobody(&c);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("uid 65534 may not command this daemon"),
        "{err}"
    );
    assert_eq!(volume_paused(&c, 0), Some(false));
}

fn rustix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn max_rate_holds_chunk_bytes_to_the_rate_and_changes_while_running() {
    let mut c = Cluster::new(2);
    c.extra_env[1].push(("SHOAL_MAX_RATE".into(), "1M".into()));
    c.start_all();
    c.wait_connected(Duration::from_secs(30));
    let rate_shown = |c: &Cluster, rate: u64| {
        c.metrics(1)
            .is_some_and(|m| m.contains(&format!("shoal_max_rate_bytes_per_second {rate}\n")))
    };
    assert!(rate_shown(&c, 1 << 20), "{:?}", c.metrics(1));
    // A limiter's correctness is a lower bound: N bytes at R bytes/s with one second
    // of R lent take at least (N - R) / R seconds, however fast the machine.
    let transfer = |c: &Cluster, name: &str, len: usize| {
        let started = Instant::now();
        fs::write(
            c.vol(0).join(name),
            crate::util::random_bytes(len, len as u64),
        )
        .unwrap();
        wait_for(Duration::from_secs(120), "the file arrived", || {
            fs::metadata(c.vol(1).join(name)).is_ok_and(|m| m.len() == len as u64)
        });
        started.elapsed()
    };
    let took = transfer(&c, "a.bin", 4 << 20);
    assert!(
        took >= Duration::from_secs(3),
        "4 MiB at 1 MiB/s in {took:?}"
    );

    let out = control(&c, 1, &["set", "max-rate", "256K"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(rate_shown(&c, 256 << 10));
    let took = transfer(&c, "b.bin", 1 << 20);
    assert!(
        took >= Duration::from_secs(3),
        "1 MiB at 256 KiB/s in {took:?}"
    );
    c.wait_converged(&[0, 1], Duration::from_secs(30));
    assert!(control(&c, 1, &["set", "max-rate", "off"]).status.success());
    assert!(rate_shown(&c, 0));
}
