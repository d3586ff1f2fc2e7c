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

/// A POSIX ACL as the kernel stores it in `system.posix_acl_*`: version 2, then per
/// entry u16 tag, u16 permissions, u32 id (`u32::MAX` for the owner/group/mask/other
/// entries), sorted by tag then id.
fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut out = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&perm.to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
    }
    out
}

const ACL_USER_OBJ: u16 = 0x01;
const ACL_USER: u16 = 0x02;
const ACL_GROUP_OBJ: u16 = 0x04;
const ACL_MASK: u16 = 0x10;
const ACL_OTHER: u16 = 0x20;
const NO_ID: u32 = u32::MAX;

/// `user::rw-, user:1000:rwx, group::r--, mask::rwx, other::r--`: the mode shows `674`
/// (the group bits are the mask), the owning group really has `r--`.
fn acl_wider_mask() -> Vec<u8> {
    acl(&[
        (ACL_USER_OBJ, 6, NO_ID),
        (ACL_USER, 7, 1000),
        (ACL_GROUP_OBJ, 4, NO_ID),
        (ACL_MASK, 7, NO_ID),
        (ACL_OTHER, 4, NO_ID),
    ])
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    rustix::fs::lsetxattr(path, name, value, rustix::fs::XattrFlags::empty())
        .unwrap_or_else(|e| panic!("setxattr {name} on {}: {e}", path.display()));
}

/// Every extended attribute of `path` (not following a symlink), by name.
fn xattrs_of(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut names = vec![0u8; 65536];
    let n = rustix::fs::llistxattr(path, &mut names[..]).unwrap();
    let mut out = BTreeMap::new();
    for name in names[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let name = std::str::from_utf8(name).unwrap();
        let mut value = vec![0u8; 65536];
        let len = rustix::fs::lgetxattr(path, name, &mut value[..]).unwrap();
        value.truncate(len);
        out.insert(name.to_string(), value);
    }
    out
}

fn mode_of(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
}

