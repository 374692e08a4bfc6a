"""Reversible parameter mappings between HF names/layouts and Megatron-Core's.

A mapping is a pure function on whole (unsharded) tensors, in both directions:
``hf_to_megatron`` builds the Megatron tensor from its HF tensors,
``megatron_to_hf`` inverts it exactly. Sharding over ranks is not their business
(sharding.py does it). Names are patterns in which ``*`` stands for a layer (or
expert) index; the n-th ``*`` of the Megatron pattern is the n-th of the HF ones.
"""

from __future__ import annotations

import dataclasses
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

# torch is imported where a mapping runs, not here: every family bridge imports this
# module, and `megabridge models` lists the bridges without paying torch's ~5 s import.
if TYPE_CHECKING:
    import torch


def _compile(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(r"\*", r"(\d+)") + "$")


def _fill(pattern: str, indices: tuple[str, ...]) -> str:
    parts = pattern.split("*")
    if len(parts) - 1 != len(indices):
        raise ValueError(f"pattern {pattern!r} needs {len(parts) - 1} indices, got {indices}")
    out = parts[0]
    for index, part in zip(indices, parts[1:], strict=True):
        out += index + part
    return out


@dataclass(frozen=True)
class Mapping(ABC):
    """One Megatron parameter <-> one or more HF tensors."""

    megatron: str
    hf: tuple[str, ...]
    _regex: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if isinstance(self.hf, str):
            object.__setattr__(self, "hf", (self.hf,))
        object.__setattr__(self, "_regex", _compile(self.megatron))

    def match(self, megatron_name: str) -> tuple[str, ...] | None:
        """The HF names for ``megatron_name``, or None if this mapping is not for it."""
        m = self._regex.match(megatron_name)
        if m is None:
            return None
        return tuple(_fill(p, m.groups()) for p in self.hf)

    def expert_of(self, megatron_name: str) -> int | None:
        """The expert whose slice of stacked HF tensors ``megatron_name`` is (StackedExperts);
        None: the HF tensors are this parameter's alone."""
        return None

    def megatron_name(self, hf_name_of_first: str) -> str | None:
        m = _compile(self.hf[0]).match(hf_name_of_first)
        return None if m is None else _fill(self.megatron, m.groups())

    @abstractmethod
    def hf_to_megatron(self, tensors: list[torch.Tensor], cfg) -> torch.Tensor:
        """The Megatron tensor from the HF tensors (in the order of ``hf``)."""

    @abstractmethod
    def megatron_to_hf(self, tensor: torch.Tensor, cfg) -> list[torch.Tensor]:
        """The HF tensors (in the order of ``hf``) from the Megatron tensor; exact inverse."""

    def megatron_to_hf_views(self, tensor: torch.Tensor, cfg) -> list[torch.Tensor]:
        """megatron_to_hf, except that each output may keep another shape whose elements,
        read in row-major order, are the HF tensor's: a view of ``tensor`` where the HF
        shape would need a copy. A repeated weight sync copies such a view straight into
        the HF tensor viewed in that shape (conversion/sync_plan.py)."""
        return self.megatron_to_hf(tensor, cfg)


class Rename(Mapping):
    """Same tensor, another name."""

    def hf_to_megatron(self, tensors, cfg):
        (t,) = tensors
        return t

    def megatron_to_hf(self, tensor, cfg):
        return [tensor]


def _qkv_sizes(cfg) -> tuple[int, int, int]:
    heads = cfg.num_attention_heads
    groups = cfg.num_query_groups or heads
    head_dim = cfg.kv_channels or cfg.hidden_size // heads
    return groups, heads // groups * head_dim, head_dim


def _qkv_views(tensor, cfg) -> list:
    """q: [groups, heads/groups * d, ...], k, v: [groups, d, ...]: strided views of the fused
    tensor; flattening them to the HF shape copies once there are several groups."""
    groups, q_rows, d = _qkv_sizes(cfg)
    rest = tensor.shape[1:]
    return list(tensor.reshape(groups, q_rows + 2 * d, *rest).split([q_rows, d, d], dim=1))


class QKV(Mapping):
    """HF q/k/v projections <-> Megatron's fused linear_qkv.

    Megatron interleaves by query group: for each of the ``g`` groups, the rows
    of its query heads, then its key head, then its value head. Tensor
    parallelism then splits whole groups. Works for weights [out, in] and
    biases [out].
    q: [heads * d, ...], k, v: [groups * d, ...] -> [groups * (heads/groups + 2) * d, ...]
    """

    def hf_to_megatron(self, tensors, cfg):
        import torch

        q, k, v = tensors
        groups, q_rows, d = _qkv_sizes(cfg)
        rest = q.shape[1:]
        fused = torch.cat(
            [
                q.reshape(groups, q_rows, *rest),
                k.reshape(groups, d, *rest),
                v.reshape(groups, d, *rest),
            ],
            dim=1,
        )
        return fused.reshape(-1, *rest)

    def megatron_to_hf(self, tensor, cfg):
        rest = tensor.shape[1:]
        return [t.reshape(-1, *rest) for t in _qkv_views(tensor, cfg)]

    def megatron_to_hf_views(self, tensor, cfg):
        return _qkv_views(tensor, cfg)


