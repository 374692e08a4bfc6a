"""Preemption: SIGTERM / SIGUSR1 (what Slurm sends) and a wall-clock budget.

The first signal asks the loop to finish its iteration, save and exit 0; a
second one exits at once (code 128 + signal), without a checkpoint. Ranks
agree through an all-reduce, so every rank saves at the same iteration even
when only one was signalled.

A repeat within ``DUPLICATE_WINDOW_S`` counts as the same request: under
``srun ... torchrun`` or ``scancel``, a worker gets SIGTERM from Slurm and, a
moment later, again from torchrun, which forwards what it receives.

Under torchrun: it forwards SIGTERM (and SIGUSR1 only when started with
``--signals-to-handle=SIGTERM,SIGINT,SIGUSR1``; otherwise SIGUSR1 kills it),
then waits ``--shutdown-timeout`` seconds (default 30) before SIGKILL: raise it
when a checkpoint takes longer to write. torchrun itself exits non-zero after
a signal, whatever its workers did; the "saved iteration" line tells.
"""

from __future__ import annotations

import os
import signal
import time

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
DUPLICATE_WINDOW_S = 2.0


class ExitSignalHandler:
    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.received: int | None = None
        self._received_at = 0.0
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
        now = time.monotonic()
        if self.received is None:
            self.received, self._received_at = signum, now
        elif now - self._received_at > DUPLICATE_WINDOW_S:  # a second request: stop now
            name = signal.Signals(signum).name
            os.write(2, f"megabridge: second {name}: exiting now, without a checkpoint\n".encode())
            os._exit(128 + signum)

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
