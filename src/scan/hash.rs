//! The hashing threads: each file read once, chunked with FastCDC and hashed with
//! BLAKE3, and read again if it changed while being read.
//!
//! Busy files (still changing when scanned, see [`crate::watcher`]) are read two other
//! ways. One that only grew since it was indexed has only its new part read: from the
//! start of its last indexed chunk, once that chunk is found unchanged. One rewritten in
//! place is copied whole into memory, twice compared and between two `fstat`s that
//! agree, so what is indexed is content the file held at one instant; the walker keeps
//! that copy's chunks in a busy pack ([`crate::store::Store::keep_busy_version`]).

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use crate::chunking::{ChunkParams, ChunkRef, ChunkedContent, Chunker, content_id};
use crate::ids::ChunkId;
use crate::pathname::VolPath;
use crate::volume_fs::{FileStat, open_regular};
use crate::xattrs::{Namespaces, XattrError, Xattrs};

/// Reads of a file that keeps changing before the scan leaves it for the next one.
const READ_ATTEMPTS: usize = 3;

/// The largest busy file copied into memory for a consistent version; larger ones are
/// left for when they settle.
pub const SNAPSHOT_MAX_BYTES: u64 = 128 << 20;

/// How long the scanner tries for a consistent copy of a busy file before it leaves
/// it for its next turn (a writer that rewrites it all the time leaves short gaps).
const SNAPSHOT_PATIENCE: std::time::Duration = std::time::Duration::from_secs(3);

pub(super) struct HashJob {
    pub(super) dir: VolPath,
    pub(super) name: Vec<u8>,
    /// `dir`, opened by the walker: the file is opened through it, never by path.
    pub(super) dir_fd: Arc<OwnedFd>,
    /// A busy file that only grew since it was indexed: its indexed chunk list, so that
    /// only what follows is read.
    pub(super) appended_to: Option<Vec<ChunkRef>>,
    /// A busy file small enough to copy into memory if it changes while read.
    pub(super) may_snapshot: bool,
}

pub(super) struct HashResult {
    pub(super) dir: VolPath,
    pub(super) name: Vec<u8>,
    pub(super) outcome: HashOutcome,
}

pub(super) enum HashOutcome {
    Hashed {
        content: ChunkedContent,
        meta: Box<FileStat>,
        /// Read through the same descriptor, after the content.
        xattrs: Result<Xattrs, XattrError>,
        read: Reading,
    },
    /// Gone, or no longer a regular file, when we came to read it.
    Vanished,
    /// Kept changing while being read.
    Unstable,
    Failed(io::Error),
}

/// How a file's content was read.
pub(super) enum Reading {
    /// Every byte (holes aside).
    Whole,
    /// Only what was appended since it was indexed: the chunks before it are taken as
    /// unchanged until the file settles and is read whole.
    Appended,
    /// Copied into memory, consistent, while the file kept changing: the copy's bytes,
    /// to keep in a busy pack.
    Snapshot(Snapshot),
}

/// A consistent copy of a busy file, holding its share of the [`SnapshotBudget`].
pub(super) struct Snapshot {
    pub(super) data: Vec<u8>,
    _permit: Permit,
}

/// Memory the copies of busy files may hold at once (across the hashing threads and
/// the results queued for the walker): invariant 6.
#[derive(Clone)]
pub(super) struct SnapshotBudget(Arc<Mutex<u64>>);

struct Permit {
    budget: SnapshotBudget,
    bytes: u64,
}

impl SnapshotBudget {
    pub(super) fn new() -> Self {
        SnapshotBudget(Arc::new(Mutex::new(SNAPSHOT_MAX_BYTES)))
    }

    fn take(&self, bytes: u64) -> Option<Permit> {
        let mut left = self.0.lock().expect("snapshot budget lock");
        (*left >= bytes).then(|| {
            *left -= bytes;
            Permit {
                budget: self.clone(),
                bytes,
            }
        })
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        *self.budget.0.lock().expect("snapshot budget lock") += self.bytes;
    }
}

