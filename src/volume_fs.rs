//! Safe file-system access inside one volume, for what peers ask for and what they send.
//!
//! Every path is resolved one component at a time with `openat(O_NOFOLLOW)` from a
//! descriptor of the volume root, so no path can leave the volume: `..` and absolute
//! paths are already refused by [`VolPath`], and a symlink met on the way (even one a
//! local user swapped in a moment ago) is an error, never followed.
//!
//! Reading is as careful (invariant 8): every open of a volume file is
//! `O_NOFOLLOW|O_NONBLOCK` through a directory descriptor and checked to be a regular
//! file before a byte is read, so a FIFO or device a local user plants in place of an
//! indexed file cannot block a thread, and `.shoal/` itself is reached by descriptor:
//! a `.shoal` symlink at the root is removed, never followed.
//!
//! New content is written to a staging file under `.shoal/staging/` on the volume's
//! own file system, made durable, and renamed over its name: a reader sees the old
//! version or the new one, never a mix (invariant 1). Staging files are named after the
//! content they will hold, so an interrupted transfer finds what it already wrote.
//! Small files, not worth resuming, are staged with no name at all where the file
//! system allows it (`O_TMPFILE` in the staging directory, see [`VolumeFs::stage_unnamed`]),
//! made durable the same way, and linked in under their name once complete.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags, Timespec, Timestamps};

use crate::entry::timestamp_ns;
use crate::ids::{ChunkId, ContentId};
use crate::pathname::{SHOAL_DIR, VolPath};
use crate::store::codec::{Extent, ScanStamp};
use crate::xattrs::{Namespaces, NotSet, Xattrs};

const STAGING: &str = "staging";

/// Partial transfers older than this are not resumed but removed.
const PART_RETENTION_SECS: u64 = 7 * 24 * 3600;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("{path}: refusing to go through a symlink or non-directory")]
    NotADirectory { path: String },
    /// The file system would not make a symlink or FIFO even in Shoal's own staging
    /// directory: it cannot hold that kind of item.
    #[error("this file system cannot make a {kind}: {source}")]
    CannotMake {
        kind: &'static str,
        source: io::Error,
    },
}

impl FsError {
    /// Whether the failure says the path is not there: missing, or one of its
    /// directories is not a directory (a file or a symlink, which is never followed).
    /// Nothing the volume holds under that path is on disk.
    pub fn is_gone(&self) -> bool {
        match self {
            FsError::NotADirectory { .. } => true,
            FsError::Io { source, .. } => source.kind() == io::ErrorKind::NotFound,
            FsError::CannotMake { .. } => false,
        }
    }
}

/// A failure to make a `kind` of item in staging, where nothing but the file system's
/// abilities can stand in the way.
fn cannot_make(kind: &'static str) -> impl FnOnce(rustix::io::Errno) -> FsError {
    move |e| FsError::CannotMake {
        kind,
        source: e.into(),
    }
}

fn io_err(path: impl std::fmt::Display) -> impl FnOnce(rustix::io::Errno) -> FsError {
    let path = path.to_string();
    move |e| FsError::Io {
        path,
        source: e.into(),
    }
}

/// One volume's directory, opened once.
pub struct VolumeFs {
    root_path: PathBuf,
    root: OwnedFd,
    staging: OwnedFd,
    /// How an unnamed staging file gets its name here, found out at the first one
    /// (`None`: this file system or process cannot, and files are staged by name).
    link_unnamed: std::sync::OnceLock<Option<LinkUnnamed>>,
}

/// How a file opened with `O_TMPFILE` is given a name.
#[derive(Clone, Copy, Debug)]
enum LinkUnnamed {
    /// `linkat(fd, "", dir, name, AT_EMPTY_PATH)`: needs `CAP_DAC_READ_SEARCH`.
    EmptyPath,
    /// `linkat(AT_FDCWD, "/proc/self/fd/N", dir, name, AT_SYMLINK_FOLLOW)`: needs
    /// `/proc`. The magic link names this process's own descriptor: nothing else can
    /// stand behind it.
    ProcFd,
}

/// A directory's identity on this machine: device and inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirId {
    pub dev: u64,
    pub ino: u64,
}

impl DirId {
    /// The identity of the directory `fd` is open on.
    pub fn of(fd: &impl AsFd) -> io::Result<DirId> {
        let stat = rustix::fs::fstat(fd)?;
        Ok(DirId {
            dev: stat.st_dev,
            ino: stat.st_ino,
        })
    }
}

/// What [`VolumeFs::remove_file_as_checked`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Removal {
    /// The name is gone (or was already).
    Removed,
    /// It changed after the caller's check: it is back under its name, untouched.
    PutBack,
    /// It changed, and something new took its name meanwhile: it is beside it, under
    /// this name.
    KeptAs(Vec<u8>),
}

/// Whether `stat`, of a file sync moved, is the one `expected` recorded, unchanged:
/// same inode, size and mtime (the move itself changes the ctime).
fn unchanged_since(stat: &FileStat, expected: &ScanStamp) -> bool {
    let stamp = stat.stamp();
    (stamp.dev, stamp.ino, stamp.size, stamp.mtime_ns)
        == (expected.dev, expected.ino, expected.size, expected.mtime_ns)
}

/// Names tried for a file that changed while being deleted, when its own is taken.
const MAX_SPARE_NAMES: u32 = 8;

/// A file written to staging, not yet visible under its name.
pub struct Staged {
    pub file: File,
    pub temp_name: String,
    /// The staging file was there already: an interrupted transfer to resume.
    pub resumed: bool,
}

/// The staging name of content bound for `dir/name`: the same across restarts, so an
/// interrupted transfer is resumed.
pub fn staging_name(content: &ContentId, dir: &VolPath, name: &[u8]) -> String {
    let mut destination = blake3::Hasher::new();
    destination.update(dir.as_bytes()).update(b"/").update(name);
    let destination = destination.finalize();
    format!("{}-{}.part", content.to_hex(), &destination.to_hex()[..16])
}

impl VolumeFs {
    /// Opens a volume directory and its staging area (created if needed). Leftover
    /// `*.tmp` files from a crash are removed; `*.part` files are kept for resuming.
    pub fn open(root_path: &Path) -> Result<Self, FsError> {
        let shown = root_path.display().to_string();
        let root = rustix::fs::open(
            root_path,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(io_err(&shown))?;
        let shoal_dir = std::str::from_utf8(SHOAL_DIR).expect("ascii");
        let shoal = own_dir(&root, shoal_dir, &shown)?;
        let staging = own_dir(&shoal, STAGING, &format!("{shown}/{shoal_dir}"))?;
        let fs = VolumeFs {
            root_path: root_path.to_path_buf(),
            root,
            staging,
            link_unnamed: std::sync::OnceLock::new(),
        };
        fs.clean_staging();
        Ok(fs)
    }

    /// Removes what a crash left in staging: temporary symlinks, and partial files
    /// untouched for a week (transfers that will not be resumed). Read through the
    /// staging descriptor, so nothing outside it is listed or removed.
    fn clean_staging(&self) {
        let abandoned =
            std::time::SystemTime::now() - std::time::Duration::from_secs(PART_RETENTION_SECS);
        let abandoned_s = abandoned
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let Ok(mut listing) = rustix::fs::Dir::read_from(&self.staging) else {
            return;
        };
        // Bounded: each entry is looked at once, and a directory has finitely many.
        while let Some(Ok(entry)) = listing.read() {
            let name = entry.file_name().to_bytes();
            let stale = || {
                rustix::fs::statat(&self.staging, entry.file_name(), AtFlags::SYMLINK_NOFOLLOW)
                    .is_ok_and(|stat| stat.st_mtime < abandoned_s)
            };
            if name.ends_with(b".tmp") || (name.ends_with(b".part") && stale()) {
                let _ = rustix::fs::unlinkat(&self.staging, entry.file_name(), AtFlags::empty());
            }
        }
    }

    pub fn root_path(&self) -> &Path {
        &self.root_path
    }

    /// The identity of the volume directory this was opened on (at `serve`'s start).
    pub fn root_id(&self) -> io::Result<DirId> {
        DirId::of(&self.root)
    }

    /// Bytes free on the volume's file system.
    pub fn available(&self) -> io::Result<u64> {
        crate::space::available_at(&self.staging)
    }

    /// Bytes the staging file `name` takes on disk already (a transfer to resume);
    /// 0 if there is none.
    pub fn staged_bytes(&self, name: &str) -> u64 {
        rustix::fs::statat(&self.staging, name, AtFlags::SYMLINK_NOFOLLOW)
            .map_or(0, |stat| stat.st_blocks as u64 * 512)
    }

    /// The names of the partial transfers (`*.part`) in staging.
    pub fn staging_files(&self) -> Vec<String> {
        let dir = self.root_path.join(".shoal").join(STAGING);
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| entry.file_name().into_string().ok())
            .filter(|name| name.ends_with(".part"))
            .collect()
    }

