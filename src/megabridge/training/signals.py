"""Preemption: SIGTERM / SIGUSR1 (what Slurm sends) and a wall-clock budget.

The first signal asks the loop to finish its iteration, save and exit 0; a
second one exits at once. Ranks agree through an all-reduce, so every rank
saves at the same iteration even when only one was signalled.
"""

from __future__ import annotations

import os
import signal
import time

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class ExitSignalHandler:
    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.received: int | None = None
        self._previous = {}

    def __enter__(self) -> ExitSignalHandler:
        if self.enabled:
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.received is not None:  # the second signal: stop now
            os._exit(128 + signum)
        self.received = signum

    def should_exit(self, start_time: float, budget_minutes: float | None) -> str | None:
        """A reason to stop now, the same on every rank, or None."""
        over_budget = (
            budget_minutes is not None and (time.time() - start_time) / 60 >= budget_minutes
        )
        flag = torch.tensor([float(self.received or 0), float(over_budget)])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_host_group())
        if flag[0] > 0:
            return f"received {signal.Signals(int(flag[0])).name}"
        if flag[1] > 0:
            return f"train.exit_duration_in_mins={budget_minutes} reached"
        return None


_HOST_GROUP = None


def _host_group():
    """A gloo group for this host-side flag (NCCL would need a GPU tensor and a sync)."""
    global _HOST_GROUP
    if dist.get_backend() == "gloo":
        return None
    if _HOST_GROUP is None:
        _HOST_GROUP = dist.new_group(backend="gloo")
    return _HOST_GROUP