/// A hashing thread's work: its own chunker, used for every file it is given.
pub(super) fn hasher(
    params: ChunkParams,
    namespaces: Namespaces,
    budget: SnapshotBudget,
) -> impl FnMut(HashJob) -> HashResult {
    let mut chunker = Chunker::new(params);
    move |job| HashResult {
        outcome: hash_file(&mut chunker, &job, namespaces, &budget),
        dir: job.dir,
        name: job.name,
    }
}

pub(super) fn hash_file(
    chunker: &mut Chunker,
    job: &HashJob,
    namespaces: Namespaces,
    budget: &SnapshotBudget,
) -> HashOutcome {
    for _ in 0..READ_ATTEMPTS {
        // Through the directory's descriptor, O_NOFOLLOW|O_NONBLOCK, a regular file or
        // nothing: a name swapped for a symlink, FIFO or device since the listing is not
        // followed, waited on or read.
        let (file, before) = match open_regular(&*job.dir_fd, &job.name) {
            Ok(opened) => opened,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::InvalidInput
                ) || e.raw_os_error() == Some(libc::ELOOP) =>
            {
                return HashOutcome::Vanished;
            }
            Err(e) => return HashOutcome::Failed(e),
        };
        if job.may_snapshot && job.appended_to.is_none() {
            // Rewritten in place a moment ago: a plain read would likely be torn.
            return snapshot(chunker, &file, namespaces, budget).unwrap_or(HashOutcome::Unstable);
        }
        // Asked as the file is read: a change stops the read at once.
        let stamp = before.stamp();
        let mut unchanged = || FileStat::of(&file).is_ok_and(|now| now.stamp() == stamp);
        let appended = match &job.appended_to {
            Some(previous) => {
                read_appended(chunker, &file, before.size(), previous, &mut unchanged)
            }
            None => Ok(None),
        };
        let read = match appended {
            Ok(Some(content)) => Ok(Some((content, Reading::Appended))),
            Ok(None) => chunker
                .chunk_file_from(&file, 0, &mut unchanged)
                .map(|whole| whole.map(|content| (content, Reading::Whole))),
            Err(e) => Err(e),
        };
        let (content, read) = match read {
            Ok(Some(read)) => read,
            Ok(None) if job.may_snapshot => {
                return snapshot(chunker, &file, namespaces, budget)
                    .unwrap_or(HashOutcome::Unstable);
            }
            Ok(None) => continue,
            Err(e) => return HashOutcome::Failed(e),
        };
        match FileStat::of(&file) {
            Ok(after) if after.stamp() == stamp && content.size == before.size() => {
                // A change of attributes moves the ctime: read before the check below,
                // they belong to the version just hashed.
                let xattrs = crate::xattrs::read(&file, namespaces);
                match FileStat::of(&file) {
                    Ok(last) if last.stamp() == stamp => {}
                    _ => continue,
                }
                return HashOutcome::Hashed {
                    content,
                    meta: Box::new(before),
                    xattrs,
                    read,
                };
            }
            Ok(_) if job.may_snapshot => {
                return snapshot(chunker, &file, namespaces, budget)
                    .unwrap_or(HashOutcome::Unstable);
            }
            Ok(_) => continue,
            Err(e) => return HashOutcome::Failed(e),
        }
    }
    HashOutcome::Unstable
}

