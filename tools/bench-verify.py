#!/usr/bin/env python3
"""Verify benchmarks, side by side with b3sum in the same run.

    tools/bench-verify.py [--dir /var/tmp/shoal-bench] [--reps 5] [--only media|million]
                          [--million-scale F]

  media    `shoal verify` of ~1 GiB (indexed once beforehand, page cache warm) vs
           `b3sum --num-threads 2` on the same files: ratio of throughputs, median of
           --reps alternating runs. Target: >= 0.8x.
  million  1,000,000 tiny files, indexed once (the scan time is reported), then
           `shoal verify --sample 5`: seconds, median of --reps runs. Target: < 30 s.
           --million-scale 0.1 uses 100,000 files (a reduced run; say so when quoting).

Data comes from tools/gen-data.py (deterministic) and is kept in --dir between runs, as
are the stores (in --dir/verify-state-*). The shoal binary is built with
`cargo build --release` first.
"""

import argparse
import os
import statistics
import time

from benchlib import REPO, build_shoal, count_files, ensure_data, run, timed, warm


def data(base, profile, scale):
    """The data set in base/data (a scaled one under its own name); returns (volume, path)."""
    name = profile if scale == 1 else f"{profile}-{scale:g}"
    return name, ensure_data(os.path.join(base, "data", name), profile, scale)


def indexed(shoal, base, volume):
    """A store holding `volume`, scanned once (kept between runs); returns (state, scan s)."""
    state = os.path.join(base, f"verify-state-{volume}")
    seconds = timed([shoal, "scan", "--data-root", os.path.join(base, "data"), "--state-dir", state,
                     "--volume", volume])
    return state, seconds


def shoal_verify(shoal, base, volume, state, extra=()):
    return [shoal, "verify", "--data-root", os.path.join(base, "data"), "--state-dir", state,
            "--volume", volume, "--json", *extra]


def bench_media(shoal, base, reps):
    volume, path = data(base, "media", 1)
    files = sorted(os.path.join(path, f) for f in os.listdir(path))
    size = sum(os.path.getsize(f) for f in files)
    state, _ = indexed(shoal, base, volume)
    warm(path)
    b3, sh = [], []
    for _ in range(reps):
        b3.append(timed(["b3sum", "--num-threads", "2", *files]))
        sh.append(timed(shoal_verify(shoal, base, volume, state)))
    mib = size / (1 << 20)
    ratios = [b / s for b, s in zip(b3, sh)]
    print(f"media: {len(files)} files, {mib:.0f} MiB, page cache warm, {reps} alternating runs")
    print(f"  b3sum --num-threads 2   median {statistics.median(b3):.3f} s  ({mib / statistics.median(b3):.0f} MiB/s)")
    print(f"  shoal verify            median {statistics.median(sh):.3f} s  ({mib / statistics.median(sh):.0f} MiB/s)")
    print(f"  verify / b3sum throughput: median {statistics.median(ratios):.2f}x (runs: {', '.join(f'{r:.2f}' for r in ratios)})")


def bench_million(shoal, base, reps, scale):
    volume, path = data(base, "million", scale)
    files = count_files(path)
    state, scan_seconds = indexed(shoal, base, volume)
    times = [timed(shoal_verify(shoal, base, volume, state, ["--sample", "5"])) for _ in range(reps)]
    print(f"{volume}: {files} files (indexed once: {scan_seconds:.1f} s, a rescan if the store existed)")
    print(f"  shoal verify --sample 5   median {statistics.median(times):.2f} s "
          f"(runs: {', '.join(f'{t:.2f}' for t in times)})")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/var/tmp/shoal-bench")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--only", choices=["media", "million"])
    parser.add_argument("--million-scale", type=float, default=1.0)
    args = parser.parse_args()
    run([os.path.join(REPO, "tools", "setup.sh"), "b3sum"])
    os.makedirs(args.dir, exist_ok=True)
    shoal = build_shoal()
    print(f"machine: {os.cpu_count()} cores, shared with other builds and tests (expect noise); "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    if args.only in (None, "media"):
        bench_media(shoal, args.dir, args.reps)
    if args.only in (None, "million"):
        bench_million(shoal, args.dir, args.reps, args.million_scale)


if __name__ == "__main__":
    main()
