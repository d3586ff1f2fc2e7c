//! Content-defined chunking: FastCDC (2020) cut points, BLAKE3 chunk ids, and the
//! content id of a file.
//!
//! [`Chunker`] streams a reader through a fixed buffer, so a file of any size is chunked
//! in constant memory, and gives exactly the cut points FastCDC would give on the whole
//! file at once: a cut is only taken where at least `max` bytes (or the end of the file)
//! follow the chunk's start, which is all FastCDC ever looks at. The cut points come
//! from [`CutSearch`] (`chunking/gear.rs`): the `fastcdc` crate's, found faster.
//!
//! ```
//! use shoal::chunking::{ChunkParams, Chunker};
//! let mut chunker = Chunker::new(ChunkParams::DEFAULT);
//! let content = chunker.chunk_reader(&b"hello"[..]).unwrap();
//! assert_eq!(content.chunks.len(), 1); // smaller than the minimum: one chunk
//! assert_eq!(content.size, 5);
//! ```

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::sync::OnceLock;

use fastcdc::v2020;

use crate::ids::{ChunkId, ContentId};

mod gear;

pub use gear::CutSearch;

/// The BLAKE3 `derive_key` context of content ids (see `schema/store.md`).
const CONTENT_ID_CONTEXT: &str = "shoal 2026-11 content id v1";

/// FastCDC's normalization level: level 1 keeps chunk sizes near the average without
/// hurting dedup (the FastCDC paper's recommendation).
const NORMALIZATION_BITS: u32 = 1;

/// Min/avg/max chunk sizes in bytes. Fixed per cluster and recorded in the store: nodes
/// with other parameters would cut the same data differently and share no chunks.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ChunkParams {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

impl ChunkParams {
    /// 16 KiB / 64 KiB / 256 KiB, chosen by measurement: see `docs/BENCHMARKS.md`,
    /// "Choosing the chunk sizes".
    pub const DEFAULT: ChunkParams = ChunkParams {
        min: 16 * 1024,
        avg: 64 * 1024,
        max: 256 * 1024,
    };

    /// Validates the sizes against what FastCDC supports.
    pub fn new(min: u32, avg: u32, max: u32) -> Result<Self, InvalidChunkParams> {
        let err = |reason: String| {
            Err(InvalidChunkParams {
                min,
                avg,
                max,
                reason,
            })
        };
        if !(v2020::MINIMUM_MIN..=v2020::MINIMUM_MAX).contains(&min) {
            return err(format!(
                "the minimum must be between {} and {} bytes",
                v2020::MINIMUM_MIN,
                v2020::MINIMUM_MAX
            ));
        }
        if !(v2020::AVERAGE_MIN..=v2020::AVERAGE_MAX).contains(&avg) || !avg.is_power_of_two() {
            return err(format!(
                "the average must be a power of two between {} and {} bytes",
                v2020::AVERAGE_MIN,
                v2020::AVERAGE_MAX
            ));
        }
        if !(v2020::MAXIMUM_MIN..=v2020::MAXIMUM_MAX).contains(&max) {
            return err(format!(
                "the maximum must be between {} and {} bytes",
                v2020::MAXIMUM_MIN,
                v2020::MAXIMUM_MAX
            ));
        }
        if !(min < avg && avg < max) {
            return err("sizes must satisfy min < avg < max".into());
        }
        Ok(Self { min, avg, max })
    }

    /// Parses `MIN/AVG/MAX`, each a number of bytes with an optional `K` or `M` suffix
    /// (powers of 1024), e.g. `16K/64K/256K`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let sizes: Vec<&str> = text.split('/').collect();
        let [min, avg, max] = sizes.as_slice() else {
            return Err(format!(
                "chunk sizes must look like MIN/AVG/MAX (e.g. 16K/64K/256K), not {text:?}"
            ));
        };
        let (min, avg, max) = (parse_size(min)?, parse_size(avg)?, parse_size(max)?);
        Self::new(min, avg, max).map_err(|e| e.to_string())
    }
}

