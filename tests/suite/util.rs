//! Helpers: deterministic data, temporary volumes, running the real binary.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::{self, File, FileTimes};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, UNIX_EPOCH};

use shoal::entry::{Entry, EntryKind};
use shoal::pathname::VolPath;
use shoal::scan::{ScanOptions, ScanReport, scan_volume};
use shoal::store::{OpenOptions, Store};

/// Deterministic pseudo-random bytes (xorshift64).
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A temporary data root with one volume, and a state directory.
pub struct Fixture {
    pub dir: tempfile::TempDir,
}

impl Fixture {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("data/vol")).unwrap();
        Fixture { dir }
    }

    pub fn data_root(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn volume(&self) -> PathBuf {
        self.data_root().join("vol")
    }

    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.volume().join(rel)
    }

    pub fn write(&self, rel: &str, content: &[u8]) {
        write_file(&self.path(rel), content);
    }

    pub fn open(&self) -> Store {
        Store::open(
            &self.state(),
            OpenOptions {
                create: true,
                ..Default::default()
            },
        )
        .unwrap()
    }

    /// Scans the volume with a fresh store handle (closed again afterwards).
    pub fn scan(&self) -> ScanReport {
        let store = self.open();
        scan_volume(&store, "vol", &self.volume(), &ScanOptions::default()).unwrap()
    }

    /// Runs `shoal COMMAND --data-root .. --state-dir .. ARGS..`.
    pub fn shoal(&self, command: &str, args: &[&str]) -> Output {
        shoal_at(&self.data_root(), &self.state(), command, args)
    }
}

/// Runs `shoal COMMAND --data-root DATA_ROOT --state-dir STATE ARGS..`.
pub fn shoal_at(data_root: &Path, state: &Path, command: &str, args: &[&str]) -> Output {
    let mut all = vec![
        command,
        "--data-root",
        data_root.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
    ];
    all.extend_from_slice(args);
    shoal(&all)
}

/// Flips one byte in place and puts the mtime back, as bit rot would leave the file.
pub fn flip_byte_keeping_mtime(path: &Path, offset: u64) {
    let mtime = fs::metadata(path).unwrap().modified().unwrap();
    let file = File::options().read(true).write(true).open(path).unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, offset).unwrap();
    file.write_all_at(&[byte[0] ^ 0x40], offset).unwrap();
    file.set_times(FileTimes::new().set_modified(mtime))
        .unwrap();
}

/// Cuts a file short and puts the mtime back (a half-copied restore).
pub fn truncate_keeping_mtime(path: &Path, len: u64) {
    let mtime = fs::metadata(path).unwrap().modified().unwrap();
    let file = File::options().write(true).open(path).unwrap();
    file.set_len(len).unwrap();
    file.set_times(FileTimes::new().set_modified(mtime))
        .unwrap();
}

pub fn write_file(path: &Path, content: &[u8]) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).unwrap();
    }
    fs::write(path, content).unwrap();
}

pub fn set_mtime(path: &Path, secs: u64) {
    let file = File::options().write(true).open(path).unwrap();
    file.set_times(FileTimes::new().set_modified(UNIX_EPOCH + Duration::from_secs(secs)))
        .unwrap();
}

/// Runs the real binary with a clean environment for Shoal's variables.
pub fn shoal<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    shoal_command(args).output().unwrap()
}

/// `scan --data-root DATA_ROOT --state-dir STATE --volume vol`.
pub fn scan_args(data_root: &Path, state: &Path) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> =
        vec!["scan".into(), "--data-root".into(), data_root.into()];
    args.extend([
        "--state-dir".into(),
        state.into(),
        "--volume".into(),
        "vol".into(),
    ]);
    args
}

pub fn shoal_command<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_shoal"));
    command.args(args);
    for var in [
        "SYNC_VOLUMES",
        "SHOAL_DATA_ROOT",
        "SHOAL_STATE_DIR",
        "SHOAL_CONFIG",
        "SHOAL_CHUNK_SIZES",
        "SHOAL_LOG",
    ] {
        command.env_remove(var);
    }
    command
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// What the index says of every live name, without version vectors (which record
/// history, not state): path -> entry.
pub fn index_listing(store: &Store, volume: &str) -> BTreeMap<Vec<u8>, Entry> {
    let vol = store.volume(volume).unwrap().expect("volume indexed").id;
    store
        .descendants(vol, &VolPath::root())
        .map(|item| {
            let (dir, name, mut entry) = item.unwrap();
            entry.version = Default::default();
            if let EntryKind::Tombstone { .. } = entry.kind {
                entry.kind = EntryKind::Tombstone { deleted_at_ns: 0 };
            }
            if entry.is_dir() {
                // Directory mtimes move with every name added or removed; the tests
                // about them (metadata.rs) compare them on disk.
                entry.mtime_ns = 0;
            }
            (dir.join(&name).unwrap().as_bytes().to_vec(), entry)
        })
        .filter(|(_, entry)| !entry.is_tombstone())
        .collect()
}

