//! The hashing threads: each file read once, chunked with FastCDC and hashed with
//! BLAKE3, and read again if it changed while being read.

use std::fs::Metadata;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use super::stamp_of;
use crate::chunking::{ChunkParams, ChunkedContent, Chunker};
use crate::pathname::VolPath;
use crate::volume_fs::open_regular;
use crate::xattrs::{Namespaces, XattrError, Xattrs};

/// Reads of a file that keeps changing before the scan leaves it for the next one.
const READ_ATTEMPTS: usize = 3;

pub(super) struct HashJob {
    pub(super) dir: VolPath,
    pub(super) name: Vec<u8>,
    /// `dir`, opened by the walker: the file is opened through it, never by path.
    pub(super) dir_fd: Arc<OwnedFd>,
}

pub(super) struct HashResult {
    pub(super) dir: VolPath,
    pub(super) name: Vec<u8>,
    pub(super) outcome: HashOutcome,
}

pub(super) enum HashOutcome {
    Hashed {
        content: ChunkedContent,
        meta: Box<Metadata>,
        /// Read through the same descriptor, after the content.
        xattrs: Result<Xattrs, XattrError>,
    },
    /// Gone, or no longer a regular file, when we came to read it.
    Vanished,
    /// Kept changing while being read.
    Unstable,
    Failed(io::Error),
}

/// A hashing thread's work: its own chunker, used for every file it is given.
pub(super) fn hasher(
    params: ChunkParams,
    namespaces: Namespaces,
) -> impl FnMut(HashJob) -> HashResult {
    let mut chunker = Chunker::new(params);
    move |job| HashResult {
        outcome: hash_file(&mut chunker, &job.dir_fd, &job.name, namespaces),
        dir: job.dir,
        name: job.name,
    }
}

pub(super) fn hash_file(
    chunker: &mut Chunker,
    dir: &OwnedFd,
    name: &[u8],
    namespaces: Namespaces,
) -> HashOutcome {
    for _ in 0..READ_ATTEMPTS {
        // Through the directory's descriptor, O_NOFOLLOW|O_NONBLOCK, a regular file or
        // nothing: a name swapped for a symlink, FIFO or device since the listing is not
        // followed, waited on or read.
        let file = match open_regular(dir, name) {
            Ok(file) => file,
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
        let before = match file.metadata() {
            Ok(meta) if meta.is_file() => meta,
            Ok(_) => return HashOutcome::Vanished,
            Err(e) => return HashOutcome::Failed(e),
        };
        let content = match chunker.chunk_file(&file) {
            Ok(content) => content,
            Err(e) => return HashOutcome::Failed(e),
        };
        match file.metadata() {
            Ok(after) if stamp_of(&after) == stamp_of(&before) && content.size == before.len() => {
                // A change of attributes moves the ctime: read before the check below,
                // they belong to the version just hashed.
                let xattrs = crate::xattrs::read(&file, namespaces);
                match file.metadata() {
                    Ok(last) if stamp_of(&last) == stamp_of(&before) => {}
                    _ => continue,
                }
                return HashOutcome::Hashed {
                    content,
                    meta: Box::new(before),
                    xattrs,
                };
            }
            Ok(_) => continue,
            Err(e) => return HashOutcome::Failed(e),
        }
    }
    HashOutcome::Unstable
}
