#!/usr/bin/env bash
# A fuzzing campaign over every decoder of network and disk input (tests/suite/fuzz.rs):
# each decoder runs for SHOAL_FUZZ_SECONDS (default 600) on mutated valid encodings and
# random bytes, at the lowest CPU priority, under /usr/bin/time for the peak memory.
# CI runs the same harness in its short form (a fixed number of inputs) with the
# other tests. Prints one line per decoder (inputs, seconds, crashes), then the time
# report; numbers go to docs/SECURITY.md.
#
#   SHOAL_FUZZ_SECONDS=600 tools/fuzz.sh [FILTER]
#
# FILTER picks the decoders' tests (default `fuzz::`, all of them), e.g.
# `fuzz::enrollment` for the enrollment protocol's two decoders.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/setup.sh
export SHOAL_FUZZ_SECONDS="${SHOAL_FUZZ_SECONDS:-600}"
filter="${1:-fuzz::}"
# The test profile keeps overflow checks on: an arithmetic overflow in a decoder is a
# crash too (dependencies are built with optimisations, see Cargo.toml).
cargo test --locked --test tests "$filter" --no-run
nice -n 19 /usr/bin/time -v cargo test --locked --test tests "$filter" -- \
  --nocapture --test-threads "${FUZZ_THREADS:-2}" 2>&1 |
  grep -E '^fuzz |^test result|Maximum resident set size|Elapsed \(wall clock\)'
