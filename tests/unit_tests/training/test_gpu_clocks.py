"""scripts/performance/gpu_clocks.py: nvidia-smi's samples summarized, the GPU named by its PCI
address, and the sampler run beside a block (a stand-in nvidia-smi on PATH: no GPU here)."""

import os
import time
import types

import pytest

from tests.helpers import performance_script

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def clocks():
    return performance_script("gpu_clocks")


def test_parse_averages_the_samples_and_counts_the_power_cap(clocks):
    lines = [
        "1400, 700.00, 0x0000000000000004",
        "[N/A], 650.00, 0x0000000000000004",  # an unreadable field: left out
        "1600, 500.00, 0x0000000000000000",
        "1980, 90.0",  # cut off when the sampler stopped
    ]
    summary = clocks.parse(lines)
    assert summary == clocks.ClockSummary(samples=2, sm_mhz=1500.0, power_w=600.0, capped=0.5)
    assert summary.line() == "SM 1500 MHz, 600 W, power cap in 50% of 2 samples"
    assert clocks.parse(["clocks.sm [MHz], power.draw [W], reasons"]) is None


def test_device_id_is_nvidia_smis_pci_address(clocks):
    props = types.SimpleNamespace(pci_domain_id=0, pci_bus_id=0x1B, pci_device_id=0)
    assert clocks.device_id(props) == "00000000:1B:00.0"


def fake_nvidia_smi(folder, name: str, monkeypatch) -> None:
    """``name`` on PATH: writes the device it was asked for (its last argument) to
    folder/asked, then a sample every 20 ms until it is stopped."""
    fake = folder / name
    fake.write_text(
        "#!/bin/sh\n"
        'for a in "$@"; do last="$a"; done\n'
        'echo "device $last" > "$(dirname "$0")/asked"\n'
        "while true; do echo '1500, 690.5, 0x0000000000000004'; sleep 0.02; done\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")


def test_clock_log_samples_while_the_block_runs(clocks, tmp_path, monkeypatch):
    fake_nvidia_smi(tmp_path, "fake-smi", monkeypatch)
    with clocks.ClockLog("00000000:1B:00.0", command="fake-smi") as log:
        assert log.summary is None  # filled in when the block ends
        time.sleep(0.3)
    summary = log.summary
    assert summary.samples >= 2 and summary.sm_mhz == 1500.0 and summary.capped == 1.0
    assert (tmp_path / "asked").read_text().strip() == "device 00000000:1B:00.0"


def test_clock_log_without_the_command_yields_no_summary(clocks):
    with clocks.ClockLog("0", command="no-such-nvidia-smi-here") as log:
        pass
    assert log.summary is None


def test_throughput_times_steps_with_the_clocks_of_the_current_gpu(tmp_path, monkeypatch):
    throughput = performance_script("train_throughput")
    fake_nvidia_smi(tmp_path, "nvidia-smi", monkeypatch)
    cuda = throughput.torch.cuda
    props = types.SimpleNamespace(pci_domain_id=0, pci_bus_id=0x2A, pci_device_id=0)
    monkeypatch.setattr(cuda, "current_device", lambda: 3)
    monkeypatch.setattr(cuda, "get_device_properties", lambda i: props if i == 3 else None)
    monkeypatch.setattr(cuda, "synchronize", lambda: None)
    sampled = []  # per step: whether the sampler had started (it writes "asked" first)

    def step(i):
        sampled.append((tmp_path / "asked").exists())
        time.sleep(0.1)

    (times, run), summary = throughput._timed_with_clocks(step, 3, 2)
    assert len(times) == 2 and run > 0
    assert sampled[:3] == [False, False, False]  # the warmup steps (compiling) are not sampled
    assert summary.samples >= 2 and summary.power_w == 690.5
    assert (tmp_path / "asked").read_text().strip() == "device 00000000:2A:00.0"
