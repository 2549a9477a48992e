"""How fast checkpoint checksums are (models/checksums.py), against reading the same bytes.

Writes --files files of --mib MiB of random bytes (a checkpoint's shards) and times, on the same
files with the page cache warm (the case after a save, and a lower bound on a load's cost):
  read         the bytes read in the checksum's chunks, nothing computed (the baseline)
  crc32 x1     zlib.crc32, one thread (what we use)
  crc32 xN     the same with checksums.THREADS threads (as a save or a load runs it, per rank)
  sha256 x1, blake2b x1   cryptographic hashes, for comparison
Prints MB/s per method and its time over the read baseline's.

  python tools/bench_checksums.py [--files 8 --mib 128 --dir /tmp]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from remax_megatron.models import checksums  # noqa: E402


def read_only(path: Path) -> int:
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(checksums.CHUNK):
            size += len(chunk)
    return size


def hashed(name: str):
    def run(path: Path) -> int:
        h, size = hashlib.new(name), 0
        with open(path, "rb") as f:
            while chunk := f.read(checksums.CHUNK):
                h.update(chunk)
                size += len(chunk)
        return size
    return run


def timed(fn, paths, threads: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(fn, paths))
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--mib", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-checksums-") as tmp:
        paths = []
        for i in range(args.files):
            path = Path(tmp) / f"__{i}_0.distcp"
            path.write_bytes(os.urandom(args.mib * 2**20))
            paths.append(path)
        total = args.files * args.mib * 2**20
        n = checksums.THREADS
        methods = [("read (baseline)", read_only, 1),
                   ("crc32 x1", lambda p: checksums.crc_of(p)[0], 1),
                   (f"crc32 x{n}", lambda p: checksums.crc_of(p)[0], n),
                   ("sha256 x1", hashed("sha256"), 1), ("blake2b x1", hashed("blake2b"), 1)]
        timed(read_only, paths, 1, 1)  # warm the page cache
        print(f"{args.files} files x {args.mib} MiB = {total / 2**30:.2f} GiB, page cache warm, "
              f"{os.cpu_count()} CPUs, best of {args.repeats}")
        base = None
        for name, fn, threads in methods:
            seconds = timed(fn, paths, threads, args.repeats)
            base = base or seconds
            print(f"  {name:16s} {total / seconds / 1e6:8.0f} MB/s   {seconds / base:5.2f}x read")


if __name__ == "__main__":
    main()
