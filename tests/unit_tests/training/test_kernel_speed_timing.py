"""scripts/performance/kernel_speed.py's timing on faked CUDA calls (its rows need a GPU): each
timed call is queued behind a sleeping kernel, so the events time the GPU's work alone."""

import pytest
import torch

from tests.helpers import performance_script

pytestmark = pytest.mark.unit


def test_each_timed_call_waits_behind_a_sleep_and_the_median_is_kept(monkeypatch):
    kernel_speed = performance_script("kernel_speed")
    log, elapsed, made = [], iter([3.0, 1.0, 2.0]), []

    class Event:  # made in pairs: (start, end)
        def __init__(self, enable_timing):
            assert enable_timing
            self.name = ("start", "end")[len(made) % 2]
            made.append(self)

        def record(self):
            log.append(self.name)

        def elapsed_time(self, end):
            return next(elapsed)  # ms

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: log.append("sleep"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: log.append("sync"))
    us = kernel_speed.timed(lambda: log.append("fn"), iters=3)
    assert log[:3] == ["fn"] * 3  # the warm-up calls
    assert log[3:] == ["sleep", "start", "fn", "end", "sync"] * 3
    assert us == pytest.approx(2000.0)
