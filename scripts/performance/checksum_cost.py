"""What recording and checking checksums costs on real checkpoints.

    python scripts/performance/checksum_cost.py PATH [PATH ...]

PATH: a checkpoint folder or a training save folder (each iter_* inside is measured).
For each checkpoint prints its size and the time of
  * record: what a save adds (megabridge.checksums.record, right after the files were
    written, so read from the page cache: measured warm here too);
  * check:  what resolve() adds before a load (integrity.verify(content=True)), warm.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from megabridge import checksums
from megabridge.training import integrity


def _checkpoints(path: Path) -> list[Path]:
    if (path / integrity.METADATA).exists():
        return [path]
    return sorted(p for p in path.glob("iter_*") if p.is_dir())


def _timed(fn, *args, **kwargs) -> float:
    fn(*args, **kwargs)  # warm the page cache, as a save that just wrote the files has it
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for arg in sys.argv[1:]:
        for ckpt in _checkpoints(Path(arg)):
            nbytes = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
            record = _timed(checksums.record, ckpt)
            check = _timed(integrity.verify, ckpt, content=True)
            print(
                f"{ckpt}: {nbytes / 1e6:.1f} MB, record {record * 1e3:.1f} ms "
                f"({nbytes / 1e6 / record:.0f} MB/s), check {check * 1e3:.1f} ms"
            )


if __name__ == "__main__":
    main()
