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
    // file (a small file is one chunk, named by its BLAKE3) and for one of `vol`. Node0
    // noted where that chunk is when it listed `private` to node1: the note is read
    // under the same check as the index.
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
            ] if *id == private_chunk && data.to_vec() == b"for everyone"
        ),
        "{answers:?}"
    );
}

/// A `shoal signer` process, killed when dropped.
struct Signer {
    child: std::process::Child,
    addr: String,
}

impl Signer {
    /// Starts the signer for the CA in `ca` on `addr`, issuing certificates valid for
    /// `lifetime`, logging to `log`.
    fn start(ca: &std::path::Path, addr: String, lifetime: &str, log: &std::path::Path) -> Self {
        let log = fs::File::create(log).unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_shoal"))
            .args(["signer", "--ca", ca.to_str().unwrap(), "--listen", &addr])
            .args(["--lifetime", lifetime])
            .env("SHOAL_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Signer { child, addr }
    }
}

impl Drop for Signer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Gives node `i` credentials holding only `ca.pem` and the join token now in `ca`, and
/// the signer to enroll with.
fn enroll_with(c: &mut Cluster, i: usize, ca: &std::path::Path, signer: &Signer) {
    let dir = c.dir.path().join(format!("enroll-node{i}"));
    fs::create_dir_all(&dir).unwrap();
    for file in ["ca.pem", "join-token"] {
        fs::copy(ca.join(file), dir.join(file)).unwrap();
    }
    c.credentials[i] = dir;
    c.extra_env[i].push(("SHOAL_SIGNER".into(), signer.addr.clone()));
}

#[test]
fn nodes_enroll_with_the_join_token_and_a_rotated_token_admits_only_new_nodes() {
    let mut c = Cluster::new(3);
    let ca = c.credentials[0].clone();
    let signer = Signer::start(
        &ca,
        format!("{}:7031", c.ip(9)),
        "1h",
        &c.dir.path().join("signer.log"),
    );
    for i in 0..3 {
        enroll_with(&mut c, i, &ca, &signer);
    }
    write_file(&c.vol(0).join("a.txt"), b"from an enrolled node");
    c.start(0);
    c.start(1);
    c.wait_converged(&[0, 1], Duration::from_secs(30));
    let (addr0, addr1) = (format!("{}:7029", c.ip(0)), format!("{}:7029", c.ip(1)));
    wait_for(Duration::from_secs(30), "nodes 0 and 1 connected", || {
        connected_to(&c, 0, &addr1) && connected_to(&c, 1, &addr0)
    });
    for i in 0..2 {
        let state = c.dir.path().join(format!("node{i}/state/identity"));
        assert!(state.join("cert.pem").is_file() && state.join("key.pem").is_file());
        assert!(!c.credentials[i].join("ca-key.pem").exists());
    }
    let status = c.status(0).unwrap();
    let peer = status["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["addr"] == addr1.as_str())
        .unwrap()
        .clone();
    assert_eq!(peer["name"], "node1", "{status}");
    let expires = humantime::parse_rfc3339(peer["cert_expires"].as_str().unwrap()).unwrap();
    let left = expires
        .duration_since(std::time::SystemTime::now())
        .unwrap();
    assert!(left <= Duration::from_secs(3600), "{left:?} {status}");

    // Rotation: node 2 still holds the old token.
    let out = shoal(&["cluster", "rotate-token", "--ca", ca.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_ne!(
        fs::read(ca.join("join-token")).unwrap(),
        fs::read(c.credentials[2].join("join-token")).unwrap()
    );
    c.start(2);
    assert_eq!(
        c.wait_exit(2, Duration::from_secs(60)),
        Some(2),
        "{}",
        c.log(2)
    );
    assert!(c.log(2).contains("BAD_TOKEN"), "{}", c.log(2));
    // The members were not disturbed.
    for (i, other) in [(0, &addr1), (1, &addr0)] {
        assert!(connected_to(&c, i, other), "node {i}: {}", c.log(i));
        assert!(!c.log(i).contains("disconnected"), "node {i}: {}", c.log(i));
    }

    // With the new token it joins and converges.
    fs::copy(ca.join("join-token"), c.credentials[2].join("join-token")).unwrap();
    write_file(&c.vol(1).join("b.txt"), b"after the rotation");
    c.start(2);
    c.wait_converged(&[0, 1, 2], Duration::from_secs(30));
    assert!(c.vol(2).join("b.txt").is_file());
    let log = fs::read_to_string(c.dir.path().join("signer.log")).unwrap();
    assert!(
        log.contains("refused") && log.contains("BAD_TOKEN"),
        "{log}"
    );
}

#[test]
fn enrolled_nodes_renew_while_syncing_new_handshakes_use_the_new_certificate_and_a_revoked_node_cannot_renew()
 {
    let mut c = Cluster::new(3);
    let ca = c.credentials[0].clone();
    let signer = Signer::start(
        &ca,
        format!("{}:7031", c.ip(9)),
        "20s",
        &c.dir.path().join("signer.log"),
    );
    for i in 0..3 {
        enroll_with(&mut c, i, &ca, &signer);
    }
    c.start(0);
    c.start(1);
    let (addr0, addr1) = (format!("{}:7029", c.ip(0)), format!("{}:7029", c.ip(1)));
    wait_for(Duration::from_secs(30), "nodes 0 and 1 connected", || {
        connected_to(&c, 0, &addr1) && connected_to(&c, 1, &addr0)
    });
    let first_expiry = |i: usize| {
        let text = fs::read_to_string(
            c.dir
                .path()
                .join(format!("node{i}/state/identity/cert.pem")),
        );
        text.unwrap()
    };
    let first = (first_expiry(0), first_expiry(1));

    // Files keep coming while both nodes renew twice (past their first certificates'
    // expiry): transfers are in flight across the renewals.
    let renewals = |c: &Cluster, i: usize| c.log(i).matches("certificate renewed").count();
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut n = 0u32;
    while renewals(&c, 0) < 2 || renewals(&c, 1) < 2 {
        assert!(
            Instant::now() < deadline,
            "two renewals each within 90 s:\n{}\n{}",
            c.log(0),
            c.log(1)
        );
        let body: Vec<u8> = (0..1 << 20)
            .map(|k: u32| (k.wrapping_mul(2654435761) >> 13 ^ n) as u8)
            .collect();
        write_file(
            &c.vol(n as usize % 2).join(format!("stream/{n}.bin")),
            &body,
        );
        n += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    c.wait_converged(&[0, 1], Duration::from_secs(60));
    assert!(c.vol(1).join(format!("stream/{}.bin", n - 2)).is_file());
    for i in 0..2 {
        let log = c.log(i);
        assert!(
            !log.contains("disconnected"),
            "node {i} dropped a connection:\n{log}"
        );
        assert!(!log.contains("pull failed"), "node {i}:\n{log}");
    }
    assert_ne!(first.0, first_expiry(0));
    assert_ne!(first.1, first_expiry(1));

    // A node that starts now can only shake hands with certificates that are valid now.
    c.start(2);
    c.wait_converged(&[0, 1, 2], Duration::from_secs(60));
    wait_for(Duration::from_secs(30), "node 2 connected to both", || {
        connected_to(&c, 2, &addr0) && connected_to(&c, 2, &addr1)
    });

    // Revoked, node 1 cannot renew.
    let out = shoal(&["cluster", "revoke", "node1", "--ca", ca.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for(Duration::from_secs(30), "node 1 refused renewal", || {
        c.log(1).contains("REVOKED")
    });
    drop(signer);
}

#[test]
fn one_revoke_on_the_signer_reaches_every_enrolled_member_within_a_heartbeat() {
    let mut c = Cluster::new(3);
    c.heartbeat = 2;
    let ca = c.credentials[0].clone();
    let signer = Signer::start(
        &ca,
        format!("{}:7031", c.ip(9)),
        "1h",
        &c.dir.path().join("signer.log"),
    );
    for i in 0..3 {
        enroll_with(&mut c, i, &ca, &signer);
    }
    write_file(
        &c.vol(0).join("before.txt"),
        b"shared before the revocation",
    );
    c.start_all();
    c.wait_connected(Duration::from_secs(30));
    c.wait_converged(&[0, 1, 2], Duration::from_secs(30));
    let ids: Vec<String> = (0..2).map(|i| c.node_id(i).unwrap()).collect();

    // One command, on the signer's CA directory; no file is copied to any member.
    let out = shoal(&["cluster", "revoke", "node2", "--ca", ca.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
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
    c.wait_converged(&[0, 1], Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(2 * c.heartbeat + 1));
    for name in ["after.txt", "after-1.txt"] {
        assert!(
            !c.vol(2).join(name).exists(),
            "{name} reached the revoked node"
        );
    }
    for (i, id) in ids.iter().enumerate() {
        assert!(
            !connected_to(&c, i, &revoked),
            "node {i} took the revoked node back"
        );
        assert_eq!(&c.node_id(i).unwrap(), id, "node {i} was re-keyed");
    }
    drop(signer);
}

#[test]
fn a_revocation_one_member_learns_travels_to_the_others_and_repair_honours_it() {
    let mut c = Cluster::new(3);
    c.heartbeat = 2;
    let ca = c.dir.path().join("ca");
    assert!(
        shoal(&["cluster", "init", "--out", ca.to_str().unwrap()])
            .status
            .success()
    );
    for i in 0..3 {
        let out_dir = c.dir.path().join(format!("creds-node{i}"));
        let out = shoal(&[
            "cluster",
            "add-node",
            &format!("node{i}"),
            "--ca",
            ca.to_str().unwrap(),
            "--out",
            out_dir.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        c.credentials[i] = out_dir;
    }
    write_file(&c.vol(2).join("held-by-all.txt"), b"everyone has this");
    c.start_all();
    c.wait_connected(Duration::from_secs(30));
    c.wait_converged(&[0, 1, 2], Duration::from_secs(30));

    // Only node 0 is given the list; node 1 learns it from node 0.
    let out = shoal(&["cluster", "revoke", "node2", "--ca", ca.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    fs::copy(
        ca.join("revocations.txt"),
        c.credentials[0].join("revocations.txt"),
    )
    .unwrap();
    let revoked = format!("{}:7029", c.ip(2));
    for i in 0..2 {
        wait_for(
            Duration::from_secs(2 * c.heartbeat + 3),
            &format!("node {i} drops the revoked node"),
            || !connected_to(&c, i, &revoked),
        );
    }
    assert!(!c.credentials[1].join("revocations.txt").exists());
    assert!(c.log(1).contains("revocation list adopted"), "{}", c.log(1));
    let kept = c.dir.path().join("node1/state/identity/revocations.txt");
    assert!(fs::read_to_string(&kept).unwrap().contains("name node2"));

    // Node 1 keeps it across a restart, and its repair will not fetch from node 2.
    c.stop(1);
    fs::remove_file(c.vol(1).join("held-by-all.txt")).unwrap();
    let node1 = c.dir.path().join("node1");
    let repaired = crate::util::shoal_at(
        &node1.join("data"),
        &node1.join("state"),
        "repair",
        &[
            "--volume",
            "vol",
            "--peer",
            &revoked,
            "--credentials",
            c.credentials[1].to_str().unwrap(),
        ],
    );
    let said = format!("{}{}", stdout(&repaired), stderr(&repaired));
    assert_eq!(repaired.status.code(), Some(1), "{said}");
    assert!(said.contains("revoked"), "{said}");
    assert!(!c.vol(1).join("held-by-all.txt").exists());
    c.start(1);
    let addr0 = format!("{}:7029", c.ip(0));
    wait_for(Duration::from_secs(30), "node 1 back with node 0", || {
        connected_to(&c, 1, &addr0)
    });
    std::thread::sleep(Duration::from_secs(2 * c.heartbeat + 1));
    assert!(
        !connected_to(&c, 1, &revoked),
        "node 1 forgot the revocation"
    );
}

#[test]
fn the_signer_refuses_a_wrong_token_and_then_rate_limits_the_address() {
    use shoal::enroll::Refusal;
    use shoal::enroll::client::{EnrollError, Enrollment};
    let c = Cluster::new(1);
    let ca = c.credentials[0].clone();
    let signer = Signer::start(
        &ca,
        format!("{}:7031", c.ip(9)),
        "1h",
        &c.dir.path().join("signer.log"),
    );
    let node = c.dir.path().join("enroll");
    fs::create_dir_all(&node).unwrap();
    fs::copy(ca.join("ca.pem"), node.join("ca.pem")).unwrap();
    let wrong = format!("SHOAL-TOKEN-1-{}", "0".repeat(64));
    fs::write(node.join("join-token"), &wrong).unwrap();
    let enrollment = Enrollment {
        signer: signer.addr.clone(),
        credentials_dir: node.clone(),
        state_dir: c.dir.path().join("enroll-state"),
        node_name: Some("intruder".into()),
        gso: true,
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let code = |enrollment: &Enrollment| match runtime.block_on(enrollment.obtain()) {
        Err(EnrollError::Refused { code, .. }) => Some(code),
        Err(e) => panic!("{e}"),
        Ok(_) => None,
    };
    // The signer may take a moment to listen.
    wait_for(Duration::from_secs(30), "the signer answers", || {
        runtime.block_on(enrollment.revocations_after(0)).is_ok()
    });
    for _ in 0..5 {
        assert_eq!(code(&enrollment), Some(Refusal::BadToken));
    }
    assert_eq!(code(&enrollment), Some(Refusal::RateLimited));
    // The right token does not help the same address within the window.
    fs::copy(ca.join("join-token"), node.join("join-token")).unwrap();
    assert_eq!(code(&enrollment), Some(Refusal::RateLimited));
    assert!(!c.dir.path().join("enroll-state/identity/cert.pem").exists());
    let log = fs::read_to_string(c.dir.path().join("signer.log")).unwrap();
    assert!(
        !log.contains(&wrong[14..]),
        "the signer logged a token: {log}"
    );
}
