#!/usr/bin/env python3
"""Deterministic test data for Shoal's benchmarks.

    tools/gen-data.py PROFILE DIR [--seed N] [--scale F]

Profiles (the same seed always gives the same bytes and names):
  media    ~1 GiB of incompressible files of 16-100 MiB
  small    50,000 files of 1-16 KiB in nested directories (50 x 20 dirs)
  million  1,000,000 tiny files (10-200 bytes) in 1,000 directories
  wide     100,000 tiny files (10-200 bytes) in one directory

--scale multiplies the amount of data (e.g. 0.1 for a quick run). DIR must not exist
or be empty; it is filled and a manifest line is printed: files, bytes.
"""

import argparse
import os
import random
import sys

MIB = 1024 * 1024


def media(root, rng, scale):
    target = int(1024 * MIB * scale)
    total, i = 0, 0
    while total < target:
        size = min(rng.randint(16 * MIB, 100 * MIB), max(target - total, 1 * MIB))
        path = os.path.join(root, f"clip-{i:03d}.bin")
        with open(path, "wb") as f:
            left = size
            while left:
                n = min(left, 8 * MIB)
                f.write(rng.randbytes(n))
                left -= n
        total += size
        i += 1
    return i, total


def small(root, rng, scale):
    count = int(50_000 * scale)
    total = 0
    for i in range(count):
        d = os.path.join(root, f"dir{i % 50:02d}", f"sub{(i // 50) % 20:02d}")
        if i < 1000:
            os.makedirs(d, exist_ok=True)
        size = rng.randint(1024, 16 * 1024)
        with open(os.path.join(d, f"file{i:06d}.dat"), "wb") as f:
            f.write(rng.randbytes(size))
        total += size
    return count, total


def million(root, rng, scale):
    count = int(1_000_000 * scale)
    total = 0
    dirs = 1000
    for d in range(dirs):
        os.makedirs(os.path.join(root, f"d{d:04d}"), exist_ok=True)
    for i in range(count):
        size = rng.randint(10, 200)
        with open(os.path.join(root, f"d{i % dirs:04d}", f"f{i:07d}"), "wb") as f:
            f.write(rng.randbytes(size))
        total += size
    return count, total


def wide(root, rng, scale):
    count = int(100_000 * scale)
    total = 0
    for i in range(count):
        size = rng.randint(10, 200)
        with open(os.path.join(root, f"f{i:06d}"), "wb") as f:
            f.write(rng.randbytes(size))
        total += size
    return count, total


PROFILES = {"media": media, "small": small, "million": million, "wide": wide}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile", choices=sorted(PROFILES))
    parser.add_argument("dir")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--scale", type=float, default=1.0)
    args = parser.parse_args()
    if os.path.exists(args.dir) and os.listdir(args.dir):
        sys.exit(f"gen-data: {args.dir} is not empty")
    os.makedirs(args.dir, exist_ok=True)
    files, total = PROFILES[args.profile](args.dir, random.Random(f"{args.profile}-{args.seed}"), args.scale)
    print(f"{args.profile}: {files} files, {total} bytes in {args.dir}")


if __name__ == "__main__":
    main()
