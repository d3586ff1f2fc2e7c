#!/usr/bin/env bash
# Runs Shoal's whole test suite: unit, property and integration tests (the integration
# tests run the real `shoal` binary on temporary volumes).
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/setup.sh
cargo test --locked --all-targets "$@"
