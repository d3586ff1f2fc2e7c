#!/usr/bin/env python3
"""What a collection costs in memory when the kept versions reference many chunks:
`shoal gc` on one node's store, run by two builds on copies of the same store.

    python3 tools/bench-gc-memory.py --before OLD_SHOAL --after NEW_SHOAL [--mib 128] [--work DIR]

Two `shoal serve` nodes on 127.0.0.1-2 with tiny chunks (64/256/1024 bytes, so that a
few hundred MiB hold millions of chunks). Node A writes MIB of random files under `d/`,
both nodes agree; A renames `d` to `e` and rewrites one file, both agree again. Node B
then keeps a version of every old name (issue 14: a received rename keeps the old
names), whose chunks (about 4,000 a MiB) are live under the new names, and the rewritten
file's old chunks in a version pack (the rename and the rewrite are synced one after
the other). B is stopped, and each build runs `shoal gc`
(default retention: every version kept) on its own copy of B's state directory under
`/usr/bin/time -v`: the peak RSS and the time of each. A build that holds every chunk
id the versions reference grows with MIB; one that holds only the ids of the packs it
collects does not.

Every process started here is stopped by PID; the work directory is removed at the end.
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

from benchlib import (free_port, maxrss_kib, run_checked, shoal_nodes_agree, spawn, stop, stop_all,
                      wait_for)

SIDES = ("A", "B")
IPS = {"A": "127.0.0.1", "B": "127.0.0.2"}
FILE_MIB = 8


def write_file(path, rng):
    temp = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(path))), "next")
    data = rng.randbytes(FILE_MIB << 20)
    with open(temp, "wb") as f:
        f.write(data)
    os.rename(temp, path)
    return data


def holds(path, data):
    try:
        with open(path, "rb") as f:
            return f.read() == data
    except OSError:
        return False


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="the shoal binary to compare against")
    parser.add_argument("--after", required=True, help="the shoal binary measured")
    parser.add_argument("--mib", type=int, default=128)
    parser.add_argument("--work", help="parent of the temporary work directory")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="bench-gc-memory-", dir=args.work)
    procs = {}
    env = dict(os.environ, SHOAL_CHUNK_SIZES="64/256/1024")
    try:
        creds = os.path.join(work, "credentials")
        run_checked([args.after, "cluster", "init", "--out", creds], timeout=60)
        vols = {s: os.path.join(work, s, "vol") for s in SIDES}
        states = {s: os.path.join(work, f"state-{s}") for s in SIDES}
        quic = {s: free_port(IPS[s], "udp") for s in SIDES}
        http = {s: free_port("127.0.0.1", "tcp") for s in SIDES}
        rng = random.Random(14)
        for s in SIDES:
            os.makedirs(vols[s])
        os.makedirs(os.path.join(vols["A"], "d"))
        for i in range(max(1, args.mib // FILE_MIB)):
            write_file(os.path.join(vols["A"], "d", f"f{i:03}.bin"), rng)
        for s in SIDES:
            other = "B" if s == "A" else "A"
            cmd = [args.after, "serve", "--data-root", os.path.dirname(vols[s]),
                   "--state-dir", states[s], "--volume", "vol",
                   "--listen", f"{IPS[s]}:{quic[s]}", "--credentials", creds,
                   "--http", f"127.0.0.1:{http[s]}", "--peer", f"{IPS[other]}:{quic[other]}"]
            procs[s] = spawn(cmd, os.path.join(work, f"shoal-{s}.log"), env=env)
        watched = [(p, os.path.join(work, f"shoal-{s}.log")) for s, p in procs.items()]
        agree = lambda: shoal_nodes_agree(http[s] for s in SIDES)
        began = time.monotonic()
        wait_for(agree, 3600, "the initial sync", watched, interval=1)
        print(f"initial sync of {args.mib} MiB: {time.monotonic() - began:.0f} s", flush=True)
        began = time.monotonic()
        os.rename(os.path.join(vols["A"], "d"), os.path.join(vols["A"], "e"))
        time.sleep(3)
        moved = lambda: (os.path.isdir(os.path.join(vols["B"], "e"))
                         and not os.path.exists(os.path.join(vols["B"], "d")) and agree())
        wait_for(moved, 3600, "the rename", watched, interval=1)
        print(f"rename synced: {time.monotonic() - began:.0f} s", flush=True)
        began = time.monotonic()
        data = write_file(os.path.join(vols["A"], "e", "f000.bin"), rng)
        rewritten = lambda: holds(os.path.join(vols["B"], "e", "f000.bin"), data) and agree()
        wait_for(rewritten, 3600, "the rewrite", watched, interval=1)
        print(f"rewrite synced: {time.monotonic() - began:.0f} s", flush=True)
        for s in SIDES:
            stop(procs.pop(s))
        listed = subprocess.run([args.after, "versions", "vol/d", "--json", "--data-root",
                                 os.path.dirname(vols["B"]), "--state-dir", states["B"],
                                 "--volume", "vol"], capture_output=True, text=True, env=env)
        if listed.returncode != 0:
            print(listed.stderr)
            return 1
        listing = json.loads(listed.stdout)
        chunks = sum(v["chunks"] for v in listing["versions"])
        packs = os.path.join(states["B"], "packs")
        pack_bytes = sum(os.path.getsize(os.path.join(packs, n)) for n in os.listdir(packs))
        print(f"B keeps {len(listing['versions'])} versions referencing {chunks:,} chunks; "
              f"its version packs: {pack_bytes / (1 << 20):.1f} MiB")
        for label, binary in (("before", args.before), ("after", args.after)):
            copy = os.path.join(work, f"state-{label}")
            shutil.copytree(states["B"], copy, ignore=shutil.ignore_patterns("control"))
            began = time.monotonic()
            out = subprocess.run(["/usr/bin/time", "-v", binary, "gc", "--data-root",
                                  os.path.dirname(vols["B"]), "--state-dir", copy, "--volume", "vol"],
                                 capture_output=True, text=True, env=env, check=False)
            took = time.monotonic() - began
            if out.returncode != 0:
                print(out.stdout, out.stderr)
                return 1
            print(f"{label}: shoal gc peak RSS {maxrss_kib(out.stderr) / 1024:.1f} MiB, "
                  f"{took:.1f} s ({binary})", flush=True)
            shutil.rmtree(copy)
        print(f"load: {open('/proc/loadavg').read().split()[:3]}")
        return 0
    finally:
        for p in procs.values():
            stop(p)
        stop_all()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
