"""Shared test helpers: launching megabridge in fresh processes and reading what it wrote."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUN_RECIPE = REPO / "scripts" / "training" / "run_recipe.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    # The single_process_megatron fixture puts its own rendezvous (and holds its port) in
    # this process's environment; a child run without a launcher must pick its own.
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(
        CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
    )
    env.update(extra)
    return env


def torchrun(
    nproc: int, script_args: list[str], timeout: int = 600, **env
) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node=N <args>`` on the CPU."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        *script_args,
    ]
    return subprocess.run(
        cmd, cwd=REPO, env=cpu_env(**env), capture_output=True, text=True, timeout=timeout
    )


def megabridge(args: list[str], timeout: int = 600, **env) -> subprocess.CompletedProcess:
    """The ``megabridge`` command in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "megabridge", *args],
        cwd=REPO,
        env=cpu_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def train(
    nproc: int, recipe: str, overrides: list[str], timeout: int = 600
) -> subprocess.CompletedProcess:
    result = torchrun(nproc, [str(RUN_RECIPE), "--recipe", recipe, *overrides], timeout=timeout)
    assert result.returncode == 0, (
        f"training failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    )
    return result


def read_metrics(log_dir: Path) -> list[dict]:
    lines = (Path(log_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def losses(log_dir: Path) -> dict[int, float]:
    return {r["iteration"]: r["loss"] for r in read_metrics(log_dir) if "loss" in r}


def check_in_fresh_process(folder: Path, code: str, env: dict[str, str], timeout: int) -> None:
    """Run ``code`` in a new interpreter started in ``folder`` (so a test module there imports
    by name) with this process's sys.path and ``env`` added to its environment; it must exit
    cleanly having printed 'checked'."""
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **env}
    done = subprocess.run(
        [sys.executable, "-c", f"{code}; print('checked')"],
        cwd=folder,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0 and "checked" in done.stdout, done.stderr[-4000:]


def performance_script(name: str):
    """scripts/performance/<name>.py imported as a module (its functions, not its main)."""
    import importlib.util

    path = REPO / "scripts" / "performance" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
