"""Moving weights between an HF checkpoint and a (possibly sharded) Megatron model.

Loading: every rank walks its own parameters, asks the family's mappings for
the HF tensors, builds the whole Megatron tensor, checks its shape and keeps
its shard. Completeness is checked over all ranks: every HF tensor consumed,
every parameter filled, all problems named in one error.

Exporting: all ranks walk one global list of parameters in the same order; the
owners of each (the data-parallel replica 0 of its tensor-parallel group)
gather it whole, the first of them broadcasts it (or sends it to the one rank
that asked for everything), and the receiving ranks yield the HF tensors it
maps to. One tensor is whole at a time: never the whole model on one rank.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megabridge.conversion import sharding
from megabridge.errors import ConversionError

_VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")


def _tied_output(name: str, cfg) -> bool:
    return name == "output_layer.weight" and cfg.share_embeddings_and_output_weights


def param_groups(local_name: str):
    """(tensor-parallel group, replica rank) of a parameter: experts have their own."""
    from megatron.core import parallel_state as ps

    group = sharding.tensor_parallel_group(local_name)
    if ".experts." in f".{local_name}":
        return group, ps.get_expert_data_parallel_rank()
    return group, ps.get_data_parallel_rank(with_context_parallel=True)


def _full_shape(local_shape, how: sharding.Split, size: int) -> list[int]:
    shape = list(local_shape)
    if how in ("dim0", "gated_dim0"):
        shape[0] *= size
    elif how == "dim1":
        shape[1] *= size
    return shape


def local_params(chunks, cfg, include=None):
    """(chunk, local name, global name, tensor) for this rank's parameters and persistent
    buffers (``include``d ones).

    Buffers count: some model state is not trained by gradients yet belongs to
    the checkpoint (the MoE router's expert_bias, DeepSeek-V3's e_score_correction_bias).
    """
    for chunk in chunks:
        for local_name, param in [*chunk.named_parameters(), *persistent_buffers(chunk)]:
            if include is None or include(local_name):
                yield chunk, local_name, sharding.global_name(chunk, local_name), param


def persistent_buffers(module: torch.nn.Module):
    for prefix, sub in module.named_modules():
        for name, buffer in sub.named_buffers(recurse=False):
            if buffer is not None and name not in sub._non_persistent_buffers_set:
                yield f"{prefix}.{name}" if prefix else name, buffer


# ------------------------------------------------------------------ HF -> Megatron


def hf_source_names(bridge, name: str, cfg) -> tuple:
    if _tied_output(name, cfg):  # the last stage's copy of the tied embedding
        name = "embedding.word_embeddings.weight"
    return bridge.resolve(name)


def check_sources(bridge, reader, names, cfg) -> None:
    """Every HF tensor the parameters ``names`` are made of exists (all ranks' problems, named)."""
    missing = []
    for name in names:
        missing += [n for n in hf_source_names(bridge, name, cfg)[1] if n not in reader.weight_map]
    _raise_if_any(missing, "the HF checkpoint lacks tensors the model needs")


def full_tensor(bridge, reader, name: str, expected, cfg) -> tuple[torch.Tensor, tuple]:
    """The whole (TP=1) Megatron tensor ``name`` of shape ``expected``, and the HF names it used."""
    mapping, hf_names = hf_source_names(bridge, name, cfg)
    expert = mapping.expert_of(name)
    if expert is None:
        tensors = [reader.get(n) for n in hf_names]
    else:  # the expert's slice of tensors that stack all experts of the layer
        tensors = [_expert_slice(reader, n, expert) for n in hf_names]
    full = mapping.hf_to_megatron(tensors, cfg)
    if name in _VOCAB_PARAMS or _tied_output(name, cfg):
        if full.shape[0] != cfg.vocab_size:  # only TP's padding rows are ours to add
            raise ConversionError(
                f"{hf_names[0]} has {full.shape[0]} rows, but config.json says "
                f"vocab_size={cfg.vocab_size}"
            )
        full = _pad_vocab(full, expected[0])
    if list(full.shape) != list(expected):
        raise ConversionError(
            f"shape mismatch for {name} (from {', '.join(hf_names)}): "
            f"HF gives {tuple(full.shape)}, the model expects {tuple(expected)}"
        )
    return full, hf_names


@torch.no_grad()
def load_hf_weights(chunks, bridge, reader, cfg) -> None:
    """Fill this rank's parameters from ``reader`` (an HFCheckpoint)."""
    params = [(local_name, name, param) for _, local_name, name, param in local_params(chunks, cfg)]
    check_sources(bridge, reader, [name for _, name, _ in params], cfg)
    consumed = set()
    try:
        for local_name, name, param in params:
            group, _ = param_groups(local_name)
            size, rank = dist.get_world_size(group), dist.get_rank(group)
            how = sharding.param_split(local_name, param, cfg.gated)
            expected = _full_shape(param.shape, how, size)
            full, hf_names = full_tensor(bridge, reader, name, expected, cfg)
            param.copy_(sharding.split(full, how, rank, size))
            consumed.update(hf_names)
    finally:
        forget_recent_reads()
    check_all_consumed(consumed, bridge, reader, cfg)


class _RecentReads:
    """The last few HF tensors read whole for their experts' slices: every expert of a
    layer takes its slice of the same stacked tensor, which is read (and dequantized) once.
    Writer threads share it (streaming.py); two threads may both read a tensor, harmlessly."""

    def __init__(self, size: int = 4):
        self._size, self._lock = size, threading.Lock()
        self._items: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def get(self, reader, name: str) -> torch.Tensor:
        key = (reader, name)  # the reader itself: kept alive, so never another's by id
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        tensor = reader.get(name)
        with self._lock:
            self._items[key] = tensor
            while len(self._items) > self._size:
                self._items.popitem(last=False)
        return tensor

    def clear(self) -> None:
        """Forget them (a conversion is done: they may be gigabytes)."""
        with self._lock:
            self._items.clear()


_STACKED_READS = _RecentReads()


def _expert_slice(reader, hf_name: str, expert: int) -> torch.Tensor:
    """One expert's slice of a stacked HF tensor: its bytes alone where the tensor is stored
    as is; else (quantized) from the whole tensor, dequantized once for all its experts."""
    part = reader.get_index(hf_name, expert)
    return _STACKED_READS.get(reader, hf_name)[expert] if part is None else part


def forget_recent_reads() -> None:
    """Drop the stacked HF tensors kept for their experts (streaming.py, when done)."""
    _STACKED_READS.clear()


class ExpertStacks:
    """Collects the experts' slices of each stacked HF tensor; whole once all are there."""

    def __init__(self, experts: int | None):
        self._experts, self._parts = experts or 0, {}

    def add(self, hf_name: str, expert: int, tensor: torch.Tensor) -> torch.Tensor | None:
        parts = self._parts.setdefault(hf_name, {})
        parts[expert] = tensor
        if len(parts) < self._experts:
            return None
        del self._parts[hf_name]
        return torch.stack([parts[e] for e in range(self._experts)])


def _pad_vocab(full: torch.Tensor, rows: int) -> torch.Tensor:
    if full.shape[0] >= rows:
        return full
    return torch.cat([full, full.new_zeros(rows - full.shape[0], *full.shape[1:])])


def check_all_consumed(consumed: set, bridge, reader, cfg) -> None:
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, sorted(consumed))
    used = set().union(*map(set, everyone))
    # tied embeddings: the output head (lm_head.weight, or where the family keeps it) may be absent
    tied = cfg.share_embeddings_and_output_weights
    optional = set(bridge.resolve("output_layer.weight")[1]) if tied else set()
    unexpected = [
        n
        for n in reader.keys()
        if n not in used and n not in optional and not bridge.is_ignored_hf(n)
    ]
    _raise_if_any(unexpected, "the HF checkpoint has tensors the model has no place for")


