#!/usr/bin/env bash
# A rolling update in small: builds `shoal` at COMMIT (default: the commit before issue
# 15's first change, the last release without protocol negotiation) in a temporary
# worktree, then runs the ignored test in which a node of that build and a node of this
# one converge (tests/suite/operability.rs).
#   tools/mixed-cluster.sh [COMMIT]
set -euo pipefail
cd "$(dirname "$0")/.."
commit="${1:-b3695e3e9153cc0aab46991dc80398c957840e41}"
set --  # setup.sh takes its arguments as extra packages to install
source tools/setup.sh
work="$(mktemp -d "${TMPDIR:-/tmp}/shoal-previous.XXXXXX")"
cleanup() { git worktree remove --force "$work/src" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
git worktree add --detach "$work/src" "$commit" >&2
# Its own target directory: the previous build's binary must not replace this one's.
(cd "$work/src" && CARGO_TARGET_DIR="$work/target" cargo build --locked --bin shoal >&2)
SHOAL_PREVIOUS_BINARY="$work/target/debug/shoal" \
  cargo test --locked --test tests operability::a_node_of_the_previous_release -- --ignored
