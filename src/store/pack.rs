//! Pack files: append-only containers for chunks that are in no live file (content of
//! deleted or overwritten versions, chunks received for a file still being assembled).
//!
//! A pack describes itself: a header, then records that each carry their chunk id and
//! length before the bytes, so the index can be rebuilt by reading packs alone and a
//! torn tail (a crash mid-append) is recognised and cut off. The byte layout is in
//! `schema/store.md`, "Pack files".

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use fastcdc::v2020::MAXIMUM_MAX;

use crate::ids::{ChunkId, HASH_LEN};
use crate::store::codec::Extent;

pub const PACK_MAGIC: &[u8; 8] = b"SHOALPAK";
pub const PACK_FORMAT: u32 = 1;
pub const HEADER_LEN: u64 = 16;
pub const RECORD_MAGIC: &[u8; 4] = b"SCHK";
pub const RECORD_HEADER_LEN: u64 = 4 + 4 + HASH_LEN as u64;

#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} is not a Shoal pack file (bad header)")]
    NotAPack { path: PathBuf },
    #[error("{path} has pack format {found}; this version reads format {PACK_FORMAT}")]
    Format { path: PathBuf, found: u32 },
    #[error("{path}: chunk at offset {offset} does not match its id {expected}")]
    Mismatch {
        path: PathBuf,
        offset: u64,
        expected: ChunkId,
    },
}

/// The file name of pack `id` inside the packs directory.
pub fn pack_file_name(id: u64) -> String {
    format!("{id:016x}.pack")
}

/// The pack number a pack file's name gives (`NNNNNNNNNNNNNNNN.pack`, see
/// [`pack_file_name`]).
pub fn pack_number(path: &Path) -> Option<u64> {
    let stem = path.file_stem()?.to_str()?;
    (stem.len() == 16 && path.extension()? == "pack")
        .then(|| u64::from_str_radix(stem, 16).ok())
        .flatten()
}

/// One record found by [`PackScanner`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackRecord {
    pub id: ChunkId,
    /// Where the chunk's bytes start and how long they are.
    pub extent: Extent,
    /// Whether the bytes hash to the id.
    pub intact: bool,
}

/// How a sequential read of a pack ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PackEnd {
    /// Every byte belongs to a complete record.
    Clean { len: u64 },
    /// The file ends inside a record, or with bytes that are no record: everything from
    /// `valid_len` on is a torn or damaged tail.
    Torn { valid_len: u64, file_len: u64 },
}

/// Reads a pack's records in order, hashing each chunk.
pub struct PackScanner {
    path: PathBuf,
    reader: BufReader<File>,
    offset: u64,
    file_len: u64,
    data: Vec<u8>,
    end: Option<PackEnd>,
}

impl PackScanner {
    pub fn open(path: &Path) -> Result<Self, PackError> {
        let io_err = |source| PackError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io_err)?;
        let file_len = file.metadata().map_err(io_err)?.len();
        let mut reader = BufReader::with_capacity(1 << 20, file);
        check_header(&mut reader, path)?;
        Ok(Self {
            path: path.to_path_buf(),
            reader,
            offset: HEADER_LEN,
            file_len,
            data: Vec::new(),
            end: None,
        })
    }

    /// The next record, or `None` at the end (then [`PackScanner::end`] says how it ended).
    pub fn next_record(&mut self) -> Result<Option<PackRecord>, PackError> {
        if self.end.is_some() {
            return Ok(None);
        }
        let remaining = self.file_len - self.offset;
        if remaining == 0 {
            self.end = Some(PackEnd::Clean { len: self.offset });
            return Ok(None);
        }
        let torn = |this: &mut Self| {
            this.end = Some(PackEnd::Torn {
                valid_len: this.offset,
                file_len: this.file_len,
            });
            Ok(None)
        };
        if remaining < RECORD_HEADER_LEN {
            return torn(self);
        }
        let mut header = [0u8; RECORD_HEADER_LEN as usize];
        self.reader
            .read_exact(&mut header)
            .map_err(|source| PackError::Io {
                path: self.path.clone(),
                source,
            })?;
        let Some((id, len)) = parse_record_header(&header, remaining) else {
            return torn(self);
        };
        self.data.resize(len as usize, 0);
        self.reader
            .read_exact(&mut self.data)
            .map_err(|source| PackError::Io {
                path: self.path.clone(),
                source,
            })?;
        let record = PackRecord {
            id,
            extent: Extent {
                offset: self.offset + RECORD_HEADER_LEN,
                len,
            },
            intact: ChunkId::of(&self.data) == id,
        };
        self.offset += RECORD_HEADER_LEN + u64::from(len);
        Ok(Some(record))
    }

    pub fn end(&self) -> Option<&PackEnd> {
        self.end.as_ref()
    }
}

