#!/usr/bin/env python3
"""/status under load: how fast a node answers `/status` during its start-up scan and
during a first sync of a large volume, and whether the progress it shows only grows and
carries an ETA (issue 15's acceptance: within 1 s, monotonic progress, an ETA, then "in
sync").

    python3 tools/bench-status.py --shoal PATH [--files 100000] [--big-mib 500] [--work DIR]

Node A's volume holds FILES tiny files (tools/gen-data.py `million` profile, scaled) and
BIG_MIB MiB in 10 MiB files. Phase 1 starts A and asks its /status 5 times a second until
its start-up scan has indexed everything. Phase 2 starts B (empty) with A as its peer and
asks B's /status 5 times a second until B is in sync with A. Reported per phase: answers,
the slowest and median answer, answers showing a round under way, with an ETA, and any
step back in a round's progress.

Every process started here is stopped by PID; the work directory is removed at the end
unless --work names one.
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

from benchlib import ensure_data, free_port, http_json, run_checked, spawn, stop, stop_all


def poll(port, until, bound):
    """Asks /status every 0.2 s until `until(status)` or `bound` s; what it saw."""
    seen = {"latencies": [], "rounds": 0, "eta": 0, "steps_back": 0, "starting": 0, "failures": 0}
    last = {}
    start = time.monotonic()
    while time.monotonic() - start < bound:
        asked = time.monotonic()
        try:
            status = http_json(f"http://127.0.0.1:{port}/status", timeout=10)
        except OSError:
            # Before the first answer the process is still starting (no listener yet).
            seen["failures" if seen["latencies"] else "starting"] += 1
            time.sleep(0.2)
            continue
        seen["latencies"].append(time.monotonic() - asked)
        for peer in status["peers"]:
            for v in peer["volumes"]:
                r = v.get("round")
                if not r:
                    continue
                seen["rounds"] += 1
                seen["eta"] += r["eta_seconds"] is not None
                key = (peer["addr"], v["volume"], r["started"])
                if r["entries_done"] < last.get(key, 0):
                    seen["steps_back"] += 1
                last[key] = r["entries_done"]
        if until(status):
            seen["seconds"] = time.monotonic() - start
            return seen
        time.sleep(max(0.0, 0.2 - (time.monotonic() - asked)))
    raise SystemExit(f"not done within {bound} s")


def report(phase, seen):
    lat = seen["latencies"]
    print(f"{phase}: {seen['seconds']:.1f} s, {len(lat)} answers ({seen['failures']} not answered "
          f"once up, {seen['starting']} asked before the endpoint was up), "
          f"slowest {max(lat) * 1000:.0f} ms, median {statistics.median(lat) * 1000:.0f} ms, "
          f"{seen['rounds']} showing a round under way ({seen['eta']} with an ETA), "
          f"{seen['steps_back']} steps back in progress")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shoal", required=True)
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--big-mib", type=int, default=500)
    ap.add_argument("--work")
    args = ap.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="shoal-bench-status-")
    try:
        creds = os.path.join(work, "credentials")
        if not os.path.isdir(creds):
            run_checked([args.shoal, "cluster", "init", "--out", creds], timeout=60)
        vol_a = os.path.join(work, "a", "vol")
        ensure_data(os.path.join(vol_a, "small"), "million", args.files / 1_000_000)
        big = os.path.join(vol_a, "big")
        os.makedirs(big, exist_ok=True)
        for i in range(args.big_mib // 10):
            path = os.path.join(big, f"{i}.bin")
            if not os.path.exists(path):
                with open(path, "wb") as f:
                    f.write(os.urandom(10 << 20))
        expected = sum(len(files) for _, _, files in os.walk(vol_a))
        os.makedirs(os.path.join(work, "b", "vol"), exist_ok=True)
        quic = {s: free_port(ip, "udp") for s, ip in (("a", "127.0.0.1"), ("b", "127.0.0.2"))}
        http = {s: free_port("127.0.0.1", "tcp") for s in "ab"}
        ips = {"a": "127.0.0.1", "b": "127.0.0.2"}

        def start(side, peer):
            shutil.rmtree(os.path.join(work, f"state-{side}"), ignore_errors=True)
            cmd = [args.shoal, "serve", "--data-root", os.path.join(work, side),
                   "--state-dir", os.path.join(work, f"state-{side}"), "--volume", "vol",
                   "--listen", f"{ips[side]}:{quic[side]}", "--credentials", creds,
                   "--http", f"127.0.0.1:{http[side]}", "--peer", f"{ips[peer]}:{quic[peer]}"]
            return spawn(cmd, os.path.join(work, f"shoal-{side}.log"))

        print(f"volume: {expected} files ({args.files} tiny, {args.big_mib} MiB in 10 MiB files)")
        a = start("a", "b")
        scanned = poll(http["a"], lambda s: s["volumes"][0]["files"] == expected, 1800)
        report("A's start-up scan", scanned)
        b = start("b", "a")

        def in_sync(status):
            vols = [v for p in status["peers"] for v in p["volumes"]]
            return status["volumes"][0]["files"] == expected and any(v["state"] == "in_sync" for v in vols)

        pulled = poll(http["b"], in_sync, 3600)
        report("B's first sync", pulled)
        stop(a)
        stop(b)
    finally:
        stop_all()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
