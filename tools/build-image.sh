#!/usr/bin/env bash
# Builds Shoal's Docker image without a registry: tools/build-image.sh [TAG]
# (default shoal:local).
#
# 1. builds the release binary with cargo (or takes SHOAL_BINARY=/path/to/shoal, e.g. a
#    binary built already);
# 2. assembles a root file system holding only that binary (stripped), the shared
#    libraries `ldd` lists for it and the dynamic loader;
# 3. runs `docker build` on the top-level Dockerfile (`FROM scratch`: nothing to pull).
#
# The result runs on any x86-64 Docker host; for a Swarm, push it to your registry
# (docker tag shoal:local REGISTRY/shoal:VERSION && docker push ...) or copy it to every
# node (docker save shoal:local | ssh NODE docker load).
set -euo pipefail
cd "$(dirname "$0")/.."
tag="${1:-shoal:local}"

binary="${SHOAL_BINARY:-}"
if [ -z "$binary" ]; then
  set --  # setup.sh takes its arguments as extra packages to install
  source tools/setup.sh
  cargo build --release --locked --bin shoal >&2
  binary="$CARGO_TARGET_DIR/release/shoal"
fi
[ -x "$binary" ] || { echo "build-image.sh: $binary is not an executable" >&2; exit 2; }

context="$(mktemp -d "${TMPDIR:-/tmp}/shoal-image.XXXXXX")"
trap 'rm -rf "$context"' EXIT
rootfs="$context/rootfs"
mkdir -p "$rootfs/usr/local/bin" "$rootfs/srv/shoal/volumes" "$rootfs/var/lib/shoal" \
  "$rootfs/run/secrets" "$rootfs/tmp"
chmod 1777 "$rootfs/tmp"
strip --strip-debug -o "$rootfs/usr/local/bin/shoal" "$binary"

# Every library ldd resolves ("name => /path (addr)") and the loader ("/path (addr)"),
# copied (symlinks followed) to the same path in the image.
libs=$(ldd "$binary" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }')
[ -n "$libs" ] || { echo "build-image.sh: ldd listed no libraries for $binary" >&2; exit 2; }
for lib in $libs; do
  mkdir -p "$rootfs$(dirname "$lib")"
  cp -L "$lib" "$rootfs$lib"
done

cp Dockerfile "$context/Dockerfile"
docker build --quiet --tag "$tag" "$context" >/dev/null
echo "built $tag" >&2
