"""Which samples each rank reads, as a pure function of how many were consumed.

Global batch k holds samples [k * G, (k + 1) * G) of the dataset (cycled when
it is shorter). Data-parallel rank r takes its contiguous slice of G / DP and
cuts it into micro-batches. So a resumed run reads exactly what an
uninterrupted run would have: nothing repeated, nothing skipped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}


def to_device(value, device: torch.device):
    """A tensor, or a dataclass of tensors (PackedSeqParams), on ``device``; anything else as is."""
    if torch.is_tensor(value):
        if device.type == "cuda" and value.device.type == "cpu":
            # From pinned memory the copy is queued behind the GPU's work and the host goes
            # on; from pageable memory the host waits for the stream to reach it.
            value = value.pin_memory()
        return value.to(device, non_blocking=True)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        moved = {
            f.name: to_device(getattr(value, f.name), device)
            for f in dataclasses.fields(value)
            if torch.is_tensor(getattr(value, f.name))
        }
        return dataclasses.replace(value, **moved)
    return value


def global_batch_indices(
    consumed: int, global_batch_size: int, dp_rank: int, dp_size: int, dataset_len: int
) -> list[int]:
    per_rank = global_batch_size // dp_size
    start = consumed + dp_rank * per_rank
    return [(start + i) % dataset_len for i in range(per_rank)]


def micro_batches(
    dataset,
    consumed: int,
    global_batch_size: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    device: torch.device,
    collate_fn=collate,
) -> Iterator[dict[str, torch.Tensor]]:
    """The micro-batches of this rank for the global batch starting at ``consumed``."""
    indices = global_batch_indices(consumed, global_batch_size, dp_rank, dp_size, len(dataset))
    for i in range(0, len(indices), micro_batch_size):
        batch = collate_fn([dataset[j] for j in indices[i : i + micro_batch_size]])
        yield {k: to_device(v, device) for k, v in batch.items()}
