#!/usr/bin/env bash
# Installs what building and testing Shoal needs on a Debian machine, if it is missing:
# clang/libclang-dev (bindgen for the RocksDB bindings) and librocksdb-dev (the RocksDB
# library we link instead of compiling its C++). Extra packages can be named as
# arguments (the benchmarks add b3sum, rsync, syncthing...).
# Source it to also get the shared cargo target directory.
set -euo pipefail

need=(clang libclang-dev librocksdb-dev "$@")
missing=()
for pkg in "${need[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "tools/setup.sh: installing ${missing[*]}" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

# Outside the clone, so a repeated CI run on the same machine reuses the build.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/shoal/target}"
mkdir -p "$CARGO_TARGET_DIR" 2>/dev/null || export CARGO_TARGET_DIR="$HOME/.cache/shoal/target"
