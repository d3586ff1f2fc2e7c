//! Issue 16 acceptance: what a volume holds besides file contents arrives as it was
//! (directory ownership, modes and mtimes, symlinks, FIFOs, holes), with real processes
//! over QUIC.

use std::collections::BTreeMap;
use std::fs::{self, File, FileTimes};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, UNIX_EPOCH};

use crate::cluster::*;
use crate::util::write_file;

const CONVERGE: Duration = Duration::from_secs(90);

/// Whether this test process may change owners (the daemons then sync them too).
fn running_as_root() -> bool {
    rustix::process::geteuid().is_root()
}

fn set_dir_mtime(dir: &Path, secs: u64) {
    File::open(dir)
        .unwrap()
        .set_times(FileTimes::new().set_modified(UNIX_EPOCH + Duration::from_secs(secs)))
        .unwrap();
}

/// Every directory below `root` (`.shoal/` excluded) with its permission bits, owner and
/// mtime in nanoseconds.
fn dir_metadata(root: &Path) -> BTreeMap<PathBuf, (u32, u32, u32, i64)> {
    let mut out = BTreeMap::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(rel) = pending.pop() {
        for entry in fs::read_dir(root.join(&rel)).unwrap().flatten() {
            let path = rel.join(entry.file_name());
            let meta = fs::symlink_metadata(root.join(&path)).unwrap();
            if !meta.is_dir() || path.as_os_str().as_bytes() == b".shoal" {
                continue;
            }
            let mtime = meta.mtime() * 1_000_000_000 + meta.mtime_nsec();
            let mode = meta.permissions().mode() & 0o7777;
            out.insert(path.clone(), (mode, meta.uid(), meta.gid(), mtime));
            pending.push(path);
        }
    }
    out
}

