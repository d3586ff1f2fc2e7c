#!/usr/bin/env python3
"""Live propagation latency: Shoal next to lsyncd and Syncthing, in the same run.

    python3 tools/bench-live.py [--edits 200] [--interval 0.25] [--tools shoal,lsyncd,syncthing]
                                [--shoal PATH] [--work DIR] [--markdown FILE]

Each tool gets three directories A, B and C holding the same N small files, and is
started and left to settle. Then N edits are made on A, one every INTERVAL seconds:
file i is rewritten with new content (open, write, close). A poller looks at B and C
every 5 ms; an edit's latency is the time from its close() on A until the new content is
readable on both B and C. Reported: p50, p99 and the maximum over the N edits.

  shoal      three `shoal serve` nodes on 127.0.0.1-3, default settings (debounce 200 ms,
             heartbeat 25 s): the file watcher and a Notify carry each edit.
  lsyncd     one lsyncd (Debian package) with its default `delay` (15 s), two
             `default.rsync` syncs A->B and A->C (lsyncd is one-way; this is the fastest
             it can be set up for the job lsyncd_swarm does).
  syncthing  three instances, full mesh over TCP on loopback, discovery/relays off,
             file watcher on with its default delay (fsWatcherDelayS 10).

Every process started here is stopped by PID; the work directory is removed at the end.
Packages: lsyncd, rsync, syncthing (installed through tools/setup.sh).
"""

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from benchlib import REPO, SyncthingInstances, free_port, run_checked, shoal_nodes_agree, spawn, stop, stop_all, wait_for

SIDES = ("A", "B", "C")
IPS = {"A": "127.0.0.1", "B": "127.0.0.2", "C": "127.0.0.3"}


def seed(dirs, count):
    for d in dirs:
        os.makedirs(os.path.join(d, "edits"), exist_ok=True)
        for i in range(count):
            with open(os.path.join(d, "edits", f"f{i:04}.txt"), "wb") as f:
                f.write(f"initial content of file {i}\n".encode())


class Shoal:
    name = "shoal"

    def __init__(self, work, args):
        self.work, self.binary, self.procs = work, args.shoal, {}

    def start(self, edits):
        creds = os.path.join(self.work, "credentials")
        run_checked([self.binary, "cluster", "init", "--out", creds], timeout=60)
        self.dirs = {s: os.path.join(self.work, s, "bench") for s in SIDES}
        seed(self.dirs.values(), edits)
        quic = {s: free_port(IPS[s], "udp") for s in SIDES}
        self.http = {s: free_port("127.0.0.1", "tcp") for s in SIDES}
        for s in SIDES:
            cmd = [self.binary, "serve", "--data-root", os.path.dirname(self.dirs[s]),
                   "--state-dir", os.path.join(self.work, f"state-{s}"), "--volume", "bench",
                   "--listen", f"{IPS[s]}:{quic[s]}", "--credentials", creds,
                   "--http", f"127.0.0.1:{self.http[s]}"]
            for o in SIDES:
                if o != s:
                    cmd += ["--peer", f"{IPS[o]}:{quic[o]}"]
            log = os.path.join(self.work, f"shoal-{s}.log")
            self.procs[s] = (spawn(cmd, log), log)
        procs = list(self.procs.values())
        wait_for(self._settled, 120, "the three shoal nodes to connect and agree", procs, interval=0.2)
        return self.dirs

    def _settled(self):
        return shoal_nodes_agree(self.http[s] for s in SIDES)

    def stop(self):
        for proc, _ in self.procs.values():
            stop(proc)


class Lsyncd:
    name = "lsyncd"

    def __init__(self, work, args):
        self.work, self.proc = work, None

    def start(self, edits):
        self.dirs = {s: os.path.join(self.work, s) for s in SIDES}
        seed(self.dirs.values(), edits)
        log = os.path.join(self.work, "lsyncd.log")
        config = os.path.join(self.work, "lsyncd.conf.lua")
        with open(config, "w") as f:
            f.write(f'settings {{ logfile = "{log}", nodaemon = true }}\n')
            for target in ("B", "C"):
                f.write(f'sync {{ default.rsync, source = "{self.dirs["A"]}", target = "{self.dirs[target]}" }}\n')
        self.proc = spawn(["lsyncd", config], os.path.join(self.work, "lsyncd.out"))
        # lsyncd's start-up rsync of each target, then it watches.
        wait_for(lambda: open(log).read().count("Startup of") >= 2 and "finished" in open(log).read()
                 if os.path.exists(log) else False, 60, "lsyncd's start-up sync",
                 [(self.proc, log)], interval=0.2)
        return self.dirs

    def stop(self):
        stop(self.proc)


