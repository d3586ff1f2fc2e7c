#!/usr/bin/env bash
# Runs Shoal's whole test suite: unit, property and integration tests (the integration
# tests run the real `shoal` binary: single nodes on temporary volumes, and clusters of
# `shoal serve` processes talking QUIC on 127.0.x.y; containers of the image on the local
# Docker Engine, which they need). Benchmarks are type-checked only.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/setup.sh
cargo check --locked --benches --quiet
cargo test --locked "$@"
