//! Operator controls on running nodes, through the local control socket: pause and
//! resume (kept across a restart), and who may use the socket.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::cluster::Cluster;

pub fn wait_for(timeout: Duration, what: &str, check: impl FnMut() -> bool) {
    wait_explained(timeout, check, || format!("{what} within {timeout:?}"));
}

/// [`wait_for`], with what the panic says made by `explain` when the time is up (the
/// state that kept `check` false, say).
pub fn wait_explained(
    timeout: Duration,
    mut check: impl FnMut() -> bool,
    explain: impl Fn() -> String,
) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "{}", explain());
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn state_dir(c: &Cluster, i: usize) -> PathBuf {
    c.dir.path().join(format!("node{i}/state"))
}

/// `shoal ARGS --state-dir` node `i`'s, as the test's user.
pub fn control(c: &Cluster, i: usize, args: &[&str]) -> Output {
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
    // Node 0 shows the volume paused there: not failing rounds, not degraded.
    let status = c.status(0).unwrap();
    let with_1 = &status["peers"][0]["volumes"][0];
    assert_eq!(with_1["state"], "paused", "{status:#}");
    assert!(with_1["last_error"].is_null(), "{status:#}");
    assert_eq!(status["health"]["ready"], true, "{status:#}");
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

/// `shoal conflicts --json` on node `i`: its copies, or the command's error output.
fn conflicts(c: &Cluster, i: usize) -> Result<Vec<serde_json::Value>, String> {
    let out = control(c, i, &["conflicts", "--json"]);
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let listing: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
    Ok(listing["copies"].as_array().cloned().unwrap_or_default())
}

#[test]
fn conflicts_made_on_purpose_are_listed_on_every_node_and_settled_as_changes_that_sync() {
    let mut c = Cluster::new(3);
    for name in ["a.txt", "b.txt", "c.txt"] {
        fs::write(c.vol(0).join(name), b"original").unwrap();
    }
    c.start_all();
    c.wait_connected(Duration::from_secs(30));
    c.wait_converged(&[0, 1, 2], Duration::from_secs(60));
    let ids: Vec<String> = (0..3).map(|i| c.node_id(i).unwrap()).collect();

    // Nodes 0 and 1 edit the same three files while cut off from each other (and from
    // node 2, which keeps the original).
    c.stop(1);
    c.stop(2);
    for name in ["a.txt", "b.txt", "c.txt"] {
        fs::write(c.vol(0).join(name), format!("{name} edited on node 0")).unwrap();
    }
    std::thread::sleep(Duration::from_secs(2));
    c.stop(0);
    for name in ["a.txt", "b.txt", "c.txt"] {
        fs::write(
            c.vol(1).join(name),
            format!("{name} edited on node 1, longer"),
        )
        .unwrap();
    }
    c.start(1);
    std::thread::sleep(Duration::from_secs(2));
    c.stop(1);
    c.start_all();
    c.wait_connected(Duration::from_secs(30));
    c.wait_converged(&[0, 1, 2], Duration::from_secs(60));

    // Every node lists the same three copies, each with the name it lost and both
    // versions: one made by node 0, the other by node 1.
    let mut listed = Vec::new();
    for i in 0..3 {
        let copies = conflicts(&c, i).unwrap();
        assert_eq!(copies.len(), 3, "node {i}: {copies:#?}");
        for copy in &copies {
            let original = copy["original"].as_str().unwrap();
            let path = copy["path"].as_str().unwrap();
            assert!(
                ["a.txt", "b.txt", "c.txt"].contains(&original)
                    && path.starts_with(&original[..1])
                    && path.contains(".sync-conflict-"),
                "{copy:#}"
            );
            let theirs = &copy["copy"];
            let mine = &copy["current"];
            let on_disk = |name: &str| fs::metadata(c.vol(i).join(name)).unwrap().len();
            assert_eq!(theirs["size"].as_u64(), Some(on_disk(path)), "{copy:#}");
            assert_eq!(mine["size"].as_u64(), Some(on_disk(original)), "{copy:#}");
            assert_eq!(theirs["kind"], "file");
            let mut nodes = [
                theirs["node"].as_str().unwrap().to_string(),
                mine["node"].as_str().unwrap().to_string(),
            ];
            nodes.sort();
            let mut expected = [ids[0].clone(), ids[1].clone()];
            expected.sort();
            assert_eq!(nodes, expected, "{copy:#}");
            assert!(theirs["modified"].as_str().unwrap().ends_with('Z'));
            assert!(theirs["node_name"].is_string(), "{copy:#}");
        }
        let mut paths: Vec<String> = copies
            .iter()
            .map(|c| c["path"].as_str().unwrap().to_string())
            .collect();
        paths.sort();
        listed.push(paths);
    }
    assert!(listed.iter().all(|l| *l == listed[0]), "{listed:?}");
    // For people: each copy, the name it lost, both versions, and how to settle them.
    let out = control(&c, 2, &["conflicts", "vol"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let first = format!("vol/{}\n  lost the name vol/a.txt\n", listed[0][0]);
    for expected in [
        first.as_str(),
        "theirs (the copy):  file of ",
        "mine (the name):    file of ",
        "by node0 (",
        "by node1 (",
        "3 conflict copies; settle one with `shoal conflicts resolve",
    ] {
        assert!(text.contains(expected), "{expected:?} in:\n{text}");
    }
    let copy_of = |original: &str| {
        listed[0]
            .iter()
            .find(|p| p.starts_with(&original[..1]))
            .unwrap()
            .clone()
    };
    let (copy_a, copy_b, copy_c) = (copy_of("a.txt"), copy_of("b.txt"), copy_of("c.txt"));
    let content = |i: usize, name: &str| fs::read(c.vol(i).join(name)).unwrap();
    let (theirs_a, mine_b, mine_c, theirs_c) = (
        content(2, &copy_a),
        content(2, "b.txt"),
        content(2, "c.txt"),
        content(2, &copy_c),
    );

    // Node 2, which made neither version, settles them: the same words mean the same
    // versions on every node. Paths as the listing prints them, or on disk.
    let resolve = |path: &str, keep: &str| {
        let out = control(&c, 2, &["conflicts", "resolve", path, "--keep", keep]);
        assert!(
            out.status.success(),
            "resolve {path} --keep {keep}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    resolve(&format!("vol/{copy_a}"), "theirs");
    resolve(c.vol(2).join(&copy_b).to_str().unwrap(), "mine");
    let said = resolve(&format!("vol/{copy_c}"), "both");
    let kept_c = copy_c.replace(".sync-conflict-", ".");
    assert!(said.contains(&kept_c), "{said}");
    let out = control(
        &c,
        2,
        &["conflicts", "resolve", "vol/a.txt", "--keep", "mine"],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a conflict copy"));

    // Each is an ordinary change: it reaches every node, and one version is left.
    let listed = || (0..3).map(|i| conflicts(&c, i)).collect::<Vec<_>>();
    wait_explained(
        Duration::from_secs(60),
        || {
            listed()
                .iter()
                .all(|l| l.as_ref().is_ok_and(|l| l.is_empty()))
        },
        || {
            let logs = (0..3)
                .map(|i| format!("--- node {i} log:\n{}", crate::cluster::tail(&c.log(i), 40)))
                .collect::<Vec<_>>();
            format!(
                "conflict copies still listed after 60 s: {:#?}\n{}",
                listed(),
                logs.join("\n")
            )
        },
    );
    c.wait_converged(&[0, 1, 2], Duration::from_secs(60));
    for i in 0..3 {
        let names = crate::cluster::names(&c.vol(i));
        assert_eq!(
            names,
            {
                let mut want = vec![
                    "a.txt".to_string(),
                    "b.txt".to_string(),
                    "c.txt".to_string(),
                    kept_c.clone(),
                ];
                want.sort();
                want
            },
            "node {i}"
        );
        assert_eq!(content(i, "a.txt"), theirs_a, "node {i}");
        assert_eq!(content(i, "b.txt"), mine_b, "node {i}");
        assert_eq!(content(i, "c.txt"), mine_c, "node {i}");
        assert_eq!(content(i, &kept_c), theirs_c, "node {i}");
    }
}

/// Writes `len` random bytes as `name` on node `from`; how long until node `to` has it.
fn transfer(c: &Cluster, (from, to): (usize, usize), name: &str, len: usize) -> Duration {
    let started = Instant::now();
    fs::write(
        c.vol(from).join(name),
        crate::util::random_bytes(len, len as u64 + from as u64),
    )
    .unwrap();
    wait_for(Duration::from_secs(120), "the file arrived", || {
        fs::metadata(c.vol(to).join(name)).is_ok_and(|m| m.len() == len as u64)
    });
    started.elapsed()
}

#[test]
fn max_rate_peer_holds_chunk_bytes_to_and_from_that_peer() {
    let mut c = Cluster::new(2);
    // Node 1 caps what it exchanges with node 0 (named by its certificate), not itself.
    c.extra_env[1].push(("SHOAL_MAX_RATE_PEER".into(), "64M node0=1M".into()));
    c.start_all();
    c.wait_connected(Duration::from_secs(30));
    let peer_rate_shown = |c: &Cluster, rate: u64| {
        let family = format!(
            "shoal_peer_max_rate_bytes_per_second{{peer=\"{}:7029\"}} {rate}\n",
            c.ip(0)
        );
        c.metrics(1).is_some_and(|m| {
            m.contains(&family) && m.contains("shoal_max_rate_bytes_per_second 0\n")
        })
    };
    assert!(peer_rate_shown(&c, 1 << 20), "{:?}", c.metrics(1));
    assert_eq!(
        c.status(1).unwrap()["peers"][0]["max_rate"].as_u64(),
        Some(1 << 20)
    );
    // Lower bounds, as for the node's limit: 4 MiB at 1 MiB/s with one second lent.
    let took = transfer(&c, (0, 1), "received.bin", 4 << 20);
    assert!(took >= Duration::from_secs(3), "4 MiB received in {took:?}");
    // Both ways: node 0 has no limit, but node 1 sends to it at its rate.
    let took = transfer(&c, (1, 0), "sent.bin", 4 << 20);
    assert!(took >= Duration::from_secs(3), "4 MiB sent in {took:?}");

    let out = control(&c, 1, &["set", "max-rate", "256K", "--peer", "node0"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(peer_rate_shown(&c, 256 << 10));
    let took = transfer(&c, (0, 1), "slower.bin", 1 << 20);
    assert!(
        took >= Duration::from_secs(3),
        "1 MiB at 256 KiB/s in {took:?}"
    );
    c.wait_converged(&[0, 1], Duration::from_secs(30));
    assert!(
        control(&c, 1, &["set", "max-rate", "off", "--peer", "node0"])
            .status
            .success()
    );
    assert!(peer_rate_shown(&c, 0));
    let out = control(&c, 1, &["set", "max-rate", "1M", "--peer", "../x"]);
    assert_eq!(out.status.code(), Some(2));
}