impl fmt::Display for ChunkParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}/{}",
            format_size(self.min),
            format_size(self.avg),
            format_size(self.max)
        )
    }
}

fn parse_size(text: &str) -> Result<u32, String> {
    let text = text.trim();
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => text.split_at(at),
        None => (text, ""),
    };
    let multiplier: u64 = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KIB" => 1024,
        "M" | "MIB" => 1024 * 1024,
        _ => return Err(format!("unknown size unit in {text:?} (use K or M)")),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(multiplier))
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| format!("{text:?} is not a valid size"))
}

fn format_size(bytes: u32) -> String {
    if bytes.is_multiple_of(1024 * 1024) {
        format!("{}M", bytes / (1024 * 1024))
    } else if bytes.is_multiple_of(1024) {
        format!("{}K", bytes / 1024)
    } else {
        bytes.to_string()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid chunk sizes {min}/{avg}/{max}: {reason}")]
pub struct InvalidChunkParams {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
    pub reason: String,
}

/// The chunk FastCDC cuts where at least `max` zero bytes follow a chunk's start: what
/// every long run of zeros (a hole) is made of. Computed once for the sizes in use.
pub fn zero_chunk(params: ChunkParams) -> ChunkRef {
    static FIRST: OnceLock<(ChunkParams, ChunkRef)> = OnceLock::new();
    let compute = || {
        let zeros = vec![0u8; params.max as usize];
        let len = CutSearch::new(params).first_chunk_len(&zeros);
        ChunkRef {
            id: ChunkId::of(&zeros[..len]),
            len: len as u32,
        }
    };
    match FIRST.get_or_init(|| (params, compute())) {
        (first, chunk) if *first == params => *chunk,
        _ => compute(),
    }
}

/// One chunk of a file, in file order. Its offset is the sum of the lengths before it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ChunkRef {
    pub id: ChunkId,
    pub len: u32,
}

/// The result of chunking one stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkedContent {
    pub chunks: Vec<ChunkRef>,
    pub size: u64,
    pub content_id: ContentId,
}

/// The content id of a file made of `chunks`, in order.
pub fn content_id(chunks: &[ChunkRef]) -> ContentId {
    let mut hasher = blake3::Hasher::new_derive_key(CONTENT_ID_CONTEXT);
    hasher.update(&(chunks.len() as u64).to_le_bytes());
    for chunk in chunks {
        hasher.update(&chunk.len.to_le_bytes());
        hasher.update(chunk.id.as_bytes());
    }
    ContentId(*hasher.finalize().as_bytes())
}

/// The BLAKE3 `derive_key` context of chunk-list page hashes.
const CHUNK_PAGE_CONTEXT: &str = "shoal 2026-11 chunk list page v1";

/// Chunk lists are cut into pages where a chunk id's first byte is a multiple of this
/// (so pages average this many chunks and depend only on the ids: an edit changes the
/// page it falls in, not the others), or after [`CHUNK_PAGE_MAX`] chunks.
pub const CHUNK_PAGE_TARGET: usize = 64;
pub const CHUNK_PAGE_MAX: usize = 256;

/// One page of a chunk list: where it is in the list and its hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkListPage {
    pub range: std::ops::Range<usize>,
    pub hash: [u8; 32],
}

/// Cuts a chunk list into pages, so that a peer holding an older version of a large file
/// can ask for only the pages of the new list that it lacks.
pub fn chunk_list_pages(chunks: &[ChunkRef]) -> Vec<ChunkListPage> {
    let mut pages = Vec::new();
    let mut start = 0;
    for (i, chunk) in chunks.iter().enumerate() {
        let len = i + 1 - start;
        if usize::from(chunk.id.0[0]) % CHUNK_PAGE_TARGET == 0
            || len >= CHUNK_PAGE_MAX
            || i + 1 == chunks.len()
        {
            let mut hasher = blake3::Hasher::new_derive_key(CHUNK_PAGE_CONTEXT);
            for c in &chunks[start..=i] {
                hasher.update(&c.len.to_le_bytes()).update(c.id.as_bytes());
            }
            pages.push(ChunkListPage {
                range: start..i + 1,
                hash: *hasher.finalize().as_bytes(),
            });
            start = i + 1;
        }
    }
    pages
}

