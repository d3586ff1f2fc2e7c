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
        (inode(&a.join("other/c.jpg")).0, 2),
        "--- A log:\n{}\n--- B log:\n{}",
        c.log(0),
        c.log(1)
    );
}

/// What a dump records of one name, read through descriptors (`statat` without following,
/// attributes and content through an `O_NOFOLLOW|O_NONBLOCK` descriptor): everything
/// `rsync -aHAXS` keeps (symlinks' own mtimes included). Not recorded: inode numbers,
/// atimes and ctimes, and directories' sizes (a directory's size is its history).
#[derive(Debug, PartialEq, Eq)]
struct Dumped {
    kind: &'static str,
    mode: u32,
    owner: (u32, u32),
    size: Option<u64>,
    blocks: Option<u64>,
    nlink: u64,
    /// For a file with several names: the least of its names (relative to the root).
    linked_with: Option<Vec<u8>>,
    xattrs: BTreeMap<String, Vec<u8>>,
    mtime_ns: i64,
    content: Vec<u8>,
}

fn dump(root: &Path) -> BTreeMap<Vec<u8>, Dumped> {
    use rustix::fs::{AtFlags, FileType, Mode, OFlags};
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let root_fd =
        rustix::fs::open(root, OFlags::DIRECTORY | OFlags::RDONLY, Mode::empty()).unwrap();
    let mut pending = vec![(Vec::<u8>::new(), root_fd)];
    while let Some((rel, dir_fd)) = pending.pop() {
        let mut names: Vec<Vec<u8>> = rustix::fs::Dir::read_from(&dir_fd)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_bytes().to_vec())
            .filter(|n| n != b"." && n != b".." && !(rel.is_empty() && n == b".shoal"))
            .collect();
        names.sort();
        if rel.is_empty() {
            names.insert(0, b".".to_vec());
        }
        for name in names {
            let path = match (rel.is_empty(), name == b".") {
                (_, true) => b".".to_vec(),
                (true, false) => name.clone(),
                (false, false) => [rel.as_slice(), b"/", &name].concat(),
            };
            let stat = rustix::fs::statat(&dir_fd, os(&name), AtFlags::SYMLINK_NOFOLLOW).unwrap();
            let kind = FileType::from_raw_mode(stat.st_mode);
            let mtime_ns = stat.st_mtime * 1_000_000_000 + stat.st_mtime_nsec as i64;
            let mut item = Dumped {
                kind: "other",
                mode: stat.st_mode & 0o7777,
                owner: (stat.st_uid, stat.st_gid),
                size: None,
                blocks: None,
                nlink: stat.st_nlink,
                linked_with: None,
                xattrs: BTreeMap::new(),
                mtime_ns,
                content: Vec::new(),
            };
            let open = |flags| {
                rustix::fs::openat(
                    &dir_fd,
                    os(&name),
                    flags | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .unwrap()
            };
            match kind {
                FileType::RegularFile => {
                    let fd = open(OFlags::RDONLY);
                    item.kind = "file";
                    item.size = Some(stat.st_size as u64);
                    item.blocks = Some(stat.st_blocks as u64);
                    item.xattrs = fd_xattrs(&fd);
                    let mut data = Vec::new();
                    std::io::Read::read_to_end(&mut File::from(fd), &mut data).unwrap();
                    item.content = blake3::hash(&data).as_bytes().to_vec();
                    if stat.st_nlink > 1 {
                        inodes.entry(stat.st_ino).or_default();
                        let least = inodes.get_mut(&stat.st_ino).unwrap();
                        if least.is_empty() || path < *least {
                            *least = path.clone();
                        }
                    }
                }
                FileType::Directory => {
                    let fd = open(OFlags::RDONLY | OFlags::DIRECTORY);
                    item.kind = "dir";
                    item.xattrs = fd_xattrs(&fd);
                    if name != b"." {
                        pending.push((path.clone(), fd));
                    }
                }
                FileType::Symlink => {
                    item.kind = "symlink";
                    item.mode = 0;
                    item.size = Some(stat.st_size as u64);
                    item.content = rustix::fs::readlinkat(&dir_fd, os(&name), Vec::new())
                        .unwrap()
                        .into_bytes();
                }
                FileType::Fifo => {
                    let fd = open(OFlags::RDONLY);
                    item.kind = "fifo";
                    item.xattrs = fd_xattrs(&fd);
                }
                _ => {}
            }
            out.insert(path, (stat.st_ino, item));
        }
    }
    out.into_iter()
        .map(|(path, (ino, mut item))| {
            if item.nlink > 1 && item.kind == "file" {
                item.linked_with = inodes.get(&ino).cloned();
            }
            (path, item)
        })
        .collect()
}

