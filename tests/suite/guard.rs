//! The delete guard (issue 14) on real `shoal serve` processes: a mass delete, or a volume
//! emptied while the node watches it, is held back from peers (by every path: the tree
//! walk, announcements, and pulls that would bring the names back) until `shoal release`;
//! a restart keeps the hold; turned off, deletes flow as before. (A volume found empty at
//! start pulls and deletes nothing: `sync::an_empty_node_pulls_and_deletes_nothing`;
//! the last file of a volume, under the guard's minimum, goes without a release:
//! `faults::deleting_the_last_file_of_a_volume_on_a_running_node_stays_deleted`.)

use std::fs;
use std::time::Duration;

use crate::cluster::{Cluster, names};
use crate::control::{control, wait_for};
use crate::util::write_file;

const CONVERGE: Duration = Duration::from_secs(60);

/// Heartbeats (1 s) and pull rounds left to run while a hold must stand.
const SEVERAL_ROUNDS: Duration = Duration::from_secs(6);

/// A cluster of two whose volume has `files` files (`f00`.. in `d/` and the root half
/// each), started and converged.
fn converged_pair(files: usize, env: &[(&str, &str)]) -> Cluster {
    let mut c = Cluster::new(2);
    for (key, value) in env {
        c.extra_env[0].push((key.to_string(), value.to_string()));
    }
    for f in 0..files {
        let dir = if f % 2 == 0 { "" } else { "d/" };
        write_file(&c.vol(0).join(format!("{dir}f{f:02}")), &[f as u8; 100]);
    }
    c.start_all();
    c.wait_connected(CONVERGE);
    c.wait_converged(&[0, 1], CONVERGE);
    assert_eq!(names(&c.vol(1)), names(&c.vol(0)));
    c
}

/// The names node `i`'s `/status` says the guard holds, if it holds any.
fn held(c: &Cluster, i: usize) -> Option<u64> {
    c.status(i)?["volumes"][0]["deletes_held"]["names"].as_u64()
}

