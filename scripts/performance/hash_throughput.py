"""Hashing throughput of checksum candidates against this disk's read speed.

    python scripts/performance/hash_throughput.py [--mib 1024] [--dir /tmp]

Writes one file of random bytes, then reports (MB/s, 1 MB = 1e6 bytes):
  * the disk's cold read speed (the file's pages dropped from the page cache with
    posix_fadvise(DONTNEED) after an fsync; no root needed) and its warm (cached) speed;
  * each hash over the cached file, read in 8 MiB chunks as megabridge.checksums does:
    hashlib sha256 and blake2b, and xxhash xxh3_128 / blake3 when installed.
A checksum costs nothing extra when its hash runs faster than the disk reads.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time

CHUNK = 8 << 20


def _read_all(path: str, update=None) -> float:
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            if update is not None:
                update(view[:n])
    return time.perf_counter() - start


def _drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _candidates() -> dict:
    hashes = {"hashlib sha256": hashlib.sha256, "hashlib blake2b": hashlib.blake2b}
    try:
        import xxhash

        hashes["xxhash xxh3_128"] = xxhash.xxh3_128
    except ImportError:
        pass
    try:
        import blake3

        hashes["blake3 (1 thread)"] = blake3.blake3
    except ImportError:
        pass
    return hashes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024, help="file size in MiB (default 1024)")
    parser.add_argument("--dir", default=None, help="folder on the disk to measure")
    args = parser.parse_args()
    nbytes = args.mib << 20
    fd, path = tempfile.mkstemp(dir=args.dir, prefix="hash-bench-")
    try:
        with os.fdopen(fd, "wb") as f:
            for _ in range(args.mib):
                f.write(os.urandom(1 << 20))
        mb = nbytes / 1e6
        _drop_cache(path)
        print(f"{'disk read (cold)':24s} {mb / _read_all(path):8.0f} MB/s")
        _read_all(path)
        print(f"{'disk read (cached)':24s} {mb / _read_all(path):8.0f} MB/s")
        for name, make in _candidates().items():
            h = make()
            seconds = _read_all(path, h.update)
            print(f"{name:24s} {mb / seconds:8.0f} MB/s  (read + hash, cached file)")
    finally:
        os.unlink(path)


if __name__ == "__main__":
    main()
