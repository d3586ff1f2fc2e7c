#!/usr/bin/env bash
# Runs Shoal's whole test suite: the formatting and lint gates (`cargo fmt --check`,
# `cargo clippy --all-targets -- -D warnings`, which also type-checks the benchmarks),
# then unit, property and integration tests (the integration tests run the real `shoal`
# binary: single nodes on temporary volumes, and clusters of `shoal serve` processes
# talking QUIC on 127.0.x.y; containers of the image on the local Docker Engine, which
# they need).
set -euo pipefail
cd "$(dirname "$0")/.."
# promtool (Debian's prometheus package) checks a live node's /metrics; rsync: the
# metadata tests compare Shoal's copy of a tree with `rsync -aHAXS`'s; busybox-static: the
# stand-in lsyncd image the migration test deploys and replaces; time: the peak memory of
# a scan (tests/suite/index.rs). Debian's chromium is
# installed by the status page's test itself (tests/suite/page.rs, about 20 s) when
# missing.
source tools/setup.sh prometheus rsync busybox-static time
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
  rustup component add rustfmt clippy
fi
cargo fmt --check
cargo clippy --locked --all-targets --quiet -- -D warnings
cargo test --locked "$@"
