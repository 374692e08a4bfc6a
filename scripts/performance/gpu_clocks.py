"""The GPU's SM clock, power draw and clock event reasons while a block of work runs.

The H100s and H200s lent to us are 700 W boards. Under a training step they sit at that cap,
and the SM clock drops to whatever the cap leaves: ~1470 MHz of 1980 for megabridge's 1.1B
step, higher for a less dense stack (scripts/performance/NOTES.md, 2026-12-05). So a step's
speed follows its energy, and two boards at the same cap differ by a few percent. A kernel
timed alone runs at the full clock and does not show this. The samples come from
nvidia-smi's own sampling loop (``-lms``), run beside the work; there is no dependency and
nothing on the GPU's stream.
"""

from __future__ import annotations

import shutil
import subprocess
from typing import NamedTuple

QUERY = "clocks.sm,power.draw,clocks_throttle_reasons.active"
SW_POWER_CAP = 0x4  # a bit of the clock event reasons: held back by the board's power limit


class ClockSummary(NamedTuple):
    samples: int
    sm_mhz: float  # mean SM clock over the samples
    power_w: float  # mean power draw
    capped: float  # share of the samples whose reasons include the software power cap

    def line(self) -> str:
        return (
            f"SM {self.sm_mhz:.0f} MHz, {self.power_w:.0f} W, power cap in "
            f"{self.capped:.0%} of {self.samples} samples"
        )


def parse(lines) -> ClockSummary | None:
    """nvidia-smi's ``--query-gpu=QUERY --format=csv,noheader,nounits`` lines -> their
    summary; lines that are not three numbers ("[N/A]", a cut-off last line) are left out.
    None when no line is."""
    rows = []
    for line in lines:
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 3:
            continue
        try:
            rows.append((float(fields[0]), float(fields[1]), int(fields[2], 16)))
        except ValueError:
            continue
    if not rows:
        return None
    n = len(rows)
    return ClockSummary(
        samples=n,
        sm_mhz=sum(r[0] for r in rows) / n,
        power_w=sum(r[1] for r in rows) / n,
        capped=sum(bool(r[2] & SW_POWER_CAP) for r in rows) / n,
    )


def device_id(props) -> str:
    """How nvidia-smi's ``-i`` names the GPU of torch's device properties ``props``: its PCI
    address (nvidia-smi's own order of indexes need not be CUDA's)."""
    return f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"


class ClockLog:
    """Samples ``device`` (device_id's form) every ``period_ms`` while its ``with`` block runs;
    after the block, ``summary`` is a ClockSummary, or None where there is no ``command`` on
    PATH or it gave no sample."""

    def __init__(self, device: str, period_ms: int = 100, command: str = "nvidia-smi"):
        self.device, self.period_ms, self.command = device, period_ms, command
        self.summary: ClockSummary | None = None
        self._proc = None

    def __enter__(self) -> ClockLog:
        exe = shutil.which(self.command)
        if exe is not None:
            self._proc = subprocess.Popen(
                [exe, f"--query-gpu={QUERY}", "--format=csv,noheader,nounits",
                 "-lms", str(self.period_ms), "-i", self.device],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )  # fmt: skip
        return self

    def __exit__(self, *exc) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        self.summary = parse(out.splitlines())
