#!/usr/bin/env bash
# How closely --max-rate holds a transfer: node B (capped at RATE) pulls a SIZE_MIB file
# of random bytes from node A over loopback. B's received chunk bytes
# (shoal_chunk_bytes_received_total) are sampled every 0.5 s: the rate of the transfer
# phase is what the cap governs; the end-to-end time (write on A to the whole file on B)
# adds A's scan and B's publication. With NEW_RATE, `shoal set max-rate NEW_RATE` is sent
# to B once half the file has arrived, and each half's rate is reported.
# Usage: tools/bench-rate.sh [SHOAL] [RATE] [SIZE_MIB] [NEW_RATE]
set -euo pipefail
shoal=${1:-target/release/shoal}
rate=${2:-20MiB}
size=${3:-500}
new_rate=${4:-}
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
received() {
  curl -sf http://127.0.77.2:7030/metrics |
    awk '$1 == "shoal_chunk_bytes_received_total" { print $2 }'
}
head -c "$((size << 20))" /dev/urandom > "$dir/file"
base=$(received)
t0=$(date +%s.%N)
mv "$dir/file" "$dir/a/data/vol/file"
changed=""
: > "$dir/samples"
for i in $(seq 36000); do  # at most 5 hours
  now=$(date +%s.%N)
  bytes=$(( $(received) - base ))
  echo "$now $bytes" >> "$dir/samples"
  if [ -n "$new_rate" ] && [ -z "$changed" ] && [ "$bytes" -ge "$((size << 19))" ]; then
    "$shoal" set max-rate "$new_rate" --state-dir "$dir/b/state"
    changed=$now
  fi
  [ "$(stat -c %s "$dir/b/data/vol/file" 2>/dev/null || echo 0)" = "$((size << 20))" ] && break
  sleep 0.5
done
t1=$(date +%s.%N)
python3 - "$dir/samples" "$t0" "$t1" "$size" "$rate" "${changed:-0}" "$new_rate" <<'PY'
import sys
path, t0, t1, size, rate, changed, new_rate = sys.argv[1:]
t0, t1, size, changed = float(t0), float(t1), int(size), float(changed)
samples = [tuple(map(float, l.split())) for l in open(path) if l.strip()]
MiB = 1 << 20
def phase(points):
    """MiB/s from the first sample with bytes to the last one that added any."""
    moving = [p for p in points if p[1] > points[0][1]]
    if len(moving) < 2:
        return None
    first = max((p for p in points if p[0] < moving[0][0]), default=points[0])
    last = moving[-1]
    return (last[1] - first[1]) / MiB / (last[0] - first[0])
print(f"{size} MiB at --max-rate {rate}: {t1 - t0:.2f} s end to end, {size / (t1 - t0):.2f} MiB/s")
if changed:
    before = [p for p in samples if p[0] <= changed]
    after = [p for p in samples if p[0] >= changed]
    print(f"  transfer phase before the change: {phase(before):.2f} MiB/s (cap {rate})")
    print(f"  transfer phase after `shoal set max-rate {new_rate}`: {phase(after):.2f} MiB/s")
else:
    print(f"  transfer phase (chunk bytes received by B): {phase(samples):.2f} MiB/s (cap {rate})")
PY