fn fd_xattrs(fd: &std::os::fd::OwnedFd) -> BTreeMap<String, Vec<u8>> {
    let mut names = vec![0u8; 65536];
    let n = rustix::fs::flistxattr(fd, &mut names[..]).unwrap_or(0);
    let mut out = BTreeMap::new();
    for name in names[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let name = std::str::from_utf8(name).unwrap();
        let mut value = vec![0u8; 65536];
        let len = rustix::fs::fgetxattr(fd, name, &mut value[..]).unwrap();
        value.truncate(len);
        out.insert(name.to_string(), value);
    }
    out
}

/// Builds, under `root`, one of each item of issue 16's table, with fixed contents,
/// owners, modes, attributes and times (so two calls build identical trees).
fn build_table_tree(root: &Path) {
    use std::os::unix::fs::{chown, lchown, symlink};
    let dir = |rel: &str, mode: u32| {
        fs::create_dir_all(root.join(rel)).unwrap();
        fs::set_permissions(root.join(rel), fs::Permissions::from_mode(mode)).unwrap();
    };
    let file = |rel: &str, content: &[u8], mode: u32| {
        write_file(&root.join(rel), content);
        fs::set_permissions(root.join(rel), fs::Permissions::from_mode(mode)).unwrap();
    };
    dir("", 0o755);
    // Directory ownership: the web server's uploads, a setgid team directory.
    file("uploads/2026/photo.jpg", b"jpeg bytes", 0o644);
    for rel in ["uploads", "uploads/2026", "uploads/2026/photo.jpg"] {
        lchown(root.join(rel), Some(33), Some(33)).unwrap();
    }
    file("shared/team.txt", b"team notes", 0o664);
    chown(root.join("shared"), Some(0), Some(5678)).unwrap();
    fs::set_permissions(root.join("shared"), fs::Permissions::from_mode(0o2775)).unwrap();
    // Modes: setuid, sticky, chmod-only.
    file("modes/tool", b"#!/bin/sh\n", 0o4755);
    dir("modes/drop", 0o1777);
    file("modes/private", b"secret", 0o600);
    dir("empty", 0o700);
    // POSIX ACLs, access and default, and user.* attributes.
    file("acl/report.txt", b"quarterly numbers", 0o644);
    set_xattr(
        &root.join("acl/report.txt"),
        "system.posix_acl_access",
        &acl_wider_mask(),
    );
    dir("acl/team", 0o770);
    let dir_acl = acl(&[
        (ACL_USER_OBJ, 7, NO_ID),
        (ACL_USER, 5, 1000),
        (ACL_GROUP_OBJ, 5, NO_ID),
        (ACL_MASK, 5, NO_ID),
        (ACL_OTHER, 0, NO_ID),
    ]);
    set_xattr(&root.join("acl/team"), "system.posix_acl_access", &dir_acl);
    set_xattr(&root.join("acl/team"), "system.posix_acl_default", &dir_acl);
    file("attrs/tagged.txt", b"tagged", 0o644);
    set_xattr(&root.join("attrs/tagged.txt"), "user.origin", b"scanner");
    set_xattr(&root.join("attrs/tagged.txt"), "user.empty", b"");
    set_xattr(&root.join("attrs"), "user.dir", b"1");
    // A hard link with three names, in two directories.
    file(
        "links/a.jpg",
        &crate::util::random_bytes(300_000, 21),
        0o644,
    );
    dir("links/more", 0o755);
    fs::hard_link(root.join("links/a.jpg"), root.join("links/b.jpg")).unwrap();
    fs::hard_link(root.join("links/a.jpg"), root.join("links/more/c.jpg")).unwrap();
    // A sparse file: 64 MiB holding 768 KiB of data in three block-aligned regions.
    let sparse = root.join("images/disk.img");
    fs::create_dir_all(sparse.parent().unwrap()).unwrap();
    let image = File::create(&sparse).unwrap();
    image.set_len(64 << 20).unwrap();
    let data = crate::util::random_bytes(3 << 18, 22);
    for (i, at) in [0u64, 32 << 20, (64 << 20) - (1 << 18)]
        .into_iter()
        .enumerate()
    {
        image
            .write_all_at(&data[i << 18..(i + 1) << 18], at)
            .unwrap();
    }
    drop(image);
    // Symlinks: absolute, leaving the volume, dangling.
    dir("sym", 0o755);
    symlink("/etc/passwd", root.join("sym/absolute")).unwrap();
    symlink("../../../../../srv/elsewhere", root.join("sym/outside")).unwrap();
    symlink("no-such-file", root.join("sym/dangling")).unwrap();
    // A FIFO.
    mkfifo(&root.join("pipes/control"), 0o640);
    // Nanosecond file mtimes, then every directory's mtime, deepest first.
    let ns = |secs: i64, nsec: i64| rustix::fs::Timestamps {
        last_access: rustix::fs::Timespec {
            tv_sec: secs,
            tv_nsec: nsec,
        },
        last_modification: rustix::fs::Timespec {
            tv_sec: secs,
            tv_nsec: nsec,
        },
    };
    let flags = rustix::fs::AtFlags::SYMLINK_NOFOLLOW;
    for (i, rel) in [
        "uploads/2026/photo.jpg",
        "shared/team.txt",
        "modes/tool",
        "modes/private",
        "acl/report.txt",
        "attrs/tagged.txt",
        "links/a.jpg",
        "images/disk.img",
        "pipes/control",
        "sym/absolute",
        "sym/outside",
        "sym/dangling",
    ]
    .into_iter()
    .enumerate()
    {
        let times = ns(1_600_000_000 + i as i64, 123_456_789);
        rustix::fs::utimensat(rustix::fs::CWD, root.join(rel), &times, flags).unwrap();
    }
    let mut dirs: Vec<PathBuf> = dump(root)
        .into_iter()
        .filter(|(_, d)| d.kind == "dir")
        .map(|(p, _)| root.join(os(&p)))
        .collect();
    dirs.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for (i, path) in dirs.iter().enumerate() {
        let times = ns(1_500_000_000 + i as i64 * 100, 987_654_321);
        rustix::fs::utimensat(rustix::fs::CWD, path, &times, flags).unwrap();
    }
}

