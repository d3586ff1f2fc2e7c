#!/usr/bin/env bash
# Shoal's main job, live: three nodes on loopback mirror one volume, master to master.
# Fresh credentials, sample data on node 1, a note on node 2, nothing on node 3; they
# converge; then files written, edited, renamed and deleted on one node appear on the
# others within a second, with no trigger (the file watcher). Ends with what moved, and
# a clean stop: every process started here is stopped and checked gone, the ports are
# free again, and the temporary directory is removed.
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

step "Sample data: node 1 gets ~20 MiB of clips and 500 documents, node 2 a note, node 3 nothing"
for n in 1 2 3; do mkdir -p "$(vol $n)"; done
python3 tools/gen-data.py media "$(vol 1)/clips" --scale 0.02
python3 tools/gen-data.py small "$(vol 1)/docs" --scale 0.01
echo "written on node 2" > "$(vol 2)/note.txt"

step "Starting three nodes (QUIC on $(ip 1)..3:7029, status on :7030; default heartbeat and debounce)"
for n in 1 2 3; do
  peers=()
  for m in 1 2 3; do [ "$m" = "$n" ] || peers+=(--peer "$(ip $m):7029"); done
  "$shoal" serve --data-root "$work/node$n/volumes" --state-dir "$work/node$n/state" --volume media \
    --listen "$(ip $n):7029" --http "$(ip $n):7030" --credentials "$work/credentials" \
    "${peers[@]}" > "$work/node$n.log" 2>&1 &
  pids+=($!)
done

status_field() {
  "$shoal" status --http "$(ip $1):7030" --json 2>/dev/null |
    python3 -c "import json,sys; s=json.load(sys.stdin); print($2)" 2>/dev/null || true
}
root() { status_field "$1" 's["volumes"][0]["root"]'; }
# Waits until all three roots are equal.
wait_converged() {
  local start=$SECONDS
  while (( SECONDS - start < 120 )); do
    local r1 r2 r3; r1=$(root 1); r2=$(root 2); r3=$(root 3)
    if [ -n "$r1" ] && [ "$r1" = "$r2" ] && [ "$r2" = "$r3" ]; then
      echo "converged in $(( SECONDS - start )) s: every node's root is ${r1:0:16}..."; return 0
    fi
    sleep 0.5
  done
  echo "did not converge; logs:"; tail -n 20 "$work"/node*.log; return 1
}
count() { find "$(vol $1)" -path "$(vol $1)/.shoal" -prune -o -type f -print | wc -l; }
# Runs a change on one node, then reports how long after the command returned the
# result is visible (and correct) on the other two:
# `live FROM "description" PYTHON-CHECK COMMAND...`. The check is evaluated with `root`
# set to a node's volume directory.
live() {
  local from=$1 what=$2 check=$3; shift 3
  local others=() ; for m in 1 2 3; do [ "$m" = "$from" ] || others+=("$m:$(vol $m)"); done
  echo "node $from: $what"
  python3 - "$check" "${#others[@]}" "${others[@]}" "$@" <<'EOF'
import os, subprocess, sys, time
check, count = sys.argv[1], int(sys.argv[2])
nodes, command = [n.split(":", 1) for n in sys.argv[3:3 + count]], sys.argv[3 + count:]
subprocess.run(command, check=True)
start, pending = time.monotonic(), dict(nodes)
while pending and time.monotonic() - start < 60:
    for node, root in list(pending.items()):
        try:
            ok = eval(check, {"os": os, "root": root, "read": lambda p: open(os.path.join(root, p), "rb").read()})
        except OSError:
            ok = False
        if ok:
            print(f"  -> on node {node} after {time.monotonic() - start:.2f} s")
            del pending[node]
    time.sleep(0.01)
for node in pending:
    print(f"  -> NOT on node {node} after 60 s")
sys.exit(1 if pending else 0)
EOF
}

step "Waiting for the three nodes to converge (initial sync)"
wait_converged
for n in 1 2 3; do echo "node $n: $(count $n) files"; done

step "Live changes: no trigger, no rescan of the world"
live 1 "writes report.txt" 'read("report.txt") == b"quarterly numbers\n"' \
  sh -c "echo 'quarterly numbers' > '$(vol 1)/report.txt'"
live 2 "appends to report.txt" 'read("report.txt").endswith(b"reviewed on node 2\n")' \
  sh -c "echo 'reviewed on node 2' >> '$(vol 2)/report.txt'"
live 3 "renames the ~20 MiB clips directory (peers reuse their own chunks)" \
  'os.path.isdir(os.path.join(root, "footage")) and not os.path.exists(os.path.join(root, "clips"))' \
  mv "$(vol 3)/clips" "$(vol 3)/footage"
live 1 "writes a 5 MiB file" 'os.path.getsize(os.path.join(root, "new.bin")) == 5 << 20' \
  sh -c "head -c 5M /dev/urandom > '$(vol 1)/new.tmp' && mv '$(vol 1)/new.tmp' '$(vol 1)/new.bin'"
live 2 "deletes a directory of documents" 'not os.path.exists(os.path.join(root, "docs/dir00"))' \
  rm -rf "$(vol 2)/docs/dir00"
wait_converged

step "What moved"
printf '%-6s %7s %16s %16s %14s %14s\n' node files "chunk bytes in" "chunk bytes out" "files applied" "local changes"
for n in 1 2 3; do
  printf '%-6s %7s %16s %16s %14s %14s\n' "$n" "$(count $n)" \
    "$(status_field $n 's["totals"]["chunk_bytes_received"]')" "$(status_field $n 's["totals"]["chunk_bytes_sent"]')" \
    "$(status_field $n 's["totals"]["files_applied"]')" "$(status_field $n 's["totals"]["local_changes"]')"
done

step "Stopping the nodes (SIGTERM: they drain and flush their index)"
for pid in "${pids[@]}"; do kill -TERM "$pid"; done
for pid in "${pids[@]}"; do wait "$pid" || true; done
left=0
for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && left=$((left + 1)); done
for n in 1 2 3; do
  python3 -c 'import socket, sys
for kind, port in ((socket.SOCK_DGRAM, 7029), (socket.SOCK_STREAM, 7030)):
    s = socket.socket(socket.AF_INET, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a server would
    s.bind((sys.argv[1], port))' "$(ip $n)" || left=$((left + 1))
done
pids=()
rm -rf "$work"
if (( left )) || [ -e "$work" ]; then
  echo "something was left behind"; exit 1
fi
echo "stopped: no process, port or temporary directory left behind"