/// The content of `file` (`size` bytes now) if it only grew since it was indexed as
/// `previous`: the indexed chunks but the last, then what FastCDC cuts from the last
/// one's start, which is read only after that chunk is found unchanged. `None` if the
/// file did not grow, or its last indexed chunk changed (it is then read whole).
fn read_appended(
    chunker: &mut Chunker,
    file: &File,
    size: u64,
    previous: &[ChunkRef],
    unchanged: &mut dyn FnMut() -> bool,
) -> io::Result<Option<ChunkedContent>> {
    let Some((last, kept)) = previous.split_last() else {
        return Ok(None);
    };
    let indexed: u64 = previous.iter().map(|c| u64::from(c.len)).sum();
    if size <= indexed {
        return Ok(None);
    }
    let start = indexed - u64::from(last.len);
    let mut bytes = vec![0u8; last.len as usize];
    file.read_exact_at(&mut bytes, start)?;
    if ChunkId::of(&bytes) != last.id {
        return Ok(None);
    }
    let Some(tail) = chunker.chunk_file_from(file, start, unchanged)? else {
        return Ok(None);
    };
    let chunks: Vec<ChunkRef> = kept.iter().chain(&tail.chunks).copied().collect();
    Ok(Some(ChunkedContent {
        content_id: content_id(&chunks),
        size: start + tail.size,
        chunks,
    }))
}

/// A consistent copy of `file`, which keeps changing: read whole into memory, read
/// again and compared, with the same `fstat` stamp before, between and after (a write
/// in between moves the ctime: the kernel gives a changed file a finer timestamp once
/// its old one was looked at), tried for [`SNAPSHOT_PATIENCE`]. `None` if the file is
/// larger than a copy may be, the budget is spent, or no try was consistent.
fn snapshot(
    chunker: &mut Chunker,
    file: &File,
    namespaces: Namespaces,
    budget: &SnapshotBudget,
) -> Option<HashOutcome> {
    let started = std::time::Instant::now();
    let mut data = Vec::new();
    let mut permit: Option<Permit> = None;
    for attempt in 0u64.. {
        if started.elapsed() > SNAPSHOT_PATIENCE {
            return None;
        }
        if attempt > 0 {
            // Out of step with a writer that rewrites on a fixed period.
            std::thread::sleep(std::time::Duration::from_millis(2 + (attempt * 7919) % 23));
        }
        let before = FileStat::of(file).ok()?;
        if before.size() > SNAPSHOT_MAX_BYTES {
            return None;
        }
        if permit.as_ref().is_none_or(|p| p.bytes != before.size()) {
            // The old share goes back before a new one is asked for.
            drop(permit.take());
            permit = Some(budget.take(before.size())?);
        }
        data.resize(before.size() as usize, 0);
        if file.read_exact_at(&mut data, 0).is_err() {
            continue;
        }
        let between = FileStat::of(file).ok()?;
        if between.stamp() != before.stamp() || !still_holds(file, &data) {
            continue;
        }
        let xattrs = crate::xattrs::read(file, namespaces);
        let after = FileStat::of(file).ok()?;
        if after.stamp() != before.stamp() {
            continue;
        }
        let content = chunker.chunk_reader(&data[..]).ok()?;
        return Some(HashOutcome::Hashed {
            content,
            meta: Box::new(before),
            xattrs,
            read: Reading::Snapshot(Snapshot {
                data,
                _permit: permit?,
            }),
        });
    }
    None
}

/// Whether `file` still holds exactly `data`, read again where a write cannot be half
/// done: a copy made while a write was under way differs from the one after it, but a
/// writer that the scheduler stopped inside one `write()` leaves both reads of the page
/// cache the same half-written bytes (and its timestamps already moved). A direct read
/// (`O_DIRECT`) takes the inode lock that a write holds for its whole call on ext4 and
/// XFS; where the file system has no direct I/O, a second buffered read is what there is
/// (tmpfs's direct reads are buffered ones: the window stays open there).
fn still_holds(file: &File, data: &[u8]) -> bool {
    direct_read_matches(file, data).unwrap_or_else(|| same_bytes(file, data))
}

/// Direct I/O's alignment of buffer, offset and length (the logical block size is at most
/// this on the file systems Shoal runs on).
const DIRECT_ALIGN: usize = 4096;

