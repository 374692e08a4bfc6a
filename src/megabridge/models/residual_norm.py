"""Each residual add and the RMSNorm after it as one kernel (the torch spec, where Triton runs).

In Megatron-Core's TransformerLayer a sublayer's output is added to the residual stream
(``self_attn_bda``, ``mlp_bda``) and the sum goes to the next norm (the layer's
``pre_mlp_layernorm``, the next layer's ``input_layernorm`` or the block's
``final_layernorm``), which reads it again from memory. Here the add computes that norm too
(triton_kernels.add_rms_norm): forward reads the two operands once and writes the sum and
its norm; backward adds the residual stream's gradient inside the norm's backward kernel,
where autograd summed the two gradients in a kernel of its own. The norm, called next with
that very sum, returns what was computed (RMSNorm.computed). Per add, three reads or writes
of an activation [tokens, hidden] and two kernel launches fewer.

Values and gradients are the unfused path's bit for bit in bf16 (triton_kernels.add_rms_norm
says where fp32 may differ by a rounding). At call time the add is Megatron's own wherever
the fused one does not apply: a bias or dropout, operands of another shape or dtype, no
Triton (CPU runs: exact conversion numerics). Not wired where norms are recomputed
(model.recompute_granularity=full, "layernorm" in recompute_modules) or where layers are
compiled (inductor fuses the add itself), nor around post-norms or residual multipliers.
"""

from __future__ import annotations

import functools

import torch

from megabridge.models import triton_kernels
from megabridge.models.torch_layers import RMSNorm


def applies(cfg) -> bool:
    """Whether the model config lets fuse_residual_norms wire its layers."""
    recomputed = cfg.recompute_granularity == "full" or "layernorm" in (cfg.recompute_modules or [])
    return not cfg.compile_layers and not recomputed


def fuse_residual_norms(model: torch.nn.Module) -> int:
    """Wire each layer's residual adds to the norm that follows them; returns how many."""
    from megatron.core.transformer.transformer_block import TransformerBlock

    count = 0
    for block in model.modules():
        if not isinstance(block, TransformerBlock):
            continue
        layers = list(block.layers)
        for i, layer in enumerate(layers):
            if not getattr(layer, "plain_residuals", False):  # megabridge's TransformerLayer
                continue
            last = i + 1 == len(layers)
            after_mlp = block.final_layernorm if last else layers[i + 1].input_layernorm
            for name, norm in (("self_attn_bda", layer.pre_mlp_layernorm), ("mlp_bda", after_mlp)):
                if type(norm) is RMSNorm and not norm.zero_centered:
                    add = functools.partial(_add_then_norm, getattr(layer, name), norm)
                    setattr(layer, name, add)
                    count += 1
    return count


def _add_then_norm(bda, norm: RMSNorm, training: bool, fused: bool):
    """Megatron's ``<sublayer>_bda(training, fused)``: the add for this call."""
    add = bda(training, fused)

    def add_then_norm(output_with_bias, residual, prob):
        output, bias = output_with_bias  # [s, b, h]
        if bias is not None or (training and prob) or not _fits(residual, output, norm):
            return add(output_with_bias, residual, prob)
        total, normed = triton_kernels.add_rms_norm(residual, output, norm.weight, norm.eps)
        norm.computed(total, normed)
        return total

    return add_then_norm


def _fits(residual: torch.Tensor, output: torch.Tensor, norm: RMSNorm) -> bool:
    return (
        residual.shape == output.shape
        and residual.dtype == output.dtype
        and triton_kernels.rms_norm_fits(residual, norm.weight)
    )
