//! FastCDC (2020) cut points, found faster per core than `fastcdc::v2020::cut` and
//! always at exactly the same places.
//!
//! FastCDC rolls a gear hash over the bytes after a chunk's minimum size,
//! `h = (h << 1) + GEAR[byte]` (wrapping), and cuts before the first byte whose hash
//! has none of the mask's bits set. Done one byte after the other that is a dependency
//! chain: each step waits for the previous one. But the hash's bit `k` depends only on
//! the last `k + 1` bytes, so the hash at any position is exact after hashing the 64
//! bytes before it from zero. [`CutSearch`] therefore splits the bytes to search into
//! blocks of [`LANES`] adjacent stretches, hashes the stretches interleaved (independent
//! chains the core runs side by side), each warmed up on the 64 bytes before its seam,
//! and takes the first cut of the first stretch that has one.
//!
//! Interleaved, the search is bound by how many instructions a byte costs rather than
//! by the chain: a byte load, a table load and add, and a test. The shift is paid once
//! per [`STEP`] bytes: `h << STEP` plus `GEAR[b0] << (STEP - 1)`, ..., `GEAR[b3]`, each
//! from its own pre-shifted table, is `h` advanced by `STEP` bytes, and the partial
//! sums in between are the hashes of the bytes in between shifted left, which are
//! tested against the masks shifted alike (the masks stop at bit 47, so no bit a test
//! needs is shifted out; a compile-time check says so). That is about 3.25
//! instructions a byte and no chain to wait on. (SIMD would need `std::arch`, which
//! is `unsafe`: Shoal has none.)
//!
//! Everything else is FastCDC's own arithmetic, restated:
//! - a source no longer than `min` is one chunk;
//! - hashing starts at `min` rounded down to even, from `h = 0`;
//! - up to `avg` (or the source's length, when shorter) rounded down to even, a cut
//!   needs the small mask (more bits, so fewer cuts); from there on the large one;
//! - the crate rolls two bytes per step and tests the first byte of each pair as
//!   `(h << 1) & (mask << 1)`, which drops the mask's bit 63 at even offsets;
//! - no cut before `min(len, max)` rounded down to even gives a chunk of `min(len, max)`.

use fastcdc::v2020;

use crate::chunking::{ChunkParams, NORMALIZATION_BITS};

/// Stretches hashed side by side. With [`STEP`] bytes per shift a stretch's chain
/// is short enough that two already keep the core's load units busy (measured here:
/// 3 and 4 run no faster, and need more registers than x86-64 has to spare).
const LANES: usize = 2;

/// Bytes hashed per shift (see the module documentation). 4 measured fastest here: 8
/// needs 16 KiB of tables, which crowds the data out of the L1 cache.
const STEP: usize = 4;

/// Bytes a stretch hashes before its seam: the hash is exact from there on.
const WARM_UP: usize = u64::BITS as usize;

// The partial sums of a step are the hash shifted left by up to `STEP - 1` bits; a test
// of them is exact only if no mask has a bit that the shift would push out.
const _: () = {
    let mut i = 0;
    while i < v2020::MASKS.len() {
        assert!(v2020::MASKS[i].leading_zeros() as usize >= STEP - 1);
        i += 1;
    }
};

/// Where FastCDC looks for the first cut of a source, and with which masks.
#[derive(Clone, Copy, Debug)]
struct Window {
    /// First position hashed (from `h = 0`).
    start: usize,
    /// Positions before this use the small mask, from it on the large one.
    switch: usize,
    /// First position not hashed.
    end: usize,
}

/// FastCDC's cut-point search for one set of chunk sizes.
pub struct CutSearch {
    min: usize,
    avg: usize,
    max: usize,
    /// Masks at odd and even positions, before and after the switch: `[small, large]`.
    mask_odd: [u64; 2],
    mask_even: [u64; 2],
    /// The bits set in every mask, shifted as the partial sums of a step are: a
    /// position whose hash has none of them set may be a cut and is checked exactly;
    /// any other is not a cut.
    candidate: [u64; STEP],
    /// `gear[i][b]` is `GEAR[b] << (STEP - 1 - i)`: the table of a step's byte `i`.
    gear: Box<[[u64; 256]; STEP]>,
    /// Bytes per stretch: 256, 1024 or 4096.
    lane_len: usize,
}

