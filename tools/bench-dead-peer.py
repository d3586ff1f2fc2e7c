#!/usr/bin/env python3
"""Latency with a frozen peer: how long a change takes from node A to node B while
node C of the same three-node cluster is frozen (SIGSTOP).

    python3 tools/bench-dead-peer.py [--trials 25] [--shoal PATH] [--work DIR]
                                     [--log LEVEL --keep]

Three `shoal serve` nodes on 127.0.0.1-3 with default settings (debounce 200 ms,
heartbeat 25 s). Each trial: freeze C, wait a moment chosen from 0 to 6 s (0: C still
looks connected and live; 1.5 s: it has gone silent; 6 s: its connections have timed
out and are being opened again), write a new file on A and time until its content is
readable on B, then the same from B to A; thaw C and let the three agree before the
next trial. Reported: for each direction and for all changes, the count, p50, p99,
maximum and how many took over 2 s, and the load average before and after. Issue 17's
acceptance is "within 2 s, every time".

`--log debug --keep` runs the nodes with that log level and keeps the work directory
(its `shoal-{A,B,C}.log` hold every step with a timestamp) for a look at a slow change.

Every process started here is stopped by PID (a frozen one is thawed first); the work
directory is removed at the end (unless --keep).
"""

import argparse
import datetime
import os
import shutil
import signal
import sys
import tempfile
import time

from benchlib import free_port, http_json, run_checked, shoal_nodes_agree, spawn, stop, stop_all, wait_for

SIDES = ("A", "B", "C")
IPS = {"A": "127.0.0.1", "B": "127.0.0.2", "C": "127.0.0.3"}
DELAYS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


class Cluster:
    def __init__(self, work, binary, log_level):
        self.work, self.procs, self.frozen = work, {}, set()
        creds = os.path.join(work, "credentials")
        run_checked([binary, "cluster", "init", "--out", creds], timeout=60)
        self.dirs = {s: os.path.join(work, s, "vol") for s in SIDES}
        quic = {s: free_port(IPS[s], "udp") for s in SIDES}
        self.http = {s: free_port("127.0.0.1", "tcp") for s in SIDES}
        for s in SIDES:
            os.makedirs(self.dirs[s])
            cmd = [binary, "serve", "--data-root", os.path.dirname(self.dirs[s]),
                   "--state-dir", os.path.join(work, f"state-{s}"), "--volume", "vol",
                   "--listen", f"{IPS[s]}:{quic[s]}", "--credentials", creds,
                   "--http", f"127.0.0.1:{self.http[s]}"]
            for o in SIDES:
                if o != s:
                    cmd += ["--peer", f"{IPS[o]}:{quic[o]}"]
            env = dict(os.environ, SHOAL_LOG=log_level) if log_level else None
            self.procs[s] = spawn(cmd, os.path.join(work, f"shoal-{s}.log"), env=env)

    def watched(self):
        """The nodes as `wait_for` watches them: (process, log), to fail if one dies."""
        return [(p, os.path.join(self.work, f"shoal-{s}.log")) for s, p in self.procs.items()]

    def settled(self):
        """The three agree and each lists both others as connected (before discovery
        fills a node's peer list, an empty one would pass for "all connected")."""
        try:
            listed = all(len(http_json(f"http://127.0.0.1:{self.http[s]}/status", timeout=2)["peers"]) == 2
                         for s in SIDES)
        except (OSError, ValueError):
            return False
        return listed and shoal_nodes_agree(self.http[s] for s in SIDES)

    def freeze(self, side):
        os.kill(self.procs[side].pid, signal.SIGSTOP)
        self.frozen.add(side)

    def thaw(self, side):
        os.kill(self.procs[side].pid, signal.SIGCONT)
        self.frozen.discard(side)

    def stop(self):
        for side in list(self.frozen):
            self.thaw(side)
        for proc in self.procs.values():
            stop(proc)


def travel(cluster, src, dst, name, content, bound=60):
    """Seconds from writing `name` on `src` until `dst` has it (None past `bound`)."""
    with open(os.path.join(cluster.dirs[src], name), "wb") as f:
        f.write(content)
    start = time.monotonic()
    target = os.path.join(cluster.dirs[dst], name)
    while time.monotonic() - start < bound:
        try:
            with open(target, "rb") as f:
                if f.read() == content:
                    return time.monotonic() - start
        except OSError:
            pass
        time.sleep(0.005)
    return None


def percentile(seen, q):
    """The q-th percentile (nearest rank) of sorted `seen`."""
    return seen[min(len(seen) - 1, max(0, -(-len(seen) * q // 100) - 1))]


def summary_row(label, times):
    seen = sorted(t for t in times if t is not None)
    slow = sum(1 for t in times if t is None or t > 2)
    ms = lambda t: f"{t * 1000:.0f} ms"  # noqa: E731
    p50 = ms(percentile(seen, 50)) if seen else "-"
    p99 = ms(percentile(seen, 99)) if seen else "-"
    worst = "never" if None in times else ms(max(times)) if times else "-"
    return f"| {label} | {len(times)} | {p50} | {p99} | {worst} | {slow} |"


def load():
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=25)
    parser.add_argument("--shoal", default=os.path.join(
        os.environ.get("CARGO_TARGET_DIR", "/var/cache/shoal/target"), "release", "shoal"))
    parser.add_argument("--work", help="parent of the temporary work directory")
    parser.add_argument("--log", help="SHOAL_LOG of the nodes (e.g. debug)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory and its logs")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    work = tempfile.mkdtemp(prefix="shoal-bench-dead-peer.", dir=args.work)
    cluster = None
    results = {"A->B": [], "B->A": []}
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    load_before = load()
    print(f"{started}, {load_before}, {args.shoal}", file=sys.stderr, flush=True)
    try:
        cluster = Cluster(work, args.shoal, args.log)
        wait_for(cluster.settled, 120, "the three nodes to connect and agree", cluster.watched())
        for trial in range(args.trials):
            delay = DELAYS[trial % len(DELAYS)]
            cluster.freeze("C")
            time.sleep(delay)
            for (src, dst) in (("A", "B"), ("B", "A")):
                wall = datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M:%S.%f")[:-3]
                took = travel(cluster, src, dst, f"t{trial}-{src}.txt", f"trial {trial} {time.time()}".encode())
                results[f"{src}->{dst}"].append(took)
                print(f"trial {trial} ({wall}): C frozen {delay:.1f} s before, {src}->{dst} in "
                      f"{'never' if took is None else f'{took * 1000:.0f} ms'}", file=sys.stderr, flush=True)
            cluster.thaw("C")
            wait_for(cluster.settled, 120, "the three nodes to agree again", cluster.watched())
    finally:
        if cluster:
            cluster.stop()
        stop_all()
        if args.keep:
            print(f"logs kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{started}; before: {load_before}; after: {load()}")
    print("| direction (C frozen) | changes | p50 | p99 | max | over 2 s |")
    print("|---|---|---|---|---|---|")
    for direction, times in results.items():
        print(summary_row(direction, times))
    print(summary_row("all", results["A->B"] + results["B->A"]))


if __name__ == "__main__":
    main()
