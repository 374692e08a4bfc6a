"""What a run reports per log step: one readable line, one JSON line, TensorBoard scalars,
and the same record to any experiment tracker (training/trackers.py)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

log = logging.getLogger("megabridge.train")


def _fmt(x: float) -> str:
    if x is None or not math.isfinite(x):
        return str(x)
    return f"{x:.4g}" if abs(x) < 1e-2 else f"{x:.4f}"


class MetricsWriter:
    """Writes metrics on rank 0 only; other ranks get a writer that does nothing."""

    def __init__(self, log_dir: str | Path, enabled: bool, tensorboard: bool = True, trackers=()):
        self.enabled = enabled
        self.log_dir = Path(log_dir)
        self._tb = None
        self._jsonl = None
        self._trackers = list(trackers) if enabled else []
        if not enabled:
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.log_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.log_dir))
            except ImportError:
                log.warning("tensorboard is not installed: no TensorBoard events")

    def write(self, record: dict, total_iters: int, elapsed_s: float) -> None:
        if not self.enabled:
            return
        it = record["iteration"]
        parts = [f"iteration {it}/{total_iters}"]
        for key in ("loss", "eval_loss", "lr", "grad_norm"):
            if key in record:
                parts.append(f"{key} {_fmt(record[key])}")
        if "tokens_per_s" in record:
            parts.append(f"tokens/s {record['tokens_per_s']:,.0f}")
        if record.get("skipped_iterations"):
            parts.append(f"skipped {record['skipped_iterations']}")
        parts.append(f"elapsed {elapsed_s:.1f}s")
        log.info(" | ".join(parts))
        self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "iteration" and isinstance(value, int | float):
                    self._tb.add_scalar(f"train/{key}", value, it)
            self._tb.flush()
        for tracker in list(self._trackers):
            try:
                tracker.log(record, it)
            except Exception as e:  # a tracker's outage must not stop training
                log.warning("%s failed (%s); it logs nothing more", type(tracker).__name__, e)
                self._trackers.remove(tracker)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        for tracker in self._trackers:
            tracker.close()