class FusedQKV(QKV):
    """One HF projection with the rows of all queries, then all keys, then all values
    (Phi-3's qkv_proj) <-> Megatron's linear_qkv: split into q, k, v, then as QKV.

    [(heads + 2 * groups) * d, ...] -> [groups * (heads/groups + 2) * d, ...]
    """

    def hf_to_megatron(self, tensors, cfg):
        (fused,) = tensors
        groups, q_rows, d = _qkv_sizes(cfg)
        q, k, v = fused.split([groups * q_rows, groups * d, groups * d], dim=0)
        return super().hf_to_megatron([q, k, v], cfg)

    def megatron_to_hf(self, tensor, cfg):
        import torch

        return [torch.cat(super().megatron_to_hf(tensor, cfg), dim=0)]

    def megatron_to_hf_views(self, tensor, cfg):
        return self.megatron_to_hf(tensor, cfg)  # one HF tensor: QKV's three views do not apply


class GatedMLP(Mapping):
    """HF gate and up projections <-> Megatron's fused linear_fc1 = [gate; up]."""

    def hf_to_megatron(self, tensors, cfg):
        import torch

        gate, up = tensors
        return torch.cat([gate, up], dim=0)

    def megatron_to_hf(self, tensor, cfg):
        gate, up = tensor.chunk(2, dim=0)
        return [gate, up]


def renames(table: dict[str, str]) -> list[Mapping]:
    """Rename mappings from a {megatron pattern: hf pattern} table."""
    return [Rename(megatron, (hf,)) for megatron, hf in table.items()]


def hf_moved(mappings: list[Mapping], prefix: str, to: str) -> list[Mapping]:
    """``mappings`` with their HF names under ``prefix`` moved under ``to`` (a multimodal
    checkpoint keeps its language model's ``model.*`` under ``model.language_model.*``)."""
    return [
        dataclasses.replace(m, hf=tuple(to + h.removeprefix(prefix) if h.startswith(prefix) else h
                                        for h in m.hf))
        for m in mappings
    ]  # fmt: skip


@dataclass(frozen=True)
class StackedExperts(Mapping):
    """One expert's Megatron tensor <-> its slice of an HF tensor that stacks every expert of
    a layer along dim 0 (GPT-OSS: ``experts.gate_up_proj`` [E, hidden, 2 * ffn]).

    The Megatron pattern has one ``*`` more than the HF one: its last is the expert, the
    index into the stack. hf_to_megatron receives the expert's slice (transfer.py takes
    it); megatron_to_hf returns it, and transfer.py stacks the experts again.
    ``transposed``: HF keeps the weight as [in, out] (x @ W), Megatron as [out, in].
    ``interleaved``: HF alternates gate and up columns (gate = [..., ::2], up =
    [..., 1::2]); Megatron's linear_fc1 is [gate; up].
    """

    transposed: bool = False
    interleaved: bool = False
    # Read also a slice already in Megatron's [out, in] shape, as is (transformers 5 saves
    # Qwen3-VL-MoE's experts so; the release stores them [in, out]). As transformers decides:
    # by the shape alone, so a square slice counts as [out, in]. Written back transposed.
    either_way: bool = False

    def match(self, megatron_name: str) -> tuple[str, ...] | None:
        m = self._regex.match(megatron_name)
        if m is None:
            return None
        return tuple(_fill(p, m.groups()[:-1]) for p in self.hf)

    def expert_of(self, megatron_name: str) -> int | None:
        m = self._regex.match(megatron_name)
        return None if m is None else int(m.groups()[-1])

    def megatron_name(self, hf_name_of_first: str) -> str | None:
        return None  # one HF tensor, every expert: there is no single Megatron name

    def hf_to_megatron(self, tensors, cfg):
        import torch

        (t,) = tensors  # weight [in, out] / [out, in], or bias [out]
        if self.either_way and tuple(t.shape) == self._megatron_shape(cfg):
            return t
        if self.interleaved:  # columns g0 u0 g1 u1 ... -> [g0 g1 ...; u0 u1 ...]
            t = torch.cat([t[..., ::2], t[..., 1::2]], dim=-1)
        return t.t().contiguous() if self.transposed else t

    def _megatron_shape(self, cfg) -> tuple[int, int]:
        """One gated expert's [out, in]: linear_fc1 [2 * ffn, hidden], linear_fc2 [hidden, ffn]."""
        ffn, hidden = cfg.moe_ffn_hidden_size, cfg.hidden_size
        return (2 * ffn, hidden) if ".linear_fc1." in self.megatron else (hidden, ffn)

    def megatron_to_hf(self, tensor, cfg):
        import torch

        t = tensor.t() if self.transposed else tensor
        if self.interleaved:  # [gate; up] -> g0 u0 g1 u1 ...
            gate, up = t.chunk(2, dim=-1)
            t = torch.stack([gate, up], dim=-1).flatten(-2)
        return [t.contiguous()]