/// Waits until `check` holds for node `i`'s volume, or fails with its log.
fn wait_until(c: &Cluster, i: usize, what: &str, check: impl Fn(&Path) -> bool) {
    let deadline = Instant::now() + CONVERGE;
    while !check(&c.vol(i)) {
        assert!(
            Instant::now() < deadline,
            "node {i}: {what}\n--- log:\n{}",
            c.log(i)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn extended_attributes_and_acls_sync_both_ways_and_a_change_of_attributes_alone_is_seen() {
    let mut c = Cluster::new(2);
    let a = c.vol(0);
    write_file(&a.join("docs/report.txt"), b"quarterly numbers");
    set_xattr(&a.join("docs/report.txt"), "user.origin", b"scanner");
    set_xattr(&a.join("docs/report.txt"), "user.empty", b"");
    set_xattr(
        &a.join("docs/report.txt"),
        "system.posix_acl_access",
        &acl_wider_mask(),
    );
    fs::create_dir_all(a.join("shared")).unwrap();
    let dir_acl = acl(&[
        (ACL_USER_OBJ, 7, NO_ID),
        (ACL_USER, 5, 1000),
        (ACL_GROUP_OBJ, 5, NO_ID),
        (ACL_MASK, 5, NO_ID),
        (ACL_OTHER, 0, NO_ID),
    ]);
    set_xattr(&a.join("shared"), "system.posix_acl_access", &dir_acl);
    set_xattr(&a.join("shared"), "system.posix_acl_default", &dir_acl);
    set_xattr(&a.join("shared"), "user.dir", b"1");
    if running_as_root() {
        set_xattr(&a.join("docs/report.txt"), "trusted.note", b"root only");
    }
    assert_eq!(mode_of(&a.join("docs/report.txt")), 0o674);
    c.start_all();
    c.wait_converged(&[0, 1], CONVERGE);
    let b = c.vol(1);
    for path in ["docs/report.txt", "shared", "docs"] {
        assert_eq!(xattrs_of(&a.join(path)), xattrs_of(&b.join(path)), "{path}");
        assert_eq!(mode_of(&a.join(path)), mode_of(&b.join(path)), "{path}");
    }
    assert_eq!(
        xattrs_of(&b.join("docs/report.txt"))["user.origin"],
        b"scanner"
    );

    // A change of attributes alone (content, mode and mtime as they were) moves only the
    // ctime; B's scanner sees it, and it travels back.
    set_xattr(&b.join("docs/report.txt"), "user.origin", b"edited on B");
    rustix::fs::lremovexattr(b.join("shared"), "user.dir").unwrap();
    wait_until(&c, 0, "the attribute change from B never arrived", |a| {
        xattrs_of(&a.join("docs/report.txt")).get("user.origin") == Some(&b"edited on B".to_vec())
            && !xattrs_of(&a.join("shared")).contains_key("user.dir")
    });
    c.wait_converged(&[0, 1], CONVERGE);
    for path in ["docs/report.txt", "shared"] {
        assert_eq!(xattrs_of(&a.join(path)), xattrs_of(&b.join(path)), "{path}");
    }
}

/// A file system without extended attributes (ramfs), mounted for a test and lazily
/// unmounted when dropped.
struct Ramfs(PathBuf);

impl Ramfs {
    fn mount(path: &Path) -> Ramfs {
        let out = Command::new("mount")
            .args(["-t", "ramfs", "ramfs"])
            .arg(path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mounting a ramfs (needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ramfs(path.to_path_buf())
    }
}

impl Drop for Ramfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).output();
    }
}

#[test]
fn a_node_that_cannot_set_acls_says_so_once_and_never_widens_access() {
    if !running_as_root() {
        eprintln!("skipped: mounting a file system needs root");
        return;
    }
    let mut c = Cluster::new(2);
    let _ramfs = Ramfs::mount(&c.vol(1));
    let a = c.vol(0);
    for name in ["ledger.db", "notes.txt"] {
        let path = a.join("private").join(name);
        write_file(&path, b"group may only read this");
        set_xattr(&path, "system.posix_acl_access", &acl_wider_mask());
        set_xattr(&path, "user.origin", b"A");
    }
    c.start_all();
    let deadline = Instant::now() + CONVERGE;
    while c.root(0).is_none() || c.root(0) != c.root(1) {
        assert!(Instant::now() < deadline, "no convergence:\n{}", c.log(1));
        std::thread::sleep(Duration::from_millis(200));
    }
    let b = c.vol(1);
    for name in ["ledger.db", "notes.txt"] {
        let path = b.join("private").join(name);
        assert_eq!(fs::read(&path).unwrap(), b"group may only read this");
        // A gave the owning group r-- (mask rwx): B, without the ACL, gives r--, not rwx.
        assert_eq!(mode_of(&path), 0o644, "{name}");
    }
    let status = c.status(1).unwrap();
    let not_applied = status["volumes"][0]["xattrs_not_applied"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect::<Vec<_>>();
    assert!(
        not_applied
            .iter()
            .any(|l| l.contains("system.posix_acl_access"))
            && not_applied.iter().any(|l| l.starts_with("user ")),
        "/status: {not_applied:?}"
    );
    // Said once per kind, not once per file.
    let log = c.log(1);
    assert_eq!(
        log.matches("system.posix_acl_access attributes not applied")
            .count(),
        1,
        "{log}"
    );
}

fn inode(path: &Path) -> (u64, u64) {
    let meta = fs::symlink_metadata(path).unwrap();
    (meta.ino(), meta.nlink())
}

#[test]
fn hard_links_arrive_as_one_inode_and_a_change_through_one_name_is_a_change_of_all() {
    let mut c = Cluster::new(2);
    let a = c.vol(0);
    let photo = crate::util::random_bytes(1 << 20, 16);
    write_file(&a.join("media/a.jpg"), &photo);
    let names = ["media/a.jpg", "media/b.jpg", "other/c.jpg"];
    fs::create_dir_all(a.join("other")).unwrap();
    fs::hard_link(a.join(names[0]), a.join(names[1])).unwrap();
    fs::hard_link(a.join(names[0]), a.join(names[2])).unwrap();
    // A file whose other name is outside the volume is a plain file to sync.
    write_file(&a.join("solo.txt"), b"one name in the volume");
    fs::hard_link(a.join("solo.txt"), c.dir.path().join("outside.txt")).unwrap();
    c.start_all();
    let b = c.vol(1);
    let linked = |root: &Path, count: u64| {
        let inodes: Vec<(u64, u64)> = names.iter().map(|n| inode(&root.join(n))).collect();
        inodes.iter().all(|&i| i == (inodes[0].0, count))
    };
    wait_until(&c, 1, "the three names never became one inode", |b| {
        names.iter().all(|n| b.join(n).exists()) && linked(b, 3)
    });
    c.wait_converged(&[0, 1], CONVERGE);
    assert_eq!(fs::read(b.join("other/c.jpg")).unwrap(), photo);
    assert_eq!(inode(&b.join("solo.txt")).1, 1);
    // Transferred once: one copy's chunks, not three.
    let received = c.total(1, "chunk_bytes_received");
    assert!(
        received < 2 * photo.len() as u64,
        "{received} chunk bytes received for one 1 MiB file with three names"
    );

    // Written in place through one name on B: every name changes, on both nodes, and A's
    // three names stay one inode.
    let edited = crate::util::random_bytes(1 << 20, 17);
    fs::write(b.join("other/c.jpg"), &edited).unwrap();
    wait_until(
        &c,
        0,
        "the change through one name never reached all three",
        |a| {
            names
                .iter()
                .all(|n| fs::read(a.join(n)).is_ok_and(|d| d == edited))
                && linked(a, 3)
        },
    );
    c.wait_converged(&[0, 1], CONVERGE);

    // One name removed on A: two names, one inode, on B.
    fs::remove_file(a.join("media/b.jpg")).unwrap();
    wait_until(&c, 1, "the removed name stayed", |b| {
        !b.join("media/b.jpg").exists()
            && inode(&b.join("media/a.jpg")) == (inode(&b.join("other/c.jpg")).0, 2)
    });
    c.wait_converged(&[0, 1], CONVERGE);
    let a = c.vol(0);
    assert_eq!(
        inode(&a.join("media/a.jpg")),
        (inode(&a.join("other/c.jpg")).0, 2)
    );
}