/// A record header's chunk id and length, if it is one whose record fits in the
/// `remaining` bytes of the file (from the header on); `None` ends a pack's valid part.
fn parse_record_header(
    header: &[u8; RECORD_HEADER_LEN as usize],
    remaining: u64,
) -> Option<(ChunkId, u32)> {
    let len = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
    if &header[..4] != RECORD_MAGIC
        || len > MAXIMUM_MAX
        || u64::from(len) > remaining - RECORD_HEADER_LEN
    {
        return None;
    }
    Some((ChunkId(header[8..].try_into().expect("32 bytes")), len))
}

/// The chunk ids of a pack's records, in order, from their headers alone (the chunks'
/// bytes are skipped, not read or hashed): up to where [`PackScanner`] would find the
/// valid part's end.
pub fn record_ids(path: &Path) -> Result<Vec<ChunkId>, PackError> {
    let io_err = |source| PackError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io_err)?;
    let file_len = file.metadata().map_err(io_err)?.len();
    let mut reader = BufReader::with_capacity(64 << 10, file);
    check_header(&mut reader, path)?;
    let mut offset = HEADER_LEN;
    let mut ids = Vec::new();
    let mut header = [0u8; RECORD_HEADER_LEN as usize];
    while file_len - offset >= RECORD_HEADER_LEN {
        reader.read_exact(&mut header).map_err(io_err)?;
        let Some((id, len)) = parse_record_header(&header, file_len - offset) else {
            break;
        };
        reader.seek_relative(i64::from(len)).map_err(io_err)?;
        ids.push(id);
        offset += RECORD_HEADER_LEN + u64::from(len);
    }
    Ok(ids)
}

fn check_header(reader: &mut impl Read, path: &Path) -> Result<(), PackError> {
    let mut header = [0u8; HEADER_LEN as usize];
    if reader.read_exact(&mut header).is_err() || &header[..8] != PACK_MAGIC {
        return Err(PackError::NotAPack {
            path: path.to_path_buf(),
        });
    }
    let found = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
    if found != PACK_FORMAT {
        return Err(PackError::Format {
            path: path.to_path_buf(),
            found,
        });
    }
    Ok(())
}

/// Appends chunks to one pack file.
pub struct PackWriter {
    path: PathBuf,
    file: File,
    len: u64,
}

impl PackWriter {
    /// Opens a pack for appending, creating it if needed. A torn tail left by a crash
    /// is cut off first, so the pack is again a sequence of whole records.
    pub fn open(path: &Path) -> Result<Self, PackError> {
        let io_err = |source| PackError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io_err)?;
        let mut len = file.metadata().map_err(io_err)?.len();
        if len == 0 {
            let mut header = [0u8; HEADER_LEN as usize];
            header[..8].copy_from_slice(PACK_MAGIC);
            header[8..12].copy_from_slice(&PACK_FORMAT.to_le_bytes());
            file.write_all(&header).map_err(io_err)?;
            len = HEADER_LEN;
        } else {
            let mut scanner = PackScanner::open(path)?;
            while scanner.next_record()?.is_some() {}
            if let Some(PackEnd::Torn { valid_len, .. }) = scanner.end() {
                file.set_len(*valid_len).map_err(io_err)?;
                len = *valid_len;
            }
        }
        file.seek(SeekFrom::Start(len)).map_err(io_err)?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            len,
        })
    }

    /// Appends one chunk and returns where its bytes are. Not durable until [`sync`].
    ///
    /// [`sync`]: PackWriter::sync
    pub fn append(&mut self, id: &ChunkId, data: &[u8]) -> Result<Extent, PackError> {
        let len = u32::try_from(data.len()).ok().filter(|&l| l <= MAXIMUM_MAX);
        let Some(len) = len else {
            return Err(PackError::Io {
                path: self.path.clone(),
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "chunk larger than the largest chunk size",
                ),
            });
        };
        let mut record = Vec::with_capacity(RECORD_HEADER_LEN as usize + data.len());
        record.extend_from_slice(RECORD_MAGIC);
        record.extend_from_slice(&len.to_le_bytes());
        record.extend_from_slice(id.as_bytes());
        record.extend_from_slice(data);
        self.file
            .write_all(&record)
            .map_err(|source| PackError::Io {
                path: self.path.clone(),
                source,
            })?;
        let extent = Extent {
            offset: self.len + RECORD_HEADER_LEN,
            len,
        };
        self.len += record.len() as u64;
        Ok(extent)
    }

    pub fn sync(&self) -> Result<(), PackError> {
        self.file.sync_data().map_err(|source| PackError::Io {
            path: self.path.clone(),
            source,
        })
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == HEADER_LEN
    }
}

