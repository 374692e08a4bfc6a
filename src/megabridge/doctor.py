"""``megabridge doctor``: what this installation is, and whether the project tests it.

Versions come from package metadata and the GPUs from nvidia-smi, so the report takes
well under a second: importing torch alone takes seconds. ``--probe`` imports torch and
asks CUDA and NCCL themselves (what a user whose GPU is not seen wants to know).

TESTED is the one list of tested combinations; README's compatibility table is
``megabridge doctor --markdown`` (tests/unit_tests/docs/test_examples.py checks it).
"""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import logging
import os
import platform
import shutil
import subprocess

# Combinations on which the conformance tests (tests/unit_tests/models/test_conformance.py)
# pass. The first row is uv.lock: CI runs every test on it. The others were run with
#   uv run --locked --with transformers==X (or torch==X) \
#       pytest tests/unit_tests/models/test_conformance.py -k "llama or qwen3"
_CONFORMANCE = "conformance: Llama, Qwen3, Qwen3-MoE (53 tests, TP/PP/EP=2 included)"
TESTED = [
    {"torch": "2.15.0", "transformers": "5.24.0", "megatron-core": "0.16.1", "python": "3.11",
     "checked": "the lock (uv.lock): CI, every test"},
    {"torch": "2.15.0", "transformers": "5.20.2", "megatron-core": "0.16.1", "python": "3.11",
     "checked": _CONFORMANCE},
    {"torch": "2.15.0", "transformers": "5.0.0", "megatron-core": "0.16.1", "python": "3.11",
     "checked": _CONFORMANCE},
    {"torch": "2.9.1", "transformers": "5.24.0", "megatron-core": "0.16.1", "python": "3.11",
     "checked": _CONFORMANCE},
]  # fmt: skip
# Transformer Engine's distributions (the PyPI name changed between releases).
_TE_DISTRIBUTIONS = ("transformer-engine", "transformer-engine-torch", "transformer_engine")
_COLUMNS = ("torch", "transformers", "megatron-core", "python")


def version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _public(v: str | None) -> str | None:
    """'2.15.0+cu132' -> '2.15.0': the wheel's local tag says the CUDA build, not the release."""
    return v.split("+", 1)[0] if v else None


def _torch_file(relative: str) -> str | None:
    try:
        path = metadata.distribution("torch").locate_file(f"torch/{relative}")
    except metadata.PackageNotFoundError:
        return None
    return str(path) if os.path.exists(path) else None


def torch_cuda_build() -> str | None:
    """The CUDA version torch was built for, read from torch/version.py without importing it."""
    path = _torch_file("version.py")
    if path is None:
        return None
    for node in ast.parse(open(path).read()).body:
        target = getattr(node, "target", None) or (getattr(node, "targets", None) or [None])[0]
        if getattr(target, "id", None) == "cuda" and isinstance(node.value, ast.Constant):
            return node.value.value
    return None


def nccl_version() -> str | None:
    """The NCCL wheel torch loads (nvidia-nccl-cu12 / -cu13), by its metadata."""
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith("nvidia-nccl"):
            return f"{dist.version} ({name})"
    return None


def gpus() -> list[str]:
    """The GPUs the NVIDIA driver sees (empty without a driver)."""
    if shutil.which("nvidia-smi") is None:
        return []
    query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    try:
        out = subprocess.run(query, capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def installed() -> dict[str, str | None]:
    te = next((v for v in map(version, _TE_DISTRIBUTIONS) if v), None)
    return {
        "python": platform.python_version(),
        "torch": version("torch"),
        "megatron-core": version("megatron-core"),
        "transformers": version("transformers"),
        "transformer-engine": te,
        "triton": version("triton"),
    }


def tested_row(found: dict[str, str | None]) -> dict | None:
    """The TESTED row these versions are, or None."""
    python_minor = ".".join(found["python"].split(".")[:2])
    for row in TESTED:
        if (
            all(_public(found[k]) == row[k] for k in ("torch", "transformers", "megatron-core"))
            and row["python"] == python_minor
        ):
            return row
    return None


def fast_paths(found: dict, on_gpu: bool) -> list[tuple[str, str]]:
    """(fast path, whether training takes it and why) for this installation."""
    varlen = _torch_file("nn/attention/varlen.py") is not None
    if not varlen:
        flash = "no: this torch has no torch.nn.attention.varlen (2.9+): SDPA per segment"
    elif not on_gpu:
        flash = "no GPU: SDPA per packed segment"
    else:
        flash = "yes on bf16/fp16 (torch.nn.attention.varlen)"
    if not on_gpu:
        compiled = "off on CPU (exact numerics)"
    elif found["triton"]:
        compiled = f"yes: megabridge's Triton kernels and torch.compile (triton {found['triton']})"
    else:
        compiled = "no: triton is not installed"
    te = found["transformer-engine"]
    te_line = f"{te} installed (model.transformer_impl=te)" if te else "not installed: torch spec"
    return [
        ("packed attention (flash varlen)", flash),
        ("fused RoPE / SwiGLU / RMSNorm / cross entropy", compiled),
        ("Transformer Engine layers", te_line),
    ]


def _probe() -> list[tuple[str, str]]:
    # "No CUDA runtime is found": expected on a machine without a GPU, and said below.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    import torch

    from megabridge.models.torch_layers import _varlen_api

    rows = [("torch.cuda.is_available()", str(torch.cuda.is_available()))]
    if torch.cuda.is_available():
        rows.append(("CUDA runtime", str(torch.version.cuda)))
        rows.append(("NCCL (torch)", ".".join(map(str, torch.cuda.nccl.version()))))
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            rows.append(
                (f"cuda:{i}", f"{p.name}, sm_{p.major}{p.minor}, {p.total_memory >> 30} GiB")
            )
    rows.append(("varlen_attn usable", str(_varlen_api() is not None)))
    return rows


def markdown_table() -> str:
    lines = ["| " + " | ".join(_COLUMNS) + " | checked with |", "|" + "---|" * (len(_COLUMNS) + 1)]
    for row in TESTED:
        lines.append("| " + " | ".join(row[c] for c in _COLUMNS) + f" | {row['checked']} |")
    return "\n".join(lines)


def _section(title: str, rows: list[tuple[str, str]]) -> None:
    print(title)
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:{width}s}  {value}")


def cmd_doctor(args) -> int:
    if args.markdown:
        print(markdown_table())
        return 0
    found = installed()
    cuda = torch_cuda_build()
    versions = [(k, v or "not installed") for k, v in found.items()]
    versions.insert(2, ("torch built for CUDA", cuda or "none (CPU-only build)"))
    versions.insert(3, ("NCCL", nccl_version() or "not installed"))
    _section("versions", versions)
    seen = gpus()
    _section("devices", [(f"gpu {i}", g) for i, g in enumerate(seen)] or [("gpu", "none seen (no NVIDIA driver or nvidia-smi): CPU runs with gloo")])  # fmt: skip
    _section("fast paths", fast_paths(found, on_gpu=bool(seen and cuda)))
    if args.probe:
        _section("probe (torch imported)", _probe())
    row = tested_row(found)
    if row:
        verdict = f"yes: {row['checked']}"
    else:
        verdict = "no: not a combination the project tests (README: Compatibility)"
    _section("tested combination", [("torch / transformers / megatron-core / python", verdict)])
    return 0
