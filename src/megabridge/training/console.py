"""What a run prints when it starts: a short aligned summary a person reads, then only the
settings that differ from the defaults. The full resolved config goes to
``<log dir>/config.json``, not to the console."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist

from megabridge.models.config import ARCHITECTURE
from megabridge.training.config import ConfigContainer, all_keys

# Keys the summary shows already (or that every run sets for itself).
_IN_SUMMARY = {
    "name", "train.train_iters", "train.global_batch_size", "train.micro_batch_size",
    "dataset.type", "dataset.seq_length", "dataset.path", "dataset.blend",
    "checkpoint.save", "checkpoint.load", "checkpoint.pretrained_checkpoint", "logger.log_dir",
    "model.family", "model.seq_length", "model.tensor_model_parallel_size",
    "model.pipeline_model_parallel_size", "model.expert_model_parallel_size", "peft.method",
}  # fmt: skip


def parameter_counts(
    model_chunks, tp: int, pp: int, ep: int, etp: int | None = None
) -> tuple[int, int]:
    """(all, trainable) parameters of the whole model, over every rank of the layout.

    Each rank counts its share of each parameter, so that the sum over all ranks counts
    every parameter once per data-parallel replica: a TP-split tensor fully, one that TP
    replicates 1/TP; expert tensors (``allreduce`` False) likewise with the expert layout
    (``etp``: the expert TP size, None: ``tp``; models/config.py expert_tensor_parallel_size).
    The last pipeline stage's copy of tied embeddings (``shared``) is not counted.
    Collective: every rank calls it.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    etp = tp if etp is None else etp
    dp, expert_dp = world // (tp * pp), world // (etp * ep * pp)
    share = torch.zeros(4, dtype=torch.float64)  # dense all, dense trainable, expert all, trainable
    for chunk in model_chunks:
        for name, p in chunk.named_parameters():
            if getattr(p, "shared", False):
                continue
            # Routed experts: at EP 1 Megatron-Core marks them allreduce like dense ones, but
            # their TP split is the expert TP size, which may differ (GPT-OSS: 1).
            expert = not getattr(p, "allreduce", True) or ".experts." in name
            row = 2 if expert else 0
            split = tp if row == 0 else etp
            local = p.numel() if getattr(p, "tensor_model_parallel", False) else p.numel() / split
            share[row] += local
            share[row + 1] += local if p.requires_grad else 0
    if world > 1:
        share = share.to(_collective_device())
        dist.all_reduce(share)
        share = share.cpu()
    counts = share[:2] / dp + share[2:] / expert_dp
    return round(float(counts[0])), round(float(counts[1]))


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def human(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return str(int(n))


def _data(cfg: ConfigContainer) -> str:
    d = cfg.dataset
    if d.type == "mock":
        return "mock (random tokens)"
    if d.type == "indexed":
        return f"indexed: {', '.join(d.blend)} (split {d.split})"
    return f"sft: {d.path} ({'packed' if d.packed else 'padded'})"


def summary(cfg: ConfigContainer, params: tuple[int, int], save_dir: Path, log_dir: Path) -> list:
    """(label, value) rows of the start-of-run summary."""
    m, t = cfg.model, cfg.train
    world = dist.get_world_size() if dist.is_initialized() else 1
    tp, pp, ep = (m.tensor_model_parallel_size, m.pipeline_model_parallel_size,
                  m.expert_model_parallel_size)  # fmt: skip
    dp = world // (tp * pp)
    total, trainable = params
    model = f"{m.family}, {human(total)} parameters"
    if trainable != total:
        model += f" ({human(trainable)} trainable, peft {cfg.peft.method})"
    steps = t.global_batch_size // (t.micro_batch_size * dp)
    seq = cfg.dataset.seq_length or m.seq_length
    rows = [
        ("run", cfg.name),
        ("model", model),
        ("layout", f"TP={tp} PP={pp} EP={ep} DP={dp} ({world} process{'es' if world > 1 else ''})"),
        (
            "batch",
            f"{t.global_batch_size} sequences = micro {t.micro_batch_size} x "
            f"{steps} accumulation x DP {dp}",
        ),  # fmt: skip
        ("sequence", f"{seq} tokens ({human(t.global_batch_size * seq)} tokens per step)"),
        ("training", f"{t.train_iters} iterations"),
        ("data", _data(cfg)),
    ]
    if cfg.checkpoint.pretrained_checkpoint:
        rows.append(("from", cfg.checkpoint.pretrained_checkpoint))
    if cfg.checkpoint.load:
        rows.append(("resume", cfg.checkpoint.load))
    rows.append(("checkpoints", f"{save_dir} ({_when_saved(cfg.checkpoint)})"))
    rows.append(("logs", f"{log_dir} (metrics.jsonl, config.json)"))
    return rows


def _when_saved(ckpt) -> str:
    every = f"every {ckpt.save_interval}" if ckpt.save_interval else ""
    if ckpt.save_at_end:
        return f"{every} and at the end" if every else "at the end"
    return every or "none: checkpoint.save_at_end=false and no save_interval"


def non_defaults(cfg: ConfigContainer) -> list[tuple[str, str]]:
    """(key, value) of every setting that differs from its dataclass default, except the
    model's architecture (the parameter count stands for it) and what the summary shows."""
    defaults = ConfigContainer()
    default_keys = all_keys(defaults)
    rows = []
    for key, (owner, f) in all_keys(cfg).items():
        if key in _IN_SUMMARY or f.metadata.get("role") == ARCHITECTURE:
            continue
        value = getattr(owner, f.name)
        default_owner, default_field = default_keys[key]
        if dataclasses.is_dataclass(value) or value == getattr(default_owner, default_field.name):
            continue
        rows.append((key, ",".join(map(str, value)) if isinstance(value, list) else str(value)))
    return rows


def aligned(rows: list[tuple[str, str]], indent: str = "  ") -> str:
    width = max((len(k) for k, _ in rows), default=0)
    return "\n".join(f"{indent}{k:{width}s}  {v}" for k, v in rows)


def start_of_run(cfg: ConfigContainer, params: tuple[int, int], save_dir, log_dir) -> str:
    """The text a run prints before its first iteration."""
    text = aligned(summary(cfg, params, Path(save_dir), Path(log_dir)))
    changed = non_defaults(cfg)
    if changed:
        text += "\nsettings that differ from the defaults:\n" + aligned(changed)
    return text