    /// The other partial transfers (`*.part`) in staging bound for the same name as the
    /// staging file `name`: versions of that file it supersedes.
    pub fn superseded_by(&self, name: &str) -> Vec<String> {
        let Some(destination) = name.split_once('-').map(|(_, d)| d) else {
            return Vec::new();
        };
        self.staging_files()
            .into_iter()
            .filter(|other| {
                other != name && other.split_once('-').map(|(_, d)| d) == Some(destination)
            })
            .collect()
    }

    /// Removes the staging file `name`; returns the bytes it took on disk.
    pub fn remove_staged(&self, name: &str) -> Result<u64, FsError> {
        let bytes = self.staged_bytes(name);
        match rustix::fs::unlinkat(&self.staging, name, AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(bytes),
            Err(e) => Err(io_err(name)(e)),
        }
    }

    /// Opens the directory `dir` inside the volume without following any symlink.
    /// With `create`, missing directories are created (mode 0755).
    pub fn open_dir(&self, dir: &VolPath, create: bool) -> Result<OwnedFd, FsError> {
        open_dir_at(&self.root, dir, create)
    }

    /// Opens (or resumes) the staging file for `content` on its way to `dir/name`,
    /// `size` bytes long. The name depends on both, so two files with the same content
    /// never share a staging file, and a retried transfer finds its own.
    pub fn stage(
        &self,
        content: &ContentId,
        dir: &VolPath,
        name: &[u8],
        size: u64,
    ) -> Result<Staged, FsError> {
        let temp_name = staging_name(content, dir, name);
        let fd = rustix::fs::openat(
            &self.staging,
            temp_name.as_str(),
            OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(io_err(&temp_name))?;
        let file = File::from(fd);
        let io = |source| FsError::Io {
            path: temp_name.clone(),
            source,
        };
        let resumed = file.metadata().map_err(io)?.len() == size && size > 0;
        // Staging files hold what we write, whatever mode the content will have.
        rustix::fs::fchmod(&file, Mode::from_raw_mode(0o600)).map_err(io_err(&temp_name))?;
        file.set_len(size).map_err(io)?;
        Ok(Staged {
            file,
            temp_name,
            resumed,
        })
    }

    /// Opens an unnamed staging file of `size` bytes on the volume's file system
    /// (`O_TMPFILE` in the staging directory), for content not worth resuming: it makes
    /// no entry in the staging directory (whose lock every named staging file takes
    /// twice, at its creation and at its rename), and a crash leaves nothing behind (the
    /// file system frees an unlinked inode). `None` where the file system cannot make
    /// one, or this process cannot give it a name ([`VolumeFs::publish_unnamed`]):
    /// then the caller stages by name.
    pub fn stage_unnamed(&self, size: u64) -> Result<Option<File>, FsError> {
        if !self.can_stage_unnamed() {
            return Ok(None);
        }
        let file = match rustix::fs::openat(
            &self.staging,
            ".",
            OFlags::RDWR | OFlags::TMPFILE | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        ) {
            Ok(fd) => File::from(fd),
            Err(e) => return Err(io_err("an unnamed staging file")(e)),
        };
        file.set_len(size).map_err(|source| FsError::Io {
            path: "an unnamed staging file".into(),
            source,
        })?;
        Ok(Some(file))
    }

    /// Whether [`VolumeFs::stage_unnamed`] can make unnamed staging files here.
    pub fn can_stage_unnamed(&self) -> bool {
        self.unnamed_linking().is_some()
    }

    /// How unnamed staging files get a name on this file system, tried once: an
    /// `O_TMPFILE` linked into staging (by `AT_EMPTY_PATH`, else through `/proc`) and
    /// removed again.
    fn unnamed_linking(&self) -> Option<LinkUnnamed> {
        *self.link_unnamed.get_or_init(|| {
            let fd = rustix::fs::openat(
                &self.staging,
                ".",
                OFlags::RDWR | OFlags::TMPFILE | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
            .ok()?;
            let file = File::from(fd);
            [LinkUnnamed::EmptyPath, LinkUnnamed::ProcFd]
                .into_iter()
                .find(|how| {
                    let probe = staged_special_name("probe");
                    let linked =
                        link_unnamed(*how, &file, &self.staging, OsStr::new(&probe)).is_ok();
                    if linked {
                        let _ =
                            rustix::fs::unlinkat(&self.staging, probe.as_str(), AtFlags::empty());
                    }
                    linked
                })
        })
    }

    /// Gives the complete, durable unnamed staging `file` the name `name` in `dir_fd`:
    /// linked there directly when the name is free (the name appears with the whole
    /// file, as a rename would make it), or, when something holds the name, linked
    /// into staging under a temporary name and put over it as
    /// [`VolumeFs::replace_as_checked`] does, if it is what `expected` says. `false`
    /// when the name changed here: something holds it where `expected` says nothing
    /// should, or it is not what `expected` says.
    pub fn publish_unnamed(
        &self,
        file: &File,
        dir_fd: &OwnedFd,
        name: &[u8],
        expected: Option<&ScanStamp>,
    ) -> Result<bool, FsError> {
        let how = self.unnamed_linking().ok_or_else(|| FsError::Io {
            path: crate::pathname::escape(name),
            source: io::Error::other("unnamed staging files cannot be linked here"),
        })?;
        let shown = || crate::pathname::escape(name);
        match link_unnamed(how, file, dir_fd, OsStr::from_bytes(name)) {
            Ok(()) => return Ok(true),
            // Nothing was expected at the name, yet something is there: it changed here
            // (what the checked replace would find after swapping it out and back).
            Err(rustix::io::Errno::EXIST) if expected.is_none() => return Ok(false),
            Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(io_err(shown())(e)),
        }
        // `*.tmp`: removed at the next start if a crash comes before the rename.
        let temp_name = staged_special_name("file");
        link_unnamed(how, file, &self.staging, OsStr::new(&temp_name)).map_err(io_err(shown()))?;
        let placed = self.replace_as_checked(&temp_name, dir_fd, name, expected);
        if !placed.as_ref().is_ok_and(|placed| *placed) {
            let _ = rustix::fs::unlinkat(&self.staging, temp_name.as_str(), AtFlags::empty());
        }
        placed
    }

    /// Renames the staged `temp_name` over `name` in `dir_fd` if the name still holds
    /// what `expected` (its stamp in the index; `None`: none) describes, for a received
    /// file; `false` if it changed here after the caller's check, left as it is (the
    /// staged file stays in staging). A write can land between that check and a plain
    /// rename over the name, and would go with the old file: the two are swapped
    /// instead (`RENAME_EXCHANGE`), the old one checked in staging ([`unchanged_since`])
    /// and only then unlinked; one that changed is swapped back. A file system
    /// without `RENAME_EXCHANGE` gets the plain rename.
    pub fn replace_as_checked(
        &self,
        temp_name: &str,
        dir_fd: &OwnedFd,
        name: &[u8],
        expected: Option<&ScanStamp>,
    ) -> Result<bool, FsError> {
        use rustix::fs::RenameFlags;
        use rustix::io::Errno;
        let shown = || crate::pathname::escape(name);
        let to = OsStr::from_bytes(name);
        let swap = || {
            rustix::fs::renameat_with(&self.staging, temp_name, dir_fd, to, RenameFlags::EXCHANGE)
        };
        match swap() {
            Ok(()) => {}
            // Nothing at the name: it appears whole, unless something took it meanwhile.
            Err(Errno::NOENT) => {
                return match rustix::fs::renameat_with(
                    &self.staging,
                    temp_name,
                    dir_fd,
                    to,
                    RenameFlags::NOREPLACE,
                ) {
                    Ok(()) => Ok(true),
                    Err(Errno::EXIST) => Ok(false),
                    Err(e) => Err(io_err(shown())(e)),
                };
            }
            Err(Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP) => {
                self.publish(temp_name, dir_fd, name)?;
                return Ok(true);
            }
            Err(e) => return Err(io_err(shown())(e)),
        }
        let old = lstat_at(&self.staging, temp_name.as_bytes()).ok();
        let unchanged = old
            .zip(expected)
            .is_some_and(|(old, expected)| !old.is_dir() && unchanged_since(&old, expected));
        if unchanged {
            rustix::fs::unlinkat(&self.staging, temp_name, AtFlags::empty())
                .map_err(io_err(shown()))?;
            return Ok(true);
        }
        match swap() {
            Ok(()) => Ok(false),
            // Our file was moved away from the name meanwhile: theirs goes back alone.
            Err(Errno::NOENT) => rustix::fs::renameat_with(
                &self.staging,
                temp_name,
                dir_fd,
                to,
                RenameFlags::NOREPLACE,
            )
            .map(|()| false)
            .map_err(io_err(shown())),
            Err(e) => Err(FsError::Io {
                path: shown(),
                source: io::Error::other(format!(
                    "changed here while being replaced, and cannot be put back ({e}): kept in staging as {temp_name}"
                )),
            }),
        }
    }

    /// Stages the file at `source` by moving it into staging, so that its content is not
    /// copied: the other half of a rename, whose old name is about to be deleted. Only
    /// if it is exactly the file the index knows (`expected`: same inode, size, mtime,
    /// ctime), checked just before the move; otherwise, or if a staging file is already
    /// there to resume, `None`, and the caller stages a copy. The staged file is marked
    /// resumed: its chunks are checked before use like any other.
    pub fn stage_by_move(
        &self,
        source: (&VolPath, &[u8]),
        expected: &ScanStamp,
        content: &ContentId,
        dir: &VolPath,
        name: &[u8],
    ) -> Result<Option<Staged>, FsError> {
        let temp_name = staging_name(content, dir, name);
        let Ok(source_dir) = self.open_dir(source.0, false) else {
            return Ok(None);
        };
        let source_name = std::ffi::OsStr::from_bytes(source.1);
        let unchanged = lstat_at(&source_dir, source.1)
            .is_ok_and(|stat| stat.is_file() && stat.stamp() == *expected);
        if !unchanged {
            return Ok(None);
        }
        let Some(file) = self.move_into_staging(&source_dir, source_name, expected, &temp_name)
        else {
            return Ok(None);
        };
        rustix::fs::fchmod(&file, Mode::from_raw_mode(0o600)).map_err(io_err(&temp_name))?;
        Ok(Some(Staged {
            file,
            temp_name,
            resumed: true,
        }))
    }

    /// The move of [`VolumeFs::stage_by_move`], after its check: renames `source_name`
    /// into staging as `temp_name` and opens it there. The name may have been swapped
    /// between the check and the rename: what moved must be the very file checked (its
    /// inode and device), or it goes back where it was and `None` says so.
    fn move_into_staging(
        &self,
        source_dir: &OwnedFd,
        source_name: &std::ffi::OsStr,
        expected: &ScanStamp,
        temp_name: &str,
    ) -> Option<File> {
        let moved = rustix::fs::renameat_with(
            source_dir,
            source_name,
            &self.staging,
            temp_name,
            rustix::fs::RenameFlags::NOREPLACE,
        )
        .is_ok();
        if !moved {
            return None;
        }
        let fd = rustix::fs::openat(
            &self.staging,
            temp_name,
            OFlags::RDWR | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        );
        let file = fd.map(File::from);
        let same = file.as_ref().is_ok_and(|file| {
            FileStat::of(file)
                .is_ok_and(|stat| stat.is_file() && stat.dev_ino() == (expected.dev, expected.ino))
        });
        if !same {
            drop(file);
            let _ = rustix::fs::renameat_with(
                &self.staging,
                temp_name,
                source_dir,
                source_name,
                rustix::fs::RenameFlags::NOREPLACE,
            );
            return None;
        }
        file.ok()
    }

    /// Puts a symlink to `target` at `name` in `dir_fd` atomically (made in staging,
    /// given `owner` if set and its own `mtime_ns`, renamed over the name), makes the directory durable, and
    /// returns the link's stat. The target is stored byte for byte, wherever it points:
    /// Shoal never follows a symlink.
    pub fn place_symlink(
        &self,
        dir_fd: &OwnedFd,
        name: &[u8],
        target: &[u8],
        mtime_ns: i64,
        owner: Option<(u32, u32)>,
    ) -> Result<FileStat, FsError> {
        let temp_name = staged_special_name("symlink");
        rustix::fs::symlinkat(
            std::ffi::OsStr::from_bytes(target),
            &self.staging,
            temp_name.as_str(),
        )
        .map_err(cannot_make("symlink"))?;
        self.finish_special(&temp_name, None, Some(mtime_ns), owner)?;
        self.publish(&temp_name, dir_fd, name)?;
        Self::fsync_dir(dir_fd)?;
        self.stat(dir_fd, name)
    }

    /// Makes `name` in `dir_fd` another name of the regular file `source` in
    /// `source_dir` (a hard link), atomically: linked in staging (`linkat`, which never
    /// follows a symlink), checked to be the very file `expected` describes, renamed over
    /// the name, the directory made durable.
    pub fn link_into(
        &self,
        source_dir: &OwnedFd,
        source: &[u8],
        expected: &FileStat,
        dir_fd: &OwnedFd,
        name: &[u8],
    ) -> Result<(), FsError> {
        let temp_name = staged_special_name("link");
        rustix::fs::linkat(
            source_dir,
            std::ffi::OsStr::from_bytes(source),
            &self.staging,
            temp_name.as_str(),
            AtFlags::empty(),
        )
        .map_err(|e| match e {
            // Linking in Shoal's own directory: refused only for what the file system
            // (or its link count limit) cannot do.
            rustix::io::Errno::PERM | rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::MLINK => {
                cannot_make("hard link")(e)
            }
            _ => io_err(crate::pathname::escape(source))(e),
        })?;
        let linked = self.stat(&self.staging, temp_name.as_bytes());
        let same = linked
            .as_ref()
            .is_ok_and(|s| s.is_file() && s.dev_ino() == expected.dev_ino());
        if !same {
            let _ = rustix::fs::unlinkat(&self.staging, temp_name.as_str(), AtFlags::empty());
            return Err(FsError::Io {
                path: crate::pathname::escape(source),
                source: io::Error::other("replaced while being linked"),
            });
        }
        self.publish(&temp_name, dir_fd, name)?;
        Self::fsync_dir(dir_fd)
    }

    /// Puts a FIFO (named pipe) with `mode`, `mtime_ns` and `owner` (if set) at `name`
    /// in `dir_fd` atomically, like [`VolumeFs::place_symlink`].
    pub fn place_fifo(
        &self,
        dir_fd: &OwnedFd,
        name: &[u8],
        mode: u32,
        mtime_ns: i64,
        owner: Option<(u32, u32)>,
    ) -> Result<FileStat, FsError> {
        let temp_name = staged_special_name("fifo");
        rustix::fs::mknodat(
            &self.staging,
            temp_name.as_str(),
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .map_err(cannot_make("FIFO"))?;
        self.finish_special(&temp_name, Some(mode), Some(mtime_ns), owner)?;
        self.publish(&temp_name, dir_fd, name)?;
        Self::fsync_dir(dir_fd)?;
        self.stat(dir_fd, name)
    }

    /// Sets the owner, then the mode and mtime, of a symlink or FIFO in staging (by
    /// name, never following it: nothing but Shoal writes in staging).
    fn finish_special(
        &self,
        temp_name: &str,
        mode: Option<u32>,
        mtime_ns: Option<i64>,
        owner: Option<(u32, u32)>,
    ) -> Result<(), FsError> {
        let fail = |e| {
            let _ = rustix::fs::unlinkat(&self.staging, temp_name, AtFlags::empty());
            io_err(temp_name)(e)
        };
        if let Some((uid, gid)) = owner {
            rustix::fs::chownat(
                &self.staging,
                temp_name,
                Some(rustix::fs::Uid::from_raw(uid)),
                Some(rustix::fs::Gid::from_raw(gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(fail)?;
        }
        if let Some(mode) = mode {
            rustix::fs::chmodat(
                &self.staging,
                temp_name,
                Mode::from_raw_mode(mode),
                AtFlags::empty(),
            )
            .map_err(fail)?;
        }
        if let Some(mtime_ns) = mtime_ns {
            rustix::fs::utimensat(
                &self.staging,
                temp_name,
                &timestamps(mtime_ns),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(fail)?;
        }
        Ok(())
    }

    /// Atomically replaces `name` in `dir_fd` with the staged file `temp_name`.
    pub fn publish(&self, temp_name: &str, dir_fd: &OwnedFd, name: &[u8]) -> Result<(), FsError> {
        rustix::fs::renameat(
            &self.staging,
            temp_name,
            dir_fd,
            std::ffi::OsStr::from_bytes(name),
        )
        .map_err(io_err(crate::pathname::escape(name)))
    }

    /// Flushes everything written to the volume's file system (one `syncfs` for a
    /// large batch of staged files instead of one `fsync` each; it also waits for
    /// every other writer's dirty data on that file system).
    pub fn sync_all(&self) -> Result<(), FsError> {
        rustix::fs::syncfs(&self.staging).map_err(io_err(self.root_path.display()))
    }

    /// Stat of `name` in `dir_fd` without following it.
    pub fn stat(&self, dir_fd: &OwnedFd, name: &[u8]) -> Result<FileStat, FsError> {
        lstat_at(dir_fd, name).map_err(|e| FsError::Io {
            path: crate::pathname::escape(name),
            source: e,
        })
    }

    pub fn mkdir(&self, dir_fd: &OwnedFd, name: &[u8], mode: u32) -> Result<(), FsError> {
        match rustix::fs::mkdirat(
            dir_fd,
            std::ffi::OsStr::from_bytes(name),
            Mode::from_raw_mode(mode),
        ) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => Ok(()),
            Err(e) => Err(io_err(crate::pathname::escape(name))(e)),
        }
    }

    /// Opens the directory `name` in `dir_fd` itself (never following a symlink), to
    /// set its metadata through the descriptor.
    fn open_child_dir(&self, dir_fd: &OwnedFd, name: &[u8]) -> Result<OwnedFd, FsError> {
        rustix::fs::openat(
            dir_fd,
            std::ffi::OsStr::from_bytes(name),
            OPEN_DIR,
            Mode::empty(),
        )
        .map_err(io_err(crate::pathname::escape(name)))
    }

    /// Sets the permission bits and extended attributes of the directory `name` (never
    /// following a symlink), as [`set_xattrs`] does; returns what could not be set.
    pub fn set_dir_xattrs(
        &self,
        dir_fd: &OwnedFd,
        name: &[u8],
        mode: u32,
        xattrs: &Xattrs,
    ) -> Result<Vec<NotSet>, FsError> {
        let fd = self.open_child_dir(dir_fd, name)?;
        set_xattrs(fd.as_fd(), mode, xattrs).map_err(|e| FsError::Io {
            path: crate::pathname::escape(name),
            source: e,
        })
    }

    /// Sets the owner of the directory `name` (never following a symlink).
    pub fn chown_dir(
        &self,
        dir_fd: &OwnedFd,
        name: &[u8],
        (uid, gid): (u32, u32),
    ) -> Result<(), FsError> {
        let fd = self.open_child_dir(dir_fd, name)?;
        rustix::fs::fchown(
            &fd,
            Some(rustix::fs::Uid::from_raw(uid)),
            Some(rustix::fs::Gid::from_raw(gid)),
        )
        .map_err(io_err(crate::pathname::escape(name)))
    }

    /// Removes a file or symlink; a missing name is not an error.
    pub fn remove_file(&self, dir_fd: &OwnedFd, name: &[u8]) -> Result<(), FsError> {
        match rustix::fs::unlinkat(dir_fd, std::ffi::OsStr::from_bytes(name), AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(io_err(crate::pathname::escape(name))(e)),
        }
    }

    /// Removes the file, symlink or FIFO `name` if it is still what `expected` (its stamp
    /// in the index; `None`: none) describes, for a peer's delete (or a directory taking
    /// the name). A write can land between the caller's check and an `unlink`, and would
    /// go with it: the name is moved into staging first (`RENAME_NOREPLACE`), checked
    /// there ([`unchanged_since`]), and only then unlinked. What changed meanwhile is
    /// put back under its name, or, if something new took the name in between, beside
    /// it under the first free name of `spare_names`; it is the caller's to index as a
    /// local change. A name already gone is [`Removal::Removed`].
    pub fn remove_file_as_checked(
        &self,
        dir_fd: &OwnedFd,
        name: &[u8],
        expected: Option<&ScanStamp>,
        spare_names: impl Fn(u32) -> Vec<u8>,
    ) -> Result<Removal, FsError> {
        let shown = || crate::pathname::escape(name);
        let aside = staged_special_name("deleted");
        match rustix::fs::renameat_with(
            dir_fd,
            OsStr::from_bytes(name),
            &self.staging,
            aside.as_str(),
            rustix::fs::RenameFlags::NOREPLACE,
        ) {
            Ok(()) => {}
            Err(rustix::io::Errno::NOENT) => return Ok(Removal::Removed),
            Err(e) => return Err(io_err(shown())(e)),
        }
        let moved = lstat_at(&self.staging, aside.as_bytes()).map_err(|e| FsError::Io {
            path: shown(),
            source: e,
        })?;
        let unchanged = expected.is_some_and(|expected| unchanged_since(&moved, expected));
        if unchanged {
            rustix::fs::unlinkat(&self.staging, aside.as_str(), AtFlags::empty())
                .map_err(io_err(shown()))?;
            return Ok(Removal::Removed);
        }
        let put_back = |to: &[u8]| {
            rustix::fs::renameat_with(
                &self.staging,
                aside.as_str(),
                dir_fd,
                OsStr::from_bytes(to),
                rustix::fs::RenameFlags::NOREPLACE,
            )
        };
        match put_back(name) {
            Ok(()) => return Ok(Removal::PutBack),
            Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(io_err(shown())(e)),
        }
        for attempt in 0..MAX_SPARE_NAMES {
            let spare = spare_names(attempt);
            match put_back(&spare) {
                Ok(()) => return Ok(Removal::KeptAs(spare)),
                Err(rustix::io::Errno::EXIST) => continue,
                Err(e) => return Err(io_err(shown())(e)),
            }
        }
        Err(FsError::Io {
            path: shown(),
            source: io::Error::other(format!(
                "changed while being deleted, and its {MAX_SPARE_NAMES} spare names are taken: kept in staging as {aside}"
            )),
        })
    }

    /// Removes an empty directory; returns false if it is not empty.
    pub fn remove_dir(&self, dir_fd: &OwnedFd, name: &[u8]) -> Result<bool, FsError> {
        match rustix::fs::unlinkat(
            dir_fd,
            std::ffi::OsStr::from_bytes(name),
            AtFlags::REMOVEDIR,
        ) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(true),
            Err(rustix::io::Errno::NOTEMPTY | rustix::io::Errno::EXIST) => Ok(false),
            Err(e) => Err(io_err(crate::pathname::escape(name))(e)),
        }
    }

    pub fn fsync_dir(dir_fd: &OwnedFd) -> Result<(), FsError> {
        rustix::fs::fsync(dir_fd).map_err(io_err("directory"))
    }
}

/// Appends `extent` of the regular file `name` in the open volume directory `dir` to
/// `out` if it is chunk `id`; `false`, and `out` as it was, if it is not there intact.
/// Anything else found under that name (a FIFO, a device, a symlink: planted by a
/// local user since the scan) is not read, and neither is an extent longer than any
/// chunk, nor a `name` that is not a single name. Blocking: call it off the async
/// worker threads.
///
/// `indexed` is the stamp the file had when its chunks were hashed (by a scan, or when
/// a pull wrote it): if the file still has it, before and after the read, nothing wrote
/// to it since (a write moves the ctime, to a finer timestamp once the old one was
/// looked at) and the bytes are the chunk without hashing them again; otherwise they
/// are hashed and checked against `id`. (The receiver checks every chunk against its id
/// in any case.)
pub fn read_chunk_in(
    dir: &impl AsFd,
    name: &[u8],
    extent: Extent,
    id: &ChunkId,
    indexed: Option<&ScanStamp>,
    out: &mut Vec<u8>,
) -> bool {
    if extent.len > fastcdc::v2020::MAXIMUM_MAX || crate::pathname::validate_name(name).is_err() {
        return false;
    }
    let Ok((file, opened_as)) = open_regular(dir, name) else {
        return false;
    };
    let is_indexed = |stat: &FileStat| indexed.is_some_and(|indexed| stat.stamp() == *indexed);
    let start = out.len();
    let before = is_indexed(&opened_as);
    let read = read_append(&file, extent.len as usize, extent.offset, out).is_ok();
    let after = || FileStat::of(&file).is_ok_and(|stat| is_indexed(&stat));
    let intact = read && ((before && after()) || ChunkId::of(&out[start..]) == *id);
    if !intact {
        out.truncate(start);
    }
    intact
}

/// Appends the `len` bytes at `offset` of `file` (opened for this read alone: it is
/// moved to `offset`) to `out`, whose spare room the read fills without it being zeroed
/// first.
fn read_append(file: &File, len: usize, offset: u64, out: &mut Vec<u8>) -> io::Result<()> {
    use std::io::{Read, Seek};
    let mut file = file;
    file.seek(io::SeekFrom::Start(offset))?;
    out.reserve(len);
    if file.take(len as u64).read_to_end(out)? < len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// The block size holes are made of (the usual file system block).
const HOLE_BLOCK: u64 = 4096;

/// Writes `data` at `offset` of a staging file, leaving each all-zero block of it a hole
/// (punched, in case the file held other bytes there): a sparse file arrives as sparse
/// as it was, taking the space of its data, not of its zeros.
pub fn write_sparse(file: &File, data: &[u8], offset: u64) -> io::Result<()> {
    // The end (in `data`) of the block that holds `data[at]`.
    let block_end = |at: usize| {
        let next = ((offset + at as u64) / HOLE_BLOCK + 1) * HOLE_BLOCK;
        ((next - offset) as usize).min(data.len())
    };
    let is_zero = |from: usize, to: usize| data[from..to].iter().all(|&b| b == 0);
    let mut at = 0;
    while at < data.len() {
        let zero = is_zero(at, block_end(at));
        let mut end = block_end(at);
        while end < data.len() && is_zero(end, block_end(end)) == zero {
            end = block_end(end);
        }
        if zero {
            punch_hole(file, offset + at as u64, (end - at) as u64)?;
        } else {
            file.write_all_at(&data[at..end], offset + at as u64)?;
        }
        at = end;
    }
    Ok(())
}

/// Makes `len` bytes at `offset` of a staging file zeros that take no space (written
/// as zeros where the file system cannot punch holes).
pub fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let flags = rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE;
    if rustix::fs::fallocate(file, flags, offset, len).is_ok() {
        return Ok(());
    }
    let zeros = vec![0u8; len.min(1 << 20) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// Sets a staged file's metadata before it is published: owner, mode, extended
/// attributes (see [`set_xattrs`]), mtime. Returns the attributes it could not set.
pub fn finish_staged(
    file: &File,
    mode: u32,
    mtime_ns: i64,
    owner: Option<(u32, u32)>,
    xattrs: &Xattrs,
) -> io::Result<Vec<NotSet>> {
    if let Some((uid, gid)) = owner {
        rustix::fs::fchown(
            file.as_fd(),
            Some(rustix::fs::Uid::from_raw(uid)),
            Some(rustix::fs::Gid::from_raw(gid)),
        )?;
    }
    let not_set = set_xattrs(file.as_fd(), mode, xattrs)?;
    set_mtime(file.as_fd(), mtime_ns)?;
    Ok(not_set)
}

/// Gives an open file or directory (already owned as it should be: a chown clears some
/// attributes) its mode and exactly the extended attributes `xattrs`, the mode first
/// (setting an access ACL sets the group bits to its mask). An access ACL that cannot be
/// set never leaves the mask's group bits in its place: the mode is narrowed to what
/// the owning group really had ([`crate::xattrs::narrowed_mode`]). Returns the
/// attributes that could not be set.
pub fn set_xattrs(fd: BorrowedFd<'_>, mode: u32, xattrs: &Xattrs) -> io::Result<Vec<NotSet>> {
    rustix::fs::fchmod(fd, Mode::from_raw_mode(mode))?;
    let not_set = crate::xattrs::apply(fd, xattrs, Namespaces::for_this_process());
    let acl = xattrs.get(crate::xattrs::ACL_ACCESS);
    let acl_access = crate::xattrs::ACL_ACCESS;
    if let Some(acl) = acl.filter(|_| not_set.iter().any(|n| n.name.as_bytes() == acl_access)) {
        rustix::fs::fchmod(
            fd,
            Mode::from_raw_mode(crate::xattrs::narrowed_mode(mode, acl)),
        )?;
    }
    Ok(not_set)
}

/// Sets the modification (and access) time of an open file or directory.
pub fn set_mtime(fd: impl AsFd, mtime_ns: i64) -> io::Result<()> {
    rustix::fs::futimens(fd, &timestamps(mtime_ns))?;
    Ok(())
}

/// Access and modification times both at `mtime_ns`.
fn timestamps(mtime_ns: i64) -> Timestamps {
    let mtime = Timespec {
        tv_sec: mtime_ns.div_euclid(1_000_000_000),
        tv_nsec: mtime_ns.rem_euclid(1_000_000_000) as _,
    };
    Timestamps {
        last_access: mtime,
        last_modification: mtime,
    }
}

/// Links the unnamed (`O_TMPFILE`) `file` as `name` in `dir`, `how` this process can.
fn link_unnamed(
    how: LinkUnnamed,
    file: &File,
    dir: &impl AsFd,
    name: &OsStr,
) -> rustix::io::Result<()> {
    match how {
        LinkUnnamed::EmptyPath => rustix::fs::linkat(file, "", dir, name, AtFlags::EMPTY_PATH),
        LinkUnnamed::ProcFd => {
            use std::os::fd::AsRawFd;
            let magic = format!("/proc/self/fd/{}", file.as_raw_fd());
            rustix::fs::linkat(
                rustix::fs::CWD,
                magic.as_str(),
                dir,
                name,
                AtFlags::SYMLINK_FOLLOW,
            )
        }
    }
}

/// A new random name in staging for a symlink or FIFO about to be renamed into place
/// (`*.tmp`: removed at the next start if a crash leaves it).
fn staged_special_name(kind: &str) -> String {
    let unique = getrandom::u64().unwrap_or_default();
    format!("{unique:016x}.{kind}.tmp")
}

/// Opens the directory `dir` below the volume root `root`, never following a symlink
/// (one met on the way is [`FsError::NotADirectory`]). With `create`, missing
/// directories are created (mode 0755).
///
/// One `openat2` resolves the whole path where the kernel has it (Linux 5.6), with the
/// same rules as the walk one component at a time that it stands in for (no symlink
/// anywhere, nothing above `root`): a pull or a chunk read opens a directory per file,
/// and the walk costs two system calls per component and a `dup`. Anything else it
/// reports (a kernel or seccomp filter without it, a missing directory to create) goes
/// to the walk, which decides.
pub fn open_dir_at(root: &impl AsFd, dir: &VolPath, create: bool) -> Result<OwnedFd, FsError> {
    if dir.is_root() {
        return rustix::io::dup(root).map_err(io_err(dir.display()));
    }
    if OPENAT2_WORKS.load(std::sync::atomic::Ordering::Relaxed) {
        use rustix::fs::ResolveFlags;
        let resolve =
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
        let path = std::ffi::OsStr::from_bytes(dir.as_bytes());
        match rustix::fs::openat2(root, path, OPEN_DIR, Mode::empty(), resolve) {
            Ok(fd) => return Ok(fd),
            Err(rustix::io::Errno::NOTDIR | rustix::io::Errno::LOOP) => {
                return Err(FsError::NotADirectory {
                    path: dir.display().to_string(),
                });
            }
            Err(e @ rustix::io::Errno::NOENT) if !create => return Err(io_err(dir.display())(e)),
            Err(rustix::io::Errno::NOSYS | rustix::io::Errno::PERM) => {
                OPENAT2_WORKS.store(false, std::sync::atomic::Ordering::Relaxed);
            }
            Err(_) => {}
        }
    }
    open_dir_walking(root, dir, create)
}

/// How a directory of a volume is opened: never through a symlink.
const OPEN_DIR: OFlags = OFlags::DIRECTORY
    .union(OFlags::RDONLY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// Whether `openat2` is worth trying ([`open_dir_at`]): until it is found missing.
static OPENAT2_WORKS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// [`open_dir_at`] one component at a time.
fn open_dir_walking(root: &impl AsFd, dir: &VolPath, create: bool) -> Result<OwnedFd, FsError> {
    let mut fd = rustix::io::dup(root).map_err(io_err(dir.display()))?;
    for name in dir.as_bytes().split(|&b| b == b'/') {
        let name = std::ffi::OsStr::from_bytes(name);
        let next = match rustix::fs::openat(&fd, name, OPEN_DIR, Mode::empty()) {
            Err(rustix::io::Errno::NOENT) if create => {
                match rustix::fs::mkdirat(&fd, name, Mode::from_raw_mode(0o755)) {
                    Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                    Err(e) => return Err(io_err(dir.display())(e)),
                }
                rustix::fs::openat(&fd, name, OPEN_DIR, Mode::empty())
            }
            other => other,
        };
        fd = match next {
            Ok(next) => next,
            Err(rustix::io::Errno::NOTDIR | rustix::io::Errno::LOOP) => {
                return Err(FsError::NotADirectory {
                    path: dir.display().to_string(),
                });
            }
            Err(e) => return Err(io_err(dir.display())(e)),
        };
    }
    Ok(fd)
}

/// The `lstat` of `name`, one name (no `/`) in `dir`: `fstatat(AT_SYMLINK_NOFOLLOW)`
/// through the directory's descriptor, so the answer is about that name in that
/// directory and nothing a path resolves to. One system call: the scan asks it of every
/// name it lists.
pub fn lstat_at(dir: &impl AsFd, name: &[u8]) -> io::Result<FileStat> {
    let stat = rustix::fs::statat(dir, OsStr::from_bytes(name), AtFlags::SYMLINK_NOFOLLOW)?;
    Ok(FileStat(stat))
}

/// What `lstat` or `fstat` said of one file, asked the questions the scan asks.
#[derive(Clone, Copy, Debug)]
pub struct FileStat(rustix::fs::Stat);

impl FileStat {
    /// The `fstat` of an open file.
    pub fn of(file: &impl AsFd) -> io::Result<FileStat> {
        Ok(FileStat(rustix::fs::fstat(file)?))
    }

    pub fn file_type(&self) -> rustix::fs::FileType {
        rustix::fs::FileType::from_raw_mode(self.0.st_mode)
    }

    pub fn is_dir(&self) -> bool {
        self.file_type() == rustix::fs::FileType::Directory
    }

    pub fn is_file(&self) -> bool {
        self.file_type() == rustix::fs::FileType::RegularFile
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.0.st_size as u64
    }

    /// The permission bits, with set-id and sticky ([`crate::entry::MODE_MASK`]).
    pub fn permissions(&self) -> u32 {
        self.0.st_mode & crate::entry::MODE_MASK
    }

    // `st_nlink` is a `u32` on aarch64.
    #[allow(clippy::unnecessary_cast)]
    pub fn nlink(&self) -> u64 {
        self.0.st_nlink as u64
    }

    /// The file's identity: device and inode.
    pub fn dev_ino(&self) -> (u64, u64) {
        (self.0.st_dev, self.0.st_ino)
    }

    pub fn uid(&self) -> u32 {
        self.0.st_uid
    }

    pub fn gid(&self) -> u32 {
        self.0.st_gid
    }

    pub fn mtime_ns(&self) -> i64 {
        timestamp_ns(self.0.st_mtime, self.0.st_mtime_nsec as i64)
    }

    /// The scan stamp of this state of the file, as the scanner records it.
    pub fn stamp(&self) -> ScanStamp {
        let stat = &self.0;
        ScanStamp {
            size: stat.st_size as u64,
            mtime_ns: self.mtime_ns(),
            ctime_ns: timestamp_ns(stat.st_ctime, stat.st_ctime_nsec as i64),
            ino: stat.st_ino,
            dev: stat.st_dev,
        }
    }
}

/// Opens `name` in `dir` for reading if, and only if, it is a regular file: never
/// following a symlink (`O_NOFOLLOW`), never waiting for a FIFO's writer or a device
/// (`O_NONBLOCK`, which regular files ignore), and checking what was opened. Anything
/// else is an error of kind [`io::ErrorKind::InvalidInput`]. Returns the file with
/// what that check found (the state a read that follows starts from).
pub fn open_regular(dir: &impl AsFd, name: &[u8]) -> io::Result<(File, FileStat)> {
    let fd = rustix::fs::openat(
        dir,
        std::ffi::OsStr::from_bytes(name),
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let stat = FileStat::of(&fd)?;
    if !stat.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} is not a regular file; not reading it",
                crate::pathname::escape(name)
            ),
        ));
    }
    Ok((File::from(fd), stat))
}

/// Creates (if needed) and opens Shoal's own directory `name` in `parent`, never through
/// a symlink: whatever else a local user put under that reserved name (a symlink to
/// another volume, a file) is removed and the directory made anew.
fn own_dir(parent: &OwnedFd, name: &str, shown_parent: &str) -> Result<OwnedFd, FsError> {
    let shown = format!("{shown_parent}/{name}");
    // Twice at most: once as found, once after removing what was planted there.
    for _ in 0..2 {
        match rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o700)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(io_err(&shown)(e)),
        }
        match rustix::fs::openat(parent, name, OPEN_DIR, Mode::empty()) {
            Ok(fd) => return Ok(fd),
            Err(rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR) => {
                tracing::warn!(
                    "{shown} is not a directory (a symlink or file put in place of Shoal's own directory): removing it without following it"
                );
                rustix::fs::unlinkat(parent, name, AtFlags::empty()).map_err(io_err(&shown))?;
            }
            Err(e) => return Err(io_err(&shown)(e)),
        }
    }
    Err(FsError::NotADirectory { path: shown })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    /// `openat2` and the walk it stands in for agree on every path a local user can
    /// plant: a symlink anywhere on the way (into the volume, out of it, as the last
    /// component), a file where a directory should be, a directory missing.
    #[test]
    fn opening_a_directory_in_one_call_follows_the_rules_of_the_walk() {
        let outside = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("a/b/c")).unwrap();
        std::fs::write(root.join("a/file"), b"x").unwrap();
        std::os::unix::fs::symlink(root.join("a/b"), root.join("a/inside")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("a/outside")).unwrap();
        std::os::unix::fs::symlink("b", root.join("a/relative")).unwrap();
        let root_fd =
            rustix::fs::open(root, OFlags::DIRECTORY | OFlags::RDONLY, Mode::empty()).unwrap();
        let inode = |fd: &OwnedFd| FileStat::of(fd).unwrap().dev_ino().1;
        let outcome = |result: Result<OwnedFd, FsError>| match result {
            Ok(fd) => Ok(inode(&fd)),
            Err(FsError::NotADirectory { .. }) => Err("not a directory".to_string()),
            Err(FsError::Io { source, .. }) => Err(format!("{:?}", source.kind())),
            Err(e) => Err(e.to_string()),
        };
        let expected_c = std::fs::metadata(root.join("a/b/c")).unwrap().ino();
        for path in [
            "a/b/c",
            "a",
            "a/inside",
            "a/inside/c",
            "a/outside",
            "a/relative/c",
            "a/file",
            "a/file/c",
            "a/missing",
            "a/missing/deeper",
        ] {
            let path = VolPath::parse(path.as_bytes()).unwrap();
            let one_call = outcome(open_dir_at(&root_fd, &path, false));
            let walked = outcome(open_dir_walking(&root_fd, &path, false));
            assert_eq!(one_call, walked, "{}", path.display());
        }
        assert_eq!(
            outcome(open_dir_at(
                &root_fd,
                &VolPath::parse(b"a/b/c").unwrap(),
                false
            )),
            Ok(expected_c)
        );
        for refused in ["a/inside", "a/outside/x", "a/file"] {
            let path = VolPath::parse(refused.as_bytes()).unwrap();
            assert!(
                matches!(
                    open_dir_at(&root_fd, &path, true),
                    Err(FsError::NotADirectory { .. })
                ),
                "{refused}"
            );
        }
        assert!(!outside.path().join("x").exists());
        // Missing directories are made by the walk, from the first one missing.
        let made = open_dir_at(&root_fd, &VolPath::parse(b"a/new/deeper").unwrap(), true).unwrap();
        assert_eq!(
            inode(&made),
            std::fs::metadata(root.join("a/new/deeper")).unwrap().ino()
        );
    }

    #[test]
    fn a_chunk_of_a_file_unchanged_since_indexing_is_read_on_its_stamp_and_hashed_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        let fs = VolumeFs::open(dir.path()).unwrap();
        std::fs::write(dir.path().join("file"), b"old content").unwrap();
        let root_fd = fs.open_dir(&VolPath::root(), false).unwrap();
        let indexed = fs.stat(&root_fd, b"file").unwrap().stamp();
        let extent = Extent { offset: 0, len: 3 };
        let read = |id: &ChunkId, indexed: Option<&ScanStamp>| {
            let mut out = b"before".to_vec();
            let intact = read_chunk_in(&root_fd, b"file", extent, id, indexed, &mut out);
            // Appended after what the buffer held, or nothing appended.
            let read = out.split_off(6);
            assert_eq!(out, b"before");
            intact.then_some(read)
        };
        let right = ChunkId::of(b"old");
        // An id the bytes do not hash to: only a read that trusts the stamp returns them.
        let other = ChunkId::of(b"something else");
        assert_eq!(read(&right, None).unwrap(), b"old");
        assert_eq!(read(&other, None), None);
        // Not a single name (the same bytes one directory down), or longer than any
        // chunk: not read at all.
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/file"), b"old content").unwrap();
        let mut out = Vec::new();
        assert!(!read_chunk_in(
            &root_fd,
            b"sub/file",
            extent,
            &right,
            None,
            &mut out
        ));
        let too_long = Extent {
            offset: 0,
            len: fastcdc::v2020::MAXIMUM_MAX + 1,
        };
        assert!(!read_chunk_in(
            &root_fd, b"file", too_long, &right, None, &mut out
        ));
        assert_eq!(read(&other, Some(&indexed)).unwrap(), b"old");
        // Written since: its stamp moved (its size too, so that no clock's granularity
        // can hide the write), so its bytes are hashed again, and refused.
        std::fs::write(dir.path().join("file"), b"new, longer content").unwrap();
        assert_eq!(read(&right, Some(&indexed)), None);
        assert_eq!(read(&other, Some(&indexed)), None);
        assert_eq!(read(&ChunkId::of(b"new"), Some(&indexed)).unwrap(), b"new");
    }

