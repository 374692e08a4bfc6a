"""``model.recompute_swiglu``: the dense MLP keeps fc1's output for backward, not SwiGLU's.

Megatron-Core's MLP saves fc1's output h [s, b, 2f] (for SwiGLU's backward) and SwiGLU's
output a [s, b, f] (for fc2's weight gradient). Here fc2 applies SwiGLU itself and
recomputes a = SwiGLU(h) in backward: f bf16 values per token and layer are not kept
(16 KB at f = 8192: ~8.6 GB for the 1.1B Llama shape at micro-batch 16 and seq 2048), for
one more write of f values per token: on the GPU the kernel of SwiGLU's gradient, which
reads h anyway, stores a too. torchtitan's compiled blocks get the same from
inductor's recomputation of element-wise work. On by default wherever it applies (the torch
spec's plain SwiGLU MLPs, not with compiled layers): at micro-batch 4-16 on an H200 it cost
0-1.4% of the step (scripts/performance/NOTES.md). With model.fp8 only where asked
(model.recompute_swiglu=true): fc2 keeps h instead of an FP8 copy of a^T and casts the
recomputed a again in backward (FP8SwiGLURowParallelLinear), not yet measured on a GPU.
"""

from __future__ import annotations

import logging

import torch
from megatron.core.tensor_parallel import layers
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.spec_utils import ModuleSpec

from megabridge.models import fp8
from megabridge.models.compiled import RowParallelLinear
from megabridge.models.triton_kernels import swiglu, swiglu_grad, swiglu_grad_and_output


class _SwiGLUThenLinear(torch.autograd.Function):
    """y = SwiGLU(h) W^T, saving h and W only. h [M, 2f], W [n, f] -> y [M, n].

    With ``accumulate`` (the linear's gradient_accumulation_fusion, which training/optim.py
    switches on where DDP gave W an fp32 main_grad) the weight gradient is added into
    main_grad by the GEMM itself, as Megatron's linears do it."""

    @staticmethod
    def forward(ctx, h, weight, accumulate):
        ctx.save_for_backward(h, weight)
        ctx.accumulate = accumulate
        return torch.matmul(swiglu(h), weight.t())

    @staticmethod
    def backward(ctx, grad_y):
        h, weight = ctx.saved_tensors
        if not ctx.needs_input_grad[1]:
            return _swiglu_grad_of_product(grad_y, weight, h, act=False), None, None
        # SwiGLU's output recomputed in the same pass as its gradient (one read of h)
        grad_h, a = _swiglu_grad_of_product(grad_y, weight, h, act=True)  # [M, 2f], [M, f]
        if not ctx.accumulate:
            return grad_h, torch.matmul(grad_y.t(), a), None
        layers.fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32(a, grad_y, weight.main_grad)
        if not hasattr(weight, "grad_added_to_main_grad"):
            return grad_h, None, None
        # as Megatron's linear: a placeholder gradient that DDP's hook sees but does not add
        weight.grad_added_to_main_grad = True
        return grad_h, torch.empty(weight.shape, dtype=h.dtype, device=h.device), None


def _swiglu_grad_of_product(grad_y, weight, h, act: bool):
    """SwiGLU's gradient given fc2's input gradient grad_y @ weight (the GEMM, then one pass
    over h), and with ``act`` SwiGLU's output too from the same pass."""
    grad_a = torch.matmul(grad_y, weight)  # [M, f]
    return swiglu_grad_and_output(grad_a, h) if act else swiglu_grad(grad_a, h)


class SwiGLURowParallelLinear(RowParallelLinear):
    """fc2 fed SwiGLU's input: Megatron's row-parallel linear (its TP all-reduce and bias
    after the GEMM are unchanged) with SwiGLU applied inside its GEMM step, when called
    through ``swiglu_then_linear``. Called as a module (by a LoRA adapter wrapping it, under
    Megatron's own MLP forward) it is Megatron's linear on SwiGLU's output."""

    swiglu_input = False

    def swiglu_then_linear(self, h):
        self.swiglu_input = True
        try:
            return self(h)
        finally:
            self.swiglu_input = False

    def _forward_impl(self, input, weight, bias=None, *args, **kwargs):
        if not self.swiglu_input:
            return super()._forward_impl(input, weight, bias, *args, **kwargs)
        # input [s, b, 2f / tp] -> [s, b, n]; Megatron passes no bias here (added after).
        flat = input.reshape(-1, input.shape[-1])
        accumulate = self.gradient_accumulation_fusion and weight.requires_grad
        out = _SwiGLUThenLinear.apply(flat, weight, accumulate)
        out = out.view(*input.shape[:-1], weight.shape[0])
        return out if bias is None else out + bias


class FP8SwiGLURowParallelLinear(fp8._FP8Forward, SwiGLURowParallelLinear):
    """fc2 under model.fp8 with model.recompute_swiglu=true: fed SwiGLU's input, its GEMMs in
    FP8 with SwiGLU's output recomputed in backward (fp8.FP8SwiGLUThenLinear); called as a
    module, the FP8 linear on SwiGLU's output. Frozen weights (LoRA's base) stay bf16, as in
    the other FP8 linears."""

    bf16_class = SwiGLURowParallelLinear  # model.first_last_layers_bf16's layers

    def _forward_impl(self, input, weight, bias=None, *args, **kwargs):
        if not self.swiglu_input or not weight.requires_grad:
            return super()._forward_impl(input, weight, bias, *args, **kwargs)
        flat = input.reshape(-1, input.shape[-1])
        # emulated on the CPU (tests only: check_fp8_supported refuses it for runs)
        out = fp8.FP8SwiGLUThenLinear.apply(flat, weight, self.fp8_recipe, not input.is_cuda)
        out = out.view(*input.shape[:-1], weight.shape[0])
        return out if bias is None else out + bias


class _UnknownMLPFilter(logging.Filter):
    """Drops Megatron-Core's "Unknown MLP type" warning, which its TransformerLayer logs for
    each layer whose MLP class is not one of its own (this module's is MLP's subclass, built
    with MLP's arguments: the TP group comes from parallel_state as before)."""

    message = f"Unknown MLP type: {ModuleSpec}. Using default kwargs."

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != self.message


def quiet_unknown_mlp_warning() -> None:
    """Once a process: layers built with RecomputedSwiGLUMLP log nothing about its class."""
    logger = logging.getLogger("megatron.core.transformer.transformer_layer")
    if not any(isinstance(f, _UnknownMLPFilter) for f in logger.filters):
        logger.addFilter(_UnknownMLPFilter())


class RecomputedSwiGLUMLP(MLP):
    """Megatron's dense MLP, fc1's output handed to fc2 before SwiGLU (see the module doc).

    A wrapped fc2 (a LoRA adapter sees fc2's real input, SwiGLU's output) keeps
    Megatron's own forward.
    """

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        if per_token_scale is not None or not isinstance(self.linear_fc2, SwiGLURowParallelLinear):
            return super().forward(hidden_states, per_token_scale, **kwargs)
        h, bias = self.linear_fc1(hidden_states)  # [s, b, 2f / tp]
        if bias is not None:
            h = h + bias
        return self.linear_fc2.swiglu_then_linear(h)
