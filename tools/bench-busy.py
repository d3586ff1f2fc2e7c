#!/usr/bin/env python3
"""Busy files: how far behind node B is while node A writes a log appended to every
50 ms, and while A rewrites a 64 MiB file in place every 50 ms.

    python3 tools/bench-busy.py [--seconds 60] [--shoal PATH] [--work DIR]

Two `shoal serve` nodes on 127.0.0.1-2 with default settings (debounce 200 ms,
heartbeat 25 s). Issue 16's acceptance:

- log: A appends one line every 50 ms for `--seconds`; every 100 ms B's copy is read
  and checked to be a prefix of whole lines of what A wrote. Its lag is the age of the
  newest line B holds, against when A wrote the line after it (0 when B is current).
  Target: never more than 2 s behind.
- rewrite: A rewrites a 64 MiB file in place (one write, then fdatasync) every 50 ms
  for `--seconds`, each version carrying its number; every 250 ms B's copy is read and
  checked to be exactly one of the versions written. Reported: the longest time B went
  without a newer version. Target: a newer version at least every 10 s, never a torn
  one.

Every process started here is stopped by PID; the work directory is removed at the end.
"""

import argparse
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time

from benchlib import free_port, run_checked, shoal_nodes_agree, spawn, stop, stop_all, wait_for

SIDES = ("A", "B")
IPS = {"A": "127.0.0.1", "B": "127.0.0.2"}
PERIOD = 0.05
SIZE = 64 << 20


class Pair:
    def __init__(self, work, binary):
        self.work, self.procs = work, {}
        creds = os.path.join(work, "credentials")
        run_checked([binary, "cluster", "init", "--out", creds], timeout=60)
        self.dirs = {s: os.path.join(work, s, "vol") for s in SIDES}
        quic = {s: free_port(IPS[s], "udp") for s in SIDES}
        self.http = {s: free_port("127.0.0.1", "tcp") for s in SIDES}
        for s in SIDES:
            os.makedirs(self.dirs[s])
            other = [o for o in SIDES if o != s][0]
            cmd = [binary, "serve", "--data-root", os.path.dirname(self.dirs[s]),
                   "--state-dir", os.path.join(work, f"state-{s}"), "--volume", "vol",
                   "--listen", f"{IPS[s]}:{quic[s]}", "--credentials", creds,
                   "--http", f"127.0.0.1:{self.http[s]}", "--peer", f"{IPS[other]}:{quic[other]}"]
            self.procs[s] = spawn(cmd, os.path.join(work, f"shoal-{s}.log"))

    def watched(self):
        return [(p, os.path.join(self.work, f"shoal-{s}.log")) for s, p in self.procs.items()]

    def settled(self):
        return shoal_nodes_agree(self.http[s] for s in SIDES)

    def stop(self):
        for proc in self.procs.values():
            stop(proc)


def line(i):
    return f"{i:08} GET /api/items/{i * 7919 % 100000} 200 {'x' * (40 + i % 17)}\n".encode()


def bench_log(pair, seconds):
    """Appends a line every 50 ms; returns B's lag samples (s) and any torn reads."""
    written_at = []  # monotonic time each line was written
    done = threading.Event()

    def writer():
        with open(os.path.join(pair.dirs["A"], "app.log"), "ab", buffering=0) as log:
            start = time.monotonic()
            i = 0
            while time.monotonic() - start < seconds:
                log.write(line(i))
                written_at.append(time.monotonic())
                i += 1
                time.sleep(PERIOD)
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    lags, torn = [], 0
    target = os.path.join(pair.dirs["B"], "app.log")
    while not done.is_set():
        time.sleep(0.1)
        now, count = time.monotonic(), len(written_at)
        try:
            with open(target, "rb") as f:
                text = f.read()
        except OSError:
            text = b""
        lines = text.split(b"\n")
        if lines[-1] != b"" or any(lines[i] + b"\n" != line(i) for i in range(len(lines) - 1)):
            torn += 1
            continue
        held = len(lines) - 1
        # Behind since the first line B lacks was written.
        lags.append(0.0 if held >= count else now - written_at[held])
    thread.join()
    return lags, torn


def version(base, v):
    data = bytearray(base)
    stamp = v.to_bytes(8, "little")
    for at in range(0, len(data), 1 << 20):
        data[at:at + 8] = stamp
    return bytes(data)


def bench_rewrite(pair, seconds):
    """Rewrites 64 MiB in place every 50 ms; returns (longest gap between newer versions
    on B, versions written, versions B held, torn reads)."""
    base = random.Random(64).randbytes(SIZE)
    path = os.path.join(pair.dirs["A"], "db.bin")
    with open(path, "wb") as f:
        f.write(version(base, 0))
    wait_for(lambda: os.path.exists(os.path.join(pair.dirs["B"], "db.bin")), 120,
             "the first version to reach B", pair.watched())
    written = [1]
    done = threading.Event()

    def writer():
        fd = os.open(path, os.O_WRONLY)
        start = time.monotonic()
        v = 1
        while time.monotonic() - start < seconds:
            data = version(base, v)
            written[0] = v + 1
            os.pwrite(fd, data, 0)
            os.fdatasync(fd)
            v += 1
            time.sleep(PERIOD)
        os.close(fd)
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    target = os.path.join(pair.dirs["B"], "db.bin")
    newest, newest_at, longest, held, torn = 0, time.monotonic(), 0.0, set(), 0
    while not done.is_set():
        time.sleep(0.25)
        try:
            with open(target, "rb") as f:
                data = f.read()
        except OSError:
            continue
        v = int.from_bytes(data[:8], "little") if len(data) == SIZE else -1
        if v < 0 or v >= written[0] or data != version(base, v):
            torn += 1
            continue
        held.add(v)
        now = time.monotonic()
        if v > newest:
            newest, newest_at = v, now
        longest = max(longest, now - newest_at)
    thread.join()
    return longest, written[0], len(held), torn


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--shoal", default=os.path.join(
        os.environ.get("CARGO_TARGET_DIR", "/var/cache/shoal/target"), "release", "shoal"))
    parser.add_argument("--work", help="parent of the temporary work directory")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    work = tempfile.mkdtemp(prefix="shoal-bench-busy.", dir=args.work)
    pair = None
    try:
        pair = Pair(work, args.shoal)
        wait_for(pair.settled, 120, "the two nodes to connect and agree", pair.watched())
        lags, torn_log = bench_log(pair, args.seconds)
        wait_for(pair.settled, 120, "the log to settle", pair.watched())
        longest, written, held, torn_db = bench_rewrite(pair, args.seconds)
    finally:
        if pair:
            pair.stop()
        stop_all()
        shutil.rmtree(work, ignore_errors=True)
    lags.sort()
    p50 = lags[len(lags) // 2] if lags else float("nan")
    print(f"| case ({args.seconds:.0f} s of writes every 50 ms) | result | target |")
    print("|---|---|---|")
    print(f"| log: B behind, p50 / max over {len(lags)} checks | {p50:.2f} s / {max(lags, default=float('nan')):.2f} s | max 2 s |")
    print(f"| log: torn reads on B | {torn_log} | 0 |")
    print(f"| 64 MiB rewrite: longest wait for a newer version on B | {longest:.1f} s | 10 s |")
    print(f"| 64 MiB rewrite: versions written / distinct ones B held | {written} / {held} | - |")
    print(f"| 64 MiB rewrite: B holding a version that never existed | {torn_db} | 0 |")


if __name__ == "__main__":
    main()
