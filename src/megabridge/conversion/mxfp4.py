"""MXFP4 checkpoints (GPT-OSS's official weights): experts stored as FP4 blocks plus scales.

The published checkpoints store each expert projection ``<name>`` as two tensors:
``<name>_blocks`` [experts, out, in / 32, 16] uint8, two FP4 (e2m1) values a byte, the
low nibble first; ``<name>_scales`` [experts, out, in / 32] uint8, one power of two per
block of 32 values (e8m0, bias 127). Dequantized as transformers does
(integrations/mxfp4.py, convert_moe_packed_tensors), the tensor is [experts, in, out],
the layout of transformers' GptOssExperts: the unquantized checkpoint's ``<name>``.

``derived_tensors`` tells the reader (hf_io.HFCheckpoint) which tensors to present under
their dequantized name; each is built from its two stored tensors when read, one expert
at a time, so that only the tensor being converted is ever in memory. Every FP4 value
times a power of two in e8m0's range is exact in bfloat16, so bf16 loses nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from megabridge.errors import ConversionError

# The 16 e2m1 values, indexed by the 4-bit code (sign bit first).
FP4_E2M1 = (+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
            -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)  # fmt: skip
E8M0_BIAS = 127
BLOCK = 32  # values per scale
DTYPE = torch.bfloat16  # what transformers dequantizes the published (bf16) models to


@dataclass(frozen=True)
class Derived:
    """A tensor the checkpoint does not store as such: built from ``sources`` when read."""

    sources: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype
    build: Callable[[list[torch.Tensor]], torch.Tensor]


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype=DTYPE) -> torch.Tensor:
    """[E, out, in/32, 16] uint8 blocks and [E, out, in/32] scales -> [E, in, out] ``dtype``."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BLOCK // 2:
        raise ConversionError(
            f"MXFP4 blocks {tuple(blocks.shape)} do not fit scales {tuple(scales.shape)}"
        )
    experts, rows, groups, _ = blocks.shape
    lut = torch.tensor(FP4_E2M1, dtype=dtype)
    out = torch.empty(experts, groups * BLOCK, rows, dtype=dtype)
    for e in range(experts):  # one expert's temporaries at a time
        packed = blocks[e].to(torch.uint8).reshape(rows * groups, BLOCK // 2)
        values = torch.empty(rows * groups, BLOCK, dtype=dtype)
        values[:, 0::2] = lut[(packed & 0x0F).int()]  # low nibble: the even element
        values[:, 1::2] = lut[(packed >> 4).int()]
        exponents = scales[e].to(torch.int32).reshape(rows * groups, 1) - E8M0_BIAS
        torch.ldexp(values, exponents, out=values)
        out[e] = values.reshape(rows, groups * BLOCK).t()
    return out


def derived_tensors(quantization_config: dict | None, shapes: dict[str, tuple]) -> dict:
    """{dequantized name: Derived} for an MXFP4 checkpoint's ``*_blocks`` / ``*_scales``
    pairs (``shapes``: every stored tensor's shape); {} for any other checkpoint."""
    if not quantization_config or quantization_config.get("quant_method") != "mxfp4":
        return {}
    derived = {}
    for name, shape in shapes.items():
        if not name.endswith("_blocks"):
            continue
        base = name.removesuffix("_blocks")
        scales = f"{base}_scales"
        if scales not in shapes:
            raise ConversionError(f"MXFP4 checkpoint: {name} has no {scales}")
        experts, rows, groups, _ = shape
        derived[base] = Derived(
            (name, scales), (experts, groups * BLOCK, rows), DTYPE, lambda t: dequantize(*t)
        )
    return derived
