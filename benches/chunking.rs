//! The chunk + hash kernel on one core, on 64 MiB already in memory: the cut-point
//! search (the `fastcdc` crate's and Shoal's, which finds the same cuts), BLAKE3 alone,
//! and both as the scanner runs them (`Chunker::chunk_reader`, which also copies the
//! bytes into its buffer).
//!
//!     cargo bench --bench chunking

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use shoal::chunking::{ChunkParams, Chunker, CutSearch};

fn data(len: usize) -> Vec<u8> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    (0..len / 8)
        .flat_map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()
        })
        .collect()
}

/// Chunks `input` with `search`, returning the number of chunks.
fn count_cuts(search: &CutSearch, mut input: &[u8]) -> usize {
    let mut chunks = 0;
    while !input.is_empty() {
        input = &input[search.first_chunk_len(input)..];
        chunks += 1;
    }
    chunks
}

fn kernel(c: &mut Criterion) {
    let input = data(64 << 20);
    let p = ChunkParams::DEFAULT;
    let mut group = c.benchmark_group("kernel-64MiB");
    group.throughput(Throughput::Bytes(input.len() as u64));
    group.sample_size(10);
    group.bench_function("cuts-fastcdc-crate", |b| {
        b.iter(|| fastcdc::v2020::FastCDC::new(black_box(&input), p.min, p.avg, p.max).count())
    });
    let search = CutSearch::new(p);
    group.bench_function("cuts-shoal", |b| {
        b.iter(|| count_cuts(&search, black_box(&input)))
    });
    group.bench_function("blake3", |b| b.iter(|| blake3::hash(black_box(&input))));
    let mut chunker = Chunker::new(p);
    group.bench_function("chunk_reader", |b| {
        b.iter(|| chunker.chunk_reader(black_box(&input[..])).unwrap())
    });
    group.finish();
}

criterion_group!(benches, kernel);
criterion_main!(benches);
