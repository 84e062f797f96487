"""The least a verified merge can cost on this machine: convert_speed.py's merge floor rows.

    python benchmarks/merge_floor.py OUT_DIR [--no-hash-out] INPUT...

Standard library only (no torch import, no flexmoe code, no Python work per tensor), so what it
times is the work the file format itself asks of a merge, done as fast as this machine does it:
1. the sha256 of every input (threads, one per usable CPU: hashlib releases the GIL),
   because a merge checks every input before it writes a byte;
2. the inputs' bytes copied into OUT_DIR in the kernel (copy_file_range), one output file per input:
   the same number of bytes a merge writes;
3. the sha256 of every output file, because flexmoe.json records one per weight file
   (skipped with --no-hash-out: what a format would cost whose output digests are composed from
   the inputs' verified per-tensor digests instead of being read back).
Prints the seconds of each phase on one line.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CHUNK = 1 << 24


def sha256(path: Path) -> str:
    h, buf = hashlib.sha256(), bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def copy(src: Path, dst: Path) -> None:
    with open(src, "rb") as a, open(dst, "wb") as b:
        size, done = os.fstat(a.fileno()).st_size, 0
        while done < size:
            done += os.copy_file_range(a.fileno(), b.fileno(), size - done, done)


def main(argv: list[str]) -> int:
    hash_out = "--no-hash-out" not in argv
    args = [a for a in argv if a != "--no-hash-out"]
    out, inputs = Path(args[0]), [Path(p) for p in args[1:]]
    out.mkdir(parents=True, exist_ok=True)
    pool = ThreadPoolExecutor(max(1, len(os.sched_getaffinity(0))))
    t0 = time.perf_counter()
    list(pool.map(sha256, inputs))
    t1 = time.perf_counter()
    outputs = [out / f"{i:05d}.safetensors" for i in range(len(inputs))]
    for src, dst in zip(inputs, outputs):
        copy(src, dst)
    t2 = time.perf_counter()
    if hash_out:
        list(pool.map(sha256, outputs))
    t3 = time.perf_counter()
    print(f"hash inputs {t1 - t0:.2f} s, copy {t2 - t1:.2f} s, hash outputs {t3 - t2:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