/// Waits until node `i` holds `names` names, or fails with what it holds and its log.
fn wait_held(c: &Cluster, i: usize, names: u64) {
    let deadline = std::time::Instant::now() + CONVERGE;
    while held(c, i) != Some(names) {
        assert!(
            std::time::Instant::now() < deadline,
            "node {i} holds {:?} names, not {names}:\n{}",
            held(c, i),
            c.log(i)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn release(c: &Cluster, i: usize) {
    let out = control(c, i, &["release", "vol"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("releasing"),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What node `i` shows of a hold of `names` names: `/status` (with what to do),
/// `/metrics`, readiness, and one log line naming some of them.
fn assert_hold_shown(c: &Cluster, i: usize, names: u64) {
    let status = c.status(i).unwrap();
    let shown = &status["volumes"][0]["deletes_held"];
    assert_eq!(shown["names"].as_u64(), Some(names), "{status:#}");
    assert_eq!(
        shown["message"],
        format!("delete held: {names} names, release with `shoal release vol`"),
    );
    assert_eq!(status["health"]["ready"], false, "{status:#}");
    assert!(
        status["health"]["causes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["kind"] == "delete_held"),
        "{status:#}"
    );
    let metrics = c.metrics(i).unwrap();
    assert!(
        metrics.contains(&format!(
            "shoal_volume_deletes_held{{volume=\"vol\"}} {names}"
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("shoal_degraded_causes{cause=\"delete_held\"} 1"),
        "{metrics}"
    );
    let log = c.log(i);
    assert_eq!(
        log.matches("the delete guard holds back from peers")
            .count(),
        1,
        "said once:\n{log}"
    );
}

#[test]
fn deleting_most_of_a_volume_reaches_no_peer_until_released() {
    let c = converged_pair(20, &[]);
    // 16 of 20 files (80%), and the directory `d` they leave empty stays.
    let all = names(&c.vol(0));
    let deleted: Vec<String> = (0..16)
        .map(|f| {
            let dir = if f % 2 == 0 { "" } else { "d/" };
            format!("{dir}f{f:02}")
        })
        .collect();
    for name in &deleted {
        fs::remove_file(c.vol(0).join(name)).unwrap();
    }
    wait_held(&c, 0, 16);
    // A peer's newer version of a held name is not taken over the delete either.
    write_file(
        &c.vol(1).join("f00"),
        b"edited on node 1 after node 0 deleted it",
    );
    std::thread::sleep(SEVERAL_ROUNDS);
    assert_eq!(names(&c.vol(1)), all, "a held delete reached node 1");
    let left: Vec<String> = all
        .iter()
        .filter(|n| !deleted.contains(n))
        .cloned()
        .collect();
    assert_eq!(names(&c.vol(0)), left, "node 0 fetched held names back");
    assert_hold_shown(&c, 0, 16);
    // A held name put back on disk (as a restore would) is no longer held.
    write_file(&c.vol(0).join("f02"), &[2; 100]);
    wait_held(&c, 0, 15);
    let left: Vec<String> = {
        let mut left = left;
        left.push("f02".to_string());
        left.sort();
        left
    };

    release(&c, 0);
    wait_for(CONVERGE, "the released deletes on node 1", || {
        !c.vol(1).join("f04").exists() && !c.vol(1).join("d/f01").exists()
    });
    c.wait_converged(&[0, 1], CONVERGE);
    // f00 was edited on node 1 without seeing the delete: the edit wins, as any
    // concurrent edit over a delete.
    let mut expected = left.clone();
    expected.push("f00".to_string());
    expected.sort();
    for i in 0..2 {
        assert_eq!(names(&c.vol(i)), expected, "node {i}");
    }
    assert_eq!(held(&c, 0), None);
    let status = c.status(0).unwrap();
    assert_eq!(status["health"]["ready"], true, "{status:#}");
    assert!(
        c.metrics(0)
            .unwrap()
            .contains("shoal_volume_deletes_held{volume=\"vol\"} 0")
    );
}

#[test]
fn a_volume_emptied_while_watched_is_held_across_a_restart_until_released() {
    let mut c = converged_pair(12, &[]);
    let all = names(&c.vol(0));
    fs::remove_dir_all(c.vol(0).join("d")).unwrap();
    for f in (0..12).step_by(2) {
        fs::remove_file(c.vol(0).join(format!("f{f:02}"))).unwrap();
    }
    // `d` and its 6 files, and the 6 files of the root.
    wait_held(&c, 0, 13);
    std::thread::sleep(SEVERAL_ROUNDS);
    assert_eq!(names(&c.vol(1)), all, "a held delete reached node 1");
    assert_eq!(names(&c.vol(0)), Vec::<String>::new(), "undone on node 0");
    assert_hold_shown(&c, 0, 13);

    // A restart finds the volume empty: still held, not taken for a fresh volume.
    c.stop(0);
    c.start(0);
    c.wait_connected(CONVERGE);
    std::thread::sleep(SEVERAL_ROUNDS);
    assert_eq!(held(&c, 0), Some(13));
    assert_eq!(names(&c.vol(1)), all, "a held delete reached node 1");
    assert_eq!(names(&c.vol(0)), Vec::<String>::new(), "undone on node 0");
    assert!(
        !c.log(0).contains("treating it as a fresh volume"),
        "{}",
        c.log(0)
    );
    // Names gone on purpose are not damage to verify (nor for repair to bring back).
    let verified = c.verify_all(&[0]);
    assert!(verified.contains("(exit Some(0))"), "{verified}");

    release(&c, 0);
    wait_for(CONVERGE, "the released deletes on node 1", || {
        names(&c.vol(1)).is_empty()
    });
    std::thread::sleep(SEVERAL_ROUNDS);
    c.wait_converged(&[0, 1], CONVERGE);
    for i in 0..2 {
        assert_eq!(names(&c.vol(i)), Vec::<String>::new(), "node {i}");
    }
    assert_eq!(held(&c, 0), None);
}

#[test]
fn with_the_guard_off_a_mass_delete_flows_as_before() {
    // The guard off for this volume (the per-volume form of the setting).
    let c = converged_pair(20, &[("SHOAL_DELETE_GUARD", "50%/10 vol=off")]);
    for f in 0..16 {
        let dir = if f % 2 == 0 { "" } else { "d/" };
        fs::remove_file(c.vol(0).join(format!("{dir}f{f:02}"))).unwrap();
    }
    wait_for(CONVERGE, "the deletes on node 1", || {
        names(&c.vol(1)).len() == 5
    });
    c.wait_converged(&[0, 1], CONVERGE);
    assert_eq!(names(&c.vol(1)), names(&c.vol(0)));
    assert_eq!(held(&c, 0), None);
    assert!(!c.log(0).contains("the delete guard holds"), "{}", c.log(0));
}
