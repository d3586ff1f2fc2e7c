//! Kept versions on real `shoal serve` processes: every node that receives a change
//! keeps what it replaced, `shoal versions` lists it and `shoal restore` puts it back
//! (issue 14).

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::cluster::{Cluster, snapshot, tail};
use crate::util::{random_bytes, set_mtime, shoal, stderr, stdout};

fn state_dir(c: &Cluster, i: usize) -> PathBuf {
    c.dir.path().join(format!("node{i}/state"))
}

/// `shoal ARGS --state-dir` node `i`'s (through its running daemon).
fn on_node(c: &Cluster, i: usize, args: &[&str]) -> Output {
    let state = state_dir(c, i);
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--state-dir", state.to_str().unwrap()]);
    shoal(&all)
}

/// `shoal versions PATH --json` on node `i`: its versions, oldest first per path.
fn versions(c: &Cluster, i: usize, path: &str) -> Vec<Value> {
    let out = on_node(c, i, &["versions", path, "--json"]);
    assert!(out.status.success(), "node {i}: {}", stderr(&out));
    let listing: Value = serde_json::from_slice(&out.stdout).unwrap();
    listing["versions"].as_array().cloned().unwrap_or_default()
}

/// Puts `content` at `name` in node `i`'s volume in one rename, with its mode and
/// mtime already set: the watcher sees one change, not a write and then a chmod.
fn put(c: &Cluster, i: usize, name: &str, content: &[u8], mode: u32, mtime: u64) {
    let prep = c.dir.path().join(format!("node{i}/prep"));
    fs::create_dir_all(&prep).unwrap();
    let temp = prep.join("next");
    fs::write(&temp, content).unwrap();
    fs::set_permissions(&temp, fs::Permissions::from_mode(mode)).unwrap();
    set_mtime(&temp, mtime);
    let target = c.vol(i).join(name);
    fs::create_dir_all(target.parent().unwrap()).unwrap();
    fs::rename(&temp, target).unwrap();
}

fn mtime_ns(path: &Path) -> i64 {
    let meta = fs::metadata(path).unwrap();
    meta.mtime() * 1_000_000_000 + meta.mtime_nsec()
}

#[test]
fn a_file_overwritten_five_times_has_five_versions_on_each_receiver_each_restorable_exactly() {
    let mut c = Cluster::new(3);
    // (content, mode, mtime in s) of each version; some span several chunks.
    let made: Vec<(Vec<u8>, u32, u64)> = (0..6u64)
        .map(|k| {
            let len = [5_000, 300_000, 40, 700_000, 1, 90_000][k as usize];
            (
                random_bytes(len, 100 + k),
                [0o640, 0o600, 0o644, 0o755, 0o400, 0o664][k as usize],
                1_700_000_000 + k * 1000,
            )
        })
        .collect();
    put(&c, 0, "f.bin", &made[0].0, made[0].1, made[0].2);
    c.start_all();
    c.wait_connected(Duration::from_secs(30));
    c.wait_converged(&[0, 1, 2], Duration::from_secs(60));
    for (content, mode, mtime) in &made[1..] {
        put(&c, 0, "f.bin", content, *mode, *mtime);
        c.wait_converged(&[0, 1, 2], Duration::from_secs(60));
    }
    let writer = c.node_id(0).unwrap();
    let out = c.dir.path().join("restored");
    for i in [1, 2] {
        let listed = versions(&c, i, "vol/f.bin");
        assert_eq!(listed.len(), 5, "node {i}: {listed:#?}");
        for (k, version) in listed.iter().enumerate() {
            let (content, mode, mtime) = &made[k];
            assert_eq!(version["path"], "f.bin");
            assert_eq!(version["why"], "replaced");
            assert_eq!(version["replaced_by"].as_str(), Some(writer.as_str()));
            assert_eq!(version["size"].as_u64(), Some(content.len() as u64));
            assert_eq!(version["mode"].as_u64(), Some(u64::from(*mode)));
            assert_eq!(
                version["mtime_ns"].as_i64(),
                Some(*mtime as i64 * 1_000_000_000)
            );
            assert_eq!(version["held"], "here", "node {i}: {version:#}");
            let to = out.join(format!("node{i}-v{k}"));
            let id = version["id"].as_str().unwrap();
            let restored = on_node(
                &c,
                i,
                &[
                    "restore",
                    "vol/f.bin",
                    "--version",
                    id,
                    "--to",
                    to.to_str().unwrap(),
                ],
            );
            assert!(
                restored.status.success(),
                "node {i} version {k}: {}{}",
                stdout(&restored),
                stderr(&restored)
            );
            let file = to.join("f.bin");
            assert_eq!(&fs::read(&file).unwrap(), content, "node {i} version {k}");
            let meta = fs::metadata(&file).unwrap();
            assert_eq!(meta.permissions().mode() & 0o7777, *mode);
            assert_eq!(mtime_ns(&file), *mtime as i64 * 1_000_000_000);
        }
    }
    // The writer kept nothing: it made the changes itself.
    assert!(versions(&c, 0, "vol/f.bin").is_empty());
    // With its daemon stopped, a node lists from its store directly.
    c.stop(1);
    let data_root = c.dir.path().join("node1/data");
    let offline = on_node(
        &c,
        1,
        &[
            "versions",
            "vol/f.bin",
            "--json",
            "--data-root",
            data_root.to_str().unwrap(),
        ],
    );
    assert!(offline.status.success(), "{}", stderr(&offline));
    let listing: Value = serde_json::from_slice(&offline.stdout).unwrap();
    assert_eq!(listing["versions"].as_array().map(Vec::len), Some(5));
    let without_data_root = on_node(&c, 1, &["versions", "vol/f.bin"]);
    assert!(
        !without_data_root.status.success() && stderr(&without_data_root).contains("--data-root"),
        "{}",
        stderr(&without_data_root)
    );
    c.start(1);
    // A restore elsewhere synced nothing.
    c.wait_converged(&[0, 1, 2], Duration::from_secs(30));
    assert_eq!(fs::read(c.vol(2).join("f.bin")).unwrap(), made[5].0);
}

