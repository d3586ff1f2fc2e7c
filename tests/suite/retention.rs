//! Retention and the garbage collector on a real store: versions kept by a `shoal
//! serve` that received them are thinned and expired by `shoal gc` as the policy says,
//! exactly the chunks no kept version references are reclaimed, and a collector killed
//! at any point leaves a store that `shoal verify` finds clean with no kept version lost
//! (issue 14). The collector's clock is moved ahead with `SHOAL_FAULT_GC_CLOCK_AHEAD_S`
//! so that hours of thinning take no time.

use std::fs;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;

use crate::cluster::Cluster;
use crate::util::{random_bytes, stderr, stdout};

/// Versions of `f.bin` each one chunk (under the smallest chunk size) of its own.
const VERSION_LEN: usize = 10_000;
/// A pack record's header: magic, length, chunk id.
const RECORD_HEADER: u64 = 40;

struct Store {
    state: PathBuf,
    data: PathBuf,
}

impl Store {
    fn command(&self, args: &[&str], env: &[(&str, String)]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_shoal"));
        command
            .args(args)
            .args(["--state-dir", self.state.to_str().unwrap()])
            .args(["--data-root", self.data.to_str().unwrap()]);
        for (k, v) in env {
            command.env(k, v);
        }
        command
    }

    fn run(&self, args: &[&str], env: &[(&str, String)]) -> Output {
        self.command(args, env).output().unwrap()
    }

    /// `shoal gc --volume vol ARGS --json` with the clock `ahead` seconds on.
    fn gc(&self, args: &[&str], ahead: u64, env: &[(&str, String)]) -> Output {
        let mut all = vec!["gc", "--volume", "vol", "--json"];
        all.extend(args);
        let mut env = env.to_vec();
        env.push(("SHOAL_FAULT_GC_CLOCK_AHEAD_S", ahead.to_string()));
        self.run(&all, &env)
    }

    fn versions(&self) -> Vec<Value> {
        let out = self.run(&["versions", "vol/f.bin", "--json"], &[]);
        assert!(out.status.success(), "{}", stderr(&out));
        let listing: Value = serde_json::from_slice(&out.stdout).unwrap();
        listing["versions"].as_array().cloned().unwrap_or_default()
    }

    /// Restores every listed version elsewhere and checks it is one of `made`, byte for
    /// byte; returns the indexes in `made` of what was restored.
    fn restore_all(&self, made: &[Vec<u8>], to: &std::path::Path) -> Vec<usize> {
        let mut found = Vec::new();
        for version in self.versions() {
            let id = version["id"].as_str().unwrap();
            let dir = to.join(id);
            let out = self.run(
                &[
                    "restore",
                    "vol/f.bin",
                    "--version",
                    id,
                    "--to",
                    dir.to_str().unwrap(),
                ],
                &[],
            );
            assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
            let bytes = fs::read(dir.join("f.bin")).unwrap();
            let k = made.iter().position(|m| *m == bytes);
            assert!(k.is_some(), "version {id} restored to bytes no version had");
            found.push(k.unwrap());
        }
        found
    }

    fn verify_clean(&self) {
        let out = self.run(&["verify", "--volume", "vol", "--json"], &[]);
        let text = stdout(&out);
        assert!(out.status.success(), "verify: {text}{}", stderr(&out));
        assert!(!text.contains("orphan-pack-record"), "{text}");
        // Every chunk of every kept version is held here.
        assert!(!text.contains("version-chunk-not-held"), "{text}");
    }

    fn pack_bytes(&self) -> u64 {
        fs::read_dir(self.state.join("packs"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".pack"))
            .map(|e| e.metadata().unwrap().len())
            .sum()
    }
}

/// A two-node cluster in which node 1 received `count` + 1 versions of `f.bin` from
/// node 0 and so keeps `count`; node 1 is then stopped and its store returned.
fn kept_versions(count: u64) -> (Cluster, Store, Vec<Vec<u8>>) {
    let (mut c, made) = receive_versions(count);
    c.stop(1);
    let store = Store {
        state: c.dir.path().join("node1/state"),
        data: c.dir.path().join("node1/data"),
    };
    assert_eq!(store.versions().len() as u64, count, "{}", c.log(1));
    (c, store, made)
}

/// Node 1 of a running two-node cluster, collecting every second, receives `count` + 1
/// versions of `f.bin` from node 0.
fn receive_versions(count: u64) -> (Cluster, Vec<Vec<u8>>) {
    let mut c = Cluster::new(2);
    c.extra_env[1].push(("SHOAL_GC_INTERVAL".into(), "1".into()));
    let made: Vec<Vec<u8>> = (0..=count)
        .map(|k| random_bytes(VERSION_LEN, 900 + k))
        .collect();
    fs::write(c.vol(0).join("f.bin"), &made[0]).unwrap();
    c.start_all();
    c.wait_connected(Duration::from_secs(30));
    c.wait_converged(&[0, 1], Duration::from_secs(60));
    for content in &made[1..] {
        let temp = c.dir.path().join("next");
        fs::write(&temp, content).unwrap();
        fs::rename(&temp, c.vol(0).join("f.bin")).unwrap();
        c.wait_converged(&[0, 1], Duration::from_secs(60));
    }
    (c, made)
}

fn collection(out: &Output) -> Value {
    assert!(out.status.success(), "gc: {}{}", stdout(out), stderr(out));
    serde_json::from_slice::<Value>(&out.stdout).unwrap()["collection"].clone()
}