class Syncthing(SyncthingInstances):
    """Three instances in a full mesh; the file watcher on, at its default delay."""

    name = "syncthing"

    def __init__(self, work, args):
        self.dir, self.args, self.side = work, args, {}

    def start(self, edits):
        self.dirs = {s: os.path.join(self.dir, s) for s in SIDES}
        seed(self.dirs.values(), edits)
        for s in SIDES:
            self.generate(s, IPS[s])
        self.start_all()
        for s in SIDES:
            for o in SIDES:
                if o != s:
                    self.introduce(s, o)
        for s in SIDES:
            self.api(s, "POST", "/rest/config/folders", {
                "id": self.FOLDER, "label": self.FOLDER, "path": self.dirs[s], "type": "sendreceive",
                "fsWatcherEnabled": True, "devices": [{"deviceID": side["id"]} for side in self.side.values()]})
        wait_for(self._settled, 180, "the three syncthing instances to connect and agree", self._procs(),
                 interval=0.5)
        return self.dirs

    def _settled(self):
        try:
            for s in SIDES:
                connections = self.api(s, "GET", "/rest/system/connections")["connections"]
                if not all(connections.get(self.side[o]["id"], {}).get("connected") for o in SIDES if o != s):
                    return False
                status = self.api(s, "GET", f"/rest/db/status?folder={self.FOLDER}")
                if status.get("state") != "idle" or status.get("needTotalItems"):
                    return False
            return True
        except (OSError, ValueError, KeyError):
            return False

    def stop(self):
        self.teardown()


TOOLS = {"shoal": Shoal, "lsyncd": Lsyncd, "syncthing": Syncthing}


def measure(tool, edits, interval):
    """Returns the latency of every edit (seconds), None for an edit never seen."""
    dirs = tool.start(edits)
    time.sleep(2)  # let start-up scans and watchers settle
    closed, seen = {}, {}
    pending = {}  # (side, i) -> expected content
    lock = threading.Lock()
    done = threading.Event()

    def poll():
        while not done.is_set():
            with lock:
                items = list(pending.items())
            for (side, i), expected in items:
                try:
                    with open(os.path.join(dirs[side], "edits", f"f{i:04}.txt"), "rb") as f:
                        ok = f.read() == expected
                except OSError:
                    ok = False
                if ok:
                    now = time.monotonic()
                    with lock:
                        pending.pop((side, i), None)
                        seen[(side, i)] = now
            time.sleep(0.005)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        for i in range(edits):
            content = f"edit {i} at {time.time():.6f}\n".encode()
            with lock:
                pending[("B", i)] = pending[("C", i)] = content
            with open(os.path.join(dirs["A"], "edits", f"f{i:04}.txt"), "wb") as f:
                f.write(content)
            closed[i] = time.monotonic()
            time.sleep(interval)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with lock:
                if not pending:
                    break
            time.sleep(0.05)
    finally:
        done.set()
        poller.join()
        tool.stop()
    latencies = []
    for i in range(edits):
        b, c = seen.get(("B", i)), seen.get(("C", i))
        latencies.append(None if b is None or c is None else max(b, c) - closed[i])
    return latencies


def percentile(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edits", type=int, default=200)
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between edits")
    parser.add_argument("--tools", default="shoal,lsyncd,syncthing")
    parser.add_argument("--shoal", default=os.path.join(
        os.environ.get("CARGO_TARGET_DIR", "/var/cache/shoal/target"), "release", "shoal"))
    parser.add_argument("--work", help="parent of the temporary work directory")
    parser.add_argument("--markdown", help="also append the table to this file")
    args = parser.parse_args()
    # A SIGTERM goes through the `finally` below, which stops every process started here.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    tools = args.tools.split(",")
    packages = {"lsyncd": ["lsyncd", "rsync"], "syncthing": ["syncthing"]}
    needed = [p for t in tools for p in packages.get(t, [])]
    if needed:
        subprocess.run([os.path.join(REPO, "tools", "setup.sh"), *needed], check=True, stdout=subprocess.DEVNULL)
    work = tempfile.mkdtemp(prefix="shoal-bench-live.", dir=args.work)
    rows = []
    try:
        for name in tools:
            tool_dir = os.path.join(work, name)
            os.makedirs(tool_dir)
            print(f"{name}: {args.edits} edits, one every {args.interval} s ...", file=sys.stderr, flush=True)
            latencies = measure(TOOLS[name](tool_dir, args), args.edits, args.interval)
            seen = [x for x in latencies if x is not None]
            missing = len(latencies) - len(seen)
            row = (name, len(seen), missing, percentile(seen, 50) if seen else None,
                   percentile(seen, 99) if seen else None, max(seen) if seen else None)
            rows.append(row)
            print(f"{name}: p50 {fmt(row[3])}, p99 {fmt(row[4])}, max {fmt(row[5])}, {missing} never seen",
                  file=sys.stderr, flush=True)
    finally:
        stop_all()
        shutil.rmtree(work, ignore_errors=True)
    table = ["| tool | edits seen on B and C | p50 | p99 | max |", "|---|---|---|---|---|"]
    for name, seen, missing, p50, p99, worst in rows:
        table.append(f"| {name} | {seen}/{seen + missing} | {fmt(p50)} | {fmt(p99)} | {fmt(worst)} |")
    print("\n".join(table))
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write("\n".join(table) + "\n")


def fmt(seconds):
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


if __name__ == "__main__":
    main()
