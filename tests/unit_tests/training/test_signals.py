"""SIGTERM / SIGUSR1 and the time budget, without a training run."""

import os
import signal
import subprocess
import sys
import time

import pytest

from megabridge.training.signals import ExitSignalHandler

pytestmark = pytest.mark.unit


def deliver(sig: int) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(0.01)  # Python runs the handler at the next bytecode of the main thread


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_asks_to_stop_and_a_quick_repeat_is_the_same_request(sig):
    before = signal.getsignal(sig)
    with ExitSignalHandler() as handler:
        assert handler.should_exit(time.time(), None) is None
        deliver(sig)
        deliver(sig)  # torchrun forwarding what Slurm also sent: not a second request
        assert handler.should_exit(time.time(), None) == f"received {sig.name}"
    assert signal.getsignal(sig) is before


def test_the_time_budget_counts_from_the_start():
    handler = ExitSignalHandler(enabled=False)
    assert handler.should_exit(time.time(), 1.0) is None
    reason = handler.should_exit(time.time() - 61, 1.0)
    assert reason == "train.exit_duration_in_mins=1.0 reached"


def test_disabled_installs_nothing():
    before = signal.getsignal(signal.SIGTERM)
    with ExitSignalHandler(enabled=False):
        assert signal.getsignal(signal.SIGTERM) is before


SECOND_SIGNAL = """
import os, signal, time
from megabridge.training import signals
signals.DUPLICATE_WINDOW_S = 0.2
with signals.ExitSignalHandler():
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)
print("still alive")
"""


def test_a_second_signal_exits_at_once():
    start = time.time()
    result = subprocess.run(
        [sys.executable, "-c", SECOND_SIGNAL], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert "second SIGTERM: exiting now, without a checkpoint" in result.stderr
    assert "still alive" not in result.stdout and time.time() - start < 25
