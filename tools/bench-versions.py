#!/usr/bin/env python3
"""What kept versions cost: 100 successive 1-byte inserts into a 100 MiB file on node A,
each synced to node B before the next, and the room B's packs then take for the 100
versions it keeps.

    python3 tools/bench-versions.py [--inserts 100] [--size-mib 100] [--shoal PATH] [--work DIR]

Two `shoal serve` nodes on 127.0.0.1-2 with default settings. Each insert rewrites A's
file (a temporary file renamed over it, as an editor saves) with one byte inserted at a
random offset; the next waits until both nodes agree on the volume's root. Issue 14's
acceptance: the 100 versions B keeps take under 40 MiB of packs (each costs about the
chunk the byte landed in, 64 KiB on average, rather than 100 MiB). Also reported: the
versions `shoal versions --json` lists on B, and the time from each save to agreement.

Every process started here is stopped by PID; the work directory is removed at the end.
"""

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time

from benchlib import free_port, run_checked, shoal_nodes_agree, spawn, stop, stop_all, wait_for

SIDES = ("A", "B")
IPS = {"A": "127.0.0.1", "B": "127.0.0.2"}


def packs_bytes(state):
    packs = os.path.join(state, "packs")
    return sum(os.path.getsize(os.path.join(packs, n)) for n in os.listdir(packs)
               if n.endswith(".pack"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inserts", type=int, default=100)
    parser.add_argument("--size-mib", type=int, default=100)
    parser.add_argument("--shoal", default=os.path.join(
        os.environ.get("CARGO_TARGET_DIR", "/var/cache/shoal/target"), "release", "shoal"))
    parser.add_argument("--work", help="parent of the temporary work directory")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="bench-versions-", dir=args.work)
    procs = {}
    try:
        creds = os.path.join(work, "credentials")
        run_checked([args.shoal, "cluster", "init", "--out", creds], timeout=60)
        vols = {s: os.path.join(work, s, "vol") for s in SIDES}
        states = {s: os.path.join(work, f"state-{s}") for s in SIDES}
        quic = {s: free_port(IPS[s], "udp") for s in SIDES}
        http = {s: free_port("127.0.0.1", "tcp") for s in SIDES}
        rng = random.Random(14)
        data = bytearray(rng.randbytes(args.size_mib << 20))
        os.makedirs(vols["A"])
        os.makedirs(vols["B"])
        target = os.path.join(vols["A"], "big.bin")
        with open(target, "wb") as f:
            f.write(data)
        for s in SIDES:
            other = "B" if s == "A" else "A"
            cmd = [args.shoal, "serve", "--data-root", os.path.dirname(vols[s]),
                   "--state-dir", states[s], "--volume", "vol",
                   "--listen", f"{IPS[s]}:{quic[s]}", "--credentials", creds,
                   "--http", f"127.0.0.1:{http[s]}", "--peer", f"{IPS[other]}:{quic[other]}"]
            procs[s] = spawn(cmd, os.path.join(work, f"shoal-{s}.log"))
        watched = [(p, os.path.join(work, f"shoal-{s}.log")) for s, p in procs.items()]
        agree = lambda: shoal_nodes_agree(http[s] for s in SIDES)
        wait_for(agree, 600, "the initial sync", watched)
        start_packs = packs_bytes(states["B"])
        waits = []
        temp = os.path.join(work, "A", "next")
        for i in range(args.inserts):
            at = rng.randrange(len(data) + 1)
            data[at:at] = bytes([rng.randrange(256)])
            with open(temp, "wb") as f:
                f.write(data)
            began = time.monotonic()
            os.rename(temp, target)
            expected = len(data)
            wait_for(lambda: agree() and os.path.getsize(os.path.join(vols["B"], "big.bin")) == expected,
                     600, f"insert {i + 1} on B", watched)
            waits.append(time.monotonic() - began)
        listing = run_checked([args.shoal, "versions", "vol/big.bin", "--json",
                               "--state-dir", states["B"]], timeout=120)
        versions = json.loads(listing)["versions"]
        held = packs_bytes(states["B"]) - start_packs
        waits.sort()
        print(f"file: {args.size_mib} MiB, {args.inserts} one-byte inserts, each synced before the next")
        print(f"versions kept on B: {len(versions)} (all held here: "
              f"{all(v['held'] == 'here' for v in versions)})")
        print(f"B's packs grew by {held / (1 << 20):.2f} MiB "
              f"({held / max(1, len(versions)) / 1024:.1f} KiB a version); target under 40 MiB")
        print(f"save to agreement: p50 {waits[len(waits) // 2]:.2f} s, max {waits[-1]:.2f} s")
        return 0 if held < 40 << 20 and len(versions) == args.inserts else 1
    finally:
        for p in procs.values():
            stop(p)
        stop_all()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
