//! Chooses the default chunk sizes: for each candidate MIN/AVG/MAX, what a small edit
//! costs on the wire and what the index costs at rest, and how fast chunking runs.
//!
//!     cargo bench --bench chunk_params
//!
//! "Media" is one 100 MiB incompressible file: the wire cost of a 1-byte insert in the
//! middle is the new chunks' bytes plus the file's new chunk list (36 bytes a chunk).
//! "Small" is 50,000 files of 1-16 KiB: every file under MIN is one chunk, so the
//! parameters only change the index cost of large files. Index cost at rest is
//! estimated from the key layout of `schema/store.md`: per chunk one location record
//! (~110 bytes with a 40-byte path) and one chunk-list element (36 bytes).

use std::collections::HashSet;
use std::time::Instant;

use shoal::chunking::{ChunkParams, Chunker};

const LOCATION_RECORD: f64 = 32.0 + 1.0 + 4.0 + 40.0 + 12.0 + 20.0;
const LIST_ELEMENT: f64 = 36.0;

fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len / 8)
        .flat_map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()
        })
        .collect()
}

fn main() {
    let media = data(100 << 20, 7);
    let mut edited = media.clone();
    edited.insert(media.len() / 2, 0x42);
    let mut appended = media.clone();
    appended.extend_from_slice(&data(1 << 20, 8));
    println!(
        "| MIN/AVG/MAX | chunks in 100 MiB | 1-byte insert: new chunk bytes + list | 1 MiB append: new bytes + list | index at rest | chunk+hash MiB/s (1 core) |"
    );
    println!("|---|---|---|---|---|---|");
    for (min, avg, max) in [
        (4 << 10, 16 << 10, 64 << 10),
        (16 << 10, 64 << 10, 256 << 10),
        (64 << 10, 256 << 10, 1 << 20),
        (256 << 10, 1 << 20, 4 << 20),
    ] {
        let params = ChunkParams::new(min, avg, max).unwrap();
        let mut chunker = Chunker::new(params);
        let started = Instant::now();
        let base = chunker.chunk_reader(&media[..]).unwrap();
        let rate = media.len() as f64 / (1 << 20) as f64 / started.elapsed().as_secs_f64();
        let known: HashSet<_> = base.chunks.iter().map(|c| c.id).collect();
        let cost = |content: &[u8]| {
            let chunks = Chunker::new(params).chunk_reader(content).unwrap().chunks;
            let new: u64 = chunks
                .iter()
                .filter(|c| !known.contains(&c.id))
                .map(|c| u64::from(c.len))
                .sum();
            (new, chunks.len() as u64 * LIST_ELEMENT as u64)
        };
        let (insert_new, insert_list) = cost(&edited);
        let (append_new, append_list) = cost(&appended);
        let index = base.chunks.len() as f64 * (LOCATION_RECORD + LIST_ELEMENT);
        println!(
            "| {params} | {} | {} KiB + {} KiB | {} KiB + {} KiB | {:.3}% of data | {rate:.0} |",
            base.chunks.len(),
            insert_new / 1024,
            insert_list / 1024,
            append_new / 1024,
            append_list / 1024,
            index / media.len() as f64 * 100.0,
        );
    }
}