#[test]
fn a_directory_deleted_on_one_node_is_restored_as_it_was_and_reaches_every_node() {
    let mut c = Cluster::new(3);
    for k in 0..1000u64 {
        let name = match k % 4 {
            0 => format!("d/sub/f{k}.txt"),
            _ => format!("d/f{k}.txt"),
        };
        let path = c.vol(0).join(&name);
        crate::util::write_file(&path, &random_bytes(100 + (k as usize * 37) % 3000, k));
        fs::set_permissions(
            &path,
            fs::Permissions::from_mode(0o600 + (k as u32 % 2) * 0o44),
        )
        .unwrap();
        set_mtime(&path, 1_700_000_000 + k);
    }
    // Files the delete leaves: the directory is not most of the volume.
    for k in 0..1100u64 {
        crate::util::write_file(
            &c.vol(0).join(format!("keep/k{k}")),
            &random_bytes(64, 9000 + k),
        );
    }
    c.start_all();
    c.wait_connected(Duration::from_secs(30));
    c.wait_converged(&[0, 1, 2], Duration::from_secs(120));
    let before = snapshot(&c.vol(0));

    std::thread::sleep(Duration::from_millis(1100));
    let at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    std::thread::sleep(Duration::from_millis(1100));
    fs::remove_dir_all(c.vol(0).join("d")).unwrap();
    c.wait_converged(&[0, 1, 2], Duration::from_secs(120));
    for i in 0..3 {
        assert!(!c.vol(i).join("d").exists(), "node {i} still has d");
    }
    assert_eq!(
        versions(&c, 2, "vol/d").len(),
        1000 + 2,
        "1000 files and 2 directories"
    );

    let restored = on_node(
        &c,
        2,
        &["restore", "vol/d", "--at", &format!("@{at}"), "--json"],
    );
    assert!(
        restored.status.success(),
        "{}{}\n{}",
        stdout(&restored),
        stderr(&restored),
        tail(&c.log(2), 30)
    );
    let report: Value = serde_json::from_slice(&restored.stdout).unwrap();
    assert_eq!(report["files"].as_u64(), Some(1000), "{report:#}");
    assert_eq!(report["fetched_chunks"].as_u64(), Some(0), "{report:#}");
    c.wait_converged(&[0, 1, 2], Duration::from_secs(120));
    assert_eq!(snapshot(&c.vol(0)), before);
}