/// Waits until both nodes' trees and directories' metadata agree.
fn wait_dirs_agree(c: &Cluster) -> BTreeMap<PathBuf, (u32, u32, u32, i64)> {
    let deadline = Instant::now() + CONVERGE;
    loop {
        c.wait_converged(&[0, 1], CONVERGE);
        let (a, b) = (dir_metadata(&c.vol(0)), dir_metadata(&c.vol(1)));
        if a == b {
            return a;
        }
        assert!(
            Instant::now() < deadline,
            "directory metadata differs:\n A {a:?}\n B {b:?}\n--- A log:\n{}\n--- B log:\n{}",
            c.log(0),
            c.log(1)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn directory_owners_modes_and_mtimes_sync_and_the_owner_can_write_on_the_peer() {
    if !running_as_root() {
        eprintln!("skipped: changing owners needs root");
        return;
    }
    let mut c = Cluster::new(2);
    // uid 33 must be able to reach the volume on node 1 (a temporary directory is 0700).
    for dir in [c.dir.path().to_path_buf(), c.dir.path().join("node1")] {
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let a = c.vol(0);
    write_file(&a.join("uploads/2026/photo.jpg"), b"jpeg bytes");
    write_file(&a.join("uploads/readme.txt"), b"uploads go here");
    write_file(&a.join("shared/team.txt"), b"team notes");
    let chown = Command::new("chown")
        .args(["-R", "33:33"])
        .arg(a.join("uploads"))
        .status()
        .unwrap();
    assert!(chown.success());
    std::os::unix::fs::chown(a.join("shared"), Some(0), Some(5678)).unwrap();
    fs::set_permissions(a.join("shared"), fs::Permissions::from_mode(0o2775)).unwrap();
    // Children first: creating them moved their parents' mtimes.
    set_dir_mtime(&a.join("uploads/2026"), 1_500_000_000);
    set_dir_mtime(&a.join("uploads"), 1_500_000_100);
    set_dir_mtime(&a.join("shared"), 1_500_000_200);
    c.start_all();
    let agreed = wait_dirs_agree(&c);
    assert_eq!(
        agreed[Path::new("uploads")],
        (0o755, 33, 33, 1_500_000_100_000_000_000)
    );
    assert_eq!(
        agreed[Path::new("uploads/2026")],
        (0o755, 33, 33, 1_500_000_000_000_000_000)
    );
    assert_eq!(
        agreed[Path::new("shared")],
        (0o2775, 0, 5678, 1_500_000_200_000_000_000)
    );

    // The web server's user writes on node 1 where node 0 gave it the directory.
    let written = Command::new("setpriv")
        .args(["--reuid", "33", "--regid", "33", "--clear-groups", "touch"])
        .arg(c.vol(1).join("uploads/2026/upload.jpg"))
        .output()
        .unwrap();
    assert!(
        written.status.success(),
        "uid 33 cannot write in uploads/2026 on node 1: {}",
        String::from_utf8_lossy(&written.stderr)
    );
    let agreed = wait_dirs_agree(&c);
    assert!(c.vol(0).join("uploads/2026/upload.jpg").exists());
    assert_eq!(agreed[Path::new("uploads/2026")].1, 33);

    // Settled: applying the changes does not make the nodes trade mtimes back and forth.
    let root = c.root(0);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(c.root(0), root, "the tree kept changing after convergence");
    assert_eq!(dir_metadata(&c.vol(0)), agreed);
    assert_eq!(dir_metadata(&c.vol(1)), agreed);
}

#[test]
fn symlinks_keep_any_target_fifos_are_recreated_and_sockets_stay_local() {
    let mut c = Cluster::new(2);
    let a = c.vol(0);
    fs::create_dir_all(a.join("links/deep")).unwrap();
    let targets: [(&str, &[u8]); 5] = [
        ("links/absolute", b"/etc/passwd"),
        ("links/outside", b"../../../../../srv/elsewhere"),
        ("links/dangling", b"no-such-file"),
        ("links/deep/up-and-down", b"../x/../../y"),
        ("links/raw", b"caf\xe9\xff/target"),
    ];
    for (name, target) in targets {
        std::os::unix::fs::symlink(os(target), a.join(name)).unwrap();
    }
    mkfifo(&a.join("pipes/control"), 0o640);
    set_mtime_of(&a.join("pipes/control"), 1_600_000_000);
    // A running program's socket: local to this node, and not worth a warning.
    let _listener = std::os::unix::net::UnixListener::bind(a.join("pipes/app.sock")).unwrap();
    c.start_all();
    c.wait_converged(&[0, 1], CONVERGE);
    let b = c.vol(1);
    for (name, target) in targets {
        assert_eq!(
            fs::read_link(b.join(name)).unwrap().as_os_str().as_bytes(),
            target,
            "{name}"
        );
    }
    let fifo = fs::symlink_metadata(b.join("pipes/control")).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(&fifo.file_type()));
    assert_eq!(fifo.permissions().mode() & 0o7777, 0o640);
    assert_eq!(fifo.mtime(), 1_600_000_000);
    assert!(!b.join("pipes/app.sock").exists());
    for i in 0..2 {
        let log = c.log(i);
        assert!(
            !log.contains("refusing symlink") && !log.contains("app.sock"),
            "node {i} warned about a symlink or the socket:\n{log}"
        );
    }

    // A change on the other side travels back.
    fs::set_permissions(b.join("pipes/control"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::remove_file(b.join("links/absolute")).unwrap();
    std::os::unix::fs::symlink("/var/lib/other", b.join("links/absolute")).unwrap();
    c.wait_converged(&[0, 1], CONVERGE);
    let fifo = fs::symlink_metadata(a.join("pipes/control")).unwrap();
    assert_eq!(fifo.permissions().mode() & 0o7777, 0o600);
    assert_eq!(
        fs::read_link(a.join("links/absolute")).unwrap(),
        Path::new("/var/lib/other")
    );
}

fn os(bytes: &[u8]) -> &std::ffi::OsStr {
    std::ffi::OsStr::from_bytes(bytes)
}

fn mkfifo(path: &Path, mode: u32) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        path,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(mode),
        0,
    )
    .unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// Sets the mtime of anything but a symlink, without opening it (a FIFO would block).
fn set_mtime_of(path: &Path, secs: i64) {
    let time = rustix::fs::Timespec {
        tv_sec: secs,
        tv_nsec: 0,
    };
    let times = rustix::fs::Timestamps {
        last_access: time,
        last_modification: time,
    };
    rustix::fs::utimensat(rustix::fs::CWD, path, &times, rustix::fs::AtFlags::empty()).unwrap();
}

#[test]
fn a_sparse_file_arrives_as_sparse_and_its_holes_never_cross_the_wire() {
    let mut c = Cluster::new(2);
    let a = c.vol(0).join("images/disk.img");
    let size = 4u64 << 30;
    let data = crate::util::random_bytes(3 << 20, 5);
    // Three regions of 1 MiB: at the start, in the middle (unaligned), at the end.
    let regions = [0, size / 2 + 12_345, size - (1 << 20)];
    fs::create_dir_all(a.parent().unwrap()).unwrap();
    let file = File::create(&a).unwrap();
    file.set_len(size).unwrap();
    for (i, &at) in regions.iter().enumerate() {
        file.write_all_at(&data[i << 20..(i + 1) << 20], at)
            .unwrap();
    }
    drop(file);
    c.start_all();
    let b = c.vol(1).join("images/disk.img");
    let deadline = Instant::now() + CONVERGE;
    while c.root(0).is_none() || c.root(0) != c.root(1) || !b.exists() {
        assert!(Instant::now() < deadline, "no convergence:\n{}", c.log(1));
        std::thread::sleep(Duration::from_millis(200));
    }
    let (on_a, on_b) = (fs::metadata(&a).unwrap(), fs::metadata(&b).unwrap());
    assert_eq!(on_b.len(), size);
    let (used_a, used_b) = (on_a.blocks() * 512, on_b.blocks() * 512);
    assert!(
        used_b.abs_diff(used_a) <= used_a / 100,
        "disk usage: A {used_a} bytes, B {used_b} bytes"
    );
    let copy = File::open(&b).unwrap();
    for (i, &at) in regions.iter().enumerate() {
        let mut region = vec![0u8; 1 << 20];
        copy.read_exact_at(&mut region, at).unwrap();
        assert!(region == data[i << 20..(i + 1) << 20], "region {i} differs");
    }
    // Only the chunks that hold data travel: at most one chunk of zeros on either side
    // of each region comes with it (a chunk boundary falls where the content says).
    let max_chunk = 256u64 << 10;
    let received = c.total(1, "chunk_bytes_received");
    eprintln!("chunk bytes received for 3 MiB of data in a 4 GiB file: {received}");
    assert!(
        received <= (3 << 20) + regions.len() as u64 * 2 * max_chunk,
        "{received} chunk bytes on the wire"
    );
}
