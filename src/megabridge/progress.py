"""Progress of long work (conversion, preprocessing, checkpoint saves) for a person watching.

On a terminal, a tqdm bar redrawn in place. Elsewhere (a log file, Slurm's output, CI),
a bar would be carriage returns in a file, so a plain line is printed every
``every`` seconds instead, and one line when the work is done:

    hf-to-megatron: 120/291 tensors, 1.02 GB, 85.3 MB/s, ETA 17s
"""

from __future__ import annotations

import sys
import threading
import time

from tqdm import tqdm


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    raise AssertionError("unreachable")


def human_seconds(s: float) -> str:
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """Count items (tensors, documents) and their bytes; show rate and ETA.

    ``total``: items expected (None: unknown, no ETA). ``enabled=False`` prints
    nothing (the ranks other than 0). ``tty`` defaults to whether ``stream`` is a
    terminal. Thread-safe: conversion writer threads update it concurrently.
    """

    def __init__(self, desc: str, total: int | None = None, unit: str = "tensor",
                 enabled: bool = True, stream=None, every: float = 10.0,
                 tty: bool | None = None):  # fmt: skip
        self.desc, self.total, self.unit, self.enabled = desc, total, unit, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.every = every
        self.count = self.nbytes = 0
        self.start = self._last_line = time.monotonic()
        self._lock = threading.Lock()
        is_tty = self.stream.isatty() if tty is None else tty
        self._bar = None
        if enabled and is_tty:
            self._bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, leave=False)

    def update(self, n: int = 1, nbytes: int = 0) -> None:
        if not self.enabled:
            return
        with self._lock:
            self.count += n
            self.nbytes += nbytes
            if self._bar is not None:
                self._bar.update(n)
                if nbytes:
                    self._bar.set_postfix_str(self._bytes_part(), refresh=False)
                return
            now = time.monotonic()
            if now - self._last_line >= self.every:
                self._last_line = now
                print(self.line(now), file=self.stream, flush=True)

    def _bytes_part(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self.start, 1e-9)
        return f"{human_bytes(self.nbytes)}, {human_bytes(self.nbytes / elapsed)}/s"

    def line(self, now: float | None = None) -> str:
        """'desc: 120/291 tensors, 1.02 GB, 85.3 MB/s, ETA 17s' (the parts that are known)."""
        now = now or time.monotonic()
        elapsed = max(now - self.start, 1e-9)
        counted = f"{self.count}/{self.total}" if self.total else f"{self.count}"
        parts = [f"{counted} {self.unit}s"]
        if self.nbytes:
            parts.append(self._bytes_part(now))
        else:
            parts.append(f"{self.count / elapsed:.3g} {self.unit}s/s")
        if self.total and 0 < self.count < self.total:
            parts.append(f"ETA {human_seconds(elapsed * (self.total - self.count) / self.count)}")
        return f"{self.desc}: {', '.join(parts)}"

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        elapsed = time.monotonic() - self.start
        print(f"{self.line()} in {human_seconds(elapsed)}", file=self.stream, flush=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        elif self._bar is not None:
            self._bar.close()


class Waiting:
    """For one long call with no steps to count (a checkpoint save): silent when it is done
    within ``after`` seconds, else a line then, one every ``every`` seconds, and one at
    the end with the time it took."""

    def __init__(self, desc: str, enabled: bool = True, stream=None, after: float = 1.0,
                 every: float = 30.0):  # fmt: skip
        self.desc, self.enabled, self.after, self.every = desc, enabled, after, every
        self.stream = stream if stream is not None else sys.stderr
        self.spoke = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        start, wait = time.monotonic(), self.after
        while not self._done.wait(wait):
            self.spoke = True
            print(f"{self.desc}... {human_seconds(time.monotonic() - start)}",
                  file=self.stream, flush=True)  # fmt: skip
            wait = self.every
        if self.spoke:
            took = human_seconds(time.monotonic() - start)
            print(f"{self.desc}: done in {took}", file=self.stream, flush=True)

    def __enter__(self) -> Waiting:
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._done.set()
            self._thread.join()