    #[test]
    fn open_regular_refuses_fifos_and_symlinks_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fd = rustix::fs::open(
            dir.path(),
            OFlags::DIRECTORY | OFlags::RDONLY,
            Mode::empty(),
        )
        .unwrap();
        std::fs::write(dir.path().join("file"), b"data").unwrap();
        std::os::unix::fs::symlink("file", dir.path().join("link")).unwrap();
        rustix::fs::mknodat(
            &fd,
            "fifo",
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        assert!(open_regular(&fd, b"file").is_ok());
        // Without O_NONBLOCK this open would wait forever for a writer.
        let fifo = open_regular(&fd, b"fifo").unwrap_err();
        assert_eq!(fifo.kind(), io::ErrorKind::InvalidInput);
        let link = open_regular(&fd, b"link").unwrap_err();
        assert_eq!(link.raw_os_error(), Some(libc::ELOOP));
        let kind = |name: &[u8]| lstat_at(&fd, name).unwrap().file_type();
        assert_eq!(kind(b"link"), rustix::fs::FileType::Symlink);
        assert_eq!(kind(b"fifo"), rustix::fs::FileType::Fifo);
    }

    /// An unnamed staging file shows nowhere until it is published: then under its name
    /// with all of its content, as a new name or over an existing one (not over a name
    /// taken where nothing was expected), and nothing is left in staging either way.
    /// (Where the file system cannot make one, the caller stages by name: nothing to
    /// check here then.)
    #[test]
    fn an_unnamed_staging_file_appears_whole_under_its_name_and_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let fs = VolumeFs::open(dir.path()).unwrap();
        let root_fd = fs.open_dir(&VolPath::root(), false).unwrap();
        let staging = dir.path().join(".shoal/staging");
        let listing = |path: &Path| -> Vec<String> {
            let mut names: Vec<String> = std::fs::read_dir(path)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        };
        std::fs::write(dir.path().join("old"), b"the version it replaces").unwrap();
        for (name, content) in [("new", &b"a new file"[..]), ("old", b"the new version")] {
            let Some(file) = fs.stage_unnamed(content.len() as u64).unwrap() else {
                return;
            };
            file.write_all_at(content, 0).unwrap();
            file.sync_all().unwrap();
            assert_eq!(listing(&staging), Vec::<String>::new());
            let visible = listing(dir.path());
            assert!(
                name == "old" || !visible.contains(&name.to_string()),
                "{visible:?}"
            );
            let expected = lstat_at(&root_fd, name.as_bytes()).ok().map(|s| s.stamp());
            let placed = fs.publish_unnamed(&file, &root_fd, name.as_bytes(), expected.as_ref());
            assert!(placed.unwrap());
            assert_eq!(std::fs::read(dir.path().join(name)).unwrap(), content);
            assert_eq!(listing(&staging), Vec::<String>::new());
        }
        assert_eq!(listing(dir.path()), vec![".shoal", "new", "old"]);