/// Whether `file` holds exactly `data`, read with direct I/O through a second descriptor
/// of the same inode; `None` if that is not possible here (no direct I/O on this file
/// system, no `/proc`).
fn direct_read_matches(file: &File, data: &[u8]) -> Option<bool> {
    use rustix::fs::{Mode, OFlags};
    use std::os::fd::AsRawFd;
    // The same open file, not a path: `/proc/self/fd/N` reopens the inode `file` holds.
    let own = format!("/proc/self/fd/{}", file.as_raw_fd());
    let flags = OFlags::RDONLY | OFlags::DIRECT | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let direct = File::from(rustix::fs::open(own.as_str(), flags, Mode::empty()).ok()?);
    let (ours, theirs) = (FileStat::of(&direct).ok()?, FileStat::of(file).ok()?);
    if ours.dev_ino() != theirs.dev_ino() {
        return None;
    }
    // One byte past `data` (rounded to the alignment) shows whether the file grew.
    let want = (data.len() + 1).div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
    let mut buffer = vec![0u8; want + DIRECT_ALIGN];
    let start = buffer.as_ptr().align_offset(DIRECT_ALIGN);
    let aligned = &mut buffer[start..start + want];
    let mut filled = 0;
    loop {
        match direct.read_at(&mut aligned[filled..], filled as u64) {
            Ok(0) => break,
            Ok(n) => {
                filled += n;
                // Short of a block: the end of the file.
                if filled % DIRECT_ALIGN != 0 || filled >= want {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                return None;
            }
            Err(_) => return Some(false),
        }
    }
    Some(filled == data.len() && aligned[..filled] == *data)
}

/// Whether `file` still holds exactly `data` (read again block by block).
fn same_bytes(file: &File, data: &[u8]) -> bool {
    const BLOCK: usize = 1 << 20;
    let mut block = vec![0u8; BLOCK];
    let mut offset = 0;
    while offset < data.len() {
        let len = BLOCK.min(data.len() - offset);
        if file
            .read_exact_at(&mut block[..len], offset as u64)
            .is_err()
            || block[..len] != data[offset..offset + len]
        {
            return false;
        }
        offset += len;
    }
    // Not longer than it was, either.
    file.read_at(&mut block[..1], data.len() as u64)
        .is_ok_and(|n| n == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_holding(dir: &std::path::Path, data: &[u8]) -> File {
        let path = dir.join("busy");
        File::create(&path).unwrap().write_all(data).unwrap();
        File::open(&path).unwrap()
    }

    #[test]
    fn a_direct_read_tells_the_same_bytes_from_others_and_from_a_grown_file() {
        // /tmp is on the root file system here (ext4), which has direct I/O.
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..10_000u32).flat_map(|i| i.to_le_bytes()).collect();
        let file = file_holding(dir.path(), &data);
        if direct_read_matches(&file, &data).is_none() {
            eprintln!("no direct I/O on {}: nothing to test", dir.path().display());
            return;
        }
        assert_eq!(direct_read_matches(&file, &data), Some(true));
        let mut other = data.clone();
        other[39_999] ^= 1;
        assert_eq!(direct_read_matches(&file, &other), Some(false));
        // The file holds more than the copy: not the same.
        assert_eq!(direct_read_matches(&file, &data[..4096]), Some(false));
        assert_eq!(direct_read_matches(&file, &data[..100]), Some(false));
        assert!(still_holds(&file, &data) && !still_holds(&file, &other));
    }

    #[test]
    fn on_tmpfs_the_copy_is_checked_too() {
        // Direct I/O there is the page cache itself (or refused, on older kernels): either
        // way the check tells the same bytes from others.
        let Ok(dir) = tempfile::tempdir_in("/dev/shm") else {
            return;
        };
        let data = vec![7u8; 5000];
        let file = file_holding(dir.path(), &data);
        assert!(still_holds(&file, &data));
        assert!(!still_holds(&file, &data[..4999]));
        let mut other = data.clone();
        other[4321] = 8;
        assert!(!still_holds(&file, &other));
    }
}
