"""How a whole (unsharded) tensor is split over tensor- and expert-parallel ranks.

The one place where megabridge turns a full tensor into this rank's piece and
back. Mappings (mappings.py) produce whole tensors; this module shards them,
reading the layout Megatron-Core itself records on each parameter
(``tensor_model_parallel``, ``partition_dim``), plus the one layout it does not
record: the gated MLP's fused [gate; up] input projection, where each rank holds
[gate_r; up_r].
"""

from __future__ import annotations

import re
from typing import Literal

import torch
import torch.distributed as dist

Split = Literal["replicated", "dim0", "dim1", "gated_dim0"]

# the language model's layers (a vision tower's own "layers" are whole on every stage)
_LAYER = re.compile(r"(?:^|\.)decoder\.layers\.(\d+)\.")
_EXPERT = re.compile(r"(local_experts)\.(\d+)\.")


def param_split(name: str, param: torch.Tensor, gated: bool) -> Split:
    """How Megatron-Core splits parameter ``name`` over tensor-parallel ranks."""
    if not getattr(param, "tensor_model_parallel", False):
        return "replicated"
    dim = getattr(param, "partition_dim", 0)
    # ``gated`` is the language model's; a vision tower's plain MLP marks its fc1 (Qwen3-VL)
    plain = getattr(param, "plain_fc1", False)
    if dim == 0 and gated and not plain and ".linear_fc1." in f".{name}":
        return "gated_dim0"
    return "dim0" if dim == 0 else "dim1"


def split(full: torch.Tensor, how: Split, rank: int, size: int) -> torch.Tensor:
    """This rank's piece of ``full``."""
    if how == "replicated" or size == 1:
        return full
    if how == "gated_dim0":
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, 0)[rank], up.chunk(size, 0)[rank]], dim=0)
    dim = 0 if how == "dim0" else 1
    if full.shape[dim] % size:
        raise ValueError(f"dim {dim} of shape {tuple(full.shape)} is not divisible by TP={size}")
    return full.chunk(size, dim=dim)[rank]


def gather(local: torch.Tensor, how: Split, group) -> torch.Tensor:
    """The whole tensor from every rank's piece (a collective over ``group``)."""
    size = dist.get_world_size(group) if group is not None else 1
    if how == "replicated" or size == 1:
        return local
    pieces = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(pieces, local.contiguous(), group=group)
    if how == "gated_dim0":
        halves = [p.chunk(2, dim=0) for p in pieces]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(pieces, dim=0 if how == "dim0" else 1)


def tensor_parallel_group(local_name: str):
    """The group a parameter is tensor-parallel over: experts have their own (expert TP)."""
    from megatron.core import parallel_state as ps

    if ".experts." in f".{local_name}":
        return ps.get_expert_tensor_parallel_group()
    return ps.get_tensor_model_parallel_group()


def global_name(model: torch.nn.Module, local_name: str) -> str:
    """A parameter's name as if the whole model were on one rank.

    Pipeline stages number their layers from 0; Megatron-Core records the global
    number on each layer (``layer_number``, 1-based). Expert-parallel ranks hold
    ``local_experts.0..k-1``; the global expert index is ``ep_rank * k + j``.
    """
    name = local_name
    m = _LAYER.search(name)
    if m:
        layers = model.decoder.layers
        layer = layers[int(m.group(1))]
        name = name[: m.start(1)] + str(layer.layer_number - 1) + name[m.end(1) :]
    e = _EXPERT.search(name)
    if e:
        from megatron.core import parallel_state

        ep_rank = parallel_state.get_expert_model_parallel_rank()
        num_local = (
            model.config.num_moe_experts // parallel_state.get_expert_model_parallel_world_size()
        )
        index = ep_rank * num_local + int(e.group(2))
        name = name[: e.start(2)] + str(index) + name[e.end(2) :]
    return name
