//! Issue acceptance for live mode: three real `shoal serve` processes whose heartbeat is
//! an hour, so only the file watcher can explain a change arriving; and the heartbeat's
//! rescan slices, which find what the watcher cannot see.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::cluster::*;
use crate::util::{random_bytes, write_file};

const CONVERGE: Duration = Duration::from_secs(60);

/// Three running, connected nodes with empty volumes and no periodic rounds.
fn live_cluster(configure: impl FnOnce(&mut Cluster)) -> Cluster {
    let mut c = Cluster::new(3);
    c.heartbeat = 3600;
    configure(&mut c);
    c.start_all();
    c.wait_connected(CONVERGE);
    c.wait_converged(&[0, 1, 2], CONVERGE);
    c
}

/// Nodes 1 and 2 only received: their scans found nothing of their own to announce.
fn assert_no_echo(c: &Cluster) {
    for i in [1, 2] {
        assert_eq!(
            c.total(i, "local_changes"),
            0,
            "node {i} re-published what it received:\n{}",
            c.log(i)
        );
    }
}

/// A change to make on a node, and its name for failure messages.
type Step<'a> = (&'static str, Box<dyn Fn() + 'a>);

#[test]
fn every_kind_of_change_on_one_node_reaches_the_others_without_a_trigger() {
    // The last step deletes most of the volume at once, which the delete guard would
    // hold until released (tests/suite/guard.rs); here it is to reach the peers live.
    let c = live_cluster(|c| {
        c.extra_env[0].push(("SHOAL_DELETE_GUARD".into(), "off".into()));
    });
    let a = c.vol(0);
    let outside = c.dir.path().join("outside");
    let steps: Vec<Step> = vec![
        (
            "create",
            Box::new(|| write_file(&a.join("notes.txt"), b"first draft")),
        ),
        (
            "modify",
            Box::new(|| fs::write(a.join("notes.txt"), b"second draft").unwrap()),
        ),
        (
            "append",
            Box::new(|| {
                let mut f = fs::OpenOptions::new()
                    .append(true)
                    .open(a.join("notes.txt"))
                    .unwrap();
                f.write_all(b", appended").unwrap();
            }),
        ),
        (
            "rename",
            Box::new(|| fs::rename(a.join("notes.txt"), a.join("renamed.txt")).unwrap()),
        ),
        (
            "chmod",
            Box::new(|| {
                fs::set_permissions(a.join("renamed.txt"), fs::Permissions::from_mode(0o600))
                    .unwrap()
            }),
        ),
        (
            "symlink",
            Box::new(|| symlink("renamed.txt", a.join("link")).unwrap()),
        ),
        (
            "mkdir -p and fill",
            Box::new(|| {
                fs::create_dir_all(a.join("deep/er/still")).unwrap();
                for i in 0..20 {
                    write_file(
                        &a.join(format!("deep/er/still/f{i}")),
                        &random_bytes(5000, i),
                    );
                }
            }),
        ),
        (
            "move a directory within the volume",
            Box::new(|| fs::rename(a.join("deep/er"), a.join("moved")).unwrap()),
        ),
        (
            "move a directory in from outside",
            Box::new(|| {
                for i in 0..5 {
                    write_file(
                        &outside.join(format!("in/sub/g{i}")),
                        &random_bytes(3000, 50 + i),
                    );
                }
                fs::rename(outside.join("in"), a.join("came-in")).unwrap();
            }),
        ),
        (
            "move a directory out",
            Box::new(|| fs::rename(a.join("moved"), outside.join("went-out")).unwrap()),
        ),
        (
            "delete a file",
            Box::new(|| fs::remove_file(a.join("link")).unwrap()),
        ),
        (
            "rm -rf a large tree",
            Box::new(|| {
                for d in 0..10 {
                    for f in 0..100 {
                        write_file(&a.join(format!("tree/d{d}/f{f}")), &[d as u8, f as u8]);
                    }
                }
            }),
        ),
        (
            "rm -rf a large tree (delete)",
            Box::new(|| fs::remove_dir_all(a.join("tree")).unwrap()),
        ),
    ];
    for (what, step) in steps {
        step();
        c.wait_converged(&[0, 1, 2], CONVERGE);
        let on_a = snapshot(&a);
        assert_eq!(snapshot(&c.vol(1)), on_a, "after {what}");
        assert_eq!(snapshot(&c.vol(2)), on_a, "after {what}");
    }
    let names = names(&c.vol(2));
    assert!(names.contains(&"renamed.txt".to_string()), "{names:?}");
    assert!(names.contains(&"came-in/sub/g4".to_string()), "{names:?}");
    assert!(
        !names
            .iter()
            .any(|n| n.starts_with("moved") || n.starts_with("tree"))
    );
    assert_eq!(
        fs::read(c.vol(1).join("renamed.txt")).unwrap(),
        b"second draft, appended"
    );
    assert!(c.total(0, "watch_scans") > 0);
    assert_no_echo(&c);
}