def _raise_if_any(names: list[str], message: str) -> None:
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, sorted(set(names)))
    all_names = sorted(set().union(*map(set, everyone)))
    if all_names:
        shown = ", ".join(all_names[:8]) + (
            f" ... ({len(all_names)} in all)" if len(all_names) > 8 else ""
        )
        raise ConversionError(f"{message}: {shown}")


# ------------------------------------------------------------------ Megatron -> HF


@dataclass(frozen=True)
class Entry:
    name: str  # global Megatron name
    how: sharding.Split
    full_shape: tuple[int, ...]
    dtype: str
    owner: int  # global rank that holds the whole tensor once gathered


@dataclass(frozen=True)
class ExportParam:
    """One parameter of this rank as the export sees it.

    ``param`` carries the tensor-parallel layout (and shape, dtype); ``value()`` gives
    the local piece to gather (the parameter itself, or e.g. a LoRA-merged weight
    made only when its turn comes).
    """

    local_name: str
    name: str  # global Megatron name, as the family's mappings know it
    param: torch.Tensor
    value: object = None  # callable -> local tensor; None: the parameter itself

    def local(self) -> torch.Tensor:
        return self.param.detach() if self.value is None else self.value()


def export_params(chunks, cfg, include=None) -> list[ExportParam]:
    return [ExportParam(ln, n, p) for _, ln, n, p in local_params(chunks, cfg, include)]


