//! Issue 17 acceptance: an operator's worst week (frozen peers, full disks, kill storms)
//! with real `shoal serve` processes on loopback.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::cluster::*;
use crate::util::{
    Fixture, LoopFs, SmallFs, index_listing, random_bytes, scan_args, shoal, shoal_at,
    shoal_command, stderr, stdout, write_file,
};

const CONVERGE: Duration = Duration::from_secs(60);

/// Far below the 30 s a frozen peer used to cost (the QUIC idle timeout), far above the
/// second or two a change takes: a generous bound, not a latency measurement (that is
/// `tools/bench-dead-peer.py`).
const WITHOUT_STALL: Duration = Duration::from_secs(12);

/// Waits until `path` holds `content`; how long it took. `what` says what failed (the
/// nodes' logs as they are then).
fn wait_for_content(
    path: &Path,
    content: &[u8],
    bound: Duration,
    what: impl Fn() -> String,
) -> Duration {
    let start = Instant::now();
    loop {
        if fs::read(path).is_ok_and(|c| c == content) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < bound,
            "{}: not there after {bound:?}",
            what()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_frozen_peer_stalls_neither_scans_nor_pulls_between_the_others() {
    let mut c = Cluster::new(3);
    // No periodic rounds: only the watcher and `Notify` can carry a change.
    c.heartbeat = 3600;
    c.start_all();
    c.wait_connected(CONVERGE);
    c.wait_converged(&[0, 1, 2], CONVERGE);
    let frozen_at = Instant::now();
    c.freeze(2);
    // Right after the freeze (node 2 still looks connected and live), once it has gone
    // silent, and once its connections have timed out and are being opened again.
    for (round, after) in [0, 1500, 6000].into_iter().enumerate() {
        let since = frozen_at.elapsed();
        std::thread::sleep(Duration::from_millis(after).saturating_sub(since));
        let name = format!("change-{round}.txt");
        let content = format!("written on node 0 in round {round}");
        write_file(&c.vol(0).join(&name), content.as_bytes());
        let took = wait_for_content(
            &c.vol(1).join(&name),
            content.as_bytes(),
            WITHOUT_STALL,
            || {
                format!(
                    "{name} from node 0 to node 1 with node 2 frozen\n{}",
                    c.log(1)
                )
            },
        );
        eprintln!("{name}: node 0 -> node 1 in {took:?} with node 2 frozen");
        let reply = format!("reply-{round}.txt");
        write_file(&c.vol(1).join(&reply), b"and back");
        let took = wait_for_content(&c.vol(0).join(&reply), b"and back", WITHOUT_STALL, || {
            format!(
                "{reply} from node 1 to node 0 with node 2 frozen\n{}",
                c.log(0)
            )
        });
        eprintln!("{reply}: node 1 -> node 0 in {took:?} with node 2 frozen");
    }
    // No heartbeat round for an hour: what node 2 missed comes from the announcements
    // owed to it and from its own rounds once its connections are up again.
    c.thaw(2);
    c.wait_converged(&[0, 1, 2], CONVERGE);
}

/// Node 1's connection to node 0 is up and its first round done (nothing more comes
/// from it for an hour), while node 0's own connection to node 1 is still being opened:
/// a change node 0 makes then must be announced once that connection is up.
#[test]
fn a_change_made_while_a_connection_is_being_opened_is_announced_once_it_is_up() {
    let mut c = Cluster::new(2);
    c.heartbeat = 3600;
    c.extra_env[0].push(("SHOAL_FAULT_HOLD_CONNECTIONS_MS".into(), "12000".into()));
    c.start_all();
    let start = Instant::now();
    let first_round_done = |status: &serde_json::Value| {
        status["peers"].as_array().is_some_and(|peers| {
            peers.len() == 1
                && peers[0]["connected"] == true
                && peers[0]["volumes"][0]["state"] == "in_sync"
        })
    };
    while !c.status(1).is_some_and(|s| first_round_done(&s)) {
        assert!(
            start.elapsed() < CONVERGE,
            "node 1 never finished a round with node 0\n{}",
            c.log(1)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let opening = |s: &serde_json::Value| s["peers"][0]["connected"] == false;
    assert!(
        c.status(0).is_some_and(|s| opening(&s)),
        "node 0's connection to node 1 is up already: the window this test needs is closed\n{}",
        c.log(0)
    );
    write_file(&c.vol(0).join("made-while-opening.txt"), b"announced late");
    let took = wait_for_content(
        &c.vol(1).join("made-while-opening.txt"),
        b"announced late",
        CONVERGE,
        || {
            format!(
                "the change never reached node 1\n{}\n{}",
                c.log(0),
                c.log(1)
            )
        },
    );
    eprintln!("made-while-opening.txt: node 0 -> node 1 in {took:?}");
}

#[test]
fn a_state_directory_on_a_tiny_file_system_is_refused_clearly_and_opens_once_there_is_room() {
    let fixture = Fixture::new();
    fixture.write("kept.txt", b"still here after the disk grew");
    let small = SmallFs::mount(&fixture.dir.path().join("small"), "16m");
    let state = small.path.join("state");
    let scan = shoal(&scan_args(&fixture.data_root(), &state));
    assert_eq!(scan.status.code(), Some(2), "{}", stderr(&scan));
    let message = stderr(&scan);
    assert!(
        message.contains("free on its file system") && message.contains(state.to_str().unwrap()),
        "not a clear message: {message}"
    );
    assert!(!state.join("index.creating").exists());
    assert!(!state.join("index").exists());

    // The daemon says the same, and exits 2 as well.
    let creds = fixture.dir.path().join("creds");
    assert!(
        shoal(&["cluster", "init", "--out", creds.to_str().unwrap()])
            .status
            .success()
    );
    let serve = shoal_command(&["serve", "--listen", "127.0.0.1:0", "--volume", "vol"])
        .args(["--data-root", fixture.data_root().to_str().unwrap()])
        .args(["--state-dir", state.to_str().unwrap()])
        .args(["--credentials", creds.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(serve.status.code(), Some(2), "{}", stderr(&serve));
    assert!(
        stderr(&serve).contains("free on its file system"),
        "{}",
        stderr(&serve)
    );

    small.resize("256m");
    let scan = shoal(&scan_args(&fixture.data_root(), &state));
    assert!(scan.status.success(), "{}", stderr(&scan));
    let verify = fixture_verify(&fixture.data_root(), &state);
    assert!(verify.status.success(), "{}", stdout(&verify));
}

#[test]
fn a_state_directory_that_fills_up_refuses_writes_and_takes_them_again_once_there_is_room() {
    let fixture = Fixture::new();
    fixture.write("first.txt", b"indexed while there was room");
    let small = SmallFs::mount(&fixture.dir.path().join("small"), "128m");
    let state = small.path.join("state");
    let scan = shoal(&scan_args(&fixture.data_root(), &state));
    assert!(scan.status.success(), "{}", stderr(&scan));
    // Something else fills the file system, to less than the store's write reserve.
    let ballast = small.path.join("ballast");
    let free = shoal::space::available(&small.path).unwrap();
    let keep_free = shoal::space::STATE_WRITE_RESERVE / 2;
    fs::write(&ballast, vec![0u8; (free - keep_free) as usize]).unwrap();
    fixture.write("second.txt", b"found while the disk was full");
    let scan = shoal(&scan_args(&fixture.data_root(), &state));
    assert_eq!(scan.status.code(), Some(2), "{}", stderr(&scan));
    assert!(
        stderr(&scan).contains("free on its file system"),
        "{}",
        stderr(&scan)
    );
    fs::remove_file(&ballast).unwrap();
    let scan = shoal(&scan_args(&fixture.data_root(), &state));
    assert!(scan.status.success(), "{}", stderr(&scan));
    let store = shoal::store::Store::open(&state, shoal::store::OpenOptions::READ_ONLY).unwrap();
    let listing = index_listing(&store, "vol");
    assert!(listing.contains_key(&b"first.txt"[..]) && listing.contains_key(&b"second.txt"[..]));
}

fn fixture_verify(data_root: &Path, state: &Path) -> std::process::Output {
    shoal_at(data_root, state, "verify", &[])
}

const FILE_SIZE: usize = 5 << 20;
const FILES: u64 = 40;

/// Node 0 with 40 files of 5 MiB, node 1's volume on a small file system that `mount`
/// makes (one that holds about 15 of them): returns once node 1 has published what fits
/// and reports its full disk (in `/status`, `/metrics` and the log), with the names it
/// published.
fn full_disk_cluster<F>(mount: impl FnOnce(&Path) -> F) -> (Cluster, F, Vec<String>) {
    let mut c = Cluster::new(2);
    // Node 0 deletes three quarters of the set at once to make it fit, which the delete
    // guard would hold until released (tests/suite/guard.rs).
    c.extra_env[0].push(("SHOAL_DELETE_GUARD".into(), "off".into()));
    let small = mount(&c.vol(1));
    for i in 0..FILES {
        write_file(
            &c.vol(0).join(format!("f{i:02}.bin")),
            &random_bytes(FILE_SIZE, i),
        );
    }
    c.start_all();
    let deadline = Instant::now() + CONVERGE;
    let published = loop {
        let full = c
            .status(1)
            .and_then(|s| s["volumes"][0]["disk_full"].as_object().cloned());
        let published = names(&c.vol(1));
        if let Some(full) = full
            && published.len() >= 12
        {
            assert!(full["waiting_files"].as_u64().unwrap() >= 1, "{full:?}");
            assert!(full["needed_bytes"].as_u64().unwrap() >= FILE_SIZE as u64);
            break published;
        }
        assert!(
            Instant::now() < deadline,
            "node 1 did not publish what fits ({} files) and report a full disk within {CONVERGE:?}\n{}",
            published.len(),
            c.log(1)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    // What was published is whole: each name holds node 0's content.
    for name in &published {
        assert_eq!(
            fs::read(c.vol(1).join(name)).unwrap(),
            fs::read(c.vol(0).join(name)).unwrap(),
            "{name}"
        );
    }
    let metrics = c.metrics(1).unwrap_or_default();
    assert!(
        metrics.contains("shoal_volume_disk_full{volume=\"vol\"} 1"),
        "{metrics}"
    );
    // Several rounds later the log still says it once.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        c.log(1).matches("no space left").count(),
        1,
        "the full disk is to be said once:\n{}",
        c.log(1)
    );
    (c, small, published)
}

/// Node 1 fetched no chunk twice: it received no more than the files it ever published
/// (`earlier`: what a previous run of node 1 received, its counters being per process).
fn assert_fetched_once(c: &Cluster, ever_published: &BTreeSet<String>, earlier: u64) {
    let received = earlier + c.total(1, "chunk_bytes_received");
    let bound = ever_published.len() as u64 * FILE_SIZE as u64;
    assert!(
        received <= bound,
        "node 1 received {received} bytes for {} files of {FILE_SIZE}",
        ever_published.len()
    );
}

fn assert_room_again(c: &Cluster) {
    let status = c.status(1).unwrap();
    assert!(status["volumes"][0]["disk_full"].is_null(), "{status}");
    assert!(c.log(1).contains("there is room again"), "{}", c.log(1));
}

#[test]
fn a_full_volume_publishes_what_fits_and_converges_once_the_set_shrinks_to_fit() {
    let (c, _small, published) = full_disk_cluster(|at| SmallFs::mount(at, "80m"));
    // Node 0 keeps the last ten: most of them are among those node 1 had no room for.
    for i in 0..FILES - 10 {
        fs::remove_file(c.vol(0).join(format!("f{i:02}.bin"))).unwrap();
    }
    c.wait_converged(&[0, 1], CONVERGE);
    assert_eq!(names(&c.vol(1)).len(), 10);
    assert_room_again(&c);
    let ever: BTreeSet<String> = published.into_iter().chain(names(&c.vol(1))).collect();
    assert_fetched_once(&c, &ever, 0);
}

#[test]
fn a_full_volume_converges_once_its_file_system_grows() {
    let (c, small, _) = full_disk_cluster(|at| SmallFs::mount(at, "80m"));
    small.resize("400m");
    c.wait_converged(&[0, 1], CONVERGE);
    assert_eq!(names(&c.vol(1)).len(), FILES as usize);
    assert_room_again(&c);
    assert_fetched_once(&c, &names(&c.vol(1)).into_iter().collect(), 0);
}

/// The same on ext4 in a loop image grown by `resize2fs`: a block file system, whose
/// full disk comes with delayed allocation and metadata blocks. Online if this machine
/// lets root resize a mounted ext4 (`CAP_SYS_RESOURCE`); otherwise node 1 is stopped
/// for an offline resize and started again, and must then take the rest without
/// fetching again what it had.
#[test]
fn a_full_volume_on_a_loop_image_converges_once_resize2fs_grows_it() {
    let (mut c, image, _) = full_disk_cluster(|at| LoopFs::mount(at, "96m"));
    match image.grow_online("400m") {
        Ok(()) => {
            eprintln!("resize2fs grew the mounted file system");
            c.wait_converged(&[0, 1], CONVERGE);
            assert_room_again(&c);
            assert_fetched_once(&c, &names(&c.vol(1)).into_iter().collect(), 0);
        }
        Err(why) => {
            eprintln!("online resize refused ({why}); resizing with node 1 stopped");
            let received_before = c.total(1, "chunk_bytes_received");
            c.stop(1);
            image.grow_offline("400m");
            c.start(1);
            c.wait_converged(&[0, 1], CONVERGE);
            let status = c.status(1).unwrap();
            assert!(status["volumes"][0]["disk_full"].is_null(), "{status}");
            let all = names(&c.vol(1)).into_iter().collect();
            assert_fetched_once(&c, &all, received_before);
        }
    }
    assert_eq!(names(&c.vol(1)).len(), FILES as usize);
}

#[test]
fn a_node_that_dies_between_publishing_and_indexing_takes_the_file_as_received() {
    let mut c = Cluster::new(2);
    c.extra_env[1].push(("SHOAL_FAULT_CRASH_BEFORE_INDEXING".into(), "1".into()));
    // Deleting a volume's last file is another rule's business (empty volumes).
    write_file(&c.vol(0).join("anchor.txt"), b"stays");
    write_file(&c.vol(0).join("doc.txt"), b"written on node 0");
    c.start_all();
    assert_eq!(c.wait_exit(1, CONVERGE), Some(99), "{}", c.log(1));
    assert_eq!(
        fs::read(c.vol(1).join("doc.txt")).unwrap(),
        b"written on node 0"
    );
    c.extra_env[1].clear();
    c.start(1);
    c.wait_converged(&[0, 1], CONVERGE);
    // Its scan at start found the received files for what they are: nothing of its own
    // to announce, no version of its own that a delete elsewhere could lose against.
    assert_eq!(c.total(1, "local_changes"), 0, "{}", c.log(1));
    fs::remove_file(c.vol(0).join("doc.txt")).unwrap();
    c.wait_converged(&[0, 1], CONVERGE);
    assert!(
        !c.vol(0).join("doc.txt").exists(),
        "the delete was undone:\n{}",
        c.log(0)
    );
    assert!(!c.vol(1).join("doc.txt").exists());
}

/// Issue 17, item 5: on a running node, deleting a volume's last file is a delete like
/// any other (the empty-volume rule is for a volume found empty at start).
#[test]
fn deleting_the_last_file_of_a_volume_on_a_running_node_stays_deleted() {
    let mut c = Cluster::new(2);
    write_file(&c.vol(0).join("only.txt"), b"the volume's one file");
    c.start_all();
    c.wait_converged(&[0, 1], CONVERGE);
    assert!(c.vol(1).join("only.txt").exists());

    fs::remove_file(c.vol(0).join("only.txt")).unwrap();
    let deadline = Instant::now() + CONVERGE;
    while c.vol(1).join("only.txt").exists() {
        assert!(
            Instant::now() < deadline,
            "the delete did not reach node 1:\n{}",
            c.log(0)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Several heartbeats (1 s each): full rescans of the empty volume and pull rounds
    // both ways, none of which may bring the file back; nor may a restart.
    std::thread::sleep(Duration::from_secs(5));
    c.stop(0);
    c.start(0);
    c.wait_connected(CONVERGE);
    std::thread::sleep(Duration::from_secs(3));
    c.wait_converged(&[0, 1], CONVERGE);
    for i in 0..2 {
        assert_eq!(names(&c.vol(i)), Vec::<String>::new(), "node {i}");
        assert!(
            !c.log(i).contains("treating it as a fresh volume"),
            "node {i}:\n{}",
            c.log(i)
        );
    }
}

/// The kill storm's failure in CI (roots equal, trees on disk not, for good): a pull that
/// lost a conflict moved its version aside as a conflict copy and was killed before the
/// winner came, and the copy was deleted before any scan had seen it. The index kept the
/// old name and the copy as live entries with no scan stamp, which no scan looked at:
/// the copy stayed in the index (and the peers') while no disk held it, and every round
/// after tried to move the empty name aside again ("No such file or directory"). Now
/// the name moved aside is a delete in the index at once, and a scan checks every live
/// entry, stamped or not.
#[test]
fn a_conflict_copy_left_unscanned_by_a_crash_and_then_deleted_is_deleted_everywhere() {
    let mut c = Cluster::new(2);
    write_file(&c.vol(0).join("anchor.txt"), b"stays");
    write_file(&c.vol(0).join("doc.txt"), b"first");
    c.start_all();
    c.wait_converged(&[0, 1], CONVERGE);
    c.stop(0);
    c.stop(1);
    // Concurrent edits; node 1's is the later, so it wins on both sides.
    write_file(&c.vol(0).join("doc.txt"), b"node 0's edit");
    let earlier = std::time::SystemTime::now() - Duration::from_secs(100);
    fs::File::options()
        .write(true)
        .open(c.vol(0).join("doc.txt"))
        .unwrap()
        .set_times(fs::FileTimes::new().set_modified(earlier))
        .unwrap();
    write_file(&c.vol(1).join("doc.txt"), b"node 1's edit");
    // Node 1 pulls from nobody for now: node 0 alone decides the conflict, so it is
    // node 0 that moves its version aside (and dies right after).
    c.peers[1] = Some(Vec::new());
    c.extra_env[0].push(("SHOAL_FAULT_CRASH_AFTER_MOVE_ASIDE".into(), "1".into()));
    c.start(1);
    c.start(0);
    assert_eq!(c.wait_exit(0, CONVERGE), Some(99), "{}", c.log(0));
    let copies: Vec<String> = names(&c.vol(0))
        .into_iter()
        .filter(|n| n.contains(".sync-conflict-"))
        .collect();
    assert_eq!(copies.len(), 1, "{:?}", names(&c.vol(0)));
    assert!(!c.vol(0).join("doc.txt").exists());
    // What node 0's index says matches its disk: the name moved aside is deleted.
    let node0 = c.dir.path().join("node0");
    let verified = shoal_at(&node0.join("data"), &node0.join("state"), "verify", &[]);
    assert!(verified.status.success(), "{}", stdout(&verified));
    // The copy is deleted before any scan of node 0 sees it.
    fs::remove_file(c.vol(0).join(&copies[0])).unwrap();
    c.extra_env[0].clear();
    c.stop(1);
    c.peers[1] = None;
    c.start_all();
    c.wait_converged(&[0, 1], CONVERGE);
    for i in 0..2 {
        assert_eq!(names(&c.vol(i)), ["anchor.txt", "doc.txt"], "node {i}");
        assert_eq!(
            fs::read(c.vol(i).join("doc.txt")).unwrap(),
            b"node 1's edit"
        );
        assert!(
            !c.log(i).contains("cannot keep the conflict copy"),
            "node {i}:\n{}",
            c.log(i)
        );
    }
    for i in 0..2 {
        c.stop(i);
        let node = c.dir.path().join(format!("node{i}"));
        let verified = shoal_at(&node.join("data"), &node.join("state"), "verify", &[]);
        assert!(verified.status.success(), "node {i}: {}", stdout(&verified));
    }
}

/// A deleted name that came back in the kill storm: node 1 deleted a file concurrently
/// with node 0's edit; the edit won (live beats deleted), and took the delete's count
/// into its history. Node 2 had the edit from before that merge and then deleted it:
/// its delete, lacking node 1's count, was concurrent with the merged edit, which won
/// again, and the file came back on every node. A live version that wins over a delete
/// whose only news is itself now keeps its own history, and node 2's delete, which saw
/// the edit, dominates it.
#[test]
fn a_delete_made_after_seeing_an_edit_stays_deleted_though_the_edit_beat_an_earlier_delete() {
    let mut c = Cluster::new(3);
    write_file(&c.vol(0).join("anchor.txt"), b"stays");
    write_file(&c.vol(0).join("f.txt"), b"first");
    c.start_all();
    c.wait_connected(CONVERGE);
    c.wait_converged(&[0, 1, 2], CONVERGE);
    for i in 0..3 {
        c.stop(i);
    }
    // Node 0 edits; node 2 takes the edit; node 1, which has not seen it, deletes.
    write_file(&c.vol(0).join("f.txt"), b"node 0's edit");
    c.start(0);
    c.start(2);
    c.wait_converged(&[0, 2], CONVERGE);
    c.stop(2);
    fs::remove_file(c.vol(1).join("f.txt")).unwrap();
    c.start(1);
    c.wait_converged(&[0, 1], CONVERGE);
    for i in [0, 1] {
        assert_eq!(
            fs::read(c.vol(i).join("f.txt")).unwrap(),
            b"node 0's edit",
            "node {i}: the edit beats the delete that had not seen it"
        );
    }
    // Node 2, which saw the edit and not node 1's delete, deletes it.
    fs::remove_file(c.vol(2).join("f.txt")).unwrap();
    c.start(2);
    c.wait_connected(CONVERGE);
    c.wait_converged(&[0, 1, 2], CONVERGE);
    // A few heartbeats of rescans and rounds, none of which may bring it back.
    std::thread::sleep(Duration::from_secs(3));
    c.wait_converged(&[0, 1, 2], CONVERGE);
    for i in 0..3 {
        assert_eq!(names(&c.vol(i)), ["anchor.txt"], "node {i}:\n{}", c.log(i));
    }
}

/// `size` nodes with the delete guard off (their deletes are histories of their own,
/// as in the storm), started, connected and converged on `anchor.txt` and `f.txt`
/// holding `content`.
fn converged_without_delete_guard(size: usize, content: &[u8]) -> Cluster {
    let mut c = Cluster::new(size);
    for env in &mut c.extra_env {
        env.push(("SHOAL_DELETE_GUARD".into(), "off".into()));
    }
    write_file(&c.vol(0).join("anchor.txt"), b"stays");
    write_file(&c.vol(0).join("f.txt"), content);
    c.start_all();
    c.wait_connected(CONVERGE);
    c.wait_converged(&(0..size).collect::<Vec<_>>(), CONVERGE);
    c
}

/// The kill storm's resurrection of 2026-12-04 (CI at 1e5ffb2, seed
/// 1796351744678876283), step by step, and the limit of version vectors it shows. Node 0
/// edits a file and then deletes it, each change scanned on its own; node 1, which saw
/// neither, writes the file. Node 0 takes the write over its delete (live beats
/// deleted) with both histories merged, as it must: its delete had seen an edit the
/// write lacks. Node 1 then deletes its write before the merge reaches it; its delete
/// lacks node 0's counts, is concurrent with the merged version and loses to it. The
/// write comes back on both nodes although node 1 deleted it after writing it: a
/// version vector says which changes a version has seen, not which content a delete
/// removed, and the safe reading keeps the content (`docs/RELIABILITY.md`, "What the
/// storm allows"). What must hold: nothing is lost, no copy appears, both agree.
#[test]
fn a_delete_that_missed_a_delete_merged_into_the_version_it_deleted_keeps_that_version() {
    let mut c = converged_without_delete_guard(2, b"first");
    c.stop(1);
    // Node 0, alone, edits the file and deletes it: two scans, two counts of its own.
    let before = c.scans_with_changes(0);
    write_file(&c.vol(0).join("f.txt"), b"node 0's edit");
    c.wait_scan_with_changes(0, before, CONVERGE, "node 0 never scanned its edit");
    let before = c.scans_with_changes(0);
    fs::remove_file(c.vol(0).join("f.txt")).unwrap();
    c.wait_scan_with_changes(0, before, CONVERGE, "node 0 never scanned its delete");
    c.stop(0);
    // Node 1 writes the file; node 0 takes it, merged with its delete. Node 1 pulls
    // from nobody meanwhile, so the merge does not reach it.
    let written = b"node 1's write";
    write_file(&c.vol(1).join("f.txt"), written);
    c.peers[1] = Some(Vec::new());
    c.start(1);
    c.start(0);
    let deadline = Instant::now() + CONVERGE;
    while fs::read(c.vol(0).join("f.txt")).ok().as_deref() != Some(&written[..]) {
        assert!(
            Instant::now() < deadline,
            "node 0 never took node 1's write:\n{}",
            tail(&c.log(0), 30)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Node 1 deletes its write, then meets the merge.
    let before = c.scans_with_changes(1);
    fs::remove_file(c.vol(1).join("f.txt")).unwrap();
    c.wait_scan_with_changes(1, before, CONVERGE, "node 1 never scanned its delete");
    c.stop(1);
    c.peers[1] = None;
    c.start(1);
    c.wait_converged(&[0, 1], CONVERGE);
    for i in 0..2 {
        assert_eq!(names(&c.vol(i)), ["anchor.txt", "f.txt"], "node {i}");
        assert_eq!(
            fs::read(c.vol(i).join("f.txt")).unwrap(),
            written,
            "node {i}"
        );
    }
    assert!(
        c.log(1)
            .contains("concurrent changes to f.txt: the peer's version wins over our delete"),
        "{}",
        tail(&c.log(1), 30)
    );
}

/// The kill storm's lost write of 2026-12-02 (seed 1796237000166234453), step by step.
/// Node 0 deletes a file (its delete counts 2 for node 0); node 1, which never saw that,
/// edits it, and node 0 takes the edit over its delete with the edit's own history (1
/// for node 0). Node 1 then deletes the edit, and node 2 merges both deletes (2 for node
/// 0, 2 for node 1). Node 0, which saw neither that delete nor the merge, edits the file
/// again: counted 2 for node 0 once more, the merged delete took it for a change it had
/// seen and deleted it everywhere. Counted past node 0's own delete, 3, it is a change
/// no delete has seen, and it stays.
#[test]
fn an_edit_after_our_delete_lost_to_a_peer_is_counted_past_that_delete() {
    let mut c = converged_without_delete_guard(3, b"L, written on node 0");
    for i in 0..3 {
        c.stop(i);
    }
    // Node 0 deletes the file; node 2 takes the delete.
    fs::remove_file(c.vol(0).join("f.txt")).unwrap();
    c.start(0);
    c.start(2);
    c.wait_converged(&[0, 2], CONVERGE);
    c.stop(0);
    c.stop(2);
    // Node 1 edits the file it still has; node 0 takes the edit over its delete.
    write_file(&c.vol(1).join("f.txt"), b"R, edited on node 1");
    c.start(0);
    c.start(1);
    c.wait_converged(&[0, 1], CONVERGE);
    assert_eq!(
        fs::read(c.vol(0).join("f.txt")).unwrap(),
        b"R, edited on node 1"
    );
    c.stop(0);
    c.stop(1);
    // Node 1 deletes the edit; node 0, unaware, edits the file again.
    fs::remove_file(c.vol(1).join("f.txt")).unwrap();
    write_file(&c.vol(0).join("f.txt"), b"E, edited on node 0 last");
    // Node 2 merges the two deletes; then node 0's edit meets the merge.
    c.start(1);
    c.start(2);
    c.wait_converged(&[1, 2], CONVERGE);
    assert!(!c.vol(2).join("f.txt").exists());
    c.start(0);
    c.wait_converged(&[0, 1, 2], CONVERGE);
    for i in 0..3 {
        assert_eq!(
            fs::read(c.vol(i).join("f.txt")).ok().as_deref(),
            Some(&b"E, edited on node 0 last"[..]),
            "node {i}: {:?}\n--- node 0 log:\n{}\n--- node 2 log:\n{}",
            names(&c.vol(i)),
            tail(&c.log(0), 30),
            tail(&c.log(2), 30)
        );
    }
}

/// Two nodes started with `f.txt` holding `content` and converged; node 1 is held for 3 s
/// each time it is about to remove or replace a file once it checked it
/// (`SHOAL_FAULT_PAUSE_BEFORE_REMOVING_MS`).
fn cluster_held_before_removing(content: &[u8]) -> Cluster {
    let mut c = Cluster::new(2);
    for env in &mut c.extra_env {
        env.push(("SHOAL_DELETE_GUARD".into(), "off".into()));
    }
    c.extra_env[1].push(("SHOAL_FAULT_PAUSE_BEFORE_REMOVING_MS".into(), "3000".into()));
    write_file(&c.vol(0).join("anchor.txt"), b"stays");
    write_file(&c.vol(0).join("f.txt"), content);
    c.start_all();
    c.wait_connected(CONVERGE);
    c.wait_converged(&[0, 1], CONVERGE);
    c
}

/// Makes `change` on node 0, then waits until node 1 is held with `f.txt` checked
/// (its log says `held` once more).
fn change_and_wait_until_held(c: &Cluster, change: impl FnOnce(), held: &str) {
    let before = c.log(1).matches(held).count();
    change();
    let deadline = Instant::now() + CONVERGE;
    while c.log(1).matches(held).count() == before {
        assert!(
            Instant::now() < deadline,
            "node 1 never got to '{held}':\n{}",
            tail(&c.log(1), 30)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A write that lands on a file between the moment a peer's delete is checked against
/// the disk and the moment it is removed is kept: the file is moved aside, checked
/// again and put back. Before, the `unlink` took the write with it, on every node.
#[test]
fn a_write_landing_while_a_peers_delete_is_applied_is_kept() {
    let c = cluster_held_before_removing(b"the version node 0 deletes");
    change_and_wait_until_held(
        &c,
        || fs::remove_file(c.vol(0).join("f.txt")).unwrap(),
        "between deciding deletes and removing them",
    );
    // In place, as an editor saving over the file or `>` does: the same inode.
    let local = b"written on node 1 as the delete came";
    fs::write(c.vol(1).join("f.txt"), local).unwrap();
    c.wait_converged(&[0, 1], CONVERGE);
    for i in 0..2 {
        assert_eq!(
            fs::read(c.vol(i).join("f.txt")).ok().as_deref(),
            Some(&local[..]),
            "node {i}: {:?}\n--- node 1 log:\n{}",
            names(&c.vol(i)),
            tail(&c.log(1), 30)
        );
    }
    assert!(
        c.log(1)
            .contains("changed here while sync removed it; kept")
    );
}

/// The same for a peer's version replacing the file: it is swapped in
/// (`RENAME_EXCHANGE`), the local file checked again and, changed, swapped back; the
/// next round decides the conflict (the later write keeps the name, the peer's version
/// goes into a conflict copy). Before, the rename over the name took the write with it.
#[test]
fn a_write_landing_while_a_peers_version_replaces_the_file_is_kept() {
    let c = cluster_held_before_removing(b"the version both start with");
    change_and_wait_until_held(
        &c,
        || write_file(&c.vol(0).join("f.txt"), b"the peer's version"),
        "between checking a file and replacing it",
    );
    let local = b"written on node 1 as the peer's version came";
    fs::write(c.vol(1).join("f.txt"), local).unwrap();
    c.wait_converged(&[0, 1], CONVERGE);
    for i in 0..2 {
        let names = names(&c.vol(i));
        let copy = names.iter().find(|n| n.starts_with("f.sync-conflict-"));
        assert_eq!(
            fs::read(c.vol(i).join("f.txt")).unwrap(),
            local,
            "node {i}: {names:?}\n--- node 1 log:\n{}",
            tail(&c.log(1), 30)
        );
        let copy = copy.unwrap_or_else(|| panic!("node {i}: no conflict copy in {names:?}"));
        assert_eq!(
            fs::read(c.vol(i).join(copy)).unwrap(),
            b"the peer's version"
        );
    }
    assert!(c.log(1).contains("changed here while sync replaced it"));
}

/// Two nodes with the delete guard off, converged on `anchor.txt` and `c/f.txt`.
fn converged_with_a_file_in_c() -> Cluster {
    let mut c = Cluster::new(2);
    for env in &mut c.extra_env {
        env.push(("SHOAL_DELETE_GUARD".into(), "off".into()));
    }
    write_file(&c.vol(0).join("anchor.txt"), b"stays");
    write_file(&c.vol(0).join("c/f.txt"), b"written on node 0");
    c.start_all();
    c.wait_connected(CONVERGE);
    c.wait_converged(&[0, 1], CONVERGE);
    c
}

/// Makes `change` on node `i`, then waits until its scans have logged a local change of
/// each of `names` (one "local changes" line naming it more than before).
fn change_and_wait_scanned(c: &Cluster, i: usize, names: &[&str], change: impl FnOnce()) {
    let counts = || -> Vec<usize> {
        let log = c.log(i);
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("local changes"))
            .collect();
        names
            .iter()
            .map(|name| lines.iter().filter(|l| l.contains(name)).count())
            .collect()
    };
    let before = counts();
    change();
    let deadline = Instant::now() + CONVERGE;
    while counts().iter().zip(&before).any(|(now, was)| now == was) {
        assert!(
            Instant::now() < deadline,
            "node {i} never scanned changes of {names:?}:\n{}",
            tail(&c.log(i), 30)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The kill storm's lost write of 2026-12-04 (CI at 47bb066, seed 1796397717385798107),
/// step by step: node 1 deletes directory `c` after it took `c/f.txt`; node 0, down,
/// renames `c` away and back. Its scan at restart finds `c/f.txt` exactly as it indexed
/// it (a directory's rename changes none of its files' stamps): a round trip that no
/// scan saw is no change at all, and the delete, which had seen that version, removes it
/// on both nodes. Shoal mirrors states, not the operations between them.
#[test]
fn a_directory_renamed_away_and_back_unseen_is_no_change_and_a_delete_that_saw_it_applies() {
    let mut c = converged_with_a_file_in_c();
    c.stop(0);
    let before = c.scans_with_changes(1);
    fs::remove_dir_all(c.vol(1).join("c")).unwrap();
    c.wait_scan_with_changes(1, before, CONVERGE, "node 1 never scanned its delete");
    fs::rename(c.vol(0).join("c"), c.vol(0).join("b")).unwrap();
    fs::rename(c.vol(0).join("b"), c.vol(0).join("c")).unwrap();
    c.start(0);
    c.wait_converged(&[0, 1], CONVERGE);
    for i in 0..2 {
        assert!(
            !c.vol(i).join("c/f.txt").exists(),
            "node {i}: {:?}\n--- node 0 log:\n{}",
            names(&c.vol(i)),
            tail(&c.log(0), 30)
        );
        assert!(!c.vol(i).join("b").exists(), "node {i}");
    }
}

/// The kill storm's damaged index of 2026-12-04 (CI at 03f8793, seed
/// 1796406690212788949): node 1's `rm -rf c` and node 0's delete of the same directory
/// crossed. Node 1's round found `c` gone before any scan of its own had seen it go: it
/// recorded the delete of `c` but skipped `c/f.txt`, whose directory it could not open,
/// and `c/f.txt` stayed live in its index under a deleted directory, on no disk
/// (`verify`: missing). A name whose directory is gone is gone: the peer's delete is
/// recorded for it as well.
#[test]
fn a_peers_delete_of_a_directory_removed_here_unscanned_leaves_nothing_indexed_under_it() {
    let mut c = converged_with_a_file_in_c();
    // Node 1 runs on, but neither its watcher nor a heartbeat scans while the test looks.
    c.stop(1);
    c.heartbeat = 3600;
    c.extra_env[1].push(("SHOAL_DEBOUNCE_MS".into(), "120000".into()));
    // Its first scan must be over before `c` goes, or that scan records the delete
    // itself (CI at 20a9a54) and there is no peer's delete left to apply.
    c.start_and_wait_serving(1, CONVERGE);
    c.wait_connected(CONVERGE);
    fs::remove_dir_all(c.vol(1).join("c")).unwrap();
    fs::remove_dir_all(c.vol(0).join("c")).unwrap();
    let deadline = Instant::now() + CONVERGE;
    while !c.log(1).contains("applied delete of c ") {
        assert!(
            Instant::now() < deadline,
            "node 1 never applied node 0's delete of c:\n{}",
            tail(&c.log(1), 30)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    c.stop(1);
    let node = c.dir.path().join("node1");
    let verify = shoal_at(&node.join("data"), &node.join("state"), "verify", &[]);
    assert!(
        verify.status.success(),
        "{}\n--- node 1 log:\n{}",
        stdout(&verify),
        tail(&c.log(1), 30)
    );
}

/// The same crossing with names the peer's delete does not dominate: node 1 changed
/// `c/f.txt` and wrote `c/sub/g.txt` (in a directory both had) while node 0, down,
/// deleted `c`; then node 1 removed `c` itself, unscanned, and node 0's delete of `c`
/// arrived. The delete skips them (a concurrent change each: the new file moved
/// `c/sub`'s mtime) and records `c`, gone from disk: they must not stay live in node 1's
/// index on no disk, where no scan would ever look. Node 1 records them as deleted here,
/// as a scan would (`c/sub` and what it holds too), and both nodes end without `c`.
#[test]
fn a_concurrent_change_under_a_directory_removed_here_unscanned_is_recorded_deleted() {
    let mut c = converged_with_a_file_in_c();
    fs::create_dir(c.vol(0).join("c/sub")).unwrap();
    c.wait_converged(&[0, 1], CONVERGE);
    c.stop(0);
    let vol = c.vol(1);
    change_and_wait_scanned(&c, 1, &["c/f.txt", "c/sub/g.txt"], || {
        fs::write(vol.join("c/f.txt"), b"changed on node 1").unwrap();
        write_file(&vol.join("c/sub/g.txt"), b"new on node 1");
    });
    c.stop(1);
    fs::remove_dir_all(c.vol(0).join("c")).unwrap();
    c.heartbeat = 3600;
    c.extra_env[1].push(("SHOAL_DEBOUNCE_MS".into(), "120000".into()));
    c.start_and_wait_serving(1, CONVERGE);
    // Its first scan is over: from here on nothing scans node 1 while the test looks.
    fs::remove_dir_all(c.vol(1).join("c")).unwrap();
    c.start(0);
    c.wait_converged(&[0, 1], CONVERGE);
    assert!(
        c.log(1).contains("applied delete of c "),
        "node 1 did not apply node 0's delete of c:\n{}",
        tail(&c.log(1), 30)
    );
    for i in 0..2 {
        assert!(
            !c.vol(i).join("c").exists(),
            "node {i}: {:?}",
            names(&c.vol(i))
        );
        c.stop(i);
        let node = c.dir.path().join(format!("node{i}"));
        let verify = shoal_at(&node.join("data"), &node.join("state"), "verify", &[]);
        assert!(verify.status.success(), "node {i}: {}", stdout(&verify));
    }
}

/// The same round trip made while node 0 runs and scans each step is two changes of its
/// own: `c/f.txt` deleted, then created again. The new version is concurrent with node
/// 1's delete, which never saw it, and live beats deleted: the file stays on both nodes.
/// (`sync::a_directory_renamed_away_and_back_keeps_its_file_against_a_delete_made_
/// meanwhile` plays it against a delete of the file; this one against `rm -rf` of the
/// directory, the storm's shape.)
#[test]
fn a_directory_renamed_away_and_back_under_a_running_node_is_kept_over_a_concurrent_delete() {
    let mut c = converged_with_a_file_in_c();
    // Node 1's delete is made while it is down, so that it misses node 0's round trip
    // and node 0 misses the delete until both run again.
    c.stop(1);
    fs::remove_dir_all(c.vol(1).join("c")).unwrap();
    let (vol, moved) = (c.vol(0), ["b/f.txt", "c/f.txt"]);
    change_and_wait_scanned(&c, 0, &moved, || {
        fs::rename(vol.join("c"), vol.join("b")).unwrap()
    });
    change_and_wait_scanned(&c, 0, &moved, || {
        fs::rename(vol.join("b"), vol.join("c")).unwrap()
    });
    c.start(1);
    c.wait_converged(&[0, 1], CONVERGE);
    for i in 0..2 {
        assert_eq!(
            fs::read(c.vol(i).join("c/f.txt")).ok().as_deref(),
            Some(&b"written on node 0"[..]),
            "node {i}: {:?}\n--- node 0 log:\n{}\n--- node 1 log:\n{}",
            names(&c.vol(i)),
            tail(&c.log(0), 30),
            tail(&c.log(1), 30)
        );
        assert!(!c.vol(i).join("b").exists(), "node {i}");
    }
}