/// A reusable streaming chunker; one per thread (it owns its read buffer).
pub struct Chunker {
    params: ChunkParams,
    cuts: CutSearch,
    buffer: Vec<u8>,
    /// The chunk FastCDC cuts where at least `max` zero bytes follow its start.
    zero_chunk: ChunkRef,
}

/// Bytes read from the file per refill: small enough that the bytes are still in the
/// core's L2 cache when the cut search and then BLAKE3 go over them (measured here:
/// 4 MiB buffers ran 30% slower per core than 1 MiB ones).
const MIN_BUFFER: usize = 1024 * 1024;

impl Chunker {
    pub fn new(params: ChunkParams) -> Self {
        Self {
            params,
            zero_chunk: zero_chunk(params),
            cuts: CutSearch::new(params),
            buffer: vec![0; MIN_BUFFER.max(2 * params.max as usize)],
        }
    }

    pub fn params(&self) -> ChunkParams {
        self.params
    }

    /// Chunks everything `reader` yields, calling `on_chunk` with each chunk's bytes
    /// (for callers that store or re-check them), and returns the chunk list.
    pub fn chunk_reader_with(
        &mut self,
        mut reader: impl Read,
        mut on_chunk: impl FnMut(&ChunkRef, &[u8]),
    ) -> io::Result<ChunkedContent> {
        let max = self.params.max as usize;
        let mut chunks = Vec::new();
        let mut size = 0u64;
        let mut filled = 0;
        let mut eof = false;
        loop {
            while !eof && filled < self.buffer.len() {
                match reader.read(&mut self.buffer[filled..]) {
                    Ok(0) => eof = true,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            let mut start = 0;
            // A cut is final only when FastCDC has seen everything it could look at.
            while start < filled && (eof || filled - start >= max) {
                let len = self.cuts.first_chunk_len(&self.buffer[start..filled]);
                let bytes = &self.buffer[start..start + len];
                let chunk = ChunkRef {
                    id: ChunkId::of(bytes),
                    len: len as u32,
                };
                on_chunk(&chunk, bytes);
                chunks.push(chunk);
                size += len as u64;
                start += len;
            }
            if eof {
                return Ok(ChunkedContent {
                    content_id: content_id(&chunks),
                    chunks,
                    size,
                });
            }
            self.buffer.copy_within(start..filled, 0);
            filled -= start;
        }
    }

    pub fn chunk_reader(&mut self, reader: impl Read) -> io::Result<ChunkedContent> {
        self.chunk_reader_with(reader, |_, _| {})
    }

    /// Chunks a regular file like [`Chunker::chunk_reader`] (the same chunks), without
    /// reading or hashing its holes: where at least `max` bytes of hole follow a chunk's
    /// start, FastCDC can only cut the chunk it cuts from `max` zero bytes, so those
    /// chunks are taken as known. A 4 GiB file holding 3 MiB of data reads about 3 MiB
    /// (and up to a few `max` of zeros around each data region).
    pub fn chunk_file(&mut self, file: &File) -> io::Result<ChunkedContent> {
        let whole = self.chunk_file_from(file, 0, &mut || true)?;
        Ok(whole.expect("never stopped"))
    }

    /// Chunks a regular file from byte `start` to its end, as [`Chunker::chunk_file`]
    /// would if a chunk began at `start` (every cut does: FastCDC looks at nothing
    /// before it). The result describes the part read: its chunks, and `size` bytes
    /// from `start`. An appended file whose last chunk began at `start` gives the
    /// chunks that follow its unchanged ones, without reading those.
    ///
    /// `unchanged` is asked before each refill of the buffer: once it says no (the file
    /// changed under the reader), reading stops and the answer is `None`, instead of
    /// reading the rest of a file whose result would be thrown away.
    pub fn chunk_file_from(
        &mut self,
        file: &File,
        start: u64,
        unchanged: &mut dyn FnMut() -> bool,
    ) -> io::Result<Option<ChunkedContent>> {
        let size = file.metadata()?.len();
        let max = self.params.max as usize;
        let zero = self.zero_chunk;
        let mut holes = HoleMap::new(file, size);
        let mut chunks = Vec::new();
        // The buffer holds the file's bytes from `base` to `base + filled`.
        let (mut base, mut filled) = (start, 0usize);
        loop {
            if !unchanged() {
                return Ok(None);
            }
            let mut ended = false;
            while !ended && base + (filled as u64) < size && filled < self.buffer.len() {
                match file.read_at(&mut self.buffer[filled..], base + filled as u64) {
                    // Shorter than it was: the caller's stamp check sees the change.
                    Ok(0) => ended = true,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            let eof = ended || base + filled as u64 >= size;
            let mut start = 0;
            let mut skipped = false;
            while start < filled && (eof || filled - start >= max) {
                let at = base + start as u64;
                // Fewer than `max` bytes left cannot be a run of zero chunks: the file
                // system is not asked (two calls saved on every small file).
                let zeros = if size.saturating_sub(at) >= max as u64 {
                    holes.zeros_from(at)
                } else {
                    0
                };
                if zeros >= max as u64 {
                    // Chunks of zeros while at least `max` of them follow each start.
                    let count = (zeros - max as u64) / u64::from(zero.len) + 1;
                    chunks.extend(std::iter::repeat_n(zero, count as usize));
                    (base, filled, skipped) = (at + count * u64::from(zero.len), 0, true);
                    break;
                }
                let len = self.cuts.first_chunk_len(&self.buffer[start..filled]);
                let bytes = &self.buffer[start..start + len];
                chunks.push(ChunkRef {
                    id: ChunkId::of(bytes),
                    len: len as u32,
                });
                start += len;
            }
            if skipped {
                continue;
            }
            if eof {
                let size = chunks.iter().map(|c| u64::from(c.len)).sum();
                return Ok(Some(ChunkedContent {
                    content_id: content_id(&chunks),
                    chunks,
                    size,
                }));
            }
            self.buffer.copy_within(start..filled, 0);
            base += start as u64;
            filled -= start;
        }
    }
}

/// Where a file's holes are, asked of the file system (`SEEK_DATA`, `SEEK_HOLE`) as the
/// chunker moves forward: about two calls per data region. A file system that does not
/// report holes shows none, and the file is read whole.
struct HoleMap<'f> {
    file: &'f File,
    size: u64,
    /// The data region found last, `[start, end)`.
    data: Option<(u64, u64)>,
}

impl<'f> HoleMap<'f> {
    fn new(file: &'f File, size: u64) -> Self {
        Self {
            file,
            size,
            data: None,
        }
    }

    /// How many bytes of hole start at `at` (0 if `at` is in data).
    fn zeros_from(&mut self, at: u64) -> u64 {
        if let Some((start, end)) = self.data {
            if (start..end).contains(&at) {
                return 0;
            }
            if at < start {
                return start - at;
            }
        }
        let data_start = match rustix::fs::seek(self.file, rustix::fs::SeekFrom::Data(at)) {
            Ok(start) => start,
            // No data after `at`: a hole to the end.
            Err(rustix::io::Errno::NXIO) => self.size,
            Err(_) => {
                self.data = Some((at, self.size));
                return 0;
            }
        };
        let data_end = match rustix::fs::seek(self.file, rustix::fs::SeekFrom::Hole(data_start)) {
            Ok(end) => end,
            Err(_) => self.size,
        };
        self.data = Some((data_start, data_end.max(data_start)));
        data_start.saturating_sub(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
        // xorshift: deterministic, incompressible enough for chunking tests.
        let mut state = seed | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 24) as u8
            })
            .collect()
    }

    fn chunk(params: ChunkParams, data: &[u8]) -> ChunkedContent {
        Chunker::new(params).chunk_reader(data).unwrap()
    }

    #[test]
    fn a_sparse_file_chunks_exactly_as_its_bytes_do() {
        use std::os::unix::fs::FileExt;
        let p = ChunkParams::DEFAULT;
        let file = tempfile::tempfile().unwrap();
        let size = 64u64 << 20;
        file.set_len(size).unwrap();
        // Data at the start, in the middle (not aligned to anything), and at the end.
        let data = random_bytes(3 << 20, 11);
        file.write_all_at(&data[..1 << 20], 0).unwrap();
        file.write_all_at(&data[1 << 20..2 << 20], (30 << 20) + 12_345)
            .unwrap();
        file.write_all_at(&data[2 << 20..], size - (1 << 20))
            .unwrap();
        let mut whole = vec![0u8; size as usize];
        file.read_exact_at(&mut whole, 0).unwrap();
        let mut chunker = Chunker::new(p);
        let sparse = chunker.chunk_file(&file).unwrap();
        assert_eq!(sparse, chunk(p, &whole));
        assert_eq!(sparse.size, size);
        // A file without holes, and an empty one, chunk as their bytes do too.
        let dense = tempfile::tempfile().unwrap();
        dense.write_all_at(&data, 0).unwrap();
        assert_eq!(chunker.chunk_file(&dense).unwrap(), chunk(p, &data));
        let empty = tempfile::tempfile().unwrap();
        assert_eq!(chunker.chunk_file(&empty).unwrap(), chunk(p, &[]));
    }

    #[test]
    fn chunking_from_the_last_chunk_of_an_appended_file_gives_the_whole_files_tail() {
        use std::os::unix::fs::FileExt;
        let p = ChunkParams::DEFAULT;
        let data = random_bytes(5 << 20, 23);
        let file = tempfile::tempfile().unwrap();
        file.write_all_at(&data[..3 << 20], 0).unwrap();
        let mut chunker = Chunker::new(p);
        let before = chunker.chunk_file(&file).unwrap();
        // Appended to: the chunks before the old last one stay; from its start, the
        // rest is cut as a whole read would cut it.
        file.write_all_at(&data[3 << 20..], 3 << 20).unwrap();
        let (kept, last) = before.chunks.split_at(before.chunks.len() - 1);
        let start = before.size - u64::from(last[0].len);
        let tail = chunker
            .chunk_file_from(&file, start, &mut || true)
            .unwrap()
            .unwrap();
        assert_eq!(tail.size, (5 << 20) - start);
        let spliced: Vec<ChunkRef> = kept.iter().chain(&tail.chunks).copied().collect();
        assert_eq!(spliced, chunk(p, &data).chunks);
        // Nothing past the end: nothing read.
        let none = chunker
            .chunk_file_from(&file, 5 << 20, &mut || true)
            .unwrap()
            .unwrap();
        assert!(none.chunks.is_empty() && none.size == 0);
        // Told the file changed: it stops.
        assert_eq!(
            chunker.chunk_file_from(&file, 0, &mut || false).unwrap(),
            None
        );
    }

    #[test]
    fn streaming_matches_whole_buffer_fastcdc() {
        let data = random_bytes(9 * 1024 * 1024 + 123, 7);
        let p = ChunkParams::DEFAULT;
        let ours: Vec<u32> = chunk(p, &data).chunks.iter().map(|c| c.len).collect();
        let reference: Vec<u32> = v2020::FastCDC::new(&data, p.min, p.avg, p.max)
            .map(|c| c.length as u32)
            .collect();
        assert_eq!(ours, reference);
    }

    #[test]
    fn reads_in_small_pieces_give_the_same_chunks() {
        struct Trickle<'a>(&'a [u8]);
        impl Read for Trickle<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = buf.len().min(self.0.len()).min(1000);
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let data = random_bytes(6 * 1024 * 1024, 3);
        let mut chunker = Chunker::new(ChunkParams::DEFAULT);
        assert_eq!(
            chunker.chunk_reader(Trickle(&data)).unwrap(),
            chunk(ChunkParams::DEFAULT, &data)
        );
    }

