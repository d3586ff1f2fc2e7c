//! The change feed (issue 13) between real processes: a change announced by a peer
//! arrives through its feed, a peer is not sent back the changes it sent, a peer whose
//! mark the feed no longer reaches walks the tree and converges, a walk never records a
//! mark past what the peer's tree showed it, a file that another peer's round placed
//! first is decided again soon, and a hostile peer's answers to `GetChanges` are
//! refused whole.

use std::fs;
use std::time::Duration;

use shoal::protocol::{Request, Response, WireEntry};
use shoal::store::{FeedId, FeedMark};

use crate::cluster::Cluster;
use crate::control::{control, wait_for};
use crate::hostile::{HOSTILE_FEED_MARK, HostileServer, healthy_within_a_second};
use crate::util::random_bytes;

/// Long enough that no heartbeat round (a walk) runs during a test: what arrives came
/// through an announcement, which follows the feed.
const NO_HEARTBEAT: u64 = 3600;

/// Pauses and resumes `vol` on node `i`: resuming wakes the node's pull from every peer
/// as an announcement does.
fn pause_and_resume(c: &Cluster, i: usize) {
    for verb in ["pause", "resume"] {
        let out = control(c, i, &[verb, "vol"]);
        assert!(
            out.status.success(),
            "{verb}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn a_change_reaches_the_peer_through_the_change_feed() {
    let mut c = Cluster::new(2);
    c.heartbeat = NO_HEARTBEAT;
    fs::create_dir_all(c.vol(0).join("dir")).unwrap();
    fs::write(c.vol(0).join("dir/first.txt"), b"before").unwrap();
    fs::write(c.vol(0).join("gone.txt"), b"deleted later").unwrap();
    c.start_all();
    c.wait_connected(Duration::from_secs(30));
    c.wait_converged(&[0, 1], Duration::from_secs(30));
    let before = c.total(1, "feed_changes");

    fs::write(c.vol(0).join("dir/second.bin"), random_bytes(200_000, 3)).unwrap();
    fs::write(c.vol(0).join("dir/first.txt"), b"after").unwrap();
    fs::remove_file(c.vol(0).join("gone.txt")).unwrap();
    c.wait_converged(&[0, 1], Duration::from_secs(30));
    assert_eq!(fs::read(c.vol(1).join("dir/first.txt")).unwrap(), b"after");
    assert!(!c.vol(1).join("gone.txt").exists());
    assert!(
        c.total(1, "feed_changes") >= before + 3 && c.total(1, "feed_rounds") >= 1,
        "the changes did not come through the feed: {:?}\n{}",
        c.status(1).map(|s| s["totals"].clone()),
        c.log(1)
    );
    assert_eq!(c.total(1, "feed_fallbacks"), 0);
    let metrics = c.metrics(1).unwrap();
    assert!(metrics.contains("shoal_feed_changes_total"), "{metrics}");
}

#[test]
fn a_peer_whose_mark_the_feed_no_longer_reaches_walks_the_tree_and_converges() {
    let mut c = Cluster::new(2);
    c.heartbeat = NO_HEARTBEAT;
    // Node 0 keeps 5 changes (and cuts the older ones 1,024 changes past that).
    c.extra_env[0].push(("SHOAL_FEED_RETENTION".into(), "5".into()));
    fs::write(c.vol(0).join("base.txt"), b"both have this").unwrap();
    c.start_all();
    c.wait_connected(Duration::from_secs(30));
    c.wait_converged(&[0, 1], Duration::from_secs(30));

    // Node 1 stops pulling while node 0 makes more changes than its feed keeps.
    assert!(control(&c, 1, &["pause", "vol"]).status.success());
    fs::create_dir_all(c.vol(0).join("many")).unwrap();
    for n in 0..1100 {
        fs::write(c.vol(0).join(format!("many/{n}.txt")), n.to_string()).unwrap();
    }
    wait_for(
        Duration::from_secs(60),
        "node 0 indexes its new files",
        || {
            c.status(0)
                .is_some_and(|s| s["volumes"][0]["files"].as_u64() == Some(1101))
        },
    );
    assert!(control(&c, 1, &["resume", "vol"]).status.success());
    c.wait_converged(&[0, 1], Duration::from_secs(60));
    assert!(
        c.total(1, "feed_fallbacks") >= 1,
        "node 1 did not fall back to the walk: {:?}",
        c.status(1).map(|s| s["totals"].clone())
    );
    assert!(c.log(1).contains("no longer reaches back"), "{}", c.log(1));

    // Its mark is current again: the next change comes through the feed.
    let before = c.total(1, "feed_changes");
    fs::write(c.vol(0).join("base.txt"), b"changed after the walk").unwrap();
    c.wait_converged(&[0, 1], Duration::from_secs(30));
    assert!(c.total(1, "feed_changes") > before);
}

/// How long node 1 of the chain below waits in a round between taking its files and
/// ending the round (its tree updated): node 2 starts and walks it meanwhile.
const HALF_APPLIED: Duration = Duration::from_secs(8);

#[test]
fn a_walk_while_the_peer_has_taken_files_not_yet_in_its_tree_still_gets_them_through_the_feed() {
    // A chain: node 0 - node 1 - node 2 (nodes 0 and 2 do not know each other).
    let mut c = Cluster::new(3);
    c.heartbeat = NO_HEARTBEAT;
    c.peers[0] = Some(vec![format!("{}:7029", c.ip(1))]);
    c.peers[2] = Some(vec![format!("{}:7029", c.ip(1))]);
    let pause = HALF_APPLIED.as_millis().to_string();
    c.extra_env[1].push(("SHOAL_FAULT_PAUSE_BEFORE_DELETES_MS".into(), pause));
    // Nor does node 1's watcher rescan what its round wrote (which would put it in the
    // tree) while the test looks.
    c.extra_env[1].push(("SHOAL_DEBOUNCE_MS".into(), "120000".into()));
    let content = random_bytes(100_000, 11);
    fs::write(c.vol(0).join("x.bin"), &content).unwrap();
    c.start(0);
    c.start(1);
    // Node 1 has published the file (indexed it, numbered it in its feed) and waits
    // before its tree takes it in.
    let published = wait_until(Duration::from_secs(30), || {
        fs::read(c.vol(1).join("x.bin")).is_ok_and(|b| b == content)
    });
    assert!(published, "node 1 did not take x.bin:\n{}", c.log(1));
    let taken = std::time::Instant::now();
    c.start(2);
    // Node 2's first round with node 1 is a walk: it asks where node 1's feed is, then
    // finds node 1's root (still without x.bin) equal to its own.
    let walked = wait_until(HALF_APPLIED, || {
        c.status(2)
            .is_some_and(|s| s["peers"][0]["volumes"][0]["last_round"].is_string())
    });
    assert!(walked, "node 2 did no round with node 1:\n{}", c.log(2));
    assert!(
        taken.elapsed() < HALF_APPLIED,
        "node 2's walk came after node 1's round ended: the race is not shown"
    );
    // Node 1's round ends and announces; node 2 follows node 1's feed from the mark
    // its walk recorded, which must not be past x.bin (no heartbeat walk comes).
    c.wait_converged(&[0, 1, 2], HALF_APPLIED + Duration::from_secs(30));
    assert_eq!(fs::read(c.vol(2).join("x.bin")).unwrap(), content);
}

#[test]
fn a_peer_following_the_feed_gets_none_of_its_own_changes_back_and_every_change_made_there() {
    let mut c = Cluster::new(2);
    c.heartbeat = NO_HEARTBEAT;
    for d in 0..20 {
        let dir = c.vol(0).join(format!("d{d:02}"));
        fs::create_dir_all(&dir).unwrap();
        for f in 0..3 {
            fs::write(dir.join(format!("f{f}.txt")), format!("{d} {f}")).unwrap();
        }
    }
    c.start_all();
    c.wait_connected(Duration::from_secs(30));
    c.wait_converged(&[0, 1], Duration::from_secs(30));
    let (rounds, taken) = (c.total(0, "feed_rounds"), c.total(0, "feed_changes"));

    // Node 0 deletes a file in each directory (each directory's mtime changes with it),
    // rewrites one and adds one: node 1 takes each of them whole, announces, and node 0
    // follows node 1's feed back, which sends it none of them.
    for d in 0..20 {
        fs::remove_file(c.vol(0).join(format!("d{d:02}/f0.txt"))).unwrap();
    }
    fs::write(c.vol(0).join("d03/f1.txt"), random_bytes(300_000, 5)).unwrap();
    fs::write(c.vol(0).join("d04/new.txt"), b"new on node 0").unwrap();
    c.wait_converged(&[0, 1], Duration::from_secs(30));
    wait_for(
        Duration::from_secs(30),
        "node 0 follows node 1's feed after its announcement",
        || c.total(0, "feed_rounds") > rounds,
    );
    assert_eq!(
        c.total(0, "feed_changes"),
        taken,
        "node 1's feed sent node 0's own changes back\n{}",
        c.log(0)
    );

    // A name node 1 took from node 0 and then changed itself goes back to node 0.
    fs::write(c.vol(1).join("d03/f1.txt"), b"changed on node 1").unwrap();
    fs::remove_file(c.vol(1).join("d04/new.txt")).unwrap();
    c.wait_converged(&[0, 1], Duration::from_secs(30));
    assert_eq!(
        fs::read(c.vol(0).join("d03/f1.txt")).unwrap(),
        b"changed on node 1"
    );
    assert!(!c.vol(0).join("d04/new.txt").exists());
    assert!(c.total(0, "feed_changes") >= taken + 2);

    // Concurrent writes of one name: each node merges both histories into what it
    // writes (nothing there is the other's as sent), and both end with the same winner
    // and conflict copy through the feeds alone.
    let taken = c.total(0, "feed_changes");
    fs::write(c.vol(0).join("d05/f2.txt"), b"node 0's version").unwrap();
    fs::write(c.vol(1).join("d05/f2.txt"), b"node 1's version").unwrap();
    c.wait_converged(&[0, 1], Duration::from_secs(30));
    let copies = |i: usize| {
        fs::read_dir(c.vol(i).join("d05"))
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().contains("sync-conflict"))
            .count()
    };
    assert_eq!((copies(0), copies(1)), (1, 1));
    assert!(c.total(0, "feed_changes") > taken);
    assert_eq!(
        c.total(0, "feed_fallbacks") + c.total(1, "feed_fallbacks"),
        0
    );
}

#[test]
fn a_file_that_another_peers_round_placed_first_is_decided_again_soon_not_a_heartbeat_later() {
    let mut c = Cluster::new(3);
    c.heartbeat = NO_HEARTBEAT;
    let files: Vec<_> = (0..3).map(|i| c.vol(i).join("f.txt")).collect();
    fs::write(&files[0], b"first").unwrap();
    c.start_all();
    c.wait_connected(Duration::from_secs(30));
    c.wait_converged(&[0, 1, 2], Duration::from_secs(30));

    // Node 1 takes node 0's second version; node 2, paused, does not.
    let answer = control(&c, 2, &["pause", "vol"]);
    assert!(answer.status.success(), "{answer:?}");
    fs::write(&files[0], b"second, which node 1 holds").unwrap();
    c.wait_converged(&[0, 1], Duration::from_secs(30));
    // Node 0 makes a third, which node 1 does not take: from here on nodes 0 and 1
    // know only node 2.
    for i in 0..3 {
        c.stop(i);
    }
    fs::write(&files[0], b"third, the newest").unwrap();
    let node2 = format!("{}:7029", c.ip(2));
    c.peers[0] = Some(vec![node2.clone()]);
    c.peers[1] = Some(vec![node2]);
    // Node 2 holds each batch from node 0 for 8 s after deciding on it.
    let node0 = format!("{}:7029", c.ip(0));
    c.extra_env[2].push(("SHOAL_FAULT_PAUSE_BEFORE_STAGING_MS".into(), "8000".into()));
    c.extra_env[2].push(("SHOAL_FAULT_PAUSE_STAGING_PEER".into(), node0));
    c.start_and_wait_serving(0, Duration::from_secs(30));
    c.start_and_wait_serving(1, Duration::from_secs(30));
    c.start(2);
    wait_for(Duration::from_secs(30), "node 2 connects to both", || {
        c.status(2).is_some_and(|s| {
            s["peers"]
                .as_array()
                .is_some_and(|p| p.len() == 2 && p.iter().all(|p| p["connected"] == true))
        })
    });

    // Resumed, node 2 decides on node 0's third version and holds it; node 1, frozen
    // until then, answers after that decision, and its round places the second
    // version first.
    c.freeze(1);
    let resumed = control(&c, 2, &["resume", "vol"]);
    let held = wait_until(Duration::from_secs(10), || {
        c.log(2).contains("FAULT INJECTION: pausing")
    });
    c.thaw(1);
    assert!(resumed.status.success(), "{resumed:?}");
    assert!(held, "node 2 decided nothing from node 0:\n{}", c.log(2));
    let raced = wait_until(Duration::from_secs(7), || {
        fs::read(&files[2]).is_ok_and(|b| b == b"second, which node 1 holds")
    });
    assert!(raced, "node 1's round did not come first:\n{}", c.log(2));

    // Node 0's file finds the name changed and is decided again in a round soon: no
    // heartbeat walk comes in this test (node 0's rounds wait 8 s a batch).
    c.wait_converged(&[0, 1, 2], Duration::from_secs(60));
    assert_eq!(fs::read(&files[2]).unwrap(), b"third, the newest");
    assert!(
        c.log(2).contains("changed here while it was being fetched"),
        "{}",
        c.log(2)
    );
}

/// A change entry with a valid name.
fn change(dir: &str, name: &str) -> (shoal::pathname::VolPath, WireEntry) {
    let entry = shoal::entry::Entry {
        kind: shoal::entry::EntryKind::Dir,
        mode: 0o755,
        mtime_ns: 0,
        uid: 0,
        gid: 0,
        xattrs: Default::default(),
        link: None,
        version: shoal::entry::VersionVector::from_pairs([(shoal::ids::NodeId(77), 1)]),
    };
    (
        shoal::pathname::VolPath::parse(dir.as_bytes()).unwrap(),
        WireEntry {
            name: name.as_bytes().to_vec(),
            entry,
            subtree: None,
            chunks: None,
        },
    )
}

/// The hostile answers to `GetChanges`, one per round, each with what the victim's log
/// says of it.
fn hostile_changes(since: FeedMark) -> Vec<(Response, &'static str)> {
    let ahead = FeedMark {
        feed: HOSTILE_FEED_MARK.feed,
        seq: since.seq + 1,
    };
    let long_dir = ["d", "e", "f", "g", "h"].map(|c| c.repeat(220)).join("/");
    vec![
        // More names than any answer may hold.
        (
            Response::Changes {
                high: ahead,
                more: false,
                entries: (0..5000).map(|n| change("", &format!("n{n:05}"))).collect(),
            },
            "changes in one response",
        ),
        // Names that inflate past a control frame (4,096 names under a directory of
        // 1,104 bytes: 4.7 MiB, in a frame of a few KiB): refused before inflating.
        (
            Response::Changes {
                high: ahead,
                more: false,
                entries: (0..4096)
                    .map(|n| change(&long_dir, &format!("n{n:05}")))
                    .collect(),
            },
            "changed names of",
        ),
        // "More" without progress: the victim would ask the same question forever.
        (
            Response::Changes {
                high: since,
                more: true,
                entries: vec![],
            },
            "Changes answer: mark",
        ),
        // Another feed's mark.
        (
            Response::Changes {
                high: FeedMark {
                    feed: FeedId(1),
                    seq: 99,
                },
                more: false,
                entries: vec![change("", "x")],
            },
            "Changes answer: feed",
        ),
        // The same name twice.
        (
            Response::Changes {
                high: ahead,
                more: false,
                entries: vec![change("", "x"), change("", "x")],
            },
            "entry-key order",
        ),
        // An answer of another kind.
        (
            Response::Entries {
                entries: vec![],
                more: false,
            },
            "GetChanges",
        ),
    ]
}

#[test]
fn a_hostile_peers_oversized_or_garbled_change_answers_are_refused_cleanly() {
    let mut c = Cluster::new(2);
    c.heartbeat = NO_HEARTBEAT;
    let answers = hostile_changes(HOSTILE_FEED_MARK);
    let expected: Vec<&str> = answers.iter().map(|(_, said)| *said).collect();
    let answers = std::sync::Mutex::new(answers.into_iter().map(|(r, _)| r));
    let hostile = HostileServer::start(
        &c.credentials[1],
        &format!("{}:7029", c.ip(1)),
        "vol",
        Box::new(move |request| match request {
            // A walk that finds nothing: the victim records the hostile feed's mark.
            Request::GetChanges { .. } => answers.lock().unwrap().next().into_iter().collect(),
            Request::GetDir { .. } => vec![Response::Dir(Some(shoal::tree::TreeNode {
                hash: shoal::ids::TreeHash([7; 32]),
                versions: shoal::ids::TreeHash([8; 32]),
                pages: Vec::new(),
                totals: Default::default(),
            }))],
            Request::GetEntries { .. } => vec![Response::Entries {
                entries: vec![],
                more: false,
            }],
            _ => vec![Response::Ack],
        }),
    );
    c.start(0);
    let follows = |n: usize| {
        hostile
            .count(|r| matches!(r, Request::GetChanges { since, .. } if since.feed == HOSTILE_FEED_MARK.feed))
            >= n
    };
    wait_for(Duration::from_secs(30), "the victim's first walk", || {
        hostile.count(|r| matches!(r, Request::GetEntries { .. })) >= 1
    });
    let http = format!("{}:7030", c.ip(0));
    for (n, said) in expected.iter().enumerate() {
        // Each announcement-like wake-up makes the victim follow the feed again: its
        // mark stays where the walk left it, since no answer was believed.
        wait_for(
            Duration::from_secs(30),
            "the victim follows the feed",
            || {
                pause_and_resume(&c, 0);
                wait_until(Duration::from_secs(3), || follows(n + 1))
            },
        );
        wait_for(
            Duration::from_secs(10),
            &format!("a refusal saying {said:?}"),
            || c.log(0).contains(said),
        );
        assert!(healthy_within_a_second(&http), "{}", c.log(0));
    }
    assert!(
        fs::read_dir(c.vol(0))
            .unwrap()
            .filter_map(Result::ok)
            .all(|e| e.file_name() == ".shoal"),
        "the victim applied a refused answer: {:?}",
        fs::read_dir(c.vol(0))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect::<Vec<_>>()
    );
}

/// Whether `check` holds within `timeout` (polled every 100 ms).
fn wait_until(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    check()
}