impl CutSearch {
    pub fn new(params: ChunkParams) -> Self {
        let bits = params.avg.ilog2();
        let mask_s = v2020::MASKS[(bits + NORMALIZATION_BITS) as usize];
        let mask_l = v2020::MASKS[(bits - NORMALIZATION_BITS) as usize];
        // `(h << 1) & (mask << 1) == 0` is `h & (mask << 1 >> 1) == 0`.
        let mask_even = [mask_s << 1 >> 1, mask_l << 1 >> 1];
        let candidate = mask_even[0] & mask_even[1];
        let (gear, _) = v2020::get_gear_with_seed(0);
        Self {
            min: params.min as usize,
            avg: params.avg as usize,
            max: params.max as usize,
            mask_odd: [mask_s, mask_l],
            mask_even,
            candidate: std::array::from_fn(|i| candidate << (STEP - 1 - i)),
            gear: Box::new(std::array::from_fn(|i| {
                std::array::from_fn(|b| gear[b] << (STEP - 1 - i))
            })),
            // Longer stretches pay their warm-up less often, but a block goes on past
            // the cut it finds: a sixteenth of the average measured best for 64 KiB.
            lane_len: if params.avg <= 8192 {
                256
            } else if params.avg <= 32768 {
                1024
            } else {
                4096
            },
        }
    }

    /// The length of the first chunk of `source`: what
    /// `fastcdc::v2020::cut(source, min, avg, max, ..)` returns with Shoal's masks.
    pub fn first_chunk_len(&self, source: &[u8]) -> usize {
        match self.lane_len {
            256 => self.first_chunk_len_in::<256>(source),
            1024 => self.first_chunk_len_in::<1024>(source),
            _ => self.first_chunk_len_in::<4096>(source),
        }
    }

    /// [`Self::first_chunk_len`] with stretches of `LANE_LEN` bytes (tests move the
    /// seams with it).
    fn first_chunk_len_in<const LANE_LEN: usize>(&self, source: &[u8]) -> usize {
        let len = source.len();
        if len <= self.min {
            return len;
        }
        let (stop, center) = if len > self.max {
            (self.max, self.avg)
        } else {
            (len, self.avg.min(len))
        };
        let window = Window {
            start: self.min / 2 * 2,
            switch: center / 2 * 2,
            end: stop / 2 * 2,
        };
        let block = LANES * LANE_LEN;
        let mut at = window.start;
        // Blocks warm up on the 64 bytes before them; `ChunkParams::new` keeps `min` at
        // 64 or more, but its fields are public, so smaller ones go one byte at a time.
        while window.start >= WARM_UP && window.end - at >= block {
            if let Some(cut) = self.search_block::<LANE_LEN>(source, at, window) {
                return cut;
            }
            at += block;
        }
        self.search_tail(source, at, window).unwrap_or(stop)
    }

    /// The first cut in `source[at..at + LANES * LANE_LEN]`, by [`LANES`] stretches
    /// hashed side by side.
    fn search_block<const LANE_LEN: usize>(
        &self,
        source: &[u8],
        at: usize,
        window: Window,
    ) -> Option<usize> {
        const { assert!(LANE_LEN.is_multiple_of(2 * STEP) && LANE_LEN >= WARM_UP) };
        // Every stretch warms up on the 64 bytes before it, which lie inside the window
        // (or, for the first stretch at the window's start, before it: FastCDC starts
        // at least `min` >= 64 bytes into the source), except that the stretch at
        // FastCDC's own start starts from zero, as FastCDC does.
        let bytes = &source[at - WARM_UP..][..WARM_UP + LANES * LANE_LEN];
        let mut h = [0u64; LANES];
        for step in 0..WARM_UP / STEP {
            for h in &mut h {
                *h <<= STEP;
            }
            for (i, gear) in self.gear.iter().enumerate() {
                for (lane, h) in h.iter_mut().enumerate() {
                    let byte = bytes[lane * LANE_LEN + step * STEP + i];
                    *h = h.wrapping_add(gear[usize::from(byte)]);
                }
            }
        }
        if at == window.start {
            h[0] = 0;
        }
        let mut found = [usize::MAX; LANES];
        // Two steps per turn of the loop: the loop's own upkeep (counter, exit test)
        // is then a small share of its work.
        for step in (0..LANE_LEN / STEP).step_by(2) {
            let offset = WARM_UP + step * STEP;
            self.step::<LANE_LEN>(&mut h, &mut found, bytes, at, offset, window);
            self.step::<LANE_LEN>(&mut h, &mut found, bytes, at, offset + STEP, window);
            if found[0] != usize::MAX {
                // Nothing in the block comes before the first stretch's cut.
                break;
            }
        }
        found.into_iter().find(|&cut| cut != usize::MAX)
    }

