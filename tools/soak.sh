#!/usr/bin/env bash
# The kill storm of tests/suite/storm.rs, long: random file operations on three real
# `shoal serve` nodes under random kill -9s, checked against a model at the end (torn
# files, lost last writes, deletes come back unexplained, `shoal verify`).
#
#   tools/soak.sh [SECONDS]      default 1800 (30 minutes); SHOAL_STORM_SEED=N repeats a run
#
# Prints the storm's figures (operations, kills, conflict copies, torn, lost,
# resurrected with the write that explains each) and fails if the checker finds
# anything it cannot explain.
set -euo pipefail
cd "$(dirname "$0")/.."
export SHOAL_STORM_SECS="${1:-1800}"
# setup.sh takes its arguments for packages to install: it gets none.
set --
source tools/setup.sh
exec cargo test --locked --test tests -- storm:: --nocapture