/// A renamed directory's files move on the receivers (no chunk is copied) before the
/// round's deletes run; a scan in between (here: the receivers' own watchers, seeing
/// those moves, while the rounds wait) must find the old names deleted as received,
/// not missing from disk, or the receivers announce the rename's deletes as their own.
#[test]
fn a_scan_while_a_rename_is_half_applied_sends_nothing_back() {
    let c = live_cluster(|c| {
        for i in [1, 2] {
            c.extra_env[i].push(("SHOAL_FAULT_PAUSE_BEFORE_DELETES_MS".into(), "1500".into()));
        }
    });
    let a = c.vol(0);
    for i in 0..20 {
        write_file(&a.join(format!("album/t{i}")), &random_bytes(20_000, i));
    }
    c.wait_converged(&[0, 1, 2], CONVERGE);
    let watch_scans_before = c.total(1, "watch_scans");
    fs::rename(a.join("album"), a.join("album-2026")).unwrap();
    c.wait_converged(&[0, 1, 2], CONVERGE);
    assert_eq!(snapshot(&c.vol(1)), snapshot(&a));
    assert_eq!(snapshot(&c.vol(2)), snapshot(&a));
    assert!(
        c.total(1, "watch_scans") > watch_scans_before,
        "node 1's watcher never scanned during the rename:\n{}",
        c.log(1)
    );
    assert_no_echo(&c);
}

/// What a pull writes is not scanned again by the receiver's watcher (in a directory
/// of 100,000 names, each batch published would list it all again): the events are
/// checked against what the pull indexed and forgotten.
#[test]
fn the_receivers_watchers_do_not_rescan_what_their_pulls_wrote() {
    let c = live_cluster(|_| {});
    let a = c.vol(0);
    for i in 0..600u32 {
        write_file(
            &a.join(format!("one-dir/f{i}")),
            format!("file {i}").as_bytes(),
        );
    }
    c.wait_converged(&[0, 1, 2], CONVERGE);
    fs::remove_file(a.join("one-dir/f7")).unwrap();
    c.wait_converged(&[0, 1, 2], CONVERGE);
    assert_eq!(snapshot(&c.vol(1)), snapshot(&a));
    for i in [1, 2] {
        let echoes = c.total(i, "watch_echoes");
        assert!(
            echoes > 0,
            "node {i} scanned all it received:\n{}",
            c.log(i)
        );
    }
    assert_no_echo(&c);
    // A local change right after is still seen.
    write_file(&c.vol(1).join("one-dir/f8"), b"changed on node 1");
    c.wait_converged(&[0, 1, 2], CONVERGE);
    assert_eq!(
        fs::read(a.join("one-dir/f8")).unwrap(),
        b"changed on node 1"
    );
}

#[test]
fn a_burst_of_ten_thousand_files_converges() {
    let c = live_cluster(|_| {});
    for i in 0..10_000u32 {
        write_file(
            &c.vol(0).join(format!("burst/d{}/f{i}", i % 10)),
            format!("file {i}").as_bytes(),
        );
    }
    c.wait_converged(&[0, 1, 2], Duration::from_secs(180));
    assert_eq!(names(&c.vol(2)).len(), 10_000 + 10 + 1);
    assert_no_echo(&c);
}

