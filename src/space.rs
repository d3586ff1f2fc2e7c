//! Disk space as a state of its own: how much room a file system has, and the reserve
//! Shoal keeps in its state directory.
//!
//! The index (RocksDB) must never meet a full disk: the system `librocksdb` keeps its
//! assertions, and a failed write or sync there aborts the whole process (seen as
//! `Assertion 'sync_without_flush_called_' failed` with a state directory on a 16 MiB file
//! system). So the store checks the room left before it opens for writing
//! ([`STATE_OPEN_RESERVE`]) and before every write ([`STATE_WRITE_RESERVE`]), and refuses
//! with [`LowSpace`] instead: RocksDB's own writes (its log, flushes, compactions) then
//! always have the reserve to work in. Once there is room again, the same store opens
//! and writes normally; nothing was lost, only postponed.
//!
//! Volumes fill up too; how sync behaves on a full volume is the pull's business
//! (`sync::pull`), which measures the room with [`available`] as well.

use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

/// Room the state directory's file system must have for the store to open for writing:
/// RocksDB preallocates its write-ahead log (about 1.1 times a column family's write
/// buffer) and needs room for a flush and a compaction.
pub const STATE_OPEN_RESERVE: u64 = 64 << 20;

/// Room below which the store refuses writes (what RocksDB's background work may still
/// need: a log file, a flush of the memtables).
pub const STATE_WRITE_RESERVE: u64 = 48 << 20;

/// Bytes available to an unprivileged writer on the file system holding `path`.
pub fn available(path: &Path) -> io::Result<u64> {
    let stat = rustix::fs::statvfs(path)?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// The size of the file system holding `path`, in bytes.
pub fn total(path: &Path) -> io::Result<u64> {
    let stat = rustix::fs::statvfs(path)?;
    Ok(stat.f_blocks.saturating_mul(stat.f_frsize))
}

/// Bytes available on the file system of an open file or directory.
pub fn available_at(fd: impl AsFd) -> io::Result<u64> {
    let stat = rustix::fs::fstatvfs(fd)?;
    // A file system that reports no size at all (ramfs, some FUSE mounts) cannot say
    // how full it is: taken to have room, as when it cannot be asked.
    if stat.f_blocks == 0 {
        return Ok(u64::MAX);
    }
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// Too little room on the file system of `dir` for what was about to happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{}: only {} free on its file system; Shoal keeps at least {} free there so that its index never meets a full disk. Free some space (or give the state directory a larger file system): the store opens and writes normally once there is room",
    dir.display(), Size(*available), Size(*needed)
)]
pub struct LowSpace {
    pub dir: PathBuf,
    pub available: u64,
    pub needed: u64,
}

impl LowSpace {
    /// The shortage this refusal reports.
    pub fn shortage(&self) -> Shortage {
        Shortage {
            needed_bytes: self.needed,
            available_bytes: self.available,
            waiting_files: 0,
        }
    }

    /// The [`LowSpace`] somewhere in `error`'s chain of causes, if any.
    pub fn in_chain<'e>(error: &'e (dyn std::error::Error + 'static)) -> Option<&'e LowSpace> {
        let mut next = Some(error);
        while let Some(e) = next {
            if let Some(low) = e.downcast_ref::<LowSpace>() {
                return Some(low);
            }
            next = e.source();
        }
        None
    }
}

/// Checks that the file system of `dir` has at least `needed` bytes available.
pub fn ensure_room(dir: &Path, needed: u64) -> Result<(), LowSpaceOrIo> {
    let available = available(dir).map_err(|source| LowSpaceOrIo::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    if available < needed {
        return Err(LowSpaceOrIo::LowSpace(LowSpace {
            dir: dir.to_path_buf(),
            available,
            needed,
        }));
    }
    Ok(())
}

/// [`ensure_room`]'s failure: too little room, or the room could not be measured.
#[derive(Debug, thiserror::Error)]
pub enum LowSpaceOrIo {
    #[error(transparent)]
    LowSpace(LowSpace),
    #[error("{}: cannot measure free space: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
}

/// A file system found too full for what Shoal had to write there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Shortage {
    /// Bytes that wait for room (the files not fetched, or the reserve the store keeps).
    pub needed_bytes: u64,
    /// Bytes free on the file system when it was last measured.
    pub available_bytes: u64,
    /// Files whose fetch waits for room (0 for the state directory).
    pub waiting_files: u64,
}

/// Whether a file system is short of room, remembered so that the log says so once on
/// the way in and once on the way out (not on every retry), and `/status` and
/// `/metrics` can show it.
#[derive(Default)]
pub struct ShortageState(std::sync::Mutex<Option<Shortage>>);

impl ShortageState {
    pub fn get(&self) -> Option<Shortage> {
        *self.0.lock().expect("shortage lock")
    }

    /// Records the current state of `what` (a volume, the state directory); logs only
    /// when it changes between short and not.
    pub fn set(&self, what: &str, now: Option<Shortage>) {
        let before = std::mem::replace(&mut *self.0.lock().expect("shortage lock"), now);
        match (before, now) {
            (None, Some(s)) if s.waiting_files > 0 => tracing::warn!(
                "{what}: no space left: {} file(s) ({}) wait for room, {} free; fetching resumes by itself once there is room",
                s.waiting_files,
                Size(s.needed_bytes),
                Size(s.available_bytes)
            ),
            (None, Some(s)) => tracing::warn!(
                "{what}: no space left: {} free, {} needed; writes resume by themselves once there is room",
                Size(s.available_bytes),
                Size(s.needed_bytes)
            ),
            (Some(_), None) => tracing::info!("{what}: there is room again; resuming"),
            _ => {}
        }
    }
}

/// A byte count for people: `512 B`, `3.0 KiB`, `80.0 MiB`, `1.5 GiB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl std::fmt::Display for Size {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
        if self.0 < 1024 {
            return write!(f, "{} B", self.0);
        }
        let mut value = self.0 as f64 / 1024.0;
        let mut unit = 0;
        while value >= 1024.0 && unit + 1 < UNITS.len() {
            value /= 1024.0;
            unit += 1;
        }
        write!(f, "{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(Size(512).to_string(), "512 B");
        assert_eq!(Size(3 << 10).to_string(), "3.0 KiB");
        assert_eq!(Size(80 << 20).to_string(), "80.0 MiB");
        assert_eq!(Size(3 << 29).to_string(), "1.5 GiB");
    }

    #[test]
    fn room_is_measured_and_a_shortfall_names_the_directory_and_the_amounts() {
        let dir = tempfile::tempdir().unwrap();
        assert!(available(dir.path()).unwrap() > 0);
        assert!(ensure_room(dir.path(), 0).is_ok());
        match ensure_room(dir.path(), u64::MAX) {
            Err(LowSpaceOrIo::LowSpace(low)) => {
                assert_eq!(low.dir, dir.path());
                assert_eq!(low.needed, u64::MAX);
                assert!(low.to_string().contains("free on its file system"));
            }
            other => panic!("expected a shortfall, got {other:?}"),
        }
    }
}