/// Waits until node `i`'s `tree` dumps as `expected`; on timeout, fails with what
/// differs and the node's log.
fn wait_dump(c: &Cluster, i: usize, tree: &str, expected: &BTreeMap<Vec<u8>, Dumped>) {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let root = c.vol(i).join(tree);
        let got = match root.exists() {
            true => dump(&root),
            false => BTreeMap::new(),
        };
        if got == *expected {
            return;
        }
        if Instant::now() > deadline {
            let differs: Vec<String> = expected
                .keys()
                .chain(got.keys())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .filter(|p| got.get(*p) != expected.get(*p))
                .map(|p| {
                    format!(
                        "{}: expected {:?}\n  got {:?}",
                        String::from_utf8_lossy(p),
                        expected.get(p),
                        got.get(p)
                    )
                })
                .collect();
            panic!(
                "node {i}: {tree} differs:\n{}\n--- log:\n{}",
                differs.join("\n"),
                c.log(i)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn every_item_of_the_table_arrives_as_rsync_ahaxs_keeps_it_both_ways() {
    if !running_as_root() {
        eprintln!("skipped: owners and trusted attributes need root");
        return;
    }
    let mut c = Cluster::new(2);
    // uid 33 must reach the volumes, to write into uploads/ below.
    for dir in [c.dir.path().to_path_buf(), c.dir.path().join("node1")] {
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    }
    // rsync -a keeps setuid: so does this volume.
    for env in &mut c.extra_env {
        env.push(("SHOAL_KEEP_SETID".into(), "vol".into()));
    }
    let (a, b) = (c.vol(0), c.vol(1));
    build_table_tree(&a.join("t1"));
    let expected = dump(&a.join("t1"));
    // The dump sees what the table is about.
    let item = |p: &str| &expected[p.as_bytes()];
    assert!(
        item("acl/team")
            .xattrs
            .contains_key("system.posix_acl_default")
    );
    assert_eq!(item("acl/report.txt").mode, 0o674);
    assert_eq!(item("attrs/tagged.txt").xattrs["user.origin"], b"scanner");
    assert_eq!(item("links/more/c.jpg").nlink, 3);
    assert_eq!(
        item("links/more/c.jpg").linked_with.as_deref(),
        Some(&b"links/a.jpg"[..])
    );
    assert_eq!(item("shared").owner, (0, 5678));
    assert_eq!(item("images/disk.img").blocks, Some(3 << 9));
    assert_eq!(item("pipes/control").kind, "fifo");

    // What rsync -aHAXS makes of the same tree (on the same file system).
    let copy = c.dir.path().join("rsync");
    fs::create_dir_all(&copy).unwrap();
    let rsync = Command::new("rsync")
        .args(["-aHAXS", "--numeric-ids"])
        .arg(format!("{}/", a.join("t1").display()))
        .arg(copy.join("t1"))
        .output()
        .expect("rsync (tools/setup.sh installs it)");
    assert!(
        rsync.status.success(),
        "{}",
        String::from_utf8_lossy(&rsync.stderr)
    );
    let by_rsync = dump(&copy.join("t1"));
    assert_eq!(by_rsync, expected, "rsync -aHAXS differs from the source");

    c.start_all();
    wait_dump(&c, 1, "t1", &expected);

    // And back: the same tree made on B arrives on A as rsync would copy it.
    build_table_tree(&b.join("t2"));
    wait_dump(&c, 0, "t2", &expected);
    c.wait_converged(&[0, 1], CONVERGE);
    for (node, root) in [(0, &a), (1, &b)] {
        for tree in ["t1", "t2"] {
            assert_eq!(dump(&root.join(tree)), expected, "node {node} {tree}");
        }
    }

    // The web server's user writes on B where A gave it the directory.
    let written = Command::new("setpriv")
        .args(["--reuid", "33", "--regid", "33", "--clear-groups", "touch"])
        .arg(b.join("t1/uploads/2026/upload.jpg"))
        .output()
        .unwrap();
    assert!(
        written.status.success(),
        "uid 33 cannot write in uploads/ on B: {}",
        String::from_utf8_lossy(&written.stderr)
    );
}

/// Makes `depth` nested directories of 250-byte names under `root` (through directory
/// descriptors: the whole path is longer than `PATH_MAX`) with a file in the last;
/// returns the path of the first directory past `PATH_MAX`, relative to `root`.
fn make_deep_tree(root: &Path, depth: usize) -> Vec<u8> {
    use rustix::fs::{Mode, OFlags};
    let mut fd = rustix::fs::open(root, OFlags::DIRECTORY | OFlags::RDONLY, Mode::empty()).unwrap();
    let mut path = Vec::new();
    let mut first_too_long = None;
    for level in 0..depth {
        let name = format!("{level:02}{}", "d".repeat(248));
        rustix::fs::mkdirat(&fd, name.as_str(), Mode::from_raw_mode(0o755)).unwrap();
        fd = rustix::fs::openat(
            &fd,
            name.as_str(),
            OFlags::DIRECTORY | OFlags::RDONLY,
            Mode::empty(),
        )
        .unwrap();
        if !path.is_empty() {
            path.push(b'/');
        }
        path.extend_from_slice(name.as_bytes());
        if path.len() > 4096 && first_too_long.is_none() {
            first_too_long = Some(path.clone());
        }
    }
    let file = rustix::fs::openat(
        &fd,
        "deep.txt",
        OFlags::CREATE | OFlags::WRONLY,
        Mode::from_raw_mode(0o644),
    )
    .unwrap();
    rustix::io::write(&file, b"too deep to sync").unwrap();
    first_too_long.expect("the tree goes past PATH_MAX")
}

/// `chattr +i` on a directory for the life of the guard (an immutable directory takes
/// no new names, even from root).
struct Immutable(PathBuf);

impl Immutable {
    fn set(dir: &Path) -> Immutable {
        let out = Command::new("chattr").arg("+i").arg(dir).output().unwrap();
        assert!(
            out.status.success(),
            "chattr +i: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Immutable(dir.to_path_buf())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

/// The names node `i`'s `/status` lists as unsyncable: (path, cause, reason).
fn unsyncable(c: &Cluster, i: usize) -> (u64, Vec<(String, String, String)>) {
    let status = c.status(i).unwrap_or_default();
    let listing = &status["volumes"][0]["unsyncable"];
    let names = listing["names"].as_array().cloned().unwrap_or_default();
    let names = names
        .iter()
        .map(|n| {
            let field = |k: &str| n[k].as_str().unwrap_or_default().to_string();
            (field("path"), field("cause"), field("reason"))
        })
        .collect();
    (listing["total"].as_u64().unwrap_or(0), names)
}

#[test]
fn names_that_cannot_be_synced_are_listed_counted_and_logged_once_with_their_whole_path() {
    if !running_as_root() {
        eprintln!("skipped: chattr +i needs root");
        return;
    }
    let mut c = Cluster::new(2);
    let (a, b) = (c.vol(0), c.vol(1));
    write_file(&a.join("locked/old.txt"), b"before the lock");
    c.start_all();
    c.wait_converged(&[0, 1], CONVERGE);

    // B's copy of `locked` takes no new names; A adds one of each kind there, and a path
    // longer than Linux's PATH_MAX elsewhere.
    let lock = Immutable::set(&b.join("locked"));
    write_file(&a.join("locked/new.txt"), b"B cannot take this");
    mkfifo(&a.join("locked/pipe"), 0o640);
    fs::create_dir(a.join("locked/sub")).unwrap();
    std::os::unix::fs::symlink("old.txt", a.join("locked/link")).unwrap();
    fs::create_dir(a.join("deep")).unwrap();
    let too_long = String::from_utf8(make_deep_tree(&a.join("deep"), 17)).unwrap();
    let too_long = format!("deep/{too_long}");

    let wanted = ["locked/new.txt", "locked/pipe", "locked/sub", "locked/link"];
    let deadline = Instant::now() + CONVERGE;
    let listed = loop {
        let (total, names) = unsyncable(&c, 1);
        if wanted.iter().all(|w| names.iter().any(|(p, _, _)| p == w)) {
            break (total, names);
        }
        assert!(
            Instant::now() < deadline,
            "B lists {names:?}:\n{}",
            tail(&c.log(1), 40)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let locked_on_b = b.join("locked").display().to_string();
    for (path, cause, reason) in &listed.1 {
        assert_eq!(cause, "not_permitted", "{path}: {reason}");
        assert!(
            reason.contains(&locked_on_b),
            "{path}: the reason names what to fix: {reason}"
        );
    }
    // Counted in /metrics as listed.
    let metrics = c.metrics(1).unwrap();
    let sample = format!(
        "shoal_volume_unsyncable_names{{volume=\"vol\",cause=\"not_permitted\"}} {}",
        listed.0
    );
    assert!(metrics.contains(&sample), "{sample} not in:\n{metrics}");
    assert!(metrics.contains("# TYPE shoal_volume_unsyncable_names gauge"));
    // A lists the path too long for Linux, whole; B never hears of it.
    let deadline = Instant::now() + CONVERGE;
    loop {
        let (total, names) = unsyncable(&c, 0);
        if total == 1 {
            assert_eq!(names[0].0, too_long);
            assert_eq!(names[0].1, "path_too_long");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "A lists {names:?}:\n{}",
            tail(&c.log(0), 40)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Rounds and scans go on (heartbeat 1 s); each name is logged once, whole.
    std::thread::sleep(Duration::from_secs(4));
    let log_b = c.log(1);
    for name in wanted {
        let line = format!("cannot sync {}", b.join(name).display());
        assert_eq!(
            log_b.matches(&line).count(),
            1,
            "{line}:\n{}",
            tail(&log_b, 40)
        );
    }
    let log_a = c.log(0);
    let line = format!("cannot sync {}", a.join(&too_long).display());
    assert_eq!(log_a.matches(&line).count(), 1, "{}", tail(&log_a, 20));
    assert!(!log_a.contains("name too long"), "{}", tail(&log_a, 20));

    // Once B may write there, everything arrives and the list empties.
    drop(lock);
    c.wait_converged(&[0, 1], CONVERGE);
    let deadline = Instant::now() + CONVERGE;
    while unsyncable(&c, 1).0 != 0 {
        assert!(
            Instant::now() < deadline,
            "B still lists {:?}",
            unsyncable(&c, 1)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        fs::read(b.join("locked/new.txt")).unwrap(),
        b"B cannot take this"
    );
    assert_eq!(
        unsyncable(&c, 0).0,
        1,
        "the path too long stays listed on A"
    );
}
