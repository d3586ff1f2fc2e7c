#!/usr/bin/env bash
# How closely --max-rate holds a transfer: node B (capped at RATE) pulls a SIZE_MIB file
# of random bytes from node A over loopback; prints the elapsed time from the write to
# its arrival and the rate achieved. Usage: tools/bench-rate.sh [SHOAL] [RATE] [SIZE_MIB]
set -euo pipefail
shoal=${1:-target/release/shoal}
rate=${2:-20MiB}
size=${3:-500}
dir=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait; rm -rf "$dir"; }
trap cleanup EXIT
"$shoal" cluster init --out "$dir/creds" >/dev/null
for n in a b; do mkdir -p "$dir/$n/data/vol"; done
start() { # name ip peer-ip extra-args...
  local n=$1 ip=$2 peer=$3; shift 3
  SHOAL_NODE_NAME=$n "$shoal" serve --data-root "$dir/$n/data" --state-dir "$dir/$n/state" \
    --volume vol --listen "$ip:7029" --http "$ip:7030" --peer "$peer:7029" \
    --credentials "$dir/creds" --heartbeat 5 "$@" 2>"$dir/$n.log" &
  pids+=($!)
}
start a 127.0.77.1 127.0.77.2
start b 127.0.77.2 127.0.77.1 --max-rate "$rate"
for i in $(seq 100); do
  curl -sf http://127.0.77.2:7030/status | grep -q '"connected":true' && break; sleep 0.2
done
head -c "$((size << 20))" /dev/urandom > "$dir/file"
t0=$(date +%s.%N)
mv "$dir/file" "$dir/a/data/vol/file"
until [ "$(stat -c %s "$dir/b/data/vol/file" 2>/dev/null || echo 0)" = "$((size << 20))" ]; do sleep 0.05; done
t1=$(date +%s.%N)
python3 -c "
e=$t1-$t0; print(f'{$size} MiB at --max-rate $rate: {e:.2f} s, {$size/e:.2f} MiB/s')"