def catalogue(params: list[ExportParam], cfg) -> list[Entry]:
    """The global parameter list, identical on every rank."""
    mine = []
    for p in params:
        if _tied_output(p.name, cfg):
            continue
        group, replica = param_groups(p.local_name)
        how = sharding.param_split(p.local_name, p.param, cfg.gated)
        shape = tuple(_full_shape(p.param.shape, how, dist.get_world_size(group)))
        owner = replica == 0 and dist.get_rank(group) == 0
        mine.append((p.name, how, shape, str(p.param.dtype).removeprefix("torch."), owner))
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    entries: dict[str, Entry] = {}
    for rank, items in enumerate(everyone):
        for name, how, shape, dtype, owner in items:
            if owner:
                entries[name] = Entry(name, how, shape, dtype, rank)
    return list(entries.values())


def export_hf_weights(
    chunks, bridge, cfg, dtype_of=None, include=None, params=None, dst=None
) -> HFStream:
    """(hf_name, whole tensor) pairs; a collective: every rank iterates it to the end or
    closes it (``close()`` / ``with``: the collectives left then run without yielding).

    ``dtype_of(hf_name)`` gives each output's dtype (None: keep the model's);
    ``include(local_name)`` picks the parameters to export (None: all), e.g. LoRA adapters;
    ``params`` (ExportParams) replaces this rank's parameter list. ``dst`` None: every
    rank yields every tensor (broadcast from its owner); a rank number: only that rank
    yields, the owner sends it each tensor point to point, the others yield nothing.
    """
    params = export_params(chunks, cfg, include) if params is None else params
    device = next(chunks[0].parameters()).device
    stacks = ExpertStacks(cfg.num_moe_experts)
    return HFStream(catalogue(params, cfg), {p.name: p for p in params}, device, dst,
                    lambda full, name: _to_hf(bridge, cfg, dtype_of, full, name, stacks))  # fmt: skip


class HFStream:
    """Iterator over the exported HF tensors that can be closed early without a hang."""

    def __init__(self, entries: list[Entry], local: dict, device, dst, convert):
        self._entries, self._local, self._device, self._dst = entries, local, device, dst
        self._convert = convert
        self._index, self._ready = 0, []

    def __iter__(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @torch.no_grad()
    def __next__(self) -> tuple[str, torch.Tensor]:
        while not self._ready:
            if self._index == len(self._entries):
                raise StopIteration
            full = self._step()
            if full is not None:
                self._ready = self._convert(full, self._entries[self._index - 1].name)
        return self._ready.pop(0)

    def _step(self) -> torch.Tensor | None:
        entry = self._entries[self._index]
        self._index += 1
        return whole(entry, self._local.get(entry.name), self._device, self._dst)

    @torch.no_grad()
    def close(self) -> None:
        """Take part in the collectives left (the other ranks wait on them), yielding nothing."""
        self._ready = []
        while self._index < len(self._entries):
            self._step()


def unpadded(full: torch.Tensor, name: str, cfg) -> torch.Tensor:
    """``full`` without the rows that tensor parallelism padded a vocabulary tensor with."""
    return full[: cfg.vocab_size] if name in _VOCAB_PARAMS else full


def _to_hf(bridge, cfg, dtype_of, full: torch.Tensor, name: str, stacks) -> list:
    full = unpadded(full, name, cfg)
    mapping, hf_names = bridge.resolve(name)
    expert = mapping.expert_of(name)
    out = []
    for hf_name, tensor in zip(hf_names, mapping.megatron_to_hf(full, cfg), strict=True):
        if expert is not None:
            tensor = stacks.add(hf_name, expert, tensor)
            if tensor is None:  # more experts of this HF tensor to come
                continue
        dtype = dtype_of(hf_name) if dtype_of else None
        out.append((hf_name, tensor.to(dtype) if dtype is not None else tensor))
    return out


def whole(entry: Entry, mine: ExportParam | None, device, dst) -> torch.Tensor | None:
    """The whole tensor of ``entry`` on the ranks that yield it (None elsewhere)."""
    full = None
    if mine is not None:
        group, replica = param_groups(mine.local_name)
        if replica == 0:
            full = sharding.gather(mine.local(), entry.how, group)
    me, world = dist.get_rank(), dist.get_world_size()
    if world == 1:
        return full
    if full is None and (dst is None or me == dst):
        full = torch.empty(entry.full_shape, dtype=getattr(torch, entry.dtype), device=device)
    if dst is None:
        dist.broadcast(full, src=entry.owner)
        return full
    if dst == entry.owner:
        return full if me == dst else None
    if me == entry.owner:
        dist.send(full.contiguous(), dst=dst)
    elif me == dst:
        dist.recv(full, src=entry.owner)
        return full
    return None
