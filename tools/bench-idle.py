#!/usr/bin/env python3
"""What an idle `shoal serve` costs: CPU seconds per minute of one node on a large volume.

    tools/bench-idle.py [--dir /var/tmp/shoal-bench] [--scale 1] [--minutes 3]
                        [--heartbeat 25] [--baseline SHOAL] [--shoal SHOAL]

The volume is the `million` data set of tools/gen-data.py (1,000,000 files of 10-200
bytes in 1,000 directories; `--scale 0.1` for a quick run), generated once into DIR and
kept. For each binary (`--baseline`, if given, then this build's release binary or
`--shoal`) a node starts with a fresh state directory and no peers, the default
heartbeat unless `--heartbeat` says otherwise, and its watcher on the volume. Once its
start scan is done and one more heartbeat has gone by, nothing touches the volume for
`--minutes`: the node's utime + stime (/proc/PID/stat) over that time, per minute, is
its idle cost. Prints one line per binary.
"""

import argparse
import atexit
import os
import sys
import tempfile
import time

from benchlib import (build_shoal, ensure_data, free_port, http_json, run_checked, spawn, stop, stop_all,
                      wait_for)

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    """utime + stime of the process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # After the command name: state is field 3, utime field 14 and stime field 15.
    return (int(fields[11]) + int(fields[12])) / TICKS


def idle_cost(shoal, data_root, volume, heartbeat, minutes, work):
    """CPU seconds per minute of an idle node running `shoal`, and its start scan's seconds."""
    creds = os.path.join(work, "credentials")
    run_checked([shoal, "cluster", "init", "--out", creds], timeout=60)
    http = free_port("127.0.0.1", "tcp")
    log = os.path.join(work, "node.log")
    cmd = [shoal, "serve", "--data-root", data_root, "--volume", volume,
           "--state-dir", os.path.join(work, "state"), "--credentials", creds,
           "--listen", f"127.0.0.1:{free_port('127.0.0.1', 'udp')}", "--http", f"127.0.0.1:{http}"]
    if heartbeat is not None:
        cmd += ["--heartbeat", str(heartbeat)]
    env = dict(os.environ, SHOAL_LOG="info")
    for name in ("SYNC_VOLUMES", "SHOAL_PEERS", "HEARTBEAT"):
        env.pop(name, None)
    proc = spawn(cmd, log, env=env)
    started = time.monotonic()
    try:
        def scanned():
            try:
                return http_json(f"http://127.0.0.1:{http}/status", timeout=5)["volumes"][0]["root"]
            except (OSError, ValueError):
                return None
        wait_for(scanned, 3600, "the start scan", [(proc, log)], interval=1)
        scan_seconds = time.monotonic() - started
        # The first heartbeat's rescan and the store's compactions after the start scan.
        time.sleep((heartbeat or 25) + 5)
        before, t0 = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(minutes * 60)
        after, t1 = cpu_seconds(proc.pid), time.monotonic()
        if proc.poll() is not None:
            sys.exit(f"the node exited during the measurement: see {log}")
        return (after - before) / ((t1 - t0) / 60), scan_seconds
    finally:
        stop(proc)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/var/tmp/shoal-bench")
    parser.add_argument("--scale", type=float, default=1.0, help="of the million data set (0.1: 100,000 files)")
    parser.add_argument("--minutes", type=float, default=3.0, help="measured idle time per binary")
    parser.add_argument("--heartbeat", type=int, help="seconds (default: shoal's own, 25)")
    parser.add_argument("--baseline", help="another shoal binary to measure first (main's, say)")
    parser.add_argument("--shoal", help="the shoal binary (default: this build's release binary)")
    args = parser.parse_args()
    atexit.register(stop_all)
    volume = "million" if args.scale == 1 else f"million-{args.scale:g}"
    data = ensure_data(os.path.join(args.dir, volume), "million", args.scale)
    files = sum(len(names) for _, _, names in os.walk(data))
    shoal = args.shoal or build_shoal()
    for label, binary in ([("baseline", args.baseline)] if args.baseline else []) + [("shoal", shoal)]:
        with tempfile.TemporaryDirectory(dir=args.dir, prefix="idle-") as work:
            per_minute, scan = idle_cost(binary, args.dir, volume, args.heartbeat, args.minutes, work)
        print(f"{label}: {binary}: {files:,} files, start scan {scan:.0f} s, idle "
              f"{per_minute:.2f} CPU-s per minute over {args.minutes:g} min "
              f"({per_minute / 60 * 100:.2f}% of one core)", flush=True)


if __name__ == "__main__":
    main()
