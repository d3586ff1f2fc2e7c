#!/usr/bin/env python3
"""Scan benchmarks, side by side with the reference tools in the same run.

    tools/bench-scan.py [--dir /var/tmp/shoal-bench] [--reps 5] [--million] [--baseline SHOAL]

  media    `shoal scan` of ~1 GiB (fresh store, page cache warm) vs `b3sum --num-threads 2`
           on the same files, both on every core: ratio of throughputs (wall time) and of
           CPU time (user + sys, which a busy shared machine disturbs less), medians of
           --reps alternating runs. --baseline runs another shoal binary (an older build)
           in the same loop, for a before/after in one run.
  small    `shoal scan` of 50,000 files of 1-16 KiB vs Syncthing's initial scan of the
           same folder (Syncthing 1.19, discovery/relays/NAT off, watcher off): files/s.
  million  (with --million) 1,000,000 tiny files: peak RSS of `shoal scan` (from
           /usr/bin/time -v) and the time of a rescan with nothing changed.

Data comes from tools/gen-data.py (deterministic) and is kept in --dir between runs.
The shoal binary is built with `cargo build --release` first.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time

from benchlib import (
    REPO, SYNCTHING_QUIET, build_shoal, configure_syncthing, count_files, ensure_data, free_port, http_json,
    maxrss_kib, run, timed, timed_cpu, warm,
)


def data(base, profile):
    return ensure_data(os.path.join(base, "data", profile), profile)


def shoal_scan(shoal, base, volume, state, extra=()):
    return [shoal, "scan", "--data-root", os.path.join(base, "data"), "--state-dir", state, "--volume", volume, *extra]


def bench_media(shoal, base, reps, baseline=None):
    path = data(base, "media")
    files = sorted(os.path.join(path, f) for f in os.listdir(path))
    size = sum(os.path.getsize(f) for f in files)
    warm(path)
    b3, sh, old, creation = [], [], [], []
    empty = os.path.join(base, "data", "empty")
    os.makedirs(empty, exist_ok=True)
    load = os.getloadavg()[0]
    for _ in range(reps):
        b3.append(timed_cpu(["b3sum", "--num-threads", "2", *files]))
        # The store is created first (a one-time cost per node, reported apart), then
        # the timed run indexes all of media into it, from nothing.
        state = tempfile.mkdtemp(dir=base)
        creation.append(timed(shoal_scan(shoal, base, "empty", state)))
        sh.append(timed_cpu(shoal_scan(shoal, base, "media", state)))
        shutil.rmtree(state)
        if baseline:
            state = tempfile.mkdtemp(dir=base)
            run(shoal_scan(baseline, base, "empty", state), stdout=subprocess.DEVNULL)
            old.append(timed_cpu(shoal_scan(baseline, base, "media", state)))
            shutil.rmtree(state)
    mib = size / (1 << 20)
    wall_ratios = [b[0] / s[0] for b, s in zip(b3, sh)]
    cpu_ratios = [b[1] / s[1] for b, s in zip(b3, sh)]

    def row(name, runs):
        wall = statistics.median(r[0] for r in runs)
        cpu = statistics.median(r[1] for r in runs)
        print(f"  {name:<24}median {wall:.3f} s  ({mib / wall:.0f} MiB/s), CPU {cpu:.3f} s ({mib / cpu:.0f} MiB per CPU-s)")

    print(f"media: {len(files)} files, {mib:.0f} MiB, page cache warm, {reps} alternating runs, "
          f"{os.cpu_count()} cores, load average {load:.1f} before")
    row("b3sum --num-threads 2", b3)
    row("shoal scan", sh)
    if baseline:
        row("baseline shoal scan", old)
    print(f"  (creating the store beforehand: median {statistics.median(creation):.3f} s, once per node)")
    print(f"  shoal / b3sum throughput: median {statistics.median(wall_ratios):.2f}x "
          f"(runs: {', '.join(f'{r:.2f}' for r in wall_ratios)})")
    print(f"  shoal / b3sum per CPU-s:  median {statistics.median(cpu_ratios):.2f}x "
          f"(runs: {', '.join(f'{r:.2f}' for r in cpu_ratios)})")
    if baseline:
        print(f"  baseline / b3sum throughput: median "
              f"{statistics.median(b[0] / o[0] for b, o in zip(b3, old)):.2f}x, per CPU-s "
              f"{statistics.median(b[1] / o[1] for b, o in zip(b3, old)):.2f}x")


def syncthing_scan_seconds(path, expected_files, base):
    """Time from adding the folder to Syncthing reporting it idle with every file indexed."""
    home = tempfile.mkdtemp(dir=base, prefix="syncthing-")
    try:
        run(["syncthing", "generate", f"--home={home}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port, api_key = free_port(), "shoal-bench-key"
        configure_syncthing(os.path.join(home, "config.xml"), port, api_key, SYNCTHING_QUIET)
        env = dict(os.environ, STNODEFAULTFOLDER="1", STNOUPGRADE="1")
        proc = subprocess.Popen(["syncthing", "serve", f"--home={home}", "--no-browser", "--no-restart"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        try:
            def api(method, url, body=None):
                return http_json(f"http://127.0.0.1:{port}{url}", method, body, {"X-API-Key": api_key})
            deadline = time.time() + 30
            while True:
                try:
                    api("GET", "/rest/system/ping")
                    break
                except OSError:
                    if time.time() > deadline:
                        raise RuntimeError("syncthing did not start")
                    time.sleep(0.1)
            folder = {"id": "bench", "label": "bench", "path": path, "type": "sendreceive",
                      "fsWatcherEnabled": False, "rescanIntervalS": 3600}
            start = time.perf_counter()
            api("POST", "/rest/config/folders", folder)
            deadline = time.time() + 900
            while time.time() < deadline:
                try:
                    status = api("GET", "/rest/db/status?folder=bench")
                    if status.get("state") == "idle" and status.get("localFiles") == expected_files:
                        return time.perf_counter() - start
                except OSError:
                    pass
                time.sleep(0.05)
            raise RuntimeError("syncthing did not finish its scan in 15 minutes")
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    finally:
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(os.path.join(path, ".stfolder"), ignore_errors=True)


def bench_small(shoal, base, reps):
    path = data(base, "small")
    files = count_files(path)
    warm(path)
    sh = []
    for _ in range(reps):
        state = tempfile.mkdtemp(dir=base)
        sh.append(timed(shoal_scan(shoal, base, "small", state)))
        shutil.rmtree(state)
    st = syncthing_scan_seconds(path, files, base)
    print(f"small: {files} files, page cache warm")
    print(f"  shoal scan (new store)  median {statistics.median(sh):.2f} s  ({files / statistics.median(sh):,.0f} files/s)")
    print(f"  syncthing initial scan           {st:.2f} s  ({files / st:,.0f} files/s)")
    print(f"  shoal / syncthing files/s: {st / statistics.median(sh):.1f}x")


def bench_million(shoal, base):
    path = data(base, "million")
    state = tempfile.mkdtemp(dir=base)
    try:
        start = time.perf_counter()
        out = subprocess.run(["/usr/bin/time", "-v", *shoal_scan(shoal, base, "million", state)],
                             check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True).stderr
        first = time.perf_counter() - start
        rss = maxrss_kib(out)
        rescan = timed(shoal_scan(shoal, base, "million", state))
        out = subprocess.run(["/usr/bin/time", "-v", *shoal_scan(shoal, base, "million", state)],
                             check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True).stderr
        rescan_rss = maxrss_kib(out)
        print(f"million: {count_files(path)} files")
        print(f"  first scan {first:.1f} s, peak RSS {rss / 1024:.0f} MiB")
        print(f"  rescan, nothing changed: {rescan:.1f} s, peak RSS {rescan_rss / 1024:.0f} MiB")
    finally:
        shutil.rmtree(state)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/var/tmp/shoal-bench")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--million", action="store_true")
    parser.add_argument("--only", choices=["media", "small", "million"])
    parser.add_argument("--baseline", help="another shoal binary to scan media with, in the same loop")
    args = parser.parse_args()
    run([os.path.join(REPO, "tools", "setup.sh"), "b3sum", "syncthing", "time"])
    os.makedirs(args.dir, exist_ok=True)
    shoal = build_shoal()
    print(f"machine: {os.cpu_count()} cores; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    if args.only in (None, "media"):
        bench_media(shoal, args.dir, args.reps, args.baseline)
    if args.only in (None, "small"):
        bench_small(shoal, args.dir, args.reps)
    if args.million or args.only == "million":
        bench_million(shoal, args.dir)


if __name__ == "__main__":
    main()