#[test]
fn a_restore_fetches_the_chunks_its_node_no_longer_holds_from_a_peer() {
    let mut c = Cluster::new(3);
    let old = random_bytes(2 << 20, 7);
    put(&c, 0, "big.bin", &old, 0o644, 1_700_000_000);
    c.start_all();
    c.wait_connected(Duration::from_secs(30));
    c.wait_converged(&[0, 1, 2], Duration::from_secs(60));
    // The new version keeps the first half: those chunks stay in the live file.
    let mut new = old[..1 << 20].to_vec();
    new.extend(random_bytes(1 << 20, 8));
    put(&c, 0, "big.bin", &new, 0o644, 1_700_000_100);
    c.wait_converged(&[0, 1, 2], Duration::from_secs(60));
    let listed = versions(&c, 1, "vol/big.bin");
    assert_eq!(listed.len(), 1, "{listed:#?}");
    let id = listed[0]["id"].as_str().unwrap().to_string();

    // Node 1 loses its version packs: it holds only the chunks the new version shares.
    c.stop(1);
    let packs = state_dir(&c, 1).join("packs");
    let mut removed = 0;
    for pack in fs::read_dir(&packs).unwrap().flatten() {
        fs::remove_file(pack.path()).unwrap();
        removed += 1;
    }
    assert!(removed > 0, "node 1 kept no pack");
    c.start(1);
    c.wait_connected(Duration::from_secs(30));
    let listed = versions(&c, 1, "vol/big.bin");
    assert_eq!(listed[0]["held"], "partly here", "{:#}", listed[0]);

    let to = c.dir.path().join("restored");
    let out = on_node(
        &c,
        1,
        &[
            "restore",
            "vol/big.bin",
            "--version",
            &id,
            "--to",
            to.to_str().unwrap(),
            "--json",
        ],
    );
    assert!(
        out.status.success(),
        "{}{}\n{}",
        stdout(&out),
        stderr(&out),
        tail(&c.log(1), 30)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let fetched = report["fetched_chunks"].as_u64().unwrap();
    let chunks = listed[0]["chunks"].as_u64().unwrap();
    assert!(
        fetched > 0 && fetched < chunks,
        "{fetched} of {chunks} chunks fetched"
    );
    assert_eq!(fs::read(to.join("big.bin")).unwrap(), old);
    assert!(
        c.log(1).contains("restore fetched"),
        "{}",
        tail(&c.log(1), 30)
    );
}

#[test]
fn a_file_replaced_by_a_directory_symlink_or_fifo_and_a_renamed_tree_keep_their_versions() {
    let mut c = Cluster::new(2);
    let made: Vec<(&str, Vec<u8>)> = ["f.bin", "l.bin", "p.bin", "d/x.bin", "d/y.bin"]
        .iter()
        .enumerate()
        .map(|(k, name)| (*name, random_bytes(20_000 + k * 1000, 40 + k as u64)))
        .collect();
    for (name, content) in &made {
        put(&c, 0, name, content, 0o644, 1_700_000_000);
    }
    c.start_all();
    c.wait_connected(Duration::from_secs(30));
    c.wait_converged(&[0, 1], Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(1100));
    let at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    std::thread::sleep(Duration::from_millis(1100));

    // Each replacement is one atomic step, made beside the volume and renamed in (a
    // directory swapped in with RENAME_EXCHANGE): as `rm` then `mkdir`, a stall of the
    // test between the two under load let the watcher see a delete first.
    let vol = c.vol(0);
    let beside = c.dir.path().join("beside");
    fs::create_dir(&beside).unwrap();
    fs::create_dir(beside.join("f.bin")).unwrap();
    rustix::fs::renameat_with(
        rustix::fs::CWD,
        beside.join("f.bin"),
        rustix::fs::CWD,
        vol.join("f.bin"),
        rustix::fs::RenameFlags::EXCHANGE,
    )
    .unwrap();
    std::os::unix::fs::symlink("f.bin", beside.join("l.bin")).unwrap();
    fs::rename(beside.join("l.bin"), vol.join("l.bin")).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        beside.join("p.bin"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    fs::rename(beside.join("p.bin"), vol.join("p.bin")).unwrap();
    fs::rename(vol.join("d"), vol.join("e")).unwrap();
    c.wait_converged(&[0, 1], Duration::from_secs(60));
    assert!(c.vol(1).join("f.bin").is_dir());
    assert!(c.vol(1).join("e/x.bin").is_file() && !c.vol(1).join("d").exists());

    // Each replaced file is a version on the receiver, restorable byte for byte.
    let out = c.dir.path().join("restored");
    for (name, content) in &made[..3] {
        let listed = versions(&c, 1, &format!("vol/{name}"));
        assert_eq!(listed.len(), 1, "{name}: {listed:#?}");
        assert_eq!(listed[0]["why"], "replaced", "{name}: {:#}", listed[0]);
        assert_eq!(listed[0]["kind"], "file", "{name}: {:#}", listed[0]);
        assert_eq!(listed[0]["held"], "here", "{name}: {:#}", listed[0]);
        let id = listed[0]["id"].as_str().unwrap();
        let to = out.join(name);
        let restored = on_node(
            &c,
            1,
            &[
                "restore",
                &format!("vol/{name}"),
                "--version",
                id,
                "--to",
                to.to_str().unwrap(),
            ],
        );
        assert!(restored.status.success(), "{name}: {}", stderr(&restored));
        assert_eq!(&fs::read(to.join(name)).unwrap(), content, "{name}");
    }

    // The renamed tree's old names are versions too, holding no pack bytes (their
    // content is live under the new names), and `--at` puts the tree back as it was.
    let listed = versions(&c, 1, "vol/d");
    let paths: Vec<&str> = listed.iter().map(|v| v["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["d", "d/x.bin", "d/y.bin"], "{listed:#?}");
    for v in &listed[1..] {
        assert_eq!(
            (&v["why"], &v["held"]),
            (&"deleted".into(), &"here".into()),
            "{v:#}"
        );
    }
    let to = out.join("tree");
    let restored = on_node(
        &c,
        1,
        &[
            "restore",
            "vol/d",
            "--at",
            &format!("@{at}"),
            "--to",
            to.to_str().unwrap(),
            "--json",
        ],
    );
    assert!(restored.status.success(), "{}", stderr(&restored));
    let report: Value = serde_json::from_slice(&restored.stdout).unwrap();
    assert_eq!(report["fetched_chunks"].as_u64(), Some(0), "{report:#}");
    for (name, content) in &made[3..] {
        assert_eq!(&fs::read(to.join(name)).unwrap(), content, "{name}");
    }
}