    /// Advances every stretch's hash over the [`STEP`] bytes at `offset`, noting the
    /// stretches where one of them may end a chunk.
    #[inline(always)]
    fn step<const LANE_LEN: usize>(
        &self,
        h: &mut [u64; LANES],
        found: &mut [usize; LANES],
        bytes: &[u8],
        at: usize,
        offset: usize,
        window: Window,
    ) {
        for h in h.iter_mut() {
            *h <<= STEP;
        }
        // Written out per byte of the step, so that each byte's table and mask are
        // constants of the loop body.
        const { assert!(STEP == 4) };
        self.add_byte::<0, LANE_LEN>(h, found, bytes, at, offset, window);
        self.add_byte::<1, LANE_LEN>(h, found, bytes, at, offset, window);
        self.add_byte::<2, LANE_LEN>(h, found, bytes, at, offset, window);
        self.add_byte::<3, LANE_LEN>(h, found, bytes, at, offset, window);
    }

    /// Adds byte `I` of the step at `offset` to every stretch's hash and notes the
    /// stretches where it may end a chunk.
    #[inline(always)]
    fn add_byte<const I: usize, const LANE_LEN: usize>(
        &self,
        h: &mut [u64; LANES],
        found: &mut [usize; LANES],
        bytes: &[u8],
        at: usize,
        offset: usize,
        window: Window,
    ) {
        for lane in 0..LANES {
            let offset = lane * LANE_LEN + offset + I;
            h[lane] = h[lane].wrapping_add(self.gear[I][usize::from(bytes[offset])]);
            if h[lane] & self.candidate[I] == 0 {
                let hash = h[lane] >> (STEP - 1 - I);
                self.note_candidate(&mut found[lane], at + offset - WARM_UP, hash, window);
            }
        }
    }

    /// Keeps `pos` as its stretch's cut if it is one and the stretch has none yet.
    #[cold]
    #[inline(never)]
    fn note_candidate(&self, found: &mut usize, pos: usize, hash: u64, window: Window) {
        if *found == usize::MAX && self.is_cut(pos, hash, window) {
            *found = pos;
        }
    }

    /// The first cut from `at` to the window's end (what the blocks left), one byte
    /// after the other.
    fn search_tail(&self, source: &[u8], at: usize, window: Window) -> Option<usize> {
        let gear = &self.gear[STEP - 1];
        let mut h = 0u64;
        for &byte in &source[at.saturating_sub(WARM_UP).max(window.start)..at] {
            h = (h << 1).wrapping_add(gear[usize::from(byte)]);
        }
        (at..window.end).find(|&pos| {
            h = (h << 1).wrapping_add(gear[usize::from(source[pos])]);
            self.is_cut(pos, h, window)
        })
    }

