"""Content checksums of a checkpoint's files: recorded at save time, checked before a load.

A file's size catches truncation; a flipped byte inside a ``.distcp`` shard keeps the size
and, unchecked, converts to wrong weights or resumes a run from them. megabridge records
every file's XXH3-128 digest in ``megabridge.json`` when it writes a checkpoint.

Why XXH3 (the xxhash package) and not hashlib: it reads a cached file at ~11 GB/s on
this machine, against ~1 GB/s for sha256 and ~0.5 GB/s for blake2b, while the disk
reads ~1.3 GB/s cold (scripts/performance/NOTES.md). Its job is to catch accidental
damage (a bad disk, a bad copy); it is no defence against someone who rewrites the
folder, who could rewrite the recorded digests too.

A load that reads the files anyway need not read them twice: ReadVerifier hashes the bytes
a reader has just read into memory (the streamed export's chunks), and at the end reads
from disk only what the reader skipped (zip headers, files it never opens).
"""

from __future__ import annotations

from pathlib import Path

import xxhash

from megabridge.errors import CheckpointError

ALGORITHM = "xxh3_128"
_CHUNK = 8 << 20


def digest(path: Path) -> str:
    h = xxhash.xxh3_128()
    _hash_from(path, 0, None, h)
    return h.hexdigest()


def _hash_from(path: Path, start: int, end: int | None, h) -> None:
    """Add the bytes [start, end) of ``path`` (to its end when ``end`` is None) to ``h``."""
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    left = None if end is None else end - start
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        while left is None or left > 0:
            n = f.readinto(view if left is None else view[: min(left, _CHUNK)])
            if not n:
                break
            h.update(view[:n])
            if left is not None:
                left -= n


def record(folder: Path) -> dict:
    """What megabridge.json keeps: the algorithm and every file's digest, by relative path."""
    folder = Path(folder)
    files = {
        str(p.relative_to(folder)): digest(p) for p in sorted(folder.rglob("*")) if p.is_file()
    }
    return {"algorithm": ALGORITHM, "files": files}


def problems(folder: Path, recorded: dict, first_only: bool = False) -> list[str]:
    """One line per file whose content differs from ``recorded`` (see record()), or is gone."""
    folder = Path(folder)
    if recorded.get("algorithm") != ALGORITHM:
        return [f"checksums of an unknown algorithm {recorded.get('algorithm')!r}"]
    found = []
    for name, expected in recorded.get("files", {}).items():
        problem = _problem(folder, name, expected, digest)
        if problem:
            found.append(problem)
            if first_only:
                break
    return found


def _problem(folder: Path, name: str, expected: str, digest_of) -> str | None:
    path = folder / name
    if not path.resolve().is_relative_to(folder.resolve()):
        return f"the checksums name {name}, which is outside the checkpoint"
    if not path.is_file():
        return f"{name} is missing"
    if digest_of(path) != expected:
        return f"{name} is damaged: its content differs from what was saved (checksum)"
    return None


class ReadVerifier:
    """Checks ``folder``'s files against ``recorded`` (see record()) from the bytes a reader
    reads anyway: the reader reports each range it has just read into memory (read());
    ranges that arrive in file order are hashed from that memory, the bytes between them
    and after the last are read from disk, and a range that arrives after its bytes were
    hashed is already counted. check() then hashes what is left and raises on damage: call
    it before the output that used the bytes is published."""

    def __init__(self, folder: Path, recorded: dict):
        self.folder, self.recorded = Path(folder), recorded
        self._hashed: dict[Path, list] = {}  # resolved path -> [hasher, bytes hashed so far]
        self._found: str | None = None  # check()'s answer, once known ("" when none)

    def read(self, path: Path, position: int, data: memoryview) -> None:
        """``data``: the bytes of the file ``path`` (resolved) from ``position``, just read."""
        state = self._hashed.setdefault(path, [xxhash.xxh3_128(), 0])
        hasher, done = state
        if position > done:  # skipped bytes (a zip header, a chunk read later): from disk
            _hash_from(path, done, position, hasher)
            done = position
        end = position + data.nbytes
        if end > done:
            hasher.update(data.cast("B")[done - position :])
            state[1] = end

    def _digest(self, path: Path) -> str:
        state = self._hashed.pop(path.resolve(), None)
        if state is None:  # a file the reader never read
            return digest(path)
        hasher, done = state
        _hash_from(path, done, None, hasher)
        return hasher.hexdigest()

    def check(self) -> None:
        """CheckpointError naming the first file whose bytes differ from their checksum."""
        if self._found is None:  # once: a second call gives the same answer
            self._found = self._first_problem() or ""
        if self._found:
            raise CheckpointError(f"checkpoint {self.folder} is damaged: {self._found}")

    def _first_problem(self) -> str | None:
        if self.recorded.get("algorithm") != ALGORITHM:
            return f"checksums of an unknown algorithm {self.recorded.get('algorithm')!r}"
        for name, expected in self.recorded.get("files", {}).items():
            problem = _problem(self.folder, name, expected, self._digest)
            if problem:
                return problem
        return None
