"""``model.recompute_swiglu``: the dense MLP keeps fc1's output for backward, not SwiGLU's.

Megatron-Core's MLP saves fc1's output h [s, b, 2f] (for SwiGLU's backward) and SwiGLU's
output a [s, b, f] (for fc2's weight gradient). Here fc2 applies SwiGLU itself and
recomputes a = SwiGLU(h) in backward: f bf16 values per token and layer are not kept
(16 KB at f = 8192: ~8.6 GB for the 1.1B Llama shape at micro-batch 16 and seq 2048), for
one more write of f values per token: on the GPU the kernel of SwiGLU's gradient, which
reads h anyway, stores a too. torchtitan's compiled blocks get the same from
inductor's recomputation of element-wise work.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.layers import RowParallelLinear
from megatron.core.transformer.mlp import MLP

from megabridge.models.triton_kernels import swiglu, swiglu_grad, swiglu_grad_and_output


class _SwiGLUThenLinear(torch.autograd.Function):
    """y = SwiGLU(h) W^T, saving h and W only. h [M, 2f], W [n, f] -> y [M, n]."""

    @staticmethod
    def forward(ctx, h, weight):
        ctx.save_for_backward(h, weight)
        return torch.matmul(swiglu(h), weight.t())

    @staticmethod
    def backward(ctx, grad_y):
        h, weight = ctx.saved_tensors
        grad_a = torch.matmul(grad_y, weight)  # [M, f]
        if not ctx.needs_input_grad[1]:
            return swiglu_grad(grad_a, h), None
        # SwiGLU's output recomputed in the same pass as its gradient (one read of h)
        grad_h, a = swiglu_grad_and_output(grad_a, h)  # [M, 2f], [M, f]
        return grad_h, torch.matmul(grad_y.t(), a)


class SwiGLURowParallelLinear(RowParallelLinear):
    """fc2 fed SwiGLU's input: Megatron's row-parallel linear (its TP all-reduce and bias
    after the GEMM are unchanged) with SwiGLU applied inside its GEMM step."""

    def _forward_impl(self, input, weight, bias=None, *args, **kwargs):
        # input [s, b, 2f / tp] -> [s, b, n]; Megatron passes no bias here (added after).
        flat = input.reshape(-1, input.shape[-1])
        out = _SwiGLUThenLinear.apply(flat, weight).view(*input.shape[:-1], weight.shape[0])
        return out if bias is None else out + bias


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
        return self.linear_fc2(h)
