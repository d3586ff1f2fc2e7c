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

#[test]
fn a_volume_limited_to_two_nodes_never_reaches_the_third_nor_comes_from_it() {
    let mut c = Cluster::new(3);
    c.more_volumes = vec!["private".into()];
    for i in 0..3 {
        c.extra_env[i] = vec![("SHOAL_ACCESS".into(), "private=node0,node1".into())];
    }
    let private = |c: &Cluster, i: usize| c.vol(i).parent().unwrap().join("private");
    let secret = b"only for node0 and node1";
    write_file(&private(&c, 0).join("secret.txt"), secret);
    write_file(&c.vol(0).join("shared.txt"), b"for everyone");
    write_file(&private(&c, 2).join("from-c.txt"), b"node2 offers this");
    c.start_all();
    c.wait_connected(Duration::from_secs(30));
    c.wait_converged(&[0, 1, 2], Duration::from_secs(30));
    wait_for(
        Duration::from_secs(30),
        "node1 gets the private volume",
        || private(&c, 1).join("secret.txt").exists(),
    );
    std::thread::sleep(Duration::from_secs(2 * c.heartbeat + 1));
    assert!(c.vol(2).join("shared.txt").exists());
    assert!(
        !private(&c, 2).join("secret.txt").exists(),
        "the private volume reached node2"
    );
    for i in 0..2 {
        assert!(
            !private(&c, i).join("from-c.txt").exists(),
            "node2's private file reached node{i}"
        );
    }
    let log = c.log(2);
    assert!(log.contains("may not hold volume private"), "{log}");

    // Chunks too: a member that may not hold `private` asks node0 for the chunk of its
    // file (a small file is one chunk, named by its BLAKE3) and for one of `vol`.
    let member = crate::hostile::HostileClient::connect(
        &c.credentials[0],
        &c.ip(5),
        &format!("{}:7029", c.ip(0)),
        "vol",
    );
    let private_chunk = shoal::ids::ChunkId::of(secret);
    let shared_chunk = shoal::ids::ChunkId::of(b"for everyone");
    let answers = member.request(&shoal::protocol::Request::GetChunks {
        ids: vec![private_chunk, shared_chunk],
    });
    assert!(
        matches!(
            answers.as_slice(),
            [
                shoal::protocol::Response::ChunkMissing { id },
                shoal::protocol::Response::Chunk { data, .. },
            ] if *id == private_chunk && data == b"for everyone"
        ),
        "{answers:?}"
    );
}
