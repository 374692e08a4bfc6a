"""How long the ``megabridge`` command takes to answer, and where convert's start-up goes.

    python scripts/performance/cli_startup.py [--megabridge .venv/bin/megabridge] [--repeat 3]

Prints the median wall time of each light command (they import no torch) and of
``convert``'s imports, then the share of the biggest packages in convert's import
time (``python -X importtime``). Numbers depend on the machine's load: report the
load average with them (printed first).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = [
    ["--help"],
    ["models"],
    ["recipes"],
    ["doctor"],
    ["train", "--recipe", "no_such_recipe"],  # a user error: exit code 2
]
# What `megabridge convert hf-to-megatron` imports before it reads a byte.
CONVERT_IMPORT = "import megabridge.conversion.commands"
GROUPS = ("torch._dynamo", "torch._inductor", "torch.distributed", "torch", "megatron.core",
          "transformers", "sympy", "numpy")  # fmt: skip


def wall(argv: list[str], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(argv, capture_output=True, check=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def import_shares(python: str) -> dict[str, float]:
    """Seconds of self time per package group in convert's import (first match wins)."""
    err = subprocess.run([python, "-X", "importtime", "-c", CONVERT_IMPORT],
                         capture_output=True, text=True, check=True).stderr  # fmt: skip
    shares: dict[str, float] = dict.fromkeys((*GROUPS, "other"), 0.0)
    for line in err.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, _, name = line.removeprefix("import time:").split("|")
        name = name.strip()
        group = next((g for g in GROUPS if name == g or name.startswith(g + ".")), "other")
        shares[group] += int(self_us) / 1e6
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabridge", default=str(Path(sys.executable).with_name("megabridge")))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    python = str(Path(args.megabridge).with_name("python"))
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; {args.megabridge}")
    for cmd in COMMANDS:
        print(
            f"  megabridge {' '.join(cmd):36s} {wall([args.megabridge, *cmd], args.repeat):6.2f} s"
        )
    convert = wall([python, "-c", CONVERT_IMPORT], args.repeat)
    print(f"  convert's imports ({CONVERT_IMPORT})  {convert:6.2f} s")
    shares = import_shares(python)
    total = sum(shares.values())
    print(f"convert's import time by package (self time, one run: {total:.2f} s):")
    for group, seconds in sorted(shares.items(), key=lambda kv: -kv[1]):
        print(f"  {group:20s} {seconds:6.2f} s  {100 * seconds / total:4.0f}%")


if __name__ == "__main__":
    main()
