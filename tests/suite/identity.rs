//! Per-node identity on real processes: revocation, offline-issued credentials.

use std::fs;
use std::time::{Duration, Instant};

use crate::cluster::*;
use crate::util::{shoal, stderr, stdout, write_file};

/// Polls `check` every 100 ms until it holds; panics with `what` after `timeout`.
fn wait_for(timeout: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "{what} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether node `i` shows its peer at `addr` as connected.
fn connected_to(c: &Cluster, i: usize, addr: &str) -> bool {
    c.status(i).is_some_and(|s| {
        s["peers"].as_array().is_some_and(|peers| {
            peers
                .iter()
                .any(|p| p["addr"] == addr && p["connected"] == true)
        })
    })
}

#[test]
fn a_revoked_node_is_dropped_within_a_heartbeat_and_receives_nothing_after() {
    let mut c = Cluster::new(3);
    c.heartbeat = 2;
    write_file(
        &c.vol(0).join("before.txt"),
        b"shared before the revocation",
    );
    c.start_all();
    c.wait_connected(Duration::from_secs(30));
    c.wait_converged(&[0, 1, 2], Duration::from_secs(30));
    let ids: Vec<String> = (0..2).map(|i| c.node_id(i).unwrap()).collect();
    let keys: Vec<Vec<u8>> = (0..2)
        .map(|i| fs::read(c.dir.path().join(format!("node{i}/state/identity/key.pem"))).unwrap())
        .collect();

    // One command, on the CA's directory (which the nodes also read their credentials from).
    let out = shoal(&[
        "cluster",
        "revoke",
        "node2",
        "--ca",
        c.credentials[0].to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("serial 1"), "{}", stdout(&out));
    let revoked = format!("{}:7029", c.ip(2));
    for i in 0..2 {
        wait_for(
            Duration::from_secs(2 * c.heartbeat + 3),
            &format!("node {i} drops the revoked node"),
            || !connected_to(&c, i, &revoked),
        );
    }

    write_file(&c.vol(0).join("after.txt"), b"written after the revocation");
    write_file(&c.vol(1).join("after-1.txt"), b"also after");
    write_file(&c.vol(2).join("from-revoked.txt"), b"the revoked node's");
    c.wait_converged(&[0, 1], Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(2 * c.heartbeat + 1));
    for name in ["after.txt", "after-1.txt"] {
        assert!(
            !c.vol(2).join(name).exists(),
            "{name} reached the revoked node"
        );
    }
    for i in 0..2 {
        assert!(!c.vol(i).join("from-revoked.txt").exists());
        assert!(
            !connected_to(&c, i, &revoked),
            "node {i} took the revoked node back"
        );
        assert!(c.log(i).contains("revocation list adopted"), "{}", c.log(i));
    }
    // Nobody else was re-keyed: the same keys, the same ids.
    for i in 0..2 {
        assert_eq!(c.node_id(i).unwrap(), ids[i]);
        let key = fs::read(c.dir.path().join(format!("node{i}/state/identity/key.pem"))).unwrap();
        assert_eq!(key, keys[i]);
    }
    let log = c.log(2);
    assert!(log.contains("is revoked by the cluster CA"), "{log}");
    assert!(
        log.contains("node node2") && log.contains("is revoked"),
        "{log}"
    );
}

#[test]
fn nodes_with_offline_issued_credentials_sync_and_show_each_others_identity() {
    let mut c = Cluster::new(2);
    let ca = c.dir.path().join("ca");
    assert!(
        shoal(&["cluster", "init", "--out", ca.to_str().unwrap()])
            .status
            .success()
    );
    for i in 0..2 {
        let out_dir = c.dir.path().join(format!("creds-node{i}"));
        let out = shoal(&[
            "cluster",
            "add-node",
            &format!("node{i}"),
            "--ca",
            ca.to_str().unwrap(),
            "--out",
            out_dir.to_str().unwrap(),
            "--days",
            "7",
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(!out_dir.join("ca-key.pem").exists());
        c.credentials[i] = out_dir;
    }
    write_file(&c.vol(0).join("a.txt"), b"hello");
    c.start_all();
    c.wait_converged(&[0, 1], Duration::from_secs(30));
    c.wait_connected(Duration::from_secs(30));
    let status = c.status(0).unwrap();
    let peer = &status["peers"][0];
    assert_eq!(peer["name"], "node1", "{status}");
    assert_eq!(peer["node_id"], c.node_id(1).unwrap().as_str(), "{status}");
    let expires = peer["cert_expires"].as_str().unwrap();
    let expires = humantime::parse_rfc3339(expires).unwrap();
    let left = expires
        .duration_since(std::time::SystemTime::now())
        .unwrap();
    assert!(
        left > Duration::from_secs(6 * 86_400) && left <= Duration::from_secs(7 * 86_400),
        "{left:?} {status}"
    );
}