#[test]
fn a_slow_copy_is_published_once_complete_and_never_torn() {
    const SIZE: usize = 200 << 20;
    let c = live_cluster(|_| {});
    let content = Arc::new(random_bytes(SIZE, 7));
    let stop = Arc::new(AtomicBool::new(false));
    let torn = Arc::new(AtomicU64::new(0));
    // Readers on the peers: whenever the file exists there, it is whole.
    let readers: Vec<_> = [1, 2]
        .into_iter()
        .map(|i| {
            let path = c.vol(i).join("big.bin");
            let (stop, torn) = (stop.clone(), torn.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(meta) = fs::metadata(&path)
                        && meta.len() != SIZE as u64
                    {
                        torn.fetch_add(1, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        })
        .collect();
    {
        let mut file = fs::File::create(c.vol(0).join("big.bin")).unwrap();
        for step in content.chunks(1 << 20) {
            file.write_all(step).unwrap();
            std::thread::sleep(Duration::from_millis(15));
        }
    }
    c.wait_converged(&[0, 1, 2], Duration::from_secs(120));
    stop.store(true, Ordering::Relaxed);
    for reader in readers {
        reader.join().unwrap();
    }
    assert_eq!(torn.load(Ordering::Relaxed), 0, "a peer saw a partial file");
    for i in [1, 2] {
        assert!(fs::read(c.vol(i).join("big.bin")).unwrap() == *content);
        assert_eq!(
            c.total(i, "files_applied"),
            1,
            "node {i} applied the file more than once"
        );
    }
    assert_no_echo(&c);
}

#[test]
fn lost_watcher_events_lead_to_a_rescan_and_convergence() {
    // A watcher queue of 8 events stands in for the kernel's overflowing under load:
    // the burst below loses events for real.
    let c = live_cluster(|c| {
        c.extra_env[0].push(("SHOAL_FAULT_WATCH_QUEUE".into(), "8".into()));
    });
    for i in 0..500u32 {
        write_file(
            &c.vol(0).join(format!("lost/f{i}")),
            format!("file {i}").as_bytes(),
        );
    }
    c.wait_converged(&[0, 1, 2], CONVERGE);
    assert_eq!(names(&c.vol(1)).len(), 501);
    assert!(c.total(0, "watch_rescans") >= 1, "{}", c.log(0));
    assert_no_echo(&c);
}

#[test]
fn the_inotify_watch_limit_gives_a_clear_warning_and_heartbeat_rescans() {
    // A user namespace has its own watch limit: node 0 gets 3 watches, far fewer than
    // its volume has directories. That is the real kernel limit, not a stand-in.
    let mut c = Cluster::new(2);
    for d in 0..10 {
        write_file(&c.vol(0).join(format!("d{d}/f")), b"seed");
    }
    c.wrapper[0] = [
        "unshare",
        "--user",
        "--map-root-user",
        "sh",
        "-c",
        "echo 3 > /proc/sys/user/max_inotify_watches && exec \"$0\" \"$@\"",
    ]
    .map(String::from)
    .to_vec();
    c.start_all();
    c.wait_converged(&[0, 1], CONVERGE);
    let log = c.log(0);
    assert!(
        log.contains("the inotify watch limit (user.max_inotify_watches = 3)")
            && log.contains("sysctl -w user.max_inotify_watches=")
            && log.contains("falling back to a full rescan every 1s"),
        "{log}"
    );
    write_file(
        &c.vol(0).join("after.txt"),
        b"found by the heartbeat rescan",
    );
    c.wait_converged(&[0, 1], CONVERGE);
    assert!(c.vol(1).join("after.txt").exists());
}

/// A file mapped shared and writable. Writes through it raise no inotify event (the
/// kernel only moves the file's mtime); the mapping holds the file open, so neither does
/// a `close` until it is dropped.
struct Mapped {
    map: *mut libc::c_void,
    len: usize,
}

impl Mapped {
    fn new(path: &std::path::Path) -> Mapped {
        use std::os::fd::AsRawFd;
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let len = file.metadata().unwrap().len() as usize;
        // SAFETY: a fresh shared mapping of the whole file, which nothing truncates
        // while it is mapped.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(map, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
        Mapped { map, len }
    }

    fn write(&self, offset: usize, bytes: &[u8]) {
        assert!(offset + bytes.len() <= self.len);
        // SAFETY: within the mapping, which lives as long as `self`.
        unsafe {
            let at = self.map.cast::<u8>().add(offset);
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), at, bytes.len());
            assert_eq!(libc::msync(self.map, self.len, libc::MS_SYNC), 0);
        }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.map, self.len) };
    }
}

#[test]
fn a_change_the_watcher_cannot_see_is_found_by_the_heartbeat_slices_within_a_pass() {
    // 40 directories of 5 files and slices of at least 10 names: a pass of about 20
    // heartbeats (1 s), each rescanning two directories, with the watcher healthy.
    let mut c = Cluster::new(2);
    for d in 0..40 {
        for f in 0..5 {
            let content = format!("directory {d:02}, file {f}: original");
            write_file(&c.vol(0).join(format!("d{d:02}/f{f}")), content.as_bytes());
        }
    }
    for i in 0..2 {
        c.extra_env[i].push(("SHOAL_FAULT_SLICE_NAMES".into(), "10".into()));
    }
    c.start_all();
    c.wait_connected(CONVERGE);
    c.wait_converged(&[0, 1], CONVERGE);

    let scans = c.total(0, "watch_scans");
    let mapped = Mapped::new(&c.vol(0).join("d33/f2"));
    mapped.write("directory 33, file 2: ".len(), b"MAPPED!!");
    // A pass is 24 heartbeats at most; the deadline only bounds a failing run.
    c.wait_converged(&[0, 1], CONVERGE * 2);
    assert_eq!(
        fs::read(c.vol(1).join("d33/f2")).unwrap(),
        b"directory 33, file 2: MAPPED!!",
    );
    // Neither the watcher nor a whole rescan after lost events found it: a slice did.
    let log = c.log(0);
    assert_eq!(c.total(0, "watch_scans"), scans, "{log}");
    assert_eq!(c.total(0, "watch_rescans"), 0, "{log}");
    assert!(log.contains("local changes: d33/f2"), "{log}");
    drop(mapped);
}