        // A name taken here where nothing was expected is left as it is.
        std::fs::write(dir.path().join("taken"), b"made here meanwhile").unwrap();
        let Some(file) = fs.stage_unnamed(4).unwrap() else {
            return;
        };
        file.write_all_at(b"sync", 0).unwrap();
        let placed = fs.publish_unnamed(&file, &root_fd, b"taken", None);
        assert!(!placed.unwrap());
        let kept = std::fs::read(dir.path().join("taken")).unwrap();
        assert_eq!(kept, b"made here meanwhile");
        assert_eq!(listing(&staging), Vec::<String>::new());
    }

    /// A file written after sync checked it is neither removed nor replaced: a delete
    /// puts it back (or beside, if a new file took its name), a replacement swaps it
    /// back; one as checked goes, and nothing is left in staging.
    #[test]
    fn a_file_written_after_its_check_is_neither_removed_nor_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let fs = VolumeFs::open(dir.path()).unwrap();
        let root_fd = fs.open_dir(&VolPath::root(), false).unwrap();
        let staging = dir.path().join(".shoal/staging");
        let at = |name: &str| dir.path().join(name);
        let stamp = |name: &str| lstat_at(&root_fd, name.as_bytes()).unwrap().stamp();
        let spare = |attempt: u32| format!("f.spare-{attempt}").into_bytes();
        let staging_is_empty = || std::fs::read_dir(&staging).unwrap().next().is_none();

        std::fs::write(at("f"), b"as checked").unwrap();
        let checked = stamp("f");
        let removal = fs.remove_file_as_checked(&root_fd, b"f", Some(&checked), spare);
        assert_eq!(removal.unwrap(), Removal::Removed);
        assert!(!at("f").exists() && staging_is_empty());
        let removal = fs.remove_file_as_checked(&root_fd, b"f", Some(&checked), spare);
        assert_eq!(removal.unwrap(), Removal::Removed, "a name already gone");

        std::fs::write(at("f"), b"as checked").unwrap();
        let checked = stamp("f");
        std::fs::write(at("f"), b"written after the check").unwrap();
        let removal = fs.remove_file_as_checked(&root_fd, b"f", Some(&checked), spare);
        assert_eq!(removal.unwrap(), Removal::PutBack);
        assert_eq!(std::fs::read(at("f")).unwrap(), b"written after the check");
        let removal = fs.remove_file_as_checked(&root_fd, b"f", None, spare);
        assert_eq!(
            removal.unwrap(),
            Removal::PutBack,
            "nothing was expected there"
        );
        assert!(staging_is_empty());

        let replaced_by = |content: &[u8], expected: Option<&ScanStamp>| {
            let id = ContentId(*blake3::hash(content).as_bytes());
            let staged = fs
                .stage(&id, &VolPath::root(), b"f", content.len() as u64)
                .unwrap();
            staged.file.write_all_at(content, 0).unwrap();
            let placed = fs.replace_as_checked(&staged.temp_name, &root_fd, b"f", expected);
            let _ = rustix::fs::unlinkat(&fs.staging, staged.temp_name.as_str(), AtFlags::empty());
            placed.unwrap()
        };
        let checked = stamp("f");
        std::fs::write(at("f"), b"written again after the check").unwrap();
        assert!(!replaced_by(b"the peer's version", Some(&checked)));
        assert_eq!(
            std::fs::read(at("f")).unwrap(),
            b"written again after the check"
        );
        let checked = stamp("f");
        assert!(replaced_by(b"the peer's version", Some(&checked)));
        assert_eq!(std::fs::read(at("f")).unwrap(), b"the peer's version");
        assert!(staging_is_empty());
        std::fs::remove_file(at("f")).unwrap();
        assert!(replaced_by(b"a new name", None));
        assert_eq!(std::fs::read(at("f")).unwrap(), b"a new name");
    }

    /// Issue 11, item 10: the file checked by `stage_by_move` is swapped for another
    /// (a regular file, a symlink, a FIFO) between the check and the rename; what moved
    /// is not the file checked, so it goes back under its name and nothing is staged.
    #[test]
    fn a_file_swapped_between_the_check_and_the_move_goes_back_and_is_not_staged() {
        let dir = tempfile::tempdir().unwrap();
        let fs = VolumeFs::open(dir.path()).unwrap();
        let root = VolPath::root();
        let root_fd = fs.open_dir(&root, false).unwrap();
        std::fs::write(dir.path().join("checked"), b"the file the index knows").unwrap();
        let checked = fs.stat(&root_fd, b"checked").unwrap().stamp();
        let name = std::ffi::OsStr::new("moved");
        for what in ["another file", "a symlink", "a FIFO"] {
            // What the race leaves under the name once the check has passed.
            let at = dir.path().join("moved");
            match what {
                "another file" => std::fs::write(&at, b"planted").unwrap(),
                "a symlink" => std::os::unix::fs::symlink("/etc/passwd", &at).unwrap(),
                _ => rustix::fs::mknodat(
                    rustix::fs::CWD,
                    &at,
                    rustix::fs::FileType::Fifo,
                    Mode::from_raw_mode(0o600),
                    0,
                )
                .unwrap(),
            }
            let before = std::fs::symlink_metadata(&at).unwrap();
            let staged = fs.move_into_staging(&root_fd, name, &checked, "swapped.part");
            assert!(
                staged.is_none(),
                "{what} was staged in place of the file checked"
            );
            let after = std::fs::symlink_metadata(&at).unwrap();
            assert_eq!(after.ino(), before.ino(), "{what} is back under its name");
            assert!(fs.staging_files().is_empty(), "{what} left in staging");
            std::fs::remove_file(&at).unwrap();
        }
        // The file checked itself moves.
        std::fs::rename(dir.path().join("checked"), dir.path().join("moved")).unwrap();
        let staged = fs.move_into_staging(&root_fd, name, &checked, "swapped.part");
        assert!(staged.is_some());
        assert_eq!(fs.staging_files(), vec!["swapped.part".to_string()]);
    }

    #[test]
    fn timestamps_past_2262_saturate() {
        assert_eq!(crate::entry::timestamp_ns(10_413_792_000, 5), i64::MAX);
        assert_eq!(crate::entry::timestamp_ns(1, 5), 1_000_000_005);
    }
}