pub fn root_of(store: &Store, volume: &str) -> String {
    let vol = store.volume(volume).unwrap().unwrap().id;
    shoal::scan::volume_root(store, vol)
        .unwrap()
        .unwrap()
        .to_hex()
}

pub fn os(bytes: &[u8]) -> &std::ffi::OsStr {
    std::ffi::OsStr::from_bytes(bytes)
}

/// A tmpfs of a given size mounted on a fresh directory, unmounted when dropped: a small
/// file system to fill (tests run as root, as CI does).
pub struct SmallFs {
    pub path: PathBuf,
}

impl SmallFs {
    pub fn mount(path: &Path, size: &str) -> SmallFs {
        fs::create_dir_all(path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mounting a {size} tmpfs on {} (needs root): {}",
            path.display(),
            stderr(&out)
        );
        SmallFs {
            path: path.to_path_buf(),
        }
    }

    /// Grows (or shrinks) the file system in place, its files kept.
    pub fn resize(&self, size: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.path)
            .output()
            .unwrap();
        assert!(out.status.success(), "remount: {}", stderr(&out));
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        // Lazy: a process of a failed test may still have files open there.
        let _ = Command::new("umount").arg("-l").arg(&self.path).output();
    }
}

/// An ext4 file system in an image file, loop-mounted at `path` (needs root and loop
/// devices): a real block file system, to fill and to grow with `resize2fs`.
pub struct LoopFs {
    pub path: PathBuf,
    image: PathBuf,
}

/// Runs a command of the loop-image tools; its output, or why it failed.
fn run_tool(program: &str, args: &[&OsStr]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    match out.status.success() {
        true => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
        false => Err(format!(
            "{program} {args:?}: {}{}",
            stdout(&out),
            stderr(&out)
        )),
    }
}

impl LoopFs {
    /// An image of `size` (as `truncate -s` takes it) next to `path`, formatted without
    /// reserved blocks and mounted at `path`.
    pub fn mount(path: &Path, size: &str) -> LoopFs {
        fs::create_dir_all(path).unwrap();
        let image = path.with_extension("img");
        let (img, at) = (image.as_os_str(), path.as_os_str());
        run_tool("truncate", &["-s".as_ref(), size.as_ref(), img]).unwrap();
        run_tool(
            "mkfs.ext4",
            &[
                "-q".as_ref(),
                "-F".as_ref(),
                "-m".as_ref(),
                "0".as_ref(),
                img,
            ],
        )
        .unwrap();
        run_tool("mount", &["-o".as_ref(), "loop".as_ref(), img, at])
            .unwrap_or_else(|e| panic!("mounting a loop image (needs root and loop devices): {e}"));
        // mkfs's own directory would be a name of the volume like any other.
        fs::remove_dir(path.join("lost+found")).unwrap();
        LoopFs {
            path: path.to_path_buf(),
            image,
        }
    }

    /// Grows the image to `size` and the file system with it while mounted (`resize2fs`
    /// online). `Err` says why it could not (online resizing needs `CAP_SYS_RESOURCE`).
    pub fn grow_online(&self, size: &str) -> Result<(), String> {
        let device = run_tool(
            "findmnt",
            &[
                "-n".as_ref(),
                "-o".as_ref(),
                "SOURCE".as_ref(),
                self.path.as_os_str(),
            ],
        )?;
        let device = device.trim();
        run_tool(
            "truncate",
            &["-s".as_ref(), size.as_ref(), self.image.as_os_str()],
        )?;
        run_tool("losetup", &["-c".as_ref(), device.as_ref()])?;
        run_tool("resize2fs", &[device.as_ref()]).map(drop)
    }

    /// Grows the image to `size` and the file system with it, unmounted (`resize2fs
    /// -f`: no `e2fsck` first, which would bring `lost+found` back), then mounts it
    /// again: nothing may have it open.
    pub fn grow_offline(&self, size: &str) {
        let (img, at) = (self.image.as_os_str(), self.path.as_os_str());
        run_tool("umount", &[at]).unwrap();
        run_tool("truncate", &["-s".as_ref(), size.as_ref(), img]).unwrap();
        run_tool("resize2fs", &["-f".as_ref(), img]).unwrap();
        run_tool("mount", &["-o".as_ref(), "loop".as_ref(), img, at]).unwrap();
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        // Lazy: a process of a failed test may still have files open there; the loop
        // device goes with the last of them.
        let _ = Command::new("umount").arg("-l").arg(&self.path).output();
        let _ = fs::remove_file(&self.image);
    }
}

/// Deterministic random numbers (xorshift64*): from a fixed or printed seed, so a failure
/// repeats (the fuzz harness and the kill storm).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    /// True `percent` times in a hundred.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}