    /// Whether FastCDC cuts before `pos`, whose hash is `hash`.
    fn is_cut(&self, pos: usize, hash: u64, window: Window) -> bool {
        let large = usize::from(pos >= window.switch);
        let mask = if pos.is_multiple_of(2) {
            self.mask_even[large]
        } else {
            self.mask_odd[large]
        };
        hash & mask == 0
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Chunk sizes that put FastCDC's window edges and the stretches' seams in many
    /// places: the smallest sizes allowed, odd minimums and maximums (FastCDC rounds
    /// them down to even), and each stretch length Shoal picks.
    const PARAMS: [ChunkParams; 5] = [
        ChunkParams {
            min: 64,
            avg: 256,
            max: 1024,
        },
        ChunkParams {
            min: 1001,
            avg: 4096,
            max: 20_001,
        },
        ChunkParams {
            min: 4096,
            avg: 16_384,
            max: 65_535,
        },
        ChunkParams {
            min: 8191,
            avg: 32_768,
            max: 131_073,
        },
        ChunkParams::DEFAULT,
    ];

    fn fastcdc_lens(p: ChunkParams, data: &[u8]) -> Vec<usize> {
        v2020::FastCDC::new(data, p.min, p.avg, p.max)
            .map(|chunk| chunk.length)
            .collect()
    }

    fn lens_with(data: &[u8], mut first_len: impl FnMut(&[u8]) -> usize) -> Vec<usize> {
        let mut lens = Vec::new();
        let mut rest = data;
        while !rest.is_empty() {
            let len = first_len(rest);
            lens.push(len);
            rest = &rest[len..];
        }
        lens
    }

    /// Checks every chunk of `data` against the crate, with Shoal's stretch length and
    /// with short ones that put seams every few dozen bytes.
    fn assert_same_cuts(p: ChunkParams, data: &[u8]) {
        let search = CutSearch::new(p);
        let expected = fastcdc_lens(p, data);
        assert_eq!(lens_with(data, |d| search.first_chunk_len(d)), expected);
        assert_eq!(
            lens_with(data, |d| search.first_chunk_len_in::<64>(d)),
            expected
        );
        assert_eq!(
            lens_with(data, |d| search.first_chunk_len_in::<104>(d)),
            expected
        );
        // One cut from every start, not only from the crate's cuts: sources of every
        // length, ending anywhere relative to the window and the seams.
        for start in (0..data.len()).step_by(data.len() / 7 + 1) {
            let source = &data[start..];
            let (_, len) = v2020::cut(
                source,
                p.min as usize,
                p.avg as usize,
                p.max as usize,
                search.mask_odd[0],
                search.mask_odd[1],
                search.mask_odd[0] << 1,
                search.mask_odd[1] << 1,
            );
            assert_eq!(search.first_chunk_len(source), len, "from {start}");
            assert_eq!(search.first_chunk_len_in::<64>(source), len, "from {start}");
        }
    }

    fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
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

    /// Lengths at and next to the sizes that matter for `p`: the window's edges, the
    /// seams of the first blocks, and a few maximum-size chunks.
    fn edge_lengths(p: ChunkParams) -> Vec<usize> {
        let (min, avg, max) = (p.min as usize, p.avg as usize, p.max as usize);
        let lane = CutSearch::new(p).lane_len;
        let mut lens = vec![0, 1, 2, min, avg, max, 2 * max, 3 * max + avg];
        lens.extend((1..=4).map(|k| min / 2 * 2 + k * lane));
        lens.extend((1..=2).map(|k| min / 2 * 2 + k * LANES * lane + WARM_UP));
        lens.into_iter()
            .flat_map(|len| len.saturating_sub(2)..=len + 2)
            .collect()
    }

    /// Bytes that are hard on a cut search: all one value (no cut, or one at every
    /// position), a short pattern repeated, two symbols only, or random.
    fn content(kind: u8, len: usize, seed: u64) -> Vec<u8> {
        let noise = random_bytes(len.max(1), seed);
        match kind % 5 {
            0 => vec![0; len],
            1 => vec![noise[0]; len],
            2 => {
                let period = 1 + usize::from(noise[0]) % 300;
                (0..len).map(|i| noise[i % period]).collect()
            }
            3 => noise.iter().take(len).map(|b| b & 1).collect(),
            _ => noise[..len].to_vec(),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        #[test]
        fn cuts_match_fastcdc_on_random_lengths(
            params in 0..PARAMS.len(),
            kind in any::<u8>(),
            len in 0usize..300_000,
            seed in any::<u64>(),
        ) {
            let p = PARAMS[params];
            assert_same_cuts(p, &content(kind, len.min(6 * p.max as usize), seed));
        }

        #[test]
        fn cuts_match_fastcdc_at_edge_lengths(
            params in 0..PARAMS.len(),
            kind in any::<u8>(),
            pick in any::<prop::sample::Index>(),
            seed in any::<u64>(),
        ) {
            let p = PARAMS[params];
            let lens = edge_lengths(p);
            assert_same_cuts(p, &content(kind, lens[pick.index(lens.len())], seed));
        }
    }

    #[test]
    fn cuts_match_fastcdc_on_megabytes_of_each_kind() {
        for p in [PARAMS[2], ChunkParams::DEFAULT] {
            for kind in 0..5 {
                let data = content(kind, 3 * 1024 * 1024 + 17, 99 + u64::from(kind));
                assert_same_cuts(p, &data);
            }
        }
    }

    #[test]
    fn a_minimum_under_64_bytes_is_searched_one_byte_at_a_time() {
        // Not a size `ChunkParams::new` accepts, but one a caller can build: the blocks
        // would have no room to warm up before the window.
        let p = ChunkParams {
            min: 2,
            avg: 32_768,
            max: 65_536,
        };
        let search = CutSearch::new(p);
        let data = random_bytes(300_000, 5);
        for start in (0..data.len()).step_by(9_999) {
            let source = &data[start..];
            let (_, len) = v2020::cut(
                source,
                2,
                32_768,
                65_536,
                search.mask_odd[0],
                search.mask_odd[1],
                search.mask_odd[0] << 1,
                search.mask_odd[1] << 1,
            );
            assert_eq!(search.first_chunk_len(source), len, "from {start}");
        }
    }

    #[test]
    fn the_shifted_table_is_the_crates() {
        // FastCDC's two-bytes-a-step loop adds `GEAR_LS[b]` for `GEAR[b] << 1`;
        // restating it with one table relies on the two agreeing.
        let (gear, gear_ls) = v2020::get_gear_with_seed(0);
        for b in 0..256 {
            assert_eq!(gear_ls[b], gear[b] << 1);
        }
    }
}