    #[test]
    fn one_byte_insert_changes_at_most_three_chunks() {
        let data = random_bytes(10 * 1024 * 1024, 11);
        let mut edited = data.clone();
        edited.insert(data.len() / 2, 0x5a);
        let before = chunk(ChunkParams::DEFAULT, &data);
        let after = chunk(ChunkParams::DEFAULT, &edited);
        let old: std::collections::HashSet<_> = before.chunks.iter().map(|c| c.id).collect();
        let changed = after.chunks.iter().filter(|c| !old.contains(&c.id)).count();
        assert!((1..=3).contains(&changed), "{changed} chunk ids changed");
        assert_ne!(before.content_id, after.content_id);
    }

    #[test]
    fn append_changes_only_the_tail() {
        let data = random_bytes(10 * 1024 * 1024, 5);
        let mut appended = data.clone();
        appended.extend_from_slice(&random_bytes(100_000, 6));
        let before = chunk(ChunkParams::DEFAULT, &data).chunks;
        let after = chunk(ChunkParams::DEFAULT, &appended).chunks;
        // Every chunk but the old last one is kept, in place.
        assert_eq!(before[..before.len() - 1], after[..before.len() - 1]);
        let old: std::collections::HashSet<_> = before.iter().map(|c| c.id).collect();
        let first_new = after.iter().position(|c| !old.contains(&c.id)).unwrap();
        assert!(first_new >= before.len() - 1);
    }

