#!/usr/bin/env bash
# Shoal's main job: three nodes on loopback mirror one volume, master to master.
# Fresh credentials, a sample volume on node 1, a little content on node 2, nothing on
# node 3; they converge; then a rename (no chunk bytes move), an edit and a delete
# propagate. Everything lives in a temporary directory removed at the end, and every
# process started here is stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/setup.sh
cargo build --release --locked --quiet
shoal="$CARGO_TARGET_DIR/release/shoal"

work=$(mktemp -d /tmp/shoal-demo.XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
ip() { echo "127.77.0.$1"; }
vol() { echo "$work/node$1/volumes/media"; }

step "Cluster credentials (what Docker secrets would carry)"
"$shoal" cluster init --out "$work/credentials"

step "Sample data: node 1 gets ~50 MiB of clips and 1,000 documents, node 2 a note, node 3 nothing"
for n in 1 2 3; do mkdir -p "$(vol $n)"; done
python3 tools/gen-data.py media "$(vol 1)/clips" --scale 0.05
python3 tools/gen-data.py small "$(vol 1)/docs" --scale 0.02
echo "written on node 2" > "$(vol 2)/note.txt"

step "Starting three nodes (QUIC on $(ip 1)..3:7029, status on :7030)"
for n in 1 2 3; do
  peers=()
  for m in 1 2 3; do [ "$m" = "$n" ] || peers+=(--peer "$(ip $m):7029"); done
  "$shoal" serve --data-root "$work/node$n/volumes" --state-dir "$work/node$n/state" --volume media \
    --listen "$(ip $n):7029" --http "$(ip $n):7030" --credentials "$work/credentials" \
    --heartbeat 1 "${peers[@]}" > "$work/node$n.log" 2>&1 &
  pids+=($!)
done

root() { "$shoal" status --http "$(ip $1):7030" --json 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["volumes"][0]["root"])' 2>/dev/null || true; }
received() { "$shoal" status --http "$(ip $1):7030" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["totals"]["chunk_bytes_received"])'; }
# Waits until all three roots are equal (and differ from $1, the root before a change).
wait_converged() {
  local start=$SECONDS previous=${1:-}
  while (( SECONDS - start < 120 )); do
    local r1 r2 r3; r1=$(root 1); r2=$(root 2); r3=$(root 3)
    if [ -n "$r1" ] && [ "$r1" != "$previous" ] && [ "$r1" = "$r2" ] && [ "$r2" = "$r3" ]; then
      echo "converged in $(( SECONDS - start )) s: every node's root is ${r1:0:16}..."; return 0
    fi
    sleep 0.5
  done
  echo "did not converge; logs:"; tail -n 20 "$work"/node*.log; return 1
}
count() { find "$(vol $1)" -path "$(vol $1)/.shoal" -prune -o -type f -print | wc -l; }

step "Waiting for the three nodes to converge"
wait_converged
for n in 1 2 3; do echo "node $n: $(count $n) files"; done

step "Rename a directory of ~50 MiB on node 1: peers reuse their own chunks"
before=$(received 3)
mv "$(vol 1)/clips" "$(vol 1)/footage"
wait_converged "$(root 1)"
echo "node 3 received $(( $(received 3) - before )) chunk bytes for the rename"

step "Edit a document on node 2, then delete one on node 3"
echo "edited on node 2" >> "$(vol 2)/docs/dir00/sub00/file000000.dat"
wait_converged "$(root 1)"
rm "$(vol 3)/docs/dir01/sub00/file000001.dat"
wait_converged "$(root 1)"
for n in 1 2 3; do
  echo "node $n: $(count $n) files, edited doc ends with: $(tail -c 17 "$(vol $n)/docs/dir00/sub00/file000000.dat")"
done

step "Node 3's view (shoal status --http $(ip 3):7030)"
"$shoal" status --http "$(ip 3):7030"

step "Stopping the nodes (SIGTERM: they drain and flush their index)"
