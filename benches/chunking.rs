//! The chunk + hash kernel on one core: FastCDC alone, BLAKE3 alone, and both as the
//! scanner runs them (`Chunker::chunk_reader` over data already in memory).
//!
//!     cargo bench --bench chunking

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use shoal::chunking::{ChunkParams, Chunker};

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

fn kernel(c: &mut Criterion) {
    let input = data(64 << 20);
    let p = ChunkParams::DEFAULT;
    let mut group = c.benchmark_group("kernel-64MiB");
    group.throughput(Throughput::Bytes(input.len() as u64));
    group.sample_size(10);
    group.bench_function("fastcdc", |b| {
        b.iter(|| fastcdc::v2020::FastCDC::new(black_box(&input), p.min, p.avg, p.max).count())
    });
    group.bench_function("blake3", |b| b.iter(|| blake3::hash(black_box(&input))));
    let mut chunker = Chunker::new(p);
    group.bench_function("fastcdc+blake3", |b| {
        b.iter(|| chunker.chunk_reader(black_box(&input[..])).unwrap())
    });
    group.finish();
}

criterion_group!(benches, kernel);
criterion_main!(benches);