/// Reads one chunk from a pack and checks it against its id.
pub fn read_chunk(path: &Path, extent: Extent, expected: &ChunkId) -> Result<Vec<u8>, PackError> {
    let io_err = |source| PackError::Io {
        path: path.to_path_buf(),
        source,
    };
    // A location longer than any chunk is damage: nothing is allocated for it.
    if extent.len > fastcdc::v2020::MAXIMUM_MAX {
        return Err(PackError::Mismatch {
            path: path.to_path_buf(),
            offset: extent.offset,
            expected: *expected,
        });
    }
    let file = File::open(path).map_err(io_err)?;
    let mut data = vec![0u8; extent.len as usize];
    file.read_exact_at(&mut data, extent.offset)
        .map_err(io_err)?;
    if ChunkId::of(&data) != *expected {
        return Err(PackError::Mismatch {
            path: path.to_path_buf(),
            offset: extent.offset,
            expected: *expected,
        });
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(path: &Path) -> (Vec<PackRecord>, PackEnd) {
        let mut scanner = PackScanner::open(path).unwrap();
        let mut out = Vec::new();
        while let Some(record) = scanner.next_record().unwrap() {
            out.push(record);
        }
        (out, scanner.end().unwrap().clone())
    }

    #[test]
    fn appended_chunks_read_back_and_describe_themselves() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(pack_file_name(1));
        let mut writer = PackWriter::open(&path).unwrap();
        let a = writer.append(&ChunkId::of(b"alpha"), b"alpha").unwrap();
        let b = writer.append(&ChunkId::of(b"beta!"), b"beta!").unwrap();
        writer.sync().unwrap();
        assert_eq!(
            read_chunk(&path, a, &ChunkId::of(b"alpha")).unwrap(),
            b"alpha"
        );
        assert_eq!(
            read_chunk(&path, b, &ChunkId::of(b"beta!")).unwrap(),
            b"beta!"
        );
        assert!(matches!(
            read_chunk(&path, b, &ChunkId::of(b"alpha")),
            Err(PackError::Mismatch { .. })
        ));
        let (found, end) = records(&path);
        assert_eq!(
            found
                .iter()
                .map(|r| (r.id, r.extent, r.intact))
                .collect::<Vec<_>>(),
            vec![
                (ChunkId::of(b"alpha"), a, true),
                (ChunkId::of(b"beta!"), b, true)
            ]
        );
        assert_eq!(end, PackEnd::Clean { len: writer.len() });
        assert_eq!(
            record_ids(&path).unwrap(),
            [ChunkId::of(b"alpha"), ChunkId::of(b"beta!")]
        );
    }

    #[test]
    fn torn_tail_is_found_and_cut_on_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(pack_file_name(2));
        let mut writer = PackWriter::open(&path).unwrap();
        writer.append(&ChunkId::of(b"kept"), b"kept").unwrap();
        let good_len = writer.len();
        writer
            .append(&ChunkId::of(b"lost in a crash"), b"lost in a crash")
            .unwrap();
        drop(writer);
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(good_len + 10).unwrap();
        let (found, end) = records(&path);
        assert_eq!(found.len(), 1);
        assert_eq!(record_ids(&path).unwrap(), [ChunkId::of(b"kept")]);
        assert_eq!(
            end,
            PackEnd::Torn {
                valid_len: good_len,
                file_len: good_len + 10
            }
        );
        let mut writer = PackWriter::open(&path).unwrap();
        assert_eq!(writer.len(), good_len);
        writer.append(&ChunkId::of(b"next"), b"next").unwrap();
        assert_eq!(records(&path).0.len(), 2);
    }

    #[test]
    fn flipped_bytes_and_foreign_files_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(pack_file_name(3));
        let mut writer = PackWriter::open(&path).unwrap();
        let extent = writer.append(&ChunkId::of(b"payload"), b"payload").unwrap();
        drop(writer);
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(b"X", extent.offset + 2).unwrap();
        let (found, _) = records(&path);
        assert!(!found[0].intact);
        let other = dir.path().join("not-a-pack");
        std::fs::write(&other, b"hello").unwrap();
        assert!(matches!(
            PackScanner::open(&other),
            Err(PackError::NotAPack { .. })
        ));
    }
}