    #[test]
    fn small_and_empty_inputs_are_one_chunk_or_none() {
        let small = chunk(ChunkParams::DEFAULT, b"tiny");
        assert_eq!(
            small.chunks,
            vec![ChunkRef {
                id: ChunkId::of(b"tiny"),
                len: 4
            }]
        );
        let empty = chunk(ChunkParams::DEFAULT, b"");
        assert!(empty.chunks.is_empty());
        assert_eq!(empty.size, 0);
        assert_eq!(empty.content_id, content_id(&[]));
    }

    #[test]
    fn an_edit_changes_few_chunk_list_pages() {
        let data = random_bytes(40 * 1024 * 1024, 21);
        let mut edited = data.clone();
        edited.insert(data.len() / 2, 1);
        let before = chunk(ChunkParams::DEFAULT, &data).chunks;
        let after = chunk(ChunkParams::DEFAULT, &edited).chunks;
        let old: std::collections::HashSet<_> = chunk_list_pages(&before)
            .into_iter()
            .map(|p| p.hash)
            .collect();
        let pages = chunk_list_pages(&after);
        assert!(pages.len() > 5, "{} pages", pages.len());
        assert_eq!(
            pages.iter().map(|p| p.range.len()).sum::<usize>(),
            after.len()
        );
        let changed = pages.iter().filter(|p| !old.contains(&p.hash)).count();
        assert!((1..=2).contains(&changed), "{changed} pages changed");
    }

    #[test]
    fn params_are_validated_and_parsed() {
        assert_eq!(
            ChunkParams::parse("16K/64K/256K").unwrap(),
            ChunkParams::DEFAULT
        );
        assert_eq!(ChunkParams::DEFAULT.to_string(), "16K/64K/256K");
        assert!(ChunkParams::parse("64K/16K/256K").is_err());
        assert!(ChunkParams::parse("16K/60K/256K").is_err());
        assert!(ChunkParams::parse("16K/64K").is_err());
        assert!(ChunkParams::parse("16Q/64K/256K").is_err());
        assert!(ChunkParams::parse("99999999999K/64K/256K").is_err());
    }
}
