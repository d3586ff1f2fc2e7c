//! Issue acceptance for `verify` and `repair`: fixtures for each kind of damage, found
//! and named by verify, put right by repair from local copies or a running peer.

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use serde_json::Value;
use shoal::ids::ChunkId;
use shoal::store::Durability;
use shoal::store::pack::{PackWriter, pack_file_name};

use crate::cluster::*;
use crate::util::*;

const CONVERGE: Duration = Duration::from_secs(90);

fn json(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}\n{}", stdout(output), stderr(output)))
}

/// (problem, path) of every finding of a `verify --json` run.
fn problems(report: &Value) -> Vec<(String, String)> {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["problem"].as_str().unwrap().to_string(),
                f["path"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

fn assert_found(report: &Value, problem: &str, path_ends: &str) {
    let all = problems(report);
    assert!(
        all.iter()
            .any(|(p, path)| p == problem && path.ends_with(path_ends)),
        "{problem} on {path_ends} not reported: {all:?}"
    );
}

/// Runs `shoal CMD --data-root D --state-dir S --volume vol ARGS`.
fn run(data_root: &Path, state: &Path, command: &str, args: &[&str]) -> Output {
    let mut all = vec!["--volume", "vol"];
    all.extend_from_slice(args);
    shoal_at(data_root, state, command, &all)
}

/// `verify --json` finds damage (exit 1): its report.
fn damage_found(data_root: &Path, state: &Path) -> Value {
    let found = run(data_root, state, "verify", &["--json"]);
    assert_eq!(found.status.code(), Some(1), "{}", stderr(&found));
    json(&found)
}

fn assert_clean(data_root: &Path, state: &Path) {
    let out = run(data_root, state, "verify", &["--json"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "verify after repair: {}",
        stdout(&out)
    );
    let warnings = problems(&json(&out));
    assert!(
        warnings.iter().all(|(p, _)| p == "modified"),
        "{warnings:?}"
    );
}

/// Appends chunks to a new pack `number` and indexes them, as retained content is kept.
fn pack_chunks(fx: &Fixture, number: u64, contents: &[&[u8]]) -> PathBuf {
    let store = fx.open();
    let path = store.packs_dir().join(pack_file_name(number));
    let mut writer = PackWriter::open(&path).unwrap();
    let mut batch = store.batch();
    for data in contents {
        let id = ChunkId::of(data);
        let extent = writer.append(&id, data).unwrap();
        batch.put_pack_location(&id, number, extent);
    }
    writer.sync().unwrap();
    store.write(batch, Durability::Durable).unwrap();
    path
}

#[test]
fn live_file_damage_is_named_and_restored_from_local_copies() {
    let fx = Fixture::new();
    let big = random_bytes(3 << 20, 11);
    let short = random_bytes(600_000, 12);
    let gone = random_bytes(5_000, 13);
    for (name, content) in [
        ("rot.bin", &big),
        ("short.bin", &short),
        ("sub/gone.bin", &gone),
    ] {
        fx.write(name, content);
        // A second copy elsewhere in the volume: the chunks are held twice.
        fx.write(&format!("copies/{}", name.replace('/', "_")), content);
    }
    fx.write("alone.bin", &random_bytes(400_000, 14));
    fx.scan();
    let root_before = root_of(&fx.open(), "vol");

    flip_byte_keeping_mtime(&fx.path("rot.bin"), 2_000_000);
    truncate_keeping_mtime(&fx.path("short.bin"), 100_000);
    fs::remove_file(fx.path("sub/gone.bin")).unwrap();
    let found = damage_found(&fx.data_root(), &fx.state());
    assert_found(&found, "content-mismatch", "rot.bin");
    assert_found(&found, "truncated", "short.bin");
    assert_found(&found, "missing", "sub/gone.bin");

    let dry = fx.shoal("repair", &["--volume", "vol", "--dry-run"]);
    assert_eq!(dry.status.code(), Some(0), "{}", stderr(&dry));
    assert!(
        stdout(&dry).contains("restored vol:rot.bin: would restore"),
        "{}",
        stdout(&dry)
    );
    assert!(
        !fx.path("sub/gone.bin").exists(),
        "a dry run changed nothing"
    );

    let repaired = fx.shoal("repair", &["--volume", "vol"]);
    assert_eq!(
        repaired.status.code(),
        Some(0),
        "{}{}",
        stdout(&repaired),
        stderr(&repaired)
    );
    assert_eq!(fs::read(fx.path("rot.bin")).unwrap(), big);
    assert_eq!(fs::read(fx.path("short.bin")).unwrap(), short);
    assert_eq!(fs::read(fx.path("sub/gone.bin")).unwrap(), gone);
    assert_clean(&fx.data_root(), &fx.state());
    assert_eq!(root_of(&fx.open(), "vol"), root_before);
    assert_eq!(
        fs::read_dir(fx.path(".shoal/staging")).unwrap().count(),
        0,
        "nothing partial left"
    );
}

#[test]
fn damage_with_no_copy_anywhere_is_left_reported_and_never_indexed_as_an_edit() {
    let fx = Fixture::new();
    let content = random_bytes(1 << 20, 21);
    fx.write("only.bin", &content);
    fx.scan();
    let root_before = root_of(&fx.open(), "vol");
    flip_byte_keeping_mtime(&fx.path("only.bin"), 500_000);
    let out = fx.shoal("repair", &["--volume", "vol", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let report = json(&out);
    assert_eq!(report["unrepaired"][0]["path"], "only.bin");
    assert_eq!(report["rescanned"], false);
    // The index still describes the good content, so a peer could restore it later.
    assert_eq!(root_of(&fx.open(), "vol"), root_before);
    assert_eq!(fx.shoal("verify", &[]).status.code(), Some(1));
}

#[test]
fn pack_damage_and_an_index_record_pointing_nowhere_are_named_and_repaired() {
    let fx = Fixture::new();
    let (a, b, c, d) = (
        random_bytes(9_000, 31),
        random_bytes(9_000, 32),
        random_bytes(9_000, 33),
        random_bytes(9_000, 34),
    );
    // Small files are one chunk each, so the live files hold the packed chunks too.
    fx.write("a.bin", &a);
    fx.write("b.bin", &b);
    fx.write("c.bin", &c);
    fx.write("d.bin", &d);
    fx.scan();
    let pack = pack_chunks(&fx, 1, &[&a, &b, &c]);
    assert_eq!(fx.shoal("verify", &[]).status.code(), Some(0));
    {
        // An index record into a pack that does not exist.
        let store = fx.open();
        let mut batch = store.batch();
        batch.put_pack_location(
            &ChunkId::of(&d),
            0x99,
            shoal::store::codec::Extent {
                offset: 16 + 40,
                len: 9_000,
            },
        );
        store.write(batch, Durability::Durable).unwrap();
    }

    let file = File::options().read(true).write(true).open(&pack).unwrap();
    // A byte of the first record's data (header 16 bytes, record header 40).
    file.write_all_at(b"X", 16 + 40 + 100).unwrap();
    // The pack cut in the middle of its last record.
    let len = file.metadata().unwrap().len();
    file.set_len(len - 4_000).unwrap();
    drop(file);

    let found = damage_found(&fx.data_root(), &fx.state());
    assert_found(&found, "pack-record-damaged", &pack_file_name(1));
    assert_found(&found, "pack-truncated", &pack_file_name(1));
    assert_found(&found, "pack-location-broken", &pack_file_name(0x99));

    let repaired = fx.shoal("repair", &["--volume", "vol"]);
    assert_eq!(
        repaired.status.code(),
        Some(0),
        "{}{}",
        stdout(&repaired),
        stderr(&repaired)
    );
    let text = stdout(&repaired);
    for expected in ["pack-record-restored", "pack-tail-cut", "location-removed"] {
        assert!(text.contains(expected), "{expected} not in:\n{text}");
    }
    assert_clean(&fx.data_root(), &fx.state());
    // The damaged record holds its chunk again.
    let mut first = vec![0u8; 9_000];
    File::open(&pack)
        .unwrap()
        .read_exact_at(&mut first, 16 + 40)
        .unwrap();
    assert_eq!(first, a);
}

#[test]
fn a_missing_index_is_named_and_rebuilt_from_packs_and_live_files() {
    let fx = Fixture::new();
    let retained = random_bytes(20_000, 41);
    fx.write("dir/one.bin", &random_bytes(700_000, 42));
    fx.write("two.txt", b"two");
    fx.scan();
    let root_before = root_of(&fx.open(), "vol");
    pack_chunks(&fx, 1, &[&retained]);
    fs::remove_dir_all(fx.state().join("index")).unwrap();

    let found = damage_found(&fx.data_root(), &fx.state());
    assert_found(&found, "index-missing", "index");

    let refused = fx.shoal("repair", &["--volume", "vol"]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        stderr(&refused).contains("--rebuild-index"),
        "{}",
        stderr(&refused)
    );

    let rebuilt = fx.shoal("repair", &["--volume", "vol", "--rebuild-index"]);
    assert_eq!(
        rebuilt.status.code(),
        Some(0),
        "{}{}",
        stdout(&rebuilt),
        stderr(&rebuilt)
    );
    assert_clean(&fx.data_root(), &fx.state());
    assert_eq!(root_of(&fx.open(), "vol"), root_before);
    // The retained chunk is indexed again from the pack's own description.
    let store = fx.open();
    let locations = store.chunk_locations(&ChunkId::of(&retained)).unwrap();
    assert!(
        matches!(
            locations[..],
            [shoal::store::ChunkLocation::Pack { pack: 1, .. }]
        ),
        "{locations:?}"
    );
}

/// Node 1 of a two-node cluster, stopped, with the arguments repair needs to reach node 0.
fn repair_node1(c: &Cluster, extra: &[&str]) -> Output {
    repair_node1_via(c, 0, extra)
}

/// Node 1, stopped, repaired with node `peer` as its one peer.
fn repair_node1_via(c: &Cluster, peer: usize, extra: &[&str]) -> Output {
    let node = c.dir.path().join("node1");
    let peer = format!("{}:7029", c.ip(peer));
    let mut args = vec![
        "--peer",
        peer.as_str(),
        "--credentials",
        c.credentials[1].to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    run(&node.join("data"), &node.join("state"), "repair", &args)
}

fn node1_root(c: &Cluster) -> String {
    let node = c.dir.path().join("node1");
    let out = run(
        &node.join("data"),
        &node.join("state"),
        "status",
        &["--json"],
    );
    json(&out)["volumes"][0]["root"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn repair_fetches_from_a_running_peer_and_keeps_an_edit_made_while_stopped() {
    let mut c = Cluster::new(2);
    let big = random_bytes(4 << 20, 51);
    let short = random_bytes(900_000, 52);
    let gone = random_bytes(300_000, 53);
    write_file(&c.vol(0).join("big.bin"), &big);
    write_file(&c.vol(0).join("short.bin"), &short);
    write_file(&c.vol(0).join("d/gone.bin"), &gone);
    write_file(&c.vol(0).join("notes.txt"), b"first draft");
    c.start_all();
    c.wait_converged(&[0, 1], CONVERGE);
    c.stop(1);

    let node1 = c.dir.path().join("node1");
    flip_byte_keeping_mtime(&c.vol(1).join("big.bin"), 3_000_000);
    truncate_keeping_mtime(&c.vol(1).join("short.bin"), 1_000);
    fs::remove_file(c.vol(1).join("d/gone.bin")).unwrap();
    // An edit while Shoal is stopped: a local change, not damage.
    std::thread::sleep(Duration::from_millis(20));
    write_file(
        &c.vol(1).join("notes.txt"),
        b"second draft, written offline",
    );

    let found = damage_found(&node1.join("data"), &node1.join("state"));
    assert_found(&found, "content-mismatch", "big.bin");
    assert_found(&found, "truncated", "short.bin");
    assert_found(&found, "missing", "d/gone.bin");
    assert_found(&found, "modified", "notes.txt");

    let root0 = c.root(0).unwrap();
    let repaired = repair_node1(&c, &[]);
    assert_eq!(
        repaired.status.code(),
        Some(0),
        "{}{}",
        stdout(&repaired),
        stderr(&repaired)
    );
    assert!(
        stdout(&repaired).contains("kept vol:notes.txt"),
        "{}",
        stdout(&repaired)
    );
    assert_eq!(fs::read(c.vol(1).join("big.bin")).unwrap(), big);
    assert_eq!(fs::read(c.vol(1).join("short.bin")).unwrap(), short);
    assert_eq!(fs::read(c.vol(1).join("d/gone.bin")).unwrap(), gone);
    assert_eq!(
        fs::read(c.vol(1).join("notes.txt")).unwrap(),
        b"second draft, written offline"
    );
    assert_clean(&node1.join("data"), &node1.join("state"));
    assert_ne!(node1_root(&c), root0, "the offline edit is indexed");

    c.start(1);
    c.wait_converged(&[0, 1], CONVERGE);
    assert_eq!(
        fs::read(c.vol(0).join("notes.txt")).unwrap(),
        b"second draft, written offline",
        "the edit synced as the newest version"
    );
    assert_eq!(fs::read(c.vol(0).join("big.bin")).unwrap(), big);
}

#[test]
fn a_repair_killed_midway_completes_when_run_again_and_leaves_nothing_partial() {
    let mut c = Cluster::new(2);
    let files: Vec<Vec<u8>> = (0..6).map(|i| random_bytes(6 << 20, 60 + i)).collect();
    for (i, content) in files.iter().enumerate() {
        write_file(&c.vol(0).join(format!("f{i}.bin")), content);
    }
    c.start_all();
    c.wait_converged(&[0, 1], CONVERGE);
    let root0 = c.root(0).unwrap();
    c.stop(1);
    for i in 0..files.len() {
        fs::remove_file(c.vol(1).join(format!("f{i}.bin"))).unwrap();
    }

    let node1 = c.dir.path().join("node1");
    let peer = format!("{}:7029", c.ip(0));
    let mut child = shoal_command(&[
        "repair",
        "--data-root",
        node1.join("data").to_str().unwrap(),
        "--state-dir",
        node1.join("state").to_str().unwrap(),
        "--volume",
        "vol",
        "--peer",
        &peer,
        "--credentials",
        c.credentials[1].to_str().unwrap(),
    ])
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null())
    .spawn()
    .unwrap();
    // Killed once it has begun writing: a staging file exists.
    let staging_dir = c.vol(1).join(".shoal/staging");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while fs::read_dir(&staging_dir).map_or(true, |mut d| d.next().is_none())
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    let running = child.try_wait().unwrap().is_none();
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    child.wait().unwrap();
    assert!(running, "repair finished before it could be killed");
    // Whatever was published is whole: a file is there complete or not at all.
    for (i, content) in files.iter().enumerate() {
        if let Ok(data) = fs::read(c.vol(1).join(format!("f{i}.bin"))) {
            assert_eq!(&data, content, "f{i}.bin published partial");
        }
    }

    let again = repair_node1(&c, &[]);
    assert_eq!(
        again.status.code(),
        Some(0),
        "{}{}",
        stdout(&again),
        stderr(&again)
    );
    for (i, content) in files.iter().enumerate() {
        assert_eq!(
            &fs::read(c.vol(1).join(format!("f{i}.bin"))).unwrap(),
            content
        );
    }
    assert_clean(&node1.join("data"), &node1.join("state"));
    assert_eq!(node1_root(&c), root0);
    let staging: Vec<_> = fs::read_dir(c.vol(1).join(".shoal/staging"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(staging.is_empty(), "left in staging: {staging:?}");
    let packs: Vec<_> = fs::read_dir(node1.join("state/packs"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(packs.is_empty(), "left in packs: {packs:?}");
}

#[test]
fn verify_runs_beside_a_writer_and_says_so_while_repair_refuses() {
    let fx = Fixture::new();
    fx.write("a.txt", b"alpha");
    fx.scan();
    // This process holds the store open for writing, as `shoal serve` would.
    let writer = fx.open();
    let verified = fx.shoal("verify", &[]);
    assert_eq!(verified.status.code(), Some(0), "{}", stderr(&verified));
    assert!(
        stderr(&verified).contains("locked by a running shoal"),
        "{}",
        stderr(&verified)
    );
    let refused = fx.shoal("repair", &["--volume", "vol"]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(stderr(&refused).contains("in use"), "{}", stderr(&refused));
    let refused = fx.shoal("repair", &["--volume", "vol", "--rebuild-index"]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        fx.state().join("index/CURRENT").exists(),
        "index left alone"
    );
    drop(writer);
}

#[test]
fn verify_sample_checks_a_share_of_the_files_and_refuses_a_bad_percentage() {
    let fx = Fixture::new();
    for i in 0..400 {
        fx.write(
            &format!("d{}/f{i}.txt", i % 7),
            format!("file {i}").as_bytes(),
        );
    }
    fx.scan();
    let out = fx.shoal("verify", &["--sample", "25", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let report = json(&out);
    assert_eq!(report["sample_percent"], 25.0);
    let checked = report["files_checked"].as_u64().unwrap();
    assert!(
        0 < checked && checked < 400,
        "{checked} of 400 files checked"
    );
    for bad in ["0", "150", "-3", "NaN", "many"] {
        let out = fx.shoal("verify", &["--sample", bad]);
        assert_eq!(out.status.code(), Some(2), "--sample {bad}");
        assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
    }
}

#[test]
fn pack_records_no_local_copy_holds_are_fetched_from_a_running_peer() {
    let mut c = Cluster::new(2);
    let (x, y) = (random_bytes(12_000, 71), random_bytes(12_000, 72));
    write_file(&c.vol(0).join("x.bin"), &x);
    write_file(&c.vol(0).join("y.bin"), &y);
    c.start_all();
    c.wait_converged(&[0, 1], CONVERGE);
    c.stop(1);

    // Node 1 keeps both versions in a pack (as retained content), then loses the live
    // files: the pack is its only copy, node 0's live files the only others.
    let node1 = c.dir.path().join("node1");
    let pack = {
        let store =
            shoal::store::Store::open(&node1.join("state"), shoal::store::OpenOptions::default())
                .unwrap();
        let path = store.packs_dir().join(pack_file_name(7));
        let mut writer = PackWriter::open(&path).unwrap();
        let mut batch = store.batch();
        for data in [&y, &x] {
            let extent = writer.append(&ChunkId::of(data), data).unwrap();
            batch.put_pack_location(&ChunkId::of(data), 7, extent);
        }
        writer.sync().unwrap();
        store.write(batch, Durability::Durable).unwrap();
        path
    };
    fs::remove_file(c.vol(1).join("x.bin")).unwrap();
    fs::remove_file(c.vol(1).join("y.bin")).unwrap();
    let scanned = shoal(&scan_args(&node1.join("data"), &node1.join("state")));
    assert!(scanned.status.success(), "{}", stderr(&scanned));

    // y's record damaged in place, x's record cut off by a torn tail.
    let file = File::options().read(true).write(true).open(&pack).unwrap();
    file.write_all_at(b"Z", 16 + 40 + 7).unwrap();
    let len = file.metadata().unwrap().len();
    file.set_len(len - 5_000).unwrap();
    drop(file);
    let found = damage_found(&node1.join("data"), &node1.join("state"));
    assert_found(&found, "pack-record-damaged", &pack_file_name(7));
    assert_found(&found, "pack-truncated", &pack_file_name(7));

    // A dry run lists the plan and changes nothing.
    let before = fs::read(&pack).unwrap();
    let dry = run(
        &node1.join("data"),
        &node1.join("state"),
        "repair",
        &["--dry-run"],
    );
    assert_eq!(dry.status.code(), Some(0), "{}", stderr(&dry));
    assert!(stdout(&dry).contains("pack-tail-cut"), "{}", stdout(&dry));
    assert_eq!(fs::read(&pack).unwrap(), before);

    let repaired = repair_node1(&c, &[]);
    assert_eq!(
        repaired.status.code(),
        Some(0),
        "{}{}",
        stdout(&repaired),
        stderr(&repaired)
    );
    assert_clean(&node1.join("data"), &node1.join("state"));
    let store =
        shoal::store::Store::open(&node1.join("state"), shoal::store::OpenOptions::READ_ONLY)
            .unwrap();
    for data in [&x, &y] {
        let locations = store.chunk_locations(&ChunkId::of(data)).unwrap();
        let [shoal::store::ChunkLocation::Pack { pack: 7, extent }] = locations[..] else {
            panic!("{locations:?}");
        };
        assert_eq!(
            &shoal::store::pack::read_chunk(&pack, extent, &ChunkId::of(data)).unwrap(),
            data
        );
    }
    assert!(!pack.with_extension("repair.tmp").exists());
}

/// Issue 11, item 11: `repair --volume vol` opens only `vol`; a chunk whose first
/// location is in volume `b` (not open) is still found at its next location, in `vol`
/// itself or in a pack (the lookup used to stop at the first location it could not
/// open and call the chunk lost).
#[test]
fn repair_of_one_volume_finds_copies_behind_a_location_in_a_volume_not_open() {
    let fx = Fixture::new();
    let data = fx.data_root();
    // Under the 16 KiB minimum chunk: each file is one chunk.
    let packed = random_bytes(12_000, 31);
    let twice = random_bytes(13_000, 32);
    write_file(&data.join("b/packed.bin"), &packed);
    write_file(&data.join("b/twice.bin"), &twice);
    // Volume b is indexed first: its id, and so its locations, sort first.
    let scan = shoal_at(&data, &fx.state(), "scan", &["--volume", "b"]);
    assert!(scan.status.success(), "{}", stderr(&scan));
    fx.write("packed.bin", &packed);
    fx.write("twice.bin", &twice);
    fx.write("copy/twice.bin", &twice);
    fx.scan();
    pack_chunks(&fx, 1, &[&packed]);
    {
        let store = fx.open();
        for content in [&packed, &twice] {
            let locations = store.chunk_locations(&ChunkId::of(content)).unwrap();
            let b = store.volume("b").unwrap().unwrap().id;
            assert!(
                matches!(&locations[0], shoal::store::ChunkLocation::Live { vol, .. } if *vol == b),
                "the first location is not volume b's: {locations:?}"
            );
        }
    }

    flip_byte_keeping_mtime(&fx.path("packed.bin"), 100);
    flip_byte_keeping_mtime(&fx.path("twice.bin"), 100);
    let found = damage_found(&data, &fx.state());
    assert_found(&found, "content-mismatch", "packed.bin");
    assert_found(&found, "content-mismatch", "twice.bin");

    let repaired = fx.shoal("repair", &["--volume", "vol"]);
    assert_eq!(
        repaired.status.code(),
        Some(0),
        "{}{}",
        stdout(&repaired),
        stderr(&repaired)
    );
    assert_eq!(fs::read(fx.path("packed.bin")).unwrap(), packed);
    assert_eq!(fs::read(fx.path("twice.bin")).unwrap(), twice);
    assert_clean(&data, &fx.state());
}

/// Issue 14: a kept version whose chunks this node lost (its version packs gone, and a
/// repair without peers removed the records that pointed into them) gets them back from
/// a peer that keeps the same version; a peer that lacks them leaves it reported.
#[test]
fn repair_fetches_a_kept_versions_lost_chunks_from_a_peer_that_keeps_the_version() {
    let mut c = Cluster::new(3);
    let old = random_bytes(600_000, 61);
    write_file(&c.vol(0).join("f.bin"), &old);
    c.start_all();
    c.wait_converged(&[0, 1, 2], CONVERGE);
    write_file(&c.vol(0).join("f.bin"), &random_bytes(600_000, 62));
    c.wait_converged(&[0, 1, 2], CONVERGE);
    c.stop(1);
    let node1 = c.dir.path().join("node1");
    let (data, state) = (node1.join("data"), node1.join("state"));
    let mut removed = 0;
    for pack in fs::read_dir(state.join("packs")).unwrap().flatten() {
        fs::remove_file(pack.path()).unwrap();
        removed += 1;
    }
    assert!(removed > 0, "node 1 kept no version pack");

    // Without peers the lost records can only go; the version is reported incomplete.
    let alone = run(&data, &state, "repair", &["--json"]);
    assert_eq!(alone.status.code(), Some(1), "{}", stderr(&alone));
    let report = json(&alone);
    assert_eq!(
        report["incomplete_versions"][0]["path"], "f.bin",
        "{report:#}"
    );
    let found = run(&data, &state, "verify", &["--json"]);
    assert_eq!(found.status.code(), Some(0), "{}", stdout(&found));
    assert_found(&json(&found), "version-chunk-not-held", "f.bin");

    // The writer keeps no version of its own edit: it cannot send them.
    let writer = repair_node1_via(&c, 0, &["--json"]);
    assert_eq!(writer.status.code(), Some(0), "{}", stderr(&writer));
    let report = json(&writer);
    let incomplete = &report["incomplete_versions"][0];
    assert_eq!(incomplete["path"], "f.bin", "{report:#}");
    assert!(
        incomplete["detail"]
            .as_str()
            .unwrap()
            .contains("no peer sent them"),
        "{incomplete:#}"
    );

    // Node 2 kept the same version: repair fetches every lost chunk from it.
    let fetched = repair_node1_via(&c, 2, &[]);
    assert_eq!(fetched.status.code(), Some(0), "{}", stderr(&fetched));
    assert!(
        stdout(&fetched).contains("version-chunks-fetched"),
        "{}",
        stdout(&fetched)
    );
    assert!(
        !stdout(&fetched).contains("INCOMPLETE"),
        "{}",
        stdout(&fetched)
    );
    assert_clean(&data, &state);
    assert!(!state.join("packs/versions.repair.tmp").exists());

    // `shoal status` (no daemon) shows the version held and the last collection (the
    // daemon ran one at start).
    let status = stdout(&run(&data, &state, "status", &[]));
    assert!(status.contains("versions 1 kept"), "{status}");
    assert!(status.contains("last collection: 20"), "{status}");

    // The version is whole here again: restored with no daemon and no peer.
    let listed = run(&data, &state, "versions", &["vol/f.bin", "--json"]);
    let listed = json(&listed);
    let version = &listed["versions"][0];
    assert_eq!(version["held"], "here", "{listed:#}");
    let to = c.dir.path().join("restored");
    let restored = run(
        &data,
        &state,
        "restore",
        &[
            "vol/f.bin",
            "--version",
            version["id"].as_str().unwrap(),
            "--to",
            to.to_str().unwrap(),
        ],
    );
    assert!(restored.status.success(), "{}", stderr(&restored));
    assert_eq!(fs::read(to.join("f.bin")).unwrap(), old);
}