#[test]
fn retention_thins_then_expires_versions_and_the_collector_reclaims_exactly_their_chunks() {
    let (c, store, made) = kept_versions(4);
    let before = store.versions();
    // Within the first hour nothing is thinned, and nothing is garbage yet.
    let out = store.gc(
        &["--keep-versions", "1d", "--versions-budget", "off"],
        0,
        &[],
    );
    assert_eq!(collection(&out)["versions_dropped"], 0);
    assert_eq!(store.versions(), before);
    // Two hours on, the versions fall in hourly buckets: one kept per clock hour they
    // were replaced in (the newest of each), the others dropped and their chunks
    // reclaimed, each a record of its own.
    let hours: std::collections::BTreeSet<u64> = before
        .iter()
        .map(|v| v["id"].as_str().unwrap()[..16].to_string())
        .map(|hex| u64::from_str_radix(&hex, 16).unwrap() / 3_600_000_000_000)
        .collect();
    let packs_before = store.pack_bytes();
    let out = store.gc(
        &["--keep-versions", "1d", "--versions-budget", "off"],
        7_200,
        &[],
    );
    let done = collection(&out);
    let dropped = (before.len() - hours.len()) as u64;
    assert_eq!(done["versions_dropped"], dropped, "{done}");
    assert_eq!(done["chunks_reclaimed"], dropped, "{done}");
    assert_eq!(
        done["bytes_reclaimed"],
        dropped * (VERSION_LEN as u64 + RECORD_HEADER),
        "{done}"
    );
    assert_eq!(
        store.pack_bytes(),
        packs_before - dropped * (VERSION_LEN as u64 + RECORD_HEADER)
    );
    let kept = store.versions();
    assert_eq!(kept.len(), hours.len());
    // The newest version (the content before the last write) is kept and restores.
    let restored = store.restore_all(&made, &c.dir.path().join("thinned"));
    assert!(restored.contains(&(made.len() - 2)), "{restored:?}");
    store.verify_clean();
    // Past keep-for every version goes, and every pack with it.
    let out = store.gc(&["--keep-versions", "1h"], 7_200, &[]);
    let done = collection(&out);
    assert_eq!(done["versions_dropped"], kept.len() as u64, "{done}");
    assert!(store.versions().is_empty());
    assert_eq!(store.pack_bytes(), 0);
    store.verify_clean();
    // The live file is untouched.
    assert_eq!(
        fs::read(store.data.join("vol/f.bin")).unwrap(),
        made[made.len() - 1]
    );
}

#[test]
fn a_collector_killed_at_any_point_leaves_a_clean_store_and_every_kept_version() {
    let (c, store, made) = kept_versions(6);
    let thin = ["--keep-versions", "1d", "--versions-budget", "off"];
    // At each point a pack rewrite passes, the process exits on the spot.
    for point in 1..=4 {
        let crash = [("SHOAL_FAULT_GC_CRASH_AT", point.to_string())];
        let out = store.gc(&thin, 7_200, &crash);
        let rewrote = out.status.code() == Some(99);
        store.verify_clean();
        let restored = store.restore_all(&made, &c.dir.path().join(format!("crash{point}")));
        assert!(
            restored.contains(&(made.len() - 2)),
            "point {point}: {restored:?}"
        );
        if !rewrote {
            // Nothing left to rewrite: the first crash points already finished the job.
            assert!(out.status.success(), "{}", stderr(&out));
        }
    }
    // And killed with SIGKILL at arbitrary moments, expiring everything older than an
    // hour while versions younger are kept: 0..40 ms after start, 8 times.
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..8 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let mut child = store
            .command(
                &[
                    "gc",
                    "--volume",
                    "vol",
                    "--keep-versions",
                    "1d",
                    "--versions-budget",
                    "off",
                ],
                &[("SHOAL_FAULT_GC_CLOCK_AHEAD_S", "7200".to_string())],
            )
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng % 40));
        let _ = child.kill();
        let _ = child.wait();
        store.verify_clean();
        let restored = store.restore_all(&made, &c.dir.path().join(format!("kill{round}")));
        assert!(
            restored.contains(&(made.len() - 2)),
            "round {round}: {restored:?}"
        );
    }
    // A last run completes and leaves the same versions, all restorable.
    let out = store.gc(&thin, 7_200, &[]);
    collection(&out);
    store.verify_clean();
    let restored = store.restore_all(&made, &c.dir.path().join("after"));
    assert_eq!(restored.len(), store.versions().len());
}

#[test]
fn status_and_metrics_show_the_versions_held_and_the_last_collection() {
    let (c, _) = receive_versions(3);
    let held = |status: &Value| status["volumes"][0]["versions_held"].clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        let status = c.status(1).unwrap_or_default();
        if held(&status)["versions"] == 3 || std::time::Instant::now() > deadline {
            break status;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(held(&status)["versions"], 3, "{status:#}");
    assert_eq!(held(&status)["bytes"], 3 * VERSION_LEN as u64);
    assert!(status["last_collection"]["finished_unix"].as_i64() > Some(0));
    let metrics = c.metrics(1).unwrap();
    assert!(
        metrics.contains("shoal_volume_versions_held{volume=\"vol\"} 3\n"),
        "{metrics}"
    );
    assert!(metrics.contains(&format!(
        "shoal_volume_versions_held_bytes{{volume=\"vol\"}} {}\n",
        3 * VERSION_LEN
    )));
    assert!(metrics.contains("shoal_last_collection_timestamp_seconds "));
    // The writer keeps none of its own changes.
    assert_eq!(held(&c.status(0).unwrap())["versions"], 0);
}
