"""Quantized HF checkpoints, read as full-precision weights.

Some releases store their linear weights quantized, with companion tensors
(scales) next to each one, and say how in config.json's ``quantization_config``.
``dequantizer(quantization_config)`` returns how to turn the stored tensors of
one weight back into the full-precision weight; the safetensors reader
(hf_io.HFCheckpoint) applies it at its one read, so the conversion tables only
ever see the weights transformers' model holds. A quantized checkpoint therefore
converts and exports as full precision (bf16 unless another dtype is asked for),
with ``quantization_config`` dropped from the exported config.json.

Formats, one table entry each (``FORMATS``: quant_method -> builder):

* ``fp8``: DeepSeek-V3 / Kimi-K2 block-scaled FP8. Each quantized ``X.weight``
  (float8_e4m3fn, [rows, cols]) has ``X.weight_scale_inv`` (float32,
  [ceil(rows / br), ceil(cols / bc)] for ``weight_block_size`` [br, bc]):
  weight = fp8 * scale of its block, in float32, as transformers' Fp8Dequantize
  computes it. The reader hands out that float32 weight and says its dtype is
  bf16: a bf16 model or export rounds it once, which is DeepSeek's weight_dequant
  and transformers' bf16 load, and an fp32 model keeps it unrounded, as
  transformers does when it loads the checkpoint in fp32 (on a CPU it dequantizes).
  Edge blocks may be partial (576 rows of kv_a_proj_with_mqa in 128-row blocks).
* ``mxfp4``: GPT-OSS's experts. Each expert projection ``X`` is stored as ``X_blocks``
  [experts, out, in / 32, 16] uint8 (two e2m1 values a byte, the low nibble first) and
  ``X_scales`` [experts, out, in / 32] uint8 (a power of two per 32 values, e8m0, bias
  127); dequantized as transformers does (integrations/mxfp4.py,
  convert_moe_packed_tensors), ``X`` is [experts, in, out] bf16, the layout of
  transformers' GptOssExperts. Every e2m1 value times a power of two in e8m0's range is
  exact in bf16: nothing is rounded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from megabridge.errors import UserError

# The dtype a dequantized weight is stored in (the releases' own compute dtype).
DEQUANTIZED_DTYPE = torch.bfloat16


@dataclass(frozen=True)
class Dequantizer:
    """How one quantized checkpoint's stored tensors become full-precision weights.

    ``parts(name)``: the stored tensors the weight ``name`` is made of, given the set of
    stored names (``(name,)`` for a tensor stored as it is). ``dequantize(name,
    tensors)`` turns those tensors, in that order, into the weight. ``weight_name`` and
    ``weight_shape`` say what a quantized weight is called and its shape, from its first
    stored tensor's name and its stored tensors' shapes (default: those of the first).
    """

    method: str
    parts: Callable[[str, frozenset[str]], tuple[str, ...]]
    dequantize: Callable[[str, list[torch.Tensor]], torch.Tensor]
    weight_name: Callable[[str], str] = lambda name: name
    weight_shape: Callable[[list[tuple[int, ...]]], tuple[int, ...]] = lambda shapes: shapes[0]

    def weights(self, stored: Iterable[str]) -> dict[str, tuple[str, ...]]:
        """Weight name -> its stored tensors, for every weight of the checkpoint."""
        names = frozenset(stored)
        groups = {name: self.parts(name, names) for name in sorted(names)}
        companions = {part for name, parts in groups.items() for part in parts if part != name}
        return {
            self.weight_name(name) if len(parts) > 1 else name: parts
            for name, parts in groups.items()
            if name not in companions
        }


# ------------------------------------------------------------------ fp8 (block-scaled)

_FP8_SCALE = "_scale_inv"


def _fp8(config: dict) -> Dequantizer:
    if config.get("activation_scheme", "dynamic") != "dynamic":
        # Static activation scales (input_scale tensors) carry nothing for a bf16 model,
        # but a checkpoint with them is not one megabridge has been tested on.
        raise UserError(
            f"FP8 checkpoints with activation_scheme={config['activation_scheme']!r} are not "
            "supported yet (only 'dynamic')"
        )
    if config.get("fmt", "e4m3") != "e4m3":
        raise UserError(f"FP8 checkpoints in fmt={config['fmt']!r} are not supported (only e4m3)")
    block = config.get("weight_block_size")
    if block is None or len(block) != 2:
        raise UserError(
            f"FP8 checkpoints need weight_block_size [rows, cols] (got {block!r}): per-tensor "
            "scales are not supported yet"
        )
    block_rows, block_cols = (int(b) for b in block)

    def parts(name: str, names: frozenset[str]) -> tuple[str, ...]:
        scale = name + _FP8_SCALE
        return (name, scale) if scale in names else (name,)

    def dequantize(name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        if len(tensors) == 1:
            return tensors[0]
        return fp8_block_dequantize(name, *tensors, block_rows, block_cols)

    return Dequantizer("fp8", parts, dequantize)


def fp8_block_dequantize(
    name: str, weight: torch.Tensor, scale_inv: torch.Tensor, block_rows: int, block_cols: int
) -> torch.Tensor:
    """[rows, cols] float32 from an FP8 weight and its [ceil(rows/br), ceil(cols/bc)] scales."""
    if weight.dim() != 2:
        raise UserError(f"{name}: an FP8 block-scaled weight must be a matrix, got {weight.shape}")
    rows, cols = weight.shape
    grid = (math.ceil(rows / block_rows), math.ceil(cols / block_cols))
    if tuple(scale_inv.shape) != grid:
        raise UserError(
            f"{name}{_FP8_SCALE} has shape {tuple(scale_inv.shape)}, but a {rows}x{cols} weight "
            f"in {block_rows}x{block_cols} blocks needs {grid}"
        )
    # Each block's scale repeated over the block, the partial edge blocks cut to size.
    scales = scale_inv.float().repeat_interleave(block_rows, 0).repeat_interleave(block_cols, 1)
    return weight.float() * scales[:rows, :cols]


# ------------------------------------------------------------------ mxfp4 (GPT-OSS)

# The 16 e2m1 values, indexed by the 4-bit code (sign bit first).
FP4_E2M1 = (+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
            -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)  # fmt: skip
E8M0_BIAS = 127
MXFP4_BLOCK = 32  # values per scale
_BLOCKS, _SCALES = "_blocks", "_scales"


def _mxfp4(config: dict) -> Dequantizer:
    def parts(name: str, names: frozenset[str]) -> tuple[str, ...]:
        if not name.endswith(_BLOCKS):
            return (name,)
        scales = name.removesuffix(_BLOCKS) + _SCALES
        if scales not in names:
            raise UserError(f"MXFP4 checkpoint: {name} has no {scales}")
        return (name, scales)

    def dequantize(name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        return tensors[0] if len(tensors) == 1 else mxfp4_dequantize(name, *tensors)

    def weight_shape(shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
        experts, rows, groups, _ = shapes[0]  # blocks [E, out, in / 32, 16] -> [E, in, out]
        return (experts, groups * MXFP4_BLOCK, rows)

    return Dequantizer(
        "mxfp4", parts, dequantize, lambda name: name.removesuffix(_BLOCKS), weight_shape
    )


def mxfp4_dequantize(
    name: str, blocks: torch.Tensor, scales: torch.Tensor, dtype=DEQUANTIZED_DTYPE
) -> torch.Tensor:
    """[E, out, in/32, 16] uint8 blocks and [E, out, in/32] scales -> [E, in, out] ``dtype``."""
    if blocks.dim() != 4 or blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise UserError(
            f"{name}: MXFP4 blocks {tuple(blocks.shape)} do not fit scales {tuple(scales.shape)}"
        )
    experts, rows, groups, _ = blocks.shape
    lut = torch.tensor(FP4_E2M1, dtype=dtype)
    out = torch.empty(experts, groups * MXFP4_BLOCK, rows, dtype=dtype)
    for e in range(experts):  # one expert's temporaries at a time
        packed = blocks[e].to(torch.uint8).reshape(rows * groups, MXFP4_BLOCK // 2)
        values = torch.empty(rows * groups, MXFP4_BLOCK, dtype=dtype)
        values[:, 0::2] = lut[(packed & 0x0F).int()]  # low nibble: the even element
        values[:, 1::2] = lut[(packed >> 4).int()]
        exponents = scales[e].to(torch.int32).reshape(rows * groups, 1) - E8M0_BIAS
        torch.ldexp(values, exponents, out=values)
        out[e] = values.reshape(rows, groups * MXFP4_BLOCK).t()
    return out


# ------------------------------------------------------------------ the table

FORMATS: dict[str, Callable[[dict], Dequantizer]] = {
    "fp8": _fp8,
    "mxfp4": _mxfp4,
}


def dequantizer(quantization_config: dict | None) -> Dequantizer | None:
    """How to read a checkpoint whose config.json has ``quantization_config`` (None: as stored)."""
    if not quantization_config:
        return None
    method = quantization_config.get("quant_method")
    if method not in FORMATS:
        raise UserError(
            f"checkpoints quantized with quant_method={method!r} are not supported yet "
            f"(supported: {', '.join(FORMATS)}); dequantize the checkpoint first"
        )
    return FORMATS[method](quantization_config)


def full_precision_config(config_dict: dict) -> dict:
    """config.json of the model as megabridge holds it: a quantized checkpoint's without its
    ``quantization_config`` and in the dequantized dtype (what an export writes)."""
    if not config_dict.get("quantization_config"):
        return config_dict
    out = {k: v for k, v in config_dict.items() if k != "quantization_config"}
    key = "torch_dtype" if "torch_dtype" in out else "dtype"
    out[key] = str(DEQUANTIZED_DTYPE).removeprefix("torch.")
    return out
